/**
 * Speculative dispatch: for an account whose last hold was placed, the job goes to the worker
 * while the hold is being placed. The hold still gates the consumer and the money. Real parts: the
 * control plane over the real store (its openOrder wrapped so the test decides when the real hold
 * is placed), worker processes over gRPC, fake OpenAI-compatible engines, and the `openai` SDK.
 */
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import type { OpenOrderInput, OrderRecord } from "../../server/market/store-port.js";
import { DEFAULT_FAKE_TOKENS, type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket } from "../support/market.js";

const FULL_TEXT = DEFAULT_FAKE_TOKENS.join("");
const BASIS_POINTS = 10_000n;

function deferred<T = void>() {
  let resolve!: (value: T) => void;
  const promise = new Promise<T>((r) => {
    resolve = r;
  });
  return { promise, resolve };
}

describe("speculative dispatch", () => {
  let market: TestMarket;
  let provider: string;
  let quickEngine: FakeEngine;
  let hangingEngine: FakeEngine;
  let quickWorkerId: string;
  /** Hangs after its first token until the client closes: requests counted from 0. */
  let hangingRequests = 0;
  /** The next hold waits for `released`; `enter` tells the test it was asked for. */
  let gate: { enter(input: OpenOrderInput): void; released: Promise<void> } | null = null;
  /** Called on the next first token the control plane receives from any worker. */
  let onFirstToken: (() => void) | null = null;
  /** Jobs handed to a worker's session so far (the JobAssign is sent as the job is watched). */
  let dispatched = 0;
  /** `dispatched` as each hold was asked of the store, in order. */
  const dispatchedAtHold: number[] = [];
  /** Called when a worker's slot frees (its job ended at the control plane). */
  let onFreed: ((workerId: string) => void) | null = null;
  const releaseAll: (() => void)[] = [];

  beforeAll(async () => {
    market = await startTestMarket();
    const { store, registry } = market.plane;
    // The real store's hold, placed only once the test releases it.
    const openOrder = store.openOrder.bind(store);
    store.openOrder = async (input: OpenOrderInput): Promise<OrderRecord> => {
      dispatchedAtHold.push(dispatched);
      const current = gate;
      gate = null;
      if (current) {
        current.enter(input);
        await current.released;
      }
      return openOrder(input);
    };
    // An attempt is watched right before its JobAssign goes to the worker's session.
    const watch = registry.reputation.watch.bind(registry.reputation);
    registry.reputation.watch = (workerId, model) => {
      dispatched += 1;
      return watch(workerId, model);
    };
    // Observes (and passes on) the first token of each attempt as the control plane receives it.
    const firstToken = registry.reputation.firstToken.bind(registry.reputation);
    registry.reputation.firstToken = (watch, ttftMs) => {
      firstToken(watch, ttftMs);
      const notify = onFirstToken;
      onFirstToken = null;
      notify?.();
    };
    registry.onCapacity((connection) => {
      if (connection.activeJobs === 0) onFreed?.(connection.workerId);
    });
    provider = (await market.account("provider")).accountId;
    quickEngine = await startFakeEngine();
    hangingEngine = await startFakeEngine({ hang: true });
    quickWorkerId = (
      await market.worker({
        accountId: provider,
        model: "quick",
        priceIn: "10",
        priceOut: "20",
        tps: 50,
        engine: ["--engine", "openai", "--engine-url", quickEngine.url],
      })
    ).workerId;
    await market.worker({
      accountId: provider,
      model: "hanging",
      priceIn: "10",
      priceOut: "20",
      tps: 50,
      engine: ["--engine", "openai", "--engine-url", hangingEngine.url],
    });
  });

  afterAll(async () => {
    for (const release of releaseAll) release();
    await market?.close();
    await Promise.all([quickEngine?.close(), hangingEngine?.close()]);
  });

  function blockNextHold(): { entered: Promise<OpenOrderInput>; release(): void } {
    const entered = deferred<OpenOrderInput>();
    const released = deferred();
    gate = { enter: entered.resolve, released: released.promise };
    releaseAll.push(released.resolve);
    return { entered: entered.promise, release: released.resolve };
  }

  function nextFirstToken(): Promise<void> {
    const seen = deferred();
    onFirstToken = seen.resolve;
    return seen.promise;
  }

  function nextFreed(workerId: string): Promise<void> {
    const freed = deferred();
    onFreed = (id) => {
      if (id !== workerId) return;
      onFreed = null;
      freed.resolve();
    };
    return freed.promise;
  }

  async function streamText(client: OpenAI, model: string, signal?: AbortSignal): Promise<string> {
    const stream = await client.chat.completions.create(
      { model, messages: [{ role: "user", content: "Hi" }], stream: true },
      signal ? { signal } : {},
    );
    let text = "";
    for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
    return text;
  }

  /** An account whose last hold was placed (one ordinary order served), so it speculates. */
  async function payingConsumer(name: string): Promise<{ accountId: string; client: OpenAI }> {
    const { accountId, apiKey } = await market.account(name, 10);
    const client = market.openai(apiKey);
    expect(await streamText(client, "quick")).toBe(FULL_TEXT);
    await market.plane.marketplace.whenIdle();
    return { accountId, client };
  }

  async function books(accountId: string) {
    return {
      consumer: await market.balance(accountId),
      provider: await market.balance(provider),
      platform: await market.balance("acct_platform"),
    };
  }

  it("(0) sends the JobAssign before the hold's statement, for an account that speculates (not before its first hold)", async () => {
    const { client } = await payingConsumer("ordering");
    // The paying consumer's first order was not speculative: its hold came before its dispatch.
    const first = dispatchedAtHold.at(-1) as number;
    expect(dispatched).toBe(first + 1);
    const dispatchedBefore = dispatched;

    expect(await streamText(client, "quick")).toBe(FULL_TEXT);

    // This order's hold was asked for once its job had gone to the worker.
    expect(dispatchedAtHold.at(-1)).toBe(dispatchedBefore + 1);
    expect(dispatched).toBe(dispatchedBefore + 1);
  });

  it("(1) the worker streams its whole answer before the hold commits: the consumer gets nothing until then, then all of it, billed exactly", async () => {
    const { accountId, client } = await payingConsumer("early");
    const before = await books(accountId);
    const hold = blockNextHold();
    const firstToken = nextFirstToken();
    const freed = nextFreed(quickWorkerId);
    let answered = false;
    const request = client.chat.completions.create({
      model: "quick",
      messages: [{ role: "user", content: "Hi" }],
      stream: true,
    });
    void request.then(() => {
      answered = true;
    });
    const terms = await hold.entered;
    // The control plane received the first token, then the job's end, while the hold waits.
    await firstToken;
    await freed;
    expect(answered).toBe(false);
    expect(await market.plane.store.getOrder(terms.id)).toBeNull();
    expect(await books(accountId)).toEqual(before);
    hold.release();
    let text = "";
    for await (const chunk of await request) text += chunk.choices[0]?.delta?.content ?? "";
    expect(text).toBe(FULL_TEXT);
    await market.plane.marketplace.whenIdle();
    const order = (await market.plane.store.getOrder(terms.id)) as OrderRecord;
    expect(order).toMatchObject({ status: "completed", completionTokens: DEFAULT_FAKE_TOKENS.length });
    expect(order.cost).toBeGreaterThan(0n);
    const after = await books(accountId);
    expect(order.fee).toBe((order.cost * BigInt(order.feeBasisPoints)) / BASIS_POINTS);
    expect(after.consumer.available).toBe(before.consumer.available - order.cost);
    expect(after.consumer.held).toBe(0n);
    expect(after.provider.pending).toBe(before.provider.pending + order.cost - order.fee);
    expect(after.platform.available).toBe(before.platform.available + order.fee);
    expect((await market.admin.auditLedger({})).problems).toEqual([]);
  });

  it("(2) a hold refused for want of credits after the worker streamed: the worker is cancelled, no money moves, the consumer gets the usual 402", async () => {
    const { accountId, client } = await payingConsumer("broke");
    // Emptied since its last order: the market still believes it can pay, so it speculates.
    const { available } = await market.balance(accountId);
    await market.admin.withdraw({ accountId, amount: available });
    const before = await books(accountId);
    const index = hangingRequests++;
    const hold = blockNextHold();
    const firstToken = nextFirstToken();
    const request = streamText(client, "hanging").then(
      () => null,
      (error: unknown) => error,
    );
    const terms = await hold.entered;
    await hangingEngine.requestArrived(index);
    await firstToken;
    hold.release();
    const error = await request;
    expect(error).toBeInstanceOf(OpenAI.APIError);
    expect(error).toMatchObject({ status: 402, code: "insufficient_credits" });
    // The worker was told to stop: it closed its engine request before the answer was complete.
    expect(await hangingEngine.requestClosed(index)).toEqual({ aborted: true });
    await market.plane.marketplace.whenIdle();
    expect(await market.plane.store.getOrder(terms.id)).toBeNull();
    expect(await books(accountId)).toEqual(before);
    expect((await market.admin.auditLedger({})).problems).toEqual([]);

    // The same account now waits for its hold: the same error, and no engine hears of it.
    const again = await streamText(client, "hanging").then(
      () => null,
      (e: unknown) => e,
    );
    expect(again).toMatchObject({ status: 402, code: "insufficient_credits" });
    expect((again as InstanceType<typeof OpenAI.APIError>).error).toEqual(
      (error as InstanceType<typeof OpenAI.APIError>).error,
    );
    expect(hangingEngine.requests).toHaveLength(hangingRequests);
    expect(await books(accountId)).toEqual(before);
  });

  it("(3) a consumer leaving while the hold is pending: the worker stops, the committed hold is released, no order is left running", async () => {
    const { accountId, client } = await payingConsumer("leaver");
    const before = await books(accountId);
    const index = hangingRequests++;
    const hold = blockNextHold();
    const gone = new AbortController();
    const request = streamText(client, "hanging", gone.signal).then(
      () => null,
      (error: unknown) => error,
    );
    const terms = await hold.entered;
    await hangingEngine.requestArrived(index);
    gone.abort();
    expect(await request).toBeInstanceOf(OpenAI.APIUserAbortError);
    // The cancel reaches the worker while the hold still waits.
    expect(await hangingEngine.requestClosed(index)).toEqual({ aborted: true });
    hold.release();
    await market.plane.marketplace.whenIdle();
    const order = (await market.plane.store.getOrder(terms.id)) as OrderRecord;
    expect(order).toMatchObject({ status: "cancelled", cost: 0n, completionTokens: 0 });
    expect(await market.plane.store.listRunningOrders()).toEqual([]);
    expect(await books(accountId)).toEqual(before);
    expect((await market.admin.auditLedger({})).problems).toEqual([]);
  });
});

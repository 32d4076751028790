/**
 * Failures lose nothing: a worker whose engine fails, a consumer who goes away mid-stream and a
 * worker process killed mid-stream each end with every order settled (none left running), the
 * consumer charged exactly what the settlement rule says (nothing unless tokens reached it), the
 * provider paid that cost minus the fee, and the ledger balanced. Real parts throughout: the
 * control plane, worker processes over gRPC, OpenAI-compatible test engines, the `openai` SDK.
 */
import { once } from "node:events";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { OrderStatus } from "../../gen/locallmarket/v1/admin_pb.js";
import { orderCost, platformFee } from "../../server/market/money.js";
import { PLATFORM_ACCOUNT_ID } from "../../server/market/store-port.js";
import { DEFAULT_FAKE_PROMPT_TOKENS, type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import {
  credits,
  ledgerIsBalanced,
  startTestMarket,
  type TestMarket,
  type WorkerProcess,
} from "../support/market.js";

const FEE_BPS = 500;
/** Served by a cheap worker whose engine always fails and a dearer one that works. */
const FALLBACK_MODEL = "fallback-model";
/** Served only by workers whose engines always fail. */
const BROKEN_MODEL = "broken-model";
/** Served by a worker whose engine streams one token and then hangs until the request closes. */
const HANGING_MODEL = "hanging-model";
/** Like HANGING_MODEL, served by a worker process the test kills. */
const DOOMED_MODEL = "doomed-model";

/** Prices in credits per 1M tokens, as the worker CLI takes them. */
const SELLERS = {
  cheapFailing: { model: FALLBACK_MODEL, priceIn: "1", priceOut: "2" },
  good: { model: FALLBACK_MODEL, priceIn: "100", priceOut: "250" },
  brokenA: { model: BROKEN_MODEL, priceIn: "1", priceOut: "1" },
  brokenB: { model: BROKEN_MODEL, priceIn: "2", priceOut: "2" },
  hanging: { model: HANGING_MODEL, priceIn: "300", priceOut: "700" },
  doomed: { model: DOOMED_MODEL, priceIn: "400", priceOut: "900" },
} as const;
type SellerName = keyof typeof SELLERS;
const SELLER_NAMES = Object.keys(SELLERS) as SellerName[];

const priceIn = (seller: SellerName) => credits(Number(SELLERS[seller].priceIn));
const priceOut = (seller: SellerName) => credits(Number(SELLERS[seller].priceOut));

type Balance = { available: bigint; held: bigint; pending: bigint };
type Books = Record<string, Balance>;

describe("failures lose nothing", () => {
  let market: TestMarket;
  let client: OpenAI;
  let consumer: { accountId: string; apiKey: string };
  const engines = {} as Record<SellerName, FakeEngine>;
  const workers = {} as Record<SellerName, WorkerProcess>;
  const providers = {} as Record<SellerName, string>;

  beforeAll(async () => {
    market = await startTestMarket({ feeBasisPoints: FEE_BPS });
    consumer = await market.account("consumer", 1000);
    client = market.openai(consumer.apiKey);
    engines.cheapFailing = await startFakeEngine({ failWith: { status: 500, message: "GPU on fire" } });
    engines.good = await startFakeEngine();
    engines.brokenA = await startFakeEngine({ failWith: { status: 500 } });
    engines.brokenB = await startFakeEngine({ failWith: { status: 503 } });
    engines.hanging = await startFakeEngine({ tokens: ["Hello", " never"], hang: true });
    engines.doomed = await startFakeEngine({ tokens: ["Bye", " never"], hang: true });
    for (const name of SELLER_NAMES) {
      providers[name] = (await market.account(`provider-${name}`)).accountId;
    }
    await Promise.all(
      SELLER_NAMES.map(async (name) => {
        workers[name] = await market.worker({
          accountId: providers[name],
          ...SELLERS[name],
          tps: 50,
          engine: ["--engine", "openai", "--engine-url", engines[name].url],
        });
      }),
    );
  });

  afterAll(async () => {
    await market?.close();
    await Promise.all(Object.values(engines).map((engine) => engine.close()));
  });

  /** The balances of the consumer, every provider and the platform, by a readable name. */
  async function books(): Promise<Books> {
    const accounts: [string, string][] = [
      ["consumer", consumer.accountId],
      ...SELLER_NAMES.map((name): [string, string] => [name, providers[name]]),
      ["platform", PLATFORM_ACCOUNT_ID],
    ];
    const balances = await Promise.all(accounts.map(([, id]) => market.balance(id)));
    return Object.fromEntries(accounts.map(([name], index) => [name, balances[index] as Balance]));
  }

  /**
   * Exactly `cost` left the consumer, `cost - fee` reached the serving seller's provider, the fee
   * reached the platform, nobody else's balance moved, and no hold is left.
   */
  function expectMoved(before: Books, after: Books, cost: bigint, servedBy?: SellerName) {
    const fee = platformFee(cost, FEE_BPS);
    const expected: Record<string, bigint> = { consumer: -cost, platform: fee };
    for (const name of SELLER_NAMES) expected[name] = name === servedBy ? cost - fee : 0n;
    const moved = Object.fromEntries(
      Object.keys(before).map((name) => [
        name,
        // A seller's earnings land in `pending` (settle-after window); everyone else's in `available`.
        bookOf(after[name] as Balance, name) - bookOf(before[name] as Balance, name),
      ]),
    );
    expect(moved).toEqual(expected);
    expect(Object.values(moved).reduce((sum, delta) => sum + delta, 0n)).toBe(0n);
    expect(after.consumer?.held).toBe(0n);
  }

  function bookOf(balance: Balance, name: string): bigint {
    return (SELLER_NAMES as string[]).includes(name) ? balance.pending : balance.available;
  }

  /** No order is left running and the ledger sums to zero. */
  async function expectNothingLost() {
    const { orders } = await market.admin.listOrders({ limit: 1000 });
    expect(orders.length).toBeGreaterThan(0);
    expect(orders.filter((order) => order.status === OrderStatus.RUNNING)).toEqual([]);
    const audit = await ledgerIsBalanced(market);
    expect(audit.problems).toEqual([]);
    expect(audit.sum).toBe(0n);
    expect(audit.ok).toBe(true);
  }

  async function order(orderId: string) {
    const found = (await market.admin.getOrder({ orderId })).order;
    expect(found).toBeDefined();
    return found as NonNullable<typeof found>;
  }

  /** Resolves with what `promise` threw, or null if it did not throw. */
  const thrown = (promise: Promise<unknown>): Promise<unknown> =>
    promise.then(
      () => null,
      (error: unknown) => error,
    );

  const ask = (model: string, extra: Record<string, unknown> = {}) =>
    client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "Say hello" }],
      max_tokens: 16,
      ...extra,
    } as OpenAI.Chat.Completions.ChatCompletionCreateParamsNonStreaming);

  const requestsTo = (seller: SellerName) => engines[seller].requests.length;

  describe("a worker failing before the first token", () => {
    it("falls back to the next worker, which serves and is paid at its own price", async () => {
      const before = await books();
      const seen = { cheap: requestsTo("cheapFailing"), good: requestsTo("good") };

      const completion = await ask(FALLBACK_MODEL);

      expect(completion.choices[0]?.message.content).toBe("Hello, world!");
      expect(completion.choices[0]?.finish_reason).toBe("stop");
      expect(requestsTo("cheapFailing")).toBe(seen.cheap + 1);
      expect(requestsTo("good")).toBe(seen.good + 1);
      const cost = orderCost(DEFAULT_FAKE_PROMPT_TOKENS, 4, priceIn("good"), priceOut("good"));
      expect(cost).not.toBe(
        orderCost(DEFAULT_FAKE_PROMPT_TOKENS, 4, priceIn("cheapFailing"), priceOut("cheapFailing")),
      );
      expect(completion.usage).toMatchObject({
        prompt_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        completion_tokens: 4,
        cost_micro_credits: cost.toString(),
      });
      const settled = await order(completion.id);
      expect(settled.status).toBe(OrderStatus.COMPLETED);
      expect(settled.workerId).toBe(workers.good.workerId);
      expect(settled.pricePerMillionOutput).toBe(priceOut("good"));
      expect(settled.cost).toBe(cost);
      expectMoved(before, await books(), cost, "good");
      await expectNothingLost();
    });

    it("falls back on a streamed request too, before anything is sent", async () => {
      const before = await books();
      const seen = requestsTo("cheapFailing");
      const stream = await client.chat.completions.create({
        model: FALLBACK_MODEL,
        messages: [{ role: "user", content: "Say hello" }],
        max_tokens: 16,
        stream: true,
        stream_options: { include_usage: true },
      });
      const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);

      expect(requestsTo("cheapFailing")).toBe(seen + 1);
      expect(chunks.map((chunk) => chunk.choices[0]?.delta.content ?? "").join("")).toBe("Hello, world!");
      const cost = orderCost(DEFAULT_FAKE_PROMPT_TOKENS, 4, priceIn("good"), priceOut("good"));
      expect(chunks.at(-1)?.usage).toMatchObject({ cost_micro_credits: cost.toString() });
      const settled = await order(chunks[0]?.id ?? "");
      expect(settled.status).toBe(OrderStatus.COMPLETED);
      expect(settled.workerId).toBe(workers.good.workerId);
      expectMoved(before, await books(), cost, "good");
      await expectNothingLost();
    });

    it("answers 502 worker_failed without allow_fallbacks, and charges nothing", async () => {
      const before = await books();
      const seen = { cheap: requestsTo("cheapFailing"), good: requestsTo("good") };

      const error = await thrown(ask(FALLBACK_MODEL, { provider: { allow_fallbacks: false } }));

      expect(error).toBeInstanceOf(OpenAI.APIError);
      const apiError = error as InstanceType<typeof OpenAI.APIError>;
      expect(apiError.status).toBe(502);
      expect(apiError.code).toBe("worker_failed");
      expect(apiError.type).toBe("upstream_error");
      expect(apiError.message).toContain("GPU on fire");
      expect(requestsTo("cheapFailing")).toBe(seen.cheap + 1);
      expect(requestsTo("good")).toBe(seen.good);
      const failed = await order(apiError.requestID ?? "");
      expect(failed.status).toBe(OrderStatus.FAILED);
      expect(failed.workerId).toBe(workers.cheapFailing.workerId);
      expect(failed.cost).toBe(0n);
      expectMoved(before, await books(), 0n);
      await expectNothingLost();
    });

    it("answers 502 when every candidate fails, after trying each once, and charges nothing", async () => {
      const before = await books();
      const seen = { a: requestsTo("brokenA"), b: requestsTo("brokenB") };

      const error = await thrown(ask(BROKEN_MODEL));

      expect(error).toBeInstanceOf(OpenAI.APIError);
      const apiError = error as InstanceType<typeof OpenAI.APIError>;
      expect(apiError.status).toBe(502);
      expect(apiError.code).toBe("worker_failed");
      expect(requestsTo("brokenA")).toBe(seen.a + 1);
      expect(requestsTo("brokenB")).toBe(seen.b + 1);
      const failed = await order(apiError.requestID ?? "");
      expect(failed.status).toBe(OrderStatus.FAILED);
      expect(failed.completionTokens).toBe(0);
      expect(failed.cost).toBe(0n);
      expect(failed.error).not.toBe("");
      expectMoved(before, await books(), 0n);
      await expectNothingLost();
    });

    it("answers a streamed request with a real HTTP 502, not a 200 stream", async () => {
      const before = await books();
      const post = (body: object) =>
        fetch(`${market.plane.httpUrl}/v1/chat/completions`, {
          method: "POST",
          headers: { authorization: `Bearer ${consumer.apiKey}`, "content-type": "application/json" },
          body: JSON.stringify({ messages: [{ role: "user", content: "Hi" }], stream: true, ...body }),
        });

      for (const response of [
        await post({ model: FALLBACK_MODEL, provider: { allow_fallbacks: false } }),
        await post({ model: BROKEN_MODEL }),
      ]) {
        expect(response.status).toBe(502);
        expect(response.headers.get("content-type")).toContain("application/json");
        const body = (await response.json()) as { error: { code: string; type: string; message: string } };
        expect(body.error.code).toBe("worker_failed");
        expect(body.error.type).toBe("upstream_error");
        const failed = await order(response.headers.get("x-request-id") ?? "");
        expect(failed.status).toBe(OrderStatus.FAILED);
        expect(failed.cost).toBe(0n);
      }
      expectMoved(before, await books(), 0n);
      await expectNothingLost();
    });
  });

  it("stops the engine and charges only the relayed token when the consumer disconnects mid-stream", async () => {
    const before = await books();
    const index = requestsTo("hanging");
    const abort = new AbortController();
    const stream = await client.chat.completions.create(
      { model: HANGING_MODEL, messages: [{ role: "user", content: "Say hello" }], stream: true },
      { signal: abort.signal },
    );
    let orderId = "";
    let text = "";
    const error = await thrown(
      (async () => {
        for await (const chunk of stream) {
          orderId = chunk.id;
          text += chunk.choices[0]?.delta.content ?? "";
          if (text !== "") abort.abort();
        }
      })(),
    );
    // The SDK ends the iteration quietly on the caller's own abort.
    expect(error).toBeNull();
    expect(abort.signal.aborted).toBe(true);
    expect(text).toBe("Hello");

    // The worker's engine request is closed (the control plane told the worker to cancel)...
    expect(await engines.hanging.requestClosed(index)).toEqual({ aborted: true });
    // ...and the order settles for the one token relayed; the engine never reported usage.
    await market.plane.marketplace.whenSettled(orderId);
    const cost = orderCost(0, 1, priceIn("hanging"), priceOut("hanging"));
    expect(cost).toBeGreaterThan(0n);
    expect(platformFee(cost, FEE_BPS)).toBeGreaterThan(0n);
    const settled = await order(orderId);
    expect(settled.status).toBe(OrderStatus.CANCELLED);
    expect(settled.workerId).toBe(workers.hanging.workerId);
    expect(settled.completionTokens).toBe(1);
    expect(settled.promptTokens).toBe(0);
    expect(settled.cost).toBe(cost);
    expect(settled.fee).toBe(platformFee(cost, FEE_BPS));
    expectMoved(before, await books(), cost, "hanging");
    await expectNothingLost();
  });

  it("ends the stream with an in-band error and charges the relayed token when the worker is killed", async () => {
    const before = await books();
    const doomed = workers.doomed;
    expect(market.plane.registry.get(doomed.workerId)).toBeDefined();
    const listed = async () => (await client.models.list()).data.map((model) => model.id);
    expect(await listed()).toContain(DOOMED_MODEL);

    const stream = await client.chat.completions.create({
      model: DOOMED_MODEL,
      messages: [{ role: "user", content: "Say goodbye" }],
      stream: true,
    });
    let orderId = "";
    let text = "";
    let chunksAfterKill = 0;
    const exited = once(doomed.process, "exit");
    const error = await thrown(
      (async () => {
        for await (const chunk of stream) {
          orderId = chunk.id;
          text += chunk.choices[0]?.delta.content ?? "";
          if (doomed.process.signalCode !== null || doomed.process.killed) chunksAfterKill++;
          else if (text !== "") doomed.process.kill("SIGKILL");
        }
      })(),
    );
    await exited;

    expect(text).toBe("Bye");
    expect(error).toBeInstanceOf(OpenAI.APIError);
    const apiError = error as InstanceType<typeof OpenAI.APIError>;
    expect(apiError.status).toBeUndefined(); // in-band: the HTTP status was already 200
    expect(apiError.code).toBe("worker_failed");
    expect(apiError.requestID).toBe(orderId);
    // The worker went away; the control plane is not shutting down, and says so.
    expect(apiError.message).toContain("worker disconnected");
    expect(apiError.message).not.toContain("shutting down");
    expect(chunksAfterKill).toBe(0);

    const cost = orderCost(0, 1, priceIn("doomed"), priceOut("doomed"));
    const settled = await order(orderId);
    expect(settled.status).toBe(OrderStatus.FAILED);
    expect(settled.workerId).toBe(doomed.workerId);
    expect(settled.completionTokens).toBe(1);
    expect(settled.cost).toBe(cost);
    expect(settled.error).toBe(apiError.message);
    expectMoved(before, await books(), cost, "doomed");

    expect(market.plane.registry.get(doomed.workerId)).toBeUndefined();
    expect(await listed()).not.toContain(DOOMED_MODEL);
    await expectNothingLost();
  });
});

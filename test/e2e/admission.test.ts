/**
 * Admission: a consumer who leaves before its first token pays nothing and its engine request is
 * aborted; requests beyond a worker's capacity wait in the model's queue instead of being
 * over-assigned or refused; a full queue answers 503 with Retry-After and charges nothing.
 * Real parts: the control plane over the real store, worker processes over gRPC, fake
 * OpenAI-compatible engines that count what reaches them, the `openai` SDK and raw fetch.
 */
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { DEFAULT_FAKE_TOKENS, type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket, type WorkerProcess } from "../support/market.js";
import { eventually, statusName, within } from "../support/server-process.js";

const FULL_TEXT = DEFAULT_FAKE_TOKENS.join("");

/** A promise the test resolves by hand: the engine holds every first token until then. */
function gate() {
  let open!: () => void;
  const promise = new Promise<void>((resolve) => {
    open = resolve;
  });
  return { promise, open };
}

async function books(market: TestMarket, accountId: string) {
  const { balance } = await market.admin.getBalance({ accountId });
  return { available: balance?.available ?? 0n, held: balance?.held ?? 0n, pending: balance?.pending ?? 0n };
}

describe("admission with a free market", () => {
  let market: TestMarket;
  let provider: string;
  const engines: FakeEngine[] = [];
  const gates: (() => void)[] = [];

  beforeAll(async () => {
    market = await startTestMarket();
    provider = (await market.account("provider")).accountId;
  });

  afterAll(async () => {
    for (const open of gates) open();
    await market?.close();
    await Promise.all(engines.map((engine) => engine.close()));
  });

  async function seller(
    model: string,
    engineOptions: Parameters<typeof startFakeEngine>[0],
    concurrency = 1,
  ): Promise<{ engine: FakeEngine; worker: WorkerProcess }> {
    const engine = await startFakeEngine(engineOptions);
    engines.push(engine);
    const worker = await market.worker({
      accountId: provider,
      model,
      priceIn: "10",
      priceOut: "20",
      tps: 50,
      concurrency,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
    return { engine, worker };
  }

  it("(a) a consumer who disconnects before its first token pays 0 and the engine's request is aborted", async () => {
    const held = gate();
    gates.push(held.open);
    const { engine } = await seller("gated-model", { gate: held.promise });
    const consumer = await market.account("leaver", 10);
    const before = await books(market, consumer.accountId);

    const controller = new AbortController();
    const request = market
      .openai(consumer.apiKey)
      .chat.completions.create(
        { model: "gated-model", messages: [{ role: "user", content: "Hello?" }], stream: true },
        { signal: controller.signal },
      )
      .then(
        () => "answered",
        (error: unknown) => error,
      );
    await engine.requestArrived(0);
    controller.abort();
    expect(await request).toBeInstanceOf(OpenAI.APIUserAbortError);

    const closed = await within(engine.requestClosed(0), 15_000, "the engine's request to be closed");
    expect(closed).toEqual({ aborted: true });

    const [order] = await eventually("the order to be final", async () => {
      const { orders } = await market.admin.listOrders({ accountId: consumer.accountId, limit: 10 });
      return orders.length > 0 && orders.every((found) => statusName(found.status) !== "running")
        ? orders
        : undefined;
    });
    expect(statusName(order?.status ?? 0)).toBe("cancelled");
    expect(order?.completionTokens).toBe(0);
    expect(order?.cost).toBe(0n);
    expect(await books(market, consumer.accountId)).toEqual(before);
    expect(engine.requests).toHaveLength(1);
  });

  it("(b) 8 simultaneous requests to one worker of concurrency 4: 4 run, 4 wait, none refused", async () => {
    const { engine, worker } = await seller("busy-model", { delayMs: 250 }, 4);
    const consumer = await market.account("crowd", 10);
    const openai = market.openai(consumer.apiKey);

    const answers = await Promise.all(
      Array.from({ length: 8 }, (_, index) =>
        openai.chat.completions.create({
          model: "busy-model",
          messages: [{ role: "user", content: `Request ${index}` }],
          max_tokens: 16,
        }),
      ),
    );

    expect(answers.map((answer) => answer.choices[0]?.message.content)).toEqual(Array(8).fill(FULL_TEXT));
    expect(engine.requests).toHaveLength(8);
    // Never more than the worker's 4 slots at the engine, and all 4 used: the other 4 waited.
    expect(engine.maxConcurrentSeen).toBe(4);
    const { orders } = await market.admin.listOrders({ accountId: consumer.accountId, limit: 100 });
    expect(orders.map((order) => statusName(order.status))).toEqual(Array(8).fill("completed"));
    expect(worker.output()).not.toMatch(/OVERLOADED/);
    expect((await books(market, consumer.accountId)).held).toBe(0n);
  });
});

describe("admission with a full queue", () => {
  let market: TestMarket;
  let engine: FakeEngine;
  const held = gate();

  beforeAll(async () => {
    market = await startTestMarket({ maxQueue: 1 });
    const provider = (await market.account("provider")).accountId;
    engine = await startFakeEngine({ gate: held.promise });
    await market.worker({
      accountId: provider,
      model: "narrow-model",
      priceIn: "10",
      priceOut: "20",
      tps: 50,
      concurrency: 1,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
  });

  afterAll(async () => {
    held.open();
    await market?.close();
    await engine?.close();
  });

  it("(c) answers 503 with Retry-After in OpenAI's shape once one request waits, and charges nothing for it", async () => {
    const consumer = await market.account("queued", 10);
    const before = await books(market, consumer.accountId);
    const ask = (content: string) =>
      fetch(`${market.plane.httpUrl}/v1/chat/completions`, {
        method: "POST",
        headers: { authorization: `Bearer ${consumer.apiKey}`, "content-type": "application/json" },
        body: JSON.stringify({
          model: "narrow-model",
          messages: [{ role: "user", content }],
          max_tokens: 16,
        }),
      });

    const running = ask("first");
    await engine.requestArrived(0);
    // The only slot is busy: of the next two, one waits in the queue (of size 1), the other is refused.
    const next = [ask("second"), ask("third")];
    const refused = await Promise.race(next);
    expect(refused.status).toBe(503);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);
    const body = (await refused.json()) as { error?: { message?: unknown; type?: unknown; code?: unknown } };
    expect(body.error).toMatchObject({ message: expect.any(String), type: expect.any(String) });
    expect(body.error).toHaveProperty("code");
    expect(engine.requests).toHaveLength(1);

    held.open();
    const responses = await Promise.all([running, ...next]);
    const served = responses.filter((response) => response !== refused);
    const costs: bigint[] = [];
    for (const response of served) {
      expect(response.status).toBe(200);
      const answer = (await response.json()) as OpenAI.Chat.Completions.ChatCompletion & {
        usage: { cost_micro_credits: string };
      };
      expect(answer.choices[0]?.message.content).toBe(FULL_TEXT);
      costs.push(BigInt(answer.usage.cost_micro_credits));
    }
    expect(engine.requests).toHaveLength(2);

    const refusedOrderId = refused.headers.get("x-request-id");
    if (refusedOrderId) {
      const { orders } = await market.admin.listOrders({ accountId: consumer.accountId, limit: 10 });
      const order = orders.find((found) => found.id === refusedOrderId);
      expect(order?.cost ?? 0n).toBe(0n);
    }
    const after = await books(market, consumer.accountId);
    expect(after.held).toBe(0n);
    expect(before.available - after.available).toBe(costs.reduce((sum, cost) => sum + cost, 0n));
    const audit = await market.admin.auditLedger({});
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
  });
});

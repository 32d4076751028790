/**
 * Reputation feeds matching, with real worker processes and the `openai` SDK: a cheapest worker
 * whose engine never answers costs one consumer one first-token timeout, once, and is then skipped
 * (its engine sees no further request) until its cooldown ends; recovered, it wins its probe and
 * gets traffic again. A cheapest worker whose engine fails at once is cooled at its fourth failure
 * in a row (three are allowed, as in LiteLLM).
 * `admin worker list --json` shows the measured figures and the state next to the advertised ones.
 */
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { runAdminCli } from "../../admin-client/cli.js";
import type { WorkerListRow } from "../../admin-client/worker-list.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket } from "../support/market.js";

const FIRST_TOKEN_TIMEOUT_MS = 2_000;
/**
 * Long enough for what the first test does while the worker cools (two admin listings and three
 * requests: well under a second here), on a busy machine; the second test waits it out.
 */
const COOLDOWN_MS = 5_000;
const HOLE_MODEL = "hole-model";
const FLAKY_MODEL = "flaky-model";
const TIMED_MODEL = "timed-model";

describe("reputation feeds matching", () => {
  let market: TestMarket;
  let client: OpenAI;
  const engines: FakeEngine[] = [];
  const ids: Record<string, string> = {};
  let holeDead = true;
  let holeEngine: FakeEngine;
  let flakyEngine: FakeEngine;

  beforeAll(async () => {
    market = await startTestMarket({ firstTokenTimeoutMs: FIRST_TOKEN_TIMEOUT_MS, cooldownMs: COOLDOWN_MS });
    const provider = await market.account("provider");
    const consumer = await market.account("consumer", 100);
    client = market.openai(consumer.apiKey);
    holeEngine = await startFakeEngine({
      tokens: ["hole"],
      behaviour: () => (holeDead ? "blackhole" : "answer"),
    });
    flakyEngine = await startFakeEngine({ tokens: ["flaky"], behaviour: () => "fail" });
    const sellers = [
      { name: "hole", model: HOLE_MODEL, price: "0.5", engine: holeEngine },
      { name: "good", model: HOLE_MODEL, price: "2", engine: await startFakeEngine({ tokens: ["good"] }) },
      { name: "flaky", model: FLAKY_MODEL, price: "0.5", engine: flakyEngine },
      {
        name: "steady",
        model: FLAKY_MODEL,
        price: "2",
        engine: await startFakeEngine({ tokens: ["steady"] }),
      },
      {
        name: "timed",
        model: TIMED_MODEL,
        price: "1",
        // 40 tokens, 20 ms apart: about 50 tokens/s, whatever the worker advertises.
        engine: await startFakeEngine({ tokenCount: 40, tokenText: (i) => `t${i} `, delayMs: 20 }),
      },
    ];
    engines.push(...sellers.map((seller) => seller.engine));
    await Promise.all(
      sellers.map(async (seller) => {
        const worker = await market.worker({
          accountId: provider.accountId,
          model: seller.model,
          priceIn: seller.price,
          priceOut: seller.price,
          tps: 500,
          concurrency: 2,
          engine: ["--engine", "openai", "--engine-url", seller.engine.url],
        });
        ids[seller.name] = worker.workerId;
      }),
    );
  });

  afterAll(async () => {
    await market?.close();
    await Promise.all(engines.map((engine) => engine.close()));
  });

  /** Asks for a completion; returns who served it (the engines answer with their name) and how long it took. */
  async function ask(model: string): Promise<{ servedBy: string; ms: number }> {
    const started = performance.now();
    const completion = await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "who are you?" }],
      max_tokens: 5,
    });
    const ms = performance.now() - started;
    const order = await market.admin.getOrder({ orderId: completion.id });
    const text = completion.choices[0]?.message.content ?? "";
    expect(order.order?.workerId).toBe(ids[text]);
    return { servedBy: text, ms };
  }

  async function workerList(): Promise<WorkerListRow[]> {
    let stdout = "";
    const code = await runAdminCli(
      ["worker", "list", "--json", "--server", market.plane.grpcUrl, "--admin-token", "test-admin-token"],
      { stdout: (text) => (stdout += text), stderr: () => {} },
    );
    expect(code).toBe(0);
    return JSON.parse(stdout) as WorkerListRow[];
  }

  async function row(name: string): Promise<WorkerListRow> {
    const found = (await workerList()).find((r) => r.workerId === ids[name]);
    expect(found).toBeDefined();
    return found as WorkerListRow;
  }

  it("a blackholing cheapest worker costs one consumer one first-token timeout, then is skipped", async () => {
    // Two requests at once: the new worker has two slots, but takes one request until it answers.
    const [a, b] = await Promise.all([ask(HOLE_MODEL), ask(HOLE_MODEL)]);
    expect([a?.servedBy, b?.servedBy]).toEqual(["good", "good"]);
    const [fast, slow] = [a, b].sort((x, y) => (x?.ms ?? 0) - (y?.ms ?? 0));
    expect(slow?.ms).toBeGreaterThanOrEqual(FIRST_TOKEN_TIMEOUT_MS - 50);
    expect(fast?.ms).toBeLessThan(FIRST_TOKEN_TIMEOUT_MS);
    expect(holeEngine.requests).toHaveLength(1);
    const cooling = await row("hole");
    expect(cooling).toMatchObject({ status: "cooling", model: HOLE_MODEL, successRate: 0, failures: 1 });
    expect(cooling.coolingUntil).not.toBeNull();

    let table = "";
    const code = await runAdminCli(
      ["worker", "list", "--server", market.plane.grpcUrl, "--admin-token", "test-admin-token"],
      { stdout: (text) => (table += text), stderr: () => {} },
    );
    expect(code).toBe(0);
    expect(table.split("\n").find((line) => line.startsWith(ids.hole ?? "?"))).toMatch(
      new RegExp(`${HOLE_MODEL}\\s+cooling\\s+0\\.5/0\\.5\\s+500\\s+-`),
    );

    for (let i = 0; i < 3; i++) expect((await ask(HOLE_MODEL)).servedBy).toBe("good");
    // Nobody waited on the dead worker again.
    expect(holeEngine.requests).toHaveLength(1);
  });

  it("after its cooldown, a recovered worker wins its probe and gets traffic again", async () => {
    holeDead = false;
    await vi.waitFor(async () => expect((await row("hole")).status).toBe("probation"), {
      timeout: COOLDOWN_MS * 3,
      interval: 250,
    });
    expect((await ask(HOLE_MODEL)).servedBy).toBe("hole");
    const restored = await row("hole");
    expect(restored).toMatchObject({ status: "online", coolingUntil: null, attempts: 2, failures: 1 });
    expect(restored.ttftMs).toBeGreaterThan(0);
    expect((await ask(HOLE_MODEL)).servedBy).toBe("hole");
    expect(holeEngine.requests).toHaveLength(3);
  });

  it("a cheapest worker failing at once is tried four times, then cooled", async () => {
    for (let i = 0; i < 3; i++) expect((await ask(FLAKY_MODEL)).servedBy).toBe("steady");
    expect(await row("flaky")).toMatchObject({ status: "online", failures: 3 });
    expect((await ask(FLAKY_MODEL)).servedBy).toBe("steady");
    expect(flakyEngine.requests).toHaveLength(4);
    expect(await row("flaky")).toMatchObject({ status: "cooling", failures: 4, successRate: 0 });
    for (let i = 0; i < 3; i++) expect((await ask(FLAKY_MODEL)).servedBy).toBe("steady");
    expect(flakyEngine.requests).toHaveLength(4);
  });

  it("measures throughput and TTFT on the server, next to the advertised figure", async () => {
    const fresh = await row("timed");
    expect(fresh).toMatchObject({ advertisedTps: 500, measuredTps: null, ttftMs: null, successRate: null });
    const completion = await client.chat.completions.create({
      model: TIMED_MODEL,
      messages: [{ role: "user", content: "count" }],
      max_tokens: 40,
      stream: true,
    });
    for await (const _chunk of completion) {
      // Read it all, as a consumer does.
    }
    const timed = await row("timed");
    expect(timed).toMatchObject({
      workerId: ids.timed,
      model: TIMED_MODEL,
      status: "online",
      priceIn: "1000000",
      priceOut: "1000000",
      successRate: 1,
      reputation: expect.any(Number),
      auditsPassed: 0,
      auditsFailed: 0,
      suspended: false,
    });
    // The engine cannot go faster than 50 tokens/s; the claim of 500 is not believed.
    expect(timed.measuredTps).toBeGreaterThan(5);
    expect(timed.measuredTps).toBeLessThan(100);
    expect(timed.ttftMs).toBeGreaterThan(0);
    expect(timed.reputation).toBeGreaterThan((await row("flaky")).reputation);
  });
});

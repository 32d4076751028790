/**
 * A crash costs at most a checkpoint interval of work: the control plane (a real process, over
 * PGlite in its data dir or PostgreSQL) is killed with SIGKILL while three streams are in flight;
 * restarted on the same data, it settles each order at its last checkpoint. Each consumer pays at
 * most what it received and at least that minus what the engine can produce in about one
 * checkpoint interval; the provider is paid for it; the ledger audits clean.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { orderCost } from "../../server/market/money.js";
import { createTestDatabase, type TestDatabase } from "../support/database.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { credits } from "../support/market.js";
import {
  type ServerProcess,
  type ServerWorker,
  startServerProcess,
  statusName,
  within,
} from "../support/server-process.js";

const MODEL = "steady-model";
const CHECKPOINT_MS = 200;
/** Every token is 6 bytes, so a consumer counts what it received by the bytes of its text. */
const TOKEN_BYTES = 6;
const tokenText = (index: number) => `c${String(index % 10_000).padStart(4, "0")} `;
/** One token per 10 ms at most: ≤ 100 tokens/s per stream, ≤ 20 per checkpoint interval. */
const TOKEN_DELAY_MS = 10;
/**
 * What a checkpoint may lag behind the consumer: 50 tokens is 500 ms of the engine's fastest
 * output, two and a half checkpoint intervals, allowing for a late timer and the write itself.
 */
const CHECKPOINT_LAG_TOKENS = 50;
/** Kill the server once every consumer has received this many tokens (several seconds of work). */
const RECEIVED_BEFORE_KILL = 300;
const STREAMS = 3;

describe("kill -9 with streams in flight, then restart", () => {
  let database: TestDatabase;
  let engine: FakeEngine;
  const servers: ServerProcess[] = [];
  let worker: ServerWorker | undefined;

  beforeAll(async () => {
    database = await createTestDatabase();
    engine = await startFakeEngine({ tokenCount: 100_000, tokenText, delayMs: TOKEN_DELAY_MS });
  });

  afterAll(async () => {
    await worker?.stop();
    await Promise.all(servers.map((server) => server.kill()));
    await engine?.close();
    await database?.drop();
  });

  it("settles every order at its last checkpoint: paid for what was received, audit clean", async () => {
    const args = ["--checkpoint-interval", `${CHECKPOINT_MS}ms`, "--fee-bps", "500"];
    const first = await startServerProcess(database, args);
    servers.push(first);
    const consumer = await first.account("consumer", 100);
    const provider = (await first.account("provider")).accountId;
    worker = await first.worker({
      accountId: provider,
      model: MODEL,
      priceIn: "30",
      priceOut: "60",
      concurrency: STREAMS,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
    const openai = first.openai(consumer.apiKey);

    const streams = Array.from({ length: STREAMS }, (_, index) => {
      const state = { bytes: 0, orderId: "", error: undefined as unknown };
      let markEnough!: () => void;
      const enough = new Promise<void>((resolve) => {
        markEnough = resolve;
      });
      const ended = (async () => {
        try {
          const stream = await openai.chat.completions.create({
            model: MODEL,
            messages: [{ role: "user", content: `Stream ${index}` }],
            max_tokens: 50_000,
            stream: true,
          });
          for await (const chunk of stream) {
            state.orderId ||= chunk.id;
            state.bytes += Buffer.byteLength(chunk.choices[0]?.delta.content ?? "");
            if (state.bytes >= RECEIVED_BEFORE_KILL * TOKEN_BYTES) markEnough();
          }
        } catch (error) {
          // The connection dies with the server: what arrived before is what counts.
          state.error = error;
        }
        markEnough();
      })();
      return { state, enough, ended };
    });
    await within(
      Promise.all(streams.map((stream) => stream.enough)),
      40_000,
      `every consumer to receive ${RECEIVED_BEFORE_KILL} tokens`,
    );

    await first.kill();
    await Promise.all(streams.map((stream) => stream.ended));

    const second = await startServerProcess(database, args);
    servers.push(second);
    let paid = 0n;
    for (const { state } of streams) {
      expect(state.bytes % TOKEN_BYTES).toBe(0);
      const received = state.bytes / TOKEN_BYTES;
      expect(received, String(state.error)).toBeGreaterThanOrEqual(RECEIVED_BEFORE_KILL);
      const order = (await second.admin.getOrder({ orderId: state.orderId })).order;
      if (!order) throw new Error(`no order ${state.orderId}`);
      expect(statusName(order.status)).toBe("failed");
      expect(order.error).not.toBe("");
      expect(order.completionTokens).toBeLessThanOrEqual(received);
      expect(order.completionTokens).toBeGreaterThanOrEqual(received - CHECKPOINT_LAG_TOKENS);
      expect(order.promptTokens).toBeLessThanOrEqual(order.promptTokenBound);
      expect(order.cost).toBeGreaterThan(0n);
      expect(order.cost).toBe(
        orderCost(order.promptTokens, order.completionTokens, credits(30), credits(60)),
      );
      paid += order.cost;
    }

    const { orders } = await second.admin.listOrders({ limit: 100 });
    expect(orders.filter((order) => statusName(order.status) === "running")).toEqual([]);
    const consumerBooks = await second.balance(consumer.accountId);
    expect(consumerBooks).toEqual({ available: credits(100) - paid, held: 0n, pending: 0n });
    const providerBooks = await second.balance(provider);
    expect(providerBooks.pending).toBeGreaterThan(0n);
    expect(providerBooks.held).toBe(0n);
    const audit = await second.admin.auditLedger({});
    expect(audit.problems).toEqual([]);
    expect(audit.entriesSum).toBe(0n);
    expect(audit.ok).toBe(true);
  });
});

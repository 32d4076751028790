/**
 * Stopping without dropping anyone: on SIGTERM the control plane refuses new requests with 503 and
 * Retry-After, lets every running stream finish (full text and usage chunk), settles them and exits
 * 0 by itself; a second SIGTERM forces the exit, and the orders it cut are settled after a restart.
 * The server runs as a real process (so it can be signalled) over PGlite or PostgreSQL, with a
 * worker process on a fake engine slow enough that the streams are in flight when the signal lands.
 */
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { orderCost, platformFee } from "../../server/market/money.js";
import { PLATFORM_ACCOUNT_ID } from "../../server/market/store-port.js";
import { createTestDatabase, type TestDatabase } from "../support/database.js";
import { DEFAULT_FAKE_PROMPT_TOKENS, type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { credits } from "../support/market.js";
import {
  type ServerProcess,
  type ServerWorker,
  startServerProcess,
  statusName,
  within,
} from "../support/server-process.js";

const FEE_BPS = 500;
const SERVER_ARGS = ["--fee-bps", String(FEE_BPS), "--shutdown-grace", "30s"];
const MODEL = "slow-model";
const PRICE = { in: "7", out: "11" };
/** Tokens of 5 bytes, 75 ms apart: a stream of SHORT tokens lasts about 1.5 s, one of LONG 30 s. */
const tokenText = (index: number) => `g${String(index).padStart(3, "0")} `;
const SHORT = 20;
const LONG = 400;
const SHORT_TEXT = Array.from({ length: SHORT }, (_, index) => tokenText(index)).join("");
const STREAMS = 8;

type Usage = OpenAI.Completions.CompletionUsage & { cost_micro_credits?: string };

/** A stream being read in the background: what arrived so far, and a promise of its end. */
function follow(stream: Promise<AsyncIterable<OpenAI.Chat.Completions.ChatCompletionChunk>>) {
  const state = { text: "", orderId: "", usage: undefined as Usage | undefined, error: undefined as unknown };
  let markFirstToken!: () => void;
  const firstToken = new Promise<void>((resolve) => {
    markFirstToken = resolve;
  });
  const done = (async () => {
    try {
      for await (const chunk of await stream) {
        state.orderId ||= chunk.id;
        const content = chunk.choices[0]?.delta.content ?? "";
        state.text += content;
        if (content) markFirstToken();
        if (chunk.usage) state.usage = chunk.usage;
      }
    } catch (error) {
      state.error = error;
    }
    markFirstToken();
    return state;
  })();
  return { state, firstToken, done };
}

describe("graceful stop", () => {
  let database: TestDatabase;
  let server: ServerProcess | undefined;
  let engine: FakeEngine;
  let worker: ServerWorker | undefined;
  const started: ServerProcess[] = [];
  let consumer: { accountId: string; apiKey: string };
  let provider: string;
  let grpcPort: string;

  /**
   * Restarts the server on the same database and gRPC port; with `waitForWorker`, resolves once the
   * worker has reconnected to it (one more Welcome in its log).
   */
  async function restart(waitForWorker: boolean): Promise<ServerProcess> {
    const welcomed = `connected as worker ${worker?.workerId}`;
    const welcomes = worker?.output().split(welcomed).length ?? 1;
    const next = await startServerProcess(database, [...SERVER_ARGS, "--grpc-port", grpcPort]);
    started.push(next);
    if (waitForWorker) await worker?.printed(new RegExp(`(${welcomed}[\\s\\S]*){${welcomes}}`));
    return next;
  }

  beforeAll(async () => {
    database = await createTestDatabase();
    engine = await startFakeEngine({ tokenCount: LONG, tokenText, delayMs: 75 });
    server = await startServerProcess(database, SERVER_ARGS);
    started.push(server);
    grpcPort = new URL(server.grpcUrl).port;
    consumer = await server.account("consumer", 100);
    provider = (await server.account("provider")).accountId;
    worker = await server.worker({
      accountId: provider,
      model: MODEL,
      priceIn: PRICE.in,
      priceOut: PRICE.out,
      concurrency: STREAMS,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
  });

  afterAll(async () => {
    await worker?.stop();
    await Promise.all(started.map((process) => process.kill()));
    await engine?.close();
    await database?.drop();
  });

  it("says how its embedded database is compiled (nothing about it on PostgreSQL)", () => {
    const banner = (server as ServerProcess).output();
    if (database.databaseUrl === undefined) {
      expect(banner).toMatch(/database: +embedded PGlite.*\n +baseline WebAssembly compiler, for memory/);
    } else {
      expect(banner).toMatch(/database: +PostgreSQL/);
      expect(banner).not.toMatch(/WebAssembly compiler/);
    }
  });

  it("lets 8 running streams finish with full text and usage, refuses new requests, exits 0", async () => {
    const running = server as ServerProcess;
    const openai = running.openai(consumer.apiKey);
    const streams = Array.from({ length: STREAMS }, (_, index) =>
      follow(
        openai.chat.completions.create({
          model: MODEL,
          messages: [{ role: "user", content: `Stream ${index}` }],
          max_tokens: SHORT,
          stream: true,
          stream_options: { include_usage: true },
        }),
      ),
    );
    await Promise.all(streams.map((stream) => stream.firstToken));

    running.process.kill("SIGTERM");
    await running.printed(/SIGTERM/);
    const refused = await fetch(`${running.httpUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${consumer.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: MODEL,
        messages: [{ role: "user", content: "Too late" }],
        max_tokens: 5,
      }),
      signal: AbortSignal.timeout(10_000),
    });
    expect(refused.status).toBe(503);
    expect(Number(refused.headers.get("retry-after"))).toBeGreaterThan(0);

    const ended = await Promise.all(streams.map((stream) => stream.done));
    const expectedCost = orderCost(DEFAULT_FAKE_PROMPT_TOKENS, SHORT, credits(7), credits(11));
    for (const stream of ended) {
      expect(stream.error).toBeUndefined();
      expect(stream.text).toBe(SHORT_TEXT);
      expect(stream.usage).toMatchObject({
        prompt_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        completion_tokens: SHORT,
        cost_micro_credits: expectedCost.toString(),
      });
    }
    expect(await within(running.exited, 30_000, "the server to exit by itself")).toEqual({
      code: 0,
      signal: null,
    });

    // The books, read from a restarted server: exact to the micro-credit.
    server = await restart(true);
    const total = expectedCost * BigInt(STREAMS);
    const fees = platformFee(expectedCost, FEE_BPS) * BigInt(STREAMS);
    expect(await server.balance(consumer.accountId)).toEqual({
      available: credits(100) - total,
      held: 0n,
      pending: 0n,
    });
    const earned = await server.balance(provider);
    expect(earned.held).toBe(0n);
    expect(earned.available + earned.pending).toBe(total - fees);
    expect((await server.balance(PLATFORM_ACCOUNT_ID)).available).toBe(fees);
    for (const stream of ended) {
      const order = (await server.admin.getOrder({ orderId: stream.orderId })).order;
      expect(statusName(order?.status ?? 0)).toBe("completed");
      expect(order?.cost).toBe(expectedCost);
    }
    const audit = await server.admin.auditLedger({});
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
  });

  it("exits at a second SIGTERM, cutting the streams, whose orders are settled after a restart", async () => {
    // Normally the server restarted by the test above; a fresh one if that test stopped early.
    if (server?.alive() && server.output().includes("SIGTERM")) await server.kill();
    if (!server?.alive()) server = await restart(true);
    const running = server as ServerProcess;
    const before = await running.balance(consumer.accountId);
    const openai = running.openai(consumer.apiKey);
    const streams = Array.from({ length: 3 }, (_, index) =>
      follow(
        openai.chat.completions.create({
          model: MODEL,
          messages: [{ role: "user", content: `Long ${index}` }],
          max_tokens: LONG,
          stream: true,
          stream_options: { include_usage: true },
        }),
      ),
    );
    await Promise.all(streams.map((stream) => stream.firstToken));

    running.process.kill("SIGTERM");
    await running.printed(/SIGTERM/);
    running.process.kill("SIGTERM");
    await within(running.exited, 20_000, "the server to exit at the second SIGTERM");
    const cut = await Promise.all(streams.map((stream) => stream.done));
    for (const stream of cut) {
      expect(stream.text.length).toBeGreaterThan(0);
      expect(stream.text.length).toBeLessThan(LONG * tokenText(0).length);
    }

    server = await restart(false);
    const after = await server.balance(consumer.accountId);
    expect(after.held).toBe(0n);
    let charged = 0n;
    for (const stream of cut) {
      const order = (await server.admin.getOrder({ orderId: stream.orderId })).order;
      expect(statusName(order?.status ?? 0)).not.toBe("running");
      // Paid at most for what reached the consumer (every token is the same size).
      expect(order?.completionTokens).toBeLessThanOrEqual(stream.text.length / tokenText(0).length);
      charged += order?.cost ?? 0n;
    }
    expect(before.available - after.available).toBe(charged);
    const audit = await server.admin.auditLedger({});
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
  });
});

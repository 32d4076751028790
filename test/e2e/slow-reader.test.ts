/**
 * A slow reader is slowed down, not buffered for: a 70,000-token stream (80 MB of text) is read by
 * a raw HTTP client that takes 1 MB, then pauses, over and over, so the engine could produce much
 * faster than it reads. Backpressure must reach from the consumer's socket through the server and
 * the worker to the engine: the server process's resident memory (sampled from /proc while the
 * stream runs) stays flat, and the bill counts exactly the tokens the reader received.
 */
import { request } from "node:http";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestDatabase, type TestDatabase } from "../support/database.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import {
  residentBytes,
  type ServerProcess,
  type ServerWorker,
  startServerProcess,
} from "../support/server-process.js";

const MODEL = "verbose-model";
/** 70,000 tokens of TOKEN_BYTES: 80 MB, 2.5 times MAX_GROWTH, about 20 s for the reader. */
const TOKENS = 70_000;
/** Every token is the same size, so the reader counts tokens by bytes (the worker may merge them). */
const TOKEN_BYTES = 1200;
const tokenText = (index: number) => `${String(index).padStart(6, "0")}${"x".repeat(TOKEN_BYTES - 7)} `;
/**
 * The reader takes this much SSE data, then pauses: 4 MB/s at most, well below what the engine,
 * worker and server produce here (about 6-7 MB/s on a busy 2-core machine), so without
 * backpressure tens of MB would pile up in the server before the engine finished.
 */
const BURST_BYTES = 1 << 20;
const PAUSE_MS = 250;
const MB = 1 << 20;
/**
 * The growth allowed above the baseline. A flow-controlled server holds a window of chunks and
 * socket buffers (a few MB); one that buffers for the reader grows by about twice its backlog.
 * Measured on a 2-core VM after the warm-up below: 5-8 MB (PGlite and PostgreSQL), up to 16 MB
 * when a major GC comes late; that is the V8 heap's sawtooth, not a backlog. The stream (TOKENS)
 * carries 2.5 times this: had the server buffered for the reader, the engine (6-7 MB/s) would have
 * finished 80 MB while the reader (4 MB/s) took about 50, a 30 MB backlog and some 60 MB of growth.
 */
const MAX_GROWTH = 32 * MB;

interface ReadResult {
  status: number;
  sseBytes: number;
  contentBytes: number;
  finishReason: string | null;
  usage: { completion_tokens: number; prompt_tokens: number; cost_micro_credits?: string } | undefined;
  orderId: string;
  rss: number[];
}

/**
 * POSTs a streamed chat completion and reads it slowly: the response stays paused except for
 * bursts of BURST_BYTES, each followed by a pause in which the server's RSS is sampled.
 */
function readSlowly(server: ServerProcess, apiKey: string, body: object): Promise<ReadResult> {
  return new Promise((resolve, reject) => {
    const result: ReadResult = {
      status: 0,
      sseBytes: 0,
      contentBytes: 0,
      finishReason: null,
      usage: undefined,
      orderId: "",
      rss: [],
    };
    const sample = () =>
      residentBytes(server.pid).then(
        (bytes) => result.rss.push(bytes),
        () => {},
      );
    const sampler = setInterval(sample, 100);
    const payload = JSON.stringify(body);
    const req = request(`${server.httpUrl}/v1/chat/completions`, {
      method: "POST",
      headers: {
        authorization: `Bearer ${apiKey}`,
        "content-type": "application/json",
        "content-length": Buffer.byteLength(payload),
      },
    });
    req.on("error", (error) => {
      clearInterval(sampler);
      reject(error);
    });
    req.on("response", (res) => {
      result.status = res.statusCode ?? 0;
      res.setEncoding("utf8");
      let pending = "";
      let sinceBurst = 0;
      res.on("data", (text: string) => {
        result.sseBytes += Buffer.byteLength(text);
        sinceBurst += Buffer.byteLength(text);
        pending += text;
        const events = pending.split("\n\n");
        pending = events.pop() ?? "";
        for (const event of events) {
          const data = event
            .split("\n")
            .filter((line) => line.startsWith("data: "))
            .map((line) => line.slice(6))
            .join("\n");
          if (!data || data === "[DONE]") continue;
          const chunk = JSON.parse(data) as {
            id: string;
            choices: { delta?: { content?: string }; finish_reason?: string | null }[];
            usage?: ReadResult["usage"];
          };
          result.orderId ||= chunk.id;
          const choice = chunk.choices[0];
          result.contentBytes += Buffer.byteLength(choice?.delta?.content ?? "");
          if (choice?.finish_reason) result.finishReason = choice.finish_reason;
          if (chunk.usage) result.usage = chunk.usage;
        }
        if (sinceBurst >= BURST_BYTES) {
          sinceBurst = 0;
          res.pause();
          void sample();
          setTimeout(() => res.resume(), PAUSE_MS);
        }
      });
      res.on("end", () => {
        clearInterval(sampler);
        resolve(result);
      });
      res.on("error", (error) => {
        clearInterval(sampler);
        reject(error);
      });
    });
    req.end(payload);
  });
}

describe("a slow reader of a 70,000-token stream", () => {
  let database: TestDatabase;
  let engine: FakeEngine;
  let server: ServerProcess | undefined;
  let worker: ServerWorker | undefined;

  beforeAll(async () => {
    database = await createTestDatabase();
    engine = await startFakeEngine({ tokenCount: TOKENS, tokenText });
  });

  afterAll(async () => {
    await worker?.stop();
    await server?.kill();
    await engine?.close();
    await database?.drop();
  });

  it("holds the server's memory flat and bills exactly the tokens read", async () => {
    server = await startServerProcess(database);
    const consumer = await server.account("reader", 100);
    const provider = (await server.account("provider")).accountId;
    worker = await server.worker({
      accountId: provider,
      model: MODEL,
      priceIn: "0.1",
      priceOut: "0.1",
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
    // A first stream of 8 MB, so the baseline includes a server that has relayed one and whose V8
    // heap has grown to its working size (after a 100-token warm-up the heap's own growth was up
    // to 25 MB of the stream's growth).
    const warmUp = await readSlowly(server, consumer.apiKey, {
      model: MODEL,
      messages: [{ role: "user", content: "warm up" }],
      max_tokens: 7_000,
      stream: true,
    });
    expect(warmUp.status).toBe(200);
    const baseline = await residentBytes(server.pid);

    const read = await readSlowly(server, consumer.apiKey, {
      model: MODEL,
      messages: [{ role: "user", content: "Tell me everything" }],
      // Room above the stream's length, so it ends by the engine's stop, not by the limit.
      max_tokens: TOKENS + 100,
      stream: true,
      stream_options: { include_usage: true },
    });

    expect(read.status).toBe(200);
    expect(read.contentBytes % TOKEN_BYTES).toBe(0);
    const tokensRead = read.contentBytes / TOKEN_BYTES;
    expect(tokensRead).toBe(TOKENS);
    expect(read.finishReason).toBe("stop");
    expect(read.usage?.completion_tokens).toBe(tokensRead);
    const order = (await server.admin.getOrder({ orderId: read.orderId })).order;
    expect(order?.completionTokens).toBe(tokensRead);
    expect(order?.cost.toString()).toBe(read.usage?.cost_micro_credits);

    // The stream carried more than the growth allowed; had the server buffered for the reader,
    // its memory would have grown by about that much.
    expect(read.sseBytes).toBeGreaterThan(MAX_GROWTH);
    expect(read.rss.length).toBeGreaterThan(10);
    const growth = Math.max(...read.rss) - baseline;
    expect(growth, `server RSS grew by ${(growth / MB).toFixed(1)} MB`).toBeLessThan(MAX_GROWTH);
  }, 120_000);
});

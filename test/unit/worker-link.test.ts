import { spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync } from "node:fs";
import * as http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { fileURLToPath } from "node:url";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError } from "@connectrpc/connect";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterEach, describe, expect, it } from "vitest";
import type { TokenLogprob } from "../../common/generation.js";
import { FinishReason, ResponseFormat_Type } from "../../gen/locallmarket/v1/common_pb.js";
import {
  type ConnectRequest,
  ConnectResponseSchema,
  JobFailureCode,
  RejectCode,
  WorkerService,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { AsyncQueue } from "../../worker/async-queue.js";
import { runWorkerCli } from "../../worker/cli.js";
import {
  type Engine,
  EngineError,
  type EnginePiece,
  type GenerateRequest,
  type Generation,
  type GenerationResult,
} from "../../worker/engines/engine.js";
import { OpenAiEngine } from "../../worker/engines/openai-engine.js";
import { JobOutbox, type OutgoingChunk } from "../../worker/job-outbox.js";
import {
  AGENT_VERSION,
  PROTOCOL_VERSION,
  WorkerLink,
  type WorkerLinkOptions,
  WorkerRejectedError,
} from "../../worker/link-client.js";
import {
  type FakeEngine,
  type FakeEngineOptions,
  fakeArgumentFragments,
  fakeLogprob,
  fakeTopLogprobs,
  startFakeEngine,
} from "../support/fake-engine.js";
import { STORIES_260K as STORIES } from "../support/models.js";

// ------------------------------------------------------------------------------------------------
// A tiny WorkerService stub: every Connect call becomes a StubStream the test drives by hand.

type ResponseInit = MessageInitShape<typeof ConnectResponseSchema>["message"];
type RequestCase = NonNullable<ConnectRequest["message"]["case"]>;
type RequestOf<C extends RequestCase> = Extract<ConnectRequest["message"], { case: C }>["value"];

const FAIL = Symbol("fail");

class StubStream {
  readonly received = new AsyncQueue<ConnectRequest>();
  readonly outbound = new AsyncQueue<ResponseInit | typeof FAIL>();
  /** Resolves when the client half-closed (or broke) its request stream. */
  readonly clientEnded: Promise<void>;
  resolveClientEnded!: () => void;

  constructor() {
    this.clientEnded = new Promise((resolve) => {
      this.resolveClientEnded = resolve;
    });
  }

  send(message: ResponseInit): void {
    this.outbound.push(message);
  }

  welcome(
    overrides: Partial<{
      workerId: string;
      sessionId: string;
      heartbeatIntervalMs: number;
      maxChunkBytes: number;
      jobWindowChunks: number;
    }> = {},
  ): void {
    this.send({
      case: "welcome",
      value: {
        workerId: "w-1",
        sessionId: "s-1",
        heartbeatIntervalMs: 60_000,
        maxChunkBytes: 0,
        ...overrides,
      },
    });
  }

  /** Ends the call normally (the handler returns). */
  end(): void {
    this.outbound.close();
  }

  /** Ends the call with an error status. */
  fail(): void {
    this.outbound.push(FAIL);
  }

  /** The next request message, whatever it is. */
  async nextAny(): Promise<ConnectRequest["message"]> {
    const step = await this.received.shift();
    if (step.done) throw new Error("the client closed its request stream");
    return step.value.message;
  }

  /** The next request message of the given kind; heartbeats are skipped unless asked for. */
  async next<C extends RequestCase>(kind: C): Promise<RequestOf<C>> {
    for (;;) {
      const message = await this.nextAny();
      if (message.case === "heartbeat" && kind !== "heartbeat") continue;
      if (message.case !== kind)
        throw new Error(
          `expected ${kind}, got ${message.case}: ${JSON.stringify(message.value, bigintJson)}`,
        );
      return message.value as RequestOf<C>;
    }
  }

  /** Resolves once the client's request stream ended, failing on any non-heartbeat message before it. */
  async expectEnd(): Promise<void> {
    for (;;) {
      const step = await this.received.shift();
      if (step.done) return;
      const message = step.value.message;
      if (message.case !== "heartbeat")
        throw new Error(`expected the end of the stream, got ${message.case}`);
    }
  }
}

const bigintJson = (_key: string, value: unknown) => (typeof value === "bigint" ? value.toString() : value);

interface Stub {
  url: string;
  streams: AsyncQueue<StubStream>;
  count(): number;
  close(): Promise<void>;
}

async function startStub({ endOnClientEnd = true } = {}): Promise<Stub> {
  const streams = new AsyncQueue<StubStream>();
  let count = 0;
  const handler = connectNodeAdapter({
    routes: (router) =>
      router.service(WorkerService, {
        async *connect(requests, context) {
          const stream = new StubStream();
          count += 1;
          streams.push(stream);
          context.signal.addEventListener("abort", () => stream.outbound.close());
          void (async () => {
            try {
              for await (const request of requests) stream.received.push(request);
            } catch {
              // the client went away
            } finally {
              stream.received.close();
              stream.resolveClientEnded();
              // Like a real control plane: when the worker half-closes, the call ends.
              if (endOnClientEnd) stream.outbound.close();
            }
          })();
          for await (const message of stream.outbound) {
            if (message === FAIL) throw new ConnectError("stub failure", Code.Unavailable);
            yield create(ConnectResponseSchema, { message });
          }
        },
      }),
  });
  const server = http2.createServer(handler);
  const sessions = new Set<http2.ServerHttp2Session>();
  server.on("session", (session) => {
    sessions.add(session);
    session.on("close", () => sessions.delete(session));
  });
  server.listen(0, "127.0.0.1");
  await once(server, "listening");
  const { port } = server.address() as AddressInfo;
  return {
    url: `http://127.0.0.1:${port}`,
    streams,
    count: () => count,
    close: () =>
      new Promise<void>((resolve) => {
        for (const session of sessions) session.destroy();
        server.close(() => resolve());
      }),
  };
}

async function nextStream(stub: Stub): Promise<StubStream> {
  const step = await stub.streams.shift();
  if (step.done) throw new Error("stub closed");
  return step.value;
}

// ------------------------------------------------------------------------------------------------

const cleanups: Array<() => Promise<unknown>> = [];
afterEach(async () => {
  for (const cleanup of cleanups.splice(0).reverse()) await cleanup();
});

async function setup(
  options: {
    engine?: FakeEngineOptions;
    link?: Partial<WorkerLinkOptions>;
    start?: boolean;
    stub?: { endOnClientEnd?: boolean };
  } = {},
): Promise<{ stub: Stub; fake: FakeEngine; link: WorkerLink; logs: string[]; engine: Engine }> {
  const stub = await startStub(options.stub);
  cleanups.push(() => stub.close());
  const fake = await startFakeEngine(options.engine);
  cleanups.push(() => fake.close());
  const engine = new OpenAiEngine({ baseUrl: fake.url });
  const logs: string[] = [];
  const link = new WorkerLink({
    server: stub.url,
    token: "wt_test_token",
    name: "test-box",
    concurrency: 1,
    engine,
    log: (line) => logs.push(line),
    backoff: { initialMs: 10, maxMs: 40 },
    random: () => 0.5,
    offers: [
      {
        model: "test-model",
        pricePerMillionInput: 500_000n,
        pricePerMillionOutput: 1_500_000n,
        tokensPerSecond: 25,
        maxConcurrency: 1,
        contextLength: 4096,
        engine: "openai-compatible",
        capabilities: { tools: true, jsonSchema: false, logprobs: true, vision: false, completions: true },
      },
    ],
    ...options.link,
  });
  cleanups.push(async () => {
    await link.stop();
  });
  if (options.start !== false) void link.start();
  return { stub, fake, link, logs, engine };
}

/** Connects, checks the Hello and answers Welcome; resolves once the link saw it. */
async function connected(
  stub: Stub,
  link: WorkerLink,
  welcome: Parameters<StubStream["welcome"]>[0] = {},
): Promise<StubStream> {
  const stream = await nextStream(stub);
  await stream.next("hello");
  const welcomed = once(link, "welcomed");
  stream.welcome(welcome);
  await welcomed;
  return stream;
}

function assign(stream: StubStream, jobId: string, overrides: Record<string, unknown> = {}): void {
  stream.send({
    case: "jobAssign",
    value: {
      jobId,
      model: "test-model",
      messages: [{ role: "user", content: "Say hello" }],
      maxTokens: 100,
      ...overrides,
    },
  });
}

/**
 * An engine the test feeds piece by piece. It records every time the job's loop asks it for the
 * next piece (a pull): a loop waiting for its window does not pull, so the engine is not read.
 */
class ScriptedEngine implements Engine {
  readonly name = "scripted";
  readonly requests: GenerateRequest[] = [];
  readonly endings: GenerationResult[] = [];
  private readonly steps = new AsyncQueue<EnginePiece | "end" | EngineError>();
  private pullCount = 0;
  private finishReason: GenerationResult["finishReason"] = "stop";
  private pullWaiters: Array<{ count: number; resolve: () => void }> = [];

  /** How many pieces the job's loop has asked for so far (including the one it waits for). */
  get pulls(): number {
    return this.pullCount;
  }

  feed(...pieces: EnginePiece[]): void {
    for (const piece of pieces) this.steps.push(piece);
  }

  end(): void {
    this.steps.push("end");
  }

  /** Ends the generation with this finish reason. */
  finish(reason: GenerationResult["finishReason"]): void {
    this.finishReason = reason;
    this.steps.push("end");
  }

  fail(error: EngineError): void {
    this.steps.push(error);
  }

  /** Resolves once the job's loop has asked for `count` pieces. */
  pulled(count: number): Promise<void> {
    if (this.pullCount >= count) return Promise.resolve();
    return new Promise((resolve) => this.pullWaiters.push({ count, resolve }));
  }

  async *generate(request: GenerateRequest): Generation {
    this.requests.push(request);
    const aborted = new Promise<"aborted">((resolve) =>
      request.signal.addEventListener("abort", () => resolve("aborted"), { once: true }),
    );
    let completionTokens = 0;
    for (;;) {
      this.pullCount += 1;
      this.pullWaiters = this.pullWaiters.filter((waiter) => {
        if (waiter.count > this.pullCount) return true;
        waiter.resolve();
        return false;
      });
      const step = request.signal.aborted ? "aborted" : await Promise.race([this.steps.shift(), aborted]);
      if (step === "aborted") return this.ended({ finishReason: "cancelled" });
      if (step.done || step.value === "end") {
        return this.ended({ finishReason: this.finishReason, usage: { promptTokens: 3, completionTokens } });
      }
      if (step.value instanceof EngineError) throw step.value;
      completionTokens += step.value.tokenCount;
      yield step.value;
    }
  }

  async close(): Promise<void> {}

  private ended(result: GenerationResult): GenerationResult {
    this.endings.push(result);
    return result;
  }
}

async function setupScripted(
  welcome: Parameters<StubStream["welcome"]>[0],
  link: Partial<WorkerLinkOptions> = {},
): Promise<{ stream: StubStream; engine: ScriptedEngine; link: WorkerLink }> {
  const engine = new ScriptedEngine();
  const setUp = await setup({ link: { engine, ...link } });
  const stream = await connected(setUp.stub, setUp.link, welcome);
  return { stream, engine, link: setUp.link };
}

/** A Ping answered: every message the worker queued before it has been received by then. */
async function roundTrip(stream: StubStream, nonce: bigint): Promise<void> {
  stream.send({ case: "ping", value: { nonce } });
  expect((await stream.next("heartbeat")).pingNonce).toBe(nonce);
}

function acknowledge(stream: StubStream, jobId: string, sequence: bigint): void {
  stream.send({ case: "jobWindow", value: { jobId, acknowledgedSequence: sequence } });
}

describe("WorkerLink flow control", () => {
  it("never sends a chunk beyond the window while the server acknowledges slowly", async () => {
    const tokens = Array.from({ length: 40 }, (_, i) => `t${i} `);
    const { stub, link } = await setup({ engine: { tokens } });
    const window = 3n;
    const stream = await connected(stub, link, { jobWindowChunks: Number(window) });
    assign(stream, "job-w");
    await stream.next("jobAccepted");
    let acknowledged = 0n;
    let last = 0n;
    let text = "";
    let tokenCount = 0;
    let nonce = 0n;
    let pingOut: bigint | undefined;
    for (;;) {
      const message = await stream.nextAny();
      if (message.case === "heartbeat") {
        if (pingOut !== undefined && message.value.pingNonce === pingOut) {
          // The worker had a full round trip to overstep the window; now let one more chunk in.
          pingOut = undefined;
          acknowledged += 1n;
          acknowledge(stream, "job-w", acknowledged);
        }
        continue;
      }
      if (message.case === "jobDone") {
        expect(message.value.lastSequence).toBe(last);
        expect(message.value.usage?.completionTokens).toBe(tokens.length);
        break;
      }
      if (message.case !== "jobChunk") throw new Error(`unexpected ${message.case}`);
      expect(message.value.sequence).toBe(last + 1n);
      expect(message.value.sequence).toBeLessThanOrEqual(acknowledged + window);
      last = message.value.sequence;
      text += message.value.text;
      tokenCount += message.value.tokenCount;
      if (last === acknowledged + window) {
        nonce += 1n;
        pingOut = nonce;
        stream.send({ case: "ping", value: { nonce } });
      }
    }
    expect(text).toBe(tokens.join(""));
    expect(tokenCount).toBe(tokens.length);
  });

  it("sends a lone token at once while the window is open, one chunk per piece", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 64 });
    assign(stream, "job-lone");
    await stream.next("jobAccepted");
    engine.feed({ text: "Hi", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "Hi", tokenCount: 1 });
    engine.feed({ text: " there", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 2n, text: " there", tokenCount: 1 });
    engine.end();
    expect(await stream.next("jobDone")).toMatchObject({ finishReason: FinishReason.STOP, lastSequence: 2n });
  });

  it("with the window open, sends a burst's first token alone and merges the rest behind one queued chunk", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 64 });
    assign(stream, "job-burst");
    await stream.next("jobAccepted");
    // Twenty tokens at once, as an engine's read that held many SSE events.
    const pieces = Array.from({ length: 20 }, (_, i) => ({ text: `t${i} `, tokenCount: 1 }));
    engine.feed(...pieces);
    engine.end();
    const chunks: { text: string; tokenCount: number }[] = [];
    for (;;) {
      const message = await stream.nextAny();
      if (message.case === "jobDone") {
        expect(message.value.lastSequence).toBe(BigInt(chunks.length));
        break;
      }
      if (message.case === "jobChunk") chunks.push(message.value);
    }
    expect(chunks[0]).toMatchObject({ text: "t0 ", tokenCount: 1 });
    expect(chunks.map((chunk) => chunk.text).join("")).toBe(pieces.map((piece) => piece.text).join(""));
    expect(chunks.reduce((sum, chunk) => sum + chunk.tokenCount, 0)).toBe(20);
    // The first token alone (its frame leaves at the end of the turn), the next one alone as the
    // link is free again, one queued behind it, and the rest merged into one chunk: 1, 1, 1, 17.
    // (With four chunks allowed to queue before merging it was seven chunks, the largest of 14.)
    expect(chunks.length).toBeLessThanOrEqual(4);
    expect(Math.max(...chunks.map((chunk) => chunk.tokenCount))).toBeGreaterThanOrEqual(16);
  });

  it("coalesces what the engine produced while the window was closed into one chunk with the summed token count", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1 });
    assign(stream, "job-co");
    await stream.next("jobAccepted");
    engine.feed({ text: "Hel", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "Hel", tokenCount: 1 });
    // The window (1) is full: these wait in the worker, and the engine keeps being read meanwhile.
    engine.feed({ text: "lo", tokenCount: 1 }, { text: ",", tokenCount: 2 }, { text: " wör", tokenCount: 1 });
    await engine.pulled(5);
    acknowledge(stream, "job-co", 1n);
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 2n, text: "lo, wör", tokenCount: 4 });
    // The engine ends with text still waiting: JobDone comes only after that text was sent.
    engine.feed({ text: "ld", tokenCount: 1 });
    engine.end();
    await roundTrip(stream, 1n);
    acknowledge(stream, "job-co", 2n);
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 3n, text: "ld", tokenCount: 1 });
    const done = await stream.next("jobDone");
    expect(done).toMatchObject({ finishReason: FinishReason.STOP, lastSequence: 3n });
    expect(done.usage).toMatchObject({ promptTokens: 3, completionTokens: 6 });
  });

  it("splits coalesced text at Welcome.max_chunk_bytes, never inside a character", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1, maxChunkBytes: 4 });
    assign(stream, "job-split");
    await stream.next("jobAccepted");
    engine.feed({ text: "é", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "é", tokenCount: 1 });
    engine.feed({ text: "abc", tokenCount: 2 }, { text: "üx", tokenCount: 1 }, { text: "€€", tokenCount: 2 });
    engine.end();
    const chunks: RequestOf<"jobChunk">[] = [];
    let done: RequestOf<"jobDone"> | undefined;
    let acknowledged = 1n;
    while (!done) {
      acknowledge(stream, "job-split", acknowledged);
      const message = await stream.nextAny();
      if (message.case === "jobChunk") {
        chunks.push(message.value);
        acknowledged = message.value.sequence;
      } else if (message.case === "jobDone") done = message.value;
    }
    expect(chunks.map((c) => c.text)).toEqual(["abc", "üx", "€", "€"]);
    for (const chunk of chunks) expect(Buffer.byteLength(chunk.text)).toBeLessThanOrEqual(4);
    expect(chunks.map((c) => c.sequence)).toEqual([2n, 3n, 4n, 5n]);
    expect(chunks.reduce((sum, c) => sum + c.tokenCount, 0)).toBe(5);
    expect(done.lastSequence).toBe(5n);
  });

  it("stops reading the engine while its buffer is full and the window closed, until acknowledged", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1 }, { jobBufferBytes: 4 });
    assign(stream, "job-bp");
    await stream.next("jobAccepted");
    engine.feed({ text: "one ", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "one " });
    await engine.pulled(2);
    engine.feed({ text: "two ", tokenCount: 1 }, { text: "three", tokenCount: 1 });
    // 4 bytes wait for the window: the job's loop waits too and does not ask for "three".
    await roundTrip(stream, 1n);
    expect(engine.pulls).toBe(2);
    acknowledge(stream, "job-bp", 1n);
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 2n, text: "two ", tokenCount: 1 });
    await engine.pulled(3);
    acknowledge(stream, "job-bp", 2n);
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 3n, text: "three", tokenCount: 1 });
    engine.end();
    expect(await stream.next("jobDone")).toMatchObject({ lastSequence: 3n });
  });

  it("applies no window when Welcome.job_window_chunks is 0 (an older server)", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 0 });
    assign(stream, "job-old");
    await stream.next("jobAccepted");
    for (let i = 1; i <= 5; i++) {
      engine.feed({ text: `${i}`, tokenCount: 1 });
      expect(await stream.next("jobChunk")).toMatchObject({ sequence: BigInt(i), text: `${i}` });
    }
    engine.end();
    expect(await stream.next("jobDone")).toMatchObject({ lastSequence: 5n });
  });

  it("on JobCancel while waiting for the window, ends the job at once and the engine sees its request aborted", async () => {
    const { stream, engine, link } = await setupScripted({ jobWindowChunks: 1 }, { jobBufferBytes: 1 });
    assign(stream, "job-x");
    await stream.next("jobAccepted");
    engine.feed({ text: "a", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "a" });
    await engine.pulled(2);
    engine.feed({ text: "b", tokenCount: 1 });
    await roundTrip(stream, 1n);
    expect(engine.pulls).toBe(2);
    const finished = once(link, "job-finished");
    stream.send({ case: "jobCancel", value: { jobId: "job-x", reason: "consumer disconnected" } });
    // The waiting "b" is dropped: the next message about the job is its JobDone.
    const done = await stream.next("jobDone");
    expect(done).toMatchObject({ jobId: "job-x", finishReason: FinishReason.CANCELLED, lastSequence: 1n });
    expect(engine.requests[0]?.signal.aborted).toBe(true);
    expect(engine.endings).toEqual([{ finishReason: "cancelled" }]);
    expect((await finished)[0]).toMatchObject({ outcome: "done", finishReason: "cancelled", tokens: 1 });
    expect(link.runningJobs).toBe(0);
  });

  it("on JobCancel while waiting for the window, aborts the HTTP request to an OpenAI-compatible engine", async () => {
    // The engine streams "Hello" and holds the response open; at 4 bytes per chunk "Hell" fills the
    // window of 1 and "o" waits, which (buffer of 1 byte) holds the job's loop over the response.
    const { stub, link, fake } = await setup({ engine: { hang: true }, link: { jobBufferBytes: 1 } });
    const stream = await connected(stub, link, { jobWindowChunks: 1, maxChunkBytes: 4 });
    assign(stream, "job-http");
    await stream.next("jobAccepted");
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "Hell", tokenCount: 1 });
    stream.send({ case: "jobCancel", value: { jobId: "job-http", reason: "consumer disconnected" } });
    expect(await stream.next("jobDone")).toMatchObject({
      jobId: "job-http",
      finishReason: FinishReason.CANCELLED,
      lastSequence: 1n,
    });
    expect(await fake.requestClosed(0)).toEqual({ aborted: true });
  });

  it("sends JobFailed without waiting for the window when the engine fails", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1 });
    assign(stream, "job-fail");
    await stream.next("jobAccepted");
    engine.feed({ text: "a", tokenCount: 1 }, { text: "b", tokenCount: 1 });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "a" });
    await engine.pulled(3);
    engine.fail(new EngineError("engine_error", "GPU on fire"));
    // No acknowledgement was sent: the failure is not held back, and the waiting "b" is dropped.
    expect(await stream.next("jobFailed")).toMatchObject({
      jobId: "job-fail",
      code: JobFailureCode.ENGINE_ERROR,
      message: "GPU on fire",
    });
  });
});

describe("JobOutbox", () => {
  function outbox(window: number) {
    const sent: OutgoingChunk[] = [];
    const box = new JobOutbox({ window, maxChunkBytes: 0, bufferBytes: 1 << 16, send: (c) => sent.push(c) });
    return { box, sent };
  }

  it("does not let an acknowledgement of unsent chunks open the window further", () => {
    const { box, sent } = outbox(1);
    box.push({ text: "a", tokenCount: 1 });
    box.acknowledge(5n);
    box.push({ text: "b", tokenCount: 1 });
    box.push({ text: "c", tokenCount: 1 });
    expect(sent.map((c) => c.text)).toEqual(["a", "b"]);
    box.acknowledge(2n);
    expect(sent.map((c) => c.text)).toEqual(["a", "b", "c"]);
  });

  it("keeps max_chunk_bytes for a token longer than a chunk, its logprob with its first characters", () => {
    const sent: OutgoingChunk[] = [];
    const box = new JobOutbox({
      window: 0,
      maxChunkBytes: 3,
      bufferBytes: 1 << 16,
      send: (c) => sent.push(c),
    });
    box.push({
      text: "abcdefg",
      tokenCount: 2,
      logprobs: [
        { token: "abcde", logprob: -1, topLogprobs: [] },
        { token: "fg", logprob: -2, topLogprobs: [] },
      ],
    });
    expect(sent.map((c) => c.text)).toEqual(["abc", "def", "g"]);
    expect(sent.map((c) => c.logprobs.map((entry) => entry.logprob))).toEqual([[-1], [-2], []]);
    expect(sent.reduce((sum, c) => sum + c.tokenCount, 0)).toBe(2);
  });

  it("sends a piece with only tool-call fragments, and drops nothing but empty pieces", () => {
    const { box, sent } = outbox(0);
    box.push({ text: "", tokenCount: 0 });
    box.push({ text: "", tokenCount: 0, toolCalls: [{ index: 0, arguments: "{}" }] });
    expect(sent).toEqual([
      { sequence: 1n, text: "", tokenCount: 0, toolCalls: [{ index: 0, arguments: "{}" }], logprobs: [] },
    ]);
  });

  it("counts tool-call fragments against the buffer, so a long call makes the producer wait", async () => {
    const sent: OutgoingChunk[] = [];
    const box = new JobOutbox({ window: 1, maxChunkBytes: 0, bufferBytes: 8, send: (c) => sent.push(c) });
    expect(box.push({ text: "a", tokenCount: 1 })).toBeUndefined();
    const waiting = box.push({ text: "", tokenCount: 1, toolCalls: [{ index: 0, arguments: "0123456789" }] });
    expect(waiting).toBeInstanceOf(Promise);
    box.acknowledge(1n);
    await waiting;
    expect(sent.map((c) => c.toolCalls)).toEqual([[], [{ index: 0, arguments: "0123456789" }]]);
  });

  it("with maxWaitingForLink, merges what comes while the link has not taken the last chunk, and sends a lone piece at once", () => {
    const sent: OutgoingChunk[] = [];
    const box = new JobOutbox({
      window: 4,
      maxChunkBytes: 0,
      bufferBytes: 1 << 16,
      maxWaitingForLink: 1,
      send: (c) => sent.push(c),
    });
    box.push({ text: "a", tokenCount: 1 });
    expect(sent.map((c) => c.text)).toEqual(["a"]);
    box.push({ text: "b", tokenCount: 1 });
    box.push({ text: "c", tokenCount: 1 });
    expect(sent.map((c) => c.text)).toEqual(["a"]);
    box.taken();
    expect(sent.map((c) => [c.sequence, c.text, c.tokenCount])).toEqual([
      [1n, "a", 1],
      [2n, "bc", 2],
    ]);
    // The link is idle again: the next piece leaves at once, alone.
    box.taken();
    box.push({ text: "d", tokenCount: 1 });
    expect(sent.map((c) => c.text)).toEqual(["a", "bc", "d"]);
    // The window still bounds what leaves: with chunks 1..3 unacknowledged and a window of 4,
    // chunk 4 may leave once taken, and chunk 5 only after an acknowledgement.
    box.taken();
    box.push({ text: "e", tokenCount: 1 });
    box.taken();
    box.push({ text: "f", tokenCount: 1 });
    box.taken();
    expect(sent.map((c) => c.text)).toEqual(["a", "bc", "d", "e"]);
    box.acknowledge(1n);
    expect(sent.map((c) => c.text)).toEqual(["a", "bc", "d", "e", "f"]);
  });

  it("ignores an acknowledgement lower than one already received", () => {
    const { box, sent } = outbox(1);
    box.push({ text: "a", tokenCount: 1 });
    box.acknowledge(1n);
    box.push({ text: "b", tokenCount: 1 });
    box.push({ text: "c", tokenCount: 1 });
    box.acknowledge(1n);
    box.acknowledge(0n);
    expect(sent.map((c) => c.sequence)).toEqual([1n, 2n]);
  });
});

/** A token's log-probability as the engine gives it, with `alternatives` made-up alternatives. */
function logprobOf(token: string, logprob: number, alternatives = 0): TokenLogprob {
  return {
    token,
    logprob,
    topLogprobs: Array.from({ length: alternatives }, (_, k) => ({
      token: `${token}${k}`,
      logprob: logprob - k,
    })),
  };
}

describe("WorkerLink tools, response formats and logprobs", () => {
  it("gives the engine every field of the JobAssign: tools, tool_choice, response_format, logprobs, tool messages", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 8 });
    const parameters = { type: "object", properties: { city: { type: "string" } }, required: ["city"] };
    const schema = { type: "object", properties: { answer: { type: "string" } } };
    // A message's fields reach the engine as they are on the wire (unset ones left out).
    const messages = [
      { role: "user", content: "Weather?", imageUrls: ["https://example.com/sky.png"] },
      {
        role: "assistant",
        content: "",
        toolCalls: [{ id: "call_1", name: "get_weather", arguments: '{"city":"Oslo"}' }],
      },
      { role: "tool", content: "-3 °C", toolCallId: "call_1" },
    ];
    assign(stream, "job-fields", {
      messages,
      tools: [
        {
          name: "get_weather",
          description: "Weather in a city",
          parametersJson: JSON.stringify(parameters),
          strict: true,
        },
        { name: "now", description: "", parametersJson: "", strict: false },
      ],
      toolChoice: { mode: "function", functionName: "get_weather" },
      parallelToolCalls: true,
      responseFormat: {
        type: ResponseFormat_Type.JSON_SCHEMA,
        name: "reply",
        schemaJson: JSON.stringify(schema),
        strict: true,
      },
      wantLogprobs: true,
      topLogprobs: 5,
      sampling: { temperature: 0.2 },
    });
    await stream.next("jobAccepted");
    await engine.pulled(1);
    expect(engine.requests[0]).toEqual({
      model: "test-model",
      messages,
      tools: [
        { name: "get_weather", description: "Weather in a city", parameters, strict: true },
        { name: "now", description: "", strict: false },
      ],
      toolChoice: { mode: "function", functionName: "get_weather" },
      parallelToolCalls: true,
      responseFormat: { type: "json_schema", name: "reply", schema, strict: true },
      logprobs: { top: 5 },
      sampling: { temperature: 0.2 },
      maxTokens: 100,
      signal: expect.any(AbortSignal),
    });
    engine.end();
    await stream.next("jobDone");
  });

  it("gives the engine a raw prompt, json_object, and tool_choice modes as they are", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 8 });
    assign(stream, "job-raw", {
      messages: [],
      prompt: "Once upon a time",
      responseFormat: { type: ResponseFormat_Type.JSON_OBJECT },
    });
    await stream.next("jobAccepted");
    await engine.pulled(1);
    expect(engine.requests[0]).toMatchObject({
      messages: [],
      prompt: "Once upon a time",
      responseFormat: { type: "json_object" },
    });
    expect(engine.requests[0]).not.toHaveProperty("logprobs");
    expect(engine.requests[0]).not.toHaveProperty("tools");
    engine.end();
    await stream.next("jobDone");
    for (const [index, mode] of ["", "none", "required"].entries()) {
      assign(stream, `job-mode-${index}`, {
        tools: [{ name: "f", parametersJson: "{}" }],
        toolChoice: { mode },
      });
      await stream.next("jobAccepted");
      await engine.pulled(index + 2);
      expect(engine.requests[index + 1]?.toolChoice).toEqual({ mode: mode || "auto" });
      expect(engine.requests[index + 1]?.tools).toEqual([
        { name: "f", description: "", parameters: {}, strict: false },
      ]);
      engine.end();
      await stream.next("jobDone");
    }
  });

  it.each([
    [{ tools: [{ name: "f", parametersJson: "{not json" }] }, /the parameters of tool "f" is not valid JSON/],
    [{ tools: [{ name: "f", parametersJson: "[1]" }] }, /the parameters of tool "f" is not a JSON object/],
    [
      { responseFormat: { type: ResponseFormat_Type.JSON_SCHEMA, name: "x", schemaJson: "" } },
      /the response_format schema is not valid JSON/,
    ],
    [
      { tools: [{ name: "f" }], toolChoice: { mode: "function" } },
      /tool_choice "function" names no function/,
    ],
    [{ tools: [{ name: "f" }], toolChoice: { mode: "any" } }, /unknown tool_choice mode "any"/],
  ])(
    "refuses a malformed assignment with INVALID_INPUT before accepting it (%#)",
    async (fields, pattern) => {
      const { stream, engine } = await setupScripted({ jobWindowChunks: 8 });
      assign(stream, "job-bad", fields);
      const failed = await stream.next("jobFailed");
      expect(failed).toMatchObject({ jobId: "job-bad", code: JobFailureCode.INVALID_INPUT });
      expect(failed.message).toMatch(pattern);
      expect(engine.requests).toHaveLength(0);
    },
  );

  it("sends a piece's tool-call fragments and logprobs in its JobChunk exactly, and FINISH_REASON_TOOL_CALLS", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 8 });
    assign(stream, "job-tc");
    await stream.next("jobAccepted");
    engine.feed({
      text: "Let me check.",
      tokenCount: 2,
      logprobs: [logprobOf("Let me", -0.25, 2), logprobOf(" check.", -1.5, 2)],
    });
    expect(await stream.next("jobChunk")).toMatchObject({
      sequence: 1n,
      text: "Let me check.",
      tokenCount: 2,
      toolCalls: [],
      logprobs: [
        {
          token: "Let me",
          logprob: -0.25,
          topLogprobs: [
            { token: "Let me0", logprob: -0.25 },
            { token: "Let me1", logprob: -1.25 },
          ],
        },
        { token: " check.", logprob: -1.5, topLogprobs: [{ token: " check.0" }, { token: " check.1" }] },
      ],
    });
    engine.feed({
      text: "",
      tokenCount: 1,
      toolCalls: [{ index: 0, id: "call_a", name: "get_weather", arguments: "" }],
    });
    expect(await stream.next("jobChunk")).toMatchObject({
      sequence: 2n,
      text: "",
      tokenCount: 1,
      toolCalls: [{ index: 0, id: "call_a", name: "get_weather", arguments: "" }],
      logprobs: [],
    });
    engine.feed({
      text: "",
      tokenCount: 1,
      toolCalls: [
        { index: 0, arguments: '{"city":' },
        { index: 1, id: "call_b", name: "now", arguments: "{}" },
      ],
    });
    expect(await stream.next("jobChunk")).toMatchObject({
      sequence: 3n,
      toolCalls: [
        { index: 0, id: "", name: "", arguments: '{"city":' },
        { index: 1, id: "call_b", name: "now", arguments: "{}" },
      ],
    });
    engine.finish("tool_calls");
    expect(await stream.next("jobDone")).toMatchObject({
      finishReason: FinishReason.TOOL_CALLS,
      lastSequence: 3n,
    });
  });

  it("coalesces tool-call fragments and logprobs in order with their text while the window is closed", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1 });
    assign(stream, "job-tcc");
    await stream.next("jobAccepted");
    engine.feed({ text: "A", tokenCount: 1, logprobs: [logprobOf("A", -0.1, 1)] });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "A" });
    engine.feed(
      { text: "B", tokenCount: 1, logprobs: [logprobOf("B", -0.2, 1)] },
      { text: "", tokenCount: 1, toolCalls: [{ index: 0, id: "call_0", name: "f", arguments: "" }] },
      { text: "", tokenCount: 1, toolCalls: [{ index: 0, arguments: '{"x"' }] },
      {
        text: "C",
        tokenCount: 1,
        logprobs: [logprobOf("C", -0.3, 1)],
        toolCalls: [{ index: 0, arguments: ":1}" }],
      },
    );
    await engine.pulled(6);
    acknowledge(stream, "job-tcc", 1n);
    expect(await stream.next("jobChunk")).toMatchObject({
      sequence: 2n,
      text: "BC",
      tokenCount: 4,
      toolCalls: [
        { index: 0, id: "call_0", name: "f", arguments: "" },
        { index: 0, id: "", name: "", arguments: '{"x"' },
        { index: 0, id: "", name: "", arguments: ":1}" },
      ],
      logprobs: [
        { token: "B", logprob: -0.2, topLogprobs: [{ token: "B0", logprob: -0.2 }] },
        { token: "C", logprob: -0.3, topLogprobs: [{ token: "C0", logprob: -0.3 }] },
      ],
    });
    engine.finish("tool_calls");
    expect(await stream.next("jobDone")).toMatchObject({
      finishReason: FinishReason.TOOL_CALLS,
      lastSequence: 2n,
    });
  });

  it("splits coalesced text at max_chunk_bytes between tokens, each chunk with its own tokens' logprobs", async () => {
    const { stream, engine } = await setupScripted({ jobWindowChunks: 1, maxChunkBytes: 5 });
    assign(stream, "job-lps");
    await stream.next("jobAccepted");
    engine.feed({ text: "x", tokenCount: 1, logprobs: [logprobOf("x", -0.5)] });
    expect(await stream.next("jobChunk")).toMatchObject({ sequence: 1n, text: "x" });
    const tokens = ["ab", "cd", "é", "fgh", "ijklm"];
    engine.feed(
      {
        text: tokens.join(""),
        tokenCount: tokens.length,
        logprobs: tokens.map((token, i) => logprobOf(token, -i)),
        toolCalls: [{ index: 0, id: "call_0", name: "f", arguments: "{}" }],
      },
      { text: "z", tokenCount: 1, logprobs: [logprobOf("z", -9)] },
    );
    engine.end();
    const chunks: RequestOf<"jobChunk">[] = [];
    let acknowledged = 1n;
    for (;;) {
      acknowledge(stream, "job-lps", acknowledged);
      const message = await stream.nextAny();
      if (message.case === "jobDone") break;
      if (message.case !== "jobChunk") continue;
      chunks.push(message.value);
      acknowledged = message.value.sequence;
    }
    expect(chunks.map((c) => c.text)).toEqual(["abcd", "éfgh", "ijklm", "z"]);
    for (const chunk of chunks) {
      // A chunk's logprobs spell its text: none is parted from the text it belongs to.
      expect(chunk.logprobs.map((entry) => entry.token).join("")).toBe(chunk.text);
      expect(chunk.tokenCount).toBe(chunk.logprobs.length);
    }
    expect(chunks.flatMap((c) => c.logprobs.map((entry) => entry.logprob))).toEqual([-0, -1, -2, -3, -4, -9]);
    // The piece's tool call leaves with its last part, after its text.
    expect(chunks.map((c) => c.toolCalls.length)).toEqual([0, 0, 1, 0]);
  });

  it("relays an OpenAI-compatible engine's streamed tool call, fragment by fragment, with FINISH_REASON_TOOL_CALLS", async () => {
    const argumentsText = '{"city":"Lisbon"}';
    const { stub, link, fake } = await setup({
      engine: { toolCall: { arguments: argumentsText }, toolCallFragments: 3 },
    });
    const stream = await connected(stub, link);
    assign(stream, "job-oa-tc", {
      tools: [{ name: "get_weather", parametersJson: "{}" }],
      wantLogprobs: true,
      topLogprobs: 1,
    });
    await stream.next("jobAccepted");
    const fragments = fakeArgumentFragments(argumentsText, 3);
    const expected = [
      { index: 0, id: "call_0", name: "get_weather", arguments: "" },
      ...fragments.map((fragment) => ({ index: 0, id: "", name: "", arguments: fragment })),
    ];
    for (const [i, call] of expected.entries()) {
      expect(await stream.next("jobChunk")).toMatchObject({
        sequence: BigInt(i + 1),
        text: "",
        tokenCount: 1,
        toolCalls: [call],
      });
    }
    const done = await stream.next("jobDone");
    expect(done).toMatchObject({ finishReason: FinishReason.TOOL_CALLS, lastSequence: 4n });
    expect(done.usage).toMatchObject({ completionTokens: 4 });
    expect(fake.requests[0]).toMatchObject({
      tools: [{ type: "function", function: { name: "get_weather" } }],
      logprobs: true,
      top_logprobs: 1,
    });
  });

  it("relays an OpenAI-compatible engine's logprobs with each token", async () => {
    const { stub, link } = await setup({ engine: { tokens: ["Hi", " there"] } });
    const stream = await connected(stub, link);
    assign(stream, "job-oa-lp", { wantLogprobs: true, topLogprobs: 2 });
    await stream.next("jobAccepted");
    for (const [i, token] of ["Hi", " there"].entries()) {
      expect(await stream.next("jobChunk")).toMatchObject({
        text: token,
        logprobs: [{ token, logprob: fakeLogprob(i), topLogprobs: fakeTopLogprobs(token, i, 2) }],
      });
    }
    expect(await stream.next("jobDone")).toMatchObject({ finishReason: FinishReason.STOP });
  });
});

describe("WorkerLink", () => {
  it("sends a complete Hello first, then waits for Welcome", async () => {
    const { stub, link, logs } = await setup();
    const stream = await nextStream(stub);
    const hello = await stream.next("hello");
    expect(hello.workerToken).toBe("wt_test_token");
    expect(hello.agentVersion).toBe(AGENT_VERSION);
    expect(hello.agentVersion).toBe("locallmarket-worker/0.1.0");
    expect(hello.workerName).toBe("test-box");
    expect(hello.protocolVersion).toBe(PROTOCOL_VERSION);
    expect(hello.offers).toHaveLength(1);
    expect(hello.offers[0]).toMatchObject({
      model: "test-model",
      pricePerMillionInput: 500_000n,
      pricePerMillionOutput: 1_500_000n,
      advertisedTokensPerSecond: 25,
      maxConcurrency: 1,
      contextLength: 4096,
      engine: "openai-compatible",
      capabilities: { tools: true, jsonSchema: false, logprobs: true, vision: false, completions: true },
    });
    expect(link.state).toBe("connecting");

    const welcomed = once(link, "welcomed");
    stream.welcome({ workerId: "w-42", sessionId: "s-7" });
    const [welcome] = await welcomed;
    expect(welcome.workerId).toBe("w-42");
    expect(link.state).toBe("connected");
    expect(logs.some((line) => line.includes("connected as worker w-42 session s-7"))).toBe(true);
    expect(logs.join("\n")).not.toContain("wt_test_token");
  });

  it("sends heartbeats at the interval from Welcome", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link, { heartbeatIntervalMs: 20 });
    const first = await stream.next("heartbeat");
    expect(first).toMatchObject({ activeJobs: 0, queuedJobs: 0, pingNonce: 0n });
    const second = await stream.next("heartbeat");
    expect(second.pingNonce).toBe(0n);
  });

  it("answers Ping with a Heartbeat echoing the nonce", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link);
    stream.send({ case: "ping", value: { nonce: 123_456_789_012n } });
    const heartbeat = await stream.next("heartbeat");
    expect(heartbeat.pingNonce).toBe(123_456_789_012n);
  });

  it("runs a job: JobAccepted, chunks with sequences 1..n, JobDone with usage and last_sequence", async () => {
    const { stub, link, fake, logs } = await setup();
    const stream = await connected(stub, link);
    const finished = once(link, "job-finished");
    assign(stream, "job-1", { sampling: { temperature: 0.5, stop: ["END"] } });

    expect(await stream.next("jobAccepted")).toMatchObject({ jobId: "job-1" });
    const chunks = [];
    for (let i = 0; i < 4; i++) chunks.push(await stream.next("jobChunk"));
    expect(chunks.map((c) => c.sequence)).toEqual([1n, 2n, 3n, 4n]);
    expect(chunks.map((c) => c.text)).toEqual(["Hello", ",", " world", "!"]);
    expect(chunks.every((c) => c.jobId === "job-1" && c.tokenCount === 1)).toBe(true);
    const done = await stream.next("jobDone");
    expect(done.jobId).toBe("job-1");
    expect(done.finishReason).toBe(FinishReason.STOP);
    expect(done.lastSequence).toBe(4n);
    expect(done.usage).toMatchObject({ promptTokens: 12, completionTokens: 4 });

    const [summary] = await finished;
    expect(summary).toMatchObject({
      jobId: "job-1",
      outcome: "done",
      finishReason: "stop",
      tokens: 4,
      chunks: 4,
    });
    expect(fake.requests[0]).toMatchObject({
      model: "test-model",
      max_tokens: 100,
      temperature: 0.5,
      stop: ["END"],
      messages: [{ role: "user", content: "Say hello" }],
    });
    expect(logs.some((line) => /job job-1 done: stop, 4 tokens in .* tok\/s/.test(line))).toBe(true);
  });

  it("stops at max_tokens with FINISH_REASON_LENGTH", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link);
    assign(stream, "job-len", { maxTokens: 2 });
    await stream.next("jobAccepted");
    expect((await stream.next("jobChunk")).sequence).toBe(1n);
    expect((await stream.next("jobChunk")).sequence).toBe(2n);
    const done = await stream.next("jobDone");
    expect(done).toMatchObject({ jobId: "job-len", finishReason: FinishReason.LENGTH, lastSequence: 2n });
  });

  it("splits chunks larger than Welcome.max_chunk_bytes without breaking characters", async () => {
    const { stub, link } = await setup({ engine: { tokens: ["héllo wörld", "!"] } });
    const stream = await nextStream(stub);
    await stream.next("hello");
    const welcomed = once(link, "welcomed");
    stream.send({ case: "welcome", value: { workerId: "w", sessionId: "s", maxChunkBytes: 4 } });
    await welcomed;
    assign(stream, "job-split");
    await stream.next("jobAccepted");
    const texts: string[] = [];
    const counts: number[] = [];
    for (;;) {
      const message = await stream.nextAny();
      if (message.case === "jobDone") {
        expect(message.value.lastSequence).toBe(BigInt(texts.length));
        break;
      }
      if (message.case !== "jobChunk") continue;
      expect(message.value.sequence).toBe(BigInt(texts.length + 1));
      expect(Buffer.byteLength(message.value.text)).toBeLessThanOrEqual(4);
      texts.push(message.value.text);
      counts.push(message.value.tokenCount);
    }
    expect(texts.join("")).toBe("héllo wörld!");
    expect(counts.reduce((a, b) => a + b, 0)).toBe(2);
  });

  it("cancels a running job on JobCancel and reports FINISH_REASON_CANCELLED", async () => {
    const { stub, link, fake } = await setup({ engine: { hang: true } });
    const stream = await connected(stub, link);
    assign(stream, "job-c");
    await stream.next("jobAccepted");
    const chunk = await stream.next("jobChunk");
    expect(chunk).toMatchObject({ sequence: 1n, text: "Hello" });
    stream.send({ case: "jobCancel", value: { jobId: "job-c", reason: "consumer disconnected" } });
    const done = await stream.next("jobDone");
    expect(done).toMatchObject({ jobId: "job-c", finishReason: FinishReason.CANCELLED, lastSequence: 1n });
    // The engine request was really stopped.
    expect(await fake.requestClosed(0)).toEqual({ aborted: true });
    expect(link.runningJobs).toBe(0);
  });

  it("ignores a JobCancel for an unknown job", async () => {
    const { stub, link, logs } = await setup();
    const stream = await connected(stub, link);
    stream.send({ case: "jobCancel", value: { jobId: "nope" } });
    stream.send({ case: "ping", value: { nonce: 5n } });
    expect((await stream.next("heartbeat")).pingNonce).toBe(5n);
    expect(logs.some((line) => line.includes("ignoring JobCancel for unknown job nope"))).toBe(true);
  });

  it("refuses jobs beyond its concurrency with OVERLOADED", async () => {
    const { stub, link } = await setup({ engine: { hang: true } });
    const stream = await connected(stub, link);
    assign(stream, "job-a");
    await stream.next("jobAccepted");
    await stream.next("jobChunk");
    assign(stream, "job-b");
    const failed = await stream.next("jobFailed");
    expect(failed).toMatchObject({ jobId: "job-b", code: JobFailureCode.OVERLOADED });
    stream.send({ case: "jobCancel", value: { jobId: "job-a" } });
    expect(await stream.next("jobDone")).toMatchObject({
      jobId: "job-a",
      finishReason: FinishReason.CANCELLED,
    });
  });

  it("refuses a model it does not serve with MODEL_UNAVAILABLE", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link);
    assign(stream, "job-m", { model: "other-model" });
    expect(await stream.next("jobFailed")).toMatchObject({
      jobId: "job-m",
      code: JobFailureCode.MODEL_UNAVAILABLE,
    });
  });

  it("reports engine failures as JobFailed", async () => {
    const { stub, link } = await setup({ engine: { failWith: { status: 500, message: "GPU on fire" } } });
    const stream = await connected(stub, link);
    assign(stream, "job-f");
    await stream.next("jobAccepted");
    const failed = await stream.next("jobFailed");
    expect(failed.jobId).toBe("job-f");
    expect(failed.code).toBe(JobFailureCode.ENGINE_ERROR);
    expect(failed.message).toContain("GPU on fire");
  });

  it("after Drain, finishes running jobs but refuses new ones with OVERLOADED", async () => {
    const { stub, link } = await setup({ engine: { delayMs: 5 }, link: { concurrency: 2 } });
    const stream = await connected(stub, link);
    assign(stream, "job-before");
    await stream.next("jobAccepted");
    const drained = once(link, "drain");
    stream.send({ case: "drain", value: { reason: "maintenance" } });
    await drained;
    assign(stream, "job-after");
    const seen: string[] = [];
    let failedAfter: RequestOf<"jobFailed"> | undefined;
    let doneBefore: RequestOf<"jobDone"> | undefined;
    while (!failedAfter || !doneBefore) {
      const message = await stream.nextAny();
      if (message.case === "heartbeat") continue;
      seen.push(`${message.case}:${message.value && "jobId" in message.value ? message.value.jobId : ""}`);
      if (message.case === "jobFailed") failedAfter = message.value;
      if (message.case === "jobDone") doneBefore = message.value;
    }
    expect(failedAfter).toMatchObject({ jobId: "job-after", code: JobFailureCode.OVERLOADED });
    expect(doneBefore).toMatchObject({
      jobId: "job-before",
      finishReason: FinishReason.STOP,
      lastSequence: 4n,
    });
    expect(seen).not.toContain("jobAccepted:job-after");
  });

  it("reconnects after the server ends the stream, with a fresh Hello", async () => {
    const { stub, link, logs } = await setup();
    const first = await connected(stub, link);
    const disconnected = once(link, "disconnected");
    first.end();
    await disconnected;
    const second = await nextStream(stub);
    const hello = await second.next("hello");
    expect(hello.workerToken).toBe("wt_test_token");
    const welcomed = once(link, "welcomed");
    second.welcome({ sessionId: "s-2" });
    const [welcome] = await welcomed;
    expect(welcome.sessionId).toBe("s-2");
    expect(stub.count()).toBe(2);
    expect(logs.some((line) => line.startsWith("disconnected: "))).toBe(true);
    expect(logs.some((line) => /^retrying in \d+\.\d s$/.test(line))).toBe(true);
  });

  it("reconnects after the stream fails, and abandons the jobs of the lost stream", async () => {
    const { stub, link } = await setup({ engine: { hang: true } });
    const first = await connected(stub, link);
    assign(first, "job-lost");
    await first.next("jobAccepted");
    await first.next("jobChunk");
    const finished = once(link, "job-finished");
    first.fail();
    const [summary] = await finished;
    expect(summary).toMatchObject({ jobId: "job-lost", outcome: "abandoned" });
    const second = await nextStream(stub);
    expect((await second.next("hello")).workerName).toBe("test-box");
  });

  it("backs off exponentially with jitter while the server is unreachable, and resets after Welcome", async () => {
    const stub = await startStub();
    const url = stub.url;
    await stub.close();
    const { link } = await setup({ link: { server: url }, start: false });
    const delays: number[] = [];
    const fourRetries = new Promise<void>((resolve) => {
      link.on("retrying", ({ delayMs }) => {
        delays.push(delayMs);
        if (delays.length === 4) resolve();
      });
    });
    void link.start();
    await fourRetries;
    // random() = 0.5 → delay = 0.75 × base; base 10 ms doubling, capped at 40 ms.
    expect(delays).toEqual([8, 15, 30, 30]);
  });

  it("resets the backoff after a successful Welcome", async () => {
    const { stub, link } = await setup();
    const delays: number[] = [];
    link.on("retrying", ({ delayMs }) => delays.push(delayMs));
    const first = await nextStream(stub);
    await first.next("hello");
    first.end(); // no Welcome: the next delay doubles
    const second = await nextStream(stub);
    await second.next("hello");
    second.end();
    const third = await nextStream(stub);
    await third.next("hello");
    const welcomed = once(link, "welcomed");
    third.welcome();
    await welcomed;
    third.end(); // after a Welcome: back to the initial delay
    const fourth = await nextStream(stub);
    await fourth.next("hello");
    expect(delays).toEqual([8, 15, 8]);
  });

  it("does not reconnect after Reject UNAUTHENTICATED and fails with WorkerRejectedError", async () => {
    const { stub, link, logs } = await setup();
    const stream = await nextStream(stub);
    await stream.next("hello");
    stream.send({
      case: "reject",
      value: { code: RejectCode.UNAUTHENTICATED, message: "unknown worker token" },
    });
    const error = await link.done.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(WorkerRejectedError);
    expect((error as WorkerRejectedError).code).toBe(RejectCode.UNAUTHENTICATED);
    expect((error as Error).message).toContain("unknown worker token");
    expect(link.state).toBe("failed");
    expect(stub.count()).toBe(1);
    expect(logs.some((line) => line.includes("rejected by the server: UNAUTHENTICATED"))).toBe(true);
  });

  it.each([
    ["UNAUTHENTICATED", RejectCode.UNAUTHENTICATED, "the worker token is unknown or revoked"],
    ["BANNED", RejectCode.BANNED, "the operator banned this worker"],
    // This worker's Hello comes from its options: reconnecting would repeat the same invalid Hello.
    ["INVALID_HELLO", RejectCode.INVALID_HELLO, "fix the offers"],
    ["REPLACED", RejectCode.REPLACED, "another process is connected with the same worker token"],
  ])("stops for good after Reject %s, saying what to do", async (_name, code, advice) => {
    const { stub, link, logs } = await setup();
    const stream = await connected(stub, link);
    stream.send({ case: "reject", value: { code, message: "from the server" } });
    const error = await link.done.catch((e: unknown) => e);
    expect(error).toBeInstanceOf(WorkerRejectedError);
    expect((error as WorkerRejectedError).code).toBe(code);
    expect((error as Error).message).toContain(advice);
    expect((error as Error).message).toContain("not reconnecting");
    expect(link.state).toBe("failed");
    // `done` settled: the connection loop has ended, so no second stream can ever be opened.
    expect(stub.count()).toBe(1);
    expect(logs.some((line) => line.includes("; will not reconnect"))).toBe(true);
  });

  it.each([
    ["SHUTTING_DOWN", RejectCode.SHUTTING_DOWN],
    ["PROTOCOL_ERROR", RejectCode.PROTOCOL_ERROR],
    ["UNSPECIFIED", RejectCode.UNSPECIFIED],
  ])(
    "reconnects with backoff after Reject %s, with a fresh Hello and none of the old jobs",
    async (_name, code) => {
      const { stub, link, logs } = await setup({ engine: { hang: true } });
      const first = await connected(stub, link);
      assign(first, "job-old");
      await first.next("jobAccepted");
      await first.next("jobChunk");
      const finished = once(link, "job-finished");
      const retrying = once(link, "retrying");
      first.send({ case: "reject", value: { code, message: "bye" } });
      const [summary] = await finished;
      expect(summary).toMatchObject({ jobId: "job-old", outcome: "abandoned" });
      await retrying;
      const second = await nextStream(stub);
      expect((await second.next("hello")).workerToken).toBe("wt_test_token");
      const welcomed = once(link, "welcomed");
      second.welcome({ sessionId: "s-2" });
      await welcomed;
      // Nothing about the old job is sent on the new stream.
      second.send({ case: "ping", value: { nonce: 1n } });
      expect((await second.next("heartbeat")).pingNonce).toBe(1n);
      expect(link.runningJobs).toBe(0);
      expect(logs.some((line) => line.includes("; will reconnect"))).toBe(true);
    },
  );

  it("after Drain, stays connected with heartbeats until Reject SHUTTING_DOWN, then reconnects and takes jobs", async () => {
    const { stub, link } = await setup({ engine: { hang: true } });
    const first = await connected(stub, link, { heartbeatIntervalMs: 20 });
    assign(first, "job-running");
    await first.next("jobAccepted");
    await first.next("jobChunk");
    const drained = once(link, "drain");
    first.send({ case: "drain", value: { reason: "server stopping" } });
    await drained;
    // Still connected: heartbeats keep coming and report the running job.
    expect((await first.next("heartbeat")).activeJobs).toBe(1);
    expect((await first.next("heartbeat")).activeJobs).toBe(1);
    expect(link.state).toBe("connected");
    assign(first, "job-new");
    expect(await first.next("jobFailed")).toMatchObject({
      jobId: "job-new",
      code: JobFailureCode.OVERLOADED,
    });
    first.send({ case: "jobCancel", value: { jobId: "job-running" } });
    expect(await first.next("jobDone")).toMatchObject({
      jobId: "job-running",
      finishReason: FinishReason.CANCELLED,
    });
    first.send({ case: "reject", value: { code: RejectCode.SHUTTING_DOWN, message: "stopping" } });
    const second = await connected(stub, link);
    // The new stream is not draining.
    const finished = once(link, "job-finished");
    assign(second, "job-next");
    expect(await second.next("jobAccepted")).toMatchObject({ jobId: "job-next" });
    expect(await second.next("jobChunk")).toMatchObject({ jobId: "job-next", sequence: 1n });
    second.send({ case: "jobCancel", value: { jobId: "job-next" } });
    expect(await second.next("jobDone")).toMatchObject({ jobId: "job-next" });
    expect((await finished)[0]).toMatchObject({ jobId: "job-next", outcome: "done" });
  });

  it("stop() sends Goodbye, lets the running job finish, then closes the stream", async () => {
    const { stub, link } = await setup({ engine: { delayMs: 10 } });
    const stream = await connected(stub, link);
    assign(stream, "job-s");
    await stream.next("jobAccepted");
    const stopped = link.stop("maintenance");
    const goodbye = await stream.next("goodbye");
    expect(goodbye.reason).toBe("maintenance");
    const rest: string[] = [];
    let done: RequestOf<"jobDone"> | undefined;
    while (!done) {
      const message = await stream.nextAny();
      if (message.case === "jobChunk") rest.push(message.value.text);
      else if (message.case === "jobDone") done = message.value;
    }
    expect(done).toMatchObject({ jobId: "job-s", finishReason: FinishReason.STOP, lastSequence: 4n });
    await stream.expectEnd();
    await stopped;
    await link.done;
    expect(link.state).toBe("stopped");
    expect(stub.count()).toBe(1);
  });

  it("stop() cancels jobs still running after the grace period and reports them failed", async () => {
    const { stub, link } = await setup({ engine: { hang: true }, link: { stopGraceMs: 30 } });
    const stream = await connected(stub, link);
    assign(stream, "job-hang");
    await stream.next("jobAccepted");
    await stream.next("jobChunk");
    const stopped = link.stop();
    await stream.next("goodbye");
    const failed = await stream.next("jobFailed");
    expect(failed).toMatchObject({ jobId: "job-hang", code: JobFailureCode.ENGINE_ERROR });
    await stream.expectEnd();
    await stopped;
    expect(link.state).toBe("stopped");
  });

  it("stop() aborts the call when the server does not end it after the half-close", async () => {
    const { stub, link } = await setup({ stub: { endOnClientEnd: false }, link: { closeTimeoutMs: 50 } });
    const stream = await connected(stub, link);
    const stopped = link.stop();
    await stream.next("goodbye");
    await stream.expectEnd();
    await stopped;
    expect(link.state).toBe("stopped");
    expect(stub.count()).toBe(1);
  });

  it("stop() while waiting to reconnect ends the link at once", async () => {
    const stub = await startStub();
    const url = stub.url;
    await stub.close();
    const { link } = await setup({ link: { server: url, backoff: { initialMs: 60_000, maxMs: 60_000 } } });
    await once(link, "retrying");
    await link.stop();
    await link.done;
    expect(link.state).toBe("stopped");
  });
});

// ------------------------------------------------------------------------------------------------

describe("runWorkerCli", () => {
  const cliArgs = (server: string, engineUrl: string) => [
    "--server",
    server,
    "--token",
    "wt_cli",
    "--model",
    "cli-model",
    "--price-in",
    "0.25",
    "--price-out",
    "0.000001",
    "--tps",
    "12",
    "--name",
    "cli-box",
    "--engine",
    "openai",
    "--engine-url",
    engineUrl,
  ];

  it("prints the usage for --help and returns 0", async () => {
    let out = "";
    const code = await runWorkerCli(["--help"], { stdout: (t) => (out += t), env: {} });
    expect(code).toBe(0);
    expect(out).toContain("Usage: locallmarket worker");
    expect(out).toContain("LOCALLMARKET_WORKER_TOKEN");
  });

  it("returns 2 with a clear message for invalid options", async () => {
    let err = "";
    const code = await runWorkerCli(["--model", "m"], { stderr: (t) => (err += t), env: {} });
    expect(code).toBe(2);
    expect(err).toContain("missing --token (LOCALLMARKET_WORKER_TOKEN)");
    expect(err).toContain("--help");
  });

  it("returns 2 for a missing GGUF file", async () => {
    let err = "";
    const argv = [
      ...cliArgs("http://127.0.0.1:1", "http://x/v1").slice(0, -4),
      "--engine",
      "llama-cpp",
      "--model-path",
      "/nonexistent/model.gguf",
    ];
    const code = await runWorkerCli(argv, { stderr: (t) => (err += t), env: {} });
    expect(code).toBe(2);
    expect(err).toContain("no such file: /nonexistent/model.gguf");
  });

  it("connects with offers built from the options and stops cleanly", async () => {
    const stub = await startStub();
    cleanups.push(() => stub.close());
    const fake = await startFakeEngine();
    cleanups.push(() => fake.close());
    let err = "";
    let link: WorkerLink | undefined;
    const exit = runWorkerCli(cliArgs(stub.url, fake.url), {
      stderr: (t) => (err += t),
      env: {},
      handleSignals: false,
      onLink: (l) => {
        link = l;
      },
    });
    const stream = await nextStream(stub);
    const hello = await stream.next("hello");
    expect(hello).toMatchObject({ workerToken: "wt_cli", workerName: "cli-box" });
    expect(hello.offers[0]).toMatchObject({
      model: "cli-model",
      pricePerMillionInput: 250_000n,
      pricePerMillionOutput: 1n,
      advertisedTokensPerSecond: 12,
      maxConcurrency: 1,
      contextLength: 0,
      capabilities: { tools: true, jsonSchema: true, logprobs: true, vision: false, completions: true },
    });
    stream.welcome({ workerId: "w-cli", sessionId: "s-cli" });
    if (!link) throw new Error("onLink was not called");
    if (link.state !== "connected") await once(link, "welcomed");
    void link.stop("test over");
    expect((await stream.next("goodbye")).reason).toBe("test over");
    await stream.expectEnd();
    expect(await exit).toBe(0);
    expect(err).toContain("connected as worker w-cli session s-cli");
    expect(err).toContain('selling model "cli-model"');
  });

  it.skipIf(!existsSync(STORIES))(
    "serves a job with the llama-cpp engine (stories260K)",
    async () => {
      const stub = await startStub();
      cleanups.push(() => stub.close());
      let err = "";
      let link: WorkerLink | undefined;
      const argv = [
        ...cliArgs(stub.url, "http://unused/v1").slice(0, -4),
        "--engine",
        "llama-cpp",
        "--model-path",
        STORIES,
        "--gpu",
        "off",
        "--threads",
        "1",
        "--capabilities",
        "json_schema,logprobs",
      ];
      const exit = runWorkerCli(argv, {
        stderr: (t) => (err += t),
        env: {},
        handleSignals: false,
        onLink: (l) => {
          link = l;
        },
      });
      const stream = await nextStream(stub);
      const hello = await stream.next("hello");
      expect(hello.offers[0]).toMatchObject({
        model: "cli-model",
        contextLength: 2048,
        engine: "llama.cpp",
        capabilities: { tools: false, jsonSchema: true, logprobs: true, vision: false, completions: false },
      });
      stream.welcome();
      stream.send({
        case: "jobAssign",
        value: {
          jobId: "job-llama",
          model: "cli-model",
          messages: [{ role: "user", content: "Once upon a time" }],
          maxTokens: 20,
          sampling: { temperature: 0, stop: [] },
        },
      });
      await stream.next("jobAccepted");
      const texts: string[] = [];
      let done: RequestOf<"jobDone"> | undefined;
      while (!done) {
        const message = await stream.nextAny();
        if (message.case === "jobChunk") {
          expect(message.value.sequence).toBe(BigInt(texts.length + 1));
          expect(message.value.tokenCount).toBe(1);
          texts.push(message.value.text);
        } else if (message.case === "jobDone") done = message.value;
      }
      expect(texts.join("")).toBe(", there was a little girl named Lily. She loved to play outsid");
      expect(done).toMatchObject({ finishReason: FinishReason.LENGTH, lastSequence: 20n });
      expect(done.usage).toMatchObject({ promptTokens: 5, completionTokens: 20 });
      if (!link) throw new Error("onLink was not called");
      void link.stop();
      await stream.next("goodbye");
      await stream.expectEnd();
      expect(await exit).toBe(0);
      expect(err).toContain("no chat template (raw prompt)");
      expect(err).toContain("model loaded on the CPU with 1 thread(s): context 2048 tokens x 1 sequence(s)");
    },
    60_000,
  );

  it("runs as a script (node --import tsx worker/cli.ts) and stops gracefully on SIGTERM", async () => {
    const stub = await startStub();
    cleanups.push(() => stub.close());
    const fake = await startFakeEngine();
    cleanups.push(() => fake.close());
    const root = fileURLToPath(new URL("../../", import.meta.url));
    const child = spawn(
      process.execPath,
      ["--import", "tsx", "worker/cli.ts", ...cliArgs(stub.url, fake.url)],
      {
        cwd: root,
        env: { ...process.env, LOCALLMARKET_WORKER_TOKEN: "" },
        stdio: ["ignore", "pipe", "pipe"],
      },
    );
    let err = "";
    child.stderr.on("data", (data: Buffer) => {
      err += data.toString();
    });
    const exited = once(child, "exit");
    cleanups.push(async () => {
      if (child.exitCode === null) child.kill("SIGKILL");
    });
    const stream = await nextStream(stub);
    expect((await stream.next("hello")).workerToken).toBe("wt_cli");
    stream.welcome({ workerId: "w-proc", sessionId: "s-proc" });
    // The first heartbeat proves the worker processed the Welcome.
    stream.send({ case: "ping", value: { nonce: 99n } });
    expect((await stream.next("heartbeat")).pingNonce).toBe(99n);
    child.kill("SIGTERM");
    expect((await stream.next("goodbye")).reason).toBe("received SIGTERM");
    await stream.expectEnd();
    const [code] = await exited;
    expect(code).toBe(0);
    expect(err).toContain("connected as worker w-proc session s-proc");
    expect(err).toContain("stopped");
  }, 30_000);

  it("exits with 2 as a script when options are missing", async () => {
    const root = fileURLToPath(new URL("../../", import.meta.url));
    const env = { ...process.env };
    for (const key of Object.keys(env)) if (key.startsWith("LOCALLMARKET_")) delete env[key];
    const child = spawn(process.execPath, ["--import", "tsx", "worker/cli.ts", "--model", "m"], {
      cwd: root,
      env,
      stdio: ["ignore", "pipe", "pipe"],
    });
    let err = "";
    child.stderr.on("data", (data: Buffer) => {
      err += data.toString();
    });
    const [code] = await once(child, "exit");
    expect(code).toBe(2);
    expect(err).toContain("missing --token");
  }, 30_000);
});

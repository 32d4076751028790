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
import { FinishReason } from "../../gen/locallmarket/v1/common_pb.js";
import {
  type ConnectRequest,
  ConnectResponseSchema,
  JobFailureCode,
  RejectCode,
  WorkerService,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { AsyncQueue } from "../../worker/async-queue.js";
import { runWorkerCli } from "../../worker/cli.js";
import type { Engine } from "../../worker/engines/engine.js";
import { OpenAiEngine } from "../../worker/engines/openai-engine.js";
import {
  AGENT_VERSION,
  PROTOCOL_VERSION,
  WorkerLink,
  type WorkerLinkOptions,
  WorkerRejectedError,
} from "../../worker/link-client.js";
import { type FakeEngine, type FakeEngineOptions, startFakeEngine } from "../support/fake-engine.js";
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
    overrides: Partial<{ workerId: string; sessionId: string; heartbeatIntervalMs: number }> = {},
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
async function connected(stub: Stub, link: WorkerLink, heartbeatIntervalMs = 60_000): Promise<StubStream> {
  const stream = await nextStream(stub);
  await stream.next("hello");
  const welcomed = once(link, "welcomed");
  stream.welcome({ heartbeatIntervalMs });
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
    const stream = await connected(stub, link, 20);
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

  it("does not reconnect after Reject BANNED", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link);
    stream.send({ case: "reject", value: { code: RejectCode.BANNED, message: "banned" } });
    await expect(link.done).rejects.toBeInstanceOf(WorkerRejectedError);
    expect(stub.count()).toBe(1);
  });

  it("reconnects after Reject SHUTTING_DOWN", async () => {
    const { stub, link } = await setup();
    const stream = await connected(stub, link);
    stream.send({ case: "reject", value: { code: RejectCode.SHUTTING_DOWN, message: "restart" } });
    const second = await nextStream(stub);
    expect((await second.next("hello")).workerToken).toBe("wt_test_token");
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
      expect(hello.offers[0]).toMatchObject({ model: "cli-model", contextLength: 2048, engine: "llama.cpp" });
      stream.welcome();
      stream.send({
        case: "jobAssign",
        value: {
          jobId: "job-llama",
          model: "cli-model",
          messages: [{ role: "user", content: "Once upon a time" }],
          maxTokens: 20,
          audit: true,
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

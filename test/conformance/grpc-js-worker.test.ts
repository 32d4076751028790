/**
 * Conformance: a worker written the way a Go or Python implementer would write one, from the
 * .proto files alone. It uses @grpc/grpc-js with @grpc/proto-loader loading proto/ at run time
 * and shares no code with the server or our worker agent; only the test's orchestration (creating
 * accounts, starting the control plane) uses the project's helpers.
 */
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REPO_ROOT, startTestMarket, type TestMarket } from "../support/market.js";

interface WireMessage {
  message?: string;
  [field: string]: unknown;
}

/** A bidi stream as an async queue of incoming messages, the way a hand-written worker reads it. */
function inbox(call: grpc.ClientDuplexStream<WireMessage, WireMessage>) {
  const queued: WireMessage[] = [];
  const waiting: ((message: WireMessage) => void)[] = [];
  call.on("data", (message: WireMessage) => {
    const next = waiting.shift();
    if (next) next(message);
    else queued.push(message);
  });
  return {
    next(): Promise<WireMessage> {
      const message = queued.shift();
      if (message) return Promise.resolve(message);
      return new Promise((resolve) => waiting.push(resolve));
    },
  };
}

type WorkerCall = grpc.ClientDuplexStream<WireMessage, WireMessage>;

/**
 * Sends a job's chunks under the flow control the .proto describes: chunk N only while
 * N <= acknowledged + Welcome.job_window_chunks. While the window is full it reads the stream for
 * JobWindow (answering Ping meanwhile). Returns the acknowledgements received, in order.
 */
async function sendChunks(
  call: WorkerCall,
  incoming: ReturnType<typeof inbox>,
  jobId: string,
  chunks: (string | Record<string, unknown>)[],
  windowChunks: number,
): Promise<bigint[]> {
  const acknowledgements: bigint[] = [];
  let acknowledged = 0n;
  for (const [index, chunk] of chunks.entries()) {
    const sequence = BigInt(index + 1);
    while (sequence > acknowledged + BigInt(windowChunks)) {
      const message = await incoming.next();
      if (message.message === "ping") {
        call.write({ heartbeat: { pingNonce: (message.ping as { nonce: string }).nonce } });
        continue;
      }
      if (message.message !== "jobWindow") throw new Error(`unexpected ${message.message} while waiting`);
      const window = message.jobWindow as { jobId: string; acknowledgedSequence: string };
      if (window.jobId !== jobId) continue;
      const value = BigInt(window.acknowledgedSequence);
      acknowledgements.push(value);
      if (value > acknowledged) acknowledged = value;
    }
    // A string is a chunk of text; an object gives the chunk's other fields too (tool_calls, logprobs).
    const fields = typeof chunk === "string" ? { text: chunk } : chunk;
    call.write({ jobChunk: { jobId, sequence: String(sequence), tokenCount: 1, ...fields } });
  }
  return acknowledgements;
}

/** Opens the stream, sends Hello with one offer (declaring `capabilities`) and returns the Welcome. */
async function register(
  client: grpc.Client,
  workerToken: string,
  model: string,
  capabilities: Record<string, boolean> = {},
) {
  const call = (client as unknown as { connect(): WorkerCall }).connect();
  const incoming = inbox(call);
  call.write({
    hello: {
      workerToken,
      agentVersion: "conformance-worker/1.0",
      workerName: "grpc-js",
      protocolVersion: 1,
      offers: [
        {
          model,
          pricePerMillionInput: "1000000",
          pricePerMillionOutput: "2000000",
          advertisedTokensPerSecond: 25,
          maxConcurrency: 0,
          contextLength: 2048,
          quantization: "F32",
          engine: "hand-written",
          capabilities,
        },
      ],
    },
  });
  const welcome = await incoming.next();
  return { call, incoming, welcome };
}

async function hangUp(call: WorkerCall): Promise<void> {
  const ended = new Promise((resolve) => call.on("error", resolve).on("end", resolve));
  call.end();
  call.cancel();
  await ended;
}

function loadWorkerService() {
  const definition = protoLoader.loadSync(join(REPO_ROOT, "proto/locallmarket/v1/worker.proto"), {
    includeDirs: [join(REPO_ROOT, "proto")],
    oneofs: true,
    longs: String,
    enums: String,
    defaults: true,
  });
  const loaded = grpc.loadPackageDefinition(definition) as unknown as {
    locallmarket: { v1: { WorkerService: grpc.ServiceClientConstructor } };
  };
  return loaded.locallmarket.v1.WorkerService;
}

describe("a grpc-js worker built from the .proto files alone", () => {
  let market: TestMarket;
  let client: grpc.Client;

  beforeAll(async () => {
    market = await startTestMarket();
    const WorkerService = loadWorkerService();
    client = new WorkerService(new URL(market.plane.grpcUrl).host, grpc.credentials.createInsecure(), {
      "grpc.keepalive_time_ms": 30_000,
      "grpc.keepalive_timeout_ms": 15_000,
    });
  });

  afterAll(async () => {
    client?.close();
    await market?.close();
  });

  it("registers, receives a job, streams chunks, and the consumer gets them", async () => {
    const provider = await market.account("go-provider");
    const consumer = await market.account("consumer", 50);
    const { workerToken, workerId } = await market.admin.createWorkerToken({ accountId: provider.accountId });

    const { call, incoming, welcome } = await register(client, workerToken, "conformance-model");
    expect(welcome.message).toBe("welcome");
    const welcomed = welcome.welcome as {
      workerId: string;
      heartbeatIntervalMs: number;
      acceptedOffers: unknown[];
      jobWindowChunks: number;
    };
    expect(welcomed.workerId).toBe(workerId);
    expect(welcomed.heartbeatIntervalMs).toBeGreaterThan(0);
    expect(welcomed.jobWindowChunks).toBeGreaterThanOrEqual(1);
    expect(welcomed.acceptedOffers).toMatchObject([
      { model: "conformance-model", pricePerMillionOutput: "2000000", maxConcurrency: 1 },
    ]);
    call.write({ heartbeat: { activeJobs: 0, queuedJobs: 0 } });

    const completion = market.openai(consumer.apiKey).chat.completions.create({
      model: "conformance-model",
      messages: [{ role: "user", content: "Count to three" }],
      max_tokens: 10,
      stream: true,
      stream_options: { include_usage: true },
    });

    const assigned = await incoming.next();
    expect(assigned.message).toBe("jobAssign");
    const job = assigned.jobAssign as {
      jobId: string;
      model: string;
      maxTokens: number;
      messages: unknown[];
    };
    expect(job.model).toBe("conformance-model");
    expect(job.maxTokens).toBe(10);
    expect(job.messages).toEqual([
      { role: "user", content: "Count to three", name: "", toolCalls: [], toolCallId: "", imageUrls: [] },
    ]);

    call.write({ jobAccepted: { jobId: job.jobId } });
    const pieces = ["One", ", two", ", three", "."];
    await sendChunks(call, incoming, job.jobId, pieces, welcomed.jobWindowChunks);
    call.write({
      jobDone: {
        jobId: job.jobId,
        finishReason: "FINISH_REASON_STOP",
        usage: { promptTokens: 7, completionTokens: pieces.length },
        lastSequence: String(pieces.length),
      },
    });

    let text = "";
    let usage: { prompt_tokens: number; completion_tokens: number } | undefined;
    for await (const chunk of await completion) {
      text += chunk.choices[0]?.delta.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe("One, two, three.");
    expect(usage).toMatchObject({ prompt_tokens: 7, completion_tokens: 4 });

    // 7 × 1 credit/1M + 4 × 2 credits/1M = 15 µc; the provider earns it minus the 5 % fee (rounded
    // down), pending until the settlement delay has passed.
    expect(await market.balance(provider.accountId)).toMatchObject({
      available: 0n,
      pending: 15n - (15n * 500n) / 10_000n,
    });

    await hangUp(call);
  });

  it("streams more chunks than one window: JobWindow acknowledgements let it go on, the consumer gets every chunk", async () => {
    const provider = await market.account("windowed-provider");
    const consumer = await market.account("windowed-consumer", 50);
    const { workerToken } = await market.admin.createWorkerToken({ accountId: provider.accountId });
    const { call, incoming, welcome } = await register(client, workerToken, "windowed-model");
    expect(welcome.message).toBe("welcome");
    const windowChunks = (welcome.welcome as { jobWindowChunks: number }).jobWindowChunks;
    expect(windowChunks).toBeGreaterThanOrEqual(1);
    const pieces = Array.from({ length: 2 * windowChunks + 7 }, (_, i) => `w${i} `);

    const completion = market.openai(consumer.apiKey).chat.completions.create({
      model: "windowed-model",
      messages: [{ role: "user", content: "Count" }],
      max_tokens: pieces.length,
      stream: true,
      stream_options: { include_usage: true },
    });
    // The consumer reads while the worker streams: its reading is what opens the window.
    const received = (async () => {
      let text = "";
      let usage: { completion_tokens: number } | undefined;
      for await (const chunk of await completion) {
        text += chunk.choices[0]?.delta.content ?? "";
        if (chunk.usage) usage = chunk.usage;
      }
      return { text, usage };
    })();

    const assigned = await incoming.next();
    expect(assigned.message).toBe("jobAssign");
    const { jobId } = assigned.jobAssign as { jobId: string };
    call.write({ jobAccepted: { jobId } });
    const acknowledgements = await sendChunks(call, incoming, jobId, pieces, windowChunks);
    call.write({
      jobDone: {
        jobId,
        finishReason: "FINISH_REASON_STOP",
        usage: { promptTokens: 3, completionTokens: pieces.length },
        lastSequence: String(pieces.length),
      },
    });

    const { text, usage } = await received;
    expect(text).toBe(pieces.join(""));
    expect(usage).toMatchObject({ completion_tokens: pieces.length });
    // Two windows were passed, so at least two acknowledgements came, growing, never beyond what was sent.
    expect(acknowledgements.length).toBeGreaterThanOrEqual(2);
    for (const [index, value] of acknowledgements.entries()) {
      expect(value).toBeGreaterThan(index === 0 ? 0n : (acknowledgements[index - 1] as bigint));
      expect(value).toBeLessThanOrEqual(BigInt(pieces.length));
    }

    await hangUp(call);
  });

  it("streams a tool call in fragments over several chunks; the openai SDK assembles it and it is billed", async () => {
    const provider = await market.account("tools-provider");
    const consumer = await market.account("tools-consumer", 50);
    const { workerToken } = await market.admin.createWorkerToken({ accountId: provider.accountId });
    const { call, incoming, welcome } = await register(client, workerToken, "tools-model", { tools: true });
    expect(welcome.message).toBe("welcome");
    const windowChunks = (welcome.welcome as { jobWindowChunks: number }).jobWindowChunks;
    const parameters = { type: "object", properties: { city: { type: "string" } }, required: ["city"] };

    const stream = market.openai(consumer.apiKey).chat.completions.stream({
      model: "tools-model",
      messages: [{ role: "user", content: "Weather in Oslo?" }],
      tools: [
        { type: "function", function: { name: "get_weather", description: "Weather in a city", parameters } },
      ],
      tool_choice: "required",
      stream_options: { include_usage: true },
    });
    const toolCallDeltas: unknown[] = [];
    stream.on("chunk", (chunk) => {
      const calls = chunk.choices[0]?.delta.tool_calls;
      if (calls) toolCallDeltas.push(...calls);
    });

    const assigned = await incoming.next();
    expect(assigned.message).toBe("jobAssign");
    const job = assigned.jobAssign as {
      jobId: string;
      tools: { name: string; description: string; parametersJson: string; strict: boolean }[];
      toolChoice: { mode: string; functionName: string } | null;
    };
    expect(job.tools).toHaveLength(1);
    expect(job.tools[0]).toMatchObject({
      name: "get_weather",
      description: "Weather in a city",
      strict: false,
    });
    expect(JSON.parse(job.tools[0]?.parametersJson ?? "")).toEqual(parameters);
    expect(job.toolChoice).toMatchObject({ mode: "required" });

    call.write({ jobAccepted: { jobId: job.jobId } });
    const chunks = [
      { toolCalls: [{ index: 0, id: "call_w", name: "get_weather", arguments: "" }] },
      { toolCalls: [{ index: 0, arguments: '{"city":' }] },
      { toolCalls: [{ index: 0, arguments: '"Oslo"}' }] },
    ];
    await sendChunks(call, incoming, job.jobId, chunks, windowChunks);
    call.write({
      jobDone: {
        jobId: job.jobId,
        finishReason: "FINISH_REASON_TOOL_CALLS",
        usage: { promptTokens: 7, completionTokens: chunks.length },
        lastSequence: String(chunks.length),
      },
    });

    const completion = await stream.finalChatCompletion();
    expect(completion.choices[0]?.finish_reason).toBe("tool_calls");
    expect(completion.choices[0]?.message.tool_calls).toEqual([
      { id: "call_w", type: "function", function: { name: "get_weather", arguments: '{"city":"Oslo"}' } },
    ]);
    // The fragments arrived as the worker sent them, over several chunks.
    expect(toolCallDeltas).toMatchObject([
      { index: 0, id: "call_w", function: { name: "get_weather", arguments: "" } },
      { index: 0, function: { arguments: '{"city":' } },
      { index: 0, function: { arguments: '"Oslo"}' } },
    ]);
    expect(completion.usage).toMatchObject({ prompt_tokens: 7, completion_tokens: 3 });
    // 7 × 1 credit/1M + 3 × 2 credits/1M = 13 µc; the 5 % fee rounds down to 0.
    expect(await market.balance(provider.accountId)).toMatchObject({ available: 0n, pending: 13n });

    await hangUp(call);
  });

  it("receives a JSON schema, a tool-call history and a raw prompt exactly as the consumer sent them", async () => {
    const provider = await market.account("formats-provider");
    const consumer = await market.account("formats-consumer", 50);
    const { workerToken } = await market.admin.createWorkerToken({ accountId: provider.accountId });
    const { call, incoming, welcome } = await register(client, workerToken, "formats-model", {
      tools: true,
      jsonSchema: true,
      completions: true,
    });
    expect(welcome.message).toBe("welcome");
    const windowChunks = (welcome.welcome as { jobWindowChunks: number }).jobWindowChunks;
    const openai = market.openai(consumer.apiKey);
    const schema = { type: "object", properties: { answer: { type: "string" } }, required: ["answer"] };
    const serve = async (text: string) => {
      let assigned = await incoming.next();
      // The previous job's last acknowledgement may come first.
      while (assigned.message === "jobWindow") assigned = await incoming.next();
      expect(assigned.message).toBe("jobAssign");
      const job = assigned.jobAssign as Record<string, unknown> & { jobId: string };
      call.write({ jobAccepted: { jobId: job.jobId } });
      await sendChunks(call, incoming, job.jobId, [text], windowChunks);
      call.write({
        jobDone: {
          jobId: job.jobId,
          finishReason: "FINISH_REASON_STOP",
          usage: { promptTokens: 3, completionTokens: 1 },
          lastSequence: "1",
        },
      });
      return job;
    };

    const structured = openai.chat.completions.create({
      model: "formats-model",
      messages: [
        { role: "user", content: "Weather in Oslo?" },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function",
              function: { name: "get_weather", arguments: '{"city":"Oslo"}' },
            },
          ],
        },
        { role: "tool", tool_call_id: "call_1", content: "sunny" },
      ],
      response_format: { type: "json_schema", json_schema: { name: "reply", schema, strict: true } },
    });
    const job = await serve('{"answer":"sunny"}');
    expect(job.responseFormat).toMatchObject({ type: "TYPE_JSON_SCHEMA", name: "reply", strict: true });
    expect(JSON.parse((job.responseFormat as { schemaJson: string }).schemaJson)).toEqual(schema);
    expect(job.messages).toMatchObject([
      { role: "user", content: "Weather in Oslo?" },
      { role: "assistant", toolCalls: [{ id: "call_1", name: "get_weather", arguments: '{"city":"Oslo"}' }] },
      { role: "tool", toolCallId: "call_1", content: "sunny" },
    ]);
    expect((await structured).choices[0]?.message.content).toBe('{"answer":"sunny"}');

    const legacy = openai.completions.create({
      model: "formats-model",
      prompt: "Once upon a",
      max_tokens: 5,
    });
    const rawJob = await serve(" time");
    expect(rawJob).toMatchObject({ prompt: "Once upon a", messages: [], maxTokens: 5 });
    expect((await legacy).choices[0]?.text).toBe(" time");

    await hangUp(call);
  });

  it("sends logprobs with each chunk's tokens; the openai SDK receives them exactly", async () => {
    const provider = await market.account("logprobs-provider");
    const consumer = await market.account("logprobs-consumer", 50);
    const { workerToken } = await market.admin.createWorkerToken({ accountId: provider.accountId });
    const { call, incoming, welcome } = await register(client, workerToken, "logprobs-model", {
      logprobs: true,
    });
    expect(welcome.message).toBe("welcome");
    const windowChunks = (welcome.welcome as { jobWindowChunks: number }).jobWindowChunks;

    const completion = market.openai(consumer.apiKey).chat.completions.create({
      model: "logprobs-model",
      messages: [{ role: "user", content: "Yes or no?" }],
      logprobs: true,
      top_logprobs: 2,
      stream: true,
    });

    const assigned = await incoming.next();
    expect(assigned.message).toBe("jobAssign");
    const job = assigned.jobAssign as { jobId: string; wantLogprobs: boolean; topLogprobs: number };
    expect(job).toMatchObject({ wantLogprobs: true, topLogprobs: 2 });

    call.write({ jobAccepted: { jobId: job.jobId } });
    const tokens = [
      {
        token: "Yes",
        logprob: -0.25,
        topLogprobs: [
          { token: "Yes", logprob: -0.25 },
          { token: "No", logprob: -1.5 },
        ],
      },
      {
        token: ".",
        logprob: -0.125,
        topLogprobs: [
          { token: ".", logprob: -0.125 },
          { token: "!", logprob: -2.5 },
        ],
      },
    ];
    const chunks = tokens.map((entry) => ({ text: entry.token, logprobs: [entry] }));
    await sendChunks(call, incoming, job.jobId, chunks, windowChunks);
    call.write({
      jobDone: {
        jobId: job.jobId,
        finishReason: "FINISH_REASON_STOP",
        usage: { promptTokens: 5, completionTokens: chunks.length },
        lastSequence: String(chunks.length),
      },
    });

    let text = "";
    const received: unknown[] = [];
    for await (const chunk of await completion) {
      text += chunk.choices[0]?.delta.content ?? "";
      received.push(...(chunk.choices[0]?.logprobs?.content ?? []));
    }
    expect(text).toBe("Yes.");
    expect(received).toMatchObject(
      tokens.map((entry) => ({
        token: entry.token,
        logprob: entry.logprob,
        top_logprobs: entry.topLogprobs.map(({ token, logprob }) => ({ token, logprob })),
      })),
    );

    await hangUp(call);
  });

  it.each([
    ["a first message that is not Hello", () => Promise.resolve({ heartbeat: { activeJobs: 0 } })],
    [
      "a Hello without offers",
      async () => {
        const provider = await market.account("offerless-provider");
        const { workerToken } = await market.admin.createWorkerToken({ accountId: provider.accountId });
        return { hello: { workerToken, offers: [] } };
      },
    ],
  ])("is rejected with INVALID_HELLO, then INVALID_ARGUMENT, for %s", async (_case, firstMessage) => {
    const first = await firstMessage();
    const call = (client as unknown as { connect(): WorkerCall }).connect();
    const incoming = inbox(call);
    const status = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
    call.write(first);
    const reject = await incoming.next();
    expect(reject.message).toBe("reject");
    expect((reject.reject as { code: string }).code).toBe("REJECT_CODE_INVALID_HELLO");
    expect((await status).code).toBe(grpc.status.INVALID_ARGUMENT);
  });

  it("ends a stream whose message exceeds 16 MiB with RESOURCE_EXHAUSTED", async () => {
    const call = (client as unknown as { connect(): WorkerCall }).connect();
    const status = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
    call.on("data", () => {});
    call.write({
      hello: { workerToken: "wt-llm-x", workerName: "x".repeat(16 * 1024 * 1024 + 1), offers: [] },
    });
    expect((await status).code).toBe(grpc.status.RESOURCE_EXHAUSTED);
  });

  it("is rejected with UNAUTHENTICATED and a Reject message for an unknown token", async () => {
    const call = (client as unknown as { connect(): WorkerCall }).connect();
    const incoming = inbox(call);
    const status = new Promise<grpc.ServiceError>((resolve) => call.on("error", resolve));
    call.write({ hello: { workerToken: "wt-llm-forged", offers: [{ model: "m", maxConcurrency: 1 }] } });
    const reject = await incoming.next();
    expect(reject.message).toBe("reject");
    expect((reject.reject as { code: string }).code).toBe("REJECT_CODE_UNAUTHENTICATED");
    expect((await status).code).toBe(grpc.status.UNAUTHENTICATED);
  });
});

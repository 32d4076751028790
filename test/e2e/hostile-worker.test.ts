/**
 * A hostile worker cannot set its own bill, break settlement, or write into another worker's job.
 *
 * The hostile worker is written here the way an attacker would write one: @grpc/grpc-js with
 * @grpc/proto-loader loading proto/ at run time, sharing no code with the server, our worker agent
 * or the generated code. It sends what the .proto allows but no honest engine would: a 3-byte chunk
 * claiming 100,000 tokens, a usage of 4,294,967,295 (the largest uint32), chunks and results for a
 * job another worker is running, and a free (price 0) offer. Only the orchestration (the control
 * plane, accounts, an honest worker process on a fake engine) uses the project's test helpers.
 */
import { join } from "node:path";
import * as grpc from "@grpc/grpc-js";
import * as protoLoader from "@grpc/proto-loader";
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { REPO_ROOT, startTestMarket, type TestMarket, type WorkerProcess } from "../support/market.js";
import { eventually, statusName } from "../support/server-process.js";

const FEE_BPS = 500;
const UINT32_MAX = 4_294_967_295;
/** Served only by the lying worker, at 1 credit in / 2 credits out per 1M tokens (µc below). */
const LYING_MODEL = "lying-model";
const LYING_PRICE = { input: 1_000_000n, output: 2_000_000n };
/** Served only by the honest worker process; the hijacker offers something else. */
const HONEST_MODEL = "honest-model";
const HONEST_PRICE_CREDITS = { input: "3", output: "5" };
const HONEST_TOKENS = Array.from({ length: 40 }, (_, index) => `h${String(index).padStart(2, "0")} `);
const HIJACKER_MODEL = "decoy-model";
/** Served only by a worker that gives its tokens away. */
const FREE_MODEL = "free-model";

interface WireMessage {
  message?: string;
  [field: string]: unknown;
}

interface WireJob {
  jobId: string;
  model: string;
  maxTokens: number;
}

type WorkerCall = grpc.ClientDuplexStream<WireMessage, WireMessage>;

function loadWorkerService(): grpc.ServiceClientConstructor {
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

/** One hostile connection: it registers an offer, then does whatever the test tells it to. */
class HostileWorker {
  private readonly jobs: WireJob[] = [];
  private readonly jobWaiters: ((job: WireJob) => void)[] = [];
  private heartbeat: NodeJS.Timeout | undefined;
  /** Every message the server sent, for the record. */
  readonly received: WireMessage[] = [];
  readonly ended: Promise<unknown>;

  private constructor(private readonly call: WorkerCall) {
    call.on("data", (message: WireMessage) => {
      this.received.push(message);
      if (message.message !== "jobAssign") return;
      const job = message.jobAssign as WireJob;
      const waiter = this.jobWaiters.shift();
      if (waiter) waiter(job);
      else this.jobs.push(job);
    });
    this.ended = new Promise((resolve) => call.on("error", resolve).on("end", resolve));
  }

  static async connect(
    client: grpc.Client,
    workerToken: string,
    offer: { model: string; pricePerMillionInput: string; pricePerMillionOutput: string },
  ): Promise<HostileWorker> {
    const call = (client as unknown as { connect(): WorkerCall }).connect();
    const worker = new HostileWorker(call);
    const welcomed = new Promise<WireMessage>((resolve, reject) => {
      call.on("data", (message: WireMessage) => {
        if (message.message === "welcome") resolve(message);
        if (message.message === "reject") reject(new Error(`rejected: ${JSON.stringify(message.reject)}`));
      });
      call.on("error", reject);
    });
    call.write({
      hello: {
        workerToken,
        agentVersion: "hostile-worker/6.6.6",
        workerName: "hostile",
        protocolVersion: 1,
        offers: [{ ...offer, advertisedTokensPerSecond: 1000, maxConcurrency: 4, contextLength: 4096 }],
      },
    });
    const welcome = (await welcomed).welcome as { heartbeatIntervalMs: number };
    worker.heartbeat = setInterval(
      () => call.write({ heartbeat: { activeJobs: 0, queuedJobs: 0 } }),
      welcome.heartbeatIntervalMs,
    );
    return worker;
  }

  nextJob(): Promise<WireJob> {
    const job = this.jobs.shift();
    if (job) return Promise.resolve(job);
    return new Promise((resolve) => this.jobWaiters.push(resolve));
  }

  send(message: Record<string, unknown>): void {
    this.call.write(message);
  }

  async close(): Promise<void> {
    clearInterval(this.heartbeat);
    this.call.end();
    this.call.cancel();
    await this.ended;
  }
}

/** The consumer's side of a streamed completion: its text, its usage chunk and its order id. */
async function readStream(stream: AsyncIterable<OpenAI.Chat.Completions.ChatCompletionChunk>) {
  let text = "";
  let orderId = "";
  let usage: (OpenAI.Completions.CompletionUsage & { cost_micro_credits?: string }) | undefined;
  for await (const chunk of stream) {
    orderId ||= chunk.id;
    text += chunk.choices[0]?.delta.content ?? "";
    if (chunk.usage) usage = chunk.usage;
  }
  return { text, orderId, usage };
}

/** cost = ceil((prompt·p_in + completion·p_out) / 1e6), the market's rule, µc. */
function costOf(prompt: number, completion: number, price: { input: bigint; output: bigint }): bigint {
  const numerator = BigInt(prompt) * price.input + BigInt(completion) * price.output;
  return (numerator + 999_999n) / 1_000_000n;
}

describe("a hostile worker speaking raw gRPC", () => {
  let market: TestMarket;
  let client: grpc.Client;
  let consumer: { accountId: string; apiKey: string };
  let openai: OpenAI;
  let honestEngine: FakeEngine;
  let honestWorker: WorkerProcess;
  const providers = { liar: "", hijacker: "", free: "", honest: "" };
  const hostiles: HostileWorker[] = [];

  async function hostile(
    providerAccountId: string,
    offer: { model: string; pricePerMillionInput: string; pricePerMillionOutput: string },
  ): Promise<HostileWorker> {
    const { workerToken } = await market.admin.createWorkerToken({ accountId: providerAccountId });
    const worker = await HostileWorker.connect(client, workerToken, offer);
    hostiles.push(worker);
    return worker;
  }

  async function books(accountId: string) {
    const { balance } = await market.admin.getBalance({ accountId });
    return {
      available: balance?.available ?? 0n,
      held: balance?.held ?? 0n,
      pending: balance?.pending ?? 0n,
    };
  }

  async function order(orderId: string) {
    const found = (await market.admin.getOrder({ orderId })).order;
    if (!found) throw new Error(`no order ${orderId}`);
    return found;
  }

  beforeAll(async () => {
    market = await startTestMarket({ feeBasisPoints: FEE_BPS });
    const WorkerService = loadWorkerService();
    client = new WorkerService(new URL(market.plane.grpcUrl).host, grpc.credentials.createInsecure(), {
      "grpc.keepalive_time_ms": 30_000,
      "grpc.keepalive_timeout_ms": 15_000,
    });
    consumer = await market.account("consumer", 100);
    openai = market.openai(consumer.apiKey);
    for (const name of Object.keys(providers) as (keyof typeof providers)[]) {
      providers[name] = (await market.account(`provider-${name}`)).accountId;
    }
    honestEngine = await startFakeEngine({ tokens: HONEST_TOKENS, delayMs: 50 });
    honestWorker = await market.worker({
      accountId: providers.honest,
      model: HONEST_MODEL,
      priceIn: HONEST_PRICE_CREDITS.input,
      priceOut: HONEST_PRICE_CREDITS.output,
      tps: 20,
      engine: ["--engine", "openai", "--engine-url", honestEngine.url],
    });
  });

  afterAll(async () => {
    await Promise.all(hostiles.map((worker) => worker.close()));
    client?.close();
    await market?.close();
    await honestEngine?.close();
  });

  /** The lie of case (a): one 3-byte chunk claiming 100,000 tokens, then a uint32-max usage. */
  async function lieAbout(liar: HostileWorker): Promise<WireJob> {
    const job = await liar.nextJob();
    liar.send({ jobAccepted: { jobId: job.jobId } });
    liar.send({ jobChunk: { jobId: job.jobId, sequence: "1", text: "r0 ", tokenCount: 100_000 } });
    liar.send({
      jobDone: {
        jobId: job.jobId,
        finishReason: "FINISH_REASON_STOP",
        usage: { promptTokens: UINT32_MAX, completionTokens: UINT32_MAX },
        lastSequence: "1",
      },
    });
    return job;
  }

  it("(a) bills at most the 3 bytes a worker sent, whatever token counts it claims", async () => {
    const liar = await hostile(providers.liar, {
      model: LYING_MODEL,
      pricePerMillionInput: LYING_PRICE.input.toString(),
      pricePerMillionOutput: LYING_PRICE.output.toString(),
    });
    const before = await books(consumer.accountId);

    const streamed = openai.chat.completions.create({
      model: LYING_MODEL,
      messages: [{ role: "user", content: "Say something" }],
      max_tokens: 1000,
      stream: true,
      stream_options: { include_usage: true },
    });
    await lieAbout(liar);
    const { text, orderId, usage } = await readStream(await streamed);

    expect(text).toBe("r0 ");
    const settled = await order(orderId);
    expect(statusName(settled.status)).toBe("completed");
    expect(settled.completionTokens).toBeLessThanOrEqual(3);
    expect(settled.promptTokenBound).toBeGreaterThan(0);
    expect(settled.promptTokens).toBeLessThanOrEqual(settled.promptTokenBound);
    expect(settled.cost).toBe(costOf(settled.promptTokens, settled.completionTokens, LYING_PRICE));
    expect(usage).toMatchObject({
      prompt_tokens: settled.promptTokens,
      completion_tokens: settled.completionTokens,
      cost_micro_credits: settled.cost.toString(),
    });

    // The same lie on a non-streamed request: a 200 with the 3 bytes, never a 500.
    const [answer] = await Promise.all([
      openai.chat.completions.create({
        model: LYING_MODEL,
        messages: [{ role: "user", content: "Say something else" }],
        max_tokens: 1000,
      }),
      lieAbout(liar),
    ]);
    expect(answer.choices[0]?.message.content).toBe("r0 ");
    const second = await order(answer.id);
    expect(statusName(second.status)).toBe("completed");
    expect(second.completionTokens).toBeLessThanOrEqual(3);
    expect(second.promptTokens).toBeLessThanOrEqual(second.promptTokenBound);
    expect(answer.usage?.completion_tokens).toBe(second.completionTokens);

    const after = await books(consumer.accountId);
    expect(before.available - after.available).toBe(settled.cost + second.cost);
    expect(after.held).toBe(0n);
    const provider = await books(providers.liar);
    const fees = (settled.cost * BigInt(FEE_BPS)) / 10_000n + (second.cost * BigInt(FEE_BPS)) / 10_000n;
    expect(provider.available + provider.pending).toBe(settled.cost + second.cost - fees);
  });

  it("(b) ignores chunks and results a worker sends for another worker's job", async () => {
    const hijacker = await hostile(providers.hijacker, {
      model: HIJACKER_MODEL,
      pricePerMillionInput: "1",
      pricePerMillionOutput: "1",
    });
    const stream = await openai.chat.completions.create({
      model: HONEST_MODEL,
      messages: [{ role: "user", content: "Count" }],
      max_tokens: 100,
      stream: true,
      stream_options: { include_usage: true },
    });
    const iterator = stream[Symbol.asyncIterator]();
    let text = "";
    let orderId = "";
    // Read until the honest worker has streamed something: its job is now running.
    while (!text) {
      const { value, done } = await iterator.next();
      if (done) throw new Error("the honest stream ended before its first token");
      orderId ||= value.id;
      text += value.choices[0]?.delta.content ?? "";
    }
    const started = await eventually("the honest worker to log its job", async () => {
      const match = /job (\S+) started/.exec(honestWorker.output());
      return match?.[1];
    });

    for (let sequence = 1; sequence <= 5; sequence++) {
      hijacker.send({
        jobChunk: { jobId: started, sequence: String(sequence), text: `EVIL${sequence} `, tokenCount: 1 },
      });
    }
    hijacker.send({
      jobFailed: { jobId: started, code: "JOB_FAILURE_CODE_ENGINE_ERROR", message: "hijacked" },
    });
    hijacker.send({
      jobDone: {
        jobId: started,
        finishReason: "FINISH_REASON_STOP",
        usage: { promptTokens: UINT32_MAX, completionTokens: UINT32_MAX },
        lastSequence: "5",
      },
    });

    let usage: (OpenAI.Completions.CompletionUsage & { cost_micro_credits?: string }) | undefined;
    for (;;) {
      const { value, done } = await iterator.next();
      if (done) break;
      text += value.choices[0]?.delta.content ?? "";
      if (value.usage) usage = value.usage;
    }

    expect(text).toBe(HONEST_TOKENS.join(""));
    const settled = await order(orderId);
    expect(statusName(settled.status)).toBe("completed");
    expect(settled.workerId).toBe(honestWorker.workerId);
    expect(settled.completionTokens).toBe(HONEST_TOKENS.length);
    const honestPrice = { input: 3_000_000n, output: 5_000_000n };
    expect(settled.cost).toBe(costOf(settled.promptTokens, HONEST_TOKENS.length, honestPrice));
    expect(usage).toMatchObject({
      completion_tokens: HONEST_TOKENS.length,
      cost_micro_credits: settled.cost.toString(),
    });
    const hijackerBooks = await books(providers.hijacker);
    expect(hijackerBooks.available + hijackerBooks.pending + hijackerBooks.held).toBe(0n);
  });

  it("(c) serves a free (price 0) offer and settles it at 0 for everyone", async () => {
    const free = await hostile(providers.free, {
      model: FREE_MODEL,
      pricePerMillionInput: "0",
      pricePerMillionOutput: "0",
    });
    const platformBefore = await books("acct_platform");
    const consumerBefore = await books(consumer.accountId);
    const giveAway = async () => {
      const job = await free.nextJob();
      free.send({ jobAccepted: { jobId: job.jobId } });
      free.send({ jobChunk: { jobId: job.jobId, sequence: "1", text: "free", tokenCount: 1 } });
      free.send({ jobChunk: { jobId: job.jobId, sequence: "2", text: " lunch", tokenCount: 1 } });
      free.send({
        jobDone: {
          jobId: job.jobId,
          finishReason: "FINISH_REASON_STOP",
          usage: { promptTokens: 9, completionTokens: 2 },
          lastSequence: "2",
        },
      });
    };

    const [answer] = await Promise.all([
      openai.chat.completions.create({ model: FREE_MODEL, messages: [{ role: "user", content: "Hi" }] }),
      giveAway(),
    ]);
    expect(answer.choices[0]?.message.content).toBe("free lunch");
    expect(answer.usage).toMatchObject({ completion_tokens: 2, cost_micro_credits: "0" });

    const streamed = openai.chat.completions.create({
      model: FREE_MODEL,
      messages: [{ role: "user", content: "Hi again" }],
      stream: true,
      stream_options: { include_usage: true },
    });
    await giveAway();
    const { text, orderId, usage } = await readStream(await streamed);
    expect(text).toBe("free lunch");
    expect(usage).toMatchObject({ completion_tokens: 2, cost_micro_credits: "0" });

    for (const id of [answer.id, orderId]) {
      const settled = await order(id);
      expect(statusName(settled.status)).toBe("completed");
      expect(settled.cost).toBe(0n);
      expect(settled.fee).toBe(0n);
    }
    expect(await books(consumer.accountId)).toEqual(consumerBefore);
    expect(await books(providers.free)).toEqual({ available: 0n, held: 0n, pending: 0n });
    expect(await books("acct_platform")).toEqual(platformBefore);
  });

  it("(d) leaves no order running and no hold within 10 s, and the ledger audits clean", async () => {
    await eventually(
      "the consumer's held balance to return to 0",
      async () => ((await books(consumer.accountId)).held === 0n ? true : undefined),
      10_000,
    );
    const { orders } = await market.admin.listOrders({ accountId: consumer.accountId, limit: 1000 });
    expect(orders.length).toBeGreaterThanOrEqual(5);
    expect(orders.filter((found) => statusName(found.status) === "running").map((found) => found.id)).toEqual(
      [],
    );
    for (const accountId of Object.values(providers)) expect((await books(accountId)).held).toBe(0n);
    const audit = await market.admin.auditLedger({});
    expect(audit.problems).toEqual([]);
    expect(audit.entriesSum).toBe(0n);
    expect(audit.ok).toBe(true);
  });
});

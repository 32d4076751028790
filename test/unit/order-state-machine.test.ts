/**
 * The order state machine driven through the real Marketplace, real WorkerSessions and the real
 * store (PGlite, or PostgreSQL with DATABASE_URL). Workers are scripted: the test reads what the
 * control plane sends on a session's outbound queue and answers with wire messages through
 * `session.handle`, so every interleaving is forced, none hoped for.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { afterAll, beforeAll, beforeEach, describe, expect, it, vi } from "vitest";
import { FinishReason } from "../../gen/locallmarket/v1/common_pb.js";
import {
  ConnectRequestSchema,
  type ConnectRequestSchema as ConnectRequestSchemaType,
  type ConnectResponse,
  JobFailureCode,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { WorkerSession } from "../../server/link/worker-session.js";
import { MarketError } from "../../server/market/errors.js";
import {
  type CompletionRequest,
  type Consumer,
  Marketplace,
  type MarketplaceOptions,
  type RunEvent,
} from "../../server/market/marketplace.js";
import { orderCost, platformFee } from "../../server/market/money.js";
import {
  type JobSink,
  type JobSpec,
  NO_CAPABILITIES,
  type SlotLease,
  type WorkerConnection,
  WorkerRegistry,
} from "../../server/market/registry.js";
import {
  type Balance,
  type MarketStore,
  type OpenOrderInput,
  type OrderRecord,
  PLATFORM_ACCOUNT_ID,
} from "../../server/market/store-port.js";
import { openTestStore, type TestStore } from "../support/database.js";

const FEE_BPS = 500;
const WINDOW = 8;
const silentLog = { info() {}, warn() {}, error() {} };

let db: TestStore;
let registry: WorkerRegistry;
let market: Marketplace;
let consumer: Consumer;
let providerAccountId: string;
const sessions: WorkerSession[] = [];

interface ScriptedWorker {
  session: WorkerSession;
  workerId: string;
  /** The next message the control plane sends this worker. */
  next(): Promise<ConnectResponse["message"]>;
  /** Waits for the next JobAssign and returns its job id. */
  nextJob(): Promise<string>;
  send(message: MessageInitShape<typeof ConnectRequestSchemaType>["message"]): void;
  chunk(jobId: string, sequence: number, text: string, tokenCount?: number): void;
  done(jobId: string, lastSequence: number, usage?: { promptTokens: number; completionTokens: number }): void;
}

async function scriptedWorker(
  name: string,
  price: { input: bigint; output: bigint },
  maxConcurrency = 1,
): Promise<ScriptedWorker> {
  const { workerId } = await db.store.createWorkerToken(providerAccountId, name);
  const session = new WorkerSession({
    workerId,
    providerAccountId,
    name,
    sessionId: `session-${name}`,
    offers: [
      {
        model: "m",
        pricePerMillionInput: price.input,
        pricePerMillionOutput: price.output,
        advertisedTokensPerSecond: 100,
        maxConcurrency,
        contextLength: 0,
        quantization: "",
        engine: "scripted",
        capabilities: { ...NO_CAPABILITIES },
      },
    ],
    heartbeatIntervalMs: 60_000,
    maxChunkBytes: 64 * 1024,
    jobWindowChunks: WINDOW,
    log: silentLog,
    onCapacity: (changed) => registry.capacityChanged(changed),
    onClose: (closed) => registry.unregister(closed),
  });
  sessions.push(session);
  registry.register(session);
  const outbound = session.outbound[Symbol.asyncIterator]();
  const worker: ScriptedWorker = {
    session,
    workerId,
    async next() {
      const result = await outbound.next();
      if (result.done) throw new Error(`${name}'s stream ended`);
      return result.value.message;
    },
    async nextJob() {
      for (;;) {
        const message = await worker.next();
        if (message.case === "jobAssign") return message.value.jobId;
      }
    },
    send(message) {
      session.handle(create(ConnectRequestSchema, { message }));
    },
    chunk(jobId, sequence, text, tokenCount = 1) {
      worker.send({ case: "jobChunk", value: { jobId, sequence: BigInt(sequence), text, tokenCount } });
    },
    done(jobId, lastSequence, usage) {
      worker.send({
        case: "jobDone",
        value: { jobId, finishReason: FinishReason.STOP, lastSequence: BigInt(lastSequence), usage },
      });
    },
  };
  return worker;
}

function request(overrides: Partial<CompletionRequest> = {}): CompletionRequest {
  return {
    model: "m",
    messages: [{ role: "user", content: "hello" }],
    sampling: { stop: [] },
    maxTokens: 100,
    stream: true,
    routing: {},
    ...overrides,
  };
}

/** Reads a run to its end: the text and the terminal event. */
async function consume(run: AsyncIterable<RunEvent>): Promise<{ text: string; last: RunEvent }> {
  let text = "";
  let last: RunEvent | undefined;
  for await (const event of run) {
    if (event.type === "delta") text += event.text;
    else last = event;
  }
  return { text, last: last as RunEvent };
}

async function balances(): Promise<{ consumer: Balance; provider: Balance; platform: Balance }> {
  return {
    consumer: await db.store.getBalance(consumer.account.id),
    provider: await db.store.getBalance(providerAccountId),
    platform: await db.store.getBalance(PLATFORM_ACCOUNT_ID),
  };
}

/** The consumer paid exactly the order's cost, the provider got cost − fee (pending), the platform the fee. */
async function expectPaid(before: Awaited<ReturnType<typeof balances>>, order: OrderRecord): Promise<void> {
  const after = await balances();
  const fee = platformFee(order.cost, FEE_BPS);
  expect(order.fee).toBe(fee);
  expect(after.consumer.available).toBe(before.consumer.available - order.cost);
  expect(after.consumer.held).toBe(0n);
  expect(after.provider.pending).toBe(before.provider.pending + order.cost - fee);
  expect(after.platform.available).toBe(before.platform.available + fee);
  expect((await db.store.auditLedger()).problems).toEqual([]);
}

async function ledgerKinds(orderId: string): Promise<string[]> {
  const rows = await db.orm.em
    .fork()
    .getConnection()
    .execute<{ kind: string }[]>(
      "select kind from ledger_transactions where order_id = ? order by created_at, id",
      [orderId],
    );
  return rows.map((row) => row.kind);
}

beforeAll(async () => {
  db = await openTestStore();
  const provider = await db.store.createAccount({ name: "provider" });
  providerAccountId = provider.id;
});

afterAll(async () => {
  for (const session of sessions) session.close("test over");
  await market?.close();
  await db?.close();
});

/** A new Marketplace on the current registry (the previous one is closed first). */
async function openMarket(
  overrides: Partial<MarketplaceOptions> = {},
  store: MarketStore = db.store,
): Promise<void> {
  await market?.close();
  market = new Marketplace(
    store,
    registry,
    {
      feeBasisPoints: FEE_BPS,
      defaultMaxTokens: 100,
      firstTokenTimeoutMs: 60_000,
      jobTimeoutMs: 60_000,
      queueTimeoutMs: 30_000,
      maxQueue: 2,
      checkpointIntervalMs: 60_000,
      ...overrides,
    },
    silentLog,
  );
}

beforeEach(async () => {
  for (const session of sessions.splice(0)) session.close("next test");
  registry = new WorkerRegistry();
  await openMarket();
  const account = await db.store.createAccount({ name: `consumer-${sessions.length}-${Date.now()}` });
  const { key } = await db.store.createApiKey(account.id, "k");
  await db.store.deposit(account.id, 10_000_000n);
  consumer = { account, apiKeyId: key.id };
});

describe("the order state machine", () => {
  it("ignores the cancelled worker's late JobDone after a first-token timeout; the next worker serves and is paid", async () => {
    await openMarket({ firstTokenTimeoutMs: 200, maxQueue: 10 });
    const silent = await scriptedWorker("silent", { input: 1_000n, output: 1_000n });
    const backup = await scriptedWorker("backup", { input: 3_000n, output: 5_000n });
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const silentJob = await silent.nextJob();
    // The first-token timeout fires: the silent worker is told to stop, the backup gets the job.
    expect(await silent.next()).toMatchObject({ case: "jobCancel", value: { jobId: silentJob } });
    const backupJob = await backup.nextJob();
    // Now the superseded worker confirms the cancel and even sends a late chunk: both are dropped.
    silent.chunk(silentJob, 1, "stale");
    silent.send({
      case: "jobDone",
      value: { jobId: silentJob, finishReason: FinishReason.CANCELLED, lastSequence: 1n },
    });
    backup.chunk(backupJob, 1, "fresh", 1);
    backup.chunk(backupJob, 2, " text", 1);
    backup.done(backupJob, 2, { promptTokens: 5, completionTokens: 2 });
    const { text, last } = await consume(run);
    expect(text).toBe("fresh text");
    expect(last).toMatchObject({ type: "finish", finishReason: "stop" });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({
      status: "completed",
      workerId: backup.workerId,
      completionTokens: 2,
      promptTokens: 5,
    });
    expect(order.cost).toBe(orderCost(5, 2, 3_000n, 5_000n));
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "reassign", "settle"]);
    await expectPaid(before, order);
  });

  it("a double failure report causes exactly one fallback", async () => {
    const flaky = await scriptedWorker("flaky", { input: 1_000n, output: 1_000n });
    const backup = await scriptedWorker("backup", { input: 2_000n, output: 2_000n }, 4);
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const flakyJob = await flaky.nextJob();
    const failed = { jobId: flakyJob, code: JobFailureCode.ENGINE_ERROR, message: "boom" };
    flaky.send({ case: "jobFailed", value: failed });
    flaky.send({ case: "jobFailed", value: failed });
    const backupJob = await backup.nextJob();
    backup.chunk(backupJob, 1, "ok", 1);
    backup.done(backupJob, 1, { promptTokens: 3, completionTokens: 1 });
    const { text } = await consume(run);
    expect(text).toBe("ok");
    expect(backup.session.activeJobs).toBe(0);
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "reassign", "settle"]);
    await expectPaid(before, (await db.store.getOrder(run.orderId)) as OrderRecord);
  });

  it("drops a late chunk from a superseded attempt", async () => {
    const flaky = await scriptedWorker("flaky", { input: 1_000n, output: 1_000n });
    const backup = await scriptedWorker("backup", { input: 2_000n, output: 2_000n });
    const run = await market.startCompletion(consumer, request());
    const flakyJob = await flaky.nextJob();
    flaky.send({
      case: "jobFailed",
      value: { jobId: flakyJob, code: JobFailureCode.ENGINE_ERROR, message: "x" },
    });
    const backupJob = await backup.nextJob();
    flaky.chunk(flakyJob, 1, "LATE", 100);
    backup.chunk(backupJob, 1, "right", 1);
    flaky.chunk(flakyJob, 2, "LATER", 100);
    backup.done(backupJob, 1);
    const { text, last } = await consume(run);
    expect(text).toBe("right");
    expect(last.type).toBe("finish");
    expect((await db.store.getOrder(run.orderId))?.completionTokens).toBe(1);
  });

  it("a consumer leaving while the hold moves to the fallback ends the order once, cancelled and free", async () => {
    const flaky = await scriptedWorker("flaky", { input: 1_000n, output: 1_000n });
    const backup = await scriptedWorker("backup", { input: 2_000n, output: 2_000n });
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const flakyJob = await flaky.nextJob();
    flaky.send({
      case: "jobFailed",
      value: { jobId: flakyJob, code: JobFailureCode.ENGINE_ERROR, message: "x" },
    });
    // Synchronously after the failure, before the fallback's reassignment could commit.
    run.cancel("consumer disconnected");
    // The worker's stream also closes in the middle of it all.
    flaky.session.close("stream reset");
    const { text, last } = await consume(run);
    expect(text).toBe("");
    expect(last).toMatchObject({ type: "error", error: { code: "cancelled" } });
    await market.whenSettled(run.orderId);
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({ status: "cancelled", cost: 0n });
    // The backup never got a job, and its slot is free.
    expect(backup.session.activeJobs).toBe(0);
    expect(backup.session.outbound.size).toBe(0);
    await expectPaid(before, order);
  });

  it("a stream closing mid-stream fails the order once and bills what the consumer took", async () => {
    const worker = await scriptedWorker("w", { input: 1_000n, output: 7_000n });
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const job = await worker.nextJob();
    worker.chunk(job, 1, "abc", 1);
    worker.chunk(job, 2, "def", 1);
    const events = run[Symbol.asyncIterator]();
    expect(await events.next()).toMatchObject({ value: { type: "delta", text: "abc" } });
    expect(await events.next()).toMatchObject({ value: { type: "delta", text: "def" } });
    worker.session.close("stream reset");
    worker.session.close("and again");
    const end = await events.next();
    expect(end.value).toMatchObject({ type: "error", error: { code: "worker_failed" } });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({ status: "failed", completionTokens: 2, promptTokens: 0 });
    expect(order.cost).toBe(orderCost(0, 2, 1_000n, 7_000n));
    await expectPaid(before, order);
  });

  it("never bills more tokens than the bytes relayed, and settles a usage of 2^32 − 1", async () => {
    const liar = await scriptedWorker("liar", { input: 1_000_000n, output: 1_000_000n });
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const job = await liar.nextJob();
    liar.chunk(job, 1, "r0 ", 100_000);
    liar.done(job, 1, { promptTokens: 4_294_967_295, completionTokens: 4_294_967_295 });
    const { text, last } = await consume(run);
    expect(text).toBe("r0 ");
    expect(last).toMatchObject({ type: "finish", finishReason: "stop" });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order.completionTokens).toBe(3);
    expect(order.promptTokens).toBe(order.promptTokenBound);
    expect(order.reportedCompletionTokens).toBe(4_294_967_295);
    expect(order.trustSignals.length).toBeGreaterThan(0);
    await expectPaid(before, order);
  });

  it("a free offer settles at 0", async () => {
    await scriptedWorker("free", { input: 0n, output: 0n }).then(async (free) => {
      const before = await balances();
      const run = await market.startCompletion(consumer, request());
      const job = await free.nextJob();
      free.chunk(job, 1, "gratis", 1);
      free.done(job, 1, { promptTokens: 3, completionTokens: 1 });
      const { text } = await consume(run);
      expect(text).toBe("gratis");
      const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
      expect(order).toMatchObject({ status: "completed", cost: 0n, hold: 0n });
      await expectPaid(before, order);
    });
  });

  it("reserves slots synchronously: 8 requests on a worker of 4 slots run 4 at a time, the rest wait", async () => {
    await openMarket({ maxQueue: 4 });
    const worker = await scriptedWorker("quad", { input: 1_000n, output: 1_000n }, 4);
    const runs = await Promise.all(
      Array.from({ length: 4 }, () => market.startCompletion(consumer, request({ stream: false }))),
    );
    const waiting = Array.from({ length: 4 }, () =>
      market.startCompletion(consumer, request({ stream: false })),
    );
    // The queue is full now (4 waiting): a ninth is refused at once with Retry-After.
    await expect(market.startCompletion(consumer, request())).rejects.toMatchObject({
      code: "no_capacity",
      retryAfterSeconds: expect.any(Number),
    });
    const jobs: string[] = [];
    for (let i = 0; i < 4; i++) jobs.push(await worker.nextJob());
    expect(worker.session.activeJobs).toBe(4);
    expect(worker.session.outbound.size).toBe(0);
    const results: Promise<{ text: string; last: RunEvent }>[] = runs.map(consume);
    let served = 0;
    const serve = (job: string) => {
      worker.chunk(job, 1, `#${served++}`, 1);
      worker.done(job, 1);
    };
    for (const job of jobs) serve(job);
    // Each finished job frees a slot that the next waiting request takes.
    for (let i = 0; i < 4; i++) serve(await worker.nextJob());
    results.push(...(await Promise.all(waiting)).map(consume));
    const outcomes = await Promise.all(results);
    expect(outcomes.map((outcome) => outcome.last.type)).toEqual(Array(8).fill("finish"));
    expect(new Set(outcomes.map((outcome) => outcome.text)).size).toBe(8);
    expect(worker.session.activeJobs).toBe(0);
  });

  it("a worker's OVERLOADED refusal goes to the next worker, and with none left is a 503, never a 502", async () => {
    const proud = await scriptedWorker("proud", { input: 1_000n, output: 1_000n });
    const humble = await scriptedWorker("humble", { input: 5_000n, output: 5_000n });
    const run = await market.startCompletion(consumer, request());
    const proudJob = await proud.nextJob();
    proud.send({
      case: "jobFailed",
      value: { jobId: proudJob, code: JobFailureCode.OVERLOADED, message: "full" },
    });
    const humbleJob = await humble.nextJob();
    humble.chunk(humbleJob, 1, "served", 1);
    humble.done(humbleJob, 1);
    expect(await consume(run)).toMatchObject({ text: "served", last: { type: "finish" } });

    humble.session.close("gone");
    const alone = await market.startCompletion(consumer, request());
    const aloneJob = await proud.nextJob();
    proud.send({
      case: "jobFailed",
      value: { jobId: aloneJob, code: JobFailureCode.OVERLOADED, message: "full" },
    });
    const { last } = await consume(alone);
    expect(last).toMatchObject({ type: "error", error: { code: "no_capacity" } });
    expect((await db.store.getOrder(alone.orderId))?.cost).toBe(0n);
  });

  it("a consumer leaving while queued never opens an order", async () => {
    const worker = await scriptedWorker("single", { input: 1_000n, output: 1_000n });
    const first = await market.startCompletion(consumer, request());
    const job = await worker.nextJob();
    const gone = new AbortController();
    const queued = market.startCompletion(consumer, request(), gone.signal);
    gone.abort();
    await expect(queued).rejects.toBeInstanceOf(MarketError);
    await expect(queued).rejects.toMatchObject({ code: "cancelled" });
    worker.chunk(job, 1, "x", 1);
    worker.done(job, 1);
    await consume(first);
    const orders = await db.store.listOrders({ accountId: consumer.account.id, limit: 10 });
    expect(orders.map((order) => order.id)).toEqual([first.orderId]);
    expect((await db.store.getBalance(consumer.account.id)).held).toBe(0n);
  });
});

/**
 * The same guarantees one level down: a scripted WorkerConnection hands the test the very sinks
 * the order gave each attempt, so a superseded attempt can speak after its session would have
 * stopped it. The order itself must ignore it.
 */
describe("the order state machine, scripted at the connection", () => {
  interface Assigned {
    job: JobSpec;
    sink: JobSink;
    cancelled: string[];
  }

  const piece = (text: string) => ({ text, tokenCount: 1, toolCalls: [], logprobs: [] });

  function scriptedConnection(workerId: string, price: bigint): WorkerConnection & { jobs: Assigned[] } {
    const jobs: Assigned[] = [];
    let active = 0;
    const connection: WorkerConnection & { jobs: Assigned[] } = {
      workerId,
      providerAccountId,
      name: workerId,
      draining: false,
      jobs,
      get activeJobs() {
        return active;
      },
      offers: [
        {
          model: "m",
          pricePerMillionInput: price,
          pricePerMillionOutput: price,
          advertisedTokensPerSecond: 100,
          maxConcurrency: 4,
          contextLength: 0,
          quantization: "",
          engine: "scripted",
          capabilities: { ...NO_CAPABILITIES },
        },
      ],
      reserve(): SlotLease {
        active += 1;
        let assigned: Assigned | null = null;
        return {
          connection,
          assign(job, sink) {
            assigned = { job, sink, cancelled: [] };
            jobs.push(assigned);
          },
          acknowledge() {},
          cancel(reason) {
            assigned?.cancelled.push(reason);
          },
          release() {
            active -= 1;
          },
        };
      },
    };
    return connection;
  }

  async function workerIds(): Promise<{ a: string; b: string }> {
    const a = await db.store.createWorkerToken(providerAccountId, "a");
    const b = await db.store.createWorkerToken(providerAccountId, "b");
    return { a: a.workerId, b: b.workerId };
  }

  it("a superseded attempt's done, failure and chunk change nothing; one failure, one fallback", async () => {
    const ids = await workerIds();
    const a = scriptedConnection(ids.a, 1_000n);
    const b = scriptedConnection(ids.b, 2_000n);
    registry.register(a);
    registry.register(b);
    const before = await balances();
    const run = await market.startCompletion(consumer, request());
    const first = a.jobs[0] as Assigned;
    first.sink.failed("ENGINE_ERROR: boom", "error");
    // The same attempt reports again, then finishes and chats: the order must not move twice.
    first.sink.failed("ENGINE_ERROR: boom again", "error");
    first.sink.chunk(piece("stale"), 1n);
    first.sink.done("stop", { promptTokens: 1, completionTokens: 1 });
    expect(first.cancelled.length).toBe(1);
    const second = await vi.waitFor(() => {
      const job = b.jobs[0];
      if (!job) throw new Error("no fallback yet");
      return job;
    });
    first.sink.chunk(piece("still stale"), 2n);
    second.sink.chunk(piece("fresh"), 1n);
    first.sink.done("stop", null);
    second.sink.done("stop", { promptTokens: 2, completionTokens: 1 });
    second.sink.done("length", { promptTokens: 2, completionTokens: 99 });
    const { text, last } = await consume(run);
    expect(text).toBe("fresh");
    expect(last).toMatchObject({ type: "finish", finishReason: "stop" });
    expect(b.jobs).toHaveLength(1);
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({
      status: "completed",
      workerId: ids.b,
      completionTokens: 1,
      promptTokens: 2,
    });
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "reassign", "settle"]);
    await expectPaid(before, order);
  });

  it("a consumer leaving mid-fallback: the fallback's slot is given back unused", async () => {
    const ids = await workerIds();
    const a = scriptedConnection(ids.a, 1_000n);
    const b = scriptedConnection(ids.b, 2_000n);
    registry.register(a);
    registry.register(b);
    const run = await market.startCompletion(consumer, request());
    (a.jobs[0] as Assigned).sink.failed("ENGINE_ERROR: boom", "error");
    run.cancel("consumer disconnected");
    const { last } = await consume(run);
    expect(last).toMatchObject({ type: "error", error: { code: "cancelled" } });
    await market.whenSettled(run.orderId);
    await vi.waitFor(() => expect(b.activeJobs).toBe(0));
    expect(b.jobs).toHaveLength(0);
    expect((await db.store.getOrder(run.orderId))?.status).toBe("cancelled");
  });
});

/**
 * The real store whose openOrder (the hold) waits, while `block`ed, until the test releases it:
 * the hold is then placed by the real store, so the test decides when it commits relative to
 * what the worker does.
 */
function gatedStore(): {
  store: MarketStore;
  /** The next hold waits; resolves (with its terms) once the marketplace has asked for it. */
  block(): { entered: Promise<OpenOrderInput>; release(): void };
} {
  let gate: { enter(input: OpenOrderInput): void; released: Promise<void> } | null = null;
  const real = db.store;
  const store = new Proxy(real, {
    get(target, property) {
      if (property === "openOrder") {
        return async (input: OpenOrderInput) => {
          const current = gate;
          gate = null;
          if (current) {
            current.enter(input);
            await current.released;
          }
          return real.openOrder(input);
        };
      }
      const value = Reflect.get(target, property, target);
      return typeof value === "function" ? value.bind(target) : value;
    },
  });
  return {
    store,
    block() {
      let enter!: (input: OpenOrderInput) => void;
      let release!: () => void;
      const entered = new Promise<OpenOrderInput>((resolve) => {
        enter = resolve;
      });
      const released = new Promise<void>((resolve) => {
        release = resolve;
      });
      gate = { enter, released };
      return { entered, release };
    },
  };
}

/** Whether `promise` has settled by the time the event loop has run everything queued now. */
async function hasSettled(promise: Promise<unknown>): Promise<boolean> {
  let settled = false;
  promise.then(
    () => {
      settled = true;
    },
    () => {
      settled = true;
    },
  );
  await new Promise((resolve) => setImmediate(resolve));
  return settled;
}

describe("speculative dispatch", () => {
  let gated: ReturnType<typeof gatedStore>;

  beforeEach(async () => {
    gated = gatedStore();
    await openMarket({}, gated.store);
  });

  /** One ordinary order, so the account's last hold was placed (its next order speculates). */
  async function warmUp(worker: ScriptedWorker): Promise<void> {
    const run = await market.startCompletion(consumer, request());
    const job = await worker.nextJob();
    worker.chunk(job, 1, "warm", 1);
    worker.done(job, 1);
    expect(await consume(run)).toMatchObject({ text: "warm", last: { type: "finish" } });
  }

  it("the first order of an account waits for its hold; the next is dispatched while its hold is placed", async () => {
    const worker = await scriptedWorker("w", { input: 1_000n, output: 1_000n });
    const gate = gated.block();
    const first = market.startCompletion(consumer, request());
    await gate.entered;
    // Not yet known to pay: nothing is sent to the worker before the hold.
    expect(worker.session.outbound.size).toBe(0);
    gate.release();
    const job = await worker.nextJob();
    worker.chunk(job, 1, "a", 1);
    worker.done(job, 1);
    await consume(await first);

    const second = gated.block();
    const run = market.startCompletion(consumer, request());
    const terms = await second.entered;
    // The job is on its way while the hold waits.
    const jobId = await worker.nextJob();
    expect(await hasSettled(run)).toBe(false);
    second.release();
    expect((await run).orderId).toBe(terms.id);
    worker.chunk(jobId, 1, "b", 1);
    worker.done(jobId, 1);
    expect(await consume(await run)).toMatchObject({ text: "b", last: { type: "finish" } });
  });

  it("chunks that arrive before the hold commits wait for it, then all reach the consumer, billed exactly", async () => {
    const worker = await scriptedWorker("w", { input: 2_000n, output: 3_000n });
    await warmUp(worker);
    const before = await balances();
    const gate = gated.block();
    const starting = market.startCompletion(consumer, request());
    const terms = await gate.entered;
    const job = await worker.nextJob();
    worker.chunk(job, 1, "early", 1);
    worker.chunk(job, 2, " bird", 1);
    worker.done(job, 2, { promptTokens: 4, completionTokens: 2 });
    // The worker is done; the consumer has nothing, no order row exists and no money moved.
    expect(await hasSettled(starting)).toBe(false);
    expect(await db.store.getOrder(terms.id)).toBeNull();
    expect(await balances()).toEqual(before);
    gate.release();
    const run = await starting;
    const { text, last } = await consume(run);
    expect(text).toBe("early bird");
    expect(last).toMatchObject({ type: "finish", finishReason: "stop" });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({ status: "completed", completionTokens: 2, promptTokens: 4 });
    expect(order.cost).toBe(orderCost(4, 2, 2_000n, 3_000n));
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "settle"]);
    await expectPaid(before, order);
  });

  it("a hold refused after the worker streamed: the worker is cancelled, nobody pays, the consumer gets insufficient_credits", async () => {
    const worker = await scriptedWorker("w", { input: 100_000n, output: 100_000n });
    await warmUp(worker);
    // The account is emptied behind the market's back: its last hold was placed, so it speculates.
    await db.store.withdraw(consumer.account.id, (await db.store.getBalance(consumer.account.id)).available);
    const before = await balances();
    const gate = gated.block();
    const starting = market.startCompletion(consumer, request());
    const terms = await gate.entered;
    const job = await worker.nextJob();
    worker.chunk(job, 1, "free", 1);
    worker.chunk(job, 2, " lunch", 1);
    gate.release();
    await expect(starting).rejects.toMatchObject({ code: "insufficient_credits" });
    expect(await worker.next()).toMatchObject({ case: "jobCancel", value: { jobId: job } });
    worker.send({
      case: "jobDone",
      value: { jobId: job, finishReason: FinishReason.CANCELLED, lastSequence: 2n },
    });
    expect(worker.session.activeJobs).toBe(0);
    expect(await db.store.getOrder(terms.id)).toBeNull();
    expect(await balances()).toEqual(before);
    expect((await db.store.auditLedger()).problems).toEqual([]);
    await market.whenIdle();

    // The account is marked: its next order waits for its hold, and the worker never hears of it.
    const next = gated.block();
    const refused = market.startCompletion(consumer, request());
    await next.entered;
    expect(worker.session.outbound.size).toBe(0);
    next.release();
    await expect(refused).rejects.toMatchObject({ code: "insufficient_credits" });
    expect(worker.session.outbound.size).toBe(0);
    expect(await balances()).toEqual(before);
  });

  it("a hold refused on the first worker tries the next one (no speculation then), which serves and is paid", async () => {
    const dear = await scriptedWorker("dear", { input: 1_000_000_000n, output: 1_000_000_000n });
    const cheap = await scriptedWorker("cheap", { input: 1_000n, output: 1_000n });
    const byDear = request({ routing: { order: [dear.workerId, cheap.workerId] } });
    // Warm up on the cheap one, then leave enough for its hold but not for the dear one's.
    const run0 = await market.startCompletion(consumer, request());
    const job0 = await cheap.nextJob();
    cheap.chunk(job0, 1, "w", 1);
    cheap.done(job0, 1);
    await consume(run0);
    const balance = await db.store.getBalance(consumer.account.id);
    await db.store.withdraw(consumer.account.id, balance.available - 10_000n);
    const before = await balances();
    const gate = gated.block();
    const starting = market.startCompletion(consumer, byDear);
    await gate.entered;
    const dearJob = await dear.nextJob();
    dear.chunk(dearJob, 1, "too dear", 1);
    gate.release();
    expect(await dear.next()).toMatchObject({ case: "jobCancel", value: { jobId: dearJob } });
    const cheapJob = await cheap.nextJob();
    cheap.chunk(cheapJob, 1, "cheap", 1);
    cheap.done(cheapJob, 1, { promptTokens: 2, completionTokens: 1 });
    const run = await starting;
    expect(await consume(run)).toMatchObject({ text: "cheap", last: { type: "finish" } });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({ status: "completed", workerId: cheap.workerId, completionTokens: 1 });
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "settle"]);
    await expectPaid(before, order);
  });

  it("a consumer leaving while the hold is pending: the worker stops, the committed hold is released, nothing is owed", async () => {
    const worker = await scriptedWorker("w", { input: 1_000n, output: 1_000n });
    await warmUp(worker);
    const before = await balances();
    const gate = gated.block();
    const gone = new AbortController();
    const starting = market.startCompletion(consumer, request(), gone.signal);
    const terms = await gate.entered;
    const job = await worker.nextJob();
    worker.chunk(job, 1, "unseen", 1);
    gone.abort();
    expect(await worker.next()).toMatchObject({ case: "jobCancel", value: { jobId: job } });
    gate.release();
    await expect(starting).rejects.toMatchObject({ code: "cancelled" });
    await market.whenIdle();
    const order = (await db.store.getOrder(terms.id)) as OrderRecord;
    expect(order).toMatchObject({ status: "cancelled", cost: 0n, completionTokens: 0 });
    expect(await ledgerKinds(terms.id)).toEqual(["hold", "settle"]);
    expect(await db.store.listRunningOrders()).toEqual([]);
    await expectPaid(before, order);
  });

  it("an attempt failing before the hold commits falls back only once the hold is there, and moves it", async () => {
    const flaky = await scriptedWorker("flaky", { input: 1_000n, output: 1_000n });
    const backup = await scriptedWorker("backup", { input: 2_000n, output: 2_000n });
    await warmUp(flaky);
    const before = await balances();
    const gate = gated.block();
    const starting = market.startCompletion(consumer, request());
    await gate.entered;
    const flakyJob = await flaky.nextJob();
    flaky.send({
      case: "jobFailed",
      value: { jobId: flakyJob, code: JobFailureCode.ENGINE_ERROR, message: "boom" },
    });
    // The fallback may reserve the backup's slot, but cannot move a hold that is not there yet.
    expect(await hasSettled(starting)).toBe(false);
    expect(backup.session.outbound.size).toBe(0);
    gate.release();
    const backupJob = await backup.nextJob();
    backup.chunk(backupJob, 1, "saved", 1);
    backup.done(backupJob, 1, { promptTokens: 3, completionTokens: 1 });
    const run = await starting;
    expect(await consume(run)).toMatchObject({ text: "saved", last: { type: "finish" } });
    const order = (await db.store.getOrder(run.orderId)) as OrderRecord;
    expect(order).toMatchObject({ status: "completed", workerId: backup.workerId });
    expect(order.cost).toBe(orderCost(3, 1, 2_000n, 2_000n));
    expect(await ledgerKinds(run.orderId)).toEqual(["hold", "reassign", "settle"]);
    await expectPaid(before, order);
  });

  it("a forced stop while the hold is pending ends the order unbilled once the hold commits", async () => {
    const worker = await scriptedWorker("w", { input: 1_000n, output: 1_000n });
    await warmUp(worker);
    const before = await balances();
    const gate = gated.block();
    const starting = market.startCompletion(consumer, request());
    const terms = await gate.entered;
    const job = await worker.nextJob();
    worker.chunk(job, 1, "cut", 1);
    market.abortAll("forced stop");
    expect(await worker.next()).toMatchObject({ case: "jobCancel", value: { jobId: job } });
    // Nothing to checkpoint: no order row yet.
    gate.release();
    const run = await starting;
    const { text, last } = await consume(run);
    expect(text).toBe("");
    expect(last).toMatchObject({ type: "error", error: { code: "shutting_down" } });
    const order = (await db.store.getOrder(terms.id)) as OrderRecord;
    expect(order).toMatchObject({ status: "failed", cost: 0n });
    await expectPaid(before, order);
  });
});

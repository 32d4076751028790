/**
 * One worker's open stream, as the market sees it: the jobs it runs, their chunk sequences, its
 * liveness. Translates between the wire messages and the core's WorkerConnection / JobSink.
 */
import { randomInt } from "node:crypto";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import {
  ResponseFormat_Type,
  FinishReason as WireFinishReason,
} from "../../gen/locallmarket/v1/common_pb.js";
import {
  type ConnectRequest,
  type ConnectResponse,
  ConnectResponseSchema,
  type JobAssignSchema,
  type JobChunk,
  JobFailureCode,
  RejectCode,
  type ScoreResult,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { AsyncQueue } from "../market/async-queue.js";
import type { MarketLogger } from "../market/marketplace.js";
import {
  capacityOf,
  type FinishReason,
  type JobSink,
  type JobSpec,
  type SlotLease,
  type WorkerConnection,
} from "../market/registry.js";
import type { OfferRecord } from "../market/store-port.js";
import type { ReportedToken } from "../trust/statistics.js";
import type { FinishedDetailJob, JobTrustExtras, ScoringConnection } from "../trust/trust-service.js";
import { offersFromWire } from "./offers.js";

interface RunningJob {
  /** Null once the job was cancelled: whatever the worker still sends for it is dropped. */
  sink: JobSink | null;
  lastSequence: bigint;
  /** Highest sequence the consumer has taken (flow control). */
  acknowledged: bigint;
  /** Highest sequence announced to the worker in a JobWindow. */
  announced: bigint;
  cancelTimer: NodeJS.Timeout | undefined;
  /** Set when the job asked for token detail: what an audit needs (trust/trust-service.ts). */
  detail?: {
    orderId: string;
    assign: MessageInitShape<typeof JobAssignSchema>;
    offer: OfferRecord;
    text: string;
    tokenCount: number;
    tokens: ReportedToken[];
    startedAt: number;
  };
}

/** What the session asks of the trust service (server/trust/trust-service.ts). */
export interface SessionTrustHooks {
  /** The job's seed and token-detail request. */
  prepare(job: JobSpec, tokenDetail: boolean): JobTrustExtras;
  /** A job that carried token detail ended with JobDone. */
  finished(job: FinishedDetailJob): void;
  /** Why the worker is suspended (its token is then refused with Reject BANNED); undefined when it is not. */
  suspendedReason?(workerId: string): string | undefined;
}

const FINISH_REASONS: Record<WireFinishReason, FinishReason> = {
  [WireFinishReason.UNSPECIFIED]: "stop",
  [WireFinishReason.STOP]: "stop",
  [WireFinishReason.LENGTH]: "length",
  [WireFinishReason.CONTENT_FILTER]: "content_filter",
  [WireFinishReason.CANCELLED]: "cancelled",
  [WireFinishReason.TOOL_CALLS]: "tool_calls",
};

const RESPONSE_FORMAT_TYPES = {
  text: ResponseFormat_Type.TEXT,
  json_object: ResponseFormat_Type.JSON_OBJECT,
  json_schema: ResponseFormat_Type.JSON_SCHEMA,
} as const;

/**
 * The JobAssign for a job, every optional part only when the request uses it. The seed is always
 * set (the consumer's, else one the control plane drew: `extras`), and token detail when asked.
 */
function jobAssign(job: JobSpec, extras?: JobTrustExtras): MessageInitShape<typeof JobAssignSchema> {
  const format = job.responseFormat;
  return {
    jobId: job.jobId,
    model: job.model,
    messages: job.messages.map((message) => ({
      role: message.role,
      content: message.content,
      name: message.name ?? "",
      toolCalls: message.toolCalls ?? [],
      toolCallId: message.toolCallId ?? "",
      imageUrls: message.imageUrls ?? [],
    })),
    prompt: job.prompt ?? "",
    sampling: { ...job.sampling, seed: extras?.seed ?? job.sampling.seed ?? BigInt(randomInt(0, 2 ** 31)) },
    ...(extras?.tokenDetail ? { tokenDetail: { topK: extras.tokenDetail.topK } } : {}),
    maxTokens: job.maxTokens,
    deadlineUnixMs: BigInt(job.deadlineUnixMs),
    tools: job.tools ?? [],
    toolChoice:
      job.toolChoice === undefined
        ? undefined
        : {
            mode: job.toolChoice.mode,
            functionName: job.toolChoice.mode === "function" ? job.toolChoice.functionName : "",
          },
    parallelToolCalls: job.parallelToolCalls ?? true,
    responseFormat:
      format === undefined
        ? undefined
        : {
            type: RESPONSE_FORMAT_TYPES[format.type],
            name: format.type === "json_schema" ? format.name : "",
            schemaJson: format.type === "json_schema" ? format.schemaJson : "",
            strict: format.type === "json_schema" ? format.strict : false,
          },
    wantLogprobs: job.logprobs !== undefined,
    topLogprobs: job.logprobs?.top ?? 0,
  };
}

export interface WorkerSessionOptions {
  workerId: string;
  providerAccountId: string;
  name: string;
  sessionId: string;
  offers: OfferRecord[];
  heartbeatIntervalMs: number;
  maxChunkBytes: number;
  /** Flow-control window: chunks of one job the worker may send beyond the last acknowledged. */
  jobWindowChunks: number;
  log: MarketLogger;
  /** Called when a slot frees up or the offers change (the admission queue may proceed). */
  onCapacity(session: WorkerSession): void;
  /** Called once when the session ends, whatever the reason. */
  onClose(session: WorkerSession): void;
  /** Seeds, token detail and audits; absent: a random seed and no token detail. */
  trust?: SessionTrustHooks;
}

/** A worker silent for this many heartbeat intervals is offline. */
const MISSED_HEARTBEATS_ALLOWED = 3;
/** A cancelled job whose worker never confirms gives its slot back after this long. */
const CANCEL_CONFIRMATION_MS = 10_000;

/** One reserved slot of a session; see SlotLease. */
class SessionLease implements SlotLease {
  private state: "reserved" | "assigned" | "released" = "reserved";
  private jobId: string | null = null;

  constructor(private readonly session: WorkerSession) {}

  get connection(): WorkerConnection {
    return this.session;
  }

  assign(job: JobSpec, sink: JobSink): void {
    if (this.state !== "reserved") throw new Error(`slot lease is ${this.state}, cannot assign ${job.jobId}`);
    this.state = "assigned";
    this.jobId = job.jobId;
    this.session.startJob(job, sink);
  }

  acknowledge(sequence: bigint): void {
    if (this.jobId !== null) this.session.acknowledge(this.jobId, sequence);
  }

  cancel(reason: string): void {
    if (this.state === "reserved") this.release();
    else if (this.jobId !== null) this.session.cancel(this.jobId, reason);
  }

  release(): void {
    if (this.state !== "reserved") return;
    this.state = "released";
    this.session.releaseReservation();
  }
}

export class WorkerSession implements WorkerConnection, ScoringConnection {
  readonly workerId: string;
  readonly providerAccountId: string;
  readonly name: string;
  readonly sessionId: string;
  readonly outbound = new AsyncQueue<ConnectResponse>(100_000);
  offers: readonly OfferRecord[];
  draining = false;

  private readonly jobs = new Map<string, RunningJob>();
  /** Verifier jobs sent to this worker (ScoreAssign), by score id. */
  private readonly scores = new Map<
    string,
    { resolve: (result: ScoreResult) => void; reject: (error: Error) => void; timer: NodeJS.Timeout }
  >();
  private reservations = 0;
  private lastMessageAt = Date.now();
  private readonly watchdog: NodeJS.Timeout;
  private closed = false;

  constructor(private readonly options: WorkerSessionOptions) {
    this.workerId = options.workerId;
    this.providerAccountId = options.providerAccountId;
    this.name = options.name;
    this.sessionId = options.sessionId;
    this.offers = options.offers;
    this.watchdog = setInterval(() => this.checkLiveness(), options.heartbeatIntervalMs);
    this.watchdog.unref();
  }

  get activeJobs(): number {
    return this.jobs.size + this.reservations;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  reserve(model: string): SlotLease | null {
    if (this.closed || this.draining) return null;
    const offer = this.offers.find((candidate) => candidate.model === model);
    if (!offer || this.activeJobs >= capacityOf(offer)) return null;
    this.reservations += 1;
    return new SessionLease(this);
  }

  /** Called by a lease: the slot was given back unused. */
  releaseReservation(): void {
    this.reservations -= 1;
    this.options.onCapacity(this);
  }

  /** Called by a lease: sends the job on the reserved slot. */
  startJob(job: JobSpec, sink: JobSink): void {
    this.reservations -= 1;
    if (this.closed) {
      // Reported asynchronously, as every other job event is.
      queueMicrotask(() => sink.failed("worker disconnected", "error"));
      return;
    }
    const offer = this.offers.find((candidate) => candidate.model === job.model);
    const extras = this.options.trust?.prepare(job, offer?.capabilities.tokenDetail === true);
    const assign = jobAssign(job, extras);
    this.jobs.set(job.jobId, {
      sink,
      lastSequence: 0n,
      acknowledged: 0n,
      announced: 0n,
      cancelTimer: undefined,
      ...(extras?.tokenDetail && offer
        ? {
            detail: {
              orderId: job.orderId ?? "",
              assign,
              offer,
              text: "",
              tokenCount: 0,
              tokens: [],
              startedAt: performance.now(),
            },
          }
        : {}),
    });
    this.send({ case: "jobAssign", value: assign });
  }

  /**
   * The consumer took chunks up to `sequence`; the worker hears of it in batches of a quarter of
   * the window. A worker whose window is full has sent a whole window beyond the last
   * announcement, so once the consumer has taken that, a batch is due: nothing else needs telling.
   * (Announcing also whenever the consumer had caught up sent a JobWindow for nearly every chunk,
   * since the consumer mostly keeps up: one message to encode, send and handle per chunk, which
   * no worker needed.)
   */
  acknowledge(jobId: string, sequence: bigint): void {
    const job = this.jobs.get(jobId);
    if (!job || job.sink === null || sequence <= job.acknowledged) return;
    job.acknowledged = sequence;
    const batch = BigInt(Math.max(1, Math.floor(this.options.jobWindowChunks / 4)));
    if (job.acknowledged - job.announced >= batch) {
      job.announced = job.acknowledged;
      this.send({ case: "jobWindow", value: { jobId, acknowledgedSequence: job.acknowledged } });
    }
  }

  cancel(jobId: string, reason: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.sink === null) return;
    // From now on the job belongs to nobody; the slot stays taken until the worker confirms.
    job.sink = null;
    job.cancelTimer = setTimeout(() => {
      this.log("warn", "worker did not confirm a cancelled job; its slot is freed", { jobId });
      this.finishJob(jobId);
    }, CANCEL_CONFIRMATION_MS);
    job.cancelTimer.unref();
    this.send({ case: "jobCancel", value: { jobId, reason } });
  }

  /** Asks the worker to finish its jobs and take no new ones. */
  drain(reason: string): void {
    if (this.closed || this.draining) return;
    this.draining = true;
    this.send({ case: "drain", value: { reason } });
  }

  /** Handles one message from the worker after Welcome. */
  handle(request: ConnectRequest): void {
    this.lastMessageAt = Date.now();
    const message = request.message;
    switch (message.case) {
      case "heartbeat":
      case "jobAccepted":
        return;
      case "offerUpdate":
        try {
          this.offers = offersFromWire(message.value.offers, { allowEmpty: true });
          this.log("info", "offers updated", { offers: this.offers.length });
          this.options.onCapacity(this);
        } catch (error) {
          this.log("warn", "protocol error: invalid OfferUpdate ignored", { error: String(error) });
        }
        return;
      case "jobChunk":
        this.onChunk(message.value);
        return;
      case "jobDone": {
        const { jobId, finishReason, usage, lastSequence } = message.value;
        const job = this.job(jobId);
        if (!job) return;
        const sink = job.sink;
        const sequenceSeen = job.lastSequence;
        this.finishJob(jobId);
        if (!sink) return;
        if (lastSequence !== sequenceSeen) {
          sink.failed(
            `job ended at chunk ${sequenceSeen} but the worker sent up to ${lastSequence}`,
            "error",
          );
          return;
        }
        if (job.detail && this.options.trust) {
          this.options.trust.finished({
            workerId: this.workerId,
            orderId: job.detail.orderId,
            offer: job.detail.offer,
            assign: job.detail.assign,
            streamedText: job.detail.text,
            chunkTokenCount: job.detail.tokenCount,
            tokenDetails: job.detail.tokens,
            usage: usage
              ? { promptTokens: usage.promptTokens, completionTokens: usage.completionTokens }
              : null,
            finishReason: FINISH_REASONS[finishReason] ?? "stop",
            generationMs: performance.now() - job.detail.startedAt,
          });
        }
        sink.done(
          FINISH_REASONS[finishReason] ?? "stop",
          usage ? { promptTokens: usage.promptTokens, completionTokens: usage.completionTokens } : null,
        );
        return;
      }
      case "jobFailed": {
        const { jobId, code, message: reason } = message.value;
        const job = this.job(jobId);
        if (!job) return;
        const sink = job.sink;
        this.finishJob(jobId);
        sink?.failed(
          `${JobFailureCode[code] ?? "ENGINE_ERROR"}: ${reason}`,
          code === JobFailureCode.OVERLOADED ? "overloaded" : "error",
        );
        return;
      }
      case "scoreResult": {
        const pending = this.scores.get(message.value.scoreId);
        if (!pending) {
          this.log("warn", "protocol error: ScoreResult for an unknown score id", {
            scoreId: message.value.scoreId,
          });
          return;
        }
        this.scores.delete(message.value.scoreId);
        clearTimeout(pending.timer);
        pending.resolve(message.value);
        return;
      }
      case "goodbye":
        this.draining = true;
        this.log("info", "worker said goodbye", { reason: message.value.reason });
        return;
      case "hello":
        this.log("warn", "protocol error: Hello after Welcome ignored", {});
        return;
      default:
        return;
    }
  }

  private onChunk(chunk: JobChunk): void {
    const { jobId, sequence, text } = chunk;
    const job = this.job(jobId);
    if (!job?.sink) return;
    if (sequence <= job.lastSequence) return; // a replayed chunk: already relayed
    const failure =
      sequence !== job.lastSequence + 1n
        ? `chunk sequence gap: expected ${job.lastSequence + 1n}, got ${sequence}`
        : sequence > job.acknowledged + BigInt(this.options.jobWindowChunks)
          ? `flow-control window exceeded: chunk ${sequence} sent with chunks up to ${job.acknowledged} acknowledged and a window of ${this.options.jobWindowChunks}`
          : Buffer.byteLength(text) > this.options.maxChunkBytes
            ? `chunk larger than ${this.options.maxChunkBytes} bytes`
            : null;
    if (failure !== null) {
      const sink = job.sink;
      this.log("warn", "protocol error: job failed", { jobId, reason: failure });
      this.cancel(jobId, failure);
      sink.failed(failure, "error");
      return;
    }
    job.lastSequence = sequence;
    if (job.detail) {
      job.detail.text += text;
      job.detail.tokenCount += chunk.tokenCount;
      for (const detail of chunk.tokenDetails) {
        job.detail.tokens.push({
          tokenId: detail.tokenId,
          logprob: detail.logprob,
          top: detail.top.map((t) => ({ tokenId: t.tokenId, logprob: t.logprob })),
        });
      }
    }
    job.sink.chunk(
      {
        text,
        tokenCount: chunk.tokenCount,
        // Most chunks are text alone: no arrays to copy.
        toolCalls:
          chunk.toolCalls.length === 0
            ? []
            : chunk.toolCalls.map((call) => ({
                index: call.index,
                ...(call.id ? { id: call.id } : {}),
                ...(call.name ? { name: call.name } : {}),
                arguments: call.arguments,
              })),
        logprobs:
          chunk.logprobs.length === 0
            ? []
            : chunk.logprobs.map((entry) => ({
                token: entry.token,
                logprob: entry.logprob,
                topLogprobs: entry.topLogprobs.map((top) => ({ token: top.token, logprob: top.logprob })),
              })),
      },
      sequence,
    );
  }

  /** Ends the session: running jobs fail (and fall back), the stream closes after `reject`. */
  close(reason: string, rejectCode?: RejectCode): void {
    if (this.closed) return;
    if (rejectCode !== undefined) this.send({ case: "reject", value: { code: rejectCode, message: reason } });
    this.closed = true;
    clearInterval(this.watchdog);
    const jobs = [...this.jobs.values()];
    this.jobs.clear();
    for (const job of jobs) {
      clearTimeout(job.cancelTimer);
      job.sink?.failed(`worker disconnected: ${reason}`, "error");
    }
    for (const [scoreId, pending] of this.scores) {
      clearTimeout(pending.timer);
      pending.reject(new Error(`verifier disconnected before scoring ${scoreId}: ${reason}`));
    }
    this.scores.clear();
    this.outbound.end();
    this.log("info", "worker session closed", { reason });
    this.options.onClose(this);
  }

  /**
   * Sends a verifier job (ScoreAssign) and resolves with the worker's ScoreResult. Rejects when the
   * worker does not answer within `timeoutMs` or disconnects. Takes no slot.
   */
  scoreTokens(
    scoreId: string,
    job: MessageInitShape<typeof JobAssignSchema>,
    tokenIds: number[],
    positions: number[],
    timeoutMs: number,
  ): Promise<ScoreResult> {
    if (this.closed) return Promise.reject(new Error("verifier disconnected"));
    return new Promise<ScoreResult>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.scores.delete(scoreId);
        reject(new Error(`verifier did not score ${scoreId} within ${timeoutMs} ms`));
      }, timeoutMs);
      timer.unref();
      this.scores.set(scoreId, { resolve, reject, timer });
      this.send({ case: "scoreAssign", value: { scoreId, job, tokenIds, positions } });
    });
  }

  private checkLiveness(): void {
    const silentMs = Date.now() - this.lastMessageAt;
    if (silentMs > this.options.heartbeatIntervalMs * MISSED_HEARTBEATS_ALLOWED) {
      this.close(`no heartbeat for ${silentMs} ms`, RejectCode.PROTOCOL_ERROR);
    }
  }

  private job(jobId: string): RunningJob | undefined {
    const job = this.jobs.get(jobId);
    if (!job) this.log("warn", "protocol error: message for a job not assigned to this stream", { jobId });
    return job;
  }

  /** The job is over on the worker: its slot is free again. */
  private finishJob(jobId: string): void {
    const job = this.jobs.get(jobId);
    if (!job) return;
    clearTimeout(job.cancelTimer);
    this.jobs.delete(jobId);
    if (!this.closed) this.options.onCapacity(this);
  }

  private send(message: MessageInitShape<typeof ConnectResponseSchema>["message"]): void {
    if (this.closed) return;
    this.outbound.push(create(ConnectResponseSchema, { message }));
  }

  private log(level: "info" | "warn", message: string, fields: object): void {
    this.options.log[level]({ workerId: this.workerId, sessionId: this.sessionId, ...fields }, message);
  }
}

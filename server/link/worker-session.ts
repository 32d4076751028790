/**
 * One worker's open stream, as the market sees it: the jobs it runs, their chunk sequences, its
 * liveness. Translates between the wire messages and the core's WorkerConnection / JobSink.
 */
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { FinishReason as WireFinishReason } from "../../gen/locallmarket/v1/common_pb.js";
import {
  type ConnectRequest,
  type ConnectResponse,
  ConnectResponseSchema,
  JobFailureCode,
  RejectCode,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { AsyncQueue } from "../market/async-queue.js";
import type { MarketLogger } from "../market/marketplace.js";
import type { FinishReason, JobSink, JobSpec, WorkerConnection } from "../market/registry.js";
import type { OfferRecord } from "../market/store-port.js";
import { offersFromWire } from "./offers.js";

interface RunningJob {
  sink: JobSink;
  lastSequence: bigint;
  cancelled: boolean;
}

const FINISH_REASONS: Record<WireFinishReason, FinishReason> = {
  [WireFinishReason.UNSPECIFIED]: "stop",
  [WireFinishReason.STOP]: "stop",
  [WireFinishReason.LENGTH]: "length",
  [WireFinishReason.CONTENT_FILTER]: "content_filter",
  [WireFinishReason.CANCELLED]: "cancelled",
};

export interface WorkerSessionOptions {
  workerId: string;
  providerAccountId: string;
  name: string;
  sessionId: string;
  offers: OfferRecord[];
  heartbeatIntervalMs: number;
  maxChunkBytes: number;
  log: MarketLogger;
  /** Called once when the session ends, whatever the reason. */
  onClose(session: WorkerSession): void;
}

/** A worker silent for this many heartbeat intervals is offline. */
const MISSED_HEARTBEATS_ALLOWED = 3;

export class WorkerSession implements WorkerConnection {
  readonly workerId: string;
  readonly providerAccountId: string;
  readonly name: string;
  readonly sessionId: string;
  readonly outbound = new AsyncQueue<ConnectResponse>(100_000);
  offers: readonly OfferRecord[];
  draining = false;

  private readonly jobs = new Map<string, RunningJob>();
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
    return this.jobs.size;
  }

  get isClosed(): boolean {
    return this.closed;
  }

  assign(job: JobSpec, sink: JobSink): void {
    if (this.closed) {
      sink.failed("worker disconnected");
      return;
    }
    this.jobs.set(job.jobId, { sink, lastSequence: 0n, cancelled: false });
    this.send({
      case: "jobAssign",
      value: {
        jobId: job.jobId,
        model: job.model,
        messages: job.messages.map((message) => ({
          role: message.role,
          content: message.content,
          name: message.name ?? "",
        })),
        sampling: job.sampling,
        maxTokens: job.maxTokens,
        deadlineUnixMs: BigInt(job.deadlineUnixMs),
      },
    });
  }

  cancel(jobId: string, reason: string): void {
    const job = this.jobs.get(jobId);
    if (!job || job.cancelled) return;
    // The slot stays taken until the worker confirms with JobDone or JobFailed.
    job.cancelled = true;
    this.send({ case: "jobCancel", value: { jobId, reason } });
  }

  /** Handles one message from the worker after Welcome. */
  handle(request: ConnectRequest): void {
    this.lastMessageAt = Date.now();
    const message = request.message;
    switch (message.case) {
      case "heartbeat":
        return;
      case "jobAccepted":
        this.job(message.value.jobId)?.sink.accepted();
        return;
      case "offerUpdate":
        try {
          this.offers = offersFromWire(message.value.offers, { allowEmpty: true });
          this.log("info", "offers updated", { offers: this.offers.length });
        } catch (error) {
          this.log("warn", "protocol error: invalid OfferUpdate ignored", { error: String(error) });
        }
        return;
      case "jobChunk": {
        const { jobId, sequence, text, tokenCount } = message.value;
        const job = this.job(jobId);
        if (!job) return;
        if (sequence <= job.lastSequence) return; // a replayed chunk: already relayed
        if (sequence !== job.lastSequence + 1n) {
          this.finishJob(jobId)?.sink.failed(
            `chunk sequence gap: expected ${job.lastSequence + 1n}, got ${sequence}`,
          );
          return;
        }
        if (Buffer.byteLength(text) > this.options.maxChunkBytes) {
          this.finishJob(jobId)?.sink.failed(`chunk larger than ${this.options.maxChunkBytes} bytes`);
          return;
        }
        job.lastSequence = sequence;
        job.sink.chunk(text, tokenCount);
        return;
      }
      case "jobDone": {
        const { jobId, finishReason, usage, lastSequence } = message.value;
        const job = this.finishJob(jobId);
        if (!job) return;
        if (lastSequence !== job.lastSequence) {
          job.sink.failed(`job ended at chunk ${job.lastSequence} but the worker sent up to ${lastSequence}`);
          return;
        }
        job.sink.done(
          FINISH_REASONS[finishReason] ?? "stop",
          usage ? { promptTokens: usage.promptTokens, completionTokens: usage.completionTokens } : null,
        );
        return;
      }
      case "jobFailed": {
        const { jobId, code, message: reason } = message.value;
        this.finishJob(jobId)?.sink.failed(`${JobFailureCode[code] ?? "ENGINE_ERROR"}: ${reason}`);
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

  /** Ends the session: running jobs fail (and fall back), the stream closes after `reject`. */
  close(reason: string, rejectCode?: RejectCode): void {
    if (this.closed) return;
    if (rejectCode !== undefined) this.send({ case: "reject", value: { code: rejectCode, message: reason } });
    this.closed = true;
    clearInterval(this.watchdog);
    const jobs = [...this.jobs.values()];
    this.jobs.clear();
    for (const job of jobs) job.sink.failed(`worker disconnected: ${reason}`);
    this.outbound.end();
    this.log("info", "worker session closed", { reason });
    this.options.onClose(this);
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

  private finishJob(jobId: string): RunningJob | undefined {
    const job = this.job(jobId);
    this.jobs.delete(jobId);
    return job;
  }

  private send(message: MessageInitShape<typeof ConnectResponseSchema>["message"]): void {
    if (this.closed) return;
    this.outbound.push(create(ConnectResponseSchema, { message }));
  }

  private log(level: "info" | "warn", message: string, fields: object): void {
    this.options.log[level]({ workerId: this.workerId, sessionId: this.sessionId, ...fields }, message);
  }
}

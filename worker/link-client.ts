/**
 * The worker's side of the worker link (proto/locallmarket/v1/worker.proto).
 *
 * {@link WorkerLink} owns the connection to the control plane: it opens the bidirectional
 * `WorkerService.Connect` stream (gRPC over HTTP/2), sends Hello, waits for Welcome, sends heartbeats
 * at the interval the server asked for, runs assigned jobs on the engine (up to `concurrency` at
 * once) and streams JobAccepted / JobChunk / JobDone / JobFailed, each job's chunks within its
 * flow-control window ({@link JobOutbox}), tool-call fragments and log-probabilities included;
 * offers declare their {@link OfferCapabilities}. It answers JobWindow, JobCancel, Drain, Ping and Reject,
 * and reconnects with exponential backoff and jitter whenever the stream ends, except after a
 * Reject that tells this worker not to (see {@link FINAL_REJECTS}).
 *
 * Progress is reported on three channels: one-line log messages (the `log` option), typed events
 * (`link.on("welcomed", ...)`, usable with `events.once(link, "welcomed")`), and the `done` promise,
 * which settles when the link has stopped for good (rejecting with {@link WorkerRejectedError} after
 * a fatal Reject).
 */
import { EventEmitter } from "node:events";
import { create, type MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport, Http2SessionManager } from "@connectrpc/connect-node";
import { formatCredits } from "../common/credits.js";
import {
  CapabilitiesSchema,
  FinishReason,
  type Offer,
  OfferSchema,
  ResponseFormat_Type,
  UsageSchema,
} from "../gen/locallmarket/v1/common_pb.js";
import {
  type ConnectRequest,
  ConnectRequestSchema,
  type ConnectResponse,
  type Drain,
  type JobAssign,
  type JobCancel,
  type JobChunkSchema,
  JobFailureCode,
  type Reject,
  RejectCode,
  type ScoreAssign,
  type Welcome,
  WorkerService,
} from "../gen/locallmarket/v1/worker_pb.js";
import { AsyncQueue } from "./async-queue.js";
import {
  type Engine,
  EngineError,
  type EngineFinishReason,
  type EngineResponseFormat,
  type EngineSampling,
  type EngineTool,
  type EngineToolChoice,
  type GenerateRequest,
  type GenerationResult,
  runGeneration,
} from "./engines/engine.js";
import { JobOutbox, type OutgoingChunk } from "./job-outbox.js";

/** The implementation name and version sent in Hello.agent_version. */
export const AGENT_VERSION = "locallmarket-worker/0.1.0";
/** The wire protocol version this worker implements. */
export const PROTOCOL_VERSION = 1;

/** What an offer supports beyond plain chat (Offer.capabilities); the market routes by it. */
export interface OfferCapabilities {
  /** Function calling: tools, tool_choice, tool-call deltas. */
  tools: boolean;
  /** response_format json_object / json_schema, enforced. */
  jsonSchema: boolean;
  /** Per-token log-probabilities with alternatives. */
  logprobs: boolean;
  /** Images in messages. */
  vision: boolean;
  /** Raw text completion (the legacy completions API). */
  completions: boolean;
  /** Token ids with logprobs on request (JobChunk.token_details), what audits need. */
  tokenDetail?: boolean;
}

/** One offer, in application units (prices already in micro-credits per 1M tokens). */
export interface OfferSpec {
  model: string;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  tokensPerSecond: number;
  maxConcurrency: number;
  /** Context window in tokens; 0 or absent means unknown. */
  contextLength?: number;
  quantization?: string;
  /** Informational engine name, e.g. "llama.cpp" or "ollama". */
  engine?: string;
  /** What the offer supports beyond plain chat; absent means none of it. */
  capabilities?: OfferCapabilities;
  /** SHA-256 of the weights file, 64 lowercase hex digits (Offer.weights_sha256); absent means undeclared. */
  weightsSha256?: string;
  /** The engine's version (Offer.engine_version). */
  engineVersion?: string;
}

/** Options of {@link WorkerLink}. */
export interface WorkerLinkOptions {
  /** Control plane base URL, e.g. http://127.0.0.1:50051 (h2c) or https://market.example (TLS). */
  server: string;
  /** The worker token; sent in Hello, never logged. */
  token: string;
  /** Machine name shown on the dashboard. */
  name?: string;
  /** What the worker sells (at least one offer). */
  offers: OfferSpec[];
  /** The engine jobs run on. */
  engine: Engine;
  /** Jobs run at once; assignments beyond it are refused with OVERLOADED. Default 1. */
  concurrency?: number;
  /** Receives one line per state change. Default: timestamped lines on stderr. */
  log?: (line: string) => void;
  /** Reconnection backoff: the first delay, doubling up to the maximum. Default 500 ms to 30 s. */
  backoff?: { initialMs?: number; maxMs?: number };
  /** Random source in [0, 1) for the backoff jitter (tests can make it deterministic). */
  random?: () => number;
  /** How long to wait for Welcome after sending Hello before giving up on the stream. Default 30 s. */
  welcomeTimeoutMs?: number;
  /** Heartbeat interval used when Welcome does not give one. Default 10 s. */
  defaultHeartbeatMs?: number;
  /** HTTP/2 keep-alive PING interval. Default 30 s. */
  pingIntervalMs?: number;
  /** How long stop() lets running jobs finish before cancelling them. Default 30 s. */
  stopGraceMs?: number;
  /** After Goodbye and the half-close, how long stop() waits for the server to end the call. Default 3 s. */
  closeTimeoutMs?: number;
  /**
   * Output text (UTF-8 bytes) a job holds while its flow-control window is closed before it stops
   * reading the engine until the control plane acknowledges. Default 64 KiB.
   */
  jobBufferBytes?: number;
}

/** The link's state, as reported by `link.state` and the "state" event. */
export type WorkerLinkState =
  | "idle"
  | "connecting"
  | "connected"
  | "backoff"
  | "stopping"
  | "stopped"
  | "failed";

/** What is known about a finished job, as reported by the "job-finished" event. */
export interface JobSummary {
  jobId: string;
  model: string;
  /** "done" (JobDone sent), "failed" (JobFailed sent) or "abandoned" (the stream was gone). */
  outcome: "done" | "failed" | "abandoned";
  finishReason?: EngineFinishReason;
  failureCode?: JobFailureCode;
  message?: string;
  /** Completion tokens streamed (sum of JobChunk.token_count). */
  tokens: number;
  /** Chunks sent (the last JobChunk.sequence). */
  chunks: number;
  durationMs: number;
}

/** Typed events of {@link WorkerLink}. */
export interface WorkerLinkEvents {
  state: [WorkerLinkState];
  connecting: [{ attempt: number }];
  welcomed: [Welcome];
  disconnected: [{ reason: string }];
  retrying: [{ delayMs: number; attempt: number }];
  "job-started": [{ jobId: string; model: string }];
  "job-finished": [JobSummary];
  drain: [Drain];
  rejected: [Reject];
  stopped: [];
}

/** The server rejected the worker for good (unknown/revoked token, or banned): do not reconnect. */
export class WorkerRejectedError extends Error {
  readonly code: RejectCode;
  constructor(code: RejectCode, message: string) {
    super(message);
    this.name = "WorkerRejectedError";
    this.code = code;
  }
}

type CancelReason = "cancel" | "timeout" | "stop" | "disconnect";

interface RunningJob {
  id: string;
  model: string;
  controller: AbortController;
  reason?: CancelReason;
  cancelMessage?: string;
  outbox: JobOutbox;
  startedAt: number;
  settled: Promise<void>;
}

interface Session {
  outbound: AsyncQueue<ConnectRequest>;
  abort: AbortController;
  welcome?: Welcome;
  draining: boolean;
  rejected?: Reject;
  jobs: Map<string, RunningJob>;
  heartbeat?: NodeJS.Timeout;
  ended: Promise<void>;
}

/**
 * Rejects after which this worker stops instead of reconnecting, with what the operator should do
 * (worker.proto, "How the stream ends"). INVALID_HELLO is among them because this worker's Hello
 * comes from its options: reconnecting would send the same invalid Hello again.
 */
const FINAL_REJECTS = new Map<RejectCode, string>([
  [RejectCode.UNAUTHENTICATED, "the worker token is unknown or revoked"],
  [RejectCode.BANNED, "the operator banned this worker"],
  [RejectCode.INVALID_HELLO, "fix the offers (model, prices) and start the worker again"],
  [RejectCode.REPLACED, "another process is connected with the same worker token"],
]);

/** The largest message either side may send (worker.proto); a larger one ends the call. */
const MAX_MESSAGE_BYTES = 16 * 1024 * 1024;

/** The worker's connection to the control plane. Call {@link start}, later {@link stop}. */
export class WorkerLink extends EventEmitter<WorkerLinkEvents> {
  private readonly options: WorkerLinkOptions;
  private readonly concurrency: number;
  private readonly log: (line: string) => void;
  private readonly writeLog: (line: string) => void;
  /** Lines written at the end of the event-loop turn (see {@link logSoon}). */
  private deferredLines: string[] = [];
  private readonly offeredModels: Set<string>;
  private readonly stopController = new AbortController();
  private currentState: WorkerLinkState = "idle";
  private session: Session | undefined;
  private activeJobs = 0;
  private runPromise: Promise<void> | undefined;
  private stopPromise: Promise<void> | undefined;
  private lastWelcome: Welcome | undefined;

  constructor(options: WorkerLinkOptions) {
    super();
    if (options.offers.length === 0) throw new Error("WorkerLink needs at least one offer");
    this.options = options;
    this.concurrency = Math.max(1, options.concurrency ?? 1);
    this.writeLog = options.log ?? ((line) => process.stderr.write(`${new Date().toISOString()} ${line}\n`));
    // Deferred lines first, so that the log keeps its order.
    this.log = (line) => {
      this.flushLog();
      this.writeLog(line);
    };
    this.offeredModels = new Set(options.offers.map((offer) => offer.model));
  }

  /** The current state. */
  get state(): WorkerLinkState {
    return this.currentState;
  }

  /** The Welcome of the current (or last) stream. */
  get welcome(): Welcome | undefined {
    return this.lastWelcome;
  }

  /** Jobs running now (including ones still winding down after their stream was lost). */
  get runningJobs(): number {
    return this.activeJobs;
  }

  /**
   * Settles when the link has stopped for good: resolves after stop(), rejects with
   * {@link WorkerRejectedError} when the server rejected the token. Calling it starts nothing.
   */
  get done(): Promise<void> {
    if (!this.runPromise) throw new Error("WorkerLink.done: start() was not called");
    return this.runPromise;
  }

  /** Starts connecting (and reconnecting). Returns `done`. */
  start(): Promise<void> {
    if (!this.runPromise) {
      this.runPromise = this.run();
      // `done` is for whoever wants it; do not crash the process if nobody listens.
      this.runPromise.catch(() => undefined);
    }
    return this.runPromise;
  }

  /**
   * Stops gracefully: sends Goodbye, lets running jobs finish (up to `stopGraceMs`, then cancels
   * them and reports them failed), closes the stream and stops reconnecting. Idempotent.
   */
  stop(reason = "worker shutting down"): Promise<void> {
    this.stopPromise ??= this.doStop(reason);
    return this.stopPromise;
  }

  /** Cancels every running job now (e.g. a second Ctrl-C); stop() then completes quickly. */
  cancelAllJobs(): void {
    const session = this.session;
    if (!session) return;
    for (const job of session.jobs.values()) this.abortJob(job, "stop", "worker stopped");
  }

  // ---------------------------------------------------------------------------------------------
  // Connection loop

  private async run(): Promise<void> {
    const initialMs = this.options.backoff?.initialMs ?? 500;
    const maxMs = this.options.backoff?.maxMs ?? 30_000;
    const random = this.options.random ?? Math.random;
    let backoffMs = initialMs;
    let attempt = 0;
    try {
      while (!this.stopController.signal.aborted) {
        attempt += 1;
        const { welcomed, reason, fatal } = await this.connectOnce(attempt);
        if (fatal) throw fatal;
        if (this.stopController.signal.aborted) break;
        this.log(`disconnected: ${reason}`);
        this.emit("disconnected", { reason });
        if (welcomed) backoffMs = initialMs;
        const delayMs = Math.round(backoffMs / 2 + (random() * backoffMs) / 2);
        backoffMs = Math.min(backoffMs * 2, maxMs);
        this.setState("backoff");
        this.log(`retrying in ${(delayMs / 1000).toFixed(1)} s`);
        this.emit("retrying", { delayMs, attempt });
        await sleep(delayMs, this.stopController.signal);
      }
      this.setState("stopped");
      this.log("stopped");
      this.emit("stopped");
    } catch (error) {
      this.setState("failed");
      this.log(`giving up: ${error instanceof Error ? error.message : String(error)}`);
      throw error;
    }
  }

  /** One stream, from Hello to its end. */
  private async connectOnce(
    attempt: number,
  ): Promise<{ welcomed: boolean; reason: string; fatal?: WorkerRejectedError }> {
    const { server } = this.options;
    this.setState("connecting");
    this.log(`connecting to ${server}${attempt > 1 ? ` (attempt ${attempt})` : ""}`);
    this.emit("connecting", { attempt });

    // A session manager per stream: when the stream ends its HTTP/2 connection is closed with it,
    // so nothing lingers (a shared manager would keep an idle connection open for 15 minutes).
    const sessionManager = new Http2SessionManager(server, {
      pingIntervalMs: this.options.pingIntervalMs ?? 30_000,
      pingTimeoutMs: 15_000,
    });
    const transport = createGrpcTransport({
      baseUrl: server,
      sessionManager,
      readMaxBytes: MAX_MESSAGE_BYTES,
      writeMaxBytes: MAX_MESSAGE_BYTES,
    });
    const client = createClient(WorkerService, transport);

    let markEnded!: () => void;
    const session: Session = {
      outbound: new AsyncQueue<ConnectRequest>(),
      abort: new AbortController(),
      draining: false,
      jobs: new Map(),
      ended: new Promise<void>((resolve) => {
        markEnded = resolve;
      }),
    };
    this.session = session;
    const onStop = () => {
      if (!session.welcome) session.abort.abort(new Error("worker stopped"));
    };
    this.stopController.signal.addEventListener("abort", onStop, { once: true });
    const welcomeTimer = setTimeout(
      () => session.abort.abort(new Error("no Welcome from the server")),
      this.options.welcomeTimeoutMs ?? 30_000,
    );

    session.outbound.push(
      create(ConnectRequestSchema, {
        message: {
          case: "hello",
          value: {
            workerToken: this.options.token,
            agentVersion: AGENT_VERSION,
            workerName: this.options.name ?? "",
            offers: this.options.offers.map(toOffer),
            protocolVersion: PROTOCOL_VERSION,
          },
        },
      }),
    );

    let reason = "the server closed the stream";
    let fatal: WorkerRejectedError | undefined;
    try {
      for await (const response of client.connect(takenFrom(session.outbound), {
        signal: session.abort.signal,
      })) {
        if (response.message.case === "welcome" && !session.welcome) clearTimeout(welcomeTimer);
        this.handleResponse(session, response);
        if (session.rejected) break;
      }
      if (session.rejected) {
        const { code, message } = session.rejected;
        reason = `rejected: ${RejectCode[code] ?? code}${message ? `: ${message}` : ""}`;
        const advice = FINAL_REJECTS.get(code);
        if (advice !== undefined) {
          fatal = new WorkerRejectedError(
            code,
            `the server rejected this worker (${RejectCode[code]}): ${message || "no reason given"}; ` +
              `${advice}; not reconnecting`,
          );
        }
      }
    } catch (error) {
      if (session.abort.signal.aborted && session.abort.signal.reason instanceof Error) {
        reason = session.abort.signal.reason.message;
      } else {
        reason = describeError(error);
      }
    } finally {
      clearTimeout(welcomeTimer);
      if (session.heartbeat) clearInterval(session.heartbeat);
      this.stopController.signal.removeEventListener("abort", onStop);
      session.outbound.close();
      // Jobs of this stream cannot report anymore: the control plane fails them over.
      for (const job of session.jobs.values()) this.abortJob(job, "disconnect", "stream closed");
      session.abort.abort(new Error("stream finished"));
      sessionManager.abort();
      if (this.session === session) this.session = undefined;
      markEnded();
    }
    return fatal ? { welcomed: !!session.welcome, reason, fatal } : { welcomed: !!session.welcome, reason };
  }

  private handleResponse(session: Session, response: ConnectResponse): void {
    const message = response.message;
    if (!session.welcome && message.case !== "welcome" && message.case !== "reject") {
      this.log(`protocol error: received ${message.case ?? "an empty message"} before Welcome; ignored`);
      return;
    }
    switch (message.case) {
      case "welcome":
        this.onWelcome(session, message.value);
        return;
      case "jobAssign":
        this.onJobAssign(session, message.value);
        return;
      case "jobCancel":
        this.onJobCancel(session, message.value);
        return;
      case "scoreAssign":
        this.onScoreAssign(session, message.value);
        return;
      case "jobWindow":
        // Acknowledgements for a job that already ended are normal (the consumer reads behind the
        // worker) and carry nothing to do.
        session.jobs.get(message.value.jobId)?.outbox.acknowledge(message.value.acknowledgedSequence);
        return;
      case "drain":
        session.draining = true;
        this.log(
          `drain requested${message.value.reason ? ` (${message.value.reason})` : ""}: finishing ` +
            `${session.jobs.size} running job(s), accepting no new ones`,
        );
        this.emit("drain", message.value);
        return;
      case "ping":
        this.send(session, {
          case: "heartbeat",
          value: { ...this.load(session), pingNonce: message.value.nonce },
        });
        return;
      case "reject": {
        session.rejected = message.value;
        const { code } = message.value;
        const hint = FINAL_REJECTS.has(code) ? "; will not reconnect" : "; will reconnect";
        this.log(
          `rejected by the server: ${RejectCode[code] ?? code}${message.value.message ? `: ${message.value.message}` : ""}${hint}`,
        );
        this.emit("rejected", message.value);
        return;
      }
      default:
        this.log("protocol error: received an empty or unknown message; ignored");
    }
  }

  private onWelcome(session: Session, welcome: Welcome): void {
    if (session.welcome) {
      this.log("protocol error: a second Welcome on the same stream; ignored");
      return;
    }
    session.welcome = welcome;
    this.lastWelcome = welcome;
    const intervalMs = welcome.heartbeatIntervalMs || (this.options.defaultHeartbeatMs ?? 10_000);
    session.heartbeat = setInterval(() => {
      this.send(session, { case: "heartbeat", value: this.load(session) });
    }, intervalMs);
    session.heartbeat.unref();
    this.setState("connected");
    const offers = (
      welcome.acceptedOffers.length > 0 ? welcome.acceptedOffers : this.options.offers.map(toOffer)
    )
      .map(
        (o) =>
          `${o.model} @ ${formatCredits(o.pricePerMillionInput)}/${formatCredits(o.pricePerMillionOutput)} credits per 1M in/out`,
      )
      .join(", ");
    this.log(
      `connected as worker ${welcome.workerId} session ${welcome.sessionId} ` +
        `(heartbeat every ${intervalMs / 1000} s; offers: ${offers})`,
    );
    this.emit("welcomed", welcome);
  }

  // ---------------------------------------------------------------------------------------------
  // Jobs

  private onJobAssign(session: Session, assign: JobAssign): void {
    const { jobId, model } = assign;
    const refuse = (code: JobFailureCode, message: string) => {
      this.log(`job ${jobId} refused: ${JobFailureCode[code]}: ${message}`);
      this.send(session, { case: "jobFailed", value: { jobId, code, message } });
    };
    if (session.jobs.has(jobId)) {
      this.log(`protocol error: job ${jobId} assigned twice; ignored`);
      return;
    }
    if (this.stopController.signal.aborted) {
      refuse(JobFailureCode.OVERLOADED, "the worker is shutting down");
      return;
    }
    if (session.draining) {
      refuse(JobFailureCode.OVERLOADED, "the worker is draining");
      return;
    }
    if (this.activeJobs >= this.concurrency) {
      refuse(
        JobFailureCode.OVERLOADED,
        `the worker is running ${this.activeJobs} of ${this.concurrency} jobs`,
      );
      return;
    }
    if (!this.offeredModels.has(model)) {
      refuse(JobFailureCode.MODEL_UNAVAILABLE, `model "${model}" is not served by this worker`);
      return;
    }
    const deadline = Number(assign.deadlineUnixMs);
    if (deadline > 0 && deadline <= Date.now()) {
      refuse(JobFailureCode.TIMEOUT, "the deadline has already passed");
      return;
    }
    let request: Omit<GenerateRequest, "signal">;
    try {
      request = toGenerateRequest(assign);
    } catch (error) {
      refuse(JobFailureCode.INVALID_INPUT, error instanceof Error ? error.message : String(error));
      return;
    }

    let markSettled!: () => void;
    const job: RunningJob = {
      id: jobId,
      model,
      controller: new AbortController(),
      outbox: new JobOutbox({
        window: session.welcome?.jobWindowChunks ?? 0,
        maxChunkBytes: session.welcome?.maxChunkBytes ?? 0,
        bufferBytes: this.options.jobBufferBytes ?? 64 * 1024,
        maxWaitingForLink: LINK_QUEUE_CHUNKS,
        send: (chunk) => {
          const message = create(ConnectRequestSchema, {
            message: { case: "jobChunk", value: toJobChunk(jobId, chunk) },
          });
          whenTaken.set(message, () => job.outbox.taken());
          session.outbound.push(message);
        },
      }),
      startedAt: performance.now(),
      settled: new Promise<void>((resolve) => {
        markSettled = resolve;
      }),
    };
    session.jobs.set(jobId, job);
    this.activeJobs += 1;
    this.send(session, { case: "jobAccepted", value: { jobId } });
    this.logSoon(`job ${jobId} started: model ${model}, ${describeJob(request)}`);
    this.emit("job-started", { jobId, model });

    const deadlineTimer =
      deadline > 0
        ? setTimeout(() => this.abortJob(job, "timeout", "deadline passed"), deadline - Date.now())
        : undefined;
    this.runJob(session, job, request)
      .catch((error: unknown) => this.log(`internal error in job ${jobId}: ${describeError(error)}`))
      .finally(() => {
        if (deadlineTimer) clearTimeout(deadlineTimer);
        session.jobs.delete(jobId);
        this.activeJobs -= 1;
        markSettled();
      });
  }

  /**
   * A line written once this turn of the event loop ends: the log is written synchronously (a
   * pipe, a terminal), which a job's start should not wait for before it asks its engine.
   */
  private logSoon(line: string): void {
    if (this.deferredLines.push(line) === 1) setImmediate(() => this.flushLog());
  }

  private flushLog(): void {
    if (this.deferredLines.length === 0) return;
    const lines = this.deferredLines;
    this.deferredLines = [];
    for (const line of lines) this.writeLog(line);
  }

  private async runJob(
    session: Session,
    job: RunningJob,
    request: Omit<GenerateRequest, "signal">,
  ): Promise<void> {
    let result: GenerationResult | undefined;
    let failure: unknown;
    try {
      const generation = this.options.engine.generate({ ...request, signal: job.controller.signal });
      let first = true;
      result = await runGeneration(generation, (piece) => {
        const waiting = job.outbox.push(piece);
        if (!first) return waiting;
        first = false;
        // The first chunk's HTTP/2 frame leaves only when this turn of the event loop ends: an
        // engine that answered in a burst would otherwise have the whole burst parsed and queued
        // first. One turn per job lets the first token go out at once.
        return waiting ?? new Promise<void>((resolve) => setImmediate(resolve));
      });
      // JobDone names the last chunk, so every chunk goes out first; cancel releases this wait.
      await job.outbox.drained();
    } catch (error) {
      failure = error;
    }
    // Whatever could not be sent (the job failed or was cancelled) is not sent anymore.
    job.outbox.close();

    const tokens = job.outbox.sentTokens;
    const summary = {
      jobId: job.id,
      model: job.model,
      tokens,
      chunks: Number(job.outbox.lastSequence),
      durationMs: performance.now() - job.startedAt,
    };
    const seconds = summary.durationMs / 1000;
    const stats = `${tokens} tokens in ${seconds.toFixed(2)} s (${seconds > 0 ? (tokens / seconds).toFixed(1) : "∞"} tok/s)`;

    if (job.reason === "disconnect") {
      this.log(`job ${job.id} abandoned: the stream closed (${stats})`);
      this.emit("job-finished", { ...summary, outcome: "abandoned" });
      return;
    }
    let code: JobFailureCode | undefined;
    let message = "";
    if (job.reason === "timeout") {
      code = JobFailureCode.TIMEOUT;
      message = "the job's deadline passed";
    } else if (job.reason === "stop") {
      code = JobFailureCode.ENGINE_ERROR;
      message = "the worker is shutting down";
    } else if (job.reason !== "cancel" && failure !== undefined) {
      code = failure instanceof EngineError ? failureCodeOf(failure) : JobFailureCode.ENGINE_ERROR;
      message = failure instanceof Error ? failure.message : String(failure);
    }
    if (code !== undefined) {
      this.send(session, { case: "jobFailed", value: { jobId: job.id, code, message } });
      this.log(`job ${job.id} failed: ${JobFailureCode[code]}: ${message} (${stats})`);
      this.emit("job-finished", { ...summary, outcome: "failed", failureCode: code, message });
      return;
    }

    const finishReason: EngineFinishReason =
      job.reason === "cancel" ? "cancelled" : (result?.finishReason ?? "stop");
    const usage = result?.usage;
    this.send(session, {
      case: "jobDone",
      value: {
        jobId: job.id,
        finishReason: toProtoFinishReason(finishReason),
        lastSequence: job.outbox.lastSequence,
        ...(usage
          ? {
              usage: create(UsageSchema, {
                promptTokens: usage.promptTokens,
                completionTokens: usage.completionTokens,
              }),
            }
          : {}),
      },
    });
    const cancelNote = job.reason === "cancel" && job.cancelMessage ? ` (${job.cancelMessage})` : "";
    this.log(`job ${job.id} done: ${finishReason}${cancelNote}, ${stats}`);
    this.emit("job-finished", { ...summary, outcome: "done", finishReason });
  }

  /**
   * A verifier job (ScoreAssign): scores the tokens on the engine and answers with one ScoreResult.
   * It takes no slot: it is one prefill pass, and the control plane sends it only to workers it
   * trusts. An engine that cannot score, or tokens it cannot score, give a ScoreResult with `error`.
   */
  private onScoreAssign(session: Session, assign: ScoreAssign): void {
    const { scoreId } = assign;
    const started = performance.now();
    const reply = (value: {
      scores?: { logprob: number; rank: number; top: { tokenId: number; logprob: number }[] }[];
      promptTokens?: number;
      text?: string;
      error?: string;
      unsupported?: boolean;
    }) =>
      this.send(session, {
        case: "scoreResult",
        value: { scoreId, elapsedMs: performance.now() - started, ...value },
      });
    const engine = this.options.engine;
    if (!engine.score || !assign.job) {
      reply(
        engine.score
          ? { error: "ScoreAssign without a job" }
          : { error: `the ${engine.name} engine cannot score tokens`, unsupported: true },
      );
      this.log(
        `cannot score ${scoreId}: ${engine.score ? "no job" : `the ${engine.name} engine has no teacher forcing`}`,
      );
      return;
    }
    let request: Omit<GenerateRequest, "signal">;
    try {
      request = toGenerateRequest(assign.job);
    } catch (error) {
      reply({ error: error instanceof Error ? error.message : String(error) });
      return;
    }
    engine
      .score({
        request,
        tokenIds: [...assign.tokenIds],
        positions: [...assign.positions],
        topK: Math.min(assign.job.tokenDetail?.topK ?? 0, 20),
        signal: session.abort.signal,
      })
      .then(
        (outcome) => {
          reply({
            scores: outcome.scores.map((score) => ({
              logprob: score.logprob,
              rank: score.rank,
              top: score.top,
            })),
            promptTokens: outcome.promptTokens,
            text: outcome.text,
          });
          this.log(
            `scored ${assign.tokenIds.length} token(s) for ${scoreId} in ${(performance.now() - started).toFixed(1)} ms`,
          );
        },
        (error: unknown) => reply({ error: error instanceof Error ? error.message : String(error) }),
      );
  }

  private onJobCancel(session: Session, cancel: JobCancel): void {
    const job = session.jobs.get(cancel.jobId);
    if (!job) {
      this.log(`ignoring JobCancel for unknown job ${cancel.jobId}`);
      return;
    }
    this.log(`job ${cancel.jobId} cancel requested${cancel.reason ? `: ${cancel.reason}` : ""}`);
    this.abortJob(job, "cancel", cancel.reason);
  }

  private abortJob(job: RunningJob, reason: CancelReason, message: string): void {
    if (job.reason === undefined || reason === "disconnect") {
      job.reason = reason;
      job.cancelMessage = message;
    }
    job.controller.abort(new Error(message));
    // A job waiting for its window is released; its unsent text is dropped.
    job.outbox.close();
  }

  // ---------------------------------------------------------------------------------------------
  // Stopping

  private async doStop(reason: string): Promise<void> {
    if (!this.runPromise) {
      this.stopController.abort();
      this.setState("stopped");
      return;
    }
    const session = this.session;
    const wasConnected = this.currentState === "connected";
    this.setState("stopping");
    this.stopController.abort();
    if (session?.welcome && wasConnected) {
      this.send(session, { case: "goodbye", value: { reason } });
      const running = [...session.jobs.values()];
      if (running.length > 0) {
        this.log(`stopping: Goodbye sent, waiting for ${running.length} running job(s)`);
        const graceMs = this.options.stopGraceMs ?? 30_000;
        const allSettled = Promise.all(running.map((job) => job.settled));
        const inTime = await raceTimeout(allSettled, graceMs, session.ended);
        if (!inTime) {
          this.log(
            `stopping: cancelling ${session.jobs.size} job(s) still running after ${graceMs / 1000} s`,
          );
          for (const job of session.jobs.values()) this.abortJob(job, "stop", "worker stopped");
          await raceTimeout(Promise.all(running.map((job) => job.settled)), 5_000, session.ended);
        }
      } else {
        this.log("stopping: Goodbye sent");
      }
      // Half-close our side; the server ends the call. Abort if it does not within a few seconds.
      session.outbound.close();
      const closed = await raceTimeout(session.ended, this.options.closeTimeoutMs ?? 3_000);
      if (!closed) session.abort.abort(new Error("worker stopped"));
    } else {
      session?.abort.abort(new Error("worker stopped"));
    }
    await this.runPromise.catch(() => undefined);
  }

  // ---------------------------------------------------------------------------------------------
  // Helpers

  private send(session: Session, message: MessageInitShape<typeof ConnectRequestSchema>["message"]): void {
    session.outbound.push(create(ConnectRequestSchema, { message }));
  }

  private load(session: Session): { activeJobs: number; queuedJobs: number } {
    return { activeJobs: session.jobs.size, queuedJobs: 0 };
  }

  private setState(state: WorkerLinkState): void {
    if (this.currentState === state) return;
    this.currentState = state;
    this.emit("state", state);
  }
}

function toOffer(spec: OfferSpec): Offer {
  return create(OfferSchema, {
    model: spec.model,
    pricePerMillionInput: spec.pricePerMillionInput,
    pricePerMillionOutput: spec.pricePerMillionOutput,
    advertisedTokensPerSecond: spec.tokensPerSecond,
    maxConcurrency: spec.maxConcurrency,
    contextLength: spec.contextLength ?? 0,
    quantization: spec.quantization ?? "",
    engine: spec.engine ?? "",
    weightsSha256: spec.weightsSha256 ?? "",
    engineVersion: spec.engineVersion ?? "",
    ...(spec.capabilities ? { capabilities: create(CapabilitiesSchema, spec.capabilities) } : {}),
  });
}

/**
 * Translates a JobAssign into what the engine is asked (without the job's abort signal). Throws
 * an Error saying what is wrong when the assignment is malformed (a schema that is not JSON).
 */
function toGenerateRequest(assign: JobAssign): Omit<GenerateRequest, "signal"> {
  const request: Omit<GenerateRequest, "signal"> = {
    model: assign.model,
    messages: assign.messages.map((m) => ({
      role: m.role,
      content: m.content,
      ...(m.name ? { name: m.name } : {}),
      ...(m.toolCalls.length > 0
        ? { toolCalls: m.toolCalls.map(({ id, name, arguments: args }) => ({ id, name, arguments: args })) }
        : {}),
      ...(m.toolCallId ? { toolCallId: m.toolCallId } : {}),
      ...(m.imageUrls.length > 0 ? { imageUrls: [...m.imageUrls] } : {}),
    })),
    sampling: toEngineSampling(assign),
    maxTokens: assign.maxTokens,
  };
  if (assign.prompt !== "") request.prompt = assign.prompt;
  if (assign.tools.length > 0) {
    request.tools = assign.tools.map(
      (tool): EngineTool => ({
        name: tool.name,
        description: tool.description,
        ...(tool.parametersJson
          ? { parameters: parseJsonObject(tool.parametersJson, `the parameters of tool "${tool.name}"`) }
          : {}),
        strict: tool.strict,
      }),
    );
    request.parallelToolCalls = assign.parallelToolCalls;
    if (assign.toolChoice)
      request.toolChoice = toEngineToolChoice(assign.toolChoice.mode, assign.toolChoice.functionName);
  }
  const format = toEngineResponseFormat(assign);
  if (format) request.responseFormat = format;
  if (assign.wantLogprobs) request.logprobs = { top: assign.topLogprobs };
  if (assign.tokenDetail) request.tokenDetail = { topK: Math.min(assign.tokenDetail.topK, 20) };
  return request;
}

function toEngineToolChoice(mode: string, functionName: string): EngineToolChoice {
  switch (mode) {
    case "":
    case "auto":
      return { mode: "auto" };
    case "none":
    case "required":
      return { mode };
    case "function":
      if (!functionName) throw new Error('tool_choice "function" names no function');
      return { mode: "function", functionName };
    default:
      throw new Error(`unknown tool_choice mode "${mode}"`);
  }
}

function toEngineResponseFormat(assign: JobAssign): EngineResponseFormat | undefined {
  const format = assign.responseFormat;
  if (!format) return undefined;
  switch (format.type) {
    case ResponseFormat_Type.UNSPECIFIED:
      return undefined;
    case ResponseFormat_Type.TEXT:
      return { type: "text" };
    case ResponseFormat_Type.JSON_OBJECT:
      return { type: "json_object" };
    case ResponseFormat_Type.JSON_SCHEMA:
      return {
        type: "json_schema",
        name: format.name,
        schema: parseJsonObject(format.schemaJson, "the response_format schema"),
        strict: format.strict,
      };
    default:
      throw new Error(`unknown response_format type ${format.type}`);
  }
}

function parseJsonObject(text: string, what: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not valid JSON: ${error instanceof Error ? error.message : String(error)}`);
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new Error(`${what} is not a JSON object`);
  }
  return value as Record<string, unknown>;
}

/**
 * Chunks of one job that may wait for the link (sent, not yet taken for writing) before the job's
 * next pieces are merged into one chunk. One: a token that comes while the link is idle leaves at
 * once, the next one waits in the queue as its own chunk, and what comes after it, while the link
 * is still busy, is merged. (With 4, an engine's burst left as 6 one-token chunks before merging
 * began: in alternated benchmark runs, 1 took 10-15 % off the relaying processes' CPU per token.)
 */
const LINK_QUEUE_CHUNKS = 1;

/** What to tell when the transport takes a message off the outbound queue (a job's outbox). */
const whenTaken = new WeakMap<ConnectRequest, () => void>();

/**
 * The outbound queue as the transport reads it, telling each message's {@link whenTaken} as it is
 * taken. connect-node asks for the next message only once the previous one is written, so a job's
 * chunk that waits here means the link is busy: its outbox merges what comes meanwhile.
 */
async function* takenFrom(
  queue: AsyncQueue<ConnectRequest>,
): AsyncGenerator<ConnectRequest, void, undefined> {
  for await (const message of queue) {
    const hook = whenTaken.get(message);
    if (hook) {
      whenTaken.delete(message);
      hook();
    }
    yield message;
  }
}

/** The JobChunk of an outgoing chunk: tool-call fragments and log-probabilities exactly as the engine gave them. */
function toJobChunk(jobId: string, chunk: OutgoingChunk): MessageInitShape<typeof JobChunkSchema> {
  return {
    jobId,
    sequence: chunk.sequence,
    text: chunk.text,
    tokenCount: chunk.tokenCount,
    toolCalls: chunk.toolCalls.map((call) => ({
      index: call.index,
      id: call.id ?? "",
      name: call.name ?? "",
      arguments: call.arguments,
    })),
    logprobs: chunk.logprobs.map((entry) => ({
      token: entry.token,
      logprob: entry.logprob,
      topLogprobs: entry.topLogprobs.map(({ token, logprob }) => ({ token, logprob })),
    })),
    tokenDetails: (chunk.tokenDetails ?? []).map((detail) => ({
      tokenId: detail.tokenId,
      logprob: detail.logprob,
      top: detail.top.map(({ tokenId, logprob }) => ({ tokenId, logprob })),
    })),
  };
}

/** One line about what a job asks, for the log. */
function describeJob(request: Omit<GenerateRequest, "signal">): string {
  const parts = [
    `max_tokens ${request.maxTokens || "unset"}`,
    request.prompt !== undefined ? "raw prompt" : `${request.messages.length} message(s)`,
  ];
  if (request.tools) parts.push(`${request.tools.length} tool(s)`);
  if (request.responseFormat && request.responseFormat.type !== "text")
    parts.push(request.responseFormat.type);
  if (request.logprobs) parts.push(`logprobs (top ${request.logprobs.top})`);
  return parts.join(", ");
}

function toEngineSampling(assign: JobAssign): EngineSampling {
  const s = assign.sampling;
  const sampling: EngineSampling = {};
  if (!s) return sampling;
  if (s.temperature !== undefined) sampling.temperature = s.temperature;
  if (s.topP !== undefined) sampling.topP = s.topP;
  if (s.stop.length > 0) sampling.stop = [...s.stop];
  if (s.seed !== undefined) {
    const seed = Number(s.seed);
    if (Number.isSafeInteger(seed)) sampling.seed = seed;
  }
  if (s.presencePenalty !== undefined) sampling.presencePenalty = s.presencePenalty;
  if (s.frequencyPenalty !== undefined) sampling.frequencyPenalty = s.frequencyPenalty;
  return sampling;
}

function toProtoFinishReason(reason: EngineFinishReason): FinishReason {
  switch (reason) {
    case "stop":
      return FinishReason.STOP;
    case "length":
      return FinishReason.LENGTH;
    case "content_filter":
      return FinishReason.CONTENT_FILTER;
    case "cancelled":
      return FinishReason.CANCELLED;
    case "tool_calls":
      return FinishReason.TOOL_CALLS;
  }
}

function failureCodeOf(error: EngineError): JobFailureCode {
  switch (error.code) {
    case "invalid_input":
      return JobFailureCode.INVALID_INPUT;
    case "model_unavailable":
      return JobFailureCode.MODEL_UNAVAILABLE;
    case "overloaded":
      return JobFailureCode.OVERLOADED;
    default:
      return JobFailureCode.ENGINE_ERROR;
  }
}

function describeError(error: unknown): string {
  if (error instanceof ConnectError) {
    const code = Code[error.code] ?? String(error.code);
    return `${code}: ${error.rawMessage}`;
  }
  return error instanceof Error ? error.message : String(error);
}

function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve) => {
    if (signal.aborted) return resolve();
    const timer = setTimeout(done, ms);
    function done() {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });
}

/** Resolves true when `promise` settles within `ms` (or `alsoDone` settles first), false on timeout. */
async function raceTimeout(
  promise: Promise<unknown>,
  ms: number,
  alsoDone?: Promise<unknown>,
): Promise<boolean> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<boolean>((resolve) => {
    timer = setTimeout(() => resolve(false), ms);
  });
  try {
    const candidates: Promise<boolean>[] = [promise.then(() => true), timeout];
    if (alsoDone) candidates.push(alsoDone.then(() => true));
    return await Promise.race(candidates);
  } finally {
    clearTimeout(timer);
  }
}

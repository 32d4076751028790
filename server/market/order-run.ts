/**
 * One order's life as an explicit state machine:
 *
 *   admitted ──dispatch──▶ dispatched(attempt n) ──first token──▶ streaming ──done──▶ completed
 *                │   ▲                  │                              │
 *                │   └────fall back─────┘                              ├──consumer gone──▶ cancelled
 *                └───────────────────────────── any ──────────────────┴──failure────────▶ failed
 *
 * Every transition has a name, is logged with its reason (at debug; failed and cancelled at info),
 * and is decided synchronously: an attempt is superseded before any `await`, so nothing a
 * superseded attempt sends (chunk, done, failure, stream close) can end, settle or re-route the
 * order, and one failed attempt causes at most one fallback. The order's money is settled exactly once, after the outcome is decided and the
 * consumer has taken what it will take; the store computes it from the order row and the token
 * counts passed here (see store-port.ts), and a failed settlement is retried until it succeeds.
 *
 * Speculative dispatch (`OrderRunInput.hold`): the first attempt may be dispatched while the hold
 * is still being placed, so the time to first token pays the slower of the two, not their sum.
 * The hold gates everything that involves the consumer or money, never the worker: chunks are
 * counted and buffered as they arrive, and the state machine runs as above, but
 * - no delta reaches the consumer, and no checkpoint is taken, before the hold has committed;
 * - no settlement and no fallback (which moves the hold, so needs the order row) start before the
 *   hold is decided: they wait for it;
 * - a refused hold (insufficient credits, or any error) ends the order `failed` with no order row
 *   and nothing to settle: the attempt is cancelled on the worker (its work goes unpaid), its
 *   reputation is untouched, and the marketplace answers the consumer (or tries the next worker);
 * - a consumer leaving, a timeout or a forced stop while the hold is pending decide the outcome at
 *   once as usual (the worker is stopped); the settlement then waits for the hold, and settles the
 *   order at 0 if the hold committed, or nothing if it was refused. A crash before the commit
 *   leaves no order row: the worker's work is simply unpaid.
 *
 * Billing never takes a worker's word: a chunk counts min(token_count, UTF-8 bytes of its text)
 * tokens, capped in total at max_tokens; a streamed order bills the tokens the consumer actually
 * took (chunks handed to the consumer's socket), a non-streamed one bills only when completed.
 * For a model with a registered tokenizer (server/models/) the platform's own count replaces the
 * chunk's token_count: the prompt as the engine renders it, and the delivered text counted exactly
 * at settlement, still bounded by its UTF-8 bytes and max_tokens; the worker's counts only raise
 * trust signals, and the order is recorded as verified.
 */

import type { TokenLogprob, ToolCallDelta } from "../../common/generation.js";
import { randomBase64url } from "../../common/random-id.js";
import type { TokenCountSource } from "../models/model-registry.js";
import { TokenCounter } from "../models/token-counter.js";
import { MarketError } from "./errors.js";
import type { Candidate } from "./matcher.js";
import type { FinishReason, JobPiece, JobSink, JobSpec, SlotLease, WorkerRegistry } from "./registry.js";
import type { AttemptWatch } from "./reputation.js";
import type { MarketStore, OrderCheckpoint, OrderRecord, SettleOrderInput } from "./store-port.js";

export interface MarketLogger {
  /** Detail an operator turns on with --log-level debug (absent: dropped). */
  debug?(fields: object, message: string): void;
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

export type OrderState = "admitted" | "dispatched" | "streaming" | "completed" | "cancelled" | "failed";
type FinalState = Exclude<OrderState, "admitted" | "dispatched" | "streaming">;

/**
 * What the consumer sees of an order: deltas, then exactly one `finish` or `error`. A delta may
 * carry text, tool-call fragments (OpenAI's streaming shape) and, when asked for, the log-
 * probabilities of its tokens.
 */
export type RunEvent =
  | { type: "delta"; text: string; toolCalls: ToolCallDelta[]; logprobs: TokenLogprob[] }
  | { type: "finish"; finishReason: ConsumerFinishReason; order: OrderRecord | null }
  | { type: "error"; error: MarketError; order: OrderRecord | null };

/** OpenAI's finish reasons (the `error` of in-band errors is the front door's). */
export type ConsumerFinishReason = "stop" | "length" | "content_filter" | "tool_calls";

/** A slot reserved on a worker, with the offer it was matched on. */
export interface Acquired {
  lease: SlotLease;
  candidate: Candidate;
}

export interface OrderRunDeps {
  store: MarketStore;
  registry: WorkerRegistry;
  log: MarketLogger;
  firstTokenTimeoutMs: number;
  jobTimeoutMs: number;
  /**
   * Finds the next worker for a fallback (waiting in the admission queue if every one is busy),
   * skipping `excluded`. Rejects when none is left.
   */
  acquireFallback(excluded: ReadonlySet<string>): Promise<Acquired>;
  /**
   * The model registry: for a registered model the platform counts the prompt and the delivered
   * text itself and bills by that count; without one (or for another model) the order is unverified.
   */
  tokenCounts?: TokenCountSource;
}

export interface OrderRunInput {
  /**
   * The order as the store returned it, or (with `hold`) the terms the hold is being placed on:
   * the same id, worker, prices, max_tokens and prompt bound the committed row will carry.
   */
  order: OrderRecord;
  /**
   * Set for a speculative dispatch: the hold being placed (store.openOrder with `order`'s terms).
   * Resolves with the committed order, or rejects when the hold is refused (see the header).
   */
  hold?: Promise<OrderRecord>;
  first: Acquired;
  job: Omit<JobSpec, "jobId" | "maxTokens" | "deadlineUnixMs">;
  stream: boolean;
  allowFallbacks: boolean;
  /** Request parameters dropped because no worker supports them (`require_parameters: false`). */
  droppedParameters: readonly string[];
}

interface Attempt {
  n: number;
  jobId: string;
  lease: SlotLease;
  candidate: Candidate;
  /** Times the attempt's chunks and reports how it ended to the worker's reputation. */
  watch: AttemptWatch;
}

interface Delta {
  text: string;
  toolCalls: ToolCallDelta[];
  logprobs: TokenLogprob[];
  tokens: number;
  sequence: bigint;
  attempt: Attempt;
  /** With a registered tokenizer: the text the platform counts (tool calls included) and its bytes. */
  countedText?: string;
  bytes?: number;
}

/** How a speculative order's hold turned out (see {@link OrderRun.holdDecided}). */
export type HoldResult = { placed: true; order: OrderRecord } | { placed: false; error: unknown };

interface Outcome {
  status: FinalState;
  finishReason: ConsumerFinishReason | null;
  error: MarketError | null;
}

/** Settlement retries back off up to this. */
const MAX_SETTLE_BACKOFF_MS = 30_000;
/** How many settlement tries a consumer waits for before it is answered without the cost. */
const SETTLE_TRIES_BEFORE_ANSWERING = 3;
/** Trust signals kept per order at most. */
const MAX_TRUST_SIGNALS = 20;

function newJobId(): string {
  return `job_${randomBase64url(12)}`;
}

export class OrderRun implements AsyncIterable<RunEvent> {
  readonly orderId: string;
  readonly model: string;
  readonly createdAt: Date;
  readonly droppedParameters: readonly string[];
  /** Resolves once the order is settled in the store. */
  readonly settled: Promise<void>;

  /**
   * Resolves once the hold is decided (at once when it was placed before the run); never rejects.
   * Everything that involves the consumer or money waits for it (see the header).
   */
  readonly holdDecided: Promise<HoldResult>;

  private state: OrderState = "admitted";
  private order: OrderRecord;
  /** "pending" only for a speculative dispatch whose hold is being placed. */
  private hold: "pending" | "placed" | "refused";
  private attempt: Attempt | null = null;
  private attempts = 0;
  private readonly excluded = new Set<string>();
  /** Whether an attempt failed for a reason other than the worker being full. */
  private sawWorkerError = false;
  private readonly buffer: Delta[] = [];
  /** The delta the consumer is writing now: counted as delivered when it asks for the next. */
  private inFlight: Delta | null = null;
  /** Whether the consumer confirms its writes itself ({@link confirmWrites}). */
  private confirmsWrites = false;
  /** With confirmWrites: deltas handed out and not yet confirmed written, oldest first. */
  private readonly unconfirmed: Delta[] = [];
  /** With confirmWrites: deltas handed out so far. */
  private handedOutCount = 0;
  private wakeConfirmed: (() => void) | null = null;
  /** Tokens accepted from the current attempt's chunks (platform count). */
  private relayedTokens = 0;
  /** Tokens the consumer has taken. */
  private deliveredTokens = 0;
  private reportedUsage: { promptTokens: number; completionTokens: number } | null = null;
  private claimedTokens = 0;
  private readonly trustSignals: string[] = [];
  /** The registered model's tokenizer when the platform counts this order itself; null: unverified. */
  private counter: TokenCounter | null = null;
  /** With a counter: the prompt's tokens as the engine renders it. */
  private platformPromptTokens = 0;
  /** With a counter: the prompt's last characters, the context the completion is counted after. */
  private promptTail = "";
  /** With a counter: the last characters relayed (the context of each chunk's estimate). */
  private relayedTail = "";
  /** With a counter: what the consumer took, counted exactly at settlement, and its bytes. */
  private deliveredText = "";
  private deliveredBytes = 0;
  private firstTokenAt: Date | null = null;
  private outcome: Outcome | null = null;
  private terminal: RunEvent | null = null;
  private terminalTaken = false;
  private wake: (() => void) | null = null;
  private settling: Promise<OrderRecord | null> | null = null;
  private markSettled: () => void = () => {};
  private firstTokenTimer: NodeJS.Timeout | undefined;
  private readonly jobTimer: NodeJS.Timeout;
  private lastCheckpoint = -1;

  constructor(
    private readonly deps: OrderRunDeps,
    private readonly input: OrderRunInput,
  ) {
    this.order = input.order;
    this.counter = deps.tokenCounts?.counterFor(input.order.model) ?? null;
    if (this.counter) {
      try {
        const prompt = this.counter.renderPrompt(input.job);
        this.platformPromptTokens = prompt.tokens;
        this.promptTail = prompt.tail;
        this.relayedTail = prompt.tail;
      } catch (error) {
        // A conversation the template cannot render is billed as an unregistered model's would be.
        deps.log.warn(
          { orderId: input.order.id, err: String(error) },
          "prompt not countable; count unverified",
        );
        this.counter = null;
      }
    }
    this.orderId = input.order.id;
    this.model = input.order.model;
    this.createdAt = input.order.createdAt;
    this.droppedParameters = input.droppedParameters;
    this.settled = new Promise((resolve) => {
      this.markSettled = resolve;
    });
    this.jobTimer = setTimeout(() => this.timedOut(), deps.jobTimeoutMs);
    this.jobTimer.unref();
    if (input.hold) {
      this.hold = "pending";
      this.holdDecided = input.hold.then(
        (order) => {
          this.order = order;
          this.hold = "placed";
          this.notify();
          return { placed: true as const, order };
        },
        (error: unknown) => {
          this.holdRefused(error);
          return { placed: false as const, error };
        },
      );
    } else {
      this.hold = "placed";
      this.holdDecided = Promise.resolve({ placed: true, order: this.order });
    }
  }

  /** admitted → dispatched(1). */
  start(): void {
    this.dispatch(this.input.first, "admitted");
  }

  /** The consumer went away (or stopped reading): stop the worker, bill what it took. */
  cancel(reason: string): void {
    if (this.outcome) {
      // Decided already, but the consumer will not take the rest: settle for what it took.
      if (!this.settling) {
        this.buffer.length = 0;
        void this.settle();
        this.wakeConfirmedWaiter();
      }
      return;
    }
    this.finish({ status: "cancelled", finishReason: null, error: null }, reason, { drain: false });
  }

  /** The control plane stops and cannot wait: end the order now, billing what was delivered. */
  abort(reason: string): void {
    if (this.outcome) return;
    this.finish(
      { status: "failed", finishReason: null, error: new MarketError("shutting_down", reason, undefined, 5) },
      reason,
      { drain: false },
    );
  }

  /** The progress a crash must not lose, or null when nothing changed since the last call. */
  checkpoint(): OrderCheckpoint | null {
    if (this.hold !== "placed") return null;
    if (this.outcome || !this.input.stream || this.deliveredTokens === this.lastCheckpoint) return null;
    this.lastCheckpoint = this.deliveredTokens;
    return {
      orderId: this.orderId,
      promptTokens: 0,
      completionTokens: this.deliveredTokens,
      firstTokenAt: this.firstTokenAt,
    };
  }

  [Symbol.asyncIterator](): AsyncIterator<RunEvent> {
    return { next: () => this.next() };
  }

  /**
   * From now on the consumer confirms what it has written with {@link confirmWritten}, instead of
   * by asking for the next event: a consumer that coalesces its writes asks for more before it has
   * written. A delta still counts as delivered (and is billed) only once confirmed written, and the
   * order settles only once every delta handed out is confirmed, or the consumer is gone.
   */
  confirmWrites(): void {
    this.deliverInFlight();
    this.confirmsWrites = true;
  }

  /** How many deltas were handed out so far: the mark to pass to {@link confirmWritten}. */
  get handedOut(): number {
    return this.handedOutCount;
  }

  /** The consumer has written (to its socket) everything for the first `mark` deltas handed out. */
  confirmWritten(mark: number): void {
    while (this.unconfirmed.length > 0 && this.handedOutCount - this.unconfirmed.length < mark) {
      this.deliver(this.unconfirmed.shift() as Delta);
    }
    if (this.unconfirmed.length === 0) this.wakeConfirmedWaiter();
  }

  // --- consumer side --------------------------------------------------------------------------

  private async next(): Promise<IteratorResult<RunEvent>> {
    // Nothing reaches the consumer before the hold has committed (the marketplace hands the run
    // out only once it is decided; this keeps the guarantee the run's own).
    if (this.hold === "pending") await this.holdDecided;
    if (!this.confirmsWrites) this.deliverInFlight();
    for (;;) {
      if (this.terminalTaken) return { value: undefined, done: true };
      const delta = this.outcome?.status === "cancelled" ? undefined : this.buffer.shift();
      if (delta) {
        if (this.confirmsWrites) {
          this.unconfirmed.push(delta);
          this.handedOutCount += 1;
        } else {
          this.inFlight = delta;
        }
        return {
          value: { type: "delta", text: delta.text, toolCalls: delta.toolCalls, logprobs: delta.logprobs },
          done: false,
        };
      }
      if (this.outcome) {
        // Billing counts what was written: wait for the consumer's last writes to be confirmed
        // (or for the consumer to be gone, which starts the settlement).
        while (this.unconfirmed.length > 0 && !this.settling) {
          await new Promise<void>((resolve) => {
            this.wakeConfirmed = resolve;
          });
        }
        await this.settle();
        this.terminalTaken = true;
        return { value: this.terminal as RunEvent, done: false };
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
    }
  }

  private deliverInFlight(): void {
    const delta = this.inFlight;
    if (!delta) return;
    this.inFlight = null;
    this.deliver(delta);
  }

  private deliver(delta: Delta): void {
    if (this.outcome?.status === "cancelled") return;
    if (this.counter) {
      this.deliveredText += delta.countedText ?? "";
      this.deliveredBytes += delta.bytes ?? 0;
    }
    this.deliveredTokens += delta.tokens;
    if (delta.attempt === this.attempt) delta.attempt.lease.acknowledge(delta.sequence);
  }

  private wakeConfirmedWaiter(): void {
    const wake = this.wakeConfirmed;
    this.wakeConfirmed = null;
    wake?.();
  }

  private notify(): void {
    const wake = this.wake;
    this.wake = null;
    wake?.();
  }

  // --- worker side ----------------------------------------------------------------------------

  private dispatch(acquired: Acquired, from: OrderState): void {
    this.attempts += 1;
    const attempt: Attempt = {
      n: this.attempts,
      jobId: newJobId(),
      lease: acquired.lease,
      candidate: acquired.candidate,
      watch: this.deps.registry.reputation.watch(acquired.candidate.connection.workerId, this.model),
    };
    this.attempt = attempt;
    this.transition("dispatched", `attempt ${attempt.n} on ${acquired.candidate.connection.workerId}`, from);
    clearTimeout(this.firstTokenTimer);
    this.firstTokenTimer = setTimeout(() => {
      if (this.attempt === attempt && !this.outcome) attempt.watch.end("timeout");
      this.attemptFailed(attempt, `no token within ${this.deps.firstTokenTimeoutMs} ms`, "error");
    }, this.deps.firstTokenTimeoutMs);
    this.firstTokenTimer.unref();
    attempt.lease.assign(
      {
        ...this.input.job,
        jobId: attempt.jobId,
        orderId: this.orderId,
        maxTokens: this.order.maxTokens,
        deadlineUnixMs: this.createdAt.getTime() + this.deps.jobTimeoutMs,
      },
      this.sinkFor(attempt),
    );
  }

  /** Events of a superseded attempt (a worker the order already gave up on) are dropped. */
  private sinkFor(attempt: Attempt): JobSink {
    const current = () => this.attempt === attempt && this.outcome === null;
    return {
      chunk: (piece, sequence) => {
        if (current()) this.onChunk(attempt, piece, sequence);
      },
      done: (finishReason, usage) => {
        if (current()) this.onDone(finishReason, usage);
      },
      failed: (message, kind) => {
        if (current()) this.attemptFailed(attempt, message, kind);
      },
    };
  }

  private onChunk(attempt: Attempt, piece: JobPiece, sequence: bigint): void {
    const { text, tokenCount, toolCalls, logprobs } = piece;
    if (this.state === "dispatched") {
      clearTimeout(this.firstTokenTimer);
      this.firstTokenAt = new Date();
      this.transition("streaming", "first token", "dispatched");
    }
    // Tool calls are output the model produced too; a token is still at least one byte of it.
    let bytes = Buffer.byteLength(text);
    for (const call of toolCalls) {
      bytes +=
        Buffer.byteLength(call.arguments) +
        Buffer.byteLength(call.id ?? "") +
        Buffer.byteLength(call.name ?? "");
    }
    const claimed = Number.isFinite(tokenCount) && tokenCount > 0 ? Math.floor(tokenCount) : 0;
    this.claimedTokens += claimed;
    if (claimed > bytes) {
      this.signal(
        `chunk ${sequence} claimed ${claimed} tokens for ${bytes} bytes of output; counted ${bytes}`,
      );
    }
    const room = this.order.maxTokens - this.relayedTokens;
    if (room <= 0) {
      this.signal(`the worker went on past max_tokens (${this.order.maxTokens})`);
      this.finish({ status: "completed", finishReason: "length", error: null }, "max_tokens reached", {
        drain: true,
      });
      return;
    }
    // A registered model's chunks are counted by the platform (the worker's claim is only compared
    // with it); the exact count of the delivered text is taken at settlement.
    let platform: number | null = null;
    let countedText: string | undefined;
    if (this.counter) {
      countedText = text + toolCalls.map((call) => `${call.name ?? ""}${call.arguments}`).join("");
      platform = this.counter.estimateChunk(this.relayedTail, countedText);
      this.relayedTail = TokenCounter.tail(this.relayedTail, countedText);
    }
    const counted = Math.min(platform ?? claimed, bytes, room);
    attempt.watch.chunk(counted);
    this.relayedTokens += counted;
    if (text === "" && toolCalls.length === 0 && logprobs.length === 0) {
      // Nothing for the consumer; acknowledge at once so the window keeps moving.
      attempt.lease.acknowledge(sequence);
      return;
    }
    this.buffer.push({
      text,
      toolCalls,
      logprobs,
      tokens: counted,
      sequence,
      attempt,
      ...(countedText !== undefined ? { countedText, bytes } : {}),
    });
    this.notify();
  }

  private onDone(
    finishReason: FinishReason,
    usage: { promptTokens: number; completionTokens: number } | null,
  ): void {
    this.reportedUsage = usage;
    // The worker's own reason stands (an engine may end on its stop token exactly at max_tokens);
    // a worker that went past max_tokens was stopped in onChunk, with "length".
    const reason: ConsumerFinishReason =
      finishReason === "length" || finishReason === "content_filter" || finishReason === "tool_calls"
        ? finishReason
        : "stop";
    this.finish({ status: "completed", finishReason: reason, error: null }, `worker done (${finishReason})`, {
      drain: true,
    });
  }

  /**
   * The attempt failed. Before the first token the next worker gets the job (at most one fallback
   * per failed attempt: the attempt is superseded here, synchronously); after it, the order fails.
   */
  private attemptFailed(attempt: Attempt, message: string, kind: "overloaded" | "error"): void {
    if (this.attempt !== attempt || this.outcome) return;
    attempt.watch.end(kind === "overloaded" ? "neutral" : "error");
    const workerId = attempt.candidate.connection.workerId;
    this.deps.log.warn(
      { orderId: this.orderId, jobId: attempt.jobId, workerId, reason: message },
      "attempt failed",
    );
    attempt.lease.cancel(message);
    if (this.state === "streaming") {
      this.finish(
        {
          status: "failed",
          finishReason: null,
          error: new MarketError("worker_failed", `The worker failed mid-stream: ${message}`),
        },
        message,
        { drain: true },
      );
      return;
    }
    clearTimeout(this.firstTokenTimer);
    this.attempt = null;
    this.excluded.add(workerId);
    if (kind === "error") this.sawWorkerError = true;
    if (!this.input.allowFallbacks) {
      const busy =
        kind === "overloaded"
          ? new MarketError("no_capacity", `The only allowed worker is busy: ${message}`, "provider", 2)
          : null;
      this.failBeforeFirstToken(message, busy);
      return;
    }
    this.deps.log.info({ orderId: this.orderId, failed: workerId }, "order falls back");
    void this.fallBack(message);
  }

  private async fallBack(lastError: string): Promise<void> {
    for (;;) {
      let next: Acquired;
      try {
        next = await this.deps.acquireFallback(this.excluded);
      } catch (error) {
        // Only busy workers stood in the way: that is a 503 to retry, not a failure (502).
        if (!this.outcome) this.failBeforeFirstToken(lastError, this.sawWorkerError ? null : error);
        return;
      }
      // Moving the hold needs the order row: a speculative order waits for its hold (a refused one
      // has ended the order meanwhile).
      if (this.hold === "pending") await this.holdDecided;
      if (this.outcome) {
        next.lease.release();
        return;
      }
      try {
        this.order = await this.deps.store.reassignOrder(this.orderId, {
          workerId: next.candidate.connection.workerId,
          providerAccountId: next.candidate.connection.providerAccountId,
          pricePerMillionInput: next.candidate.offer.pricePerMillionInput,
          pricePerMillionOutput: next.candidate.offer.pricePerMillionOutput,
          hold: next.candidate.worstCaseCost,
        });
      } catch (error) {
        next.lease.release();
        this.excluded.add(next.candidate.connection.workerId);
        if (error instanceof MarketError && error.code === "insufficient_credits") continue;
        // "conflict": the order was settled meanwhile (the consumer left); anything else is the
        // database's, and the order cannot move.
        if (!this.outcome) {
          this.deps.log.error({ orderId: this.orderId, err: String(error) }, "fallback failed");
          this.failBeforeFirstToken(lastError, null);
        }
        return;
      }
      // The consumer may have gone (or the order timed out) while the hold moved.
      if (this.outcome) {
        next.lease.release();
        return;
      }
      this.dispatch(next, "dispatched");
      return;
    }
  }

  private failBeforeFirstToken(lastError: string, cause: unknown): void {
    const error =
      cause instanceof MarketError && cause.code === "no_capacity"
        ? cause
        : new MarketError(
            "worker_failed",
            `The worker failed before the first token and no fallback succeeded: ${lastError}`,
          );
    this.finish({ status: "failed", finishReason: null, error }, lastError, { drain: true });
  }

  /**
   * A speculative order's hold was refused: there is no order row, so nothing is settled or
   * billed. The worker is stopped; its reputation is not charged (the consumer's account failed).
   */
  private holdRefused(error: unknown): void {
    this.hold = "refused";
    const reason = `hold refused: ${error instanceof Error ? error.message : String(error)}`;
    if (!this.outcome) {
      this.attempt?.watch.end("neutral");
      const refusal =
        error instanceof MarketError ? error : new MarketError("internal", "The order could not be opened.");
      this.finish({ status: "failed", finishReason: null, error: refusal }, reason, { drain: false });
      return;
    }
    // Decided already (the consumer left, or the worker finished, while the hold was placed): the
    // deltas waiting for the consumer will never be delivered; end the run without a settlement.
    this.buffer.length = 0;
    void this.settle();
    this.wakeConfirmedWaiter();
    this.notify();
  }

  private timedOut(): void {
    if (this.outcome) return;
    this.finish(
      {
        status: "failed",
        finishReason: null,
        error: new MarketError("worker_failed", `The order exceeded ${this.deps.jobTimeoutMs} ms.`),
      },
      "order timed out",
      { drain: true },
    );
  }

  // --- the outcome and the money --------------------------------------------------------------

  /**
   * Decides the outcome, synchronously and once: stops the worker if it still runs, and settles
   * when the consumer has taken what it will take (`drain`: the buffered deltas first).
   */
  private finish(outcome: Outcome, reason: string, options: { drain: boolean }): void {
    if (this.outcome) return;
    const from = this.state;
    this.outcome = outcome;
    this.transition(outcome.status, reason, from);
    this.attempt?.watch.end(
      outcome.status === "completed"
        ? "success"
        : outcome.status === "failed" && outcome.error?.code !== "shutting_down"
          ? "error"
          : "neutral",
    );
    clearTimeout(this.firstTokenTimer);
    clearTimeout(this.jobTimer);
    if (this.attempt && outcome.status !== "completed") this.attempt.lease.cancel(reason);
    else if (this.attempt && this.relayedTokens >= this.order.maxTokens) this.attempt.lease.cancel(reason);
    if (!options.drain) {
      this.buffer.length = 0;
      void this.settle();
    }
    this.notify();
  }

  private transition(to: OrderState, reason: string, from: OrderState): void {
    this.state = to;
    // At info, an order that goes well logs one line ("order settled", with its bill); every step
    // of it is debug. An order that fails or is cancelled says so at info, with the reason.
    const fields = {
      orderId: this.orderId,
      from,
      to,
      reason,
      attempt: this.attempt?.n,
      workerId: this.attempt?.candidate.connection.workerId,
    };
    if (to === "failed" || to === "cancelled") this.deps.log.info(fields, `order ${to}`);
    else this.deps.log.debug?.(fields, `order ${to}`);
  }

  private signal(text: string): void {
    if (this.trustSignals.length < MAX_TRUST_SIGNALS) this.trustSignals.push(text);
  }

  /** Settles once; every caller waits for the same settlement. */
  private settle(): Promise<OrderRecord | null> {
    this.settling ??= this.settleWithRetry();
    return this.settling;
  }

  private async settleWithRetry(): Promise<OrderRecord | null> {
    const outcome = this.outcome as Outcome;
    if (this.hold !== "placed" && !(await this.holdDecided).placed) {
      // A refused hold left no order row: there is nothing to settle and nobody owes anything.
      this.terminal = this.terminalEvent(outcome, null);
      this.markSettled();
      return null;
    }
    const input = this.withCount(this.settlementInput(outcome));
    let answered = false;
    let backoffMs = 100;
    for (let attempt = 1; ; attempt++) {
      try {
        this.order = await this.deps.store.settleOrder(this.orderId, input);
        break;
      } catch (error) {
        this.deps.log.error(
          { orderId: this.orderId, attempt, err: String(error) },
          "settlement failed; retrying",
        );
        if (attempt === SETTLE_TRIES_BEFORE_ANSWERING && !answered) {
          answered = true;
          this.terminal = this.terminalEvent(outcome, null);
          // The consumer is answered without the cost; the settlement goes on in the background.
          void this.keepSettling(input, backoffMs);
          return null;
        }
        await new Promise((resolve) => setTimeout(resolve, backoffMs + Math.random() * backoffMs));
        backoffMs = Math.min(backoffMs * 2, MAX_SETTLE_BACKOFF_MS);
      }
    }
    this.afterSettlement();
    this.terminal = this.terminalEvent(outcome, this.order);
    return this.order;
  }

  private async keepSettling(input: SettleOrderInput, initialBackoffMs: number): Promise<void> {
    let backoffMs = initialBackoffMs;
    for (;;) {
      await new Promise((resolve) => setTimeout(resolve, backoffMs + Math.random() * backoffMs));
      try {
        this.order = await this.deps.store.settleOrder(this.orderId, input);
        this.afterSettlement();
        return;
      } catch (error) {
        this.deps.log.error({ orderId: this.orderId, err: String(error) }, "settlement failed; retrying");
        backoffMs = Math.min(backoffMs * 2, MAX_SETTLE_BACKOFF_MS);
      }
    }
  }

  /** The settlement's input, with how the order was counted when the platform records that. */
  private withCount(input: ReturnType<OrderRun["settlementInput"]>): SettleOrderInput {
    if (!this.deps.tokenCounts) return input;
    return {
      ...input,
      count: {
        model: this.model,
        verified: this.counter !== null,
        ggufSha256: this.counter?.ggufSha256 ?? null,
        promptTokens: this.counter ? input.promptTokens : null,
        completionTokens: this.counter ? input.completionTokens : null,
        reportedPromptTokens: input.reportedPromptTokens,
        reportedCompletionTokens: input.reportedCompletionTokens,
        claimedCompletionTokens: this.claimedTokens,
      },
    };
  }

  private settlementInput(outcome: Outcome) {
    if (this.counter) return this.verifiedSettlementInput(outcome);
    const completionTokens = this.input.stream || outcome.status === "completed" ? this.deliveredTokens : 0;
    const delivered = completionTokens > 0 || outcome.status === "completed";
    const reported = this.reportedUsage;
    if (reported && reported.promptTokens > this.order.promptTokenBound) {
      this.signal(
        `the worker reported ${reported.promptTokens} prompt tokens, above the prompt's bound of ${this.order.promptTokenBound}`,
      );
    }
    if (reported && outcome.status === "completed" && reported.completionTokens !== this.relayedTokens) {
      this.signal(
        `the worker reported ${reported.completionTokens} completion tokens; the platform counted ${this.relayedTokens}`,
      );
    }
    if (
      this.claimedTokens > this.relayedTokens &&
      !this.trustSignals.some((s) => s.startsWith("chunks claimed"))
    ) {
      this.signal(
        `chunks claimed ${this.claimedTokens} tokens in all; the platform counted ${this.relayedTokens}`,
      );
    }
    return {
      status: outcome.status,
      promptTokens: delivered ? Math.min(reported?.promptTokens ?? 0, this.order.promptTokenBound) : 0,
      completionTokens,
      reportedPromptTokens: reported?.promptTokens ?? null,
      reportedCompletionTokens: reported?.completionTokens ?? null,
      trustSignals: [...this.trustSignals],
      finishReason: outcome.finishReason,
      error: outcome.error?.message ?? null,
      firstTokenAt: this.firstTokenAt,
      finishedAt: new Date(),
    } satisfies Parameters<MarketStore["settleOrder"]>[1];
  }

  /**
   * A registered model's settlement: the platform's exact count of the delivered text (bounded by
   * its UTF-8 bytes and max_tokens) and of the rendered prompt (bounded by the prompt's bound); the
   * worker's usage and chunk claims only raise trust signals when they disagree.
   */
  private verifiedSettlementInput(outcome: Outcome) {
    const counter = this.counter as TokenCounter;
    const billable = this.input.stream || outcome.status === "completed";
    const exact = counter.countContinuation(this.promptTail, this.deliveredText);
    const completionTokens = billable ? Math.min(exact, this.deliveredBytes, this.order.maxTokens) : 0;
    const delivered = completionTokens > 0 || outcome.status === "completed";
    const reported = this.reportedUsage;
    if (reported && reported.promptTokens !== this.platformPromptTokens) {
      this.signal(
        `the worker reported ${reported.promptTokens} prompt tokens; the platform counted ${this.platformPromptTokens}`,
      );
    }
    if (reported && outcome.status === "completed" && reported.completionTokens !== exact) {
      this.signal(
        `the worker reported ${reported.completionTokens} completion tokens; the platform counted ${exact}`,
      );
    }
    if (outcome.status === "completed" && this.claimedTokens !== exact) {
      this.signal(`chunks claimed ${this.claimedTokens} tokens in all; the platform counted ${exact}`);
    }
    return {
      status: outcome.status,
      promptTokens: delivered ? Math.min(this.platformPromptTokens, this.order.promptTokenBound) : 0,
      completionTokens,
      reportedPromptTokens: reported?.promptTokens ?? null,
      reportedCompletionTokens: reported?.completionTokens ?? null,
      trustSignals: [...this.trustSignals],
      finishReason: outcome.finishReason,
      error: outcome.error?.message ?? null,
      firstTokenAt: this.firstTokenAt,
      finishedAt: new Date(),
    } satisfies Parameters<MarketStore["settleOrder"]>[1];
  }

  /**
   * The order is settled (and how it was counted recorded, in the same transaction): logs it and
   * resolves `settled`, what whenSettled and shutdown wait for.
   */
  private afterSettlement(): void {
    if (this.trustSignals.length > 0) {
      this.deps.log.warn(
        { orderId: this.orderId, workerId: this.order.workerId, signals: this.trustSignals },
        "trust signals recorded",
      );
    }
    this.deps.log.info(
      {
        orderId: this.orderId,
        status: this.order.status,
        cost: this.order.cost.toString(),
        promptTokens: this.order.promptTokens,
        completionTokens: this.order.completionTokens,
        workerId: this.order.workerId,
      },
      "order settled",
    );
    this.markSettled();
  }

  private terminalEvent(outcome: Outcome, order: OrderRecord | null): RunEvent {
    if (outcome.error) return { type: "error", error: outcome.error, order };
    if (outcome.status === "cancelled") {
      return { type: "error", error: new MarketError("cancelled", "The request was cancelled."), order };
    }
    return { type: "finish", finishReason: outcome.finishReason ?? "stop", order };
  }
}

/**
 * The order lifecycle: admit a consumer's request (constraints, hold), dispatch it to the best
 * worker, fall back before the first token, relay the tokens, and settle the money exactly once.
 *
 * Settlement rule (also stated in the README):
 * - completed: the consumer pays prompt tokens (the engine's count, capped at the platform's upper
 *   bound) plus completion tokens (the platform's own count of streamed tokens, capped at
 *   max_tokens), at the serving worker's prices.
 * - failed or cancelled after the consumer received tokens (streaming only): the consumer pays for
 *   the completion tokens relayed to it plus the prompt as above when the engine reported it.
 * - failed before any token reached the consumer (and every non-streamed failure): nothing.
 * The provider receives the cost minus the platform fee; the hold's remainder goes back.
 */
import { randomBytes } from "node:crypto";
import { AsyncQueue } from "./async-queue.js";
import { isMarketError, MarketError } from "./errors.js";
import { type Candidate, pickWorkers, type RoutingConstraints } from "./matcher.js";
import { orderCost, platformFee, promptTokenBound } from "./money.js";
import type { FinishReason, JobSink, JobSpec, WorkerRegistry } from "./registry.js";
import type { AccountRecord, MarketStore, OrderRecord, OrderStatus } from "./store-port.js";

export interface MarketLogger {
  info(fields: object, message: string): void;
  warn(fields: object, message: string): void;
  error(fields: object, message: string): void;
}

export interface MarketplaceOptions {
  /** The platform's fee in basis points of each order's cost (500 = 5 %). */
  feeBasisPoints: number;
  /** max_tokens used (and held for) when a request sets none. */
  defaultMaxTokens: number;
  /** A worker that produces no token within this time is replaced (or the order fails). */
  firstTokenTimeoutMs: number;
  /** No order runs longer than this. */
  jobTimeoutMs: number;
}

export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
}

export interface CompletionRequest {
  model: string;
  messages: ChatMessage[];
  sampling: JobSpec["sampling"];
  maxTokens?: number;
  stream: boolean;
  /** From the request's `provider` object; fields left out fall back to the account's defaults. */
  routing: Partial<RoutingConstraints>;
}

export interface Consumer {
  account: AccountRecord;
  apiKeyId: string;
}

export type RunEvent =
  | { type: "delta"; text: string }
  | { type: "finish"; finishReason: FinishReason; order: OrderRecord }
  | { type: "error"; error: MarketError; order: OrderRecord | null };

export interface CompletionRun {
  readonly orderId: string;
  readonly model: string;
  readonly createdAt: Date;
  /** Deltas, then exactly one `finish` or `error`. */
  readonly events: AsyncIterable<RunEvent>;
  /** The consumer went away: stop the worker and settle for what was delivered. */
  cancel(reason: string): void;
}

function newId(prefix: string): string {
  return `${prefix}${randomBytes(12).toString("base64url")}`;
}

export class Marketplace {
  private readonly running = new Set<OrderRun>();

  constructor(
    private readonly store: MarketStore,
    private readonly registry: WorkerRegistry,
    private readonly options: MarketplaceOptions,
    private readonly log: MarketLogger,
  ) {}

  /**
   * Admits and dispatches a request. Throws MarketError for anything decided before dispatch
   * (unknown model, no capacity, insufficient credits); later failures arrive as run events.
   */
  async startCompletion(consumer: Consumer, request: CompletionRequest): Promise<CompletionRun> {
    const defaults = consumer.account.defaults;
    const constraints: RoutingConstraints = {
      maxPricePerMillionInput: request.routing.maxPricePerMillionInput ?? defaults.maxPricePerMillionInput,
      maxPricePerMillionOutput: request.routing.maxPricePerMillionOutput ?? defaults.maxPricePerMillionOutput,
      minTokensPerSecond: request.routing.minTokensPerSecond ?? defaults.minTokensPerSecond,
      sort: request.routing.sort ?? "price",
      order: request.routing.order ?? [],
      ignore: request.routing.ignore ?? [],
      allowFallbacks: request.routing.allowFallbacks ?? true,
    };
    const bound = promptTokenBound(request.messages);
    const maxTokens = request.maxTokens ?? this.options.defaultMaxTokens;
    const candidates = pickWorkers(this.registry, {
      model: request.model,
      promptTokenBound: bound,
      maxTokens,
      constraints,
    });

    const orderId = newId("chatcmpl-");
    const { order, remaining } = await this.openOrder(
      orderId,
      consumer,
      request.model,
      maxTokens,
      candidates,
    );
    const run = new OrderRun(this.store, this.registry, this.options, this.log, {
      order,
      candidates: remaining,
      request,
      promptTokenBound: bound,
    });
    this.running.add(run);
    void run.finished.then(() => this.running.delete(run));
    run.start();
    return run;
  }

  /**
   * Resolves once the order is settled (or its settlement failed and was logged); at once when it
   * is not in flight here, i.e. already settled. For callers that outlive the consumer's request.
   */
  async whenSettled(orderId: string): Promise<void> {
    for (const run of this.running) if (run.orderId === orderId) await run.finished;
  }

  /** Resolves when every order in flight has settled (used by graceful shutdown). */
  async whenIdle(): Promise<void> {
    await Promise.all([...this.running].map((run) => run.finished));
  }

  /**
   * Orders a crash left `running` cannot be finished: their tokens' fate is unknown, so the
   * consumer is refunded in full (the hold is released) and the order marked failed.
   */
  async settleAbandonedOrders(): Promise<number> {
    const abandoned = await this.store.listRunningOrders();
    for (const order of abandoned) {
      await this.store.settleOrder(order.id, {
        status: "failed",
        promptTokens: 0,
        completionTokens: 0,
        reportedPromptTokens: null,
        reportedCompletionTokens: null,
        cost: 0n,
        fee: 0n,
        finishReason: null,
        error: "the control plane stopped while the order was running; refunded",
        firstTokenAt: null,
        finishedAt: new Date(),
      });
      this.log.warn({ orderId: order.id }, "abandoned order refunded at start-up");
    }
    return abandoned.length;
  }

  /** Opens the order with the first candidate whose hold the consumer can cover. */
  private async openOrder(
    orderId: string,
    consumer: Consumer,
    model: string,
    maxTokens: number,
    candidates: Candidate[],
  ): Promise<{ order: OrderRecord; remaining: Candidate[] }> {
    let shortfall: MarketError | null = null;
    for (const [index, candidate] of candidates.entries()) {
      try {
        const order = await this.store.openOrder({
          id: orderId,
          consumerAccountId: consumer.account.id,
          apiKeyId: consumer.apiKeyId,
          model,
          workerId: candidate.connection.workerId,
          providerAccountId: candidate.connection.providerAccountId,
          pricePerMillionInput: candidate.offer.pricePerMillionInput,
          pricePerMillionOutput: candidate.offer.pricePerMillionOutput,
          hold: candidate.worstCaseCost,
          maxTokens,
        });
        return { order, remaining: candidates.slice(index) };
      } catch (error) {
        if (!(isMarketError(error) && error.code === "insufficient_credits")) throw error;
        shortfall ??= error;
      }
    }
    throw shortfall ?? new MarketError("internal", "no candidate to open the order with");
  }
}

type RunState = "dispatching" | "streaming" | "settling" | "closed";

interface Attempt {
  jobId: string;
  candidate: Candidate;
  assignedAt: number;
}

class OrderRun implements CompletionRun {
  readonly orderId: string;
  readonly model: string;
  readonly createdAt: Date;
  readonly events = new AsyncQueue<RunEvent>();
  /** Resolves once the order is settled (or its settlement failed and was logged). */
  readonly finished: Promise<void>;
  private markFinished: () => void = () => {};

  private state: RunState = "dispatching";
  private attempt: Attempt | null = null;
  private order: OrderRecord;
  private readonly candidates: Candidate[];
  private relayedTokens = 0;
  private firstTokenAt: Date | null = null;
  private reportedUsage: { promptTokens: number; completionTokens: number } | null = null;
  private firstTokenTimer: NodeJS.Timeout | undefined;
  private readonly jobTimer: NodeJS.Timeout;

  constructor(
    private readonly store: MarketStore,
    private readonly registry: WorkerRegistry,
    private readonly options: MarketplaceOptions,
    private readonly log: MarketLogger,
    private readonly input: {
      order: OrderRecord;
      candidates: Candidate[];
      request: CompletionRequest;
      promptTokenBound: number;
    },
  ) {
    this.order = input.order;
    this.orderId = input.order.id;
    this.model = input.order.model;
    this.createdAt = input.order.createdAt;
    this.candidates = [...input.candidates];
    this.finished = new Promise((resolve) => {
      this.markFinished = resolve;
    });
    this.jobTimer = setTimeout(() => this.timedOut(), options.jobTimeoutMs);
    this.jobTimer.unref();
  }

  start(): void {
    const candidate = this.candidates.shift();
    if (!candidate) {
      void this.settle("failed", null, new MarketError("worker_failed", "No worker could take the request."));
      return;
    }
    const attempt: Attempt = { jobId: newId("job_"), candidate, assignedAt: Date.now() };
    this.attempt = attempt;
    this.firstTokenTimer = setTimeout(
      () => this.attemptFailed(attempt, `no token within ${this.options.firstTokenTimeoutMs} ms`),
      this.options.firstTokenTimeoutMs,
    );
    this.firstTokenTimer.unref();
    const { request } = this.input;
    this.log.info(
      { orderId: this.orderId, jobId: attempt.jobId, workerId: candidate.connection.workerId },
      "order dispatched",
    );
    candidate.connection.assign(
      {
        jobId: attempt.jobId,
        model: request.model,
        messages: request.messages,
        sampling: request.sampling,
        maxTokens: this.order.maxTokens,
        deadlineUnixMs: this.createdAt.getTime() + this.options.jobTimeoutMs,
      },
      this.sinkFor(attempt),
    );
  }

  cancel(reason: string): void {
    if (this.state === "settling" || this.state === "closed") return;
    this.stopWorker(reason);
    void this.settle("cancelled", "cancelled", null);
  }

  /** Events of a superseded attempt (a worker we already gave up on) are ignored. */
  private sinkFor(attempt: Attempt): JobSink {
    const current = () =>
      this.attempt === attempt && (this.state === "dispatching" || this.state === "streaming");
    return {
      accepted: () => {},
      chunk: (text, tokenCount) => {
        if (current()) this.chunk(text, tokenCount);
      },
      done: (finishReason, usage) => {
        if (!current()) return;
        this.reportedUsage = usage;
        const capped = this.relayedTokens >= this.order.maxTokens;
        void this.settle(
          "completed",
          capped ? "length" : finishReason === "cancelled" ? "stop" : finishReason,
          null,
        );
      },
      failed: (message) => {
        if (current()) this.attemptFailed(attempt, message);
      },
    };
  }

  private chunk(text: string, tokenCount: number): void {
    if (this.state === "dispatching") {
      clearTimeout(this.firstTokenTimer);
      this.state = "streaming";
      this.firstTokenAt = new Date();
    }
    if (this.relayedTokens >= this.order.maxTokens) {
      // The platform relays and pays for max_tokens at most; a worker that goes on is stopped,
      // and its JobDone (with the engine's usage) still settles the order.
      this.stopWorker("max_tokens exceeded");
      return;
    }
    const room = this.order.maxTokens - this.relayedTokens;
    this.relayedTokens += Math.min(Math.max(tokenCount, 0), room);
    try {
      if (text) this.events.push({ type: "delta", text });
    } catch {
      this.stopWorker("consumer is not reading");
      void this.settle("cancelled", "cancelled", null);
    }
  }

  private attemptFailed(attempt: Attempt, message: string): void {
    if (this.attempt !== attempt || (this.state !== "dispatching" && this.state !== "streaming")) return;
    const workerId = attempt.candidate.connection.workerId;
    this.log.warn(
      { orderId: this.orderId, jobId: attempt.jobId, workerId, reason: message },
      "worker failed the job",
    );
    attempt.candidate.connection.cancel(attempt.jobId, message);
    if (this.state === "dispatching") {
      clearTimeout(this.firstTokenTimer);
      void this.fallBack(message);
      return;
    }
    void this.settle(
      "failed",
      null,
      new MarketError("worker_failed", `The worker failed mid-stream: ${message}`),
    );
  }

  /** Before the first token, the next candidate gets the job; the hold follows its price. */
  private async fallBack(lastError: string): Promise<void> {
    while (this.candidates.length > 0) {
      const next = this.candidates[0] as Candidate;
      try {
        this.order = await this.store.reassignOrder(this.orderId, {
          workerId: next.connection.workerId,
          providerAccountId: next.connection.providerAccountId,
          pricePerMillionInput: next.offer.pricePerMillionInput,
          pricePerMillionOutput: next.offer.pricePerMillionOutput,
          hold: next.worstCaseCost,
        });
        // The consumer may have gone (or the order timed out) while the hold moved.
        if (this.state !== "dispatching") return;
        this.start();
        return;
      } catch (error) {
        this.candidates.shift();
        if (!(isMarketError(error) && error.code === "insufficient_credits")) {
          this.log.error({ orderId: this.orderId, err: String(error) }, "fallback failed");
          break;
        }
      }
    }
    await this.settle(
      "failed",
      null,
      new MarketError(
        "worker_failed",
        `The worker failed before the first token and no fallback succeeded: ${lastError}`,
      ),
    );
  }

  private timedOut(): void {
    if (this.state !== "dispatching" && this.state !== "streaming") return;
    this.stopWorker("order timed out");
    void this.settle(
      "failed",
      null,
      new MarketError("worker_failed", `The order exceeded ${this.options.jobTimeoutMs} ms.`),
    );
  }

  private stopWorker(reason: string): void {
    if (this.attempt) this.attempt.candidate.connection.cancel(this.attempt.jobId, reason);
  }

  private billableUsage(status: Exclude<OrderStatus, "running">): {
    promptTokens: number;
    completionTokens: number;
  } {
    const delivered = status === "completed" || (this.input.request.stream && this.relayedTokens > 0);
    if (!delivered) return { promptTokens: 0, completionTokens: 0 };
    const reportedPrompt = this.reportedUsage?.promptTokens ?? 0;
    if (reportedPrompt > this.input.promptTokenBound) {
      this.log.warn(
        { orderId: this.orderId, reported: reportedPrompt, bound: this.input.promptTokenBound },
        "engine reported more prompt tokens than possible; capped",
      );
    }
    return {
      promptTokens: Math.min(reportedPrompt, this.input.promptTokenBound),
      completionTokens: this.relayedTokens,
    };
  }

  private async settle(
    status: Exclude<OrderStatus, "running">,
    finishReason: FinishReason | null,
    error: MarketError | null,
  ): Promise<void> {
    if (this.state === "settling" || this.state === "closed") return;
    this.state = "settling";
    clearTimeout(this.firstTokenTimer);
    clearTimeout(this.jobTimer);
    const usage = this.billableUsage(status);
    const reported = this.reportedUsage;
    if (reported && status === "completed" && reported.completionTokens !== usage.completionTokens) {
      this.log.warn(
        { orderId: this.orderId, reported: reported.completionTokens, counted: usage.completionTokens },
        "usage mismatch between the worker's report and the streamed tokens",
      );
    }
    const cost = orderCost(
      usage.promptTokens,
      usage.completionTokens,
      this.order.pricePerMillionInput,
      this.order.pricePerMillionOutput,
    );
    const finishedAt = new Date();
    let terminal: RunEvent | undefined;
    try {
      this.order = await this.store.settleOrder(this.orderId, {
        status,
        promptTokens: usage.promptTokens,
        completionTokens: usage.completionTokens,
        reportedPromptTokens: reported?.promptTokens ?? null,
        reportedCompletionTokens: reported?.completionTokens ?? null,
        cost,
        fee: platformFee(cost, this.options.feeBasisPoints),
        finishReason,
        error: error?.message ?? null,
        firstTokenAt: this.firstTokenAt,
        finishedAt,
      });
      if (status === "completed" && this.attempt && this.firstTokenAt) {
        this.registry.recordJob(this.attempt.candidate.connection.workerId, {
          tokens: usage.completionTokens,
          generationMs: finishedAt.getTime() - this.firstTokenAt.getTime(),
          timeToFirstTokenMs: this.firstTokenAt.getTime() - this.attempt.assignedAt,
        });
      }
      this.log.info(
        { orderId: this.orderId, status, cost: cost.toString(), ...usage, workerId: this.order.workerId },
        "order settled",
      );
      terminal = error
        ? { type: "error", error, order: this.order }
        : { type: "finish", finishReason: finishReason ?? "stop", order: this.order };
    } catch (settleError) {
      this.log.error(
        { orderId: this.orderId, err: String(settleError) },
        "settlement failed; left for recovery",
      );
      terminal = {
        type: "error",
        error: new MarketError("internal", "The order could not be settled; it will be reconciled."),
        order: null,
      };
    } finally {
      this.state = "closed";
      this.events.end(terminal);
      this.markFinished();
    }
  }
}

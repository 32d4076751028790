/**
 * The market's front: admits a consumer's request (constraints, a reserved slot, a hold), hands it
 * to an OrderRun (order-run.ts: the state machine that dispatches, falls back, relays and settles),
 * checkpoints running orders, recovers the ones a crash left, and stops gracefully.
 *
 * Admission: the matcher ranks the workers that meet the request's constraints; a slot is reserved
 * synchronously on the best one with a free slot (so no worker is ever over-assigned); when every
 * one is busy, the request waits in its model's FIFO admission queue (admission-queue.ts). The hold
 * is placed at the reserved worker's prices; no hold, no dispatch.
 */
import { randomBytes } from "node:crypto";
import { AdmissionQueue } from "./admission-queue.js";
import { isMarketError, MarketError } from "./errors.js";
import { pickWorkers, type RoutingConstraints } from "./matcher.js";
import { promptTokenBound } from "./money.js";
import { type Acquired, type MarketLogger, OrderRun, type RunEvent } from "./order-run.js";
import type { JobSpec, WorkerRegistry } from "./registry.js";
import type { AccountRecord, MarketStore } from "./store-port.js";

export type { MarketLogger, RunEvent };

export interface MarketplaceOptions {
  /** The platform's fee in basis points of each order's cost (500 = 5 %). */
  feeBasisPoints: number;
  /** max_tokens used (and held for) when a request sets none. */
  defaultMaxTokens: number;
  /** A worker that produces no token within this time is replaced (or the order fails). */
  firstTokenTimeoutMs: number;
  /** No order runs longer than this. */
  jobTimeoutMs: number;
  /** How long a request waits for a free slot. */
  queueTimeoutMs: number;
  /** Requests waiting per model at most. */
  maxQueue: number;
  /** How often running orders' delivered token counts are saved. */
  checkpointIntervalMs: number;
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

export interface CompletionRun extends AsyncIterable<RunEvent> {
  readonly orderId: string;
  readonly model: string;
  readonly createdAt: Date;
  /** The consumer went away or stopped reading: stop the worker and settle for what it took. */
  cancel(reason: string): void;
}

/** Retry-After while the control plane stops. */
const SHUTDOWN_RETRY_AFTER_SECONDS = 5;

function newId(prefix: string): string {
  return `${prefix}${randomBytes(12).toString("base64url")}`;
}

export class Marketplace {
  private readonly running = new Set<OrderRun>();
  private readonly queue: AdmissionQueue;
  private readonly checkpointTimer: NodeJS.Timeout;
  private checkpointing: Promise<void> = Promise.resolve();
  private admitting = true;

  constructor(
    private readonly store: MarketStore,
    private readonly registry: WorkerRegistry,
    private readonly options: MarketplaceOptions,
    private readonly log: MarketLogger,
  ) {
    this.queue = new AdmissionQueue({ maxWaiting: options.maxQueue, timeoutMs: options.queueTimeoutMs });
    // A slot freed (or a worker arrived): the requests waiting for its models may proceed. Deferred
    // to a microtask so a session never re-enters the market from inside its own bookkeeping.
    registry.onCapacity((connection) => {
      const models = connection.offers.map((offer) => offer.model);
      queueMicrotask(() => this.queue.offer(models));
    });
    this.checkpointTimer = setInterval(() => {
      this.checkpointing = this.checkpointing.then(() => this.checkpoint());
    }, options.checkpointIntervalMs);
    this.checkpointTimer.unref();
  }

  /** Orders in flight now. */
  get inFlight(): number {
    return this.running.size;
  }

  /**
   * Admits and dispatches a request. Throws MarketError for anything decided before dispatch
   * (unknown model, no capacity, insufficient credits, the consumer gone); later failures arrive
   * as run events. `signal` aborts when the consumer goes away, at any moment.
   */
  async startCompletion(
    consumer: Consumer,
    request: CompletionRequest,
    signal?: AbortSignal,
  ): Promise<CompletionRun> {
    if (!this.admitting) throw shuttingDown();
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
    const acquire = (excluded: ReadonlySet<string>) =>
      this.acquire(
        request.model,
        { model: request.model, promptTokenBound: bound, maxTokens, constraints },
        excluded,
        signal,
      );

    const orderId = newId("chatcmpl-");
    const excluded = new Set<string>();
    let shortfall: MarketError | null = null;
    for (;;) {
      let acquired: Acquired;
      try {
        acquired = await acquire(excluded);
      } catch (error) {
        // Every affordable worker was tried: the consumer's balance is what stands in the way.
        if (shortfall && isMarketError(error) && error.code === "no_capacity" && excluded.size > 0)
          throw shortfall;
        throw error;
      }
      const { candidate, lease } = acquired;
      let order: Awaited<ReturnType<MarketStore["openOrder"]>>;
      try {
        order = await this.store.openOrder({
          id: orderId,
          consumerAccountId: consumer.account.id,
          apiKeyId: consumer.apiKeyId,
          model: request.model,
          workerId: candidate.connection.workerId,
          providerAccountId: candidate.connection.providerAccountId,
          pricePerMillionInput: candidate.offer.pricePerMillionInput,
          pricePerMillionOutput: candidate.offer.pricePerMillionOutput,
          hold: candidate.worstCaseCost,
          maxTokens,
          promptTokenBound: bound,
          feeBasisPoints: this.options.feeBasisPoints,
        });
      } catch (error) {
        lease.release();
        if (!(isMarketError(error) && error.code === "insufficient_credits")) throw error;
        shortfall = error;
        excluded.add(candidate.connection.workerId);
        continue;
      }
      const run = new OrderRun(
        {
          store: this.store,
          registry: this.registry,
          log: this.log,
          firstTokenTimeoutMs: this.options.firstTokenTimeoutMs,
          jobTimeoutMs: this.options.jobTimeoutMs,
          acquireFallback: acquire,
        },
        {
          order,
          first: acquired,
          job: { model: request.model, messages: request.messages, sampling: request.sampling },
          stream: request.stream,
          allowFallbacks: constraints.allowFallbacks,
        },
      );
      this.running.add(run);
      void run.settled.then(() => this.running.delete(run));
      if (signal?.aborted) {
        // The consumer left while the hold was placed: nothing was sent, nothing is owed.
        lease.release();
        run.cancel("consumer disconnected during admission");
        throw new MarketError("cancelled", "The consumer went away during admission.");
      }
      signal?.addEventListener("abort", () => run.cancel("consumer disconnected"), { once: true });
      run.start();
      return run;
    }
  }

  /** Reserves a slot on the best worker with one, waiting in the model's queue when all are busy. */
  private acquire(
    model: string,
    match: Parameters<typeof pickWorkers>[1],
    excluded: ReadonlySet<string>,
    signal: AbortSignal | undefined,
  ): Promise<Acquired> {
    const request = {
      ...match,
      constraints: { ...match.constraints, ignore: [...match.constraints.ignore, ...excluded] },
    };
    const tryAcquire = (): Acquired | null => {
      if (!this.admitting) throw shuttingDown();
      for (const candidate of pickWorkers(this.registry, request)) {
        const lease = candidate.connection.reserve(model);
        if (lease) return { lease, candidate };
      }
      return null;
    };
    return this.queue.acquire(model, tryAcquire, signal);
  }

  /** Resolves once the order is settled; at once when it is not in flight here. */
  async whenSettled(orderId: string): Promise<void> {
    for (const run of this.running) if (run.orderId === orderId) await run.settled;
  }

  /** Resolves when every order in flight has settled. */
  async whenIdle(): Promise<void> {
    while (this.running.size > 0) await Promise.all([...this.running].map((run) => run.settled));
  }

  /**
   * Graceful stop, first step: refuse new requests (503 with Retry-After) and the ones waiting in
   * the queue; running orders go on.
   */
  stopAdmitting(): void {
    if (!this.admitting) return;
    this.admitting = false;
    this.queue.close(shuttingDown());
  }

  /** Ends every running order now, billing what each consumer took (a forced stop). */
  abortAll(reason: string): void {
    for (const run of this.running) run.abort(reason);
  }

  /** Stops the checkpoint timer after a last checkpoint. */
  async close(): Promise<void> {
    clearInterval(this.checkpointTimer);
    await this.checkpointing;
    await this.checkpoint();
  }

  /** Saves the delivered token counts of running orders, in one statement. */
  private async checkpoint(): Promise<void> {
    const checkpoints = [...this.running].flatMap((run) => run.checkpoint() ?? []);
    if (checkpoints.length === 0) return;
    try {
      await this.store.checkpointOrders(checkpoints);
    } catch (error) {
      this.log.error({ err: String(error), orders: checkpoints.length }, "checkpoint failed");
    }
  }

  /**
   * Orders a crash left `running` are settled at their last checkpoint: the consumer pays for what
   * it had received by then, the provider is paid for it, the rest of the hold goes back.
   */
  async settleAbandonedOrders(): Promise<number> {
    const abandoned = await this.store.listRunningOrders();
    for (const order of abandoned) {
      const settled = await this.store.settleOrder(order.id, {
        status: "failed",
        promptTokens: order.promptTokens,
        completionTokens: order.completionTokens,
        reportedPromptTokens: null,
        reportedCompletionTokens: null,
        trustSignals: [],
        finishReason: null,
        error: "the control plane stopped while the order was running; settled at its last checkpoint",
        firstTokenAt: order.firstTokenAt,
        finishedAt: new Date(),
      });
      this.log.warn(
        { orderId: order.id, completionTokens: settled.completionTokens, cost: settled.cost.toString() },
        "abandoned order settled at its last checkpoint",
      );
    }
    return abandoned.length;
  }
}

function shuttingDown(): MarketError {
  return new MarketError(
    "shutting_down",
    "The control plane is shutting down; try again shortly.",
    undefined,
    SHUTDOWN_RETRY_AFTER_SECONDS,
  );
}

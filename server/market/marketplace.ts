/**
 * The market's front: admits a consumer's request (constraints, a reserved slot, a hold), hands it
 * to an OrderRun (order-run.ts: the state machine that dispatches, falls back, relays and settles),
 * checkpoints running orders, recovers the ones a crash left, and stops gracefully.
 *
 * Admission: the matcher ranks the workers that meet the request's constraints; a slot is reserved
 * synchronously on the best one with a free slot (so no worker is ever over-assigned); when every
 * one is busy, the request waits in its model's FIFO admission queue (admission-queue.ts). The hold
 * is placed at the reserved worker's prices. For an account whose last hold here was placed, the
 * job is dispatched to the reserved worker while the hold is placed (speculative dispatch: time to
 * first token pays the slower of the two, not their sum); the run hands nothing to the consumer and
 * settles nothing before the hold commits, and a refused hold stops the worker and bills no one
 * (order-run.ts). Any other account's order is dispatched only once its hold is placed.
 */
import { randomBase64url } from "../../common/random-id.js";
import type { TokenCountSource } from "../models/model-registry.js";
import { AdmissionQueue } from "./admission-queue.js";
import { isMarketError, MarketError } from "./errors.js";
import { type MatchRequest, pickWorkers, type RoutingConstraints } from "./matcher.js";
import { promptBound, promptFloor } from "./money.js";
import { type Acquired, type MarketLogger, OrderRun, type RunEvent } from "./order-run.js";
import type { Capability, ChatMessage, GenerationSpec, WorkerRegistry } from "./registry.js";
import {
  type AccountRecord,
  type MarketStore,
  type OpenOrderInput,
  type OrderRecord,
  openedOrderRecord,
} from "./store-port.js";

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

export type { ChatMessage };

export interface CompletionRequest extends GenerationSpec {
  model: string;
  /**
   * Models to try after `model`, in order, when no worker for the previous one can serve the
   * request at all (OpenRouter's `models`). The run's `model` says which one answered.
   */
  fallbackModels?: string[];
  /**
   * The most completion tokens; when unset, the chosen offer's context length minus the prompt's
   * bound (or --default-max-tokens when the offer does not say its context length).
   */
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
  /** Request parameters dropped because no worker supports them (`require_parameters: false`). */
  readonly droppedParameters?: readonly string[];
}

/** Accounts remembered as able to pay (for speculative dispatch) at most. */
const MAX_SPECULATING_ACCOUNTS = 100_000;

/** Retry-After while the control plane stops. */
const SHUTDOWN_RETRY_AFTER_SECONDS = 5;

function newId(prefix: string): string {
  return `${prefix}${randomBase64url(12)}`;
}

export class Marketplace {
  private readonly running = new Set<OrderRun>();
  /** Accounts whose last hold was placed: their orders are dispatched speculatively. */
  private readonly holdsPlaced = new Set<string>();
  private readonly queue: AdmissionQueue;
  private readonly checkpointTimer: NodeJS.Timeout;
  private checkpointing: Promise<void> = Promise.resolve();
  private admitting = true;
  /** The model registry: registered models' orders are counted by the platform (order-run.ts). */
  tokenCounts: TokenCountSource | undefined;
  /** Called after each consumer order is dispatched (server/trust/canary.ts mixes canaries in). */
  onOrderDispatched: ((order: { model: string; maxTokens: number }) => void) | undefined;

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
      queueMicrotask(() => this.queue.offer(models, (model) => registry.hasFreeSlot(model)));
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
      requireParameters: request.routing.requireParameters ?? true,
    };
    const dropped: string[] = [];
    const orderId = newId("chatcmpl-");
    const models = [request.model, ...(request.fallbackModels ?? [])];
    for (let index = 0; index < models.length; ) {
      const model = models[index] as string;
      try {
        return await this.openModel(orderId, consumer, request, model, constraints, dropped, signal);
      } catch (error) {
        const droppable =
          isMarketError(error) && error.code === "invalid_request" && !constraints.requireParameters
            ? dropParameter(request, error.param)
            : null;
        if (droppable) {
          // require_parameters: false — the same model is tried again without the parameter.
          dropped.push(error instanceof MarketError ? (error.param ?? "") : "");
          request = droppable;
          continue;
        }
        // OpenRouter's `models`: the next model is tried only when no worker for this one can
        // serve the request at all.
        const cannotServe =
          isMarketError(error) &&
          (error.code === "model_not_found" ||
            error.code === "no_capacity" ||
            error.code === "invalid_request" ||
            error.code === "context_length_exceeded");
        if (!cannotServe || index === models.length - 1) throw error;
        this.log.info(
          { orderId, model, next: models[index + 1], reason: (error as Error).message },
          "falling back to the next model",
        );
        index++;
      }
    }
    throw new MarketError("internal", "No model to try.");
  }

  /** Admits the request on one model: bounds, capabilities, then a slot, the hold and the run. */
  private openModel(
    orderId: string,
    consumer: Consumer,
    request: CompletionRequest,
    model: string,
    constraints: RoutingConstraints,
    dropped: readonly string[],
    signal: AbortSignal | undefined,
  ): Promise<CompletionRun> {
    const parts = {
      messages: request.messages,
      prompt: request.prompt,
      tools: request.tools,
      schemaJson:
        request.responseFormat?.type === "json_schema" ? request.responseFormat.schemaJson : undefined,
    };
    const bound = promptBound(parts);
    const floor = promptFloor(parts);
    const requires = requiredCapabilities(request);
    const match = (maxTokens: number | undefined): MatchRequest => ({
      model,
      promptTokenBound: bound,
      promptTokenFloor: floor,
      maxTokens,
      defaultMaxTokens: this.options.defaultMaxTokens,
      requires,
      constraints,
    });
    return this.openRun(orderId, consumer, request, model, match, constraints, dropped, signal);
  }

  /** Reserves a slot for `model`, places the hold and starts the order's run. */
  private async openRun(
    orderId: string,
    consumer: Consumer,
    request: CompletionRequest,
    model: string,
    match: (maxTokens: number | undefined) => MatchRequest,
    constraints: RoutingConstraints,
    dropped: readonly string[],
    signal: AbortSignal | undefined,
  ): Promise<CompletionRun> {
    const excluded = new Set<string>();
    let shortfall: MarketError | null = null;
    for (;;) {
      let acquired: Acquired;
      try {
        acquired = await this.acquire(model, match(request.maxTokens), excluded, signal);
      } catch (error) {
        // Every affordable worker was tried: the consumer's balance is what stands in the way.
        if (shortfall && isMarketError(error) && error.code === "no_capacity" && excluded.size > 0)
          throw shortfall;
        throw error;
      }
      const { candidate, lease } = acquired;
      const terms: OpenOrderInput = {
        id: orderId,
        consumerAccountId: consumer.account.id,
        apiKeyId: consumer.apiKeyId,
        model,
        workerId: candidate.connection.workerId,
        providerAccountId: candidate.connection.providerAccountId,
        pricePerMillionInput: candidate.offer.pricePerMillionInput,
        pricePerMillionOutput: candidate.offer.pricePerMillionOutput,
        hold: candidate.worstCaseCost,
        maxTokens: candidate.maxTokens,
        promptTokenBound: match(undefined).promptTokenBound,
        feeBasisPoints: this.options.feeBasisPoints,
      };
      const newRun = (order: OrderRecord, hold?: Promise<OrderRecord>) =>
        new OrderRun(
          {
            store: this.store,
            registry: this.registry,
            log: this.log,
            firstTokenTimeoutMs: this.options.firstTokenTimeoutMs,
            jobTimeoutMs: this.options.jobTimeoutMs,
            // A fallback keeps the order's max_tokens, so its hold is computed for the same limit.
            acquireFallback: (skip) => this.acquire(model, match(order.maxTokens), skip, signal),
            ...(this.tokenCounts ? { tokenCounts: this.tokenCounts } : {}),
          },
          {
            order,
            ...(hold ? { hold } : {}),
            first: acquired,
            job: { ...generationOf(request), model },
            stream: request.stream,
            allowFallbacks: constraints.allowFallbacks,
            droppedParameters: [...dropped],
          },
        );
      let run: OrderRun;
      if (this.speculates(consumer.account.id)) {
        if (signal?.aborted) {
          // Gone since the slot was reserved (the abort listener below would never fire).
          lease.release();
          throw new MarketError("cancelled", "The consumer went away during admission.");
        }
        // Speculative dispatch: the job goes to the reserved worker while the hold is placed; the
        // run keeps the consumer and the money waiting for the hold (order-run.ts). The hold's
        // statement is sent only after the JobAssign's HTTP/2 frame has left (Node writes that
        // frame in this turn's check phase, before the next immediate), so that the worker, not
        // the database, gets the idle core first: an engine takes longer to its first token than
        // the hold takes, and the hold waits for it anyway (BENCHMARKS.md, seventh round).
        const placing = new Promise<void>((resolve) => setImmediate(resolve)).then(() =>
          this.store.openOrder(terms),
        );
        run = newRun(pendingOrder(terms), placing);
        this.track(run);
        const onAbort = () => run.cancel("consumer disconnected");
        signal?.addEventListener("abort", onAbort, { once: true });
        run.start();
        const hold = await run.holdDecided;
        this.noteHold(consumer.account.id, hold.placed);
        if (!hold.placed) {
          // The run has stopped the worker and settles nothing: no order row exists.
          signal?.removeEventListener("abort", onAbort);
          if (!(isMarketError(hold.error) && hold.error.code === "insufficient_credits")) throw hold.error;
          shortfall = hold.error;
          excluded.add(candidate.connection.workerId);
          continue;
        }
        if (signal?.aborted) {
          // The consumer left while the hold was placed: the run was cancelled then (the worker
          // stopped) and settles the order at 0 once the hold is there.
          throw new MarketError("cancelled", "The consumer went away during admission.");
        }
      } else {
        let order: OrderRecord;
        try {
          order = await this.store.openOrder(terms);
        } catch (error) {
          this.noteHold(consumer.account.id, false);
          lease.release();
          if (!(isMarketError(error) && error.code === "insufficient_credits")) throw error;
          shortfall = error;
          excluded.add(candidate.connection.workerId);
          continue;
        }
        this.noteHold(consumer.account.id, true);
        run = newRun(order);
        this.track(run);
        if (signal?.aborted) {
          // The consumer left while the hold was placed: nothing was sent, nothing is owed.
          lease.release();
          run.cancel("consumer disconnected during admission");
          throw new MarketError("cancelled", "The consumer went away during admission.");
        }
        signal?.addEventListener("abort", () => run.cancel("consumer disconnected"), { once: true });
        run.start();
      }
      this.onOrderDispatched?.({ model, maxTokens: candidate.maxTokens });
      return run;
    }
  }

  private track(run: OrderRun): void {
    this.running.add(run);
    void run.settled.then(() => this.running.delete(run));
  }

  /**
   * Whether an order of this account is dispatched while its hold is placed: only when the hold
   * is very likely to be placed, that is when the account's last hold here was. An account new to
   * this process (or forgotten, past MAX_SPECULATING_ACCOUNTS), or whose last hold failed for want
   * of credits or anything else, waits for its hold first. So a consumer who cannot pay makes
   * workers start a job for nothing only for the orders it had in admission when its balance ran
   * short (and then once per placed hold, i.e. per order it pays for), never once per request; each
   * such job costs its worker about one hold's time (milliseconds) before the cancel reaches it.
   */
  private speculates(accountId: string): boolean {
    return this.holdsPlaced.has(accountId);
  }

  /** Records whether the account's last hold was placed. */
  private noteHold(accountId: string, placed: boolean): void {
    if (!placed) {
      this.holdsPlaced.delete(accountId);
      return;
    }
    if (this.holdsPlaced.has(accountId)) return;
    // Bounded: the oldest mark goes first (its account just waits for its next hold once).
    if (this.holdsPlaced.size >= MAX_SPECULATING_ACCOUNTS) {
      const oldest = this.holdsPlaced.values().next().value;
      if (oldest !== undefined) this.holdsPlaced.delete(oldest);
    }
    this.holdsPlaced.add(accountId);
  }

  /** Reserves a slot on the best worker with one, waiting in the model's queue when all are busy. */
  private acquire(
    model: string,
    match: MatchRequest,
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
        if (lease) {
          // On probation this request is the probe: no other one tries the worker meanwhile.
          this.registry.reputation.reserved(candidate.connection.workerId, model);
          return { lease, candidate };
        }
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

/** A speculative order as it will be once its hold commits (nothing is billed from it). */
function pendingOrder(terms: OpenOrderInput): OrderRecord {
  return openedOrderRecord(terms, new Date());
}

/** The part of a request a worker sees. */
function generationOf(request: CompletionRequest): GenerationSpec {
  const {
    model: _model,
    fallbackModels: _fallbacks,
    maxTokens: _max,
    stream: _stream,
    routing: _routing,
    ...generation
  } = request;
  return generation;
}

/** The request without the parameter a 400 named, or null when it cannot go without it. */
function dropParameter(request: CompletionRequest, param: string | undefined): CompletionRequest | null {
  switch (param) {
    case "tools": {
      const { tools: _tools, toolChoice: _choice, parallelToolCalls: _parallel, ...rest } = request;
      return rest;
    }
    case "response_format": {
      const { responseFormat: _format, ...rest } = request;
      return rest;
    }
    case "logprobs": {
      const { logprobs: _logprobs, ...rest } = request;
      return rest;
    }
    case "messages":
      if (!request.messages.some((message) => message.imageUrls?.length)) return null;
      return { ...request, messages: request.messages.map(({ imageUrls: _images, ...message }) => message) };
    default:
      return null;
  }
}

/** The capabilities a request uses, each with the request field that uses it (named in a 400). */
function requiredCapabilities(request: CompletionRequest): MatchRequest["requires"] {
  const requires: { capability: Capability; param: string }[] = [];
  if (request.tools?.length) requires.push({ capability: "tools", param: "tools" });
  if (request.responseFormat && request.responseFormat.type !== "text") {
    requires.push({ capability: "jsonSchema", param: "response_format" });
  }
  if (request.logprobs) requires.push({ capability: "logprobs", param: "logprobs" });
  if (request.messages.some((message) => message.imageUrls?.length)) {
    requires.push({ capability: "vision", param: "messages" });
  }
  if (request.prompt !== undefined) requires.push({ capability: "completions", param: "prompt" });
  return requires;
}

function shuttingDown(): MarketError {
  return new MarketError(
    "shutting_down",
    "The control plane is shutting down; try again shortly.",
    undefined,
    SHUTDOWN_RETRY_AFTER_SECONDS,
  );
}

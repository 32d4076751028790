/**
 * Picks workers for a request. Pure: takes the live workers and the consumer's constraints,
 * returns the candidates in the order the marketplace will try them.
 */
import { MarketError } from "./errors.js";
import { orderCost, orderCostExact } from "./money.js";
import type { Capability, WorkerConnection, WorkerRegistry } from "./registry.js";
import type { OfferRecord } from "./store-port.js";

export type SortKey = "price" | "throughput" | "latency";

/** Hard constraints and preferences of one request (from `provider` or the account's defaults). */
export interface RoutingConstraints {
  maxPricePerMillionInput?: bigint;
  maxPricePerMillionOutput?: bigint;
  minTokensPerSecond?: number;
  sort: SortKey;
  /** Worker ids to try first, in this order (OpenRouter's `order`). */
  order: string[];
  /** Worker ids never to use. */
  ignore: string[];
  allowFallbacks: boolean;
  /**
   * OpenRouter's `require_parameters`: when true (our default), a parameter no worker supports is
   * a 400; when false, it is dropped and the request goes on without it.
   */
  requireParameters: boolean;
}

export interface Candidate {
  connection: WorkerConnection;
  offer: OfferRecord;
  /** Measured tokens/s, or the advertised figure (discounted) for a worker not measured yet. */
  tokensPerSecond: number;
  timeToFirstTokenMs: number;
  /**
   * The worker is cooling down (it failed or timed out) or its probation probe is running: it is
   * offered only when no other worker can serve the request.
   */
  cooling: boolean;
  /** Slots in use on the worker when it was picked. */
  load: number;
  /** The completion limit on this worker: the request's, or what its context leaves. */
  maxTokens: number;
  /** The most this request can cost on this worker: the hold. */
  worstCaseCost: bigint;
  /** worstCaseCost before rounding up to whole µc (µc × 1e6), so tiny price differences still sort. */
  worstCaseCostExact: bigint;
}

export interface MatchRequest {
  model: string;
  promptTokenBound: number;
  /** A lower bound on the prompt's tokens: an offer whose context cannot hold it is skipped. */
  promptTokenFloor: number;
  /** The request's max_tokens; undefined to size it from each offer's context. */
  maxTokens: number | undefined;
  /** Used when neither the request nor the offer's context says (context length 0 = unknown). */
  defaultMaxTokens: number;
  /** Capabilities the request uses, with the request field that uses each (for the 400). */
  requires: readonly { capability: Capability; param: string }[];
  constraints: RoutingConstraints;
}

/**
 * The completion limit on an offer: the request's own max_tokens, else what the offer's context
 * leaves after the prompt's bound (if the bound alone overflows it, what it leaves after the
 * prompt's floor), else the default when the context is unknown.
 */
export function completionLimit(offer: OfferRecord, request: MatchRequest): number {
  if (request.maxTokens !== undefined) return request.maxTokens;
  const context = offer.contextLength;
  if (context <= 0) return request.defaultMaxTokens;
  const used = request.promptTokenBound < context ? request.promptTokenBound : request.promptTokenFloor;
  return Math.max(1, context - used);
}

const UNMEASURED_TTFT_MS = 1_000;

function offerFor(connection: WorkerConnection, model: string): OfferRecord | undefined {
  return connection.offers.find((offer) => offer.model === model);
}

function compareCandidates(sort: SortKey): (a: Candidate, b: Candidate) => number {
  const byPrice = (a: Candidate, b: Candidate) =>
    a.worstCaseCostExact === b.worstCaseCostExact ? 0 : a.worstCaseCostExact < b.worstCaseCostExact ? -1 : 1;
  const byThroughput = (a: Candidate, b: Candidate) => b.tokensPerSecond - a.tokensPerSecond;
  const byLatency = (a: Candidate, b: Candidate) => a.timeToFirstTokenMs - b.timeToFirstTokenMs;
  const byLoad = (a: Candidate, b: Candidate) => a.load - b.load;
  const keys =
    sort === "throughput"
      ? [byThroughput, byPrice, byLoad]
      : sort === "latency"
        ? [byLatency, byPrice, byThroughput, byLoad]
        : [byPrice, byThroughput, byLoad];
  return (a, b) => {
    for (const key of keys) {
      const difference = key(a, b);
      if (difference !== 0) return difference;
    }
    return 0;
  };
}

/**
 * The workers that can serve the request, best first, busy or not (the marketplace reserves a slot
 * on the first one that has one, or queues the request). Throws MarketError "model_not_found" when
 * no connected worker offers the model at all, and "no_capacity" when some do but none is within
 * the constraints (or all are draining), saying which constraint excluded them.
 */
export function pickWorkers(registry: WorkerRegistry, request: MatchRequest): Candidate[] {
  const { constraints } = request;
  const offering = registry
    .list()
    .map((connection) => ({ connection, offer: offerFor(connection, request.model) }))
    .filter(
      (entry): entry is { connection: WorkerConnection; offer: OfferRecord } => entry.offer !== undefined,
    );
  if (offering.length === 0) {
    throw new MarketError(
      "model_not_found",
      `No worker offers the model '${request.model}' right now.`,
      "model",
    );
  }

  const excluded = { price: 0, throughput: 0, draining: 0, suspended: 0 };
  let lacking: { capability: Capability; param: string } | undefined;
  let tooShort = 0;
  const candidates: Candidate[] = [];
  for (const { connection, offer } of offering) {
    const missing = request.requires.find((required) => !offer.capabilities[required.capability]);
    if (missing) {
      lacking ??= missing;
      continue;
    }
    if (offer.contextLength > 0 && request.promptTokenFloor >= offer.contextLength) {
      tooShort++;
      continue;
    }
    if (constraints.ignore.includes(connection.workerId)) continue;
    if (connection.draining) {
      excluded.draining++;
      continue;
    }
    const availability = registry.reputation.availability(connection.workerId, request.model);
    if (availability === "suspended") {
      excluded.suspended++;
      continue;
    }
    const tooExpensive =
      (constraints.maxPricePerMillionInput !== undefined &&
        offer.pricePerMillionInput > constraints.maxPricePerMillionInput) ||
      (constraints.maxPricePerMillionOutput !== undefined &&
        offer.pricePerMillionOutput > constraints.maxPricePerMillionOutput);
    if (tooExpensive) {
      excluded.price++;
      continue;
    }
    const tokensPerSecond = registry.reputation.effectiveTokensPerSecond(
      connection.workerId,
      request.model,
      offer.advertisedTokensPerSecond,
    );
    if (constraints.minTokensPerSecond !== undefined && tokensPerSecond < constraints.minTokensPerSecond) {
      excluded.throughput++;
      continue;
    }
    const maxTokens = completionLimit(offer, request);
    candidates.push({
      connection,
      offer,
      maxTokens,
      tokensPerSecond,
      timeToFirstTokenMs:
        registry.reputation.timeToFirstTokenMs(connection.workerId, request.model) ?? UNMEASURED_TTFT_MS,
      cooling: availability === "cooling",
      load: connection.activeJobs,
      worstCaseCostExact: orderCostExact(
        request.promptTokenBound,
        maxTokens,
        offer.pricePerMillionInput,
        offer.pricePerMillionOutput,
      ),
      worstCaseCost: orderCost(
        request.promptTokenBound,
        maxTokens,
        offer.pricePerMillionInput,
        offer.pricePerMillionOutput,
      ),
    });
  }

  if (
    candidates.length === 0 &&
    lacking &&
    tooShort === 0 &&
    offering.every(({ offer }) => !request.requires.every((r) => offer.capabilities[r.capability]))
  ) {
    throw new MarketError(
      "invalid_request",
      `No worker offering '${request.model}' supports '${lacking.param}'.`,
      lacking.param,
    );
  }
  if (
    candidates.length === 0 &&
    tooShort > 0 &&
    offering.every(
      ({ offer }) =>
        (offer.contextLength > 0 && request.promptTokenFloor >= offer.contextLength) ||
        !request.requires.every((r) => offer.capabilities[r.capability]),
    )
  ) {
    throw new MarketError(
      "context_length_exceeded",
      `The prompt is longer than the context of every worker offering '${request.model}'.`,
      "messages",
    );
  }
  if (candidates.length === 0) {
    const reasons = [
      excluded.price > 0 ? `${excluded.price} above your max_price` : "",
      excluded.throughput > 0 ? `${excluded.throughput} below your min_throughput` : "",
      excluded.draining > 0 ? `${excluded.draining} draining` : "",
      excluded.suspended > 0 ? `${excluded.suspended} suspended` : "",
    ].filter(Boolean);
    throw new MarketError(
      "no_capacity",
      `No worker for '${request.model}' meets the constraints (${offering.length} offering it: ${reasons.join(", ") || "all ignored"}).`,
      "provider",
    );
  }

  // A cooling worker costs the consumer a failure or a whole first-token timeout: it is skipped
  // while any other worker can serve (even a busy one: the request waits for it in the queue).
  const warm = candidates.filter((candidate) => !candidate.cooling);
  if (warm.length > 0) candidates.splice(0, candidates.length, ...warm);
  candidates.sort(compareCandidates(constraints.sort));
  if (constraints.order.length > 0) {
    const rank = (candidate: Candidate) => {
      const index = constraints.order.indexOf(candidate.connection.workerId);
      return index === -1 ? constraints.order.length : index;
    };
    // Array.prototype.sort is stable, so unlisted workers keep the sort order above.
    candidates.sort((a, b) => rank(a) - rank(b));
  }
  return constraints.allowFallbacks ? candidates : candidates.slice(0, 1);
}

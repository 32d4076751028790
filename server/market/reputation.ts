/**
 * What the platform has seen of each worker, per model: how fast it really streams, how soon it
 * answers, how often it fails, what audits found. Matching reads its figures from here; the order
 * run feeds it through one AttemptWatch per dispatched attempt.
 *
 * Speed is timed by the server from chunk arrival, never taken from the worker: throughput is the
 * *median* of the token rates of eight equal time windows between the first token and the last
 * chunk. A worker that holds its tokens and sends them in a burst at the end fills one window and
 * leaves the others empty, so the burst earns nothing (tokens ÷ (last − first) would reward it).
 *
 * Failure handling follows LiteLLM's router (allowed_fails = 3: the failure after three in a row
 * cools the worker down), with one change: a first-token timeout cools the worker at once. A fast
 * failure costs a consumer milliseconds (the order falls over to the next worker), so three are
 * tolerated to ride out a blip; a timeout costs a consumer the whole first-token timeout, so a
 * second consumer must never pay it. Two guards act before any timeout, while another worker can
 * serve: a worker new to a model gets one request at a time until its first token (so a new
 * worker that never answers takes one consumer's request, not one per slot), and a proven worker
 * with a request waiting for a first token longer than three times its p90 TTFT (at least 2 s) is
 * passed over. After its cooldown a worker is on probation: exactly one request may try it (the
 * "probe"); a first token restores it, a failure cools it again for twice as long (capped).
 *
 * Where it lives: in memory. The figures describe a worker's machine as it is now; after a restart
 * of the control plane they are rebuilt within a few jobs, and until then advertised figures are
 * discounted. Writing per-chunk timings to the database is what STACK-NOTES warns against, and a
 * forgotten cooldown costs at most one more first-token timeout. Audit counters are different
 * (they are evidence about money); the audit records are the store's, and `recordAudit` replays them.
 */

export type ReputationState = "healthy" | "cooling" | "probation";

/** How an attempt ended, as far as the worker is to blame. */
export type AttemptResult =
  /** The worker finished the job. */
  | "success"
  /** The worker failed (an error, its stream closed, the order timed out on it). */
  | "error"
  /** Nothing arrived within the first-token timeout. */
  | "timeout"
  /** Not the worker's doing: the consumer left, the worker was full, the control plane stopped. */
  | "neutral";

export interface ReputationOptions {
  /** Milliseconds; injected by tests. */
  now?: () => number;
  /** Failures in a row a worker may have; the next one cools it (a timeout cools it at once). */
  allowedFailures?: number;
  /** The first cooldown; each failed probation doubles it. */
  cooldownMs?: number;
  /** The longest cooldown. */
  maxCooldownMs?: number;
  /** How long a probe may take to show its first token before another request may probe. */
  probeTimeoutMs?: number;
}

/** The figures the admin API and the matcher read, per worker and model. */
export interface ReputationSnapshot {
  state: ReputationState;
  /** When the cooldown ends (Unix ms), while cooling. */
  coolingUntil: number | null;
  /** Sustained tokens/s after the first token (decaying average), null before a measured job. */
  tokensPerSecond: number | null;
  tokensPerSecondP50: number | null;
  tokensPerSecondP90: number | null;
  /** Dispatch to first token, ms (decaying average), null before a first token. */
  timeToFirstTokenMs: number | null;
  timeToFirstTokenP50Ms: number | null;
  timeToFirstTokenP90Ms: number | null;
  /** Decaying share of attempts that succeeded, null before any outcome. */
  successRate: number | null;
  attempts: number;
  failures: number;
  auditsPassed: number;
  auditsFailed: number;
  /** 0..1: reliability (success rate with a prior) × audit record; 0 when suspended. */
  reputation: number;
  suspended: boolean;
}

/** Failures in a row tolerated before a cooldown (LiteLLM's allowed_fails default). */
export const DEFAULT_ALLOWED_FAILURES = 3;
export const DEFAULT_COOLDOWN_MS = 30_000;
export const DEFAULT_MAX_COOLDOWN_MS = 600_000;
/**
 * An advertised throughput counts for this share until the worker has been measured: a proven
 * worker beats an unproven one claiming up to 25 % more, and a lie lasts one job.
 */
export const ADVERTISED_DISCOUNT = 0.8;

/** Weight of the newest sample in the decaying averages. */
const SMOOTHING = 0.3;
/** Per outcome, older outcomes' weight in the success rate decays by this factor. */
const OUTCOME_DECAY = 0.9;
/** Samples kept for the percentiles. */
const PERCENTILE_SAMPLES = 32;
/** Throughput windows per job; the median ignores a burst filling fewer than half of them. */
const WINDOWS = 8;
/** A job with fewer tokens after the first, or a shorter stream, is too short to time. */
const MIN_TIMED_TOKENS = 16;
const MIN_TIMED_SPAN_MS = 20;
/** Chunk arrivals kept per attempt; beyond it, neighbours are merged (at the later time). */
const MAX_ARRIVALS = 2048;
/** A proven worker waiting longer than this many p90 TTFTs (and the floor) is passed over. */
const OVERDUE_TTFT_FACTOR = 3;
const OVERDUE_FLOOR_MS = 2_000;
/** A failed audit weighs this many passed ones. */
const AUDIT_FAILURE_WEIGHT = 4;

/** A decaying average with the recent samples for percentiles. */
class Figure {
  average: number | null = null;
  private readonly samples: number[] = [];
  /** The samples sorted, kept until the next one arrives (matching reads p90 for every request). */
  private sorted: number[] | null = null;

  add(value: number): void {
    this.average = this.average === null ? value : this.average + SMOOTHING * (value - this.average);
    this.samples.push(value);
    if (this.samples.length > PERCENTILE_SAMPLES) this.samples.shift();
    this.sorted = null;
  }

  percentile(p: number): number | null {
    if (this.samples.length === 0) return null;
    this.sorted ??= [...this.samples].sort((a, b) => a - b);
    const sorted = this.sorted;
    const rank = (p / 100) * (sorted.length - 1);
    const low = Math.floor(rank);
    const high = Math.ceil(rank);
    return (sorted[low] as number) + (rank - low) * ((sorted[high] as number) - (sorted[low] as number));
  }
}

/** What is known of one worker serving one model. */
interface WorkerModelRecord {
  tps: Figure;
  ttft: Figure;
  /** Decayed success and failure weights. */
  successes: number;
  failuresWeight: number;
  attempts: number;
  failures: number;
  consecutiveFailures: number;
  /** Cooldowns in a row without a completed job since: sets the next cooldown's length. */
  level: number;
  coolingUntil: number | null;
  /** While a probe (on probation, or of a worker that never answered) runs: when it may be given up on. */
  probeUntil: number | null;
  probation: boolean;
  /** It has shown a first token for this model since the control plane started. */
  answered: boolean;
  /** Attempts dispatched and still waiting for their first token. */
  waiting: Set<AttemptWatch>;
  auditsPassed: number;
  auditsFailed: number;
}

/**
 * Sustained tokens/s after the first token, from chunk arrivals (time in ms, platform-counted
 * tokens): the median of the rates of WINDOWS equal windows between the first and the last chunk.
 * Null when the stream is too short to time.
 */
export function sustainedTokensPerSecond(arrivals: readonly { at: number; tokens: number }[]): number | null {
  const first = arrivals[0];
  const last = arrivals[arrivals.length - 1];
  if (!first || !last) return null;
  const span = last.at - first.at;
  let after = 0;
  for (let i = 1; i < arrivals.length; i++) after += (arrivals[i] as { tokens: number }).tokens;
  if (after < MIN_TIMED_TOKENS || span < MIN_TIMED_SPAN_MS) return null;
  const width = span / WINDOWS;
  const counts = new Array<number>(WINDOWS).fill(0);
  for (let i = 1; i < arrivals.length; i++) {
    const arrival = arrivals[i] as { at: number; tokens: number };
    const window = Math.min(WINDOWS - 1, Math.floor((arrival.at - first.at) / width));
    counts[window] = (counts[window] as number) + arrival.tokens;
  }
  counts.sort((a, b) => a - b);
  const median = ((counts[WINDOWS / 2 - 1] as number) + (counts[WINDOWS / 2] as number)) / 2;
  return (median * 1000) / width;
}

/**
 * One dispatched attempt, watched: chunk arrival times, the first token, how it ended. The first
 * outcome reported wins (a timeout followed by the cancel's failure counts once).
 */
export class AttemptWatch {
  private readonly arrivals: { at: number; tokens: number }[] = [];
  private ended = false;

  constructor(
    private readonly tracker: ReputationTracker,
    readonly workerId: string,
    readonly model: string,
    readonly startedAt: number,
  ) {}

  /** A chunk arrived with `tokens` platform-counted tokens. */
  chunk(tokens: number): void {
    if (this.ended) return;
    const at = this.tracker.now();
    if (this.arrivals.length === 0) this.tracker.firstToken(this, at - this.startedAt);
    this.arrivals.push({ at, tokens });
    if (this.arrivals.length > MAX_ARRIVALS) {
      // Merge neighbours, crediting each pair at the later time: never faster than it was.
      const merged: { at: number; tokens: number }[] = [this.arrivals[0] as { at: number; tokens: number }];
      for (let i = 1; i < this.arrivals.length; i += 2) {
        const a = this.arrivals[i] as { at: number; tokens: number };
        const b = this.arrivals[i + 1];
        merged.push(b ? { at: b.at, tokens: a.tokens + b.tokens } : a);
      }
      this.arrivals.splice(0, this.arrivals.length, ...merged);
    }
  }

  /** The attempt ended; later reports are ignored. */
  end(result: AttemptResult): void {
    if (this.ended) return;
    this.ended = true;
    const tps = sustainedTokensPerSecond(this.arrivals);
    this.tracker.attemptEnded(this, result, tps, this.arrivals.length > 0);
  }
}

export class ReputationTracker {
  readonly now: () => number;
  private readonly allowedFailures: number;
  private readonly cooldownMs: number;
  private readonly maxCooldownMs: number;
  private readonly probeTimeoutMs: number;
  private readonly records = new Map<string, WorkerModelRecord>();
  private readonly suspendedWorkers = new Set<string>();

  constructor(options: ReputationOptions = {}) {
    this.now = options.now ?? Date.now;
    this.allowedFailures = options.allowedFailures ?? DEFAULT_ALLOWED_FAILURES;
    this.cooldownMs = options.cooldownMs ?? DEFAULT_COOLDOWN_MS;
    this.maxCooldownMs = Math.max(this.cooldownMs, options.maxCooldownMs ?? DEFAULT_MAX_COOLDOWN_MS);
    this.probeTimeoutMs = options.probeTimeoutMs ?? 35_000;
  }

  /** Starts watching an attempt dispatched now. */
  watch(workerId: string, model: string): AttemptWatch {
    const watch = new AttemptWatch(this, workerId, model, this.now());
    this.recordFor(workerId, model).waiting.add(watch);
    return watch;
  }

  /**
   * A slot was reserved on the worker for `model`. On probation, or before the worker ever showed a
   * first token for the model, this request is a probe: no other request tries the worker (while
   * another can serve) until it shows a first token, fails, or the probe times out.
   */
  reserved(workerId: string, model: string): void {
    const record = this.recordFor(workerId, model);
    this.refresh(record);
    const unproven = record.probation || !record.answered;
    if (unproven && record.coolingUntil === null && record.probeUntil === null) {
      record.probeUntil = this.now() + this.probeTimeoutMs;
    }
  }

  /**
   * Whether matching should use the worker for `model` now: "available", "cooling" (cooling down,
   * or a probe of it is running: used only when no other worker can serve), or "suspended".
   */
  availability(workerId: string, model: string): "available" | "cooling" | "suspended" {
    if (this.suspendedWorkers.has(workerId)) return "suspended";
    const record = this.records.get(key(workerId, model));
    if (!record) return "available";
    this.refresh(record);
    if (record.coolingUntil !== null) return "cooling";
    if (record.probeUntil !== null || this.overdue(record)) return "cooling";
    return "available";
  }

  /** Measured sustained tokens/s, or null before a timed job. */
  tokensPerSecond(workerId: string, model: string): number | null {
    return this.records.get(key(workerId, model))?.tps.average ?? null;
  }

  timeToFirstTokenMs(workerId: string, model: string): number | null {
    return this.records.get(key(workerId, model))?.ttft.average ?? null;
  }

  /** The throughput matching uses: measured, else the advertised figure discounted. */
  effectiveTokensPerSecond(workerId: string, model: string, advertised: number): number {
    return this.tokensPerSecond(workerId, model) ?? advertised * ADVERTISED_DISCOUNT;
  }

  /** An audit of one of the worker's jobs for `model` passed or failed (fed by the audit system). */
  recordAudit(workerId: string, model: string, passed: boolean): void {
    const record = this.recordFor(workerId, model);
    if (passed) record.auditsPassed += 1;
    else record.auditsFailed += 1;
  }

  /** A suspended worker is never matched (not even as a last resort) until unsuspended. */
  setSuspended(workerId: string, suspended: boolean): void {
    if (suspended) this.suspendedWorkers.add(workerId);
    else this.suspendedWorkers.delete(workerId);
  }

  /** The models the worker has a record for (it was tried, measured or audited on them). */
  modelsOf(workerId: string): string[] {
    const prefix = key(workerId, "");
    return [...this.records.keys()].filter((k) => k.startsWith(prefix)).map((k) => k.slice(prefix.length));
  }

  isSuspended(workerId: string): boolean {
    return this.suspendedWorkers.has(workerId);
  }

  snapshot(workerId: string, model: string): ReputationSnapshot {
    const record = this.records.get(key(workerId, model)) ?? newRecord();
    this.refresh(record);
    const suspended = this.suspendedWorkers.has(workerId);
    const weight = record.successes + record.failuresWeight;
    // A prior worth two successes of three, so one early failure does not sink a new worker.
    const reliability = (record.successes + 2) / (weight + 3);
    const audits =
      (record.auditsPassed + 1) / (record.auditsPassed + 1 + AUDIT_FAILURE_WEIGHT * record.auditsFailed);
    return {
      state: record.coolingUntil !== null ? "cooling" : record.probation ? "probation" : "healthy",
      coolingUntil: record.coolingUntil,
      tokensPerSecond: record.tps.average,
      tokensPerSecondP50: record.tps.percentile(50),
      tokensPerSecondP90: record.tps.percentile(90),
      timeToFirstTokenMs: record.ttft.average,
      timeToFirstTokenP50Ms: record.ttft.percentile(50),
      timeToFirstTokenP90Ms: record.ttft.percentile(90),
      successRate: weight > 0 ? record.successes / weight : null,
      attempts: record.attempts,
      failures: record.failures,
      auditsPassed: record.auditsPassed,
      auditsFailed: record.auditsFailed,
      reputation: suspended ? 0 : reliability * audits,
      suspended,
    };
  }

  // --- fed by AttemptWatch --------------------------------------------------------------------

  /** @internal */
  firstToken(watch: AttemptWatch, ttftMs: number): void {
    const record = this.recordFor(watch.workerId, watch.model);
    record.waiting.delete(watch);
    record.ttft.add(Math.max(0, ttftMs));
    // It answers: probation (or a cooldown a late first token outlived) is over.
    record.answered = true;
    record.probation = false;
    record.probeUntil = null;
    record.coolingUntil = null;
  }

  /** @internal */
  attemptEnded(
    watch: AttemptWatch,
    result: AttemptResult,
    tokensPerSecond: number | null,
    answered: boolean,
  ): void {
    const record = this.recordFor(watch.workerId, watch.model);
    record.waiting.delete(watch);
    if (tokensPerSecond !== null) record.tps.add(tokensPerSecond);
    // A probe that showed nothing is over either way: the next request may probe (or it cools).
    if (!answered) record.probeUntil = null;
    if (result === "neutral") return;
    record.attempts += 1;
    record.successes *= OUTCOME_DECAY;
    record.failuresWeight *= OUTCOME_DECAY;
    if (result === "success") {
      record.answered = true;
      record.successes += 1;
      record.consecutiveFailures = 0;
      record.level = Math.max(0, record.level - 1);
      return;
    }
    record.failures += 1;
    record.failuresWeight += 1;
    record.consecutiveFailures += 1;
    this.refresh(record);
    if (record.coolingUntil !== null) return;
    const wasProbation = record.probation && !answered;
    if (result === "timeout" || wasProbation || record.consecutiveFailures > this.allowedFailures) {
      this.coolDown(record);
    }
  }

  // --- state ----------------------------------------------------------------------------------

  /** A proven worker with an attempt waiting for its first token far longer than it usually takes. */
  private overdue(record: WorkerModelRecord): boolean {
    if (!record.answered || record.waiting.size === 0) return false;
    const limit = Math.max(OVERDUE_FLOOR_MS, OVERDUE_TTFT_FACTOR * (record.ttft.percentile(90) ?? 0));
    const now = this.now();
    for (const watch of record.waiting) if (now - watch.startedAt > limit) return true;
    return false;
  }

  private coolDown(record: WorkerModelRecord): void {
    const length = Math.min(this.maxCooldownMs, this.cooldownMs * 2 ** record.level);
    record.level += 1;
    record.coolingUntil = this.now() + length;
    record.probation = false;
    record.probeUntil = null;
    record.consecutiveFailures = 0;
  }

  /** Applies the clock: a cooldown that ended becomes probation; a probe that timed out frees it. */
  private refresh(record: WorkerModelRecord): void {
    const now = this.now();
    if (record.coolingUntil !== null && now >= record.coolingUntil) {
      record.coolingUntil = null;
      record.probation = true;
      record.probeUntil = null;
    }
    if (record.probeUntil !== null && now >= record.probeUntil) record.probeUntil = null;
  }

  private recordFor(workerId: string, model: string): WorkerModelRecord {
    const k = key(workerId, model);
    let record = this.records.get(k);
    if (!record) {
      record = newRecord();
      this.records.set(k, record);
    }
    return record;
  }
}

function key(workerId: string, model: string): string {
  return `${workerId}\u0000${model}`;
}

function newRecord(): WorkerModelRecord {
  return {
    tps: new Figure(),
    ttft: new Figure(),
    successes: 0,
    failuresWeight: 0,
    attempts: 0,
    failures: 0,
    consecutiveFailures: 0,
    level: 0,
    coolingUntil: null,
    probeUntil: null,
    probation: false,
    answered: false,
    waiting: new Set(),
    auditsPassed: 0,
    auditsFailed: 0,
  };
}

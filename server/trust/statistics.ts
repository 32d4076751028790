/**
 * The arithmetic of audits: per-job mismatch statistics between what a worker reported for its
 * tokens and what a trusted verifier, running the weights the worker declared, computes for the
 * same tokens teacher-forced; and a per-worker sequential probability ratio test (Wald's SPRT)
 * that turns them into pass / fail decisions at a stated false-alarm rate.
 *
 * Why this shape (the trap in issue 8): "was each token probable under the claimed model" rewards
 * a smaller, more predictable model. So the evidence is (1) the worker's *own* reported
 * log-probabilities at each position — of its top-k alternatives and of the returned token —
 * against the reference's for the same token ids (|Δ logprob|: only the same weights give the same
 * distribution, and a worker cannot report the reference's numbers without computing them),
 * (2) at temperature 0, exact greedy agreement (the token must be the reference's argmax, up to
 * near ties), and (3) deterministic checks (token counts, the text the ids spell, the prompt
 * count). Ranks are kept for the record and for people; they do not decide.
 *
 * Honest noise: a generation evaluates one token at a time, the verifier the whole sequence in one
 * batch, and llama.cpp's batched kernels round differently: |Δ| is ~1e-6–1e-3 nats on likely
 * tokens and grows with how unlikely the token is (~5e-3 at −11 nats, more below temperature 1;
 * measured on stories260K, see BENCHMARKS.md). So a position is "anomalous" when an alternative of
 * the top-k both report differs by more than `deltaAbsolute + deltaRelative · |reference logprob|`,
 * when they share too few alternatives (or the worker reported none), when the returned token
 * itself differs by more than `sampledAbsolute + 10 · deltaRelative · |logprob|`, or on a greedy
 * mismatch.
 */

/** One returned token as the worker reported it (TokenDetail). */
export interface ReportedToken {
  tokenId: number;
  logprob: number;
  top: { tokenId: number; logprob: number }[];
}

/** The reference's view of one returned token (TokenScore). */
export interface ReferenceScore {
  logprob: number;
  rank: number;
  top: { tokenId: number; logprob: number }[];
}

/** The parameters of the per-position test and the SPRT. */
export interface SequentialTestParameters {
  /** The tolerance on an alternative both report is deltaAbsolute + deltaRelative · |its reference logprob| (nats). */
  deltaAbsolute: number;
  /** See deltaAbsolute. */
  deltaRelative: number;
  /** The tolerance on the returned token is sampledAbsolute + 10 · deltaRelative · |its reference logprob|. */
  sampledAbsolute: number;
  /** Sharing fewer than this share of the k top ids makes a position anomalous. */
  minTopOverlap: number;
  /** At temperature 0: a non-argmax token counts as anomalous when the reference's argmax is more likely by this much (nats); closer is a tie. */
  greedyTieNats: number;
  /** Anomaly rate of an honest worker the test is built for (H0). */
  p0: number;
  /** Anomaly rate of a cheating worker the test is built to catch (H1). */
  p1: number;
  /** The false-alarm rate: the chance an honest worker (rate ≤ p0) is failed by one test. */
  alpha: number;
  /** The miss rate: the chance a cheater (rate ≥ p1) passes one test. */
  beta: number;
  /**
   * The job-level drift test: the job fails when the median of |Δ logprob| · s / (1 + |reference
   * logprob| · s) over the alternatives both report (s = the temperature, 1 at temperature 0)
   * exceeds this. It sees what the per-position flags cannot: a substitute whose every position is
   * within the honest tolerance, but consistently a few times further from the reference than
   * honest rounding ever is.
   */
  driftThreshold: number;
  /** The drift test decides only on at least this many shared alternatives (about 40 positions of top-5). */
  driftMinValues: number;
}

/**
 * The defaults. Over 72 honest stories260K jobs of 100 tokens (top-5, temperatures 0, 0.7 and 1)
 * the per-job share of anomalous positions averaged 10–20 % (36 % at worst); with the weights
 * rounded to 10 mantissa bits (fp16 precision) 65–85 % (55 % at least); rounded to bfloat16, or
 * with 1 % noise, ~100 %; random tokens without alternatives 100 %. So H0 is set above the honest
 * worst case (p0 0.4: Wald's α bound holds for every honest job measured) and H1 (0.7) near the
 * fp16-precision substitute's typical rate.
 */
/*
 * The drift threshold: over 600 honest stories260K jobs of 100 tokens (temperatures 0, 0.7, 1) the
 * per-job drift was 0.25–2.42 · 10⁻⁴ (log10 mean −3.92, sd 0.10–0.12); with the weights rounded to
 * fp16 precision 3.25–6.36 · 10⁻⁴ (log10 mean −3.41 at T 0, sd 0.03). 2.8 · 10⁻⁴, the geometric
 * middle of the closest pair, is over 3 sd above the honest mean and over 4 sd below the
 * substitute's (BENCHMARKS.md has the rates over 200 jobs per scenario). The threshold is measured
 * on llama.cpp's CPU kernels: a worker on other kernels rounds differently (see the README).
 */
export const DEFAULT_TEST: Readonly<SequentialTestParameters> = {
  deltaAbsolute: 1.5e-3,
  deltaRelative: 5e-4,
  sampledAbsolute: 2e-2,
  minTopOverlap: 0.5,
  greedyTieNats: 1e-2,
  p0: 0.4,
  p1: 0.7,
  alpha: 0.001,
  beta: 0.01,
  driftThreshold: 2.8e-4,
  driftMinValues: 200,
};

/** What is known about one audited job, before the statistics. */
export interface AuditInput {
  /** The job's sampling temperature (0 = greedy). */
  temperature: number;
  /** Alternatives asked per token (TokenDetailRequest.top_k). */
  topK: number;
  /** Whether the job ended by a stop sequence (its text may be a prefix of what its tokens spell). */
  stoppedBySequence: boolean;
  /** The text relayed to the consumer. */
  streamedText: string;
  /** Sum of JobChunk.token_count. */
  chunkTokenCount: number;
  /** JobDone.usage as the worker reported it (null when none). */
  usage: { promptTokens: number; completionTokens: number } | null;
  reported: ReportedToken[];
  /** The indexes into `reported` the verifier scored, ascending (one reference score each); absent: all. */
  positions?: number[];
  /** The verifier's answer. */
  reference: { scores: ReferenceScore[]; promptTokens: number; text: string; error: string };
}

/** Per-job mismatch statistics. */
export interface JobAuditStats {
  tokens: number;
  /** Tokens whose |Δ logprob| exceeded the threshold, or greedy mismatches. */
  anomalies: number;
  /** Per-token anomaly flags, in order (what the SPRT consumes). */
  flags: boolean[];
  meanAbsDelta: number;
  maxAbsDelta: number;
  /** Median rank of the returned tokens under the reference (0 = its argmax). */
  medianRank: number;
  /** Mean |reported top-k ∩ reference top-k| / k over the positions (0 where the worker reported none). */
  topKOverlap: number;
  /** At temperature 0: share of tokens that are the reference's argmax (ties allowed); null otherwise. */
  greedyAgreement: number | null;
  /**
   * The job-level drift statistic (see SequentialTestParameters.driftThreshold), or null when too
   * few alternatives were shared to decide on it.
   */
  drift: number | null;
  /** Deterministic violations: any of them fails the audit on its own. */
  violations: string[];
}

/** Computes the statistics of one audited job. */
export function auditStatistics(
  input: AuditInput,
  parameters: SequentialTestParameters = DEFAULT_TEST,
): JobAuditStats {
  const { reported, reference } = input;
  const violations: string[] = [];
  if (reference.error) violations.push(`the verifier could not score the tokens: ${reference.error}`);
  if (reported.length === 0 && input.chunkTokenCount > 0) {
    violations.push("token detail was asked for and none was returned");
  } else if (input.chunkTokenCount !== reported.length) {
    violations.push(`chunks counted ${input.chunkTokenCount} tokens but ${reported.length} were reported`);
  }
  if (input.usage && input.usage.completionTokens !== reported.length) {
    violations.push(
      `usage claims ${input.usage.completionTokens} completion tokens, ${reported.length} were generated`,
    );
  }
  if (!reference.error) {
    if (input.usage && input.usage.promptTokens !== reference.promptTokens) {
      violations.push(
        `usage claims ${input.usage.promptTokens} prompt tokens, the reference counts ${reference.promptTokens}`,
      );
    }
    const spelled = reference.text;
    const textOk =
      spelled === input.streamedText || (input.stoppedBySequence && spelled.startsWith(input.streamedText));
    if (!textOk) violations.push("the reported tokens do not spell the streamed text");
  }
  const flags: boolean[] = [];
  const deltas: number[] = [];
  const ranks: number[] = [];
  let overlapSum = 0;
  let overlapCount = 0;
  let greedyHits = 0;
  const scale = input.temperature > 0 ? input.temperature : 1;
  const drifts: number[] = [];
  const positions = input.positions ?? reported.map((_, i) => i);
  const scored = reference.error ? 0 : Math.min(positions.length, reference.scores.length);
  for (let i = 0; i < scored; i++) {
    const mine = reported[positions[i] as number] as ReportedToken;
    const theirs = reference.scores[i] as ReferenceScore;
    const delta = Number.isFinite(mine.logprob)
      ? Math.abs(mine.logprob - theirs.logprob)
      : Number.POSITIVE_INFINITY;
    deltas.push(delta);
    ranks.push(theirs.rank);
    const best = theirs.top[0]?.logprob ?? theirs.logprob;
    const greedyOk = theirs.rank === 0 || best - theirs.logprob <= parameters.greedyTieNats;
    if (greedyOk) greedyHits += 1;
    // The alternatives both report, by id: the worker's numbers must be the reference's.
    const k = Math.min(input.topK, theirs.top.length);
    const referenceTop = new Map(theirs.top.slice(0, k).map((t) => [t.tokenId, t.logprob]));
    let shared = 0;
    let topMismatch = false;
    for (const alternative of mine.top.slice(0, k)) {
      const reference = referenceTop.get(alternative.tokenId);
      if (reference === undefined) continue;
      shared += 1;
      const d = Number.isFinite(alternative.logprob)
        ? Math.abs(alternative.logprob - reference)
        : Number.POSITIVE_INFINITY;
      if (d > parameters.deltaAbsolute + parameters.deltaRelative * Math.abs(reference)) topMismatch = true;
      // Tempered logprobs scale logit differences by 1 / temperature: undo it for the drift.
      drifts.push((d * scale) / (1 + Math.abs(reference) * scale));
    }
    const sampledTolerance =
      parameters.sampledAbsolute + 10 * parameters.deltaRelative * Math.abs(theirs.logprob);
    const overlap = k > 0 ? shared / k : 1;
    overlapSum += overlap;
    overlapCount += 1;
    flags.push(
      topMismatch ||
        overlap < parameters.minTopOverlap ||
        delta > sampledTolerance ||
        (input.temperature === 0 && !greedyOk),
    );
  }
  const sortedRanks = [...ranks].sort((a, b) => a - b);
  const finiteDeltas = deltas.filter(Number.isFinite);
  drifts.sort((a, b) => a - b);
  const drift =
    drifts.length >= parameters.driftMinValues && drifts.length > 0
      ? ((drifts[(drifts.length - 1) >> 1] as number) + (drifts[drifts.length >> 1] as number)) / 2
      : null;
  return {
    tokens: reported.length,
    anomalies: flags.filter(Boolean).length,
    flags,
    meanAbsDelta: finiteDeltas.length > 0 ? finiteDeltas.reduce((a, b) => a + b, 0) / finiteDeltas.length : 0,
    maxAbsDelta: deltas.length > 0 ? Math.max(...deltas) : 0,
    medianRank: sortedRanks[Math.floor(sortedRanks.length / 2)] ?? 0,
    topKOverlap: overlapCount > 0 ? overlapSum / overlapCount : 1,
    greedyAgreement: input.temperature === 0 && scored > 0 ? greedyHits / scored : null,
    drift,
    violations,
  };
}

/** The outcome of feeding a job into a worker's sequential test. */
export interface TestStep {
  /** "failed": the test (or a deterministic check) decided this worker cheats; "passed": a test decided it is honest; "undecided": more evidence is needed. */
  outcome: "passed" | "failed" | "undecided";
  /** The log-likelihood ratio after this job (0 right after a decision). */
  llr: number;
  /** Tokens the test consumed before its last decision in this job (the tokens needed to decide). */
  tokensToDecide: number | null;
  /** Tokens the running (undecided) test has consumed so far: with `llr`, its whole state. */
  consumed: number;
}

/**
 * Wald's SPRT on the per-token anomaly flags, H0: rate ≤ p0 (honest) against H1: rate ≥ p1. It
 * fails the worker when the log-likelihood ratio reaches ln((1 − β) / α), passes it when it falls
 * to ln(β / (1 − α)), and then starts a new test. Assuming independent tokens, one test fails an
 * honest worker with probability ≤ α (BENCHMARKS.md has the rate measured on honest runs).
 */
export class SequentialTest {
  private llr = 0;
  private consumed = 0;
  private readonly up: number;
  private readonly down: number;
  private readonly failAt: number;
  private readonly passAt: number;

  constructor(private readonly parameters: SequentialTestParameters = DEFAULT_TEST) {
    const { p0, p1, alpha, beta } = parameters;
    if (!(0 < p0 && p0 < p1 && p1 < 1)) throw new Error("SPRT needs 0 < p0 < p1 < 1");
    this.up = Math.log(p1 / p0);
    this.down = Math.log((1 - p1) / (1 - p0));
    this.failAt = Math.log((1 - beta) / alpha);
    this.passAt = Math.log(beta / (1 - alpha));
  }

  /** The current log-likelihood ratio (for the record). */
  get state(): number {
    return this.llr;
  }

  /** Feeds one audited job's flags; a deterministic violation fails at once. */
  feed(stats: JobAuditStats): TestStep {
    if (stats.violations.length > 0) {
      this.reset();
      return { outcome: "failed", llr: 0, tokensToDecide: 0, consumed: 0 };
    }
    let outcome: TestStep["outcome"] = "undecided";
    let tokensToDecide: number | null = null;
    for (const flag of stats.flags) {
      this.llr += flag ? this.up : this.down;
      this.consumed += 1;
      if (this.llr >= this.failAt) {
        tokensToDecide = this.consumed;
        this.reset();
        return { outcome: "failed", llr: 0, tokensToDecide, consumed: 0 };
      }
      if (this.llr <= this.passAt) {
        tokensToDecide = this.consumed;
        outcome = "passed";
        this.reset();
      }
    }
    if (stats.drift !== null && stats.drift > this.parameters.driftThreshold) {
      // The drift test decides on the answer as a whole: the tokens it took are the positions scored.
      this.reset();
      return { outcome: "failed", llr: 0, tokensToDecide: stats.flags.length, consumed: 0 };
    }
    return { outcome, llr: this.llr, tokensToDecide, consumed: this.consumed };
  }

  /** Resumes a test from a stored state (after a restart), as {@link feed} reported it. */
  restore(llr: number, consumed: number): void {
    // A state outside the thresholds would have been decided: it cannot come from feed().
    if (!(llr > this.passAt && llr < this.failAt) || !Number.isInteger(consumed) || consumed < 0) return;
    this.llr = llr;
    this.consumed = consumed;
  }

  private reset(): void {
    this.llr = 0;
    this.consumed = 0;
  }

  /** The thresholds, for people. */
  describe(): string {
    const { p0, p1, alpha, beta, deltaAbsolute, deltaRelative } = this.parameters;
    return `SPRT on top-k |Δlogprob| > ${deltaAbsolute} + ${deltaRelative}·|logprob|: p0 ${p0}, p1 ${p1}, α ${alpha}, β ${beta}; drift test: median |Δ|·T/(1+|logprob|·T) > ${this.parameters.driftThreshold} on ≥ ${this.parameters.driftMinValues} shared alternatives`;
  }
}

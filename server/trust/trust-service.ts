/**
 * Audits: which jobs carry token detail, which of those are checked, who checks them, and what
 * the checks conclude about each worker.
 *
 * - Every job gets a seed from the control plane (worker-session.ts). A random share of all jobs
 *   (`detailRate`) asks for token detail (ids, logprobs, top-k); nothing else distinguishes them, and
 *   a random part of *those* (`auditRate` of all jobs) is checked after the job has finished, so a
 *   worker cannot tell a checked job from an unchecked one, even after answering it.
 * - Only plain generations are eligible (no tools, response_format or penalties): a grammar or a
 *   penalty changes the distribution the tokens were drawn from, which the verifier cannot replay.
 * - The verifier is a connected worker the operator trusts, serving an offer with the same weights
 *   SHA-256 the audited offer declares, other than the audited worker. It scores the returned tokens
 *   teacher-forced (ScoreAssign → ScoreResult, one prefill pass).
 * - {@link auditStatistics} compares; a {@link SequentialTest} per worker and weights decides.
 * - Consequences (issue 8, item 8): every verdict feeds the matcher's reputation; a failed test claws
 *   back the pending earnings of every order of that worker and model it covered (since the last
 *   passed test) and refunds their consumers; `suspendAfterFailures` failed tests in a row suspend
 *   the worker (persisted, its token refused, its session ended with Reject BANNED, never matched).
 *   Why in a row: one test fails an honest worker with probability α (0.001); two in a row, with no
 *   pass between, about α² — a cheater fails every test, an honest worker passes between rare false
 *   alarms, and a suspension costs a provider its business, so it needs the stronger evidence,
 *   while each failed test has already taken the money back.
 * - Adaptive rate: a worker that has not yet proven itself (passed − 4 × failed < `provenAfterPasses`)
 *   is audited at `newWorkerAuditRate` (capped by the token-detail share), a proven one at
 *   `auditRate`. Only the post-JobDone draw changes: every worker gets token detail on the same
 *   share of jobs, so nothing it can observe tells it whether it is considered new.
 */
import { randomInt, randomUUID } from "node:crypto";
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { JobAssignSchema, ScoreResult } from "../../gen/locallmarket/v1/worker_pb.js";
import type { MarketLogger } from "../market/marketplace.js";
import type { JobSpec, WorkerConnection } from "../market/registry.js";
import type { OfferRecord } from "../market/store-port.js";
import type { ClawBack, TrustStore } from "../store/trust-store.js";
import {
  type AuditInput,
  auditStatistics,
  DEFAULT_TEST,
  type JobAuditStats,
  type ReportedToken,
  SequentialTest,
  type SequentialTestParameters,
  type TestStep,
} from "./statistics.js";

/** A connection that can score tokens (WorkerSession implements it). */
export interface ScoringConnection extends WorkerConnection {
  readonly isClosed: boolean;
  scoreTokens(
    scoreId: string,
    job: MessageInitShape<typeof JobAssignSchema>,
    tokenIds: number[],
    positions: number[],
    timeoutMs: number,
  ): Promise<ScoreResult>;
}

/** What the session saw of a job that carried token detail. */
export interface FinishedDetailJob {
  workerId: string;
  /** The order the job served ("" when unknown). */
  orderId: string;
  offer: OfferRecord;
  /** The JobAssign as sent. */
  assign: MessageInitShape<typeof JobAssignSchema>;
  streamedText: string;
  chunkTokenCount: number;
  tokenDetails: ReportedToken[];
  usage: { promptTokens: number; completionTokens: number } | null;
  finishReason: string;
  /** Milliseconds from JobAssign to JobDone, as the server measured them. */
  generationMs: number;
}

/** One audit's record. */
/** One audit's or canary's outcome, before its consequences (TrustService.conclude). */
interface Verdict {
  kind: "audit" | "canary";
  auditId: string;
  jobId: string;
  /** The audited order; "" for a canary (it has none). */
  orderId: string;
  workerId: string;
  verifierId: string;
  model: string;
  weightsSha256: string;
  stats: JobAuditStats;
  verifyMs: number;
  generationMs: number;
}

export interface AuditRecord {
  auditId: string;
  jobId: string;
  /** The order the audited job served ("" when unknown). */
  orderId: string;
  workerId: string;
  verifierId: string;
  weightsSha256: string;
  outcome: TestStep["outcome"];
  stats: JobAuditStats;
  /** The SPRT's log-likelihood ratio after this job. */
  llr: number;
  /** Tokens the running test had consumed after this job (0 right after a decision). */
  testTokens?: number;
  tokensToDecide: number | null;
  /** Server-measured: scoring round trip, and the audited job's generation. */
  verifyMs: number;
  generationMs: number;
  at: Date;
  /** The audited offer's model (the reputation's key). */
  model?: string;
  /** After a failed audit: what the claw-back of the order's pending earning did. */
  clawBack?: ClawBack;
  /**
   * After a failed audit: the other orders of the worker and model the failed test covered (since its
   * last passed test) whose pending earnings were clawed back, with what each claw-back did.
   */
  coveredClawBacks?: { orderId: string; clawBack: ClawBack }[];
  /** The worker was suspended because of this audit. */
  suspended?: boolean;
}

/** Per worker: the audits' tally. */
export interface WorkerTrust {
  workerId: string;
  auditsPassed: number;
  auditsFailed: number;
  auditsUndecided: number;
  trusted: boolean;
  /** Failed tests since the last passed one. */
  failuresInARow: number;
  /** Why the worker is suspended; absent when it is not. */
  suspendedReason?: string;
}

/** Where verdicts and suspensions go besides the store: the matcher's reputation (WorkerRegistry.reputation). */
export interface TrustReputationSink {
  recordAudit(workerId: string, model: string, passed: boolean): void;
  setSuspended(workerId: string, suspended: boolean): void;
}

/** Failed sequential tests in a row (no pass between) that suspend a worker. */
export const DEFAULT_SUSPEND_AFTER_FAILURES = 2;
/** Audit rate of a worker that has not proven itself yet (capped by the token-detail share). */
export const DEFAULT_NEW_WORKER_AUDIT_RATE = 0.25;
/** passed − 4 × failed audits at which a worker is proven and audited at the base rate. */
export const DEFAULT_PROVEN_AFTER_PASSES = 10;

export interface TrustServiceOptions {
  /** The live connections (the registry's list). */
  connections: () => Iterable<WorkerConnection>;
  log: MarketLogger;
  /** Share of all eligible jobs asked for token detail. Default 0.1. */
  detailRate?: number;
  /** Share of all eligible jobs audited (≤ detailRate). Default 0.02: the verifier then costs ~1.6 % of all generation (BENCHMARKS.md). */
  auditRate?: number;
  /** Alternatives asked per token. Default 5. */
  topK?: number;
  /** Positions scored per audit, drawn at random (all when the answer is shorter). Default 128. */
  scoredPositions?: number;
  /** How long a verifier may take. Default 30 s. */
  verifyTimeoutMs?: number;
  test?: Partial<SequentialTestParameters>;
  /** Uniform [0, 1) source; tests make it deterministic. */
  random?: () => number;
  /** Called after each audit (tests observe it). */
  onAudit?: (record: AuditRecord, job: FinishedDetailJob) => void | Promise<void>;
  /** Where trusted marks and audit records are kept; absent: in memory only. */
  store?: TrustStore;
  /** The matcher's reputation: verdicts and suspensions are fed to it. */
  reputation?: TrustReputationSink;
  /** Called when a worker is suspended: end its live session (Reject BANNED). */
  onSuspended?: (workerId: string, reason: string) => void;
  /** See DEFAULT_SUSPEND_AFTER_FAILURES. */
  suspendAfterFailures?: number;
  /** See DEFAULT_NEW_WORKER_AUDIT_RATE. */
  newWorkerAuditRate?: number;
  /** See DEFAULT_PROVEN_AFTER_PASSES. */
  provenAfterPasses?: number;
}

/** What a job carries because of trust: the seed and, on a share of jobs, a token-detail request. */
export interface JobTrustExtras {
  seed: bigint;
  tokenDetail?: { topK: number };
}

export class TrustService {
  private readonly trusted = new Set<string>();
  private readonly tests = new Map<string, SequentialTest>();
  private readonly tallies = new Map<string, WorkerTrust>();
  private readonly records: AuditRecord[] = [];
  private readonly pending = new Set<Promise<void>>();
  private readonly random: () => number;
  private readonly parameters: SequentialTestParameters;
  /** Per test (worker and weights): orders created after this instant are covered by the running test. */
  private readonly coveredSince = new Map<string, Date>();
  detailRate: number;
  auditRate: number;
  newWorkerAuditRate: number;
  provenAfterPasses: number;
  suspendAfterFailures: number;

  constructor(private readonly options: TrustServiceOptions) {
    this.random = options.random ?? Math.random;
    this.detailRate = options.detailRate ?? 0.1;
    this.auditRate = options.auditRate ?? 0.02;
    this.newWorkerAuditRate = options.newWorkerAuditRate ?? DEFAULT_NEW_WORKER_AUDIT_RATE;
    this.provenAfterPasses = options.provenAfterPasses ?? DEFAULT_PROVEN_AFTER_PASSES;
    this.suspendAfterFailures = options.suspendAfterFailures ?? DEFAULT_SUSPEND_AFTER_FAILURES;
    this.parameters = { ...DEFAULT_TEST, ...options.test };
  }

  /**
   * Loads what the store keeps (at start-up): trusted marks, audit tallies (replayed into the
   * matcher's reputation per model, so audit counts survive a restart), suspensions and the state
   * of each worker's running sequential test.
   */
  async load(): Promise<void> {
    const store = this.options.store;
    if (!store) return;
    for (const workerId of await store.trustedWorkers()) {
      this.trusted.add(workerId);
      this.tally(workerId).trusted = true;
    }
    for (const stored of await store.tallies()) {
      const tally = this.tally(stored.workerId);
      tally.auditsPassed = stored.auditsPassed;
      tally.auditsFailed = stored.auditsFailed;
      tally.auditsUndecided = stored.auditsUndecided;
    }
    const reputation = this.options.reputation;
    if (reputation) {
      for (const stored of await store.modelTallies()) {
        if (stored.model === null) continue;
        for (let i = 0; i < stored.auditsPassed; i++)
          reputation.recordAudit(stored.workerId, stored.model, true);
        for (let i = 0; i < stored.auditsFailed; i++)
          reputation.recordAudit(stored.workerId, stored.model, false);
      }
    }
    for (const suspension of await store.suspendedWorkers()) {
      this.tally(suspension.workerId).suspendedReason = suspension.reason;
      reputation?.setSuspended(suspension.workerId, true);
    }
    // The running sequential tests resume where they stood, and a failed test still claws back
    // only what it covered (since the last passed one). Left out on purpose: the count of failed
    // tests in a row, which an operator's unsuspend resets without a trace in the store; after a
    // restart a worker needs that many failed tests again to be suspended.
    for (const state of await store.testStates()) {
      const key = `${state.workerId}\u0000${state.weightsSha256}`;
      const test = new SequentialTest(this.parameters);
      test.restore(state.llr, state.consumed);
      this.tests.set(key, test);
      if (state.coveredSince) this.coveredSince.set(key, state.coveredSince);
    }
  }

  /** Why the worker is suspended, or undefined when it is not (the link refuses its token while it is). */
  suspendedReason(workerId: string): string | undefined {
    return this.tallies.get(workerId)?.suspendedReason;
  }

  /**
   * Suspends a worker (durably when there is a store): never matched, its token refused, its live
   * session ended with Reject BANNED. Or lifts the suspension, which also restarts its count of
   * failed tests in a row. Idempotent.
   */
  async setSuspended(
    workerId: string,
    suspended: boolean,
    reason = "suspended by the operator",
  ): Promise<void> {
    const tally = this.tally(workerId);
    if (suspended) {
      await this.options.store?.suspend(workerId, reason);
      if (tally.suspendedReason !== undefined) return;
      tally.suspendedReason = reason;
      this.options.reputation?.setSuspended(workerId, true);
      this.options.log.warn({ workerId, reason }, "worker suspended");
      this.options.onSuspended?.(workerId, reason);
    } else {
      await this.options.store?.unsuspend(workerId);
      delete tally.suspendedReason;
      tally.failuresInARow = 0;
      this.options.reputation?.setSuspended(workerId, false);
    }
  }

  /**
   * The share of the worker's eligible jobs audited: the base rate once it has proven itself, the
   * new-worker rate (at most the token-detail share, and never below the base rate) before.
   */
  auditRateFor(workerId: string): number {
    const tally = this.tallies.get(workerId);
    const proven =
      tally !== undefined && tally.auditsPassed - 4 * tally.auditsFailed >= this.provenAfterPasses;
    if (proven || this.auditRate <= 0) return this.auditRate;
    return Math.max(this.auditRate, Math.min(this.newWorkerAuditRate, this.detailRate));
  }

  /** Marks a worker as a trusted reference verifier (or takes the mark away), durably when there is a store. */
  async setTrusted(workerId: string, trusted: boolean): Promise<void> {
    await this.options.store?.setTrusted(workerId, trusted);
    if (trusted) this.trusted.add(workerId);
    else this.trusted.delete(workerId);
    this.tally(workerId).trusted = trusted;
  }

  /** Where trust is kept (the database), when there is one. */
  get store(): TrustStore | undefined {
    return this.options.store;
  }

  isTrusted(workerId: string): boolean {
    return this.trusted.has(workerId);
  }

  /**
   * Decides a job's seed and whether it carries token detail (only when its offer declares
   * Capabilities.token_detail: `tokenDetail`). Called once per JobAssign.
   */
  prepare(job: JobSpec, tokenDetail = true): JobTrustExtras {
    const seed = job.sampling.seed ?? BigInt(randomInt(0, 2 ** 31));
    const eligible =
      tokenDetail &&
      job.tools === undefined &&
      (job.responseFormat === undefined || job.responseFormat.type === "text") &&
      job.sampling.presencePenalty === undefined &&
      job.sampling.frequencyPenalty === undefined;
    if (!eligible || this.random() >= this.detailRate) return { seed };
    return { seed, tokenDetail: { topK: this.options.topK ?? 5 } };
  }

  /** A job that carried token detail finished (JobDone): maybe audit it. Never throws. */
  finished(job: FinishedDetailJob): void {
    // Audited share of detail jobs, so that the worker's rate is a share of all eligible jobs.
    const share = this.detailRate > 0 ? Math.min(1, this.auditRateFor(job.workerId) / this.detailRate) : 0;
    if (this.random() >= share) return;
    const run = this.audit(job)
      .catch((error: unknown) =>
        this.options.log.warn({ jobId: job.assign.jobId, error: String(error) }, "audit could not run"),
      )
      .finally(() => this.pending.delete(run));
    this.pending.add(run);
  }

  /** Resolves when every audit started so far has finished (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /** Audit records, newest last. */
  audits(workerId?: string): AuditRecord[] {
    return workerId ? this.records.filter((r) => r.workerId === workerId) : [...this.records];
  }

  /** A worker's tally. */
  trustOf(workerId: string): WorkerTrust {
    return { ...this.tally(workerId) };
  }

  private tally(workerId: string): WorkerTrust {
    let entry = this.tallies.get(workerId);
    if (!entry) {
      entry = {
        workerId,
        auditsPassed: 0,
        auditsFailed: 0,
        auditsUndecided: 0,
        trusted: this.trusted.has(workerId),
        failuresInARow: 0,
      };
      this.tallies.set(workerId, entry);
    }
    return entry;
  }

  /** A connected trusted worker serving the same weights, other than the audited one. */
  private verifierFor(job: FinishedDetailJob): { connection: ScoringConnection; model: string } | undefined {
    const hash = job.offer.weightsSha256;
    if (!hash) return undefined;
    for (const connection of this.options.connections()) {
      if (connection.workerId === job.workerId || !this.trusted.has(connection.workerId)) continue;
      if (!("scoreTokens" in connection) || (connection as ScoringConnection).isClosed) continue;
      const offer = connection.offers.find((o) => o.weightsSha256 === hash);
      if (offer) return { connection: connection as ScoringConnection, model: offer.model };
    }
    return undefined;
  }

  /**
   * Claws back a failed order's pending earning. The audit can finish before the order is settled
   * (the consumer may still be reading): then it retries a few times, half a second apart.
   */
  private async clawBack(store: TrustStore, orderId: string): Promise<ClawBack> {
    for (let attempt = 0; ; attempt++) {
      const result = await store.clawBack(orderId);
      if (result.done || result.reason !== "not_settled" || attempt >= 20) return result;
      await new Promise<void>((resolve) => setTimeout(resolve, 500).unref());
    }
  }

  /**
   * After a failed test: claws back the pending earning of every other order of the worker and
   * model the test covered (created since its last passed test, up to the audited order, or up to
   * now when the worker was suspended), each idempotently, and refunds their consumers. An order
   * still running is left alone (it is not settled yet).
   */
  private async clawBackCovered(
    store: TrustStore,
    workerId: string,
    model: string,
    since: Date | null,
    auditedOrderId: string,
    upToNow = false,
  ): Promise<{ orderId: string; clawBack: ClawBack }[]> {
    const done: { orderId: string; clawBack: ClawBack }[] = [];
    const until = upToNow || !auditedOrderId ? undefined : auditedOrderId;
    for (const orderId of await store.pendingOrdersOf(workerId, model, since, until)) {
      if (orderId === auditedOrderId) continue;
      const clawBack = await store.clawBack(orderId);
      if (clawBack.done) done.push({ orderId, clawBack });
    }
    if (done.length > 0) {
      this.options.log.warn(
        { workerId, model, orders: done.map((d) => d.orderId) },
        "failed test: the pending earnings of the orders it covered were clawed back and their consumers refunded",
      );
    }
    return done;
  }

  /** `scoredPositions` random token indexes (ascending), or all of them for a short answer. */
  private samplePositions(count: number): number[] {
    const wanted = this.options.scoredPositions ?? 128;
    const all = Array.from({ length: count }, (_, i) => i);
    if (count <= wanted) return all;
    for (let i = count - 1; i > 0; i--) {
      const j = Math.floor(this.random() * (i + 1));
      [all[i], all[j]] = [all[j] as number, all[i] as number];
    }
    return all.slice(0, wanted).sort((a, b) => a - b);
  }

  /**
   * A verdict reached outside {@link audit}: a blind canary's answer compared with the trusted
   * verifier's reference answer (server/trust/canary.ts). It goes through the same per-worker
   * sequential test, tally, reputation, records and consequences as an audit (a canary has no
   * order of its own: a failure claws back the orders the failed test covered).
   */
  recordVerdict(verdict: Omit<Verdict, "kind" | "orderId">): Promise<AuditRecord> {
    return this.conclude({ ...verdict, kind: "canary", orderId: "" });
  }

  private async audit(job: FinishedDetailJob): Promise<void> {
    const verifier = this.verifierFor(job);
    if (!verifier) {
      this.options.log.info(
        { jobId: job.assign.jobId, weightsSha256: job.offer.weightsSha256 ?? "" },
        "no trusted verifier serves these weights: job not audited",
      );
      return;
    }
    const auditId = `aud_${randomUUID()}`;
    const started = performance.now();
    const positions = this.samplePositions(job.tokenDetails.length);
    const result = await verifier.connection.scoreTokens(
      auditId,
      { ...job.assign, model: verifier.model },
      job.tokenDetails.map((t) => t.tokenId),
      positions.length === job.tokenDetails.length ? [] : positions,
      this.options.verifyTimeoutMs ?? 30_000,
    );
    const verifyMs = performance.now() - started;
    if (result.unsupported) {
      // The verifier's limitation, not the audited worker's fault: no verdict.
      throw new Error(`verifier ${verifier.connection.workerId} cannot score: ${result.error}`);
    }
    if (!result.error && result.scores.length !== positions.length) {
      // The verifier's fault, not the audited worker's: no verdict.
      throw new Error(
        `verifier ${verifier.connection.workerId} scored ${result.scores.length} of ${positions.length} positions`,
      );
    }
    const input: AuditInput = {
      temperature: job.assign.sampling?.temperature ?? 1,
      topK: job.assign.tokenDetail?.topK ?? 0,
      stoppedBySequence: job.finishReason === "stop",
      streamedText: job.streamedText,
      chunkTokenCount: job.chunkTokenCount,
      usage: job.usage,
      reported: job.tokenDetails,
      positions,
      reference: {
        scores: result.scores.map((s) => ({
          logprob: s.logprob,
          rank: s.rank,
          top: s.top.map((t) => ({ tokenId: t.tokenId, logprob: t.logprob })),
        })),
        promptTokens: result.promptTokens,
        text: result.text,
        error: result.error,
      },
    };
    const record = await this.conclude({
      kind: "audit",
      auditId,
      jobId: job.assign.jobId ?? "",
      orderId: job.orderId,
      workerId: job.workerId,
      verifierId: verifier.connection.workerId,
      model: job.offer.model,
      weightsSha256: job.offer.weightsSha256 ?? "",
      stats: auditStatistics(input, this.parameters),
      verifyMs,
      generationMs: job.generationMs,
    });
    await this.options.onAudit?.(record, job);
  }

  /**
   * One verdict's consequences, for an audit and a canary alike: the worker's sequential test for
   * these weights, its tally and reputation, the record (stored, then listed), suspension after
   * repeated failed tests, and on a failed test the claw-back of the audited order (an audit's)
   * and of every other order the test covered.
   */
  private async conclude(verdict: Verdict): Promise<AuditRecord> {
    const key = `${verdict.workerId}\u0000${verdict.weightsSha256}`;
    let test = this.tests.get(key);
    if (!test) {
      test = new SequentialTest(this.parameters);
      this.tests.set(key, test);
    }
    const step = test.feed(verdict.stats);
    const tally = this.tally(verdict.workerId);
    const coveredSince = this.coveredSince.get(key) ?? null;
    if (step.outcome === "passed") {
      tally.auditsPassed += 1;
      tally.failuresInARow = 0;
      // The passed test covered the jobs up to this one; the next test covers those assigned after it.
      this.coveredSince.set(key, new Date(Date.now() - verdict.generationMs));
    } else if (step.outcome === "failed") {
      tally.auditsFailed += 1;
      tally.failuresInARow += 1;
    } else tally.auditsUndecided += 1;
    if (step.outcome !== "undecided") {
      this.options.reputation?.recordAudit(verdict.workerId, verdict.model, step.outcome === "passed");
    }
    const record: AuditRecord = {
      auditId: verdict.auditId,
      jobId: verdict.jobId,
      orderId: verdict.orderId,
      workerId: verdict.workerId,
      verifierId: verdict.verifierId,
      weightsSha256: verdict.weightsSha256,
      outcome: step.outcome,
      stats: verdict.stats,
      llr: step.llr,
      testTokens: step.consumed,
      tokensToDecide: step.tokensToDecide,
      verifyMs: verdict.verifyMs,
      generationMs: verdict.generationMs,
      at: new Date(),
      model: verdict.model,
    };
    this.options.log[step.outcome === "failed" ? "warn" : "info"](
      {
        kind: verdict.kind,
        jobId: record.jobId,
        workerId: record.workerId,
        verifierId: record.verifierId,
        outcome: step.outcome,
        tokens: verdict.stats.tokens,
        anomalies: verdict.stats.anomalies,
        drift: verdict.stats.drift,
        violations: verdict.stats.violations,
      },
      `${verdict.kind} ${step.outcome}`,
    );
    await this.options.store?.recordAudit(record);
    // Listed once on record, so whoever sees it in audits() finds it in the store (auditOfOrder).
    this.records.push(record);
    if (this.records.length > 10_000) this.records.shift();
    if (step.outcome === "failed" && tally.failuresInARow >= this.suspendAfterFailures) {
      const reason = `failed ${tally.failuresInARow} audit tests in a row (last: ${verdict.kind} ${verdict.auditId} of job ${record.jobId})`;
      record.suspended = tally.suspendedReason === undefined;
      await this.setSuspended(verdict.workerId, true, reason);
    }
    if (step.outcome === "failed" && record.orderId && this.options.store) {
      record.clawBack = await this.clawBack(this.options.store, record.orderId);
      this.options.log.warn(
        { orderId: record.orderId, workerId: record.workerId, clawBack: String(record.clawBack.done) },
        record.clawBack.done
          ? "failed audit: the order's pending earning was clawed back and the consumer refunded"
          : `failed audit: nothing clawed back (${record.clawBack.reason})`,
      );
    }
    if (step.outcome === "failed" && this.options.store) {
      record.coveredClawBacks = await this.clawBackCovered(
        this.options.store,
        verdict.workerId,
        verdict.model,
        coveredSince,
        record.orderId,
        // Suspended: nothing since the last pass is vouched for, up to now. Otherwise the failed
        // test covered the jobs up to the audited one; later ones are the next test's.
        tally.suspendedReason !== undefined,
      );
    }
    return record;
  }
}

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
  tokensToDecide: number | null;
  /** Server-measured: scoring round trip, and the audited job's generation. */
  verifyMs: number;
  generationMs: number;
  at: Date;
  /** After a failed audit: what the claw-back of the order's pending earning did. */
  clawBack?: ClawBack;
}

/** Per worker: the audits' tally. */
export interface WorkerTrust {
  workerId: string;
  auditsPassed: number;
  auditsFailed: number;
  auditsUndecided: number;
  trusted: boolean;
}

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
  detailRate: number;
  auditRate: number;

  constructor(private readonly options: TrustServiceOptions) {
    this.random = options.random ?? Math.random;
    this.detailRate = options.detailRate ?? 0.1;
    this.auditRate = options.auditRate ?? 0.02;
    this.parameters = { ...DEFAULT_TEST, ...options.test };
  }

  /** Loads the trusted marks kept in the store (at start-up). */
  async load(): Promise<void> {
    for (const workerId of (await this.options.store?.trustedWorkers()) ?? []) {
      this.trusted.add(workerId);
      this.tally(workerId).trusted = true;
    }
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
    // Audited share of detail jobs, so that auditRate is a share of all eligible jobs.
    const share = this.detailRate > 0 ? Math.min(1, this.auditRate / this.detailRate) : 0;
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
    const stats = auditStatistics(input, this.parameters);
    const key = `${job.workerId}\u0000${job.offer.weightsSha256}`;
    let test = this.tests.get(key);
    if (!test) {
      test = new SequentialTest(this.parameters);
      this.tests.set(key, test);
    }
    const step = test.feed(stats);
    const tally = this.tally(job.workerId);
    if (step.outcome === "passed") tally.auditsPassed += 1;
    else if (step.outcome === "failed") tally.auditsFailed += 1;
    else tally.auditsUndecided += 1;
    const record: AuditRecord = {
      auditId,
      jobId: job.assign.jobId ?? "",
      orderId: job.orderId,
      workerId: job.workerId,
      verifierId: verifier.connection.workerId,
      weightsSha256: job.offer.weightsSha256 ?? "",
      outcome: step.outcome,
      stats,
      llr: step.llr,
      tokensToDecide: step.tokensToDecide,
      verifyMs,
      generationMs: job.generationMs,
      at: new Date(),
    };
    this.records.push(record);
    if (this.records.length > 10_000) this.records.shift();
    this.options.log[step.outcome === "failed" ? "warn" : "info"](
      {
        jobId: record.jobId,
        workerId: record.workerId,
        verifierId: record.verifierId,
        outcome: step.outcome,
        tokens: stats.tokens,
        anomalies: stats.anomalies,
        violations: stats.violations,
      },
      `audit ${step.outcome}`,
    );
    await this.options.store?.recordAudit(record);
    if (step.outcome === "failed" && record.orderId && this.options.store) {
      record.clawBack = await this.clawBack(this.options.store, record.orderId);
      this.options.log.warn(
        { orderId: record.orderId, workerId: record.workerId, clawBack: String(record.clawBack.done) },
        record.clawBack.done
          ? "failed audit: the order's pending earning was clawed back and the consumer refunded"
          : `failed audit: nothing clawed back (${record.clawBack.reason})`,
      );
    }
    await this.options.onAudit?.(record, job);
  }
}

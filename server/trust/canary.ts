/**
 * Blind canaries (issue 8, item 6): a small share of traffic is platform-originated prompts whose
 * right answer the platform knows, sent to workers exactly as consumers' jobs are, so that a worker
 * which answers from a cache, replays earlier answers or otherwise skips the computation is caught
 * even when it serves every audited consumer job honestly.
 *
 * - When: after a consumer's order is dispatched, with probability `rate`, one canary for the same
 *   model goes to a worker serving it (drawn at random, never a trusted verifier). Canaries thus
 *   follow the real traffic's models, rhythm and `max_tokens` (the triggering order's), and never
 *   arrive while a worker is otherwise idle for no reason. A canary never queues ahead of a
 *   consumer: it takes a slot only when one is free after the admission queue had its turn.
 * - What the worker receives: a JobAssign built by the same code (WorkerSession.startJob → the
 *   trust service's seed and token-detail draw → jobAssign), the same id format, one user message,
 *   temperature 0, a server-issued seed and the triggering order's max_tokens and deadline rule.
 *   The prompt is a story opening from a small built-in corpus followed by a freshly drawn sentence
 *   (a name, a colour, a thing): the nonce. It is made of words, not digits, because the words steer
 *   the continuation (measured on stories260K: four different 4-digit numbers in the same sentence
 *   gave the same greedy answer, a different name or thing gave a different one), so an answer cached
 *   or replayed from another prompt is wrong, and the right one must be computed.
 * - The reference answer: a trusted verifier serving the same weights SHA-256 generates the same
 *   job (same messages, temperature 0, same seed, same max_tokens) through the same JobAssign path.
 *   Why a generation rather than teacher-forced scoring: scoring needs the worker's token ids, which
 *   a job carries only when it asks for token detail; asking it on every canary would mark them
 *   (only a share of consumers' jobs asks), while a text comparison works on every canary. At
 *   temperature 0 with the same weights and engine the greedy answers agree exactly; a divergence
 *   is a deterministic failure. (Limit: a verifier on other hardware or another engine build could
 *   flip a near tie and fail an honest worker; checking the divergence point teacher-forced would
 *   remove that, and is not done yet.)
 * - Money: a canary is not an order: no consumer is charged, no hold, no fee, no ledger entry. The
 *   worker is not paid for it either: paying would need a platform-funded earning outside the order
 *   flow (the ledger audit ties every earning to an order). A provider that watches its pending
 *   balance after each job could notice an unpaid job; that is the residual signal, documented.
 * - The verdict feeds the worker's sequential test, tallies, reputation, audit records and
 *   consequences through TrustService.recordVerdict, like an audit's.
 */
import { randomBytes, randomInt, randomUUID } from "node:crypto";
import type { MarketLogger } from "../market/order-run.js";
import type { JobSpec, SlotLease, WorkerConnection, WorkerRegistry } from "../market/registry.js";
import type { OfferRecord } from "../market/store-port.js";
import type { JobAuditStats } from "./statistics.js";
import type { AuditRecord, TrustService } from "./trust-service.js";

/** Story openings the canaries start from (the kind of prompt consumers of small models send). */
export const CANARY_OPENINGS: readonly string[] = [
  "Once upon a time, there was a little girl who lived in a small house.",
  "One day, a little boy went to the park with his mom.",
  "Lily and Ben were playing in the garden.",
  "Tom liked to play outside when the sun was warm.",
  "There was a big tree next to the river.",
  "Sara woke up early and looked out of the window.",
  "A little bird sat on the fence and sang a song.",
  "Max and his dad went to the store to buy some food.",
  "It was a rainy day, and Anna could not go outside.",
  "The cat was sleeping on the soft bed.",
  "Jack found a box under his bed.",
  "Mia wanted to help her grandma in the kitchen.",
];

const NAMES = [
  "Tom",
  "Sue",
  "Max",
  "Mia",
  "Ben",
  "Zoe",
  "Lily",
  "Sam",
  "Anna",
  "Tim",
  "Lucy",
  "Jack",
  "Emma",
  "Leo",
  "Amy",
  "Joe",
  "Kate",
  "Bob",
  "Ella",
  "Dan",
] as const;
const COLOURS = [
  "red",
  "blue",
  "green",
  "yellow",
  "pink",
  "purple",
  "big",
  "small",
  "shiny",
  "soft",
] as const;
const THINGS = [
  "ball",
  "dog",
  "cat",
  "car",
  "ring",
  "hat",
  "kite",
  "boat",
  "cake",
  "bear",
  "bike",
  "doll",
  "frog",
  "fish",
  "box",
  "flower",
] as const;

/** A canary prompt: an opening and a freshly drawn sentence (the nonce) that steers the answer. */
export function canaryPrompt(random: () => number = Math.random): string {
  const pick = <T>(list: readonly T[]): T => list[Math.floor(random() * list.length)] as T;
  return `${pick(CANARY_OPENINGS)} ${pick(NAMES)} had a ${pick(COLOURS)} ${pick(THINGS)}.`;
}

/** How one canary ended. */
export interface CanaryRecord {
  /** The audit record's id (prefix `can_`), also used in the audits table. */
  canaryId: string;
  jobId: string;
  workerId: string;
  model: string;
  weightsSha256: string;
  verifierId: string;
  prompt: string;
  seed: bigint;
  maxTokens: number;
  /** The worker's answer and the reference's ("" when not obtained). */
  answer: string;
  reference: string;
  /** The verdict ("no_verdict": the worker or the verifier did not answer; `reason` says why). */
  outcome: AuditRecord["outcome"] | "no_verdict";
  reason: string;
  /** The record fed to the trust service, when there was a verdict. */
  audit?: AuditRecord;
  at: Date;
}

export interface CanaryOptions {
  registry: WorkerRegistry;
  trust: TrustService;
  log: MarketLogger;
  /** Share of consumer orders followed by a canary (0–1). */
  rate: number;
  /** A canary's deadline, as an order's (--job-timeout). */
  jobTimeoutMs: number;
  /** How long a canary waits for a free slot on its worker or on the verifier before it is dropped. */
  slotTimeoutMs: number;
  /** Uniform [0, 1) source; tests make it deterministic. */
  random?: () => number;
  /** Called after each canary (tests observe it). */
  onCanary?: (record: CanaryRecord) => void;
}

/** What a job run for a canary produced. */
type JobOutcome =
  | {
      ok: true;
      text: string;
      tokens: number;
      usage: { promptTokens: number; completionTokens: number } | null;
    }
  | { ok: false; error: string };

/** Canaries kept in memory at most. */
const MAX_RECORDS = 10_000;

export class CanaryService {
  private readonly random: () => number;
  private readonly records: CanaryRecord[] = [];
  private readonly pending = new Set<Promise<void>>();
  /** Canaries waiting for a free slot: tried again whenever a slot frees. */
  private readonly waiting = new Set<() => void>();
  private stopped = false;
  rate: number;

  constructor(private readonly options: CanaryOptions) {
    this.random = options.random ?? Math.random;
    this.rate = options.rate;
    // Registered after the marketplace's listener and deferred like it: a freed slot goes to a
    // waiting consumer first, a canary takes it only if it is still free.
    options.registry.onCapacity(() => {
      queueMicrotask(() => {
        for (const retry of [...this.waiting]) retry();
      });
    });
  }

  /** A consumer's order was dispatched: maybe send a canary for the same model. Never throws. */
  afterOrder(order: { model: string; maxTokens: number }): void {
    if (this.stopped || this.rate <= 0 || this.random() >= this.rate) return;
    const targets = this.options.registry
      .list()
      .filter(
        (c) => !this.options.trust.isTrusted(c.workerId) && c.offers.some((o) => o.model === order.model),
      );
    const target = targets[Math.floor(this.random() * targets.length)];
    if (!target) return;
    const run = this.launch(target, order.model, order.maxTokens)
      .catch((error: unknown) =>
        this.options.log.warn({ workerId: target.workerId, error: String(error) }, "canary could not run"),
      )
      .finally(() => this.pending.delete(run));
    this.pending.add(run);
  }

  /** Canary records, newest last. */
  canaries(workerId?: string): CanaryRecord[] {
    return workerId ? this.records.filter((r) => r.workerId === workerId) : [...this.records];
  }

  /** Resolves when every canary started so far has ended (tests, shutdown). */
  async settled(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /** Sends no more canaries and drops the ones waiting for a slot (shutdown). */
  stop(): void {
    this.stopped = true;
    for (const retry of [...this.waiting]) retry();
  }

  /** A connected trusted worker serving `hash`, other than `workerId`, with the model it names it by. */
  private verifierFor(
    workerId: string,
    hash: string,
  ): { connection: WorkerConnection; model: string } | undefined {
    for (const connection of this.options.registry.list()) {
      if (connection.workerId === workerId || !this.options.trust.isTrusted(connection.workerId)) continue;
      const offer = connection.offers.find((o) => o.weightsSha256 === hash);
      if (offer) return { connection, model: offer.model };
    }
    return undefined;
  }

  private async launch(target: WorkerConnection, model: string, maxTokens: number): Promise<void> {
    const offer = target.offers.find((o) => o.model === model) as OfferRecord;
    const hash = offer.weightsSha256 ?? "";
    // Without a reference there is nothing to compare with: no canary is sent at all.
    if (!hash || !this.verifierFor(target.workerId, hash)) {
      this.options.log.info(
        { workerId: target.workerId, model, weightsSha256: hash },
        "no trusted verifier serves these weights: no canary sent",
      );
      return;
    }
    const prompt = canaryPrompt(this.random);
    const seed = BigInt(randomInt(0, 2 ** 31));
    const record: CanaryRecord = {
      canaryId: `can_${randomUUID()}`,
      jobId: "",
      workerId: target.workerId,
      model,
      weightsSha256: hash,
      verifierId: "",
      prompt,
      seed,
      maxTokens,
      answer: "",
      reference: "",
      outcome: "no_verdict",
      reason: "",
      at: new Date(),
    };
    const job = (jobModel: string): JobSpec => ({
      // The same shape as OrderRun's jobs: id format, one user message, the sampling fields a
      // consumer's chat request sets, the order's max_tokens and deadline rule.
      jobId: `job_${randomBytes(12).toString("base64url")}`,
      model: jobModel,
      messages: [{ role: "user", content: prompt }],
      sampling: { temperature: 0, stop: [], seed },
      maxTokens,
      deadlineUnixMs: Date.now() + this.options.jobTimeoutMs,
    });
    const started = performance.now();
    const workerJob = job(model);
    record.jobId = workerJob.jobId;
    const answer = await this.runOn(target, workerJob);
    const generationMs = performance.now() - started;
    if (!answer.ok) return this.finish(record, `the worker did not answer: ${answer.error}`);
    record.answer = answer.text;
    // The verifier is looked up again: it may have gone while the worker answered.
    const verifier = this.verifierFor(target.workerId, hash);
    if (!verifier) return this.finish(record, "the verifier went away");
    record.verifierId = verifier.connection.workerId;
    const verifyStarted = performance.now();
    const reference = await this.runOn(verifier.connection, job(verifier.model));
    const verifyMs = performance.now() - verifyStarted;
    if (!reference.ok) return this.finish(record, `the verifier did not answer: ${reference.error}`);
    record.reference = reference.text;
    const stats = canaryStatistics(answer.text, answer.tokens, reference.text, seed);
    record.audit = await this.options.trust.recordVerdict({
      auditId: record.canaryId,
      jobId: record.jobId,
      workerId: target.workerId,
      verifierId: record.verifierId,
      model,
      weightsSha256: hash,
      stats,
      verifyMs,
      generationMs,
    });
    record.outcome = record.audit.outcome;
    this.finish(record, stats.violations.join("; "));
  }

  private finish(record: CanaryRecord, reason: string): void {
    record.reason = reason;
    record.at = new Date();
    this.records.push(record);
    if (this.records.length > MAX_RECORDS) this.records.shift();
    this.options.log[record.outcome === "failed" ? "warn" : "info"](
      {
        canaryId: record.canaryId,
        jobId: record.jobId,
        workerId: record.workerId,
        verifierId: record.verifierId,
        outcome: record.outcome,
        reason,
      },
      `canary ${record.outcome}`,
    );
    this.options.onCanary?.(record);
  }

  /** Reserves a slot on `connection` (waiting for one, consumers first) and runs the job on it. */
  private async runOn(connection: WorkerConnection, job: JobSpec): Promise<JobOutcome> {
    const lease = await this.reserve(connection, job.model);
    if (!lease) return { ok: false, error: `no free slot within ${this.options.slotTimeoutMs} ms` };
    // As an order's: the job timeout from when the slot was won (an order is opened after its slot).
    const deadlineUnixMs = Date.now() + this.options.jobTimeoutMs;
    return runJob(lease, { ...job, deadlineUnixMs }, this.options.jobTimeoutMs);
  }

  private reserve(connection: WorkerConnection, model: string): Promise<SlotLease | null> {
    const now = this.stopped ? null : connection.reserve(model);
    if (now || this.stopped) return Promise.resolve(now);
    return new Promise((resolve) => {
      const retry = () => {
        const lease = this.stopped ? null : connection.reserve(model);
        if (!lease && !this.stopped) return;
        this.waiting.delete(retry);
        clearTimeout(timer);
        resolve(lease);
      };
      const timer = setTimeout(() => {
        this.waiting.delete(retry);
        resolve(null);
      }, this.options.slotTimeoutMs);
      timer.unref();
      this.waiting.add(retry);
    });
  }
}

/** Runs one job on a reserved slot, taking its chunks as fast as they come. */
function runJob(lease: SlotLease, job: JobSpec, timeoutMs: number): Promise<JobOutcome> {
  return new Promise((resolve) => {
    let text = "";
    let tokens = 0;
    let ended = false;
    const end = (outcome: JobOutcome) => {
      if (ended) return;
      ended = true;
      clearTimeout(timer);
      resolve(outcome);
    };
    const timer = setTimeout(() => {
      lease.cancel("the job exceeded its deadline");
      end({ ok: false, error: `no answer within ${timeoutMs} ms` });
    }, timeoutMs);
    timer.unref();
    lease.assign(job, {
      chunk: (piece, sequence) => {
        text += piece.text;
        tokens +=
          Number.isFinite(piece.tokenCount) && piece.tokenCount > 0 ? Math.floor(piece.tokenCount) : 0;
        lease.acknowledge(sequence);
      },
      done: (_finishReason, usage) => end({ ok: true, text, tokens, usage }),
      failed: (message) => end({ ok: false, error: message }),
    });
  });
}

/**
 * A canary's answer against the reference answer, as audit statistics: the same text is one
 * unflagged position per token (evidence of honesty for the sequential test); any divergence is a
 * deterministic violation (a failure at once), naming where the texts part.
 */
export function canaryStatistics(
  answer: string,
  answerTokens: number,
  reference: string,
  seed: bigint,
): JobAuditStats {
  const agree = answer === reference;
  let common = 0;
  while (common < answer.length && common < reference.length && answer[common] === reference[common])
    common++;
  const tokens = Math.max(answerTokens, 1);
  return {
    tokens: answerTokens,
    anomalies: agree ? 0 : 1,
    flags: agree ? new Array<boolean>(tokens).fill(false) : [],
    meanAbsDelta: 0,
    maxAbsDelta: 0,
    medianRank: 0,
    topKOverlap: 1,
    greedyAgreement: agree ? 1 : common / Math.max(answer.length, reference.length, 1),
    drift: null,
    violations: agree
      ? []
      : [
          `canary: the answer differs from the reference answer (temperature 0, seed ${seed}) from character ${common} of ${reference.length}`,
        ],
  };
}

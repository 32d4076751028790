/**
 * Trust consequences on a real database (PGlite, or PostgreSQL with DATABASE_URL): suspensions and
 * per-model audit tallies survive a new TrustService (a restart) and are replayed into a real
 * ReputationTracker (what matching reads); a running sequential test resumes where it stood;
 * repeated failed tests suspend; the audit rate adapts to what a worker has proven.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { ReputationTracker } from "../../server/market/reputation.js";
import { TrustStore } from "../../server/store/trust-store.js";
import { type AuditRecord, type FinishedDetailJob, TrustService } from "../../server/trust/trust-service.js";
import { openTestStore, type TestStore } from "../support/database.js";
import { auditRecordFixture } from "../support/trust.js";

function logger(lines: string[]) {
  const write = (_fields: unknown, message: string) => lines.push(message);
  return { info: write, warn: write, error: write } as unknown as ConstructorParameters<
    typeof TrustService
  >[0]["log"];
}

function record(id: string, workerId: string, model: string, outcome: AuditRecord["outcome"]): AuditRecord {
  return auditRecordFixture(id, workerId, outcome, { orderId: "", verifyMs: 1, model });
}

/** A finished detail job of `workerId` (no verifier is connected, so an audit of it logs and stops). */
function finishedJob(workerId: string): FinishedDetailJob {
  return {
    workerId,
    orderId: "",
    offer: { model: "m", weightsSha256: "ab".repeat(32) } as FinishedDetailJob["offer"],
    assign: { jobId: `job_${workerId}` },
    streamedText: "",
    chunkTokenCount: 0,
    tokenDetails: [],
    usage: null,
    finishReason: "length",
    generationMs: 1,
  };
}

describe("trust consequences on the store", () => {
  let db: TestStore;
  beforeAll(async () => {
    db = await openTestStore();
  }, 60_000);
  afterAll(async () => {
    await db?.close();
  });

  it("keeps a suspension across a restart, replays it into matching, and lifts it", async () => {
    const store = new TrustStore(db.orm);
    const suspended: [string, string][] = [];
    const first = new TrustService({
      connections: () => [],
      log: logger([]),
      store,
      reputation: new ReputationTracker(),
      onSuspended: (workerId, reason) => suspended.push([workerId, reason]),
    });
    await first.setSuspended("wkr_s", true, "caught lying");
    await first.setSuspended("wkr_s", true, "again"); // idempotent: the first reason stays, told once
    expect(suspended).toEqual([["wkr_s", "caught lying"]]);
    expect(await store.suspendedWorkers()).toEqual([
      { workerId: "wkr_s", reason: "caught lying", suspendedAt: expect.any(Date) },
    ]);

    const reputation = new ReputationTracker();
    const second = new TrustService({ connections: () => [], log: logger([]), store, reputation });
    expect(second.suspendedReason("wkr_s")).toBeUndefined();
    await second.load();
    expect(second.suspendedReason("wkr_s")).toBe("caught lying");
    expect(reputation.availability("wkr_s", "any-model")).toBe("suspended");
    expect(reputation.snapshot("wkr_s", "any-model")).toMatchObject({ suspended: true, reputation: 0 });

    await second.setSuspended("wkr_s", false);
    expect(second.suspendedReason("wkr_s")).toBeUndefined();
    expect(reputation.availability("wkr_s", "any-model")).toBe("available");
    expect(await store.suspendedWorkers()).toEqual([]);
    expect(await store.unsuspend("wkr_s")).toBe(false);
  });

  it("replays per-model audit tallies into the reputation after a restart", async () => {
    const store = new TrustStore(db.orm);
    await store.recordAudit(record("t1", "wkr_t", "alpha", "passed"));
    await store.recordAudit(record("t2", "wkr_t", "alpha", "passed"));
    await store.recordAudit(record("t3", "wkr_t", "alpha", "failed"));
    await store.recordAudit(record("t4", "wkr_t", "alpha", "undecided"));
    await store.recordAudit(record("t5", "wkr_t", "beta", "failed"));
    const reputation = new ReputationTracker();
    const trust = new TrustService({ connections: () => [], log: logger([]), store, reputation });
    await trust.load();
    expect(reputation.snapshot("wkr_t", "alpha")).toMatchObject({ auditsPassed: 2, auditsFailed: 1 });
    expect(reputation.snapshot("wkr_t", "beta")).toMatchObject({ auditsPassed: 0, auditsFailed: 1 });
    // (2 + 1) / (2 + 1 + 4 × 1) of the reliability prior 2/3.
    expect(reputation.snapshot("wkr_t", "alpha").reputation).toBeCloseTo((2 / 3) * (3 / 7), 10);
    expect(trust.trustOf("wkr_t")).toMatchObject({ auditsPassed: 2, auditsFailed: 2, auditsUndecided: 1 });
  });

  it("resumes a worker's running sequential test after a restart, with the evidence it had", async () => {
    const store = new TrustStore(db.orm);
    const verdict = (id: string, anomalous: number) => ({
      auditId: id,
      jobId: `job_${id}`,
      workerId: "wkr_sprt",
      verifierId: "wkr_verifier",
      model: "m",
      weightsSha256: "cd".repeat(32),
      stats: {
        tokens: anomalous,
        anomalies: anomalous,
        flags: new Array<boolean>(anomalous).fill(true),
        meanAbsDelta: 0,
        maxAbsDelta: 0,
        medianRank: 0,
        topKOverlap: 1,
        greedyAgreement: null,
        drift: null,
        violations: [],
      },
      verifyMs: 1,
      generationMs: 1,
    });
    const first = new TrustService({ connections: () => [], log: logger([]), store });
    // Six anomalous tokens: evidence, not yet a decision (the 13th in a row decides).
    const before = await first.recordVerdict(verdict("s1", 6));
    expect(before).toMatchObject({ outcome: "undecided", testTokens: 6 });

    // A restart: seven more anomalous tokens complete the test that was running...
    const second = new TrustService({ connections: () => [], log: logger([]), store });
    await second.load();
    const after = await second.recordVerdict(verdict("s2", 7));
    expect(after).toMatchObject({ outcome: "failed", tokensToDecide: 13 });
    // ...where a fresh test (what a restart used to give) would still be undecided.
    const fresh = new TrustService({ connections: () => [], log: logger([]) });
    expect((await fresh.recordVerdict(verdict("s3", 7))).outcome).toBe("undecided");
  });

  it("audits a new worker at the high rate and a proven one at the base rate", async () => {
    const store = new TrustStore(db.orm);
    for (let i = 0; i < 12; i++) await store.recordAudit(record(`p${i}`, "wkr_proven", "m", "passed"));
    // Ten passes, but three failures weigh twelve: not proven.
    for (let i = 0; i < 10; i++) await store.recordAudit(record(`q${i}`, "wkr_mixed", "m", "passed"));
    for (let i = 0; i < 3; i++) await store.recordAudit(record(`r${i}`, "wkr_mixed", "m", "failed"));
    const lines: string[] = [];
    // Every draw is 0.5: audited exactly when the worker's share of detail jobs is above one half.
    const trust = new TrustService({
      connections: () => [],
      log: logger(lines),
      store,
      detailRate: 0.1,
      auditRate: 0.02,
      random: () => 0.5,
    });
    await trust.load();
    expect(trust.auditRateFor("wkr_new")).toBe(0.1); // 25 % capped by the 10 % token-detail share
    expect(trust.auditRateFor("wkr_mixed")).toBe(0.1);
    expect(trust.auditRateFor("wkr_proven")).toBe(0.02);
    // The draw after JobDone: the new worker's detail job is audited (all its detail jobs are),
    // the proven worker's is not (a fifth of them are).
    trust.finished(finishedJob("wkr_new"));
    trust.finished(finishedJob("wkr_proven"));
    await trust.settled();
    expect(lines.filter((line) => line.includes("no trusted verifier"))).toHaveLength(1);
    // Token detail itself is asked on the same share of jobs whoever the worker is.
    const job = { sampling: {} } as Parameters<TrustService["prepare"]>[0];
    expect(trust.prepare(job).tokenDetail).toBeUndefined(); // 0.5 ≥ 0.1 for everyone
    // Auditing off stays off, even for new workers.
    trust.auditRate = 0;
    expect(trust.auditRateFor("wkr_new")).toBe(0);
  });
});

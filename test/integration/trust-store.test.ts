/**
 * TrustStore on a real database (PGlite, or PostgreSQL with DATABASE_URL): trusted marks survive a
 * new TrustService (a restart), and audit records are tallied per worker.
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TrustStore } from "../../server/store/trust-store.js";
import { type AuditRecord, TrustService } from "../../server/trust/trust-service.js";
import { openTestStore, type TestStore } from "../support/database.js";
import { auditRecordFixture } from "../support/trust.js";

const silent = { info: () => {}, warn: () => {}, error: () => {} } as unknown as ConstructorParameters<
  typeof TrustService
>[0]["log"];

function record(id: string, workerId: string, outcome: AuditRecord["outcome"]): AuditRecord {
  return auditRecordFixture(id, workerId, outcome);
}

describe("TrustStore", () => {
  let db: TestStore;
  beforeAll(async () => {
    db = await openTestStore();
  }, 60_000);
  afterAll(async () => {
    await db?.close();
  });

  it("keeps trusted marks across a restart of the trust service, and removes them", async () => {
    const store = new TrustStore(db.orm);
    const first = new TrustService({ connections: () => [], log: silent, store });
    await first.setTrusted("wkr_b", true);
    await first.setTrusted("wkr_a", true);
    await first.setTrusted("wkr_a", true);
    const second = new TrustService({ connections: () => [], log: silent, store });
    expect(second.isTrusted("wkr_a")).toBe(false);
    await second.load();
    expect(second.isTrusted("wkr_a")).toBe(true);
    expect(await store.trustedWorkers()).toEqual(["wkr_a", "wkr_b"]);
    await second.setTrusted("wkr_b", false);
    expect(await store.trustedWorkers()).toEqual(["wkr_a"]);
  });

  it("records audits once each and tallies them per worker", async () => {
    const store = new TrustStore(db.orm);
    await store.recordAudit(record("1", "wkr_x", "passed"));
    await store.recordAudit(record("2", "wkr_x", "failed"));
    await store.recordAudit(record("3", "wkr_x", "passed"));
    await store.recordAudit(record("3", "wkr_x", "passed"));
    await store.recordAudit(record("4", "wkr_y", "undecided"));
    expect(await store.tallies(["wkr_x", "wkr_y", "wkr_none"])).toEqual([
      { workerId: "wkr_x", auditsPassed: 2, auditsFailed: 1, auditsUndecided: 0 },
      { workerId: "wkr_y", auditsPassed: 0, auditsFailed: 0, auditsUndecided: 1 },
    ]);
    expect(await store.tallies([])).toEqual([]);
    // Each order says whether it was audited and how it went.
    expect(await store.auditOfOrder("chatcmpl-2")).toEqual({
      auditId: "2",
      outcome: "failed",
      violations: [],
    });
    expect(await store.auditOfOrder("chatcmpl-none")).toBeNull();
    // Nothing to claw back from an order that does not exist (settled orders: test/e2e/trust-audits).
    expect(await store.clawBack("chatcmpl-none")).toEqual({ done: false, reason: "unknown_order" });
  });
});

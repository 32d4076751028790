/**
 * Persistence of trust (server/trust/): the operator's trusted verifiers and the audits' records.
 * Plain SQL on its own tables (Migration20251125170000_trust), one short statement per call, never
 * inside another transaction (PGlite runs one connection).
 */
import type { MikroORM } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/postgresql";
import { PLATFORM_ACCOUNT_ID } from "../market/store-port.js";
import type { AuditRecord } from "../trust/trust-service.js";
import { newId } from "./secrets.js";

/** What a claw-back did, or why it did nothing. */
export type ClawBack =
  | {
      done: true;
      providerAmount: bigint;
      feeAmount: bigint;
      consumerAccountId: string;
      providerAccountId: string;
    }
  | { done: false; reason: "unknown_order" | "not_settled" | "no_pending_earning" | "already_clawed_back" };

/** A worker's suspension as stored. */
/** Where a worker's sequential test for one build of a model stood after its last verdict. */
export interface StoredTestState {
  workerId: string;
  weightsSha256: string;
  llr: number;
  consumed: number;
  /** What the next failed test covers from: the last passed verdict's job start, or null (none). */
  coveredSince: Date | null;
}

export interface StoredSuspension {
  workerId: string;
  reason: string;
  suspendedAt: Date;
}

/** Audit tallies of one worker serving one model (the model is unknown for audits recorded before it was kept). */
export interface StoredModelTally {
  workerId: string;
  model: string | null;
  auditsPassed: number;
  auditsFailed: number;
}

/** A worker's audit tally as stored. */
export interface StoredAuditTally {
  workerId: string;
  auditsPassed: number;
  auditsFailed: number;
  auditsUndecided: number;
}

export class TrustStore {
  constructor(private readonly orm: MikroORM) {}

  private execute<T extends object>(sql: string, params: unknown[] = []): Promise<T[]> {
    return this.orm.em.fork().getConnection().execute<T[]>(sql, params);
  }

  /** Marks (or unmarks) a worker as a trusted verifier. Idempotent. */
  async setTrusted(workerId: string, trusted: boolean): Promise<void> {
    if (trusted) {
      await this.execute(
        "insert into trusted_workers (worker_id) values (?) on conflict (worker_id) do nothing",
        [workerId],
      );
    } else {
      await this.execute("delete from trusted_workers where worker_id = ?", [workerId]);
    }
  }

  /** Every trusted worker id. */
  async trustedWorkers(): Promise<string[]> {
    const rows = await this.execute<{ worker_id: string }>(
      "select worker_id from trusted_workers order by worker_id",
    );
    return rows.map((row) => row.worker_id);
  }

  /** Records one audit (its statistics as JSON, without the per-token flags). */
  async recordAudit(record: AuditRecord): Promise<void> {
    const { flags: _flags, ...stats } = record.stats;
    await this.execute(
      `insert into audits (id, job_id, order_id, worker_id, verifier_id, weights_sha256, outcome, tokens,
         anomalies, violations, stats, verify_ms, generation_ms, created_at, model)
       values (?, ?, ?, ?, ?, ?, ?, ?, ?, ?::jsonb, ?::jsonb, ?, ?, ?, ?)
       on conflict (id) do nothing`,
      [
        record.auditId,
        record.jobId,
        record.orderId || null,
        record.workerId,
        record.verifierId,
        record.weightsSha256,
        record.outcome,
        record.stats.tokens,
        record.stats.anomalies,
        JSON.stringify(record.stats.violations),
        JSON.stringify({
          ...stats,
          llr: record.llr,
          testTokens: record.testTokens ?? 0,
          tokensToDecide: record.tokensToDecide,
        }),
        record.verifyMs,
        record.generationMs,
        record.at,
        record.model ?? null,
      ],
    );
  }

  /**
   * After a failed audit: takes the order's provider earning back out of `pending` (it has not
   * matured: the settlement window is the audit window) and refunds it, with the platform's fee,
   * to the consumer's `available` book. One transaction, idempotent (`clawback/<order id>`), locking
   * the order, its pending earning, then the accounts in id order as every money operation does.
   * The earning is marked released, so it never matures. No money is created or destroyed: the
   * consumer gets back exactly what the provider and the platform lose (the fee only as far as the
   * platform still has it available).
   */
  async clawBack(orderId: string): Promise<ClawBack> {
    return this.orm.em.fork().transactional(async (em) => {
      const exec = <T extends object>(sql: string, params: unknown[] = []) =>
        (em as unknown as EntityManager).execute<T[]>(sql, params);
      const [order] = await exec<{ consumer_account_id: string; status: string; fee: string | null }>(
        "select consumer_account_id, status, fee::text as fee from orders where id = ? for update",
        [orderId],
      );
      if (!order) return { done: false, reason: "unknown_order" };
      if (order.status === "running") return { done: false, reason: "not_settled" };
      const key = `clawback/${orderId}`;
      const [already] = await exec<{ id: string }>(
        "select id from ledger_transactions where idempotency_key = ?",
        [key],
      );
      if (already) return { done: false, reason: "already_clawed_back" };
      const [earning] = await exec<{ account_id: string; amount: string }>(
        "select account_id, amount::text as amount from pending_earnings where order_id = ? and released_at is null for update",
        [orderId],
      );
      if (!earning) return { done: false, reason: "no_pending_earning" };
      const consumer = order.consumer_account_id;
      const provider = earning.account_id;
      const ids = [...new Set([consumer, provider, PLATFORM_ACCOUNT_ID])].sort();
      const accounts = await exec<{ id: string; available: string }>(
        `select id, available::text as available from accounts where id in (${ids.map(() => "?").join(", ")})
         order by id for update`,
        ids,
      );
      const platformAvailable = BigInt(accounts.find((a) => a.id === PLATFORM_ACCOUNT_ID)?.available ?? "0");
      const providerAmount = BigInt(earning.amount);
      const fee = BigInt(order.fee ?? "0");
      const feeAmount = fee < platformAvailable ? fee : platformAvailable;
      const transactionId = newId("ltx");
      await exec(
        "insert into ledger_transactions (id, kind, order_id, idempotency_key, created_at) values (?, 'clawback', ?, ?, now())",
        [transactionId, orderId, key],
      );
      const postings: [string, "available" | "pending", bigint][] = [
        [provider, "pending", -providerAmount],
        [consumer, "available", providerAmount],
      ];
      if (feeAmount > 0n)
        postings.push([PLATFORM_ACCOUNT_ID, "available", -feeAmount], [consumer, "available", feeAmount]);
      for (const [account, book, amount] of postings) {
        await exec(
          "insert into ledger_entries (transaction_id, account_id, book, amount) values (?, ?, ?, ?)",
          [transactionId, account, book, amount.toString()],
        );
        await exec(`update accounts set ${book} = ${book} + ?::bigint where id = ?`, [
          amount.toString(),
          account,
        ]);
      }
      await exec("update pending_earnings set released_at = now() where order_id = ?", [orderId]);
      return {
        done: true,
        providerAmount,
        feeAmount,
        consumerAccountId: consumer,
        providerAccountId: provider,
      };
    });
  }

  /** Whether an order was audited, and the outcome; null when it was not. */
  async auditOfOrder(
    orderId: string,
  ): Promise<{ auditId: string; outcome: string; violations: string[] } | null> {
    const [row] = await this.execute<{ id: string; outcome: string; violations: string[] }>(
      "select id, outcome, violations from audits where order_id = ? order by created_at desc limit 1",
      [orderId],
    );
    return row ? { auditId: row.id, outcome: row.outcome, violations: row.violations } : null;
  }

  /** Audit tallies per worker (for the worker list), of the given workers or all. */
  async tallies(workerIds?: readonly string[]): Promise<StoredAuditTally[]> {
    const filter = workerIds ? `where worker_id in (${workerIds.map(() => "?").join(", ") || "null"})` : "";
    const rows = await this.execute<{ worker_id: string; passed: string; failed: string; undecided: string }>(
      `select worker_id,
              count(*) filter (where outcome = 'passed') as passed,
              count(*) filter (where outcome = 'failed') as failed,
              count(*) filter (where outcome = 'undecided') as undecided
         from audits ${filter} group by worker_id order by worker_id`,
      [...(workerIds ?? [])],
    );
    return rows.map((row) => ({
      workerId: row.worker_id,
      auditsPassed: Number(row.passed),
      auditsFailed: Number(row.failed),
      auditsUndecided: Number(row.undecided),
    }));
  }

  /** Per worker and model: passed and failed audits (replayed into the matcher's reputation at start-up). */
  async modelTallies(): Promise<StoredModelTally[]> {
    const rows = await this.execute<{
      worker_id: string;
      model: string | null;
      passed: string;
      failed: string;
    }>(
      `select worker_id, model,
              count(*) filter (where outcome = 'passed') as passed,
              count(*) filter (where outcome = 'failed') as failed
         from audits group by worker_id, model order by worker_id, model`,
    );
    return rows.map((row) => ({
      workerId: row.worker_id,
      model: row.model,
      auditsPassed: Number(row.passed),
      auditsFailed: Number(row.failed),
    }));
  }

  /** Per worker and weights: the running test's state after the latest verdict (replayed at start-up). */
  async testStates(): Promise<StoredTestState[]> {
    const rows = await this.execute<{
      worker_id: string;
      weights_sha256: string;
      llr: string | null;
      test_tokens: string | null;
      covered_since: Date | string | null;
    }>(
      `select distinct on (worker_id, weights_sha256)
              worker_id, weights_sha256, stats->>'llr' as llr, stats->>'testTokens' as test_tokens,
              (select max(p.created_at - make_interval(secs => p.generation_ms / 1000.0))
                 from audits p
                where p.worker_id = a.worker_id and p.weights_sha256 = a.weights_sha256
                  and p.outcome = 'passed') as covered_since
         from audits a
        order by worker_id, weights_sha256, created_at desc, id desc`,
    );
    return rows.map((row) => ({
      workerId: row.worker_id,
      weightsSha256: row.weights_sha256,
      llr: Number(row.llr ?? 0),
      consumed: Number(row.test_tokens ?? 0),
      coveredSince: row.covered_since === null ? null : new Date(row.covered_since),
    }));
  }

  /** Suspends a worker (its token is refused while the row exists). Idempotent: the first reason stays. */
  async suspend(workerId: string, reason: string): Promise<void> {
    await this.execute(
      "insert into suspended_workers (worker_id, reason) values (?, ?) on conflict (worker_id) do nothing",
      [workerId, reason],
    );
  }

  /** Lifts a suspension; false when the worker was not suspended. */
  async unsuspend(workerId: string): Promise<boolean> {
    const rows = await this.execute<{ worker_id: string }>(
      "delete from suspended_workers where worker_id = ? returning worker_id",
      [workerId],
    );
    return rows.length > 0;
  }

  /** Every suspended worker. */
  async suspendedWorkers(): Promise<StoredSuspension[]> {
    const rows = await this.execute<{ worker_id: string; reason: string; suspended_at: Date | string }>(
      "select worker_id, reason, suspended_at from suspended_workers order by worker_id",
    );
    return rows.map((row) => ({
      workerId: row.worker_id,
      reason: row.reason,
      suspendedAt: new Date(row.suspended_at),
    }));
  }

  /**
   * The worker's orders for `model`, created after `since` (and, with `untilOrderId`, not after
   * that order), whose provider earning is still pending (not released, not clawed back): what a
   * failed sequential test can still claw back.
   */
  async pendingOrdersOf(
    workerId: string,
    model: string,
    since: Date | null,
    untilOrderId?: string,
  ): Promise<string[]> {
    const until = untilOrderId ? "and o.created_at <= (select created_at from orders where id = ?)" : "";
    const rows = await this.execute<{ id: string }>(
      `select o.id from orders o join pending_earnings p on p.order_id = o.id
        where o.worker_id = ? and o.model = ? and p.released_at is null and o.created_at > ? ${until}
        order by o.created_at, o.id`,
      [workerId, model, since ?? new Date(0), ...(untilOrderId ? [untilOrderId] : [])],
    );
    return rows.map((row) => row.id);
  }
}

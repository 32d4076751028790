import { Migration } from "@mikro-orm/migrations";

/**
 * Trust (issue 8): which workers the operator trusts as reference verifiers, and every audit's
 * outcome (by worker and by order: whether an order was audited, and how it went), so both survive
 * a restart and feed the worker list. Additive: no existing table changes.
 */
export class Migration20251125170000_trust extends Migration {
  override async up(): Promise<void> {
    this.addSql(`
      create table if not exists trusted_workers (
        worker_id text primary key,
        trusted_at timestamptz not null default now()
      )`);
    this.addSql(`
      create table if not exists audits (
        id text primary key,
        job_id text not null,
        order_id text,
        worker_id text not null,
        verifier_id text not null,
        weights_sha256 text not null,
        outcome text not null check (outcome in ('passed', 'failed', 'undecided')),
        tokens integer not null,
        anomalies integer not null,
        violations jsonb not null,
        stats jsonb not null,
        verify_ms double precision not null,
        generation_ms double precision not null,
        created_at timestamptz not null default now()
      )`);
    this.addSql("create index if not exists audits_worker_idx on audits (worker_id, created_at)");
    this.addSql("create index if not exists audits_order_idx on audits (order_id)");
    // A failed audit claws the order's pending earning back and refunds the consumer.
    this.addSql(`
      alter table ledger_transactions
        drop constraint ledger_transactions_kind_check,
        add constraint ledger_transactions_kind_check
          check (kind in ('deposit', 'withdrawal', 'hold', 'reassign', 'settle', 'release', 'clawback'))`);
  }

  override async down(): Promise<void> {
    this.addSql(`
      alter table ledger_transactions
        drop constraint ledger_transactions_kind_check,
        add constraint ledger_transactions_kind_check
          check (kind in ('deposit', 'withdrawal', 'hold', 'reassign', 'settle', 'release'))`);
    this.addSql("drop table if exists audits");
    this.addSql("drop table if exists trusted_workers");
  }
}

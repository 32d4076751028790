import { Migration } from "@mikro-orm/migrations";

/**
 * Trust consequences (issue 8, item 8): suspended workers, and the model each audit was about (so
 * the per-model audit tallies the matcher uses can be replayed at start-up). Additive: a new table
 * and a nullable column.
 *
 * A suspension is its own row rather than the token's `revoked_at`: a revoked worker disappears from
 * the worker list and could never be reinstated, while a suspended one stays visible with its
 * reason, its token is refused while the row exists, and the operator can lift it.
 */
export class Migration20251125180000_trust_consequences extends Migration {
  override async up(): Promise<void> {
    this.addSql(`
      create table if not exists suspended_workers (
        worker_id text primary key,
        reason text not null,
        suspended_at timestamptz not null default now()
      )`);
    this.addSql("alter table audits add column if not exists model text null");
  }

  override async down(): Promise<void> {
    this.addSql("alter table audits drop column if exists model");
    this.addSql("drop table if exists suspended_workers");
  }
}

import { Migration } from "@mikro-orm/migrations";

/**
 * Money that is exact under races, crashes and lying workers (issue 5):
 * - orders carry what settlement needs to compute the bill itself (prompt bound, fee rate) and
 *   what the platform noticed about the worker (trust signals); reported usage is any uint32;
 *   free orders (hold 0) are valid;
 * - a third book, `pending`, where provider earnings wait until they mature, with one row per
 *   settled order saying when;
 * - idempotency keys with Stripe's semantics: the request's fingerprint and its first response.
 */
export class Migration20250801000000_exact_money extends Migration {
  override async up(): Promise<void> {
    this.addSql(`
      alter table accounts
        add column pending bigint not null default 0,
        add constraint accounts_pending_check check (pending >= 0);`);

    this.addSql(`
      alter table orders
        add column prompt_token_bound integer null,
        add column fee_basis_points integer null,
        add column trust_signals jsonb not null default '[]',
        alter column reported_prompt_tokens type bigint,
        alter column reported_completion_tokens type bigint;`);
    // Orders settled before this migration were billed without a bound: what they billed is their
    // bound. Running ones (left by a crash) were admitted with the hold as their only cap, and the
    // hold still caps them. 500 basis points was the server's default fee.
    this.addSql(`
      update orders set
        prompt_token_bound = case when status = 'running' then 2147483647 else prompt_tokens end,
        fee_basis_points = 500;`);
    this.addSql(`
      alter table orders
        alter column prompt_token_bound set not null,
        alter column fee_basis_points set not null,
        drop constraint orders_hold_check,
        add constraint orders_hold_check check (hold >= 0),
        add constraint orders_prompt_token_bound_check check (prompt_token_bound >= 0),
        add constraint orders_fee_basis_points_check check (fee_basis_points between 0 and 10000),
        add constraint orders_trust_signals_check check (jsonb_typeof(trust_signals) = 'array');`);
    // Billed counts never exceed the order's bounds. NOT VALID: rows written from now on are
    // checked; older ones were billed under the previous rules and stay as they were.
    this.addSql(`
      alter table orders add constraint orders_tokens_check check (
        prompt_tokens between 0 and prompt_token_bound and completion_tokens between 0 and max_tokens
      ) not valid;`);

    this.addSql(`
      alter table ledger_transactions
        drop constraint ledger_transactions_kind_check,
        add constraint ledger_transactions_kind_check
          check (kind in ('deposit', 'withdrawal', 'hold', 'reassign', 'settle', 'release'));`);
    this.addSql(`
      alter table ledger_entries
        drop constraint ledger_entries_book_check,
        add constraint ledger_entries_book_check check (book in ('available', 'held', 'pending'));`);

    this.addSql(`
      create table pending_earnings (
        order_id text primary key references orders (id),
        account_id text not null references accounts (id),
        amount bigint not null,
        matures_at timestamptz not null,
        released_at timestamptz null,
        constraint pending_earnings_amount_check check (amount > 0)
      );`);
    this.addSql("create index pending_earnings_account_id_index on pending_earnings (account_id);");
    // The release job and the audit look for unreleased earnings by maturity; released ones are
    // history, so a partial index stays as small as the pending set.
    this.addSql(
      "create index pending_earnings_unreleased_index on pending_earnings (matures_at) where released_at is null;",
    );

    this.addSql(`
      create table idempotency_keys (
        key text primary key,
        operation text not null,
        request_fingerprint text not null,
        response jsonb not null,
        created_at timestamptz not null
      );`);
  }

  override async down(): Promise<void> {
    this.addSql("drop table idempotency_keys;");
    this.addSql("drop table pending_earnings;");
    this.addSql(`
      alter table ledger_entries
        drop constraint ledger_entries_book_check,
        add constraint ledger_entries_book_check check (book in ('available', 'held'));`);
    this.addSql(`
      alter table ledger_transactions
        drop constraint ledger_transactions_kind_check,
        add constraint ledger_transactions_kind_check
          check (kind in ('deposit', 'withdrawal', 'hold', 'reassign', 'settle'));`);
    this.addSql(`
      alter table orders
        drop constraint orders_trust_signals_check,
        drop constraint orders_tokens_check,
        drop constraint orders_fee_basis_points_check,
        drop constraint orders_prompt_token_bound_check,
        drop constraint orders_hold_check,
        add constraint orders_hold_check check (hold > 0),
        alter column reported_prompt_tokens type integer,
        alter column reported_completion_tokens type integer,
        drop column trust_signals,
        drop column fee_basis_points,
        drop column prompt_token_bound;`);
    this.addSql("alter table accounts drop constraint accounts_pending_check, drop column pending;");
  }
}

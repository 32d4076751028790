import { Migration } from "@mikro-orm/migrations";
import { EXTERNAL_ACCOUNT_ID, PLATFORM_ACCOUNT_ID } from "../../market/store-port.js";

/**
 * The initial schema: accounts with cached balances, credentials, workers, orders and the
 * double-entry ledger, plus the two system accounts every ledger transaction may touch.
 *
 * Money is `bigint` micro-credits. The CHECK constraints are the last line of defence behind the
 * store's own balance checks: a bug can fail a transaction, never overdraw an account.
 */
export class Migration20250601000000_initial extends Migration {
  override async up(): Promise<void> {
    this.addSql(`
      create table accounts (
        id text primary key,
        name text not null,
        created_at timestamptz not null,
        default_max_price_per_million_input bigint null,
        default_max_price_per_million_output bigint null,
        default_min_tokens_per_second double precision null,
        available bigint not null default 0,
        held bigint not null default 0,
        -- The external account is the outside world: deposits drive it negative.
        constraint accounts_available_check check (available >= 0 or id = '${EXTERNAL_ACCOUNT_ID}'),
        constraint accounts_held_check check (held >= 0)
      );`);

    this.addSql(`
      create table api_keys (
        id text primary key,
        account_id text not null references accounts (id),
        label text not null,
        prefix text not null,
        secret_hash text not null unique,
        created_at timestamptz not null,
        revoked_at timestamptz null
      );`);
    this.addSql("create index api_keys_account_id_index on api_keys (account_id);");

    this.addSql(`
      create table workers (
        id text primary key,
        account_id text not null references accounts (id),
        label text not null,
        token_prefix text not null,
        token_hash text not null unique,
        name text not null,
        agent_version text not null,
        offers jsonb not null,
        created_at timestamptz not null,
        last_seen_at timestamptz null,
        revoked_at timestamptz null
      );`);
    this.addSql("create index workers_account_id_index on workers (account_id);");

    this.addSql(`
      create table orders (
        id text primary key,
        consumer_account_id text not null references accounts (id),
        api_key_id text not null references api_keys (id),
        model text not null,
        worker_id text null references workers (id),
        provider_account_id text null references accounts (id),
        status text not null,
        price_per_million_input bigint not null,
        price_per_million_output bigint not null,
        hold bigint not null,
        max_tokens integer not null,
        prompt_tokens integer not null,
        completion_tokens integer not null,
        reported_prompt_tokens integer null,
        reported_completion_tokens integer null,
        cost bigint not null,
        fee bigint not null,
        finish_reason text null,
        error text null,
        created_at timestamptz not null,
        first_token_at timestamptz null,
        finished_at timestamptz null,
        constraint orders_status_check check (status in ('running', 'completed', 'failed', 'cancelled')),
        constraint orders_hold_check check (hold > 0),
        constraint orders_cost_check check (cost >= 0 and cost <= hold),
        constraint orders_fee_check check (fee >= 0 and fee <= cost)
      );`);
    this.addSql("create index orders_consumer_account_id_index on orders (consumer_account_id, created_at);");
    this.addSql("create index orders_provider_account_id_index on orders (provider_account_id, created_at);");
    // Start-up recovery looks for running orders; a partial index keeps that cheap forever.
    this.addSql("create index orders_running_index on orders (created_at) where status = 'running';");

    this.addSql(`
      create table ledger_transactions (
        id text primary key,
        kind text not null,
        order_id text null references orders (id),
        idempotency_key text null unique,
        created_at timestamptz not null,
        constraint ledger_transactions_kind_check
          check (kind in ('deposit', 'withdrawal', 'hold', 'reassign', 'settle'))
      );`);
    this.addSql("create index ledger_transactions_order_id_index on ledger_transactions (order_id);");

    this.addSql(`
      create table ledger_entries (
        id bigserial primary key,
        transaction_id text not null references ledger_transactions (id),
        account_id text not null references accounts (id),
        book text not null,
        amount bigint not null,
        constraint ledger_entries_book_check check (book in ('available', 'held')),
        constraint ledger_entries_amount_check check (amount <> 0)
      );`);
    this.addSql("create index ledger_entries_transaction_id_index on ledger_entries (transaction_id);");
    this.addSql("create index ledger_entries_account_id_index on ledger_entries (account_id, book);");

    this.addSql(`
      insert into accounts (id, name, created_at, available, held) values
        ('${PLATFORM_ACCOUNT_ID}', 'Platform', now(), 0, 0),
        ('${EXTERNAL_ACCOUNT_ID}', 'External', now(), 0, 0);`);
  }

  override async down(): Promise<void> {
    this.addSql("drop table ledger_entries;");
    this.addSql("drop table ledger_transactions;");
    this.addSql("drop table orders;");
    this.addSql("drop table workers;");
    this.addSql("drop table api_keys;");
    this.addSql("drop table accounts;");
  }
}

import { Migration } from "@mikro-orm/migrations";

/**
 * The model registry (issue 8, "the platform counts tokens itself"): the GGUFs whose tokenizers the
 * control plane loads to count prompts and relayed text itself, and per order whether its billed
 * counts are the platform's own (verified) or the worker's, bounded by bytes (unverified).
 * Additive: no existing table changes. The per-order row lives in its own table, keyed by order
 * id, so the orders table (and the ledger's hot path that writes it) stays as it is.
 */
export class Migration20251125181000_model_registry extends Migration {
  override async up(): Promise<void> {
    this.addSql(`
      create table if not exists registered_models (
        name text primary key,
        gguf_path text not null,
        gguf_sha256 text not null,
        gguf_bytes bigint not null,
        gguf_mtime_ms double precision not null,
        tokenizer_sha256 text not null,
        tokenizer_model text not null,
        vocabulary_size integer not null,
        chat_template boolean not null,
        registered_at timestamptz not null default now()
      )`);
    this.addSql(`
      create table if not exists order_token_counts (
        order_id text primary key,
        model text not null,
        verified boolean not null,
        gguf_sha256 text,
        prompt_tokens integer,
        completion_tokens integer,
        reported_prompt_tokens bigint,
        reported_completion_tokens bigint,
        claimed_completion_tokens bigint not null,
        created_at timestamptz not null default now()
      )`);
  }

  override async down(): Promise<void> {
    this.addSql("drop table if exists order_token_counts");
    this.addSql("drop table if exists registered_models");
  }
}

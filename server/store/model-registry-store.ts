/**
 * Persistence of the model registry (server/models/): the registered GGUFs and, per order, whether
 * its billed token counts are the platform's own. Plain SQL on its own tables
 * (Migration20251125181000_model_registry), one short statement per call (the orders' records: one
 * per batch), never inside another transaction (PGlite runs one connection).
 */
import type { MikroORM } from "@mikro-orm/core";
import { GroupCommitter } from "./group-commit.js";
import { rawQuery, sqlValue } from "./raw-sql.js";

/** A registered model as stored. */
export interface StoredModel {
  /** The model name consumers ask for and workers offer. */
  name: string;
  /** The GGUF's path on the control plane's machine. */
  ggufPath: string;
  ggufSha256: string;
  ggufBytes: number;
  /** The file's modification time at registration: unchanged size and time skip re-hashing at start. */
  ggufMtimeMs: number;
  /** SHA-256 of the tokenizer's metadata (vocabulary, scores, types, merges, special ids, template). */
  tokenizerSha256: string;
  /** The GGUF's tokenizer kind, e.g. "llama" (SentencePiece) or "gpt2" (BPE). */
  tokenizerModel: string;
  vocabularySize: number;
  chatTemplate: boolean;
  registeredAt: Date;
}

/** How one order's tokens were counted. */
export interface OrderTokenCount {
  orderId: string;
  model: string;
  /** True when the platform counted with a registered tokenizer; false: the worker's count, byte-bounded. */
  verified: boolean;
  /** The GGUF whose tokenizer counted; null when unverified. */
  ggufSha256: string | null;
  /** The platform's own counts (null when unverified). */
  promptTokens: number | null;
  completionTokens: number | null;
  /** What the worker reported in its usage, if it did. */
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
  /** The sum of the token counts the worker's chunks claimed. */
  claimedCompletionTokens: number;
}

interface ModelRow {
  name: string;
  gguf_path: string;
  gguf_sha256: string;
  gguf_bytes: string | number;
  gguf_mtime_ms: number;
  tokenizer_sha256: string;
  tokenizer_model: string;
  vocabulary_size: number;
  chat_template: boolean;
  registered_at: Date | string;
}

interface CountRow {
  order_id: string;
  model: string;
  verified: boolean;
  gguf_sha256: string | null;
  prompt_tokens: number | null;
  completion_tokens: number | null;
  reported_prompt_tokens: string | number | null;
  reported_completion_tokens: string | number | null;
  claimed_completion_tokens: string | number;
}

const nullableNumber = (value: string | number | null): number | null =>
  value === null ? null : Number(value);

export class ModelRegistryStore {
  private readonly counts = new GroupCommitter<OrderTokenCount, undefined>({
    runBatch: (counts) => this.insertCounts(counts),
  });

  constructor(private readonly orm: MikroORM) {}

  private execute<T extends object>(sql: string, params: unknown[] = []): Promise<T[]> {
    return this.orm.em.fork().getConnection().execute<T[]>(sql, params);
  }

  /** Registers a model, or replaces the registration of the same name. */
  async saveModel(model: Omit<StoredModel, "registeredAt">): Promise<StoredModel> {
    const [row] = await this.execute<ModelRow>(
      `insert into registered_models (name, gguf_path, gguf_sha256, gguf_bytes, gguf_mtime_ms, tokenizer_sha256,
         tokenizer_model, vocabulary_size, chat_template)
       values (?, ?, ?, ?, ?, ?, ?, ?, ?)
       on conflict (name) do update set gguf_path = excluded.gguf_path, gguf_sha256 = excluded.gguf_sha256,
         gguf_bytes = excluded.gguf_bytes, gguf_mtime_ms = excluded.gguf_mtime_ms,
         tokenizer_sha256 = excluded.tokenizer_sha256, tokenizer_model = excluded.tokenizer_model,
         vocabulary_size = excluded.vocabulary_size, chat_template = excluded.chat_template,
         registered_at = now()
       returning *`,
      [
        model.name,
        model.ggufPath,
        model.ggufSha256,
        model.ggufBytes,
        model.ggufMtimeMs,
        model.tokenizerSha256,
        model.tokenizerModel,
        model.vocabularySize,
        model.chatTemplate,
      ],
    );
    return modelFromRow(row as ModelRow);
  }

  /** Every registered model, by name. */
  async listModels(): Promise<StoredModel[]> {
    const rows = await this.execute<ModelRow>("select * from registered_models order by name");
    return rows.map(modelFromRow);
  }

  /**
   * Records how an order was counted. Idempotent: a second record of the same order is ignored.
   * Every order writes one, so concurrent records are group-committed: one multi-row statement per
   * batch (group-commit.ts), straight on the pool's client (raw-sql.ts).
   */
  async recordOrderCount(count: OrderTokenCount): Promise<void> {
    await this.counts.submit(count);
  }

  private async insertCounts(counts: readonly OrderTokenCount[]): Promise<undefined[]> {
    const rows = counts.map((count) =>
      [
        count.orderId,
        count.model,
        count.verified,
        count.ggufSha256,
        count.promptTokens,
        count.completionTokens,
        count.reportedPromptTokens,
        count.reportedCompletionTokens,
        count.claimedCompletionTokens,
      ]
        .map(sqlValue)
        .join(", "),
    );
    await rawQuery(
      this.orm,
      `insert into order_token_counts (order_id, model, verified, gguf_sha256, prompt_tokens, completion_tokens,
         reported_prompt_tokens, reported_completion_tokens, claimed_completion_tokens)
       values (${rows.join("), (")})
       on conflict (order_id) do nothing`,
    );
    return counts.map(() => undefined);
  }

  /** The recorded counts of these orders (orders without a record are absent from the map). */
  async orderCounts(orderIds: readonly string[]): Promise<Map<string, OrderTokenCount>> {
    const counts = new Map<string, OrderTokenCount>();
    if (orderIds.length === 0) return counts;
    const rows = await this.execute<CountRow>(
      `select * from order_token_counts where order_id in (${orderIds.map(() => "?").join(", ")})`,
      [...orderIds],
    );
    for (const row of rows) {
      counts.set(row.order_id, {
        orderId: row.order_id,
        model: row.model,
        verified: row.verified,
        ggufSha256: row.gguf_sha256,
        promptTokens: row.prompt_tokens,
        completionTokens: row.completion_tokens,
        reportedPromptTokens: nullableNumber(row.reported_prompt_tokens),
        reportedCompletionTokens: nullableNumber(row.reported_completion_tokens),
        claimedCompletionTokens: Number(row.claimed_completion_tokens),
      });
    }
    return counts;
  }
}

function modelFromRow(row: ModelRow): StoredModel {
  return {
    name: row.name,
    ggufPath: row.gguf_path,
    ggufSha256: row.gguf_sha256,
    ggufBytes: Number(row.gguf_bytes),
    ggufMtimeMs: Number(row.gguf_mtime_ms),
    tokenizerSha256: row.tokenizer_sha256,
    tokenizerModel: row.tokenizer_model,
    vocabularySize: Number(row.vocabulary_size),
    chatTemplate: Boolean(row.chat_template),
    registeredAt: new Date(row.registered_at),
  };
}

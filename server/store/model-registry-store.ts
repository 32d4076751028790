/**
 * Persistence of the model registry (server/models/): the registered GGUFs and, per order, whether
 * its billed token counts are the platform's own. Plain SQL on its own tables
 * (Migration20251125181000_model_registry), one short statement per call, never inside another
 * transaction (PGlite runs one connection). The orders' records are written by their settlements
 * (hot-path.ts), in the same transaction; this store reads them.
 */
import type { MikroORM } from "@mikro-orm/core";
import type { OrderCount } from "../market/store-port.js";

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

/** How one order's tokens were counted, by order id (written with its settlement, hot-path.ts). */
export interface OrderTokenCount extends OrderCount {
  orderId: string;
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

/**
 * The ledger's hot path: opening and settling orders through the SQL functions of
 * Migration20251125000000_ledger_hot_path, one statement for a whole batch of them, with no ORM
 * entity, identity map or unit of work involved. The store submits items through a
 * GroupCommitter, which sends concurrent ones together.
 *
 * Everything the database cannot know (ids, the clock, the settle-after window, clamping counts to
 * what an integer column holds, text PostgreSQL can store) is decided here, before the item is
 * sent; everything that depends on the locked rows (balances, the bill) is decided there.
 */
import type { MikroORM } from "@mikro-orm/postgresql";
import { formatCredits } from "../../common/credits.js";
import { MarketError } from "../market/errors.js";
import {
  type OpenOrderInput,
  type OrderCount,
  type OrderRecord,
  type OrderStatus,
  openedOrderRecord,
} from "../market/store-port.js";
import { rawQuery, sqlText, sqlValue } from "./raw-sql.js";
import { type OrderJson, orderRecordFromJson } from "./records.js";
import { newId } from "./secrets.js";

/** Decimal strings for bigints (JSON has none); ISO strings for times. */
export interface OpenItem {
  op: "open";
  id: string;
  consumerAccountId: string;
  apiKeyId: string;
  model: string;
  workerId: string;
  providerAccountId: string;
  pricePerMillionInput: string;
  pricePerMillionOutput: string;
  hold: string;
  maxTokens: number;
  promptTokenBound: number;
  feeBasisPoints: number;
  transactionId: string;
  createdAt: string;
}

export interface SettleItem {
  op: "settle";
  orderId: string;
  status: Exclude<OrderStatus, "running">;
  /** Already clamped to 0..2^31-1; the database caps them at the order's bounds. */
  promptTokens: number;
  completionTokens: number;
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
  trustSignals: string[];
  finishReason: string | null;
  error: string | null;
  firstTokenAt: string | null;
  finishedAt: string;
  /** When the provider's earning matures: finishedAt plus the store's settle-after window. */
  maturesAt: string;
  transactionId: string;
  createdAt: string;
  /**
   * How the order was counted: not sent to market_ledger_batch but written by the batch's second
   * statement, in its transaction (order_token_counts; the first record of an order stands).
   */
  count?: OrderCount;
}

export type LedgerItem = OpenItem | SettleItem;

/**
 * What market_ledger_batch answers for one item. An open that succeeded carries no row (the item
 * is the row); a settlement carries its order as it now is.
 */
export type LedgerOutcome =
  | { outcome: "ok"; order?: OrderJson }
  | { outcome: "insufficient_credits"; available: string }
  | { outcome: "account_not_found"; accountId: string }
  | { outcome: "conflict" }
  | { outcome: "reference_not_found" }
  | { outcome: "order_not_found" }
  | { outcome: "no_provider" };

export function openItem(input: OpenOrderInput, now: Date): OpenItem {
  return {
    op: "open",
    id: input.id,
    consumerAccountId: input.consumerAccountId,
    apiKeyId: input.apiKeyId,
    model: input.model,
    workerId: input.workerId,
    providerAccountId: input.providerAccountId,
    pricePerMillionInput: input.pricePerMillionInput.toString(),
    pricePerMillionOutput: input.pricePerMillionOutput.toString(),
    hold: input.hold.toString(),
    maxTokens: input.maxTokens,
    promptTokenBound: input.promptTokenBound,
    feeBasisPoints: input.feeBasisPoints,
    transactionId: newId("ltx"),
    createdAt: now.toISOString(),
  };
}

export function settleItem(
  orderId: string,
  fields: Omit<SettleItem, "op" | "orderId" | "transactionId" | "createdAt">,
  now: Date,
): SettleItem {
  return { op: "settle", orderId, ...fields, transactionId: newId("ltx"), createdAt: now.toISOString() };
}

/** The function's answer: outcomes in item order, settled orders by id. */
interface BatchAnswer {
  results: Array<Exclude<LedgerOutcome, { outcome: "ok" }> | { outcome: "ok"; orderId?: string }>;
  orders: Record<string, OrderJson>;
}

/**
 * Runs the items in one round trip and one transaction: the function's statement, and after it the
 * settlements' count records (simple query protocol: the statements of one message commit
 * together). One outcome per item, in order.
 */
export async function runLedgerBatch(orm: MikroORM, items: readonly LedgerItem[]): Promise<LedgerOutcome[]> {
  // By order id, the first of the batch standing (an INSERT's rows need not be applied in order).
  const counts = new Map<string, string>();
  const sent = items.map((item) => {
    if (item.op !== "settle" || item.count === undefined) return item;
    if (!counts.has(item.orderId)) counts.set(item.orderId, countRow(item.orderId, item.count));
    const { count: _, ...rest } = item;
    return rest;
  });
  // Straight on the pool's client: this statement runs for every few requests (raw-sql.ts).
  const rows = await rawQuery<{ answer: BatchAnswer }>(
    orm,
    `select market_ledger_batch(${sqlText(JSON.stringify(sent))}::jsonb) as answer${counts.size > 0 ? `;\n${insertCounts([...counts.values()])}` : ""}`,
  );
  const answer = rows[0]?.answer;
  if (!Array.isArray(answer?.results) || answer.results.length !== items.length) {
    throw new Error(`market_ledger_batch answered ${JSON.stringify(answer)} for ${items.length} items.`);
  }
  return answer.results.map((result): LedgerOutcome => {
    if (result.outcome !== "ok" || !("orderId" in result) || result.orderId === undefined) return result;
    const order = answer.orders[result.orderId];
    if (!order) throw new Error(`market_ledger_batch settled order ${result.orderId} but did not return it.`);
    return { outcome: "ok", order };
  });
}

/** One order_token_counts row as a VALUES tuple, in insertCounts' column order. */
function countRow(orderId: string, count: OrderCount): string {
  return [
    orderId,
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
    .join(", ");
}

/**
 * Records the counts of the batch's settled orders: only for orders that exist (a refused
 * settlement of an unknown order leaves none), the first record of an order standing (a
 * settlement sent again, or twice in one batch, changes nothing). The casts type the columns a
 * VALUES list of nulls would leave as text.
 */
function insertCounts(rows: readonly string[]): string {
  return `insert into order_token_counts (order_id, model, verified, gguf_sha256, prompt_tokens,
      completion_tokens, reported_prompt_tokens, reported_completion_tokens, claimed_completion_tokens)
    select v.order_id, v.model, v.verified::boolean, v.gguf_sha256::text, v.prompt_tokens::integer,
      v.completion_tokens::integer, v.reported_prompt_tokens::bigint, v.reported_completion_tokens::bigint,
      v.claimed_completion_tokens::bigint
    from (values (${rows.join("), (")})) as v(order_id, model, verified, gguf_sha256, prompt_tokens,
      completion_tokens, reported_prompt_tokens, reported_completion_tokens, claimed_completion_tokens)
    where exists (select 1 from orders as o where o.id = v.order_id)
    on conflict (order_id) do nothing`;
}

/** The order an outcome carries, or the MarketError its refusal means (as the ORM path threw). */
export function orderOrError(item: LedgerItem, result: LedgerOutcome): OrderRecord {
  switch (result.outcome) {
    case "ok":
      if (result.order) return orderRecordFromJson(result.order);
      if (item.op === "open") return openedOrder(item);
      throw new Error(`market_ledger_batch settled order ${item.orderId} but did not return it.`);
    case "insufficient_credits": {
      const needed = item.op === "open" ? BigInt(item.hold) : 0n;
      throw new MarketError(
        "insufficient_credits",
        `Insufficient credits: ${formatCredits(needed)} credits needed, ${formatCredits(BigInt(result.available))} available.`,
      );
    }
    case "account_not_found":
      throw new MarketError("not_found", `Account ${result.accountId} does not exist.`);
    case "conflict":
      throw new MarketError("conflict", `Order ${orderIdOf(item)} already exists.`);
    case "reference_not_found":
      throw new MarketError("not_found", `Order ${orderIdOf(item)} refers to an unknown API key or worker.`);
    case "order_not_found":
      throw new MarketError("not_found", `Order ${orderIdOf(item)} does not exist.`);
    case "no_provider":
      throw new MarketError("internal", "Cannot pay a provider share: the order has no provider.");
  }
}

/** A new order's row is what the open sent, with a running order's zeros. */
function openedOrder(item: OpenItem): OrderRecord {
  return openedOrderRecord(
    {
      id: item.id,
      consumerAccountId: item.consumerAccountId,
      apiKeyId: item.apiKeyId,
      model: item.model,
      workerId: item.workerId,
      providerAccountId: item.providerAccountId,
      pricePerMillionInput: BigInt(item.pricePerMillionInput),
      pricePerMillionOutput: BigInt(item.pricePerMillionOutput),
      hold: BigInt(item.hold),
      maxTokens: item.maxTokens,
      promptTokenBound: item.promptTokenBound,
      feeBasisPoints: item.feeBasisPoints,
    },
    new Date(item.createdAt),
  );
}

function orderIdOf(item: LedgerItem): string {
  return item.op === "open" ? item.id : item.orderId;
}

/** PostgreSQL's SQLSTATE of a failed statement, whichever layer wrapped the driver's error. */
export function sqlState(error: unknown): string | undefined {
  for (let cause = error, depth = 0; cause && depth < 4; depth++) {
    const code = (cause as { code?: unknown }).code;
    if (typeof code === "string" && /^[0-9A-Z]{5}$/.test(code)) return code;
    cause =
      (cause as { cause?: unknown; previous?: unknown }).cause ?? (cause as { previous?: unknown }).previous;
  }
  return undefined;
}

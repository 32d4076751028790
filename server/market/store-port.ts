/**
 * What the market core needs from persistence. server/store/ implements it with MikroORM on
 * PostgreSQL (or embedded PGlite); the core never imports the ORM.
 *
 * Money is integer micro-credits (bigint). Prices are micro-credits per 1M tokens.
 *
 * Ledger model (double-entry, TigerBeetle-style two-phase):
 * - Every account has two books: `available` and `held`. Two system accounts exist from the
 *   first migration: PLATFORM_ACCOUNT_ID (receives fees) and EXTERNAL_ACCOUNT_ID (the outside
 *   world: deposits come from it and withdrawals go to it, so its `available` book is the only
 *   one allowed to go negative).
 * - Every movement is one ledger transaction whose entries sum to zero.
 * - Every account has a third book, `pending`: provider earnings land there and become
 *   `available` once they mature (`settleAfterMs` after the settlement), the window in which an
 *   audit can still claw them back. Withdrawals only draw on `available`.
 * - openOrder places the hold (consumer available → consumer held) in the same DB transaction
 *   that inserts the order. settleOrder posts it: held → provider pending (cost − fee), held →
 *   platform (fee), held → consumer available (hold − cost), and marks the order final, once:
 *   settling a final order again returns the first settlement unchanged (idempotent).
 * - The money of a settlement is computed by the store, inside the settling transaction, from the
 *   locked order row (its prices, its prompt bound, its max_tokens, its fee rate, its hold): the
 *   core passes only token counts. cost = min(hold, ceil((prompt·p_in + completion·p_out) / 1e6))
 *   with prompt capped at the order's promptTokenBound and completion at its maxTokens; fee =
 *   floor(cost · feeBasisPoints / 10,000).
 */

import type { Capabilities } from "./registry.js";

export const PLATFORM_ACCOUNT_ID = "acct_platform";
export const EXTERNAL_ACCOUNT_ID = "acct_external";

export interface RoutingDefaults {
  maxPricePerMillionInput?: bigint;
  maxPricePerMillionOutput?: bigint;
  minTokensPerSecond?: number;
}

export interface AccountRecord {
  id: string;
  name: string;
  createdAt: Date;
  defaults: RoutingDefaults;
}

export interface Balance {
  available: bigint;
  held: bigint;
  /** Provider earnings not yet matured (not withdrawable). */
  pending: bigint;
}

export interface ApiKeyRecord {
  id: string;
  accountId: string;
  label: string;
  /** First characters of the secret, safe to show. */
  prefix: string;
  createdAt: Date;
  revokedAt: Date | null;
}

export interface OfferRecord {
  model: string;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  advertisedTokensPerSecond: number;
  maxConcurrency: number;
  contextLength: number;
  quantization: string;
  engine: string;
  capabilities: Capabilities;
  /** SHA-256 of the weights file (Offer.weights_sha256), lowercase hex; absent or "" when undeclared. */
  weightsSha256?: string;
  /** The engine's version (Offer.engine_version); absent or "" when undeclared. */
  engineVersion?: string;
}

export interface WorkerRecord {
  id: string;
  /** The provider account paid for this worker's jobs. */
  accountId: string;
  name: string;
  agentVersion: string;
  offers: OfferRecord[];
  lastSeenAt: Date | null;
}

export type OrderStatus = "running" | "completed" | "failed" | "cancelled";

export interface OrderRecord {
  id: string;
  consumerAccountId: string;
  apiKeyId: string;
  model: string;
  workerId: string | null;
  providerAccountId: string | null;
  status: OrderStatus;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  hold: bigint;
  maxTokens: number;
  /** The platform's upper bound on the prompt's tokens, fixed at admission; billing caps at it. */
  promptTokenBound: number;
  /** The platform fee rate agreed at admission, in basis points. */
  feeBasisPoints: number;
  /**
   * While running: the last checkpoint (tokens delivered to the consumer so far). Once final: the
   * tokens billed.
   */
  promptTokens: number;
  completionTokens: number;
  /** Usage as the worker's engine reported it (trust signal), null when none was reported. */
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
  /** What the platform noticed about the worker's honesty on this order (empty when nothing). */
  trustSignals: string[];
  cost: bigint;
  fee: bigint;
  finishReason: string | null;
  error: string | null;
  createdAt: Date;
  firstTokenAt: Date | null;
  finishedAt: Date | null;
}

export interface OpenOrderInput {
  id: string;
  consumerAccountId: string;
  apiKeyId: string;
  model: string;
  workerId: string;
  providerAccountId: string;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  /** Worst-case cost reserved now; ≥ 0n (0n for a free offer). */
  hold: bigint;
  maxTokens: number;
  promptTokenBound: number;
  feeBasisPoints: number;
}

/** A just-opened order as the store records it: the terms it was opened with, a running order's zeros. */
export function openedOrderRecord(terms: OpenOrderInput, createdAt: Date): OrderRecord {
  // Field by field, not `...terms`: on the per-request path, and spreading an object into a
  // literal showed in the profile at tens of microseconds a call.
  return {
    id: terms.id,
    consumerAccountId: terms.consumerAccountId,
    apiKeyId: terms.apiKeyId,
    model: terms.model,
    workerId: terms.workerId,
    providerAccountId: terms.providerAccountId,
    pricePerMillionInput: terms.pricePerMillionInput,
    pricePerMillionOutput: terms.pricePerMillionOutput,
    hold: terms.hold,
    maxTokens: terms.maxTokens,
    promptTokenBound: terms.promptTokenBound,
    feeBasisPoints: terms.feeBasisPoints,
    status: "running",
    promptTokens: 0,
    completionTokens: 0,
    reportedPromptTokens: null,
    reportedCompletionTokens: null,
    trustSignals: [],
    cost: 0n,
    fee: 0n,
    finishReason: null,
    error: null,
    createdAt,
    firstTokenAt: null,
    finishedAt: null,
  };
}

export interface ReassignOrderInput {
  workerId: string;
  providerAccountId: string;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  hold: bigint;
}

/** What the core knows at the end of an order: token counts, never money (see the header). */
export interface SettleOrderInput {
  status: Exclude<OrderStatus, "running">;
  /** Prompt tokens to bill (0 when nothing reached the consumer); capped at promptTokenBound. */
  promptTokens: number;
  /** Completion tokens to bill: the platform's own count; capped at maxTokens. */
  completionTokens: number;
  /** As the worker reported them, any uint32 value; stored for the record, never billed. */
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
  trustSignals: string[];
  finishReason: string | null;
  error: string | null;
  firstTokenAt: Date | null;
  finishedAt: Date;
  /**
   * How the order's tokens were counted, for the admin API: written in the settlement's own
   * transaction (one round trip settles and records), once per order, the first record standing.
   * Absent: no record.
   */
  count?: OrderCount;
}

/** How one order's tokens were counted. */
export interface OrderCount {
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

/** A running order's progress, written about once a second so a crash loses at most that. */
export interface OrderCheckpoint {
  orderId: string;
  /** Prompt tokens billable so far (0 until the consumer received something). */
  promptTokens: number;
  /** Completion tokens delivered to the consumer so far. */
  completionTokens: number;
  firstTokenAt: Date | null;
}

/** One line of an account's statement: a ledger entry with the balances after it. */
export interface StatementEntry {
  transactionId: string;
  kind: string;
  orderId: string | null;
  book: "available" | "held" | "pending";
  amount: bigint;
  /** The account's balance of that book after this entry. */
  balanceAfter: bigint;
  createdAt: Date;
}

export interface Statement {
  account: AccountRecord;
  balance: Balance;
  /** Oldest first. */
  entries: StatementEntry[];
  /** Orders where the account is the consumer or the provider, newest first. */
  orders: OrderRecord[];
}

export interface LedgerAudit {
  ok: boolean;
  entriesSum: bigint;
  entryCount: number;
  problems: string[];
}

export interface MarketStore {
  // Accounts and credentials. Secrets are returned in clear only by the create calls and are
  // stored as SHA-256 hashes.
  createAccount(input: { name: string }): Promise<AccountRecord>;
  /**
   * Creates an account, its first API key (labelled `keyLabel`) and its first deposit in ONE
   * transaction. With an idempotency key (Stripe's semantics): the same key with the same name and
   * deposit returns the first result with `replayed: true` and `apiKeySecret: null` (the secret is
   * never stored in clear, so it cannot be shown twice); the same key with other parameters throws
   * MarketError("conflict") and changes nothing.
   */
  openAccount(input: {
    name: string;
    keyLabel: string;
    initialDeposit: bigint;
    idempotencyKey?: string;
  }): Promise<{
    account: AccountRecord;
    apiKey: ApiKeyRecord;
    apiKeySecret: string | null;
    balance: Balance;
    replayed: boolean;
  }>;
  getAccount(id: string): Promise<AccountRecord | null>;
  listAccounts(): Promise<AccountRecord[]>;
  updateAccountDefaults(id: string, defaults: RoutingDefaults): Promise<AccountRecord>;
  createApiKey(accountId: string, label: string): Promise<{ key: ApiKeyRecord; secret: string }>;
  listApiKeys(accountId: string): Promise<ApiKeyRecord[]>;
  revokeApiKey(keyId: string): Promise<ApiKeyRecord>;
  /** The active key's account, or null for an unknown or revoked secret. */
  authenticateApiKey(secret: string): Promise<{ account: AccountRecord; keyId: string } | null>;
  /**
   * The active keys among these secret hashes (hex SHA-256, as the store keeps them) with their
   * accounts, by hash, in one query; unknown and revoked hashes are absent. What a cache of keys
   * revalidates its working set with.
   */
  findActiveApiKeys(
    secretHashes: readonly string[],
  ): Promise<Map<string, { account: AccountRecord; keyId: string }>>;
  /** Creates a worker credential and the worker identity it maps to. */
  createWorkerToken(accountId: string, label: string): Promise<{ workerId: string; secret: string }>;
  /** The worker a token belongs to, or null for an unknown or revoked token. */
  authenticateWorkerToken(secret: string): Promise<WorkerRecord | null>;

  // Workers.
  /** Records a (re)connection: name, agent version, offers, last seen = now. */
  recordWorkerConnected(
    workerId: string,
    input: { name: string; agentVersion: string; offers: OfferRecord[] },
  ): Promise<WorkerRecord>;
  listWorkers(): Promise<WorkerRecord[]>;

  // Money. Each throws MarketError("invalid_request") on a non-positive amount,
  // MarketError("not_found") for an unknown account, and MarketError("insufficient_credits")
  // when the available balance cannot cover the amount. Idempotency keys have Stripe's semantics:
  // the same key with the same parameters moves money once and returns the balance as it was
  // after the first call; the same key with other parameters (amount, account, operation) throws
  // MarketError("conflict") and moves nothing.
  deposit(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance>;
  withdraw(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance>;
  getBalance(accountId: string): Promise<Balance>;
  /** Moves every provider earning whose settle-after window has passed from pending to available. */
  releaseMaturedEarnings(now?: Date): Promise<number>;
  getStatement(accountId: string, options: { limit: number }): Promise<Statement>;

  // Orders.
  /** Inserts a running order and places its hold atomically. */
  openOrder(input: OpenOrderInput): Promise<OrderRecord>;
  /**
   * Moves a running order to another worker (fallback), replacing its hold atomically. Throws
   * MarketError("conflict") when the order is no longer running.
   */
  reassignOrder(orderId: string, input: ReassignOrderInput): Promise<OrderRecord>;
  /**
   * Settles a running order (see the header comment): computes the money from the locked row.
   * Idempotent: a final order is returned unchanged. Never fails for any token counts the core can
   * pass (they are clamped), so a failure here is the database's and worth retrying.
   */
  settleOrder(orderId: string, input: SettleOrderInput): Promise<OrderRecord>;
  /** Records the progress of running orders in one statement; counts never go down; final orders are untouched. */
  checkpointOrders(checkpoints: readonly OrderCheckpoint[]): Promise<void>;
  getOrder(id: string): Promise<OrderRecord | null>;
  listOrders(filter: { accountId?: string; limit: number }): Promise<OrderRecord[]>;
  /** Orders still `running` (left by a crash when called at start-up). */
  listRunningOrders(): Promise<OrderRecord[]>;

  /**
   * Checks: entries sum to 0 (and per transaction), cached balances equal their entries, no negative
   * book but external's available; every held amount belongs to a running order (an account's held
   * book equals the holds of its running orders); every final order has exactly one settlement and
   * a running one none; no matured pending earning is left unreleased.
   */
  auditLedger(now?: Date): Promise<LedgerAudit>;

  close(): Promise<void>;
}

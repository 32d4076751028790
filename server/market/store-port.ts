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
 * - openOrder places the hold (consumer available → consumer held) in the same DB transaction
 *   that inserts the order. settleOrder posts it: held → provider (cost − fee), held → platform
 *   (fee), held → consumer available (hold − cost), and marks the order final, once: settling a
 *   final order again returns the first settlement unchanged (idempotent).
 */

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
  promptTokens: number;
  completionTokens: number;
  /** Usage as the worker's engine reported it (trust signal), null when none was reported. */
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
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
  /** Worst-case cost reserved now; must be > 0n. */
  hold: bigint;
  maxTokens: number;
}

export interface ReassignOrderInput {
  workerId: string;
  providerAccountId: string;
  pricePerMillionInput: bigint;
  pricePerMillionOutput: bigint;
  hold: bigint;
}

export interface SettleOrderInput {
  status: Exclude<OrderStatus, "running">;
  promptTokens: number;
  completionTokens: number;
  reportedPromptTokens: number | null;
  reportedCompletionTokens: number | null;
  /** What the consumer pays; 0n ≤ cost ≤ hold. */
  cost: bigint;
  /** The platform's share of cost; 0n ≤ fee ≤ cost. The provider gets cost − fee. */
  fee: bigint;
  finishReason: string | null;
  error: string | null;
  firstTokenAt: Date | null;
  finishedAt: Date;
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
  getAccount(id: string): Promise<AccountRecord | null>;
  listAccounts(): Promise<AccountRecord[]>;
  updateAccountDefaults(id: string, defaults: RoutingDefaults): Promise<AccountRecord>;
  createApiKey(accountId: string, label: string): Promise<{ key: ApiKeyRecord; secret: string }>;
  listApiKeys(accountId: string): Promise<ApiKeyRecord[]>;
  revokeApiKey(keyId: string): Promise<ApiKeyRecord>;
  /** The active key's account, or null for an unknown or revoked secret. */
  authenticateApiKey(secret: string): Promise<{ account: AccountRecord; keyId: string } | null>;
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
  // when the available balance cannot cover the amount.
  deposit(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance>;
  withdraw(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance>;
  getBalance(accountId: string): Promise<Balance>;

  // Orders.
  /** Inserts a running order and places its hold atomically. */
  openOrder(input: OpenOrderInput): Promise<OrderRecord>;
  /** Moves a running order to another worker (fallback), replacing its hold atomically. */
  reassignOrder(orderId: string, input: ReassignOrderInput): Promise<OrderRecord>;
  /** Settles a running order (see the header comment). Idempotent. */
  settleOrder(orderId: string, input: SettleOrderInput): Promise<OrderRecord>;
  getOrder(id: string): Promise<OrderRecord | null>;
  listOrders(filter: { accountId?: string; limit: number }): Promise<OrderRecord[]>;
  /** Orders still `running` (left by a crash when called at start-up). */
  listRunningOrders(): Promise<OrderRecord[]>;

  /** Checks: entries sum to 0, cached balances equal their entries, no negative book but external. */
  auditLedger(): Promise<LedgerAudit>;

  close(): Promise<void>;
}

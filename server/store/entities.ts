/**
 * MikroORM entity definitions. They use defineEntity (no decorators) because tsx and vitest compile
 * with esbuild, which emits no decorator metadata.
 *
 * The tables are created by the hand-written SQL in ./migrations, which is the source of truth for
 * constraints and indexes; these definitions map rows to objects. References are many-to-one with
 * `mapToPk`, so a property holds the referenced id (e.g. `account: "acct_…"`) while MikroORM still
 * knows the dependency and inserts rows in foreign-key order within a flush.
 */
import { defineEntity, type InferEntity, p } from "@mikro-orm/core";
import type { Capabilities } from "../market/registry.js";

export const Account = defineEntity({
  name: "Account",
  tableName: "accounts",
  properties: {
    id: p.text().primary(),
    name: p.text(),
    createdAt: p.datetime(),
    defaultMaxPricePerMillionInput: p.bigint().nullable(),
    defaultMaxPricePerMillionOutput: p.bigint().nullable(),
    defaultMinTokensPerSecond: p.double().$type<number>().nullable(),
    /** Cached sum of this account's `available` ledger entries. */
    available: p.bigint(),
    /** Cached sum of this account's `held` ledger entries. */
    held: p.bigint(),
    /** Cached sum of this account's `pending` ledger entries (earnings not yet matured). */
    pending: p.bigint(),
  },
});
export type Account = InferEntity<typeof Account>;

export const ApiKey = defineEntity({
  name: "ApiKey",
  tableName: "api_keys",
  properties: {
    id: p.text().primary(),
    account: p.manyToOne(Account).mapToPk(),
    label: p.text(),
    prefix: p.text(),
    secretHash: p.text().unique(),
    createdAt: p.datetime(),
    revokedAt: p.datetime().nullable(),
  },
});
export type ApiKey = InferEntity<typeof ApiKey>;

/** An offer as stored in workers.offers (jsonb): prices are decimal strings, JSON has no bigint. */
export interface StoredOffer {
  model: string;
  pricePerMillionInput: string;
  pricePerMillionOutput: string;
  advertisedTokensPerSecond: number;
  maxConcurrency: number;
  contextLength: number;
  quantization: string;
  engine: string;
  capabilities?: Capabilities;
}

/** A worker identity together with the token that authenticates it (one token, one worker). */
export const Worker = defineEntity({
  name: "Worker",
  tableName: "workers",
  properties: {
    id: p.text().primary(),
    account: p.manyToOne(Account).mapToPk(),
    label: p.text(),
    tokenPrefix: p.text(),
    tokenHash: p.text().unique(),
    name: p.text(),
    agentVersion: p.text(),
    offers: p.json<StoredOffer[]>(),
    createdAt: p.datetime(),
    lastSeenAt: p.datetime().nullable(),
    revokedAt: p.datetime().nullable(),
  },
});
export type Worker = InferEntity<typeof Worker>;

export const ORDER_STATUSES = ["running", "completed", "failed", "cancelled"] as const;

export const Order = defineEntity({
  name: "Order",
  tableName: "orders",
  properties: {
    id: p.text().primary(),
    consumerAccount: p.manyToOne(Account).mapToPk(),
    apiKey: p.manyToOne(ApiKey).mapToPk(),
    model: p.text(),
    worker: p.manyToOne(Worker).mapToPk().nullable(),
    providerAccount: p.manyToOne(Account).mapToPk().nullable(),
    status: p.enum([...ORDER_STATUSES]),
    pricePerMillionInput: p.bigint(),
    pricePerMillionOutput: p.bigint(),
    hold: p.bigint(),
    maxTokens: p.integer(),
    promptTokenBound: p.integer(),
    feeBasisPoints: p.integer(),
    promptTokens: p.integer(),
    completionTokens: p.integer(),
    /** Any uint32 a worker may send: bigint columns, read as JS numbers (exact below 2^53). */
    reportedPromptTokens: p.bigint("number").nullable(),
    reportedCompletionTokens: p.bigint("number").nullable(),
    trustSignals: p.json<string[]>(),
    cost: p.bigint(),
    fee: p.bigint(),
    finishReason: p.text().nullable(),
    error: p.text().nullable(),
    createdAt: p.datetime(),
    firstTokenAt: p.datetime().nullable(),
    finishedAt: p.datetime().nullable(),
  },
});
export type Order = InferEntity<typeof Order>;

export const LEDGER_TRANSACTION_KINDS = [
  "deposit",
  "withdrawal",
  "hold",
  "reassign",
  "settle",
  "release",
  "clawback",
] as const;
export type LedgerTransactionKind = (typeof LEDGER_TRANSACTION_KINDS)[number];

export const LedgerTransaction = defineEntity({
  name: "LedgerTransaction",
  tableName: "ledger_transactions",
  properties: {
    id: p.text().primary(),
    kind: p.enum([...LEDGER_TRANSACTION_KINDS]),
    order: p.manyToOne(Order).mapToPk().nullable(),
    /** Unique when set: a second transaction with the same key cannot be committed. */
    idempotencyKey: p.text().nullable().unique(),
    createdAt: p.datetime(),
  },
});
export type LedgerTransaction = InferEntity<typeof LedgerTransaction>;

export const BOOKS = ["available", "held", "pending"] as const;
export type Book = (typeof BOOKS)[number];

export const LedgerEntry = defineEntity({
  name: "LedgerEntry",
  tableName: "ledger_entries",
  properties: {
    id: p.bigint().primary().autoincrement(),
    transaction: p.manyToOne(LedgerTransaction).mapToPk(),
    account: p.manyToOne(Account).mapToPk(),
    book: p.enum([...BOOKS]),
    /** Signed: credits are positive, debits negative; a transaction's entries sum to zero. */
    amount: p.bigint(),
  },
});
export type LedgerEntry = InferEntity<typeof LedgerEntry>;

/** A provider's share of one settled order, in its `pending` book until `maturesAt`. */
export const PendingEarning = defineEntity({
  name: "PendingEarning",
  tableName: "pending_earnings",
  properties: {
    order: p.manyToOne(Order).mapToPk().primary(),
    account: p.manyToOne(Account).mapToPk(),
    amount: p.bigint(),
    maturesAt: p.datetime(),
    releasedAt: p.datetime().nullable(),
  },
});
export type PendingEarning = InferEntity<typeof PendingEarning>;

/**
 * A request made with an idempotency key: what it asked (operation and fingerprint of its
 * parameters) and what it answered, so a retry gets the same answer and a different request
 * under the same key is refused.
 */
export const IdempotencyKey = defineEntity({
  name: "IdempotencyKey",
  tableName: "idempotency_keys",
  properties: {
    key: p.text().primary(),
    operation: p.text(),
    requestFingerprint: p.text(),
    /** Decimal strings (JSON has no bigint), shaped by the operation. */
    response: p.json<Record<string, string>>(),
    createdAt: p.datetime(),
  },
});
export type IdempotencyKey = InferEntity<typeof IdempotencyKey>;

export const entities = [
  Account,
  ApiKey,
  Worker,
  Order,
  LedgerTransaction,
  LedgerEntry,
  PendingEarning,
  IdempotencyKey,
];

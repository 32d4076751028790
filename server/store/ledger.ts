/**
 * Double-entry bookkeeping helpers. Every money movement is a list of postings that sum to zero,
 * written as one ledger transaction inside the caller's database transaction, and applied to the
 * cached balances on the account rows in the same step, so entries and balances cannot drift.
 */

import { LockMode, QueryOrder } from "@mikro-orm/core";
import type { EntityManager } from "@mikro-orm/postgresql";
import { formatCredits } from "../../common/credits.js";
import { MarketError } from "../market/errors.js";
import { EXTERNAL_ACCOUNT_ID } from "../market/store-port.js";
import {
  Account,
  type Book,
  LedgerEntry,
  LedgerTransaction,
  type LedgerTransactionKind,
} from "./entities.js";
import { newId } from "./secrets.js";

export interface Posting {
  accountId: string;
  book: Book;
  /** Signed micro-credits: positive credits the book, negative debits it. */
  amount: bigint;
}

/** Accounts locked for the current transaction, by id. */
export type LockedAccounts = ReadonlyMap<string, Account>;

/**
 * Locks the accounts' rows (SELECT … FOR UPDATE) in id order and returns them. All money
 * operations lock through here, so two transactions never wait for each other's rows in opposite
 * orders (no deadlocks), and the balances read are the latest committed ones.
 */
export async function lockAccounts(em: EntityManager, ids: readonly string[]): Promise<LockedAccounts> {
  const sortedIds = [...new Set(ids)].sort();
  const rows = await em.find(
    Account,
    { id: { $in: sortedIds } },
    { lockMode: LockMode.PESSIMISTIC_WRITE, orderBy: { id: QueryOrder.ASC }, refresh: true },
  );
  const accounts = new Map(rows.map((account) => [account.id, account]));
  for (const id of sortedIds) {
    if (!accounts.has(id)) throw new MarketError("not_found", `Account ${id} does not exist.`);
  }
  return accounts;
}

/** Throws insufficient_credits unless the account's available book covers `needed`. */
export function requireAvailable(account: Account, needed: bigint): void {
  if (account.available < needed) {
    throw new MarketError(
      "insufficient_credits",
      `Insufficient credits: ${formatCredits(needed)} credits needed, ${formatCredits(account.available)} available.`,
    );
  }
}

/**
 * Writes one balanced ledger transaction and applies its postings to the locked accounts' cached
 * balances. Zero postings are skipped (nothing moves). The caller's flush persists it all.
 */
export function recordTransaction(
  em: EntityManager,
  accounts: LockedAccounts,
  input: {
    kind: LedgerTransactionKind;
    postings: Posting[];
    orderId?: string;
    idempotencyKey?: string | null;
  },
): LedgerTransaction {
  const sum = input.postings.reduce((total, posting) => total + posting.amount, 0n);
  if (sum !== 0n) {
    throw new MarketError("internal", `Unbalanced ${input.kind} transaction: postings sum to ${sum}.`);
  }
  const transaction = em.create(LedgerTransaction, {
    id: newId("ltx"),
    kind: input.kind,
    order: input.orderId ?? null,
    idempotencyKey: input.idempotencyKey ?? null,
    createdAt: new Date(),
  });
  for (const posting of input.postings) {
    if (posting.amount === 0n) continue;
    const account = accounts.get(posting.accountId);
    if (!account) {
      throw new MarketError("internal", `Account ${posting.accountId} was posted to without being locked.`);
    }
    em.create(LedgerEntry, {
      transaction: transaction.id,
      account: account.id,
      book: posting.book,
      amount: posting.amount,
    });
    account[posting.book] += posting.amount;
  }
  return transaction;
}

/** Money coming in from the outside world. */
export function depositPostings(accountId: string, amount: bigint): Posting[] {
  return [
    { accountId: EXTERNAL_ACCOUNT_ID, book: "available", amount: -amount },
    { accountId, book: "available", amount },
  ];
}

/** Money going out to the outside world. */
export function withdrawalPostings(accountId: string, amount: bigint): Posting[] {
  return [
    { accountId, book: "available", amount: -amount },
    { accountId: EXTERNAL_ACCOUNT_ID, book: "available", amount },
  ];
}

/** Reserves an order's worst-case cost: available → held. */
export function placeHold(accountId: string, amount: bigint): Posting[] {
  return [
    { accountId, book: "available", amount: -amount },
    { accountId, book: "held", amount },
  ];
}

/** Gives a reservation back: held → available. */
export function releaseHold(accountId: string, amount: bigint): Posting[] {
  return [
    { accountId, book: "held", amount: -amount },
    { accountId, book: "available", amount },
  ];
}

// An order's hold and its settlement (held → provider pending, platform fee, change back) are
// posted by the SQL of Migration20251125000000_ledger_hot_path, in the same shape as these.

/** A matured earning becomes withdrawable: pending → available. */
export function releaseEarning(accountId: string, amount: bigint): Posting[] {
  return [
    { accountId, book: "pending", amount: -amount },
    { accountId, book: "available", amount },
  ];
}

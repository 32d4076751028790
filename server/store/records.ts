/** Conversions between stored entities and the record types of the market's store port. */

import { NO_CAPABILITIES } from "../market/registry.js";
import type {
  AccountRecord,
  ApiKeyRecord,
  Balance,
  OfferRecord,
  OrderRecord,
  RoutingDefaults,
  WorkerRecord,
} from "../market/store-port.js";
import type { Account, ApiKey, Order, StoredOffer, Worker } from "./entities.js";

export function toAccountRecord(account: Account): AccountRecord {
  const defaults: RoutingDefaults = {};
  if (account.defaultMaxPricePerMillionInput != null) {
    defaults.maxPricePerMillionInput = account.defaultMaxPricePerMillionInput;
  }
  if (account.defaultMaxPricePerMillionOutput != null) {
    defaults.maxPricePerMillionOutput = account.defaultMaxPricePerMillionOutput;
  }
  if (account.defaultMinTokensPerSecond != null) {
    defaults.minTokensPerSecond = account.defaultMinTokensPerSecond;
  }
  return { id: account.id, name: account.name, createdAt: account.createdAt, defaults };
}

export function toBalance(account: Account): Balance {
  return { available: account.available, held: account.held, pending: account.pending };
}

/** A balance as stored in a JSON column (decimal strings: JSON has no bigint). */
export function toStoredBalance(balance: Balance): Record<string, string> {
  return {
    available: balance.available.toString(),
    held: balance.held.toString(),
    pending: balance.pending.toString(),
  };
}

export function fromStoredBalance(stored: Record<string, string | undefined>): Balance {
  return {
    available: BigInt(stored.available ?? "0"),
    held: BigInt(stored.held ?? "0"),
    pending: BigInt(stored.pending ?? "0"),
  };
}

export function toApiKeyRecord(key: ApiKey): ApiKeyRecord {
  return {
    id: key.id,
    accountId: key.account,
    label: key.label,
    prefix: key.prefix,
    createdAt: key.createdAt,
    revokedAt: key.revokedAt ?? null,
  };
}

export function toWorkerRecord(worker: Worker): WorkerRecord {
  return {
    id: worker.id,
    accountId: worker.account,
    name: worker.name,
    agentVersion: worker.agentVersion,
    offers: worker.offers.map(fromStoredOffer),
    lastSeenAt: worker.lastSeenAt ?? null,
  };
}

export function toStoredOffer(offer: OfferRecord): StoredOffer {
  return {
    ...offer,
    pricePerMillionInput: offer.pricePerMillionInput.toString(),
    pricePerMillionOutput: offer.pricePerMillionOutput.toString(),
  };
}

function fromStoredOffer(offer: StoredOffer): OfferRecord {
  return {
    ...offer,
    pricePerMillionInput: BigInt(offer.pricePerMillionInput),
    pricePerMillionOutput: BigInt(offer.pricePerMillionOutput),
    // Offers stored before capabilities existed declared none.
    capabilities: { ...NO_CAPABILITIES, ...offer.capabilities },
  };
}

export function toOrderRecord(order: Order): OrderRecord {
  return {
    id: order.id,
    consumerAccountId: order.consumerAccount,
    apiKeyId: order.apiKey,
    model: order.model,
    workerId: order.worker ?? null,
    providerAccountId: order.providerAccount ?? null,
    status: order.status,
    pricePerMillionInput: order.pricePerMillionInput,
    pricePerMillionOutput: order.pricePerMillionOutput,
    hold: order.hold,
    maxTokens: order.maxTokens,
    promptTokenBound: order.promptTokenBound,
    feeBasisPoints: order.feeBasisPoints,
    promptTokens: order.promptTokens,
    completionTokens: order.completionTokens,
    reportedPromptTokens: order.reportedPromptTokens ?? null,
    reportedCompletionTokens: order.reportedCompletionTokens ?? null,
    trustSignals: [...order.trustSignals],
    cost: order.cost,
    fee: order.fee,
    finishReason: order.finishReason ?? null,
    error: order.error ?? null,
    createdAt: order.createdAt,
    firstTokenAt: order.firstTokenAt ?? null,
    finishedAt: order.finishedAt ?? null,
  };
}

/**
 * An order row as the hot path's SQL function returns it (market_ledger_batch): bigints as decimal
 * strings, times as epoch milliseconds in decimal strings, null where the column is null.
 */
export interface OrderJson {
  id: string;
  consumerAccountId: string;
  apiKeyId: string;
  model: string;
  workerId: string | null;
  providerAccountId: string | null;
  status: Order["status"];
  pricePerMillionInput: string;
  pricePerMillionOutput: string;
  hold: string;
  maxTokens: number;
  promptTokenBound: number;
  feeBasisPoints: number;
  promptTokens: number;
  completionTokens: number;
  reportedPromptTokens: string | null;
  reportedCompletionTokens: string | null;
  trustSignals: string[];
  cost: string;
  fee: string;
  finishReason: string | null;
  error: string | null;
  createdAt: string;
  firstTokenAt: string | null;
  finishedAt: string | null;
}

/** The same record toOrderRecord makes of the entity, field for field. */
export function orderRecordFromJson(order: OrderJson): OrderRecord {
  const date = (ms: string | null) => (ms === null ? null : new Date(Number(ms)));
  return {
    id: order.id,
    consumerAccountId: order.consumerAccountId,
    apiKeyId: order.apiKeyId,
    model: order.model,
    workerId: order.workerId,
    providerAccountId: order.providerAccountId,
    status: order.status,
    pricePerMillionInput: BigInt(order.pricePerMillionInput),
    pricePerMillionOutput: BigInt(order.pricePerMillionOutput),
    hold: BigInt(order.hold),
    maxTokens: order.maxTokens,
    promptTokenBound: order.promptTokenBound,
    feeBasisPoints: order.feeBasisPoints,
    promptTokens: order.promptTokens,
    completionTokens: order.completionTokens,
    reportedPromptTokens: order.reportedPromptTokens === null ? null : Number(order.reportedPromptTokens),
    reportedCompletionTokens:
      order.reportedCompletionTokens === null ? null : Number(order.reportedCompletionTokens),
    trustSignals: [...order.trustSignals],
    cost: BigInt(order.cost),
    fee: BigInt(order.fee),
    finishReason: order.finishReason,
    error: order.error,
    createdAt: new Date(Number(order.createdAt)),
    firstTokenAt: date(order.firstTokenAt),
    finishedAt: date(order.finishedAt),
  };
}

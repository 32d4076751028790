/**
 * AdminService: the operator's API. Thin handlers that validate the request, call the MarketStore
 * and translate records to proto messages (Dates → Unix ms bigint, null → zero values). Every
 * failure leaves through toConnectError, so status codes are decided in one place.
 */
import type { MessageInitShape } from "@bufbuild/protobuf";
import { Code, ConnectError, type ServiceImpl } from "@connectrpc/connect";
import {
  type AccountSchema,
  type AdminService,
  type ApiKeySchema,
  type BalanceSchema,
  Book,
  type ModelReputationSchema,
  type OrderSchema,
  OrderStatus,
  type RegisteredModelSchema,
  ReputationState,
  type RoutingDefaultsSchema,
  type StatementEntrySchema,
  type WorkerSchema,
} from "../../gen/locallmarket/v1/admin_pb.js";
import type { OfferSchema } from "../../gen/locallmarket/v1/common_pb.js";
import { MarketError } from "../market/errors.js";
import type { WorkerConnection, WorkerRegistry } from "../market/registry.js";
import type { ReputationSnapshot, ReputationTracker } from "../market/reputation.js";
import type {
  AccountRecord,
  ApiKeyRecord,
  Balance,
  MarketStore,
  OfferRecord,
  OrderRecord,
  OrderStatus as OrderStatusName,
  RoutingDefaults,
  StatementEntry,
  WorkerRecord,
} from "../market/store-port.js";
import type { RegisteredModel } from "../models/model-registry.js";
import { TokenizerUnavailableError } from "../models/token-counter.js";
import type { OrderTokenCount } from "../store/model-registry-store.js";
import { toConnectError } from "./connect-error.js";

export interface AdminServiceDeps {
  store: MarketStore;
  registry: WorkerRegistry;
  /** Told when a key is revoked or an account's defaults change, so caches forget them at once. */
  onApiKeyRevoked?(keyId: string): void;
  onAccountChanged?(accountId: string): void;
  /** The model registry (server/models/); RegisterModel and ListModels are unavailable without it. */
  models?: AdminModels;
  /** Trusted verifiers, suspensions and audits (server/trust/); their RPCs are unavailable without it. */
  trust?: AdminTrust;
}

/** What the admin API asks of the trust service (TrustService implements it). */
export interface AdminTrust {
  setTrusted(workerId: string, trusted: boolean): Promise<void>;
  setSuspended(workerId: string, suspended: boolean, reason?: string): Promise<void>;
  suspendedReason(workerId: string): string | undefined;
  readonly store?:
    | {
        auditOfOrder(
          orderId: string,
        ): Promise<{ auditId: string; outcome: string; violations: string[] } | null>;
      }
    | undefined;
}

/** The page size of ListOrders and GetStatement when the request says 0, and the most they return. */
export const DEFAULT_ORDER_LIMIT = 50;
export const MAX_ORDER_LIMIT = 1000;
/** The label of the API key created with an account. */
export const FIRST_API_KEY_LABEL = "default";
const MAX_NAME_LENGTH = 200;
const MAX_LABEL_LENGTH = 200;
const MAX_IDEMPOTENCY_KEY_LENGTH = 200;
const UINT32_MAX = 0xffff_ffff;

const ORDER_STATUSES: Readonly<Record<OrderStatusName, OrderStatus>> = {
  running: OrderStatus.RUNNING,
  completed: OrderStatus.COMPLETED,
  failed: OrderStatus.FAILED,
  cancelled: OrderStatus.CANCELLED,
};

const BOOKS: Readonly<Record<StatementEntry["book"], Book>> = {
  available: Book.AVAILABLE,
  held: Book.HELD,
  pending: Book.PENDING,
};

export function createAdminService(deps: AdminServiceDeps): ServiceImpl<typeof AdminService> {
  const { store, registry } = deps;

  const impl: ServiceImpl<typeof AdminService> = {
    async createAccount(req) {
      const name = requireText(req.name, "name", MAX_NAME_LENGTH);
      if (req.initialDeposit < 0n) {
        throw invalid(
          `initial_deposit must be zero or a positive number of micro-credits, got ${req.initialDeposit}`,
          "initial_deposit",
        );
      }
      const opened = await store.openAccount({
        name,
        keyLabel: FIRST_API_KEY_LABEL,
        initialDeposit: req.initialDeposit,
        idempotencyKey: idempotencyKey(req.idempotencyKey),
      });
      return {
        account: accountMessage(opened.account),
        apiKey: opened.apiKeySecret ?? "",
        balance: balanceMessage(opened.balance),
        replayed: opened.replayed,
      };
    },

    async getAccount(req) {
      const accountId = requireText(req.accountId, "account_id");
      const account = await store.getAccount(accountId);
      if (!account) throw new MarketError("not_found", `account ${accountId} not found`, "account_id");
      const balance = await store.getBalance(accountId);
      return { account: accountMessage(account), balance: balanceMessage(balance) };
    },

    async listAccounts() {
      const accounts = await store.listAccounts();
      return { accounts: accounts.map(accountMessage) };
    },

    async updateAccountDefaults(req) {
      const accountId = requireText(req.accountId, "account_id");
      const defaults = routingDefaultsFromMessage(req.defaults);
      const account = await store.updateAccountDefaults(accountId, defaults);
      deps.onAccountChanged?.(account.id);
      return { account: accountMessage(account) };
    },

    async createApiKey(req) {
      const accountId = requireText(req.accountId, "account_id");
      const label = optionalLabel(req.label, FIRST_API_KEY_LABEL);
      const { key, secret } = await store.createApiKey(accountId, label);
      return { key: apiKeyMessage(key), apiKey: secret };
    },

    async listApiKeys(req) {
      const accountId = requireText(req.accountId, "account_id");
      const keys = await store.listApiKeys(accountId);
      return { keys: keys.map(apiKeyMessage) };
    },

    async revokeApiKey(req) {
      const keyId = requireText(req.keyId, "key_id");
      const key = await store.revokeApiKey(keyId);
      deps.onApiKeyRevoked?.(key.id);
      return { key: apiKeyMessage(key) };
    },

    async createWorkerToken(req) {
      const accountId = requireText(req.accountId, "account_id");
      const label = optionalLabel(req.label, "worker");
      const { workerId, secret } = await store.createWorkerToken(accountId, label);
      return { workerId, workerToken: secret };
    },

    async deposit(req) {
      const accountId = requireText(req.accountId, "account_id");
      const amount = requirePositiveAmount(req.amount);
      const balance = await store.deposit(accountId, amount, idempotencyKey(req.idempotencyKey));
      return { balance: balanceMessage(balance) };
    },

    async withdraw(req) {
      const accountId = requireText(req.accountId, "account_id");
      const amount = requirePositiveAmount(req.amount);
      const balance = await store.withdraw(accountId, amount, idempotencyKey(req.idempotencyKey));
      return { balance: balanceMessage(balance) };
    },

    async getBalance(req) {
      const accountId = requireText(req.accountId, "account_id");
      const balance = await store.getBalance(accountId);
      return { balance: balanceMessage(balance) };
    },

    async getStatement(req) {
      const accountId = requireText(req.accountId, "account_id");
      const statement = await store.getStatement(accountId, { limit: pageSize(req.limit) });
      return {
        account: accountMessage(statement.account),
        balance: balanceMessage(statement.balance),
        entries: statement.entries.map(statementEntryMessage),
        orders: statement.orders.map(orderMessage),
      };
    },

    async listOrders(req) {
      const accountId = req.accountId.trim();
      const limit = pageSize(req.limit);
      const orders = await store.listOrders(accountId ? { accountId, limit } : { limit });
      return { orders: orders.map(orderMessage) };
    },

    async getOrder(req) {
      const orderId = requireText(req.orderId, "order_id");
      const order = await store.getOrder(orderId);
      if (!order) throw new MarketError("not_found", `order ${orderId} not found`, "order_id");
      const audit = (await deps.trust?.store?.auditOfOrder(orderId)) ?? null;
      return {
        order: {
          ...orderMessage(order),
          auditOutcome: audit?.outcome ?? "",
          auditId: audit?.auditId ?? "",
          auditViolations: audit?.violations ?? [],
        },
      };
    },

    async listWorkers() {
      const stored = await store.listWorkers();
      const known = new Set(stored.map((worker) => worker.id));
      const workers = stored.map((worker) =>
        workerMessage(worker, registry.get(worker.id), registry.reputation),
      );
      // A live connection the store does not list yet (e.g. a listing taken mid-connect) is still
      // a worker the operator should see.
      for (const live of registry.list()) {
        if (!known.has(live.workerId)) workers.push(liveOnlyWorkerMessage(live, registry.reputation));
      }
      for (const worker of workers)
        worker.suspendedReason = deps.trust?.suspendedReason(worker.id ?? "") ?? "";
      return { workers };
    },

    async setWorkerTrusted(req) {
      const workerId = requireText(req.workerId, "worker_id");
      const { trust } = deps;
      if (!trust) throw new MarketError("not_found", "this control plane runs no audits", "worker_id");
      const known =
        registry.get(workerId) !== undefined || (await store.listWorkers()).some((w) => w.id === workerId);
      if (!known) throw new MarketError("not_found", `worker ${workerId} not found`, "worker_id");
      await trust.setTrusted(workerId, req.trusted);
      return { workerId, trusted: req.trusted };
    },

    async setWorkerSuspended(req) {
      const workerId = requireText(req.workerId, "worker_id");
      const reason = req.reason.trim() || "suspended by the operator";
      if (reason.length > MAX_LABEL_LENGTH) {
        throw invalid(`reason must be at most ${MAX_LABEL_LENGTH} characters`, "reason");
      }
      const { trust } = deps;
      if (!trust) throw new MarketError("not_found", "this control plane runs no audits", "worker_id");
      const known =
        registry.get(workerId) !== undefined || (await store.listWorkers()).some((w) => w.id === workerId);
      if (!known) throw new MarketError("not_found", `worker ${workerId} not found`, "worker_id");
      await trust.setSuspended(workerId, req.suspended, reason);
      return { workerId, suspended: req.suspended };
    },

    async registerModel(req) {
      const models = requireModels(deps.models);
      const name = requireText(req.name, "name");
      const path = requireText(req.ggufPath, "gguf_path", 4096);
      const expected = req.expectedGgufSha256.trim().toLowerCase();
      try {
        return { model: registeredModelMessage(await models.register(name, path, expected || undefined)) };
      } catch (error) {
        if (error instanceof TokenizerUnavailableError)
          throw new ConnectError(error.message, Code.FailedPrecondition);
        throw error;
      }
    },

    async listModels() {
      const models = requireModels(deps.models);
      return { models: (await models.list()).map(registeredModelMessage) };
    },

    async auditLedger() {
      const audit = await store.auditLedger();
      return {
        ok: audit.ok,
        entriesSum: audit.entriesSum,
        entryCount: BigInt(audit.entryCount),
        problems: audit.problems,
      };
    },
  };

  return withConnectErrors(withTokenCounts(impl, deps.models));
}

/** Wraps every method so that whatever it throws reaches the client through toConnectError. */
function withConnectErrors(impl: ServiceImpl<typeof AdminService>): ServiceImpl<typeof AdminService> {
  const wrapped: Record<string, unknown> = {};
  for (const [name, method] of Object.entries(impl) as [string, (...args: unknown[]) => Promise<unknown>][]) {
    wrapped[name] = async (...args: unknown[]) => {
      try {
        return await method(...args);
      } catch (error) {
        throw toConnectError(error);
      }
    };
  }
  return wrapped as ServiceImpl<typeof AdminService>;
}

// --- validation -------------------------------------------------------------------------------

function invalid(message: string, param: string): MarketError {
  return new MarketError("invalid_request", message, param);
}

function requireText(value: string, field: string, maxLength = 200): string {
  const text = value.trim();
  if (!text) throw invalid(`${field} is required`, field);
  if (text.length > maxLength) throw invalid(`${field} must be at most ${maxLength} characters`, field);
  return text;
}

function optionalLabel(value: string, fallback: string): string {
  const label = value.trim();
  if (label.length > MAX_LABEL_LENGTH) {
    throw invalid(`label must be at most ${MAX_LABEL_LENGTH} characters`, "label");
  }
  return label || fallback;
}

function requirePositiveAmount(amount: bigint): bigint {
  if (amount <= 0n) {
    throw invalid(`amount must be a positive number of micro-credits, got ${amount}`, "amount");
  }
  return amount;
}

function pageSize(limit: number): number {
  return limit === 0 ? DEFAULT_ORDER_LIMIT : Math.min(limit, MAX_ORDER_LIMIT);
}

function idempotencyKey(value: string): string | undefined {
  const key = value.trim();
  if (key.length > MAX_IDEMPOTENCY_KEY_LENGTH) {
    throw invalid(
      `idempotency_key must be at most ${MAX_IDEMPOTENCY_KEY_LENGTH} characters`,
      "idempotency_key",
    );
  }
  return key || undefined;
}

function routingDefaultsFromMessage(
  message:
    | { maxPricePerMillionInput?: bigint; maxPricePerMillionOutput?: bigint; minTokensPerSecond?: number }
    | undefined,
): RoutingDefaults {
  if (!message) return {};
  const price = (value: bigint | undefined, field: string) => {
    if (value !== undefined && value < 0n) throw invalid(`defaults.${field} must not be negative`, field);
    return value;
  };
  const { minTokensPerSecond } = message;
  if (minTokensPerSecond !== undefined && !(Number.isFinite(minTokensPerSecond) && minTokensPerSecond >= 0)) {
    throw invalid(
      "defaults.min_tokens_per_second must be a finite number of tokens per second, zero or more",
      "min_tokens_per_second",
    );
  }
  const defaults: RoutingDefaults = {};
  const maxIn = price(message.maxPricePerMillionInput, "max_price_per_million_input");
  const maxOut = price(message.maxPricePerMillionOutput, "max_price_per_million_output");
  if (maxIn !== undefined) defaults.maxPricePerMillionInput = maxIn;
  if (maxOut !== undefined) defaults.maxPricePerMillionOutput = maxOut;
  if (minTokensPerSecond !== undefined) defaults.minTokensPerSecond = minTokensPerSecond;
  return defaults;
}

// --- records → messages -----------------------------------------------------------------------

function unixMs(date: Date | null): bigint {
  return date ? BigInt(date.getTime()) : 0n;
}

/** Milliseconds between two instants as a uint32, 0 when either is missing. */
function elapsedMs(from: Date, to: Date | null): number {
  if (!to) return 0;
  return Math.min(UINT32_MAX, Math.max(0, Math.round(to.getTime() - from.getTime())));
}

function routingDefaultsMessage(defaults: RoutingDefaults): MessageInitShape<typeof RoutingDefaultsSchema> {
  const message: MessageInitShape<typeof RoutingDefaultsSchema> = {};
  if (defaults.maxPricePerMillionInput !== undefined) {
    message.maxPricePerMillionInput = defaults.maxPricePerMillionInput;
  }
  if (defaults.maxPricePerMillionOutput !== undefined) {
    message.maxPricePerMillionOutput = defaults.maxPricePerMillionOutput;
  }
  if (defaults.minTokensPerSecond !== undefined) message.minTokensPerSecond = defaults.minTokensPerSecond;
  return message;
}

function accountMessage(account: AccountRecord): MessageInitShape<typeof AccountSchema> {
  return {
    id: account.id,
    name: account.name,
    createdAtUnixMs: unixMs(account.createdAt),
    defaults: routingDefaultsMessage(account.defaults),
  };
}

function balanceMessage(balance: Balance): MessageInitShape<typeof BalanceSchema> {
  return { available: balance.available, held: balance.held, pending: balance.pending };
}

function statementEntryMessage(entry: StatementEntry): MessageInitShape<typeof StatementEntrySchema> {
  return {
    transactionId: entry.transactionId,
    kind: entry.kind,
    orderId: entry.orderId ?? "",
    book: BOOKS[entry.book] ?? Book.UNSPECIFIED,
    amount: entry.amount,
    balanceAfter: entry.balanceAfter,
    createdAtUnixMs: unixMs(entry.createdAt),
  };
}

function apiKeyMessage(key: ApiKeyRecord): MessageInitShape<typeof ApiKeySchema> {
  return {
    id: key.id,
    accountId: key.accountId,
    label: key.label,
    prefix: key.prefix,
    createdAtUnixMs: unixMs(key.createdAt),
    revokedAtUnixMs: unixMs(key.revokedAt),
  };
}

function orderMessage(order: OrderRecord): MessageInitShape<typeof OrderSchema> {
  return {
    id: order.id,
    consumerAccountId: order.consumerAccountId,
    workerId: order.workerId ?? "",
    model: order.model,
    status: ORDER_STATUSES[order.status] ?? OrderStatus.UNSPECIFIED,
    promptTokens: order.promptTokens,
    completionTokens: order.completionTokens,
    cost: order.cost,
    fee: order.fee,
    hold: order.hold,
    createdAtUnixMs: unixMs(order.createdAt),
    timeToFirstTokenMs: elapsedMs(order.createdAt, order.firstTokenAt),
    durationMs: elapsedMs(order.createdAt, order.finishedAt),
    error: order.error ?? "",
    pricePerMillionInput: order.pricePerMillionInput,
    pricePerMillionOutput: order.pricePerMillionOutput,
    promptTokenBound: order.promptTokenBound,
    feeBasisPoints: order.feeBasisPoints,
    trustSignals: order.trustSignals,
    providerAccountId: order.providerAccountId ?? "",
    maxTokens: order.maxTokens,
  };
}

function offerMessage(offer: OfferRecord): MessageInitShape<typeof OfferSchema> {
  return {
    model: offer.model,
    pricePerMillionInput: offer.pricePerMillionInput,
    pricePerMillionOutput: offer.pricePerMillionOutput,
    advertisedTokensPerSecond: offer.advertisedTokensPerSecond,
    maxConcurrency: offer.maxConcurrency,
    contextLength: offer.contextLength,
    quantization: offer.quantization,
    engine: offer.engine,
    capabilities: offer.capabilities,
  };
}

/** A stored worker, with its live state when it is connected now (live offers win: they are current). */
function workerMessage(
  worker: WorkerRecord,
  live: WorkerConnection | undefined,
  reputation: ReputationTracker,
): MessageInitShape<typeof WorkerSchema> {
  const offers = live?.offers ?? worker.offers;
  return {
    ...reputationFields(worker.id, offers, reputation),
    id: worker.id,
    accountId: worker.accountId,
    name: live?.name || worker.name,
    online: live !== undefined,
    offers: (live?.offers ?? worker.offers).map(offerMessage),
    activeJobs: live?.activeJobs ?? 0,
    lastSeenUnixMs: unixMs(worker.lastSeenAt),
    agentVersion: worker.agentVersion,
  };
}

function liveOnlyWorkerMessage(
  live: WorkerConnection,
  reputation: ReputationTracker,
): MessageInitShape<typeof WorkerSchema> {
  return {
    ...reputationFields(live.workerId, live.offers, reputation),
    id: live.workerId,
    accountId: live.providerAccountId,
    name: live.name,
    online: true,
    offers: live.offers.map(offerMessage),
    activeJobs: live.activeJobs,
    lastSeenUnixMs: BigInt(Date.now()),
    agentVersion: "",
  };
}

const REPUTATION_STATES: Readonly<Record<ReputationSnapshot["state"], ReputationState>> = {
  healthy: ReputationState.HEALTHY,
  cooling: ReputationState.COOLING,
  probation: ReputationState.PROBATION,
};

/** The worker's measured figures per model: its offers' models first, then any other it served. */
function reputationFields(
  workerId: string,
  offers: readonly OfferRecord[],
  reputation: ReputationTracker,
): Pick<MessageInitShape<typeof WorkerSchema>, "reputation" | "suspended"> {
  const models = [...new Set([...offers.map((offer) => offer.model), ...reputation.modelsOf(workerId)])];
  return {
    reputation: models.map((model) => modelReputationMessage(model, reputation.snapshot(workerId, model))),
    suspended: reputation.isSuspended(workerId),
  };
}

function modelReputationMessage(
  model: string,
  figures: ReputationSnapshot,
): MessageInitShape<typeof ModelReputationSchema> {
  const optional = (value: number | null) => value ?? undefined;
  return {
    model,
    state: REPUTATION_STATES[figures.state],
    coolingUntilUnixMs: BigInt(Math.round(figures.coolingUntil ?? 0)),
    measuredTokensPerSecond: optional(figures.tokensPerSecond),
    tokensPerSecondP50: optional(figures.tokensPerSecondP50),
    tokensPerSecondP90: optional(figures.tokensPerSecondP90),
    timeToFirstTokenMs: optional(figures.timeToFirstTokenMs),
    timeToFirstTokenP50Ms: optional(figures.timeToFirstTokenP50Ms),
    timeToFirstTokenP90Ms: optional(figures.timeToFirstTokenP90Ms),
    successRate: optional(figures.successRate),
    attempts: figures.attempts,
    failures: figures.failures,
    auditsPassed: figures.auditsPassed,
    auditsFailed: figures.auditsFailed,
    reputation: figures.reputation,
  };
}

// --- the model registry -----------------------------------------------------------------------

/** What the admin API asks of the model registry (ModelRegistry implements it). */
export interface AdminModels {
  register(name: string, path: string, expectedSha256: string | undefined): Promise<RegisteredModel>;
  list(): Promise<RegisteredModel[]>;
  orderCounts(orderIds: readonly string[]): Promise<Map<string, OrderTokenCount>>;
}

function requireModels(models: AdminModels | undefined): AdminModels {
  if (!models) throw new ConnectError("this control plane has no model registry", Code.FailedPrecondition);
  return models;
}

function registeredModelMessage(model: RegisteredModel): MessageInitShape<typeof RegisteredModelSchema> {
  return {
    name: model.name,
    ggufPath: model.ggufPath,
    ggufSha256: model.ggufSha256,
    ggufBytes: BigInt(model.ggufBytes),
    tokenizerSha256: model.tokenizerSha256,
    tokenizerModel: model.tokenizerModel,
    vocabularySize: model.vocabularySize,
    chatTemplate: model.chatTemplate,
    registeredAtUnixMs: unixMs(model.registeredAt),
    active: model.active,
    problem: model.problem,
  };
}

type OrderInit = MessageInitShape<typeof OrderSchema>;

/**
 * Adds to every order the handlers return (GetOrder, ListOrders, GetStatement) whether its token
 * count is the platform's own: from the model registry's per-order table, read in one query per
 * call. An order without a row there (served before the registry existed, or never settled) is
 * unverified.
 */
function withTokenCounts(
  impl: ServiceImpl<typeof AdminService>,
  models: AdminModels | undefined,
): ServiceImpl<typeof AdminService> {
  const decorate = async (orders: OrderInit[]) => {
    const ids = orders.map((order) => order.id ?? "").filter((id) => id !== "");
    const counts = models ? await models.orderCounts(ids) : new Map<string, OrderTokenCount>();
    for (const order of orders) {
      const count = counts.get(order.id ?? "");
      order.tokenCountVerified = count?.verified ?? false;
      order.tokenCountGgufSha256 = count?.verified ? (count.ggufSha256 ?? "") : "";
    }
  };
  const { getOrder, listOrders, getStatement } = impl;
  return {
    ...impl,
    async getOrder(req, context) {
      const res = (await getOrder.call(impl, req, context)) as { order?: OrderInit };
      if (res.order) await decorate([res.order]);
      return res;
    },
    async listOrders(req, context) {
      const res = (await listOrders.call(impl, req, context)) as { orders?: OrderInit[] };
      await decorate(res.orders ?? []);
      return res;
    },
    async getStatement(req, context) {
      const res = (await getStatement.call(impl, req, context)) as { orders?: OrderInit[] };
      await decorate(res.orders ?? []);
      return res;
    },
  } as ServiceImpl<typeof AdminService>;
}

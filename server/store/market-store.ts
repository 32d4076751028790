/**
 * MarketStore on MikroORM (PostgreSQL or embedded PGlite).
 *
 * Every call works in its own forked EntityManager. Money operations run in one database
 * transaction that locks the order row first (when there is one), then the involved account rows
 * in id order, writes a balanced ledger transaction and updates the cached balances.
 */
import {
  ForeignKeyConstraintViolationException,
  IsolationLevel,
  LockMode,
  QueryOrder,
  UniqueConstraintViolationException,
} from "@mikro-orm/core";
import type { EntityManager, MikroORM } from "@mikro-orm/postgresql";
import { MarketError } from "../market/errors.js";
import { formatCredits } from "../market/money.js";
import {
  type AccountRecord,
  type ApiKeyRecord,
  type Balance,
  EXTERNAL_ACCOUNT_ID,
  type LedgerAudit,
  type MarketStore,
  type OfferRecord,
  type OpenOrderInput,
  type OrderRecord,
  PLATFORM_ACCOUNT_ID,
  type ReassignOrderInput,
  type RoutingDefaults,
  type SettleOrderInput,
  type WorkerRecord,
} from "../market/store-port.js";
import { Account, ApiKey, LedgerTransaction, type LedgerTransactionKind, Order, Worker } from "./entities.js";
import {
  depositPostings,
  lockAccounts,
  placeHold,
  postHold,
  recordTransaction,
  releaseHold,
  requireAvailable,
  withdrawalPostings,
} from "./ledger.js";
import {
  toAccountRecord,
  toApiKeyRecord,
  toBalance,
  toOrderRecord,
  toStoredOffer,
  toWorkerRecord,
} from "./records.js";
import {
  API_KEY_PREFIX,
  generateSecret,
  hashSecret,
  newId,
  visiblePrefix,
  WORKER_TOKEN_PREFIX,
} from "./secrets.js";

export class SqlMarketStore implements MarketStore {
  private closed = false;

  /**
   * @param onClose what close() releases, typically the Database's close; the store does not own
   *   the ORM otherwise.
   */
  constructor(
    private readonly orm: MikroORM,
    private readonly onClose: () => Promise<void> = async () => {},
  ) {}

  // Accounts and credentials.

  async createAccount(input: { name: string }): Promise<AccountRecord> {
    const name = input.name.trim();
    if (!name) throw new MarketError("invalid_request", "An account needs a name.", "name");
    const em = this.em();
    const account = em.create(Account, {
      id: newId("acct"),
      name,
      createdAt: new Date(),
      available: 0n,
      held: 0n,
    });
    await em.flush();
    return toAccountRecord(account);
  }

  async getAccount(id: string): Promise<AccountRecord | null> {
    const account = await this.em().findOne(Account, { id });
    return account ? toAccountRecord(account) : null;
  }

  async listAccounts(): Promise<AccountRecord[]> {
    const accounts = await this.em().findAll(Account, {
      orderBy: { createdAt: QueryOrder.ASC, id: QueryOrder.ASC },
    });
    return accounts.map(toAccountRecord);
  }

  async updateAccountDefaults(id: string, defaults: RoutingDefaults): Promise<AccountRecord> {
    validateDefaults(defaults);
    const em = this.em();
    const account = await findAccountOrFail(em, id);
    // Replaces the whole set: a default left out is cleared.
    account.defaultMaxPricePerMillionInput = defaults.maxPricePerMillionInput ?? null;
    account.defaultMaxPricePerMillionOutput = defaults.maxPricePerMillionOutput ?? null;
    account.defaultMinTokensPerSecond = defaults.minTokensPerSecond ?? null;
    await em.flush();
    return toAccountRecord(account);
  }

  async createApiKey(accountId: string, label: string): Promise<{ key: ApiKeyRecord; secret: string }> {
    const em = this.em();
    await findAccountOrFail(em, accountId);
    const secret = generateSecret(API_KEY_PREFIX);
    const key = em.create(ApiKey, {
      id: newId("key"),
      account: accountId,
      label,
      prefix: visiblePrefix(secret),
      secretHash: hashSecret(secret),
      createdAt: new Date(),
      revokedAt: null,
    });
    await em.flush();
    return { key: toApiKeyRecord(key), secret };
  }

  async listApiKeys(accountId: string): Promise<ApiKeyRecord[]> {
    const em = this.em();
    await findAccountOrFail(em, accountId);
    const keys = await em.find(
      ApiKey,
      { account: accountId },
      { orderBy: { createdAt: QueryOrder.ASC, id: QueryOrder.ASC } },
    );
    return keys.map(toApiKeyRecord);
  }

  async revokeApiKey(keyId: string): Promise<ApiKeyRecord> {
    const em = this.em();
    const key = await em.findOne(ApiKey, { id: keyId });
    if (!key) throw new MarketError("not_found", `API key ${keyId} does not exist.`);
    // Revoking twice keeps the first revocation time.
    key.revokedAt ??= new Date();
    await em.flush();
    return toApiKeyRecord(key);
  }

  async authenticateApiKey(secret: string): Promise<{ account: AccountRecord; keyId: string } | null> {
    if (!secret.startsWith(API_KEY_PREFIX)) return null;
    const em = this.em();
    const key = await em.findOne(ApiKey, { secretHash: hashSecret(secret), revokedAt: null });
    if (!key) return null;
    const account = await em.findOneOrFail(Account, { id: key.account });
    return { account: toAccountRecord(account), keyId: key.id };
  }

  async createWorkerToken(accountId: string, label: string): Promise<{ workerId: string; secret: string }> {
    const em = this.em();
    await findAccountOrFail(em, accountId);
    const secret = generateSecret(WORKER_TOKEN_PREFIX);
    const worker = em.create(Worker, {
      id: newId("wkr"),
      account: accountId,
      label,
      tokenPrefix: visiblePrefix(secret),
      tokenHash: hashSecret(secret),
      // Until the worker connects and introduces itself, it is known by the token's label.
      name: label,
      agentVersion: "",
      offers: [],
      createdAt: new Date(),
      lastSeenAt: null,
      revokedAt: null,
    });
    await em.flush();
    return { workerId: worker.id, secret };
  }

  async authenticateWorkerToken(secret: string): Promise<WorkerRecord | null> {
    if (!secret.startsWith(WORKER_TOKEN_PREFIX)) return null;
    const worker = await this.em().findOne(Worker, { tokenHash: hashSecret(secret), revokedAt: null });
    return worker ? toWorkerRecord(worker) : null;
  }

  // Workers.

  async recordWorkerConnected(
    workerId: string,
    input: { name: string; agentVersion: string; offers: OfferRecord[] },
  ): Promise<WorkerRecord> {
    const em = this.em();
    const worker = await em.findOne(Worker, { id: workerId });
    if (!worker) throw new MarketError("not_found", `Worker ${workerId} does not exist.`);
    worker.name = input.name;
    worker.agentVersion = input.agentVersion;
    worker.offers = input.offers.map(toStoredOffer);
    worker.lastSeenAt = new Date();
    await em.flush();
    return toWorkerRecord(worker);
  }

  async listWorkers(): Promise<WorkerRecord[]> {
    const workers = await this.em().find(
      Worker,
      { revokedAt: null },
      { orderBy: { createdAt: QueryOrder.ASC, id: QueryOrder.ASC } },
    );
    return workers.map(toWorkerRecord);
  }

  // Money.

  deposit(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance> {
    return this.moveExternalMoney("deposit", accountId, amount, idempotencyKey);
  }

  withdraw(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance> {
    return this.moveExternalMoney("withdrawal", accountId, amount, idempotencyKey);
  }

  async getBalance(accountId: string): Promise<Balance> {
    return toBalance(await findAccountOrFail(this.em(), accountId));
  }

  private async moveExternalMoney(
    kind: "deposit" | "withdrawal",
    accountId: string,
    amount: bigint,
    idempotencyKey: string | undefined,
  ): Promise<Balance> {
    if (amount <= 0n) throw new MarketError("invalid_request", "The amount must be positive.", "amount");
    // Keys are scoped to the account: two accounts may pick the same key independently.
    const key = idempotencyKey === undefined ? null : `${accountId}/${idempotencyKey}`;
    try {
      return await this.transaction(async (em) => {
        const accounts = await lockAccounts(em, [accountId, EXTERNAL_ACCOUNT_ID]);
        const account = accounts.get(accountId) as Account;
        // Checked after locking the account, so a concurrent retry waits and then sees the first.
        if (key !== null && (await wasAlreadyApplied(em, key, kind))) return toBalance(account);
        if (kind === "withdrawal") requireAvailable(account, amount);
        const postings =
          kind === "deposit" ? depositPostings(accountId, amount) : withdrawalPostings(accountId, amount);
        recordTransaction(em, accounts, { kind, postings, idempotencyKey: key });
        return toBalance(account);
      });
    } catch (error) {
      // The unique index on the key is the backstop if the check above was ever bypassed.
      if (key !== null && error instanceof UniqueConstraintViolationException) {
        return this.getBalance(accountId);
      }
      throw error;
    }
  }

  // Orders.

  async openOrder(input: OpenOrderInput): Promise<OrderRecord> {
    if (input.hold <= 0n) {
      throw new MarketError("internal", `Order ${input.id} has a non-positive hold.`);
    }
    try {
      const order = await this.transaction(async (em) => {
        // The provider is locked too: the order row references it, and a row referenced in the
        // transaction must not be locked by a concurrent one in the opposite order.
        const accounts = await lockAccounts(em, [input.consumerAccountId, input.providerAccountId]);
        requireAvailable(accounts.get(input.consumerAccountId) as Account, input.hold);
        const order = em.create(Order, {
          id: input.id,
          consumerAccount: input.consumerAccountId,
          apiKey: input.apiKeyId,
          model: input.model,
          worker: input.workerId,
          providerAccount: input.providerAccountId,
          status: "running",
          pricePerMillionInput: input.pricePerMillionInput,
          pricePerMillionOutput: input.pricePerMillionOutput,
          hold: input.hold,
          maxTokens: input.maxTokens,
          promptTokens: 0,
          completionTokens: 0,
          reportedPromptTokens: null,
          reportedCompletionTokens: null,
          cost: 0n,
          fee: 0n,
          finishReason: null,
          error: null,
          createdAt: new Date(),
          firstTokenAt: null,
          finishedAt: null,
        });
        recordTransaction(em, accounts, {
          kind: "hold",
          orderId: order.id,
          postings: placeHold(input.consumerAccountId, input.hold),
        });
        return order;
      });
      return toOrderRecord(order);
    } catch (error) {
      if (error instanceof UniqueConstraintViolationException) {
        throw new MarketError("conflict", `Order ${input.id} already exists.`);
      }
      if (error instanceof ForeignKeyConstraintViolationException) {
        throw new MarketError("not_found", `Order ${input.id} refers to an unknown API key or worker.`);
      }
      throw error;
    }
  }

  async reassignOrder(orderId: string, input: ReassignOrderInput): Promise<OrderRecord> {
    if (input.hold <= 0n) {
      throw new MarketError("internal", `Order ${orderId} cannot be reassigned to a non-positive hold.`);
    }
    try {
      const order = await this.transaction(async (em) => {
        const order = await lockOrder(em, orderId);
        if (order.status !== "running") {
          throw new MarketError("conflict", `Order ${orderId} is ${order.status} and cannot be reassigned.`);
        }
        const accounts = await lockAccounts(em, [order.consumerAccount, input.providerAccountId]);
        const consumer = accounts.get(order.consumerAccount) as Account;
        // The old hold comes back before the new one is taken, so only the difference must be free.
        requireAvailable(consumer, input.hold - order.hold);
        recordTransaction(em, accounts, {
          kind: "reassign",
          orderId,
          postings: [...releaseHold(consumer.id, order.hold), ...placeHold(consumer.id, input.hold)],
        });
        order.worker = input.workerId;
        order.providerAccount = input.providerAccountId;
        order.pricePerMillionInput = input.pricePerMillionInput;
        order.pricePerMillionOutput = input.pricePerMillionOutput;
        order.hold = input.hold;
        return order;
      });
      return toOrderRecord(order);
    } catch (error) {
      if (error instanceof ForeignKeyConstraintViolationException) {
        throw new MarketError("not_found", `Worker ${input.workerId} does not exist.`);
      }
      throw error;
    }
  }

  async settleOrder(orderId: string, input: SettleOrderInput): Promise<OrderRecord> {
    validateSettlement(orderId, input);
    try {
      const order = await this.transaction(async (em) => {
        const order = await lockOrder(em, orderId);
        // Already final: the first settlement stands (this is what makes settling idempotent).
        if (order.status !== "running") return order;
        if (input.cost > order.hold) {
          throw new MarketError(
            "internal",
            `Order ${orderId} costs ${formatCredits(input.cost)} credits, more than its hold of ${formatCredits(order.hold)}.`,
          );
        }
        const accountIds = [order.consumerAccount, PLATFORM_ACCOUNT_ID];
        if (order.providerAccount) accountIds.push(order.providerAccount);
        const accounts = await lockAccounts(em, accountIds);
        recordTransaction(em, accounts, {
          kind: "settle",
          orderId,
          // At most one settlement per order, enforced by the unique index too.
          idempotencyKey: `settle/${orderId}`,
          postings: postHold({
            consumerAccountId: order.consumerAccount,
            providerAccountId: order.providerAccount ?? null,
            hold: order.hold,
            cost: input.cost,
            fee: input.fee,
          }),
        });
        applySettlement(order, input);
        return order;
      });
      return toOrderRecord(order);
    } catch (error) {
      if (error instanceof UniqueConstraintViolationException) {
        return (await this.getOrder(orderId)) as OrderRecord;
      }
      throw error;
    }
  }

  async getOrder(id: string): Promise<OrderRecord | null> {
    const order = await this.em().findOne(Order, { id });
    return order ? toOrderRecord(order) : null;
  }

  /** Newest first; with accountId, the orders where that account is the consumer or the provider. */
  async listOrders(filter: { accountId?: string; limit: number }): Promise<OrderRecord[]> {
    const where =
      filter.accountId === undefined
        ? {}
        : { $or: [{ consumerAccount: filter.accountId }, { providerAccount: filter.accountId }] };
    const orders = await this.em().find(Order, where, {
      orderBy: { createdAt: QueryOrder.DESC, id: QueryOrder.DESC },
      limit: filter.limit,
    });
    return orders.map(toOrderRecord);
  }

  async listRunningOrders(): Promise<OrderRecord[]> {
    const orders = await this.em().find(
      Order,
      { status: "running" },
      { orderBy: { createdAt: QueryOrder.ASC, id: QueryOrder.ASC } },
    );
    return orders.map(toOrderRecord);
  }

  // Audit.

  async auditLedger(): Promise<LedgerAudit> {
    // One snapshot for all queries, so money moving meanwhile cannot look like an inconsistency.
    return this.transaction(auditLedger, { isolationLevel: IsolationLevel.REPEATABLE_READ, readOnly: true });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.onClose();
  }

  private em(): EntityManager {
    return this.orm.em.fork();
  }

  /**
   * Runs `work` in a database transaction on a fresh EntityManager, flushing at the end. With the
   * embedded database's single connection, `work` must only use the `em` it is given.
   */
  private transaction<T>(
    work: (em: EntityManager) => Promise<T>,
    options?: { isolationLevel?: IsolationLevel; readOnly?: boolean },
  ): Promise<T> {
    return this.em().transactional(work, options);
  }
}

async function findAccountOrFail(em: EntityManager, id: string): Promise<Account> {
  const account = await em.findOne(Account, { id });
  if (!account) throw new MarketError("not_found", `Account ${id} does not exist.`);
  return account;
}

async function lockOrder(em: EntityManager, id: string): Promise<Order> {
  const order = await em.findOne(Order, { id }, { lockMode: LockMode.PESSIMISTIC_WRITE, refresh: true });
  if (!order) throw new MarketError("not_found", `Order ${id} does not exist.`);
  return order;
}

/** Whether a ledger transaction with this idempotency key exists; a different kind is a conflict. */
async function wasAlreadyApplied(
  em: EntityManager,
  key: string,
  kind: LedgerTransactionKind,
): Promise<boolean> {
  const existing = await em.findOne(LedgerTransaction, { idempotencyKey: key });
  if (!existing) return false;
  if (existing.kind !== kind) {
    throw new MarketError("conflict", `This idempotency key was already used for a ${existing.kind}.`);
  }
  return true;
}

function validateDefaults(defaults: RoutingDefaults): void {
  const { maxPricePerMillionInput, maxPricePerMillionOutput, minTokensPerSecond } = defaults;
  if (maxPricePerMillionInput !== undefined && maxPricePerMillionInput < 0n) {
    throw new MarketError("invalid_request", "Prices cannot be negative.", "maxPricePerMillionInput");
  }
  if (maxPricePerMillionOutput !== undefined && maxPricePerMillionOutput < 0n) {
    throw new MarketError("invalid_request", "Prices cannot be negative.", "maxPricePerMillionOutput");
  }
  if (minTokensPerSecond !== undefined && !(Number.isFinite(minTokensPerSecond) && minTokensPerSecond >= 0)) {
    throw new MarketError(
      "invalid_request",
      "The minimum speed must be a non-negative number.",
      "minTokensPerSecond",
    );
  }
}

function applySettlement(order: Order, input: SettleOrderInput): void {
  order.status = input.status;
  order.promptTokens = input.promptTokens;
  order.completionTokens = input.completionTokens;
  order.reportedPromptTokens = input.reportedPromptTokens;
  order.reportedCompletionTokens = input.reportedCompletionTokens;
  order.cost = input.cost;
  order.fee = input.fee;
  order.finishReason = input.finishReason;
  order.error = input.error;
  order.firstTokenAt = input.firstTokenAt;
  order.finishedAt = input.finishedAt;
}

/** Settlement amounts come from the market core, so a bad one is a bug there, not a user error. */
function validateSettlement(orderId: string, input: SettleOrderInput): void {
  if ((input.status as string) === "running") {
    throw new MarketError("internal", `Order ${orderId} cannot be settled as running.`);
  }
  if (input.cost < 0n || input.fee < 0n || input.fee > input.cost) {
    throw new MarketError(
      "internal",
      `Order ${orderId} has an invalid settlement: cost ${input.cost}, fee ${input.fee} (need 0 ≤ fee ≤ cost).`,
    );
  }
}

async function auditLedger(em: EntityManager): Promise<LedgerAudit> {
  const problems: string[] = [];

  const [totals] = await em.execute<{ sum: string; count: number }[]>(
    "select coalesce(sum(amount), 0)::text as sum, count(*)::int as count from ledger_entries",
  );
  const entriesSum = BigInt(totals?.sum ?? "0");
  const entryCount = totals?.count ?? 0;
  if (entriesSum !== 0n) problems.push(`All ledger entries sum to ${entriesSum} micro-credits instead of 0.`);

  const unbalanced = await em.execute<{ transaction_id: string; sum: string }[]>(
    `select transaction_id, sum(amount)::text as sum from ledger_entries
     group by transaction_id having sum(amount) <> 0 order by transaction_id`,
  );
  for (const row of unbalanced) {
    problems.push(`Ledger transaction ${row.transaction_id} is unbalanced: its entries sum to ${row.sum}.`);
  }

  const books = await em.execute<
    { id: string; available: string; held: string; entries_available: string; entries_held: string }[]
  >(
    `select a.id, a.available::text, a.held::text,
       coalesce(sum(e.amount) filter (where e.book = 'available'), 0)::text as entries_available,
       coalesce(sum(e.amount) filter (where e.book = 'held'), 0)::text as entries_held
     from accounts a left join ledger_entries e on e.account_id = a.id
     group by a.id order by a.id`,
  );
  for (const row of books) {
    for (const book of ["available", "held"] as const) {
      const cached = BigInt(row[book]);
      const fromEntries = BigInt(book === "available" ? row.entries_available : row.entries_held);
      if (cached !== fromEntries) {
        problems.push(
          `Account ${row.id} caches a ${book} balance of ${cached} but its entries sum to ${fromEntries}.`,
        );
      }
      const mayGoNegative = book === "available" && row.id === EXTERNAL_ACCOUNT_ID;
      if (cached < 0n && !mayGoNegative) {
        problems.push(`Account ${row.id} has a negative ${book} balance of ${cached}.`);
      }
    }
  }

  return { ok: problems.length === 0, entriesSum, entryCount, problems };
}

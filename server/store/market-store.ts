/**
 * MarketStore on MikroORM (PostgreSQL or embedded PGlite).
 *
 * Every call works in its own forked EntityManager. Money operations run in one database
 * transaction that locks the order row first (when there is one), then the involved account rows
 * in id order, writes a balanced ledger transaction and updates the cached balances. Settlement
 * computes the bill there too, from the locked order row: the caller only says how many tokens.
 *
 * Opening and settling orders, the per-request path, skip the ORM: they are SQL functions
 * (./hot-path.ts, Migration20251125000000_ledger_hot_path) that follow the same locking order, and
 * concurrent ones share one transaction (group commit, ./group-commit.ts).
 */
import {
  ForeignKeyConstraintViolationException,
  IsolationLevel,
  LockMode,
  QueryOrder,
} from "@mikro-orm/core";
import type { EntityManager, MikroORM } from "@mikro-orm/postgresql";
import { formatCredits } from "../../common/credits.js";
import { isMarketError, MarketError } from "../market/errors.js";
import {
  type AccountRecord,
  type ApiKeyRecord,
  type Balance,
  EXTERNAL_ACCOUNT_ID,
  type LedgerAudit,
  type MarketStore,
  type OfferRecord,
  type OpenOrderInput,
  type OrderCheckpoint,
  type OrderCount,
  type OrderRecord,
  type ReassignOrderInput,
  type RoutingDefaults,
  type SettleOrderInput,
  type Statement,
  type StatementEntry,
  type WorkerRecord,
} from "../market/store-port.js";
import { Account, ApiKey, type Book, IdempotencyKey, Order, PendingEarning, Worker } from "./entities.js";
import {
  DEFAULT_MAX_BATCH,
  DEFAULT_MAX_IN_FLIGHT,
  DEFAULT_MAX_WAIT_MS,
  GroupCommitter,
} from "./group-commit.js";
import {
  type LedgerItem,
  type LedgerOutcome,
  openItem,
  orderOrError,
  runLedgerBatch,
  settleItem,
  sqlState,
} from "./hot-path.js";
import {
  depositPostings,
  lockAccounts,
  placeHold,
  recordTransaction,
  releaseEarning,
  releaseHold,
  requireAvailable,
  withdrawalPostings,
} from "./ledger.js";
import {
  fromStoredBalance,
  toAccountRecord,
  toApiKeyRecord,
  toBalance,
  toOrderRecord,
  toStoredBalance,
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

export interface SqlMarketStoreOptions {
  /** How long a provider's earning stays pending after its order finished. Default 24 h. */
  settleAfterMs?: number;
  /**
   * What close() releases, typically the Database's close; the store does not own the ORM
   * otherwise.
   */
  onClose?: () => Promise<void>;
  /** How opens and settlements from concurrent orders share transactions (see group-commit.ts). */
  groupCommit?: GroupCommitSettings;
}

export interface GroupCommitSettings {
  /** The most opens and settlements in one transaction. Default 128. */
  maxBatch?: number;
  /** The longest one waits for a batch in flight before another starts alongside. Default 5 ms. */
  maxWaitMs?: number;
  /** The most batches in flight at once. Default 4. */
  maxInFlight?: number;
  /** Called before each batch runs, which waits for it: lets a test hold a batch in flight. */
  beforeBatch?: (size: number) => Promise<void> | void;
}

const DEFAULT_SETTLE_AFTER_MS = 24 * 60 * 60 * 1000;
/** Earnings released per database transaction, so one release never holds locks for long. */
const RELEASE_BATCH_SIZE = 500;
/** The server releases about every minute; an earning this far past maturity was forgotten. */
const RELEASE_GRACE_MS = 5 * 60 * 1000;
/** Token counts live in `integer` columns. */
const MAX_INT32 = 2_147_483_647;
const MAX_FEE_BASIS_POINTS = 10_000;
/** PostgreSQL's SQLSTATEs for a unique and a foreign-key violation. */
const UNIQUE_VIOLATION = "23505";
const FOREIGN_KEY_VIOLATION = "23503";

type OpenedAccount = Awaited<ReturnType<MarketStore["openAccount"]>>;

/** A row of findActiveApiKeys' query. */
interface ActiveApiKeyRow {
  secret_hash: string;
  key_id: string;
  id: string;
  name: string;
  created_at: Date | string;
  max_input: string | null;
  max_output: string | null;
  min_tokens_per_second: number | string | null;
}

/** What an idempotency key remembers of its request: the operation and its parameters. */
interface IdempotentRequest {
  operation: "deposit" | "withdrawal" | "open_account";
  /** Decimal strings, in a fixed key order so equal requests serialize equally. */
  parameters: Record<string, string>;
}

export class SqlMarketStore implements MarketStore {
  private closed = false;
  private readonly settleAfterMs: number;
  private readonly onClose: () => Promise<void>;
  private readonly ledger: GroupCommitter<LedgerItem, LedgerOutcome>;

  constructor(
    private readonly orm: MikroORM,
    options: SqlMarketStoreOptions = {},
  ) {
    this.settleAfterMs = options.settleAfterMs ?? DEFAULT_SETTLE_AFTER_MS;
    if (!(Number.isSafeInteger(this.settleAfterMs) && this.settleAfterMs >= 0)) {
      throw new Error(`settleAfterMs must be a non-negative integer, got ${this.settleAfterMs}.`);
    }
    this.onClose = options.onClose ?? (async () => {});
    const groupCommit = options.groupCommit ?? {};
    this.ledger = new GroupCommitter({
      runBatch: (items) => runLedgerBatch(this.orm, items),
      maxBatch: groupCommit.maxBatch ?? DEFAULT_MAX_BATCH,
      maxWaitMs: groupCommit.maxWaitMs ?? DEFAULT_MAX_WAIT_MS,
      maxInFlight: groupCommit.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT,
      beforeBatch: groupCommit.beforeBatch,
    });
  }

  // Accounts and credentials.

  async createAccount(input: { name: string }): Promise<AccountRecord> {
    const name = accountName(input.name);
    const em = this.em();
    const account = createAccountEntity(em, name);
    await em.flush();
    return toAccountRecord(account);
  }

  async openAccount(input: {
    name: string;
    keyLabel: string;
    initialDeposit: bigint;
    idempotencyKey?: string;
  }): Promise<OpenedAccount> {
    const name = accountName(input.name);
    if (input.initialDeposit < 0n) {
      throw new MarketError("invalid_request", "The initial deposit cannot be negative.", "initialDeposit");
    }
    const request: IdempotentRequest = {
      operation: "open_account",
      parameters: { name, keyLabel: input.keyLabel, initialDeposit: input.initialDeposit.toString() },
    };
    return this.idempotent<OpenedAccount>(
      input.idempotencyKey,
      request,
      async (em) => {
        const account = createAccountEntity(em, name);
        const { key, secret } = createApiKeyEntity(em, account.id, input.keyLabel);
        // The new rows must exist before the account can be locked for the deposit.
        await em.flush();
        if (input.initialDeposit > 0n) {
          const accounts = await lockAccounts(em, [account.id, EXTERNAL_ACCOUNT_ID]);
          recordTransaction(em, accounts, {
            kind: "deposit",
            postings: depositPostings(account.id, input.initialDeposit),
          });
        }
        const balance = toBalance(account);
        return {
          result: {
            account: toAccountRecord(account),
            apiKey: toApiKeyRecord(key),
            apiKeySecret: secret,
            balance,
            replayed: false,
          },
          response: { accountId: account.id, apiKeyId: key.id, ...toStoredBalance(balance) },
        };
      },
      async (em, response) => {
        const account = await em.findOneOrFail(Account, { id: response.accountId });
        const key = await em.findOneOrFail(ApiKey, { id: response.apiKeyId });
        return {
          account: toAccountRecord(account),
          apiKey: toApiKeyRecord(key),
          apiKeySecret: null,
          balance: fromStoredBalance(response),
          replayed: true,
        };
      },
    );
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
    const { key, secret } = createApiKeyEntity(em, accountId, label);
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

  async findActiveApiKeys(
    secretHashes: readonly string[],
  ): Promise<Map<string, { account: AccountRecord; keyId: string }>> {
    const found = new Map<string, { account: AccountRecord; keyId: string }>();
    if (secretHashes.length === 0) return found;
    // One statement for the whole batch, whatever its size: the hashes travel as one JSON array
    // (an array parameter would be spread into a list by the query builder). Money columns come
    // back as text, so bigints are exact.
    const rows = await this.em()
      .getConnection()
      .execute<ActiveApiKeyRow[]>(
        `select k.secret_hash, k.id as key_id, a.id, a.name, a.created_at,
           a.default_max_price_per_million_input::text as max_input,
           a.default_max_price_per_million_output::text as max_output,
           a.default_min_tokens_per_second as min_tokens_per_second
         from api_keys k join accounts a on a.id = k.account_id
         where k.secret_hash = any(array(select jsonb_array_elements_text(?::jsonb)))
           and k.revoked_at is null`,
        [JSON.stringify(secretHashes)],
      );
    for (const row of rows) {
      const defaults: RoutingDefaults = {};
      if (row.max_input != null) defaults.maxPricePerMillionInput = BigInt(row.max_input);
      if (row.max_output != null) defaults.maxPricePerMillionOutput = BigInt(row.max_output);
      if (row.min_tokens_per_second != null) defaults.minTokensPerSecond = Number(row.min_tokens_per_second);
      const account = { id: row.id, name: row.name, createdAt: new Date(row.created_at), defaults };
      found.set(row.secret_hash, { account, keyId: row.key_id });
    }
    return found;
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

  async releaseMaturedEarnings(now: Date = new Date()): Promise<number> {
    let released = 0;
    for (;;) {
      const batch = await this.transaction(async (em) => {
        // SKIP LOCKED: two releasers running at once share the work instead of queueing.
        const earnings = await em.find(
          PendingEarning,
          { releasedAt: null, maturesAt: { $lte: now } },
          {
            lockMode: LockMode.PESSIMISTIC_PARTIAL_WRITE,
            orderBy: { maturesAt: QueryOrder.ASC, order: QueryOrder.ASC },
            limit: RELEASE_BATCH_SIZE,
          },
        );
        if (earnings.length === 0) return 0;
        const accounts = await lockAccounts(
          em,
          earnings.map((earning) => earning.account),
        );
        for (const earning of earnings) {
          recordTransaction(em, accounts, {
            kind: "release",
            orderId: earning.order,
            // One release per earning, enforced by the unique index too.
            idempotencyKey: `release/${earning.order}`,
            postings: releaseEarning(earning.account, earning.amount),
          });
          earning.releasedAt = now;
        }
        return earnings.length;
      });
      released += batch;
      if (batch < RELEASE_BATCH_SIZE) return released;
    }
  }

  async getStatement(accountId: string, options: { limit: number }): Promise<Statement> {
    const limit = clampCount(options.limit, MAX_INT32);
    // One snapshot: the balance, the entries and the orders agree with each other.
    return this.transaction(
      async (em) => {
        const account = await findAccountOrFail(em, accountId);
        // The running balance is computed over all of the account's entries, then the last
        // `limit` are kept: each line shows the book's true balance after it.
        const rows = await em.execute<
          {
            transaction_id: string;
            kind: string;
            order_id: string | null;
            book: Book;
            amount: string;
            balance_after: string;
            created_at_ms: string;
          }[]
        >(
          `select transaction_id, kind, order_id, book, amount, balance_after, created_at_ms from (
             select e.id, e.transaction_id, t.kind, t.order_id, e.book, e.amount::text as amount,
               (sum(e.amount) over (partition by e.book order by e.id))::text as balance_after,
               floor(extract(epoch from t.created_at) * 1000)::bigint::text as created_at_ms
             from ledger_entries e join ledger_transactions t on t.id = e.transaction_id
             where e.account_id = ?
           ) as entries
           order by id desc limit ?`,
          [accountId, limit],
        );
        const entries: StatementEntry[] = rows.reverse().map((row) => ({
          transactionId: row.transaction_id,
          kind: row.kind,
          orderId: row.order_id,
          book: row.book,
          amount: BigInt(row.amount),
          balanceAfter: BigInt(row.balance_after),
          createdAt: new Date(Number(row.created_at_ms)),
        }));
        const orders = await findOrders(em, accountId, limit);
        return { account: toAccountRecord(account), balance: toBalance(account), entries, orders };
      },
      { isolationLevel: IsolationLevel.REPEATABLE_READ, readOnly: true },
    );
  }

  private async moveExternalMoney(
    kind: "deposit" | "withdrawal",
    accountId: string,
    amount: bigint,
    idempotencyKey: string | undefined,
  ): Promise<Balance> {
    if (amount <= 0n) throw new MarketError("invalid_request", "The amount must be positive.", "amount");
    return this.idempotent(
      idempotencyKey,
      { operation: kind, parameters: { accountId, amount: amount.toString() } },
      async (em) => {
        const accounts = await lockAccounts(em, [accountId, EXTERNAL_ACCOUNT_ID]);
        const account = accounts.get(accountId) as Account;
        if (kind === "withdrawal") requireAvailable(account, amount);
        const postings =
          kind === "deposit" ? depositPostings(accountId, amount) : withdrawalPostings(accountId, amount);
        recordTransaction(em, accounts, { kind, postings });
        const balance = toBalance(account);
        return { result: balance, response: toStoredBalance(balance) };
      },
      async (_em, response) => fromStoredBalance(response),
    );
  }

  /**
   * Runs `work` in a transaction, under Stripe's idempotency semantics when a key is given. The
   * key's row is claimed first, in the same transaction as the money, so it commits with it or
   * not at all (a refused request, e.g. for insufficient credits, leaves the key free). The
   * primary key arbitrates between concurrent first uses: a second claim of the same key waits
   * for the first transaction to end, then finds its row and replays the stored response (same
   * request) or is refused (another request); if the first rolled back, the second claims the key.
   */
  private async idempotent<T>(
    key: string | undefined,
    request: IdempotentRequest,
    work: (em: EntityManager) => Promise<{ result: T; response: Record<string, string> }>,
    replay: (em: EntityManager, response: Record<string, string>) => Promise<T>,
  ): Promise<T> {
    return this.transaction(async (em) => {
      if (key === undefined) return (await work(em)).result;
      const claimed = await em.execute<{ key: string }[]>(
        `insert into idempotency_keys (key, operation, request_fingerprint, response, created_at)
         values (?, ?, ?, '{}'::jsonb, ?::timestamptz)
         on conflict (key) do nothing returning key`,
        [key, request.operation, JSON.stringify(request.parameters), new Date().toISOString()],
      );
      if (claimed.length === 0) {
        const prior = await em.findOneOrFail(IdempotencyKey, { key });
        return replay(em, priorResponse(prior, key, request));
      }
      const { result, response } = await work(em);
      await em.execute("update idempotency_keys set response = ?::jsonb where key = ?", [
        JSON.stringify(response),
        key,
      ]);
      return result;
    });
  }

  // Orders.

  async openOrder(input: OpenOrderInput): Promise<OrderRecord> {
    validateOrderTerms(input.id, input.hold, input.pricePerMillionInput, input.pricePerMillionOutput);
    validateCount(input.id, "maxTokens", input.maxTokens);
    validateCount(input.id, "promptTokenBound", input.promptTokenBound);
    if (
      !Number.isInteger(input.feeBasisPoints) ||
      input.feeBasisPoints < 0 ||
      input.feeBasisPoints > MAX_FEE_BASIS_POINTS
    ) {
      throw new MarketError(
        "internal",
        `Order ${input.id} has a fee of ${input.feeBasisPoints} basis points (need 0 to ${MAX_FEE_BASIS_POINTS}).`,
      );
    }
    // One statement, batched with concurrent opens and settlements: the function locks both
    // accounts (the order row references the provider's too), checks the balance, inserts the order
    // and writes the hold, or answers why not.
    const item = openItem(input, new Date());
    try {
      return orderOrError(item, await this.ledger.submit(item));
    } catch (error) {
      if (isMarketError(error)) throw error;
      // Raced past the function's own checks (another transaction inserted the same id meanwhile).
      if (sqlState(error) === UNIQUE_VIOLATION) {
        throw new MarketError("conflict", `Order ${input.id} already exists.`);
      }
      if (sqlState(error) === FOREIGN_KEY_VIOLATION) {
        throw new MarketError("not_found", `Order ${input.id} refers to an unknown API key or worker.`);
      }
      throw error;
    }
  }

  async reassignOrder(orderId: string, input: ReassignOrderInput): Promise<OrderRecord> {
    validateOrderTerms(orderId, input.hold, input.pricePerMillionInput, input.pricePerMillionOutput);
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
    if ((input.status as string) === "running") {
      throw new MarketError("internal", `Order ${orderId} cannot be settled as running.`);
    }
    // The bill is computed by the database from the locked order row (see the migration); here
    // only what it cannot know: counts clamped to what an integer column holds (the order's bounds
    // cap them there), text PostgreSQL can store, the finishing time and when the earning matures.
    const finishedAt = validDate(input.finishedAt) ?? new Date();
    const item = settleItem(
      orderId,
      {
        status: input.status,
        promptTokens: clampCount(input.promptTokens, MAX_INT32),
        completionTokens: clampCount(input.completionTokens, MAX_INT32),
        reportedPromptTokens: reportedCount(input.reportedPromptTokens),
        reportedCompletionTokens: reportedCount(input.reportedCompletionTokens),
        trustSignals: input.trustSignals.filter((signal) => typeof signal === "string").map(storable),
        finishReason: input.finishReason === null ? null : storable(input.finishReason),
        error: input.error === null ? null : storable(input.error),
        firstTokenAt: validDate(input.firstTokenAt)?.toISOString() ?? null,
        finishedAt: finishedAt.toISOString(),
        maturesAt: new Date(finishedAt.getTime() + this.settleAfterMs).toISOString(),
        ...(input.count ? { count: storableCount(input.count) } : {}),
      },
      new Date(),
    );
    try {
      return orderOrError(item, await this.ledger.submit(item));
    } catch (error) {
      if (isMarketError(error)) throw error;
      // A concurrent settlement won the unique settle key: its result is the order's.
      if (sqlState(error) === UNIQUE_VIOLATION) return (await this.getOrder(orderId)) as OrderRecord;
      throw error;
    }
  }

  async checkpointOrders(checkpoints: readonly OrderCheckpoint[]): Promise<void> {
    if (checkpoints.length === 0) return;
    // One row per order: UPDATE … FROM applies only one of several matching rows.
    const latest = new Map<
      string,
      { prompt_tokens: number; completion_tokens: number; first_token_at: string | null }
    >();
    for (const checkpoint of checkpoints) {
      const firstTokenAt = validDate(checkpoint.firstTokenAt);
      const seen = latest.get(checkpoint.orderId);
      const promptTokens = clampCount(checkpoint.promptTokens, MAX_INT32);
      const completionTokens = clampCount(checkpoint.completionTokens, MAX_INT32);
      const seenFirst = seen?.first_token_at ?? null;
      latest.set(checkpoint.orderId, {
        prompt_tokens: Math.max(promptTokens, seen?.prompt_tokens ?? 0),
        completion_tokens: Math.max(completionTokens, seen?.completion_tokens ?? 0),
        first_token_at:
          firstTokenAt && (seenFirst === null || firstTokenAt.toISOString() < seenFirst)
            ? firstTokenAt.toISOString()
            : seenFirst,
      });
    }
    const rows = [...latest].map(([orderId, counts]) => ({ order_id: orderId, ...counts }));
    // All checkpoints travel as one JSON parameter: one statement, whatever their number. A
    // settled order is skipped (status), counts only go up and stay within the order's bounds.
    await this.em()
      .getConnection()
      .execute(
        `update orders as o set
           prompt_tokens = greatest(o.prompt_tokens, least(c.prompt_tokens, o.prompt_token_bound)),
           completion_tokens = greatest(o.completion_tokens, least(c.completion_tokens, o.max_tokens)),
           first_token_at = coalesce(o.first_token_at, c.first_token_at)
         from jsonb_to_recordset(?::jsonb)
           as c(order_id text, prompt_tokens integer, completion_tokens integer, first_token_at timestamptz)
         where o.id = c.order_id and o.status = 'running'`,
        [JSON.stringify(rows)],
        "run",
      );
  }

  async getOrder(id: string): Promise<OrderRecord | null> {
    const order = await this.em().findOne(Order, { id });
    return order ? toOrderRecord(order) : null;
  }

  /** Newest first; with accountId, the orders where that account is the consumer or the provider. */
  async listOrders(filter: { accountId?: string; limit: number }): Promise<OrderRecord[]> {
    return findOrders(this.em(), filter.accountId, filter.limit);
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

  async auditLedger(now: Date = new Date()): Promise<LedgerAudit> {
    // One snapshot for all queries, so money moving meanwhile cannot look like an inconsistency.
    return this.transaction((em) => auditLedger(em, now), {
      isolationLevel: IsolationLevel.REPEATABLE_READ,
      readOnly: true,
    });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    // Opens and settlements already submitted finish before the database goes away.
    await this.ledger.drain();
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

function accountName(name: string): string {
  const trimmed = name.trim();
  if (!trimmed) throw new MarketError("invalid_request", "An account needs a name.", "name");
  return trimmed;
}

function createAccountEntity(em: EntityManager, name: string): Account {
  return em.create(Account, {
    id: newId("acct"),
    name,
    createdAt: new Date(),
    available: 0n,
    held: 0n,
    pending: 0n,
  });
}

function createApiKeyEntity(
  em: EntityManager,
  accountId: string,
  label: string,
): { key: ApiKey; secret: string } {
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
  return { key, secret };
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

async function findOrders(
  em: EntityManager,
  accountId: string | undefined,
  limit: number,
): Promise<OrderRecord[]> {
  // MikroORM reads a limit of 0 as "no limit".
  if (limit <= 0) return [];
  const where =
    accountId === undefined ? {} : { $or: [{ consumerAccount: accountId }, { providerAccount: accountId }] };
  const orders = await em.find(Order, where, {
    orderBy: { createdAt: QueryOrder.DESC, id: QueryOrder.DESC },
    limit,
  });
  return orders.map(toOrderRecord);
}

/**
 * The stored response of a key's first use, when this request is the same one; a different
 * request under the same key is refused, naming what differs.
 */
function priorResponse(
  prior: IdempotencyKey,
  key: string,
  request: IdempotentRequest,
): Record<string, string> {
  const fingerprint = JSON.stringify(request.parameters);
  if (prior.operation === request.operation && prior.requestFingerprint === fingerprint)
    return prior.response;
  const priorParameters = JSON.parse(prior.requestFingerprint) as Record<string, string>;
  const differences = prior.operation === request.operation ? [] : ["operation"];
  for (const field of new Set([...Object.keys(priorParameters), ...Object.keys(request.parameters)])) {
    if (priorParameters[field] !== request.parameters[field]) differences.push(field);
  }
  throw new MarketError(
    "conflict",
    `Idempotency key "${key}" was already used for ${describeRequest(prior.operation, priorParameters)}; ` +
      `this request is ${describeRequest(request.operation, request.parameters)} ` +
      `(${differences.join(", ")} differ${differences.length === 1 ? "s" : ""}). ` +
      "Nothing was changed; use a new key for a new request.",
  );
}

function describeRequest(operation: string, parameters: Record<string, string>): string {
  const credits = (field: string) => `${formatCredits(BigInt(parameters[field] ?? "0"))} credits`;
  switch (operation) {
    case "deposit":
      return `a deposit of ${credits("amount")} into account ${parameters.accountId}`;
    case "withdrawal":
      return `a withdrawal of ${credits("amount")} from account ${parameters.accountId}`;
    case "open_account":
      return `opening account "${parameters.name}" (key "${parameters.keyLabel}") with ${credits("initialDeposit")}`;
    default:
      return `${operation} ${JSON.stringify(parameters)}`;
  }
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

/** Order terms come from the market core, so a bad one is a bug there, not a user error. */
function validateOrderTerms(orderId: string, hold: bigint, priceInput: bigint, priceOutput: bigint): void {
  if (hold < 0n) throw new MarketError("internal", `Order ${orderId} has a negative hold.`);
  if (priceInput < 0n || priceOutput < 0n) {
    throw new MarketError("internal", `Order ${orderId} has a negative price.`);
  }
}

function validateCount(orderId: string, field: string, value: number): void {
  if (!Number.isInteger(value) || value < 0 || value > MAX_INT32) {
    throw new MarketError("internal", `Order ${orderId} has an invalid ${field}: ${value}.`);
  }
}

/** A token count forced into 0..max: NaN and negatives are 0, fractions round down. */
function clampCount(value: number, max: number): number {
  if (Number.isNaN(value) || value <= 0) return 0;
  return value >= max ? max : Math.floor(value);
}

/** A worker-reported count as stored (bigint column, read back exactly as a JS number). */
function reportedCount(value: number | null): number | null {
  return optionalCount(value, Number.MAX_SAFE_INTEGER);
}

/** A count that may be absent, clamped to 0..max; null (or NaN) stays null. */
function optionalCount(value: number | null, max: number): number | null {
  return value === null || Number.isNaN(value) ? null : clampCount(value, max);
}

/**
 * A count record that cannot fail its statement (it shares the settlement's transaction): text
 * without NUL, integers within their columns.
 */
function storableCount(count: OrderCount): OrderCount {
  return {
    model: storable(count.model),
    verified: count.verified === true,
    ggufSha256: count.ggufSha256 === null ? null : storable(count.ggufSha256),
    promptTokens: optionalCount(count.promptTokens, MAX_INT32),
    completionTokens: optionalCount(count.completionTokens, MAX_INT32),
    reportedPromptTokens: reportedCount(count.reportedPromptTokens),
    reportedCompletionTokens: reportedCount(count.reportedCompletionTokens),
    claimedCompletionTokens: clampCount(count.claimedCompletionTokens, Number.MAX_SAFE_INTEGER),
  };
}

/** PostgreSQL text and jsonb cannot hold NUL, which a protobuf string may carry. */
function storable(text: string): string {
  return text.replaceAll("\u0000", "\uFFFD");
}

function validDate(date: Date | null): Date | null {
  return date instanceof Date && !Number.isNaN(date.getTime()) ? date : null;
}

async function auditLedger(em: EntityManager, now: Date): Promise<LedgerAudit> {
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
    ({ id: string } & Record<Book, string> & Record<`entries_${Book}`, string>)[]
  >(
    `select a.id, a.available::text, a.held::text, a.pending::text,
       coalesce(sum(e.amount) filter (where e.book = 'available'), 0)::text as entries_available,
       coalesce(sum(e.amount) filter (where e.book = 'held'), 0)::text as entries_held,
       coalesce(sum(e.amount) filter (where e.book = 'pending'), 0)::text as entries_pending
     from accounts a left join ledger_entries e on e.account_id = a.id
     group by a.id order by a.id`,
  );
  for (const row of books) {
    for (const book of ["available", "held", "pending"] as const) {
      const cached = BigInt(row[book]);
      const fromEntries = BigInt(row[`entries_${book}`]);
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

  // Every held micro-credit belongs to a live order: the held book is the sum of the holds of the
  // account's running orders, no more (a leaked hold) and no less (an order without its hold).
  const holds = await em.execute<{ id: string; held: string; holds: string }[]>(
    `select a.id, a.held::text, coalesce(h.holds, 0)::text as holds
     from accounts a left join (
       select consumer_account_id, sum(hold) as holds from orders where status = 'running'
       group by consumer_account_id
     ) h on h.consumer_account_id = a.id
     where a.held <> coalesce(h.holds, 0) order by a.id`,
  );
  for (const row of holds) {
    problems.push(
      `Account ${row.id} has ${row.held} micro-credits held but its running orders hold ${row.holds}.`,
    );
  }

  const settlements = await em.execute<{ id: string; status: string; settlements: number }[]>(
    `select o.id, o.status, count(t.id)::int as settlements
     from orders o left join ledger_transactions t on t.order_id = o.id and t.kind = 'settle'
     group by o.id
     having count(t.id) <> case when o.status = 'running' then 0 else 1 end
     order by o.id`,
  );
  for (const row of settlements) {
    problems.push(
      row.status === "running"
        ? `Order ${row.id} is running but was settled ${row.settlements} time(s).`
        : `Order ${row.id} is ${row.status} but was settled ${row.settlements} times instead of exactly once.`,
    );
  }

  const overdue = await em.execute<
    { order_id: string; account_id: string; amount: string; matures_at_ms: string }[]
  >(
    `select order_id, account_id, amount::text,
       floor(extract(epoch from matures_at) * 1000)::bigint::text as matures_at_ms
     from pending_earnings
     where released_at is null and matures_at <= ?::timestamptz
     order by matures_at, order_id`,
    [new Date(now.getTime() - RELEASE_GRACE_MS).toISOString()],
  );
  for (const row of overdue) {
    problems.push(
      `The earning of ${row.amount} micro-credits for account ${row.account_id} from order ${row.order_id} ` +
        `matured at ${new Date(Number(row.matures_at_ms)).toISOString()} and is still pending.`,
    );
  }

  const pending = await em.execute<{ id: string; pending: string; unreleased: string }[]>(
    `select a.id, a.pending::text, coalesce(p.unreleased, 0)::text as unreleased
     from accounts a left join (
       select account_id, sum(amount) as unreleased from pending_earnings where released_at is null
       group by account_id
     ) p on p.account_id = a.id
     where a.pending <> coalesce(p.unreleased, 0) order by a.id`,
  );
  for (const row of pending) {
    problems.push(
      `Account ${row.id} has ${row.pending} micro-credits pending but its unreleased earnings sum to ${row.unreleased}.`,
    );
  }

  return { ok: problems.length === 0, entriesSum, entryCount, problems };
}

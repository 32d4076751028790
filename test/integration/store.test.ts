/**
 * SqlMarketStore against a real database: embedded PGlite by default, or a fresh database on the
 * PostgreSQL server in DATABASE_URL. Tests share one database and run in order; each works on its
 * own accounts, so only the platform and external accounts are shared (compared as deltas).
 * Settlements finish "now" unless a test says otherwise, so no earning is overdue for the audit.
 */
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { isMarketError, type MarketErrorCode } from "../../server/market/errors.js";
import { NO_CAPABILITIES } from "../../server/market/registry.js";
import {
  type Balance,
  EXTERNAL_ACCOUNT_ID,
  type OfferRecord,
  type OpenOrderInput,
  type OrderRecord,
  PLATFORM_ACCOUNT_ID,
  type ReassignOrderInput,
  type SettleOrderInput,
} from "../../server/market/store-port.js";
import { SqlMarketStore } from "../../server/store/market-store.js";
import { openTestStore, type TestStore } from "../support/database.js";

const CREDIT = 1_000_000n;
const MAX_UINT32 = 4_294_967_295;

let testStore: TestStore;
let store: SqlMarketStore;

beforeAll(async () => {
  testStore = await openTestStore();
  store = testStore.store;
}, 60_000);

afterAll(async () => {
  await testStore?.close();
}, 60_000);

async function expectMarketError(promise: Promise<unknown>, code: MarketErrorCode): Promise<Error> {
  const error = await promise.then(
    () => null,
    (caught: unknown) => caught,
  );
  expect(isMarketError(error), `expected MarketError(${code}), got ${String(error)}`).toBe(true);
  expect((error as { code: string }).code).toBe(code);
  return error as Error;
}

function balance(available: bigint, held = 0n, pending = 0n): Balance {
  return { available, held, pending };
}

/** Runs raw SQL under the store, to corrupt data on purpose. */
async function sql(query: string, params: unknown[] = []): Promise<void> {
  await testStore.orm.em.fork().execute(query, params);
}

/** A consumer account with an API key and `credits` deposited. */
async function newConsumer(credits: bigint) {
  const account = await store.createAccount({ name: "consumer" });
  const { key } = await store.createApiKey(account.id, "default");
  if (credits > 0n) await store.deposit(account.id, credits);
  return { accountId: account.id, apiKeyId: key.id };
}

/** A provider account with one worker. */
async function newProvider() {
  const account = await store.createAccount({ name: "provider" });
  const { workerId } = await store.createWorkerToken(account.id, "gpu box");
  return { accountId: account.id, workerId };
}

let orderCounter = 0;
/** An order at 2.5 credits/M input and 7.000001 credits/M output, 7.5 % fee. */
function orderInput(
  consumer: { accountId: string; apiKeyId: string },
  provider: { accountId: string; workerId: string },
  hold: bigint,
): OpenOrderInput {
  orderCounter += 1;
  return {
    id: `ord_test_${Date.now().toString(36)}_${orderCounter}`,
    consumerAccountId: consumer.accountId,
    apiKeyId: consumer.apiKeyId,
    model: "llama-3.2-1b",
    workerId: provider.workerId,
    providerAccountId: provider.accountId,
    pricePerMillionInput: 2_500_000n,
    pricePerMillionOutput: 7_000_001n,
    hold,
    maxTokens: 1024,
    promptTokenBound: 500,
    feeBasisPoints: 750,
  };
}

function settlement(promptTokens: number, completionTokens: number): SettleOrderInput {
  return {
    status: "completed",
    promptTokens,
    completionTokens,
    reportedPromptTokens: promptTokens,
    reportedCompletionTokens: completionTokens,
    trustSignals: [],
    finishReason: "stop",
    error: null,
    firstTokenAt: new Date(Date.now() - 1000),
    finishedAt: new Date(),
  };
}

/** The provider's share of an order at orderInput's prices: 120 + 345 tokens cost 2,716 µc. */
const COST_120_345 = 2_716n; // ceil((120 · 2,500,000 + 345 · 7,000,001) / 1e6) = ceil(2,715.000345)
const FEE_120_345 = 203n; // floor(2,716 · 750 / 10,000) = floor(203.7)

describe("SqlMarketStore", () => {
  it("starts with the platform and external accounts", async () => {
    const ids = (await store.listAccounts()).map((account) => account.id);
    expect(ids).toContain(PLATFORM_ACCOUNT_ID);
    expect(ids).toContain(EXTERNAL_ACCOUNT_ID);
  });

  it("creates accounts and API keys, authenticates keys and refuses them once revoked", async () => {
    const account = await store.createAccount({ name: "Ada" });
    expect(account.id).toMatch(/^acct_/);
    expect(await store.getAccount(account.id)).toEqual(account);
    expect(await store.getBalance(account.id)).toEqual(balance(0n));

    const { key, secret } = await store.createApiKey(account.id, "laptop");
    expect(secret).toMatch(/^sk-llm-[A-Za-z0-9_-]{43}$/);
    expect(key).toMatchObject({
      accountId: account.id,
      label: "laptop",
      prefix: secret.slice(0, 12),
      revokedAt: null,
    });

    const authenticated = await store.authenticateApiKey(secret);
    expect(authenticated?.keyId).toBe(key.id);
    expect(authenticated?.account.id).toBe(account.id);
    expect(await store.authenticateApiKey(`${secret}x`)).toBeNull();
    expect(await store.authenticateApiKey("not-a-key")).toBeNull();

    const revoked = await store.revokeApiKey(key.id);
    expect(revoked.revokedAt).toBeInstanceOf(Date);
    expect(await store.authenticateApiKey(secret)).toBeNull();
    expect(await store.listApiKeys(account.id)).toEqual([revoked]);

    await expectMarketError(store.createApiKey("acct_missing", "x"), "not_found");
    await expectMarketError(store.revokeApiKey("key_missing"), "not_found");
  });

  it("updates routing defaults, keeping large prices exact", async () => {
    const account = await store.createAccount({ name: "defaults" });
    const huge = 2n ** 62n;
    const updated = await store.updateAccountDefaults(account.id, {
      maxPricePerMillionInput: huge,
      minTokensPerSecond: 12.5,
    });
    expect(updated.defaults).toEqual({ maxPricePerMillionInput: huge, minTokensPerSecond: 12.5 });
    expect((await store.getAccount(account.id))?.defaults).toEqual(updated.defaults);
    expect((await store.updateAccountDefaults(account.id, {})).defaults).toEqual({});
  });

  it("maps a worker token to the same worker id and records its connection", async () => {
    const provider = await store.createAccount({ name: "provider" });
    const { workerId, secret } = await store.createWorkerToken(provider.id, "rig");
    expect(workerId).toMatch(/^wkr_/);
    expect(secret).toMatch(/^wt-llm-/);

    const first = await store.authenticateWorkerToken(secret);
    expect(first).toMatchObject({ id: workerId, accountId: provider.id, lastSeenAt: null });
    expect(await store.authenticateWorkerToken(`${secret}x`)).toBeNull();

    const offer: OfferRecord = {
      model: "llama-3.2-1b",
      // Above 2^53: survives the JSON column only because prices are stored as strings.
      pricePerMillionInput: 9_007_199_254_740_993n,
      pricePerMillionOutput: 250_000n,
      advertisedTokensPerSecond: 42.5,
      maxConcurrency: 2,
      contextLength: 8192,
      quantization: "Q4_K_M",
      engine: "llama.cpp",
      capabilities: { ...NO_CAPABILITIES },
    };
    const connected = await store.recordWorkerConnected(workerId, {
      name: "rig-1",
      agentVersion: "0.1.0",
      offers: [offer],
    });
    expect(connected).toMatchObject({ id: workerId, name: "rig-1", agentVersion: "0.1.0", offers: [offer] });
    expect(connected.lastSeenAt).toBeInstanceOf(Date);

    const again = await store.authenticateWorkerToken(secret);
    expect(again?.id).toBe(workerId);
    expect(again?.offers).toEqual([offer]);
    expect((await store.listWorkers()).map((worker) => worker.id)).toContain(workerId);
    await expectMarketError(store.recordWorkerConnected("wkr_missing", connected), "not_found");
  });

  describe("idempotency keys (Stripe's semantics)", () => {
    it("replays the first result for the same request and moves money once", async () => {
      const { accountId } = await newConsumer(0n);
      const key = `dep-${accountId}`;
      const externalBefore = await store.getBalance(EXTERNAL_ACCOUNT_ID);

      expect(await store.deposit(accountId, 5n * CREDIT, key)).toEqual(balance(5n * CREDIT));
      expect((await store.deposit(accountId, CREDIT)).available).toBe(6n * CREDIT);
      // The retry gets the balance as it was after the first call, and moves nothing.
      expect(await store.deposit(accountId, 5n * CREDIT, key)).toEqual(balance(5n * CREDIT));
      expect(await store.getBalance(accountId)).toEqual(balance(6n * CREDIT));

      expect((await store.withdraw(accountId, 2n * CREDIT, `wd-${accountId}`)).available).toBe(4n * CREDIT);
      expect((await store.withdraw(accountId, 2n * CREDIT, `wd-${accountId}`)).available).toBe(4n * CREDIT);
      expect(await store.getBalance(accountId)).toEqual(balance(4n * CREDIT));
      const externalAfter = await store.getBalance(EXTERNAL_ACCOUNT_ID);
      expect(externalAfter.available - externalBefore.available).toBe(-4n * CREDIT);
    });

    it("refuses the same key for another amount, operation or account, naming the key, and moves nothing", async () => {
      const { accountId } = await newConsumer(0n);
      const other = await newConsumer(0n);
      const key = `conflict-${accountId}`;
      await store.deposit(accountId, 5n * CREDIT, key);
      const externalBefore = await store.getBalance(EXTERNAL_ACCOUNT_ID);

      const amount = await expectMarketError(store.deposit(accountId, 6n * CREDIT, key), "conflict");
      expect(amount.message).toContain(`Idempotency key "${key}"`);
      expect(amount.message).toContain(`a deposit of 5 credits into account ${accountId}`);
      expect(amount.message).toContain(`a deposit of 6 credits into account ${accountId}`);
      expect(amount.message).toContain("(amount differs)");

      const operation = await expectMarketError(store.withdraw(accountId, 5n * CREDIT, key), "conflict");
      expect(operation.message).toContain("(operation differs)");

      const account = await expectMarketError(store.deposit(other.accountId, 5n * CREDIT, key), "conflict");
      expect(account.message).toContain("(accountId differs)");

      expect(await store.getBalance(accountId)).toEqual(balance(5n * CREDIT));
      expect(await store.getBalance(other.accountId)).toEqual(balance(0n));
      expect(await store.getBalance(EXTERNAL_ACCOUNT_ID)).toEqual(externalBefore);
    });

    it("moves money once when identical requests race, and refuses the different ones", async () => {
      const { accountId } = await newConsumer(0n);
      const same = await Promise.all(
        Array.from({ length: 5 }, () => store.deposit(accountId, CREDIT, `race-${accountId}`)),
      );
      expect(same).toEqual(Array(5).fill(balance(CREDIT)));
      expect(await store.getBalance(accountId)).toEqual(balance(CREDIT));

      // Five different amounts under one key: exactly one is applied, the others are refused.
      const mixed = await Promise.allSettled(
        [1n, 2n, 3n, 4n, 5n].map((credits) =>
          store.deposit(accountId, credits * CREDIT, `mixed-${accountId}`),
        ),
      );
      const applied = mixed.filter((result) => result.status === "fulfilled");
      expect(applied).toHaveLength(1);
      for (const result of mixed) {
        if (result.status === "rejected") expect(result.reason).toMatchObject({ code: "conflict" });
      }
      const won = (applied[0] as PromiseFulfilledResult<Balance>).value.available - CREDIT;
      expect(await store.getBalance(accountId)).toEqual(balance(CREDIT + won));

      // Retries of a withdrawal of the whole balance: the later ones are replays, not refusals.
      const withdrawals = await Promise.all(
        Array.from({ length: 3 }, () => store.withdraw(accountId, CREDIT + won, `all-${accountId}`)),
      );
      expect(withdrawals).toEqual(Array(3).fill(balance(0n)));
      expect(await store.getBalance(accountId)).toEqual(balance(0n));
    });

    it("leaves the key free when the request is refused", async () => {
      const { accountId } = await newConsumer(CREDIT);
      const key = `refused-${accountId}`;
      await expectMarketError(store.withdraw(accountId, 2n * CREDIT, key), "insufficient_credits");
      await store.deposit(accountId, CREDIT);
      expect(await store.withdraw(accountId, 2n * CREDIT, key)).toEqual(balance(0n));
      expect(await store.withdraw(accountId, 2n * CREDIT, key)).toEqual(balance(0n));
      expect(await store.getBalance(accountId)).toEqual(balance(0n));
    });

    it("validates amounts and accounts", async () => {
      const { accountId } = await newConsumer(0n);
      await expectMarketError(store.deposit(accountId, 0n), "invalid_request");
      await expectMarketError(store.withdraw(accountId, -1n), "invalid_request");
      await expectMarketError(store.deposit("acct_missing", CREDIT), "not_found");
      await expectMarketError(store.deposit("acct_missing", CREDIT, "missing-account"), "not_found");
      await expectMarketError(store.getBalance("acct_missing"), "not_found");
    });
  });

  it("refuses to withdraw more than is available, pending earnings included", async () => {
    const { accountId } = await newConsumer(CREDIT);
    const error = await expectMarketError(store.withdraw(accountId, 10n * CREDIT), "insufficient_credits");
    expect(error.message).toContain("10 credits needed");
    expect(error.message).toContain("1 available");
    expect(await store.getBalance(accountId)).toEqual(balance(CREDIT));

    const consumer = await newConsumer(CREDIT);
    const provider = await newProvider();
    const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
    await store.settleOrder(order.id, settlement(120, 345));
    expect(await store.getBalance(provider.accountId)).toEqual(balance(0n, 0n, COST_120_345 - FEE_120_345));
    await expectMarketError(store.withdraw(provider.accountId, 1n), "insufficient_credits");
  });

  describe("openAccount", () => {
    it("creates the account, its key and its deposit together, and replays them for the same key", async () => {
      const key = `open-${Date.now()}`;
      const opened = await store.openAccount({
        name: "  Grace ",
        keyLabel: "ci",
        initialDeposit: 3n * CREDIT,
        idempotencyKey: key,
      });
      expect(opened).toMatchObject({
        account: { name: "Grace" },
        replayed: false,
        balance: balance(3n * CREDIT),
      });
      expect(opened.apiKey).toMatchObject({ accountId: opened.account.id, label: "ci", revokedAt: null });
      const secret = opened.apiKeySecret as string;
      expect((await store.authenticateApiKey(secret))?.keyId).toBe(opened.apiKey.id);
      expect(await store.getBalance(opened.account.id)).toEqual(balance(3n * CREDIT));

      await store.deposit(opened.account.id, CREDIT);
      const replay = await store.openAccount({
        name: "Grace",
        keyLabel: "ci",
        initialDeposit: 3n * CREDIT,
        idempotencyKey: key,
      });
      expect(replay).toEqual({ ...opened, apiKeySecret: null, replayed: true });
      expect(await store.getBalance(opened.account.id)).toEqual(balance(4n * CREDIT));

      const accountsBefore = (await store.listAccounts()).length;
      const conflict = await expectMarketError(
        store.openAccount({
          name: "Grace",
          keyLabel: "ci",
          initialDeposit: 4n * CREDIT,
          idempotencyKey: key,
        }),
        "conflict",
      );
      expect(conflict.message).toContain("(initialDeposit differs)");
      await expectMarketError(store.deposit(opened.account.id, 3n * CREDIT, key), "conflict");
      expect((await store.listAccounts()).length).toBe(accountsBefore);
      expect(await store.getBalance(opened.account.id)).toEqual(balance(4n * CREDIT));
    });

    it("creates one account when identical requests race", async () => {
      const key = `open-race-${Date.now()}`;
      const name = `racer ${key}`;
      const results = await Promise.all(
        Array.from({ length: 4 }, () =>
          store.openAccount({ name, keyLabel: "k", initialDeposit: CREDIT, idempotencyKey: key }),
        ),
      );
      expect(new Set(results.map((result) => result.account.id)).size).toBe(1);
      expect(results.filter((result) => !result.replayed)).toHaveLength(1);
      expect((await store.listAccounts()).filter((account) => account.name === name)).toHaveLength(1);
      expect(await store.getBalance(results[0]?.account.id as string)).toEqual(balance(CREDIT));
    });

    it("leaves nothing behind when any part fails", async () => {
      const name = `doomed ${Date.now()}`;
      const externalBefore = await store.getBalance(EXTERNAL_ACCOUNT_ID);
      // The deposit is the last step: make it fail in the database.
      await sql(`create function fail_deposits() returns trigger language plpgsql as $$
        begin raise exception 'deposits are failing'; end $$`);
      await sql(`create trigger fail_deposits before insert on ledger_entries
        for each row execute function fail_deposits()`);
      try {
        await expect(
          store.openAccount({ name, keyLabel: "k", initialDeposit: CREDIT, idempotencyKey: name }),
        ).rejects.toThrow(/deposits are failing/);
      } finally {
        await sql("drop trigger fail_deposits on ledger_entries");
        await sql("drop function fail_deposits()");
      }
      expect((await store.listAccounts()).filter((account) => account.name === name)).toEqual([]);
      expect(await store.getBalance(EXTERNAL_ACCOUNT_ID)).toEqual(externalBefore);
      // The key was not consumed either.
      const opened = await store.openAccount({
        name,
        keyLabel: "k",
        initialDeposit: CREDIT,
        idempotencyKey: name,
      });
      expect(opened.replayed).toBe(false);
      expect(opened.balance).toEqual(balance(CREDIT));
    });

    it("opens without a deposit or a key, and validates its input", async () => {
      const opened = await store.openAccount({ name: "no money", keyLabel: "k", initialDeposit: 0n });
      expect(opened.balance).toEqual(balance(0n));
      expect(opened.apiKeySecret).toMatch(/^sk-llm-/);
      await expectMarketError(
        store.openAccount({ name: " ", keyLabel: "k", initialDeposit: 0n }),
        "invalid_request",
      );
      await expectMarketError(
        store.openAccount({ name: "x", keyLabel: "k", initialDeposit: -1n }),
        "invalid_request",
      );
    });
  });

  it("opens an order by moving its hold from available to held", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const input = orderInput(consumer, provider, 2n * CREDIT);

    const order = await store.openOrder(input);
    expect(order).toMatchObject({
      ...input,
      status: "running",
      promptTokens: 0,
      completionTokens: 0,
      trustSignals: [],
      cost: 0n,
      fee: 0n,
      finishedAt: null,
    });
    expect(await store.getOrder(order.id)).toEqual(order);
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3n * CREDIT, 2n * CREDIT));
    expect((await store.listRunningOrders()).map((running) => running.id)).toContain(order.id);
    expect((await store.listOrders({ accountId: consumer.accountId, limit: 10 })).map((o) => o.id)).toEqual([
      order.id,
    ]);

    const tooBig = orderInput(consumer, provider, 4n * CREDIT);
    await expectMarketError(store.openOrder(tooBig), "insufficient_credits");
    expect(await store.getOrder(tooBig.id)).toBeNull();
    await expectMarketError(store.openOrder(input), "conflict");
    await expectMarketError(
      store.openOrder({ ...orderInput(consumer, provider, CREDIT), workerId: "wkr_missing" }),
      "not_found",
    );
    await expectMarketError(store.openOrder(orderInput(consumer, provider, -1n)), "internal");
    await expectMarketError(
      store.openOrder({ ...orderInput(consumer, provider, CREDIT), feeBasisPoints: 10_001 }),
      "internal",
    );
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3n * CREDIT, 2n * CREDIT));
  });

  it("settles at the cost it computes from the order's prices: provider pending, platform fee, change back", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const order = await store.openOrder(orderInput(consumer, provider, 2n * CREDIT));
    const platformBefore = await store.getBalance(PLATFORM_ACCOUNT_ID);
    const input = { ...settlement(120, 345), trustSignals: ["usage_mismatch"] };

    const settled = await store.settleOrder(order.id, input);
    expect(settled).toMatchObject({
      status: "completed",
      cost: COST_120_345,
      fee: FEE_120_345,
      promptTokens: 120,
      completionTokens: 345,
      reportedPromptTokens: 120,
      reportedCompletionTokens: 345,
      trustSignals: ["usage_mismatch"],
      finishReason: "stop",
      firstTokenAt: input.firstTokenAt,
      finishedAt: input.finishedAt,
    });
    expect(await store.getOrder(order.id)).toEqual(settled);
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(5n * CREDIT - COST_120_345));
    expect(await store.getBalance(provider.accountId)).toEqual(balance(0n, 0n, COST_120_345 - FEE_120_345));
    const platformAfter = await store.getBalance(PLATFORM_ACCOUNT_ID);
    expect(platformAfter.available - platformBefore.available).toBe(FEE_120_345);
    expect((await store.listRunningOrders()).map((running) => running.id)).not.toContain(order.id);
    // The provider sees the order it served too.
    expect((await store.listOrders({ accountId: provider.accountId, limit: 10 })).map((o) => o.id)).toEqual([
      order.id,
    ]);
  });

  it("clamps every count: any uint32 usage is stored, billing stops at the order's bounds and its hold", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();

    // Counts far above the bounds bill the bounds: 500 prompt + 1,024 completion tokens.
    const capped = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const huge = await store.settleOrder(capped.id, {
      ...settlement(MAX_UINT32, MAX_UINT32),
      reportedPromptTokens: MAX_UINT32,
      reportedCompletionTokens: MAX_UINT32,
      error: "worker said \u0000 something",
    });
    expect(huge).toMatchObject({
      promptTokens: 500,
      completionTokens: 1024,
      reportedPromptTokens: MAX_UINT32,
      reportedCompletionTokens: MAX_UINT32,
      // ceil((500 · 2,500,000 + 1,024 · 7,000,001) / 1e6) = ceil(8,418.001024)
      cost: 8_419n,
      fee: 631n,
      error: "worker said \uFFFD something",
    });

    // The hold caps the cost when the bounds would cost more.
    const small = await store.openOrder(orderInput(consumer, provider, 1_000n));
    expect(await store.settleOrder(small.id, settlement(Number.POSITIVE_INFINITY, 1e12))).toMatchObject({
      promptTokens: 500,
      completionTokens: 1024,
      cost: 1_000n,
      fee: 75n,
    });

    // Negative, NaN and fractional counts.
    const odd = await store.openOrder(orderInput(consumer, provider, CREDIT));
    expect(
      await store.settleOrder(odd.id, {
        ...settlement(-5, Number.NaN),
        reportedPromptTokens: Number.NaN,
        reportedCompletionTokens: -3,
      }),
    ).toMatchObject({
      promptTokens: 0,
      completionTokens: 0,
      reportedPromptTokens: null,
      reportedCompletionTokens: 0,
      cost: 0n,
      fee: 0n,
    });
    const fraction = await store.openOrder(orderInput(consumer, provider, CREDIT));
    expect(await store.settleOrder(fraction.id, settlement(1.9, 2.5))).toMatchObject({
      promptTokens: 1,
      completionTokens: 2,
      cost: 17n, // ceil((2,500,000 + 14,000,002) / 1e6)
      fee: 1n,
    });

    expect(await store.getBalance(consumer.accountId)).toEqual(balance(5n * CREDIT - 8_419n - 1_000n - 17n));
    expect(await store.getBalance(provider.accountId)).toEqual(
      balance(0n, 0n, 8_419n - 631n + 1_000n - 75n + 17n - 1n),
    );
  });

  it("opens, reassigns and settles free orders at 0", async () => {
    const consumer = await newConsumer(0n);
    const provider = await newProvider();
    const free = {
      ...orderInput(consumer, provider, 0n),
      pricePerMillionInput: 0n,
      pricePerMillionOutput: 0n,
    };
    const order = await store.openOrder(free);
    expect(order).toMatchObject({ status: "running", hold: 0n });
    const other = await newProvider();
    await store.reassignOrder(order.id, {
      workerId: other.workerId,
      providerAccountId: other.accountId,
      pricePerMillionInput: 0n,
      pricePerMillionOutput: 0n,
      hold: 0n,
    });
    expect(await store.settleOrder(order.id, settlement(100, 200))).toMatchObject({
      status: "completed",
      promptTokens: 100,
      completionTokens: 200,
      cost: 0n,
      fee: 0n,
    });
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(0n));
    expect(await store.getBalance(other.accountId)).toEqual(balance(0n));
  });

  it("settles only once: a second settlement returns the first unchanged", async () => {
    const consumer = await newConsumer(3n * CREDIT);
    const provider = await newProvider();
    const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const first = await store.settleOrder(order.id, settlement(120, 345));

    const second = await store.settleOrder(order.id, { ...settlement(500, 1000), status: "failed" });
    expect(second).toEqual(first);
    const share = COST_120_345 - FEE_120_345;
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3n * CREDIT - COST_120_345));
    expect(await store.getBalance(provider.accountId)).toEqual(balance(0n, 0n, share));

    // Concurrent settlements of one order: all see the same result, money moves once.
    const racing = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const settlements = await Promise.all(
      Array.from({ length: 3 }, () => store.settleOrder(racing.id, settlement(120, 345))),
    );
    for (const settled of settlements) expect(settled).toEqual(settlements[0]);
    expect(await store.getBalance(provider.accountId)).toEqual(balance(0n, 0n, 2n * share));
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3n * CREDIT - 2n * COST_120_345));

    await expectMarketError(store.settleOrder("ord_missing", settlement(0, 0)), "not_found");
    const another = await store.openOrder(orderInput(consumer, provider, CREDIT));
    await expectMarketError(
      store.settleOrder(another.id, { ...settlement(1, 1), status: "running" as "completed" }),
      "internal",
    );
    expect((await store.getOrder(another.id))?.status).toBe("running");
    // A failure bills nothing when the core says nothing was delivered.
    expect(
      await store.settleOrder(another.id, { ...settlement(0, 0), status: "failed", error: "worker crashed" }),
    ).toMatchObject({ status: "failed", cost: 0n, error: "worker crashed" });
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3n * CREDIT - 2n * COST_120_345));
  });

  it("reassigns a running order, replacing its hold and its prices", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const first = await newProvider();
    const second = await newProvider();
    const order = await store.openOrder(orderInput(consumer, first, CREDIT));

    const toSecond: ReassignOrderInput = {
      workerId: second.workerId,
      providerAccountId: second.accountId,
      pricePerMillionInput: 1_000_000n,
      pricePerMillionOutput: 3_000_000n,
      hold: 1_500_000n,
    };
    const moved = await store.reassignOrder(order.id, toSecond);
    expect(moved).toMatchObject({
      status: "running",
      workerId: second.workerId,
      providerAccountId: second.accountId,
      pricePerMillionInput: 1_000_000n,
      hold: 1_500_000n,
    });
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(3_500_000n, 1_500_000n));

    await expectMarketError(
      store.reassignOrder(order.id, { ...toSecond, hold: 10n * CREDIT }),
      "insufficient_credits",
    );
    expect((await store.getOrder(order.id))?.hold).toBe(1_500_000n);

    // Billed at the second worker's prices: 100 · 1 + 200 · 3 = 700 µc, fee floor(52.5).
    expect(await store.settleOrder(order.id, settlement(100, 200))).toMatchObject({ cost: 700n, fee: 52n });
    expect(await store.getBalance(second.accountId)).toEqual(balance(0n, 0n, 648n));
    expect(await store.getBalance(first.accountId)).toEqual(balance(0n));
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(5n * CREDIT - 700n));
    await expectMarketError(
      store.reassignOrder(order.id, {
        ...toSecond,
        workerId: first.workerId,
        providerAccountId: first.accountId,
      }),
      "conflict",
    );
  });

  it("never overspends when many orders race for the same balance", async () => {
    const consumer = await newConsumer(10n * CREDIT);
    const provider = await newProvider();
    const hold = 1_500_000n; // 10 credits cover exactly 6 of these.

    const results = await Promise.allSettled(
      Array.from({ length: 20 }, () => store.openOrder(orderInput(consumer, provider, hold))),
    );

    const opened = results.filter((result) => result.status === "fulfilled");
    const refused = results.filter((result) => result.status === "rejected");
    expect(opened).toHaveLength(6);
    for (const result of refused) {
      expect(isMarketError(result.reason) && result.reason.code).toBe("insufficient_credits");
    }
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(1_000_000n, 9_000_000n));
  });

  describe("checkpoints", () => {
    it("only raise counts, stay within the bounds, set the first token once and leave final orders alone", async () => {
      const consumer = await newConsumer(5n * CREDIT);
      const provider = await newProvider();
      const running = await store.openOrder(orderInput(consumer, provider, CREDIT));
      const final = await store.openOrder(orderInput(consumer, provider, CREDIT));
      const settled = await store.settleOrder(final.id, settlement(10, 20));
      const firstToken = new Date("2030-01-01T00:00:00.123Z");

      await store.checkpointOrders([
        { orderId: running.id, promptTokens: 100, completionTokens: 40, firstTokenAt: firstToken },
        { orderId: final.id, promptTokens: 400, completionTokens: 400, firstTokenAt: firstToken },
        { orderId: "ord_unknown", promptTokens: 1, completionTokens: 1, firstTokenAt: null },
      ]);
      expect(await store.getOrder(running.id)).toMatchObject({
        promptTokens: 100,
        completionTokens: 40,
        firstTokenAt: firstToken,
      });
      expect(await store.getOrder(final.id)).toEqual(settled);

      // Lower counts (a late, stale checkpoint) and a later first token change nothing.
      await store.checkpointOrders([
        { orderId: running.id, promptTokens: 50, completionTokens: 10, firstTokenAt: new Date() },
      ]);
      expect(await store.getOrder(running.id)).toMatchObject({
        promptTokens: 100,
        completionTokens: 40,
        firstTokenAt: firstToken,
      });

      // Counts above the bounds or beyond any integer are clamped to the order's bounds.
      await store.checkpointOrders([
        { orderId: running.id, promptTokens: MAX_UINT32, completionTokens: 1e15, firstTokenAt: null },
      ]);
      expect(await store.getOrder(running.id)).toMatchObject({ promptTokens: 500, completionTokens: 1024 });
      expect((await store.listRunningOrders()).find((order) => order.id === running.id)).toMatchObject({
        promptTokens: 500,
        completionTokens: 1024,
      });
      // Checkpoints move no money: only the settled order (10 + 20 tokens, 166 µc) was charged.
      expect(settled.cost).toBe(166n);
      expect(await store.getBalance(consumer.accountId)).toEqual(balance(4n * CREDIT - 166n, CREDIT));
    });

    it("write many orders in one statement and nothing for none", async () => {
      const consumer = await newConsumer(50n * CREDIT);
      const provider = await newProvider();
      const orders: OrderRecord[] = [];
      for (let i = 0; i < 40; i++) orders.push(await store.openOrder(orderInput(consumer, provider, CREDIT)));
      const connection = testStore.orm.em.getConnection();
      const execute = vi.spyOn(connection, "execute");
      try {
        await store.checkpointOrders([]);
        expect(execute).not.toHaveBeenCalled();
        await store.checkpointOrders(
          orders.map((order, i) => ({
            orderId: order.id,
            promptTokens: i,
            completionTokens: 2 * i,
            firstTokenAt: null,
          })),
        );
        expect(execute).toHaveBeenCalledTimes(1);
      } finally {
        execute.mockRestore();
      }
      const running = new Map((await store.listRunningOrders()).map((order) => [order.id, order]));
      orders.forEach((order, i) => {
        expect(running.get(order.id)).toMatchObject({ promptTokens: i, completionTokens: 2 * i });
      });
    });
  });

  it("releases matured earnings from pending to available, once", async () => {
    // A store with a one-hour window on the same database, with finishing times of its own.
    const hourly = new SqlMarketStore(testStore.orm, { settleAfterMs: 60 * 60 * 1000 });
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const finishedAt = new Date("2300-01-01T00:00:00Z");
    const first = await hourly.openOrder(orderInput(consumer, provider, CREDIT));
    const second = await hourly.openOrder(orderInput(consumer, provider, CREDIT));
    await hourly.settleOrder(first.id, { ...settlement(120, 345), finishedAt });
    await hourly.settleOrder(second.id, {
      ...settlement(120, 345),
      finishedAt: new Date(finishedAt.getTime() + 1000),
    });
    const share = COST_120_345 - FEE_120_345;
    expect(await store.getBalance(provider.accountId)).toEqual(balance(0n, 0n, 2n * share));

    // Everything else in this database matures before 2300.
    await store.releaseMaturedEarnings(new Date("2299-12-31T00:00:00Z"));
    expect(await store.releaseMaturedEarnings(new Date("2300-01-01T00:59:59.999Z"))).toBe(0);
    expect(await store.releaseMaturedEarnings(new Date("2300-01-01T01:00:00Z"))).toBe(1);
    expect(await store.getBalance(provider.accountId)).toEqual(balance(share, 0n, share));
    expect(await store.releaseMaturedEarnings(new Date("2300-01-01T01:00:00Z"))).toBe(0);
    expect(await store.releaseMaturedEarnings(new Date("2300-01-02T00:00:00Z"))).toBe(1);
    expect(await store.releaseMaturedEarnings(new Date("2300-01-02T00:00:00Z"))).toBe(0);
    expect(await store.getBalance(provider.accountId)).toEqual(balance(2n * share));

    // Released earnings can be withdrawn.
    expect(await store.withdraw(provider.accountId, 2n * share)).toEqual(balance(0n));
    const statement = await store.getStatement(provider.accountId, { limit: 10 });
    expect(statement.entries.map((entry) => [entry.kind, entry.book, entry.amount, entry.orderId])).toEqual([
      ["settle", "pending", share, first.id],
      ["settle", "pending", share, second.id],
      ["release", "pending", -share, first.id],
      ["release", "available", share, first.id],
      ["release", "pending", -share, second.id],
      ["release", "available", share, second.id],
      ["withdrawal", "available", -2n * share, null],
    ]);
  });

  it("gives a statement: entries oldest first with each book's running balance, orders newest first", async () => {
    const consumer = await newConsumer(0n);
    const provider = await newProvider();
    await store.deposit(consumer.accountId, 3n * CREDIT);
    await store.deposit(consumer.accountId, 2n * CREDIT);
    const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
    await store.settleOrder(order.id, settlement(120, 345));
    const later = await store.openOrder(orderInput(consumer, provider, CREDIT));
    await store.withdraw(consumer.accountId, CREDIT);

    const full = await store.getStatement(consumer.accountId, { limit: 100 });
    expect(full.account.id).toBe(consumer.accountId);
    expect(full.balance).toEqual(await store.getBalance(consumer.accountId));
    expect(full.orders.map((o) => o.id)).toEqual([later.id, order.id]);
    const line = (kind: string, book: string, amount: bigint, balanceAfter: bigint) => [
      kind,
      book,
      amount,
      balanceAfter,
    ];
    const lines = full.entries.map((entry) => line(entry.kind, entry.book, entry.amount, entry.balanceAfter));
    expect(lines).toEqual([
      line("deposit", "available", 3n * CREDIT, 3n * CREDIT),
      line("deposit", "available", 2n * CREDIT, 5n * CREDIT),
      line("hold", "available", -CREDIT, 4n * CREDIT),
      line("hold", "held", CREDIT, CREDIT),
      line("settle", "held", -CREDIT, 0n),
      line("settle", "available", CREDIT - COST_120_345, 5n * CREDIT - COST_120_345),
      line("hold", "available", -CREDIT, 4n * CREDIT - COST_120_345),
      line("hold", "held", CREDIT, CREDIT),
      line("withdrawal", "available", -CREDIT, 3n * CREDIT - COST_120_345),
    ]);
    for (const entry of full.entries) expect(entry.createdAt).toBeInstanceOf(Date);
    expect(full.entries[2]?.orderId).toBe(order.id);

    // The last three lines keep the balances computed over the whole history.
    const tail = await store.getStatement(consumer.accountId, { limit: 3 });
    expect(tail.entries).toEqual(full.entries.slice(-3));
    expect((await store.getStatement(consumer.accountId, { limit: 1 })).orders.map((o) => o.id)).toEqual([
      later.id,
    ]);
    await expectMarketError(store.getStatement("acct_missing", { limit: 10 }), "not_found");
  });

  it("opens and settles an order in one statement each, outside the ORM's unit of work", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const input = orderInput(consumer, provider, CREDIT);
    const connection = testStore.orm.em.getConnection();
    // Every statement the driver is sent, whichever path sends it (MikroORM's or the raw one).
    const query = vi.spyOn(pg.Client.prototype, "query");
    const statements = () =>
      query.mock.calls.map(([sent]: unknown[]) =>
        typeof sent === "string" ? sent : (sent as { text: string }).text,
      );
    const begin = vi.spyOn(connection, "begin");
    try {
      const order = await store.openOrder(input);
      expect(statements()).toEqual([expect.stringMatching(/^select market_ledger_batch\(/)]);
      const settled = await store.settleOrder(order.id, settlement(120, 345));
      expect(statements()).toHaveLength(2);
      // A settlement of a final order and a refused open are one statement too.
      expect(await store.settleOrder(order.id, settlement(1, 1))).toEqual(settled);
      await expectMarketError(
        store.openOrder(orderInput(consumer, provider, 10n * CREDIT)),
        "insufficient_credits",
      );
      expect(statements()).toHaveLength(4);
      for (const text of statements()) expect(text).toMatch(/^select market_ledger_batch\(/);
      // Each statement is its own transaction: no BEGIN … COMMIT around it.
      expect(begin).not.toHaveBeenCalled();
      expect(settled).toMatchObject({ cost: COST_120_345, fee: FEE_120_345 });
    } finally {
      query.mockRestore();
      begin.mockRestore();
    }
    expect(await store.getBalance(consumer.accountId)).toEqual(balance(5n * CREDIT - COST_120_345));
  });

  describe("auditLedger", () => {
    it("finds a consistent ledger after all of the above", async () => {
      const audit = await store.auditLedger();
      expect(audit.problems).toEqual([]);
      expect(audit.ok).toBe(true);
      expect(audit.entriesSum).toBe(0n);
      expect(audit.entryCount).toBeGreaterThan(40);
    });

    /** Corrupts, expects exactly `problems`, repairs, and checks the audit is clean again. */
    async function expectProblems(corrupt: string, repair: string, params: unknown[], problems: string[]) {
      await sql(corrupt, params);
      try {
        const audit = await store.auditLedger();
        expect(audit.problems).toEqual(problems);
        expect(audit.ok).toBe(false);
      } finally {
        await sql(repair, params);
      }
      expect((await store.auditLedger()).problems).toEqual([]);
    }

    it("reports a cached balance that no longer matches its entries", async () => {
      const { accountId } = await newConsumer(CREDIT);
      await expectProblems(
        "update accounts set pending = pending + 7 where id = ?",
        "update accounts set pending = pending - 7 where id = ?",
        [accountId],
        [
          `Account ${accountId} caches a pending balance of 7 but its entries sum to 0.`,
          `Account ${accountId} has 7 micro-credits pending but its unreleased earnings sum to 0.`,
        ],
      );
    });

    it("reports a held book that differs from its running orders' holds", async () => {
      const consumer = await newConsumer(5n * CREDIT);
      const provider = await newProvider();
      const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
      await expectProblems(
        "update orders set hold = hold + 5 where id = ?",
        "update orders set hold = hold - 5 where id = ?",
        [order.id],
        [`Account ${consumer.accountId} has 1000000 micro-credits held but its running orders hold 1000005.`],
      );
      await store.settleOrder(order.id, settlement(0, 0));
    });

    it("reports final orders not settled exactly once and running orders already settled", async () => {
      const consumer = await newConsumer(5n * CREDIT);
      const provider = await newProvider();
      const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
      await store.settleOrder(order.id, settlement(120, 345));
      await expectProblems(
        "update ledger_transactions set kind = 'reassign' where order_id = ? and kind = 'settle'",
        "update ledger_transactions set kind = 'settle' where order_id = ? and kind = 'reassign'",
        [order.id],
        [`Order ${order.id} is completed but was settled 0 times instead of exactly once.`],
      );
      await expectProblems(
        "update ledger_transactions set kind = 'settle' where order_id = ? and kind = 'hold'",
        "update ledger_transactions set kind = 'hold' where order_id = ? and idempotency_key is null",
        [order.id],
        [`Order ${order.id} is completed but was settled 2 times instead of exactly once.`],
      );

      // A free order holds nothing, so marking it running again shows only its settlement.
      const free = await store.openOrder({ ...orderInput(consumer, provider, 0n), pricePerMillionInput: 0n });
      await store.settleOrder(free.id, settlement(0, 0));
      await expectProblems(
        "update orders set status = 'running' where id = ?",
        "update orders set status = 'completed' where id = ?",
        [free.id],
        [`Order ${free.id} is running but was settled 1 time(s).`],
      );
    });

    it("reports matured earnings left pending more than five minutes, and a pending book that disagrees", async () => {
      const hourly = new SqlMarketStore(testStore.orm, { settleAfterMs: 60 * 60 * 1000 });
      // Everything else in this database matures long before 2400.
      await store.releaseMaturedEarnings(new Date("2399-12-31T00:00:00Z"));
      const consumer = await newConsumer(5n * CREDIT);
      const provider = await newProvider();
      const order = await hourly.openOrder(orderInput(consumer, provider, CREDIT));
      const finishedAt = new Date("2400-01-01T00:00:00Z");
      await hourly.settleOrder(order.id, { ...settlement(120, 345), finishedAt });
      const share = COST_120_345 - FEE_120_345;

      // The release runs about every minute: under five minutes late is tolerated, not more.
      expect((await store.auditLedger(new Date("2400-01-01T01:04:59.999Z"))).problems).toEqual([]);
      const late = await store.auditLedger(new Date("2400-01-01T01:05:00Z"));
      expect(late.problems).toEqual([
        `The earning of ${share} micro-credits for account ${provider.accountId} from order ${order.id} ` +
          "matured at 2400-01-01T01:00:00.000Z and is still pending.",
      ]);
      expect(late.ok).toBe(false);

      await expectProblems(
        "update pending_earnings set amount = amount + 1 where order_id = ?",
        "update pending_earnings set amount = amount - 1 where order_id = ?",
        [order.id],
        [
          `Account ${provider.accountId} has ${share} micro-credits pending but its unreleased earnings sum to ${share + 1n}.`,
        ],
      );
      expect(await store.releaseMaturedEarnings(new Date("2400-01-01T01:00:00Z"))).toBe(1);
      expect((await store.auditLedger(new Date("2400-01-02T00:00:00Z"))).problems).toEqual([]);
    });
  });
});

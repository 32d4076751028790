/**
 * SqlMarketStore against a real database: embedded PGlite by default, or a fresh database on the
 * PostgreSQL server in DATABASE_URL. Tests share one database and run in order; each works on its
 * own accounts, so only the platform and external accounts are shared (compared as deltas).
 */
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isMarketError, type MarketErrorCode } from "../../server/market/errors.js";
import {
  EXTERNAL_ACCOUNT_ID,
  type OfferRecord,
  type OpenOrderInput,
  PLATFORM_ACCOUNT_ID,
  type ReassignOrderInput,
  type SettleOrderInput,
} from "../../server/market/store-port.js";
import type { SqlMarketStore } from "../../server/store/market-store.js";
import { openTestStore, type TestStore } from "../support/database.js";

const CREDIT = 1_000_000n;

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
    pricePerMillionInput: 100_000n,
    pricePerMillionOutput: 200_000n,
    hold,
    maxTokens: 1024,
  };
}

function settlement(cost: bigint, fee: bigint): SettleOrderInput {
  return {
    status: "completed",
    promptTokens: 12,
    completionTokens: 34,
    reportedPromptTokens: 12,
    reportedCompletionTokens: 34,
    cost,
    fee,
    finishReason: "stop",
    error: null,
    firstTokenAt: new Date("2025-01-01T00:00:01Z"),
    finishedAt: new Date("2025-01-01T00:00:02Z"),
  };
}

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
    expect(await store.getBalance(account.id)).toEqual({ available: 0n, held: 0n });

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

  it("deposits and withdraws once per idempotency key", async () => {
    const { accountId } = await newConsumer(0n);
    const externalBefore = await store.getBalance(EXTERNAL_ACCOUNT_ID);

    expect(await store.deposit(accountId, 5n * CREDIT, "dep-1")).toEqual({
      available: 5n * CREDIT,
      held: 0n,
    });
    expect(await store.deposit(accountId, 5n * CREDIT, "dep-1")).toEqual({
      available: 5n * CREDIT,
      held: 0n,
    });
    expect((await store.deposit(accountId, CREDIT)).available).toBe(6n * CREDIT);
    expect((await store.deposit(accountId, CREDIT)).available).toBe(7n * CREDIT);

    expect((await store.withdraw(accountId, 2n * CREDIT, "wd-1")).available).toBe(5n * CREDIT);
    expect((await store.withdraw(accountId, 2n * CREDIT, "wd-1")).available).toBe(5n * CREDIT);
    await expectMarketError(store.withdraw(accountId, CREDIT, "dep-1"), "conflict");

    // Keys belong to their account: another account may use "dep-1" for its own deposit.
    const other = await newConsumer(0n);
    expect((await store.deposit(other.accountId, CREDIT, "dep-1")).available).toBe(CREDIT);

    expect(await store.getBalance(accountId)).toEqual({ available: 5n * CREDIT, held: 0n });
    const externalAfter = await store.getBalance(EXTERNAL_ACCOUNT_ID);
    expect(externalAfter.available - externalBefore.available).toBe(-6n * CREDIT);

    // Concurrent retries of one request still move the money once.
    const retries = await Promise.all(
      Array.from({ length: 5 }, () => store.deposit(accountId, CREDIT, "race")),
    );
    expect(retries.map((balance) => balance.available)).toEqual(Array(5).fill(6n * CREDIT));
    await store.withdraw(accountId, CREDIT);

    await expectMarketError(store.deposit(accountId, 0n), "invalid_request");
    await expectMarketError(store.withdraw(accountId, -1n), "invalid_request");
    await expectMarketError(store.deposit("acct_missing", CREDIT), "not_found");
    await expectMarketError(store.getBalance("acct_missing"), "not_found");
  });

  it("refuses to withdraw more than is available", async () => {
    const { accountId } = await newConsumer(CREDIT);
    const error = await expectMarketError(store.withdraw(accountId, 10n * CREDIT), "insufficient_credits");
    expect(error.message).toContain("10 credits needed");
    expect(error.message).toContain("1 available");
    expect(await store.getBalance(accountId)).toEqual({ available: CREDIT, held: 0n });
  });

  it("opens an order by moving its hold from available to held", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const input = orderInput(consumer, provider, 2n * CREDIT);

    const order = await store.openOrder(input);
    expect(order).toMatchObject({ ...input, status: "running", cost: 0n, fee: 0n, finishedAt: null });
    expect(await store.getOrder(order.id)).toEqual(order);
    expect(await store.getBalance(consumer.accountId)).toEqual({ available: 3n * CREDIT, held: 2n * CREDIT });
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
    expect(await store.getBalance(consumer.accountId)).toEqual({ available: 3n * CREDIT, held: 2n * CREDIT });
  });

  it("settles: cost − fee to the provider, fee to the platform, the rest back to the consumer", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const provider = await newProvider();
    const order = await store.openOrder(orderInput(consumer, provider, 2n * CREDIT));
    const platformBefore = await store.getBalance(PLATFORM_ACCOUNT_ID);

    const settled = await store.settleOrder(order.id, settlement(600_000n, 60_000n));
    expect(settled).toMatchObject({
      status: "completed",
      cost: 600_000n,
      fee: 60_000n,
      promptTokens: 12,
      completionTokens: 34,
      finishReason: "stop",
      finishedAt: new Date("2025-01-01T00:00:02Z"),
    });
    expect(await store.getBalance(consumer.accountId)).toEqual({
      available: 5n * CREDIT - 600_000n,
      held: 0n,
    });
    expect(await store.getBalance(provider.accountId)).toEqual({ available: 540_000n, held: 0n });
    const platformAfter = await store.getBalance(PLATFORM_ACCOUNT_ID);
    expect(platformAfter.available - platformBefore.available).toBe(60_000n);
    expect((await store.listRunningOrders()).map((running) => running.id)).not.toContain(order.id);
    // The provider sees the order it served too.
    expect((await store.listOrders({ accountId: provider.accountId, limit: 10 })).map((o) => o.id)).toEqual([
      order.id,
    ]);
  });

  it("settles only once: a second settlement returns the first unchanged", async () => {
    const consumer = await newConsumer(3n * CREDIT);
    const provider = await newProvider();
    const order = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const first = await store.settleOrder(order.id, settlement(500_000n, 50_000n));

    const second = await store.settleOrder(order.id, { ...settlement(900_000n, 0n), status: "failed" });
    expect(second).toEqual(first);
    expect(await store.getBalance(consumer.accountId)).toEqual({
      available: 3n * CREDIT - 500_000n,
      held: 0n,
    });
    expect(await store.getBalance(provider.accountId)).toEqual({ available: 450_000n, held: 0n });

    // Concurrent settlements of one order: all see the same result, money moves once.
    const racing = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const settlements = await Promise.all(
      Array.from({ length: 3 }, () => store.settleOrder(racing.id, settlement(200_000n, 0n))),
    );
    for (const settled of settlements) expect(settled).toEqual(settlements[0]);
    expect(await store.getBalance(provider.accountId)).toEqual({ available: 650_000n, held: 0n });
    expect(await store.getBalance(consumer.accountId)).toEqual({
      available: 3n * CREDIT - 700_000n,
      held: 0n,
    });

    await expectMarketError(store.settleOrder("ord_missing", settlement(0n, 0n)), "not_found");
    const another = await store.openOrder(orderInput(consumer, provider, CREDIT));
    await expectMarketError(store.settleOrder(another.id, settlement(2n * CREDIT, 0n)), "internal");
    await expectMarketError(store.settleOrder(another.id, settlement(100n, 200n)), "internal");
    expect((await store.getOrder(another.id))?.status).toBe("running");
  });

  it("reassigns a running order, replacing its hold", async () => {
    const consumer = await newConsumer(5n * CREDIT);
    const first = await newProvider();
    const second = await newProvider();
    const order = await store.openOrder(orderInput(consumer, first, CREDIT));

    const toSecond: ReassignOrderInput = {
      workerId: second.workerId,
      providerAccountId: second.accountId,
      pricePerMillionInput: 150_000n,
      pricePerMillionOutput: 300_000n,
      hold: 1_500_000n,
    };
    const moved = await store.reassignOrder(order.id, toSecond);
    expect(moved).toMatchObject({
      status: "running",
      workerId: second.workerId,
      providerAccountId: second.accountId,
      pricePerMillionInput: 150_000n,
      hold: 1_500_000n,
    });
    expect(await store.getBalance(consumer.accountId)).toEqual({ available: 3_500_000n, held: 1_500_000n });

    await expectMarketError(
      store.reassignOrder(order.id, { ...toSecond, hold: 10n * CREDIT }),
      "insufficient_credits",
    );
    expect((await store.getOrder(order.id))?.hold).toBe(1_500_000n);

    await store.settleOrder(order.id, settlement(1_000_000n, 100_000n));
    expect(await store.getBalance(second.accountId)).toEqual({ available: 900_000n, held: 0n });
    expect(await store.getBalance(first.accountId)).toEqual({ available: 0n, held: 0n });
    expect(await store.getBalance(consumer.accountId)).toEqual({ available: 4n * CREDIT, held: 0n });
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
    expect(await store.getBalance(consumer.accountId)).toEqual({ available: 1_000_000n, held: 9_000_000n });
  });

  it("audits a consistent ledger after all of the above", async () => {
    const audit = await store.auditLedger();
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
    expect(audit.entriesSum).toBe(0n);
    expect(audit.entryCount).toBeGreaterThan(40);
  });

  it("reports a cached balance that no longer matches its entries", async () => {
    const { accountId } = await newConsumer(CREDIT);
    const em = testStore.orm.em.fork();
    await em.execute("update accounts set held = held + 7 where id = ?", [accountId]);
    try {
      const audit = await store.auditLedger();
      expect(audit.ok).toBe(false);
      expect(audit.entriesSum).toBe(0n);
      expect(audit.problems).toEqual([
        `Account ${accountId} caches a held balance of 7 but its entries sum to 0.`,
      ]);
    } finally {
      await em.execute("update accounts set held = held - 7 where id = ?", [accountId]);
    }
    expect((await store.auditLedger()).ok).toBe(true);
  });
});

/**
 * Group commit of opens and settlements on the real store (PGlite, or PostgreSQL with
 * DATABASE_URL). Each test holds a batch in flight on a controlled promise (the store's
 * `beforeBatch` hook) to force the interleaving, then checks what the database committed: rows
 * written by one transaction share their `xmin`, so "committed together" is read from the
 * database itself, not from the committer's bookkeeping.
 */
import pg from "pg";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { isMarketError } from "../../server/market/errors.js";
import type {
  OpenOrderInput,
  OrderCount,
  OrderRecord,
  SettleOrderInput,
} from "../../server/market/store-port.js";
import { SqlMarketStore } from "../../server/store/market-store.js";
import { ModelRegistryStore } from "../../server/store/model-registry-store.js";
import { openTestStore, type TestStore } from "../support/database.js";

const CREDIT = 1_000_000n;

let testStore: TestStore;
/** Sets up accounts; the stores under test are made per test, on the same database. */
let setup: SqlMarketStore;

beforeAll(async () => {
  testStore = await openTestStore();
  setup = testStore.store;
}, 60_000);

afterAll(async () => {
  await testStore?.close();
}, 60_000);

/**
 * A store that records every batch's size; after `holdNext()`, its next batch waits at a gate
 * until `release()`.
 */
function gatedStore(settings: { maxWaitMs?: number; maxBatch?: number } = {}) {
  const sizes: number[] = [];
  let gate: Promise<void> | null = null;
  let open = () => {};
  const store = new SqlMarketStore(testStore.orm, {
    groupCommit: {
      ...settings,
      beforeBatch: (size) => {
        sizes.push(size);
        const held = gate;
        gate = null;
        return held ?? undefined;
      },
    },
  });
  const holdNext = () => {
    gate = new Promise<void>((resolve) => {
      open = resolve;
    });
  };
  return { store, sizes, holdNext, release: () => open() };
}

async function newConsumer(credits: bigint) {
  const account = await setup.createAccount({ name: "consumer" });
  const { key } = await setup.createApiKey(account.id, "default");
  if (credits > 0n) await setup.deposit(account.id, credits);
  return { accountId: account.id, apiKeyId: key.id };
}

async function newProvider() {
  const account = await setup.createAccount({ name: "provider" });
  const { workerId } = await setup.createWorkerToken(account.id, "gpu");
  return { accountId: account.id, workerId };
}

let counter = 0;
function orderInput(
  consumer: { accountId: string; apiKeyId: string },
  provider: { accountId: string; workerId: string },
  hold: bigint,
): OpenOrderInput {
  counter += 1;
  return {
    id: `ord_group_${Date.now().toString(36)}_${counter}`,
    consumerAccountId: consumer.accountId,
    apiKeyId: consumer.apiKeyId,
    model: "group-model",
    workerId: provider.workerId,
    providerAccountId: provider.accountId,
    pricePerMillionInput: 1_000_000n,
    pricePerMillionOutput: 2_000_000n,
    hold,
    maxTokens: 1_000,
    promptTokenBound: 1_000,
    feeBasisPoints: 1_000,
  };
}

/** 100 prompt + 200 completion tokens at 1 and 2 credits/M: 500 µc, fee 50 µc. */
function settlement(error: string | null = null): SettleOrderInput {
  return {
    status: "completed",
    promptTokens: 100,
    completionTokens: 200,
    reportedPromptTokens: 100,
    reportedCompletionTokens: 200,
    trustSignals: ['said "hi" \\ twice'],
    finishReason: "stop",
    error,
    firstTokenAt: null,
    finishedAt: new Date(),
  };
}

/** The transaction ids (xmin) that wrote each order's ledger transactions, by order id. */
async function writers(orderIds: string[]): Promise<Map<string, string[]>> {
  const rows = await testStore.orm.em
    .fork()
    .execute<{ order_id: string; writer: string }[]>(
      "select order_id, xmin::text as writer from ledger_transactions where order_id in (?) order by created_at, id",
      [orderIds],
    );
  const byOrder = new Map<string, string[]>();
  for (const row of rows) byOrder.set(row.order_id, [...(byOrder.get(row.order_id) ?? []), row.writer]);
  return byOrder;
}

function codeOf(result: PromiseSettledResult<unknown>): string | undefined {
  if (result.status === "fulfilled") return undefined;
  return isMarketError(result.reason) ? result.reason.code : String(result.reason);
}

describe("group commit", () => {
  it("commits what collects behind a batch in flight as one transaction, and a refused item fails alone", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 60_000 });
    const provider = await newProvider();
    const rich = await newConsumer(10n * CREDIT);
    const poor = await newConsumer(CREDIT);
    const running = await store.openOrder(orderInput(rich, provider, CREDIT));
    expect(sizes).toEqual([1]);
    holdNext();
    const first = store.openOrder(orderInput(rich, provider, CREDIT));
    await vi.waitFor(() => expect(sizes).toEqual([1, 1]), { timeout: 10_000 });

    const sameOrder = [
      store.settleOrder(running.id, settlement()),
      store.settleOrder(running.id, settlement()),
    ];
    const opens = [orderInput(rich, provider, CREDIT), orderInput(poor, provider, CREDIT / 2n)];
    const opened = opens.map((input) => store.openOrder(input));
    const tooBig = store.openOrder(orderInput(poor, provider, 2n * CREDIT));
    const missing = store.settleOrder("ord_group_missing", settlement());
    const duplicate = store.openOrder(opens[0] as OpenOrderInput);

    release();
    const firstOrder = await first;
    const results = await Promise.allSettled([...sameOrder, ...opened, tooBig, missing, duplicate]);

    // The held batch of one, then the seven that collected behind it, together.
    expect(sizes).toEqual([1, 1, 7]);
    expect(results.map(codeOf)).toEqual([
      undefined,
      undefined,
      undefined,
      undefined,
      "insufficient_credits",
      "not_found",
      "conflict",
    ]);
    const [settledOnce, settledAgain] = results as PromiseFulfilledResult<OrderRecord>[];
    expect(settledOnce?.value).toMatchObject({ status: "completed", cost: 500n, fee: 50n });
    expect(settledAgain?.value).toEqual(settledOnce?.value);
    expect(settledOnce?.value.trustSignals).toEqual(['said "hi" \\ twice']);
    expect(await store.getOrder(running.id)).toEqual(settledOnce?.value);

    const ids = [firstOrder.id, running.id, ...opens.map((input) => input.id)];
    const written = await writers(ids);
    const batchWriter = written.get(opens[0]?.id as string)?.[0];
    // The settlement and both opens of the collected batch share one transaction…
    expect(written.get(running.id)?.[1]).toBe(batchWriter);
    expect(written.get(opens[1]?.id as string)).toEqual([batchWriter]);
    expect(written.get(running.id)).toHaveLength(2); // hold + one settlement, not two
    // …which is not the held batch's.
    expect(written.get(firstOrder.id)).toHaveLength(1);
    expect(written.get(firstOrder.id)?.[0]).not.toBe(batchWriter);

    // The money of the refused items did not move; the rest is exact.
    expect(await store.getBalance(poor.accountId)).toEqual({
      available: CREDIT / 2n,
      held: CREDIT / 2n,
      pending: 0n,
    });
    expect(await store.getBalance(rich.accountId)).toEqual({
      available: 8n * CREDIT - 500n,
      held: 2n * CREDIT,
      pending: 0n,
    });
    expect(await store.getBalance(provider.accountId)).toEqual({ available: 0n, held: 0n, pending: 450n });
    expect((await store.auditLedger()).problems).toEqual([]);
    await store.close();
  });

  it("caps a batch's size: the items beyond it wait for the next batch", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 60_000, maxBatch: 3 });
    const provider = await newProvider();
    const consumer = await newConsumer(10n * CREDIT);
    holdNext();
    const held = store.openOrder(orderInput(consumer, provider, CREDIT));
    await vi.waitFor(() => expect(sizes).toEqual([1]), { timeout: 10_000 });

    // Three collect into a full batch, which starts at once beside the held one; the fourth waits.
    const inputs = Array.from({ length: 4 }, () => orderInput(consumer, provider, CREDIT));
    const opened = inputs.map((input) => store.openOrder(input));
    await Promise.all(opened.slice(0, 3));
    expect(sizes).toEqual([1, 3]);

    release();
    await Promise.all([held, ...opened]);
    expect(sizes).toEqual([1, 3, 1]);
    const written = await writers(inputs.map((input) => input.id));
    const [a, b, c, d] = inputs.map((input) => written.get(input.id)?.[0]);
    expect(new Set([a, b, c]).size).toBe(1);
    expect(d).not.toBe(a);
    await store.close();
  });

  it("bounds the wait: an item waits at most maxWaitMs for a batch in flight before another starts", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 5 });
    const provider = await newProvider();
    const consumer = await newConsumer(10n * CREDIT);
    holdNext();
    const held = store.openOrder(orderInput(consumer, provider, CREDIT));
    await vi.waitFor(() => expect(sizes).toEqual([1]), { timeout: 10_000 });

    // The first batch stays at the gate; the second item still commits.
    const next = await store.openOrder(orderInput(consumer, provider, CREDIT));
    expect(next.status).toBe("running");
    expect(sizes).toEqual([1, 1]);

    release();
    expect((await held).status).toBe("running");
    await store.close();
  });

  it("falls back to one transaction per item when a batch fails, so only the bad item fails", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 60_000 });
    const provider = await newProvider();
    const consumer = await newConsumer(10n * CREDIT);
    const running = await store.openOrder(orderInput(consumer, provider, CREDIT));
    const sql = (query: string) => testStore.orm.em.fork().execute(query);
    // A database error (not a business refusal) for one model only: it aborts its whole batch.
    await sql(`create function fail_exploding_orders() returns trigger language plpgsql as $$
      begin if new.model = 'explode' then raise exception 'orders of this model explode'; end if;
      return new; end $$`);
    await sql(`create trigger fail_exploding_orders before insert on orders
      for each row execute function fail_exploding_orders()`);
    try {
      holdNext();
      const held = store.openOrder(orderInput(consumer, provider, CREDIT));
      await vi.waitFor(() => expect(sizes).toEqual([1, 1]), { timeout: 10_000 });
      const good = orderInput(consumer, provider, CREDIT);
      const bad = { ...orderInput(consumer, provider, CREDIT), model: "explode" };
      const results = Promise.allSettled([
        store.openOrder(good),
        store.openOrder(bad),
        store.settleOrder(running.id, settlement("fine")),
      ]);
      release();
      await held;
      const [goodResult, badResult, settleResult] = await results;

      expect(sizes).toEqual([1, 1, 3]);
      expect(goodResult?.status).toBe("fulfilled");
      expect(settleResult).toMatchObject({ status: "fulfilled", value: { status: "completed", cost: 500n } });
      expect(badResult?.status).toBe("rejected");
      expect(String((badResult as PromiseRejectedResult).reason)).toContain("orders of this model explode");
      expect(await store.getOrder(bad.id)).toBeNull();
      // Retried one by one: each in a transaction of its own.
      const written = await writers([good.id, running.id]);
      expect(written.get(good.id)).toHaveLength(1);
      expect(written.get(running.id)).toHaveLength(2);
      expect(written.get(good.id)?.[0]).not.toBe(written.get(running.id)?.[1]);
    } finally {
      await sql("drop trigger fail_exploding_orders on orders");
      await sql("drop function fail_exploding_orders()");
    }
    expect(await store.getBalance(consumer.accountId)).toEqual({
      available: 8n * CREDIT - 500n,
      held: 2n * CREDIT,
      pending: 0n,
    });
    expect((await store.auditLedger()).problems).toEqual([]);
    await store.close();
  });

  it("records how each settled order was counted in its settlement's round trip and transaction, the first record standing", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 60_000 });
    const provider = await newProvider();
    const consumer = await newConsumer(10n * CREDIT);
    const opened: OrderRecord[] = [];
    for (let i = 0; i < 5; i++) opened.push(await store.openOrder(orderInput(consumer, provider, CREDIT)));
    const [held, ...rest] = opened.map((order) => order.id) as [string, ...string[]];
    const count = (model: string, claimed: number): OrderCount => ({
      model,
      verified: false,
      ggufSha256: null,
      promptTokens: null,
      completionTokens: null,
      reportedPromptTokens: null,
      reportedCompletionTokens: 200,
      claimedCompletionTokens: claimed,
    });
    // Quotes, backslashes and non-ASCII text travel inlined in the statement (raw-sql.ts).
    const models = ["it's", "back\\slash\\'", "名前 ☃"];
    const verified: OrderCount = {
      model: "plain",
      verified: true,
      ggufSha256: "ab".repeat(32),
      promptTokens: 100,
      completionTokens: 200,
      reportedPromptTokens: 999,
      reportedCompletionTokens: 4,
      claimedCompletionTokens: 4,
    };
    const query = vi.spyOn(pg.Client.prototype, "query");
    try {
      holdNext();
      const first = store.settleOrder(held, { ...settlement(), count: count("held", 7) });
      await vi.waitFor(() => expect(sizes.at(-1)).toBe(1), { timeout: 10_000 });
      const collected = Promise.all([
        ...rest
          .slice(0, 3)
          .map((id, i) => store.settleOrder(id, { ...settlement(), count: count(models[i] as string, 9) })),
        store.settleOrder(rest[3] as string, { ...settlement(), count: verified }),
        // The same order again in the same batch, with another count: the first record stands.
        store.settleOrder(rest[0] as string, { ...settlement(), count: count("second", 1) }),
        // No record for an order that does not exist, nor for a settlement that brings none.
        store
          .settleOrder("ord_group_unknown", { ...settlement(), count: count("unknown", 1) })
          .catch((error: unknown) => (isMarketError(error) ? error.code : String(error))),
      ]);
      release();
      await first;
      const results = await collected;
      expect(sizes.slice(-2)).toEqual([1, 6]);
      expect(results.at(-1)).toBe("not_found");
      const sent = query.mock.calls.map(([text]: unknown[]) => String(text));
      // Two round trips for the two batches, each one statement pair; no statement of its own.
      expect(sent.filter((text) => text.includes("order_token_counts"))).toHaveLength(2);
      expect(sent.filter((text) => text.startsWith("insert into order_token_counts"))).toEqual([]);
    } finally {
      query.mockRestore();
    }
    const counts = await new ModelRegistryStore(testStore.orm).orderCounts([
      ...opened.map((order) => order.id),
      "ord_group_unknown",
    ]);
    expect(counts.get(held)).toEqual({ orderId: held, ...count("held", 7) });
    for (const [i, id] of rest.slice(0, 3).entries()) {
      expect(counts.get(id)).toEqual({ orderId: id, ...count(models[i] as string, 9) });
    }
    expect(counts.get(rest[3] as string)).toEqual({ orderId: rest[3], ...verified });
    expect(counts.has("ord_group_unknown")).toBe(false);
    // Each record was written by its settlement's transaction.
    const recordWriters = await testStore.orm.em
      .fork()
      .execute<{ order_id: string; writer: string }[]>(
        "select order_id, xmin::text as writer from order_token_counts where order_id in (?)",
        [opened.map((order) => order.id)],
      );
    const written = await writers(opened.map((order) => order.id));
    expect(recordWriters).toHaveLength(5);
    for (const row of recordWriters) expect(row.writer).toBe(written.get(row.order_id)?.[1]);
    expect((await store.auditLedger()).problems).toEqual([]);
    await store.close();
  });

  it("answers every item submitted before close, then closes", async () => {
    const { store, sizes, holdNext, release } = gatedStore({ maxWaitMs: 60_000 });
    const provider = await newProvider();
    const consumer = await newConsumer(10n * CREDIT);
    holdNext();
    const orders = [store.openOrder(orderInput(consumer, provider, CREDIT))];
    await vi.waitFor(() => expect(sizes).toEqual([1]), { timeout: 10_000 });
    orders.push(store.openOrder(orderInput(consumer, provider, CREDIT)));
    const closed = store.close();
    release();
    await closed;
    expect((await Promise.all(orders)).map((order) => order.status)).toEqual(["running", "running"]);
    expect(sizes).toEqual([1, 1]);
  });
});

/**
 * Property tests of the ledger (fast-check) against the real store: random sequences of deposits,
 * withdrawals, orders opened (holds), reassigned (fallbacks), checkpointed, settled with random
 * counts (captures, releases, failures, cancellations), settled again (retries), "crashes"
 * (every running order settled at its last checkpoint) and releases of matured earnings, some of
 * them run concurrently. A model of every balance is kept alongside; after each run every
 * invariant is checked against the store and the database.
 *
 * One database for the file; each run gets fresh accounts. Time is virtual: settlements finish on
 * a clock that advances a second per step, and releases are asked for at chosen times.
 */
import fc from "fast-check";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { isMarketError } from "../../server/market/errors.js";
import { orderCost, platformFee } from "../../server/market/money.js";
import {
  type Balance,
  EXTERNAL_ACCOUNT_ID,
  type OrderRecord,
  type OrderStatus,
  PLATFORM_ACCOUNT_ID,
  type SettleOrderInput,
} from "../../server/market/store-port.js";
import { SqlMarketStore } from "../../server/store/market-store.js";
import { openTestStore, type TestStore } from "../support/database.js";

const CREDIT = 1_000_000n;
const SETTLE_AFTER_MS = 5_000;
const STEP_MS = 1_000;
const START = Date.parse("2030-01-01T00:00:00Z");
/** Two consumers (0, 1) and two providers (2, 3). */
const ACCOUNTS = 4;
const CONSUMERS = 2;

let testStore: TestStore;
let store: SqlMarketStore;

beforeAll(async () => {
  testStore = await openTestStore();
  store = new SqlMarketStore(testStore.orm, { settleAfterMs: SETTLE_AFTER_MS });
}, 60_000);

afterAll(async () => {
  await testStore?.close();
}, 60_000);

// Operations, as generated.

type Op =
  | { kind: "deposit"; account: number; amount: bigint; key: number | null }
  | { kind: "withdraw"; account: number; amount: bigint; key: number | null }
  | {
      kind: "open";
      consumer: number;
      provider: number;
      priceInput: bigint;
      priceOutput: bigint;
      maxTokens: number;
      promptTokenBound: number;
      feeBasisPoints: number;
    }
  | { kind: "reassign"; order: number; provider: number; priceInput: bigint; priceOutput: bigint }
  | { kind: "checkpoint"; entries: { order: number; promptTokens: number; completionTokens: number }[] }
  | {
      kind: "settle";
      order: number;
      status: Exclude<OrderStatus, "running">;
      promptTokens: number;
      completionTokens: number;
      reported: number | null;
    };

type Step =
  | { kind: "one"; op: Op }
  | { kind: "together"; ops: Op[] }
  | { kind: "retries"; op: Op; copies: number }
  | { kind: "crash" }
  | { kind: "release"; advanceMs: number };

const credits = (max: number) =>
  fc.integer({ min: 1, max: max * 4 }).map((quarters) => (BigInt(quarters) * CREDIT) / 4n);
/** µc per 1M tokens; with the token limits below a hold is at most 2 credits. */
const price = fc.constantFrom(0n, 1n, 333_333n, 7_000_001n, 250_000_000n, 1_000_000_000n);
/** Counts as a worker or a buggy core might pass them: mostly plausible, sometimes absurd. */
const count = fc.oneof(
  { weight: 8, arbitrary: fc.nat(1_200) },
  { weight: 1, arbitrary: fc.constantFrom(-1, 4_294_967_295, 1e15, Number.NaN, 0.5) },
);
const key = fc.option(fc.nat(2), { nil: null, freq: 2 });

function moneyOp(withKey: boolean): fc.Arbitrary<Op> {
  const keyArb = withKey ? key : fc.constant(null);
  return fc.oneof(
    fc.record({
      kind: fc.constant("deposit" as const),
      account: fc.nat(ACCOUNTS - 1),
      amount: credits(4),
      key: keyArb,
    }),
    fc.record({
      kind: fc.constant("withdraw" as const),
      account: fc.nat(ACCOUNTS - 1),
      amount: credits(3),
      key: keyArb,
    }),
  );
}

const openOp: fc.Arbitrary<Op> = fc.record({
  kind: fc.constant("open" as const),
  consumer: fc.nat(CONSUMERS - 1),
  provider: fc.nat(1),
  priceInput: price,
  priceOutput: price,
  maxTokens: fc.integer({ min: 1, max: 1_000 }),
  promptTokenBound: fc.nat(1_000),
  feeBasisPoints: fc.oneof(fc.constantFrom(0, 10_000), fc.nat(10_000)),
});

const reassignOp: fc.Arbitrary<Op> = fc.record({
  kind: fc.constant("reassign" as const),
  order: fc.nat(),
  provider: fc.nat(1),
  priceInput: price,
  priceOutput: price,
});

const checkpointOp: fc.Arbitrary<Op> = fc.record({
  kind: fc.constant("checkpoint" as const),
  entries: fc.array(fc.record({ order: fc.nat(), promptTokens: count, completionTokens: count }), {
    minLength: 1,
    maxLength: 4,
  }),
});

const settleOp: fc.Arbitrary<Op> = fc.oneof(
  {
    weight: 3,
    arbitrary: fc.record({
      kind: fc.constant("settle" as const),
      order: fc.nat(),
      status: fc.constantFrom("completed" as const, "cancelled" as const),
      promptTokens: count,
      completionTokens: count,
      reported: fc.option(count, { nil: null }),
    }),
  },
  // A failure before anything reached the consumer bills nothing.
  {
    weight: 1,
    arbitrary: fc.record({
      kind: fc.constant("settle" as const),
      order: fc.nat(),
      status: fc.constant("failed" as const),
      promptTokens: fc.constant(0),
      completionTokens: fc.constant(0),
      reported: fc.constant(null),
    }),
  },
);

function anyOp(withKey: boolean): fc.Arbitrary<Op> {
  return fc.oneof(
    { weight: 2, arbitrary: moneyOp(withKey) },
    { weight: 3, arbitrary: openOp },
    { weight: 1, arbitrary: reassignOp },
    { weight: 1, arbitrary: checkpointOp },
    { weight: 3, arbitrary: settleOp },
  );
}

const stepArb: fc.Arbitrary<Step> = fc.oneof(
  { weight: 8, arbitrary: anyOp(true).map((op) => ({ kind: "one" as const, op })) },
  {
    weight: 3,
    arbitrary: fc
      .array(anyOp(false), { minLength: 2, maxLength: 3 })
      .map((ops) => ({ kind: "together" as const, ops })),
  },
  {
    weight: 2,
    arbitrary: fc
      .record({ op: fc.oneof(settleOp, moneyOp(true)), copies: fc.integer({ min: 2, max: 3 }) })
      .map(({ op, copies }) => ({ kind: "retries" as const, op, copies })),
  },
  { weight: 1, arbitrary: fc.constant({ kind: "crash" as const }) },
  {
    weight: 1,
    arbitrary: fc.nat(2 * SETTLE_AFTER_MS).map((advanceMs) => ({ kind: "release" as const, advanceMs })),
  },
);

const deposit = fc.oneof({ weight: 1, arbitrary: fc.constant(0n) }, { weight: 4, arbitrary: credits(10) });
const scenarioArb = fc.record({
  initialDeposits: fc.tuple(deposit, deposit),
  steps: fc.array(stepArb, { minLength: 4, maxLength: 30, size: "max" }),
});
type Scenario = typeof scenarioArb extends fc.Arbitrary<infer T> ? T : never;

// The model.

interface ModelOrder {
  id: string;
  consumer: number;
  provider: number;
  priceInput: bigint;
  priceOutput: bigint;
  hold: bigint;
  maxTokens: number;
  promptTokenBound: number;
  feeBasisPoints: number;
  status: OrderStatus;
  checkpointPrompt: number;
  checkpointCompletion: number;
  /** The first settlement's result: every later settlement must return it unchanged. */
  settled: OrderRecord | null;
}

interface Earning {
  account: number;
  amount: bigint;
  maturesAt: number;
  released: boolean;
}

type Outcome<T> = { ok: true; value: T } | { ok: false; code: string };

async function attempt<T>(promise: Promise<T>): Promise<Outcome<T>> {
  try {
    return { ok: true, value: await promise };
  } catch (error) {
    if (isMarketError(error)) return { ok: false, code: error.code };
    throw error;
  }
}

/** The store's clamp, restated: NaN and negatives are 0, fractions round down, max is the bound. */
function clamp(value: number, max: number): number {
  if (Number.isNaN(value) || value <= 0) return 0;
  return value >= max ? max : Math.floor(value);
}

let runCounter = 0;

class Run {
  readonly id = ++runCounter;
  readonly accountIds: string[] = [];
  apiKeyIds: string[] = [];
  workerIds: string[] = [];
  readonly books: Balance[] = Array.from({ length: ACCOUNTS }, () => ({
    available: 0n,
    held: 0n,
    pending: 0n,
  }));
  /** Money in from outside minus money out, per account. */
  readonly netDeposits: bigint[] = Array(ACCOUNTS).fill(0n);
  readonly orders: ModelOrder[] = [];
  readonly earnings: Earning[] = [];
  readonly keys = new Map<string, { kind: string; account: number; amount: bigint; balance: Balance }>();
  platformFees = 0n;
  clock = START;
  private nextOrder = 0;

  async setUp(initialDeposits: readonly bigint[]): Promise<void> {
    // Consumers through openAccount (one transaction each, retried once to replay).
    const opened = await Promise.all(
      initialDeposits.map((deposit, i) => {
        const input = { name: `consumer ${this.id}.${i}`, keyLabel: "k", initialDeposit: deposit };
        return store.openAccount({ ...input, idempotencyKey: `open-${this.id}-${i}` });
      }),
    );
    const replays = await Promise.all(
      initialDeposits.map((deposit, i) =>
        store.openAccount({
          name: `consumer ${this.id}.${i}`,
          keyLabel: "k",
          initialDeposit: deposit,
          idempotencyKey: `open-${this.id}-${i}`,
        }),
      ),
    );
    opened.forEach((result, i) => {
      expect(replays[i]).toEqual({ ...result, apiKeySecret: null, replayed: true });
      this.accountIds.push(result.account.id);
      this.apiKeyIds.push(result.apiKey.id);
      this.credit(i, "available", initialDeposits[i] as bigint);
      this.addNetDeposit(i, initialDeposits[i] as bigint);
    });
    for (let i = CONSUMERS; i < ACCOUNTS; i++) {
      const account = await store.createAccount({ name: `provider ${this.id}.${i}` });
      this.accountIds.push(account.id);
      this.workerIds.push((await store.createWorkerToken(account.id, "w")).workerId);
    }
  }

  addNetDeposit(account: number, amount: bigint): void {
    this.netDeposits[account] = (this.netDeposits[account] as bigint) + amount;
  }

  credit(account: number, book: keyof Balance, amount: bigint): void {
    (this.books[account] as Balance)[book] += amount;
  }

  balance(account: number): Balance {
    return { ...(this.books[account] as Balance) };
  }

  /** Mostly a running order (where something can still happen), sometimes any order (retries). */
  order(index: number): ModelOrder | undefined {
    const running = this.orders.filter((order) => order.status === "running");
    const pool = running.length > 0 && index % 4 !== 0 ? running : this.orders;
    return pool.length === 0 ? undefined : pool[Math.floor(index / 4) % pool.length];
  }

  async step(step: Step): Promise<void> {
    this.clock += STEP_MS;
    switch (step.kind) {
      case "one":
        return (await this.perform(step.op, false))();
      case "together": {
        // Concurrent operations touch distinct orders, so their effects commute once their
        // outcomes are known; only who wins a balance is left to the race.
        const seen = new Set<string>();
        const ops = step.ops.filter((op) => {
          const ids = this.orderIdsOf(op);
          if (ids.some((id) => seen.has(id))) return false;
          for (const id of ids) seen.add(id);
          return true;
        });
        const applies = await Promise.all(ops.map((op) => this.perform(op, true)));
        for (const apply of applies) apply();
        return;
      }
      case "retries":
        return this.retries(step.op, step.copies);
      case "crash":
        return this.crash();
      case "release":
        return this.release(this.clock + step.advanceMs);
    }
  }

  private orderIdsOf(op: Op): string[] {
    if (op.kind === "reassign" || op.kind === "settle") {
      const order = this.order(op.order);
      return order ? [order.id] : [];
    }
    if (op.kind === "checkpoint") {
      return op.entries.flatMap((entry) => {
        const order = this.order(entry.order);
        return order ? [order.id] : [];
      });
    }
    return [];
  }

  /**
   * Runs one operation against the store and returns the check-and-apply of its outcome against
   * the model, judged on the state before it ran. `concurrent`: others ran alongside, so an
   * outcome that depends on a balance may go either way (the effects are checked in the end).
   */
  private async perform(op: Op, concurrent: boolean): Promise<() => void> {
    switch (op.kind) {
      case "deposit":
      case "withdraw":
        return this.moveMoney(op, concurrent);
      case "open":
        return this.open(op, concurrent);
      case "reassign":
        return this.reassign(op, concurrent);
      case "checkpoint":
        return this.checkpoint(op);
      case "settle":
        return this.settle(op);
    }
  }

  private async moveMoney(op: Extract<Op, { kind: "deposit" | "withdraw" }>, concurrent: boolean) {
    const accountId = this.accountIds[op.account] as string;
    const idempotencyKey = op.key === null ? undefined : `key-${this.id}-${op.key}`;
    const available = this.books[op.account]?.available as bigint;
    const outcome = await attempt(
      op.kind === "deposit"
        ? store.deposit(accountId, op.amount, idempotencyKey)
        : store.withdraw(accountId, op.amount, idempotencyKey),
    );
    return () => {
      // Looked up when applied: of identical retries sent together, the first applied registers
      // the key and the others must be its replays.
      const prior = idempotencyKey === undefined ? undefined : this.keys.get(idempotencyKey);
      if (prior) {
        const same = prior.kind === op.kind && prior.account === op.account && prior.amount === op.amount;
        expect(outcome).toEqual(same ? { ok: true, value: prior.balance } : { ok: false, code: "conflict" });
        return;
      }
      const covered = op.kind === "deposit" || available >= op.amount;
      if (!concurrent) expect(outcome.ok, `${op.kind} outcome`).toBe(covered);
      if (!outcome.ok) {
        expect(outcome.code).toBe("insufficient_credits");
        return;
      }
      const signed = op.kind === "deposit" ? op.amount : -op.amount;
      this.credit(op.account, "available", signed);
      this.addNetDeposit(op.account, signed);
      if (!concurrent) expect(outcome.value).toEqual(this.balance(op.account));
      if (idempotencyKey !== undefined) {
        this.keys.set(idempotencyKey, {
          kind: op.kind,
          account: op.account,
          amount: op.amount,
          balance: outcome.value,
        });
      }
    };
  }

  private async open(op: Extract<Op, { kind: "open" }>, concurrent: boolean) {
    // The core's worst case: every prompt token up to the bound and every completion token.
    const hold = orderCost(op.promptTokenBound, op.maxTokens, op.priceInput, op.priceOutput);
    const provider = CONSUMERS + op.provider;
    const input = {
      id: `ord_prop_${this.id}_${this.nextOrder++}`,
      consumerAccountId: this.accountIds[op.consumer] as string,
      apiKeyId: this.apiKeyIds[op.consumer] as string,
      model: "prop",
      workerId: this.workerIds[op.provider] as string,
      providerAccountId: this.accountIds[provider] as string,
      pricePerMillionInput: op.priceInput,
      pricePerMillionOutput: op.priceOutput,
      hold,
      maxTokens: op.maxTokens,
      promptTokenBound: op.promptTokenBound,
      feeBasisPoints: op.feeBasisPoints,
    };
    const available = this.books[op.consumer]?.available as bigint;
    const outcome = await attempt(store.openOrder(input));
    return () => {
      if (!concurrent) expect(outcome.ok, "open outcome").toBe(available >= hold);
      if (!outcome.ok) {
        expect(outcome.code).toBe("insufficient_credits");
        return;
      }
      expect(outcome.value).toMatchObject({ ...input, status: "running", cost: 0n });
      this.credit(op.consumer, "available", -hold);
      this.credit(op.consumer, "held", hold);
      this.orders.push({
        id: input.id,
        consumer: op.consumer,
        provider,
        priceInput: op.priceInput,
        priceOutput: op.priceOutput,
        hold,
        maxTokens: op.maxTokens,
        promptTokenBound: op.promptTokenBound,
        feeBasisPoints: op.feeBasisPoints,
        status: "running",
        checkpointPrompt: 0,
        checkpointCompletion: 0,
        settled: null,
      });
    };
  }

  private async reassign(op: Extract<Op, { kind: "reassign" }>, concurrent: boolean) {
    const order = this.order(op.order);
    if (!order) return () => {};
    const provider = CONSUMERS + op.provider;
    const hold = orderCost(order.promptTokenBound, order.maxTokens, op.priceInput, op.priceOutput);
    const running = order.status === "running";
    const covered = (this.books[order.consumer]?.available as bigint) >= hold - order.hold;
    const outcome = await attempt(
      store.reassignOrder(order.id, {
        workerId: this.workerIds[op.provider] as string,
        providerAccountId: this.accountIds[provider] as string,
        pricePerMillionInput: op.priceInput,
        pricePerMillionOutput: op.priceOutput,
        hold,
      }),
    );
    return () => {
      if (!running) {
        expect(outcome).toEqual({ ok: false, code: "conflict" });
        return;
      }
      if (!concurrent) expect(outcome.ok, "reassign outcome").toBe(covered);
      if (!outcome.ok) {
        expect(outcome.code).toBe("insufficient_credits");
        return;
      }
      this.credit(order.consumer, "available", order.hold - hold);
      this.credit(order.consumer, "held", hold - order.hold);
      Object.assign(order, { provider, priceInput: op.priceInput, priceOutput: op.priceOutput, hold });
      expect(outcome.value).toMatchObject({ hold, providerAccountId: this.accountIds[provider] });
    };
  }

  private async checkpoint(op: Extract<Op, { kind: "checkpoint" }>) {
    const entries = op.entries.flatMap((entry) => {
      const order = this.order(entry.order);
      return order ? [{ order, entry }] : [];
    });
    await store.checkpointOrders(
      entries.map(({ order, entry }) => ({
        orderId: order.id,
        promptTokens: entry.promptTokens,
        completionTokens: entry.completionTokens,
        firstTokenAt: new Date(this.clock),
      })),
    );
    return () => {
      for (const { order, entry } of entries) {
        if (order.status !== "running") continue;
        order.checkpointPrompt = Math.max(
          order.checkpointPrompt,
          clamp(entry.promptTokens, order.promptTokenBound),
        );
        order.checkpointCompletion = Math.max(
          order.checkpointCompletion,
          clamp(entry.completionTokens, order.maxTokens),
        );
      }
    };
  }

  private settleInput(op: Extract<Op, { kind: "settle" }>): SettleOrderInput {
    return {
      status: op.status,
      promptTokens: op.promptTokens,
      completionTokens: op.completionTokens,
      reportedPromptTokens: op.reported,
      reportedCompletionTokens: op.reported,
      trustSignals: op.reported === null ? [] : ["reported"],
      finishReason: op.status === "completed" ? "stop" : null,
      error: op.status === "failed" ? "worker failed" : null,
      firstTokenAt: null,
      finishedAt: new Date(this.clock),
    };
  }

  private async settle(op: Extract<Op, { kind: "settle" }>) {
    const order = this.order(op.order);
    if (!order) return () => {};
    const input = this.settleInput(op);
    const outcome = await attempt(store.settleOrder(order.id, input));
    return () => {
      expect(outcome.ok, "a settlement never fails").toBe(true);
      if (outcome.ok) this.applySettlement(order, input, outcome.value);
    };
  }

  /** Checks a settlement's result against the model and applies it (once per order). */
  private applySettlement(order: ModelOrder, input: SettleOrderInput, result: OrderRecord): void {
    if (order.settled) {
      expect(result).toEqual(order.settled);
      return;
    }
    const promptTokens = clamp(input.promptTokens, order.promptTokenBound);
    const completionTokens = clamp(input.completionTokens, order.maxTokens);
    let cost = orderCost(promptTokens, completionTokens, order.priceInput, order.priceOutput);
    if (cost > order.hold) cost = order.hold;
    const fee = platformFee(cost, order.feeBasisPoints);
    expect(result).toMatchObject({ status: input.status, promptTokens, completionTokens, cost, fee });
    this.credit(order.consumer, "held", -order.hold);
    this.credit(order.consumer, "available", order.hold - cost);
    this.platformFees += fee;
    if (cost - fee > 0n) {
      this.credit(order.provider, "pending", cost - fee);
      this.earnings.push({
        account: order.provider,
        amount: cost - fee,
        maturesAt: input.finishedAt.getTime() + SETTLE_AFTER_MS,
        released: false,
      });
    }
    order.status = input.status;
    order.settled = result;
  }

  /** The same request sent several times at once: one effect, identical answers. */
  private async retries(op: Op, copies: number): Promise<void> {
    if (op.kind === "settle") {
      const order = this.order(op.order);
      if (!order) return;
      const input = this.settleInput(op);
      const results = await Promise.all(
        Array.from({ length: copies }, () => store.settleOrder(order.id, input)),
      );
      for (const result of results) expect(result).toEqual(results[0]);
      this.applySettlement(order, input, results[0] as OrderRecord);
      return;
    }
    if (op.kind !== "deposit" && op.kind !== "withdraw") return;
    const withKey = { ...op, key: op.key ?? 0 };
    const applies = await Promise.all(Array.from({ length: copies }, () => this.moveMoney(withKey, true)));
    for (const apply of applies) apply();
  }

  /** A restart after a crash: every running order is settled at its last checkpoint. */
  private async crash(): Promise<void> {
    const ours = new Map(this.orders.map((order) => [order.id, order]));
    const running = (await store.listRunningOrders()).filter((order) => ours.has(order.id));
    expect(running.map((order) => order.id).sort()).toEqual(
      this.orders
        .filter((order) => order.status === "running")
        .map((order) => order.id)
        .sort(),
    );
    const settlements = await Promise.all(
      running.map(async (record) => {
        const order = ours.get(record.id) as ModelOrder;
        expect([record.promptTokens, record.completionTokens]).toEqual([
          order.checkpointPrompt,
          order.checkpointCompletion,
        ]);
        const input: SettleOrderInput = {
          status: "failed",
          promptTokens: record.promptTokens,
          completionTokens: record.completionTokens,
          reportedPromptTokens: null,
          reportedCompletionTokens: null,
          trustSignals: [],
          finishReason: null,
          error: "The server restarted.",
          firstTokenAt: record.firstTokenAt,
          finishedAt: new Date(this.clock),
        };
        return { order, input, result: await store.settleOrder(record.id, input) };
      }),
    );
    for (const { order, input, result } of settlements) this.applySettlement(order, input, result);
  }

  async release(now: number): Promise<void> {
    const due = this.earnings.filter((earning) => !earning.released && earning.maturesAt <= now);
    expect(await store.releaseMaturedEarnings(new Date(now))).toBe(due.length);
    for (const earning of due) {
      earning.released = true;
      this.credit(earning.account, "pending", -earning.amount);
      this.credit(earning.account, "available", earning.amount);
    }
  }

  /** Every invariant, against the store, the database and the model. */
  async checkInvariants(): Promise<void> {
    const audit = await store.auditLedger(new Date(this.clock));
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
    expect(audit.entriesSum).toBe(0n);

    const [totals] = await testStore.orm.em.fork().execute<{ total: string; negative: number }[]>(
      `select coalesce(sum(available + held + pending), 0)::text as total,
         count(*) filter (where held < 0 or pending < 0 or (available < 0 and id <> ?))::int as negative
       from accounts`,
      [EXTERNAL_ACCOUNT_ID],
    );
    expect(totals).toEqual({ total: "0", negative: 0 });

    const balances = await Promise.all(this.accountIds.map((id) => store.getBalance(id)));
    expect(balances).toEqual(this.books);

    const orders: OrderRecord[] = [];
    for (const order of this.orders) {
      const stored = await store.getOrder(order.id);
      expect(stored).toMatchObject({ status: order.status, hold: order.hold });
      if (order.settled) expect(stored).toEqual(order.settled);
      else
        expect(stored).toMatchObject({
          promptTokens: order.checkpointPrompt,
          completionTokens: order.checkpointCompletion,
        });
      orders.push(stored as OrderRecord);
    }
    // What each consumer paid is what its orders cost; what each provider earned is their cost
    // minus the fee; the platform got the fees. Read from the store's own records.
    const final = orders.filter((order) => order.status !== "running");
    for (const [account, id] of this.accountIds.entries()) {
      const balance = balances[account] as Balance;
      const paid = final
        .filter((order) => order.consumerAccountId === id)
        .reduce((sum, order) => sum + order.cost, 0n);
      const earned = final
        .filter((order) => order.providerAccountId === id)
        .reduce((sum, order) => sum + order.cost - order.fee, 0n);
      const kept = balance.available + balance.held + balance.pending;
      expect((this.netDeposits[account] as bigint) - kept).toBe(paid - earned);
    }
    const fees = final.reduce((sum, order) => sum + order.fee, 0n);
    expect(fees).toBe(this.platformFees);
  }
}

describe("ledger properties", () => {
  it("keeps every invariant under random interleavings, crashes and retries", async () => {
    await fc.assert(
      fc.asyncProperty(scenarioArb, async (scenario: Scenario) => {
        const platformBefore = await store.getBalance(PLATFORM_ACCOUNT_ID);
        const run = new Run();
        await run.setUp(scenario.initialDeposits);
        for (const step of scenario.steps) await run.step(step);
        await run.checkInvariants();
        // Then everything matures: the pending books empty into available, and all still holds.
        await run.release(run.clock + SETTLE_AFTER_MS);
        await run.checkInvariants();
        for (const balance of run.books) expect(balance.pending).toBe(0n);
        const platformAfter = await store.getBalance(PLATFORM_ACCOUNT_ID);
        expect(platformAfter.available - platformBefore.available).toBe(run.platformFees);
      }),
      { numRuns: 30 },
    );
  }, 180_000);
});

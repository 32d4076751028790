/**
 * AdminService handlers and the error mapping, over the real store on a fresh database (PGlite, or
 * PostgreSQL with DATABASE_URL) and without the network: the service runs behind an in-memory
 * router transport (same serialization and error path as on the wire). Also the admin token.
 */
import { mkdtemp, readFile, rm, stat, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import {
  Code,
  ConnectError,
  createClient,
  createRouterTransport,
  type Interceptor,
  type UnaryRequest,
} from "@connectrpc/connect";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { AdminService, Book, OrderStatus, type StatementEntry } from "../../gen/locallmarket/v1/admin_pb.js";
import { ADMIN_TOKEN_FILE, adminAuthInterceptor, loadAdminToken } from "../../server/admin/admin-auth.js";
import { createAdminService } from "../../server/admin/admin-service.js";
import { toConnectError } from "../../server/admin/connect-error.js";
import { MarketError, type MarketErrorCode } from "../../server/market/errors.js";
import { type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";
import type { OrderRecord, SettleOrderInput } from "../../server/market/store-port.js";
import { openTestStore, type TestStore } from "../support/database.js";

let db: TestStore;
let registry: WorkerRegistry;
let client: ReturnType<typeof createClient<typeof AdminService>>;

beforeAll(async () => {
  db = await openTestStore();
  registry = new WorkerRegistry();
  const transport = createRouterTransport((router) => {
    router.service(AdminService, createAdminService({ store: db.store, registry }));
  });
  client = createClient(AdminService, transport);
});

afterAll(async () => {
  await db?.close();
});

afterEach(() => {
  vi.restoreAllMocks();
});

/** The ConnectError a call rejects with. */
async function failure(call: Promise<unknown>): Promise<ConnectError> {
  const error = await call.then(
    () => undefined,
    (reason: unknown) => reason,
  );
  expect(error).toBeInstanceOf(ConnectError);
  return error as ConnectError;
}

async function accountCount(): Promise<number> {
  return (await db.store.listAccounts()).length;
}

/** A consumer (with its first API key) and a provider with a worker identity. */
async function parties(deposit: bigint) {
  const consumer = await db.store.openAccount({
    name: "consumer",
    keyLabel: "default",
    initialDeposit: deposit,
  });
  const provider = await db.store.openAccount({ name: "provider", keyLabel: "default", initialDeposit: 0n });
  const { workerId } = await db.store.createWorkerToken(provider.account.id, "gpu");
  return {
    consumerId: consumer.account.id,
    apiKeyId: consumer.apiKey.id,
    providerId: provider.account.id,
    workerId,
  };
}

let orderSequence = 0;

/** Opens a running order at 1 credit / 2 credits per 1M tokens, prompt bound 50, fee 500 bps. */
async function openOrder(who: Awaited<ReturnType<typeof parties>>, hold = 1_000n): Promise<OrderRecord> {
  orderSequence += 1;
  return db.store.openOrder({
    // Zero-padded so that ids sort like creation: listings break createdAt ties by id.
    id: `ord_admin_${String(orderSequence).padStart(4, "0")}`,
    consumerAccountId: who.consumerId,
    apiKeyId: who.apiKeyId,
    model: "m",
    workerId: who.workerId,
    providerAccountId: who.providerId,
    pricePerMillionInput: 1_000_000n,
    pricePerMillionOutput: 2_000_000n,
    hold,
    maxTokens: 100,
    promptTokenBound: 50,
    feeBasisPoints: 500,
  });
}

/** 10 prompt + 20 completion tokens: cost 10 + 40 = 50 µc, fee floor(50 · 5%) = 2 µc. */
function settlement(overrides: Partial<SettleOrderInput> = {}): SettleOrderInput {
  return {
    status: "completed",
    promptTokens: 10,
    completionTokens: 20,
    reportedPromptTokens: 10,
    reportedCompletionTokens: 25,
    trustSignals: ["reported_completion_tokens_above_relayed"],
    finishReason: "stop",
    error: null,
    firstTokenAt: null,
    finishedAt: new Date(),
    ...overrides,
  };
}

/** Checks that each book's running balance adds up from zero and ends at `balance`. */
function expectRunningBalances(
  entries: StatementEntry[],
  balance: { available: bigint; held: bigint; pending: bigint } | undefined,
) {
  const running = new Map<Book, bigint>();
  let previous = 0n;
  for (const entry of entries) {
    const after = (running.get(entry.book) ?? 0n) + entry.amount;
    expect(entry.balanceAfter).toBe(after);
    running.set(entry.book, after);
    expect(entry.createdAtUnixMs).toBeGreaterThanOrEqual(previous);
    previous = entry.createdAtUnixMs;
  }
  expect(running.get(Book.AVAILABLE) ?? 0n).toBe(balance?.available);
  expect(running.get(Book.HELD) ?? 0n).toBe(balance?.held);
  expect(running.get(Book.PENDING) ?? 0n).toBe(balance?.pending);
}

describe("toConnectError", () => {
  // A Record, so that a new MarketErrorCode fails to compile here until its mapping is tested.
  const expected: Record<MarketErrorCode, Code> = {
    invalid_request: Code.InvalidArgument,
    context_length_exceeded: Code.InvalidArgument,
    unauthenticated: Code.Unauthenticated,
    permission_denied: Code.PermissionDenied,
    insufficient_credits: Code.FailedPrecondition,
    not_found: Code.NotFound,
    model_not_found: Code.NotFound,
    payload_too_large: Code.ResourceExhausted,
    rate_limited: Code.ResourceExhausted,
    no_capacity: Code.Unavailable,
    worker_failed: Code.Unavailable,
    conflict: Code.AlreadyExists,
    cancelled: Code.Canceled,
    shutting_down: Code.Unavailable,
    internal: Code.Internal,
  };

  it.each(
    (Object.entries(expected) as [MarketErrorCode, Code][]).map(([market, code]) => ({
      market,
      code,
      name: Code[code],
    })),
  )("maps $market to $name and keeps the message", ({ market, code }) => {
    const error = toConnectError(new MarketError(market, "what went wrong"));

    expect(error.code).toBe(code);
    expect(error.rawMessage).toBe("what went wrong");
  });

  it("passes a ConnectError through unchanged", () => {
    const original = new ConnectError("already decided", Code.Aborted);

    expect(toConnectError(original)).toBe(original);
  });

  it("hides an unexpected error behind a generic Internal and logs the original", () => {
    const log = vi.spyOn(console, "error").mockImplementation(() => {});
    const original = new TypeError("cannot read properties of undefined (reading 'password')");
    const error = toConnectError(original);

    expect(error.code).toBe(Code.Internal);
    expect(error.rawMessage).toBe("internal error");
    expect(log).toHaveBeenCalledWith(expect.any(String), original);
  });
});

describe("CreateAccount", () => {
  it("rejects a blank name and creates nothing", async () => {
    const before = await accountCount();
    const error = await failure(client.createAccount({ name: " \t" }));

    expect(error.code).toBe(Code.InvalidArgument);
    expect(error.rawMessage).toBe("name is required");
    expect(await accountCount()).toBe(before);
  });

  it("rejects a negative initial deposit and creates nothing", async () => {
    const before = await accountCount();
    const error = await failure(client.createAccount({ name: "A", initialDeposit: -1n }));

    expect(error.code).toBe(Code.InvalidArgument);
    expect(error.rawMessage).toContain("initial_deposit");
    expect(await accountCount()).toBe(before);
  });

  it("without a deposit creates the account and a working 'default' key, and deposits nothing", async () => {
    const res = await client.createAccount({ name: "  Alice  " });
    const id = res.account?.id ?? "";

    expect(res.account?.name).toBe("Alice");
    expect(res.account?.createdAtUnixMs).toBeGreaterThan(0n);
    expect(res.replayed).toBe(false);
    expect(res.balance).toMatchObject({ available: 0n, held: 0n, pending: 0n });
    expect((await db.store.listApiKeys(id)).map((key) => key.label)).toEqual(["default"]);
    expect((await db.store.authenticateApiKey(res.apiKey))?.account.id).toBe(id);
  });

  it("with an idempotency key, a retry returns the first account without its secret and deposits once", async () => {
    const request = { name: "Bea", initialDeposit: 7_000_000n, idempotencyKey: "create-bea" };
    const first = await client.createAccount(request);
    const before = await accountCount();
    const retry = await client.createAccount(request);
    const id = first.account?.id ?? "";

    expect(first.replayed).toBe(false);
    expect(first.apiKey).toMatch(/^sk-/);
    expect(first.balance).toMatchObject({ available: 7_000_000n, held: 0n, pending: 0n });
    expect(retry.replayed).toBe(true);
    expect(retry.apiKey).toBe("");
    expect(retry.account?.id).toBe(id);
    expect(retry.balance).toMatchObject({ available: 7_000_000n, held: 0n, pending: 0n });
    expect(await accountCount()).toBe(before);
    expect(await db.store.getBalance(id)).toEqual({ available: 7_000_000n, held: 0n, pending: 0n });
    expect(await db.store.listApiKeys(id)).toHaveLength(1);
  });

  it("the same idempotency key with another deposit or name is AlreadyExists and creates nothing", async () => {
    const first = await client.createAccount({
      name: "Cy",
      initialDeposit: 1_000n,
      idempotencyKey: "create-cy",
    });
    const before = await accountCount();
    const otherDeposit = await failure(
      client.createAccount({ name: "Cy", initialDeposit: 2_000n, idempotencyKey: "create-cy" }),
    );
    const otherName = await failure(
      client.createAccount({ name: "Cyd", initialDeposit: 1_000n, idempotencyKey: "create-cy" }),
    );

    expect(otherDeposit.code).toBe(Code.AlreadyExists);
    expect(otherDeposit.rawMessage).toMatch(/idempotency key/i);
    expect(otherName.code).toBe(Code.AlreadyExists);
    expect(await accountCount()).toBe(before);
    expect((await db.store.getBalance(first.account?.id ?? "")).available).toBe(1_000n);
  });
});

describe("Deposit and Withdraw", () => {
  it.each([0n, -5n])("reject an amount of %s", async (amount) => {
    const deposit = await failure(client.deposit({ accountId: "acct_x", amount }));
    const withdraw = await failure(client.withdraw({ accountId: "acct_x", amount }));

    expect(deposit.code).toBe(Code.InvalidArgument);
    expect(deposit.rawMessage).toBe(`amount must be a positive number of micro-credits, got ${amount}`);
    expect(withdraw.code).toBe(Code.InvalidArgument);
  });

  it("an unknown account is NotFound", async () => {
    const error = await failure(client.deposit({ accountId: "acct_nobody", amount: 5n }));

    expect(error.code).toBe(Code.NotFound);
  });

  it("an empty idempotency key means none: two deposits move money twice", async () => {
    const { account } = await client.createAccount({ name: "Dee" });
    const id = account?.id ?? "";
    await client.deposit({ accountId: id, amount: 7n, idempotencyKey: "  " });
    const res = await client.deposit({ accountId: id, amount: 7n, idempotencyKey: "" });

    expect(res.balance).toMatchObject({ available: 14n, held: 0n, pending: 0n });
  });

  it("the same key twice moves money once and answers the first balance", async () => {
    const { account } = await client.createAccount({ name: "Eve" });
    const accountId = account?.id ?? "";
    const first = await client.deposit({ accountId, amount: 500n, idempotencyKey: "dep-eve" });
    await client.deposit({ accountId, amount: 100n });
    const retry = await client.deposit({ accountId, amount: 500n, idempotencyKey: "dep-eve" });

    expect(first.balance?.available).toBe(500n);
    expect(retry.balance?.available).toBe(500n);
    expect((await db.store.getBalance(accountId)).available).toBe(600n);

    const withdrawn = await client.withdraw({ accountId, amount: 50n, idempotencyKey: "wd-eve" });
    const again = await client.withdraw({ accountId, amount: 50n, idempotencyKey: "wd-eve" });
    expect(withdrawn.balance?.available).toBe(550n);
    expect(again.balance?.available).toBe(550n);
    expect((await db.store.getBalance(accountId)).available).toBe(550n);
  });

  it("the same key with another amount, account or operation is AlreadyExists and moves nothing", async () => {
    const a = (await client.createAccount({ name: "Fay", initialDeposit: 1_000n })).account?.id ?? "";
    const b = (await client.createAccount({ name: "Gil", initialDeposit: 1_000n })).account?.id ?? "";
    await client.deposit({ accountId: a, amount: 300n, idempotencyKey: "dep-fay" });

    const amount = await failure(client.deposit({ accountId: a, amount: 301n, idempotencyKey: "dep-fay" }));
    const account = await failure(client.deposit({ accountId: b, amount: 300n, idempotencyKey: "dep-fay" }));
    const operation = await failure(
      client.withdraw({ accountId: a, amount: 300n, idempotencyKey: "dep-fay" }),
    );

    for (const error of [amount, account, operation]) {
      expect(error.code).toBe(Code.AlreadyExists);
      expect(error.rawMessage).toMatch(/idempotency key/i);
    }
    expect((await db.store.getBalance(a)).available).toBe(1_300n);
    expect((await db.store.getBalance(b)).available).toBe(1_000n);
  });

  it("withdrawing more than is available is FailedPrecondition and moves nothing", async () => {
    const id = (await client.createAccount({ name: "Hal", initialDeposit: 3n })).account?.id ?? "";
    const error = await failure(client.withdraw({ accountId: id, amount: 5n }));

    expect(error.code).toBe(Code.FailedPrecondition);
    expect(error.rawMessage).toMatch(/3/);
    expect((await db.store.getBalance(id)).available).toBe(3n);
  });
});

describe("validation", () => {
  it("requires ids", async () => {
    expect((await failure(client.getBalance({}))).rawMessage).toBe("account_id is required");
    expect((await failure(client.getStatement({}))).rawMessage).toBe("account_id is required");
    expect((await failure(client.revokeApiKey({}))).rawMessage).toBe("key_id is required");
    expect((await failure(client.getOrder({}))).code).toBe(Code.InvalidArgument);
  });

  it("UpdateAccountDefaults rejects a negative cap and passes unset caps as absent", async () => {
    const id = (await client.createAccount({ name: "Ike" })).account?.id ?? "";

    const error = await failure(
      client.updateAccountDefaults({ accountId: id, defaults: { maxPricePerMillionInput: -1n } }),
    );
    expect(error.code).toBe(Code.InvalidArgument);

    const res = await client.updateAccountDefaults({
      accountId: id,
      defaults: { maxPricePerMillionOutput: 3n },
    });
    expect((await db.store.getAccount(id))?.defaults).toEqual({ maxPricePerMillionOutput: 3n });
    expect(res.account?.defaults?.maxPricePerMillionInput).toBeUndefined();
    expect(res.account?.defaults?.maxPricePerMillionOutput).toBe(3n);
  });

  it("GetAccount, GetStatement and GetOrder of unknown ids are NotFound", async () => {
    const account = await failure(client.getAccount({ accountId: "acct_x" }));
    const statement = await failure(client.getStatement({ accountId: "acct_x" }));
    const missingOrder = await failure(client.getOrder({ orderId: "ord_x" }));

    expect(account.code).toBe(Code.NotFound);
    expect(account.rawMessage).toBe("account acct_x not found");
    expect(statement.code).toBe(Code.NotFound);
    expect(missingOrder.code).toBe(Code.NotFound);
  });
});

describe("balances, orders and statements", () => {
  it("a provider's earnings are pending; the consumer pays the cost; the fee reaches the platform", async () => {
    const who = await parties(10_000n);
    const order = await openOrder(who);
    const running = await client.getBalance({ accountId: who.consumerId });
    await db.store.settleOrder(order.id, settlement());

    expect(running.balance).toMatchObject({ available: 9_000n, held: 1_000n, pending: 0n });
    expect((await client.getBalance({ accountId: who.consumerId })).balance).toMatchObject({
      available: 9_950n,
      held: 0n,
      pending: 0n,
    });
    expect((await client.getBalance({ accountId: who.providerId })).balance).toMatchObject({
      available: 0n,
      held: 0n,
      pending: 48n,
    });
  });

  it("GetOrder and ListOrders carry statuses, prices, bounds, fee rate, trust signals and timings", async () => {
    const who = await parties(10_000n);
    const running = await openOrder(who);
    const failed = await openOrder(who);
    const createdAt = failed.createdAt.getTime();
    await db.store.settleOrder(
      failed.id,
      settlement({
        status: "failed",
        promptTokens: 0,
        completionTokens: 0,
        error: "worker disconnected",
        finishReason: null,
        firstTokenAt: new Date(createdAt + 250),
        finishedAt: new Date(createdAt + 1_000),
      }),
    );

    const got = (await client.getOrder({ orderId: failed.id })).order;
    expect(got).toMatchObject({
      id: failed.id,
      consumerAccountId: who.consumerId,
      providerAccountId: who.providerId,
      workerId: who.workerId,
      model: "m",
      status: OrderStatus.FAILED,
      error: "worker disconnected",
      hold: 1_000n,
      cost: 0n,
      fee: 0n,
      pricePerMillionInput: 1_000_000n,
      pricePerMillionOutput: 2_000_000n,
      promptTokenBound: 50,
      feeBasisPoints: 500,
      timeToFirstTokenMs: 250,
      durationMs: 1_000,
      createdAtUnixMs: BigInt(createdAt),
    });
    expect(got?.trustSignals).toContain("reported_completion_tokens_above_relayed");

    const listed = (await client.listOrders({ accountId: who.consumerId })).orders;
    expect(listed.map((o) => o.id)).toEqual([failed.id, running.id]);
    expect(listed[1]).toMatchObject({
      status: OrderStatus.RUNNING,
      error: "",
      durationMs: 0,
      timeToFirstTokenMs: 0,
      trustSignals: [],
    });
  });

  it("ListOrders returns 50 by default, honours a larger limit and filters by account", async () => {
    const who = await parties(1_000_000n);
    for (let i = 0; i < 51; i++) await openOrder(who, 1n);

    expect((await client.listOrders({ accountId: who.consumerId })).orders).toHaveLength(50);
    expect((await client.listOrders({ accountId: who.consumerId, limit: 5_000 })).orders).toHaveLength(51);
    expect((await client.listOrders({ limit: 5_000 })).orders.length).toBeGreaterThan(51);
  });

  it("GetStatement gives each entry's running balance, oldest first, and the account's orders", async () => {
    const who = await parties(5_000n);
    await client.deposit({ accountId: who.consumerId, amount: 1_000n, idempotencyKey: "stmt-dep" });
    await client.withdraw({ accountId: who.consumerId, amount: 500n });
    const order = await openOrder(who);
    await db.store.settleOrder(order.id, settlement());

    const consumer = await client.getStatement({ accountId: who.consumerId });
    expect(consumer.account?.id).toBe(who.consumerId);
    expect(consumer.balance).toMatchObject({ available: 5_450n, held: 0n, pending: 0n });
    expectRunningBalances(consumer.entries, consumer.balance);
    expect(
      consumer.entries.slice(0, 3).map((e) => [e.kind, e.book, e.amount, e.balanceAfter, e.orderId]),
    ).toEqual([
      ["deposit", Book.AVAILABLE, 5_000n, 5_000n, ""],
      ["deposit", Book.AVAILABLE, 1_000n, 6_000n, ""],
      ["withdrawal", Book.AVAILABLE, -500n, 5_500n, ""],
    ]);
    const orderKinds = new Set(consumer.entries.slice(3).map((e) => e.kind));
    expect(orderKinds).toEqual(new Set(["hold", "settle"]));
    expect(consumer.entries.slice(3).every((e) => e.orderId === order.id && e.transactionId !== "")).toBe(
      true,
    );
    expect(consumer.orders.map((o) => o.id)).toEqual([order.id]);
    expect(consumer.orders[0]).toMatchObject({ status: OrderStatus.COMPLETED, cost: 50n, fee: 2n });

    const provider = await client.getStatement({ accountId: who.providerId });
    expect(provider.balance).toMatchObject({ available: 0n, held: 0n, pending: 48n });
    expectRunningBalances(provider.entries, provider.balance);
    expect(provider.entries.map((e) => [e.kind, e.book, e.amount, e.orderId])).toEqual([
      ["settle", Book.PENDING, 48n, order.id],
    ]);
    expect(provider.orders.map((o) => [o.id, o.providerAccountId])).toEqual([[order.id, who.providerId]]);
  });

  it("GetStatement's limit keeps the most recent entries and orders", async () => {
    const who = await parties(100n);
    for (const amount of [1n, 2n, 3n]) await client.deposit({ accountId: who.consumerId, amount });
    const older = await openOrder(who, 0n);
    const newer = await openOrder(who, 0n);

    const all = await client.getStatement({ accountId: who.consumerId });
    const last = await client.getStatement({ accountId: who.consumerId, limit: 2 });

    expect(last.entries).toEqual(all.entries.slice(-2));
    expect(last.orders.map((o) => o.id)).toEqual([newer.id, older.id]);
    const one = await client.getStatement({ accountId: who.consumerId, limit: 1 });
    expect(one.orders.map((o) => o.id)).toEqual([newer.id]);
    expect(one.balance).toMatchObject({ available: 106n });
  });
});

describe("workers and the ledger", () => {
  it("ListWorkers lists stored workers and adds live connections the store does not list yet", async () => {
    const who = await parties(0n);
    const live: WorkerConnection = {
      workerId: "wrk_new",
      providerAccountId: who.providerId,
      name: "fresh",
      offers: [],
      draining: false,
      activeJobs: 1,
      reserve: () => null,
    };
    registry.register(live);
    try {
      const { workers } = await client.listWorkers({});

      expect(workers.find((w) => w.id === who.workerId)).toMatchObject({ online: false, activeJobs: 0 });
      expect(workers.find((w) => w.id === "wrk_new")).toMatchObject({
        accountId: who.providerId,
        online: true,
        activeJobs: 1,
      });
    } finally {
      registry.unregister(live);
    }
  });

  it("AuditLedger reports a clean ledger, then a corrupted cached balance, with the entry count as uint64", async () => {
    const id = (await client.createAccount({ name: "Audited", initialDeposit: 10n })).account?.id ?? "";
    const clean = await client.auditLedger({});
    const direct = await db.store.auditLedger();

    expect(clean).toMatchObject({ ok: true, entriesSum: 0n, problems: [] });
    expect(clean.entryCount).toBe(BigInt(direct.entryCount));
    expect(clean.entryCount).toBeGreaterThan(0n);

    const sql = db.orm.em.getConnection();
    await sql.execute("update accounts set available = available + 5 where id = ?", [id]);
    try {
      const corrupted = await client.auditLedger({});

      expect(corrupted.ok).toBe(false);
      expect(corrupted.problems.join("\n")).toContain(id);
    } finally {
      await sql.execute("update accounts set available = available - 5 where id = ?", [id]);
    }
    expect((await client.auditLedger({})).ok).toBe(true);
  });
});

describe("adminAuthInterceptor", () => {
  const TOKEN = "adm-secret";

  async function call(interceptor: Interceptor, authorization?: string): Promise<unknown> {
    const header = new Headers();
    if (authorization !== undefined) header.set("authorization", authorization);
    const next = vi.fn(async () => "passed");
    const request = { header } as unknown as UnaryRequest;
    return interceptor(next as never)(request);
  }

  it.each([
    ["no header", undefined],
    ["a wrong token", "Bearer adm-wrong"],
    ["a token prefix", "Bearer adm-secre"],
    ["another scheme", `Basic ${TOKEN}`],
    ["an empty bearer", "Bearer "],
  ])("rejects %s with Unauthenticated", async (_case, authorization) => {
    const error = await failure(call(adminAuthInterceptor(TOKEN), authorization));

    expect(error.code).toBe(Code.Unauthenticated);
    expect(error.rawMessage).toBe("missing or invalid admin token");
  });

  it("lets the right token through, whatever the scheme's case", async () => {
    expect(await call(adminAuthInterceptor(TOKEN), `Bearer ${TOKEN}`)).toBe("passed");
    expect(await call(adminAuthInterceptor(TOKEN), `bearer ${TOKEN}`)).toBe("passed");
  });

  it("refuses to guard with an empty token", () => {
    expect(() => adminAuthInterceptor("")).toThrow(/must not be empty/);
  });
});

describe("loadAdminToken", () => {
  async function tempDir(): Promise<string> {
    return mkdtemp(join(tmpdir(), "admin-token-"));
  }

  it("uses the token from the environment and writes nothing", async () => {
    const dir = await tempDir();
    try {
      expect(await loadAdminToken(dir, " adm-from-env ")).toEqual({ token: "adm-from-env", created: false });
      await expect(stat(join(dir, ADMIN_TOKEN_FILE))).rejects.toMatchObject({ code: "ENOENT" });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("generates a token on first use, stores it with mode 0600, and reads it back afterwards", async () => {
    const root = await tempDir();
    const dir = join(root, "nested", "data");
    try {
      const first = await loadAdminToken(dir);
      const path = join(dir, ADMIN_TOKEN_FILE);

      expect(first.created).toBe(true);
      expect(first.path).toBe(path);
      expect(first.token).toMatch(/^adm-[A-Za-z0-9_-]{32}$/);
      expect((await readFile(path, "utf8")).trim()).toBe(first.token);
      expect((await stat(path)).mode & 0o777).toBe(0o600);
      expect(await loadAdminToken(dir)).toEqual({ token: first.token, created: false, path });
      expect(await loadAdminToken(dir, "")).toEqual({ token: first.token, created: false, path });
    } finally {
      await rm(root, { recursive: true, force: true });
    }
  });

  it("fails on an empty token file instead of guarding with an empty token", async () => {
    const dir = await tempDir();
    try {
      await writeFile(join(dir, ADMIN_TOKEN_FILE), "\n");
      await expect(loadAdminToken(dir)).rejects.toThrow(/is empty/);
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});

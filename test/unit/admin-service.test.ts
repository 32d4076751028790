/**
 * AdminService handlers, the error mapping and the admin token, without the network: the service
 * runs behind an in-memory router transport (same serialization and error path as on the wire).
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
import { afterEach, describe, expect, it, vi } from "vitest";
import { AdminService, OrderStatus } from "../../gen/locallmarket/v1/admin_pb.js";
import { ADMIN_TOKEN_FILE, adminAuthInterceptor, loadAdminToken } from "../../server/admin/admin-auth.js";
import { createAdminService } from "../../server/admin/admin-service.js";
import { toConnectError } from "../../server/admin/connect-error.js";
import { MarketError, type MarketErrorCode } from "../../server/market/errors.js";
import { type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";
import type {
  MarketStore,
  OrderRecord,
  OrderStatus as OrderStatusName,
} from "../../server/market/store-port.js";

afterEach(() => {
  vi.restoreAllMocks();
});

/** A MarketStore whose every method not given here fails the test when called. */
function stubStore(methods: Partial<MarketStore>): MarketStore {
  return new Proxy(methods, {
    get(target, name: string) {
      const method = target[name as keyof MarketStore];
      if (method) return method;
      return () => {
        throw new Error(`store.${name} was not expected to be called`);
      };
    },
  }) as MarketStore;
}

function adminClient(store: MarketStore, registry = new WorkerRegistry()) {
  const transport = createRouterTransport((router) => {
    router.service(AdminService, createAdminService({ store, registry }));
  });
  return createClient(AdminService, transport);
}

/** The ConnectError a call rejects with. */
async function failure(call: Promise<unknown>): Promise<ConnectError> {
  const error = await call.then(
    () => undefined,
    (reason: unknown) => reason,
  );
  expect(error).toBeInstanceOf(ConnectError);
  return error as ConnectError;
}

function order(status: OrderStatusName, overrides: Partial<OrderRecord> = {}): OrderRecord {
  const createdAt = new Date(1_700_000_000_000);
  return {
    id: `ord_${status}`,
    consumerAccountId: "acct_c",
    apiKeyId: "key_1",
    model: "m",
    workerId: null,
    providerAccountId: null,
    status,
    pricePerMillionInput: 1n,
    pricePerMillionOutput: 2n,
    hold: 10n,
    maxTokens: 16,
    promptTokens: 0,
    completionTokens: 0,
    reportedPromptTokens: null,
    reportedCompletionTokens: null,
    cost: 0n,
    fee: 0n,
    finishReason: null,
    error: null,
    createdAt,
    firstTokenAt: null,
    finishedAt: null,
    ...overrides,
  };
}

describe("toConnectError", () => {
  const expected: [MarketErrorCode, Code][] = [
    ["invalid_request", Code.InvalidArgument],
    ["unauthenticated", Code.Unauthenticated],
    ["permission_denied", Code.PermissionDenied],
    ["insufficient_credits", Code.FailedPrecondition],
    ["not_found", Code.NotFound],
    ["model_not_found", Code.NotFound],
    ["payload_too_large", Code.ResourceExhausted],
    ["rate_limited", Code.ResourceExhausted],
    ["no_capacity", Code.Unavailable],
    ["worker_failed", Code.Unavailable],
    ["conflict", Code.AlreadyExists],
    ["internal", Code.Internal],
  ];

  it.each(expected.map(([market, code]) => ({ market, code, name: Code[code] })))(
    "maps $market to $name and keeps the message",
    ({ market, code }) => {
      const error = toConnectError(new MarketError(market, "what went wrong"));

      expect(error.code).toBe(code);
      expect(error.rawMessage).toBe("what went wrong");
    },
  );

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

describe("AdminService validation", () => {
  it("CreateAccount rejects a blank name without touching the store", async () => {
    const error = await failure(adminClient(stubStore({})).createAccount({ name: " \t" }));

    expect(error.code).toBe(Code.InvalidArgument);
    expect(error.rawMessage).toBe("name is required");
  });

  it("CreateAccount rejects a negative initial deposit", async () => {
    const error = await failure(adminClient(stubStore({})).createAccount({ name: "A", initialDeposit: -1n }));

    expect(error.code).toBe(Code.InvalidArgument);
    expect(error.rawMessage).toContain("initial_deposit");
  });

  it("CreateAccount without a deposit creates the account and a 'default' key, and deposits nothing", async () => {
    const createApiKey = vi.fn(async (accountId: string, label: string) => ({
      key: { id: "key_1", accountId, label, prefix: "sk-abc", createdAt: new Date(), revokedAt: null },
      secret: "sk-abcdef",
    }));
    const store = stubStore({
      createAccount: async ({ name }) => ({ id: "acct_1", name, createdAt: new Date(5), defaults: {} }),
      createApiKey,
      getBalance: async () => ({ available: 0n, held: 0n }),
    });
    const res = await adminClient(store).createAccount({ name: "  Alice  " });

    expect(res.account?.name).toBe("Alice");
    expect(res.account?.createdAtUnixMs).toBe(5n);
    expect(res.apiKey).toBe("sk-abcdef");
    expect(res.balance).toMatchObject({ available: 0n, held: 0n });
    expect(createApiKey).toHaveBeenCalledWith("acct_1", "default");
  });

  it.each([0n, -5n])("Deposit and Withdraw reject an amount of %s", async (amount) => {
    const client = adminClient(stubStore({}));
    const deposit = await failure(client.deposit({ accountId: "acct_1", amount }));
    const withdraw = await failure(client.withdraw({ accountId: "acct_1", amount }));

    expect(deposit.code).toBe(Code.InvalidArgument);
    expect(deposit.rawMessage).toBe(`amount must be a positive number of micro-credits, got ${amount}`);
    expect(withdraw.code).toBe(Code.InvalidArgument);
  });

  it("Deposit passes an empty idempotency key as none", async () => {
    const deposit = vi.fn(async () => ({ available: 7n, held: 0n }));
    const res = await adminClient(stubStore({ deposit })).deposit({ accountId: "acct_1", amount: 7n });

    expect(res.balance?.available).toBe(7n);
    expect(deposit).toHaveBeenCalledWith("acct_1", 7n, undefined);
  });

  it("requires ids", async () => {
    const client = adminClient(stubStore({}));

    expect((await failure(client.getBalance({}))).rawMessage).toBe("account_id is required");
    expect((await failure(client.revokeApiKey({}))).rawMessage).toBe("key_id is required");
    expect((await failure(client.getOrder({}))).code).toBe(Code.InvalidArgument);
  });

  it("UpdateAccountDefaults rejects a negative cap and passes unset caps as absent", async () => {
    const updateAccountDefaults = vi.fn(async (id: string, defaults: object) => ({
      id,
      name: "A",
      createdAt: new Date(0),
      defaults,
    }));
    const client = adminClient(stubStore({ updateAccountDefaults }));

    const error = await failure(
      client.updateAccountDefaults({ accountId: "acct_1", defaults: { maxPricePerMillionInput: -1n } }),
    );
    expect(error.code).toBe(Code.InvalidArgument);

    const res = await client.updateAccountDefaults({
      accountId: "acct_1",
      defaults: { maxPricePerMillionOutput: 3n },
    });
    expect(updateAccountDefaults).toHaveBeenCalledWith("acct_1", { maxPricePerMillionOutput: 3n });
    expect(res.account?.defaults?.maxPricePerMillionInput).toBeUndefined();
    expect(res.account?.defaults?.maxPricePerMillionOutput).toBe(3n);
  });

  it("GetAccount and GetOrder of unknown ids are NotFound", async () => {
    const client = adminClient(stubStore({ getAccount: async () => null, getOrder: async () => null }));

    const account = await failure(client.getAccount({ accountId: "acct_x" }));
    const missingOrder = await failure(client.getOrder({ orderId: "ord_x" }));
    expect(account.code).toBe(Code.NotFound);
    expect(account.rawMessage).toBe("account acct_x not found");
    expect(missingOrder.code).toBe(Code.NotFound);
  });

  it("a store MarketError keeps its code through the wire", async () => {
    const store = stubStore({
      withdraw: async () => {
        throw new MarketError("insufficient_credits", "only 3 µc available");
      },
    });
    const error = await failure(adminClient(store).withdraw({ accountId: "acct_1", amount: 5n }));

    expect(error.code).toBe(Code.FailedPrecondition);
    expect(error.rawMessage).toBe("only 3 µc available");
  });
});

describe("AdminService listings", () => {
  it("ListOrders defaults the limit to 50, caps it at 1000 and omits an empty account filter", async () => {
    const listOrders = vi.fn(async () => [] as OrderRecord[]);
    const client = adminClient(stubStore({ listOrders }));

    await client.listOrders({});
    await client.listOrders({ accountId: "acct_1", limit: 5000 });
    expect(listOrders).toHaveBeenNthCalledWith(1, { limit: 50 });
    expect(listOrders).toHaveBeenNthCalledWith(2, { accountId: "acct_1", limit: 1000 });
  });

  it("maps order statuses, nulls and timings", async () => {
    const finished = order("failed", {
      workerId: "wrk_1",
      error: "worker disconnected",
      firstTokenAt: new Date(1_700_000_000_250),
      finishedAt: new Date(1_700_000_001_000),
    });
    const store = stubStore({
      listOrders: async () => [order("running"), order("completed"), finished, order("cancelled")],
    });
    const res = await adminClient(store).listOrders({});

    expect(res.orders.map((o) => o.status)).toEqual([
      OrderStatus.RUNNING,
      OrderStatus.COMPLETED,
      OrderStatus.FAILED,
      OrderStatus.CANCELLED,
    ]);
    expect(res.orders[0]).toMatchObject({ workerId: "", error: "", durationMs: 0, timeToFirstTokenMs: 0 });
    expect(res.orders[2]).toMatchObject({
      workerId: "wrk_1",
      error: "worker disconnected",
      timeToFirstTokenMs: 250,
      durationMs: 1000,
      createdAtUnixMs: 1_700_000_000_000n,
    });
  });

  it("ListWorkers adds live connections the store does not list yet", async () => {
    const registry = new WorkerRegistry();
    const live: WorkerConnection = {
      workerId: "wrk_new",
      providerAccountId: "acct_p",
      name: "fresh",
      offers: [],
      draining: false,
      activeJobs: 1,
      assign() {},
      cancel() {},
    };
    registry.register(live);
    const res = await adminClient(stubStore({ listWorkers: async () => [] }), registry).listWorkers({});

    expect(res.workers).toHaveLength(1);
    expect(res.workers[0]).toMatchObject({ id: "wrk_new", accountId: "acct_p", online: true, activeJobs: 1 });
  });

  it("AuditLedger converts the entry count to uint64", async () => {
    const store = stubStore({
      auditLedger: async () => ({ ok: false, entriesSum: -3n, entryCount: 12, problems: ["p"] }),
    });
    const res = await adminClient(store).auditLedger({});

    expect(res).toMatchObject({ ok: false, entriesSum: -3n, entryCount: 12n, problems: ["p"] });
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

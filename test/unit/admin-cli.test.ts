/**
 * The admin CLI end to end: runAdminCli → gRPC over h2c → a real connect-node server with the
 * admin auth interceptor → AdminService → an in-memory MarketStore and a real WorkerRegistry.
 */
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { AdminService } from "../../gen/locallmarket/v1/admin_pb.js";
import { adminAuthInterceptor } from "../../server/admin/admin-auth.js";
import { createAdminService } from "../../server/admin/admin-service.js";
import { runAdminCli } from "../../server/admin/cli.js";
import { MarketError } from "../../server/market/errors.js";
import { type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";
import type {
  AccountRecord,
  ApiKeyRecord,
  Balance,
  LedgerAudit,
  MarketStore,
  OfferRecord,
  OrderRecord,
  RoutingDefaults,
  WorkerRecord,
} from "../../server/market/store-port.js";

const ADMIN_TOKEN = "adm-test-token";

type AdminStore = Pick<
  MarketStore,
  | "createAccount"
  | "getAccount"
  | "listAccounts"
  | "updateAccountDefaults"
  | "createApiKey"
  | "listApiKeys"
  | "revokeApiKey"
  | "createWorkerToken"
  | "listWorkers"
  | "deposit"
  | "withdraw"
  | "getBalance"
  | "getOrder"
  | "listOrders"
  | "auditLedger"
>;

/** Just enough of a MarketStore for the admin API, with the port's documented error behaviour. */
class FakeStore implements AdminStore {
  readonly accounts = new Map<string, AccountRecord>();
  readonly balances = new Map<string, Balance>();
  readonly keys = new Map<string, ApiKeyRecord>();
  readonly workers: WorkerRecord[] = [];
  readonly orders: OrderRecord[] = [];
  readonly idempotencyKeys = new Set<string>();
  audit: LedgerAudit = { ok: true, entriesSum: 0n, entryCount: 0, problems: [] };
  /** Makes listAccounts fail like a broken database would. */
  failListAccounts = false;
  private sequence = 0;

  private next(prefix: string): string {
    this.sequence += 1;
    return `${prefix}_${this.sequence}`;
  }

  private requireAccount(id: string): AccountRecord {
    const account = this.accounts.get(id);
    if (!account) throw new MarketError("not_found", `account ${id} not found`);
    return account;
  }

  async createAccount(input: { name: string }): Promise<AccountRecord> {
    const account: AccountRecord = {
      id: this.next("acct"),
      name: input.name,
      createdAt: new Date(),
      defaults: {},
    };
    this.accounts.set(account.id, account);
    this.balances.set(account.id, { available: 0n, held: 0n });
    return account;
  }

  async getAccount(id: string): Promise<AccountRecord | null> {
    return this.accounts.get(id) ?? null;
  }

  async listAccounts(): Promise<AccountRecord[]> {
    if (this.failListAccounts) throw new Error("connection to database lost at /var/lib/secret.sock");
    return [...this.accounts.values()].reverse();
  }

  async updateAccountDefaults(id: string, defaults: RoutingDefaults): Promise<AccountRecord> {
    const account = { ...this.requireAccount(id), defaults };
    this.accounts.set(id, account);
    return account;
  }

  async createApiKey(accountId: string, label: string): Promise<{ key: ApiKeyRecord; secret: string }> {
    this.requireAccount(accountId);
    const secret = `sk-${this.next("secret")}`;
    const key: ApiKeyRecord = {
      id: this.next("key"),
      accountId,
      label,
      prefix: secret.slice(0, 6),
      createdAt: new Date(),
      revokedAt: null,
    };
    this.keys.set(key.id, key);
    return { key, secret };
  }

  async listApiKeys(accountId: string): Promise<ApiKeyRecord[]> {
    return [...this.keys.values()].filter((key) => key.accountId === accountId);
  }

  async revokeApiKey(keyId: string): Promise<ApiKeyRecord> {
    const key = this.keys.get(keyId);
    if (!key) throw new MarketError("not_found", `API key ${keyId} not found`);
    const revoked = { ...key, revokedAt: new Date(1_700_000_000_000) };
    this.keys.set(keyId, revoked);
    return revoked;
  }

  async createWorkerToken(accountId: string, label: string): Promise<{ workerId: string; secret: string }> {
    this.requireAccount(accountId);
    return { workerId: this.next(`wrk_${label}`), secret: `wt-${this.next("secret")}` };
  }

  async listWorkers(): Promise<WorkerRecord[]> {
    return this.workers;
  }

  async deposit(accountId: string, amount: bigint, idempotencyKey?: string): Promise<Balance> {
    if (amount <= 0n) throw new MarketError("invalid_request", "amount must be positive");
    const balance = this.balances.get(this.requireAccount(accountId).id) ?? { available: 0n, held: 0n };
    if (idempotencyKey !== undefined) {
      if (this.idempotencyKeys.has(idempotencyKey)) return balance;
      this.idempotencyKeys.add(idempotencyKey);
    }
    balance.available += amount;
    this.balances.set(accountId, balance);
    return { ...balance };
  }

  async withdraw(accountId: string, amount: bigint): Promise<Balance> {
    if (amount <= 0n) throw new MarketError("invalid_request", "amount must be positive");
    const balance = this.balances.get(this.requireAccount(accountId).id) ?? { available: 0n, held: 0n };
    if (balance.available < amount) {
      throw new MarketError(
        "insufficient_credits",
        `insufficient credits: ${balance.available} µc available`,
      );
    }
    balance.available -= amount;
    return { ...balance };
  }

  async getBalance(accountId: string): Promise<Balance> {
    return { ...(this.balances.get(this.requireAccount(accountId).id) ?? { available: 0n, held: 0n }) };
  }

  async getOrder(id: string): Promise<OrderRecord | null> {
    return this.orders.find((order) => order.id === id) ?? null;
  }

  async listOrders(filter: { accountId?: string; limit: number }): Promise<OrderRecord[]> {
    return this.orders
      .filter((order) => filter.accountId === undefined || order.consumerAccountId === filter.accountId)
      .slice(0, filter.limit);
  }

  async auditLedger(): Promise<LedgerAudit> {
    return this.audit;
  }
}

/** The admin service only calls the AdminStore part of the port; the rest is never reached. */
function asMarketStore(store: AdminStore): MarketStore {
  return store as MarketStore;
}

const OFFER: OfferRecord = {
  model: "llama3.2:1b",
  pricePerMillionInput: 500_000n,
  pricePerMillionOutput: 1_500_000n,
  advertisedTokensPerSecond: 40,
  maxConcurrency: 2,
  contextLength: 8192,
  quantization: "Q4_K_M",
  engine: "ollama",
};

function liveConnection(workerId: string, activeJobs: number): WorkerConnection {
  return {
    workerId,
    providerAccountId: "acct_provider",
    name: "basement-4090",
    offers: [OFFER],
    draining: false,
    activeJobs,
    assign() {},
    cancel() {},
  };
}

function completedOrder(id: string, consumerAccountId: string): OrderRecord {
  const createdAt = new Date(1_700_000_000_000);
  return {
    id,
    consumerAccountId,
    apiKeyId: "key_x",
    model: "llama3.2:1b",
    workerId: "wrk_live",
    providerAccountId: "acct_provider",
    status: "completed",
    pricePerMillionInput: 500_000n,
    pricePerMillionOutput: 1_500_000n,
    hold: 3_000n,
    maxTokens: 256,
    promptTokens: 12,
    completionTokens: 34,
    reportedPromptTokens: 12,
    reportedCompletionTokens: 34,
    cost: 57n,
    fee: 2n,
    finishReason: "stop",
    error: null,
    createdAt,
    firstTokenAt: new Date(createdAt.getTime() + 120),
    finishedAt: new Date(createdAt.getTime() + 900),
  };
}

let store: FakeStore;
let registry: WorkerRegistry;
let server: http2.Http2Server;
let baseUrl: string;

beforeAll(async () => {
  store = new FakeStore();
  registry = new WorkerRegistry();
  server = http2.createServer(
    connectNodeAdapter({
      routes: (router) =>
        router.service(AdminService, createAdminService({ store: asMarketStore(store), registry }), {
          interceptors: [adminAuthInterceptor(ADMIN_TOKEN)],
        }),
    }),
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  await new Promise<void>((resolve, reject) => server.close((error) => (error ? reject(error) : resolve())));
});

afterEach(() => {
  vi.restoreAllMocks();
});

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

async function cli(args: string[], env: Record<string, string | undefined> = {}): Promise<CliResult> {
  let stdout = "";
  let stderr = "";
  const code = await runAdminCli(args, {
    stdout: (text) => {
      stdout += text;
    },
    stderr: (text) => {
      stderr += text;
    },
    env: { LOCALLMARKET_SERVER: baseUrl, LOCALLMARKET_ADMIN_TOKEN: ADMIN_TOKEN, ...env },
  });
  return { code, stdout, stderr };
}

/** Runs a command that must succeed with --json and returns its parsed output. */
async function cliJson(args: string[]): Promise<Record<string, unknown>> {
  const result = await cli([...args, "--json"]);
  expect(result.stderr).toBe("");
  expect(result.code).toBe(0);
  expect(result.stdout.endsWith("\n")).toBe(true);
  return JSON.parse(result.stdout) as Record<string, unknown>;
}

async function newAccount(name: string, deposit?: string): Promise<string> {
  const out = await cliJson([
    "account",
    "create",
    "--name",
    name,
    ...(deposit ? ["--deposit", deposit] : []),
  ]);
  return String(out.accountId);
}

describe("account create", () => {
  it("--json prints accountId then apiKey, with the deposit in µc strings", async () => {
    const result = await cli(["account", "create", "--name", "Alice", "--deposit", "12.5", "--json"]);

    expect(result.code).toBe(0);
    const out = JSON.parse(result.stdout) as Record<string, unknown>;
    expect(Object.keys(out).slice(0, 2)).toEqual(["accountId", "apiKey"]);
    expect(
      result.stdout.startsWith(`{"accountId":"${String(out.accountId)}","apiKey":"${String(out.apiKey)}"`),
    ).toBe(true);
    expect(out.balance).toEqual({ available: "12500000", held: "0" });
    const id = String(out.accountId);
    expect(store.accounts.get(id)?.name).toBe("Alice");
    expect(store.balances.get(id)?.available).toBe(12_500_000n);
    expect([...store.keys.values()].find((key) => key.accountId === id)?.label).toBe("default");
  });

  it("without --json explains the key and the next steps", async () => {
    const result = await cli([
      "account",
      "create",
      "--name",
      "Bob",
      "--deposit",
      "3",
      "--api-url",
      "http://api:9",
    ]);

    expect(result.code).toBe(0);
    const account = [...store.accounts.values()].find((a) => a.name === "Bob");
    expect(account).toBeDefined();
    const apiKey = /API key: (\S+)/.exec(result.stdout)?.[1];
    expect(apiKey).toMatch(/^sk-/);
    expect(result.stdout).toContain("3 credits available");
    expect(result.stdout).toContain("curl http://api:9/v1/chat/completions");
    expect(result.stdout).toContain(`Authorization: Bearer ${apiKey}`);
    expect(result.stdout).toContain(`worker-token create --account ${account?.id}`);
  });

  it("rejects a blank name before calling the server, exit 2", async () => {
    const before = store.accounts.size;
    const result = await cli(["account", "create", "--name", "  "]);

    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^error: --name is required/);
    expect(store.accounts.size).toBe(before);
  });
});

describe("worker-token create", () => {
  it("--json prints workerToken then workerId", async () => {
    const accountId = await newAccount("Provider");
    const result = await cli(["worker-token", "create", "--account", accountId, "--label", "gpu", "--json"]);

    expect(result.code).toBe(0);
    const out = JSON.parse(result.stdout) as Record<string, unknown>;
    expect(Object.keys(out).slice(0, 2)).toEqual(["workerToken", "workerId"]);
    expect(out.workerToken).toMatch(/^wt-/);
    expect(out.workerId).toMatch(/^wrk_gpu_/);
  });
  it("without --json shows the token and how to start a worker with it", async () => {
    const accountId = await newAccount("Provider 2");
    const result = await cli(["worker-token", "create", "--account", accountId]);

    expect(result.code).toBe(0);
    const token = /Worker token: (\S+)/.exec(result.stdout)?.[1];
    expect(token).toMatch(/^wt-/);
    expect(result.stdout).toContain(
      `LOCALLMARKET_WORKER_TOKEN=${token} locallmarket worker --server ${baseUrl}`,
    );
  });
});

describe("money", () => {
  it("balance --json prints available and held as µc strings", async () => {
    const accountId = await newAccount("Carol", "1.000001");

    expect(await cliJson(["balance", "--account", accountId])).toEqual({ available: "1000001", held: "0" });
  });

  it("balance shows credits to humans", async () => {
    const accountId = await newAccount("Dan", "2.25");
    const result = await cli(["balance", "--account", accountId]);

    expect(result.code).toBe(0);
    expect(result.stdout).toBe(`${accountId}: 2.25 credits available, 0 held\n`);
  });

  it("deposit and withdraw move credits and print the new balance", async () => {
    const accountId = await newAccount("Erin");

    expect(await cliJson(["deposit", "--account", accountId, "--amount", "5"])).toEqual({
      available: "5000000",
      held: "0",
    });
    expect(await cliJson(["withdraw", "--account", accountId, "--amount", "0.5"])).toEqual({
      available: "4500000",
      held: "0",
    });
  });

  it("passes the idempotency key through", async () => {
    const accountId = await newAccount("Faye");
    const args = ["deposit", "--account", accountId, "--amount", "1", "--idempotency-key", "dep-1"];

    await cliJson(args);
    expect(await cliJson(args)).toEqual({ available: "1000000", held: "0" });
  });

  it("maps insufficient credits to FailedPrecondition, exit 1", async () => {
    const accountId = await newAccount("Gus", "1");
    const result = await cli(["withdraw", "--account", accountId, "--amount", "2"]);

    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toContain("error: insufficient credits: 1000000 µc available (FailedPrecondition)");
    expect(store.balances.get(accountId)?.available).toBe(1_000_000n);
  });

  it("rejects a malformed or zero amount before calling the server, exit 2", async () => {
    const accountId = await newAccount("Hal");
    const malformed = await cli(["deposit", "--account", accountId, "--amount", "1.2.3"]);
    const zero = await cli(["deposit", "--account", accountId, "--amount", "0"]);

    expect(malformed.code).toBe(2);
    expect(malformed.stderr).toMatch(
      /^error: --amount: "1.2.3" is not a non-negative decimal number of credits/,
    );
    expect(zero.code).toBe(2);
    expect(zero.stderr).toMatch(/^error: --amount must be more than 0 credits/);
    expect(store.balances.get(accountId)?.available).toBe(0n);
  });
});

describe("accounts and keys", () => {
  it("account get and account list show the account", async () => {
    const accountId = await newAccount("Ivy", "1");
    const got = await cliJson(["account", "get", "--account", accountId]);
    const listed = await cliJson(["account", "list"]);

    expect(got.account).toMatchObject({ id: accountId, name: "Ivy" });
    expect(got.balance).toEqual({ available: "1000000", held: "0" });
    expect((listed.accounts as { id: string }[]).map((a) => a.id)).toContain(accountId);
  });

  it("account get of an unknown account is NotFound, exit 1", async () => {
    const result = await cli(["account", "get", "--account", "acct_nope"]);

    expect(result.code).toBe(1);
    expect(result.stderr).toContain("error: account acct_nope not found (NotFound)");
  });

  it("account defaults converts credits per 1M to µc and removes caps left out", async () => {
    const accountId = await newAccount("Jay");
    await cliJson(["account", "defaults", "--account", accountId, "--max-price-out", "9", "--min-tps", "3"]);
    const out = await cliJson(["account", "defaults", "--account", accountId, "--max-price-in", "1.5"]);

    expect(store.accounts.get(accountId)?.defaults).toEqual({ maxPricePerMillionInput: 1_500_000n });
    expect((out.account as { defaults: unknown }).defaults).toEqual({ maxPricePerMillionInput: "1500000" });
  });

  it("key create, key list and key revoke", async () => {
    const accountId = await newAccount("Kim");
    const created = await cliJson(["key", "create", "--account", accountId, "--label", "laptop"]);
    expect(Object.keys(created)[0]).toBe("apiKey");
    expect(created).toMatchObject({ accountId, label: "laptop" });

    const listed = await cliJson(["key", "list", "--account", accountId]);
    const labels = (listed.keys as { label: string }[]).map((key) => key.label).sort();
    expect(labels).toEqual(["default", "laptop"]);

    const revoked = await cliJson(["key", "revoke", "--key", String(created.keyId)]);
    expect((revoked.key as { revokedAtUnixMs: string }).revokedAtUnixMs).toBe("1700000000000");
  });
});

describe("orders, workers and the ledger", () => {
  it("orders --json renders status, money and timings", async () => {
    store.orders.push(completedOrder("ord_1", "acct_consumer"));
    const out = await cliJson(["orders", "--account", "acct_consumer", "--limit", "5"]);
    const order = (out.orders as Record<string, unknown>[])[0];

    expect(order).toMatchObject({
      id: "ord_1",
      status: "ORDER_STATUS_COMPLETED",
      cost: "57",
      fee: "2",
      hold: "3000",
      createdAtUnixMs: "1700000000000",
      timeToFirstTokenMs: 120,
      durationMs: 900,
      workerId: "wrk_live",
    });
  });

  it("order --id shows one order; an unknown id is NotFound", async () => {
    store.orders.push(completedOrder("ord_2", "acct_consumer"));
    const found = await cli(["order", "--id", "ord_2"]);
    const missing = await cli(["order", "--id", "ord_missing"]);

    expect(found.code).toBe(0);
    expect(found.stdout).toContain("Status:     completed");
    expect(found.stdout).toContain("Cost:       0.000057 credits");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("(NotFound)");
  });

  it("workers merges stored workers with the live registry", async () => {
    const seen = new Date(1_700_000_100_000);
    store.workers.push(
      {
        id: "wrk_live",
        accountId: "acct_provider",
        name: "old-name",
        agentVersion: "1.0.0",
        offers: [],
        lastSeenAt: seen,
      },
      {
        id: "wrk_gone",
        accountId: "acct_provider",
        name: "laptop",
        agentVersion: "0.9.0",
        offers: [OFFER],
        lastSeenAt: null,
      },
    );
    const connection = liveConnection("wrk_live", 2);
    registry.register(connection);
    try {
      const out = await cliJson(["workers"]);
      const workers = out.workers as Record<string, unknown>[];

      expect(workers.find((w) => w.id === "wrk_live")).toMatchObject({
        online: true,
        activeJobs: 2,
        name: "basement-4090",
        lastSeenUnixMs: "1700000100000",
        offers: [{ model: "llama3.2:1b", pricePerMillionInput: "500000", pricePerMillionOutput: "1500000" }],
      });
      expect(workers.find((w) => w.id === "wrk_gone")).toMatchObject({
        online: false,
        activeJobs: 0,
        lastSeenUnixMs: "0",
      });
    } finally {
      registry.unregister(connection);
      store.workers.length = 0;
    }
  });

  it("audit-ledger exits 0 when ok and 1 with the problems when not", async () => {
    store.audit = { ok: true, entriesSum: 0n, entryCount: 7, problems: [] };
    const ok = await cli(["audit-ledger"]);
    store.audit = { ok: false, entriesSum: 5n, entryCount: 8, problems: ["entries sum to 5, not 0"] };
    const bad = await cli(["audit-ledger", "--json"]);
    store.audit = { ok: true, entriesSum: 0n, entryCount: 0, problems: [] };

    expect(ok.code).toBe(0);
    expect(ok.stdout).toContain("Ledger OK.");
    expect(bad.code).toBe(1);
    expect(JSON.parse(bad.stdout)).toEqual({
      ok: false,
      entriesSum: "5",
      entryCount: "8",
      problems: ["entries sum to 5, not 0"],
    });
  });

  it("an unexpected server failure is Internal with a generic message, logged on the server", async () => {
    const log = vi.spyOn(console, "error").mockImplementation(() => {});
    store.failListAccounts = true;
    try {
      const result = await cli(["account", "list"]);

      expect(result.code).toBe(1);
      expect(result.stderr).toContain("error: internal error (Internal)");
      expect(result.stderr).not.toContain("secret.sock");
      expect(log).toHaveBeenCalledOnce();
      expect(String(log.mock.calls[0]?.[1])).toContain("secret.sock");
    } finally {
      store.failListAccounts = false;
    }
  });
});

describe("authentication", () => {
  it("a wrong admin token is Unauthenticated, exit 1, and changes nothing", async () => {
    const before = store.accounts.size;
    const result = await cli(["account", "create", "--name", "Mallory", "--admin-token", "adm-wrong"]);

    expect(result.code).toBe(1);
    expect(result.stderr).toContain("error: missing or invalid admin token (Unauthenticated)");
    expect(store.accounts.size).toBe(before);
  });

  it("the token from --admin-token wins over the environment", async () => {
    const result = await cli(["account", "list", "--json", "--admin-token", ADMIN_TOKEN], {
      LOCALLMARKET_ADMIN_TOKEN: "adm-wrong",
    });

    expect(result.code).toBe(0);
  });

  it("no admin token at all is a usage error", async () => {
    const result = await cli(["account", "list"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^error: no admin token/);
  });
});

describe("usage", () => {
  it.each([
    [["frobnicate"], /^error: unknown command "frobnicate"/],
    [["account"], /^error: "account" needs a subcommand: create, list, get, defaults/],
    [["balance"], /^error: --account is required/],
    [["balance", "--account", "a", "--bogus"], /^error: Unknown option '--bogus'/],
    [["balance", "--account", "a", "extra"], /^error: Unexpected argument 'extra'/],
    [["orders", "--limit", "-3"], /^error: /],
    [["orders", "--limit", "ten"], /^error: --limit must be a positive whole number/],
    [["balance", "--account", "a", "--server", "ftp://x"], /^error: --server must be an http/],
  ])("%j exits 2", async (args, message) => {
    const result = await cli(args);

    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    expect(result.stderr).toMatch(message);
  });

  it("no arguments prints the help to stderr and exits 2", async () => {
    const result = await cli([]);

    expect(result.code).toBe(2);
    expect(result.stderr).toContain("Usage: locallmarket admin <command>");
  });

  it("--help lists every command and the global options, without needing a token", async () => {
    const result = await cli(["--help"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(0);
    for (const command of [
      "account create",
      "account list",
      "account get",
      "account defaults",
      "key create",
      "key list",
      "key revoke",
      "worker-token create",
      "deposit",
      "withdraw",
      "balance",
      "orders",
      "order",
      "workers",
      "audit-ledger",
    ]) {
      expect(result.stdout).toContain(`  ${command} `);
    }
    expect(result.stdout).toContain("LOCALLMARKET_SERVER");
    expect(result.stdout).toContain("LOCALLMARKET_ADMIN_TOKEN");
  });

  it("a command's --help documents every option, its env var and default", async () => {
    const result = await cli(["account", "create", "--help"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(0);
    expect(result.stdout).toContain(
      "Usage: locallmarket admin account create --name NAME [--deposit CREDITS]",
    );
    expect(result.stdout).toMatch(/--name NAME\s+a display name \(required\)/);
    expect(result.stdout).toMatch(/--deposit CREDITS\s+.*\(default: 0\)/);
    expect(result.stdout).toMatch(
      /--server URL\s+.*\(env: LOCALLMARKET_SERVER; default: http:\/\/127\.0\.0\.1:50051\)/,
    );
    expect(result.stdout).toMatch(/--admin-token TOKEN\s+.*\(env: LOCALLMARKET_ADMIN_TOKEN\)/);
    expect(result.stdout).toMatch(/--json\s+/);
    expect(result.stdout).toMatch(/-h, --help\s+/);
    expect(result.stdout).toContain('{"accountId":"…","apiKey":"…"');
  });

  it("group help and `help <command>` work too", async () => {
    const group = await cli(["key", "--help"]);
    const named = await cli(["help", "worker-token", "create"]);

    expect(group.code).toBe(0);
    expect(group.stdout).toContain("key revoke");
    expect(named.code).toBe(0);
    expect(named.stdout).toContain("--account ACCOUNT_ID");
    expect(named.stdout).toContain('{"workerToken":"…","workerId":"…"');
  });
});

describe("connection failures", () => {
  it("an unreachable server is Unavailable, exit 1, with a hint", async () => {
    // Port 1 on loopback refuses connections.
    const result = await cli(["account", "list"], { LOCALLMARKET_SERVER: "http://127.0.0.1:1" });

    expect(result.code).toBe(1);
    expect(result.stderr).toContain("(Unavailable)");
    expect(result.stderr).toContain(
      "hint: is the control plane running and reachable at http://127.0.0.1:1?",
    );
  });
});

/**
 * The admin CLI end to end: runAdminCli → gRPC over h2c → a real connect-node server with the
 * admin auth interceptor → AdminService → the real store on a fresh database (PGlite, or
 * PostgreSQL with DATABASE_URL) and a real WorkerRegistry.
 */
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import { afterAll, afterEach, beforeAll, describe, expect, it, vi } from "vitest";
import { runAdminCli } from "../../admin-client/cli.js";
import { AdminService } from "../../gen/locallmarket/v1/admin_pb.js";
import { adminAuthInterceptor } from "../../server/admin/admin-auth.js";
import { createAdminService } from "../../server/admin/admin-service.js";
import { NO_CAPABILITIES, type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";
import type { OfferRecord, OrderRecord } from "../../server/market/store-port.js";
import { openTestStore, type TestStore } from "../support/database.js";

const ADMIN_TOKEN = "adm-test-token";
/** Every command of the CLI, as typed. */
const COMMANDS = [
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
  "statement",
  "orders",
  "order",
  "workers",
  "audit-ledger",
];

const OFFER: OfferRecord = {
  model: "llama3.2:1b",
  pricePerMillionInput: 500_000n,
  pricePerMillionOutput: 1_500_000n,
  advertisedTokensPerSecond: 40,
  maxConcurrency: 2,
  contextLength: 8192,
  quantization: "Q4_K_M",
  engine: "ollama",
  capabilities: { ...NO_CAPABILITIES },
};

function liveConnection(workerId: string, providerAccountId: string, activeJobs: number): WorkerConnection {
  return {
    workerId,
    providerAccountId,
    name: "basement-4090",
    offers: [OFFER],
    draining: false,
    activeJobs,
    reserve: () => null,
  };
}

let db: TestStore;
let registry: WorkerRegistry;
let server: http2.Http2Server;
let baseUrl: string;

beforeAll(async () => {
  db = await openTestStore();
  registry = new WorkerRegistry();
  server = http2.createServer(
    connectNodeAdapter({
      routes: (router) =>
        router.service(AdminService, createAdminService({ store: db.store, registry }), {
          interceptors: [adminAuthInterceptor(ADMIN_TOKEN)],
        }),
    }),
  );
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  baseUrl = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
});

afterAll(async () => {
  if (server) {
    await new Promise<void>((resolve, reject) =>
      server.close((error) => (error ? reject(error) : resolve())),
    );
  }
  await db?.close();
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

async function accountCount(): Promise<number> {
  return (await db.store.listAccounts()).length;
}

let orderSequence = 0;

/**
 * A settled order of `consumerId` served by a new provider's worker: 12 prompt + 34 completion
 * tokens at 0.5 / 1.5 credits per 1M = 6 + 51 = 57 µc, fee floor(57 · 5%) = 2 µc.
 */
async function settledOrder(consumerId: string): Promise<{ order: OrderRecord; providerId: string }> {
  const provider = await db.store.openAccount({ name: "provider", keyLabel: "default", initialDeposit: 0n });
  const providerId = provider.account.id;
  const { workerId } = await db.store.createWorkerToken(providerId, "gpu");
  const [key] = await db.store.listApiKeys(consumerId);
  orderSequence += 1;
  const open = await db.store.openOrder({
    id: `ord_cli_${String(orderSequence).padStart(4, "0")}`,
    consumerAccountId: consumerId,
    apiKeyId: key?.id ?? "",
    model: "llama3.2:1b",
    workerId,
    providerAccountId: providerId,
    pricePerMillionInput: 500_000n,
    pricePerMillionOutput: 1_500_000n,
    hold: 3_000n,
    maxTokens: 256,
    promptTokenBound: 40,
    feeBasisPoints: 500,
  });
  const createdAt = open.createdAt.getTime();
  const order = await db.store.settleOrder(open.id, {
    status: "completed",
    promptTokens: 12,
    completionTokens: 34,
    reportedPromptTokens: 12,
    reportedCompletionTokens: 34,
    trustSignals: [],
    finishReason: "stop",
    error: null,
    firstTokenAt: new Date(createdAt + 120),
    finishedAt: new Date(createdAt + 900),
  });
  return { order, providerId };
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
    expect(out.balance).toEqual({ available: "12500000", held: "0", pending: "0" });
    expect(out.replayed).toBe(false);
    const id = String(out.accountId);
    expect((await db.store.getAccount(id))?.name).toBe("Alice");
    expect((await db.store.getBalance(id)).available).toBe(12_500_000n);
    expect((await db.store.listApiKeys(id)).map((key) => key.label)).toEqual(["default"]);
    expect((await db.store.authenticateApiKey(String(out.apiKey)))?.account.id).toBe(id);
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
    const id = /Created account (\S+)/.exec(result.stdout)?.[1] ?? "";
    expect((await db.store.getAccount(id))?.name).toBe("Bob");
    const apiKey = /API key: (\S+)/.exec(result.stdout)?.[1];
    expect(apiKey).toMatch(/^sk-/);
    expect(result.stdout).toContain("3 credits available, 0 held, 0 pending");
    expect(result.stdout).toContain("curl http://api:9/v1/chat/completions");
    expect(result.stdout).toContain(`Authorization: Bearer ${apiKey}`);
    expect(result.stdout).toContain(`worker-token create --account ${id}`);
  });

  it("with --idempotency-key, a retry creates nothing and says the key was shown once", async () => {
    const args = [
      "account",
      "create",
      "--name",
      "Cleo",
      "--deposit",
      "2",
      "--idempotency-key",
      "create-cleo",
    ];
    const first = await cliJson(args);
    const before = await accountCount();
    const retryJson = await cliJson(args);
    const retryHuman = await cli(args);

    expect(retryJson).toEqual({ ...first, apiKey: "", replayed: true });
    expect(retryHuman.code).toBe(0);
    expect(retryHuman.stdout).toContain(`Account ${String(first.accountId)} ("Cleo") was already created`);
    expect(retryHuman.stdout).toContain(`key create --account ${String(first.accountId)}`);
    expect(retryHuman.stdout).not.toContain("API key: ");
    expect(await accountCount()).toBe(before);
    expect((await db.store.getBalance(String(first.accountId))).available).toBe(2_000_000n);
  });

  it("the same --idempotency-key with another deposit is refused, exit 1, and creates nothing", async () => {
    await cliJson([
      "account",
      "create",
      "--name",
      "Dora",
      "--deposit",
      "1",
      "--idempotency-key",
      "create-dora",
    ]);
    const before = await accountCount();
    const result = await cli([
      "account",
      "create",
      "--name",
      "Dora",
      "--deposit",
      "5",
      "--idempotency-key",
      "create-dora",
    ]);

    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toMatch(
      /^error: Idempotency key "create-dora" was already used .*Nothing was changed.* \(AlreadyExists\)\n$/,
    );
    expect(await accountCount()).toBe(before);
  });

  it("rejects a blank name before calling the server, exit 2", async () => {
    const before = await accountCount();
    const result = await cli(["account", "create", "--name", "  "]);

    expect(result.code).toBe(2);
    expect(result.stderr).toMatch(/^error: --name is required/);
    expect(await accountCount()).toBe(before);
  });
});

describe("worker-token create", () => {
  it("--json prints workerToken then workerId, and the token authenticates that worker", async () => {
    const accountId = await newAccount("Provider");
    const result = await cli(["worker-token", "create", "--account", accountId, "--label", "gpu", "--json"]);

    expect(result.code).toBe(0);
    const out = JSON.parse(result.stdout) as Record<string, unknown>;
    expect(Object.keys(out).slice(0, 2)).toEqual(["workerToken", "workerId"]);
    expect(out.workerToken).toMatch(/^wt-/);
    expect(out.accountId).toBe(accountId);
    const worker = await db.store.authenticateWorkerToken(String(out.workerToken));
    expect(worker).toMatchObject({ id: out.workerId, accountId });
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
  it("balance --json prints available, held and pending as µc strings", async () => {
    const accountId = await newAccount("Carol", "1.000001");

    expect(await cliJson(["balance", "--account", accountId])).toEqual({
      available: "1000001",
      held: "0",
      pending: "0",
    });
  });

  it("balance shows a provider's earnings as pending, in credits to humans", async () => {
    const consumerId = await newAccount("Dan", "2.25");
    const { providerId } = await settledOrder(consumerId);
    const consumer = await cli(["balance", "--account", consumerId]);
    const provider = await cliJson(["balance", "--account", providerId]);

    expect(consumer.code).toBe(0);
    expect(consumer.stdout).toBe(`${consumerId}: 2.249943 credits available, 0 held, 0 pending\n`);
    expect(provider).toEqual({ available: "0", held: "0", pending: "55" });
  });

  it("deposit and withdraw move credits and print the new balance", async () => {
    const accountId = await newAccount("Erin");

    expect(await cliJson(["deposit", "--account", accountId, "--amount", "5"])).toEqual({
      available: "5000000",
      held: "0",
      pending: "0",
    });
    expect(await cliJson(["withdraw", "--account", accountId, "--amount", "0.5"])).toEqual({
      available: "4500000",
      held: "0",
      pending: "0",
    });
    expect((await db.store.getBalance(accountId)).available).toBe(4_500_000n);
  });

  it("the same --idempotency-key twice deposits once and prints the first balance", async () => {
    const accountId = await newAccount("Faye");
    const args = ["deposit", "--account", accountId, "--amount", "1", "--idempotency-key", "dep-1"];

    await cliJson(args);
    await cliJson(["deposit", "--account", accountId, "--amount", "0.5"]);
    expect(await cliJson(args)).toEqual({ available: "1000000", held: "0", pending: "0" });
    expect((await db.store.getBalance(accountId)).available).toBe(1_500_000n);
  });

  it("the same --idempotency-key with another amount is refused with a hint, exit 1, and moves nothing", async () => {
    const accountId = await newAccount("Fritz");
    await cliJson(["deposit", "--account", accountId, "--amount", "1", "--idempotency-key", "dep-fritz"]);
    const result = await cli([
      "deposit",
      "--account",
      accountId,
      "--amount",
      "2",
      "--idempotency-key",
      "dep-fritz",
    ]);

    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toMatch(
      /^error: Idempotency key "dep-fritz" was already used for a deposit of 1 credits .*this request is a deposit of 2 credits .*Nothing was changed.* \(AlreadyExists\)\n$/,
    );
    expect((await db.store.getBalance(accountId)).available).toBe(1_000_000n);
  });

  it("maps insufficient credits to FailedPrecondition, exit 1", async () => {
    const accountId = await newAccount("Gus", "1");
    const result = await cli(["withdraw", "--account", accountId, "--amount", "2"]);

    expect(result.code).toBe(1);
    expect(result.stdout).toBe("");
    expect(result.stderr).toBe(
      "error: Insufficient credits: 2 credits needed, 1 available. (FailedPrecondition)\n",
    );
    expect(result.stderr).not.toContain("hint:");
    expect((await db.store.getBalance(accountId)).available).toBe(1_000_000n);
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
    expect((await db.store.getBalance(accountId)).available).toBe(0n);
  });
});

describe("statement", () => {
  it("--json lists entries with running balances, oldest first, and the orders", async () => {
    const accountId = await newAccount("Stella", "1");
    await cliJson(["deposit", "--account", accountId, "--amount", "0.5"]);
    await cliJson(["withdraw", "--account", accountId, "--amount", "0.25"]);
    const { order } = await settledOrder(accountId);
    const out = await cliJson(["statement", "--account", accountId]);

    expect(out.account).toMatchObject({ id: accountId, name: "Stella" });
    expect(out.balance).toEqual({ available: "1249943", held: "0", pending: "0" });
    const entries = out.entries as Record<string, string>[];
    expect(entries.slice(0, 3).map((e) => [e.kind, e.book, e.amount, e.balanceAfter])).toEqual([
      ["deposit", "BOOK_AVAILABLE", "1000000", "1000000"],
      ["deposit", "BOOK_AVAILABLE", "500000", "1500000"],
      ["withdrawal", "BOOK_AVAILABLE", "-250000", "1250000"],
    ]);
    const available = entries.filter((e) => e.book === "BOOK_AVAILABLE");
    expect(available.at(-1)?.balanceAfter).toBe("1249943");
    expect(entries.slice(3).every((e) => e.orderId === order.id)).toBe(true);
    expect((out.orders as Record<string, unknown>[]).map((o) => [o.id, o.cost, o.fee])).toEqual([
      [order.id, "57", "2"],
    ]);
  });

  it("without --json prints the entries and the orders as tables", async () => {
    const accountId = await newAccount("Stan", "1");
    const { order, providerId } = await settledOrder(accountId);
    const consumer = await cli(["statement", "--account", accountId, "--limit", "10"]);
    const provider = await cli(["statement", "--account", providerId]);

    expect(consumer.code).toBe(0);
    expect(consumer.stdout).toContain(`Statement of ${accountId} ("Stan")`);
    expect(consumer.stdout).toContain("Balance: 0.999943 credits available, 0 held, 0 pending");
    expect(consumer.stdout).toMatch(/\bdeposit\s+-\s+available\s+\+1\s+1\s/);
    expect(consumer.stdout).toMatch(new RegExp(`${order.id}\\s+consumer\\s+completed`));
    expect(provider.stdout).toMatch(
      new RegExp(`\\bsettle\\s+${order.id}\\s+pending\\s+\\+0\\.000055\\s+0\\.000055\\s`),
    );
    expect(provider.stdout).toMatch(new RegExp(`${order.id}\\s+provider\\s+completed`));
  });

  it("an unknown account is NotFound, exit 1; --limit must be a positive number, exit 2", async () => {
    const missing = await cli(["statement", "--account", "acct_nope"]);
    const badLimit = await cli(["statement", "--account", "acct_nope", "--limit", "0"]);

    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("(NotFound)");
    expect(badLimit.code).toBe(2);
    expect(badLimit.stderr).toMatch(/^error: --limit must be a positive whole number/);
  });
});

describe("accounts and keys", () => {
  it("account get and account list show the account", async () => {
    const accountId = await newAccount("Ivy", "1");
    const got = await cliJson(["account", "get", "--account", accountId]);
    const listed = await cliJson(["account", "list"]);

    expect(got.account).toMatchObject({ id: accountId, name: "Ivy" });
    expect(got.balance).toEqual({ available: "1000000", held: "0", pending: "0" });
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

    expect((await db.store.getAccount(accountId))?.defaults).toEqual({ maxPricePerMillionInput: 1_500_000n });
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
    expect(Number((revoked.key as { revokedAtUnixMs: string }).revokedAtUnixMs)).toBeGreaterThan(0);
    expect(await db.store.authenticateApiKey(String(created.apiKey))).toBeNull();
  });
});

describe("orders, workers and the ledger", () => {
  it("orders --json renders status, money, bounds and timings", async () => {
    const consumerId = await newAccount("Olga", "1");
    const { order, providerId } = await settledOrder(consumerId);
    const out = await cliJson(["orders", "--account", consumerId, "--limit", "5"]);

    expect(out.orders).toEqual([
      expect.objectContaining({
        id: order.id,
        status: "ORDER_STATUS_COMPLETED",
        consumerAccountId: consumerId,
        providerAccountId: providerId,
        promptTokens: 12,
        completionTokens: 34,
        cost: "57",
        fee: "2",
        hold: "3000",
        promptTokenBound: 40,
        feeBasisPoints: 500,
        trustSignals: [],
        createdAtUnixMs: String(order.createdAt.getTime()),
        timeToFirstTokenMs: 120,
        durationMs: 900,
      }),
    ]);
  });

  it("order --id shows one order; an unknown id is NotFound", async () => {
    const consumerId = await newAccount("Otto", "1");
    const { order } = await settledOrder(consumerId);
    const found = await cli(["order", "--id", order.id]);
    const missing = await cli(["order", "--id", "ord_missing"]);

    expect(found.code).toBe(0);
    expect(found.stdout).toContain("Status:     completed");
    expect(found.stdout).toContain("Tokens:     12 prompt (bound 40), 34 completion");
    expect(found.stdout).toContain("Cost:       0.000057 credits (platform fee 0.000002, 500 basis points)");
    expect(found.stdout).toContain("Trust:      nothing noticed");
    expect(missing.code).toBe(1);
    expect(missing.stderr).toContain("(NotFound)");
  });

  it("workers merges stored workers with the live registry", async () => {
    const providerId = await newAccount("Pia");
    const live = await cliJson(["worker-token", "create", "--account", providerId, "--label", "live"]);
    const gone = await cliJson(["worker-token", "create", "--account", providerId, "--label", "gone"]);
    const liveId = String(live.workerId);
    await db.store.recordWorkerConnected(liveId, { name: "old-name", agentVersion: "1.0.0", offers: [] });
    const connection = liveConnection(liveId, providerId, 2);
    registry.register(connection);
    try {
      const out = await cliJson(["workers"]);
      const workers = out.workers as Record<string, unknown>[];

      expect(workers.find((w) => w.id === liveId)).toMatchObject({
        online: true,
        activeJobs: 2,
        name: "basement-4090",
        agentVersion: "1.0.0",
        offers: [{ model: "llama3.2:1b", pricePerMillionInput: "500000", pricePerMillionOutput: "1500000" }],
      });
      expect(Number(workers.find((w) => w.id === liveId)?.lastSeenUnixMs)).toBeGreaterThan(0);
      expect(workers.find((w) => w.id === String(gone.workerId))).toMatchObject({
        online: false,
        activeJobs: 0,
        lastSeenUnixMs: "0",
      });
    } finally {
      registry.unregister(connection);
    }
  });

  it("audit-ledger exits 0 when ok, and 1 with the report (with or without --json) when not", async () => {
    const accountId = await newAccount("Audrey", "1");
    const ok = await cli(["audit-ledger"]);
    const sql = db.orm.em.getConnection();
    await sql.execute("update accounts set available = available + 5 where id = ?", [accountId]);
    let bad: CliResult;
    let badHuman: CliResult;
    try {
      bad = await cli(["audit-ledger", "--json"]);
      badHuman = await cli(["audit-ledger"]);
    } finally {
      await sql.execute("update accounts set available = available - 5 where id = ?", [accountId]);
    }

    expect(ok.code).toBe(0);
    expect(ok.stdout).toMatch(/^Ledger OK\.\nEntries: \d+, sum: 0 µc\n$/);
    expect(bad.code).toBe(1);
    const report = JSON.parse(bad.stdout) as { ok: boolean; problems: string[]; entriesSum: string };
    expect(report.ok).toBe(false);
    expect(report.problems.join("\n")).toContain(accountId);
    expect(badHuman.code).toBe(1);
    expect(badHuman.stdout).toMatch(/^Ledger NOT OK\./);
    expect(badHuman.stdout).toContain(`  problem: ${report.problems[0]}`);
    expect((await cli(["audit-ledger"])).code).toBe(0);
  });

  it("an unexpected server failure is Internal with a generic message, logged on the server", async () => {
    const log = vi.spyOn(console, "error").mockImplementation(() => {});
    vi.spyOn(db.store, "listAccounts").mockRejectedValueOnce(
      new Error("connection to database lost at /var/lib/secret.sock"),
    );
    const result = await cli(["account", "list"]);

    expect(result.code).toBe(1);
    expect(result.stderr).toContain("error: internal error (Internal)");
    expect(result.stderr).not.toContain("secret.sock");
    expect(log).toHaveBeenCalledOnce();
    expect(String(log.mock.calls[0]?.[1])).toContain("secret.sock");
  });
});

describe("authentication", () => {
  it("a wrong admin token is Unauthenticated, exit 1, and changes nothing", async () => {
    const before = await accountCount();
    const result = await cli(["account", "create", "--name", "Mallory", "--admin-token", "adm-wrong"]);

    expect(result.code).toBe(1);
    expect(result.stderr).toContain("error: missing or invalid admin token (Unauthenticated)");
    expect(await accountCount()).toBe(before);
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
    [["frobnicate"], /^error: unknown command 'frobnicate'\n/],
    [["balanse", "--account", "a"], /^error: unknown command 'balanse' \(Did you mean balance\?\)\n/],
    [["account", "frob"], /^error: unknown command 'account frob'\n/],
    [["balance"], /^error: --account is required/],
    [["balance", "--account", "a", "--bogus"], /^error: unknown option '--bogus'\n/],
    [["balance", "--acount", "a"], /^error: unknown option '--acount' \(Did you mean --account\?\)\n/],
    [["balance", "--account"], /^error: option '--account <ID>' argument missing\n/],
    [["balance", "--account", "a", "extra"], /^error: unexpected argument 'extra'\n/],
    [["orders", "--limit", "-3"], /^error: --limit must be a positive whole number, got "-3"/],
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
    expect(result.stdout).toBe("");
    expect(result.stderr).toContain("Usage: locallmarket admin <command>");
  });

  it("a group without its subcommand prints the group's help to stderr and exits 2", async () => {
    const result = await cli(["account"]);

    expect(result.code).toBe(2);
    expect(result.stdout).toBe("");
    expect(result.stderr).toContain("Usage: locallmarket admin account <subcommand>");
    for (const command of COMMANDS.filter((name) => name.startsWith("account "))) {
      expect(result.stderr).toContain(`  ${command} `);
    }
  });

  it("takes the global options before or after the command", async () => {
    const before = await cli(["--json", "--admin-token", ADMIN_TOKEN, "account", "list"], {
      LOCALLMARKET_ADMIN_TOKEN: undefined,
    });
    const after = await cli(["account", "list", "--admin-token", ADMIN_TOKEN, "--json"], {
      LOCALLMARKET_ADMIN_TOKEN: undefined,
    });

    expect(before.code).toBe(0);
    expect(after.code).toBe(0);
    expect(JSON.parse(before.stdout)).toHaveProperty("accounts");
    expect(JSON.parse(after.stdout)).toEqual(JSON.parse(before.stdout));
  });

  it("--help lists every command and the global options, without needing a token", async () => {
    const result = await cli(["--help"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(0);
    for (const command of COMMANDS) {
      expect(result.stdout).toContain(`  ${command} `);
    }
    expect(result.stdout).toContain("LOCALLMARKET_SERVER");
    expect(result.stdout).toContain("LOCALLMARKET_ADMIN_TOKEN");
  });

  it("a command's --help documents every option, its env var and default", async () => {
    const result = await cli(["account", "create", "--help"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(0);
    expect(result.stdout).toContain(
      "Usage: locallmarket admin account create --name <NAME> [--deposit <CREDITS>]",
    );
    // Under each option's description, a line says whether it is required, its env var and default.
    expect(result.stdout).toMatch(/\n {2}--name <NAME> +a display name\n +\(required\)\n/);
    expect(result.stdout).toMatch(/\n {2}--deposit <CREDITS> +.*\n +\(default: 0\)\n/);
    expect(result.stdout).toMatch(
      /\n {2}--server <URL> +.*\n +\(env: LOCALLMARKET_SERVER; default: http:\/\/127\.0\.0\.1:50051\)\n/,
    );
    expect(result.stdout).toMatch(/--admin-token <TOKEN> [\s\S]*?\(env: LOCALLMARKET_ADMIN_TOKEN\)/);
    expect(result.stdout).toMatch(/--json\s+/);
    expect(result.stdout).toMatch(/-h, --help\s+/);
    expect(result.stdout).toContain('{"accountId":"…","apiKey":"…"');
  });

  it.each(COMMANDS)("%s --help prints its usage without a token", async (command) => {
    const result = await cli([...command.split(" "), "--help"], { LOCALLMARKET_ADMIN_TOKEN: undefined });

    expect(result.code).toBe(0);
    expect(result.stdout).toMatch(new RegExp(`^Usage: locallmarket admin ${command} `));
    expect(result.stdout).toContain("With --json, prints: ");
  });

  it("the money commands document their idempotency key and the balance's three books", async () => {
    for (const command of [["deposit"], ["withdraw"], ["account", "create"]]) {
      const help = (await cli([...command, "--help"])).stdout;
      expect(help.replace(/\s+/g, " ")).toMatch(
        /--idempotency-key <KEY> .*same key with other values is refused/,
      );
    }
    expect((await cli(["balance", "--help"])).stdout).toContain(
      'With --json, prints: {"available":"µc","held":"µc","pending":"µc"}',
    );
    expect((await cli(["statement", "--help"])).stdout).toMatch(/--limit <N> +.*\n +\(default: 50\)/);
    expect((await cli(["audit-ledger", "--help"])).stdout).toContain(
      "Exit codes: 0 ledger OK, 1 a violated invariant or a server error, 2 usage error.",
    );
  });

  it("group help and `help <command>` work too", async () => {
    const group = await cli(["key", "--help"]);
    const named = await cli(["help", "worker-token", "create"]);

    expect(group.code).toBe(0);
    expect(group.stdout).toContain("key revoke");
    expect(named.code).toBe(0);
    expect(named.stdout).toContain("--account <ACCOUNT_ID>");
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

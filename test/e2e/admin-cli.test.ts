/**
 * The command-line contract, as later tests and operators use it: `locallmarket admin …` run as a
 * real process against a real control plane, with the admin token from the environment.
 */
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import type { MikroORM } from "@mikro-orm/postgresql";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REPO_ROOT, startTestMarket, type TestMarket } from "../support/market.js";

const run = promisify(execFile);
/** Several CLI processes per test, each compiled by tsx at start: slow on a busy 2-core machine. */
const CLI_TEST_TIMEOUT_MS = 180_000;

interface AdminResult {
  code: number;
  stdout: string;
  stderr: string;
}

/**
 * What a process printed, less the launcher's note that it runs the sources because they are newer
 * than dist/ (engineers edit the tree while these tests run; a fresh build prints no such line).
 */
function withoutLauncherNote(result: AdminResult): AdminResult {
  return {
    ...result,
    stderr: result.stderr.replace(/^locallmarket: .* changed since the last build;.*\n/, ""),
  };
}

/** Runs `locallmarket …` with no control plane and no admin token; resolves whatever the exit code. */
async function locallmarket(...args: string[]): Promise<AdminResult> {
  const env = { ...process.env };
  delete env.LOCALLMARKET_ADMIN_TOKEN;
  return run(process.execPath, [join(REPO_ROOT, "bin/locallmarket.js"), ...args], {
    cwd: REPO_ROOT,
    env,
  }).then(
    ({ stdout, stderr }) => withoutLauncherNote({ code: 0, stdout, stderr }),
    (error: { code: number; stdout: string; stderr: string }) => withoutLauncherNote(error),
  );
}

describe("locallmarket's help and usage errors, as a process", () => {
  it(
    "answers --help for every command with exit 0, and a bad command line with exit 2 and the reason",
    async () => {
      const [top, none, typo, helpAdmin, admin, balance, server, worker] = await Promise.all([
        locallmarket("--help"),
        locallmarket(),
        locallmarket("sever"),
        locallmarket("help", "admin"),
        locallmarket("admin", "--help"),
        locallmarket("admin", "balance", "--help"),
        locallmarket("server", "--help"),
        locallmarket("worker", "-h"),
      ]);

      expect(top.code).toBe(0);
      expect(top.stdout).toMatch(/^Usage: locallmarket <command> \[options\]/);
      expect(top.stdout).toMatch(/\n {2}server +Run the control plane/);
      expect(top.stdout).toMatch(/\n {2}worker +Run a worker/);
      expect(top.stdout).toMatch(/\n {2}admin +Administer a control plane/);
      expect(none.code).toBe(2);
      expect(none.stdout).toBe("");
      expect(none.stderr).toContain("Usage: locallmarket <command>");
      expect(typo.code).toBe(2);
      expect(typo.stderr).toContain("error: unknown command 'sever' (Did you mean server?)");
      for (const [result, usage] of [
        [helpAdmin, "Usage: locallmarket admin <command>"],
        [admin, "Usage: locallmarket admin <command>"],
        [balance, "Usage: locallmarket admin balance --account <ID> [global options]"],
        [server, "Usage: locallmarket server [options]"],
        [worker, "Usage: locallmarket worker --server URL"],
      ] as const) {
        expect(result.code, result.stderr).toBe(0);
        expect(result.stdout.startsWith(usage), result.stdout).toBe(true);
      }
      expect(server.stdout).toMatch(
        /--http-port <N> [^(]*\n +\(env: LOCALLMARKET_HTTP_PORT; default: 8080\)/,
      );
      expect(worker.stdout).toMatch(/--token <TOKEN> [\s\S]*?\(required; env: LOCALLMARKET_WORKER_TOKEN\)/);
    },
    CLI_TEST_TIMEOUT_MS,
  );

  it(
    "names the option, the value and what is expected, exit 2",
    async () => {
      const [adminOption, adminValue, serverValue, serverOption, workerValue] = await Promise.all([
        locallmarket("admin", "balance", "--acount", "acct_1"),
        locallmarket("admin", "orders", "--limit", "ten", "--admin-token", "t"),
        locallmarket("server", "--http-port", "70000"),
        locallmarket("server", "--http-prot", "8080"),
        locallmarket(
          "worker",
          "--token",
          "t",
          "--model",
          "m",
          "--price-in",
          "1",
          "--price-out",
          "1",
          "--tps",
          "fast",
        ),
      ]);

      // Matched line by line: a source checkout newer than its build says so on stderr first.
      for (const result of [adminOption, adminValue, serverValue, serverOption, workerValue]) {
        expect(result.code, result.stderr).toBe(2);
        expect(result.stdout).toBe("");
      }
      expect(adminOption.stderr).toMatch(/^error: unknown option '--acount' \(Did you mean --account\?\)$/m);
      expect(adminValue.stderr).toMatch(/^error: --limit must be a positive whole number, got "ten"$/m);
      expect(serverValue.stderr).toMatch(
        /^error: --http-port \(LOCALLMARKET_HTTP_PORT\) must be an integer from 0 to 65535, got "70000"$/m,
      );
      expect(serverOption.stderr).toMatch(
        /^error: unknown option '--http-prot' \(Did you mean --http-port\?\)$/m,
      );
      expect(workerValue.stderr).toContain(
        'locallmarket worker: --tps (LOCALLMARKET_TPS): "fast" must be a positive number of tokens per second',
      );
    },
    CLI_TEST_TIMEOUT_MS,
  );
});

describe("locallmarket admin against a running control plane", () => {
  let market: TestMarket;

  beforeAll(async () => {
    market = await startTestMarket();
  });

  afterAll(async () => {
    await market?.close();
  });

  /** Runs `locallmarket admin …` and resolves with its exit code and output, whatever the code. */
  async function adminRun(...args: string[]): Promise<AdminResult> {
    return run(process.execPath, [join(REPO_ROOT, "bin/locallmarket.js"), "admin", ...args], {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        LOCALLMARKET_ADMIN_TOKEN: market.plane.adminToken,
        LOCALLMARKET_SERVER: market.plane.grpcUrl,
      },
    }).then(
      ({ stdout, stderr }) => withoutLauncherNote({ code: 0, stdout, stderr }),
      (error: { code: number; stdout: string; stderr: string }) => withoutLauncherNote(error),
    );
  }

  /** Runs a command that must succeed and returns its stdout. */
  async function admin(...args: string[]): Promise<string> {
    const result = await adminRun(...args);
    expect(result.stderr).toBe("");
    expect(result.code).toBe(0);
    return result.stdout;
  }

  /** Raw SQL on the control plane's own database connection, to break the books on purpose. */
  async function sql(query: string, params: unknown[]): Promise<void> {
    // The store keeps its ORM private; this test reaches under it deliberately.
    const { orm } = market.plane.store as unknown as { orm: MikroORM };
    await orm.em.getConnection().execute(query, params);
  }

  it(
    "creates accounts, worker tokens and deposits, and reports balances in micro-credits",
    async () => {
      const created = JSON.parse(
        await admin("account", "create", "--name", "cli-user", "--deposit", "2.5", "--json"),
      );
      expect(Object.keys(created).slice(0, 2)).toEqual(["accountId", "apiKey"]);
      expect(created.apiKey).toMatch(/^sk-llm-/);

      const token = JSON.parse(
        await admin("worker-token", "create", "--account", created.accountId, "--json"),
      );
      expect(token.workerToken).toMatch(/^wt-llm-/);

      await admin("deposit", "--account", created.accountId, "--amount", "1.000001");
      const balance = JSON.parse(await admin("balance", "--account", created.accountId, "--json"));
      expect(balance).toEqual({ available: "3500001", held: "0", pending: "0" });

      // The key works against the OpenAI API (no worker yet: 404 for the model, not 401).
      const error = await market
        .openai(created.apiKey)
        .chat.completions.create({ model: "none", messages: [{ role: "user", content: "hi" }] })
        .then(
          () => null,
          (thrown: { status?: number }) => thrown.status,
        );
      expect(error).toBe(404);
    },
    CLI_TEST_TIMEOUT_MS,
  );

  it(
    "a deposit's idempotency key moves money once; reused with another amount it is refused and nothing moves",
    async () => {
      const { accountId } = await market.account("idempotent", 0);
      const deposit = (amount: string) =>
        adminRun(
          "deposit",
          "--account",
          accountId,
          "--amount",
          amount,
          "--idempotency-key",
          "dep-e2e-1",
          "--json",
        );

      const first = await deposit("3");
      const retry = await deposit("3");
      const other = await deposit("4");

      expect(first.code).toBe(0);
      expect(JSON.parse(first.stdout)).toEqual({ available: "3000000", held: "0", pending: "0" });
      expect(retry.code).toBe(0);
      expect(JSON.parse(retry.stdout)).toEqual({ available: "3000000", held: "0", pending: "0" });
      expect(other.code).toBe(1);
      expect(other.stdout).toBe("");
      expect(other.stderr).toMatch(
        /^error: Idempotency key "dep-e2e-1" was already used .*\(AlreadyExists\)\n$/,
      );
      expect(other.stderr).toContain("Nothing was changed");
      expect(await market.balance(accountId)).toEqual({ available: 3_000_000n, held: 0n, pending: 0n });
    },
    CLI_TEST_TIMEOUT_MS,
  );

  it(
    "balance shows a provider's settled earnings as pending; statement lists entries with running balances",
    async () => {
      const consumer = await market.account("stmt-consumer", 1);
      const provider = await market.account("stmt-provider", 0);
      const { workerId } = await market.admin.createWorkerToken({
        accountId: provider.accountId,
        label: "gpu",
      });
      const [key] = await market.plane.store.listApiKeys(consumer.accountId);
      // The order's money goes through the server's own store: 10 + 40 µc at 1 / 2 credits per 1M
      // tokens, fee floor(50 · 5%) = 2 µc.
      await market.plane.store.openOrder({
        id: "ord_admin_cli_e2e",
        consumerAccountId: consumer.accountId,
        apiKeyId: key?.id ?? "",
        model: "m",
        workerId,
        providerAccountId: provider.accountId,
        pricePerMillionInput: 1_000_000n,
        pricePerMillionOutput: 2_000_000n,
        hold: 1_000n,
        maxTokens: 100,
        promptTokenBound: 50,
        feeBasisPoints: 500,
      });
      await market.plane.store.settleOrder("ord_admin_cli_e2e", {
        status: "completed",
        promptTokens: 10,
        completionTokens: 20,
        reportedPromptTokens: 10,
        reportedCompletionTokens: 20,
        trustSignals: [],
        finishReason: "stop",
        error: null,
        firstTokenAt: null,
        finishedAt: new Date(),
      });

      expect(JSON.parse(await admin("balance", "--account", provider.accountId, "--json"))).toEqual({
        available: "0",
        held: "0",
        pending: "48",
      });
      const statement = JSON.parse(await admin("statement", "--account", consumer.accountId, "--json"));
      expect(statement.balance).toEqual({ available: "999950", held: "0", pending: "0" });
      const entries = statement.entries as {
        kind: string;
        book: string;
        amount: string;
        balanceAfter: string;
      }[];
      expect(entries[0]).toMatchObject({
        kind: "deposit",
        book: "BOOK_AVAILABLE",
        amount: "1000000",
        balanceAfter: "1000000",
      });
      const running = new Map<string, bigint>();
      for (const entry of entries) {
        running.set(entry.book, (running.get(entry.book) ?? 0n) + BigInt(entry.amount));
        expect(entry.balanceAfter).toBe(String(running.get(entry.book)));
      }
      expect(running.get("BOOK_AVAILABLE")).toBe(999_950n);
      expect(running.get("BOOK_HELD")).toBe(0n);
      expect(statement.orders).toEqual([
        expect.objectContaining({
          id: "ord_admin_cli_e2e",
          cost: "50",
          fee: "2",
          status: "ORDER_STATUS_COMPLETED",
        }),
      ]);
    },
    CLI_TEST_TIMEOUT_MS,
  );

  it(
    "audit-ledger exits 0 on clean books and 1 with the report when a balance was tampered with",
    async () => {
      const { accountId } = await market.account("tampered", 1);
      const clean = await adminRun("audit-ledger", "--json");
      await sql("update accounts set available = available + 7 where id = ?", [accountId]);
      let tampered: AdminResult;
      let tamperedHuman: AdminResult;
      try {
        tampered = await adminRun("audit-ledger", "--json");
        tamperedHuman = await adminRun("audit-ledger");
      } finally {
        await sql("update accounts set available = available - 7 where id = ?", [accountId]);
      }

      expect(clean.code).toBe(0);
      expect(JSON.parse(clean.stdout)).toMatchObject({ ok: true, entriesSum: "0", problems: [] });
      expect(tampered.code).toBe(1);
      const report = JSON.parse(tampered.stdout) as { ok: boolean; problems: string[] };
      expect(report.ok).toBe(false);
      expect(report.problems.join("\n")).toContain(accountId);
      expect(tamperedHuman.code).toBe(1);
      expect(tamperedHuman.stdout).toMatch(/^Ledger NOT OK\./);
      expect(tamperedHuman.stdout).toContain(accountId);
      expect((await adminRun("audit-ledger")).code).toBe(0);
    },
    CLI_TEST_TIMEOUT_MS,
  );

  it(
    "exits non-zero with a message for a wrong admin token",
    async () => {
      const failure = await run(
        process.execPath,
        [join(REPO_ROOT, "bin/locallmarket.js"), "admin", "account", "list"],
        {
          env: {
            ...process.env,
            LOCALLMARKET_ADMIN_TOKEN: "wrong",
            LOCALLMARKET_SERVER: market.plane.grpcUrl,
          },
        },
      ).then(
        () => null,
        (error: { code: number; stderr: string }) => error,
      );
      expect(failure?.code).toBe(1);
      expect(failure?.stderr).toMatch(/admin token/);
    },
    CLI_TEST_TIMEOUT_MS,
  );
});

/**
 * The command-line contract, as later tests and operators use it: `locallmarket admin …` run as a
 * real process against a real control plane, with the admin token from the environment.
 */
import { execFile } from "node:child_process";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { REPO_ROOT, startTestMarket, type TestMarket } from "../support/market.js";

const run = promisify(execFile);

describe("locallmarket admin against a running control plane", () => {
  let market: TestMarket;

  beforeAll(async () => {
    market = await startTestMarket();
  });

  afterAll(async () => {
    await market?.close();
  });

  async function admin(...args: string[]): Promise<string> {
    const { stdout } = await run(
      process.execPath,
      [join(REPO_ROOT, "bin/locallmarket.js"), "admin", ...args],
      {
        cwd: REPO_ROOT,
        env: {
          ...process.env,
          LOCALLMARKET_ADMIN_TOKEN: market.plane.adminToken,
          LOCALLMARKET_SERVER: market.plane.grpcUrl,
        },
      },
    );
    return stdout;
  }

  it("creates accounts, worker tokens and deposits, and reports balances in micro-credits", async () => {
    const created = JSON.parse(
      await admin("account", "create", "--name", "cli-user", "--deposit", "2.5", "--json"),
    );
    expect(Object.keys(created).slice(0, 2)).toEqual(["accountId", "apiKey"]);
    expect(created.apiKey).toMatch(/^sk-llm-/);

    const token = JSON.parse(await admin("worker-token", "create", "--account", created.accountId, "--json"));
    expect(token.workerToken).toMatch(/^wt-llm-/);

    await admin("deposit", "--account", created.accountId, "--amount", "1.000001");
    const balance = JSON.parse(await admin("balance", "--account", created.accountId, "--json"));
    expect(balance).toEqual({ available: "3500001", held: "0" });

    // The key works against the OpenAI API (no worker yet: 404 for the model, not 401).
    const error = await market
      .openai(created.apiKey)
      .chat.completions.create({ model: "none", messages: [{ role: "user", content: "hi" }] })
      .then(
        () => null,
        (thrown: { status?: number }) => thrown.status,
      );
    expect(error).toBe(404);
  });

  it("exits non-zero with a message for a wrong admin token", async () => {
    const failure = await run(
      process.execPath,
      [join(REPO_ROOT, "bin/locallmarket.js"), "admin", "account", "list"],
      {
        env: { ...process.env, LOCALLMARKET_ADMIN_TOKEN: "wrong", LOCALLMARKET_SERVER: market.plane.grpcUrl },
      },
    ).then(
      () => null,
      (error: { code: number; stderr: string }) => error,
    );
    expect(failure?.code).toBe(1);
    expect(failure?.stderr).toMatch(/admin token/);
  });
});

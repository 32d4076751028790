/**
 * The package as a user gets it: `npm pack`, installed into an empty directory without optional
 * dependencies (so without node-llama-cpp) and without this source tree, then its `locallmarket`
 * command runs a control plane on PGlite, the admin client and an `openai`-engine worker that serve
 * one completion to the openai SDK. Installing needs the npm registry (or its cache): without
 * either, the test is skipped saying so.
 */
import { execFile, spawn } from "node:child_process";
import { existsSync } from "node:fs";
import { mkdir, mkdtemp, readdir, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { REPO_ROOT } from "../support/market.js";
import { captureOutput } from "../support/server-process.js";

const execFileAsync = promisify(execFile);
/** Packing builds dist/ if it is stale, and installing fetches every dependency: minutes at worst. */
const INSTALL_TIMEOUT_MS = 300_000;
const ADMIN_TOKEN = "packed-admin-token";
/** What npm prints when its cache's metadata does not know a version the package pins. */
const STALE_CACHE = /ETARGET|notarget|No matching version/i;
/** What npm prints when the registry cannot be reached. */
const NETWORK_FAILURE = /ENOTFOUND|EAI_AGAIN|ECONNREFUSED|ECONNRESET|ETIMEDOUT|ENETUNREACH|network/i;

interface Run {
  code: number;
  stdout: string;
  stderr: string;
}

async function run(file: string, args: string[], cwd: string, timeout = 60_000): Promise<Run> {
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_NO_WARNINGS: "1" };
  delete env.DATABASE_URL;
  return execFileAsync(file, args, { cwd, env, timeout, maxBuffer: 16 * 1024 * 1024 }).then(
    ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
    (error: { code: number; stdout: string; stderr: string }) => error,
  );
}

/** A long-running child process and a way to wait for a line of its output. */
function startProcess(file: string, args: string[], cwd: string) {
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_NO_WARNINGS: "1" };
  delete env.DATABASE_URL;
  const child = spawn(file, args, { cwd, env, stdio: ["ignore", "pipe", "pipe"] });
  const captured = captureOutput(child);
  return {
    child,
    output: captured.output,
    printed: captured.matched,
    async kill(): Promise<void> {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await captured.exited;
    },
  };
}

describe("the packed tarball installed into an empty directory", () => {
  let dir: string;
  let app: string;
  let tarball: string;
  let skipReason: string | undefined;
  let engine: FakeEngine | undefined;
  const processes: ReturnType<typeof startProcess>[] = [];

  /** The installed `locallmarket` command (a symlink to the package's bin script). */
  const command = () => join(app, "node_modules/.bin/locallmarket");

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), "locallmarket-packed-"));
    app = join(dir, "app");
    await mkdir(app);
    // `npm pack` runs `prepare`, which rebuilds dist/ from the current sources when they changed.
    const packed = await run("npm", ["pack", "--pack-destination", dir], REPO_ROOT, INSTALL_TIMEOUT_MS);
    expect(packed.code, packed.stderr).toBe(0);
    const name = (await readdir(dir)).find((file) => file.endsWith(".tgz"));
    if (!name) throw new Error(`npm pack wrote no tarball:\n${packed.stdout}${packed.stderr}`);
    tarball = join(dir, name);
    await writeFile(join(app, "package.json"), '{ "name": "packed-install-probe", "private": true }\n');
    // From npm's cache where it can (`npm ci` has just filled it): 7 s instead of 24–26 s of
    // registry round trips here. A cache that does not know a pinned version is asked again online.
    const install = (...extra: string[]) =>
      run(
        "npm",
        ["i", "--no-audit", "--no-fund", "--omit=optional", ...extra, tarball],
        app,
        INSTALL_TIMEOUT_MS,
      );
    let installed = await install("--prefer-offline");
    if (installed.code !== 0 && STALE_CACHE.test(installed.stderr)) installed = await install();
    if (installed.code !== 0) {
      if (!NETWORK_FAILURE.test(installed.stderr)) throw new Error(`npm i failed:\n${installed.stderr}`);
      skipReason = `the npm registry is unreachable, so the packed package cannot be installed:\n${installed.stderr}`;
    }
  }, INSTALL_TIMEOUT_MS * 2);

  afterAll(async () => {
    await Promise.all(processes.map((p) => p.kill()));
    await engine?.close();
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it("holds compiled JavaScript only: no sources, no tsx, no node-llama-cpp", (ctx) => {
    if (skipReason) ctx.skip(skipReason);
    const installed = join(app, "node_modules/locallmarket");
    expect(existsSync(join(installed, "dist/bin/commands.js"))).toBe(true);
    expect(existsSync(join(installed, "dist/server/store/migrations/index.js"))).toBe(true);
    expect(existsSync(join(installed, "server"))).toBe(false);
    expect(existsSync(join(installed, "bin/commands.ts"))).toBe(false);
    expect(existsSync(join(app, "node_modules/tsx"))).toBe(false);
    expect(existsSync(join(app, "node_modules/node-llama-cpp"))).toBe(false);
  });

  it("serves a completion end to end from the installed server, admin and worker", async (ctx) => {
    if (skipReason) ctx.skip(skipReason);
    const dataDir = join(dir, "data");
    const server = startProcess(
      command(),
      [
        "server",
        "--http-port",
        "0",
        "--grpc-port",
        "0",
        "--data-dir",
        dataDir,
        "--admin-token",
        ADMIN_TOKEN,
        "--log-level",
        "warn",
      ],
      app,
    );
    processes.push(server);
    const banner = await server.printed(/control plane is up\.[\s\S]*worker gRPC:\s+(\S+)/);
    const grpcUrl = banner[1] ?? "";
    const httpUrl = /OpenAI API:\s+(\S+)\/v1/.exec(server.output())?.[1];
    expect(httpUrl, server.output()).toBeDefined();

    // Start-up time of an admin command from the installed package, recorded (not asserted: the
    // machine may be busy). The target is under a second.
    const started = performance.now();
    const help = await run(command(), ["admin", "--help"], app);
    const helpMs = performance.now() - started;
    expect(help.code, help.stderr).toBe(0);
    expect(help.stdout).toContain("Usage: locallmarket admin");
    console.log(`packed install: 'locallmarket admin --help' answered in ${helpMs.toFixed(0)} ms`);

    const admin = async (...args: string[]): Promise<Record<string, string>> => {
      const result = await run(
        command(),
        ["admin", "--server", grpcUrl, "--admin-token", ADMIN_TOKEN, "--json", ...args],
        app,
      );
      expect(result.code, result.stderr).toBe(0);
      return JSON.parse(result.stdout) as Record<string, string>;
    };
    const consumer = await admin("account", "create", "--name", "consumer", "--deposit", "10");
    const provider = await admin("account", "create", "--name", "provider");
    const { workerToken, workerId } = await admin(
      "worker-token",
      "create",
      "--account",
      provider.accountId ?? "",
    );

    engine = await startFakeEngine();
    const worker = startProcess(
      command(),
      [
        "worker",
        "--server",
        grpcUrl,
        "--token",
        workerToken ?? "",
        "--model",
        "packed-model",
        "--price-in",
        "1",
        "--price-out",
        "2",
        "--tps",
        "50",
        "--engine",
        "openai",
        "--engine-url",
        engine.url,
      ],
      app,
    );
    processes.push(worker);
    await worker.printed(new RegExp(`connected as worker ${workerId}`));

    const openai = new OpenAI({
      baseURL: `${httpUrl}/v1`,
      apiKey: consumer.apiKey,
      maxRetries: 0,
      timeout: 30_000,
    });
    const completion = await openai.chat.completions.create({
      model: "packed-model",
      messages: [{ role: "user", content: "Say hello" }],
      max_tokens: 16,
    });
    expect(completion.choices[0]?.message.content).toBe("Hello, world!");
    expect(completion.usage).toMatchObject({ prompt_tokens: 12, completion_tokens: 4 });
  });

  it("says how to install node-llama-cpp when --engine llama-cpp is asked for without it", async (ctx) => {
    if (skipReason) ctx.skip(skipReason);
    const result = await run(
      command(),
      [
        "worker",
        "--server",
        "http://127.0.0.1:9",
        "--token",
        "unused",
        "--model",
        "m",
        "--price-in",
        "1",
        "--price-out",
        "1",
        "--tps",
        "5",
        "--engine",
        "llama-cpp",
        "--model-path",
        tarball,
      ],
      app,
    );
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("the llama-cpp engine needs node-llama-cpp");
    expect(result.stderr).toContain("npm i node-llama-cpp@3.21.1");
  });
});

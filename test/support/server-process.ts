/**
 * The control plane as a separate process, for tests that must signal or kill it: `node
 * bin/locallmarket.js server` on ephemeral ports over a test database (PostgreSQL when the test
 * database has a URL, embedded PGlite in its data dir otherwise), with worker agents started as
 * processes against it. Addresses are read from the server's start-up banner, never guessed.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { type Client, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import OpenAI from "openai";
import { vi } from "vitest";
import { adminTokenHeaderInterceptor } from "../../admin-client/token-header.js";
import { AdminService, OrderStatus } from "../../gen/locallmarket/v1/admin_pb.js";
import type { TestDatabase } from "./database.js";
import { accountHelpers, REPO_ROOT, workerArgs } from "./market.js";

const CLI = join(REPO_ROOT, "bin/locallmarket.js");
const ADMIN_TOKEN = "test-admin-token";

export interface ServerProcess {
  process: ChildProcess;
  pid: number;
  /** e.g. http://127.0.0.1:40123 (the OpenAI API is under /v1). */
  httpUrl: string;
  /** e.g. http://127.0.0.1:40124 (workers and the admin API over gRPC). */
  grpcUrl: string;
  admin: Client<typeof AdminService>;
  /** An `openai` SDK client for a consumer key: no retries, so failures show. */
  openai(apiKey: string): OpenAI;
  /** Everything the process printed so far (stdout and stderr). */
  output(): string;
  /** Resolves once the process has printed text matching `pattern` (already printed counts). */
  printed(pattern: RegExp): Promise<string>;
  /** Resolves when the process has exited. */
  exited: Promise<{ code: number | null; signal: NodeJS.Signals | null }>;
  /** False once the process has exited. */
  alive(): boolean;
  /** Creates an account with a deposit (credits) and returns its id and API key. */
  account(name: string, depositCredits?: number): Promise<{ accountId: string; apiKey: string }>;
  balance(accountId: string): Promise<{ available: bigint; held: bigint; pending: bigint }>;
  /** Starts a worker process for the account and resolves once the server has welcomed it. */
  worker(options: ServerWorkerOptions): Promise<ServerWorker>;
  /** SIGKILL, then waits for the exit. */
  kill(): Promise<void>;
  /** SIGTERM (if still running) and waits for the exit; stops its workers too. */
  stop(): Promise<void>;
}

export interface ServerWorkerOptions {
  accountId: string;
  model: string;
  priceIn: string;
  priceOut: string;
  tps?: number;
  concurrency?: number;
  /** Engine arguments, e.g. ["--engine", "openai", "--engine-url", url]. */
  engine: string[];
}

export interface ServerWorker {
  workerId: string;
  process: ChildProcess;
  output(): string;
  printed(pattern: RegExp): Promise<string>;
  stop(): Promise<void>;
}

/** A child process's combined output, with a way to wait for a line to appear in it. */
export function captureOutput(child: ChildProcess) {
  let text = "";
  const waiters: { pattern: RegExp; resolve: (match: RegExpExecArray) => void }[] = [];
  const onData = (data: Buffer) => {
    text += data.toString();
    for (const waiter of [...waiters]) {
      const match = waiter.pattern.exec(text);
      if (match) {
        waiters.splice(waiters.indexOf(waiter), 1);
        waiter.resolve(match);
      }
    }
  };
  child.stdout?.on("data", onData);
  child.stderr?.on("data", onData);
  const exited = new Promise<{ code: number | null; signal: NodeJS.Signals | null }>((resolve) => {
    child.once("exit", (code, signal) => resolve({ code, signal }));
  });
  const matched = (pattern: RegExp): Promise<RegExpExecArray> => {
    const match = pattern.exec(text);
    if (match) return Promise.resolve(match);
    const seen = new Promise<RegExpExecArray>((resolve) => waiters.push({ pattern, resolve }));
    const died = exited.then(({ code, signal }) => {
      throw new Error(`process exited (code ${code}, signal ${signal}) before printing ${pattern}:\n${text}`);
    });
    return Promise.race([seen, died]);
  };
  return {
    output: () => text,
    exited,
    /** Resolves with the match once `pattern` appears; fails if the process exits first. */
    matched,
    printed: (pattern: RegExp): Promise<string> => matched(pattern).then((match) => match[0]),
  };
}

/** Starts `locallmarket server` over the test database; `args` adds flags (e.g. durations). */
export async function startServerProcess(
  database: TestDatabase,
  args: string[] = [],
): Promise<ServerProcess> {
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_NO_WARNINGS: "1" };
  delete env.DATABASE_URL;
  if (database.databaseUrl) env.DATABASE_URL = database.databaseUrl;
  const child = spawn(
    process.execPath,
    [
      CLI,
      "server",
      "--http-port",
      "0",
      "--grpc-port",
      "0",
      "--data-dir",
      database.dataDir,
      "--admin-token",
      ADMIN_TOKEN,
      "--log-level",
      process.env.LOCALLMARKET_TEST_LOG_LEVEL ?? "warn",
      ...args,
    ],
    { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], env },
  );
  const captured = captureOutput(child);
  const banner = await captured.printed(/control plane is up\.[\s\S]*worker gRPC:\s+(\S+)/);
  const httpUrl = /OpenAI API:\s+(\S+)\/v1/.exec(captured.output())?.[1];
  const grpcUrl = /worker gRPC:\s+(\S+)/.exec(banner)?.[1];
  if (!httpUrl || !grpcUrl) throw new Error(`cannot read the addresses from:\n${captured.output()}`);

  const admin = createClient(
    AdminService,
    createGrpcTransport({ baseUrl: grpcUrl, interceptors: [adminTokenHeaderInterceptor(ADMIN_TOKEN)] }),
  );
  const workers: ServerWorker[] = [];

  return {
    process: child,
    pid: child.pid ?? 0,
    httpUrl,
    grpcUrl,
    admin,
    openai: (apiKey) => new OpenAI({ baseURL: `${httpUrl}/v1`, apiKey, maxRetries: 0, timeout: 30_000 }),
    output: captured.output,
    printed: captured.printed,
    exited: captured.exited,
    alive: () => child.exitCode === null && child.signalCode === null,
    ...accountHelpers(admin),
    async worker(options) {
      const { workerToken, workerId } = await admin.createWorkerToken({
        accountId: options.accountId,
        label: options.model,
      });
      const worker = await startWorkerProcess(grpcUrl, workerToken, workerId, options);
      workers.push(worker);
      return worker;
    },
    async kill() {
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await captured.exited;
    },
    async stop() {
      await Promise.all(workers.map((worker) => worker.stop()));
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGTERM");
      await captured.exited;
    },
  };
}

async function startWorkerProcess(
  grpcUrl: string,
  workerToken: string,
  workerId: string,
  options: ServerWorkerOptions,
): Promise<ServerWorker> {
  const child = spawn(process.execPath, [CLI, ...workerArgs(grpcUrl, workerToken, options)], {
    cwd: REPO_ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NODE_NO_WARNINGS: "1" },
  });
  const captured = captureOutput(child);
  await captured.printed(new RegExp(`connected as worker ${workerId}`));
  return {
    workerId,
    process: child,
    output: captured.output,
    printed: captured.printed,
    async stop() {
      // Teardown only: the worker's own graceful stop is not under test here.
      if (child.exitCode === null && child.signalCode === null) child.kill("SIGKILL");
      await captured.exited;
    },
  };
}

/** The server process's resident memory in bytes, from /proc (Linux). */
export async function residentBytes(pid: number): Promise<number> {
  const status = await readFile(`/proc/${pid}/status`, "utf8");
  const kib = /VmRSS:\s+(\d+)\s+kB/.exec(status)?.[1];
  if (!kib) throw new Error(`no VmRSS in /proc/${pid}/status`);
  return Number(kib) * 1024;
}

/** An order's status by name ("running", "completed", …), for readable assertions. */
export function statusName(status: OrderStatus): string {
  return OrderStatus[status].toLowerCase();
}

/**
 * Polls `check` until it returns a value other than undefined, or fails after `timeoutMs` saying
 * what it waited for. For conditions no event announces (a settlement in another process).
 */
export async function eventually<T>(
  what: string,
  check: () => Promise<T | undefined>,
  timeoutMs = 15_000,
): Promise<T> {
  return vi.waitFor(
    async () => {
      const value = await check();
      if (value === undefined) throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
      return value;
    },
    { timeout: timeoutMs, interval: 100 },
  );
}

/** `promise`, or a failure naming `what` if it has not settled within `timeoutMs`. */
export async function within<T>(promise: Promise<T>, timeoutMs: number, what: string): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const expired = new Promise<never>((_, reject) => {
    timer = setTimeout(
      () => reject(new Error(`timed out after ${timeoutMs} ms waiting for ${what}`)),
      timeoutMs,
    );
  });
  try {
    return await Promise.race([promise, expired]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * A real market for end-to-end tests: the control plane listening on ephemeral ports over a fresh
 * database (PostgreSQL when DATABASE_URL is set, embedded PGlite otherwise), an AdminService gRPC
 * client, and worker agents started as separate processes through the `locallmarket` command.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { join, resolve } from "node:path";
import { type Client, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import OpenAI from "openai";
import { adminTokenHeaderInterceptor } from "../../admin-client/token-header.js";
import { MICROS_PER_CREDIT } from "../../common/credits.js";
import { AdminService } from "../../gen/locallmarket/v1/admin_pb.js";
import { parseServerConfig, type ServerConfig } from "../../server/config.js";
import { type ControlPlane, startControlPlane } from "../../server/control-plane.js";
import { PLATFORM_ACCOUNT_ID } from "../../server/market/store-port.js";
import { createTestDatabase } from "./database.js";

export const REPO_ROOT = resolve(import.meta.dirname, "../..");
const CLI = join(REPO_ROOT, "bin/locallmarket.js");

export interface TestMarket {
  plane: ControlPlane;
  admin: Client<typeof AdminService>;
  /** An `openai` SDK client for a consumer key: no retries, short timeout, so failures show. */
  openai(apiKey: string): OpenAI;
  /** Creates an account with a deposit (credits) and returns its id and API key. */
  account(name: string, depositCredits?: number): Promise<{ accountId: string; apiKey: string }>;
  /** The account's three books, µc; a provider's earnings are in `pending` until they mature. */
  balance(accountId: string): Promise<{ available: bigint; held: bigint; pending: bigint }>;
  /** Starts a worker process for the account and resolves once it is registered. */
  worker(options: WorkerProcessOptions): Promise<WorkerProcess>;
  close(): Promise<void>;
}

export interface WorkerProcessOptions {
  accountId: string;
  model: string;
  priceIn: string;
  priceOut: string;
  tps: number;
  concurrency?: number;
  /** Engine arguments, e.g. ["--engine", "openai", "--engine-url", url]. */
  engine: string[];
}

export interface WorkerProcess {
  workerId: string;
  process: ChildProcess;
  /** Everything the process printed so far. */
  output(): string;
  stop(): Promise<void>;
}

/** The `worker` command's arguments for a test worker process. */
export function workerArgs(
  grpcUrl: string,
  workerToken: string,
  options: Omit<WorkerProcessOptions, "accountId" | "tps"> & { tps?: number },
): string[] {
  return [
    "worker",
    "--server",
    grpcUrl,
    "--token",
    workerToken,
    "--model",
    options.model,
    "--price-in",
    options.priceIn,
    "--price-out",
    options.priceOut,
    "--tps",
    String(options.tps ?? 50),
    "--concurrency",
    String(options.concurrency ?? 1),
    ...options.engine,
  ];
}

/** Account and balance helpers over an AdminService client, shared by every kind of test market. */
export function accountHelpers(admin: Client<typeof AdminService>): Pick<TestMarket, "account" | "balance"> {
  return {
    async account(name, depositCredits = 0) {
      const created = await admin.createAccount({
        name,
        initialDeposit: BigInt(Math.round(depositCredits * 1_000_000)),
      });
      return { accountId: created.account?.id ?? "", apiKey: created.apiKey };
    },
    async balance(accountId) {
      const { balance } = await admin.getBalance({ accountId });
      return {
        available: balance?.available ?? 0n,
        held: balance?.held ?? 0n,
        pending: balance?.pending ?? 0n,
      };
    },
  };
}

export async function startTestMarket(overrides: Partial<ServerConfig> = {}): Promise<TestMarket> {
  const database = await createTestDatabase();
  const dataDir = database.dataDir;
  const config: ServerConfig = {
    ...parseServerConfig([], {}),
    // No blind canaries unless a test asks (trust-canaries.test.ts): a random one would add a job
    // and a verdict that tests counting jobs or audits do not expect.
    canaryBasisPoints: 0,
    httpPort: 0,
    grpcPort: 0,
    dataDir,
    databaseUrl: database.databaseUrl,
    adminToken: "test-admin-token",
    logLevel: process.env.LOCALLMARKET_TEST_LOG_LEVEL ?? "warn",
    ...overrides,
  };
  const plane = await startControlPlane(config);
  const admin = createClient(
    AdminService,
    createGrpcTransport({
      baseUrl: plane.grpcUrl,
      interceptors: [adminTokenHeaderInterceptor(config.adminToken ?? "")],
    }),
  );
  const workers: WorkerProcess[] = [];

  const market: TestMarket = {
    plane,
    admin,
    openai: (apiKey) =>
      new OpenAI({ baseURL: `${plane.httpUrl}/v1`, apiKey, maxRetries: 0, timeout: 20_000 }),
    ...accountHelpers(admin),
    async worker(options) {
      const { workerToken, workerId } = await admin.createWorkerToken({
        accountId: options.accountId,
        label: options.model,
      });
      const child = spawn(process.execPath, [CLI, ...workerArgs(plane.grpcUrl, workerToken, options)], {
        cwd: REPO_ROOT,
        stdio: ["ignore", "pipe", "pipe"],
        env: { ...process.env, NODE_NO_WARNINGS: "1" },
      });
      let output = "";
      child.stdout?.on("data", (data: Buffer) => {
        output += data.toString();
      });
      child.stderr?.on("data", (data: Buffer) => {
        output += data.toString();
      });
      const exited = once(child, "exit").then(([code]) => {
        throw new Error(`worker exited with code ${code} before connecting:\n${output}`);
      });
      await Promise.race([plane.registry.whenConnected(workerId), exited]);
      exited.catch(() => {});
      const worker: WorkerProcess = {
        workerId,
        process: child,
        output: () => output,
        async stop() {
          if (child.exitCode !== null || child.signalCode !== null) return;
          const gone = once(child, "exit");
          child.kill("SIGTERM");
          await gone;
        },
      };
      workers.push(worker);
      return worker;
    },
    async close() {
      await Promise.all(workers.map((worker) => worker.stop()));
      await plane.close({ graceMs: 0 });
      await database.drop();
    },
  };
  return market;
}

/** Sum of every account's books plus the external and platform accounts: must be zero. */
export async function ledgerIsBalanced(
  market: TestMarket,
): Promise<{ ok: boolean; sum: bigint; problems: string[] }> {
  const audit = await market.admin.auditLedger({});
  return { ok: audit.ok, sum: audit.entriesSum, problems: audit.problems };
}

export async function platformBalance(market: TestMarket): Promise<bigint> {
  return (await market.balance(PLATFORM_ACCOUNT_ID)).available;
}

export const credits = (amount: number): bigint => BigInt(Math.round(amount * Number(MICROS_PER_CREDIT)));

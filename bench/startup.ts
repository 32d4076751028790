/**
 * Start-up times of the commands people run, from the compiled build (`npm run bench` builds it
 * first): `locallmarket admin --help` and `server --help`, a control plane's first start on a fresh
 * embedded data dir and its restart on an existing one (until its "control plane is up" banner), and
 * a worker process until the server has welcomed it (fake engine, no model to load).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, readFileSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { adminTokenHeaderInterceptor } from "../admin-client/token-header.js";
import { AdminService } from "../gen/locallmarket/v1/admin_pb.js";
import { REPO_ROOT } from "../test/support/market.js";
import { startCommandProcess } from "./command-process.js";
import type { BenchContext } from "./context.js";
import type { LoadAnswer, LoadCommand } from "./load-consumer.js";
import { cpuMs } from "./proc.js";
import { median, mib, progress, type Report } from "./report.js";

const CLI = join(REPO_ROOT, "bin/locallmarket.js");
const ADMIN_TOKEN = "bench-admin-token";
const HELP_RUNS = 5;
const RESTARTS = 3;
const WORKER_RUNS = 3;
/** A start that takes longer than this is reported as a failure rather than waited for. */
const START_TIMEOUT_MS = 60_000;

export async function startupBenchmark(context: BenchContext, report: Report): Promise<void> {
  for (const command of ["admin", "server", "worker"]) {
    const times: number[] = [];
    for (let run = 0; run < HELP_RUNS; run++) {
      const started = performance.now();
      const child = spawnCli([command, "--help"]);
      const [code] = await once(child, "exit");
      if (code !== 0) throw new Error(`locallmarket ${command} --help exited with ${code}`);
      times.push(performance.now() - started);
    }
    report.add("startup", `locallmarket ${command} --help, median of ${HELP_RUNS}`, median(times), "ms", 0);
  }

  const dataDir = await mkdtemp(join(tmpdir(), "locallmarket-bench-startup-"));
  try {
    const first = await startServer(dataDir);
    report.add("startup", "server first start, fresh embedded data dir", first.readyMs, "ms", 0);
    await first.stop();

    const restarts: number[] = [];
    let server: StartedServer | undefined;
    for (let run = 0; run < RESTARTS; run++) {
      await server?.stop();
      server = await startServer(dataDir);
      restarts.push(server.readyMs);
    }
    report.add(
      "startup",
      `server restart, existing data dir, median of ${RESTARTS}`,
      median(restarts),
      "ms",
      0,
    );

    // The last restarted server stays up for the workers.
    const running = server as StartedServer;
    try {
      const engine = await context.engine(16);
      progress(`startup: fake engine at ${engine.url}; starting ${WORKER_RUNS} workers one after another`);
      const admin = createClient(
        AdminService,
        createGrpcTransport({
          baseUrl: running.grpcUrl,
          interceptors: [adminTokenHeaderInterceptor(ADMIN_TOKEN)],
        }),
      );
      const { account } = await admin.createAccount({ name: "startup-provider" });
      progress(`startup: provider account ${account?.id}`);
      const workerTimes: number[] = [];
      for (let run = 0; run < WORKER_RUNS; run++) {
        const { workerToken, workerId } = await admin.createWorkerToken({
          accountId: account?.id ?? "",
          label: `startup-${run}`,
        });
        const started = performance.now();
        const worker = spawnCli([
          "worker",
          "--server",
          running.grpcUrl,
          "--token",
          workerToken,
          "--model",
          "bench-startup",
          "--price-in",
          "1",
          "--price-out",
          "1",
          "--tps",
          "100",
          "--engine",
          "openai",
          "--engine-url",
          engine.url,
        ]);
        try {
          await waitForOutput(worker, new RegExp(`connected as worker ${workerId}`));
          workerTimes.push(performance.now() - started);
        } finally {
          if (worker.exitCode === null && worker.signalCode === null) {
            const exited = once(worker, "exit");
            worker.kill("SIGKILL");
            await exited;
          }
        }
      }
      report.add("startup", `worker connected, median of ${WORKER_RUNS}`, median(workerTimes), "ms", 0);
      await embeddedMemory(context, report, running, admin, account?.id ?? "", engine.url);
    } finally {
      await running.stop();
    }
  } finally {
    await rm(dataDir, { recursive: true, force: true });
  }
}

interface StartedServer {
  readyMs: number;
  grpcUrl: string;
  httpUrl: string;
  pid: number;
  stop(): Promise<void>;
}

async function startServer(dataDir: string): Promise<StartedServer> {
  const started = performance.now();
  const child = spawnCli(
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
    // The embedded database is what a zero-setup start uses; PostgreSQL start-up is not measured.
    { withoutDatabaseUrl: true },
  );
  const banner = await waitForOutput(child, /control plane is up\.[\s\S]*worker gRPC:\s+(\S+)/);
  const readyMs = performance.now() - started;
  const grpcUrl = /worker gRPC:\s+(\S+)/.exec(banner)?.[1] ?? "";
  const httpUrl = /OpenAI API:\s+(\S+)\/v1/.exec(banner)?.[1] ?? "";
  progress(`startup: server ready in ${Math.round(readyMs)} ms on ${dataDir}`);
  return {
    readyMs,
    grpcUrl,
    httpUrl,
    pid: child.pid as number,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      const exited = once(child, "exit");
      child.kill("SIGTERM");
      await exited;
    },
  };
}

/** Every process started here, so a run that gives up (its watchdog exits) leaves none behind. */
const children = new Set<ChildProcess>();
process.once("exit", () => {
  for (const child of children) child.kill("SIGKILL");
});

function spawnCli(args: string[], options: { withoutDatabaseUrl?: boolean } = {}): ChildProcess {
  const env: NodeJS.ProcessEnv = { ...process.env, NODE_NO_WARNINGS: "1" };
  if (options.withoutDatabaseUrl) delete env.DATABASE_URL;
  const child = spawn(process.execPath, [CLI, ...args], {
    cwd: REPO_ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    env,
  });
  children.add(child);
  child.once("exit", () => children.delete(child));
  return child;
}

/** Resolves with the output so far once it matches; fails if the process exits or takes too long. */
function waitForOutput(child: ChildProcess, pattern: RegExp): Promise<string> {
  return new Promise((resolve, reject) => {
    let text = "";
    const timer = setTimeout(() => {
      cleanup();
      child.kill("SIGKILL");
      reject(new Error(`no ${pattern} within ${START_TIMEOUT_MS / 1000} s:\n${text}`));
    }, START_TIMEOUT_MS);
    const onData = (data: Buffer) => {
      text += data.toString();
      if (pattern.test(text)) {
        cleanup();
        resolve(text);
      }
    };
    const onExit = (code: number | null) => {
      cleanup();
      reject(new Error(`the process exited with ${code} before printing ${pattern}:\n${text}`));
    };
    const cleanup = () => {
      clearTimeout(timer);
      child.stdout?.off("data", onData);
      child.stderr?.off("data", onData);
      child.off("exit", onExit);
    };
    child.stdout?.on("data", onData);
    child.stderr?.on("data", onData);
    child.once("exit", onExit);
  });
}

/** Workers and consumers of the memory phase, and the requests each consumer makes per round. */
const MEMORY_WORKERS = 4;
const MEMORY_WORKER_CONCURRENCY = 8;
const MEMORY_CONSUMERS = 64;
const MEMORY_REQUESTS_PER_ROUND = 40;
const MEMORY_ROUNDS = 3;
/** The target for a server on its embedded database. */
const RSS_TARGET_MIB = 300;

/**
 * The compiled server on its embedded database, in its own process, under load: its RSS idle
 * (workers connected, accounts made) and at its highest while 64 consumers make 16-token requests
 * (MEMORY_ROUNDS rounds, sampled from /proc every 50 ms by this process), and its CPU per request
 * (/proc/PID/stat: the control plane and its database thread).
 */
async function embeddedMemory(
  context: BenchContext,
  report: Report,
  server: StartedServer,
  admin: ReturnType<typeof createClient<typeof AdminService>>,
  providerAccountId: string,
  engineUrl: string,
): Promise<void> {
  if (!existsSync(`/proc/${server.pid}/status`)) {
    progress("startup: no /proc here; the server's memory under load is not measured");
    return;
  }
  const workers: ChildProcess[] = [];
  const consumer = await startCommandProcess<LoadCommand>("load-consumer.ts", "load consumer", progress);
  context.onKill(consumer.kill);
  try {
    for (let i = 0; i < MEMORY_WORKERS; i++) {
      const { workerToken, workerId } = await admin.createWorkerToken({
        accountId: providerAccountId,
        label: `memory-${i}`,
      });
      const worker = spawnCli([
        ...["worker", "--server", server.grpcUrl, "--token", workerToken, "--model", "bench-startup"],
        ...["--price-in", "1", "--price-out", "1", "--tps", "100", "--engine", "openai"],
        ...["--engine-url", engineUrl, "--concurrency", String(MEMORY_WORKER_CONCURRENCY)],
      ]);
      workers.push(worker);
      await waitForOutput(worker, new RegExp(`connected as worker ${workerId}`));
    }
    const apiKeys: string[] = [];
    for (let i = 0; i < MEMORY_CONSUMERS; i++) {
      const { account } = await admin.createAccount({
        name: `memory-consumer-${i}`,
        initialDeposit: 10n ** 12n,
      });
      const { apiKey } = await admin.createApiKey({ accountId: account?.id ?? "", label: "bench" });
      apiKeys.push(apiKey);
    }
    const idle = procStatus(server.pid).rss;
    let peak = idle;
    const sampler = setInterval(() => {
      peak = Math.max(peak, procStatus(server.pid).rss);
    }, 50);
    const cpuBefore = cpuMs([server.pid]) ?? 0;
    let completed = 0;
    try {
      for (let round = 0; round < MEMORY_ROUNDS; round++) {
        const from = round * MEMORY_REQUESTS_PER_ROUND;
        const answer = await consumer.ask<LoadAnswer>({
          op: "load",
          url: `${server.httpUrl}/v1`,
          apiKeys,
          model: "bench-startup",
          tokens: 16,
          from,
          to: from + MEMORY_REQUESTS_PER_ROUND,
          giveUpMs: 60_000,
        });
        const errors = Object.values(answer.errors).reduce((sum, count) => sum + count, 0);
        if (errors > 0)
          throw new Error(`memory phase: ${errors} requests failed: ${JSON.stringify(answer.errors)}`);
        completed += answer.completed;
        progress(
          `startup: memory round ${round + 1}/${MEMORY_ROUNDS}: ${answer.completed} requests in ${answer.seconds.toFixed(1)} s, server RSS ${mib(procStatus(server.pid).rss).toFixed(1)} MiB`,
        );
      }
    } finally {
      clearInterval(sampler);
    }
    const cpuPerRequest = ((cpuMs([server.pid]) ?? 0) - cpuBefore) / completed;
    peak = Math.max(peak, procStatus(server.pid).highWater);
    const streams = `${MEMORY_CONSUMERS} consumers × ${MEMORY_ROUNDS * MEMORY_REQUESTS_PER_ROUND} requests of 16 tokens, ${MEMORY_WORKERS} workers`;
    report.add(
      "startup",
      "server on PGlite (compiled, own process): RSS idle, workers connected",
      mib(idle),
      "MiB",
    );
    report.add(
      "startup",
      `server on PGlite: peak RSS under ${streams} (target < ${RSS_TARGET_MIB})`,
      mib(peak),
      "MiB",
    );
    report.add(
      "startup",
      "server on PGlite: CPU per request (control plane + database thread)",
      cpuPerRequest,
      "ms",
    );
  } finally {
    for (const worker of workers) worker.kill("SIGKILL");
    await consumer.close();
  }
}

/** VmRSS and VmHWM of a process, in bytes. */
function procStatus(pid: number): { rss: number; highWater: number } {
  const status = readFileSync(`/proc/${pid}/status`, "utf8");
  const kib = (field: string) => Number(new RegExp(`${field}:\\s+(\\d+)`).exec(status)?.[1] ?? 0) * 1024;
  return { rss: kib("VmRSS"), highWater: kib("VmHWM") };
}

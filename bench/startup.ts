/**
 * Start-up times of the commands people run, from the compiled build (`npm run bench` builds it
 * first): `locallmarket admin --help` and `server --help`, a control plane's first start on a fresh
 * embedded data dir and its restart on an existing one (until its "control plane is up" banner), and
 * a worker process until the server has welcomed it (fake engine, no model to load).
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { adminTokenHeaderInterceptor } from "../admin-client/token-header.js";
import { AdminService } from "../gen/locallmarket/v1/admin_pb.js";
import { REPO_ROOT } from "../test/support/market.js";
import type { BenchContext } from "./context.js";
import { median, progress, type Report } from "./report.js";

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
  progress(`startup: server ready in ${Math.round(readyMs)} ms on ${dataDir}`);
  return {
    readyMs,
    grpcUrl,
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

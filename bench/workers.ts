/**
 * Worker agents for the benchmarks: real `locallmarket worker` processes, like the test market's,
 * writing their output (a line per job) to a file, not to a pipe: the benchmark process hosts the
 * control plane, whose CPU is what it measures, so it must not wake up to read a worker's log
 * line after every job, as it did (BENCHMARKS.md, eighth round). The file gives the tail of the
 * output and the jobs a worker refused (assigned while already full) when asked.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { closeSync, mkdtempSync, openSync, readSync, rmSync, statSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { REPO_ROOT, type TestMarket } from "../test/support/market.js";

export interface BenchWorker {
  workerId: string;
  /** The worker process's id (its CPU time can be read from /proc). */
  pid: number | undefined;
  /** Jobs this worker refused so far ("job … refused" lines). */
  refusedJobs(): number;
  /** The last few kilobytes it printed. */
  outputTail(): string;
  stop(): Promise<void>;
  /** Ends the process at once (on a timeout or Ctrl-C). */
  kill(): void;
}

const TAIL_BYTES = 4096;

export async function startWorker(
  market: TestMarket,
  options: { accountId: string; model: string; engineUrl: string; concurrency: number; name: string },
): Promise<BenchWorker> {
  const { workerToken, workerId } = await market.admin.createWorkerToken({
    accountId: options.accountId,
    label: options.name,
  });
  const dir = mkdtempSync(join(tmpdir(), "llm-bench-worker-"));
  const log = join(dir, "output.log");
  const output = openSync(log, "a");
  const child = spawn(
    process.execPath,
    [
      join(REPO_ROOT, "bin/locallmarket.js"),
      "worker",
      "--server",
      market.plane.grpcUrl,
      "--token",
      workerToken,
      "--model",
      options.model,
      "--price-in",
      "1",
      "--price-out",
      "2",
      "--tps",
      "1000",
      "--concurrency",
      String(options.concurrency),
      "--name",
      options.name,
      "--engine",
      "openai",
      "--engine-url",
      options.engineUrl,
    ],
    { cwd: REPO_ROOT, stdio: ["ignore", output, output], env: { ...process.env, NODE_NO_WARNINGS: "1" } },
  );
  closeSync(output);
  const exited = once(child, "exit");
  const refused = refusalCounter(log);
  await Promise.race([
    market.plane.registry.whenConnected(workerId),
    exited.then(([code]) => {
      throw new Error(`worker exited with code ${code} before connecting:\n${tailOf(log)}`);
    }),
  ]);
  return {
    workerId,
    pid: child.pid,
    refusedJobs: () => refused.count(),
    outputTail: () => tailOf(log),
    async stop() {
      if (child.exitCode === null && child.signalCode === null) {
        child.kill("SIGTERM");
        await exited;
      }
      rmSync(dir, { recursive: true, force: true });
    },
    kill: () => child.kill("SIGKILL"),
  };
}

/** The last TAIL_BYTES of a file (a character cut in two at its start shows as U+FFFD). */
function tailOf(path: string): string {
  const size = statSync(path).size;
  const length = Math.min(size, TAIL_BYTES);
  const buffer = Buffer.alloc(length);
  const fd = openSync(path, "r");
  try {
    readSync(fd, buffer, 0, length, size - length);
  } finally {
    closeSync(fd);
  }
  return buffer.toString();
}

/** Counts the "job … refused: …" lines of a growing file, reading only what was added since. */
function refusalCounter(path: string): { count(): number } {
  let offset = 0;
  let partial = "";
  let refused = 0;
  return {
    count() {
      const size = statSync(path).size;
      if (size > offset) {
        const buffer = Buffer.alloc(size - offset);
        const fd = openSync(path, "r");
        try {
          readSync(fd, buffer, 0, buffer.length, offset);
        } finally {
          closeSync(fd);
        }
        offset = size;
        const lines = (partial + buffer.toString()).split("\n");
        partial = lines.pop() ?? "";
        for (const line of lines) if (/ refused: /.test(line)) refused++;
      }
      return refused;
    },
  };
}

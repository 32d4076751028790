/**
 * Worker agents for the benchmarks: real `locallmarket worker` processes, like the test market's,
 * but keeping only the tail of their output (a long run logs every job) and counting the jobs they
 * refused (assigned while already full).
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
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
    { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], env: { ...process.env, NODE_NO_WARNINGS: "1" } },
  );
  let tail = "";
  let partial = "";
  let refused = 0;
  const onData = (data: Buffer) => {
    const text = data.toString();
    tail = (tail + text).slice(-TAIL_BYTES);
    const lines = (partial + text).split("\n");
    partial = lines.pop() ?? "";
    for (const line of lines) if (/ refused: /.test(line)) refused++;
  };
  child.stdout.on("data", onData);
  child.stderr.on("data", onData);
  const exited = once(child, "exit");
  await Promise.race([
    market.plane.registry.whenConnected(workerId),
    exited.then(([code]) => {
      throw new Error(`worker exited with code ${code} before connecting:\n${tail}`);
    }),
  ]);
  return {
    workerId,
    pid: child.pid,
    refusedJobs: () => refused,
    outputTail: () => tail,
    async stop() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      await exited;
    },
    kill: () => child.kill("SIGKILL"),
  };
}

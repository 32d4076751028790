/**
 * LocalLMarket benchmarks: `npm run bench` (embedded PGlite) or `DATABASE_URL=... npm run bench`
 * (PostgreSQL for the market; the ledger benchmark then runs on both). See BENCHMARKS.md.
 */
import { availableParallelism, cpus, loadavg } from "node:os";
import { parseArgs } from "node:util";
import { concurrencyBenchmark } from "./concurrency.js";
import { type BenchConfig, BenchContext } from "./context.js";
import { latencyBenchmark } from "./latency.js";
import { ledgerBenchmark } from "./ledger.js";
import { pipeBenchmark } from "./pipe.js";
import { relayBenchmark } from "./relay.js";
import { progress, Report } from "./report.js";
import { startupBenchmark } from "./startup.js";
import { trustBenchmark } from "./trust-run.js";

/** The whole run is stopped after this long (a normal one takes a few minutes; see --help). */
const RUN_TIMEOUT_MS = 15 * 60_000;

type Benchmark = (context: BenchContext, report: Report) => Promise<void>;

const BENCHMARKS: Record<string, { run: Benchmark; summary: string }> = {
  relay: {
    run: relayBenchmark,
    summary: "one long streamed completion: tokens/s end to end vs. the engine alone, overhead per token",
  },
  latency: {
    run: latencyBenchmark,
    summary: "sequential short completions (openai SDK): p50/p95/p99 latency and time to first token",
  },
  concurrency: {
    run: concurrencyBenchmark,
    summary: "many consumers against several workers: requests/s, errors, ledger audit; also memory",
  },
  pipe: {
    run: pipeBenchmark,
    summary:
      "200-token streams side by side (engine direct, a two-hop Node byte pipe, the platform): TTFT, 1/64/512 streams, paced",
  },
  ledger: {
    run: ledgerBenchmark,
    summary: "SqlMarketStore openOrder+settleOrder pairs/s, sequential and concurrent, PGlite (+ PostgreSQL)",
  },
  trust: {
    run: trustBenchmark,
    summary:
      "audits on real tiny models: detection and false alarms per scenario, tokens to decide, verifier cost",
  },
  startup: {
    run: startupBenchmark,
    summary: "compiled commands: admin/server/worker --help, server first start and restart, worker connect",
  },
};
/** `--only memory` is the concurrency run, which measures memory around itself. */
const ALIASES: Record<string, string> = { memory: "concurrency" };

const SIZES: { flag: string; key: keyof BenchConfig; fallback: number; help: string }[] = [
  {
    flag: "relay-tokens",
    key: "relayTokens",
    fallback: 5_000,
    help: "tokens in the relay benchmark's stream",
  },
  {
    flag: "relay-runs",
    key: "relayRuns",
    fallback: 5,
    help: "measured relay runs per path (after 3 warm-ups)",
  },
  {
    flag: "latency-requests",
    key: "latencyRequests",
    fallback: 200,
    help: "sequential requests per latency series",
  },
  { flag: "short-tokens", key: "shortTokens", fallback: 16, help: "tokens in a short completion" },
  { flag: "workers", key: "workers", fallback: 4, help: "worker processes in the concurrency run" },
  {
    flag: "worker-concurrency",
    key: "workerConcurrency",
    fallback: 4,
    help: "jobs each of those workers runs at once",
  },
  { flag: "consumers", key: "consumers", fallback: 64, help: "concurrent consumers (one account each)" },
  {
    flag: "requests-per-consumer",
    key: "requestsPerConsumer",
    fallback: 20,
    help: "requests each consumer makes",
  },
  {
    flag: "pipe-streams",
    key: "pipeStreams",
    fallback: 100,
    help: "sequential streams per path for the pipe benchmark's time to first token",
  },
  {
    flag: "ledger-orders",
    key: "ledgerOrders",
    fallback: 400,
    help: "settlements per ledger series (a concurrent one runs at least 25 per lane)",
  },
  {
    flag: "ledger-lanes",
    key: "ledgerLanes",
    fallback: 16,
    help: "concurrent lanes in the ledger benchmark (a second series runs 4× as many)",
  },
  {
    flag: "trust-jobs",
    key: "trustJobs",
    fallback: 200,
    help: "audited answers per trust scenario",
  },
  { flag: "trust-tokens", key: "trustTokens", fallback: 100, help: "tokens per audited answer" },
];

function usage(): string {
  const names = Object.entries(BENCHMARKS).map(([name, { summary }]) => `  ${name.padEnd(12)} ${summary}`);
  const sizes = SIZES.map(
    (size) => `${`  --${size.flag} N`.padEnd(30)}${size.help} (default ${size.fallback})`,
  );
  return [
    "Usage: npm run bench [-- options]",
    "",
    "Benchmarks LocalLMarket with its real parts connected on loopback: the control plane (in this",
    "process, over a fresh database), worker processes over gRPC, a fake OpenAI-compatible engine",
    "process (no model, delay 0) and the openai SDK or raw fetch as the consumer. Prints progress",
    "lines, then a table. Takes a few minutes on 2 vCPUs; a run is stopped after 15 minutes.",
    "",
    "Database: embedded PGlite in a temporary directory, or, with DATABASE_URL=postgres://...,",
    "a fresh database created on that server and dropped afterwards (the ledger benchmark then",
    "runs on PGlite and on PostgreSQL).",
    "",
    "Benchmarks (all by default):",
    ...names,
    "  memory       alias of concurrency (RSS and heap are measured around that run)",
    "",
    "Options:",
    "  --only NAME[,NAME]          run only these benchmarks",
    ...sizes,
    "  --help                      show this help",
    "",
    "Exit status: 0, or 1 when a benchmark failed, a request errored or a money invariant broke.",
  ].join("\n");
}

async function main(): Promise<number> {
  const { values } = parseArgs({
    options: {
      help: { type: "boolean", short: "h" },
      only: { type: "string", multiple: true },
      ...Object.fromEntries(SIZES.map((size) => [size.flag, { type: "string" as const }])),
    },
    strict: true,
    allowPositionals: false,
  });
  if (values.help) {
    process.stdout.write(`${usage()}\n`);
    return 0;
  }
  const config = {} as BenchConfig;
  for (const size of SIZES) {
    const raw = values[size.flag as keyof typeof values] as string | undefined;
    const value = raw === undefined ? size.fallback : Number(raw);
    if (!Number.isInteger(value) || value < 1)
      throw new UsageError(`--${size.flag} must be a positive integer`);
    config[size.key] = value;
  }
  const requested = (values.only ?? []).flatMap((item) => item.split(",")).map((name) => name.trim());
  const selected =
    requested.length === 0 ? Object.keys(BENCHMARKS) : requested.map((name) => ALIASES[name] ?? name);
  for (const name of selected) {
    if (!BENCHMARKS[name]) throw new UsageError(`unknown benchmark "${name}"; see --help`);
  }

  const report = new Report();
  const context = new BenchContext(config);
  const cpu = cpus()[0]?.model.trim() ?? "unknown CPU";
  progress(
    `LocalLMarket benchmarks on Node ${process.version}, ${availableParallelism()} vCPU (${cpu}), database: ${process.env.DATABASE_URL ? "PostgreSQL (DATABASE_URL)" : "embedded PGlite"}`,
  );
  const [load] = loadavg();
  if ((load ?? 0) > availableParallelism() / 2) {
    progress(
      `warning: the 1-minute load average is ${load?.toFixed(2)} before starting; other work on this machine will skew the figures`,
    );
  }
  const started = performance.now();
  // Bounded in time: a hung run ends here, taking its child processes with it.
  const watchdog = setTimeout(() => {
    progress(`giving up: the run took longer than ${RUN_TIMEOUT_MS / 1000} s`);
    context.kill();
    process.exit(1);
  }, RUN_TIMEOUT_MS);
  watchdog.unref();
  let interrupted = false;
  process.on("SIGINT", () => {
    // Once (tsx relays the terminal's Ctrl-C a second time): children first, then a short chance
    // to remove the temporary database.
    if (interrupted) return;
    interrupted = true;
    context.kill();
    const grace = new Promise((resolve) => setTimeout(resolve, 3_000).unref());
    void Promise.race([context.close(), grace]).finally(() => process.exit(130));
  });
  try {
    for (const name of [...new Set(selected)]) {
      progress(`${name}: starting`);
      try {
        await (BENCHMARKS[name] as (typeof BENCHMARKS)[string]).run(context, report);
      } catch (error) {
        report.failed = true;
        report.add(name, "FAILED", error instanceof Error ? error.message : String(error));
      }
    }
  } finally {
    await context.close();
    clearTimeout(watchdog);
  }
  progress(
    `done in ${((performance.now() - started) / 1000).toFixed(1)} s; load average now ${loadavg()
      .map((value) => value.toFixed(2))
      .join(" ")}`,
  );
  process.stdout.write(`\n${report.table()}\n`);
  if (report.failed) process.stdout.write("\nSOME CHECKS FAILED: see the lines above.\n");
  return report.failed ? 1 : 0;
}

class UsageError extends Error {}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (error: unknown) => {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
    process.exitCode =
      error instanceof UsageError || (error as { code?: string }).code?.startsWith("ERR_PARSE_ARGS") ? 2 : 1;
  },
);

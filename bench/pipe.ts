/**
 * Side by side: the same streamed workload (answers of PIPE_TOKENS tokens from the fake engine)
 * read straight from the engine, through a two-hop Node byte pipe (two minimal HTTP proxies in a
 * chain, each its own process: the floor for two relay hops) and through the platform (control
 * plane in this process + a worker process). The consumers run in a process of their own
 * (bench/pipe-consumer.ts), so this process's CPU time is the control plane's (with its embedded
 * database, if any).
 *
 * For each path: the time to first token it adds over the engine (p50 / p99); tokens/s delivered
 * with 1, 64 and 512 concurrent streams from an engine that answers at once; the same streams
 * paced at PACED_TOKENS_PER_SECOND tokens/s each (64 at once) with the inter-chunk gap
 * (p50 / p99); and the CPU time of its relaying processes, per 1,000 tokens and per request, the
 * control plane's and the worker's apart.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";
import type { BenchContext } from "./context.js";
import { startEngineProcess } from "./engine.js";
import type { ConsumerPath, LoadAnswer, LoadCommand, TtftAnswer, TtftCommand } from "./pipe-consumer.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "pipe";
const MODEL = "bench-pipe";
const PACED_MODEL = "bench-pipe-paced";
const PIPE_TOKENS = 200;
/** The paced engine's rate per stream (a token every 10 ms), about a fast GPU's. */
const PACED_TOKENS_PER_SECOND = 100;
/** Unmeasured sequential rounds first, so that every path runs on warm (optimized) code. */
const WARM_UP_ROUNDS = 10;
/** Unpaced phases: concurrent lanes × streams read one after another in each lane. */
const UNPACED_PHASES: ReadonlyArray<readonly [number, number]> = [
  [1, 100],
  [64, 4],
  [512, 1],
];
/**
 * Paced phases: every stream at once, one per lane. (512 paced streams are left out: on the
 * platform their admission alone takes most of a minute on 2 cores with embedded PGlite, which
 * would measure the database rather than the relay and keep the run from staying bounded.)
 */
const PACED_PHASES: ReadonlyArray<readonly [number, number]> = [[64, 1]];
/** Slots of each platform worker: every stream of the largest phase runs at once. */
const WORKER_CONCURRENCY = 512;
/** Linux's USER_HZ: /proc/PID/stat counts CPU time in these ticks. */
const CLOCK_TICKS_PER_SECOND = 100;

interface Path extends ConsumerPath {
  /** Processes that relay on this path (CPU read from /proc), besides this process. */
  relayPids: number[];
  /** Whether this process relays too (the control plane runs here). */
  relaysHere: boolean;
}

interface Phase extends LoadAnswer {
  tokensPerSecond: number;
  /** CPU of the path's relaying processes (proxies or worker), when /proc could be read. */
  relayCpuMs: number | null;
  /** CPU of this process: the control plane on the platform path, next to nothing elsewhere. */
  ownCpuMs: number;
  /** CPU of the consumer process. */
  consumerCpuMs: number | null;
}

export async function pipeBenchmark(context: BenchContext, report: Report): Promise<void> {
  const engine = await context.engine(PIPE_TOKENS);
  const paced = await startEngineProcess({ tokens: PIPE_TOKENS, delayMs: 1000 / PACED_TOKENS_PER_SECOND });
  const proxies: Proxy[] = [];
  const consumer = await startConsumer();
  try {
    const chain = async (origin: string) => {
      const second = await startProxy(origin);
      proxies.push(second);
      const first = await startProxy(second.url);
      proxies.push(first);
      return { url: `${first.url}/v1`, pids: [first.pid, second.pid] };
    };
    const pipe = await chain(new URL(engine.url).origin);
    const pacedPipe = await chain(new URL(paced.url).origin);
    const market = await context.market();
    const {
      workers: [worker],
    } = await context.startWorkers(MODEL, engine.url, 1, WORKER_CONCURRENCY);
    const {
      workers: [pacedWorker],
    } = await context.startWorkers(PACED_MODEL, paced.url, 1, WORKER_CONCURRENCY);
    const account = await market.account("pipe-consumer", 1_000_000);
    const pathsTo = (engineUrl: string, pipeChain: { url: string; pids: number[] }, workerPid?: number) => [
      {
        label: "engine direct",
        url: engineUrl,
        apiKey: "none",
        everyDelta: true,
        relayPids: [],
        relaysHere: false,
      },
      {
        label: "two-hop pipe",
        url: pipeChain.url,
        apiKey: "none",
        everyDelta: true,
        relayPids: pipeChain.pids,
        relaysHere: false,
      },
      {
        label: "platform",
        url: `${market.plane.httpUrl}/v1`,
        apiKey: account.apiKey,
        // The platform may merge tokens into fewer SSE events: its usage is what counts.
        everyDelta: false,
        relayPids: workerPid === undefined ? [] : [workerPid],
        relaysHere: true,
      },
    ];
    const paths: Path[] = pathsTo(engine.url, pipe, worker?.pid);
    const pacedPaths: Path[] = pathsTo(paced.url, pacedPipe, pacedWorker?.pid);

    // Time to first token: rounds of one stream per path, interleaved so that a change in the
    // machine's load touches every path alike.
    const rounds = context.config.pipeStreams;
    const { firstTokenMs } = await consumer.ask<TtftAnswer>({
      op: "ttft",
      paths: paths.map(consumerPath),
      rounds,
      warmUp: WARM_UP_ROUNDS,
      model: MODEL,
      tokens: PIPE_TOKENS,
    } satisfies TtftCommand);
    progress(`${NAME}: ${rounds} sequential streams per path (interleaved) for the time to first token`);
    const direct = firstTokenMs["engine direct"] ?? [];
    const added = (label: string, p: number) =>
      percentile(firstTokenMs[label] ?? [], p) - percentile(direct, p);
    report.add(
      NAME,
      "time to first token, engine direct, p50 / p99",
      `${ms(percentile(direct, 50))} / ${ms(percentile(direct, 99))}`,
      "ms",
    );
    for (const label of ["two-hop pipe", "platform"]) {
      const ratio =
        label === "platform"
          ? ` (p50 ${(added(label, 50) / added("two-hop pipe", 50)).toFixed(1)}× the pipe)`
          : "";
      report.add(
        NAME,
        `time to first token added, ${label}, p50 / p99${ratio}`,
        `+${ms(added(label, 50))} / +${ms(added(label, 99))}`,
        "ms",
      );
    }

    for (const [lanes, perLane] of UNPACED_PHASES) {
      await runPhase(report, consumer, paths, MODEL, lanes, perLane, false);
    }
    for (const [lanes, perLane] of PACED_PHASES) {
      await runPhase(report, consumer, pacedPaths, PACED_MODEL, lanes, perLane, true);
    }
  } finally {
    await Promise.allSettled([consumer.close(), paced.close(), ...proxies.map((proxy) => proxy.close())]);
  }
}

function consumerPath(path: Path): ConsumerPath {
  return { label: path.label, url: path.url, apiKey: path.apiKey, everyDelta: path.everyDelta };
}

async function runPhase(
  report: Report,
  consumer: Consumer,
  paths: Path[],
  model: string,
  lanes: number,
  perLane: number,
  paced: boolean,
): Promise<void> {
  const streams = `${lanes} stream${lanes === 1 ? "" : "s"}${paced ? ` paced at ${PACED_TOKENS_PER_SECOND} tokens/s` : ""}`;
  const phases = new Map<string, Phase>();
  for (const path of paths) {
    const phase = await throughput(consumer, path, model, lanes, perLane);
    phases.set(path.label, phase);
    progress(
      `${NAME}: ${path.label}, ${lanes} × ${perLane} streams of ${PIPE_TOKENS} tokens${paced ? " (paced)" : ""}: ${Math.round(phase.tokensPerSecond)} tokens/s`,
    );
  }
  const pipe = phases.get("two-hop pipe");
  for (const path of paths) {
    const phase = phases.get(path.label) as Phase;
    const share =
      path.label === "platform" && pipe
        ? ` (${Math.round((100 * phase.tokensPerSecond) / pipe.tokensPerSecond)} % of the pipe)`
        : "";
    report.add(NAME, `tokens/s, ${streams}, ${path.label}${share}`, phase.tokensPerSecond, "tokens/s", 0);
  }
  const direct = phases.get("engine direct") as Phase;
  for (const path of paths) {
    const phase = phases.get(path.label) as Phase;
    if (paced || lanes > 1) {
      // Under load the time to first token includes waiting for the CPU: reported as measured.
      report.add(
        NAME,
        `  time to first token, ${streams}, ${path.label}, p50 / p99`,
        `${ms(phase.firstTokenP50)} / ${ms(phase.firstTokenP99)}`,
        "ms",
      );
    }
    if (paced) {
      report.add(
        NAME,
        `  inter-chunk gap, ${streams}, ${path.label}, p50 / p99${path.label === "engine direct" ? "" : ` (engine ${ms(direct.gapP50)} / ${ms(direct.gapP99)})`}`,
        `${ms(phase.gapP50)} / ${ms(phase.gapP99)}`,
        "ms",
      );
    }
  }
  for (const path of paths) {
    const phase = phases.get(path.label) as Phase;
    const perKilo = (cpuMs: number) => cpuMs / (phase.tokens / 1000);
    const perRequest = (cpuMs: number) => cpuMs / phase.streams;
    if (path.label === "engine direct") {
      if (phase.consumerCpuMs !== null) {
        report.add(
          NAME,
          `  CPU per 1,000 tokens, ${streams}, consumer alone`,
          perKilo(phase.consumerCpuMs),
          "ms",
          2,
        );
      }
    } else if (phase.relayCpuMs !== null && !path.relaysHere) {
      report.add(
        NAME,
        `  CPU per 1,000 tokens, ${streams}, ${path.label} (its 2 proxy processes)`,
        perKilo(phase.relayCpuMs),
        "ms",
        2,
      );
    } else if (phase.relayCpuMs !== null) {
      const total = phase.relayCpuMs + phase.ownCpuMs;
      const ratio =
        pipe?.relayCpuMs != null
          ? ` (${(total / (pipe.relayCpuMs * (phase.tokens / pipe.tokens))).toFixed(1)}× the pipe)`
          : "";
      report.add(
        NAME,
        `  CPU per 1,000 tokens, ${streams}, ${path.label} (control plane + worker)${ratio}`,
        perKilo(total),
        "ms",
        2,
      );
      report.add(
        NAME,
        "    control plane / worker, per 1,000 tokens",
        `${perKilo(phase.ownCpuMs).toFixed(2)} / ${perKilo(phase.relayCpuMs).toFixed(2)}`,
        "ms",
      );
      report.add(
        NAME,
        "    control plane / worker, per request",
        `${perRequest(phase.ownCpuMs).toFixed(2)} / ${perRequest(phase.relayCpuMs).toFixed(2)}`,
        "ms",
      );
    }
  }
}

async function throughput(
  consumer: Consumer,
  path: Path,
  model: string,
  lanes: number,
  perLane: number,
): Promise<Phase> {
  const relayBefore = cpuMs(path.relayPids);
  const consumerBefore = cpuMs([consumer.pid]);
  const ownBefore = process.cpuUsage();
  const answer = await consumer.ask<LoadAnswer>({
    op: "load",
    path: consumerPath(path),
    lanes,
    perLane,
    model,
    tokens: PIPE_TOKENS,
  } satisfies LoadCommand);
  const own = process.cpuUsage(ownBefore);
  const relayAfter = cpuMs(path.relayPids);
  const consumerAfter = cpuMs([consumer.pid]);
  return {
    ...answer,
    tokensPerSecond: answer.tokens / answer.seconds,
    relayCpuMs: relayBefore === null || relayAfter === null ? null : relayAfter - relayBefore,
    ownCpuMs: (own.user + own.system) / 1000,
    consumerCpuMs: consumerBefore === null || consumerAfter === null ? null : consumerAfter - consumerBefore,
  };
}

/** User + system CPU of these processes, in ms, from /proc (null where it cannot be read). */
function cpuMs(pids: number[]): number | null {
  try {
    let ticks = 0;
    for (const pid of pids) {
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      // The fields after the command name, which is in parentheses and may contain spaces:
      // utime and stime are fields 14 and 15 of the whole line.
      const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
      ticks += Number(fields[11]) + Number(fields[12]);
    }
    return (ticks * 1000) / CLOCK_TICKS_PER_SECOND;
  } catch {
    return null;
  }
}

function ms(value: number): string {
  return value.toFixed(1);
}

interface Consumer {
  pid: number;
  /** Sends one command and waits for its answer (one at a time). */
  ask<Answer>(command: TtftCommand | LoadCommand): Promise<Answer>;
  close(): Promise<void>;
}

async function startConsumer(): Promise<Consumer> {
  const child = spawn(process.execPath, ["--import", "tsx", join(REPO_ROOT, "bench/pipe-consumer.ts")], {
    cwd: REPO_ROOT,
    stdio: ["pipe", "pipe", "inherit"],
    env: { ...process.env, NODE_NO_WARNINGS: "1" },
  });
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout });
  const answers: string[] = [];
  let waiting: ((line: string) => void) | null = null;
  lines.on("line", (line) => {
    if (waiting) {
      const resolve = waiting;
      waiting = null;
      resolve(line);
    } else answers.push(line);
  });
  // One rejection for every wait (each wait racing its own would leave the others unhandled).
  const died = exited.then(([code]) => {
    throw new Error(`the consumer process exited with code ${code}`);
  });
  died.catch(() => {});
  const nextLine = () =>
    Promise.race([
      answers.length > 0
        ? Promise.resolve(answers.shift() as string)
        : new Promise<string>((resolve) => {
            waiting = resolve;
          }),
      died,
    ]);
  await nextLine();
  return {
    pid: child.pid as number,
    async ask<Answer>(command: TtftCommand | LoadCommand) {
      child.stdin.write(`${JSON.stringify(command)}\n`);
      const answer = JSON.parse(await nextLine()) as Answer | { error: string };
      if (typeof answer === "object" && answer !== null && "error" in answer) throw new Error(answer.error);
      return answer as Answer;
    },
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.stdin.end();
      await exited;
    },
  };
}

interface Proxy {
  url: string;
  pid: number;
  close(): Promise<void>;
}

async function startProxy(upstream: string): Promise<Proxy> {
  const child = spawn(
    process.execPath,
    ["--import", "tsx", join(REPO_ROOT, "bench/pipe-proxy.ts"), "--upstream", upstream],
    { cwd: REPO_ROOT, stdio: ["pipe", "pipe", "inherit"], env: { ...process.env, NODE_NO_WARNINGS: "1" } },
  );
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout });
  const line = await Promise.race([
    once(lines, "line").then(([text]) => String(text)),
    exited.then(([code]) => {
      throw new Error(`a pipe proxy exited with code ${code} before listening`);
    }),
  ]);
  lines.close();
  const { url } = JSON.parse(line) as { url: string };
  return {
    url,
    pid: child.pid as number,
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      await exited;
    },
  };
}

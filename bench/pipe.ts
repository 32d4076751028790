/**
 * Side by side: the same streamed workload (answers of PIPE_TOKENS tokens from the fake engine)
 * read straight from the engine, through a two-hop Node byte pipe (two minimal HTTP proxies in a
 * chain, each its own process: the floor for two relay hops) and through the platform (control
 * plane in this process + a worker process). The consumers run in a process of their own
 * (bench/pipe-consumer.ts), so this process's CPU time is the control plane's (with its embedded
 * database, if any).
 *
 * For each path: the time to first token it adds over the engine (p50 / p99), measured with the
 * paths interleaved and again back to back (see the comment where it is measured); tokens/s delivered
 * with 1, 64 and 512 concurrent streams from an engine that answers at once; the same streams
 * paced at PACED_TOKENS_PER_SECOND tokens/s each (64 at once) with the inter-chunk gap
 * (p50 / p99); and the CPU time of its relaying processes, per 1,000 tokens and per request, the
 * control plane's and the worker's apart.
 *
 * Under load, two more lines per path tell whether a phase was limited by the CPU or by waiting:
 * the cores each process of the path kept busy on average (relays, engine, consumer, database
 * backends) next to the whole machine's, and the end wait (last content delta to the end of the
 * response, which on the platform includes the settlement the usage event waits for).
 */

import { spawn } from "node:child_process";
import { once } from "node:events";
import { readdirSync, readFileSync } from "node:fs";
import { availableParallelism, loadavg } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";
import { type CommandProcess, startCommandProcess } from "./command-process.js";
import type { BenchContext } from "./context.js";
import { startEngineProcess } from "./engine.js";
import type { ConsumerPath, LoadAnswer, LoadCommand, TtftAnswer, TtftCommand } from "./pipe-consumer.js";
import { cpuMs } from "./proc.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "pipe";
const MODEL = "bench-pipe";
const PACED_MODEL = "bench-pipe-paced";
const PIPE_TOKENS = 200;
/** The paced engine's rate per stream (a token every 10 ms), about a fast GPU's. */
const PACED_TOKENS_PER_SECOND = 100;
/** The paced engine's time to first token: answers this long, at most this many rounds (each ~40 ms). */
const PACED_TTFT_TOKENS = 4;
const PACED_TTFT_ROUNDS = 100;
/** Unmeasured sequential rounds first, so that every path runs on warm (optimized) code. */
const WARM_UP_ROUNDS = 10;
/** The unmeasured load run on every path before anything is measured: lanes × streams per lane. */
const WARM_UP_LANES = 64;
const WARM_UP_PER_LANE = 4;
/**
 * Unpaced phases: concurrent lanes × streams read one after another in each lane. The 64-stream
 * phase runs 16 streams per lane, several seconds, so that its start and end (when fewer than all
 * the lanes stream) are a small part of it: with 4 per lane it lasted about a second and a half on
 * a quiet machine, and its first and last streams weighed as much as the steady state. The
 * 512-stream phase stays one burst of one stream per lane: a second stream per lane made the fake
 * engine drop connections ("socket hang up") on the loaded machine, which measured the engine.
 */
const UNPACED_PHASES: ReadonlyArray<readonly [number, number]> = [
  [1, 100],
  [64, 16],
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

interface Path extends ConsumerPath {
  /** Processes that relay on this path (CPU read from /proc), besides this process. */
  relayPids: number[];
  /** Whether this process relays too (the control plane runs here). */
  relaysHere: boolean;
  /** The engine process this path reads (its CPU, read from /proc), when it could be found. */
  enginePid: number | null;
  /** The database's server processes serving this path (a local PostgreSQL's backends), if any. */
  databasePids: () => number[];
}

interface Phase extends LoadAnswer {
  tokensPerSecond: number;
  /** CPU of the path's relaying processes (proxies or worker), when /proc could be read. */
  relayCpuMs: number | null;
  /** CPU of this process: the control plane on the platform path, next to nothing elsewhere. */
  ownCpuMs: number;
  /** CPU of the consumer process. */
  consumerCpuMs: number | null;
  /** CPU of the engine process. */
  engineCpuMs: number | null;
  /** CPU of the database's server processes (a local PostgreSQL's backends), 0 when none. */
  databaseCpuMs: number;
  /** Wall time of the phase as this process timed it, ms. */
  wallMs: number;
  /** Share of the machine's CPU time that was busy during the phase (all processes, 0..1). */
  machineBusy: number | null;
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
    const databasePids = databaseBackends(market.plane.databaseDescription);
    const pathsTo = (
      engineUrl: string,
      enginePid: number | null,
      pipeChain: { url: string; pids: number[] },
      workerPid?: number,
    ): Path[] => [
      {
        label: "engine direct",
        url: engineUrl,
        apiKey: "none",
        everyDelta: true,
        relayPids: [],
        relaysHere: false,
        enginePid,
        databasePids: noDatabase,
      },
      {
        label: "two-hop pipe",
        url: pipeChain.url,
        apiKey: "none",
        everyDelta: true,
        relayPids: pipeChain.pids,
        relaysHere: false,
        enginePid,
        databasePids: noDatabase,
      },
      {
        label: "platform",
        url: `${market.plane.httpUrl}/v1`,
        apiKey: account.apiKey,
        // The platform may merge tokens into fewer SSE events: its usage is what counts.
        everyDelta: false,
        relayPids: workerPid === undefined ? [] : [workerPid],
        relaysHere: true,
        enginePid,
        databasePids,
      },
    ];
    const paths = pathsTo(engine.url, enginePid(0), pipe, worker?.pid);
    const pacedPaths = pathsTo(
      paced.url,
      enginePid(1000 / PACED_TOKENS_PER_SECOND),
      pacedPipe,
      pacedWorker?.pid,
    );

    // Unmeasured load on every path first, so that each process runs the code it has optimized
    // under load, as a relay in service does, and what is measured is the steady state, not V8
    // compiling a path's code: measured first, the platform's 100 single streams cost its processes
    // 56 and 83 ms of CPU per 1,000 tokens in two runs, against a median of 37 ms in eight runs
    // after this warm-up (BENCHMARKS.md). The same for every path.
    const warmUpStarted = performance.now();
    for (const path of paths) await throughput(consumer, path, MODEL, WARM_UP_LANES, WARM_UP_PER_LANE);
    for (const path of pacedPaths) await throughput(consumer, path, PACED_MODEL, WARM_UP_LANES, 1);
    progress(
      `${NAME}: warm-up, ${WARM_UP_LANES} × ${WARM_UP_PER_LANE} streams per path (paced: ${WARM_UP_LANES} × 1), unmeasured, in ${((performance.now() - warmUpStarted) / 1000).toFixed(1)} s`,
    );

    // Time to first token, three times: interleaved (rounds of one stream per path, so that a
    // change in the machine's load touches every path alike, and each path's processes sit idle
    // while the others stream: what a lone request to an idle server sees), back to back (each
    // path's streams one after another: its processes stay busy and their code in the CPU's
    // caches), and from the paced engine, interleaved (short answers: the first token is not
    // followed at once by a burst of 199 more that the relays must carry while it is on its way).
    const rounds = context.config.pipeStreams;
    const ttft = async (
      on: Path[],
      model: string,
      tokens: number,
      count: number,
      interleaved: boolean,
      suffix: string,
    ) => {
      const { firstTokenMs } = await consumer.ask<TtftAnswer>({
        op: "ttft",
        paths: on.map(consumerPath),
        rounds: count,
        warmUp: WARM_UP_ROUNDS,
        model,
        tokens,
        interleaved,
      } satisfies TtftCommand);
      progress(
        `${NAME}: ${count} sequential streams per path${suffix || ", interleaved"} for the time to first token`,
      );
      const direct = firstTokenMs["engine direct"] ?? [];
      const added = (label: string, p: number) =>
        percentile(firstTokenMs[label] ?? [], p) - percentile(direct, p);
      report.add(
        NAME,
        `time to first token${suffix}, engine direct, p50 / p99`,
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
          `time to first token added${suffix}, ${label}, p50 / p99${ratio}`,
          `${signed(added(label, 50))} / ${signed(added(label, 99))}`,
          "ms",
        );
      }
    };
    // The interleaved figures keep the names they always had; the others say how they differ.
    await ttft(paths, MODEL, PIPE_TOKENS, rounds, true, "");
    await ttft(paths, MODEL, PIPE_TOKENS, rounds, false, ", back to back");
    await ttft(
      pacedPaths,
      PACED_MODEL,
      PACED_TTFT_TOKENS,
      Math.min(rounds, PACED_TTFT_ROUNDS),
      true,
      `, engine paced at ${PACED_TOKENS_PER_SECOND} tokens/s (${PACED_TTFT_TOKENS}-token answers)`,
    );

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

/**
 * The fake engine process answering with this delay per token: a child of this process (started
 * by bench/engine.ts), found by its arguments in /proc; null where /proc cannot be read.
 */
function enginePid(delayMs: number): number | null {
  try {
    for (const pid of childPids(process.pid)) {
      const args = readFileSync(`/proc/${pid}/cmdline`, "utf8").split("\0");
      const delay = args.indexOf("--delay-ms");
      if (args.some((arg) => arg.endsWith("engine-process.ts")) && Number(args[delay + 1]) === delayMs) {
        return pid;
      }
    }
  } catch {}
  return null;
}

function childPids(pid: number): number[] {
  const children: number[] = [];
  for (const task of readdirSync(`/proc/${pid}/task`)) {
    const text = readFileSync(`/proc/${pid}/task/${task}/children`, "utf8").trim();
    if (text !== "") children.push(...text.split(/\s+/).map(Number));
  }
  return children;
}

/** A path without database processes of its own (or whose database runs in this process). */
const noDatabase = (): number[] => [];

/**
 * The backends of the bench's PostgreSQL database, when that server runs on this machine (found by
 * their process titles, `postgres: USER DATABASE …`). Embedded PGlite runs in a thread of this
 * process, so its CPU is already the control plane's.
 */
function databaseBackends(description: string): () => number[] {
  const name = /^PostgreSQL at [^/]*\/([^/?]+)$/.exec(description)?.[1];
  if (!name) return noDatabase;
  return () => {
    const found: number[] = [];
    try {
      for (const entry of readdirSync("/proc")) {
        if (!/^\d+$/.test(entry)) continue;
        try {
          const title = readFileSync(`/proc/${entry}/cmdline`, "utf8").replaceAll("\0", " ");
          if (title.startsWith("postgres: ") && title.split(" ").includes(name)) found.push(Number(entry));
        } catch {
          // The process ended meanwhile.
        }
      }
    } catch {}
    return found;
  };
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
  const pipePath = paths.find((path) => path.label === "two-hop pipe");
  const pipeCpu = pipe && pipePath ? pathCpuMs(pipePath, pipe) : null;
  // CPU per token of everything on the pipe's path, to compare the platform's with.
  const pipeAll = pipe && pipeCpu !== null ? pipeCpu / pipe.tokens : null;
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
    if (path.label !== "engine direct" && (paced || lanes > 1)) {
      report.add(
        NAME,
        `  last token → end of the response, ${streams}, ${path.label}, p50 / p99`,
        `${ms(phase.endWaitP50)} / ${ms(phase.endWaitP99)}`,
        "ms",
      );
    }
    if (lanes > 1)
      report.add(NAME, `  cores busy, ${streams}, ${path.label}`, utilisation(path, phase, pipeAll), "");
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
  const engineBefore = path.enginePid === null ? null : cpuMs([path.enginePid]);
  const databaseBefore = new Map(path.databasePids().map((pid) => [pid, cpuMs([pid]) ?? 0]));
  const machineBefore = machineTicks();
  const started = performance.now();
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
  const wallMs = performance.now() - started;
  const machineAfter = machineTicks();
  const relayAfter = cpuMs(path.relayPids);
  const consumerAfter = cpuMs([consumer.pid]);
  const engineAfter = path.enginePid === null ? null : cpuMs([path.enginePid]);
  let databaseCpuMs = 0;
  // A backend that connected during the phase spent all its CPU in it.
  for (const pid of path.databasePids())
    databaseCpuMs += (cpuMs([pid]) ?? 0) - (databaseBefore.get(pid) ?? 0);
  const delta = (before: number | null, after: number | null) =>
    before === null || after === null ? null : after - before;
  return {
    ...answer,
    tokensPerSecond: answer.tokens / answer.seconds,
    relayCpuMs: delta(relayBefore, relayAfter),
    ownCpuMs: (own.user + own.system) / 1000,
    consumerCpuMs: delta(consumerBefore, consumerAfter),
    engineCpuMs: delta(engineBefore, engineAfter),
    databaseCpuMs,
    wallMs,
    machineBusy:
      machineBefore === null || machineAfter === null || machineAfter.total === machineBefore.total
        ? null
        : (machineAfter.busy - machineBefore.busy) / (machineAfter.total - machineBefore.total),
  };
}

/** The machine's CPU ticks, busy and in all, from /proc/stat (null where it cannot be read). */
function machineTicks(): { busy: number; total: number } | null {
  try {
    const fields = (readFileSync("/proc/stat", "utf8").split("\n")[0] ?? "")
      .trim()
      .split(/\s+/)
      .slice(1, 9)
      .map(Number);
    const total = fields.reduce((sum, value) => sum + value, 0);
    // idle and iowait
    const idle = (fields[3] ?? 0) + (fields[4] ?? 0);
    return { busy: total - idle, total };
  } catch {
    return null;
  }
}

/**
 * What kept the CPU busy during a phase, in cores on average (CPU time over wall time): the path's
 * own processes, then the whole machine's. A path whose processes add up to far less than the
 * machine's cores, on a machine with idle time left, was waiting rather than computing.
 */
function utilisation(path: Path, phase: Phase, pipePerToken: number | null): string {
  const cores = (cpuMs: number | null) => (cpuMs === null ? "?" : (cpuMs / phase.wallMs).toFixed(2));
  const parts: string[] = [];
  if (path.relaysHere) {
    parts.push(`control plane ${cores(phase.ownCpuMs)}`, `worker ${cores(phase.relayCpuMs)}`);
    if (path.databasePids !== noDatabase) parts.push(`database ${cores(phase.databaseCpuMs)}`);
  } else if (path.relayPids.length > 0) {
    parts.push(`proxies ${cores(phase.relayCpuMs)}`);
  }
  parts.push(`engine ${cores(phase.engineCpuMs)}`, `consumer ${cores(phase.consumerCpuMs)}`);
  const all = pathCpuMs(path, phase);
  const ratio =
    all !== null && pipePerToken && path.relaysHere
      ? `, ${(all / phase.tokens / pipePerToken).toFixed(1)}× the pipe's`
      : "";
  const total =
    all === null
      ? ""
      : ` = ${cores(all)} (${(all / (phase.tokens / 1000)).toFixed(1)} ms per 1,000 tokens${ratio})`;
  const machine =
    phase.machineBusy === null
      ? ""
      : `; machine ${(phase.machineBusy * availableParallelism()).toFixed(2)} of ${availableParallelism()}`;
  return `${parts.join(", ")}${total}${machine} (load ${(loadavg()[0] ?? 0).toFixed(1)})`;
}

/**
 * CPU of every process the path's tokens go through, ms: the engine, the relays (proxies, or
 * control plane + worker + database backends) and the consumer. They share the machine's cores,
 * so on a busy machine a path's tokens/s follows this, not the relays' CPU alone. Null where a
 * process's CPU could not be read.
 */
function pathCpuMs(path: Path, phase: Phase): number | null {
  const parts = [phase.engineCpuMs, phase.consumerCpuMs, path.relayPids.length > 0 ? phase.relayCpuMs : 0];
  if (parts.some((part) => part === null)) return null;
  const own = path.relaysHere ? phase.ownCpuMs + phase.databaseCpuMs : 0;
  return (parts as number[]).reduce((sum, part) => sum + part, own);
}

function ms(value: number): string {
  return value.toFixed(1);
}

/** A difference in ms with its sign (a noisy p99 can come out below the engine's). */
function signed(value: number): string {
  return `${value < 0 ? "" : "+"}${ms(value)}`;
}

type Consumer = CommandProcess<TtftCommand | LoadCommand>;

/** The consumers' process (bench/pipe-consumer.ts). */
function startConsumer(): Promise<Consumer> {
  return startCommandProcess("pipe-consumer.ts", "consumer");
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

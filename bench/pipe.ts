/**
 * Side by side: the same streamed workload (answers of PIPE_TOKENS tokens from the fake engine,
 * delay 0) read straight from the engine, through a two-hop Node byte pipe (two minimal HTTP
 * proxies in a chain, each its own process: the floor for two relay hops) and through the platform
 * (control plane in this process + a worker process). For each path: the time to first token it
 * adds over the engine, tokens/s delivered with 1 and 64 concurrent streams, and the CPU time of
 * its relaying processes per 1,000 tokens.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";
import { chatCompletion } from "./consumer.js";
import type { BenchContext } from "./context.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "pipe";
const MODEL = "bench-pipe";
const PIPE_TOKENS = 200;
/** Unmeasured sequential rounds first, so that every path runs on warm (optimized) code. */
const WARM_UP_ROUNDS = 10;
const SEQUENTIAL_STREAMS = 100;
const CONCURRENT_STREAMS = 64;
/** Streams each of the concurrent lanes reads one after another. */
const STREAMS_PER_LANE = 4;
/** Linux's USER_HZ: /proc/PID/stat counts CPU time in these ticks. */
const CLOCK_TICKS_PER_SECOND = 100;

interface Path {
  label: string;
  url: string;
  apiKey: string;
  /** Processes that relay on this path (CPU read from /proc), besides this process. */
  relayPids: number[];
  /** Whether this process relays too (the control plane runs here). */
  relaysHere: boolean;
}

interface Phase {
  tokensPerSecond: number;
  /** CPU of the path's relaying processes per 1,000 tokens, when /proc could be read. */
  relayCpuMsPerKiloToken: number | null;
  /** CPU of this process (the consumers, plus the control plane on the platform path). */
  ownCpuMsPerKiloToken: number;
}

export async function pipeBenchmark(context: BenchContext, report: Report): Promise<void> {
  const engine = await context.engine(PIPE_TOKENS);
  const engineOrigin = new URL(engine.url).origin;
  const second = await startProxy(engineOrigin);
  const first = await startProxy(second.url);
  try {
    const market = await context.market();
    const {
      workers: [worker],
    } = await context.startWorkers(MODEL, engine.url, 1, CONCURRENT_STREAMS);
    const consumer = await market.account("pipe-consumer", 100_000);
    const paths: Path[] = [
      { label: "engine direct", url: engine.url, apiKey: "none", relayPids: [], relaysHere: false },
      {
        label: "two-hop pipe",
        url: `${first.url}/v1`,
        apiKey: "none",
        relayPids: [first.pid, second.pid],
        relaysHere: false,
      },
      {
        label: "platform",
        url: `${market.plane.httpUrl}/v1`,
        apiKey: consumer.apiKey,
        relayPids: worker?.pid === undefined ? [] : [worker.pid],
        relaysHere: true,
      },
    ];

    // Time to first token: rounds of one stream per path, interleaved so that a change in the
    // machine's load touches every path alike.
    const firstToken = new Map<string, number[]>(paths.map((path) => [path.label, []]));
    const rounds = context.config.pipeStreams;
    for (let round = 1 - WARM_UP_ROUNDS; round <= rounds; round++) {
      for (const path of paths) {
        const { firstTokenMs } = await stream(path);
        if (round > 0) firstToken.get(path.label)?.push(firstTokenMs);
      }
    }
    progress(`${NAME}: ${rounds} sequential streams per path (interleaved) for the time to first token`);
    const added = (label: string, p: number) =>
      percentile(firstToken.get(label) ?? [], p) - percentile(firstToken.get("engine direct") ?? [], p);
    const direct = firstToken.get("engine direct") ?? [];
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

    for (const [lanes, perLane] of [
      [1, SEQUENTIAL_STREAMS],
      [CONCURRENT_STREAMS, STREAMS_PER_LANE],
    ] as const) {
      const phases = new Map<string, Phase>();
      for (const path of paths) {
        const phase = await throughput(path, lanes, perLane);
        phases.set(path.label, phase);
        progress(
          `${NAME}: ${path.label}, ${lanes} × ${perLane} streams of ${PIPE_TOKENS} tokens: ${Math.round(phase.tokensPerSecond)} tokens/s`,
        );
      }
      const pipe = phases.get("two-hop pipe");
      for (const path of paths) {
        const phase = phases.get(path.label) as Phase;
        const share =
          path.label === "platform" && pipe
            ? ` (${Math.round((100 * phase.tokensPerSecond) / pipe.tokensPerSecond)} % of the pipe)`
            : "";
        report.add(
          NAME,
          `tokens/s, ${lanes} stream${lanes === 1 ? "" : "s"}, ${path.label}${share}`,
          phase.tokensPerSecond,
          "tokens/s",
          0,
        );
      }
      for (const path of paths) {
        const phase = phases.get(path.label) as Phase;
        const streams = `${lanes} stream${lanes === 1 ? "" : "s"}`;
        if (path.label === "engine direct") {
          report.add(
            NAME,
            `  CPU per 1,000 tokens, ${streams}, consumer alone`,
            phase.ownCpuMsPerKiloToken,
            "ms",
            2,
          );
        } else if (phase.relayCpuMsPerKiloToken !== null && !path.relaysHere) {
          report.add(
            NAME,
            `  CPU per 1,000 tokens, ${streams}, ${path.label} (its 2 proxy processes)`,
            phase.relayCpuMsPerKiloToken,
            "ms",
            2,
          );
        } else if (phase.relayCpuMsPerKiloToken !== null) {
          report.add(
            NAME,
            `  CPU per 1,000 tokens, ${streams}, ${path.label} (worker + this process)`,
            phase.relayCpuMsPerKiloToken + phase.ownCpuMsPerKiloToken,
            "ms",
            2,
          );
          report.add(
            NAME,
            "    worker / this process (control plane, PGlite if embedded, consumer)",
            `${phase.relayCpuMsPerKiloToken.toFixed(2)} / ${phase.ownCpuMsPerKiloToken.toFixed(2)}`,
            "ms",
          );
        }
      }
    }
  } finally {
    await Promise.allSettled([first.close(), second.close()]);
  }
}

async function stream(path: Path): Promise<{ firstTokenMs: number; tokens: number }> {
  const result = await chatCompletion(path.url, path.apiKey, {
    model: MODEL,
    messages: [{ role: "user", content: "Tell me a story." }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: PIPE_TOKENS,
  });
  // The platform may merge tokens into fewer SSE events: the usage is what counts there; the
  // engine sends one event per token, so elsewhere both must agree.
  const tokens = result.completionTokens;
  const complete =
    tokens === PIPE_TOKENS && (path.relaysHere || result.contentChunks === PIPE_TOKENS) && !result.error;
  if (!complete || result.firstTokenMs === null) {
    throw new Error(
      `${path.label}: got ${tokens} tokens (usage) in ${result.contentChunks} deltas, expected ${PIPE_TOKENS} (HTTP ${result.status}${result.error ? `: ${result.error}` : ""})`,
    );
  }
  return { firstTokenMs: result.firstTokenMs, tokens };
}

async function throughput(path: Path, lanes: number, perLane: number): Promise<Phase> {
  const relayBefore = cpuMs(path.relayPids);
  const ownBefore = process.cpuUsage();
  const started = performance.now();
  let tokens = 0;
  await Promise.all(
    Array.from({ length: lanes }, async () => {
      for (let i = 0; i < perLane; i++) {
        // Read before adding: `tokens += await …` would add to the total as it was before the await.
        const received = await stream(path);
        tokens += received.tokens;
      }
    }),
  );
  const seconds = (performance.now() - started) / 1000;
  const own = process.cpuUsage(ownBefore);
  const relayAfter = cpuMs(path.relayPids);
  const kiloTokens = tokens / 1000;
  return {
    tokensPerSecond: tokens / seconds,
    relayCpuMsPerKiloToken:
      relayBefore === null || relayAfter === null ? null : (relayAfter - relayBefore) / kiloTokens,
    ownCpuMsPerKiloToken: (own.user + own.system) / 1000 / kiloTokens,
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

/**
 * Relay throughput: one long streamed completion (engine delay 0), engine → worker process (gRPC
 * stream) → control plane → SSE → a raw-fetch consumer, against the same stream read straight from
 * the engine. The difference is the platform's cost per token.
 */

import { chatCompletion } from "./consumer.js";
import type { BenchContext } from "./context.js";
import { median, progress, type Report } from "./report.js";

const NAME = "relay";
const MODEL = "bench-relay";
/** Unmeasured runs per path first: the platform path's first streams run on cold (unoptimized) code. */
const WARM_UP_RUNS = 3;

export async function relayBenchmark(context: BenchContext, report: Report): Promise<void> {
  const { relayTokens: tokens, relayRuns: runs } = context.config;
  const engine = await context.engine(tokens);
  const market = await context.market();
  const {
    workers: [worker],
  } = await context.startWorkers(MODEL, engine.url, 1, 1);
  const consumer = await market.account("relay-consumer", 1_000);
  const body = {
    model: MODEL,
    messages: [{ role: "user", content: "Tell me a long story." }],
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: tokens,
  };
  const platformUrl = `${market.plane.httpUrl}/v1`;

  const measure = async (label: string, url: string, apiKey: string) => {
    const seconds: number[] = [];
    for (let run = 1 - WARM_UP_RUNS; run <= runs; run++) {
      const result = await chatCompletion(url, apiKey, body);
      // The engine sends one delta per token; the platform may merge tokens the worker produced
      // while its flow-control window was closed, so there the usage is what counts.
      const received = label === "platform" ? result.completionTokens : result.contentChunks;
      if (result.error || received !== tokens) {
        throw new Error(
          `${label}: got ${received} of ${tokens} tokens in ${result.contentChunks} deltas (HTTP ${result.status}${result.error ? `: ${result.error}` : ""})`,
        );
      }
      if (label === "platform" && result.completionTokens !== tokens) {
        throw new Error(
          `platform: usage says ${result.completionTokens} completion tokens, expected ${tokens}`,
        );
      }
      const rate = tokens / (result.totalMs / 1000);
      if (run <= 0) {
        progress(`${NAME}: ${label} warm-up, ${tokens} tokens in ${Math.round(result.totalMs)} ms`);
        continue;
      }
      seconds.push(result.totalMs / 1000);
      progress(
        `${NAME}: ${label} run ${run}/${runs}, ${tokens} tokens in ${Math.round(result.totalMs)} ms (${Math.round(rate)} tokens/s)`,
      );
    }
    return { seconds: median(seconds) };
  };

  const direct = await measure("engine direct", engine.url, "none");
  const platform = await measure("platform", platformUrl, consumer.apiKey);
  const workerSeconds = lastJobSeconds(worker?.outputTail() ?? "");

  report.add(NAME, `stream of ${tokens} tokens, engine direct`, tokens / direct.seconds, "tokens/s", 0);
  report.add(
    NAME,
    `stream of ${tokens} tokens, through the platform`,
    tokens / platform.seconds,
    "tokens/s",
    0,
  );
  report.add(NAME, "  wall time, engine direct (median)", direct.seconds * 1000, "ms", 0);
  report.add(NAME, "  wall time, through the platform (median)", platform.seconds * 1000, "ms", 0);
  if (workerSeconds !== null) {
    report.add(NAME, "  worker's own job time (engine → gRPC), last run", workerSeconds * 1000, "ms", 0);
  }
  report.add(
    NAME,
    "platform overhead per token",
    ((platform.seconds - direct.seconds) * 1_000_000) / tokens,
    "µs/token",
    1,
  );
}

/** The duration of the worker's last finished job, from its log line "… N tokens in S s …". */
function lastJobSeconds(output: string): number | null {
  const matches = [...output.matchAll(/ done: .*? (\d+) tokens in ([\d.]+) s/g)];
  const last = matches[matches.length - 1];
  return last?.[2] ? Number(last[2]) : null;
}

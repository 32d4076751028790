/**
 * The pipe benchmark's consumers, in a process of their own: the benchmark process then hosts
 * nothing but the control plane (and its embedded database), so its CPU time is the control
 * plane's, and the consumers' SSE parsing does not share the control plane's event loop (as it
 * would not in production). Started by bench/pipe.ts; prints `{"ready": true}` once started, then
 * answers every command (one JSON line on stdin) with one JSON line on stdout. Exits when its
 * stdin closes.
 *
 * Commands:
 * - `{"op": "ttft", paths, rounds, warmUp, model, tokens}`: `warmUp` unmeasured then `rounds`
 *   measured rounds of one stream per path, the paths interleaved within each round; answers the
 *   time to first token of every measured stream, by path label.
 * - `{"op": "load", path, lanes, perLane, model, tokens}`: `lanes` concurrent lanes each reading
 *   `perLane` streams one after another; answers tokens, seconds, the times to first token, the
 *   inter-chunk gaps (time between two content deltas of one stream) and the end waits (time from
 *   a stream's last content delta to the end of its response: the usage event, `[DONE]` and, on
 *   the platform, the settlement the usage waits for) as p50 / p99.
 *
 * Every stream must bring `tokens` tokens by its usage, and on a path that relays the engine's
 * events unchanged (`everyDelta`), each one as its own delta; a stream that does not fails the
 * command (`{"error": ...}`).
 */
import { createInterface } from "node:readline";
import { chatCompletion } from "./consumer.js";
import { percentile } from "./report.js";

export interface ConsumerPath {
  label: string;
  url: string;
  apiKey: string;
  /** The path relays the engine's events unchanged: every token arrives as its own delta. */
  everyDelta: boolean;
}

export interface TtftCommand {
  op: "ttft";
  paths: ConsumerPath[];
  rounds: number;
  warmUp: number;
  model: string;
  tokens: number;
  /**
   * True: round after round, one stream per path in turn, so that each path's processes sit idle
   * while the others stream. False: each path's rounds back to back, its processes kept busy.
   */
  interleaved: boolean;
}

export interface LoadCommand {
  op: "load";
  path: ConsumerPath;
  lanes: number;
  perLane: number;
  model: string;
  tokens: number;
}

export interface TtftAnswer {
  firstTokenMs: Record<string, number[]>;
}

export interface LoadAnswer {
  tokens: number;
  streams: number;
  seconds: number;
  firstTokenP50: number;
  firstTokenP99: number;
  gapP50: number;
  gapP99: number;
  endWaitP50: number;
  endWaitP99: number;
}

async function stream(
  path: ConsumerPath,
  model: string,
  tokens: number,
  onContent?: (now: number) => void,
): Promise<{ firstTokenMs: number; tokens: number; endWaitMs: number }> {
  let lastContent = 0;
  const result = await chatCompletion(
    path.url,
    path.apiKey,
    {
      model,
      messages: [{ role: "user", content: "Tell me a story." }],
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: tokens,
    },
    {
      onContent: (now) => {
        lastContent = now;
        onContent?.(now);
      },
    },
  );
  const ended = performance.now();
  const got = result.completionTokens;
  const complete = got === tokens && (!path.everyDelta || result.contentChunks === tokens) && !result.error;
  if (!complete || result.firstTokenMs === null) {
    throw new Error(
      `${path.label}: got ${got} tokens (usage) in ${result.contentChunks} deltas, expected ${tokens} (HTTP ${result.status}${result.error ? `: ${result.error}` : ""})`,
    );
  }
  return { firstTokenMs: result.firstTokenMs, tokens: got, endWaitMs: ended - lastContent };
}

async function ttft(command: TtftCommand): Promise<TtftAnswer> {
  const firstTokenMs: Record<string, number[]> = Object.fromEntries(
    command.paths.map((path) => [path.label, []]),
  );
  const one = async (path: ConsumerPath, round: number) => {
    const result = await stream(path, command.model, command.tokens);
    if (round > 0) firstTokenMs[path.label]?.push(result.firstTokenMs);
  };
  if (command.interleaved) {
    for (let round = 1 - command.warmUp; round <= command.rounds; round++) {
      for (const path of command.paths) await one(path, round);
    }
  } else {
    for (const path of command.paths) {
      for (let round = 1 - command.warmUp; round <= command.rounds; round++) await one(path, round);
    }
  }
  return { firstTokenMs };
}

async function load(command: LoadCommand): Promise<LoadAnswer> {
  const firstTokens: number[] = [];
  const gaps: number[] = [];
  const endWaits: number[] = [];
  let tokens = 0;
  const started = performance.now();
  await Promise.all(
    Array.from({ length: command.lanes }, async () => {
      for (let i = 0; i < command.perLane; i++) {
        let previous: number | null = null;
        const received = await stream(command.path, command.model, command.tokens, (now) => {
          if (previous !== null) gaps.push(now - previous);
          previous = now;
        });
        tokens += received.tokens;
        firstTokens.push(received.firstTokenMs);
        endWaits.push(received.endWaitMs);
      }
    }),
  );
  return {
    tokens,
    streams: command.lanes * command.perLane,
    seconds: (performance.now() - started) / 1000,
    firstTokenP50: percentile(firstTokens, 50),
    firstTokenP99: percentile(firstTokens, 99),
    gapP50: percentile(gaps, 50),
    gapP99: percentile(gaps, 99),
    endWaitP50: percentile(endWaits, 50),
    endWaitP99: percentile(endWaits, 99),
  };
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const command = JSON.parse(line) as TtftCommand | LoadCommand;
  const work = command.op === "ttft" ? ttft(command) : load(command);
  work.then(
    (answer) => process.stdout.write(`${JSON.stringify(answer)}\n`),
    (error: unknown) =>
      process.stdout.write(
        `${JSON.stringify({ error: error instanceof Error ? error.message : String(error) })}\n`,
      ),
  );
});
lines.on("close", () => process.exit(0));
process.stdout.write(`${JSON.stringify({ ready: true })}\n`);

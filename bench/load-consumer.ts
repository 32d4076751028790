/**
 * The concurrency benchmark's consumers, in a process of their own: the benchmark process then
 * hosts nothing but the control plane (and its embedded database, if any), so its CPU time and
 * memory are the control plane's, and the consumers' HTTP and JSON work does not share the control
 * plane's event loop (as it would not in production). Started by bench/concurrency.ts; prints
 * `{"ready": true}` once started, then answers every command (one JSON line on stdin) with one JSON
 * line on stdout, possibly after `{"progress": "..."}` lines. Exits when its stdin closes.
 *
 * Commands:
 * - `{"op": "warm-up", url, apiKey, model, requests}`: that many sequential non-streamed requests,
 *   unmeasured; answers `{"ok": true}` or `{"error": ...}` if one of them fails.
 * - `{"op": "load", url, apiKeys, model, tokens, from, to, giveUpMs}`: one consumer per API key,
 *   all at once, each making requests number `from` to `to - 1` one after another (the odd ones
 *   streamed); answers a {@link LoadAnswer}.
 *
 * The market has no queue: a request arriving while every worker slot is busy gets 503
 * (no_capacity). Consumers here retry those after a short random pause, as an SDK with retries
 * would; they are counted apart. Anything else that is not a complete answer is an error.
 */
import { createInterface } from "node:readline";
import { chatCompletion } from "./consumer.js";

export interface WarmUpCommand {
  op: "warm-up";
  url: string;
  apiKey: string;
  model: string;
  requests: number;
}

export interface LoadCommand {
  op: "load";
  url: string;
  apiKeys: string[];
  model: string;
  /** Tokens every answer must bring. */
  tokens: number;
  from: number;
  to: number;
  /** A request that keeps getting 503 for this long counts as an error. */
  giveUpMs: number;
}

export interface LoadAnswer {
  completed: number;
  /** 503 no_capacity answers that were retried. */
  capacityRetries: number;
  /** Failed requests by message. */
  errors: Record<string, number>;
  /** The sum of the costs the completed answers reported, in micro-credits (a bigint's digits). */
  paidMicros: string;
  /** Milliseconds per completed request, including its 503 retries. */
  latencies: number[];
  seconds: number;
}

async function warmUp(command: WarmUpCommand): Promise<{ ok: true }> {
  for (let i = 0; i < command.requests; i++) {
    const result = await chatCompletion(command.url, command.apiKey, {
      model: command.model,
      messages: [{ role: "user", content: "hi" }],
    });
    if (result.error) throw new Error(`warm-up request failed: HTTP ${result.status}: ${result.error}`);
  }
  return { ok: true };
}

async function load(command: LoadCommand): Promise<LoadAnswer> {
  const { url, model, tokens, giveUpMs } = command;
  const latencies: number[] = [];
  const errors: Record<string, number> = {};
  const countError = (message: string) => {
    errors[message] = (errors[message] ?? 0) + 1;
  };
  let completed = 0;
  let failed = 0;
  let capacityRetries = 0;
  let paid = 0n;
  const total = command.apiKeys.length * (command.to - command.from);
  let nextProgress = 0.5;

  const oneRequest = async (apiKey: string, index: number) => {
    // Every other request is streamed.
    const stream = index % 2 === 1;
    const body = {
      model,
      messages: [{ role: "user", content: `Request ${index}` }],
      stream,
      ...(stream ? { stream_options: { include_usage: true } } : {}),
    };
    const start = performance.now();
    for (;;) {
      let result: Awaited<ReturnType<typeof chatCompletion>>;
      try {
        result = await chatCompletion(url, apiKey, body);
      } catch (error) {
        countError(`fetch failed: ${error instanceof Error ? error.message : String(error)}`);
        failed++;
        return;
      }
      if (result.status === 503 && performance.now() - start < giveUpMs) {
        capacityRetries++;
        await new Promise((resolve) => setTimeout(resolve, 2 + Math.random() * 18));
        continue;
      }
      // Several tokens may share a delta (the worker merges them when they come faster than the
      // link drains), so the tokens are counted in the text: the engine's are `tok0 tok1 …`.
      const complete =
        result.completionTokens === tokens &&
        (result.contentText.match(/tok\d+/g)?.length ?? 0) === tokens &&
        (stream || result.contentChunks === 1);
      if (result.error || !complete) {
        countError(
          `HTTP ${result.status}: ${result.error ?? `incomplete answer (${result.completionTokens} tokens)`}`,
        );
        failed++;
        return;
      }
      completed++;
      paid += result.costMicros ?? 0n;
      latencies.push(performance.now() - start);
      const done = completed + failed;
      if (done / total >= nextProgress && done < total) {
        say({ progress: `${done} of ${total} requests of this half done` });
        nextProgress += 0.5;
      }
      return;
    }
  };

  const started = performance.now();
  await Promise.all(
    command.apiKeys.map(async (apiKey) => {
      for (let i = command.from; i < command.to; i++) await oneRequest(apiKey, i);
    }),
  );
  return {
    completed,
    capacityRetries,
    errors,
    paidMicros: paid.toString(),
    latencies,
    seconds: (performance.now() - started) / 1000,
  };
}

function say(message: unknown): void {
  process.stdout.write(`${JSON.stringify(message)}\n`);
}

const lines = createInterface({ input: process.stdin });
lines.on("line", (line) => {
  const command = JSON.parse(line) as WarmUpCommand | LoadCommand;
  const work = command.op === "warm-up" ? warmUp(command) : load(command);
  work.then(say, (error: unknown) => say({ error: error instanceof Error ? error.message : String(error) }));
});
lines.on("close", () => process.exit(0));
say({ ready: true });

/**
 * Request latency: short completions one after another through the openai SDK, through the
 * platform and straight to the engine. Non-streamed: time to the full answer. Streamed: time to
 * the first content token.
 */
import OpenAI from "openai";
import type { BenchContext } from "./context.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "latency";
const MODEL = "bench-short";
const WARM_UP = 50;

export async function latencyBenchmark(context: BenchContext, report: Report): Promise<void> {
  const { latencyRequests: requests, shortTokens } = context.config;
  const engine = await context.engine(shortTokens);
  const market = await context.market();
  await context.startWorkers(MODEL, engine.url, 1, 1);
  const consumer = await market.account("latency-consumer", 1_000);
  const clients = {
    platform: market.openai(consumer.apiKey),
    direct: new OpenAI({ baseURL: engine.url, apiKey: "none", maxRetries: 0, timeout: 20_000 }),
  };
  const messages = [{ role: "user" as const, content: "Say hello." }];

  const nonStreamed = async (client: OpenAI) => {
    const start = performance.now();
    const completion = await client.chat.completions.create({ model: MODEL, messages });
    if (completion.usage?.completion_tokens !== shortTokens) {
      throw new Error(
        `expected ${shortTokens} completion tokens, got ${completion.usage?.completion_tokens}`,
      );
    }
    return performance.now() - start;
  };
  const firstToken = async (client: OpenAI) => {
    const start = performance.now();
    const stream = await client.chat.completions.create({ model: MODEL, messages, stream: true });
    let first: number | null = null;
    let text = "";
    for await (const chunk of stream) {
      const content = chunk.choices[0]?.delta.content;
      if (content) {
        first ??= performance.now() - start;
        text += content;
      }
    }
    // The platform may carry several tokens in one delta (merged when they come faster than the
    // link drains), so the tokens are counted in the text: the engine's are `tok0 tok1 …`.
    const tokens = text.match(/tok\d+/g)?.length ?? 0;
    if (first === null || tokens !== shortTokens)
      throw new Error(`expected ${shortTokens} tokens, got ${tokens}`);
    return first;
  };

  const sample = async (label: string, call: () => Promise<number>) => {
    for (let i = 0; i < WARM_UP; i++) await call();
    const samples: number[] = [];
    const started = performance.now();
    for (let i = 0; i < requests; i++) samples.push(await call());
    progress(
      `${NAME}: ${label}, ${requests} sequential requests in ${Math.round(performance.now() - started)} ms`,
    );
    return samples;
  };

  const results = {
    directFull: await sample("non-streamed, engine direct", () => nonStreamed(clients.direct)),
    platformFull: await sample("non-streamed, through the platform", () => nonStreamed(clients.platform)),
    directFirst: await sample("streamed, engine direct", () => firstToken(clients.direct)),
    platformFirst: await sample("streamed, through the platform", () => firstToken(clients.platform)),
  };

  const triple = (samples: number[]) =>
    [50, 95, 99].map((p) => percentile(samples, p).toFixed(1)).join(" / ");
  const what = `${shortTokens}-token completion`;
  report.add(NAME, `non-streamed ${what}, engine direct, p50/p95/p99`, triple(results.directFull), "ms");
  report.add(NAME, `non-streamed ${what}, platform, p50/p95/p99`, triple(results.platformFull), "ms");
  report.add(
    NAME,
    "  added by the platform at p50 / p95",
    [50, 95]
      .map((p) => (percentile(results.platformFull, p) - percentile(results.directFull, p)).toFixed(1))
      .join(" / "),
    "ms",
  );
  report.add(NAME, "time to first token, engine direct, p50/p95/p99", triple(results.directFirst), "ms");
  report.add(NAME, "time to first token, platform, p50/p95/p99", triple(results.platformFirst), "ms");
  report.add(
    NAME,
    "  added by the platform at p50 / p95",
    [50, 95]
      .map((p) => (percentile(results.platformFirst, p) - percentile(results.directFirst, p)).toFixed(1))
      .join(" / "),
    "ms",
  );
}

/**
 * What a teacher-forced prefill costs on the tiny model, against generating the same tokens: the
 * evidence behind the verifier's share of an audited job's generation (BENCHMARKS.md, "Trust").
 *
 * For prompts of 50, 105, 205 and 400 tokens it times a prefill (`evaluateWithoutGeneratingNewTokens`)
 * in one call and in chunks of 32 and 8 tokens (median of 7), then the generation of 100 tokens
 * after a 5-token prompt (median of 5). If a prefill's cost grew with its length alone, chunking
 * would cost more (more calls); if it grows with each token's position (attention over the context
 * before it), chunking costs the same and generation pays the same per-position work.
 *
 * Usage: npx tsx bench/prefill-cost.ts [--model FILE]   (default: stories260K from the test models)
 */
import { parseArgs } from "node:util";
import { STORIES_260K } from "../test/support/models.js";

const { values } = parseArgs({
  options: { model: { type: "string", default: STORIES_260K }, help: { type: "boolean", short: "h" } },
});
if (values.help) {
  process.stdout.write(
    "Usage: npx tsx bench/prefill-cost.ts [--model FILE]\n\n" +
      "Times teacher-forced prefills of 50-400 tokens (in one call, in chunks of 32 and of 8) and the\n" +
      "generation of 100 tokens on a GGUF model, one CPU thread. Default model: stories260K.gguf\n" +
      "from the test models directory (LOCALLMARKET_TEST_MODELS_DIR).\n",
  );
  process.exit(0);
}

const { getLlama } = await import("node-llama-cpp");
const llama = await getLlama({ gpu: false, maxThreads: 1, logLevel: "error" as never });
const model = await llama.loadModel({ modelPath: values.model as string });
const context = await model.createContext({ threads: 1, contextSize: 2048 });
const sequence = context.getSequence();
const text =
  "Once upon a time, there was a little girl named Lily. She loved to play outside in the park. " +
  "One day, she saw a big, red ball. She wanted to play with it, but it was too high. ";
const tokens = model.tokenize(text.repeat(8));

const median = (samples: number[]) => [...samples].sort((a, b) => a - b)[Math.floor(samples.length / 2)] ?? 0;

async function prefill(length: number, chunk: number): Promise<number> {
  const samples: number[] = [];
  for (let run = 0; run < 7; run++) {
    await sequence.clearHistory();
    const started = performance.now();
    for (let at = 0; at < length; at += chunk) {
      await sequence.evaluateWithoutGeneratingNewTokens(tokens.slice(at, Math.min(length, at + chunk)));
    }
    samples.push(performance.now() - started);
  }
  return median(samples);
}

process.stdout.write(`model ${values.model}, 1 thread, context 2048\n`);
process.stdout.write("prefill ms (median of 7)   one call   chunks of 32   chunks of 8\n");
for (const length of [50, 105, 205, 400]) {
  const row = [await prefill(length, length), await prefill(length, 32), await prefill(length, 8)];
  process.stdout.write(
    `  ${String(length).padStart(3)} tokens             ${row.map((ms) => ms.toFixed(1).padStart(9)).join("      ")}\n`,
  );
}
const generation: number[] = [];
for (let run = 0; run < 5; run++) {
  await sequence.clearHistory();
  const started = performance.now();
  let count = 0;
  for await (const _ of sequence.evaluate(tokens.slice(0, 5), { temperature: 0 })) {
    if (++count >= 100) break;
  }
  generation.push(performance.now() - started);
}
process.stdout.write(
  `generation of 100 tokens after a 5-token prompt: ${median(generation).toFixed(1)} ms (median of 5)\n`,
);
await context.dispose();
await model.dispose();

/**
 * Trust benchmark: how well audits separate honest workers from cheaters, with real tiny models.
 *
 *   npx tsx bench/trust.ts [--jobs 200] [--tokens 100] [--models DIR]
 *
 * Each scenario generates `--jobs` answers of `--tokens` tokens with token detail (top-5) on the
 * real llama-cpp engine — honest stories260K, or a cheater — and has the reference (stories260K,
 * the same engine code a trusted verifier runs) score them teacher-forced in one prefill; then the
 * server's own statistics (server/trust/statistics.ts) decide. Per scenario it prints: the share of
 * jobs failed from that one audited answer (a fresh SPRT per job: the detection rate for cheaters,
 * the false-alarm rate for honest workers), the same over one running SPRT per worker, the tokens
 * needed to decide, and the verifier's time against the generation's.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { auditStatistics, DEFAULT_TEST, SequentialTest } from "../server/trust/statistics.js";
import { writePerturbedGguf } from "../test/support/gguf-perturb.js";
import { collectGeneration, type GenerateRequest, type TokenDetail } from "../worker/engines/engine.js";
import { LlamaCppEngine } from "../worker/engines/llama-cpp-engine.js";

const { values } = parseArgs({
  options: {
    jobs: { type: "string", default: "200" },
    tokens: { type: "string", default: "100" },
    models: { type: "string", default: resolve(import.meta.dirname, "../../shared/models") },
  },
});
const JOBS = Number(values.jobs);
const TOKENS = Number(values.tokens);
const STORIES = join(values.models as string, "stories260K.gguf");
if (!existsSync(STORIES)) {
  console.error(`bench/trust: ${STORIES} is absent; nothing to measure`);
  process.exit(0);
}

const PROMPTS = [
  "Once upon a time",
  "The cat sat",
  "Lily and Ben went to the park",
  "One day, a little boy",
  "Tom had a red ball",
  "The sun was",
  "She was sad because",
  "A big dog",
];

interface Scenario {
  name: string;
  /** The engine the worker runs (its weights), or random tokens. */
  worker: LlamaCppEngine | "random";
  temperature: number;
}

const dir = mkdtempSync(join(tmpdir(), "bench-trust-"));
const load = (modelPath: string) =>
  LlamaCppEngine.load({ modelPath, gpu: false, threads: 1, contextSize: 1024 });
const reference = await load(STORIES);
const variant = async (name: string, perturbation: Parameters<typeof writePerturbedGguf>[2]) => {
  const path = join(dir, `${name}.gguf`);
  writePerturbedGguf(STORIES, path, perturbation);
  return load(path);
};
const fp16 = await variant("round10", { kind: "round", mantissaBits: 10 });
const bf16 = await variant("round7", { kind: "round", mantissaBits: 7 });
const noisy = await variant("noise", { kind: "noise", relative: 0.01, seed: 1 });
const scenarios: Scenario[] = [
  { name: "honest, temperature 0", worker: reference, temperature: 0 },
  { name: "honest, temperature 1", worker: reference, temperature: 1 },
  { name: "honest, temperature 0.7", worker: reference, temperature: 0.7 },
  { name: "weights rounded to fp16 precision (10 bits), T 1", worker: fp16, temperature: 1 },
  { name: "weights rounded to fp16 precision (10 bits), T 0", worker: fp16, temperature: 0 },
  { name: "weights rounded to bf16 precision (7 bits), T 1", worker: bf16, temperature: 1 },
  { name: "weights × (1 + 1% noise), T 1", worker: noisy, temperature: 1 },
  { name: "random tokens, confident logprobs", worker: "random", temperature: 1 },
];

const SCORED_POSITIONS = 128;
/** CPU time of this process (the engines run here, one llama.cpp thread each), in ms. */
const cpuMs = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
};
/** `wanted` random ascending indexes below `count` (all when fewer). */
function samplePositions(count: number, wanted: number): number[] {
  const all = Array.from({ length: count }, (_, i) => i);
  if (count <= wanted) return all;
  for (let i = count - 1; i > 0; i--) {
    const j = Math.floor(random() * (i + 1));
    [all[i], all[j]] = [all[j] as number, all[i] as number];
  }
  return all.slice(0, wanted).sort((a, b) => a - b);
}

let state = 12345;
const random = () => {
  state = (state * 1103515245 + 12345) % 2147483648;
  return state / 2147483648;
};

console.log(
  `trust benchmark: ${JOBS} audited jobs of ${TOKENS} tokens per scenario, top-5, α ${DEFAULT_TEST.alpha}`,
);
console.log(new SequentialTest().describe());
console.log(
  "| scenario | jobs failed from one answer | of them by the drift test | drift ×10⁻⁴ (min / median / max) | worker test: failed / passed decisions | tokens to decide (mean, max) | verifier / generation, CPU ms | the same, wall time |",
);
console.log("| --- | --- | --- | --- | --- | --- | --- | --- |");
for (const scenario of scenarios) {
  let failedAlone = 0;
  let failedByDrift = 0;
  const drifts: number[] = [];
  const decideTokens: number[] = [];
  let generationMs = 0;
  let verifyMs = 0;
  let generationCpuMs = 0;
  let verifyCpuMs = 0;
  const running = new SequentialTest();
  let runningFailed = 0;
  let runningPassed = 0;
  for (let job = 0; job < JOBS; job++) {
    const request: Omit<GenerateRequest, "signal"> = {
      model: "stories260K",
      messages: [],
      prompt: PROMPTS[job % PROMPTS.length] as string,
      sampling: { temperature: scenario.temperature, seed: 10_000 + job },
      maxTokens: TOKENS,
      tokenDetail: { topK: 5 },
    };
    let details: TokenDetail[];
    let text: string;
    let usage: { promptTokens: number; completionTokens: number } | null;
    const started = performance.now();
    const startedCpu = cpuMs();
    if (scenario.worker === "random") {
      details = Array.from({ length: TOKENS }, () => ({
        tokenId: 3 + Math.floor(random() * 509),
        logprob: -0.7,
        top: [],
      }));
      const spelled = await reference.score({
        request,
        tokenIds: [],
        topK: 0,
        signal: new AbortController().signal,
      });
      text = "";
      usage = { promptTokens: spelled.promptTokens, completionTokens: TOKENS };
    } else {
      const generated = await collectGeneration(
        scenario.worker.generate({ ...request, signal: new AbortController().signal }),
      );
      details = generated.pieces.flatMap((piece) => piece.tokenDetails ?? []);
      text = generated.text;
      usage = generated.result.usage ?? null;
    }
    generationMs += performance.now() - started;
    generationCpuMs += cpuMs() - startedCpu;
    // As the trust service does: 64 random positions of the answer get a distribution.
    const positions = samplePositions(details.length, SCORED_POSITIONS);
    const verifyStarted = performance.now();
    const verifyStartedCpu = cpuMs();
    const scored = await reference.score({
      request,
      tokenIds: details.map((d) => d.tokenId),
      positions,
      topK: 5,
      signal: new AbortController().signal,
    });
    verifyMs += performance.now() - verifyStarted;
    verifyCpuMs += cpuMs() - verifyStartedCpu;
    const stats = auditStatistics({
      temperature: scenario.temperature,
      topK: 5,
      stoppedBySequence: false,
      // The random cheater's text is what its ids spell (it has the tokenizer): only the statistics catch it.
      streamedText: scenario.worker === "random" ? scored.text : text,
      chunkTokenCount: details.length,
      usage,
      reported: details,
      positions,
      reference: { ...scored, error: "" },
    });
    const alone = new SequentialTest().feed(stats);
    if (alone.outcome === "failed") failedAlone += 1;
    if (stats.drift !== null) {
      drifts.push(stats.drift);
      if (stats.violations.length === 0 && stats.drift > DEFAULT_TEST.driftThreshold) failedByDrift += 1;
    }
    if (alone.tokensToDecide !== null) decideTokens.push(alone.tokensToDecide);
    const step = running.feed(stats);
    if (step.outcome === "failed") runningFailed += 1;
    else if (step.outcome === "passed") runningPassed += 1;
  }
  drifts.sort((a, b) => a - b);
  const e4 = (x: number | undefined) => (x === undefined ? "-" : (x * 1e4).toFixed(2));
  const driftRange = `${e4(drifts[0])} / ${e4(drifts[drifts.length >> 1])} / ${e4(drifts[drifts.length - 1])}`;
  const mean = decideTokens.length > 0 ? decideTokens.reduce((a, b) => a + b, 0) / decideTokens.length : 0;
  console.log(
    `| ${scenario.name} | ${failedAlone}/${JOBS} (${((100 * failedAlone) / JOBS).toFixed(1)} %) | ${failedByDrift} | ${drifts.length > 0 ? driftRange : "no shared alternatives"} | ${runningFailed} / ${runningPassed} | ${mean.toFixed(1)}, ${decideTokens.length > 0 ? Math.max(...decideTokens) : "-"} | ${verifyCpuMs.toFixed(0)} / ${generationCpuMs.toFixed(0)} (${((100 * verifyCpuMs) / generationCpuMs).toFixed(0)} %) | ${((100 * verifyMs) / generationMs).toFixed(0)} % |`,
  );
}
await Promise.all([fp16.close(), bf16.close(), noisy.close()]);

// The verifier's cost on a large vocabulary: node-llama-cpp hands each scored position's
// distribution over as a map of the whole vocabulary, which dominates on 32,000 tokens.
const TINY = join(values.models as string, "llama-2-tiny-random.gguf");
if (existsSync(TINY)) {
  const tiny = await load(TINY);
  let generation = 0;
  let scoreAll = 0;
  let scoreSampled = 0;
  const runs = 10;
  for (let run = 0; run < runs; run++) {
    const request: Omit<GenerateRequest, "signal"> = {
      model: "tiny",
      messages: [],
      prompt: PROMPTS[run % PROMPTS.length] as string,
      sampling: { temperature: 1, seed: run },
      maxTokens: TOKENS,
      tokenDetail: { topK: 5 },
    };
    let started = performance.now();
    const generated = await collectGeneration(
      tiny.generate({ ...request, signal: new AbortController().signal }),
    );
    generation += performance.now() - started;
    const tokenIds = generated.pieces.flatMap((p) => p.tokenDetails ?? []).map((d) => d.tokenId);
    started = performance.now();
    await tiny.score({ request, tokenIds, topK: 5, signal: new AbortController().signal });
    scoreAll += performance.now() - started;
    started = performance.now();
    await tiny.score({
      request,
      tokenIds,
      positions: samplePositions(tokenIds.length, SCORED_POSITIONS),
      topK: 5,
      signal: new AbortController().signal,
    });
    scoreSampled += performance.now() - started;
  }
  console.log(
    `\nllama-2-tiny-random (32,000-token vocabulary), ${runs} answers of ${TOKENS} tokens with token detail: ` +
      `generation ${(generation / runs).toFixed(0)} ms, scoring every position ${(scoreAll / runs).toFixed(0)} ms ` +
      `(${((100 * scoreAll) / generation).toFixed(0)} %), scoring ${SCORED_POSITIONS} positions ${(scoreSampled / runs).toFixed(0)} ms ` +
      `(${((100 * scoreSampled) / generation).toFixed(0)} %)`,
  );
  await tiny.close();
}
await reference.close();
rmSync(dir, { recursive: true, force: true });

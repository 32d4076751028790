/**
 * What the verifier's teacher-forced scoring costs against generating the audited answer, on
 * stories260K and on a copy of it eight times wider (bench/wide-gguf.ts, ~15 M parameters, random
 * weights), with the llama-cpp engine a trusted verifier runs, one CPU thread.
 *
 *   npx tsx bench/verifier-cost.ts [--jobs 20] [--tokens 100] [--factor 8]
 *
 * Per model: `--jobs` answers of `--tokens` tokens generated at temperature 1 with token detail
 * (top-5), as an audited job is; each scored at every position with top-5 (`score`, as the trust
 * service asks for answers of up to 128 tokens). Reported: the CPU time of both (this process runs
 * the engine) and their ratio; the target is a verifier at ≤ 20 % of the generation.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { parseArgs } from "node:util";
import { STORIES_260K } from "../test/support/models.js";
import { collectGeneration, type GenerateRequest } from "../worker/engines/engine.js";
import { LlamaCppEngine } from "../worker/engines/llama-cpp-engine.js";
import { writeWidenedGguf } from "./wide-gguf.js";

const { values } = parseArgs({
  options: {
    jobs: { type: "string", default: "20" },
    tokens: { type: "string", default: "100" },
    factor: { type: "string", default: "8" },
    help: { type: "boolean", short: "h" },
  },
});
if (values.help) {
  process.stdout.write(
    "Usage: npx tsx bench/verifier-cost.ts [--jobs 20] [--tokens 100] [--factor 8]\n\n" +
      "CPU time of the verifier's teacher-forced scoring against the generation it audits, on\n" +
      "stories260K and on a copy --factor times wider with random weights (one CPU thread).\n",
  );
  process.exit(0);
}
if (!existsSync(STORIES_260K)) {
  console.error(`bench/verifier-cost: ${STORIES_260K} is absent; nothing to measure`);
  process.exit(0);
}
const JOBS = Number(values.jobs);
const TOKENS = Number(values.tokens);
const FACTOR = Number(values.factor);
const PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben went to the park", "Tom had a red ball"];

const cpuMs = () => {
  const { user, system } = process.cpuUsage();
  return (user + system) / 1000;
};

const dir = mkdtempSync(join(tmpdir(), "bench-verifier-"));
try {
  const wide = join(dir, `stories260K-x${FACTOR}.gguf`);
  const parameters = writeWidenedGguf(STORIES_260K, wide, FACTOR);
  console.log(`wrote ${wide}: ${(parameters / 1e6).toFixed(1)} M parameters`);
  console.log("| model | answers × tokens | generation, CPU ms | verifier, CPU ms | verifier / generation |");
  console.log("| --- | --- | ---: | ---: | ---: |");
  for (const [label, modelPath] of [
    ["stories260K (0.26 M parameters)", STORIES_260K],
    [`stories260K × ${FACTOR} wide (${(parameters / 1e6).toFixed(1)} M parameters, random weights)`, wide],
  ] as const) {
    const engine = await LlamaCppEngine.load({ modelPath, gpu: false, threads: 1, contextSize: 1024 });
    let generationCpu = 0;
    let verifierCpu = 0;
    let tokens = 0;
    // One unmeasured job first: the first evaluation pays for allocations.
    for (let job = -1; job < JOBS; job++) {
      const request: Omit<GenerateRequest, "signal"> = {
        model: "m",
        messages: [],
        prompt: PROMPTS[(job + PROMPTS.length) % PROMPTS.length] as string,
        sampling: { temperature: 1, seed: 1_000 + job },
        maxTokens: TOKENS,
        tokenDetail: { topK: 5 },
      };
      const generationStarted = cpuMs();
      const generated = await collectGeneration(
        engine.generate({ ...request, signal: new AbortController().signal }),
      );
      const generationEnded = cpuMs();
      const tokenIds = generated.pieces.flatMap((piece) => piece.tokenDetails ?? []).map((d) => d.tokenId);
      await engine.score({ request, tokenIds, topK: 5, signal: new AbortController().signal });
      if (job < 0) continue;
      generationCpu += generationEnded - generationStarted;
      verifierCpu += cpuMs() - generationEnded;
      tokens += tokenIds.length;
    }
    await engine.close();
    console.log(
      `| ${label} | ${JOBS} × ${Math.round(tokens / JOBS)} | ${generationCpu.toFixed(0)} | ${verifierCpu.toFixed(0)} | ${((100 * verifierCpu) / generationCpu).toFixed(0)} % |`,
    );
  }
} finally {
  rmSync(dir, { recursive: true, force: true });
}

/**
 * The verifier's fast distributions (worker/engines/llama-cpp-scoring.ts): the flat arrays taken
 * from node-llama-cpp's addon must be exactly what controlledEvaluate's Maps hold, and the scores
 * computed from them exactly what the Map-based computation gives — with the real tiny models, a
 * 512-token and a 32,000-token vocabulary.
 */
import { existsSync } from "node:fs";
import {
  type ControlledEvaluateInputItem,
  getLlama,
  type Llama,
  LlamaLogLevel,
  type LlamaModel,
  type Token,
} from "node-llama-cpp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { collectGeneration, type GenerateRequest } from "../../worker/engines/engine.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import {
  type DistributionOptions,
  evaluateDistributions,
  hasFastDistributions,
  naturalLog,
  scoreInDistribution,
} from "../../worker/engines/llama-cpp-scoring.js";
import { STORIES_260K, TINY_RANDOM } from "../support/models.js";

/** The scoring as it was computed from node-llama-cpp's Map: the specification of the fast one. */
function scoreInMap(probabilities: ReadonlyMap<number, number>, token: number, topK: number) {
  const p = probabilities.get(token) ?? 0;
  let rank = 0;
  for (const value of probabilities.values()) if (value > p) rank += 1;
  const best: [number, number][] = [];
  if (topK > 0) {
    for (const entry of probabilities) {
      if (best.length === topK && entry[1] <= (best[topK - 1] as [number, number])[1]) continue;
      let at = best.length;
      while (at > 0 && (best[at - 1] as [number, number])[1] < entry[1]) at -= 1;
      best.splice(at, 0, entry);
      if (best.length > topK) best.pop();
    }
  }
  return {
    logprob: naturalLog(p),
    rank,
    top: best.map(([tokenId, probability]) => ({ tokenId, logprob: naturalLog(probability) })),
  };
}

const flatten = (map: ReadonlyMap<number, number>) => [...map].flat();

describe("scoreInDistribution", () => {
  it("agrees with the Map-based scoring on ties, absent tokens, unsorted entries and any topK", () => {
    let state = 7;
    const random = () => {
      state = (state * 1103515245 + 12345) % 2147483648;
      return state / 2147483648;
    };
    for (let round = 0; round < 200; round++) {
      const size = 1 + Math.floor(random() * 40);
      const map = new Map<number, number>();
      // Few distinct values (ties), some zeros, tokens in no particular order, some ids left out.
      for (let i = 0; i < size; i++) {
        const id = Math.floor(random() * 60);
        map.set(id, random() < 0.1 ? 0 : Math.floor(random() * 6) / 10);
      }
      const flat = flatten(map);
      for (const token of [...map.keys(), 61, 1000]) {
        for (const topK of [0, 1, 3, 5, 100]) {
          expect(scoreInDistribution(flat, token, topK)).toEqual(scoreInMap(map, token, topK));
        }
      }
    }
    expect(scoreInDistribution([], 3, 5)).toEqual({ logprob: -9999, rank: 0, top: [] });
  });
});

for (const [name, path, length] of [
  ["stories260K", STORIES_260K, 60],
  ["llama-2-tiny-random", TINY_RANDOM, 12],
] as const) {
  describe.skipIf(!existsSync(path))(`fast teacher-forced distributions with ${name} (1 thread)`, () => {
    let llama: Llama;
    let model: LlamaModel;
    let engine: LlamaCppEngine;

    beforeAll(async () => {
      llama = await getLlama({ gpu: false, maxThreads: 1, logLevel: LlamaLogLevel.error });
      model = await llama.loadModel({ modelPath: path });
      engine = await LlamaCppEngine.load({ modelPath: path, gpu: false, threads: 1, contextSize: 512 });
    });
    afterAll(async () => {
      await engine?.close();
      await model?.dispose();
      await llama?.dispose();
    });

    it("returns exactly controlledEvaluate's distributions, in the same order", async () => {
      const context = await model.createContext({ contextSize: 512, threads: 1 });
      try {
        const sequence = context.getSequence();
        // The fast path is taken here (the pinned node-llama-cpp has the internals it uses).
        expect(hasFastDistributions(sequence)).toBe(true);
        const bos = model.tokens.bos as Token;
        const tokens = [bos, ...model.tokenize("Once upon a time, there was a little girl named Lily.")];
        while (tokens.length < length) tokens.push(tokens[(tokens.length % 8) + 1] as Token);
        const at = [0, 1, 2, 5, tokens.length - 2, tokens.length - 1];
        const cases: (DistributionOptions | undefined)[] = [
          undefined,
          { temperature: 1, topP: 1, topK: 0 },
          { temperature: 0.7, topP: 0.9, topK: 0 },
        ];
        for (const options of cases) {
          await sequence.clearHistory();
          const fast = await evaluateDistributions(sequence, tokens, at, options, (d) => Array.from(d));
          expect(sequence.contextTokens).toEqual(tokens);
          await sequence.clearHistory();
          const slow = await evaluateDistributions(sequence, tokens, at, options, (d) => Array.from(d), {
            fast: false,
          });
          await sequence.clearHistory();
          const items = tokens.map(
            (token, index): ControlledEvaluateInputItem =>
              at.includes(index)
                ? [token, { generateNext: { probabilities: true, ...(options ? { options } : {}) } }]
                : token,
          );
          const maps = (await sequence.controlledEvaluate(items)).filter((r) => r !== undefined);
          expect(maps).toHaveLength(at.length);
          for (const [i, result] of maps.entries()) {
            const map = result.next.probabilities as Map<Token, number>;
            // A whole vocabulary unless top_p cut it.
            if (!options || options.topP === 1)
              expect(map.size).toBe(model.fileInfo.metadata.tokenizer.ggml.tokens.length);
            expect(fast[i]).toEqual(flatten(map));
            expect(slow[i]).toEqual(flatten(map));
            for (const token of [tokens[at[i] as number] as number, 0, ...[...map.keys()].slice(0, 3)]) {
              expect(scoreInDistribution(fast[i] as number[], token, 5)).toEqual(scoreInMap(map, token, 5));
            }
          }
        }
      } finally {
        await context.dispose();
      }
    });

    it("scores a generated answer exactly as the Map-based computation over controlledEvaluate does", async () => {
      const context = await model.createContext({ contextSize: 512, threads: 1 });
      try {
        const sequence = context.getSequence();
        for (const temperature of [0, 0.8]) {
          const request: Omit<GenerateRequest, "signal"> = {
            model: name,
            messages: [],
            prompt: "Once upon a time",
            sampling: { temperature, seed: 3 },
            maxTokens: length,
            tokenDetail: { topK: 5 },
          };
          const generated = await collectGeneration(
            engine.generate({ ...request, signal: new AbortController().signal }),
          );
          const tokenIds = generated.pieces.flatMap((p) => p.tokenDetails ?? []).map((d) => d.tokenId);
          expect(tokenIds.length).toBeGreaterThan(3);
          tokenIds[1] = 5; // a token the model finds unlikely
          const positions = [0, 1, 3, tokenIds.length - 1];
          const scored = await engine.score({
            request,
            tokenIds,
            positions,
            topK: 5,
            signal: new AbortController().signal,
          });
          const prompt = engine.renderText("Once upon a time").tokens;
          const first = prompt.length - 1;
          const options = temperature > 0 ? { temperature, topP: 1, topK: 0 } : undefined;
          await sequence.clearHistory();
          const results = await sequence.controlledEvaluate(
            [...prompt, ...(tokenIds as Token[])].map(
              (token, index): ControlledEvaluateInputItem =>
                positions.includes(index - first)
                  ? [token, { generateNext: { probabilities: true, ...(options ? { options } : {}) } }]
                  : token,
            ),
          );
          const expected = positions.map((j) =>
            scoreInMap(results[first + j]?.next?.probabilities ?? new Map(), tokenIds[j] as number, 5),
          );
          expect(scored.scores).toEqual(expected);
          expect(scored.scores[1]?.rank).toBeGreaterThan(0);
        }
      } finally {
        await context.dispose();
      }
    });
  });
}

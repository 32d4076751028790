/**
 * Teacher-forced next-token distributions for the verifier, without node-llama-cpp's per-position Map.
 *
 * `LlamaContextSequence.controlledEvaluate` asks the native addon for each requested position's
 * distribution (`AddonContext.sampleToken(batchLogitIndex, sampler, true)`), which answers with a flat
 * array `[token, probability, token, probability, …]` over the whole vocabulary, and then revives it
 * into a `Map<token, probability>`. On a 32,000-token vocabulary building that Map and iterating it
 * cost half as much again as the native work (a verifier scoring 100 positions spent a third of its
 * time there). {@link evaluateDistributions} does what controlledEvaluate does — one prefill through
 * the sequence's own decoding queue, the same sampler configuration, the same native call — but hands
 * each flat array to the caller as it arrives. The numbers are the addon's, unchanged.
 *
 * This reaches into node-llama-cpp internals (3.21.1): `LlamaContextSequence._decodeTokens`,
 * `_resolveSamplerConfig`, `_contextShift`, `_takeIntervalCheckpointIfNeededAfterBatch`,
 * `LlamaContext._ctx.sampleToken`, `Llama._bindings.AddonSampler` and `LlamaModel._model`. When any of
 * them is missing (another version), it falls back to controlledEvaluate and flattens its Maps, so
 * results stay the same, only slower. test/unit/worker-llama-cpp-scoring.test.ts checks that both
 * paths agree exactly.
 */
import type { LlamaContextSequence, Token } from "node-llama-cpp";

/** A next-token distribution as the addon returns it: token ids at even indexes, probabilities after each. */
export type FlatDistribution = ArrayLike<number>;

/** Sampling options of the distribution (undefined: node-llama-cpp's defaults, i.e. the raw softmax). */
export interface DistributionOptions {
  temperature?: number;
  topP?: number;
  topK?: number;
}

/** OpenAI reports this log-probability for a token the model gave no probability at all. */
const MIN_LOGPROB = -9999;

/** What {@link evaluateDistributions} uses of node-llama-cpp's internals; checked before use. */
interface NativeSampler {
  applyConfig(config: Record<string, unknown>): void;
  dispose(): void;
}
interface SequenceInternals {
  _decodeTokens(
    tokens: Token[],
    logits: boolean[],
    evaluationPriority: number,
    tokenMeter: unknown,
    contextShiftOptions: unknown,
    logitDataMapper: (batchLogitIndex: number, tokenIndex: number) => unknown,
    afterBatchAction?: unknown,
  ): Promise<unknown[]>;
  _resolveSamplerConfig(options: Record<string, unknown>): Record<string, unknown>;
  _contextShift: { size: unknown; strategy: unknown };
  _takeIntervalCheckpointIfNeededAfterBatch?: unknown;
  _loadedTokenPredictions?: unknown[];
  tokenMeter: unknown;
  model: {
    _model?: unknown;
    _llama?: { _bindings?: { AddonSampler?: new (model: unknown) => NativeSampler } };
  };
  context: {
    _ctx?: {
      sampleToken(
        batchLogitIndex: number,
        sampler: NativeSampler,
        probabilities: boolean,
        confidence: boolean,
      ): Promise<[number, number[] | undefined, number | undefined]>;
    };
  };
}

/** node-llama-cpp's default evaluation priority (controlledEvaluate's default). */
const EVALUATION_PRIORITY = 5;

/** The internals used by the fast path, or undefined when this node-llama-cpp lacks one of them. */
function internals(sequence: LlamaContextSequence): SequenceInternals | undefined {
  const s = sequence as unknown as SequenceInternals;
  const ok =
    typeof s._decodeTokens === "function" &&
    typeof s._resolveSamplerConfig === "function" &&
    typeof s._contextShift === "object" &&
    s._contextShift !== null &&
    typeof s.context?._ctx?.sampleToken === "function" &&
    typeof s.model?._llama?._bindings?.AddonSampler === "function" &&
    s.model._model !== undefined &&
    // Token predictions would sit in the state ahead of what we evaluate; the engine uses none.
    (s._loadedTokenPredictions?.length ?? 0) === 0;
  return ok ? s : undefined;
}

/** True when {@link evaluateDistributions} can take the fast path on this sequence. */
export function hasFastDistributions(sequence: LlamaContextSequence): boolean {
  return internals(sequence) !== undefined;
}

/**
 * Evaluates `tokens` on `sequence` (appended to what it holds) and, for each index in `at` (ascending
 * indexes into `tokens`), hands `consume` the distribution of the token that follows it — what
 * `controlledEvaluate` with `generateNext: {probabilities: true, options}` at those indexes gives —
 * as a flat array; returns what `consume` returned, in the order of `at`. Each array is consumed
 * as soon as the addon returns it, so that a whole vocabulary per position is never held for all
 * positions at once.
 */
export async function evaluateDistributions<T>(
  sequence: LlamaContextSequence,
  tokens: readonly Token[],
  at: readonly number[],
  options: DistributionOptions | undefined,
  consume: (distribution: FlatDistribution, position: number) => T,
  { fast = true }: { fast?: boolean } = {},
): Promise<T[]> {
  const s = fast ? internals(sequence) : undefined;
  if (!s) return viaControlledEvaluate(sequence, tokens, at, options, consume);
  const AddonSampler = s.model._llama?._bindings?.AddonSampler as new (model: unknown) => NativeSampler;
  const native = s.context._ctx as NonNullable<SequenceInternals["context"]["_ctx"]>;
  // controlledEvaluate resolves each position's options the same way; they are the same for all here.
  const config = s._resolveSamplerConfig({
    temperature: options?.temperature,
    minP: undefined,
    topK: options?.topK,
    topP: options?.topP,
    seed: undefined,
    xtc: undefined,
    repeatPenalty: undefined,
    dryRepeatPenalty: undefined,
    tokenBias: undefined,
  });
  const sampler = new AddonSampler(s.model._model);
  const logits: boolean[] = [];
  const positionOf = new Map<number, number>();
  for (const [position, index] of at.entries()) {
    logits[index] = true;
    positionOf.set(index, position);
  }
  const out: T[] = [];
  // The sampler must outlive any sampling still running on the addon's thread pool.
  let sampling: Promise<unknown> = Promise.resolve();
  let disposed = false;
  try {
    sampler.applyConfig(config);
    // The addon samples one position at a time (the decoding queue chains these calls).
    await s._decodeTokens(
      [...tokens],
      logits,
      EVALUATION_PRIORITY,
      s.tokenMeter,
      { size: s._contextShift.size, strategy: s._contextShift.strategy },
      async (batchLogitIndex, tokenIndex) => {
        const position = positionOf.get(tokenIndex);
        if (disposed || position === undefined) return undefined;
        const call = native.sampleToken(batchLogitIndex, sampler, true, false);
        sampling = call.catch(() => undefined);
        const [, probabilities] = await call;
        out[position] = consume(probabilities ?? [], position);
        return undefined;
      },
      s._takeIntervalCheckpointIfNeededAfterBatch,
    );
    // Every asked position has a distribution (an empty one if the addon gave none).
    for (let position = 0; position < at.length; position++) {
      if (!(position in out)) out[position] = consume([], position);
    }
    return out;
  } finally {
    disposed = true;
    await sampling;
    sampler.dispose();
  }
}

/** The public path: controlledEvaluate, its Maps flattened in their order. */
async function viaControlledEvaluate<T>(
  sequence: LlamaContextSequence,
  tokens: readonly Token[],
  at: readonly number[],
  options: DistributionOptions | undefined,
  consume: (distribution: FlatDistribution, position: number) => T,
): Promise<T[]> {
  const wanted = new Set(at);
  const generateNext = { probabilities: true, ...(options ? { options } : {}) } as const;
  const items = tokens.map((token, index) =>
    wanted.has(index) ? ([token, { generateNext }] as const) : token,
  );
  const results = await sequence.controlledEvaluate(
    items as Parameters<LlamaContextSequence["controlledEvaluate"]>[0],
  );
  return at.map((index, position) => {
    const map = results[index]?.next?.probabilities;
    const flat: number[] = [];
    if (map) for (const [token, probability] of map) flat.push(token, probability);
    return consume(flat, position);
  });
}

/** What the verifier reports for one token: its log-probability, rank and the top alternatives. */
export interface TokenScore {
  logprob: number;
  /** How many tokens have a higher probability. */
  rank: number;
  top: { tokenId: number; logprob: number }[];
}

/**
 * Scores `token` in a flat distribution: the same numbers as taking `get(token)` (0 when absent), the
 * count of larger values, and the `topK` largest entries in a single pass (ties keep the earlier entry)
 * from the Map of the same entries.
 */
export function scoreInDistribution(distribution: FlatDistribution, token: number, topK: number): TokenScore {
  const length = distribution.length - (distribution.length % 2);
  let p = 0;
  for (let i = 0; i < length; i += 2) {
    if (distribution[i] === token) {
      p = distribution[i + 1] as number;
      break;
    }
  }
  let rank = 0;
  // The best `topK` as parallel arrays sorted by decreasing probability (insertion into a short list).
  const bestTokens: number[] = [];
  const bestProbabilities: number[] = [];
  for (let i = 0; i < length; i += 2) {
    const probability = distribution[i + 1] as number;
    if (probability > p) rank += 1;
    if (topK <= 0) continue;
    if (bestTokens.length === topK && probability <= (bestProbabilities[topK - 1] as number)) continue;
    let position = bestTokens.length;
    while (position > 0 && (bestProbabilities[position - 1] as number) < probability) position -= 1;
    bestTokens.splice(position, 0, distribution[i] as number);
    bestProbabilities.splice(position, 0, probability);
    if (bestTokens.length > topK) {
      bestTokens.pop();
      bestProbabilities.pop();
    }
  }
  const top = bestTokens.map((tokenId, i) => ({
    tokenId,
    logprob: naturalLog(bestProbabilities[i] as number),
  }));
  return { logprob: naturalLog(p), rank, top };
}

/** ln(p), clamped as OpenAI reports it (a probability of 0 gives -9999). */
export function naturalLog(probability: number): number {
  return probability > 0 ? Math.max(Math.log(probability), MIN_LOGPROB) : MIN_LOGPROB;
}

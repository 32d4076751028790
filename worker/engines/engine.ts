/**
 * The inference engine abstraction the worker runs jobs on.
 *
 * An engine turns one chat conversation into a stream of text pieces. `generate()` returns an async
 * generator: each yielded value is a piece of output text with the number of tokens that produced
 * it, and the generator's *return value* is the final {@link GenerationResult} (why it stopped and
 * the engine's own token counts). Use {@link runGeneration} to consume both conveniently.
 *
 * Contract for implementations:
 * - Pieces are in order, never split a UTF-8 character, and their `tokenCount`s sum to the number
 *   of completion tokens streamed.
 * - Never more than `maxTokens` completion tokens (when `maxTokens > 0`); hitting the limit ends
 *   the generation with finish reason `"length"`.
 * - When `signal` aborts, generation stops promptly and the generator *returns* (does not throw)
 *   with finish reason `"cancelled"`.
 * - Failures throw an {@link EngineError} whose `code` tells the worker how to report them.
 */
import type { TokenLogprob, ToolCallDelta } from "../../common/generation.js";

/** Why a generation ended. */
export type EngineFinishReason = "stop" | "length" | "content_filter" | "cancelled" | "tool_calls";

/** Token counts as the engine reports them. */
export interface EngineUsage {
  /** Tokens in the rendered prompt (including BOS / template tokens). */
  promptTokens: number;
  /** Tokens generated. */
  completionTokens: number;
}

/** A piece of generated output. */
export interface EnginePiece {
  /** Text generated since the previous piece; never a partial UTF-8 character. May be "". */
  text: string;
  /** How many tokens produced this piece (usually 1; more when a character spans tokens). */
  tokenCount: number;
  /** Tool-call fragments produced with this piece. */
  toolCalls?: ToolCallDelta[];
  /** With GenerateRequest.logprobs: one entry per token of this piece, in order. */
  logprobs?: TokenLogprob[];
  /**
   * With GenerateRequest.tokenDetail: every token generated since the previous piece (including
   * tokens whose text a stop sequence cut), by id, with its log-probability and alternatives.
   */
  tokenDetails?: TokenDetail[];
}

/** One generated token by id (JobChunk.token_details on the wire). */
export interface TokenDetail {
  tokenId: number;
  /** In the distribution the token was sampled from (the job's temperature; raw softmax at 0). */
  logprob: number;
  /** The most likely tokens of that distribution, most likely first. */
  top: { tokenId: number; logprob: number }[];
}

/** A verifier job: score `tokenIds` after the prompt of `request`, teacher-forced (ScoreAssign). */
export interface ScoreRequest {
  /** The audited job as assigned: its prompt (messages or raw prompt) and sampling temperature. */
  request: Omit<GenerateRequest, "signal">;
  tokenIds: number[];
  /** Ascending indexes into tokenIds to score; undefined or empty: every token. */
  positions?: number[];
  /** Alternatives to return per position. */
  topK: number;
  signal: AbortSignal;
}

/** The reference's view of each scored token. */
export interface ScoreOutcome {
  scores: { logprob: number; rank: number; top: { tokenId: number; logprob: number }[] }[];
  promptTokens: number;
  /** The token ids detokenized. */
  text: string;
}

/** The outcome of a generation, the return value of {@link Engine.generate}'s generator. */
export interface GenerationResult {
  finishReason: EngineFinishReason;
  /** Present when the engine reported (or knows) its token counts. */
  usage?: EngineUsage;
}

/** One chat message. */
export interface EngineMessage {
  role: string;
  content: string;
  name?: string;
  /** On an assistant message: the calls it made. */
  toolCalls?: { id: string; name: string; arguments: string }[];
  /** On a tool message: the call it answers. */
  toolCallId?: string;
  /** Images (https: or data: URLs), for engines with vision. */
  imageUrls?: string[];
}

/** A function the model may call. */
export interface EngineTool {
  name: string;
  description: string;
  /** JSON Schema of the parameters; undefined when none. */
  parameters?: Record<string, unknown>;
  strict: boolean;
}

/** OpenAI's tool_choice. */
export type EngineToolChoice =
  | { mode: "auto" | "none" | "required" }
  | { mode: "function"; functionName: string };

/** OpenAI's response_format. */
export type EngineResponseFormat =
  | { type: "text" }
  | { type: "json_object" }
  | { type: "json_schema"; name: string; schema: Record<string, unknown>; strict: boolean };

/** Sampling parameters; an unset field means "the engine's default". */
export interface EngineSampling {
  /** 0 means greedy decoding. */
  temperature?: number;
  topP?: number;
  /** Stop sequences; they are not included in the output. */
  stop?: string[];
  seed?: number;
  presencePenalty?: number;
  frequencyPenalty?: number;
}

/** One generation request (one job). */
export interface GenerateRequest {
  /** The model name (as offered; engines may map it to their own name). */
  model: string;
  /** Empty for a raw text completion (see `prompt`). */
  messages: EngineMessage[];
  /** A raw text completion: continue this text as is, with no chat template. */
  prompt?: string;
  tools?: EngineTool[];
  toolChoice?: EngineToolChoice;
  parallelToolCalls?: boolean;
  responseFormat?: EngineResponseFormat;
  /** Per-token log-probabilities with `top` alternatives (0–20) each; undefined when not wanted. */
  logprobs?: { top: number };
  /** Token ids with logprobs and `topK` alternatives by id (JobAssign.token_detail); undefined when not asked. */
  tokenDetail?: { topK: number };
  sampling: EngineSampling;
  /** The most completion tokens to generate; 0 means no explicit limit (engine / context bound). */
  maxTokens: number;
  /** Aborting stops the generation, which then returns with finish reason "cancelled". */
  signal: AbortSignal;
}

/** The generator returned by {@link Engine.generate}. */
export type Generation = AsyncGenerator<EnginePiece, GenerationResult, undefined>;

/** An inference engine. */
export interface Engine {
  /** Short engine name for offers and logs, e.g. "openai-compatible" or "llama.cpp". */
  readonly name: string;
  /** Starts a generation. Errors may surface on the first `next()`. */
  generate(request: GenerateRequest): Generation;
  /** Releases resources (models, connections). Running generations are cancelled. */
  close(): Promise<void>;
  /**
   * Scores tokens teacher-forced (one prefill pass); only engines that can serve as trusted
   * verifiers implement it. Throws an {@link EngineError} ("invalid_input") for tokens it cannot score.
   */
  score?(request: ScoreRequest): Promise<ScoreOutcome>;
  /** The engine's version for Offer.engine_version, e.g. "node-llama-cpp 3.21.1". */
  readonly version?: string;
}

/** How an engine failure maps to a JobFailed code. */
export type EngineErrorCode = "engine_error" | "invalid_input" | "model_unavailable" | "overloaded";

/** An engine failure with a machine-readable code. */
export class EngineError extends Error {
  readonly code: EngineErrorCode;
  constructor(code: EngineErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = "EngineError";
    this.code = code;
  }
}

/**
 * Drives a generation to its end, calling `onPiece` for every piece (awaited, so the caller can
 * apply back-pressure), and resolves with the generation's result. Errors from the engine reject.
 */
export async function runGeneration(
  generation: Generation,
  onPiece: (piece: EnginePiece) => void | Promise<void>,
): Promise<GenerationResult> {
  for (;;) {
    const step = await generation.next();
    if (step.done) return step.value;
    try {
      // A consumer that takes the piece at once returns nothing: no microtask turn per piece then.
      const taken = onPiece(step.value);
      if (taken) await taken;
    } catch (error) {
      // Let the engine release what it holds (run its `finally` blocks) before rethrowing.
      await generation.return({ finishReason: "cancelled" }).catch(() => undefined);
      throw error;
    }
  }
}

/** Runs a generation and collects everything: handy for tests and one-shot use. */
export async function collectGeneration(
  generation: Generation,
): Promise<{ pieces: EnginePiece[]; text: string; result: GenerationResult }> {
  const pieces: EnginePiece[] = [];
  const result = await runGeneration(generation, (piece) => {
    pieces.push(piece);
  });
  return { pieces, text: pieces.map((p) => p.text).join(""), result };
}

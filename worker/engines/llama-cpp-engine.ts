/**
 * An engine that runs a GGUF model in process with node-llama-cpp.
 *
 * - Backend: `gpu` chooses node-llama-cpp's build ("auto", the default, takes the best one that works
 *   here: CUDA, Vulkan or Metal, else the CPU); `threads` sets the CPU threads (default:
 *   node-llama-cpp's choice for the machine). On small machines pass `threads: 1`: node-llama-cpp's
 *   default can oversubscribe them and slow down by orders of magnitude.
 * - The context has one sequence per concurrent job (`concurrency`); a job waits for a free
 *   sequence, clears it, and owns it until it ends.
 * - Prompt: node-llama-cpp's chat wrapper for the GGUF's chat template renders the conversation,
 *   tools included. A GGUF without a template (a base model such as stories260K) has no chat format
 *   to follow: its prompt is the messages' contents joined with "\n" after BOS. A raw completion
 *   (`prompt` set, no messages) is BOS + the text, with no template.
 * - Sampling follows OpenAI's defaults: temperature 1 and top_p 1 when unset, and no top-k cut.
 *   Temperature 0 is greedy decoding.
 * - `response_format` json_object / json_schema: the output is constrained by node-llama-cpp's JSON
 *   grammar, or a grammar built from the schema, and ends as soon as the JSON value is complete.
 * - Tools: with tool_choice "auto" (or unset) on a model with a chat template, node-llama-cpp's
 *   function calling (LlamaChat with `functions`) lets the model decide, and its calls become
 *   tool-call deltas. With "required" or a named function the call is forced: the function's name is
 *   generated under a grammar of the allowed names (unless only one is allowed) and its arguments
 *   under the grammar of its parameters' JSON schema, in the chat wrapper's function-call syntax.
 *   A model without a chat template only calls tools when forced. A call ends the turn with finish
 *   reason "tool_calls".
 * - Logprobs: the probabilities node-llama-cpp reports for each sampled token. With greedy decoding,
 *   or temperature 1 and top_p 1, and no grammar, they are the model's raw distribution (what a
 *   teacher-forced evaluation of the same tokens gives); otherwise they are the distribution the
 *   token was sampled from (after temperature, top_p or the grammar). LlamaChat does not expose them,
 *   so tools with tool_choice "auto" on a templated model give none.
 * - Generation is token by token; each token becomes a piece with `tokenCount: 1`, except that a
 *   token whose text ends in an incomplete UTF-8 character is held back and merged into the next
 *   piece. Generation stops at an end-of-generation token ("stop"), a stop sequence ("stop"),
 *   `maxTokens` or the end of the context window ("length"), or on abort ("cancelled").
 */
import { randomBytes } from "node:crypto";
import type {
  ChatHistoryItem,
  ChatModelFunctionCall,
  ChatModelFunctions,
  ChatWrapper,
  GbnfJsonSchema,
  Llama,
  LlamaContext,
  LlamaContextSequence,
  LlamaGrammar,
  LlamaLogLevel,
  LlamaModel,
  LlamaText,
  SequenceEvaluateOptions,
  Token,
} from "node-llama-cpp";
import type { TokenLogprob } from "../../common/generation.js";
import {
  type Engine,
  EngineError,
  type EngineFinishReason,
  type EngineMessage,
  type EnginePiece,
  type EngineSampling,
  type EngineTool,
  type GenerateRequest,
  type Generation,
  type GenerationResult,
  type ScoreOutcome,
  type ScoreRequest,
  type TokenDetail,
} from "./engine.js";
import { evaluateDistributions, naturalLog, scoreInDistribution } from "./llama-cpp-scoring.js";

/**
 * node-llama-cpp's module. It is an optional dependency (native builds for every platform, hundreds
 * of megabytes), imported only when this engine loads a model, so that a control plane or a worker
 * with another engine installs and runs without it.
 */
type NodeLlamaCpp = typeof import("node-llama-cpp");

/** Imports node-llama-cpp, or fails saying how to install it when it is absent. */
async function importNodeLlamaCpp(): Promise<NodeLlamaCpp> {
  try {
    return await import("node-llama-cpp");
  } catch (error) {
    const missing =
      (error as NodeJS.ErrnoException).code === "ERR_MODULE_NOT_FOUND" &&
      String((error as Error).message).includes("'node-llama-cpp'");
    if (!missing) throw error;
    throw new EngineError(
      "model_unavailable",
      "the llama-cpp engine needs node-llama-cpp, an optional dependency that is not installed: " +
        "install it next to locallmarket (npm i node-llama-cpp@3.21.1, or npm i -g node-llama-cpp@3.21.1 " +
        "for a global locallmarket), or use --engine openai",
      { cause: error },
    );
  }
}

/** node-llama-cpp's backends: "auto" picks the best available one; false is the CPU. */
export type LlamaCppGpu = "auto" | "cuda" | "vulkan" | "metal" | false;

/** Options of {@link LlamaCppEngine.load}. */
export interface LlamaCppEngineOptions {
  /** Path of the GGUF file. */
  modelPath: string;
  /** Jobs run at once (one context sequence each). Default 1. */
  concurrency?: number;
  /** The backend. Default "auto". */
  gpu?: LlamaCppGpu;
  /** CPU threads for evaluation. Default: what node-llama-cpp picks for this machine. */
  threads?: number;
  /** Context window per sequence, in tokens. Default: the model's training context (at most 4096). */
  contextSize?: number;
  /** node-llama-cpp log level. Default "error" (it is chatty at "warn" about harmless metadata). */
  logLevel?: LlamaLogLevel;
}

/** The rendered prompt of a job. */
interface RenderedPrompt {
  tokens: Token[];
  /** Tokens that end generation (in addition to the model's end-of-generation tokens). */
  stopTokens: Set<Token>;
  /** Text sequences that end generation; not included in the output. */
  stopTexts: string[];
}

/** One generation pass over a sequence (see {@link LlamaCppEngine.phase}). */
interface PhaseOptions {
  sequence: LlamaContextSequence;
  /** Everything the sequence should hold before generating; generated tokens are appended to it. */
  tokens: Token[];
  evaluate: SequenceEvaluateOptions;
  grammar?: LlamaGrammar | undefined;
  /** Alternatives per token for logprobs; undefined when logprobs are not wanted. */
  top?: number | undefined;
  /** Alternatives per token for token details (ids); undefined when token detail is not asked. */
  detail?: number | undefined;
  /** The most tokens to generate. */
  limit: number;
  stopTokens: ReadonlySet<Token>;
  stopTexts: readonly string[];
  /** End as soon as the output is a complete JSON object or array. */
  json: boolean;
  signal: AbortSignal;
}

/** How a phase ended and how many tokens it generated. */
interface PhaseEnd {
  finishReason: "stop" | "length" | "cancelled";
  generated: number;
}

/** The end of a job's generation, before it becomes a {@link GenerationResult}. */
interface JobEnd {
  finishReason: EngineFinishReason;
  /** Prompt tokens: the rendered prompt and any forced function-call syntax. */
  promptTokens: number;
  completionTokens: number;
}

const DEFAULT_MAX_CONTEXT = 4096;
/** Tokens after which a still-incomplete character is emitted anyway (a UTF-8 char is <= 4 bytes). */
const MAX_HELD_TOKENS = 8;
/** Tokens of history given to the detokenizer so it renders leading spaces correctly. */
const DETOKENIZER_HISTORY = 8;
/** The arguments' schema of a function without parameters: an empty object. */
const NO_PARAMETERS: GbnfJsonSchema = { type: "object", properties: {} };

/** An {@link Engine} running a GGUF model in process with node-llama-cpp. */
export class LlamaCppEngine implements Engine {
  readonly name = "llama.cpp";
  readonly modelPath: string;
  /** "node-llama-cpp <version> (llama.cpp <release>)", for Offer.engine_version. */
  version = "node-llama-cpp";
  private readonly free: LlamaContextSequence[];
  private readonly waiters: Array<(sequence: LlamaContextSequence) => void> = [];
  private readonly closeController = new AbortController();
  private readonly chatWrapper: ChatWrapper | undefined;
  private busy = 0;
  private idleWaiters: Array<() => void> = [];

  private constructor(
    private readonly lib: NodeLlamaCpp,
    private readonly llama: Llama,
    private readonly model: LlamaModel,
    private readonly context: LlamaContext,
    modelPath: string,
  ) {
    this.modelPath = modelPath;
    this.free = [];
    for (let i = 0; i < context.totalSequences; i++) this.free.push(context.getSequence());
    // resolveChatWrapper also guesses a format for models without a template (e.g. Llama 2 chat
    // for any llama model); only a template the GGUF really carries is used.
    const template = (model.fileInfo.metadata as { tokenizer?: { chat_template?: unknown } }).tokenizer
      ?.chat_template;
    this.chatWrapper =
      typeof template === "string" && template.length > 0 ? lib.resolveChatWrapper(model) : undefined;
  }

  /** Loads the model and creates its context. */
  static async load(options: LlamaCppEngineOptions): Promise<LlamaCppEngine> {
    const concurrency = Math.max(1, Math.floor(options.concurrency ?? 1));
    const threads = options.threads !== undefined && options.threads > 0 ? options.threads : undefined;
    const lib = await importNodeLlamaCpp();
    let llama: Llama | undefined;
    let model: LlamaModel | undefined;
    try {
      llama = await lib.getLlama({
        gpu: options.gpu ?? "auto",
        ...(threads !== undefined ? { maxThreads: threads } : {}),
        logLevel: options.logLevel ?? lib.LlamaLogLevel.error,
      });
      model = await llama.loadModel({ modelPath: options.modelPath });
      const contextSize =
        options.contextSize && options.contextSize > 0
          ? options.contextSize
          : Math.min(model.trainContextSize, DEFAULT_MAX_CONTEXT);
      const context = await model.createContext({
        sequences: concurrency,
        contextSize,
        ...(threads !== undefined ? { threads } : {}),
      });
      const engine = new LlamaCppEngine(lib, llama, model, context, options.modelPath);
      const moduleVersion = await lib.getModuleVersion().catch(() => "unknown");
      engine.version = `node-llama-cpp ${moduleVersion} (llama.cpp ${llama.llamaCppRelease.release})`;
      return engine;
    } catch (error) {
      await model?.dispose().catch(() => undefined);
      await llama?.dispose().catch(() => undefined);
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("model_unavailable", `cannot load ${options.modelPath}: ${message}`, {
        cause: error,
      });
    }
  }

  /** The context window of each sequence, in tokens: what the worker offers as context length. */
  get contextLength(): number {
    return this.context.contextSize;
  }

  /** The context the model was trained with, in tokens. */
  get trainContextLength(): number {
    return this.model.trainContextSize;
  }

  /** The backend in use: "cuda", "vulkan", "metal" or "cpu". */
  get backend(): "cuda" | "vulkan" | "metal" | "cpu" {
    return this.llama.gpu === false ? "cpu" : this.llama.gpu;
  }

  /** CPU threads used to evaluate tokens. */
  get threads(): number {
    return this.context.idealThreads;
  }

  /** How many jobs can run at once. */
  get concurrency(): number {
    return this.context.totalSequences;
  }

  /** True when the GGUF has a chat template (and prompts are rendered with it). */
  get hasChatTemplate(): boolean {
    return this.chatWrapper !== undefined;
  }

  /** Renders a conversation to prompt tokens, with the tools the model may call when it has a template. */
  renderPrompt(messages: EngineMessage[], tools?: readonly EngineTool[]): RenderedPrompt {
    const model = this.model;
    if (!this.chatWrapper) return this.renderText(messages.map((m) => m.content).join("\n"));
    const history = toChatHistory(messages);
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    const state = this.chatWrapper.generateContextState({
      chatHistory: history,
      ...(tools && tools.length > 0
        ? { availableFunctions: toChatFunctions(tools), documentFunctionParams: true }
        : {}),
    });
    const stopTokens = new Set<Token>();
    const stopTexts: string[] = [];
    for (const trigger of state.stopGenerationTriggers) {
      if (trigger.values.every((value) => typeof value === "string")) {
        const text = trigger.values.join("");
        if (text) stopTexts.push(text);
        continue;
      }
      const tokens = trigger.tokenize(model.tokenizer);
      const [only] = tokens;
      if (tokens.length === 1 && only !== undefined) stopTokens.add(only);
    }
    return { tokens: state.contextText.tokenize(model.tokenizer), stopTokens, stopTexts };
  }

  /** Renders raw text (a completion prompt, or a conversation without a template): BOS + the text. */
  renderText(text: string): RenderedPrompt {
    const bos = this.model.tokens.bos;
    const tokens = [...(bos !== null ? [bos] : []), ...this.model.tokenize(text, false)];
    return { tokens, stopTokens: new Set(), stopTexts: [] };
  }

  async *generate(request: GenerateRequest): Generation {
    const signal = AbortSignal.any([request.signal, this.closeController.signal]);
    if (signal.aborted) return { finishReason: "cancelled" };

    const tools = request.toolChoice?.mode === "none" ? [] : (request.tools ?? []);
    const choice = request.toolChoice ?? { mode: "auto" };
    const raw = request.messages.length === 0;
    if (raw && request.prompt === undefined)
      throw new EngineError("invalid_input", "no messages and no prompt");
    const forced = forcedTools(tools, choice);
    // Function calling decided by the model needs a chat template to express calls in.
    const modelDecides = !raw && forced === undefined && tools.length > 0 && this.chatWrapper !== undefined;
    const prompt = raw
      ? this.renderText(request.prompt ?? "")
      : this.renderPrompt(request.messages, tools.length > 0 ? tools : undefined);
    const contextSize = this.context.contextSize;
    if (prompt.tokens.length === 0) throw new EngineError("invalid_input", "the prompt is empty");
    if (prompt.tokens.length >= contextSize) {
      throw new EngineError(
        "invalid_input",
        `the prompt has ${prompt.tokens.length} tokens, the context window is ${contextSize}`,
      );
    }
    const room = contextSize - prompt.tokens.length;
    const limit = request.maxTokens > 0 ? Math.min(request.maxTokens, room) : room;
    const grammar = forced ? undefined : await this.responseGrammar(request);

    const sequence = await this.acquire(signal);
    if (!sequence) return { finishReason: "cancelled" };
    try {
      await sequence.clearHistory();
      let end: JobEnd;
      if (modelDecides) {
        end = yield* this.chatWithFunctions(sequence, request, tools, limit, signal);
      } else {
        const common = {
          sequence,
          tokens: [...prompt.tokens],
          evaluate: evaluateOptions(request.sampling, sequence),
          top: request.logprobs?.top,
          detail: request.tokenDetail?.topK,
          limit,
          stopTokens: prompt.stopTokens,
          signal,
        };
        if (forced) {
          end = yield* this.forcedCall(common, forced);
        } else {
          const phase = yield* this.phase({
            ...common,
            grammar,
            stopTexts: [...prompt.stopTexts, ...(request.sampling.stop ?? []).filter((s) => s.length > 0)],
            json: grammar !== undefined,
          });
          end = { ...phase, promptTokens: prompt.tokens.length, completionTokens: phase.generated };
        }
      }
      if (end.finishReason === "cancelled") return { finishReason: "cancelled" };
      return {
        finishReason: end.finishReason,
        usage: { promptTokens: end.promptTokens, completionTokens: end.completionTokens },
      };
    } catch (error) {
      if (signal.aborted) return { finishReason: "cancelled" };
      if (error instanceof EngineError) throw error;
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("engine_error", `llama.cpp generation failed: ${message}`, { cause: error });
    } finally {
      this.release(sequence);
    }
  }

  /**
   * A verifier's job: the prompt of `request.request` rendered as for a generation, followed by the
   * audited tokens, evaluated in one pass (a prefill: nothing is sampled; see llama-cpp-scoring.ts).
   * Each token gets its log-probability in the distribution at the job's temperature and top_p (the
   * raw softmax at temperature 0), its rank and the top alternatives.
   */
  async score(request: ScoreRequest): Promise<ScoreOutcome> {
    const signal = AbortSignal.any([request.signal, this.closeController.signal]);
    const job = request.request;
    const raw = job.messages.length === 0;
    const prompt = raw ? this.renderText(job.prompt ?? "") : this.renderPrompt(job.messages);
    const vocabulary = this.model.fileInfo.metadata.tokenizer.ggml.tokens.length;
    const bad = request.tokenIds.find((id) => !Number.isInteger(id) || id < 0 || id >= vocabulary);
    if (bad !== undefined) {
      throw new EngineError(
        "invalid_input",
        `token id ${bad} is outside the vocabulary (${vocabulary} tokens)`,
      );
    }
    const all = [...prompt.tokens, ...request.tokenIds] as Token[];
    if (all.length > this.context.contextSize) {
      throw new EngineError(
        "invalid_input",
        `prompt and tokens are ${all.length} tokens, the context window is ${this.context.contextSize}`,
      );
    }
    const temperature = job.sampling.temperature ?? 1;
    // The distribution the worker sampled from: tempered and top_p-cut as the job asked; at
    // temperature 0 (greedy) the raw softmax, which is what a generation reports then.
    const options = temperature > 0 ? { temperature, topP: job.sampling.topP ?? 1, topK: 0 } : undefined;
    const first = prompt.tokens.length - 1;
    const positions =
      request.positions && request.positions.length > 0
        ? request.positions
        : request.tokenIds.map((_, index) => index);
    if (
      positions.some(
        (p, i) =>
          !Number.isInteger(p) ||
          p < 0 ||
          p >= request.tokenIds.length ||
          (i > 0 && p <= (positions[i - 1] as number)),
      )
    ) {
      throw new EngineError("invalid_input", "positions must be ascending indexes into the token ids");
    }
    const sequence = await this.acquire(signal);
    if (!sequence) throw new EngineError("engine_error", "scoring was cancelled");
    try {
      // Always from an empty sequence: reusing a cached prefix would save only the prompt's few
      // tokens, and a cache filled token by token (a generation) can differ in the last bits from a
      // prefill, so the scores would depend on what the sequence did before.
      await sequence.clearHistory();
      // Only the scored positions ask for a distribution, and each stays the addon's flat array,
      // scored as it arrives: the whole-vocabulary Map controlledEvaluate would build for each costs
      // half as much again as the native work on a large vocabulary.
      const scores = await evaluateDistributions(
        sequence,
        all,
        positions.map((p) => first + p),
        options,
        (distribution, i) =>
          scoreInDistribution(distribution, request.tokenIds[positions[i] as number] as number, request.topK),
      );
      const text = this.model.detokenize(
        request.tokenIds as Token[],
        false,
        prompt.tokens.slice(-DETOKENIZER_HISTORY),
      );
      return { scores, promptTokens: prompt.tokens.length, text };
    } catch (error) {
      if (error instanceof EngineError) throw error;
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("engine_error", `llama.cpp scoring failed: ${message}`, { cause: error });
    } finally {
      this.release(sequence);
    }
  }

  async close(): Promise<void> {
    if (this.closeController.signal.aborted) return;
    this.closeController.abort(new Error("engine closed"));
    // Let running generations notice the abort and give their sequences back before disposing.
    while (this.busy > 0) await new Promise<void>((resolve) => this.idleWaiters.push(resolve));
    await this.context.dispose();
    await this.model.dispose();
    await this.llama.dispose();
  }

  /** The grammar that enforces the response format; undefined for plain text. */
  private async responseGrammar(request: GenerateRequest): Promise<LlamaGrammar | undefined> {
    const format = request.responseFormat;
    if (!format || format.type === "text") return undefined;
    if (format.type === "json_object") return this.llama.getGrammarFor("json");
    return this.schemaGrammar(format.schema, `response_format schema "${format.name}"`);
  }

  private async schemaGrammar(schema: Record<string, unknown>, what: string): Promise<LlamaGrammar> {
    try {
      return await this.llama.createGrammarForJsonSchema<GbnfJsonSchema>(schema as GbnfJsonSchema);
    } catch (error) {
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("invalid_input", `cannot build a grammar for the ${what}: ${message}`, {
        cause: error,
      });
    }
  }

  /**
   * Generates from `options.tokens` on, yielding text pieces (with their logprobs when asked). The
   * generated tokens are appended to `options.tokens`.
   */
  private async *phase(options: PhaseOptions): AsyncGenerator<EnginePiece, PhaseEnd, undefined> {
    const { sequence, tokens, signal } = options;
    const input = await feed(sequence, tokens);
    const evaluate: SequenceEvaluateOptions = options.grammar
      ? {
          ...options.evaluate,
          grammarEvaluationState: new this.lib.LlamaGrammarEvaluationState({
            model: this.model,
            grammar: options.grammar,
          }),
        }
      : options.evaluate;
    const decoder = new TokenTextDecoder(this.model, tokens);
    const stopper = new StopTextFilter(options.stopTexts);
    const json = options.json ? new JsonEndDetector() : undefined;
    let unreported = 0;
    let logprobs: TokenLogprob[] = [];
    let details: TokenDetail[] = [];
    let generated = 0;
    let jsonEnded = false;
    let finishReason: PhaseEnd["finishReason"] = "stop";
    const piece = (text: string): EnginePiece => {
      const out: EnginePiece = { text, tokenCount: unreported };
      if (options.top !== undefined) out.logprobs = logprobs;
      if (options.detail !== undefined) out.tokenDetails = details;
      unreported = 0;
      logprobs = [];
      details = [];
      return out;
    };
    const withProbabilities = options.top !== undefined || options.detail !== undefined;
    for await (const step of this.steps(sequence, input, evaluate, withProbabilities)) {
      if (signal.aborted) {
        finishReason = "cancelled";
        break;
      }
      if (this.model.isEogToken(step.token) || options.stopTokens.has(step.token)) break;
      const previous = tokens.at(-1);
      tokens.push(step.token);
      generated += 1;
      unreported += 1;
      if (options.top !== undefined && step.probabilities) {
        logprobs.push(this.logprob(step.token, step.probabilities, options.top, previous));
      }
      if (options.detail !== undefined && step.probabilities) {
        details.push(tokenDetail(step.token, step.probabilities, options.detail));
      }
      let text = decoder.push(step.token);
      if (json && text) {
        const end = json.push(text);
        if (end >= 0) {
          // Whatever the grammar allows after the value (whitespace) is not part of the output.
          text = text.slice(0, end);
          jsonEnded = true;
        }
      }
      const { text: out, stopped } = stopper.push(text);
      if (out) yield piece(out);
      if (stopped || jsonEnded) break;
      if (signal.aborted) {
        finishReason = "cancelled";
        break;
      }
      if (generated >= options.limit) {
        finishReason = "length";
        break;
      }
    }
    if (finishReason !== "cancelled") {
      if (!stopper.stopped) {
        // Whatever was held back (an unfinished character, a partial stop sequence) is output now.
        const { text, stopped } = stopper.push(jsonEnded ? "" : decoder.flush());
        const rest = stopped ? text : text + stopper.flush();
        if (rest) yield piece(rest);
      }
      // Tokens whose text was cut (a stop sequence) are still accounted for.
      if (unreported > 0) yield piece("");
    }
    return { finishReason, generated };
  }

  /** The sampled tokens of an evaluation, with the distribution each was drawn from when asked. */
  private async *steps(
    sequence: LlamaContextSequence,
    input: Token[],
    options: SequenceEvaluateOptions,
    withProbabilities: boolean,
  ): AsyncGenerator<{ token: Token; probabilities?: Map<Token, number> }, void, undefined> {
    if (withProbabilities) {
      yield* sequence.evaluateWithMetadata(input, { probabilities: true }, options);
      return;
    }
    for await (const token of sequence.evaluate(input, options)) yield { token };
  }

  private logprob(
    token: Token,
    probabilities: ReadonlyMap<Token, number>,
    top: number,
    previous: Token | undefined,
  ): TokenLogprob {
    const text = (t: Token) =>
      this.model.detokenize([t], false, previous !== undefined ? [previous] : undefined);
    const topLogprobs: TokenLogprob["topLogprobs"] = [];
    // The map is sorted from the most to the least likely token.
    for (const [alternative, probability] of probabilities) {
      if (topLogprobs.length >= top) break;
      topLogprobs.push({ token: text(alternative), logprob: naturalLog(probability) });
    }
    return { token: text(token), logprob: naturalLog(probabilities.get(token) ?? 0), topLogprobs };
  }

  /**
   * Forces one call of one of `candidates`: its name (generated under a grammar of the names when
   * there are several) and its arguments, generated under its parameters' grammar and streamed as
   * tool-call deltas.
   */
  private async *forcedCall(
    common: Omit<PhaseOptions, "grammar" | "stopTexts" | "json">,
    candidates: readonly EngineTool[],
  ): AsyncGenerator<EnginePiece, JobEnd, undefined> {
    const { tokens } = common;
    const syntax = this.chatWrapper?.settings.functions.call;
    let promptTokens = tokens.length;
    const append = (text: LlamaText) => {
      const appended = text.tokenize(this.model.tokenizer);
      tokens.push(...appended);
      promptTokens += appended.length;
    };
    let generated = 0;
    // Tokens (and logprobs) of the name, reported with the call's first delta.
    let carried: EnginePiece = {
      text: "",
      tokenCount: 0,
      ...(common.top !== undefined ? { logprobs: [] } : {}),
    };
    let tool = candidates[0];
    if (candidates.length === 1 && tool) {
      if (syntax) append(this.lib.LlamaText([syntax.prefix, tool.name, syntax.paramsPrefix]));
    } else {
      if (syntax) append(this.lib.LlamaText([syntax.prefix]));
      const names = await this.llama.createGrammar({
        grammar: `root ::= ${candidates.map((c) => JSON.stringify(c.name)).join(" | ")}`,
      });
      const phase = this.phase({ ...common, grammar: names, stopTexts: [], json: false });
      let name = "";
      let step = await phase.next();
      while (!step.done) {
        name += step.value.text;
        carried = mergePieces(carried, step.value);
        step = await phase.next();
      }
      generated += step.value.generated;
      // The name is the call's `name`, not part of its arguments: only its tokens are carried.
      carried = { ...carried, text: "" };
      if (step.value.finishReason !== "stop") {
        // Out of tokens before the name was complete: no call, but the tokens are accounted for.
        if (step.value.finishReason === "length") yield carried;
        return { finishReason: step.value.finishReason, promptTokens, completionTokens: generated };
      }
      tool = candidates.find((c) => c.name === name);
      if (syntax) append(this.lib.LlamaText([syntax.paramsPrefix]));
    }
    if (!tool) throw new EngineError("engine_error", "the model produced no function name");
    const grammar = await this.schemaGrammar(
      tool.parameters ?? NO_PARAMETERS,
      `parameters of "${tool.name}"`,
    );
    const id = `call_${randomBytes(12).toString("hex")}`;
    const phase = this.phase({
      ...common,
      limit: Math.max(1, common.limit - generated),
      grammar,
      stopTexts: [],
      json: true,
    });
    let first = true;
    let step = await phase.next();
    while (!step.done) {
      const { text, ...counts } = mergePieces(carried, step.value);
      carried = { text: "", tokenCount: 0, ...(common.top !== undefined ? { logprobs: [] } : {}) };
      yield {
        ...counts,
        text: "",
        toolCalls: [{ index: 0, ...(first ? { id, name: tool.name } : {}), arguments: text }],
      };
      first = false;
      step = await phase.next();
    }
    generated += step.value.generated;
    const { finishReason } = step.value;
    if (finishReason === "cancelled") return { finishReason, promptTokens, completionTokens: generated };
    if (first) yield { ...carried, toolCalls: [{ index: 0, id, name: tool.name, arguments: "" }] };
    return {
      finishReason: finishReason === "stop" ? "tool_calls" : finishReason,
      promptTokens,
      completionTokens: generated,
    };
  }

  /** Tools the model may call or not: node-llama-cpp's function calling with the chat wrapper. */
  private async *chatWithFunctions(
    sequence: LlamaContextSequence,
    request: GenerateRequest,
    tools: readonly EngineTool[],
    limit: number,
    signal: AbortSignal,
  ): AsyncGenerator<EnginePiece, JobEnd, undefined> {
    const chat = new this.lib.LlamaChat({
      contextSequence: sequence,
      ...(this.chatWrapper ? { chatWrapper: this.chatWrapper } : {}),
    });
    const meter = sequence.tokenMeter.getState();
    const queue = new PieceQueue();
    const ids = new Map<number, string>();
    let counted = 0;
    const history = toChatHistory(request.messages);
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    const sampling = evaluateOptions(request.sampling, sequence);
    const stop = (request.sampling.stop ?? []).filter((s) => s.length > 0);
    const response = chat
      .generateResponse(history, {
        functions: toChatFunctions(tools),
        documentFunctionParams: true,
        ...(request.parallelToolCalls === false ? { maxParallelFunctionCalls: 1 } : {}),
        signal,
        stopOnAbortSignal: true,
        maxTokens: limit,
        ...(sampling.temperature !== undefined ? { temperature: sampling.temperature } : {}),
        ...(sampling.topP !== undefined ? { topP: sampling.topP } : {}),
        ...(sampling.topK !== undefined ? { topK: sampling.topK } : {}),
        ...(sampling.seed !== undefined ? { seed: sampling.seed } : {}),
        ...(stop.length > 0 ? { customStopTriggers: stop } : {}),
        ...(sampling.repeatPenalty
          ? {
              repeatPenalty: {
                penalty: sampling.repeatPenalty.penalty ?? 1,
                presencePenalty: sampling.repeatPenalty.presencePenalty ?? 0,
                frequencyPenalty: sampling.repeatPenalty.frequencyPenalty ?? 0,
              },
            }
          : {}),
        onResponseChunk: (chunk) => {
          // Segments (e.g. thoughts) are not part of the answer; their tokens are counted at the end.
          if (chunk.type !== undefined || chunk.text === "") return;
          counted += chunk.tokens.length;
          queue.push({ text: chunk.text, tokenCount: chunk.tokens.length });
        },
        onFunctionCallParamsChunk: (chunk) => {
          let id = ids.get(chunk.callIndex);
          const first = id === undefined;
          if (id === undefined) {
            id = `call_${randomBytes(12).toString("hex")}`;
            ids.set(chunk.callIndex, id);
          }
          queue.push({
            text: "",
            tokenCount: 0,
            toolCalls: [
              {
                index: chunk.callIndex,
                ...(first ? { id, name: chunk.functionName } : {}),
                arguments: chunk.paramsChunk,
              },
            ],
          });
        },
      })
      .finally(() => queue.close());
    try {
      yield* queue.drain();
      const result = await response;
      const used = sequence.tokenMeter.diff(meter);
      if (result.metadata.stopReason === "abort" || signal.aborted) {
        return {
          finishReason: "cancelled",
          promptTokens: used.usedInputTokens,
          completionTokens: used.usedOutputTokens,
        };
      }
      // Function-call syntax and segments were generated too: their tokens close the stream.
      if (used.usedOutputTokens > counted) yield { text: "", tokenCount: used.usedOutputTokens - counted };
      const finishReason: EngineFinishReason =
        (result.functionCalls?.length ?? 0) > 0
          ? "tool_calls"
          : result.metadata.stopReason === "maxTokens"
            ? "length"
            : "stop";
      return {
        finishReason,
        promptTokens: used.usedInputTokens,
        completionTokens: Math.max(used.usedOutputTokens, counted),
      };
    } finally {
      await response.catch(() => undefined);
      chat.dispose({ disposeSequence: false });
    }
  }

  private acquire(signal: AbortSignal): Promise<LlamaContextSequence | undefined> {
    const sequence = this.free.pop();
    if (sequence) {
      this.busy += 1;
      return Promise.resolve(sequence);
    }
    return new Promise((resolve) => {
      const waiter = (s: LlamaContextSequence) => {
        signal.removeEventListener("abort", onAbort);
        this.busy += 1;
        resolve(s);
      };
      const onAbort = () => {
        const index = this.waiters.indexOf(waiter);
        if (index >= 0) this.waiters.splice(index, 1);
        resolve(undefined);
      };
      signal.addEventListener("abort", onAbort, { once: true });
      this.waiters.push(waiter);
    });
  }

  private release(sequence: LlamaContextSequence): void {
    this.busy -= 1;
    const next = this.waiters.shift();
    if (next && !this.closeController.signal.aborted) next(sequence);
    else this.free.push(sequence);
    if (this.busy === 0) for (const resolve of this.idleWaiters.splice(0)) resolve();
  }
}

/**
 * node-llama-cpp's sampling options for a request, with OpenAI's defaults: temperature 1, top_p 1
 * and no top-k cut (node-llama-cpp's own defaults are greedy decoding and top-k 40).
 */
export function evaluateOptions(
  sampling: EngineSampling,
  sequence: { readonly contextTokens: readonly Token[] },
): SequenceEvaluateOptions {
  const options: SequenceEvaluateOptions = {
    temperature: sampling.temperature ?? 1,
    topP: sampling.topP ?? 1,
    topK: 0,
  };
  if (sampling.seed !== undefined) options.seed = sampling.seed;
  if (sampling.presencePenalty !== undefined || sampling.frequencyPenalty !== undefined) {
    const start = sequence.contextTokens.length;
    options.repeatPenalty = {
      // Only the completion is penalised, as OpenAI does.
      punishTokens: () => sequence.contextTokens.slice(start),
      penalty: 1,
      presencePenalty: sampling.presencePenalty ?? 0,
      frequencyPenalty: sampling.frequencyPenalty ?? 0,
    };
  }
  return options;
}

/** The tools that must be called, or undefined when the model decides (or must not call any). */
function forcedTools(
  tools: readonly EngineTool[],
  choice: NonNullable<GenerateRequest["toolChoice"]>,
): readonly EngineTool[] | undefined {
  if (choice.mode !== "function") {
    if (choice.mode !== "required") return undefined;
    if (tools.length === 0) throw new EngineError("invalid_input", 'tool_choice "required" without tools');
    return tools;
  }
  const tool = tools.find((t) => t.name === choice.functionName);
  if (!tool) {
    throw new EngineError(
      "invalid_input",
      `tool_choice names "${choice.functionName}", which is not in tools`,
    );
  }
  return [tool];
}

/** OpenAI messages as node-llama-cpp chat history; a tool message becomes its call's result. */
function toChatHistory(messages: readonly EngineMessage[]): ChatHistoryItem[] {
  const results = new Map<string, string>();
  for (const message of messages) {
    if (message.role === "tool" && message.toolCallId) results.set(message.toolCallId, message.content);
  }
  const history: ChatHistoryItem[] = [];
  for (const message of messages) {
    if (message.role === "system" || message.role === "developer") {
      history.push({ type: "system", text: message.content });
    } else if (message.role === "assistant") {
      const calls = (message.toolCalls ?? []).map(
        (call): ChatModelFunctionCall => ({
          type: "functionCall",
          name: call.name,
          params: parseJsonOrText(call.arguments),
          result: parseJsonOrText(results.get(call.id) ?? ""),
        }),
      );
      history.push({ type: "model", response: [...(message.content ? [message.content] : []), ...calls] });
    } else if (message.role === "tool") {
      // Answered calls carry their result; a result for no known call is shown as user text.
      if (
        !message.toolCallId ||
        !messages.some((m) => m.toolCalls?.some((c) => c.id === message.toolCallId))
      ) {
        history.push({ type: "user", text: message.content });
      }
    } else {
      history.push({ type: "user", text: message.content });
    }
  }
  return history;
}

function toChatFunctions(tools: readonly EngineTool[]): ChatModelFunctions {
  return Object.fromEntries(
    tools.map((tool) => [
      tool.name,
      {
        ...(tool.description ? { description: tool.description } : {}),
        ...(tool.parameters ? { params: tool.parameters as GbnfJsonSchema } : {}),
      },
    ]),
  );
}

function parseJsonOrText(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

/** Two consecutive pieces as one (their texts, token counts, logprobs and token details joined). */
function mergePieces(a: EnginePiece, b: EnginePiece): EnginePiece {
  const merged: EnginePiece = { text: a.text + b.text, tokenCount: a.tokenCount + b.tokenCount };
  if (a.logprobs || b.logprobs) merged.logprobs = [...(a.logprobs ?? []), ...(b.logprobs ?? [])];
  if (a.tokenDetails || b.tokenDetails)
    merged.tokenDetails = [...(a.tokenDetails ?? []), ...(b.tokenDetails ?? [])];
  return merged;
}

/** A token by id with its log-probability and the `topK` most likely alternatives of `probabilities`. */
function tokenDetail(token: Token, probabilities: ReadonlyMap<Token, number>, topK: number): TokenDetail {
  // One pass keeping the best `topK` (insertion into a short sorted list): the map may not be
  // sorted, and sorting a 32,000-token vocabulary per position would cost more than the prefill.
  const best: [Token, number][] = [];
  if (topK > 0) {
    for (const entry of probabilities) {
      if (best.length === topK && entry[1] <= (best[topK - 1] as [Token, number])[1]) continue;
      let at = best.length;
      while (at > 0 && (best[at - 1] as [Token, number])[1] < entry[1]) at -= 1;
      best.splice(at, 0, entry);
      if (best.length > topK) best.pop();
    }
  }
  const top = best.map(([tokenId, probability]) => ({ tokenId, logprob: naturalLog(probability) }));
  return { tokenId: token, logprob: naturalLog(probabilities.get(token) ?? 0), top };
}

/**
 * The tokens to evaluate so that `sequence` holds `tokens` and generates what follows: what it
 * already holds (a prefix of `tokens`) is kept, except that at least the last token is evaluated
 * again, since generating needs a fresh evaluation.
 */
async function feed(sequence: LlamaContextSequence, tokens: readonly Token[]): Promise<Token[]> {
  const held = sequence.contextTokens.length;
  const keep = Math.min(held, tokens.length - 1);
  if (held > keep) await sequence.eraseContextTokenRanges([{ start: keep, end: held }]);
  return tokens.slice(keep);
}

/** Pieces pushed by callbacks, read by an async generator. */
class PieceQueue {
  private items: EnginePiece[] = [];
  private closed = false;
  private wake: (() => void) | undefined;

  push(piece: EnginePiece): void {
    this.items.push(piece);
    this.wake?.();
  }

  close(): void {
    this.closed = true;
    this.wake?.();
  }

  async *drain(): AsyncGenerator<EnginePiece, void, undefined> {
    for (;;) {
      const item = this.items.shift();
      if (item) {
        yield item;
        continue;
      }
      if (this.closed) return;
      await new Promise<void>((resolve) => {
        this.wake = resolve;
      });
      this.wake = undefined;
    }
  }
}

/**
 * Finds where a JSON object or array ends in text that arrives in fragments (strings and escapes
 * included), so that generation can stop there.
 */
export class JsonEndDetector {
  private depth = 0;
  private started = false;
  private inString = false;
  private escaped = false;

  /** Adds text; returns the index in it just past the end of the value, or -1. */
  push(text: string): number {
    for (let i = 0; i < text.length; i++) {
      const c = text[i];
      if (this.inString) {
        if (this.escaped) this.escaped = false;
        else if (c === "\\") this.escaped = true;
        else if (c === '"') this.inString = false;
        continue;
      }
      if (c === '"') this.inString = true;
      else if (c === "{" || c === "[") {
        this.depth += 1;
        this.started = true;
      } else if (c === "}" || c === "]") {
        this.depth -= 1;
        if (this.started && this.depth === 0) return i + 1;
      }
    }
    return -1;
  }
}

/** What {@link TokenTextDecoder} needs from a model (LlamaModel has it). */
export interface TokenDetokenizer {
  detokenize(tokens: readonly Token[], specialTokens?: boolean, lastTokens?: readonly Token[]): string;
}

/**
 * Turns generated tokens into text without ever splitting a UTF-8 character: a token whose text
 * ends with U+FFFD (an incomplete multi-byte sequence) is held and detokenized together with the
 * following tokens. Recent tokens are passed to the detokenizer so that leading spaces come out right.
 */
export class TokenTextDecoder {
  private pending: Token[] = [];
  private history: Token[];

  constructor(
    private readonly model: TokenDetokenizer,
    promptTokens: readonly Token[],
  ) {
    this.history = promptTokens.slice(-DETOKENIZER_HISTORY);
  }

  /** Adds a token; returns the text that is complete so far ("" while a character is unfinished). */
  push(token: Token): string {
    this.pending.push(token);
    const text = this.model.detokenize(this.pending, false, this.history);
    if (text.endsWith("\uFFFD") && this.pending.length < MAX_HELD_TOKENS) return "";
    this.commit();
    return text;
  }

  /** Returns whatever is still held (possibly with a replacement character). */
  flush(): string {
    if (this.pending.length === 0) return "";
    const text = this.model.detokenize(this.pending, false, this.history);
    this.commit();
    return text;
  }

  private commit(): void {
    this.history = [...this.history, ...this.pending].slice(-DETOKENIZER_HISTORY);
    this.pending = [];
  }
}

/**
 * Cuts the output at the first stop sequence. Text that could be the beginning of a stop sequence
 * is held back until it is clear whether the sequence completes.
 */
export class StopTextFilter {
  private buffer = "";
  stopped = false;

  constructor(private readonly stops: readonly string[]) {}

  /** Adds text; returns the text safe to output and whether a stop sequence was found. */
  push(text: string): { text: string; stopped: boolean } {
    if (this.stopped) return { text: "", stopped: true };
    if (this.stops.length === 0) return { text, stopped: false };
    this.buffer += text;
    let cut = -1;
    for (const stop of this.stops) {
      const index = this.buffer.indexOf(stop);
      if (index >= 0 && (cut < 0 || index < cut)) cut = index;
    }
    if (cut >= 0) {
      const out = this.buffer.slice(0, cut);
      this.buffer = "";
      this.stopped = true;
      return { text: out, stopped: true };
    }
    let hold = 0;
    for (const stop of this.stops) {
      for (let k = Math.min(stop.length - 1, this.buffer.length); k > hold; k--) {
        if (this.buffer.endsWith(stop.slice(0, k))) {
          hold = k;
          break;
        }
      }
    }
    const out = this.buffer.slice(0, this.buffer.length - hold);
    this.buffer = this.buffer.slice(this.buffer.length - hold);
    return { text: out, stopped: false };
  }

  /** Returns the held-back text (the stream ended without completing a stop sequence). */
  flush(): string {
    const out = this.buffer;
    this.buffer = "";
    return out;
  }
}

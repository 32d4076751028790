/**
 * An engine that runs a GGUF model in process with node-llama-cpp, on the CPU.
 *
 * - The Llama instance is created with `{ gpu: false, maxThreads: 1 }` and contexts with
 *   `threads: 1`: with the default thread settings node-llama-cpp oversubscribes small machines
 *   and slows down by orders of magnitude.
 * - The context has one sequence per concurrent job (`concurrency`); a job waits for a free
 *   sequence, clears it, and owns it until it ends.
 * - Prompt: when the GGUF carries a chat template, node-llama-cpp's chat wrapper for it renders the
 *   conversation. Without one (e.g. base models such as stories260K) the prompt is the messages'
 *   contents joined with "\n", fed as raw text after BOS.
 * - Generation is token by token; each token becomes a piece with `tokenCount: 1`, except that a
 *   token whose text ends in an incomplete UTF-8 character is held back and merged into the next
 *   piece. Generation stops at an end-of-generation token ("stop"), a stop sequence ("stop"),
 *   `maxTokens` or the end of the context window ("length"), or on abort ("cancelled").
 * - Unset temperature means node-llama-cpp's default, which is greedy decoding (temperature 0).
 */
import {
  type ChatHistoryItem,
  type ChatWrapper,
  getLlama,
  type Llama,
  type LlamaContext,
  type LlamaContextSequence,
  LlamaLogLevel,
  type LlamaModel,
  resolveChatWrapper,
  type SequenceEvaluateOptions,
  type Token,
} from "node-llama-cpp";
import {
  type Engine,
  EngineError,
  type EngineFinishReason,
  type EngineMessage,
  type EngineSampling,
  type GenerateRequest,
  type Generation,
} from "./engine.js";

/** Options of {@link LlamaCppEngine.load}. */
export interface LlamaCppEngineOptions {
  /** Path of the GGUF file. */
  modelPath: string;
  /** Jobs run at once (one context sequence each). Default 1. */
  concurrency?: number;
  /** Context window per sequence, in tokens. Default: the model's training context (at most 4096). */
  contextLength?: number;
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

const DEFAULT_MAX_CONTEXT = 4096;
/** Tokens after which a still-incomplete character is emitted anyway (a UTF-8 char is <= 4 bytes). */
const MAX_HELD_TOKENS = 8;
/** Tokens of history given to the detokenizer so it renders leading spaces correctly. */
const DETOKENIZER_HISTORY = 8;

/** An {@link Engine} running a GGUF model in process with node-llama-cpp. */
export class LlamaCppEngine implements Engine {
  readonly name = "llama.cpp";
  readonly modelPath: string;
  private readonly free: LlamaContextSequence[];
  private readonly waiters: Array<(sequence: LlamaContextSequence) => void> = [];
  private readonly closeController = new AbortController();
  private readonly chatWrapper: ChatWrapper | undefined;
  private busy = 0;
  private idleWaiters: Array<() => void> = [];

  private constructor(
    private readonly llama: Llama,
    private readonly model: LlamaModel,
    private readonly context: LlamaContext,
    modelPath: string,
  ) {
    this.modelPath = modelPath;
    this.free = [];
    for (let i = 0; i < context.totalSequences; i++) this.free.push(context.getSequence());
    const template = (model.fileInfo.metadata as { tokenizer?: { chat_template?: unknown } }).tokenizer
      ?.chat_template;
    this.chatWrapper =
      typeof template === "string" && template.length > 0 ? resolveChatWrapper(model) : undefined;
  }

  /** Loads the model and creates its context. */
  static async load(options: LlamaCppEngineOptions): Promise<LlamaCppEngine> {
    const concurrency = Math.max(1, Math.floor(options.concurrency ?? 1));
    const llama = await getLlama({
      gpu: false,
      maxThreads: 1,
      logLevel: options.logLevel ?? LlamaLogLevel.error,
    });
    let model: LlamaModel | undefined;
    try {
      model = await llama.loadModel({ modelPath: options.modelPath });
      const contextSize =
        options.contextLength && options.contextLength > 0
          ? options.contextLength
          : Math.min(model.trainContextSize, DEFAULT_MAX_CONTEXT);
      const context = await model.createContext({ threads: 1, sequences: concurrency, contextSize });
      return new LlamaCppEngine(llama, model, context, options.modelPath);
    } catch (error) {
      await model?.dispose().catch(() => undefined);
      await llama.dispose().catch(() => undefined);
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("model_unavailable", `cannot load ${options.modelPath}: ${message}`, {
        cause: error,
      });
    }
  }

  /** The context window of each sequence, in tokens. */
  get contextSize(): number {
    return this.context.contextSize;
  }

  /** How many jobs can run at once. */
  get concurrency(): number {
    return this.context.totalSequences;
  }

  /** True when the GGUF has a chat template (and prompts are rendered with it). */
  get hasChatTemplate(): boolean {
    return this.chatWrapper !== undefined;
  }

  /** Renders a conversation to prompt tokens (exposed for tests and diagnostics). */
  renderPrompt(messages: EngineMessage[]): RenderedPrompt {
    const model = this.model;
    if (!this.chatWrapper) {
      const text = messages.map((m) => m.content).join("\n");
      const bos = model.tokens.bos;
      const tokens = [...(bos !== null ? [bos] : []), ...model.tokenize(text, false)];
      return { tokens, stopTokens: new Set(), stopTexts: [] };
    }
    const history: ChatHistoryItem[] = [];
    for (const message of messages) {
      if (message.role === "system" || message.role === "developer") {
        history.push({ type: "system", text: message.content });
      } else if (message.role === "assistant") {
        history.push({ type: "model", response: [message.content] });
      } else {
        history.push({ type: "user", text: message.content });
      }
    }
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    const state = this.chatWrapper.generateContextState({ chatHistory: history });
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

  async *generate(request: GenerateRequest): Generation {
    const signal = AbortSignal.any([request.signal, this.closeController.signal]);
    if (signal.aborted) return { finishReason: "cancelled" };

    const prompt = this.renderPrompt(request.messages);
    const stopTexts = [...prompt.stopTexts, ...(request.sampling.stop ?? []).filter((s) => s.length > 0)];
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

    const sequence = await this.acquire(signal);
    if (!sequence) return { finishReason: "cancelled" };
    const generated: Token[] = [];
    const decoder = new TokenTextDecoder(this.model, prompt.tokens);
    const stopper = new StopTextFilter(stopTexts);
    let unreported = 0;
    let finishReason: EngineFinishReason = "stop";
    try {
      await sequence.clearHistory();
      const tokens = sequence.evaluate(prompt.tokens, this.evaluateOptions(request.sampling, generated));
      for await (const token of tokens) {
        if (signal.aborted) {
          finishReason = "cancelled";
          break;
        }
        if (this.model.isEogToken(token) || prompt.stopTokens.has(token)) break;
        generated.push(token);
        unreported += 1;
        const { text, stopped } = stopper.push(decoder.push(token));
        if (text) {
          yield { text, tokenCount: unreported };
          unreported = 0;
        }
        if (stopped) break;
        if (signal.aborted) {
          finishReason = "cancelled";
          break;
        }
        if (generated.length >= limit) {
          finishReason = "length";
          break;
        }
      }
      if (finishReason !== "cancelled" && !stopper.stopped) {
        // Whatever was held back (an unfinished character, a partial stop sequence) is output now.
        const { text, stopped } = stopper.push(decoder.flush());
        const rest = stopped ? text : text + stopper.flush();
        if (rest) {
          yield { text: rest, tokenCount: unreported };
          unreported = 0;
        }
      }
    } catch (error) {
      if (signal.aborted) return { finishReason: "cancelled" };
      const message = error instanceof Error ? error.message : String(error);
      throw new EngineError("engine_error", `llama.cpp generation failed: ${message}`, { cause: error });
    } finally {
      this.release(sequence);
    }
    return {
      finishReason,
      usage: { promptTokens: prompt.tokens.length, completionTokens: generated.length },
    };
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

  private evaluateOptions(sampling: EngineSampling, generated: Token[]): SequenceEvaluateOptions {
    const options: SequenceEvaluateOptions = {};
    if (sampling.temperature !== undefined) options.temperature = sampling.temperature;
    if (sampling.topP !== undefined) options.topP = sampling.topP;
    if (sampling.seed !== undefined) options.seed = sampling.seed;
    if (sampling.presencePenalty !== undefined || sampling.frequencyPenalty !== undefined) {
      options.repeatPenalty = {
        punishTokens: () => generated,
        penalty: 1,
        presencePenalty: sampling.presencePenalty ?? 0,
        frequencyPenalty: sampling.frequencyPenalty ?? 0,
      };
    }
    return options;
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

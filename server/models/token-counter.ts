/**
 * The platform's own token counter for one registered GGUF: its tokenizer, loaded vocabulary-only
 * with node-llama-cpp (no weights in memory, no context), counts a prompt the way the llama-cpp
 * engine renders it and the text a worker relayed.
 *
 * node-llama-cpp is an optional dependency (native builds, hundreds of megabytes): it is imported
 * only when a model is registered or loaded, so a control plane without it runs, and only counting
 * with a registered tokenizer is unavailable (every order's count is then the worker's, byte-bounded).
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import type { Llama, LlamaModel, Token } from "node-llama-cpp";
import type { GenerationSpec } from "../market/registry.js";

type NodeLlamaCpp = typeof import("node-llama-cpp");

/** node-llama-cpp is not installed: the control plane cannot load tokenizers. */
export class TokenizerUnavailableError extends Error {}

let lib: Promise<NodeLlamaCpp> | undefined;
let llama: Promise<Llama> | undefined;

/** Imports node-llama-cpp once, or fails saying how to install it. */
export function importNodeLlamaCpp(): Promise<NodeLlamaCpp> {
  lib ??= import("node-llama-cpp").catch((error: unknown) => {
    lib = undefined;
    const missing =
      (error as NodeJS.ErrnoException).code === "ERR_MODULE_NOT_FOUND" &&
      String((error as Error).message).includes("node-llama-cpp");
    if (!missing) throw error;
    throw new TokenizerUnavailableError(
      "this control plane cannot load tokenizers: node-llama-cpp, an optional dependency, is not installed " +
        "next to locallmarket (npm i node-llama-cpp@3.21.1); without it every order is billed by the " +
        "worker's byte-bounded count and marked unverified",
    );
  });
  return lib;
}

/** One CPU-only llama.cpp instance for every tokenizer: vocabulary-only models evaluate nothing. */
async function sharedLlama(): Promise<Llama> {
  const module = await importNodeLlamaCpp();
  llama ??= module
    .getLlama({ gpu: false, maxThreads: 1, logLevel: module.LlamaLogLevel.error })
    .catch((error: unknown) => {
      llama = undefined;
      throw error;
    });
  return llama;
}

/** The SHA-256 of a file, hex, read as a stream (a GGUF may be gigabytes). */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

/** JSON with object keys sorted, so equal metadata hashes equally whatever the key order. */
function canonicalJson(value: unknown): string {
  if (Array.isArray(value)) return `[${value.map(canonicalJson).join(",")}]`;
  if (value !== null && typeof value === "object") {
    const entries = Object.entries(value as Record<string, unknown>).sort(([a], [b]) => (a < b ? -1 : 1));
    return `{${entries.map(([key, item]) => `${JSON.stringify(key)}:${canonicalJson(item)}`).join(",")}}`;
  }
  return JSON.stringify(typeof value === "bigint" ? value.toString() : value) ?? "null";
}

/** Characters of already relayed text a chunk is tokenized after, for the per-chunk estimate. */
const ESTIMATE_CONTEXT_CHARS = 48;

export class TokenCounter {
  /** SHA-256 of the tokenizer metadata: GGUFs sharing it (e.g. quantizations) count alike. */
  readonly tokenizerSha256: string;
  /** The tokenizer kind, e.g. "llama" (SentencePiece) or "gpt2" (byte-level BPE). */
  readonly tokenizerModel: string;
  readonly vocabularySize: number;
  /** Whether the GGUF has a chat template (prompts are then rendered with it). */
  readonly chatTemplate: boolean;

  private constructor(
    private readonly module: NodeLlamaCpp,
    private readonly model: LlamaModel,
    readonly ggufPath: string,
    readonly ggufSha256: string,
  ) {
    const tokenizer = (model.fileInfo.metadata as { tokenizer?: Record<string, unknown> }).tokenizer ?? {};
    const ggml = (tokenizer.ggml ?? {}) as { model?: unknown; tokens?: unknown[] };
    this.tokenizerSha256 = createHash("sha256").update(canonicalJson(tokenizer)).digest("hex");
    this.tokenizerModel = typeof ggml.model === "string" ? ggml.model : "unknown";
    this.vocabularySize = Array.isArray(ggml.tokens) ? ggml.tokens.length : 0;
    this.chatTemplate = typeof tokenizer.chat_template === "string" && tokenizer.chat_template.length > 0;
  }

  /**
   * Loads the vocabulary of the GGUF at `path`. `ggufSha256` is the file's hash when the caller
   * has just computed it; otherwise it is computed here.
   */
  static async load(path: string, ggufSha256?: string): Promise<TokenCounter> {
    const module = await importNodeLlamaCpp();
    const instance = await sharedLlama();
    const sha = ggufSha256 ?? (await sha256File(path));
    const model = await instance.loadModel({ modelPath: path, vocabOnly: true });
    return new TokenCounter(module, model, path, sha);
  }

  /** Tokens of relayed text: no BOS, and special-token spellings count as the text they are. */
  countText(text: string): number {
    return text === "" ? 0 : this.model.tokenize(text, false).length;
  }

  /**
   * Tokens `text` adds after `context`: the difference between tokenizing both and the context
   * alone. Tokenizing a continuation on its own would add SentencePiece's leading space (one token
   * too many when the text starts, say, with a comma); after its context it tokenizes as the engine
   * produced it.
   */
  countContinuation(context: string, text: string): number {
    if (text === "") return 0;
    return Math.max(0, this.countText(context + text) - this.countText(context));
  }

  /**
   * Tokens a chunk adds after the text ending in `before` (the prompt's tail, then what was
   * relayed), counted after its last few characters only: a cheap estimate for the running count
   * (max_tokens, progress), within a token of the exact count taken over the whole delivered text
   * at settlement.
   */
  estimateChunk(before: string, text: string): number {
    return this.countContinuation(before.slice(-ESTIMATE_CONTEXT_CHARS), text);
  }

  /** The last characters of `before + text`: what {@link estimateChunk} needs of what came before. */
  static tail(before: string, text: string): string {
    return (before + text).slice(-ESTIMATE_CONTEXT_CHARS);
  }

  /**
   * The prompt's tokens as the llama-cpp engine (worker/engines/llama-cpp-engine.ts renderPrompt)
   * feeds them: a raw completion is BOS + its text; a conversation is rendered by node-llama-cpp's
   * chat wrapper for the GGUF's template (with the tools' declarations when tools are given), or,
   * without a template, is BOS + the contents joined with "\n". Another engine (a worker behind an
   * OpenAI-compatible server) applies the same GGUF template, so the count matches up to the few
   * tokens in which template renderers differ; the prompt's byte bound still caps what is billed.
   */
  countPrompt(spec: Pick<GenerationSpec, "messages" | "prompt" | "tools">): number {
    return this.renderPrompt(spec).tokens;
  }

  /**
   * The prompt's token count ({@link countPrompt}) and its last characters as plain text, the
   * context the completion is counted after ("" for a templated conversation, whose rendering ends
   * in special tokens: the completion then counts as text on its own).
   */
  renderPrompt(spec: Pick<GenerationSpec, "messages" | "prompt" | "tools">): {
    tokens: number;
    tail: string;
  } {
    if (spec.messages.some((message) => (message.imageUrls?.length ?? 0) > 0)) {
      // An image's tokens are the vision encoder's, which a vocabulary cannot count.
      throw new Error("a prompt with images is not countable from the vocabulary alone");
    }
    const bos = this.model.tokens.bos !== null ? 1 : 0;
    if (spec.prompt !== undefined && spec.messages.length === 0) {
      return { tokens: bos + this.countText(spec.prompt), tail: spec.prompt.slice(-ESTIMATE_CONTEXT_CHARS) };
    }
    if (!this.chatTemplate) {
      const text = spec.messages.map((m) => m.content).join("\n");
      return { tokens: bos + this.countText(text), tail: text.slice(-ESTIMATE_CONTEXT_CHARS) };
    }
    const wrapper = this.module.resolveChatWrapper(this.model);
    const history = toChatHistory(spec.messages);
    if (history.at(-1)?.type !== "model") history.push({ type: "model", response: [] });
    const tools = spec.tools ?? [];
    const state = wrapper.generateContextState({
      chatHistory: history,
      ...(tools.length > 0
        ? {
            availableFunctions: Object.fromEntries(
              tools.map((tool) => [
                tool.name,
                {
                  ...(tool.description ? { description: tool.description } : {}),
                  ...(tool.parametersJson ? { params: parseJsonOrText(tool.parametersJson) as never } : {}),
                },
              ]),
            ),
            documentFunctionParams: true,
          }
        : {}),
    });
    return { tokens: (state.contextText.tokenize(this.model.tokenizer) as Token[]).length, tail: "" };
  }

  async dispose(): Promise<void> {
    await this.model.dispose();
  }
}

type ChatHistoryItem = import("node-llama-cpp").ChatHistoryItem;

/**
 * OpenAI messages as node-llama-cpp chat history, as the llama-cpp engine builds it (a tool
 * message becomes its call's result). Kept in step with worker/engines/llama-cpp-engine.ts: the
 * server may not import the worker's code (test/unit/layout.test.ts keeps the rooms apart).
 */
function toChatHistory(messages: GenerationSpec["messages"]): ChatHistoryItem[] {
  const results = new Map<string, string>();
  for (const message of messages) {
    if (message.role === "tool" && message.toolCallId) results.set(message.toolCallId, message.content);
  }
  const history: ChatHistoryItem[] = [];
  for (const message of messages) {
    if (message.role === "system" || message.role === "developer") {
      history.push({ type: "system", text: message.content });
    } else if (message.role === "assistant") {
      const calls = (message.toolCalls ?? []).map((call) => ({
        type: "functionCall" as const,
        name: call.name,
        params: parseJsonOrText(call.arguments),
        result: parseJsonOrText(results.get(call.id) ?? ""),
      }));
      history.push({ type: "model", response: [...(message.content ? [message.content] : []), ...calls] });
    } else if (message.role === "tool") {
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

function parseJsonOrText(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}

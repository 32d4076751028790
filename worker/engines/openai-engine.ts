/**
 * An engine backed by any OpenAI-compatible chat completions server (Ollama, llama.cpp's
 * llama-server, vLLM, LM Studio, ...), spoken to with the official `openai` SDK.
 *
 * These servers stream one token per chunk, so every chunk with non-empty `delta.content` becomes
 * one piece with `tokenCount: 1`. The finish reason comes from the chunk's `finish_reason`, and the
 * usage from the final usage chunk (requested with `stream_options.include_usage`).
 */
import OpenAI, { APIConnectionError, APIError, APIUserAbortError } from "openai";
import type {
  ChatCompletionCreateParamsStreaming,
  ChatCompletionMessageParam,
} from "openai/resources/chat/completions";
import {
  type Engine,
  EngineError,
  type EngineFinishReason,
  type EngineMessage,
  type EngineUsage,
  type GenerateRequest,
  type Generation,
} from "./engine.js";

/** Options of {@link OpenAiEngine}. */
export interface OpenAiEngineOptions {
  /** Base URL of the OpenAI-compatible API, usually ending in `/v1` (e.g. http://127.0.0.1:11434/v1). */
  baseUrl: string;
  /** The model name the engine knows; defaults to the job's model name. */
  model?: string;
  /** API key sent as a bearer token; most local servers ignore it. */
  apiKey?: string;
  /** Per-request timeout in milliseconds. Default 10 minutes. */
  timeoutMs?: number;
}

/** An {@link Engine} that forwards jobs to an OpenAI-compatible HTTP server. */
export class OpenAiEngine implements Engine {
  readonly name = "openai-compatible";
  readonly baseUrl: string;
  private readonly model: string | undefined;
  private readonly client: OpenAI;
  private readonly active = new Set<AbortController>();

  constructor(options: OpenAiEngineOptions) {
    this.baseUrl = options.baseUrl;
    this.model = options.model;
    this.client = new OpenAI({
      baseURL: options.baseUrl,
      // The SDK insists on a key; local servers accept anything.
      apiKey: options.apiKey || "not-needed",
      // A job is not retried behind the platform's back: a failure is reported and fails over.
      maxRetries: 0,
      timeout: options.timeoutMs ?? 600_000,
    });
  }

  async *generate(request: GenerateRequest): Generation {
    const { signal, maxTokens, sampling } = request;
    if (signal.aborted) return { finishReason: "cancelled" };

    // Our own controller so that close() can cancel everything; it follows the job's signal.
    const controller = new AbortController();
    const onAbort = () => controller.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    this.active.add(controller);

    const params: ChatCompletionCreateParamsStreaming = {
      model: this.model ?? request.model,
      messages: request.messages.map(toOpenAiMessage),
      stream: true,
      stream_options: { include_usage: true },
    };
    if (maxTokens > 0) params.max_tokens = maxTokens;
    if (sampling.temperature !== undefined) params.temperature = sampling.temperature;
    if (sampling.topP !== undefined) params.top_p = sampling.topP;
    if (sampling.stop && sampling.stop.length > 0) params.stop = sampling.stop;
    if (sampling.seed !== undefined) params.seed = sampling.seed;
    if (sampling.presencePenalty !== undefined) params.presence_penalty = sampling.presencePenalty;
    if (sampling.frequencyPenalty !== undefined) params.frequency_penalty = sampling.frequencyPenalty;

    let completionTokens = 0;
    let finishReason: EngineFinishReason | undefined;
    let usage: EngineUsage | undefined;
    try {
      const stream = await this.client.chat.completions.create(params, { signal: controller.signal });
      chunks: for await (const chunk of stream) {
        if (chunk.usage) {
          usage = {
            promptTokens: chunk.usage.prompt_tokens,
            completionTokens: chunk.usage.completion_tokens,
          };
        }
        for (const choice of chunk.choices) {
          if (choice.index !== 0) continue;
          const content = choice.delta?.content;
          if (content) {
            if (maxTokens > 0 && completionTokens >= maxTokens) {
              // The engine ignored max_tokens: stop it ourselves (leaving the loop aborts the request).
              finishReason = "length";
              break chunks;
            }
            completionTokens += 1;
            yield { text: content, tokenCount: 1 };
            if (signal.aborted) return { finishReason: "cancelled" };
          }
          if (choice.finish_reason) finishReason = mapFinishReason(choice.finish_reason);
        }
      }
    } catch (error) {
      if (signal.aborted || error instanceof APIUserAbortError) return { finishReason: "cancelled" };
      throw toEngineError(error, this.baseUrl);
    } finally {
      signal.removeEventListener("abort", onAbort);
      this.active.delete(controller);
    }
    if (signal.aborted) return { finishReason: "cancelled" };
    if (finishReason === undefined) {
      finishReason = maxTokens > 0 && completionTokens >= maxTokens ? "length" : "stop";
    }
    return usage ? { finishReason, usage } : { finishReason };
  }

  async close(): Promise<void> {
    for (const controller of this.active) controller.abort(new Error("engine closed"));
    this.active.clear();
  }
}

function toOpenAiMessage(message: EngineMessage): ChatCompletionMessageParam {
  const name = message.name ? { name: message.name } : {};
  switch (message.role) {
    case "system":
      return { role: "system", content: message.content, ...name };
    case "developer":
      return { role: "developer", content: message.content, ...name };
    case "assistant":
      return { role: "assistant", content: message.content, ...name };
    default:
      // "user", and "tool" (already flattened to text by the control plane; no tool_call_id here).
      return { role: "user", content: message.content, ...name };
  }
}

function mapFinishReason(reason: string): EngineFinishReason {
  switch (reason) {
    case "length":
      return "length";
    case "content_filter":
      return "content_filter";
    default:
      // "stop", "tool_calls", "function_call", engine-specific values.
      return "stop";
  }
}

function toEngineError(error: unknown, baseUrl: string): EngineError {
  if (error instanceof EngineError) return error;
  if (error instanceof APIConnectionError) {
    return new EngineError("engine_error", `engine unreachable at ${baseUrl}: ${error.message}`, {
      cause: error,
    });
  }
  if (error instanceof APIError) {
    const status = error.status;
    const message = `engine returned ${status ?? "an error"}: ${error.message}`;
    if (status === 400 || status === 413 || status === 422) {
      return new EngineError("invalid_input", message, { cause: error });
    }
    if (status === 404) return new EngineError("model_unavailable", message, { cause: error });
    if (status === 429 || status === 503) return new EngineError("overloaded", message, { cause: error });
    return new EngineError("engine_error", message, { cause: error });
  }
  const message = error instanceof Error ? error.message : String(error);
  return new EngineError("engine_error", `engine error: ${message}`, { cause: error });
}

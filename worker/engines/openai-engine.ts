/**
 * An engine backed by any OpenAI-compatible server (Ollama, llama.cpp's llama-server, vLLM,
 * LM Studio, ...), spoken to with the official `openai` SDK.
 *
 * - Chat jobs go to `POST /v1/chat/completions`, raw text completions (`prompt`) to the legacy
 *   `POST /v1/completions`, both streamed. Tools, tool_choice, parallel_tool_calls,
 *   response_format and logprobs are passed as the OpenAI API defines them; whether the engine
 *   honours them is what the worker's `--capabilities` promise.
 * - These servers stream about one token per chunk, so every chunk with content, tool-call
 *   fragments or log-probabilities becomes one piece with `tokenCount: 1` — or, when the chunk
 *   carries log-probabilities, one token per log-probability entry. Tool-call fragments
 *   (`delta.tool_calls`) and log-probabilities are passed on exactly as the engine sent them.
 * - The finish reason comes from the chunk's `finish_reason`, and the usage from the final usage
 *   chunk (requested with `stream_options.include_usage`).
 */
import OpenAI, { APIConnectionError, APIError, APIUserAbortError } from "openai";
import type {
  ChatCompletionChunk,
  ChatCompletionContentPart,
  ChatCompletionCreateParamsStreaming,
  ChatCompletionMessageParam,
  ChatCompletionTool,
  ChatCompletionToolChoiceOption,
} from "openai/resources/chat/completions";
import type { Completion, CompletionCreateParamsStreaming } from "openai/resources/completions";
import type { ResponseFormatJSONSchema } from "openai/resources/shared";
import type { TokenLogprob } from "../../common/generation.js";
import {
  type Engine,
  EngineError,
  type EngineFinishReason,
  type EngineMessage,
  type EnginePiece,
  type EngineResponseFormat,
  type EngineTool,
  type EngineToolChoice,
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

/** What one streamed chunk of either API contributes. */
interface StreamStep {
  piece?: EnginePiece;
  finishReason?: string | null;
  usage?: { prompt_tokens: number; completion_tokens: number } | null;
}

/** Sampling and length parameters, common to both APIs. */
interface CommonParams {
  max_tokens?: number;
  temperature?: number;
  top_p?: number;
  stop?: string[];
  seed?: number;
  presence_penalty?: number;
  frequency_penalty?: number;
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
    const { signal, maxTokens } = request;
    if (signal.aborted) return { finishReason: "cancelled" };

    // Our own controller so that close() can cancel everything; it follows the job's signal.
    const controller = new AbortController();
    const onAbort = () => controller.abort(signal.reason);
    signal.addEventListener("abort", onAbort, { once: true });
    this.active.add(controller);

    let completionTokens = 0;
    let finishReason: EngineFinishReason | undefined;
    let usage: EngineUsage | undefined;
    try {
      const steps =
        request.prompt !== undefined
          ? this.streamCompletion(request, controller.signal)
          : this.streamChat(request, controller.signal);
      for await (const step of steps) {
        if (step.usage) {
          usage = {
            promptTokens: step.usage.prompt_tokens,
            completionTokens: step.usage.completion_tokens,
          };
        }
        if (step.piece) {
          if (maxTokens > 0 && completionTokens >= maxTokens) {
            // The engine ignored max_tokens: stop it ourselves (leaving the loop aborts the request).
            finishReason = "length";
            break;
          }
          completionTokens += step.piece.tokenCount;
          yield step.piece;
          if (signal.aborted) return { finishReason: "cancelled" };
        }
        if (step.finishReason) finishReason = mapFinishReason(step.finishReason);
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

  /** A chat job on `POST /chat/completions`, as steps. */
  private async *streamChat(request: GenerateRequest, signal: AbortSignal): AsyncGenerator<StreamStep> {
    const params: ChatCompletionCreateParamsStreaming = {
      model: this.model ?? request.model,
      messages: request.messages.map(toOpenAiMessage),
      stream: true,
      stream_options: { include_usage: true },
      ...commonParams(request),
    };
    if (request.tools) {
      params.tools = request.tools.map(toOpenAiTool);
      if (request.toolChoice) params.tool_choice = toOpenAiToolChoice(request.toolChoice);
      if (request.parallelToolCalls !== undefined) params.parallel_tool_calls = request.parallelToolCalls;
    }
    if (request.responseFormat) params.response_format = toOpenAiResponseFormat(request.responseFormat);
    if (request.logprobs) {
      params.logprobs = true;
      if (request.logprobs.top > 0) params.top_logprobs = request.logprobs.top;
    }
    const response = await this.client.chat.completions.create(params, { signal }).asResponse();
    for await (const chunk of sseEvents<ChatCompletionChunk>(response)) {
      const choice = chunk.choices?.find((c) => c.index === 0);
      yield {
        ...(choice ? { piece: chatPiece(choice), finishReason: choice.finish_reason } : {}),
        usage: chunk.usage,
      };
    }
  }

  /** A raw text completion on the legacy `POST /completions`, as steps. */
  private async *streamCompletion(request: GenerateRequest, signal: AbortSignal): AsyncGenerator<StreamStep> {
    const params: CompletionCreateParamsStreaming = {
      model: this.model ?? request.model,
      prompt: request.prompt ?? "",
      stream: true,
      stream_options: { include_usage: true },
      ...commonParams(request),
    };
    if (request.logprobs) params.logprobs = request.logprobs.top;
    const response = await this.client.completions.create(params, { signal }).asResponse();
    for await (const chunk of sseEvents<Completion>(response)) {
      const choice = chunk.choices?.find((c) => c.index === 0);
      yield {
        ...(choice ? { piece: completionPiece(choice), finishReason: choice.finish_reason } : {}),
        usage: chunk.usage,
      };
    }
  }
}

/**
 * The JSON events of a streamed answer, parsed as its bytes arrive. The SDK's own stream (its
 * status checks and errors still apply: `asResponse()` resolves only for a 2xx answer) reads
 * through several async generators and a line decoder per event, which the worker would pay for
 * every token; this reader is one loop. As the SDK does, it ends at `[DONE]`, throws the engine's
 * in-band `error` as an APIError, and ends quietly when the request is aborted (the caller tells
 * a cancellation by its signal). Leaving the loop early cancels the response body.
 */
async function* sseEvents<Event>(response: Response): AsyncGenerator<Event> {
  const body = response.body;
  if (!body) return;
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  let finished = false;
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) {
        finished = true;
        buffer += decoder.decode();
        // A last event without its blank line still counts, as in the SDK.
        buffer += "\n\n";
      } else {
        buffer += decoder.decode(value, { stream: true });
      }
      if (buffer.includes("\r")) {
        // CR and CRLF line ends; a CR at the very end may be the first half of a CRLF.
        const keep = !finished && buffer.endsWith("\r") ? 1 : 0;
        buffer = buffer.slice(0, buffer.length - keep).replace(/\r\n?/g, "\n") + (keep ? "\r" : "");
      }
      let start = 0;
      for (let end = buffer.indexOf("\n\n"); end !== -1; end = buffer.indexOf("\n\n", start)) {
        const data = sseData(buffer, start, end);
        start = end + 2;
        if (data === null) continue;
        if (data.startsWith("[DONE]")) {
          finished = true;
          return;
        }
        const event = JSON.parse(data) as { error?: object } | null;
        if (event?.error) {
          finished = true;
          throw new APIError(undefined, event.error, undefined, response.headers);
        }
        yield event as Event;
      }
      buffer = buffer.slice(start);
      if (finished) return;
    }
  } catch (error) {
    if (isAbortError(error)) return;
    throw error;
  } finally {
    if (!finished) await reader.cancel().catch(() => {});
  }
}

/** The data of the SSE event in `buffer` from `start` to `end` (its `data:` lines joined), or null. */
function sseData(buffer: string, start: number, end: number): string | null {
  // The usual event is a single `data: ...` line.
  if (buffer.startsWith("data: ", start) && buffer.indexOf("\n", start) === end) {
    return buffer.slice(start + 6, end);
  }
  let data: string | null = null;
  for (const line of buffer.slice(start, end).split("\n")) {
    if (!line.startsWith("data:")) continue; // comments, `event:`, `id:`, `retry:`
    const value = line.charCodeAt(5) === 32 ? line.slice(6) : line.slice(5);
    data = data === null ? value : `${data}\n${value}`;
  }
  return data;
}

function isAbortError(error: unknown): boolean {
  return typeof error === "object" && error !== null && "name" in error && error.name === "AbortError";
}

function commonParams({ maxTokens, sampling }: GenerateRequest): CommonParams {
  const params: CommonParams = {};
  if (maxTokens > 0) params.max_tokens = maxTokens;
  if (sampling.temperature !== undefined) params.temperature = sampling.temperature;
  if (sampling.topP !== undefined) params.top_p = sampling.topP;
  if (sampling.stop && sampling.stop.length > 0) params.stop = sampling.stop;
  if (sampling.seed !== undefined) params.seed = sampling.seed;
  if (sampling.presencePenalty !== undefined) params.presence_penalty = sampling.presencePenalty;
  if (sampling.frequencyPenalty !== undefined) params.frequency_penalty = sampling.frequencyPenalty;
  return params;
}

/** The piece of a chat chunk's choice, or undefined when it carries no output (a role, a finish). */
function chatPiece(choice: ChatCompletionChunk.Choice): EnginePiece | undefined {
  const text = choice.delta?.content ?? "";
  const toolCalls = (choice.delta?.tool_calls ?? []).map((call) => ({
    index: call.index,
    ...(call.id ? { id: call.id } : {}),
    ...(call.function?.name ? { name: call.function.name } : {}),
    arguments: call.function?.arguments ?? "",
  }));
  const logprobs: TokenLogprob[] = (choice.logprobs?.content ?? []).map((entry) => ({
    token: entry.token,
    logprob: entry.logprob,
    topLogprobs: (entry.top_logprobs ?? []).map(({ token, logprob }) => ({ token, logprob })),
  }));
  return toPiece(text, toolCalls, logprobs);
}

/** The piece of a legacy completion chunk's choice (its logprobs in the legacy shape). */
function completionPiece(choice: Completion["choices"][number]): EnginePiece | undefined {
  const tokens = choice.logprobs?.tokens ?? [];
  const logprobs: TokenLogprob[] = tokens.map((token, i) => ({
    token,
    logprob: choice.logprobs?.token_logprobs?.[i] ?? 0,
    // The legacy shape is an object per position; most likely first, as in the chat shape.
    topLogprobs: Object.entries(choice.logprobs?.top_logprobs?.[i] ?? {})
      .map(([alternative, logprob]) => ({ token: alternative, logprob }))
      .sort((a, b) => b.logprob - a.logprob),
  }));
  return toPiece(choice.text ?? "", [], logprobs);
}

function toPiece(
  text: string,
  toolCalls: NonNullable<EnginePiece["toolCalls"]>,
  logprobs: TokenLogprob[],
): EnginePiece | undefined {
  if (text === "" && toolCalls.length === 0 && logprobs.length === 0) return undefined;
  return {
    text,
    tokenCount: Math.max(1, logprobs.length),
    ...(toolCalls.length > 0 ? { toolCalls } : {}),
    ...(logprobs.length > 0 ? { logprobs } : {}),
  };
}

function toOpenAiMessage(message: EngineMessage): ChatCompletionMessageParam {
  const name = message.name ? { name: message.name } : {};
  switch (message.role) {
    case "system":
      return { role: "system", content: message.content, ...name };
    case "developer":
      return { role: "developer", content: message.content, ...name };
    case "assistant":
      if (message.toolCalls && message.toolCalls.length > 0) {
        return {
          role: "assistant",
          // OpenAI's own shape: an assistant turn that only called tools has no content.
          content: message.content === "" ? null : message.content,
          tool_calls: message.toolCalls.map((call) => ({
            id: call.id,
            type: "function",
            function: { name: call.name, arguments: call.arguments },
          })),
          ...name,
        };
      }
      return { role: "assistant", content: message.content, ...name };
    case "tool":
      return { role: "tool", content: message.content, tool_call_id: message.toolCallId ?? "" };
    default:
      return { role: "user", content: userContent(message), ...name };
  }
}

function userContent(message: EngineMessage): string | ChatCompletionContentPart[] {
  if (!message.imageUrls || message.imageUrls.length === 0) return message.content;
  return [
    ...(message.content === "" ? [] : [{ type: "text" as const, text: message.content }]),
    ...message.imageUrls.map((url) => ({ type: "image_url" as const, image_url: { url } })),
  ];
}

function toOpenAiTool(tool: EngineTool): ChatCompletionTool {
  return {
    type: "function",
    function: {
      name: tool.name,
      ...(tool.description ? { description: tool.description } : {}),
      ...(tool.parameters ? { parameters: tool.parameters } : {}),
      // Sent only when set: some engines reject fields they do not know.
      ...(tool.strict ? { strict: true } : {}),
    },
  };
}

function toOpenAiToolChoice(choice: EngineToolChoice): ChatCompletionToolChoiceOption {
  if (choice.mode === "function") return { type: "function", function: { name: choice.functionName } };
  return choice.mode;
}

function toOpenAiResponseFormat(
  format: EngineResponseFormat,
): NonNullable<ChatCompletionCreateParamsStreaming["response_format"]> {
  if (format.type !== "json_schema") return { type: format.type };
  const jsonSchema: ResponseFormatJSONSchema.JSONSchema = { name: format.name, schema: format.schema };
  if (format.strict) jsonSchema.strict = true;
  return { type: "json_schema", json_schema: jsonSchema };
}

function mapFinishReason(reason: string): EngineFinishReason {
  switch (reason) {
    case "length":
      return "length";
    case "content_filter":
      return "content_filter";
    case "tool_calls":
      return "tool_calls";
    default:
      // "stop", "function_call", engine-specific values.
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

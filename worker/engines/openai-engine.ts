/**
 * An engine backed by any OpenAI-compatible server (Ollama, llama.cpp's llama-server, vLLM,
 * LM Studio, ...), spoken to over HTTP the way the official `openai` SDK does (its request and
 * error types and its error classes are used; see {@link EngineStream} for why not its client).
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
import type { IncomingHttpHeaders, IncomingMessage } from "node:http";
import * as http from "node:http";
import * as https from "node:https";
import { APIConnectionError, APIError } from "openai";
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
import { type ChunkKind, ChunkParser } from "./chunk-template.js";
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
  /** `baseUrl` with a trailing slash, so that relative paths append to it. */
  private readonly base: URL;
  private readonly agent: http.Agent;
  private readonly headers: Record<string, string>;
  private readonly timeoutMs: number;
  private readonly active = new Set<EngineStream>();

  constructor(options: OpenAiEngineOptions) {
    this.baseUrl = options.baseUrl;
    this.model = options.model;
    this.base = new URL(options.baseUrl.endsWith("/") ? options.baseUrl : `${options.baseUrl}/`);
    // Kept-alive connections: a job's request does not pay a TCP handshake (nor, on https, a TLS one).
    const agentOptions = { keepAlive: true, scheduling: "lifo" as const };
    this.agent =
      this.base.protocol === "https:" ? new https.Agent(agentOptions) : new http.Agent(agentOptions);
    this.headers = {
      "content-type": "application/json",
      accept: "application/json",
      // Local servers accept anything; some insist on a bearer token being there.
      authorization: `Bearer ${options.apiKey || "not-needed"}`,
    };
    // Until the answer's headers, as the SDK's timeout. A job is not retried behind the platform's
    // back (only a dead idle connection is, see EngineStream): a failure is reported and fails over.
    this.timeoutMs = options.timeoutMs ?? 600_000;
  }

  async *generate(request: GenerateRequest): Generation {
    const { signal, maxTokens } = request;
    if (signal.aborted) return { finishReason: "cancelled" };

    const legacy = request.prompt !== undefined;
    const stream = this.open(
      legacy ? "completions" : "chat/completions",
      legacy ? this.completionParams(request) : this.chatParams(request),
    );
    // The job's signal ends the HTTP request at once, even while nobody pulls this generator (a
    // job waiting for its flow-control window); close() ends every request in flight.
    const onAbort = () => stream.abort();
    signal.addEventListener("abort", onAbort, { once: true });
    this.active.add(stream);

    let completionTokens = 0;
    let finishReason: EngineFinishReason | undefined;
    let usage: EngineUsage | undefined;
    try {
      await stream.opened;
      for (;;) {
        // One event after the other from what the last read parsed; a wait only when none is left.
        const event = stream.next();
        if (event === undefined) {
          if (await stream.more()) continue;
          break;
        }
        let piece: EnginePiece | undefined;
        let finish: string | null | undefined;
        if (typeof event === "string") {
          // A chunk of one token's text and nothing else, as chatPiece/completionPiece make it.
          piece = event === "" ? undefined : { text: event, tokenCount: 1 };
        } else {
          if (event.usage) {
            usage = {
              promptTokens: event.usage.prompt_tokens,
              completionTokens: event.usage.completion_tokens,
            };
          }
          const choice = event.choices?.find((c) => c.index === 0);
          if (!choice) continue;
          piece = legacy
            ? completionPiece(choice as unknown as Completion["choices"][number])
            : chatPiece(choice as unknown as ChatCompletionChunk.Choice);
          finish = choice.finish_reason;
        }
        if (piece) {
          if (maxTokens > 0 && completionTokens >= maxTokens) {
            // The engine ignored max_tokens: stop it ourselves (leaving the loop ends the request).
            finishReason = "length";
            break;
          }
          completionTokens += piece.tokenCount;
          yield piece;
          if (signal.aborted) return { finishReason: "cancelled" };
        }
        if (finish) finishReason = mapFinishReason(finish);
      }
    } catch (error) {
      if (signal.aborted || error instanceof StreamAborted) return { finishReason: "cancelled" };
      throw toEngineError(error, this.baseUrl);
    } finally {
      signal.removeEventListener("abort", onAbort);
      this.active.delete(stream);
      stream.close();
    }
    if (signal.aborted) return { finishReason: "cancelled" };
    if (finishReason === undefined) {
      finishReason = maxTokens > 0 && completionTokens >= maxTokens ? "length" : "stop";
    }
    return usage ? { finishReason, usage } : { finishReason };
  }

  async close(): Promise<void> {
    for (const stream of this.active) stream.abort();
    this.active.clear();
    this.agent.destroy();
  }

  /** Sends a streamed request to `path` (relative to the base URL). */
  private open(path: string, params: object): EngineStream {
    return new EngineStream(
      new URL(path, this.base),
      this.agent,
      this.headers,
      JSON.stringify(params),
      this.timeoutMs,
      path === "completions" ? "completion" : "chat",
    );
  }

  /** The body of a chat job on `POST /chat/completions`. */
  private chatParams(request: GenerateRequest): ChatCompletionCreateParamsStreaming {
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
    return params;
  }

  /** The body of a raw text completion on the legacy `POST /completions`. */
  private completionParams(request: GenerateRequest): CompletionCreateParamsStreaming {
    const params: CompletionCreateParamsStreaming = {
      model: this.model ?? request.model,
      prompt: request.prompt ?? "",
      stream: true,
      stream_options: { include_usage: true },
      ...commonParams(request),
    };
    if (request.logprobs) params.logprobs = request.logprobs.top;
    return params;
  }
}

/** One streamed event of either API, as far as the reader looks at it. */
interface StreamEvent {
  choices?: Array<{ index: number; finish_reason?: string | null }>;
  usage?: { prompt_tokens: number; completion_tokens: number } | null;
}

/** The request was ended on purpose (the job's signal, or the engine closing): not a failure. */
class StreamAborted extends Error {
  override readonly name = "StreamAborted";
}

/** Parsed events waiting to be taken beyond which the response is paused (TCP pushes back). */
const HIGH_WATER_EVENTS = 256;

/**
 * One streamed request to the engine and its server-sent events, read with `node:http` over a
 * kept-alive connection. Each body read is parsed at once, in one synchronous loop, into the
 * events it completes; the generator takes them one by one and waits only when none is left. This
 * is what the worker pays per token, so it avoids fetch's web stream (a promise and a chunk object
 * per read), the SDK's stream (four async generators and a line decoder per event) and a TCP
 * connection per job.
 *
 * As the SDK does: a non-2xx answer throws its APIError (from the error body), the stream ends at
 * `[DONE]` or at the body's end (a last event without its blank line still counts), an in-band
 * `error` event throws an APIError. A connection the engine dropped while idle (a reused one) is
 * retried once, before anything was answered. Leaving early ends the request (the engine sees the
 * connection close); after `[DONE]` the rest of the body is read so that the connection is reused.
 */
class EngineStream {
  /** Settles once the answer's status and headers are in: rejects for a non-2xx answer. */
  readonly opened: Promise<void>;
  /** Parsed events; a string is a chunk that carries only that text (ChunkParser.plainText). */
  private readonly events: Array<StreamEvent | string> = [];
  private head = 0;
  private buffer = "";
  private request!: http.ClientRequest;
  private response: IncomingMessage | undefined;
  private headers: IncomingHttpHeaders = {};
  /** [DONE] seen or the body ended: no more events. */
  private finished = false;
  private ended = false;
  private failure: unknown;
  private paused = false;
  private waiter: (() => void) | null = null;
  private settleOpened!: { resolve: () => void; reject: (error: unknown) => void };
  /** Parses the events' JSON, building the chunks that differ only in their token (chunk-template.ts). */
  private readonly chunks: ChunkParser;

  constructor(
    private readonly url: URL,
    private readonly agent: http.Agent,
    private readonly requestHeaders: Record<string, string>,
    private readonly body: string,
    private readonly timeoutMs: number,
    kind: ChunkKind,
  ) {
    this.chunks = new ChunkParser(kind);
    this.opened = new Promise<void>((resolve, reject) => {
      this.settleOpened = { resolve, reject };
    });
    this.send(true);
  }

  /** The next parsed event (a string: a chunk of only that text), or undefined when none is waiting. */
  next(): StreamEvent | string | undefined {
    if (this.head < this.events.length) {
      const event = this.events[this.head] as StreamEvent | string;
      this.head += 1;
      if (this.head === this.events.length) {
        this.events.length = 0;
        this.head = 0;
        if (this.paused && !this.finished) {
          this.paused = false;
          this.response?.resume();
        }
      }
      return event;
    }
    if (this.failure !== undefined) throw this.failure;
    return undefined;
  }

  /** Waits for more events: true when some came, false at the end of the stream. */
  more(): Promise<boolean> {
    if (this.head < this.events.length) return Promise.resolve(true);
    if (this.failure !== undefined) return Promise.reject(this.failure);
    if (this.finished) return Promise.resolve(false);
    return new Promise<boolean>((resolve, reject) => {
      this.waiter = () => {
        if (this.head < this.events.length) resolve(true);
        else if (this.failure !== undefined) reject(this.failure);
        else if (this.finished) resolve(false);
        else return; // a read that completed no event: still waiting
        this.waiter = null;
      };
    });
  }

  /** Ends the request now (the job was cancelled, or the engine is closing). */
  abort(): void {
    this.fail(new StreamAborted("the request was aborted"));
  }

  /** Done with the stream: a request still answering is ended, a finished one left to be reused. */
  close(): void {
    if (this.ended) return;
    if (this.finished && this.failure === undefined && this.response) {
      // After [DONE]: what may follow is read and dropped, and the connection goes back to the pool.
      this.response.resume();
      return;
    }
    this.request.destroy();
  }

  private send(mayRetry: boolean): void {
    const transport = this.url.protocol === "https:" ? https : http;
    const request = transport.request(this.url, {
      method: "POST",
      agent: this.agent,
      headers: { ...this.requestHeaders, "content-length": Buffer.byteLength(this.body) },
    });
    this.request = request;
    // Until the answer's headers, as the SDK's timeout: a stream may then take as long as it takes.
    const timer = setTimeout(() => {
      request.destroy(new Error(`no answer within ${this.timeoutMs} ms`));
    }, this.timeoutMs);
    timer.unref();
    request.on("response", (response) => {
      clearTimeout(timer);
      if (this.failure !== undefined) {
        response.destroy();
        return;
      }
      this.response = response;
      this.headers = response.headers;
      response.setEncoding("utf8");
      const status = response.statusCode ?? 0;
      if (status < 200 || status >= 300) {
        this.readError(response, status);
        return;
      }
      response.on("data", (text: string) => this.onData(text));
      response.on("end", () => this.onEnd());
      response.on("error", (error) => this.fail(error));
      response.on("close", () => {
        if (!this.ended) this.fail(new Error("the engine closed the stream before its end"));
      });
      this.settleOpened.resolve();
    });
    request.on("error", (error: NodeJS.ErrnoException) => {
      clearTimeout(timer);
      if (this.failure !== undefined) return;
      if (this.response === undefined) {
        // A kept-alive connection the engine closed just as it was reused: try once on a new one.
        if (mayRetry && request.reusedSocket && error.code === "ECONNRESET") {
          this.send(false);
          return;
        }
        this.fail(new APIConnectionError({ message: error.message, cause: error }));
        return;
      }
      this.fail(error);
    });
    request.end(this.body);
  }

  /** A non-2xx answer: its body becomes the APIError, as the SDK makes it. */
  private readError(response: IncomingMessage, status: number): void {
    let text = "";
    response.on("data", (part: string) => {
      text += part;
    });
    response.on("error", (error) => this.fail(error));
    response.on("end", () => {
      let json: object | undefined;
      try {
        json = JSON.parse(text) as object;
      } catch {
        json = undefined;
      }
      const headers = new Headers();
      for (const [name, value] of Object.entries(this.headers)) {
        if (typeof value === "string") headers.set(name, value);
      }
      this.fail(APIError.generate(status, json, json ? undefined : text, headers));
      this.ended = true;
    });
  }

  private onData(text: string): void {
    if (this.finished) return;
    let buffer = this.buffer + text;
    if (buffer.includes("\r")) {
      // CR and CRLF line ends; a CR at the very end may be the first half of a CRLF.
      const keep = buffer.endsWith("\r") ? 1 : 0;
      buffer = buffer.slice(0, buffer.length - keep).replace(/\r\n?/g, "\n") + (keep ? "\r" : "");
    }
    this.buffer = this.parse(buffer);
    if (!this.finished && this.events.length - this.head >= HIGH_WATER_EVENTS) {
      this.paused = true;
      this.response?.pause();
    }
    this.waiter?.();
  }

  private onEnd(): void {
    this.ended = true;
    if (!this.finished) {
      const rest = this.buffer.replace(/\r\n?/g, "\n");
      this.buffer = "";
      // A last event without its blank line still counts, as in the SDK.
      this.parse(`${rest}\n\n`);
      this.finished = true;
    }
    this.waiter?.();
  }

  /** Parses the complete events in `buffer`; answers what is left of it. */
  private parse(buffer: string): string {
    let start = 0;
    for (let end = buffer.indexOf("\n\n"); end !== -1; end = buffer.indexOf("\n\n", start)) {
      const data = sseData(buffer, start, end);
      start = end + 2;
      if (data === null) continue;
      if (data.startsWith("[DONE]")) {
        this.finished = true;
        return "";
      }
      // Most chunks: a token and nothing else, taken without building their event.
      const text = this.chunks.plainText(data);
      if (text !== undefined) {
        this.events.push(text);
        continue;
      }
      let event: (StreamEvent & { error?: object }) | null;
      try {
        event = this.chunks.parse(data) as (StreamEvent & { error?: object }) | null;
      } catch (error) {
        this.fail(error);
        return "";
      }
      if (event?.error) {
        this.fail(new APIError(undefined, event.error, undefined, new Headers()));
        return "";
      }
      // An event that is not an object (a bare JSON value) carries nothing the reader looks at.
      if (typeof event === "object" && event !== null) this.events.push(event);
    }
    return buffer.slice(start);
  }

  private fail(error: unknown): void {
    // The whole body was read: nothing left to end.
    if (this.failure !== undefined || this.ended) return;
    if (this.finished && !(error instanceof StreamAborted)) {
      // After [DONE], what was parsed stands; the connection is not reused.
      this.request.destroy();
      return;
    }
    this.failure = error;
    this.finished = true;
    // Events parsed before the failure are dropped with it: the job ends in the error.
    this.events.length = 0;
    this.head = 0;
    this.request.destroy();
    this.settleOpened.reject(error);
    this.waiter?.();
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

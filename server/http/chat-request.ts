/**
 * Validates an OpenAI chat completions body (plus our OpenRouter-style `provider` object) and
 * turns it into the market's CompletionRequest. Every rejection names the offending field.
 */
import { MarketError } from "../market/errors.js";
import type { ChatMessage, CompletionRequest } from "../market/marketplace.js";
import type { SortKey } from "../market/matcher.js";
import { parseCredits } from "../market/money.js";

export interface ParsedChatRequest {
  completion: CompletionRequest;
  includeUsage: boolean;
}

const ROLES = new Set(["system", "developer", "user", "assistant", "tool"]);
const SORT_KEYS = new Set<SortKey>(["price", "throughput", "latency"]);
const MAX_TOKENS_LIMIT = 1_000_000;
const MAX_STOP_SEQUENCES = 4;
const UNSUPPORTED = ["tools", "functions", "tool_choice", "response_format", "logprobs"] as const;

type Json = Record<string, unknown>;

function invalid(param: string, message: string): MarketError {
  return new MarketError("invalid_request", message, param);
}

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function optionalNumber(
  body: Json,
  field: string,
  min: number,
  max: number,
  param = field,
): number | undefined {
  const value = body[field];
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value < min || value > max) {
    throw invalid(param, `'${param}' must be a number from ${min} to ${max}.`);
  }
  return value;
}

function optionalInteger(body: Json, field: string, min: number, max: number): number | undefined {
  const value = optionalNumber(body, field, min, max);
  if (value !== undefined && !Number.isInteger(value)) throw invalid(field, `'${field}' must be an integer.`);
  return value;
}

function stringList(value: unknown, param: string): string[] {
  if (!Array.isArray(value) || !value.every((item) => typeof item === "string")) {
    throw invalid(param, `'${param}' must be an array of strings.`);
  }
  return value;
}

/** Text of a message: a string, or an array of `{type: "text", text}` parts joined together. */
function messageText(content: unknown, param: string): string {
  if (typeof content === "string") return content;
  if (content === null || content === undefined) return "";
  if (Array.isArray(content)) {
    return content
      .map((part, index) => {
        if (isObject(part) && part.type === "text" && typeof part.text === "string") return part.text;
        throw invalid(`${param}[${index}]`, "Only text content parts are supported.");
      })
      .join("");
  }
  throw invalid(param, `'${param}' must be a string or an array of text parts.`);
}

function parseMessages(value: unknown): ChatMessage[] {
  if (!Array.isArray(value) || value.length === 0) {
    throw invalid("messages", "'messages' must be a non-empty array.");
  }
  return value.map((message, index) => {
    const param = `messages[${index}]`;
    if (!isObject(message)) throw invalid(param, `'${param}' must be an object.`);
    if (typeof message.role !== "string" || !ROLES.has(message.role)) {
      throw invalid(`${param}.role`, `'${param}.role' must be one of ${[...ROLES].join(", ")}.`);
    }
    const parsed: ChatMessage = {
      role: message.role,
      content: messageText(message.content, `${param}.content`),
    };
    if (typeof message.name === "string") parsed.name = message.name;
    return parsed;
  });
}

function pricePerMillion(value: unknown, param: string): bigint | undefined {
  if (value === undefined || value === null) return undefined;
  if (typeof value !== "number" && typeof value !== "string") {
    throw invalid(param, `'${param}' must be a number of credits per 1M tokens.`);
  }
  return parseCredits(String(value), param);
}

function parseProvider(value: unknown): CompletionRequest["routing"] {
  if (value === undefined || value === null) return {};
  if (!isObject(value)) throw invalid("provider", "'provider' must be an object.");
  const routing: CompletionRequest["routing"] = {};
  if (value.sort !== undefined) {
    if (typeof value.sort !== "string" || !SORT_KEYS.has(value.sort as SortKey)) {
      throw invalid("provider.sort", "'provider.sort' must be 'price', 'throughput' or 'latency'.");
    }
    routing.sort = value.sort as SortKey;
  }
  if (value.max_price !== undefined) {
    if (!isObject(value.max_price))
      throw invalid("provider.max_price", "'provider.max_price' must be an object.");
    routing.maxPricePerMillionInput = pricePerMillion(value.max_price.prompt, "provider.max_price.prompt");
    routing.maxPricePerMillionOutput = pricePerMillion(
      value.max_price.completion,
      "provider.max_price.completion",
    );
  }
  routing.minTokensPerSecond = optionalNumber(value, "min_throughput", 0, 1e9, "provider.min_throughput");
  if (value.order !== undefined) routing.order = stringList(value.order, "provider.order");
  if (value.ignore !== undefined) routing.ignore = stringList(value.ignore, "provider.ignore");
  if (value.allow_fallbacks !== undefined) {
    if (typeof value.allow_fallbacks !== "boolean") {
      throw invalid("provider.allow_fallbacks", "'provider.allow_fallbacks' must be a boolean.");
    }
    routing.allowFallbacks = value.allow_fallbacks;
  }
  return routing;
}

function parseStop(value: unknown): string[] {
  if (value === undefined || value === null) return [];
  const stops = typeof value === "string" ? [value] : stringList(value, "stop");
  if (stops.length > MAX_STOP_SEQUENCES)
    throw invalid("stop", `At most ${MAX_STOP_SEQUENCES} stop sequences.`);
  return stops;
}

export function parseChatRequest(body: unknown): ParsedChatRequest {
  if (!isObject(body)) throw invalid("body", "The request body must be a JSON object.");
  if (typeof body.model !== "string" || body.model.trim() === "") {
    throw invalid("model", "'model' is required and must be a non-empty string.");
  }
  for (const field of UNSUPPORTED) {
    const value = body[field];
    if (
      value !== undefined &&
      value !== null &&
      value !== false &&
      !(Array.isArray(value) && value.length === 0)
    ) {
      throw invalid(field, `'${field}' is not supported by LocalLMarket yet.`);
    }
  }
  if (body.n !== undefined && body.n !== null && body.n !== 1) throw invalid("n", "Only n = 1 is supported.");
  if (body.stream !== undefined && body.stream !== null && typeof body.stream !== "boolean") {
    throw invalid("stream", "'stream' must be a boolean.");
  }
  const streamOptions = body.stream_options;
  if (streamOptions !== undefined && streamOptions !== null && !isObject(streamOptions)) {
    throw invalid("stream_options", "'stream_options' must be an object.");
  }
  const maxTokens =
    optionalInteger(body, "max_completion_tokens", 1, MAX_TOKENS_LIMIT) ??
    optionalInteger(body, "max_tokens", 1, MAX_TOKENS_LIMIT);
  const seed = optionalInteger(body, "seed", Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);

  const completion: CompletionRequest = {
    model: body.model,
    messages: parseMessages(body.messages),
    sampling: {
      temperature: optionalNumber(body, "temperature", 0, 2),
      topP: optionalNumber(body, "top_p", 0, 1),
      stop: parseStop(body.stop),
      seed: seed === undefined ? undefined : BigInt(seed),
      presencePenalty: optionalNumber(body, "presence_penalty", -2, 2),
      frequencyPenalty: optionalNumber(body, "frequency_penalty", -2, 2),
    },
    maxTokens,
    stream: body.stream === true,
    routing: parseProvider(body.provider),
  };
  return { completion, includeUsage: isObject(streamOptions) && streamOptions.include_usage === true };
}

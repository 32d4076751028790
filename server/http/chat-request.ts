/**
 * Validates an OpenAI chat completions body (plus OpenRouter's `models` and `provider`) and turns it
 * into the market's CompletionRequest. Fields OpenAI defines but the market does not use (`user`,
 * `metadata`, `store`…) and unknown fields are ignored, as OpenAI does; every rejection names the
 * offending field. The field parsers shared with the legacy completions and Responses endpoints
 * live here too.
 */
import { InvalidCreditsError, parseCredits } from "../../common/credits.js";
import { MarketError } from "../market/errors.js";
import type { ChatMessage, CompletionRequest } from "../market/marketplace.js";
import type { SortKey } from "../market/matcher.js";
import type { ResponseFormat, ToolCall, ToolChoice, ToolDefinition } from "../market/registry.js";

export interface ParsedChatRequest {
  completion: CompletionRequest;
  includeUsage: boolean;
}

export type Json = Record<string, unknown>;

const ROLES = new Set(["system", "developer", "user", "assistant", "tool"]);
const SORT_KEYS = new Set<SortKey>(["price", "throughput", "latency"]);
const MAX_TOKENS_LIMIT = 1_000_000;
const MAX_STOP_SEQUENCES = 4;
const MAX_TOP_LOGPROBS = 20;
/** OpenAI's limit on `tools`. */
const MAX_TOOLS = 128;
/** OpenAI's rule for function and schema names. */
const NAME_PATTERN = /^[A-Za-z0-9_-]{1,64}$/;
const IMAGE_URL_PATTERN = /^(https:|data:image\/)/i;

export function invalid(param: string, message: string): MarketError {
  return new MarketError("invalid_request", message, param);
}

export function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

function isAbsent(value: unknown): value is null | undefined {
  return value === undefined || value === null;
}

export function optionalNumber(
  body: Json,
  field: string,
  min: number,
  max: number,
  param = field,
): number | undefined {
  const value = body[field];
  if (isAbsent(value)) return undefined;
  if (typeof value !== "number" || !Number.isFinite(value) || value < min || value > max) {
    throw invalid(param, `'${param}' must be a number from ${min} to ${max}.`);
  }
  return value;
}

export function optionalInteger(body: Json, field: string, min: number, max: number): number | undefined {
  const value = optionalNumber(body, field, min, max);
  if (value !== undefined && !Number.isInteger(value)) throw invalid(field, `'${field}' must be an integer.`);
  return value;
}

function optionalBoolean(body: Json, field: string, param = field): boolean | undefined {
  const value = body[field];
  if (isAbsent(value)) return undefined;
  if (typeof value !== "boolean") throw invalid(param, `'${param}' must be a boolean.`);
  return value;
}

function optionalString(body: Json, field: string, param: string): string | undefined {
  const value = body[field];
  if (isAbsent(value)) return undefined;
  if (typeof value !== "string") throw invalid(param, `'${param}' must be a string.`);
  return value;
}

function stringList(value: unknown, param: string): string[] {
  if (!Array.isArray(value) || !value.every((item) => typeof item === "string")) {
    throw invalid(param, `'${param}' must be an array of strings.`);
  }
  return value;
}

/** The primary model and OpenRouter's `models` fallbacks; `model` may be left out when `models` names it. */
export function parseModels(body: Json): Pick<CompletionRequest, "model" | "fallbackModels"> {
  const listed = isAbsent(body.models) ? [] : stringList(body.models, "models");
  listed.forEach((name, index) => {
    if (name.trim() === "")
      throw invalid(`models[${index}]`, `'models[${index}]' must be a non-empty string.`);
  });
  let model = body.model;
  if (isAbsent(model) && listed.length > 0) model = listed[0];
  if (typeof model !== "string" || model.trim() === "") {
    throw invalid("model", "'model' is required and must be a non-empty string.");
  }
  const fallbackModels = [...new Set(listed)].filter((name) => name !== model);
  return fallbackModels.length > 0 ? { model, fallbackModels } : { model };
}

function pricePerMillion(value: unknown, param: string): bigint | undefined {
  if (isAbsent(value)) return undefined;
  if (typeof value !== "number" && typeof value !== "string") {
    throw invalid(param, `'${param}' must be a number of credits per 1M tokens.`);
  }
  try {
    return parseCredits(String(value), param);
  } catch (error) {
    if (error instanceof InvalidCreditsError) throw invalid(param, error.message);
    throw error;
  }
}

export function parseProvider(value: unknown): CompletionRequest["routing"] {
  if (isAbsent(value)) return {};
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
  const allowFallbacks = optionalBoolean(value, "allow_fallbacks", "provider.allow_fallbacks");
  if (allowFallbacks !== undefined) routing.allowFallbacks = allowFallbacks;
  const requireParameters = optionalBoolean(value, "require_parameters", "provider.require_parameters");
  if (requireParameters !== undefined) routing.requireParameters = requireParameters;
  return routing;
}

function parseStop(value: unknown): string[] {
  if (isAbsent(value)) return [];
  const stops = typeof value === "string" ? [value] : stringList(value, "stop");
  if (stops.length > MAX_STOP_SEQUENCES)
    throw invalid("stop", `At most ${MAX_STOP_SEQUENCES} stop sequences.`);
  return stops;
}

/**
 * Sampling fields shared by every endpoint, and the completion-token limit read from the first of
 * `maxTokenFields` that is set (OpenAI's newer name first).
 */
export function parseSampling(
  body: Json,
  maxTokenFields: readonly string[],
): Pick<CompletionRequest, "sampling" | "maxTokens"> {
  let maxTokens: number | undefined;
  for (const field of maxTokenFields) {
    maxTokens ??= optionalInteger(body, field, 1, MAX_TOKENS_LIMIT);
  }
  const seed = optionalInteger(body, "seed", Number.MIN_SAFE_INTEGER, Number.MAX_SAFE_INTEGER);
  return {
    sampling: {
      temperature: optionalNumber(body, "temperature", 0, 2),
      topP: optionalNumber(body, "top_p", 0, 1),
      stop: parseStop(body.stop),
      seed: seed === undefined ? undefined : BigInt(seed),
      presencePenalty: optionalNumber(body, "presence_penalty", -2, 2),
      frequencyPenalty: optionalNumber(body, "frequency_penalty", -2, 2),
    },
    maxTokens,
  };
}

export function parseStream(body: Json): boolean {
  return optionalBoolean(body, "stream") === true;
}

function parseName(value: unknown, param: string): string {
  if (typeof value !== "string" || !NAME_PATTERN.test(value)) {
    throw invalid(param, `'${param}' must be 1 to 64 letters, digits, underscores or dashes.`);
  }
  return value;
}

function schemaText(value: unknown, param: string): string {
  if (isAbsent(value)) return "";
  if (!isObject(value)) throw invalid(param, `'${param}' must be a JSON Schema object.`);
  return JSON.stringify(value);
}

/** One function definition: `{name, description, parameters, strict}` (nested in chat, flat in Responses). */
export function parseFunctionDefinition(fn: Json, param: string): ToolDefinition {
  return {
    name: parseName(fn.name, `${param}.name`),
    description: optionalString(fn, "description", `${param}.description`) ?? "",
    parametersJson: schemaText(fn.parameters, `${param}.parameters`),
    strict: optionalBoolean(fn, "strict", `${param}.strict`) ?? false,
  };
}

/** `tools`, each read by `definition`; duplicate names are refused (calls could not be told apart). */
export function parseTools(
  value: unknown,
  definition: (tool: Json, param: string) => ToolDefinition,
): ToolDefinition[] | undefined {
  if (isAbsent(value)) return undefined;
  if (!Array.isArray(value)) throw invalid("tools", "'tools' must be an array.");
  if (value.length > MAX_TOOLS) throw invalid("tools", `At most ${MAX_TOOLS} tools.`);
  const names = new Set<string>();
  return value.map((tool, index) => {
    const param = `tools[${index}]`;
    if (!isObject(tool)) throw invalid(param, `'${param}' must be an object.`);
    if (tool.type !== "function") {
      throw invalid(
        `${param}.type`,
        `Only tools of type 'function' are supported (got '${String(tool.type)}').`,
      );
    }
    const parsed = definition(tool, param);
    if (names.has(parsed.name)) throw invalid(param, `Two tools are named '${parsed.name}'.`);
    names.add(parsed.name);
    return parsed;
  });
}

function chatToolDefinition(tool: Json, param: string): ToolDefinition {
  if (!isObject(tool.function)) throw invalid(`${param}.function`, `'${param}.function' must be an object.`);
  return parseFunctionDefinition(tool.function, `${param}.function`);
}

/**
 * `tool_choice`: "auto" | "none" | "required", or a named function (`functionName` reads the name
 * from the object form, which differs between chat and Responses). A function must be among the
 * tools, and anything but "auto"/"none" needs tools.
 */
export function parseToolChoice(
  value: unknown,
  tools: ToolDefinition[] | undefined,
  functionName: (choice: Json) => unknown,
): ToolChoice | undefined {
  if (isAbsent(value)) return undefined;
  let choice: ToolChoice;
  if (value === "auto" || value === "none" || value === "required") {
    choice = { mode: value };
  } else if (isObject(value) && value.type === "function") {
    choice = { mode: "function", functionName: parseName(functionName(value), "tool_choice.function.name") };
  } else {
    throw invalid(
      "tool_choice",
      "'tool_choice' must be 'auto', 'none', 'required' or {type: 'function', function: {name}}.",
    );
  }
  if (choice.mode === "required" || choice.mode === "function") {
    if (!tools || tools.length === 0) {
      throw invalid("tool_choice", `'tool_choice' ${JSON.stringify(value)} needs 'tools'.`);
    }
    const name = choice.mode === "function" ? choice.functionName : null;
    if (name !== null && !tools.some((tool) => tool.name === name)) {
      throw invalid("tool_choice", `'tool_choice' names '${name}', which is not among 'tools'.`);
    }
  }
  return choice;
}

/**
 * A json_schema format's `{name, schema, strict}` (under `json_schema` in chat, flat in Responses).
 * Without a schema any JSON object will do.
 */
export function parseJsonSchemaFormat(spec: Json, param: string): ResponseFormat {
  return {
    type: "json_schema",
    name: parseName(spec.name, `${param}.name`),
    schemaJson: schemaText(spec.schema, `${param}.schema`) || "{}",
    strict: optionalBoolean(spec, "strict", `${param}.strict`) ?? false,
  };
}

/** A response format whose `type` is text, json_object or json_schema; `schemaOf` finds the schema's fields. */
export function parseResponseFormat(
  value: unknown,
  param: string,
  schemaOf: (format: Json) => unknown,
): ResponseFormat | undefined {
  if (isAbsent(value)) return undefined;
  if (!isObject(value)) throw invalid(param, `'${param}' must be an object.`);
  if (value.type === "text") return { type: "text" };
  if (value.type === "json_object") return { type: "json_object" };
  if (value.type === "json_schema") {
    const spec = schemaOf(value);
    const specParam = param === "response_format" ? `${param}.json_schema` : param;
    if (!isObject(spec)) throw invalid(specParam, `'${specParam}' must be an object.`);
    return parseJsonSchemaFormat(spec, specParam);
  }
  throw invalid(`${param}.type`, `'${param}.type' must be 'text', 'json_object' or 'json_schema'.`);
}

/** `logprobs` + `top_logprobs` (0–20, only with logprobs). */
function parseLogprobs(body: Json): CompletionRequest["logprobs"] {
  const wanted = optionalBoolean(body, "logprobs");
  const top = optionalInteger(body, "top_logprobs", 0, MAX_TOP_LOGPROBS);
  if (top !== undefined && wanted !== true) {
    throw invalid("top_logprobs", "'top_logprobs' needs 'logprobs': true.");
  }
  return wanted ? { top: top ?? 0 } : undefined;
}

/** An image passed by reference; the worker fetches it, so nothing but https: and inline data. */
export function imageUrl(value: unknown, param: string): string {
  if (typeof value !== "string" || !IMAGE_URL_PATTERN.test(value)) {
    throw invalid(param, `'${param}' must be an https: or data:image URL.`);
  }
  return value;
}

/** A message's content: a string, or parts whose text is joined and whose images are listed. */
function parseContent(content: unknown, param: string): { text: string; imageUrls: string[] } {
  if (typeof content === "string") return { text: content, imageUrls: [] };
  if (isAbsent(content)) return { text: "", imageUrls: [] };
  if (!Array.isArray(content)) {
    throw invalid(param, `'${param}' must be a string or an array of content parts.`);
  }
  let text = "";
  const imageUrls: string[] = [];
  content.forEach((part, index) => {
    const partParam = `${param}[${index}]`;
    if (!isObject(part)) throw invalid(partParam, `'${partParam}' must be an object.`);
    if (part.type === "text" && typeof part.text === "string") {
      text += part.text;
    } else if (part.type === "refusal" && typeof part.refusal === "string") {
      text += part.refusal;
    } else if (part.type === "image_url") {
      imageUrls.push(
        imageUrl(isObject(part.image_url) ? part.image_url.url : undefined, `${partParam}.image_url.url`),
      );
    } else {
      throw invalid(
        partParam,
        `Content parts of type '${String(part.type)}' are not supported; use text or image_url.`,
      );
    }
  });
  return { text, imageUrls };
}

function parseToolCalls(value: unknown, param: string): ToolCall[] {
  if (!Array.isArray(value)) throw invalid(param, `'${param}' must be an array.`);
  return value.map((call, index) => {
    const callParam = `${param}[${index}]`;
    if (!isObject(call) || !isObject(call.function)) {
      throw invalid(callParam, `'${callParam}' must be {id, type: 'function', function: {name, arguments}}.`);
    }
    if (typeof call.id !== "string" || call.id === "") {
      throw invalid(`${callParam}.id`, `'${callParam}.id' must be a non-empty string.`);
    }
    if (typeof call.function.name !== "string" || call.function.name === "") {
      throw invalid(`${callParam}.function.name`, `'${callParam}.function.name' must be a non-empty string.`);
    }
    if (typeof call.function.arguments !== "string") {
      throw invalid(
        `${callParam}.function.arguments`,
        `'${callParam}.function.arguments' must be a JSON string.`,
      );
    }
    return { id: call.id, name: call.function.name, arguments: call.function.arguments };
  });
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
    const { text, imageUrls } = parseContent(message.content, `${param}.content`);
    const parsed: ChatMessage = { role: message.role, content: text };
    if (imageUrls.length > 0) parsed.imageUrls = imageUrls;
    const name = optionalString(message, "name", `${param}.name`);
    if (name !== undefined) parsed.name = name;
    if (message.role === "assistant" && !isAbsent(message.tool_calls)) {
      const toolCalls = parseToolCalls(message.tool_calls, `${param}.tool_calls`);
      if (toolCalls.length > 0) parsed.toolCalls = toolCalls;
    }
    if (message.role === "tool") {
      if (typeof message.tool_call_id !== "string" || message.tool_call_id === "") {
        throw invalid(`${param}.tool_call_id`, `'${param}.tool_call_id' is required on a tool message.`);
      }
      parsed.toolCallId = message.tool_call_id;
    }
    return parsed;
  });
}

export function parseChatRequest(body: unknown): ParsedChatRequest {
  if (!isObject(body)) throw invalid("body", "The request body must be a JSON object.");
  // The deprecated function-calling fields would otherwise be ignored and the model never call.
  for (const field of ["functions", "function_call"]) {
    if (!isAbsent(body[field]))
      throw invalid(field, `'${field}' is deprecated by OpenAI; use 'tools' and 'tool_choice'.`);
  }
  if (!isAbsent(body.n) && body.n !== 1) throw invalid("n", "Only n = 1 is supported.");
  const streamOptions = body.stream_options;
  if (!isAbsent(streamOptions) && !isObject(streamOptions)) {
    throw invalid("stream_options", "'stream_options' must be an object.");
  }
  const tools = parseTools(body.tools, chatToolDefinition);
  const toolChoice = parseToolChoice(body.tool_choice, tools, (choice) =>
    isObject(choice.function) ? choice.function.name : undefined,
  );
  const parallelToolCalls = optionalBoolean(body, "parallel_tool_calls");
  const responseFormat = parseResponseFormat(
    body.response_format,
    "response_format",
    (format) => format.json_schema,
  );
  const logprobs = parseLogprobs(body);

  const completion: CompletionRequest = {
    ...parseModels(body),
    messages: parseMessages(body.messages),
    ...parseSampling(body, ["max_completion_tokens", "max_tokens"]),
    stream: parseStream(body),
    routing: parseProvider(body.provider),
  };
  // An empty `tools` is the same as none (some clients always send the field), and without tools
  // "auto" and "none" choose nothing: the request then needs no worker that speaks tools.
  if (tools && tools.length > 0) {
    completion.tools = tools;
    if (toolChoice) completion.toolChoice = toolChoice;
    if (parallelToolCalls !== undefined) completion.parallelToolCalls = parallelToolCalls;
  }
  if (responseFormat) completion.responseFormat = responseFormat;
  if (logprobs) completion.logprobs = logprobs;
  return { completion, includeUsage: isObject(streamOptions) && streamOptions.include_usage === true };
}

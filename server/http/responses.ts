/**
 * POST /v1/responses, OpenAI's Responses API, on the same matcher, relay and ledger as chat
 * completions: the input items become a conversation (function_call items → an assistant message's
 * tool calls, function_call_output items → tool messages), and the answer is a Response object or
 * the standard event sequence (response.created … response.completed, each with a
 * sequence_number).
 *
 * The market keeps no responses: `previous_response_id`, `conversation`, `background` and an
 * explicit `store: true` are refused with a 400 naming the field. `store` left out is accepted
 * (the openai SDK sends nothing unless told), so a plain `client.responses.create({model, input})`
 * works; the Response says `store: false`. The Response's id is the order's id, as in
 * `x-request-id` and the admin API.
 */
import { randomBytes } from "node:crypto";
import type { FastifyInstance, FastifyReply } from "fastify";
import type { TokenLogprob } from "../../common/generation.js";
import type { MarketError } from "../market/errors.js";
import type { ChatMessage, CompletionRequest, CompletionRun } from "../market/marketplace.js";
import type { ToolCall } from "../market/registry.js";
import type { OrderRecord } from "../market/store-port.js";
import {
  imageUrl,
  invalid,
  isObject,
  type Json,
  optionalInteger,
  parseFunctionDefinition,
  parseModels,
  parseProvider,
  parseResponseFormat,
  parseSampling,
  parseStream,
  parseToolChoice,
  parseTools,
} from "./chat-request.js";
import { sendOpenAiError } from "./openai-error.js";
import {
  answersLogprobs,
  collectRun,
  costOf,
  openAiLogprob,
  type RunEndpointOptions,
  startRun,
  streamRun,
  ToolCallAssembler,
  unixSeconds,
} from "./run-reply.js";

export interface ParsedResponsesRequest {
  completion: CompletionRequest;
  /** The request's settings as a Response object echoes them. */
  echo: {
    instructions: string | null;
    tools: object[];
    tool_choice: unknown;
    parallel_tool_calls: boolean;
    temperature: number | null;
    top_p: number | null;
    max_output_tokens: number | null;
    text: { format: unknown };
    top_logprobs: number | null;
  };
}

const MAX_TOP_LOGPROBS = 20;
const LOGPROBS_INCLUDE = "message.output_text.logprobs";
/** State the market does not keep, each refused with why. */
const STATEFUL_FIELDS = ["previous_response_id", "conversation"] as const;

type InputPart = { text: string; imageUrl?: string };

function inputParts(content: unknown, param: string): { text: string; imageUrls: string[] } {
  if (typeof content === "string") return { text: content, imageUrls: [] };
  if (!Array.isArray(content))
    throw invalid(param, `'${param}' must be a string or an array of content parts.`);
  const parts = content.map((part, index): InputPart => {
    const partParam = `${param}[${index}]`;
    if (!isObject(part)) throw invalid(partParam, `'${partParam}' must be an object.`);
    if ((part.type === "input_text" || part.type === "output_text") && typeof part.text === "string") {
      return { text: part.text };
    }
    if (part.type === "refusal" && typeof part.refusal === "string") return { text: part.refusal };
    if (part.type === "input_image")
      return { text: "", imageUrl: imageUrl(part.image_url, `${partParam}.image_url`) };
    throw invalid(
      partParam,
      `Content parts of type '${String(part.type)}' are not supported; use input_text or input_image.`,
    );
  });
  return {
    text: parts.map((part) => part.text).join(""),
    imageUrls: parts.flatMap((part) => (part.imageUrl ? [part.imageUrl] : [])),
  };
}

function requiredString(item: Json, field: string, param: string): string {
  const value = item[field];
  if (typeof value !== "string" || value === "") {
    throw invalid(`${param}.${field}`, `'${param}.${field}' must be a non-empty string.`);
  }
  return value;
}

/** Input items → chat messages; consecutive function calls join the assistant turn before them. */
function parseInput(input: unknown, instructions: string | null): ChatMessage[] {
  const messages: ChatMessage[] = instructions === null ? [] : [{ role: "system", content: instructions }];
  if (typeof input === "string") return [...messages, { role: "user", content: input }];
  if (!Array.isArray(input) || input.length === 0) {
    throw invalid("input", "'input' must be a string or a non-empty array of items.");
  }
  input.forEach((item, index) => {
    const param = `input[${index}]`;
    if (!isObject(item)) throw invalid(param, `'${param}' must be an object.`);
    const type = item.type ?? "message";
    if (type === "message") {
      if (
        item.role !== "user" &&
        item.role !== "assistant" &&
        item.role !== "system" &&
        item.role !== "developer"
      ) {
        throw invalid(`${param}.role`, `'${param}.role' must be user, assistant, system or developer.`);
      }
      const { text, imageUrls } = inputParts(item.content, `${param}.content`);
      const message: ChatMessage = { role: item.role, content: text };
      if (imageUrls.length > 0) message.imageUrls = imageUrls;
      messages.push(message);
    } else if (type === "function_call") {
      if (typeof item.arguments !== "string") {
        throw invalid(`${param}.arguments`, `'${param}.arguments' must be a JSON string.`);
      }
      const call: ToolCall = {
        id: requiredString(item, "call_id", param),
        name: requiredString(item, "name", param),
        arguments: item.arguments,
      };
      const previous = messages.at(-1);
      if (previous?.role === "assistant") previous.toolCalls = [...(previous.toolCalls ?? []), call];
      else messages.push({ role: "assistant", content: "", toolCalls: [call] });
    } else if (type === "function_call_output") {
      const callId = requiredString(item, "call_id", param);
      const output = inputParts(item.output, `${param}.output`);
      messages.push({ role: "tool", content: output.text, toolCallId: callId });
    } else {
      throw invalid(`${param}.type`, `Input items of type '${String(type)}' are not supported.`);
    }
  });
  return messages;
}

/** `top_logprobs` or `include: ["message.output_text.logprobs"]` asks for logprobs. */
function parseLogprobs(body: Json): CompletionRequest["logprobs"] {
  const top = optionalInteger(body, "top_logprobs", 0, MAX_TOP_LOGPROBS);
  const included = Array.isArray(body.include) && body.include.includes(LOGPROBS_INCLUDE);
  return top !== undefined || included ? { top: top ?? 0 } : undefined;
}

export function parseResponsesRequest(body: unknown): ParsedResponsesRequest {
  if (!isObject(body)) throw invalid("body", "The request body must be a JSON object.");
  for (const field of STATEFUL_FIELDS) {
    if (body[field] !== undefined && body[field] !== null) {
      throw invalid(
        field,
        `'${field}' is not supported: LocalLMarket keeps no responses; send the whole input.`,
      );
    }
  }
  if (body.store === true) {
    throw invalid(
      "store",
      "'store': true is not supported: LocalLMarket keeps no responses; leave it out or send false.",
    );
  }
  if (body.background === true) throw invalid("background", "'background': true is not supported.");
  if (
    body.instructions !== undefined &&
    body.instructions !== null &&
    typeof body.instructions !== "string"
  ) {
    throw invalid("instructions", "'instructions' must be a string.");
  }
  const instructions = typeof body.instructions === "string" ? body.instructions : null;
  const tools = parseTools(body.tools, (tool, param) =>
    // The Responses API's functions are strict unless told otherwise.
    parseFunctionDefinition({ ...tool, strict: tool.strict ?? true }, param),
  );
  const toolChoice = parseToolChoice(body.tool_choice, tools, (choice) => choice.name);
  const text = body.text;
  if (text !== undefined && text !== null && !isObject(text))
    throw invalid("text", "'text' must be an object.");
  const responseFormat = parseResponseFormat(
    isObject(text) ? text.format : undefined,
    "text.format",
    (format) => format,
  );
  if (
    body.parallel_tool_calls !== undefined &&
    body.parallel_tool_calls !== null &&
    typeof body.parallel_tool_calls !== "boolean"
  ) {
    throw invalid("parallel_tool_calls", "'parallel_tool_calls' must be a boolean.");
  }
  const logprobs = parseLogprobs(body);
  const sampling = parseSampling(body, ["max_output_tokens"]);

  const completion: CompletionRequest = {
    ...parseModels(body),
    messages: parseInput(body.input, instructions),
    ...sampling,
    stream: parseStream(body),
    routing: parseProvider(body.provider),
  };
  if (tools && tools.length > 0) {
    completion.tools = tools;
    if (toolChoice) completion.toolChoice = toolChoice;
    if (typeof body.parallel_tool_calls === "boolean")
      completion.parallelToolCalls = body.parallel_tool_calls;
  }
  if (responseFormat) completion.responseFormat = responseFormat;
  if (logprobs) completion.logprobs = logprobs;
  return {
    completion,
    echo: {
      instructions,
      tools: (tools ?? []).map((tool) => ({
        type: "function",
        name: tool.name,
        description: tool.description || null,
        parameters: tool.parametersJson === "" ? null : JSON.parse(tool.parametersJson),
        strict: tool.strict,
      })),
      tool_choice: body.tool_choice ?? "auto",
      parallel_tool_calls: body.parallel_tool_calls !== false,
      temperature: sampling.sampling.temperature ?? null,
      top_p: sampling.sampling.topP ?? null,
      max_output_tokens: sampling.maxTokens ?? null,
      text: { format: isObject(text) && isObject(text.format) ? text.format : { type: "text" } },
      top_logprobs: logprobs?.top ?? null,
    },
  };
}

export function registerResponses(app: FastifyInstance, options: RunEndpointOptions): void {
  app.post("/v1/responses", async (request, reply) => {
    const { run, parsed } = await startRun(options, request, reply, parseResponsesRequest);
    if (parsed.completion.stream) {
      await streamResponse(run, reply, options, parsed);
      return;
    }
    const { text, toolCalls, logprobs, end } = await collectRun(run);
    if (end.type === "error") return sendOpenAiError(reply, end.error);
    const status =
      end.finishReason === "length" || end.finishReason === "content_filter" ? "incomplete" : "completed";
    const output: object[] = [];
    if (text !== "" || toolCalls.length === 0) {
      output.push(
        messageItem(itemId("msg_"), text, answersLogprobs(run, parsed.completion) ? logprobs : null, status),
      );
    }
    for (const call of toolCalls) output.push(functionCallItem(itemId("fc_"), call, "completed"));
    return responseObject(run, parsed, { status, output, order: end.order, finishReason: end.finishReason });
  });
}

function itemId(prefix: string): string {
  return `${prefix}${randomBytes(12).toString("base64url")}`;
}

type ItemStatus = "in_progress" | "completed" | "incomplete";

function outputText(text: string, logprobs: TokenLogprob[] | null) {
  return {
    type: "output_text",
    text,
    annotations: [],
    ...(logprobs ? { logprobs: logprobs.map(openAiLogprob) } : {}),
  };
}

function messageItem(id: string, text: string, logprobs: TokenLogprob[] | null, status: ItemStatus) {
  return { id, type: "message", status, role: "assistant", content: [outputText(text, logprobs)] };
}

function functionCallItem(id: string, call: ToolCall, status: ItemStatus) {
  return { id, type: "function_call", status, call_id: call.id, name: call.name, arguments: call.arguments };
}

/** The Responses API's usage object, plus what the order cost the consumer. */
function responseUsage(order: OrderRecord) {
  return {
    input_tokens: order.promptTokens,
    input_tokens_details: { cached_tokens: 0 },
    output_tokens: order.completionTokens,
    output_tokens_details: { reasoning_tokens: 0 },
    total_tokens: order.promptTokens + order.completionTokens,
    ...costOf(order),
  };
}

function responseObject(
  run: CompletionRun,
  parsed: ParsedResponsesRequest,
  state: {
    status: "in_progress" | "completed" | "incomplete" | "failed";
    output: object[];
    order: OrderRecord | null;
    finishReason?: string;
    error?: MarketError;
  },
) {
  const incomplete =
    state.status !== "incomplete"
      ? null
      : { reason: state.finishReason === "content_filter" ? "content_filter" : "max_output_tokens" };
  return {
    id: run.orderId,
    object: "response",
    created_at: unixSeconds(run.createdAt),
    status: state.status,
    background: false,
    error: state.error ? { code: state.error.code, message: state.error.message } : null,
    incomplete_details: incomplete,
    model: run.model,
    output: state.output,
    previous_response_id: null,
    store: false,
    metadata: null,
    reasoning: { effort: null, summary: null },
    truncation: "disabled",
    user: null,
    ...parsed.echo,
    usage: state.order ? responseUsage(state.order) : null,
    ...(state.order ? { provider: state.order.workerId } : {}),
  };
}

/**
 * The event sequence: text opens a message item (closed when a tool call begins), each tool call
 * opens a function_call item (closed, in order, at the end, since its fragments may still come).
 */
function streamResponse(
  run: CompletionRun,
  reply: FastifyReply,
  options: RunEndpointOptions,
  parsed: ParsedResponsesRequest,
): Promise<void> {
  const withLogprobs = answersLogprobs(run, parsed.completion);
  return streamRun(run, reply, options, async (sse, events) => {
    let sequence = 0;
    const send = (type: string, fields: object) =>
      sse.data({ type, sequence_number: sequence++, ...fields }, type);
    const output: object[] = [];
    const toolCalls = new ToolCallAssembler();
    /** The message item being written, if any. */
    let message: { id: string; outputIndex: number; text: string; logprobs: TokenLogprob[] } | null = null;
    /** Open function_call items by tool-call index. */
    const calls = new Map<number, { id: string; outputIndex: number; call: ToolCall }>();

    const closeMessage = async (status: ItemStatus) => {
      if (!message) return;
      const { id, outputIndex, text } = message;
      const logprobs = withLogprobs ? message.logprobs : null;
      const at = { item_id: id, output_index: outputIndex, content_index: 0 };
      await send("response.output_text.done", {
        ...at,
        text,
        logprobs: (logprobs ?? []).map(openAiLogprob),
      });
      await send("response.content_part.done", { ...at, part: outputText(text, logprobs) });
      const item = messageItem(id, text, logprobs, status);
      output[outputIndex] = item;
      await send("response.output_item.done", { output_index: outputIndex, item });
      message = null;
    };
    const closeCalls = async () => {
      for (const { id, outputIndex, call } of [...calls.values()].sort(
        (a, b) => a.outputIndex - b.outputIndex,
      )) {
        await send("response.function_call_arguments.done", {
          item_id: id,
          output_index: outputIndex,
          name: call.name,
          arguments: call.arguments,
        });
        const item = functionCallItem(id, call, "completed");
        output[outputIndex] = item;
        await send("response.output_item.done", { output_index: outputIndex, item });
      }
      calls.clear();
    };
    const writeText = async (text: string, logprobs: TokenLogprob[]) => {
      if (!message) {
        message = { id: itemId("msg_"), outputIndex: output.length, text: "", logprobs: [] };
        output.push(messageItem(message.id, "", null, "in_progress"));
        await send("response.output_item.added", {
          output_index: message.outputIndex,
          item: { ...messageItem(message.id, "", null, "in_progress"), content: [] },
        });
        await send("response.content_part.added", {
          item_id: message.id,
          output_index: message.outputIndex,
          content_index: 0,
          part: outputText("", withLogprobs ? [] : null),
        });
      }
      message.text += text;
      message.logprobs.push(...logprobs);
      if (!withLogprobs) {
        // The hot path: the event's JSON from precomputed pieces, byte for byte what send() gives.
        const type = "response.output_text.delta";
        await sse.dataJson(
          `{"type":"${type}","sequence_number":${sequence++},"item_id":${JSON.stringify(message.id)},"output_index":${message.outputIndex},"content_index":0,"delta":${JSON.stringify(text)},"logprobs":[]}`,
          type,
        );
        return;
      }
      await send("response.output_text.delta", {
        item_id: message.id,
        output_index: message.outputIndex,
        content_index: 0,
        delta: text,
        logprobs: withLogprobs ? logprobs.map(openAiLogprob) : [],
      });
    };

    const inProgress = responseObject(run, parsed, { status: "in_progress", output: [], order: null });
    await send("response.created", { response: inProgress });
    await send("response.in_progress", { response: inProgress });
    for await (const event of events) {
      if (event.type === "delta") {
        if (event.text !== "") await writeText(event.text, event.logprobs);
        for (const delta of event.toolCalls) {
          const fragment = toolCalls.add(delta);
          if (fragment.first) {
            await closeMessage("completed");
            const open = {
              id: itemId("fc_"),
              outputIndex: output.length,
              call: { id: fragment.id, name: fragment.name, arguments: "" },
            };
            calls.set(fragment.index, open);
            output.push(functionCallItem(open.id, open.call, "in_progress"));
            await send("response.output_item.added", {
              output_index: open.outputIndex,
              item: functionCallItem(open.id, open.call, "in_progress"),
            });
          }
          const open = calls.get(fragment.index);
          if (!open || fragment.arguments === "") continue;
          open.call.arguments += fragment.arguments;
          await send("response.function_call_arguments.delta", {
            item_id: open.id,
            output_index: open.outputIndex,
            delta: fragment.arguments,
          });
        }
        continue;
      }
      if (event.type === "error" && event.error.code === "cancelled") return;
      if (event.type === "error") {
        const response = responseObject(run, parsed, {
          status: "failed",
          output,
          order: event.order,
          error: event.error,
        });
        await send("response.failed", { response });
        return;
      }
      const status =
        event.finishReason === "length" || event.finishReason === "content_filter"
          ? "incomplete"
          : "completed";
      await closeMessage(status);
      await closeCalls();
      const final = responseObject(run, parsed, {
        status,
        output,
        order: event.order,
        finishReason: event.finishReason,
      });
      await send(status === "completed" ? "response.completed" : "response.incomplete", { response: final });
      return;
    }
  });
}

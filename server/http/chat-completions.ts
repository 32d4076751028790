/**
 * POST /v1/chat/completions: authenticate, admit and dispatch through the marketplace, then
 * answer in OpenAI's exact format, streamed (SSE `chat.completion.chunk`s and `[DONE]`) or not,
 * with tool calls and, when asked for, logprobs.
 */
import type { FastifyInstance, FastifyReply } from "fastify";
import type { TokenLogprob } from "../../common/generation.js";
import type { CompletionRun } from "../market/marketplace.js";
import { parseChatRequest } from "./chat-request.js";
import { openAiErrorBody, sendOpenAiError } from "./openai-error.js";
import {
  answersLogprobs,
  collectRun,
  openAiLogprob,
  type RunEndpointOptions,
  startRun,
  streamRun,
  ToolCallAssembler,
  unixSeconds,
  usageOf,
} from "./run-reply.js";

export function registerChatCompletions(app: FastifyInstance, options: RunEndpointOptions): void {
  app.post("/v1/chat/completions", async (request, reply) => {
    const { run, parsed } = await startRun(options, request, reply, parseChatRequest);
    const withLogprobs = answersLogprobs(run, parsed.completion);
    if (parsed.completion.stream) {
      await streamCompletion(run, reply, options, { includeUsage: parsed.includeUsage, withLogprobs });
      return;
    }
    const { text, toolCalls, logprobs, end } = await collectRun(run);
    if (end.type === "error") return sendOpenAiError(reply, end.error);
    return {
      id: run.orderId,
      object: "chat.completion",
      created: unixSeconds(run.createdAt),
      model: run.model,
      choices: [
        {
          index: 0,
          message: {
            role: "assistant",
            // OpenAI's null: a turn that only calls tools has no content.
            content: text === "" && toolCalls.length > 0 ? null : text,
            refusal: null,
            ...(toolCalls.length > 0
              ? {
                  tool_calls: toolCalls.map((call) => ({
                    id: call.id,
                    type: "function",
                    function: { name: call.name, arguments: call.arguments },
                  })),
                }
              : {}),
          },
          logprobs: withLogprobs ? chatLogprobs(logprobs) : null,
          finish_reason: end.finishReason,
        },
      ],
      ...(end.order ? { usage: usageOf(end.order), provider: end.order.workerId } : {}),
    };
  });
}

function chatLogprobs(entries: TokenLogprob[]) {
  return { content: entries.map(openAiLogprob), refusal: null };
}

function streamCompletion(
  run: CompletionRun,
  reply: FastifyReply,
  options: RunEndpointOptions,
  flags: { includeUsage: boolean; withLogprobs: boolean },
): Promise<void> {
  const chunk = (choices: object[], extra: object = {}) => ({
    id: run.orderId,
    object: "chat.completion.chunk",
    created: unixSeconds(run.createdAt),
    model: run.model,
    choices,
    ...(flags.includeUsage ? { usage: null } : {}),
    ...extra,
  });
  // A plain text delta is most of a stream: its JSON is built from two precomputed pieces around
  // the text, byte for byte what JSON.stringify(chunk(...)) gives.
  const textPrefix = `{"id":${JSON.stringify(run.orderId)},"object":"chat.completion.chunk","created":${unixSeconds(run.createdAt)},"model":${JSON.stringify(run.model)},"choices":[{"index":0,"delta":{"content":`;
  const textSuffix = `},"logprobs":null,"finish_reason":null}]${flags.includeUsage ? ',"usage":null' : ""}}`;
  return streamRun(run, reply, options, async (sse, events) => {
    await sse.data(
      chunk([{ index: 0, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]),
    );
    const toolCalls = new ToolCallAssembler();
    for await (const event of events) {
      if (event.type === "delta" && event.toolCalls.length === 0 && !flags.withLogprobs) {
        await sse.dataJson(`${textPrefix}${JSON.stringify(event.text)}${textSuffix}`);
        continue;
      }
      if (event.type === "delta") {
        const delta: { content?: string; tool_calls?: object[] } = {};
        if (event.text !== "" || event.toolCalls.length === 0) delta.content = event.text;
        if (event.toolCalls.length > 0) {
          // As OpenAI streams them: id, type and name on a call's first fragment only.
          delta.tool_calls = event.toolCalls.map((fragment) => {
            const call = toolCalls.add(fragment);
            return call.first
              ? {
                  index: call.index,
                  id: call.id,
                  type: "function",
                  function: { name: call.name, arguments: call.arguments },
                }
              : { index: call.index, function: { arguments: call.arguments } };
          });
        }
        const logprobs = flags.withLogprobs ? chatLogprobs(event.logprobs) : null;
        await sse.data(chunk([{ index: 0, delta, logprobs, finish_reason: null }]));
        continue;
      }
      if (event.type === "finish") {
        await sse.data(chunk([{ index: 0, delta: {}, logprobs: null, finish_reason: event.finishReason }]));
      } else {
        if (event.error.code === "cancelled") break;
        await sse.data(
          chunk(
            [{ index: 0, delta: { content: "" }, logprobs: null, finish_reason: "error" }],
            openAiErrorBody(event.error),
          ),
        );
      }
      // What the stream cost, even when it ended in an error.
      if (flags.includeUsage && event.order) await sse.data(chunk([], { usage: usageOf(event.order) }));
      break;
    }
    await sse.data("[DONE]");
  });
}

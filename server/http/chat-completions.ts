/**
 * POST /v1/chat/completions: authenticate, admit and dispatch through the marketplace, then
 * answer in OpenAI's exact format, streamed (SSE `chat.completion.chunk`s and `[DONE]`) or not.
 */
import type { FastifyInstance, FastifyReply } from "fastify";
import { MarketError } from "../market/errors.js";
import type { CompletionRun, Marketplace, RunEvent } from "../market/marketplace.js";
import { formatCredits } from "../market/money.js";
import type { MarketStore, OrderRecord } from "../market/store-port.js";
import { authenticateConsumer } from "./auth.js";
import { parseChatRequest } from "./chat-request.js";
import { httpStatusOf, openAiErrorBody, sendOpenAiError } from "./openai-error.js";
import { SseWriter } from "./sse.js";

export interface ChatCompletionsOptions {
  store: MarketStore;
  marketplace: Marketplace;
  /** Commit the SSE headers if no token arrived within this time, then send keep-alive comments. */
  keepAliveMs: number;
}

/** OpenAI's usage object, plus what the order cost the consumer. */
function usageOf(order: OrderRecord) {
  return {
    prompt_tokens: order.promptTokens,
    completion_tokens: order.completionTokens,
    total_tokens: order.promptTokens + order.completionTokens,
    cost: Number(formatCredits(order.cost)),
    cost_micro_credits: order.cost.toString(),
  };
}

export function registerChatCompletions(app: FastifyInstance, options: ChatCompletionsOptions): void {
  app.post("/v1/chat/completions", async (request, reply) => {
    const consumer = await authenticateConsumer(options.store, request);
    const { completion, includeUsage } = parseChatRequest(request.body);
    const run = await options.marketplace.startCompletion(consumer, completion);
    reply.header("x-request-id", run.orderId);
    const consumerGone = () => {
      if (!reply.raw.writableFinished) run.cancel("consumer disconnected");
    };
    reply.raw.on("close", consumerGone);
    if (completion.stream) {
      reply.hijack();
      await streamCompletion(run, new SseWriter(reply.raw, { "x-request-id": run.orderId }), {
        includeUsage,
        keepAliveMs: options.keepAliveMs,
      });
      return;
    }
    return collectCompletion(run, reply);
  });
}

async function collectCompletion(run: CompletionRun, reply: FastifyReply) {
  let content = "";
  for await (const event of run.events) {
    if (event.type === "delta") content += event.text;
    else if (event.type === "error") return sendOpenAiError(reply, event.error);
    else {
      return {
        id: run.orderId,
        object: "chat.completion",
        created: Math.floor(run.createdAt.getTime() / 1000),
        model: run.model,
        choices: [
          {
            index: 0,
            message: { role: "assistant", content, refusal: null },
            logprobs: null,
            finish_reason: event.finishReason,
          },
        ],
        usage: usageOf(event.order),
        provider: event.order.workerId,
      };
    }
  }
  return sendOpenAiError(reply, new MarketError("internal", "The order ended without a result."));
}

async function streamCompletion(
  run: CompletionRun,
  sse: SseWriter,
  options: { includeUsage: boolean; keepAliveMs: number },
): Promise<void> {
  const chunk = (choices: object[], extra: object = {}) => ({
    id: run.orderId,
    object: "chat.completion.chunk",
    created: Math.floor(run.createdAt.getTime() / 1000),
    model: run.model,
    choices,
    ...(options.includeUsage ? { usage: null } : {}),
    ...extra,
  });
  const events = run.events[Symbol.asyncIterator]();

  // Until the first event, keep the HTTP status open: an early error can still be a real 502.
  let first = events.next();
  let keepAlive: NodeJS.Timeout | undefined;
  const waited = await Promise.race([
    first,
    new Promise<"keep-alive">((resolve) => {
      keepAlive = setTimeout(() => resolve("keep-alive"), options.keepAliveMs);
    }),
  ]);
  clearTimeout(keepAlive);
  if (waited === "keep-alive") {
    const ticker = setInterval(() => void sse.comment("keep-alive"), options.keepAliveMs);
    await sse.comment("keep-alive");
    first = first.finally(() => clearInterval(ticker));
  }
  const head = await first;
  if (head.done) {
    sse.end();
    return;
  }
  if (head.value.type === "error" && !sse.isCommitted) {
    sse.rejectWith(httpStatusOf(head.value.error), openAiErrorBody(head.value.error));
    return;
  }

  await sse.data(
    chunk([{ index: 0, delta: { role: "assistant", content: "" }, logprobs: null, finish_reason: null }]),
  );
  let event: RunEvent = head.value;
  for (;;) {
    if (event.type === "delta") {
      await sse.data(
        chunk([{ index: 0, delta: { content: event.text }, logprobs: null, finish_reason: null }]),
      );
    } else if (event.type === "finish") {
      await sse.data(chunk([{ index: 0, delta: {}, logprobs: null, finish_reason: event.finishReason }]));
      if (options.includeUsage) await sse.data(chunk([], { usage: usageOf(event.order) }));
      break;
    } else {
      await sse.data(
        chunk(
          [{ index: 0, delta: { content: "" }, logprobs: null, finish_reason: "error" }],
          openAiErrorBody(event.error),
        ),
      );
      break;
    }
    const next = await events.next();
    if (next.done) break;
    event = next.value;
  }
  await sse.data("[DONE]");
  sse.end();
}

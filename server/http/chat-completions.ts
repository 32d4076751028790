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
import { SlowReaderError, SseWriter } from "./sse.js";

export interface ChatCompletionsOptions {
  store: MarketStore;
  marketplace: Marketplace;
  /** Commit the SSE headers if no token arrived within this time, then send keep-alive comments. */
  keepAliveMs: number;
  /** A streaming consumer whose socket takes nothing for this long is ended. */
  slowReaderTimeoutMs: number;
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
    // The consumer may leave at any moment, admission (and the queue) included: the marketplace
    // then cancels whatever it started. 'close' on the response, not the request (which closes as
    // soon as its body is read).
    const consumerGone = new AbortController();
    const onClose = () => {
      if (!reply.raw.writableFinished) consumerGone.abort();
    };
    reply.raw.on("close", onClose);
    if (reply.raw.destroyed) consumerGone.abort();
    const run = await options.marketplace.startCompletion(consumer, completion, consumerGone.signal);
    reply.header("x-request-id", run.orderId);
    if (completion.stream) {
      reply.hijack();
      const sse = new SseWriter(reply.raw, {
        headers: { "x-request-id": run.orderId },
        slowReaderTimeoutMs: options.slowReaderTimeoutMs,
      });
      try {
        await streamCompletion(run, sse, { includeUsage, keepAliveMs: options.keepAliveMs });
      } catch (error) {
        if (!(error instanceof SlowReaderError)) throw error;
        // The socket is full and nothing drains it: no error chunk could get through either.
        run.cancel(error.message);
        reply.raw.destroy();
      }
      return;
    }
    return collectCompletion(run, reply);
  });
}

async function collectCompletion(run: CompletionRun, reply: FastifyReply) {
  let content = "";
  for await (const event of run) {
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
        ...(event.order ? { usage: usageOf(event.order), provider: event.order.workerId } : {}),
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
  const events = run[Symbol.asyncIterator]();

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
    // A comment that cannot be written (a stalled socket) is the writes' business below, not the ticker's.
    const ticker = setInterval(() => sse.comment("keep-alive").catch(() => {}), options.keepAliveMs);
    await sse.comment("keep-alive");
    first = first.finally(() => clearInterval(ticker));
  }
  const head = await first;
  if (head.done) {
    sse.end();
    return;
  }
  if (head.value.type === "error" && !sse.isCommitted) {
    sse.rejectWith(httpStatusOf(head.value.error), openAiErrorBody(head.value.error), head.value.error);
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
      if (options.includeUsage && event.order) await sse.data(chunk([], { usage: usageOf(event.order) }));
      break;
    } else {
      if (event.error.code === "cancelled") break;
      await sse.data(
        chunk(
          [{ index: 0, delta: { content: "" }, logprobs: null, finish_reason: "error" }],
          openAiErrorBody(event.error),
        ),
      );
      // What the stream cost, even when it ended in an error.
      if (options.includeUsage && event.order) await sse.data(chunk([], { usage: usageOf(event.order) }));
      break;
    }
    const next = await events.next();
    if (next.done) break;
    event = next.value;
  }
  await sse.data("[DONE]");
  sse.end();
}

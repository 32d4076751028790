/**
 * What the three OpenAI endpoints (chat completions, legacy completions, Responses) share when they
 * serve a market run: authentication and a run that is cancelled the moment the consumer leaves,
 * the wait for the first event behind keep-alive comments (so an early failure is still a real
 * HTTP status), collecting a whole run for a non-streamed answer, tool calls assembled from their
 * fragments, OpenAI's logprob entries, and the usage object with what the order cost.
 */
import { randomBytes } from "node:crypto";
import type { FastifyReply, FastifyRequest } from "fastify";
import { formatCredits } from "../../common/credits.js";
import type { TokenLogprob, ToolCallDelta } from "../../common/generation.js";
import { MarketError } from "../market/errors.js";
import type { CompletionRequest, CompletionRun, Marketplace, RunEvent } from "../market/marketplace.js";
import type { ToolCall } from "../market/registry.js";
import type { OrderRecord } from "../market/store-port.js";
import type { ApiKeyCache } from "./api-key-cache.js";
import { authenticateConsumer } from "./auth.js";
import { httpStatusOf, openAiErrorBody } from "./openai-error.js";
import { SlowReaderError, SseWriter } from "./sse.js";

export interface RunEndpointOptions {
  apiKeys: ApiKeyCache;
  marketplace: Marketplace;
  /** Commit the SSE headers if no token arrived within this time, then send keep-alive comments. */
  keepAliveMs: number;
  /** A streaming consumer whose socket takes nothing for this long is ended. */
  slowReaderTimeoutMs: number;
}

type FinishEvent = Extract<RunEvent, { type: "finish" }>;
type ErrorEvent = Extract<RunEvent, { type: "error" }>;

/**
 * Authenticates the consumer, parses the body and starts the run. The consumer may leave at any
 * moment, admission (and the queue) included: the marketplace then cancels whatever it started.
 * 'close' on the response, not the request (which closes as soon as its body is read).
 */
export async function startRun<Parsed extends { completion: CompletionRequest }>(
  options: RunEndpointOptions,
  request: FastifyRequest,
  reply: FastifyReply,
  parse: (body: unknown) => Parsed,
): Promise<{ run: CompletionRun; parsed: Parsed }> {
  const consumer = await authenticateConsumer(options.apiKeys, request);
  const parsed = parse(request.body);
  const consumerGone = new AbortController();
  reply.raw.on("close", () => {
    if (!reply.raw.writableFinished) consumerGone.abort();
  });
  if (reply.raw.destroyed) consumerGone.abort();
  const run = await options.marketplace.startCompletion(consumer, parsed.completion, consumerGone.signal);
  reply.headers(runHeaders(run));
  return { run, parsed };
}

/**
 * Headers naming the order, and the request parameters dropped because no worker supports them
 * (`provider.require_parameters: false`), comma-separated as the request named them.
 */
function runHeaders(run: CompletionRun): Record<string, string> {
  const dropped = run.droppedParameters ?? [];
  return {
    "x-request-id": run.orderId,
    ...(dropped.length > 0 ? { "x-dropped-parameters": dropped.join(", ") } : {}),
  };
}

/**
 * Serves the run as server-sent events written by `write`, which gets every event from the first
 * on. An error before anything was written is answered as a plain JSON error with its status.
 */
export async function streamRun(
  run: CompletionRun,
  reply: FastifyReply,
  options: RunEndpointOptions,
  write: (sse: SseWriter, events: AsyncIterable<RunEvent>) => Promise<void>,
): Promise<void> {
  reply.hijack();
  // A run that takes confirmations is told what reached the socket, flush by flush (the writer
  // coalesces the events of a turn into one write); any other counts a delta as delivered when the
  // next event is asked for.
  const confirming = confirmsWrites(run) ? run : null;
  const slowReader = (error: SlowReaderError) => {
    // The socket is full and nothing drains it: no error event could get through either.
    run.cancel(error.message);
    reply.raw.destroy();
  };
  const sse = new SseWriter(reply.raw, {
    headers: runHeaders(run),
    slowReaderTimeoutMs: options.slowReaderTimeoutMs,
    ...(confirming ? { onWritten: (mark: number) => confirming.confirmWritten(mark) } : {}),
    onSlowReader: slowReader,
  });
  confirming?.confirmWrites();
  try {
    const events = run[Symbol.asyncIterator]();
    const head = await firstEvent(events, sse, options.keepAliveMs);
    if (head.done) {
      sse.end();
      return;
    }
    if (head.value.type === "error" && !sse.isCommitted) {
      sse.rejectWith(httpStatusOf(head.value.error), openAiErrorBody(head.value.error), head.value.error);
      return;
    }
    let first: RunEvent | null = head.value;
    // The endpoint asks for the next event once it has written everything for the previous one:
    // that is the mark the writer confirms when its text reaches the socket.
    const iterator: AsyncIterator<RunEvent> = {
      next: () => {
        if (first !== null) {
          const value = first;
          first = null;
          return Promise.resolve({ value, done: false });
        }
        if (confirming) sse.processed(confirming.handedOut);
        return events.next();
      },
    };
    await write(sse, { [Symbol.asyncIterator]: () => iterator });
    if (confirming) sse.processed(confirming.handedOut);
    sse.end();
  } catch (error) {
    if (!(error instanceof SlowReaderError)) throw error;
    slowReader(error);
  }
}

/** A run whose consumer confirms its writes (the market's OrderRun). */
interface WriteConfirmingRun extends CompletionRun {
  confirmWrites(): void;
  readonly handedOut: number;
  confirmWritten(mark: number): void;
}

function confirmsWrites(run: CompletionRun): run is WriteConfirmingRun {
  const candidate = run as Partial<WriteConfirmingRun>;
  return typeof candidate.confirmWrites === "function" && typeof candidate.confirmWritten === "function";
}

/** Until the first event, keep the HTTP status open; past `keepAliveMs`, commit and send comments. */
async function firstEvent(
  events: AsyncIterator<RunEvent>,
  sse: SseWriter,
  keepAliveMs: number,
): Promise<IteratorResult<RunEvent>> {
  let first = events.next();
  let keepAlive: NodeJS.Timeout | undefined;
  const waited = await Promise.race([
    first,
    new Promise<"keep-alive">((resolve) => {
      keepAlive = setTimeout(() => resolve("keep-alive"), keepAliveMs);
    }),
  ]);
  clearTimeout(keepAlive);
  if (waited === "keep-alive") {
    // A comment that cannot be written (a stalled socket) is the writes' business, not the ticker's.
    const ticker = setInterval(() => sse.comment("keep-alive").catch(() => {}), keepAliveMs);
    await sse.comment("keep-alive");
    first = first.finally(() => clearInterval(ticker));
  }
  return first;
}

export interface CollectedRun {
  text: string;
  toolCalls: ToolCall[];
  logprobs: TokenLogprob[];
  end: FinishEvent | ErrorEvent;
}

/** Whether the answer carries logprobs: asked for, and not dropped for want of a worker that has them. */
export function answersLogprobs(run: CompletionRun, completion: CompletionRequest): boolean {
  return completion.logprobs !== undefined && !(run.droppedParameters ?? []).includes("logprobs");
}

/** A whole run, for a non-streamed answer. */
export async function collectRun(run: CompletionRun): Promise<CollectedRun> {
  let text = "";
  const toolCalls = new ToolCallAssembler();
  const logprobs: TokenLogprob[] = [];
  for await (const event of run) {
    if (event.type === "delta") {
      text += event.text;
      for (const delta of event.toolCalls) toolCalls.add(delta);
      logprobs.push(...event.logprobs);
    } else {
      return { text, toolCalls: toolCalls.calls, logprobs, end: event };
    }
  }
  const error = new MarketError("internal", "The order ended without a result.");
  return { text, toolCalls: toolCalls.calls, logprobs, end: { type: "error", error, order: null } };
}

/** A tool-call fragment as the consumer sees it: `first` when it opens its call. */
export interface ToolCallFragment {
  index: number;
  first: boolean;
  id: string;
  name: string;
  arguments: string;
}

/**
 * Assembles tool calls from their fragments. A call's id and name are taken from its first
 * fragment (an engine that gives no id gets one, since the consumer must quote it back).
 */
export class ToolCallAssembler {
  private readonly byIndex = new Map<number, ToolCall>();

  add(delta: ToolCallDelta): ToolCallFragment {
    const known = this.byIndex.get(delta.index);
    if (known) {
      known.arguments += delta.arguments;
      return { index: delta.index, first: false, id: known.id, name: known.name, arguments: delta.arguments };
    }
    const call: ToolCall = {
      id: delta.id || `call_${randomBytes(12).toString("base64url")}`,
      name: delta.name ?? "",
      arguments: delta.arguments,
    };
    this.byIndex.set(delta.index, call);
    return { index: delta.index, first: true, id: call.id, name: call.name, arguments: delta.arguments };
  }

  /** The calls so far, by index. */
  get calls(): ToolCall[] {
    return [...this.byIndex.entries()].sort(([a], [b]) => a - b).map(([, call]) => call);
  }
}

/** One entry of OpenAI's `logprobs.content` (chat) with the token's UTF-8 bytes. */
export function openAiLogprob(entry: TokenLogprob) {
  return {
    token: entry.token,
    logprob: entry.logprob,
    bytes: [...Buffer.from(entry.token, "utf8")],
    top_logprobs: entry.topLogprobs.map((top) => ({
      token: top.token,
      logprob: top.logprob,
      bytes: [...Buffer.from(top.token, "utf8")],
    })),
  };
}

/** What the order cost, beside the token counts of each API's usage object. */
export function costOf(order: OrderRecord) {
  return { cost: Number(formatCredits(order.cost)), cost_micro_credits: order.cost.toString() };
}

/** OpenAI's usage object (chat and legacy completions), plus what the order cost the consumer. */
export function usageOf(order: OrderRecord) {
  return {
    prompt_tokens: order.promptTokens,
    completion_tokens: order.completionTokens,
    total_tokens: order.promptTokens + order.completionTokens,
    ...costOf(order),
  };
}

export function unixSeconds(date: Date): number {
  return Math.floor(date.getTime() / 1000);
}

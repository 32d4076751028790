/**
 * POST /v1/completions, OpenAI's legacy text completions: the prompt is continued as it is, with no
 * chat template, on the same matcher, relay and ledger as chat completions. Streamed (SSE
 * `text_completion` objects and `[DONE]`) or not, with the legacy logprobs shape when asked for.
 */
import type { FastifyInstance, FastifyReply } from "fastify";
import type { TokenLogprob } from "../../common/generation.js";
import type { CompletionRequest, CompletionRun } from "../market/marketplace.js";
import {
  invalid,
  isObject,
  optionalInteger,
  parseModels,
  parseProvider,
  parseSampling,
  parseStream,
} from "./chat-request.js";
import { openAiErrorBody, sendOpenAiError } from "./openai-error.js";
import {
  answersLogprobs,
  collectRun,
  type RunEndpointOptions,
  startRun,
  streamRun,
  unixSeconds,
  usageOf,
} from "./run-reply.js";

export interface ParsedCompletionRequest {
  completion: CompletionRequest;
  includeUsage: boolean;
}

const MAX_LOGPROBS = 20;

function parsePrompt(value: unknown): string {
  if (typeof value === "string") return value;
  if (Array.isArray(value) && value.length === 1 && typeof value[0] === "string") return value[0];
  throw invalid("prompt", "'prompt' must be a string (or an array of exactly one string).");
}

/** Validates a legacy completions body; fields OpenAI defines that would change the answer's shape are refused. */
export function parseCompletionRequest(body: unknown): ParsedCompletionRequest {
  if (!isObject(body)) throw invalid("body", "The request body must be a JSON object.");
  for (const field of ["n", "best_of"]) {
    if (body[field] !== undefined && body[field] !== null && body[field] !== 1) {
      throw invalid(field, `Only ${field} = 1 is supported.`);
    }
  }
  if (body.echo === true) throw invalid("echo", "'echo' is not supported.");
  if (typeof body.suffix === "string" && body.suffix !== "")
    throw invalid("suffix", "'suffix' is not supported.");
  const streamOptions = body.stream_options;
  if (streamOptions !== undefined && streamOptions !== null && !isObject(streamOptions)) {
    throw invalid("stream_options", "'stream_options' must be an object.");
  }
  const top = optionalInteger(body, "logprobs", 0, MAX_LOGPROBS);
  const completion: CompletionRequest = {
    ...parseModels(body),
    messages: [],
    prompt: parsePrompt(body.prompt),
    ...parseSampling(body, ["max_tokens"]),
    stream: parseStream(body),
    routing: parseProvider(body.provider),
  };
  if (top !== undefined) completion.logprobs = { top };
  return { completion, includeUsage: isObject(streamOptions) && streamOptions.include_usage === true };
}

/**
 * The legacy logprobs object; `offset` is where the entries' text starts, counted as OpenAI does
 * from the start of the prompt.
 */
function legacyLogprobs(entries: TokenLogprob[], offset: number) {
  const textOffset: number[] = [];
  let at = offset;
  for (const entry of entries) {
    textOffset.push(at);
    at += entry.token.length;
  }
  return {
    tokens: entries.map((entry) => entry.token),
    token_logprobs: entries.map((entry) => entry.logprob),
    top_logprobs: entries.map((entry) =>
      Object.fromEntries(entry.topLogprobs.map((top): [string, number] => [top.token, top.logprob])),
    ),
    text_offset: textOffset,
  };
}

export function registerCompletions(app: FastifyInstance, options: RunEndpointOptions): void {
  app.post("/v1/completions", async (request, reply) => {
    const { run, parsed } = await startRun(options, request, reply, parseCompletionRequest);
    const withLogprobs = answersLogprobs(run, parsed.completion);
    if (parsed.completion.stream) {
      await streamCompletion(run, reply, options, {
        includeUsage: parsed.includeUsage,
        withLogprobs,
        promptLength: parsed.completion.prompt?.length ?? 0,
      });
      return;
    }
    const { text, logprobs, end } = await collectRun(run);
    if (end.type === "error") return sendOpenAiError(reply, end.error);
    return {
      id: run.orderId,
      object: "text_completion",
      created: unixSeconds(run.createdAt),
      model: run.model,
      choices: [
        {
          index: 0,
          text,
          logprobs: withLogprobs ? legacyLogprobs(logprobs, parsed.completion.prompt?.length ?? 0) : null,
          finish_reason: end.finishReason,
        },
      ],
      ...(end.order ? { usage: usageOf(end.order), provider: end.order.workerId } : {}),
    };
  });
}

function streamCompletion(
  run: CompletionRun,
  reply: FastifyReply,
  options: RunEndpointOptions,
  flags: { includeUsage: boolean; withLogprobs: boolean; promptLength: number },
): Promise<void> {
  const chunk = (choices: object[], extra: object = {}) => ({
    id: run.orderId,
    object: "text_completion",
    created: unixSeconds(run.createdAt),
    model: run.model,
    choices,
    ...(flags.includeUsage ? { usage: null } : {}),
    ...extra,
  });
  // A text delta without logprobs is most of a stream: its JSON is built from two precomputed
  // pieces around the text, byte for byte what JSON.stringify(chunk(...)) gives.
  const textPrefix = `{"id":${JSON.stringify(run.orderId)},"object":"text_completion","created":${unixSeconds(run.createdAt)},"model":${JSON.stringify(run.model)},"choices":[{"index":0,"text":`;
  const textSuffix = `,"logprobs":null,"finish_reason":null}]${flags.includeUsage ? ',"usage":null' : ""}}`;
  return streamRun(run, reply, options, async (sse, events) => {
    let offset = flags.promptLength;
    for await (const event of events) {
      if (event.type === "delta" && !flags.withLogprobs) {
        offset += event.text.length;
        await sse.dataJson(`${textPrefix}${JSON.stringify(event.text)}${textSuffix}`);
        continue;
      }
      if (event.type === "delta") {
        const logprobs = flags.withLogprobs ? legacyLogprobs(event.logprobs, offset) : null;
        offset += event.text.length;
        await sse.data(chunk([{ index: 0, text: event.text, logprobs, finish_reason: null }]));
        continue;
      }
      if (event.type === "finish") {
        await sse.data(chunk([{ index: 0, text: "", logprobs: null, finish_reason: event.finishReason }]));
      } else {
        if (event.error.code === "cancelled") break;
        await sse.data(
          chunk(
            [{ index: 0, text: "", logprobs: null, finish_reason: "error" }],
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

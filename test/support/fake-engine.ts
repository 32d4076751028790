/**
 * A deterministic OpenAI-compatible inference server for tests.
 *
 * A real `node:http` server on 127.0.0.1 (random port) implementing:
 * - `POST /v1/chat/completions`, streaming (SSE, one `chat.completion.chunk` per token, then a
 *   finish chunk, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`)
 *   and non-streaming (one `chat.completion`);
 * - `POST /v1/completions` (legacy text completion), streaming (`text_completion` chunks) and not;
 * - `GET /v1/models`.
 *
 * What it answers, in this order of precedence, the way vLLM and llama.cpp's server shape it:
 * - a chat request with `tools` (and `tool_choice` not "none") whose last message is not a tool
 *   result: one tool call, id "call_0", to the function `tool_choice` forces, else
 *   `toolCall.name`, else the first tool; streamed as a chunk with the id and name, then its
 *   arguments in `toolCallFragments` chunks ({@link fakeArgumentFragments}); finish reason
 *   "tool_calls";
 * - a chat request whose last message is a tool result: "The answer is <its content>."
 *   ({@link fakeToolAnswer}), one token per {@link fakeTokens} piece;
 * - a chat request with `response_format` json_object or json_schema: `jsonText`, one token per
 *   {@link fakeTokens} piece;
 * - otherwise (and always for legacy completions): `tokens` (in order), or `tokenCount` tokens
 *   made by `tokenText`.
 * Each counts as one token per chunk and is cut after `max_tokens` (or `max_completion_tokens`)
 * tokens with finish reason "length"; otherwise finish reason "stop" (or "tool_calls"). Usage is
 * `promptTokens` prompt tokens and the number of tokens sent as completion tokens. With `logprobs`
 * (chat: `logprobs: true`, `top_logprobs: n`; legacy: `logprobs: n`) every text token carries the
 * log-probability {@link fakeLogprob} of its position and n alternatives
 * ({@link fakeTopLogprobs}), in each API's own shape.
 *
 * A streamed response respects backpressure (it waits for 'drain' when the socket is full), as a
 * real engine's server does, so a slow reader slows the engine down.
 */
import { createServer, type IncomingMessage, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";

export interface FakeEngineOptions {
  /** The completion, one string per token. Default `["Hello", ",", " world", "!"]`. */
  tokens?: string[];
  /** Reported prompt token count. Default 12. */
  promptTokens?: number;
  /** Delay before each token, in ms. Default 0. */
  delayMs?: number;
  /** Answer every chat completion request with this HTTP error instead. */
  failWith?: { status: number; message?: string };
  /**
   * Stream the first token, then keep the response open until the client closes the request
   * (for cancellation tests). Default false.
   */
  hang?: boolean;
  /** Model id listed by `GET /v1/models` and echoed in responses. Default "fake-model". */
  model?: string;
  /** Ignore `max_tokens` (to test the client-side limit). Default false. */
  ignoreMaxTokens?: boolean;
  /**
   * Generate this many tokens with `tokenText` instead of holding them in `tokens`, for very long
   * completions (e.g. 100,000 tokens) that should not be built as an array up front.
   */
  tokenCount?: number;
  /** The text of generated token number `index` (0-based), with `tokenCount`. Default `t${index} `. */
  tokenText?: (index: number) => string;
  /**
   * Hold every response (streamed or not) before its first token until this promise settles, so a
   * test can act while a request sits at the engine.
   */
  gate?: Promise<unknown>;
  /**
   * The tool call answered to a request with tools: its arguments (JSON text, default
   * {@link DEFAULT_FAKE_TOOL_ARGUMENTS}) and its function's name (default: the function
   * `tool_choice` forces, else the request's first tool).
   */
  toolCall?: { name?: string; arguments: string };
  /** In how many chunks a tool call's arguments are streamed. Default 3. */
  toolCallFragments?: number;
  /** The JSON text answered to a request with response_format json_object or json_schema. */
  jsonText?: string;
  /**
   * Asked once per completion request, when it arrives: "answer" (as the other options say),
   * "blackhole" (never respond; the request stays open until the client closes it) or "fail"
   * (HTTP 500 at once). Lets a test make an engine go dead and recover. Default: always "answer".
   */
  behaviour?: () => "answer" | "blackhole" | "fail";
}

export interface FakeEngine {
  /** Base URL ending in `/v1`, e.g. http://127.0.0.1:40123/v1. */
  url: string;
  /** The parsed JSON bodies of the (chat and legacy) completion requests received, in order. */
  requests: unknown[];
  /**
   * Resolves when the response to completion request number `index` (0-based) is closed:
   * `aborted` is true when the client went away before the response was complete.
   */
  requestClosed(index: number): Promise<{ aborted: boolean }>;
  /** Resolves once completion request number `index` (0-based) has been received. */
  requestArrived(index: number): Promise<void>;
  /** The most completion requests that were being answered at the same time so far. */
  readonly maxConcurrentSeen: number;
  close(): Promise<void>;
}

export const DEFAULT_FAKE_TOKENS = ["Hello", ",", " world", "!"] as const;
export const DEFAULT_FAKE_PROMPT_TOKENS = 12;
export const DEFAULT_FAKE_TOOL_ARGUMENTS = '{"city":"Paris"}';
export const DEFAULT_FAKE_JSON = '{"name":"Ada Lovelace","born":1815}';
const DEFAULT_TOOL_CALL_FRAGMENTS = 3;

/** The log-probability the fake engine gives the generated token at `position` (0-based). */
export function fakeLogprob(position: number): number {
  return -(position + 1) / 10;
}

/**
 * The `count` alternatives the fake engine reports at `position` for `token`, most likely first:
 * the token itself, then `${token}~1`, `${token}~2`, ... each one nat less likely.
 */
export function fakeTopLogprobs(
  token: string,
  position: number,
  count: number,
): { token: string; logprob: number }[] {
  return Array.from({ length: count }, (_, k) => ({
    token: k === 0 ? token : `${token}~${k}`,
    logprob: fakeLogprob(position) - k,
  }));
}

/** How the fake engine splits generated text into tokens: words, JSON punctuation and strings. */
export function fakeTokens(text: string): string[] {
  const tokens = text.match(/\s*(?:[{}[\],:]|"(?:[^"\\]|\\.)*"?|[^\s{}[\],:"]+)|\s+$/g) ?? [];
  return tokens.join("") === text ? tokens : [...text];
}

/** The argument fragments of a streamed tool call: `count` pieces, as even as the text allows. */
export function fakeArgumentFragments(argumentsText: string, count: number): string[] {
  const chars = [...argumentsText];
  const size = Math.max(1, Math.ceil(chars.length / Math.max(1, count)));
  const fragments: string[] = [];
  for (let i = 0; i < chars.length; i += size) fragments.push(chars.slice(i, i + size).join(""));
  return fragments;
}

/** The fake engine's answer once it was given a tool's result. */
export function fakeToolAnswer(toolResult: string): string {
  return `The answer is ${toolResult}.`;
}

interface ChatBody {
  stream?: boolean;
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  stream_options?: { include_usage?: boolean } | null;
  model?: string;
  messages?: { role?: string; content?: unknown }[];
  tools?: { function?: { name?: string } }[];
  tool_choice?: string | { function?: { name?: string } } | null;
  response_format?: { type?: string } | null;
  /** Chat: a boolean; legacy completions: how many alternatives. */
  logprobs?: boolean | number | null;
  top_logprobs?: number | null;
  prompt?: unknown;
}

/** One step of an answer: a text token, or a tool-call fragment. */
type Step = { text: string } | { toolCall: { id?: string; name?: string; arguments: string } };

/** What the engine will answer: `total` steps (made on demand) and how it ends when not cut. */
interface Plan {
  total: number;
  step(index: number): Step;
  finishReason: "stop" | "tool_calls";
}

export async function startFakeEngine(options: FakeEngineOptions = {}): Promise<FakeEngine> {
  const tokens = options.tokens ?? [...DEFAULT_FAKE_TOKENS];
  const tokenTotal = options.tokenCount ?? tokens.length;
  const tokenText =
    options.tokenCount === undefined
      ? (index: number) => tokens[index] as string
      : (options.tokenText ?? ((index: number) => `t${index} `));
  const promptTokens = options.promptTokens ?? DEFAULT_FAKE_PROMPT_TOKENS;
  const delayMs = options.delayMs ?? 0;
  const modelId = options.model ?? "fake-model";
  const requests: unknown[] = [];
  type ClosedEntry = { promise: Promise<{ aborted: boolean }>; resolve: (v: { aborted: boolean }) => void };
  const closed: ClosedEntry[] = [];
  type ArrivedEntry = { promise: Promise<void>; resolve: () => void };
  const arrived: ArrivedEntry[] = [];
  let inFlight = 0;
  let maxConcurrentSeen = 0;

  const closedEntry = (index: number) => {
    while (closed.length <= index) {
      let resolve!: ClosedEntry["resolve"];
      const promise = new Promise<{ aborted: boolean }>((r) => {
        resolve = r;
      });
      closed.push({ promise, resolve });
    }
    return closed[index] as ClosedEntry;
  };

  const arrivedEntry = (index: number) => {
    while (arrived.length <= index) {
      let resolve!: ArrivedEntry["resolve"];
      const promise = new Promise<void>((r) => {
        resolve = r;
      });
      arrived.push({ promise, resolve });
    }
    return arrived[index] as ArrivedEntry;
  };

  const server = createServer((req, res) => {
    handle(req, res).catch((error: unknown) => {
      if (!res.headersSent) sendJson(res, 500, { error: { message: String(error), type: "server_error" } });
      else res.destroy();
    });
  });

  async function handle(req: IncomingMessage, res: ServerResponse): Promise<void> {
    const path = (req.url ?? "/").split("?")[0];
    if (req.method === "GET" && path === "/v1/models") {
      sendJson(res, 200, {
        object: "list",
        data: [{ id: modelId, object: "model", created: 0, owned_by: "fake-engine" }],
      });
      return;
    }
    if (req.method !== "POST" || (path !== "/v1/chat/completions" && path !== "/v1/completions")) {
      sendJson(res, 404, { error: { message: `no route ${req.method} ${path}`, type: "not_found" } });
      return;
    }
    const raw = await readBody(req);
    let body: ChatBody;
    try {
      body = JSON.parse(raw) as ChatBody;
    } catch {
      sendJson(res, 400, { error: { message: "invalid JSON body", type: "invalid_request_error" } });
      return;
    }
    const index = requests.length;
    requests.push(body);
    const entry = closedEntry(index);
    inFlight += 1;
    maxConcurrentSeen = Math.max(maxConcurrentSeen, inFlight);
    res.on("close", () => {
      inFlight -= 1;
      entry.resolve({ aborted: !res.writableFinished });
    });
    arrivedEntry(index).resolve();

    const behaviour = options.behaviour?.() ?? "answer";
    if (behaviour === "blackhole") return;
    if (behaviour === "fail") {
      sendJson(res, 500, { error: { message: "fake engine failure", type: "fake_error", code: null } });
      return;
    }
    if (options.failWith) {
      sendJson(res, options.failWith.status, {
        error: { message: options.failWith.message ?? "fake engine failure", type: "fake_error", code: null },
      });
      return;
    }

    const legacy = path === "/v1/completions";
    const plan = legacy ? textPlan : planFor(body);
    const limit = options.ignoreMaxTokens ? null : (body.max_tokens ?? body.max_completion_tokens ?? null);
    const outCount = limit !== null && limit >= 0 && limit < plan.total ? limit : plan.total;
    const finishReason = outCount < plan.total ? "length" : plan.finishReason;
    const usage = {
      prompt_tokens: promptTokens,
      completion_tokens: outCount,
      total_tokens: promptTokens + outCount,
    };
    const model = body.model ?? modelId;
    const id = `${legacy ? "cmpl" : "chatcmpl"}-fake-${index}`;
    const envelope = (object: string, choices: object[], extra: object = {}) => ({
      id,
      object,
      created: 0,
      model,
      choices,
      ...extra,
    });
    const top = legacy
      ? typeof body.logprobs === "number"
        ? body.logprobs
        : undefined
      : body.logprobs === true
        ? (body.top_logprobs ?? 0)
        : undefined;
    const chatLogprob = (token: string, position: number) => ({
      token,
      logprob: fakeLogprob(position),
      bytes: [...Buffer.from(token)],
      top_logprobs: fakeTopLogprobs(token, position, top ?? 0).map((entry) => ({
        ...entry,
        bytes: [...Buffer.from(entry.token)],
      })),
    });
    // The legacy shape: parallel lists, alternatives as an object per position.
    let textOffset = typeof body.prompt === "string" ? body.prompt.length : 0;
    const legacyLogprobs = (texts: string[], first: number) => {
      const offsets = texts.map((text) => {
        const offset = textOffset;
        textOffset += text.length;
        return offset;
      });
      return {
        tokens: texts,
        token_logprobs: texts.map((_, i) => fakeLogprob(first + i)),
        top_logprobs: texts.map((text, i) =>
          Object.fromEntries(
            fakeTopLogprobs(text, first + i, top ?? 0).map((entry) => [entry.token, entry.logprob]),
          ),
        ),
        text_offset: offsets,
      };
    };

    if (options.gate) {
      await options.gate;
      if (res.destroyed) return;
    }

    if (!body.stream) {
      const steps: Step[] = [];
      for (let i = 0; i < outCount; i++) {
        await delay(delayMs);
        steps.push(plan.step(i));
      }
      const texts = steps.flatMap((step) => ("text" in step ? [step.text] : []));
      if (legacy) {
        sendJson(
          res,
          200,
          envelope(
            "text_completion",
            [
              {
                index: 0,
                text: texts.join(""),
                finish_reason: finishReason,
                logprobs: top === undefined ? null : legacyLogprobs(texts, 0),
              },
            ],
            { usage },
          ),
        );
        return;
      }
      const call = steps.flatMap((step) => ("toolCall" in step ? [step.toolCall] : []));
      const message =
        call.length > 0
          ? {
              role: "assistant",
              content: null,
              tool_calls: [
                {
                  id: call[0]?.id,
                  type: "function",
                  function: { name: call[0]?.name, arguments: call.map((c) => c.arguments).join("") },
                },
              ],
            }
          : { role: "assistant", content: texts.join("") };
      const logprobs =
        top === undefined ? null : { content: texts.map((text, i) => chatLogprob(text, i)), refusal: null };
      sendJson(
        res,
        200,
        envelope("chat.completion", [{ index: 0, message, finish_reason: finishReason, logprobs }], {
          usage,
        }),
      );
      return;
    }

    res.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      connection: "keep-alive",
    });
    const chunkObject = legacy ? "text_completion" : "chat.completion.chunk";
    const chunk = (
      delta: { content?: string; [field: string]: unknown },
      finish: string | null,
      logprobs: object | null = null,
    ) =>
      envelope(chunkObject, [
        legacy
          ? { index: 0, text: delta.content ?? "", finish_reason: finish, logprobs }
          : { index: 0, delta, finish_reason: finish, logprobs },
      ]);
    const send = async (payload: object | string) => {
      const written = res.write(
        `data: ${typeof payload === "string" ? payload : JSON.stringify(payload)}\n\n`,
      );
      if (!written && !res.destroyed) {
        // Whichever comes first; the other listener goes too (a long stream waits here many times).
        await new Promise<void>((resolve) => {
          const done = () => {
            res.off("drain", done).off("close", done);
            resolve();
          };
          res.once("drain", done).once("close", done);
        });
      }
    };

    if (!legacy) await send(chunk({ role: "assistant", content: "" }, null));
    let textPosition = 0;
    for (let i = 0; i < outCount; i++) {
      await delay(delayMs);
      if (res.destroyed) return;
      const step = plan.step(i);
      if ("text" in step) {
        const position = textPosition++;
        const logprobs =
          top === undefined
            ? null
            : legacy
              ? legacyLogprobs([step.text], position)
              : { content: [chatLogprob(step.text, position)], refusal: null };
        await send(chunk({ content: step.text }, null, logprobs));
      } else {
        const { id: callId, name, arguments: fragment } = step.toolCall;
        await send(
          chunk(
            {
              tool_calls: [
                callId === undefined
                  ? { index: 0, function: { arguments: fragment } }
                  : { index: 0, id: callId, type: "function", function: { name, arguments: fragment } },
              ],
            },
            null,
          ),
        );
      }
      if (options.hang && i === 0) {
        await entry.promise;
        return;
      }
    }
    if (options.hang && outCount === 0) {
      await entry.promise;
      return;
    }
    if (res.destroyed) return;
    await send(chunk({}, finishReason));
    if (body.stream_options?.include_usage) {
      await send(envelope(chunkObject, [], { usage }));
    }
    await send("[DONE]");
    res.end();
  }

  /** The plain completion: `tokens`, or `tokenCount` tokens of `tokenText`. */
  const textPlan: Plan = { total: tokenTotal, step: (i) => ({ text: tokenText(i) }), finishReason: "stop" };

  function planFor(body: ChatBody): Plan {
    const messages = body.messages ?? [];
    const last = messages[messages.length - 1];
    const tools = body.tools ?? [];
    if (tools.length > 0 && body.tool_choice !== "none" && last?.role !== "tool") {
      const forced = typeof body.tool_choice === "object" ? body.tool_choice?.function?.name : undefined;
      const name = forced ?? options.toolCall?.name ?? tools[0]?.function?.name ?? "tool";
      const fragments = fakeArgumentFragments(
        options.toolCall?.arguments ?? DEFAULT_FAKE_TOOL_ARGUMENTS,
        options.toolCallFragments ?? DEFAULT_TOOL_CALL_FRAGMENTS,
      );
      return {
        total: 1 + fragments.length,
        step: (i) => ({
          toolCall: i === 0 ? { id: "call_0", name, arguments: "" } : { arguments: fragments[i - 1] ?? "" },
        }),
        finishReason: "tool_calls",
      };
    }
    let text: string | undefined;
    if (last?.role === "tool") text = fakeToolAnswer(contentText(last.content));
    else if (body.response_format?.type === "json_object" || body.response_format?.type === "json_schema") {
      text = options.jsonText ?? DEFAULT_FAKE_JSON;
    }
    if (text === undefined) return textPlan;
    const pieces = fakeTokens(text);
    return { total: pieces.length, step: (i) => ({ text: pieces[i] ?? "" }), finishReason: "stop" };
  }

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(0, "127.0.0.1", () => {
      server.off("error", reject);
      resolve();
    });
  });
  const { port } = server.address() as AddressInfo;

  return {
    url: `http://127.0.0.1:${port}/v1`,
    requests,
    requestClosed: (index) => closedEntry(index).promise,
    requestArrived: (index) => arrivedEntry(index).promise,
    get maxConcurrentSeen() {
      return maxConcurrentSeen;
    },
    close: () =>
      new Promise<void>((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}

/** A message's content as text: a string, or the text parts of an array of parts. */
function contentText(content: unknown): string {
  if (typeof content === "string") return content;
  if (!Array.isArray(content)) return "";
  return content
    .map((part: { type?: string; text?: string }) => (part?.type === "text" ? (part.text ?? "") : ""))
    .join("");
}

function sendJson(res: ServerResponse, status: number, body: unknown): void {
  const text = JSON.stringify(body);
  res.writeHead(status, { "content-type": "application/json", "content-length": Buffer.byteLength(text) });
  res.end(text);
}

function readBody(req: IncomingMessage): Promise<string> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    req.on("data", (part: Buffer) => parts.push(part));
    req.on("end", () => resolve(Buffer.concat(parts).toString("utf8")));
    req.on("error", reject);
  });
}

function delay(ms: number): Promise<void> {
  return ms > 0 ? new Promise((resolve) => setTimeout(resolve, ms)) : Promise.resolve();
}

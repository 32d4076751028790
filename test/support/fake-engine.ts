/**
 * A deterministic OpenAI-compatible inference server for tests.
 *
 * A real `node:http` server on 127.0.0.1 (random port) implementing:
 * - `POST /v1/chat/completions`, streaming (SSE, one `chat.completion.chunk` per token, then a
 *   finish chunk, a usage chunk when `stream_options.include_usage` is set, then `data: [DONE]`)
 *   and non-streaming (one `chat.completion`);
 * - `GET /v1/models`.
 *
 * Output is always `tokens` (in order), or `tokenCount` tokens made by `tokenText`, cut after
 * `max_tokens` (or `max_completion_tokens`) tokens with finish reason "length"; otherwise finish
 * reason "stop". Usage is `promptTokens` prompt tokens and the number of tokens sent as completion
 * tokens. A streamed response respects backpressure (it waits for 'drain' when the socket is full),
 * as a real engine's server does, so a slow reader slows the engine down.
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
}

export interface FakeEngine {
  /** Base URL ending in `/v1`, e.g. http://127.0.0.1:40123/v1. */
  url: string;
  /** The parsed JSON bodies of the chat completion requests received, in order. */
  requests: unknown[];
  /**
   * Resolves when the response to chat completion request number `index` (0-based) is closed:
   * `aborted` is true when the client went away before the response was complete.
   */
  requestClosed(index: number): Promise<{ aborted: boolean }>;
  /** Resolves once chat completion request number `index` (0-based) has been received. */
  requestArrived(index: number): Promise<void>;
  /** The most chat completion requests that were being answered at the same time so far. */
  readonly maxConcurrentSeen: number;
  close(): Promise<void>;
}

export const DEFAULT_FAKE_TOKENS = ["Hello", ",", " world", "!"] as const;
export const DEFAULT_FAKE_PROMPT_TOKENS = 12;

interface ChatBody {
  stream?: boolean;
  max_tokens?: number | null;
  max_completion_tokens?: number | null;
  stream_options?: { include_usage?: boolean } | null;
  model?: string;
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
    if (req.method !== "POST" || path !== "/v1/chat/completions") {
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

    if (options.failWith) {
      sendJson(res, options.failWith.status, {
        error: { message: options.failWith.message ?? "fake engine failure", type: "fake_error", code: null },
      });
      return;
    }

    const limit = options.ignoreMaxTokens ? null : (body.max_tokens ?? body.max_completion_tokens ?? null);
    const outCount = limit !== null && limit >= 0 && limit < tokenTotal ? limit : tokenTotal;
    const finishReason = outCount < tokenTotal ? "length" : "stop";
    const usage = {
      prompt_tokens: promptTokens,
      completion_tokens: outCount,
      total_tokens: promptTokens + outCount,
    };
    const model = body.model ?? modelId;
    const id = `chatcmpl-fake-${index}`;

    if (options.gate) {
      await options.gate;
      if (res.destroyed) return;
    }

    if (!body.stream) {
      let content = "";
      for (let i = 0; i < outCount; i++) {
        await delay(delayMs);
        content += tokenText(i);
      }
      sendJson(res, 200, {
        id,
        object: "chat.completion",
        created: 0,
        model,
        choices: [
          {
            index: 0,
            message: { role: "assistant", content },
            finish_reason: finishReason,
            logprobs: null,
          },
        ],
        usage,
      });
      return;
    }

    res.writeHead(200, {
      "content-type": "text/event-stream",
      "cache-control": "no-cache",
      connection: "keep-alive",
    });
    const chunk = (delta: object, finish: string | null, extra: object = {}) => ({
      id,
      object: "chat.completion.chunk",
      created: 0,
      model,
      choices: [{ index: 0, delta, finish_reason: finish, logprobs: null }],
      ...extra,
    });
    const send = async (payload: object | string) => {
      const written = res.write(
        `data: ${typeof payload === "string" ? payload : JSON.stringify(payload)}\n\n`,
      );
      if (!written && !res.destroyed)
        await new Promise((resolve) => res.once("drain", resolve).once("close", resolve));
    };

    await send(chunk({ role: "assistant", content: "" }, null));
    for (let i = 0; i < outCount; i++) {
      await delay(delayMs);
      if (res.destroyed) return;
      await send(chunk({ content: tokenText(i) }, null));
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
      await send({ id, object: "chat.completion.chunk", created: 0, model, choices: [], usage });
    }
    await send("[DONE]");
    res.end();
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

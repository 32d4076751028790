/**
 * Server-sent events on a hijacked reply: headers are committed lazily (so an error before the
 * first byte can still be a real HTTP status), writes wait for 'drain' when the socket is full (the
 * backpressure that reaches the worker through the order's flow-control window), a consumer that
 * drains nothing for `slowReaderTimeoutMs` fails the write with SlowReaderError, and a closed
 * consumer turns every write into a no-op.
 */
import type { ServerResponse } from "node:http";
import type { MarketError } from "../market/errors.js";

/** The consumer's socket took nothing for too long. */
export class SlowReaderError extends Error {
  override readonly name = "SlowReaderError";
}

export interface SseWriterOptions {
  headers: Record<string, string>;
  slowReaderTimeoutMs: number;
}

export class SseWriter {
  private committed = false;
  private readonly headers: Record<string, string>;

  constructor(
    private readonly raw: ServerResponse,
    private readonly options: SseWriterOptions,
  ) {
    this.headers = options.headers;
  }

  get isCommitted(): boolean {
    return this.committed;
  }

  get isClosed(): boolean {
    return this.raw.destroyed || this.raw.writableEnded;
  }

  commit(): void {
    if (this.committed) return;
    this.committed = true;
    this.raw.writeHead(200, {
      ...this.headers,
      "content-type": "text/event-stream; charset=utf-8",
      "cache-control": "no-cache",
      connection: "keep-alive",
      "x-accel-buffering": "no",
    });
    this.raw.flushHeaders();
  }

  /** Before the first byte only: answer with a plain JSON error instead of a stream. */
  rejectWith(status: number, body: object, error?: MarketError): void {
    if (this.committed || this.isClosed) return;
    this.committed = true;
    const retryAfter =
      error?.retryAfterSeconds === undefined ? {} : { "retry-after": String(error.retryAfterSeconds) };
    this.raw.writeHead(status, {
      ...this.headers,
      ...retryAfter,
      "content-type": "application/json; charset=utf-8",
    });
    this.raw.end(JSON.stringify(body));
  }

  /** An SSE comment line, ignored by clients; keeps proxies from timing the stream out. */
  comment(text: string): Promise<void> {
    return this.write(`: ${text}\n\n`);
  }

  /** A data event; `event` names it (the Responses API's `event: response.created` lines). */
  data(payload: object | "[DONE]", event?: string): Promise<void> {
    return this.dataJson(payload === "[DONE]" ? payload : JSON.stringify(payload), event);
  }

  /** A data event whose JSON the caller has already serialised (the hot path of token deltas). */
  dataJson(json: string, event?: string): Promise<void> {
    const name = event === undefined ? "" : `event: ${event}\n`;
    return this.write(`${name}data: ${json}\n\n`);
  }

  end(): void {
    if (!this.isClosed) this.raw.end();
  }

  private async write(text: string): Promise<void> {
    this.commit();
    if (this.isClosed) return;
    if (this.raw.write(text)) return;
    await new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.raw.off("drain", done);
        this.raw.off("close", done);
        resolve();
      };
      const timer = setTimeout(() => {
        this.raw.off("drain", done);
        this.raw.off("close", done);
        reject(new SlowReaderError(`the consumer read nothing for ${this.options.slowReaderTimeoutMs} ms`));
      }, this.options.slowReaderTimeoutMs);
      this.raw.on("drain", done);
      this.raw.on("close", done);
    });
  }
}

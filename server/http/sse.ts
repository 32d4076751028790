/**
 * Server-sent events on a hijacked reply: headers are committed lazily (so an error before the
 * first byte can still be a real HTTP status), the events of one event-loop turn leave in one
 * socket write, writes wait for 'drain' when the socket is full (the
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
  /**
   * Called with the mark given to {@link SseWriter.processed} once everything written before it
   * has been handed to the socket (and the socket took it without filling up, or drained).
   */
  onWritten?: (mark: number) => void;
  /** The socket took nothing for `slowReaderTimeoutMs`, even while no write was waiting for it. */
  onSlowReader?: (error: SlowReaderError) => void;
}

/** Text waiting for the end of the turn is written at once beyond this many characters. */
const FLUSH_AT_CHARS = 64 * 1024;
const RESOLVED = Promise.resolve();

/**
 * Writes are coalesced: the events written during one turn of the event loop leave in one socket
 * write (one system call) at its end (setImmediate), or at once beyond FLUSH_AT_CHARS. A lone event
 * is not delayed past the turn that wrote it. What was written counts as delivered only once it
 * is flushed, through `onWritten` and the marks of {@link SseWriter.processed}.
 */
export class SseWriter {
  private committed = false;
  private readonly headers: Record<string, string>;
  private pending = "";
  private pendingMark: number | undefined;
  private scheduled = false;
  /** Set while the socket is full: settles when it drains (or closes); rejects on a slow reader. */
  private blocked: Promise<void> | undefined;

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
    // No flushHeaders(): the headers leave with the first write (one system call, not two), which
    // commit() is always followed by within the same turn.
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
    return this.write(event === undefined ? `data: ${json}\n\n` : `event: ${event}\ndata: ${json}\n\n`);
  }

  /**
   * Everything for `mark` has been written to this writer: `onWritten(mark)` follows once it is
   * on the socket (at once if nothing is waiting).
   */
  processed(mark: number): void {
    if (this.pending === "" && this.blocked === undefined) {
      this.pendingMark = undefined;
      if (!this.isClosed) this.options.onWritten?.(mark);
      return;
    }
    this.pendingMark = mark;
  }

  /** Writes what is waiting and ends the response. */
  end(): void {
    if (this.isClosed) return;
    const text = this.pending;
    this.pending = "";
    if (text === "") this.raw.end();
    else this.raw.end(text);
  }

  /**
   * Queues the text for the end of the turn. Resolves at once, unless the socket is full: then
   * once it drains, and rejects with SlowReaderError if it does not drain in time.
   */
  private write(text: string): Promise<void> {
    this.commit();
    if (this.isClosed) return RESOLVED;
    this.pending += text;
    if (this.blocked) return this.blocked;
    if (this.pending.length >= FLUSH_AT_CHARS) this.flush();
    else if (!this.scheduled) {
      this.scheduled = true;
      setImmediate(this.flushAtTurnEnd);
    }
    return this.blocked ?? RESOLVED;
  }

  private readonly flushAtTurnEnd = (): void => {
    this.scheduled = false;
    if (this.blocked === undefined) this.flush();
  };

  private flush(): void {
    const text = this.pending;
    const mark = this.pendingMark;
    this.pending = "";
    this.pendingMark = undefined;
    if (this.isClosed) return;
    if (text === "") {
      if (mark !== undefined) this.options.onWritten?.(mark);
      return;
    }
    if (this.raw.write(text)) {
      if (mark !== undefined) this.options.onWritten?.(mark);
      return;
    }
    // The socket is full: what was written counts once it drains, and writes wait for that.
    const blocked = new Promise<void>((resolve, reject) => {
      const done = () => {
        clearTimeout(timer);
        this.raw.off("drain", done);
        this.raw.off("close", done);
        this.blocked = undefined;
        resolve();
        // A closed socket delivered nothing more.
        if (this.isClosed) return;
        if (mark !== undefined) this.options.onWritten?.(mark);
        if (this.pending !== "" || this.pendingMark !== undefined) this.flush();
      };
      const timer = setTimeout(() => {
        this.raw.off("drain", done);
        this.raw.off("close", done);
        const error = new SlowReaderError(
          `the consumer read nothing for ${this.options.slowReaderTimeoutMs} ms`,
        );
        reject(error);
        this.options.onSlowReader?.(error);
      }, this.options.slowReaderTimeoutMs);
      this.raw.on("drain", done);
      this.raw.on("close", done);
    });
    // Waited for by the writes that come meanwhile; the timeout also reaches onSlowReader.
    blocked.catch(() => {});
    this.blocked = blocked;
  }
}

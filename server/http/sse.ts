/**
 * Server-sent events on a hijacked reply: headers are committed lazily (so an error before the
 * first byte can still be a real HTTP status), writes wait for 'drain' when the socket is full,
 * and a closed consumer turns every write into a no-op.
 */
import { once } from "node:events";
import type { ServerResponse } from "node:http";

export class SseWriter {
  private committed = false;

  constructor(
    private readonly raw: ServerResponse,
    private readonly headers: Record<string, string>,
  ) {}

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
  rejectWith(status: number, body: object): void {
    if (this.committed || this.isClosed) return;
    this.committed = true;
    this.raw.writeHead(status, { ...this.headers, "content-type": "application/json; charset=utf-8" });
    this.raw.end(JSON.stringify(body));
  }

  /** An SSE comment line, ignored by clients; keeps proxies from timing the stream out. */
  comment(text: string): Promise<void> {
    return this.write(`: ${text}\n\n`);
  }

  data(payload: object | "[DONE]"): Promise<void> {
    return this.write(`data: ${payload === "[DONE]" ? payload : JSON.stringify(payload)}\n\n`);
  }

  end(): void {
    if (!this.isClosed) this.raw.end();
  }

  private async write(text: string): Promise<void> {
    this.commit();
    if (this.isClosed) return;
    if (!this.raw.write(text)) {
      await Promise.race([once(this.raw, "drain"), once(this.raw, "close")]);
    }
  }
}

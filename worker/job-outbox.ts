/**
 * The output of one job on its way to the control plane, under the job's flow-control window
 * (proto/locallmarket/v1/worker.proto: Welcome.job_window_chunks, JobWindow).
 *
 * The engine's pieces go in with {@link JobOutbox.push}; chunks come out through `send`, numbered
 * from 1, never more than `window` beyond the last acknowledged one. While the window has room a
 * piece leaves at once, so a lone token is never delayed. While it is closed, pieces wait here and
 * are merged: when a JobWindow reopens it, the waiting text leaves as one chunk (split at
 * `maxChunkBytes`, never inside a character) whose token_count is the sum of its pieces'.
 *
 * Once `bufferBytes` of text wait, push() returns a promise that settles when the window has taken
 * them: the job's loop awaits it, so the engine is read no faster than the consumer reads (the
 * openai engine's HTTP response stays unread and TCP pushes back on the engine; node-llama-cpp
 * evaluates the next token only when the loop asks for it).
 */
import type { EnginePiece } from "./engines/engine.js";

/** One JobChunk, without its job id. */
export interface OutgoingChunk {
  sequence: bigint;
  text: string;
  tokenCount: number;
}

/** Options of {@link JobOutbox}. */
export interface JobOutboxOptions {
  /** Chunks that may be sent beyond the last acknowledged one; 0 means no limit (a server without flow control). */
  window: number;
  /** The largest chunk text, in UTF-8 bytes; 0 means no limit. */
  maxChunkBytes: number;
  /** How much text may wait for the window before push() makes the producer wait, in UTF-8 bytes. */
  bufferBytes: number;
  /** Sends one chunk; called synchronously from push() and acknowledge(). */
  send: (chunk: OutgoingChunk) => void;
}

interface PendingPiece {
  text: string;
  bytes: number;
  tokenCount: number;
}

/** The chunks of one job, sent within its window. */
export class JobOutbox {
  private readonly options: JobOutboxOptions;
  private readonly pending: PendingPiece[] = [];
  private pendingBytes = 0;
  private sent = 0n;
  private acknowledged = 0n;
  private tokens = 0;
  private closed = false;
  private wakers: Array<() => void> = [];

  constructor(options: JobOutboxOptions) {
    this.options = options;
  }

  /** The sequence number of the last chunk sent (0 before the first). */
  get lastSequence(): bigint {
    return this.sent;
  }

  /** The sum of the token counts of the chunks sent. */
  get sentTokens(): number {
    return this.tokens;
  }

  /**
   * Adds a piece of output and sends what the window allows. Returns a promise when the producer
   * must wait for the window (too much text is waiting); it settles once enough was sent, or the
   * outbox is closed. Pieces pushed after close() are dropped.
   */
  push(piece: EnginePiece): Promise<void> | undefined {
    if (this.closed || (piece.text === "" && piece.tokenCount === 0)) return undefined;
    const bytes = Buffer.byteLength(piece.text);
    this.pending.push({ text: piece.text, bytes, tokenCount: piece.tokenCount });
    this.pendingBytes += bytes;
    this.flush();
    if (this.pendingBytes < this.options.bufferBytes) return undefined;
    return this.until(() => this.pendingBytes < this.options.bufferBytes);
  }

  /** Applies a JobWindow: the consumer has taken every chunk up to `sequence`. */
  acknowledge(sequence: bigint): void {
    // The consumer cannot have taken a chunk that was never sent; acknowledgements only grow.
    const acknowledged = sequence < this.sent ? sequence : this.sent;
    if (acknowledged <= this.acknowledged) return;
    this.acknowledged = acknowledged;
    this.flush();
    this.wake();
  }

  /** Resolves once every piece pushed so far was sent, or the outbox was closed. */
  drained(): Promise<void> {
    return this.until(() => this.pending.length === 0);
  }

  /** Drops the text still waiting and releases every waiter; the job is over. Idempotent. */
  close(): void {
    this.closed = true;
    this.pending.length = 0;
    this.pendingBytes = 0;
    this.wake();
  }

  private flush(): void {
    while (this.pending.length > 0 && this.hasRoom()) this.sendOne();
  }

  private hasRoom(): boolean {
    return this.options.window === 0 || this.sent < this.acknowledged + BigInt(this.options.window);
  }

  /** Sends the waiting pieces as one chunk, up to the chunk size limit. */
  private sendOne(): void {
    const maxBytes = this.options.maxChunkBytes > 0 ? this.options.maxChunkBytes : Number.POSITIVE_INFINITY;
    let text = "";
    let bytes = 0;
    let tokenCount = 0;
    for (let head = this.pending[0]; head; head = this.pending[0]) {
      if (bytes + head.bytes <= maxBytes) {
        text += head.text;
        bytes += head.bytes;
        tokenCount += head.tokenCount;
        this.pending.shift();
        continue;
      }
      // The piece does not fit: its first characters fill the chunk (at least one character, so a
      // limit below one character's size cannot stall the job).
      const part = utf8Prefix(head.text, maxBytes - bytes, bytes === 0);
      if (part.bytes === 0) break;
      // Tokens follow the text, each at least one byte, so the part carries at most its size.
      const partTokens = Math.min(head.tokenCount, part.bytes);
      text += part.text;
      bytes += part.bytes;
      tokenCount += partTokens;
      head.text = head.text.slice(part.text.length);
      head.bytes -= part.bytes;
      head.tokenCount -= partTokens;
      break;
    }
    this.pendingBytes -= bytes;
    this.sent += 1n;
    this.tokens += tokenCount;
    this.options.send({ sequence: this.sent, text, tokenCount });
  }

  private async until(condition: () => boolean): Promise<void> {
    while (!this.closed && !condition()) {
      await new Promise<void>((resolve) => this.wakers.push(resolve));
    }
  }

  private wake(): void {
    for (const resolve of this.wakers.splice(0)) resolve();
  }
}

/** The longest prefix of `text` of at most `maxBytes` UTF-8 bytes (at least one character if `atLeastOne`). */
function utf8Prefix(text: string, maxBytes: number, atLeastOne: boolean): { text: string; bytes: number } {
  let length = 0;
  let bytes = 0;
  for (const char of text) {
    const charBytes = Buffer.byteLength(char);
    if (bytes + charBytes > maxBytes && !(atLeastOne && length === 0)) break;
    length += char.length;
    bytes += charBytes;
  }
  return { text: text.slice(0, length), bytes };
}

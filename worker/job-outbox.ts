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
 * With `maxWaitingForLink`, the same merging happens while the link is busy: once that many chunks
 * wait for the link to take them (see {@link JobOutboxOptions.maxWaitingForLink}).
 *
 * Tool-call fragments and log-probabilities travel with their piece's text: merged pieces
 * concatenate their lists in order, and a piece split at `maxChunkBytes` is split between two of
 * its tokens (its log-probabilities name them), so every chunk's log-probabilities are those of
 * its own text. A piece's tool-call fragments leave with its last part, after its text.
 *
 * Once `bufferBytes` of output wait, push() returns a promise that settles when the window has taken
 * them: the job's loop awaits it, so the engine is read no faster than the consumer reads (the
 * openai engine's HTTP response stays unread and TCP pushes back on the engine; node-llama-cpp
 * evaluates the next token only when the loop asks for it).
 */
import type { TokenLogprob, ToolCallDelta } from "../common/generation.js";
import type { EnginePiece, TokenDetail } from "./engines/engine.js";

/** One JobChunk, without its job id. */
export interface OutgoingChunk {
  sequence: bigint;
  text: string;
  tokenCount: number;
  toolCalls: ToolCallDelta[];
  logprobs: TokenLogprob[];
  /**
   * Token details (JobChunk.token_details), present only when there are some: merged pieces
   * concatenate them, a split piece keeps them on its first part.
   */
  tokenDetails?: TokenDetail[];
}

/** Options of {@link JobOutbox}. */
export interface JobOutboxOptions {
  /** Chunks that may be sent beyond the last acknowledged one; 0 means no limit (a server without flow control). */
  window: number;
  /** The largest chunk text, in UTF-8 bytes; 0 means no limit. */
  maxChunkBytes: number;
  /**
   * How much output may wait for the window before push() makes the producer wait, in UTF-8 bytes
   * of text and tool-call fragments.
   */
  bufferBytes: number;
  /** Sends one chunk; called synchronously from push(), acknowledge() and taken(). */
  send: (chunk: OutgoingChunk) => void;
  /**
   * When set (above 0), the link reports with {@link JobOutbox.taken} each chunk it has taken for
   * writing, and at most this many sent chunks wait for it: what the engine produces beyond that
   * is merged into the next chunk. An engine faster than the link drains then gets several token
   * deltas per JobChunk, while a lone token (the link idle) still leaves at once.
   */
  maxWaitingForLink?: number;
}

interface PendingPiece {
  text: string;
  bytes: number;
  tokenCount: number;
  toolCalls: ToolCallDelta[];
  /** Bytes of the tool-call fragments, counted against `bufferBytes`. */
  toolCallBytes: number;
  logprobs: TokenLogprob[];
  tokenDetails: TokenDetail[];
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
  /** With `maxWaitingForLink`: chunks sent that the link has not taken yet. */
  private waitingForLink = 0;

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
    const toolCalls = piece.toolCalls ?? [];
    const logprobs = piece.logprobs ?? [];
    const tokenDetails = piece.tokenDetails ?? [];
    const empty =
      piece.text === "" &&
      piece.tokenCount === 0 &&
      toolCalls.length === 0 &&
      logprobs.length === 0 &&
      tokenDetails.length === 0;
    if (this.closed || empty) return undefined;
    const bytes = Buffer.byteLength(piece.text);
    const toolCallBytes = toolCalls.reduce(
      (sum, call) =>
        sum +
        Buffer.byteLength(call.arguments) +
        Buffer.byteLength(call.id ?? "") +
        Buffer.byteLength(call.name ?? ""),
      0,
    );
    this.pending.push({
      text: piece.text,
      bytes,
      tokenCount: piece.tokenCount,
      toolCalls,
      toolCallBytes,
      logprobs,
      tokenDetails,
    });
    this.pendingBytes += bytes + toolCallBytes;
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

  /** The link has taken a chunk for writing (with `maxWaitingForLink`): another may follow. */
  taken(): void {
    if (this.waitingForLink === 0) return;
    this.waitingForLink -= 1;
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
    while (this.pending.length > 0 && this.linkHasRoom() && this.hasRoom()) this.sendOne();
  }

  private linkHasRoom(): boolean {
    const max = this.options.maxWaitingForLink ?? 0;
    return max <= 0 || this.waitingForLink < max;
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
    let taken = 0;
    const toolCalls: ToolCallDelta[] = [];
    const logprobs: TokenLogprob[] = [];
    const tokenDetails: TokenDetail[] = [];
    for (let head = this.pending[0]; head; head = this.pending[0]) {
      if (bytes + head.bytes <= maxBytes) {
        text += head.text;
        bytes += head.bytes;
        tokenCount += head.tokenCount;
        toolCalls.push(...head.toolCalls);
        logprobs.push(...head.logprobs);
        tokenDetails.push(...head.tokenDetails);
        taken += head.bytes + head.toolCallBytes;
        this.pending.shift();
        continue;
      }
      // The piece does not fit: its first characters fill the chunk (at least one character, so a
      // limit below one character's size cannot stall the job).
      const part = splitPiece(head, maxBytes - bytes, bytes === 0);
      if (part.bytes === 0) break;
      text += part.text;
      bytes += part.bytes;
      tokenCount += part.tokenCount;
      logprobs.push(...part.logprobs);
      // Token details are not cut: they leave with the first part (only the job's whole sequence
      // of tokens has to match its whole text).
      tokenDetails.push(...head.tokenDetails.splice(0));
      taken += part.bytes;
      head.text = head.text.slice(part.text.length);
      head.bytes -= part.bytes;
      head.tokenCount -= part.tokenCount;
      head.logprobs = head.logprobs.slice(part.logprobs.length);
      break;
    }
    this.pendingBytes -= taken;
    this.sent += 1n;
    this.tokens += tokenCount;
    // Before send(): a link may report the chunk taken at once.
    if ((this.options.maxWaitingForLink ?? 0) > 0) this.waitingForLink += 1;
    this.options.send({
      sequence: this.sent,
      text,
      tokenCount,
      toolCalls,
      logprobs,
      ...(tokenDetails.length > 0 ? { tokenDetails } : {}),
    });
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

/**
 * The first part of a piece that does not fit a chunk: at most `maxBytes` UTF-8 bytes of its text
 * (at least one character, or token, if `atLeastOne`), with the tokens that produced it.
 */
function splitPiece(
  piece: PendingPiece,
  maxBytes: number,
  atLeastOne: boolean,
): { text: string; bytes: number; tokenCount: number; logprobs: TokenLogprob[] } {
  if (piece.logprobs.length > 0 && piece.logprobs.map((entry) => entry.token).join("") === piece.text) {
    // The piece's tokens are known: cut between two of them, so each part keeps its own tokens'
    // log-probabilities.
    let length = 0;
    let bytes = 0;
    let count = 0;
    for (const entry of piece.logprobs) {
      const entryBytes = Buffer.byteLength(entry.token);
      if (bytes + entryBytes > maxBytes) break;
      length += entry.token.length;
      bytes += entryBytes;
      count += 1;
    }
    if (count > 0 || !atLeastOne) {
      return {
        text: piece.text.slice(0, length),
        bytes,
        tokenCount: Math.min(piece.tokenCount, count),
        logprobs: piece.logprobs.slice(0, count),
      };
    }
    // A single token longer than a chunk: the chunk limit wins, and the token's log-probability
    // goes with its first characters.
    const part = utf8Prefix(piece.text, maxBytes, true);
    return { ...part, tokenCount: Math.min(piece.tokenCount, 1), logprobs: piece.logprobs.slice(0, 1) };
  }
  // Log-probabilities that do not spell the text cannot be divided: they stay with the piece's
  // first part, the start of the text they describe.
  const part = utf8Prefix(piece.text, maxBytes, atLeastOne);
  // Tokens follow the text, each at least one byte, so the part carries at most its size.
  const tokenCount = Math.min(piece.tokenCount, part.bytes);
  return { ...part, tokenCount, logprobs: part.bytes > 0 ? piece.logprobs : [] };
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

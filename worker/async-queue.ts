/**
 * A minimal unbounded async queue: producers `push()`, one consumer iterates with `for await` (or
 * calls `shift()`). `close()` ends the iteration once the buffered items are drained; pushes after
 * close are dropped and reported by the `false` return value.
 *
 * The worker link uses it as the request side of the bidirectional Connect stream: connect-es reads
 * the request messages from an AsyncIterable, so every message the worker sends goes through here.
 */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private readonly waiters: Array<(result: IteratorResult<T, undefined>) => void> = [];
  private isClosed = false;

  /** True once `close()` was called (buffered items may still be pending). */
  get closed(): boolean {
    return this.isClosed;
  }

  /** Number of buffered items not yet consumed. */
  get size(): number {
    return this.items.length;
  }

  /** Enqueues an item. Returns false (and drops the item) when the queue is closed. */
  push(item: T): boolean {
    if (this.isClosed) return false;
    const waiter = this.waiters.shift();
    if (waiter) waiter({ value: item, done: false });
    else this.items.push(item);
    return true;
  }

  /** Ends the queue: consumers get the buffered items, then `done`. Idempotent. */
  close(): void {
    if (this.isClosed) return;
    this.isClosed = true;
    for (const waiter of this.waiters.splice(0)) waiter({ value: undefined, done: true });
  }

  /** Resolves with the next item, or `done` when the queue is closed and empty. */
  shift(): Promise<IteratorResult<T, undefined>> {
    if (this.items.length > 0) {
      return Promise.resolve({ value: this.items.shift() as T, done: false });
    }
    if (this.isClosed) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  /**
   * Iterates until the queue is closed. It is an async generator on purpose: connect-es requires
   * the request iterable of a streaming call to implement `throw()` (it fails the call with
   * "AsyncIterable does not implement throw" otherwise). Ending the iteration early closes the queue.
   */
  async *[Symbol.asyncIterator](): AsyncGenerator<T, void, undefined> {
    try {
      for (;;) {
        const step = await this.shift();
        if (step.done) return;
        yield step.value;
      }
    } finally {
      this.close();
    }
  }
}

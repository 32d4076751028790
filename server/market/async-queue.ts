/**
 * A single-consumer queue that is also an async iterable: producers `push` and `end`, the consumer
 * iterates. Bounded: a push past `limit` buffered items throws, so a stalled consumer can never
 * make a producer grow memory without end (the caller decides what overflow means).
 */
export class AsyncQueue<T> implements AsyncIterable<T> {
  private readonly items: T[] = [];
  private waiting: ((result: IteratorResult<T>) => void) | null = null;
  private ended = false;

  constructor(private readonly limit = 10_000) {}

  get size(): number {
    return this.items.length;
  }

  get isEnded(): boolean {
    return this.ended;
  }

  push(item: T): void {
    if (this.ended) return;
    if (this.waiting) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve({ value: item, done: false });
      return;
    }
    if (this.items.length >= this.limit) {
      throw new Error(`queue overflow: more than ${this.limit} items waiting for a stalled consumer`);
    }
    this.items.push(item);
  }

  /**
   * No more items; the consumer still receives those already queued, then `last` if given (a
   * final item is accepted past the limit, so a terminal event is never lost).
   */
  end(last?: T): void {
    if (this.ended) return;
    if (last !== undefined) {
      if (this.waiting) this.push(last);
      else this.items.push(last);
    }
    this.ended = true;
    if (this.waiting && this.items.length === 0) {
      const resolve = this.waiting;
      this.waiting = null;
      resolve({ value: undefined, done: true });
    }
  }

  next(): Promise<IteratorResult<T>> {
    if (this.items.length > 0) return Promise.resolve({ value: this.items.shift() as T, done: false });
    if (this.ended) return Promise.resolve({ value: undefined, done: true });
    return new Promise((resolve) => {
      this.waiting = resolve;
    });
  }

  [Symbol.asyncIterator](): AsyncIterator<T> {
    return { next: () => this.next() };
  }
}

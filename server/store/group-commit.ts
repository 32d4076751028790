/**
 * Group commit: operations submitted by concurrent callers are run in batches, one database
 * transaction (one commit, one fsync) per batch, the way TigerBeetle batches transfers.
 *
 * Batching is natural, not timed: an idle committer runs what it has at once (a lone operation
 * pays no wait); while a batch is in flight the next one collects. The wait is bounded: when the
 * oldest collected operation has waited `maxWaitMs`, or `maxBatch` have collected, another batch
 * starts alongside the one in flight (up to `maxInFlight` at once), so batching never adds more
 * than `maxWaitMs` to an operation unless the database itself is saturated.
 *
 * `runBatch` answers each item separately (a business refusal is a result, not an error). When a
 * batch fails as a whole (a database error), every item of it is run again on its own, so one
 * bad item fails only its own caller and the others commit.
 */

export interface GroupCommitOptions<Item, Result> {
  /** Runs the items as one transaction; returns one result per item, in the same order. */
  runBatch(items: Item[]): Promise<Result[]>;
  /** The most items in one batch. */
  maxBatch?: number;
  /** The longest an item waits for a batch in flight before another batch starts alongside. */
  maxWaitMs?: number;
  /** The most batches in flight at once. */
  maxInFlight?: number;
  /**
   * Called with a batch's size just before it runs; the batch waits for the returned promise.
   * For tests, which hold a batch in flight on it to force an interleaving.
   */
  beforeBatch?: (size: number) => Promise<void> | void;
}

export const DEFAULT_MAX_BATCH = 128;
export const DEFAULT_MAX_WAIT_MS = 5;
export const DEFAULT_MAX_IN_FLIGHT = 4;

interface Waiting<Item, Result> {
  item: Item;
  since: number;
  resolve(result: Result): void;
  reject(error: unknown): void;
}

export class GroupCommitter<Item, Result> {
  private readonly maxBatch: number;
  private readonly maxWaitMs: number;
  private readonly maxInFlight: number;
  private readonly queue: Waiting<Item, Result>[] = [];
  private inFlight = 0;
  private pumpQueued = false;
  private timer: NodeJS.Timeout | null = null;
  private readonly batches = new Set<Promise<void>>();

  constructor(private readonly options: GroupCommitOptions<Item, Result>) {
    this.maxBatch = positiveInteger("maxBatch", options.maxBatch ?? DEFAULT_MAX_BATCH);
    this.maxInFlight = positiveInteger("maxInFlight", options.maxInFlight ?? DEFAULT_MAX_IN_FLIGHT);
    this.maxWaitMs = options.maxWaitMs ?? DEFAULT_MAX_WAIT_MS;
    if (!(this.maxWaitMs >= 0))
      throw new Error(`maxWaitMs must be a non-negative number, got ${this.maxWaitMs}.`);
  }

  /** Runs `item` in the next batch; settles with its own result or error. */
  submit(item: Item): Promise<Result> {
    return new Promise<Result>((resolve, reject) => {
      this.queue.push({ item, since: performance.now(), resolve, reject });
      // After the current synchronous burst, so operations submitted together share a batch.
      if (!this.pumpQueued) {
        this.pumpQueued = true;
        queueMicrotask(() => {
          this.pumpQueued = false;
          this.pump();
        });
      }
    });
  }

  /** Resolves once every submitted item has been answered. */
  async drain(): Promise<void> {
    for (;;) {
      // With nothing in flight, pump starts whatever is queued.
      this.pump();
      if (this.batches.size === 0) return;
      await Promise.allSettled([...this.batches]);
    }
  }

  private pump(): void {
    if (this.timer) {
      clearTimeout(this.timer);
      this.timer = null;
    }
    while (this.queue.length > 0 && this.inFlight < this.maxInFlight) {
      const oldest = this.queue[0] as Waiting<Item, Result>;
      const waited = performance.now() - oldest.since;
      if (this.inFlight === 0 || this.queue.length >= this.maxBatch || waited >= this.maxWaitMs) {
        this.startBatch();
        continue;
      }
      // A batch is in flight: collect until it ends or the oldest has waited long enough.
      this.timer = setTimeout(() => {
        this.timer = null;
        this.pump();
      }, this.maxWaitMs - waited);
      return;
    }
  }

  private startBatch(): void {
    const batch = this.queue.splice(0, this.maxBatch);
    this.inFlight++;
    const running = this.run(batch).finally(() => {
      this.inFlight--;
      this.batches.delete(running);
      this.pump();
    });
    this.batches.add(running);
  }

  private async run(batch: Waiting<Item, Result>[]): Promise<void> {
    let results: Result[];
    try {
      await this.options.beforeBatch?.(batch.length);
      results = await this.options.runBatch(batch.map((waiting) => waiting.item));
      if (results.length !== batch.length) {
        throw new Error(`A batch of ${batch.length} returned ${results.length} results.`);
      }
    } catch (error) {
      if (batch.length === 1) {
        (batch[0] as Waiting<Item, Result>).reject(error);
        return;
      }
      // The whole batch was rolled back: each item on its own, so only a bad one fails.
      await Promise.all(batch.map((waiting) => this.runAlone(waiting)));
      return;
    }
    batch.forEach((waiting, i) => {
      waiting.resolve(results[i] as Result);
    });
  }

  private async runAlone(waiting: Waiting<Item, Result>): Promise<void> {
    try {
      const [result] = await this.options.runBatch([waiting.item]);
      waiting.resolve(result as Result);
    } catch (error) {
      waiting.reject(error);
    }
  }
}

function positiveInteger(name: string, value: number): number {
  if (!(Number.isInteger(value) && value > 0))
    throw new Error(`${name} must be a positive integer, got ${value}.`);
  return value;
}

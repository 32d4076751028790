/**
 * Requests waiting for a free slot, one bounded FIFO per model. A waiter brings its own
 * `tryAcquire` (it matches and reserves synchronously, with the request's own constraints); when a
 * slot may have freed up for a model, the waiters are offered it in arrival order and the first
 * one that can use it takes it. A waiter leaves with a slot, on its timeout, when its consumer goes
 * away, or when the queue is shut.
 */
import { MarketError } from "./errors.js";

interface Waiter<T> {
  tryAcquire(): T | null;
  resolve(value: T): void;
  reject(error: unknown): void;
}

export interface AdmissionQueueOptions {
  /** Waiters per model at most. */
  maxWaiting: number;
  /** How long a waiter waits before a 503. */
  timeoutMs: number;
}

/** Retry-After for a queue that is full or timed out: a short, honest hint. */
const RETRY_AFTER_SECONDS = 2;

export class AdmissionQueue {
  private readonly queues = new Map<string, Waiter<unknown>[]>();
  private closedWith: MarketError | null = null;

  constructor(private readonly options: AdmissionQueueOptions) {}

  /**
   * Takes a slot at once when `tryAcquire` finds one and nobody is waiting before us; otherwise
   * waits in the model's queue. Rejects with MarketError "no_capacity" (Retry-After) when the queue
   * is full or the wait times out, and "cancelled" when `signal` aborts.
   */
  acquire<T>(model: string, tryAcquire: () => T | null, signal?: AbortSignal): Promise<T> {
    if (this.closedWith) return Promise.reject(this.closedWith);
    if (signal?.aborted) return Promise.reject(consumerGone());
    const queue = this.queues.get(model) ?? [];
    if (queue.length === 0) {
      const value = tryAcquire();
      if (value !== null) return Promise.resolve(value);
    }
    if (queue.length >= this.options.maxWaiting) {
      return Promise.reject(
        new MarketError(
          "no_capacity",
          `Every worker for '${model}' is busy and ${queue.length} requests are already waiting; try again shortly.`,
          "model",
          RETRY_AFTER_SECONDS,
        ),
      );
    }
    return new Promise<T>((resolve, reject) => {
      const leave = () => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
        const current = this.queues.get(model);
        const index = current?.indexOf(waiter as Waiter<unknown>) ?? -1;
        if (current && index >= 0) current.splice(index, 1);
        if (current?.length === 0) this.queues.delete(model);
      };
      const waiter: Waiter<T> = {
        tryAcquire,
        resolve: (value) => {
          leave();
          resolve(value);
        },
        reject: (error) => {
          leave();
          reject(error);
        },
      };
      const onAbort = () => waiter.reject(consumerGone());
      const timer = setTimeout(
        () =>
          waiter.reject(
            new MarketError(
              "no_capacity",
              `Every worker for '${model}' stayed busy for ${this.options.timeoutMs} ms; try again shortly.`,
              "model",
              RETRY_AFTER_SECONDS,
            ),
          ),
        this.options.timeoutMs,
      );
      timer.unref();
      signal?.addEventListener("abort", onAbort, { once: true });
      queue.push(waiter as Waiter<unknown>);
      this.queues.set(model, queue);
    });
  }

  /**
   * A slot may be free for these models: offer it to their waiters, oldest first. `hasFreeSlot`
   * (when given) says cheaply whether any slot for the model could still be reserved; the offer
   * stops as soon as none can. It may answer true when a waiter's own constraints then find
   * nothing (that waiter just keeps waiting), never false while a slot is free. Without it, a
   * freed slot cost one full match per waiter: with dozens waiting, most of the work of a busy
   * market.
   */
  offer(models: Iterable<string>, hasFreeSlot?: (model: string) => boolean): void {
    for (const model of models) {
      for (const waiter of [...(this.queues.get(model) ?? [])]) {
        if (hasFreeSlot && !hasFreeSlot(model)) break;
        let value: unknown;
        try {
          value = waiter.tryAcquire();
        } catch (error) {
          waiter.reject(error);
          continue;
        }
        if (value !== null) waiter.resolve(value);
      }
    }
  }

  /** Refuses every waiter and every later request with `error` (graceful shutdown). */
  close(error: MarketError): void {
    this.closedWith = error;
    for (const queue of [...this.queues.values()]) for (const waiter of [...queue]) waiter.reject(error);
  }
}

function consumerGone(): MarketError {
  return new MarketError("cancelled", "The consumer went away while the request was waiting.");
}

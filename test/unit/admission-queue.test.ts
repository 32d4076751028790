/**
 * The admission queue offers a freed slot to its waiters oldest first, and stops as soon as the
 * registry says no slot for the model is left, instead of matching every waiter; a waiter whose
 * own constraints find nothing does not stop the offer for the ones behind it.
 */
import { describe, expect, it } from "vitest";
import { AdmissionQueue } from "../../server/market/admission-queue.js";
import { MarketError } from "../../server/market/errors.js";
import { NO_CAPABILITIES, type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";

function connection(
  workerId: string,
  fields: { model?: string; maxConcurrency?: number; activeJobs?: number; draining?: boolean } = {},
): WorkerConnection {
  return {
    workerId,
    providerAccountId: "acct_provider",
    name: workerId,
    draining: fields.draining ?? false,
    activeJobs: fields.activeJobs ?? 0,
    offers: [
      {
        model: fields.model ?? "m",
        pricePerMillionInput: 1n,
        pricePerMillionOutput: 1n,
        advertisedTokensPerSecond: 10,
        maxConcurrency: fields.maxConcurrency ?? 1,
        contextLength: 0,
        quantization: "",
        engine: "",
        capabilities: { ...NO_CAPABILITIES },
      },
    ],
    reserve: () => null,
  };
}

/** A pool of `slots` slots that waiters reserve from, counting every attempt. */
function slotPool(slots: number) {
  const pool = { free: slots, attempts: 0 };
  const tryAcquire =
    (accepts = true) =>
    () => {
      pool.attempts++;
      if (!accepts || pool.free === 0) return null;
      pool.free--;
      return "slot";
    };
  return { pool, tryAcquire };
}

describe("the admission queue", () => {
  it("stops offering a freed slot once no slot is left, instead of matching every waiter", async () => {
    const queue = new AdmissionQueue({ maxWaiting: 100, timeoutMs: 60_000 });
    const { pool, tryAcquire } = slotPool(0);
    const served: number[] = [];
    const waiting = Array.from({ length: 40 }, (_, i) =>
      queue.acquire("m", tryAcquire()).then(() => served.push(i)),
    );
    expect(pool.attempts).toBe(1); // the first one tried at once; the rest queued behind it

    pool.attempts = 0;
    pool.free = 1;
    queue.offer(["m"], () => pool.free > 0);
    await Promise.resolve();
    expect(served).toEqual([0]);
    expect(pool.attempts).toBe(1);

    // Without the check every waiter is matched, although only one could be served.
    pool.attempts = 0;
    pool.free = 1;
    queue.offer(["m"]);
    await Promise.resolve();
    expect(served).toEqual([0, 1]);
    expect(pool.attempts).toBe(39);

    pool.free = 38;
    queue.offer(["m"], () => pool.free > 0);
    await Promise.all(waiting);
    expect(served).toHaveLength(40);
  });

  it("goes on past a waiter whose own constraints find nothing while slots are left", async () => {
    const queue = new AdmissionQueue({ maxWaiting: 100, timeoutMs: 60_000 });
    const { pool, tryAcquire } = slotPool(0);
    const picky = queue.acquire("m", tryAcquire(false));
    let pickyServed = false;
    picky.then(
      () => {
        pickyServed = true;
      },
      () => {},
    );
    const other = queue.acquire("m", tryAcquire());
    pool.free = 1;
    queue.offer(["m"], () => pool.free > 0);
    await expect(other).resolves.toBe("slot");
    expect(pickyServed).toBe(false);
    expect(pool.free).toBe(0);
    queue.close(new MarketError("shutting_down", "bye"));
    await expect(picky).rejects.toThrow("bye");
  });
});

describe("WorkerRegistry.hasFreeSlot", () => {
  it("is true exactly when a worker offering the model, not draining, has a slot left", () => {
    const registry = new WorkerRegistry();
    expect(registry.hasFreeSlot("m")).toBe(false);
    registry.register(connection("full", { maxConcurrency: 2, activeJobs: 2 }));
    registry.register(connection("draining", { draining: true }));
    registry.register(connection("other-model", { model: "other" }));
    expect(registry.hasFreeSlot("m")).toBe(false);
    expect(registry.hasFreeSlot("other")).toBe(true);
    // max_concurrency 0 is read as one slot, as reserve() reads it.
    registry.register(connection("zero", { maxConcurrency: 0 }));
    expect(registry.hasFreeSlot("m")).toBe(true);
    registry.register(connection("zero", { maxConcurrency: 0, activeJobs: 1 }));
    expect(registry.hasFreeSlot("m")).toBe(false);
  });
});

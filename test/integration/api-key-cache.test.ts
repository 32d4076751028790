/**
 * ApiKeyCache in front of the real store (embedded PGlite, or PostgreSQL with DATABASE_URL). The
 * store's authenticateApiKey and findActiveApiKeys are wrapped only to count the calls that reach
 * the database (and to make the batch fail or wait); the cache's clock is a plain number the tests
 * move, and its timer is off: the tests call revalidate() where the timer would.
 */
import { afterAll, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { ApiKeyCache, type AuthenticatedKey } from "../../server/http/api-key-cache.js";
import type { SqlMarketStore } from "../../server/store/market-store.js";
import { openTestStore, type TestStore } from "../support/database.js";

let testStore: TestStore;
let store: SqlMarketStore;

beforeAll(async () => {
  testStore = await openTestStore();
  store = testStore.store;
}, 60_000);

afterAll(async () => {
  await testStore?.close();
}, 60_000);

let clock: number;
let lookups: string[];
/** The size of each revalidation batch that reached the store. */
let batches: number[];
/** Holds the store's answers back while set, to interleave a lookup with other events. */
let gate: Promise<void> | undefined;
/** Holds revalidation answers back while set. */
let batchGate: Promise<void> | undefined;
let batchFails: boolean;
let warnings: string[];

beforeEach(() => {
  clock = 10_000;
  lookups = [];
  batches = [];
  gate = undefined;
  batchGate = undefined;
  batchFails = false;
  warnings = [];
});

function cache(options: { maxKeys?: number; maxRefusedKeys?: number } = {}): ApiKeyCache {
  return new ApiKeyCache({
    store: {
      async authenticateApiKey(secret: string) {
        lookups.push(secret);
        const found = await store.authenticateApiKey(secret);
        await gate;
        return found;
      },
      async findActiveApiKeys(secretHashes: readonly string[]) {
        batches.push(secretHashes.length);
        if (batchFails) throw new Error("database unavailable");
        const found = await store.findActiveApiKeys(secretHashes);
        await batchGate;
        return found;
      },
    },
    now: () => clock,
    revalidateEveryMs: 0,
    log: { warn: (_details, message) => warnings.push(message) },
    ...options,
  });
}

async function newKey(name = "consumer") {
  const account = await store.createAccount({ name });
  const { key, secret } = await store.createApiKey(account.id, "default");
  return { account, keyId: key.id, secret };
}

function openGate(): () => void {
  let release = () => {};
  gate = new Promise<void>((resolve) => {
    release = resolve;
  });
  return release;
}

describe("ApiKeyCache", () => {
  it("authenticates a key from the store once, then from memory until it is a second old", async () => {
    const keys = cache();
    const { account, keyId, secret } = await newKey();

    const first = await keys.authenticate(secret);
    expect(first).toEqual<AuthenticatedKey>({ account, keyId });
    expect(lookups).toHaveLength(1);

    clock += 999;
    expect(await keys.authenticate(secret)).toEqual(first);
    expect(lookups).toHaveLength(1);

    clock += 1;
    expect(await keys.authenticate(secret)).toEqual(first);
    expect(lookups).toHaveLength(2);
  });

  it("refuses a revoked key once its answer is a second old", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    expect((await keys.authenticate(secret))?.keyId).toBe(keyId);

    await store.revokeApiKey(keyId);
    clock += 999;
    // The documented staleness: for up to a second, the revocation is not seen.
    expect((await keys.authenticate(secret))?.keyId).toBe(keyId);
    clock += 1;
    expect(await keys.authenticate(secret)).toBeNull();
    expect(lookups).toHaveLength(2);
  });

  it("refuses a key revoked through this server at once, and sees new defaults at once", async () => {
    const keys = cache();
    const { account, keyId, secret } = await newKey();
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({});
    await store.updateAccountDefaults(account.id, { minTokensPerSecond: 5 });
    keys.forgetAccount(account.id);
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({ minTokensPerSecond: 5 });

    await store.revokeApiKey(keyId);
    keys.forgetKey(keyId);
    // No time passes: the revocation is seen by the very next request.
    expect(await keys.authenticate(secret)).toBeNull();
  });

  it("sees an account's new routing defaults once its answer is a second old", async () => {
    const keys = cache();
    const { account, secret } = await newKey();
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({});

    await store.updateAccountDefaults(account.id, { minTokensPerSecond: 20 });
    clock += 500;
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({});
    clock += 500;
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({ minTokensPerSecond: 20 });
  });

  it("refuses an unknown key, asking the store again only after a second", async () => {
    const keys = cache();
    const { secret } = await newKey();
    const unknown = `${secret.slice(0, -4)}AAAA`;

    expect(await keys.authenticate(unknown)).toBeNull();
    clock += 999;
    expect(await keys.authenticate(unknown)).toBeNull();
    expect(lookups).toEqual([unknown]);
    clock += 1;
    expect(await keys.authenticate(unknown)).toBeNull();
    expect(lookups).toEqual([unknown, unknown]);
  });

  it("authenticates a key created a moment after refusals, at once", async () => {
    const keys = cache();
    const { secret: existing } = await newKey();
    expect(await keys.authenticate(`${existing}x`)).toBeNull();

    const { keyId, secret } = await newKey();
    expect((await keys.authenticate(secret))?.keyId).toBe(keyId);
  });

  it("shares one lookup between concurrent requests with the same key", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    const release = openGate();

    const first = keys.authenticate(secret);
    const second = keys.authenticate(secret);
    release();
    expect((await first)?.keyId).toBe(keyId);
    expect((await second)?.keyId).toBe(keyId);
    expect(lookups).toHaveLength(1);
  });

  it("dates an answer from the start of its lookup, so a slow lookup does not stretch the second", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    const release = openGate();

    const found = keys.authenticate(secret);
    // The lookup takes 900 ms: its answer is then only good for 100 ms more.
    clock += 900;
    release();
    expect((await found)?.keyId).toBe(keyId);

    gate = undefined;
    clock += 100;
    await keys.authenticate(secret);
    expect(lookups).toHaveLength(2);
  });

  it("remembers nothing from a failed lookup", async () => {
    let failing = true;
    const keys = new ApiKeyCache({
      store: {
        authenticateApiKey(secret: string) {
          lookups.push(secret);
          if (failing) return Promise.reject(new Error("database unavailable"));
          return store.authenticateApiKey(secret);
        },
        findActiveApiKeys: (hashes) => store.findActiveApiKeys(hashes),
      },
      now: () => clock,
      revalidateEveryMs: 0,
    });
    const { keyId, secret } = await newKey();

    await expect(keys.authenticate(secret)).rejects.toThrow("database unavailable");
    failing = false;
    expect((await keys.authenticate(secret))?.keyId).toBe(keyId);
    expect(lookups).toHaveLength(2);
  });

  it("drops the least recently used key past its bound", async () => {
    const keys = cache({ maxKeys: 2 });
    const a = await newKey("a");
    const b = await newKey("b");
    const c = await newKey("c");

    await keys.authenticate(a.secret);
    await keys.authenticate(b.secret);
    await keys.authenticate(a.secret);
    await keys.authenticate(c.secret);
    expect(lookups).toEqual([a.secret, b.secret, c.secret]);

    // b was used least recently, so it went when c came in; a and c are still held.
    expect((await keys.authenticate(a.secret))?.keyId).toBe(a.keyId);
    expect((await keys.authenticate(c.secret))?.keyId).toBe(c.keyId);
    expect(lookups).toHaveLength(3);
    expect((await keys.authenticate(b.secret))?.keyId).toBe(b.keyId);
    expect(lookups).toEqual([a.secret, b.secret, c.secret, b.secret]);
  });

  it("keeps refusals apart, so a flood of bad keys does not push a good one out", async () => {
    const keys = cache({ maxKeys: 1, maxRefusedKeys: 2 });
    const good = await newKey();
    await keys.authenticate(good.secret);

    const bad = ["sk-llm-bad-1", "sk-llm-bad-2", "sk-llm-bad-3"];
    for (const secret of bad) expect(await keys.authenticate(secret)).toBeNull();
    expect((await keys.authenticate(good.secret))?.keyId).toBe(good.keyId);
    expect(lookups).toEqual([good.secret, ...bad]);

    // Only the two most recent refusals are remembered.
    const [first, second, third] = bad;
    for (const secret of [second, third, first]) expect(await keys.authenticate(String(secret))).toBeNull();
    expect(lookups).toEqual([good.secret, ...bad, first]);
  });
});

describe("ApiKeyCache revalidation", () => {
  /** Uses the key every 50 ms for `ms` of fake time, revalidating every 400 ms as the timer would. */
  async function useFor(keys: ApiKeyCache, secret: string, ms: number, from = 0) {
    const answers: (AuthenticatedKey | null)[] = [];
    for (let t = from + 50; t <= from + ms; t += 50) {
      clock += 50;
      if (t % 400 === 0) await keys.revalidate();
      answers.push(await keys.authenticate(secret));
    }
    return answers;
  }

  it("keeps a key in constant use warm with one query per revalidation, never a lookup", async () => {
    const keys = cache();
    const { account, keyId, secret } = await newKey();
    expect(await keys.authenticate(secret)).toEqual({ account, keyId });
    expect(lookups).toHaveLength(1);

    const answers = await useFor(keys, secret, 3_000);
    expect(answers.every((found) => found?.keyId === keyId)).toBe(true);
    // No request waited for the database after the first: revalidation kept the answer young.
    expect(lookups).toHaveLength(1);
    expect(batches).toEqual([1, 1, 1, 1, 1, 1, 1]);
    expect(lookups.length + batches.length).toBeLessThanOrEqual(Math.ceil(3_000 / 400) + 1);
  });

  it("revalidates all recently used keys in one query, and lets idle ones age out", async () => {
    const keys = cache();
    const a = await newKey("a");
    const b = await newKey("b");
    const idle = await newKey("idle");
    await keys.authenticate(idle.secret);
    clock += 5_000;
    await keys.authenticate(a.secret);
    await keys.authenticate(b.secret);

    await keys.revalidate();
    expect(batches).toEqual([2]);
    clock += 5_000;
    await keys.revalidate();
    // Nobody used a key for 5 s: nothing is asked.
    expect(batches).toEqual([2]);
  });

  it("refuses a key revoked in the database at the next revalidation", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    await useFor(keys, secret, 800);
    await store.revokeApiKey(keyId);
    // The revocation is at fake time 800+; the next revalidation is at 1200.
    const answers = await useFor(keys, secret, 1_000, 800);
    const refusedFrom = answers.indexOf(null);
    expect(refusedFrom).toBe(7);
    expect(answers.slice(refusedFrom).every((found) => found === null)).toBe(true);
    // The refusal came from the batch and is remembered: no request looked the key up.
    expect(lookups).toHaveLength(1);
  });

  it("refuses a revoked key within a second while revalidation fails, and only warns", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    await useFor(keys, secret, 800);
    // The last successful revalidation started at fake time 800 (clock 10_800).
    batchFails = true;
    await store.revokeApiKey(keyId);
    const failingAt = batches.length;

    clock += 999;
    await expect(keys.revalidate()).resolves.toBeUndefined();
    await expect(keys.revalidate()).resolves.toBeUndefined();
    expect(batches.length).toBe(failingAt + 2);
    expect((await keys.authenticate(secret))?.keyId).toBe(keyId);
    expect(lookups).toHaveLength(1);

    clock += 1;
    expect(await keys.authenticate(secret)).toBeNull();
    expect(lookups).toHaveLength(2);
    // Reported once for the streak of failures, not at every tick.
    expect(warnings).toHaveLength(1);
  });

  it("serves an account's new routing defaults after one revalidation", async () => {
    const keys = cache();
    const { account, keyId, secret } = await newKey();
    expect((await keys.authenticate(secret))?.account.defaults).toEqual({});

    const updated = await store.updateAccountDefaults(account.id, {
      maxPricePerMillionInput: 1_500_000n,
      maxPricePerMillionOutput: 9_007_199_254_740_993n,
      minTokensPerSecond: 12.5,
    });
    clock += 100;
    await keys.revalidate();
    expect(await keys.authenticate(secret)).toEqual({ account: updated, keyId });
    expect(await store.authenticateApiKey(secret)).toEqual({ account: updated, keyId });
    expect(lookups).toHaveLength(1);
  });

  it("does not bring back a key forgotten while a revalidation was under way", async () => {
    const keys = cache();
    const { keyId, secret } = await newKey();
    await keys.authenticate(secret);
    let release = () => {};
    batchGate = new Promise<void>((resolve) => {
      release = resolve;
    });

    const revalidation = keys.revalidate();
    await store.revokeApiKey(keyId);
    keys.forgetKey(keyId);
    release();
    await revalidation;
    // The batch read the key before its revocation; the forgetting stands.
    expect(await keys.authenticate(secret)).toBeNull();
    expect(lookups).toHaveLength(2);
  });

  it("stops revalidating once closed", async () => {
    const keys = cache();
    const { secret } = await newKey();
    await keys.authenticate(secret);
    await keys.close();
    await keys.revalidate();
    expect(batches).toEqual([]);
  });
});

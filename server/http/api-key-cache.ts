/**
 * API keys served from memory, so a request's authentication costs a hash and a map lookup instead
 * of two queries.
 *
 * An answer from the store is never served once it is `maxAgeMs` (1 s) old. So a revoked key is
 * refused, and an account's new routing defaults apply, at most a second after the change (plus
 * the time of the query that read the old row). A new key works at once: its secret is random, so
 * no refusal of it can have been remembered before it existed.
 *
 * So that a request does not wait for the database when its key's answer ages, the keys used in
 * the last `idleAfterMs` are revalidated together every `revalidateEveryMs` (400 ms), in one query:
 * the valid ones are dated afresh (with their account as it is now), the revoked ones become
 * refusals. A key not used for a while is left to age out, so the batch stays the size of the
 * working set. A failed revalidation changes nothing: answers age as if it had not run, and once
 * one is a second old its next request waits for its own lookup, as without revalidation.
 *
 * Keys are held by the store's hash of their secret (hashSecret), never the secret itself.
 * Refusals are remembered too (so one bad key repeated does not reach the database at every
 * request), in a map of their own, so a flood of bad keys cannot push the good ones out. Past their
 * bounds, the least recently used valid keys and the oldest refusals are dropped.
 */
import type { AccountRecord, MarketStore } from "../market/store-port.js";
import { hashSecret } from "../store/secrets.js";

export interface AuthenticatedKey {
  account: AccountRecord;
  keyId: string;
}

type KeyStore = Pick<MarketStore, "authenticateApiKey" | "findActiveApiKeys">;

export interface ApiKeyCacheOptions {
  store: KeyStore;
  /** How long the store's answer for a key is served before it is asked again. Default 1 s. */
  maxAgeMs?: number;
  /**
   * How often the recently used keys are revalidated in one query. Default 400 ms; 0 runs no timer
   * (revalidate() is then called by hand, as tests do).
   */
  revalidateEveryMs?: number;
  /** A key not used for this long is no longer revalidated and ages out. Default 5 s. */
  idleAfterMs?: number;
  /** Most valid keys kept; the least recently used are dropped first. Default 100,000. */
  maxKeys?: number;
  /** Most refused keys remembered; the least recently refused are dropped first. Default 10,000. */
  maxRefusedKeys?: number;
  /** Milliseconds on a monotonic clock. Default `performance.now`. */
  now?: () => number;
  /** Where a failing revalidation is reported (at warn, once until one succeeds again). */
  log?: { warn(details: object, message: string): void };
}

const DEFAULT_MAX_AGE_MS = 1_000;
const DEFAULT_REVALIDATE_EVERY_MS = 400;
const DEFAULT_IDLE_AFTER_MS = 5_000;
const DEFAULT_MAX_KEYS = 100_000;
const DEFAULT_MAX_REFUSED_KEYS = 10_000;

interface AcceptedKey {
  found: AuthenticatedKey;
  /** When the query that last found it started: the row it read is no older than this. */
  checkedAt: number;
  /** When a request last presented it. */
  usedAt: number;
}

export class ApiKeyCache {
  private readonly store: KeyStore;
  private readonly maxAgeMs: number;
  private readonly idleAfterMs: number;
  private readonly maxKeys: number;
  private readonly maxRefusedKeys: number;
  private readonly now: () => number;
  private readonly log: ApiKeyCacheOptions["log"];
  private readonly timer: NodeJS.Timeout | undefined;
  private revalidation: Promise<void> | undefined;
  /** Whether the last revalidation failed: a failing database is reported once, not every tick. */
  private failing = false;
  private closed = false;
  /** By secret hash, least recently used first (a Map iterates in insertion order). */
  private readonly accepted = new Map<string, AcceptedKey>();
  /** Secret hash → when the lookup that refused it started, oldest first. */
  private readonly refused = new Map<string, number>();
  /** One lookup per key at a time: concurrent requests with the same key share it. */
  private readonly lookups = new Map<string, Promise<AuthenticatedKey | null>>();

  constructor(options: ApiKeyCacheOptions) {
    this.store = options.store;
    this.maxAgeMs = options.maxAgeMs ?? DEFAULT_MAX_AGE_MS;
    this.maxKeys = options.maxKeys ?? DEFAULT_MAX_KEYS;
    this.maxRefusedKeys = options.maxRefusedKeys ?? DEFAULT_MAX_REFUSED_KEYS;
    this.now = options.now ?? (() => performance.now());
    this.idleAfterMs = options.idleAfterMs ?? DEFAULT_IDLE_AFTER_MS;
    this.log = options.log;
    const every = options.revalidateEveryMs ?? DEFAULT_REVALIDATE_EVERY_MS;
    if (every > 0) {
      this.timer = setInterval(() => void this.revalidate(), every);
      // Revalidation only saves requests a wait: it never keeps the process alive.
      this.timer.unref();
    }
  }

  /** The key's account and id, or null for a key that is unknown or revoked. */
  async authenticate(secret: string): Promise<AuthenticatedKey | null> {
    const hash = hashSecret(secret);
    const now = this.now();
    const accepted = this.accepted.get(hash);
    if (accepted && now - accepted.checkedAt < this.maxAgeMs) {
      accepted.usedAt = now;
      this.accepted.delete(hash);
      this.accepted.set(hash, accepted);
      return accepted.found;
    }
    const refusedAt = this.refused.get(hash);
    if (refusedAt !== undefined && now - refusedAt < this.maxAgeMs) return null;
    return this.lookup(hash, secret, now);
  }

  /**
   * Forgets a key at once (it was just revoked here): its next request asks the store. A lookup
   * already under way may still answer with the old row, for at most maxAgeMs after it started.
   */
  forgetKey(keyId: string): void {
    for (const [hash, entry] of this.accepted) if (entry.found.keyId === keyId) this.accepted.delete(hash);
  }

  /** Forgets an account's keys at once (its routing defaults just changed here). */
  forgetAccount(accountId: string): void {
    for (const [hash, entry] of this.accepted) {
      if (entry.found.account.id === accountId) this.accepted.delete(hash);
    }
  }

  /**
   * Revalidates the keys used in the last idleAfterMs, in one query; the timer calls it. Never
   * rejects: on failure the answers just age. A call while one runs shares it.
   */
  revalidate(): Promise<void> {
    if (this.closed) return Promise.resolve();
    this.revalidation ??= this.revalidateOnce().finally(() => {
      this.revalidation = undefined;
    });
    return this.revalidation;
  }

  /** Stops the revalidation timer; resolves once a revalidation under way has finished. */
  async close(): Promise<void> {
    this.closed = true;
    clearInterval(this.timer);
    await this.revalidation;
  }

  private async revalidateOnce(): Promise<void> {
    const startedAt = this.now();
    const batch = new Map<string, AcceptedKey>();
    for (const [hash, entry] of this.accepted) {
      if (startedAt - entry.usedAt < this.idleAfterMs) batch.set(hash, entry);
    }
    if (batch.size === 0) return;
    let found: Map<string, AuthenticatedKey>;
    try {
      found = await this.store.findActiveApiKeys([...batch.keys()]);
    } catch (error) {
      if (!this.failing) {
        this.log?.warn(
          { err: String(error), keys: batch.size },
          "revalidating API keys failed; their answers age out and requests look them up again",
        );
      }
      this.failing = true;
      return;
    }
    this.failing = false;
    for (const [hash, entry] of batch) {
      // Forgotten (revoked or changed here) or replaced by a newer lookup meanwhile: that stands.
      if (this.accepted.get(hash) !== entry) continue;
      const current = found.get(hash);
      if (current) {
        entry.found = current;
        entry.checkedAt = startedAt;
      } else {
        // Revoked: a revoked key never comes back, so this is remembered as a refusal.
        this.accepted.delete(hash);
        this.refused.delete(hash);
        this.refused.set(hash, startedAt);
        dropOldest(this.refused, this.maxRefusedKeys);
      }
    }
  }

  private lookup(hash: string, secret: string, startedAt: number): Promise<AuthenticatedKey | null> {
    const inFlight = this.lookups.get(hash);
    if (inFlight) return inFlight;
    // A failed lookup remembers nothing: the next request asks the store again.
    const lookup = this.store
      .authenticateApiKey(secret)
      .then((found) => {
        this.remember(hash, found, startedAt);
        return found;
      })
      .finally(() => this.lookups.delete(hash));
    this.lookups.set(hash, lookup);
    return lookup;
  }

  private remember(hash: string, found: AuthenticatedKey | null, checkedAt: number): void {
    this.accepted.delete(hash);
    this.refused.delete(hash);
    if (found) {
      this.accepted.set(hash, { found, checkedAt, usedAt: checkedAt });
      dropOldest(this.accepted, this.maxKeys);
    } else {
      this.refused.set(hash, checkedAt);
      dropOldest(this.refused, this.maxRefusedKeys);
    }
  }
}

function dropOldest(entries: Map<string, unknown>, max: number): void {
  for (const hash of entries.keys()) {
    if (entries.size <= max) return;
    entries.delete(hash);
  }
}

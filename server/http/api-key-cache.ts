/**
 * API keys served from memory, so a request's authentication costs a hash and a map lookup instead
 * of two queries.
 *
 * An answer from the store is served for `maxAgeMs` (1 s) and asked again after that. So a revoked
 * key is refused, and an account's new routing defaults apply, at most a second after the change
 * (plus the time of the lookup that read the old row). A new key works at once: its secret is
 * random, so no refusal of it can have been remembered before it existed.
 *
 * Keys are held by the SHA-256 of their secret, never the secret itself. Refusals are remembered
 * too (so one bad key repeated does not reach the database at every request), in a map of their
 * own, so a flood of bad keys cannot push the good ones out. Past their bounds, the least recently
 * used valid keys and the oldest refusals are dropped.
 */
import { createHash } from "node:crypto";
import type { AccountRecord, MarketStore } from "../market/store-port.js";

export interface AuthenticatedKey {
  account: AccountRecord;
  keyId: string;
}

export interface ApiKeyCacheOptions {
  store: Pick<MarketStore, "authenticateApiKey">;
  /** How long the store's answer for a key is served before it is asked again. Default 1 s. */
  maxAgeMs?: number;
  /** Most valid keys kept; the least recently used are dropped first. Default 100,000. */
  maxKeys?: number;
  /** Most refused keys remembered; the least recently refused are dropped first. Default 10,000. */
  maxRefusedKeys?: number;
  /** Milliseconds on a monotonic clock. Default `performance.now`. */
  now?: () => number;
}

const DEFAULT_MAX_AGE_MS = 1_000;
const DEFAULT_MAX_KEYS = 100_000;
const DEFAULT_MAX_REFUSED_KEYS = 10_000;

interface AcceptedKey {
  found: AuthenticatedKey;
  /** When the lookup that found it started: the row it read is no older than this. */
  checkedAt: number;
}

export class ApiKeyCache {
  private readonly store: Pick<MarketStore, "authenticateApiKey">;
  private readonly maxAgeMs: number;
  private readonly maxKeys: number;
  private readonly maxRefusedKeys: number;
  private readonly now: () => number;
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
  }

  /** The key's account and id, or null for a key that is unknown or revoked. */
  async authenticate(secret: string): Promise<AuthenticatedKey | null> {
    const hash = createHash("sha256").update(secret, "utf8").digest("base64");
    const now = this.now();
    const accepted = this.accepted.get(hash);
    if (accepted && now - accepted.checkedAt < this.maxAgeMs) {
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
      this.accepted.set(hash, { found, checkedAt });
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

/**
 * Random bytes for ids (orders, jobs, ledger rows), drawn from a pool that the operating system's
 * CSPRNG refills 4 KiB at a time: a request takes several ids, and `randomBytes` per id showed in
 * the control plane's profile (one OpenSSL call and one Buffer each). The bytes are as random as
 * randomBytes's; the pool only batches the calls. Secrets (API keys, tokens) keep their own
 * randomBytes call, so no secret's bytes ever sit in this process's pool.
 */
import { randomFillSync } from "node:crypto";

const POOL_BYTES = 4096;
const pool = Buffer.allocUnsafe(POOL_BYTES);
let used = POOL_BYTES;

function take(bytes: number): Buffer {
  if (bytes > POOL_BYTES) throw new RangeError(`An id of ${bytes} random bytes is longer than the pool.`);
  if (used + bytes > POOL_BYTES) {
    randomFillSync(pool);
    used = 0;
  }
  const slice = pool.subarray(used, used + bytes);
  used += bytes;
  return slice;
}

/** `bytes` random bytes as base64url text (12 bytes: 16 characters). */
export function randomBase64url(bytes: number): string {
  return take(bytes).toString("base64url");
}

/** `bytes` random bytes as hex text. */
export function randomHex(bytes: number): string {
  return take(bytes).toString("hex");
}

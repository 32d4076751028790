/**
 * Ids and secrets. Secrets are shown to their owner once and stored only as SHA-256 hashes: they
 * are 256-bit random values, so a fast unsalted hash is enough to make a leaked table useless.
 */
import { createHash, randomBytes } from "node:crypto";
import { randomHex } from "../../common/random-id.js";

export const API_KEY_PREFIX = "sk-llm-";
export const WORKER_TOKEN_PREFIX = "wt-llm-";

/** How many leading characters of a secret are kept in clear to help people tell keys apart. */
const VISIBLE_PREFIX_LENGTH = 12;

/** A new random id such as `acct_3f9c0a51d2e84b7c6a10`. */
export function newId(kind: string): string {
  return `${kind}_${randomHex(10)}`;
}

export function generateSecret(prefix: string): string {
  return `${prefix}${randomBytes(32).toString("base64url")}`;
}

export function hashSecret(secret: string): string {
  return createHash("sha256").update(secret, "utf8").digest("hex");
}

export function visiblePrefix(secret: string): string {
  return secret.slice(0, VISIBLE_PREFIX_LENGTH);
}

/**
 * The admin token: one shared secret that guards AdminService. The server takes it from the
 * environment or from `<dataDir>/admin-token` (created with mode 0600 on first start), and every
 * admin call must carry `authorization: Bearer <token>`.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { Code, ConnectError, type Interceptor } from "@connectrpc/connect";

export const ADMIN_TOKEN_FILE = "admin-token";
const TOKEN_PREFIX = "adm-";
const TOKEN_BYTES = 24;
const UNAUTHENTICATED_MESSAGE = "missing or invalid admin token";

function sha256(text: string): Buffer {
  return createHash("sha256").update(text, "utf8").digest();
}

/** The token carried by an `authorization: Bearer <token>` header value, or null. */
function bearerToken(header: string | null): string | null {
  if (!header) return null;
  const match = /^Bearer[ \t]+(\S+)[ \t]*$/i.exec(header);
  return match?.[1] ?? null;
}

/**
 * Server interceptor: rejects every call without the admin token with Code.Unauthenticated.
 * Compares SHA-256 digests with timingSafeEqual, so neither the token's content nor its length
 * leaks through timing.
 */
export function adminAuthInterceptor(token: string): Interceptor {
  if (!token) throw new Error("the admin token must not be empty");
  const expected = sha256(token);
  return (next) => async (req) => {
    const presented = bearerToken(req.header.get("authorization"));
    if (presented === null || !timingSafeEqual(sha256(presented), expected)) {
      throw new ConnectError(UNAUTHENTICATED_MESSAGE, Code.Unauthenticated);
    }
    return await next(req);
  };
}

/** A new random admin token: `adm-` + 24 random bytes in base64url. */
export function generateAdminToken(): string {
  return TOKEN_PREFIX + randomBytes(TOKEN_BYTES).toString("base64url");
}

/**
 * The admin token to serve with. An explicit token (from the environment) wins; otherwise the one
 * stored in `<dataDir>/admin-token`; otherwise a new one is generated and stored there with mode
 * 0600 (`created: true`, so the caller can print it once).
 */
export async function loadAdminToken(
  dataDir: string,
  fromEnv?: string,
): Promise<{ token: string; created: boolean; path?: string }> {
  const explicit = fromEnv?.trim();
  if (explicit) return { token: explicit, created: false };

  const path = join(dataDir, ADMIN_TOKEN_FILE);
  const stored = await readTokenFile(path);
  if (stored !== null) return { token: stored, created: false, path };

  await mkdir(dataDir, { recursive: true });
  const token = generateAdminToken();
  try {
    // "wx": never overwrite a token another process wrote in the meantime.
    await writeFile(path, `${token}\n`, { mode: 0o600, flag: "wx" });
  } catch (error) {
    if (errorCode(error) !== "EEXIST") throw error;
    const raced = await readTokenFile(path);
    if (raced === null) throw error;
    return { token: raced, created: false, path };
  }
  return { token, created: true, path };
}

/** The token in the file, null when the file does not exist. An empty file is an error. */
async function readTokenFile(path: string): Promise<string | null> {
  let text: string;
  try {
    text = await readFile(path, "utf8");
  } catch (error) {
    if (errorCode(error) === "ENOENT") return null;
    throw error;
  }
  const token = text.trim();
  if (!token) throw new Error(`${path} is empty; delete it to generate a new admin token`);
  return token;
}

function errorCode(error: unknown): string | undefined {
  return typeof error === "object" && error !== null && "code" in error ? String(error.code) : undefined;
}

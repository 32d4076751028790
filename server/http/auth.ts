/** Consumer authentication: `Authorization: Bearer <api key>` → the account paying for the request. */
import type { FastifyRequest } from "fastify";
import { MarketError } from "../market/errors.js";
import type { Consumer } from "../market/marketplace.js";
import type { ApiKeyCache } from "./api-key-cache.js";

export async function authenticateConsumer(apiKeys: ApiKeyCache, request: FastifyRequest): Promise<Consumer> {
  const header = request.headers.authorization ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (!match?.[1]) {
    throw new MarketError("unauthenticated", "Missing API key: send 'Authorization: Bearer <key>'.");
  }
  const found = await apiKeys.authenticate(match[1]);
  if (!found) throw new MarketError("unauthenticated", "Invalid or revoked API key.");
  return { account: found.account, apiKeyId: found.keyId };
}

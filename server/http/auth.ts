/** Consumer authentication: `Authorization: Bearer <api key>` → the account paying for the request. */
import type { FastifyRequest } from "fastify";
import { MarketError } from "../market/errors.js";
import type { Consumer } from "../market/marketplace.js";
import type { MarketStore } from "../market/store-port.js";

export async function authenticateConsumer(store: MarketStore, request: FastifyRequest): Promise<Consumer> {
  const header = request.headers.authorization ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  if (!match?.[1]) {
    throw new MarketError("unauthenticated", "Missing API key: send 'Authorization: Bearer <key>'.");
  }
  const found = await store.authenticateApiKey(match[1]);
  if (!found) throw new MarketError("unauthenticated", "Invalid or revoked API key.");
  return { account: found.account, apiKeyId: found.keyId };
}

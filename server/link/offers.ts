/** Validation and conversion of the offers a worker advertises in Hello and OfferUpdate. */
import type { MessageInitShape } from "@bufbuild/protobuf";
import type { Offer, OfferSchema } from "../../gen/locallmarket/v1/common_pb.js";
import { MarketError } from "../market/errors.js";
import type { OfferRecord } from "../market/store-port.js";

const MAX_OFFERS = 64;
const MAX_CONCURRENCY = 256;

export function offersFromWire(offers: readonly Offer[], options: { allowEmpty: boolean }): OfferRecord[] {
  if (offers.length === 0 && !options.allowEmpty) {
    throw new MarketError("invalid_request", "Hello must carry at least one offer.", "offers");
  }
  if (offers.length > MAX_OFFERS) {
    throw new MarketError("invalid_request", `At most ${MAX_OFFERS} offers per worker.`, "offers");
  }
  const seen = new Set<string>();
  return offers.map((offer, index) => {
    const where = `offers[${index}]`;
    if (!offer.model.trim()) throw new MarketError("invalid_request", `${where}.model is empty.`, where);
    if (seen.has(offer.model))
      throw new MarketError("invalid_request", `${where}: model '${offer.model}' offered twice.`, where);
    seen.add(offer.model);
    if (offer.pricePerMillionInput < 0n || offer.pricePerMillionOutput < 0n) {
      throw new MarketError("invalid_request", `${where}: prices must not be negative.`, where);
    }
    if (!Number.isFinite(offer.advertisedTokensPerSecond) || offer.advertisedTokensPerSecond < 0) {
      throw new MarketError("invalid_request", `${where}: advertised_tokens_per_second must be ≥ 0.`, where);
    }
    if (offer.weightsSha256 !== "" && !/^[0-9a-fA-F]{64}$/.test(offer.weightsSha256)) {
      throw new MarketError(
        "invalid_request",
        `${where}: weights_sha256 must be 64 hex digits (the SHA-256 of the weights file) or empty.`,
        where,
      );
    }
    return {
      model: offer.model,
      pricePerMillionInput: offer.pricePerMillionInput,
      pricePerMillionOutput: offer.pricePerMillionOutput,
      advertisedTokensPerSecond: offer.advertisedTokensPerSecond,
      maxConcurrency: Math.min(Math.max(offer.maxConcurrency, 1), MAX_CONCURRENCY),
      contextLength: offer.contextLength,
      quantization: offer.quantization,
      engine: offer.engine,
      capabilities: {
        tools: offer.capabilities?.tools ?? false,
        jsonSchema: offer.capabilities?.jsonSchema ?? false,
        logprobs: offer.capabilities?.logprobs ?? false,
        vision: offer.capabilities?.vision ?? false,
        completions: offer.capabilities?.completions ?? false,
        tokenDetail: offer.capabilities?.tokenDetail ?? false,
      },
      weightsSha256: offer.weightsSha256.toLowerCase(),
      engineVersion: offer.engineVersion.slice(0, 200),
    };
  });
}

/** The offers as the server accepted them (after normalisation), for Welcome.accepted_offers. */
export function offersToWire(offers: readonly OfferRecord[]): MessageInitShape<typeof OfferSchema>[] {
  return offers.map((offer) => ({ ...offer }));
}

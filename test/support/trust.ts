/**
 * What the trust tests share: the reference model's identity and the offer an in-process worker
 * (a cheater, or a llama-cpp engine on other weights) makes when it claims to serve that model.
 */
import { auditStatistics } from "../../server/trust/statistics.js";
import type { AuditRecord } from "../../server/trust/trust-service.js";
import type { OfferSpec } from "../../worker/link-client.js";

/** The SHA-256 of ../shared/models/stories260K.gguf, the reference the tests' verifiers serve. */
export const STORIES_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";

/**
 * An offer of `model` claiming the weights `weightsSha256` and what a llama-cpp worker declares,
 * token detail included, so its jobs are asked for token detail and can be audited.
 */
export function claimedLlamaCppOffer(model: string, weightsSha256 = STORIES_SHA256): OfferSpec {
  return {
    model,
    pricePerMillionInput: 1_000_000n,
    pricePerMillionOutput: 1_000_000n,
    tokensPerSecond: 500,
    maxConcurrency: 1,
    contextLength: 2048,
    engine: "llama.cpp",
    weightsSha256,
    capabilities: {
      tools: false,
      jsonSchema: false,
      logprobs: true,
      vision: false,
      completions: true,
      tokenDetail: true,
    },
  };
}

/**
 * An audit record as the trust service stores it, with empty statistics (no token scored), for
 * store tests that only care about its identity, worker and outcome; `fields` sets the rest.
 */
export function auditRecordFixture(
  id: string,
  workerId: string,
  outcome: AuditRecord["outcome"],
  fields: Partial<AuditRecord> = {},
): AuditRecord {
  return {
    auditId: id,
    jobId: `job_${id}`,
    orderId: `chatcmpl-${id}`,
    workerId,
    verifierId: "wkr_verifier",
    weightsSha256: "ab".repeat(32),
    outcome,
    stats: auditStatistics({
      temperature: 0,
      topK: 0,
      stoppedBySequence: false,
      streamedText: "",
      chunkTokenCount: 0,
      usage: null,
      reported: [],
      reference: { scores: [], promptTokens: 1, text: "", error: "" },
    }),
    llr: 0,
    tokensToDecide: null,
    verifyMs: 1.5,
    generationMs: 10,
    at: new Date(),
    ...fields,
  };
}

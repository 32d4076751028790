/**
 * An in-process WorkerSession for unit tests of the server's side of the worker link: one offer of
 * model "m", quiet logs, closed after each test. Tests drive it through its inbound handler and
 * read what it would send from `outbound`.
 */
import { afterEach } from "vitest";
import { WorkerSession } from "../../server/link/worker-session.js";
import type { OfferRecord } from "../../server/market/store-port.js";

type SessionOptions = ConstructorParameters<typeof WorkerSession>[0];

const silent = { info: () => {}, warn: () => {}, error: () => {} } as unknown as SessionOptions["log"];

/** The offer of model "m" a test session makes; `tokenDetail` says whether it can give token detail. */
export function testOffer(tokenDetail: boolean): OfferRecord {
  return {
    model: "m",
    pricePerMillionInput: 1n,
    pricePerMillionOutput: 1n,
    advertisedTokensPerSecond: 10,
    maxConcurrency: 1,
    contextLength: 512,
    quantization: "",
    engine: "llama.cpp",
    capabilities: {
      tools: false,
      jsonSchema: false,
      logprobs: false,
      vision: false,
      completions: false,
      tokenDetail,
    },
    weightsSha256: "ab".repeat(32),
  };
}

const sessions: WorkerSession[] = [];
afterEach(() => {
  for (const session of sessions.splice(0)) session.close("test over");
});

/** A session of worker "wkr_1" with the given offer, closed when the test ends. */
export function testSession(
  offer: OfferRecord,
  options: Partial<Pick<SessionOptions, "jobWindowChunks" | "trust">> = {},
): WorkerSession {
  const session = new WorkerSession({
    workerId: "wkr_1",
    providerAccountId: "acct_1",
    name: "w",
    sessionId: "s",
    offers: [offer],
    heartbeatIntervalMs: 60_000,
    maxChunkBytes: 1 << 20,
    jobWindowChunks: options.jobWindowChunks ?? 64,
    log: silent,
    onCapacity: () => {},
    onClose: () => {},
    ...(options.trust ? { trust: options.trust } : {}),
  });
  sessions.push(session);
  return session;
}

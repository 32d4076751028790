/**
 * The audit arithmetic (server/trust/statistics.ts), the trust service's job preparation and audit
 * sampling (server/trust/trust-service.ts), and the offer's identity checks (server/link/offers.ts).
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { OfferSchema } from "../../gen/locallmarket/v1/common_pb.js";
import { offersFromWire } from "../../server/link/offers.js";
import type { JobSpec } from "../../server/market/registry.js";
import {
  type AuditInput,
  auditStatistics,
  DEFAULT_TEST,
  type ReferenceScore,
  type ReportedToken,
  SequentialTest,
} from "../../server/trust/statistics.js";
import { TrustService } from "../../server/trust/trust-service.js";

const silent = { info: () => {}, warn: () => {}, error: () => {} } as unknown as ConstructorParameters<
  typeof TrustService
>[0]["log"];

/** A position where the worker and the reference agree up to `delta` nats on every number. */
function position(
  tokenId: number,
  logprob: number,
  delta = 0,
): { mine: ReportedToken; theirs: ReferenceScore } {
  const top = [
    { tokenId, logprob },
    { tokenId: tokenId + 1, logprob: logprob - 1 },
    { tokenId: tokenId + 2, logprob: logprob - 2 },
  ];
  return {
    mine: { tokenId, logprob: logprob + delta, top: top.map((t) => ({ ...t, logprob: t.logprob + delta })) },
    theirs: { logprob, rank: 0, top },
  };
}

function input(
  positions: { mine: ReportedToken; theirs: ReferenceScore }[],
  overrides: Partial<AuditInput> = {},
): AuditInput {
  return {
    temperature: 1,
    topK: 3,
    stoppedBySequence: false,
    streamedText: "abc",
    chunkTokenCount: positions.length,
    usage: { promptTokens: 5, completionTokens: positions.length },
    reported: positions.map((p) => p.mine),
    reference: { scores: positions.map((p) => p.theirs), promptTokens: 5, text: "abc", error: "" },
    ...overrides,
  };
}

describe("auditStatistics", () => {
  it("sees no anomaly when the worker's numbers are the reference's up to rounding", () => {
    const stats = auditStatistics(input(Array.from({ length: 20 }, (_, i) => position(10 + i, -0.5, 1e-4))));
    expect(stats).toMatchObject({ tokens: 20, anomalies: 0, violations: [], medianRank: 0, topKOverlap: 1 });
    expect(stats.maxAbsDelta).toBeCloseTo(1e-4, 8);
  });

  it("flags positions whose shared top-k differ by more than the threshold, whatever their likelihood", () => {
    // A more predictable substitute: higher logprobs than the reference, still anomalous.
    const stats = auditStatistics(input(Array.from({ length: 10 }, (_, i) => position(10 + i, -2, 0.5))));
    expect(stats.anomalies).toBe(10);
    expect(stats.flags.every(Boolean)).toBe(true);
  });

  it("flags positions where the worker reports no alternatives (no evidence is no pass)", () => {
    const positions = [position(10, -0.5)].map(({ mine, theirs }) => ({
      mine: { ...mine, top: [] },
      theirs,
    }));
    expect(auditStatistics(input(positions)).anomalies).toBe(1);
  });

  it("at temperature 0 flags a token that is not the reference's argmax, but not a near tie", () => {
    const miss = position(10, -1.2);
    miss.theirs = { ...miss.theirs, rank: 1, top: [{ tokenId: 99, logprob: -0.4 }, ...miss.theirs.top] };
    miss.mine = { ...miss.mine, top: miss.theirs.top };
    const tie = position(20, -0.7);
    tie.theirs = { ...tie.theirs, rank: 1, top: [{ tokenId: 98, logprob: -0.695 }, ...tie.theirs.top] };
    tie.mine = { ...tie.mine, top: tie.theirs.top };
    const stats = auditStatistics(input([miss, tie], { temperature: 0, topK: 4 }));
    expect(stats.flags).toEqual([true, false]);
    expect(stats.greedyAgreement).toBe(0.5);
  });

  it("fails deterministic checks: counts, usage, prompt tokens, spelled text, verifier errors", () => {
    const positions = [position(10, -0.5), position(11, -0.5)];
    expect(auditStatistics(input(positions, { chunkTokenCount: 4 })).violations).toEqual([
      "chunks counted 4 tokens but 2 were reported",
    ]);
    expect(
      auditStatistics(input(positions, { usage: { promptTokens: 9, completionTokens: 3 } })).violations,
    ).toEqual([
      "usage claims 3 completion tokens, 2 were generated",
      "usage claims 9 prompt tokens, the reference counts 5",
    ]);
    expect(auditStatistics(input(positions, { streamedText: "abd" })).violations).toEqual([
      "the reported tokens do not spell the streamed text",
    ]);
    // A stop sequence cut the text: a prefix of what the tokens spell is fine then, and only then.
    expect(
      auditStatistics(input(positions, { streamedText: "ab", stoppedBySequence: true })).violations,
    ).toEqual([]);
    expect(auditStatistics(input(positions, { streamedText: "ab" })).violations).toHaveLength(1);
    const none = input([], { chunkTokenCount: 7, usage: null });
    expect(auditStatistics(none).violations).toContain("token detail was asked for and none was returned");
    const broken = input(positions);
    broken.reference.error = "token id 600 is outside the vocabulary (512 tokens)";
    expect(auditStatistics(broken).violations[0]).toMatch(/outside the vocabulary/);
  });
});

describe("the job-level drift test", () => {
  /** `count` positions whose every number is off by `delta` nats (reference logprobs −0.5, −1.5, −2.5). */
  const drifted = (count: number, delta: number, temperature = 1) =>
    auditStatistics(
      input(
        Array.from({ length: count }, (_, i) => position(10 + i, -0.5, delta)),
        { temperature },
      ),
    );

  it("is the median of |Δ|·T / (1 + |logprob|·T) over the shared alternatives", () => {
    // 3 alternatives per position at −0.5, −1.5, −2.5: the median one is −1.5.
    const stats = drifted(100, 1e-4);
    expect(stats.drift).toBeCloseTo(1e-4 / 2.5, 12);
    // At temperature 0.5 the worker reports tempered logprobs: Δ and logprob both scale by 1/T.
    expect(drifted(100, 2e-4, 0.5).drift).toBeCloseTo((2e-4 * 0.5) / (1 + 1.5 * 0.5), 12);
  });

  it("does not decide on too few shared alternatives", () => {
    // 66 positions × 3 alternatives = 198 < 200.
    // 1e-3 nats everywhere: no position is flagged, and only the drift test could fail the job.
    expect(drifted(66, 1e-3).drift).toBeNull();
    expect(new SequentialTest().feed(drifted(66, 1e-3)).outcome).not.toBe("failed");
    expect(new SequentialTest().feed(drifted(67, 1e-3)).outcome).toBe("failed");
  });

  it("fails a job whose every position is within the per-position tolerance but drifts as a whole", () => {
    // 1e-3 nats on every number: under the per-position tolerance (1.5e-3 + 5e-4·|logprob|), so
    // no position is flagged; but the median drift is 4·10⁻⁴, above the 2.8·10⁻⁴ threshold.
    const stats = drifted(100, 1e-3);
    expect(stats.anomalies).toBe(0);
    expect(stats.drift).toBeGreaterThan(DEFAULT_TEST.driftThreshold);
    expect(new SequentialTest().feed(stats)).toMatchObject({ outcome: "failed", tokensToDecide: 100 });
    // Honest rounding (a few 10⁻⁵ nats relative) passes.
    const honest = drifted(100, 2e-4);
    expect(honest.drift).toBeLessThan(DEFAULT_TEST.driftThreshold);
    expect(new SequentialTest().feed(honest).outcome).toBe("passed");
  });
});

describe("SequentialTest (SPRT)", () => {
  const flags = (pattern: boolean[]) => ({ ...auditStatistics(input([])), flags: pattern, violations: [] });

  it("passes an honest stream and fails a cheating one, within the token counts Wald's bounds give", () => {
    const test = new SequentialTest();
    const honest = test.feed(flags(Array.from({ length: 100 }, (_, i) => i % 10 === 0)));
    expect(honest.outcome).toBe("passed");
    // ln(β/(1−α)) / ln((1−p1)/(1−p0)) ≈ 7 clean tokens after the first flag.
    expect(honest.tokensToDecide).toBeLessThanOrEqual(12);
    const cheat = new SequentialTest().feed(flags(Array.from({ length: 100 }, () => true)));
    // ln((1−β)/α) / ln(p1/p0) ≈ 12.3: the 13th anomalous token decides.
    expect(cheat).toMatchObject({ outcome: "failed", tokensToDecide: 13 });
  });

  it("carries evidence across jobs until it decides, then starts over", () => {
    const test = new SequentialTest();
    const first = test.feed(flags([true, true, true]));
    expect(first.outcome).toBe("undecided");
    expect(first.llr).toBeCloseTo(3 * Math.log(DEFAULT_TEST.p1 / DEFAULT_TEST.p0), 10);
    expect(test.feed(flags(Array.from({ length: 9 }, () => true))).outcome).toBe("undecided");
    expect(test.feed(flags([true])).outcome).toBe("failed");
    expect(test.state).toBe(0);
  });

  it("fails at once on a deterministic violation", () => {
    const stats = { ...flags([false]), violations: ["chunks counted 2 tokens but 1 were reported"] };
    expect(new SequentialTest().feed(stats)).toMatchObject({ outcome: "failed", tokensToDecide: 0 });
  });

  it("keeps its false-alarm rate below α on simulated honest streams at the honest worst case", () => {
    // Independent flags at the worst per-job honest rate measured (36 %), 2,000 tests.
    let state = 1;
    const random = () => {
      state = (state * 48271) % 2147483647;
      return state / 2147483647;
    };
    let failed = 0;
    for (let run = 0; run < 2_000; run++) {
      const step = new SequentialTest().feed(flags(Array.from({ length: 200 }, () => random() < 0.36)));
      if (step.outcome === "failed") failed += 1;
    }
    expect(failed / 2_000).toBeLessThan(0.01);
  });
});

describe("TrustService.prepare and audit sampling", () => {
  const job = (overrides: Partial<JobSpec> = {}): JobSpec => ({
    jobId: "job_1",
    model: "m",
    messages: [{ role: "user", content: "hi" }],
    sampling: { stop: [] },
    maxTokens: 10,
    deadlineUnixMs: 0,
    ...overrides,
  });

  it("always issues a seed (the consumer's when given) and asks token detail on the configured share", () => {
    let draws = 0;
    const trust = new TrustService({
      connections: () => [],
      log: silent,
      detailRate: 0.5,
      random: () => (draws++ % 2 === 0 ? 0.25 : 0.75),
    });
    const a = trust.prepare(job());
    const b = trust.prepare(job());
    expect(a.tokenDetail).toEqual({ topK: 5 });
    expect(b.tokenDetail).toBeUndefined();
    expect(typeof a.seed).toBe("bigint");
    expect(trust.prepare(job({ sampling: { stop: [], seed: 42n } })).seed).toBe(42n);
  });

  it("never asks token detail on jobs whose distribution a verifier cannot replay", () => {
    const trust = new TrustService({ connections: () => [], log: silent, detailRate: 1, random: () => 0 });
    expect(
      trust.prepare(job({ tools: [{ name: "f", description: "", parametersJson: "", strict: false }] }))
        .tokenDetail,
    ).toBeUndefined();
    expect(trust.prepare(job({ responseFormat: { type: "json_object" } })).tokenDetail).toBeUndefined();
    expect(trust.prepare(job({ sampling: { stop: [], presencePenalty: 1 } })).tokenDetail).toBeUndefined();
    expect(trust.prepare(job()).tokenDetail).toEqual({ topK: 5 });
    // An offer without Capabilities.token_detail is never asked.
    expect(trust.prepare(job(), false).tokenDetail).toBeUndefined();
  });

  it("decides to audit only after the job finished, on auditRate / detailRate of the detail jobs", async () => {
    const draws: number[] = [];
    const trust = new TrustService({
      connections: () => [],
      log: silent,
      detailRate: 0.5,
      auditRate: 0.1,
      random: () => {
        const value = [0.19, 0.21][draws.length % 2] as number;
        draws.push(value);
        return value;
      },
    });
    const offer = offersFromWire([create(OfferSchema, { model: "m", weightsSha256: "ab".repeat(32) })], {
      allowEmpty: false,
    })[0];
    if (!offer) throw new Error("no offer");
    const finished = {
      workerId: "wkr_a",
      orderId: "chatcmpl-1",
      offer,
      assign: { jobId: "job_1" },
      streamedText: "",
      chunkTokenCount: 0,
      tokenDetails: [],
      usage: null,
      finishReason: "stop",
      generationMs: 1,
    };
    // 0.19 < 0.1/0.5: audited (but no verifier is connected, so nothing is recorded); 0.21: not.
    trust.finished(finished);
    trust.finished(finished);
    await trust.settled();
    expect(draws).toEqual([0.19, 0.21]);
    expect(trust.audits()).toEqual([]);
  });
});

describe("Offer identity", () => {
  it("accepts 64 hex digits (lowercased) or nothing, and rejects anything else", () => {
    const [offer] = offersFromWire(
      [
        create(OfferSchema, {
          model: "m",
          weightsSha256: "AB".repeat(32),
          engineVersion: "node-llama-cpp 3.21.1",
        }),
      ],
      { allowEmpty: false },
    );
    expect(offer).toMatchObject({ weightsSha256: "ab".repeat(32), engineVersion: "node-llama-cpp 3.21.1" });
    expect(
      offersFromWire([create(OfferSchema, { model: "m" })], { allowEmpty: false })[0]?.weightsSha256,
    ).toBe("");
    expect(() =>
      offersFromWire([create(OfferSchema, { model: "m", weightsSha256: "abc" })], { allowEmpty: false }),
    ).toThrow(/weights_sha256 must be 64 hex digits/);
  });
});

/**
 * Blind canaries' pure parts: the prompts (an opening and a fresh nonce sentence), the verdict
 * statistics fed to the sequential test, and the --canary-rate option.
 */
import { describe, expect, it } from "vitest";
import { parseServerConfig, serverHelp } from "../../server/config.js";
import { CANARY_OPENINGS, canaryPrompt, canaryStatistics } from "../../server/trust/canary.js";
import { SequentialTest } from "../../server/trust/statistics.js";

/** A deterministic uniform source (a linear congruential generator). */
function lcg(seed: number): () => number {
  let state = seed;
  return () => {
    state = (state * 1103515245 + 12345) % 2147483648;
    return state / 2147483648;
  };
}

describe("canaryPrompt", () => {
  it("is a corpus opening followed by a drawn sentence naming someone and a thing", () => {
    const prompt = canaryPrompt(() => 0);
    expect(prompt).toBe(`${CANARY_OPENINGS[0]} Tom had a red ball.`);
    const last = canaryPrompt(() => 0.999_999);
    expect(last).toBe(`${CANARY_OPENINGS[CANARY_OPENINGS.length - 1]} Dan had a soft flower.`);
  });

  it("rarely repeats: 500 draws give more than 450 distinct prompts, all from the corpus", () => {
    const random = lcg(42);
    const prompts = Array.from({ length: 500 }, () => canaryPrompt(random));
    expect(new Set(prompts).size).toBeGreaterThan(450);
    for (const prompt of prompts) {
      expect(CANARY_OPENINGS.some((opening) => prompt.startsWith(`${opening} `))).toBe(true);
      expect(prompt).toMatch(/ [A-Z][a-z]+ had a [a-z]+ [a-z]+\.$/);
    }
  });
});

describe("canaryStatistics", () => {
  it("an answer equal to the reference is one unflagged position per token and passes the test", () => {
    const stats = canaryStatistics("The dog ran.", 12, "The dog ran.", 7n);
    expect(stats).toMatchObject({ tokens: 12, anomalies: 0, violations: [], greedyAgreement: 1 });
    expect(stats.flags).toEqual(new Array(12).fill(false));
    expect(new SequentialTest().feed(stats).outcome).toBe("passed");
  });

  it("too short an answer leaves the test undecided; its evidence carries over", () => {
    const test = new SequentialTest();
    expect(test.feed(canaryStatistics("Hi", 2, "Hi", 1n)).outcome).toBe("undecided");
    expect(test.feed(canaryStatistics("Yes it is.", 5, "Yes it is.", 2n)).outcome).toBe("passed");
  });

  it("any divergence is a violation naming where the texts part, and fails the test at once", () => {
    const stats = canaryStatistics("The dog ran home.", 5, "The dog sat down.", 99n);
    expect(stats.violations).toEqual([
      "canary: the answer differs from the reference answer (temperature 0, seed 99) from character 8 of 17",
    ]);
    expect(stats.anomalies).toBe(1);
    expect(stats.greedyAgreement).toBeCloseTo(8 / 17);
    expect(new SequentialTest().feed(stats)).toMatchObject({ outcome: "failed", tokensToDecide: 0 });
  });

  it("a truncated answer (a prefix of the reference) is a divergence too", () => {
    const stats = canaryStatistics("The dog", 2, "The dog ran.", 3n);
    expect(stats.violations[0]).toContain("from character 7 of 12");
  });
});

describe("--canary-rate", () => {
  it("defaults to 50 basis points and accepts 0 to 10000 by flag or environment", () => {
    expect(parseServerConfig([], {}).canaryBasisPoints).toBe(50);
    expect(parseServerConfig(["--canary-rate", "10000"], {}).canaryBasisPoints).toBe(10_000);
    expect(parseServerConfig([], { LOCALLMARKET_CANARY_RATE: "0" }).canaryBasisPoints).toBe(0);
  });

  it("refuses a rate out of range with a clear error, and is documented in --help", () => {
    expect(() => parseServerConfig(["--canary-rate", "10001"], {})).toThrow(/canary-rate/);
    expect(() => parseServerConfig(["--canary-rate", "-1"], {})).toThrow(/canary-rate/);
    expect(serverHelp()).toContain("--canary-rate");
  });
});

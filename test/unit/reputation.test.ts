/**
 * The reputation math on an injected clock: server-timed throughput that a burst cannot game,
 * decaying averages and percentiles, success rate, cooldown after a timeout or repeated failures,
 * probation with a single probe, doubling cooldowns, audits and suspension.
 */
import { describe, expect, it } from "vitest";
import {
  ADVERTISED_DISCOUNT,
  type AttemptWatch,
  ReputationTracker,
  sustainedTokensPerSecond,
} from "../../server/market/reputation.js";

function clock() {
  let now = 1_000_000;
  return {
    now: () => now,
    advance(ms: number) {
      now += ms;
    },
  };
}

/** Streams `tokens` one per chunk, `gapMs` apart, after a first token `ttftMs` after dispatch. */
function stream(
  time: ReturnType<typeof clock>,
  watch: AttemptWatch,
  options: { ttftMs: number; tokens: number; gapMs: number },
): void {
  time.advance(options.ttftMs);
  watch.chunk(1);
  for (let i = 1; i < options.tokens; i++) {
    time.advance(options.gapMs);
    watch.chunk(1);
  }
}

describe("sustainedTokensPerSecond", () => {
  it("measures an even stream at its rate", () => {
    const arrivals = Array.from({ length: 101 }, (_, i) => ({ at: i * 20, tokens: 1 }));
    expect(sustainedTokensPerSecond(arrivals)).toBeCloseTo(50, 5);
  });

  it("gives a burst at the end nothing, where tokens ÷ (last − first) would reward it", () => {
    // First token at once, then 10 s of silence, then 200 tokens within 10 ms.
    const arrivals = [
      { at: 0, tokens: 1 },
      ...Array.from({ length: 200 }, (_, i) => ({ at: 10_000 + i * 0.05, tokens: 1 })),
    ];
    const naive = (200 * 1000) / (arrivals[arrivals.length - 1]?.at ?? 1);
    expect(naive).toBeGreaterThan(19);
    expect(sustainedTokensPerSecond(arrivals)).toBe(0);
  });

  it("gives bursts separated by pauses the rate of the pauses, not of the bursts", () => {
    // 10 bursts of 20 tokens within 1 ms, one every second: 20 tokens/s at best.
    const arrivals = [{ at: 0, tokens: 1 }];
    for (let burst = 1; burst <= 10; burst++) {
      for (let i = 0; i < 20; i++) arrivals.push({ at: burst * 1000 + i * 0.05, tokens: 1 });
    }
    const tps = sustainedTokensPerSecond(arrivals) ?? Number.NaN;
    expect(tps).toBeLessThanOrEqual(21);
  });

  it("keeps an honest rate through a hiccup after the first token", () => {
    const arrivals = [{ at: 0, tokens: 1 }];
    for (let i = 1; i <= 500; i++) arrivals.push({ at: 1000 + i * 10, tokens: 1 });
    // 500 tokens in 6 s overall, but 100 tokens/s while it streamed.
    expect(sustainedTokensPerSecond(arrivals)).toBeGreaterThan(90);
  });

  it("does not time jobs too short to measure", () => {
    expect(sustainedTokensPerSecond([{ at: 0, tokens: 1 }])).toBeNull();
    expect(
      sustainedTokensPerSecond(Array.from({ length: 10 }, (_, i) => ({ at: i * 100, tokens: 1 }))),
    ).toBeNull();
    expect(
      sustainedTokensPerSecond(Array.from({ length: 50 }, (_, i) => ({ at: i * 0.1, tokens: 1 }))),
    ).toBeNull();
  });
});

describe("ReputationTracker figures", () => {
  it("measures throughput and TTFT per worker and model from chunk arrival, with p50/p90", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now });
    for (const gapMs of [10, 20, 10, 10]) {
      const watch = tracker.watch("w", "m");
      stream(time, watch, { ttftMs: 200, tokens: 41, gapMs });
      watch.end("success");
    }
    const figures = tracker.snapshot("w", "m");
    // 100, 50, 100, 100 tokens/s, decaying average with weight 0.3 for the newest.
    expect(figures.tokensPerSecond).toBeCloseTo(((100 * 0.7 + 50 * 0.3) * 0.7 + 30) * 0.7 + 30, 5);
    expect(figures.tokensPerSecondP50).toBeCloseTo(100, 5);
    expect(figures.timeToFirstTokenMs).toBeCloseTo(200, 5);
    expect(figures.timeToFirstTokenP90Ms).toBeCloseTo(200, 5);
    expect(figures.successRate).toBe(1);
    expect(tracker.tokensPerSecond("w", "other-model")).toBeNull();
  });

  it("seeds a new worker with its advertised figure, discounted, until it is measured", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now });
    expect(tracker.effectiveTokensPerSecond("liar", "m", 1000)).toBe(1000 * ADVERTISED_DISCOUNT);
    const watch = tracker.watch("liar", "m");
    stream(time, watch, { ttftMs: 50, tokens: 41, gapMs: 100 });
    watch.end("success");
    expect(tracker.effectiveTokensPerSecond("liar", "m", 1000)).toBeCloseTo(10, 5);
  });

  it("counts a decaying success rate and a reputation that failures and failed audits lower", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now, allowedFailures: 100 });
    const fresh = tracker.snapshot("w", "m");
    expect(fresh.successRate).toBeNull();
    for (let i = 0; i < 4; i++) tracker.watch("w", "m").end("success");
    tracker.watch("w", "m").end("error");
    const once = tracker.snapshot("w", "m");
    expect(once.successRate).toBeGreaterThan(0.7);
    expect(once.successRate).toBeLessThan(0.85);
    expect(once.attempts).toBe(5);
    expect(once.failures).toBe(1);
    tracker.recordAudit("w", "m", true);
    tracker.recordAudit("w", "m", false);
    const audited = tracker.snapshot("w", "m");
    expect(audited.auditsPassed).toBe(1);
    expect(audited.auditsFailed).toBe(1);
    expect(audited.reputation).toBeLessThan(once.reputation / 2);
    // Neutral endings (the consumer left, the worker was full) count for nothing.
    tracker.watch("w", "m").end("neutral");
    expect(tracker.snapshot("w", "m").attempts).toBe(5);
  });
});

describe("ReputationTracker cooldown and probation", () => {
  it("cools a worker at its first first-token timeout", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now, cooldownMs: 30_000 });
    tracker.watch("hole", "m").end("timeout");
    expect(tracker.availability("hole", "m")).toBe("cooling");
    expect(tracker.snapshot("hole", "m").coolingUntil).toBe(time.now() + 30_000);
    expect(tracker.availability("hole", "other-model")).toBe("available");
  });

  it("tolerates three failures in a row and cools a worker at the fourth", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now });
    for (let i = 0; i < 3; i++) tracker.watch("w", "m").end("error");
    expect(tracker.availability("w", "m")).toBe("available");
    tracker.watch("w", "m").end("success");
    for (let i = 0; i < 3; i++) tracker.watch("w", "m").end("error");
    expect(tracker.availability("w", "m")).toBe("available");
    tracker.watch("w", "m").end("error");
    expect(tracker.availability("w", "m")).toBe("cooling");
  });

  it("lets one probe through after the cooldown; a first token restores the worker", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now, cooldownMs: 1000, probeTimeoutMs: 5000 });
    tracker.watch("w", "m").end("timeout");
    time.advance(999);
    expect(tracker.availability("w", "m")).toBe("cooling");
    time.advance(1);
    expect(tracker.availability("w", "m")).toBe("available");
    expect(tracker.snapshot("w", "m").state).toBe("probation");
    tracker.reserved("w", "m");
    // The probe runs: nobody else is sent there meanwhile.
    expect(tracker.availability("w", "m")).toBe("cooling");
    const probe = tracker.watch("w", "m");
    time.advance(100);
    probe.chunk(1);
    expect(tracker.availability("w", "m")).toBe("available");
    expect(tracker.snapshot("w", "m").state).toBe("healthy");
    probe.end("success");
    expect(tracker.snapshot("w", "m").state).toBe("healthy");
  });

  it("cools a worker whose probe fails again, for twice as long, capped", () => {
    const time = clock();
    const tracker = new ReputationTracker({
      now: time.now,
      cooldownMs: 1000,
      maxCooldownMs: 3000,
      probeTimeoutMs: 5000,
    });
    for (let i = 0; i < 4; i++) tracker.watch("w", "m").end("error");
    const lengths: number[] = [];
    for (let round = 0; round < 3; round++) {
      const until = tracker.snapshot("w", "m").coolingUntil ?? 0;
      lengths.push(until - time.now());
      time.advance(until - time.now());
      tracker.reserved("w", "m");
      // A single fast failure on probation is enough: the worker already failed four times.
      tracker.watch("w", "m").end("error");
      expect(tracker.availability("w", "m")).toBe("cooling");
    }
    expect(lengths).toEqual([1000, 2000, 3000]);
  });

  it("frees the probe when it times out unanswered or ends for a reason not the worker's", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now, cooldownMs: 1000, probeTimeoutMs: 5000 });
    tracker.watch("w", "m").end("timeout");
    time.advance(1000);
    tracker.reserved("w", "m");
    expect(tracker.availability("w", "m")).toBe("cooling");
    // The order was never dispatched (its hold failed): the probe is given up after its timeout.
    time.advance(5000);
    expect(tracker.availability("w", "m")).toBe("available");
    tracker.reserved("w", "m");
    tracker.watch("w", "m").end("neutral");
    expect(tracker.availability("w", "m")).toBe("available");
    expect(tracker.snapshot("w", "m").state).toBe("probation");
  });

  it("holds a new worker to one request at a time until its first token", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now, probeTimeoutMs: 5000 });
    expect(tracker.availability("new", "m")).toBe("available");
    tracker.reserved("new", "m");
    expect(tracker.availability("new", "m")).toBe("cooling");
    // Its first request fails fast: a normal failure (three are allowed); the next may try it.
    tracker.watch("new", "m").end("error");
    expect(tracker.availability("new", "m")).toBe("available");
    tracker.reserved("new", "m");
    const watch = tracker.watch("new", "m");
    time.advance(300);
    watch.chunk(1);
    expect(tracker.availability("new", "m")).toBe("available");
    // Proven: reserving its slots no longer holds anyone back.
    tracker.reserved("new", "m");
    expect(tracker.availability("new", "m")).toBe("available");
    expect(tracker.snapshot("new", "m")).toMatchObject({ state: "healthy", timeToFirstTokenMs: 300 });
  });

  it("passes over a proven worker whose attempt waits far longer than its usual first token", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now });
    for (let i = 0; i < 3; i++) {
      const watch = tracker.watch("w", "m");
      time.advance(100);
      watch.chunk(1);
      watch.end("success");
    }
    const stuck = tracker.watch("w", "m");
    time.advance(2_000);
    // 3 × p90 (300 ms) is below the 2 s floor: not yet overdue.
    expect(tracker.availability("w", "m")).toBe("available");
    time.advance(1);
    expect(tracker.availability("w", "m")).toBe("cooling");
    expect(tracker.snapshot("w", "m").state).toBe("healthy");
    stuck.chunk(1);
    expect(tracker.availability("w", "m")).toBe("available");
  });

  it("never offers a suspended worker, and its reputation is 0", () => {
    const tracker = new ReputationTracker();
    tracker.setSuspended("w", true);
    expect(tracker.availability("w", "m")).toBe("suspended");
    expect(tracker.snapshot("w", "m")).toMatchObject({ suspended: true, reputation: 0 });
    tracker.setSuspended("w", false);
    expect(tracker.availability("w", "m")).toBe("available");
  });

  it("ignores what an attempt reports after it ended", () => {
    const time = clock();
    const tracker = new ReputationTracker({ now: time.now });
    const watch = tracker.watch("w", "m");
    watch.end("timeout");
    watch.end("error");
    watch.chunk(1);
    expect(tracker.snapshot("w", "m")).toMatchObject({ attempts: 1, failures: 1, timeToFirstTokenMs: null });
  });
});

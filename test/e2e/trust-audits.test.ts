/**
 * Audits end to end with real tiny models: a trusted verifier (a real worker process running
 * stories260K) scores, teacher-forced, the tokens that other workers returned for consumers'
 * requests (real server, real `openai` SDK). An honest worker process passes every audit; cheating
 * workers — test doubles, the adversaries, connected in process with the worker's own link code —
 * are caught: another model's tokens, random tokens, inflated usage, and a subtle substitute (a
 * copy of stories260K whose F32 weights are rounded to fp16 precision) claimed as the original.
 */
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { runAdminCli } from "../../admin-client/cli.js";
import type { AuditRecord } from "../../server/trust/trust-service.js";
import {
  type Engine,
  type EnginePiece,
  type GenerateRequest,
  type Generation,
  runGeneration,
} from "../../worker/engines/engine.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import { WorkerLink } from "../../worker/link-client.js";
import { weightsSha256 } from "../../worker/weights-hash.js";
import { startFakeEngine } from "../support/fake-engine.js";
import { writePerturbedGguf } from "../support/gguf-perturb.js";
import { ledgerIsBalanced, platformBalance, startTestMarket, type TestMarket } from "../support/market.js";
import { STORIES_260K, TINY_RANDOM } from "../support/models.js";
import { claimedLlamaCppOffer, STORIES_SHA256 } from "../support/trust.js";

const present = existsSync(STORIES_260K) && existsSync(TINY_RANDOM);
if (!present) console.warn(`skipping the trust audit tests: ${STORIES_260K} or ${TINY_RANDOM} is absent`);

const LLAMA = ["--engine", "llama-cpp", "--gpu", "off", "--threads", "1"];
const PROMPTS = ["Once upon a time", "The cat sat", "Lily and Ben went to the park", "One day, a little boy"];

/** Wraps an engine, rewriting what it yields: the cheats below. */
function rewriting(inner: Engine, rewrite: (piece: EnginePiece) => EnginePiece, usageFactor = 1): Engine {
  return {
    name: inner.name,
    async *generate(request: GenerateRequest): Generation {
      const pieces: EnginePiece[] = [];
      const result = await runGeneration(inner.generate(request), (piece) => {
        pieces.push(rewrite(piece));
      });
      yield* pieces;
      return result.usage
        ? {
            ...result,
            usage: {
              promptTokens: result.usage.promptTokens,
              completionTokens: result.usage.completionTokens * usageFactor,
            },
          }
        : result;
    },
    close: () => inner.close(),
  };
}

/**
 * Random tokens: the cheater has the tokenizer (it loaded the GGUF) but runs no model; it draws
 * token ids uniformly and claims a confident log-probability for each.
 */
function randomTokens(detokenize: (tokenIds: number[]) => string, close: () => Promise<void>): Engine {
  let state = 7;
  const next = () => {
    state = (state * 1103515245 + 12345) % 2147483648;
    return state;
  };
  return {
    name: "llama.cpp",
    async *generate(request: GenerateRequest): Generation {
      const count = request.maxTokens;
      for (let i = 0; i < count; i++) {
        const tokenId = 3 + (next() % 500);
        const text = detokenize([tokenId]);
        yield {
          text,
          tokenCount: 1,
          ...(request.tokenDetail ? { tokenDetails: [{ tokenId, logprob: -0.7, top: [] }] } : {}),
        };
      }
      return { finishReason: "length", usage: { promptTokens: 5, completionTokens: count } };
    },
    close,
  };
}

describe.skipIf(!present)("audits with real models: honest workers pass, cheaters are caught", () => {
  let market: TestMarket;
  let consumer: { accountId: string; apiKey: string };
  let provider: { accountId: string; apiKey: string };
  let dir: string;
  const links: WorkerLink[] = [];
  const engines: Engine[] = [];

  beforeAll(async () => {
    dir = mkdtempSync(join(tmpdir(), "llm-trust-"));
    // --token-detail-rate 10000 --audit-rate 10000: every eligible job carries token detail and is
    // audited, so each request gives one audit.
    market = await startTestMarket({ tokenDetailBasisPoints: 10_000, auditBasisPoints: 10_000 });
    expect(market.plane.trust.auditRate).toBe(1);
    // This file measures detection over several requests per cheater; a suspension after two failed
    // tests would end a cheater mid-way. Suspension is tested in trust-consequences.test.ts.
    market.plane.trust.suspendAfterFailures = Number.POSITIVE_INFINITY;
    consumer = await market.account("reader", 100);
    provider = await market.account("gpu-owner");
    const verifier = await market.worker({
      accountId: provider.accountId,
      model: "stories260K-reference",
      priceIn: "1000",
      priceOut: "1000",
      tps: 500,
      engine: [...LLAMA, "--model-path", STORIES_260K],
    });
    // The operator's command: `locallmarket admin worker trust --worker ID`.
    const trusted = await admin(["worker", "trust", "--worker", verifier.workerId, "--json"]);
    expect(trusted).toEqual({
      code: 0,
      stdout: `{"workerId":"${verifier.workerId}","trusted":true}\n`,
      stderr: "",
    });
    expect(market.plane.trust.isTrusted(verifier.workerId)).toBe(true);
    expect(await market.plane.trust.store?.trustedWorkers()).toEqual([verifier.workerId]);
    expect(verifier.output()).toContain(`weights sha256 ${STORIES_SHA256}`);
  }, 60_000);

  afterAll(async () => {
    await Promise.all(links.map((link) => link.stop()));
    // The links do not own their engines: each in-process llama.cpp is freed here.
    await Promise.all(engines.map((engine) => engine.close().catch(() => undefined)));
    await market?.close();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  /** Runs `locallmarket admin …` in process against the market. */
  async function admin(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    let stdout = "";
    let stderr = "";
    const code = await runAdminCli(args, {
      stdout: (text) => {
        stdout += text;
      },
      stderr: (text) => {
        stderr += text;
      },
      env: { LOCALLMARKET_SERVER: market.plane.grpcUrl, LOCALLMARKET_ADMIN_TOKEN: "test-admin-token" },
    });
    return { code, stdout, stderr };
  }

  it("refuses to trust an unknown worker with a clear error", async () => {
    const result = await admin(["worker", "trust", "--worker", "wkr_nobody"]);
    expect(result.code).toBe(1);
    expect(result.stderr).toContain("worker wkr_nobody not found");
  });

  /** Connects an in-process (cheating) worker offering `model` and claiming stories260K's hash. */
  async function cheater(model: string, engine: Engine, weightsSha256 = STORIES_SHA256): Promise<string> {
    const { workerToken, workerId } = await market.admin.createWorkerToken({
      accountId: provider.accountId,
      label: model,
    });
    const link = new WorkerLink({
      server: market.plane.grpcUrl,
      token: workerToken,
      engine,
      log: () => {},
      offers: [claimedLlamaCppOffer(model, weightsSha256)],
    });
    links.push(link);
    engines.push(engine);
    void link.start().catch(() => {});
    await market.plane.registry.whenConnected(workerId);
    return workerId;
  }

  /** Sends `count` requests for `model` and waits for their audits. */
  async function serve(
    model: string,
    workerId: string,
    count: number,
    temperature: number,
    maxTokens = 64,
  ): Promise<AuditRecord[]> {
    const before = market.plane.trust.audits(workerId).length;
    const client = market.openai(consumer.apiKey);
    const orderIds: string[] = [];
    for (let i = 0; i < count; i++) {
      const completion = await client.chat.completions.create({
        model,
        messages: [{ role: "user", content: PROMPTS[i % PROMPTS.length] as string }],
        max_tokens: maxTokens,
        temperature,
      });
      orderIds.push(completion.id);
    }
    await vi.waitFor(() => expect(market.plane.trust.audits(workerId).length).toBe(before + count), {
      timeout: 30_000,
      interval: 50,
    });
    const audits = market.plane.trust.audits(workerId).slice(before);
    // Each order records that it was audited, and the outcome.
    expect(audits.map((a) => a.orderId)).toEqual(orderIds);
    for (const audit of audits) {
      expect(await market.plane.trust.store?.auditOfOrder(audit.orderId)).toMatchObject({
        auditId: audit.auditId,
        outcome: audit.outcome,
      });
    }
    return audits;
  }

  it("never asks token detail of an offer that cannot give it (--engine openai), so never audits it", async () => {
    const fake = await startFakeEngine();
    try {
      const worker = await market.worker({
        accountId: provider.accountId,
        model: "stories-openai",
        priceIn: "1",
        priceOut: "1",
        tps: 500,
        engine: ["--engine", "openai", "--engine-url", fake.url, "--weights-sha256", STORIES_SHA256],
      });
      await market.openai(consumer.apiKey).chat.completions.create({
        model: "stories-openai",
        messages: [{ role: "user", content: "hi" }],
        max_tokens: 4,
      });
      await market.plane.trust.settled();
      expect(market.plane.trust.audits(worker.workerId)).toEqual([]);
      const response = await fetch(`${market.plane.httpUrl}/v1/models/stories-openai`);
      const body = (await response.json()) as { locallmarket: { builds: { weights_sha256: string }[] } };
      expect(body.locallmarket.builds[0]?.weights_sha256).toBe(STORIES_SHA256);
      await worker.stop();
    } finally {
      await fake.close();
    }
  });

  it("gives no verdict when the only verifier for a hash cannot score (its engine has no teacher forcing)", async () => {
    const otherHash = "cd".repeat(32);
    const fake = await startFakeEngine();
    try {
      const verifier = await market.worker({
        accountId: provider.accountId,
        model: "other-reference",
        priceIn: "1000",
        priceOut: "1000",
        tps: 500,
        engine: ["--engine", "openai", "--engine-url", fake.url, "--weights-sha256", otherHash],
      });
      expect((await admin(["worker", "trust", "--worker", verifier.workerId])).code).toBe(0);
      const engine = await LlamaCppEngine.load({
        modelPath: STORIES_260K,
        gpu: false,
        threads: 1,
        contextSize: 512,
      });
      const workerId = await cheater("other-model", engine, otherHash);
      await market.openai(consumer.apiKey).chat.completions.create({
        model: "other-model",
        messages: [{ role: "user", content: "Once upon a time" }],
        max_tokens: 8,
      });
      await market.plane.trust.settled();
      expect(market.plane.trust.audits(workerId)).toEqual([]);
      // The verifier was asked, and said it cannot score: no verdict on the audited worker.
      await vi.waitFor(() => expect(verifier.output()).toContain("cannot score"), { timeout: 10_000 });
      await verifier.stop();
    } finally {
      await fake.close();
    }
  });

  it("/v1/models shows each build's weights hash and engine version", async () => {
    const response = await fetch(`${market.plane.httpUrl}/v1/models/stories260K-reference`);
    const body = (await response.json()) as {
      locallmarket: { builds: { weights_sha256: string; engine: string; engine_version: string }[] };
    };
    expect(body.locallmarket.builds).toEqual([
      expect.objectContaining({ weights_sha256: STORIES_SHA256, engine: "llama.cpp", workers: 1 }),
    ]);
    expect(body.locallmarket.builds[0]?.engine_version).toMatch(/^node-llama-cpp \d+\.\d+\.\d+/);
  });

  it("an honest llama-cpp worker passes every audit, greedy and sampled, with no false alarm", async () => {
    const honest = await market.worker({
      accountId: provider.accountId,
      model: "stories260K",
      priceIn: "1",
      priceOut: "1",
      tps: 500,
      engine: [...LLAMA, "--model-path", STORIES_260K],
    });
    const audits = [
      ...(await serve("stories260K", honest.workerId, 4, 0)),
      ...(await serve("stories260K", honest.workerId, 4, 1)),
    ];
    expect(audits.map((a) => a.outcome)).not.toContain("failed");
    expect(audits.filter((a) => a.outcome === "passed").length).toBeGreaterThanOrEqual(6);
    for (const audit of audits) {
      expect(audit.stats.violations).toEqual([]);
      expect(audit.verifierId).not.toBe(honest.workerId);
      expect(audit.stats.tokens).toBeGreaterThan(0);
    }
    // At temperature 0 the honest tokens are the reference's greedy choices.
    for (const audit of audits.slice(0, 4)) expect(audit.stats.greedyAgreement).toBe(1);
    expect(market.plane.trust.trustOf(honest.workerId)).toMatchObject({ auditsFailed: 0 });
    // Every audit is on record in the database.
    const [tally] = (await market.plane.trust.store?.tallies([honest.workerId])) ?? [];
    expect(tally).toMatchObject({
      auditsFailed: 0,
      auditsPassed: audits.filter((a) => a.outcome === "passed").length,
    });
  }, 120_000);

  it("catches a subtle substitute: stories260K with its weights rounded to 10 mantissa bits (fp16 precision), claimed as the original", async () => {
    const copy = join(dir, "stories260K-fp16-precision.gguf");
    expect(writePerturbedGguf(STORIES_260K, copy, { kind: "round", mantissaBits: 10 })).toBeGreaterThan(
      10_000,
    );
    expect(await weightsSha256(copy)).not.toBe(STORIES_SHA256);
    const engine = await LlamaCppEngine.load({ modelPath: copy, gpu: false, threads: 1, contextSize: 2048 });
    const workerId = await cheater("stories-fp16", engine);
    const consumerBefore = await market.balance(consumer.accountId);
    const providerBefore = await market.balance(provider.accountId);
    const platformBefore = await platformBalance(market);
    // 128 tokens: the subtlest substitute needs up to ~75 to decide (BENCHMARKS.md).
    const audits = await serve("stories-fp16", workerId, 3, 1, 128);
    await market.plane.trust.settled();
    // A story can end early (EOS) before the test decides: such a job is undecided and its evidence
    // carries over to the next one. None passes; the first 128-token answer decides.
    expect(audits.map((a) => a.outcome)).not.toContain("passed");
    expect(audits.map((a) => a.outcome)).toContain("failed");
    // Consequences: each failed order's pending earning is clawed back and the consumer refunded
    // in full (provider share and platform fee), and so are the undecided orders before it that the
    // failed test covered; the others stay paid; no money is created or destroyed.
    const covered = new Set(audits.flatMap((a) => (a.coveredClawBacks ?? []).map((c) => c.orderId)));
    let kept = { cost: 0n, fee: 0n };
    for (const audit of audits) {
      const { order } = await market.admin.getOrder({ orderId: audit.orderId });
      if (audit.outcome === "failed") expect(audit.clawBack).toMatchObject({ done: true });
      else if (!covered.has(audit.orderId))
        kept = { cost: kept.cost + (order?.cost ?? 0n), fee: kept.fee + (order?.fee ?? 0n) };
    }
    expect((await market.balance(consumer.accountId)).available).toBe(consumerBefore.available - kept.cost);
    expect((await market.balance(provider.accountId)).pending).toBe(
      providerBefore.pending + kept.cost - kept.fee,
    );
    expect(await platformBalance(market)).toBe(platformBefore + kept.fee);
    expect(await ledgerIsBalanced(market)).toMatchObject({ ok: true });
    expect((await market.admin.auditLedger({})).problems).toEqual([]);
    expect(audits[0]?.stats.violations).toEqual([]); // caught by the statistics, not a count
    // Decided by the evidence of the answers so far (up to 128 scored tokens each); how many tokens
    // it takes varies with the sampled text (31 on average, up to ~75: BENCHMARKS.md).
    const firstFailed = audits.findIndex((a) => a.outcome === "failed");
    expect(audits[firstFailed]?.tokensToDecide).toBeGreaterThan(0);
    expect(audits[firstFailed]?.tokensToDecide).toBeLessThanOrEqual(128 * (firstFailed + 1));
  }, 60_000);

  it("catches another model's tokens claimed as the reference (llama-2-tiny-random as stories260K)", async () => {
    const engine = await LlamaCppEngine.load({
      modelPath: TINY_RANDOM,
      gpu: false,
      threads: 1,
      contextSize: 2048,
    });
    const workerId = await cheater("stories-tiny", engine);
    const audits = await serve("stories-tiny", workerId, 2, 0);
    expect(audits.map((a) => a.outcome)).toEqual(["failed", "failed"]);
  }, 60_000);

  it("catches random tokens claiming confident log-probabilities", async () => {
    const { getLlama } = await import("node-llama-cpp");
    const llama = await getLlama({ gpu: false, maxThreads: 1 });
    const model = await llama.loadModel({ modelPath: STORIES_260K });
    const detokenize = (ids: number[]) =>
      model.detokenize(ids as unknown as Parameters<typeof model.detokenize>[0]);
    const workerId = await cheater(
      "stories-random",
      randomTokens(detokenize, async () => {
        await model.dispose();
        await llama.dispose();
      }),
    );
    const [audit] = await serve("stories-random", workerId, 1, 1);
    expect(audit?.outcome).toBe("failed");
    expect(audit?.stats.medianRank).toBeGreaterThan(5);
    // Every token's claimed log-probability is far from the reference's.
    expect(audit?.stats.anomalies).toBeGreaterThan(0.9 * (audit?.stats.tokens ?? 0));
  }, 60_000);

  it("catches inflated usage: honest tokens, two claimed per token", async () => {
    const inner = await LlamaCppEngine.load({
      modelPath: STORIES_260K,
      gpu: false,
      threads: 1,
      contextSize: 2048,
    });
    const workerId = await cheater(
      "stories-inflated",
      rewriting(inner, (piece) => ({ ...piece, tokenCount: piece.tokenCount * 2 }), 2),
    );
    const [audit] = await serve("stories-inflated", workerId, 1, 0);
    expect(audit?.outcome).toBe("failed");
    expect(audit?.stats.violations.join("; ")).toMatch(/chunks counted \d+ tokens but \d+ were reported/);
  }, 60_000);
});

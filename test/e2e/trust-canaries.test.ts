/**
 * Blind canaries end to end with a real tiny model: consumers' requests (real server, real `openai`
 * SDK) are each followed by a canary (the rate forced to 100 %), a platform prompt with a fresh
 * nonce sent to a worker of the same model through the same JobAssign path; a trusted verifier (a
 * real worker process running stories260K) generates the reference answer. An honest llama-cpp
 * worker process passes its canaries; a worker that replays its last answer (a test double, the
 * adversary, connected in process with the worker's own link code) is caught; canaries bill
 * nobody; and the JobAssign a worker receives for a canary has the same fields set as a consumer's.
 */
import { existsSync } from "node:fs";
import { toJson } from "@bufbuild/protobuf";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { type JobAssign, JobAssignSchema } from "../../gen/locallmarket/v1/worker_pb.js";
import type { CanaryRecord } from "../../server/trust/canary.js";
import {
  type Engine,
  type EnginePiece,
  type GenerateRequest,
  type Generation,
  type GenerationResult,
  runGeneration,
} from "../../worker/engines/engine.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import { WorkerLink } from "../../worker/link-client.js";
import { ledgerIsBalanced, platformBalance, startTestMarket, type TestMarket } from "../support/market.js";
import { STORIES_260K } from "../support/models.js";
import { claimedLlamaCppOffer } from "../support/trust.js";

const present = existsSync(STORIES_260K);
if (!present) console.warn(`skipping the blind canary tests: ${STORIES_260K} is absent (../shared/models)`);

const LLAMA = ["--engine", "llama-cpp", "--gpu", "off", "--threads", "1"];
const MAX_TOKENS = 24;

/**
 * The cheat: answers the first job honestly, then replays that answer (its pieces and usage) to
 * every later job, whatever it asks — a worker saving compute by serving a cache.
 */
function replaying(inner: Engine): Engine & { replays: number } {
  let last: { pieces: EnginePiece[]; result: GenerationResult } | null = null;
  const engine = {
    name: inner.name,
    replays: 0,
    async *generate(request: GenerateRequest): Generation {
      if (last) {
        engine.replays += 1;
        yield* last.pieces;
        return last.result;
      }
      const pieces: EnginePiece[] = [];
      const result = await runGeneration(inner.generate(request), (piece) => {
        pieces.push(piece);
      });
      last = { pieces, result };
      yield* pieces;
      return result;
    },
    close: () => inner.close(),
  };
  return engine;
}

/** The set fields of a message, recursively, with the type of each value instead of the value. */
function shape(value: unknown): unknown {
  if (Array.isArray(value)) return value.map(shape);
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(
      Object.entries(value as Record<string, unknown>)
        .sort(([a], [b]) => a.localeCompare(b))
        .map(([key, inner]) => [key, shape(inner)]),
    );
  }
  return typeof value;
}

describe.skipIf(!present)(
  "blind canaries with a real model: honest workers pass, a replaying worker is caught",
  () => {
    let market: TestMarket;
    let consumer: { accountId: string; apiKey: string };
    let provider: { accountId: string; apiKey: string };
    let verifierId: string;
    const links: WorkerLink[] = [];
    const engines: Engine[] = [];

    beforeAll(async () => {
      // Every consumer order is followed by a canary; no audits, so every verdict below is a canary's.
      market = await startTestMarket({
        canaryBasisPoints: 10_000,
        tokenDetailBasisPoints: 0,
        auditBasisPoints: 0,
      });
      expect(market.plane.canaries.rate).toBe(1);
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
      verifierId = verifier.workerId;
      await market.plane.trust.setTrusted(verifierId, true);
    }, 60_000);

    afterAll(async () => {
      await Promise.all(links.map((link) => link.stop()));
      // The links do not own their engines: each in-process llama.cpp is freed here.
      await Promise.all(engines.map((engine) => engine.close().catch(() => undefined)));
      await market?.close();
    });

    /** Connects an in-process worker offering `model` as stories260K, seeing every JobAssign it gets. */
    async function inProcessWorker(
      model: string,
      engine: Engine,
    ): Promise<{ workerId: string; received: { assign: JobAssign; at: number }[] }> {
      const { workerToken, workerId } = await market.admin.createWorkerToken({
        accountId: provider.accountId,
        label: model,
      });
      const link = new WorkerLink({
        server: market.plane.grpcUrl,
        token: workerToken,
        engine,
        log: () => {},
        offers: [claimedLlamaCppOffer(model)],
      });
      // What the worker receives, as its own link code decoded it from the wire.
      const received: { assign: JobAssign; at: number }[] = [];
      const hooked = link as unknown as { onJobAssign(session: unknown, assign: JobAssign): void };
      const original = hooked.onJobAssign.bind(link);
      hooked.onJobAssign = (session, assign) => {
        received.push({ assign, at: Date.now() });
        original(session, assign);
      };
      links.push(link);
      engines.push(engine);
      void link.start().catch(() => {});
      await market.plane.registry.whenConnected(workerId);
      return { workerId, received };
    }

    /** Sends `prompts` for `model` one by one; each order is followed by one canary: waits for them. */
    async function serve(model: string, workerId: string, prompts: string[]): Promise<CanaryRecord[]> {
      const before = market.plane.canaries.canaries(workerId).length;
      const client = market.openai(consumer.apiKey);
      for (const content of prompts) {
        await client.chat.completions.create({
          model,
          messages: [{ role: "user", content }],
          max_tokens: MAX_TOKENS,
          temperature: 0.7,
        });
      }
      await vi.waitFor(
        () => expect(market.plane.canaries.canaries(workerId).length).toBe(before + prompts.length),
        { timeout: 30_000, interval: 50 },
      );
      return market.plane.canaries.canaries(workerId).slice(before);
    }

    it("an honest llama-cpp worker passes its canaries, and canaries bill nobody", async () => {
      const honest = await market.worker({
        accountId: provider.accountId,
        model: "stories260K",
        priceIn: "1",
        priceOut: "1",
        tps: 500,
        engine: [...LLAMA, "--model-path", STORIES_260K],
      });
      const consumerBefore = await market.balance(consumer.accountId);
      const providerBefore = await market.balance(provider.accountId);
      const platformBefore = await platformBalance(market);
      const ordersBefore = (await market.admin.listOrders({ limit: 1000 })).orders.length;
      const canaries = await serve("stories260K", honest.workerId, [
        "Once upon a time",
        "The cat sat",
        "Tom had a dog",
      ]);
      for (const canary of canaries) {
        expect(canary).toMatchObject({ outcome: expect.not.stringMatching(/failed|no_verdict/), reason: "" });
        expect(canary.answer.length).toBeGreaterThan(0);
        expect(canary.answer).toBe(canary.reference);
        expect(canary.verifierId).toBe(verifierId);
        expect(canary.maxTokens).toBe(MAX_TOKENS);
        expect(canary.audit?.stats.violations).toEqual([]);
      }
      // Each nonce is fresh: no two canaries asked the same thing.
      expect(new Set(canaries.map((c) => c.prompt)).size).toBe(canaries.length);
      expect(canaries.filter((c) => c.outcome === "passed").length).toBeGreaterThanOrEqual(2);
      expect(market.plane.trust.trustOf(honest.workerId)).toMatchObject({ auditsFailed: 0 });
      // Recorded as audits (id prefix can_), with no order.
      const [tally] = (await market.plane.trust.store?.tallies([honest.workerId])) ?? [];
      expect(tally).toMatchObject({
        auditsFailed: 0,
        auditsPassed: canaries.filter((c) => c.outcome === "passed").length,
      });

      // Money: only the three consumer orders exist and moved money; the canaries created no order,
      // charged no consumer, paid no provider, took no fee.
      const orders = (await market.admin.listOrders({ limit: 1000 })).orders;
      expect(orders.length).toBe(ordersBefore + 3);
      const mine = orders.slice(0, 3);
      expect(
        mine.every((o) => o.consumerAccountId === consumer.accountId && o.workerId === honest.workerId),
      ).toBe(true);
      const cost = mine.reduce((sum, o) => sum + o.cost, 0n);
      const fee = mine.reduce((sum, o) => sum + o.fee, 0n);
      expect((await market.balance(consumer.accountId)).available).toBe(consumerBefore.available - cost);
      expect((await market.balance(provider.accountId)).pending).toBe(providerBefore.pending + cost - fee);
      expect(await platformBalance(market)).toBe(platformBefore + fee);
      expect(await ledgerIsBalanced(market)).toMatchObject({ ok: true, problems: [] });
      await honest.stop();
    }, 120_000);

    it("a worker that replays cached answers is caught by canaries, and its covered orders are refunded", async () => {
      const inner = await LlamaCppEngine.load({
        modelPath: STORIES_260K,
        gpu: false,
        threads: 1,
        contextSize: 2048,
      });
      const engine = replaying(inner);
      const { workerId } = await inProcessWorker("stories-cache", engine);
      const canaries = await serve("stories-cache", workerId, ["Once upon a time", "The cat sat"]);
      // Every canary got the replayed consumer answer; the reference differs because the nonce steers it.
      expect(engine.replays).toBeGreaterThanOrEqual(2);
      for (const canary of canaries) {
        expect(canary.outcome).toBe("failed");
        expect(canary.answer).not.toBe(canary.reference);
        expect(canary.reason).toMatch(
          /^canary: the answer differs from the reference answer \(temperature 0, seed \d+\)/,
        );
        expect(canary.audit?.outcome).toBe("failed");
      }
      expect(market.plane.trust.trustOf(workerId)).toMatchObject({ auditsFailed: 2 });
      const [tally] = (await market.plane.trust.store?.tallies([workerId])) ?? [];
      expect(tally).toMatchObject({ auditsFailed: 2, auditsPassed: 0 });
      // The verdicts feed the matcher's reputation like audits.
      expect(market.plane.registry.reputation.snapshot(workerId, "stories-cache")).toMatchObject({
        auditsFailed: 2,
      });
      // Consequences, as for an audit: the failed tests' covered orders are clawed back and the
      // consumer refunded; the ledger still balances.
      const clawedBack = canaries.flatMap((c) => c.audit?.coveredClawBacks ?? []);
      expect(clawedBack.length).toBeGreaterThanOrEqual(1);
      expect(await ledgerIsBalanced(market)).toMatchObject({ ok: true, problems: [] });
    }, 120_000);

    it("a worker cannot tell a canary's JobAssign from a consumer's: the same fields, the same formats", async () => {
      const engine = await LlamaCppEngine.load({
        modelPath: STORIES_260K,
        gpu: false,
        threads: 1,
        contextSize: 2048,
      });
      const { workerId, received } = await inProcessWorker("stories-inprocess", engine);
      const [canary] = await serve("stories-inprocess", workerId, ["Lily and Ben went to the park"]);
      expect(canary?.outcome).not.toBe("failed");
      expect(received.length).toBe(2);
      const asCanary = received.find((r) => r.assign.jobId === canary?.jobId);
      const asConsumer = received.find((r) => r.assign.jobId !== canary?.jobId);
      if (!asCanary || !asConsumer) throw new Error("the canary's or the consumer's JobAssign is missing");
      const canaryJson = toJson(JobAssignSchema, asCanary.assign) as Record<string, unknown>;
      const consumerJson = toJson(JobAssignSchema, asConsumer.assign) as Record<string, unknown>;
      // Field by field: the same fields are set, each of the same type, down to the messages and sampling.
      expect(shape(canaryJson)).toEqual(shape(consumerJson));
      expect(Object.keys(canaryJson).sort()).toEqual(Object.keys(consumerJson).sort());
      // The same id format, model, max_tokens and deadline rule; a seed on both; one user message.
      for (const { assign, at } of [asCanary, asConsumer]) {
        expect(assign.jobId).toMatch(/^job_[A-Za-z0-9_-]{16}$/);
        expect(assign.model).toBe("stories-inprocess");
        expect(assign.maxTokens).toBe(MAX_TOKENS);
        expect(assign.messages.map((m) => m.role)).toEqual(["user"]);
        expect(assign.sampling?.seed).toBeDefined();
        expect(assign.tokenDetail).toBeUndefined();
        expect(Number(assign.deadlineUnixMs)).toBeGreaterThan(at);
      }
      // Both deadlines are the job timeout after their creation, give or take the waits between.
      const lead = (r: { assign: JobAssign; at: number }) => Number(r.assign.deadlineUnixMs) - r.at;
      expect(Math.abs(lead(asCanary) - lead(asConsumer))).toBeLessThan(10_000);
    }, 120_000);
  },
);

/**
 * The verifier's building blocks with the real stories260K model: token detail from a generation,
 * the server-issued seed honoured, teacher-forced scoring (one prefill) agreeing with what the
 * generation reported, the weights hash, and the GGUF rewriting script used for subtle substitutes.
 */
import { existsSync, mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { auditStatistics, SequentialTest } from "../../server/trust/statistics.js";
import { collectGeneration, type EngineError, type GenerateRequest } from "../../worker/engines/engine.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import { weightsSha256 } from "../../worker/weights-hash.js";
import { parseGguf, perturbGguf } from "../support/gguf-perturb.js";
import { STORIES_260K } from "../support/models.js";

const present = existsSync(STORIES_260K);
if (!present) console.warn(`skipping the trust scoring tests: ${STORIES_260K} is absent`);

const STORIES_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";
const signal = () => new AbortController().signal;

function request(temperature: number, seed: number, maxTokens = 40): Omit<GenerateRequest, "signal"> {
  return {
    model: "stories260K",
    messages: [],
    prompt: "Once upon a time",
    sampling: { temperature, seed },
    maxTokens,
    tokenDetail: { topK: 5 },
  };
}

describe.skipIf(!present)("token detail and teacher-forced scoring (stories260K)", () => {
  let engine: LlamaCppEngine;

  beforeAll(async () => {
    engine = await LlamaCppEngine.load({ modelPath: STORIES_260K, gpu: false, threads: 1, contextSize: 512 });
  });
  afterAll(async () => {
    await engine?.close();
  });

  async function generate(r: Omit<GenerateRequest, "signal">) {
    const out = await collectGeneration(engine.generate({ ...r, signal: signal() }));
    return { ...out, details: out.pieces.flatMap((p) => p.tokenDetails ?? []) };
  }

  it("reports one token detail per generated token, with ids, logprobs ≤ 0 and top-k most likely first", async () => {
    const { details, result, pieces } = await generate(request(1, 7));
    expect(details).toHaveLength(40);
    expect(pieces.reduce((sum, p) => sum + p.tokenCount, 0)).toBe(details.length);
    for (const detail of details) {
      expect(detail.tokenId).toBeGreaterThanOrEqual(0);
      expect(detail.tokenId).toBeLessThan(512);
      expect(detail.logprob).toBeLessThanOrEqual(0);
      expect(detail.top).toHaveLength(5);
      const logprobs = detail.top.map((t) => t.logprob);
      expect([...logprobs].sort((a, b) => b - a)).toEqual(logprobs);
      // The sampled token is in the top-k exactly when it is at least as likely as the k-th.
      if (detail.logprob > (detail.top[4]?.logprob ?? 0))
        expect(detail.top.map((t) => t.tokenId)).toContain(detail.tokenId);
    }
    expect(result.usage?.completionTokens).toBe(40);
  });

  it("honours the seed: the same seed gives the same tokens at temperature 1, another seed different ones", async () => {
    const a = await generate(request(1, 1234));
    const b = await generate(request(1, 1234));
    const c = await generate(request(1, 99));
    expect(b.details.map((d) => d.tokenId)).toEqual(a.details.map((d) => d.tokenId));
    expect(c.details.map((d) => d.tokenId)).not.toEqual(a.details.map((d) => d.tokenId));
  });

  it("scores the returned tokens in one prefill: the generation's logprobs up to rounding, spelled text, prompt count", async () => {
    for (const temperature of [0, 1, 0.7]) {
      const r = request(temperature, 5);
      const { details, text, result } = await generate(r);
      const scored = await engine.score({
        request: r,
        tokenIds: details.map((d) => d.tokenId),
        topK: 5,
        signal: signal(),
      });
      expect(scored.text).toBe(text);
      expect(scored.promptTokens).toBe(result.usage?.promptTokens);
      expect(scored.scores).toHaveLength(details.length);
      const deltas = details.map((d, i) => Math.abs(d.logprob - (scored.scores[i]?.logprob ?? 0)));
      // Batched (prefill) and one-token-at-a-time kernels round differently: a rare unlikely token
      // differs by up to a few 1e-2 nats; the audit's statistics still see an honest job.
      expect(Math.max(...deltas)).toBeLessThan(5e-2);
      const stats = auditStatistics({
        temperature,
        topK: 5,
        stoppedBySequence: false,
        streamedText: text,
        chunkTokenCount: details.length,
        usage: result.usage ?? null,
        reported: details,
        reference: { ...scored, error: "" },
      });
      expect(stats.violations).toEqual([]);
      expect(stats.anomalies).toBeLessThan(0.4 * stats.tokens);
      expect(new SequentialTest().feed(stats).outcome).not.toBe("failed");
      // Rank 0 is the reference's argmax; at temperature 0 every token is it.
      if (temperature === 0) expect(scored.scores.every((s) => s.rank === 0)).toBe(true);
      for (const s of scored.scores) expect(s.top[0]?.logprob).toBeGreaterThanOrEqual(s.logprob);
    }
  });

  it("scores only the positions asked, each exactly as a full scoring does", async () => {
    const r = request(1, 3);
    const { details, text } = await generate(r);
    const tokenIds = details.map((d) => d.tokenId);
    const full = await engine.score({ request: r, tokenIds, topK: 5, signal: signal() });
    const some = await engine.score({
      request: r,
      tokenIds,
      positions: [0, 7, 39],
      topK: 5,
      signal: signal(),
    });
    expect(some.scores).toEqual([full.scores[0], full.scores[7], full.scores[39]]);
    expect(some.text).toBe(text);
    await expect(
      engine.score({ request: r, tokenIds, positions: [7, 3], topK: 5, signal: signal() }),
    ).rejects.toThrow(/ascending/);
  });

  it("ranks a token by how many tokens the reference finds more likely", async () => {
    const r = request(0, 1, 1);
    const { details } = await generate(r);
    const top = details[0]?.top ?? [];
    const third = top[2]?.tokenId as number;
    const scored = await engine.score({ request: r, tokenIds: [third], topK: 5, signal: signal() });
    expect(scored.scores[0]?.rank).toBe(2);
    expect(scored.scores[0]?.logprob).toBeCloseTo(top[2]?.logprob as number, 2);
  });

  it("refuses token ids outside the vocabulary with invalid_input", async () => {
    await expect(
      engine.score({ request: request(0, 1), tokenIds: [5, 512], topK: 0, signal: signal() }),
    ).rejects.toMatchObject({ code: "invalid_input" } satisfies Partial<EngineError>);
  });

  it("names its version for the offer", () => {
    expect(engine.version).toMatch(/^node-llama-cpp \d+\.\d+\.\d+ \(llama\.cpp /);
  });
});

describe.skipIf(!present)("weights identity and the GGUF rewriting script", () => {
  let dir: string;
  beforeAll(() => {
    dir = mkdtempSync(join(tmpdir(), "llm-gguf-"));
  });
  afterAll(() => rmSync(dir, { recursive: true, force: true }));

  it("streams the file through SHA-256 (the published hash of stories260K)", async () => {
    expect(await weightsSha256(STORIES_260K)).toBe(STORIES_SHA256);
  });

  it("parses GGUF v3 and rewrites only F32 tensor data, keeping every other byte", () => {
    const file = readFileSync(STORIES_260K);
    const layout = parseGguf(file);
    expect(layout.version).toBe(3);
    expect(layout.tensors).toHaveLength(48);
    expect(layout.tensors.every((t) => t.type === 0)).toBe(true);
    const { copy, changed, f32Tensors } = perturbGguf(file, { kind: "round", mantissaBits: 7 });
    expect(f32Tensors).toBe(48);
    expect(changed).toBeGreaterThan(100_000);
    expect(copy.length).toBe(file.length);
    // The header, metadata and tensor infos are untouched.
    expect(copy.subarray(0, layout.dataOffset).equals(file.subarray(0, layout.dataOffset))).toBe(true);
    // Rounded to 7 mantissa bits: the 16 low bits of every weight are zero, and values stay close.
    const view = new DataView(copy.buffer, copy.byteOffset);
    const original = new DataView(file.buffer, file.byteOffset);
    for (let at = layout.dataOffset; at < layout.dataOffset + 4000; at += 4) {
      expect(view.getUint32(at, true) & 0xffff).toBe(0);
      const before = original.getFloat32(at, true);
      expect(Math.abs(view.getFloat32(at, true) - before)).toBeLessThanOrEqual(
        Math.abs(before) / 128 + 1e-30,
      );
    }
    const noisy = perturbGguf(file, { kind: "noise", relative: 0.01, seed: 1 });
    expect(noisy.changed).toBeGreaterThan(100_000);
    expect(perturbGguf(file, { kind: "noise", relative: 0.01, seed: 1 }).copy.equals(noisy.copy)).toBe(true);
  });

  it("refuses what is not GGUF", () => {
    expect(() => parseGguf(Buffer.from("not a gguf file at all"))).toThrow(/bad magic/);
  });
});

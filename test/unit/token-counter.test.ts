/**
 * The platform's token counter (server/models/token-counter.ts) with the real tiny GGUFs: it counts
 * a prompt exactly as the real llama-cpp engine renders it, its per-chunk estimates over a real
 * generation add up to the exact count of the text, and the tokenizer's identity tells two
 * tokenizers apart while a file's hash is the one published for it.
 */
import { existsSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { TokenCounter } from "../../server/models/token-counter.js";
import { collectGeneration } from "../../worker/engines/engine.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import { STORIES_260K, TINY_RANDOM } from "../support/models.js";

const present = existsSync(STORIES_260K) && existsSync(TINY_RANDOM);
if (!present) console.warn(`skipping the token counter tests: ${STORIES_260K} or ${TINY_RANDOM} is absent`);

const STORIES_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";
const TINY_RANDOM_SHA256 = "81f226c62d28ed4a1a9b9fa080fcd9f0cc40e0f9d5680036583ff98fbcd035cb";

describe.skipIf(!present)("TokenCounter (stories260K, llama-2-tiny-random)", () => {
  let stories: TokenCounter;
  let tiny: TokenCounter;
  let engine: LlamaCppEngine;

  beforeAll(async () => {
    stories = await TokenCounter.load(STORIES_260K);
    tiny = await TokenCounter.load(TINY_RANDOM);
    engine = await LlamaCppEngine.load({ modelPath: STORIES_260K, gpu: false, threads: 1, contextSize: 512 });
  });
  afterAll(async () => {
    await engine?.close();
    await stories?.dispose();
    await tiny?.dispose();
  });

  it("hashes the file and identifies the tokenizer: equal for one file, different between the two", async () => {
    expect(stories.ggufSha256).toBe(STORIES_SHA256);
    expect(tiny.ggufSha256).toBe(TINY_RANDOM_SHA256);
    expect(stories.vocabularySize).toBe(512);
    expect(tiny.vocabularySize).toBe(32_000);
    expect(stories.tokenizerModel).toBe("llama");
    expect(stories.chatTemplate).toBe(false);
    expect(stories.tokenizerSha256).toMatch(/^[0-9a-f]{64}$/);
    expect(stories.tokenizerSha256).not.toBe(tiny.tokenizerSha256);
    const again = await TokenCounter.load(STORIES_260K, STORIES_SHA256);
    try {
      expect(again.tokenizerSha256).toBe(stories.tokenizerSha256);
    } finally {
      await again.dispose();
    }
  });

  it("counts a prompt as the llama-cpp engine renders it (conversation and raw completion)", () => {
    const messages = [
      { role: "system", content: "You tell short stories." },
      { role: "user", content: "Once upon a time, there was a little girl named Lily." },
    ];
    const rendered = engine.renderPrompt(messages).tokens.length;
    expect(stories.countPrompt({ messages })).toBe(rendered);
    // The two tokenizers disagree on the same text, so the count is the registered model's own.
    expect(tiny.countPrompt({ messages })).not.toBe(rendered);
    const prompt = "The cat sat on the mat. It was happy";
    expect(stories.countPrompt({ messages: [], prompt })).toBe(engine.renderText(prompt).tokens.length);
  });

  it("adds up per-chunk estimates over a real generation to the exact count of its text", async () => {
    const { pieces } = await collectGeneration(
      engine.generate({
        model: "stories260K",
        messages: [],
        prompt: "Once upon a time",
        sampling: { temperature: 0 },
        maxTokens: 60,
        signal: new AbortController().signal,
      }),
    );
    let tail = "Once upon a time";
    let estimated = 0;
    let text = "";
    for (const piece of pieces) {
      estimated += stories.estimateChunk(tail, piece.text);
      tail = TokenCounter.tail(tail, piece.text);
      text += piece.text;
    }
    const generated = pieces.reduce((sum, piece) => sum + piece.tokenCount, 0);
    expect(generated).toBe(60);
    // After its prompt, the relayed text re-tokenizes to what the engine generated; on its own it
    // would gain SentencePiece's leading space (the text starts with a comma).
    expect(stories.countContinuation("Once upon a time", text)).toBe(generated);
    expect(estimated).toBe(generated);
    expect(stories.countText(text)).toBe(generated + 1);
  });

  it("refuses to count a prompt with images (the order is then unverified)", () => {
    expect(() =>
      stories.countPrompt({
        messages: [{ role: "user", content: "What is this?", imageUrls: ["https://x/y.png"] }],
      }),
    ).toThrow("a prompt with images is not countable from the vocabulary alone");
  });

  it("counts special-token spellings as plain text, and nothing for nothing", () => {
    expect(stories.countText("")).toBe(0);
    expect(stories.countText("</s>")).toBeGreaterThan(1);
  });
});

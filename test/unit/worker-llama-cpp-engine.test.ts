import { existsSync } from "node:fs";
import type { Token } from "node-llama-cpp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { collectGeneration, type EngineMessage } from "../../worker/engines/engine.js";
import {
  LlamaCppEngine,
  StopTextFilter,
  type TokenDetokenizer,
  TokenTextDecoder,
} from "../../worker/engines/llama-cpp-engine.js";
import { STORIES_260K as STORIES, TINY_RANDOM } from "../support/models.js";

const prompt: EngineMessage[] = [{ role: "user", content: "Once upon a time" }];

/** A byte-level "model": token n is the byte n; invalid/incomplete UTF-8 decodes to U+FFFD. */
const byteModel: TokenDetokenizer = {
  detokenize: (tokens) => new TextDecoder("utf-8").decode(Uint8Array.from(tokens)),
};
const bytes = (text: string) => [...new TextEncoder().encode(text)] as unknown as Token[];

describe("TokenTextDecoder", () => {
  it("holds back incomplete UTF-8 characters and releases them whole", () => {
    const decoder = new TokenTextDecoder(byteModel, []);
    const out = bytes("a→b😀").map((token) => decoder.push(token));
    // a, then the 3 bytes of → (E2 86 92), b, then the 4 bytes of 😀.
    expect(out).toEqual(["a", "", "", "→", "b", "", "", "", "😀"]);
    expect(decoder.flush()).toBe("");
  });

  it("flushes a character that never completes", () => {
    const decoder = new TokenTextDecoder(byteModel, []);
    expect(decoder.push(0xe2 as Token)).toBe("");
    expect(decoder.flush()).toBe("\uFFFD");
  });

  it("merges an invalid byte into the next complete text", () => {
    const decoder = new TokenTextDecoder(byteModel, []);
    expect(decoder.push(0xe2 as Token)).toBe("");
    expect(decoder.push(0x41 as Token)).toBe("\uFFFDA");
  });
});

describe("StopTextFilter", () => {
  it("passes text through without stop sequences", () => {
    const filter = new StopTextFilter([]);
    expect(filter.push("abc")).toEqual({ text: "abc", stopped: false });
  });

  it("holds back a possible stop-sequence prefix and cuts at the sequence", () => {
    const filter = new StopTextFilter(["END"]);
    expect(filter.push("hello E")).toEqual({ text: "hello ", stopped: false });
    expect(filter.push("N")).toEqual({ text: "", stopped: false });
    expect(filter.push("D tail")).toEqual({ text: "", stopped: true });
    expect(filter.stopped).toBe(true);
  });

  it("releases a held prefix that turns out not to be a stop sequence", () => {
    const filter = new StopTextFilter(["END"]);
    expect(filter.push("xE")).toEqual({ text: "x", stopped: false });
    expect(filter.push("Nx")).toEqual({ text: "ENx", stopped: false });
    expect(filter.push("EN")).toEqual({ text: "", stopped: false });
    expect(filter.flush()).toBe("EN");
  });

  it("cuts at the earliest of several stop sequences", () => {
    const filter = new StopTextFilter(["zz", "b"]);
    expect(filter.push("aabzz")).toEqual({ text: "aa", stopped: true });
  });
});

if (!existsSync(STORIES)) {
  console.warn(`skipping llama.cpp engine tests: model file ${STORIES} is absent`);
}

describe.skipIf(!existsSync(STORIES))("LlamaCppEngine with stories260K (no chat template)", () => {
  let engine: LlamaCppEngine;

  beforeAll(async () => {
    engine = await LlamaCppEngine.load({ modelPath: STORIES, concurrency: 2 });
  }, 60_000);
  afterAll(async () => {
    await engine?.close();
  });

  it("renders a template-less prompt as BOS + raw text", () => {
    expect(engine.hasChatTemplate).toBe(false);
    const rendered = engine.renderPrompt(prompt);
    expect(rendered.tokens[0]).toBe(1);
    expect(rendered.tokens).toEqual([1, 403, 407, 261, 378]);
  });

  it("generates the known greedy continuation, one token per piece", async () => {
    const { pieces, text, result } = await collectGeneration(
      engine.generate({
        model: "stories",
        messages: prompt,
        sampling: { temperature: 0 },
        maxTokens: 20,
        signal: new AbortController().signal,
      }),
    );
    expect(text).toBe(", there was a little girl named Lily. She loved to play outsid");
    expect(result).toEqual({ finishReason: "length", usage: { promptTokens: 5, completionTokens: 20 } });
    expect(pieces.every((p) => p.tokenCount === 1)).toBe(true);
    expect(pieces.reduce((n, p) => n + p.tokenCount, 0)).toBe(20);
    expect(pieces[0]).toEqual({ text: ",", tokenCount: 1 });
    expect(pieces[1]).toEqual({ text: " there", tokenCount: 1 });
  });

  it("is deterministic across runs and sequences, and longer runs continue the same text", async () => {
    const run = (maxTokens: number) =>
      collectGeneration(
        engine.generate({
          model: "stories",
          messages: prompt,
          sampling: { temperature: 0 },
          maxTokens,
          signal: new AbortController().signal,
        }),
      );
    const [a, b] = await Promise.all([run(30), run(30)]);
    expect(a.text).toBe(b.text);
    expect(
      a.text.startsWith(", there was a little girl named Lily. She loved to play outside in the park."),
    ).toBe(true);
  });

  it("honours stop sequences (excluded from the output)", async () => {
    const { text, result } = await collectGeneration(
      engine.generate({
        model: "stories",
        messages: prompt,
        sampling: { temperature: 0, stop: [" Lily"] },
        maxTokens: 40,
        signal: new AbortController().signal,
      }),
    );
    expect(text).toBe(", there was a little girl named");
    expect(result.finishReason).toBe("stop");
  });

  it("stops with 'cancelled' when the signal aborts", async () => {
    const controller = new AbortController();
    const generation = engine.generate({
      model: "stories",
      messages: prompt,
      sampling: { temperature: 0 },
      maxTokens: 500,
      signal: controller.signal,
    });
    const first = await generation.next();
    expect(first.done).toBe(false);
    controller.abort();
    let step = await generation.next();
    let extra = 0;
    while (!step.done) {
      extra += 1;
      step = await generation.next();
    }
    expect(extra).toBe(0);
    expect(step.value.finishReason).toBe("cancelled");
  });
});

describe.skipIf(!existsSync(TINY_RANDOM))(
  "LlamaCppEngine with llama-2-tiny-random (32000-token vocabulary)",
  () => {
    let engine: LlamaCppEngine;

    beforeAll(async () => {
      engine = await LlamaCppEngine.load({ modelPath: TINY_RANDOM });
    }, 60_000);
    afterAll(async () => {
      await engine?.close();
    });

    it("never emits a partial UTF-8 character and accounts for every token", async () => {
      const { pieces, text, result } = await collectGeneration(
        engine.generate({
          model: "tiny",
          messages: [{ role: "user", content: "日本語のテキスト → ünïcödé" }],
          sampling: { temperature: 1, seed: 2 },
          maxTokens: 200,
          signal: new AbortController().signal,
        }),
      );
      // With this seed the random model emits stray byte tokens: they are merged into the next piece.
      expect(pieces.some((p) => p.tokenCount > 1)).toBe(true);
      for (const [i, piece] of pieces.entries()) {
        expect(piece.text.length).toBeGreaterThan(0);
        if (i < pieces.length - 1) expect(piece.text.endsWith("\uFFFD")).toBe(false);
        expect(piece.tokenCount).toBeGreaterThanOrEqual(1);
        // Lone surrogates would mean a split character.
        expect(Buffer.from(piece.text, "utf8").toString("utf8")).toBe(piece.text);
      }
      expect(result.usage?.completionTokens).toBe(pieces.reduce((n, p) => n + p.tokenCount, 0));
      expect(text.length).toBeGreaterThan(0);
    });
  },
);

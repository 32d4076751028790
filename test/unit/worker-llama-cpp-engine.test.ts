import { existsSync } from "node:fs";
import {
  type ControlledEvaluateInputItem,
  getLlama,
  type Llama,
  LlamaLogLevel,
  type LlamaModel,
  type Token,
} from "node-llama-cpp";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  collectGeneration,
  type EngineError,
  type EngineMessage,
  type EnginePiece,
  type EngineTool,
  type GenerateRequest,
} from "../../worker/engines/engine.js";
import {
  evaluateOptions,
  JsonEndDetector,
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

describe("JsonEndDetector", () => {
  it("finds the end of an object across fragments, ignoring braces in strings and escapes", () => {
    const detector = new JsonEndDetector();
    expect(detector.push('{ "a": "}{\\"')).toBe(-1);
    expect(detector.push('", "b": [1, {"c": "]"}]')).toBe(-1);
    expect(detector.push(" }\n\n")).toBe(2);
  });
});

describe("evaluateOptions", () => {
  it("uses OpenAI's defaults when unset: temperature 1, top_p 1, no top-k cut", () => {
    expect(evaluateOptions({}, { contextTokens: [] })).toEqual({ temperature: 1, topP: 1, topK: 0 });
    expect(evaluateOptions({ temperature: 0, topP: 0.5, seed: 7 }, { contextTokens: [] })).toEqual({
      temperature: 0,
      topP: 0.5,
      topK: 0,
      seed: 7,
    });
  });
});

if (!existsSync(STORIES)) {
  console.warn(`skipping llama.cpp engine tests: model file ${STORIES} is absent`);
}

describe.skipIf(!existsSync(STORIES))("LlamaCppEngine with stories260K (no chat template)", () => {
  let engine: LlamaCppEngine;

  beforeAll(async () => {
    engine = await LlamaCppEngine.load({ modelPath: STORIES, concurrency: 2, gpu: false, threads: 1 });
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
      engine = await LlamaCppEngine.load({ modelPath: TINY_RANDOM, gpu: false, threads: 1 });
    }, 60_000);
    afterAll(async () => {
      await engine?.close();
    });

    it("never emits a partial UTF-8 character and accounts for every token", async () => {
      const { pieces, text, result } = await collectGeneration(
        engine.generate({
          model: "tiny",
          messages: [{ role: "user", content: "日本語のテキスト → ünïcödé" }],
          sampling: { temperature: 1, seed: 10 },
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

/** A JSON-schema check for the small schemas below (object, string, integer, boolean, enum). */
function matchesSchema(value: unknown, schema: Record<string, unknown>): boolean {
  if (Array.isArray(schema.enum)) return schema.enum.includes(value);
  switch (schema.type) {
    case "string":
      return (
        typeof value === "string" && value.length <= ((schema.maxLength as number | undefined) ?? Infinity)
      );
    case "integer":
      return Number.isInteger(value);
    case "boolean":
      return typeof value === "boolean";
    case "object": {
      if (typeof value !== "object" || value === null || Array.isArray(value)) return false;
      const properties = (schema.properties ?? {}) as Record<string, Record<string, unknown>>;
      const record = value as Record<string, unknown>;
      const required = (schema.required ?? []) as string[];
      if (!required.every((key) => key in record)) return false;
      return Object.entries(record).every(([key, v]) => {
        const property = properties[key];
        return property ? matchesSchema(v, property) : schema.additionalProperties !== false;
      });
    }
    default:
      return false;
  }
}

const PERSON_SCHEMA = {
  type: "object",
  properties: {
    name: { type: "string", maxLength: 20 },
    age: { type: "integer" },
    happy: { type: "boolean" },
    color: { enum: ["red", "green", "blue"] },
  },
  required: ["name", "age", "happy", "color"],
  additionalProperties: false,
};

const WEATHER: EngineTool = {
  name: "get_weather",
  description: "The weather in a city",
  parameters: {
    type: "object",
    properties: { city: { type: "string", maxLength: 20 }, unit: { enum: ["c", "f"] } },
    required: ["city", "unit"],
    additionalProperties: false,
  },
  strict: true,
};
const LOOKUP: EngineTool = {
  name: "lookup",
  description: "Looks a word up",
  parameters: {
    type: "object",
    properties: { word: { type: "string", maxLength: 12 } },
    required: ["word"],
    additionalProperties: false,
  },
  strict: true,
};

/** The tool calls of a stream, assembled from their deltas as an OpenAI client does. */
function assembleCalls(
  pieces: EnginePiece[],
): { index: number; id: string; name: string; arguments: string }[] {
  const calls: { index: number; id: string; name: string; arguments: string }[] = [];
  for (const delta of pieces.flatMap((p) => p.toolCalls ?? [])) {
    const call = calls[delta.index];
    if (call) {
      expect(delta.id).toBeUndefined();
      call.arguments += delta.arguments;
    } else {
      calls[delta.index] = {
        index: delta.index,
        id: delta.id ?? "",
        name: delta.name ?? "",
        arguments: delta.arguments,
      };
    }
  }
  return calls;
}

describe.skipIf(!existsSync(STORIES))("LlamaCppEngine features with stories260K (1 thread, no GPU)", () => {
  let engine: LlamaCppEngine;
  // An independent node-llama-cpp instance for teacher-forced scoring.
  let llama: Llama;
  let model: LlamaModel;

  beforeAll(async () => {
    engine = await LlamaCppEngine.load({ modelPath: STORIES, gpu: false, threads: 1 });
    llama = await getLlama({ gpu: false, maxThreads: 1, logLevel: LlamaLogLevel.error });
    model = await llama.loadModel({ modelPath: STORIES });
  }, 60_000);
  afterAll(async () => {
    await engine?.close();
    await model?.dispose();
  });

  const request = (overrides: Partial<GenerateRequest>): GenerateRequest => ({
    model: "stories",
    messages: prompt,
    sampling: {},
    maxTokens: 200,
    signal: new AbortController().signal,
    ...overrides,
  });

  /**
   * The raw next-token distributions after each of `tokens[from-1 ...]`, teacher-forced: the prompt
   * in one batch, then one token per evaluation, as generation does. (Scoring the continuation in
   * one batch gives differences up to ~1e-3: llama.cpp's batched kernels round differently.)
   */
  async function teacherForced(tokens: Token[], from: number): Promise<Map<Token, number>[]> {
    const context = await model.createContext({ threads: 1, contextSize: 512 });
    try {
      const sequence = context.getSequence();
      const next: ControlledEvaluateInputItem = [
        tokens[from - 1] as Token,
        { generateNext: { probabilities: true } },
      ];
      const distributions: Map<Token, number>[] = [];
      let results = await sequence.controlledEvaluate([...tokens.slice(0, from - 1), next]);
      for (let i = from; ; i++) {
        const probabilities = results.at(-1)?.next.probabilities;
        if (!probabilities) throw new Error("no probabilities");
        distributions.push(probabilities);
        const token = tokens[i];
        if (i >= tokens.length - 1 || token === undefined) return distributions;
        results = await sequence.controlledEvaluate([[token, { generateNext: { probabilities: true } }]]);
      }
    } finally {
      await context.dispose();
    }
  }

  it("reports its backend, threads and context length", () => {
    expect(engine.backend).toBe("cpu");
    expect(engine.threads).toBe(1);
    expect(engine.contextLength).toBe(2048);
    expect(engine.trainContextLength).toBe(2048);
  });

  it("json_schema: the output parses and matches the schema, for several seeds", async () => {
    for (const seed of [1, 2, 3]) {
      const { text, result, pieces } = await collectGeneration(
        engine.generate(
          request({
            sampling: { seed },
            responseFormat: { type: "json_schema", name: "person", schema: PERSON_SCHEMA, strict: true },
          }),
        ),
      );
      expect(result.finishReason).toBe("stop");
      const value: unknown = JSON.parse(text);
      expect(matchesSchema(value, PERSON_SCHEMA), text).toBe(true);
      expect(pieces.reduce((n, p) => n + p.tokenCount, 0)).toBe(result.usage?.completionTokens);
    }
  });

  it("json_object: the output is constrained to a JSON object", async () => {
    const { text } = await collectGeneration(
      engine.generate(request({ sampling: { temperature: 0 }, responseFormat: { type: "json_object" } })),
    );
    // The model writes stories, so the object's first key runs on; the grammar still makes it an object.
    expect(text.startsWith('{ "')).toBe(true);
  });

  it("logprobs are real log-probabilities equal to a teacher-forced evaluation", async () => {
    for (const sampling of [{ temperature: 0 }, { seed: 5 }]) {
      const { pieces, text, result } = await collectGeneration(
        engine.generate(request({ sampling, maxTokens: 24, logprobs: { top: 5 } })),
      );
      const entries = pieces.flatMap((p) => p.logprobs ?? []);
      expect(entries).toHaveLength(result.usage?.completionTokens ?? -1);
      for (const piece of pieces) expect(piece.logprobs).toHaveLength(piece.tokenCount);
      for (const entry of entries) {
        expect(entry.logprob).toBeLessThanOrEqual(0);
        expect(entry.topLogprobs).toHaveLength(5);
        const total = entry.topLogprobs.reduce((sum, alternative) => sum + Math.exp(alternative.logprob), 0);
        expect(total).toBeLessThanOrEqual(1 + 1e-9);
        for (const [i, alternative] of entry.topLogprobs.entries()) {
          if (i > 0) expect(alternative.logprob).toBeLessThanOrEqual(entry.topLogprobs[i - 1]?.logprob ?? 0);
        }
      }
      // Score the same text teacher-forced: its tokens must be the ones generated.
      const promptTokens = engine.renderPrompt(prompt).tokens;
      const all = [
        ...promptTokens,
        ...model.tokenize(`Once upon a time${text}`, false).slice(promptTokens.length - 1),
      ];
      expect(all.slice(0, promptTokens.length)).toEqual(promptTokens);
      const generated = all.slice(promptTokens.length);
      expect(
        generated.map((t, i) => model.detokenize([t], false, [all[promptTokens.length + i - 1] as Token])),
      ).toEqual(entries.map((e) => e.token));
      const forced = await teacherForced(all, promptTokens.length);
      for (const [i, entry] of entries.entries()) {
        const distribution = forced[i] as Map<Token, number>;
        expect(Math.abs(entry.logprob - Math.log(distribution.get(generated[i] as Token) ?? 0))).toBeLessThan(
          1e-4,
        );
        const top = [...distribution.entries()].slice(0, 5);
        for (const [k, alternative] of entry.topLogprobs.entries()) {
          const [token, topProbability] = top[k] ?? [-1, 0];
          expect(alternative.token).toBe(
            model.detokenize([token as Token], false, [all[promptTokens.length + i - 1] as Token]),
          );
          expect(Math.abs(alternative.logprob - Math.log(topProbability))).toBeLessThan(1e-4);
        }
      }
    }
  });

  it("a named tool_choice forces a call whose arguments match the tool's schema", async () => {
    const { pieces, text, result } = await collectGeneration(
      engine.generate(
        request({
          sampling: { seed: 3 },
          tools: [WEATHER, LOOKUP],
          toolChoice: { mode: "function", functionName: "get_weather" },
        }),
      ),
    );
    expect(text).toBe("");
    expect(result.finishReason).toBe("tool_calls");
    const calls = assembleCalls(pieces);
    expect(calls).toHaveLength(1);
    const [call] = calls;
    expect(call?.id).toMatch(/^call_[0-9a-f]+$/);
    expect(call?.name).toBe("get_weather");
    expect(matchesSchema(JSON.parse(call?.arguments ?? ""), WEATHER.parameters ?? {}), call?.arguments).toBe(
      true,
    );
    expect(pieces.reduce((n, p) => n + p.tokenCount, 0)).toBe(result.usage?.completionTokens);
  });

  it('tool_choice "required" makes the model pick one of the tools and call it', async () => {
    for (const seed of [1, 2, 3, 4]) {
      const { pieces, result } = await collectGeneration(
        engine.generate(
          request({ sampling: { seed }, tools: [WEATHER, LOOKUP], toolChoice: { mode: "required" } }),
        ),
      );
      expect(result.finishReason).toBe("tool_calls");
      const [call, ...others] = assembleCalls(pieces);
      expect(others).toEqual([]);
      const tool = [WEATHER, LOOKUP].find((t) => t.name === call?.name);
      expect(tool, call?.name).toBeDefined();
      expect(matchesSchema(JSON.parse(call?.arguments ?? ""), tool?.parameters ?? {}), call?.arguments).toBe(
        true,
      );
    }
  });

  it("refuses a tool_choice naming a function that is not in tools", async () => {
    const generation = engine.generate(
      request({ tools: [WEATHER], toolChoice: { mode: "function", functionName: "launch" } }),
    );
    await expect(generation.next()).rejects.toMatchObject({
      code: "invalid_input",
    } satisfies Partial<EngineError>);
  });

  it("a raw completion continues the prompt text with no template", async () => {
    const { text, result } = await collectGeneration(
      engine.generate(
        request({
          messages: [],
          prompt: "Once upon a time, there was",
          sampling: { temperature: 0 },
          maxTokens: 8,
        }),
      ),
    );
    expect(text).toBe(" a little girl named Lily.");
    expect(result).toEqual({ finishReason: "length", usage: { promptTokens: 8, completionTokens: 8 } });
  });

  it("samples at temperature 1 by default: the seed changes the text, the same seed repeats it", async () => {
    const run = async (seed: number) =>
      (await collectGeneration(engine.generate(request({ sampling: { seed }, maxTokens: 40 })))).text;
    const [a, b, again] = [await run(11), await run(12), await run(11)];
    expect(a).not.toBe(b);
    expect(again).toBe(a);
  });
});

/**
 * ChunkParser: a streamed chunk that differs from the learned template only in its token is built
 * from the template instead of parsed, and every chunk comes out exactly as JSON.parse gives it,
 * whatever the engine's spacing, escapes or extra fields; an engine whose chunks differ in more
 * than their token stops costing probe parses after a few templates.
 */
import { afterEach, describe, expect, it, vi } from "vitest";
import { ChunkParser, MAX_UNUSED_TEMPLATES } from "../../worker/engines/chunk-template.js";

/** A chat chunk as vLLM and llama.cpp's server shape it. */
function chatChunk(delta: object, finish: string | null = null, extra: object = {}): string {
  return JSON.stringify({
    id: "chatcmpl-7",
    object: "chat.completion.chunk",
    created: 1_765_152_000,
    model: "m",
    choices: [{ index: 0, delta, logprobs: null, finish_reason: finish }],
    ...extra,
  });
}

const TOKENS = [
  "Once",
  " upon",
  " a",
  " time",
  ",\n",
  ' "quoted"',
  " back\\slash",
  " é",
  " 🙂",
  " tab\t",
  "",
  " end",
];

function answer(): string[] {
  return [
    chatChunk({ role: "assistant", content: "" }),
    ...TOKENS.map((token) => chatChunk({ content: token })),
    chatChunk({}, "stop"),
    JSON.stringify({
      id: "chatcmpl-7",
      object: "chat.completion.chunk",
      choices: [],
      usage: { prompt_tokens: 3, completion_tokens: 12 },
    }),
  ];
}

afterEach(() => {
  vi.restoreAllMocks();
});

describe("ChunkParser", () => {
  it("gives exactly what JSON.parse gives for every chunk of an answer, most of them from the template", () => {
    const parser = new ChunkParser("chat");

    for (const data of answer()) expect(parser.parse(data)).toStrictEqual(JSON.parse(data));

    // The role chunk and the first token are parsed (the template is learned from a token's chunk);
    // tokens with escapes are parsed; the plain ones after the first come from the template.
    const plain = TOKENS.filter((token) => JSON.stringify(token) === `"${token}"`);
    expect(parser.fromTemplate).toBe(plain.length - 1);
    expect(parser.parsed).toBe(answer().length - parser.fromTemplate);
  });

  it("reads chunks written with spaces after the separators (Python's json.dumps)", () => {
    const parser = new ChunkParser("chat");
    const spaced = (token: string) =>
      `{"id": "c", "choices": [{"index": 0, "delta": {"content": ${JSON.stringify(token)}}, "finish_reason": null}]}`;

    for (const token of ["a", " b", " c", " d\n"]) {
      expect(parser.parse(spaced(token))).toStrictEqual(JSON.parse(spaced(token)));
    }
    expect(parser.fromTemplate).toBe(2);
  });

  it("builds legacy completion chunks from their text", () => {
    const parser = new ChunkParser("completion");
    const chunk = (text: string) =>
      JSON.stringify({
        id: "cmpl-1",
        object: "text_completion",
        choices: [{ index: 0, text, logprobs: null, finish_reason: null }],
      });

    for (const text of ["x", " y", " z"])
      expect(parser.parse(chunk(text))).toStrictEqual(JSON.parse(chunk(text)));
    expect(parser.fromTemplate).toBe(2);
  });

  it("takes no template where the token's text could be read elsewhere in the chunk", () => {
    const parser = new ChunkParser("chat");
    // The same "content" literal twice: which one is the token cannot be told from the text.
    const twice = (token: string) =>
      JSON.stringify({ choices: [{ index: 0, delta: { content: token }, message: { content: token } }] });
    // The token written with an escape JSON.stringify does not use, and its plain spelling in
    // another field: the probe parse finds that the literal found is not the token.
    const elsewhere = (token: string) =>
      `{"choices":[{"index":0,"delta":{"content":"${token}\\/"},"x":{"content":"${token}/"}}]}`;
    for (const token of ["p", " q", " r"]) {
      expect(parser.parse(twice(token))).toStrictEqual(JSON.parse(twice(token)));
      expect(parser.parse(elsewhere(token))).toStrictEqual(JSON.parse(elsewhere(token)));
    }
    expect(parser.fromTemplate).toBe(0);
  });

  it("gives the token alone for a chunk that carries nothing but its text, and undefined for any other", () => {
    const parser = new ChunkParser("chat");
    const tokenWithLogprob = (token: string) =>
      JSON.stringify({
        id: "chatcmpl-7",
        choices: [
          {
            index: 0,
            delta: { content: token },
            // The same in every chunk: one template serves them all.
            logprobs: { content: [{ token: "t", logprob: -0.5, top_logprobs: [] }] },
            finish_reason: null,
          },
        ],
      });
    // After each chunk that is not plain, a token that teaches a plain template again, then one
    // that it serves.
    const chunks = [
      ...answer(),
      chatChunk({ content: " last" }, "length"),
      chatChunk({ content: " a1" }),
      chatChunk({ content: " a2" }),
      chatChunk({ content: " used" }, null, { usage: { prompt_tokens: 1, completion_tokens: 1 } }),
      chatChunk({ content: " b1" }),
      chatChunk({ content: " b2" }),
      chatChunk({ content: " call", tool_calls: [{ index: 0, function: { arguments: "{" } }] }),
      chatChunk({ content: " c1" }),
      chatChunk({ content: " c2" }),
      // A template that is not plain serves these: parsed from it, never taken as plain.
      ...["x", " y", " z"].map(tokenWithLogprob),
      chatChunk({ content: " d1" }),
      chatChunk({ content: " d2" }),
    ];
    const plain: string[] = [];
    for (const data of chunks) {
      const text = parser.plainText(data);
      const event = JSON.parse(data);
      if (text === undefined) {
        expect(parser.parse(data)).toStrictEqual(event);
        continue;
      }
      plain.push(text);
      // Exactly a one-choice chunk of that text, with nothing else the worker reads.
      expect(event.choices).toHaveLength(1);
      expect(event.choices[0]).toStrictEqual({
        index: 0,
        delta: { content: text },
        logprobs: null,
        finish_reason: null,
      });
      expect(event.usage).toBeUndefined();
    }
    // The answer's plain tokens after the first (which teaches the template), then each second one.
    const unescaped = TOKENS.filter((token) => JSON.stringify(token) === `"${token}"`);
    expect(plain).toEqual([...unescaped.slice(1), " a2", " b2", " c2", " d2"]);
    expect(parser.fromTemplate).toBe(plain.length + 2);
  });

  it("never takes a legacy completion chunk with log-probabilities as plain", () => {
    const parser = new ChunkParser("completion");
    const chunk = (text: string, logprobs: object | null) =>
      JSON.stringify({ id: "cmpl-1", choices: [{ index: 0, text, logprobs, finish_reason: null }] });
    // The same log-probabilities in every chunk: one template serves them all.
    const withLogprobs = (text: string) =>
      chunk(text, { tokens: ["t"], token_logprobs: [-1], top_logprobs: null });

    expect(
      ["a", " b", " c"].map(
        (text) => parser.plainText(withLogprobs(text)) ?? parser.parse(withLogprobs(text)),
      ),
    ).toStrictEqual(["a", " b", " c"].map((text) => JSON.parse(withLogprobs(text))));
    expect(parser.fromTemplate).toBe(2);
    expect(
      ["d", " e", " f"].map(
        (text) => parser.plainText(chunk(text, null)) ?? typeof parser.parse(chunk(text, null)),
      ),
    ).toEqual(["object", " e", " f"]);
  });

  it(`stops learning after ${MAX_UNUSED_TEMPLATES} templates in a row that served nothing (a counter in every chunk)`, () => {
    const parser = new ChunkParser("chat");
    const chunks = Array.from({ length: 50 }, (_, i) => chatChunk({ content: ` t${i}` }, null, { seq: i }));
    const parse = vi.spyOn(JSON, "parse");

    for (const data of chunks) expect(parser.parse(data)).toStrictEqual(JSON.parse(data));

    expect(parser.fromTemplate).toBe(0);
    // Each chunk parsed once by the parser and once by the test; the probes stop at the limit.
    const probes = parse.mock.calls.length - 2 * chunks.length;
    expect(probes).toBe(MAX_UNUSED_TEMPLATES);
  });
});

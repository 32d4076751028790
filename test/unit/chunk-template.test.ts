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

/**
 * The streamed chunks of one answer, as OpenAI-compatible engines send them, differ from one token
 * to the next only in their text: `{"id":"…","object":"chat.completion.chunk","created":…,
 * "model":"…","choices":[{"index":0,"delta":{"content":"<token>"},…}]}`. Parsing each with
 * `JSON.parse` was the worker's largest single cost per token (17 % of its CPU at 64 streams).
 *
 * {@link ChunkParser} learns a template from a chunk it parsed in full: the text before the
 * token's string literal and the text after it. A later chunk with exactly that text around a
 * plain literal (no escape, no quote, no control character) is the template's event with that
 * token as its text: it is built as such, with no parse. Any other chunk is parsed with
 * `JSON.parse`, as before, and may become the next template. The result is always what
 * `JSON.parse` gives (the unit test compares them): a literal without escapes is its own
 * characters, and everything around it is byte for byte the template's. When the template's chunk
 * carries nothing but its text (no finish reason, usage, tool call or log-probability: most chunks
 * of an answer), {@link ChunkParser.plainText} gives just the token, and no event is built at all.
 *
 * A template is only taken from a chunk whose text is in the place the worker reads it
 * (`choices[0].delta.content`, or `choices[0].text` for legacy completions), which a probe parse
 * checks once per template. An engine whose chunks differ in more than their text (a counter in
 * each, say) would pay that probe on every chunk: after {@link MAX_UNUSED_TEMPLATES} templates in a
 * row that served no chunk, the parser stops learning and only parses.
 */

/** Where a chunk carries its text. */
export type ChunkKind = "chat" | "completion";

/** Templates in a row that served no chunk before the parser stops learning new ones. */
export const MAX_UNUSED_TEMPLATES = 3;

/** Stands for the token in the probe parse that locates the text: a literal no engine sends. */
const PROBE = "\u2603\u{1F9EA}";

type Json = Record<string, unknown>;

interface Template {
  prefix: string;
  suffix: string;
  event: Json;
  /** Whether the event carries nothing but its text (see {@link ChunkParser.plainText}). */
  plain: boolean;
  used: boolean;
}

export class ChunkParser {
  private template: Template | null = null;
  private unused = 0;
  private learning = true;
  /** Chunks built from a template, and parsed in full (for tests and diagnostics). */
  fromTemplate = 0;
  parsed = 0;

  constructor(private readonly kind: ChunkKind) {}

  /**
   * The token of `data` when `data` is the template's chunk with another token and that chunk
   * carries nothing but its text: a single choice at index 0 with no finish reason, tool call or
   * log-probability, no usage and no error. The caller needs no event for such a chunk, and none
   * is built. Else undefined: {@link parse} gives the event.
   */
  plainText(data: string): string | undefined {
    const template = this.template;
    if (template === null || !template.plain) return undefined;
    const text = templateText(data, template);
    if (text === undefined) return undefined;
    template.used = true;
    this.fromTemplate += 1;
    return text;
  }

  /** The value of the JSON text `data`: built from the template when only the token differs. */
  parse(data: string): unknown {
    const template = this.template;
    if (template !== null) {
      const text = templateText(data, template);
      if (text !== undefined) {
        template.used = true;
        this.fromTemplate += 1;
        return this.withText(template.event, text);
      }
    }
    const event: unknown = JSON.parse(data);
    this.parsed += 1;
    if (this.learning) this.learn(data, event);
    return event;
  }

  /** Takes `event` (parsed from `data`) as the template when its text can be located in `data`. */
  private learn(data: string, event: unknown): void {
    const text = this.textOf(event);
    if (text === undefined) return;
    const key = this.kind === "chat" ? '"content":' : '"text":';
    const literal = JSON.stringify(text);
    let start = -1;
    for (const separator of ["", " "]) {
      const needle = `${key}${separator}${literal}`;
      const at = data.indexOf(needle);
      if (at !== -1 && data.indexOf(needle, at + 1) === -1) {
        start = at + key.length + separator.length;
        break;
      }
    }
    if (start === -1) return;
    const prefix = data.slice(0, start);
    const suffix = data.slice(start + literal.length);
    // The same frame around a token that needed escapes (a newline, a quote): nothing new to learn.
    if (this.template !== null && prefix === this.template.prefix && suffix === this.template.suffix) return;
    if (this.template !== null && !this.template.used) {
      this.unused += 1;
      if (this.unused >= MAX_UNUSED_TEMPLATES) {
        this.learning = false;
        this.template = null;
        return;
      }
    } else {
      this.unused = 0;
    }
    let probe: unknown;
    try {
      probe = JSON.parse(`${prefix}"${PROBE}"${suffix}`);
    } catch {
      return;
    }
    if (this.textOf(probe) !== PROBE) return;
    this.template = { prefix, suffix, event: event as Json, plain: this.isPlain(event as Json), used: false };
  }

  /** Whether a chunk (whose text textOf found) carries nothing else the worker reads. */
  private isPlain(event: Json): boolean {
    if (event.usage || event.error) return false;
    const choice = (event.choices as Json[])[0] as Json;
    if (choice.index !== 0 || choice.finish_reason) return false;
    const logprobs = choice.logprobs as Json | null | undefined;
    if (this.kind === "completion") return isEmpty(logprobs?.tokens);
    if (!isEmpty(logprobs?.content)) return false;
    return isEmpty((choice.delta as Json).tool_calls);
  }

  /** The text a single-choice chunk carries where the worker reads it, else undefined. */
  private textOf(event: unknown): string | undefined {
    if (typeof event !== "object" || event === null) return undefined;
    const choices = (event as Json).choices;
    if (!Array.isArray(choices) || choices.length !== 1) return undefined;
    const choice = choices[0] as Json | null;
    if (typeof choice !== "object" || choice === null) return undefined;
    if (this.kind === "completion") return typeof choice.text === "string" ? choice.text : undefined;
    const delta = choice.delta as Json | null | undefined;
    if (typeof delta !== "object" || delta === null) return undefined;
    return typeof delta.content === "string" ? delta.content : undefined;
  }

  /** The template's event with `text` in its text's place; the rest shared (nothing mutates it). */
  private withText(event: Json, text: string): Json {
    const choice = (event.choices as Json[])[0] as Json;
    if (this.kind === "completion") return { ...event, choices: [{ ...choice, text }] };
    return { ...event, choices: [{ ...choice, delta: { ...(choice.delta as Json), content: text } }] };
  }
}

/** Null, undefined or an empty array. */
function isEmpty(value: unknown): boolean {
  return value === null || value === undefined || (Array.isArray(value) && value.length === 0);
}

/** The token of `data` when it is `template`'s chunk with a plain literal in the token's place. */
function templateText(data: string, template: Template): string | undefined {
  // `data.slice(0, n) === prefix`, not `data.startsWith(prefix)`: Node 20's V8 compares a
  // startsWith needle character by character (about 0.12 µs for a chunk's 170-character frame
  // once optimized, several times that before), where an equality of flat strings is a memcmp.
  if (
    data.length < template.prefix.length + template.suffix.length + 2 ||
    data.slice(0, template.prefix.length) !== template.prefix ||
    !data.endsWith(template.suffix)
  ) {
    return undefined;
  }
  return plainLiteral(data, template.prefix.length, data.length - template.suffix.length);
}

/** The characters of the string literal data[start, end) when it has no escape, quote or control character. */
function plainLiteral(data: string, start: number, end: number): string | undefined {
  if (data.charCodeAt(start) !== 34 || data.charCodeAt(end - 1) !== 34) return undefined;
  for (let i = start + 1; i < end - 1; i++) {
    const code = data.charCodeAt(i);
    if (code === 34 || code === 92 || code < 32) return undefined;
  }
  return data.slice(start + 1, end - 1);
}

/**
 * Legacy completions (POST /v1/completions) with the official `openai` SDK → the control plane →
 * a real worker process over gRPC → an OpenAI-compatible engine (test/support/fake-engine.ts): the
 * prompt reaches the engine as it is, the answer comes back exact in OpenAI's `text_completion`
 * shape, streamed and not, with legacy logprobs, and each order is billed exactly its usage.
 */
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import {
  DEFAULT_FAKE_PROMPT_TOKENS,
  DEFAULT_FAKE_TOKENS,
  type FakeEngine,
  fakeLogprob,
  fakeTopLogprobs,
} from "../support/fake-engine.js";
import type { TestMarket } from "../support/market.js";
import {
  chatUsage,
  type PricedMarket,
  type ReportedUsage,
  startPricedMarket,
} from "../support/priced-market.js";

const MODEL = "fake-base-model";
const PROMPT = "Once upon a time";

describe("legacy completions through a real worker", () => {
  let priced: PricedMarket;
  let market: TestMarket;
  let engine: FakeEngine;
  let consumer: { accountId: string; apiKey: string };
  let client: OpenAI;

  beforeAll(async () => {
    priced = await startPricedMarket({}, [{ model: MODEL }]);
    ({ market, engine, consumer, client } = priced);
  });

  afterAll(() => priced?.close());

  const billed = (call: () => Promise<ReportedUsage>) => priced.billed(call);

  it("continues the prompt as it is and answers a text_completion", async () => {
    const firstRequest = engine.requests.length;
    await billed(async () => {
      const completion = await client.completions.create({ model: MODEL, prompt: PROMPT, user: "u-1" });
      expect(completion.object).toBe("text_completion");
      expect(completion.model).toBe(MODEL);
      expect(completion.choices).toEqual([
        { index: 0, text: DEFAULT_FAKE_TOKENS.join(""), logprobs: null, finish_reason: "stop" },
      ]);
      expect(completion.usage).toMatchObject({
        prompt_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        completion_tokens: DEFAULT_FAKE_TOKENS.length,
        total_tokens: DEFAULT_FAKE_PROMPT_TOKENS + DEFAULT_FAKE_TOKENS.length,
      });
      return chatUsage(completion.id, completion.usage);
    });
    const sent = engine.requests[firstRequest] as Record<string, unknown>;
    expect(sent.prompt).toBe(PROMPT);
    expect(sent.messages).toBeUndefined();
    expect(sent.user).toBeUndefined();
  });

  it("stops at max_tokens with finish reason length", async () => {
    await billed(async () => {
      const completion = await client.completions.create({ model: MODEL, prompt: [PROMPT], max_tokens: 2 });
      expect(completion.choices[0]?.text).toBe(DEFAULT_FAKE_TOKENS.slice(0, 2).join(""));
      expect(completion.choices[0]?.finish_reason).toBe("length");
      expect(completion.usage?.completion_tokens).toBe(2);
      return chatUsage(completion.id, completion.usage);
    });
  });

  it("streams text_completion chunks with usage last", async () => {
    await billed(async () => {
      const stream = await client.completions.create({
        model: MODEL,
        prompt: PROMPT,
        stream: true,
        stream_options: { include_usage: true },
      });
      const chunks: OpenAI.Completions.Completion[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      expect(chunks.every((chunk) => chunk.object === "text_completion")).toBe(true);
      expect(new Set(chunks.map((chunk) => chunk.id)).size).toBe(1);
      const texts = chunks.flatMap((chunk) => chunk.choices.map((choice) => choice.text)).filter(Boolean);
      expect(texts).toEqual([...DEFAULT_FAKE_TOKENS]);
      const finishes = chunks
        .flatMap((chunk) => chunk.choices.map((choice) => choice.finish_reason))
        .filter(Boolean);
      expect(finishes).toEqual(["stop"]);
      const last = chunks.at(-1);
      expect(last?.choices).toEqual([]);
      return chatUsage(last?.id ?? "", last?.usage);
    });
  });

  /** The legacy logprobs of `tokens`, the first starting right after the prompt. */
  function expectedLogprobs(tokens: readonly string[], top: number, firstPosition = 0) {
    let offset = PROMPT.length + tokens.slice(0, firstPosition).join("").length;
    const shown = tokens.slice(firstPosition);
    return {
      tokens: shown,
      token_logprobs: shown.map((_, i) => fakeLogprob(firstPosition + i)),
      top_logprobs: shown.map((token, i) =>
        Object.fromEntries(
          fakeTopLogprobs(token, firstPosition + i, top).map((entry) => [entry.token, entry.logprob]),
        ),
      ),
      text_offset: shown.map((token) => {
        const at = offset;
        offset += token.length;
        return at;
      }),
    };
  }

  it("returns logprobs in the legacy shape", async () => {
    await billed(async () => {
      const completion = await client.completions.create({ model: MODEL, prompt: PROMPT, logprobs: 2 });
      expect(completion.choices[0]?.logprobs).toEqual(expectedLogprobs(DEFAULT_FAKE_TOKENS, 2));
      return chatUsage(completion.id, completion.usage);
    });
  });

  it("streams logprobs in the legacy shape, one entry per chunk", async () => {
    await billed(async () => {
      const stream = await client.completions.create({
        model: MODEL,
        prompt: PROMPT,
        logprobs: 1,
        stream: true,
        stream_options: { include_usage: true },
      });
      const logprobs: unknown[] = [];
      let last: OpenAI.Completions.Completion | undefined;
      for await (const chunk of stream) {
        last = chunk;
        const choice = chunk.choices[0];
        if (choice?.text) logprobs.push(choice.logprobs);
      }
      expect(logprobs).toEqual(
        DEFAULT_FAKE_TOKENS.map((_, position) => {
          const whole = expectedLogprobs(DEFAULT_FAKE_TOKENS, 1, position);
          return {
            tokens: whole.tokens.slice(0, 1),
            token_logprobs: whole.token_logprobs.slice(0, 1),
            top_logprobs: whole.top_logprobs.slice(0, 1),
            text_offset: whole.text_offset.slice(0, 1),
          };
        }),
      );
      return chatUsage(last?.id ?? "", last?.usage);
    });
  });

  it("refuses what it cannot honour with a 400 naming the field", async () => {
    const before = await market.balance(consumer.accountId);
    const refused: [string, Partial<OpenAI.Completions.CompletionCreateParamsNonStreaming>][] = [
      ["echo", { echo: true }],
      ["suffix", { suffix: "The end." }],
      ["prompt", { prompt: ["one", "two"] }],
    ];
    for (const [param, extra] of refused) {
      const failure = await client.completions.create({ model: MODEL, prompt: PROMPT, ...extra }).then(
        () => null,
        (error: unknown) => error,
      );
      expect(failure).toMatchObject({ status: 400, param });
    }
    expect(await market.balance(consumer.accountId)).toEqual(before);
  });
});

/**
 * The same spine with a real model: a worker process running the tiny stories260K GGUF in
 * process through node-llama-cpp. Greedy decoding makes the text known in advance.
 */
import { existsSync } from "node:fs";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { orderCost, platformFee } from "../../server/market/money.js";
import { ledgerIsBalanced, platformBalance, startTestMarket, type TestMarket } from "../support/market.js";
import { STORIES_260K } from "../support/models.js";

const MODEL_PATH = STORIES_260K;
const present = existsSync(MODEL_PATH);
if (!present) {
  console.warn(`skipping the llama-cpp end-to-end tests: ${MODEL_PATH} is not present`);
}

// stories260K's greedy continuation of "Once upon a time", 20 tokens (see the model's notes).
const GREEDY_20_TOKENS = ", there was a little girl named Lily. She loved to play outsid";
// BOS + the 4 tokens of "Once upon a time" in its 512-token vocabulary.
const PROMPT_TOKENS = 5;

describe.skipIf(!present)("chat completions served by node-llama-cpp (stories260K)", () => {
  let market: TestMarket;
  let consumer: { accountId: string; apiKey: string };
  let provider: { accountId: string; apiKey: string };

  beforeAll(async () => {
    market = await startTestMarket();
    consumer = await market.account("reader", 10);
    provider = await market.account("gpu-owner");
    await market.worker({
      accountId: provider.accountId,
      model: "stories260K",
      priceIn: "10",
      priceOut: "20",
      tps: 500,
      // One thread, no GPU: node-llama-cpp's default oversubscribes our 2-core CI machines.
      engine: ["--engine", "llama-cpp", "--model-path", MODEL_PATH, "--gpu", "off", "--threads", "1"],
    });
  });

  afterAll(async () => {
    await market?.close();
  });

  const request = {
    model: "stories260K",
    messages: [{ role: "user" as const, content: "Once upon a time" }],
    max_tokens: 20,
    temperature: 0,
  };

  it("streams the model's greedy continuation with exact usage", async () => {
    const before = await market.balance(consumer.accountId);
    const providerBefore = await market.balance(provider.accountId);
    const platformBefore = await platformBalance(market);
    const stream = await market.openai(consumer.apiKey).chat.completions.create({
      ...request,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let finish: string | null | undefined;
    let usage: { prompt_tokens: number; completion_tokens: number } | undefined;
    for await (const chunk of stream) {
      expect(chunk.object).toBe("chat.completion.chunk");
      text += chunk.choices[0]?.delta.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(GREEDY_20_TOKENS);
    expect(finish).toBe("length");
    expect(usage).toMatchObject({ prompt_tokens: PROMPT_TOKENS, completion_tokens: 20 });
    const after = await market.balance(consumer.accountId);
    const cost = orderCost(PROMPT_TOKENS, 20, 10_000_000n, 20_000_000n);
    const fee = platformFee(cost, 500);
    expect(before.available - after.available).toBe(cost);
    expect((await market.balance(provider.accountId)).pending - providerBefore.pending).toBe(cost - fee);
    expect((await platformBalance(market)) - platformBefore).toBe(fee);
  });

  it("answers the same text without streaming, and the ledger balances", async () => {
    const completion = await market.openai(consumer.apiKey).chat.completions.create(request);
    expect(completion.choices[0]?.message.content).toBe(GREEDY_20_TOKENS);
    expect(completion.usage).toMatchObject({
      prompt_tokens: PROMPT_TOKENS,
      completion_tokens: 20,
      total_tokens: 25,
    });
    const audit = await ledgerIsBalanced(market);
    expect(audit.ok).toBe(true);
    expect(audit.sum).toBe(0n);
  });

  it("answers a json_schema request with JSON that parses and matches the schema", async () => {
    const schema = {
      type: "object",
      properties: {
        name: { type: "string", maxLength: 20 },
        age: { type: "integer" },
        color: { type: "string", enum: ["red", "green", "blue"] },
      },
      required: ["name", "age", "color"],
      additionalProperties: false,
    };
    const completion = await market.openai(consumer.apiKey).chat.completions.create({
      model: "stories260K",
      messages: [{ role: "user", content: "Once upon a time" }],
      max_tokens: 200,
      seed: 1,
      response_format: { type: "json_schema", json_schema: { name: "person", schema, strict: true } },
    });
    const choice = completion.choices[0];
    expect(choice?.finish_reason).toBe("stop");
    const value = JSON.parse(choice?.message.content ?? "") as Record<string, unknown>;
    expect(Object.keys(value).sort()).toEqual(["age", "color", "name"]);
    expect(typeof value.name === "string" && value.name.length <= 20).toBe(true);
    expect(Number.isInteger(value.age)).toBe(true);
    expect(["red", "green", "blue"]).toContain(value.color);
    expect(completion.usage?.completion_tokens).toBeGreaterThan(0);
  });
});

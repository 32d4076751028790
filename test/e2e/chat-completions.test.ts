/**
 * The spine end to end: the `openai` SDK → the control plane's HTTP API → a worker process over
 * the gRPC stream → an OpenAI-compatible engine (a test double streaming known tokens) → back as
 * SSE, with the money settled in the ledger.
 */
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { orderCost, platformFee } from "../../server/market/money.js";
import {
  DEFAULT_FAKE_PROMPT_TOKENS,
  DEFAULT_FAKE_TOKENS,
  type FakeEngine,
  startFakeEngine,
} from "../support/fake-engine.js";
import { ledgerIsBalanced, platformBalance, startTestMarket, type TestMarket } from "../support/market.js";

const MODEL = "fake-llama";
const PRICE_IN = 100_000_000n; // 100 credits per 1M prompt tokens, in µc
const PRICE_OUT = 250_000_000n; // 250 credits per 1M completion tokens
const FEE_BPS = 500;

describe("chat completions through a real worker", () => {
  let market: TestMarket;
  let engine: FakeEngine;
  let consumer: { accountId: string; apiKey: string };
  let provider: { accountId: string; apiKey: string };
  let workerId: string;

  beforeAll(async () => {
    engine = await startFakeEngine();
    market = await startTestMarket({ feeBasisPoints: FEE_BPS });
    consumer = await market.account("consumer", 100);
    provider = await market.account("provider");
    const worker = await market.worker({
      accountId: provider.accountId,
      model: MODEL,
      priceIn: "100",
      priceOut: "250",
      tps: 40,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
    workerId = worker.workerId;
  });

  afterAll(async () => {
    await market?.close();
    await engine?.close();
  });

  /** Runs `call` and checks that exactly one order's cost moved between the three parties. */
  async function expectSettled(call: () => Promise<{ promptTokens: number; completionTokens: number }>) {
    const before = {
      consumer: await market.balance(consumer.accountId),
      provider: await market.balance(provider.accountId),
      platform: await platformBalance(market),
    };
    const usage = await call();
    const cost = orderCost(usage.promptTokens, usage.completionTokens, PRICE_IN, PRICE_OUT);
    const fee = platformFee(cost, FEE_BPS);
    const after = {
      consumer: await market.balance(consumer.accountId),
      provider: await market.balance(provider.accountId),
      platform: await platformBalance(market),
    };
    expect(cost).toBeGreaterThan(0n);
    expect(fee).toBeGreaterThan(0n);
    expect(before.consumer.available - after.consumer.available).toBe(cost);
    expect(after.consumer.held).toBe(0n);
    expect(after.provider.pending - before.provider.pending).toBe(cost - fee);
    expect(after.provider.available).toBe(before.provider.available);
    expect(after.platform - before.platform).toBe(fee);
    const audit = await ledgerIsBalanced(market);
    expect(audit.problems).toEqual([]);
    expect(audit.sum).toBe(0n);
    expect(audit.ok).toBe(true);
  }

  it("streams a chat completion in OpenAI's chunk format with exact usage", async () => {
    await expectSettled(async () => {
      const stream = await market.openai(consumer.apiKey).chat.completions.create({
        model: MODEL,
        messages: [{ role: "user", content: "Say hello" }],
        stream: true,
        stream_options: { include_usage: true },
      });
      const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);

      const text = chunks.map((chunk) => chunk.choices[0]?.delta.content ?? "").join("");
      expect(text).toBe("Hello, world!");
      expect(chunks.every((chunk) => chunk.object === "chat.completion.chunk")).toBe(true);
      expect(new Set(chunks.map((chunk) => chunk.id)).size).toBe(1);
      expect(chunks[0]?.id).toMatch(/^chatcmpl-/);
      expect(chunks[0]?.choices[0]?.delta.role).toBe("assistant");
      const finishes = chunks
        .flatMap((chunk) => chunk.choices.map((choice) => choice.finish_reason))
        .filter(Boolean);
      expect(finishes).toEqual(["stop"]);
      const last = chunks[chunks.length - 1];
      expect(last?.choices).toEqual([]);
      expect(last?.usage).toMatchObject({
        prompt_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        completion_tokens: 4,
        total_tokens: DEFAULT_FAKE_PROMPT_TOKENS + 4,
      });
      return { promptTokens: DEFAULT_FAKE_PROMPT_TOKENS, completionTokens: 4 };
    });
  });

  it("ends the raw SSE stream with data: [DONE] and names the order", async () => {
    const response = await fetch(`${market.plane.httpUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${consumer.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, messages: [{ role: "user", content: "Hi" }], stream: true }),
    });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toContain("text/event-stream");
    const orderId = response.headers.get("x-request-id");
    const body = await response.text();
    const events = body.split("\n\n").filter((event) => event.startsWith("data: "));
    expect(events[events.length - 1]).toBe("data: [DONE]");
    const payloads = events.slice(0, -1).map((event) => JSON.parse(event.slice("data: ".length)));
    expect(payloads.every((payload) => payload.id === orderId)).toBe(true);
    // Token deltas take a hand-built fast path: they must be exactly OpenAI's chunk, field order too.
    for (const event of events.slice(0, -1)) {
      const json = event.slice("data: ".length);
      expect(json).toBe(JSON.stringify(JSON.parse(json)));
    }
    const deltas = payloads.filter((payload) => payload.choices[0]?.delta?.content);
    expect(deltas.map((payload) => payload.choices[0].delta.content).join("")).toBe(
      DEFAULT_FAKE_TOKENS.join(""),
    );
    expect(deltas[0]).toStrictEqual({
      id: orderId,
      object: "chat.completion.chunk",
      created: expect.any(Number),
      model: MODEL,
      choices: [
        { index: 0, delta: { content: DEFAULT_FAKE_TOKENS[0] }, logprobs: null, finish_reason: null },
      ],
    });
    const order = await market.admin.getOrder({ orderId: orderId ?? "" });
    expect(order.order?.workerId).toBe(workerId);
    expect(order.order?.completionTokens).toBe(4);
  });

  it("answers a non-streamed chat completion with the text, finish reason and usage", async () => {
    await expectSettled(async () => {
      const completion = await market.openai(consumer.apiKey).chat.completions.create({
        model: MODEL,
        messages: [{ role: "user", content: "Say hello" }],
      });
      expect(completion.object).toBe("chat.completion");
      expect(completion.choices).toHaveLength(1);
      expect(completion.choices[0]?.message).toMatchObject({ role: "assistant", content: "Hello, world!" });
      expect(completion.choices[0]?.finish_reason).toBe("stop");
      expect(completion.usage).toMatchObject({
        prompt_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        completion_tokens: 4,
        total_tokens: DEFAULT_FAKE_PROMPT_TOKENS + 4,
      });
      return { promptTokens: DEFAULT_FAKE_PROMPT_TOKENS, completionTokens: 4 };
    });
  });

  it("honours max_tokens: stops at the limit, finish_reason length, bills only those tokens", async () => {
    await expectSettled(async () => {
      const completion = await market.openai(consumer.apiKey).chat.completions.create({
        model: MODEL,
        messages: [{ role: "user", content: "Say hello" }],
        max_tokens: 2,
      });
      expect(completion.choices[0]?.message.content).toBe("Hello,");
      expect(completion.choices[0]?.finish_reason).toBe("length");
      expect(completion.usage?.completion_tokens).toBe(2);
      return { promptTokens: DEFAULT_FAKE_PROMPT_TOKENS, completionTokens: 2 };
    });
  });

  it("forwards the conversation and sampling parameters to the engine", async () => {
    const seen = engine.requests.length;
    await market.openai(consumer.apiKey).chat.completions.create({
      model: MODEL,
      messages: [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Say hello" },
      ],
      temperature: 0.25,
      max_tokens: 3,
    });
    const forwarded = engine.requests[seen] as Record<string, unknown>;
    expect(forwarded.messages).toEqual([
      { role: "system", content: "Be brief." },
      { role: "user", content: "Say hello" },
    ]);
    expect(forwarded.temperature).toBe(0.25);
    expect(forwarded.max_tokens ?? forwarded.max_completion_tokens).toBe(3);
  });

  it("lists the models on offer with their live price range", async () => {
    const models = await market.openai(consumer.apiKey).models.list();
    const ids = models.data.map((model) => model.id);
    expect(ids).toEqual([MODEL]);
    const model = models.data[0] as unknown as { locallmarket: { price_per_million_input: { min: string } } };
    expect(model.locallmarket.price_per_million_input.min).toBe("100");
  });
});

describe("errors in the OpenAI shape", () => {
  let market: TestMarket;
  let engine: FakeEngine;
  let rich: { accountId: string; apiKey: string };

  beforeAll(async () => {
    engine = await startFakeEngine();
    market = await startTestMarket();
    rich = await market.account("rich", 1000);
    const provider = await market.account("provider");
    await market.worker({
      accountId: provider.accountId,
      model: MODEL,
      priceIn: "100",
      priceOut: "250",
      tps: 40,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
  });

  afterAll(async () => {
    await market?.close();
    await engine?.close();
  });

  const ask = (client: OpenAI, body: Record<string, unknown> = {}) =>
    client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
      ...body,
    } as OpenAI.Chat.Completions.ChatCompletionCreateParamsNonStreaming);

  async function expectApiError(promise: Promise<unknown>, status: number, code: string) {
    const error = await promise.then(
      () => null,
      (thrown: unknown) => thrown,
    );
    expect(error).toBeInstanceOf(OpenAI.APIError);
    const apiError = error as InstanceType<typeof OpenAI.APIError>;
    expect(apiError.status).toBe(status);
    expect(apiError.code).toBe(code);
    expect(typeof apiError.message).toBe("string");
    expect((apiError.error as { type?: string }).type).toBeTruthy();
    return apiError;
  }

  it("401 for an unknown key", async () => {
    const error = await expectApiError(ask(market.openai("sk-llm-not-a-real-key")), 401, "unauthenticated");
    expect(error).toBeInstanceOf(OpenAI.AuthenticationError);
  });

  it("401 at once for a key revoked through the admin API, though it was just used", async () => {
    const holder = await market.account("revoked", 10);
    const client = market.openai(holder.apiKey);
    await ask(client);
    const { keys } = await market.admin.listApiKeys({ accountId: holder.accountId });
    await market.admin.revokeApiKey({ keyId: keys[0]?.id ?? "" });
    await expectApiError(ask(client), 401, "unauthenticated");
  });

  it("402 when the consumer cannot cover the hold, and nothing moves", async () => {
    const poor = await market.account("poor", 0.001);
    const before = await market.balance(poor.accountId);
    await expectApiError(ask(market.openai(poor.apiKey)), 402, "insufficient_credits");
    expect(await market.balance(poor.accountId)).toEqual(before);
    expect((await market.admin.listOrders({ accountId: poor.accountId })).orders).toEqual([]);
  });

  it("404 for a model nobody offers", async () => {
    const error = await expectApiError(
      ask(market.openai(rich.apiKey), { model: "no-such-model" }),
      404,
      "model_not_found",
    );
    expect(error.param).toBe("model");
  });

  it("503 when no worker is within the consumer's caps", async () => {
    await expectApiError(
      ask(market.openai(rich.apiKey), { provider: { max_price: { prompt: 1, completion: 1 } } }),
      503,
      "no_capacity",
    );
    await expectApiError(
      // The fake engine has no delay, so its measured speed is high: ask for far more.
      ask(market.openai(rich.apiKey), { provider: { min_throughput: 1e9 } }),
      503,
      "no_capacity",
    );
  });

  it("503 from the account's default caps when the request sets none", async () => {
    const capped = await market.account("capped", 10);
    await market.admin.updateAccountDefaults({
      accountId: capped.accountId,
      defaults: { maxPricePerMillionOutput: 1_000_000n },
    });
    await expectApiError(ask(market.openai(capped.apiKey)), 503, "no_capacity");
  });

  it("400 for a malformed body, naming the field", async () => {
    const error = await expectApiError(
      ask(market.openai(rich.apiKey), { messages: [] }),
      400,
      "invalid_request",
    );
    expect(error.param).toBe("messages");
    await expectApiError(ask(market.openai(rich.apiKey), { temperature: 7 }), 400, "invalid_request");

    const response = await fetch(`${market.plane.httpUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${rich.apiKey}`, "content-type": "application/json" },
      body: "{not json",
    });
    expect(response.status).toBe(400);
    const body = (await response.json()) as { error: { message: string; type: string; code: string } };
    expect(body.error.type).toBe("invalid_request_error");
    expect(body.error.code).toBe("invalid_request");
  });

  it("413 for a body over the limit", async () => {
    const response = await fetch(`${market.plane.httpUrl}/v1/chat/completions`, {
      method: "POST",
      headers: { authorization: `Bearer ${rich.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({
        model: MODEL,
        messages: [{ role: "user", content: "x".repeat(5 * 1024 * 1024) }],
      }),
    });
    expect(response.status).toBe(413);
    const body = (await response.json()) as { error: { code: string } };
    expect(body.error.code).toBe("payload_too_large");
  });

  it("left no order running and the ledger balanced after all the failures", async () => {
    const orders = await market.admin.listOrders({ limit: 100 });
    expect(orders.orders.filter((order) => order.status === 1)).toEqual([]);
    const audit = await ledgerIsBalanced(market);
    expect(audit.ok).toBe(true);
    expect(audit.sum).toBe(0n);
  });
});

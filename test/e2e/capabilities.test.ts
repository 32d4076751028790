/**
 * What offers declare, and what requests use: a request with tools goes only to a worker whose
 * offer supports tools (even past a cheaper one), a parameter nobody supports is a 400 naming it,
 * a request without max_tokens is sized (and held) by the offer's context, `models` falls back to
 * the next model, and /v1/models says all of it. Real worker processes on the fake engine; each
 * engine answers with its own name, so the reply says who served it.
 */
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { orderCost } from "../../server/market/money.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket } from "../support/market.js";

const TOOL = {
  type: "function" as const,
  function: {
    name: "get_weather",
    description: "The weather in a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  },
};

describe("capabilities and context in matching", () => {
  let market: TestMarket;
  const engines: FakeEngine[] = [];
  const workerIds = new Map<string, string>();
  let client: OpenAI;
  let consumerId: string;

  const seller = async (name: string, model: string, price: string, extra: string[]): Promise<void> => {
    const engine = await startFakeEngine({ tokens: [name] });
    engines.push(engine);
    const provider = await market.account(`provider-${name}`);
    const worker = await market.worker({
      accountId: provider.accountId,
      model,
      priceIn: price,
      priceOut: price,
      tps: 10,
      engine: ["--engine", "openai", "--engine-url", engine.url, ...extra],
    });
    workerIds.set(name, worker.workerId);
  };

  beforeAll(async () => {
    market = await startTestMarket();
    const consumer = await market.account("consumer", 100);
    consumerId = consumer.accountId;
    client = market.openai(consumer.apiKey);
    await Promise.all([
      seller("cheap-plain", "chat", "0.1", ["--capabilities", ""]),
      seller("dear-tools", "chat", "0.5", ["--capabilities", "tools"]),
      seller("small-context", "small", "1", ["--capabilities", "", "--context-length", "256"]),
    ]);
  });

  afterAll(async () => {
    await market?.close();
    await Promise.all(engines.map((engine) => engine.close()));
  });

  it("routes a request with tools to the worker that supports them, past a cheaper one", async () => {
    const plain = await client.chat.completions.create({
      model: "chat",
      messages: [{ role: "user", content: "Hi" }],
    });
    expect(plain.choices[0]?.message.content).toContain("cheap-plain");
    const withTools = await client.chat.completions
      .create({ model: "chat", messages: [{ role: "user", content: "Weather in Paris?" }], tools: [TOOL] })
      .withResponse();
    const order = await market.admin.getOrder({
      orderId: withTools.response.headers.get("x-request-id") ?? "",
    });
    expect(order.order?.workerId).toBe(workerIds.get("dear-tools"));
  });

  it("answers 400 naming the parameter when no worker for the model supports it", async () => {
    const before = await market.balance(consumerId);
    const error = await client.chat.completions
      .create({ model: "small", messages: [{ role: "user", content: "Hi" }], tools: [TOOL] })
      .catch((caught: unknown) => caught);
    expect(error).toBeInstanceOf(OpenAI.BadRequestError);
    expect((error as InstanceType<typeof OpenAI.BadRequestError>).param).toBe("tools");
    expect(await market.balance(consumerId)).toEqual(before);
  });

  it("holds at most the context's worth when a request sets no max_tokens", async () => {
    const reply = await client.chat.completions
      .create({ model: "small", messages: [{ role: "user", content: "Hi" }] })
      .withResponse();
    const { order } = await market.admin.getOrder({
      orderId: reply.response.headers.get("x-request-id") ?? "",
    });
    // 1 credit per 1M tokens, both ways: the whole 256-token context costs exactly this.
    const contextsWorth = orderCost(256, 0, 1_000_000n, 1_000_000n);
    expect(order?.maxTokens).toBeLessThan(256);
    expect(order?.hold).toBe(contextsWorth);
  });

  it("falls back along `models` when the first model has no worker, and says who answered", async () => {
    const reply = await client.chat.completions.create({
      model: "nobody-serves-this",
      messages: [{ role: "user", content: "Hi" }],
      // OpenRouter's extension of the request body.
      ...({ models: ["nobody-serves-this", "chat"] } as object),
    });
    expect(reply.model).toBe("chat");
    expect(reply.choices[0]?.message.content).toContain("cheap-plain");
  });

  it("lists context_length, pricing and supported_parameters per model", async () => {
    const { data } = await client.models.list();
    const byId = new Map(data.map((model) => [model.id, model as unknown as Record<string, unknown>]));
    expect(byId.get("small")).toMatchObject({
      context_length: 256,
      pricing: { prompt: "0.000001", completion: "0.000001" },
    });
    expect(byId.get("chat")).toMatchObject({
      context_length: null,
      pricing: { prompt: "0.0000001", completion: "0.0000001" },
    });
    expect(byId.get("chat")?.supported_parameters).toEqual(expect.arrayContaining(["tools", "tool_choice"]));
    expect(byId.get("small")?.supported_parameters).not.toContain("tools");
  });
});

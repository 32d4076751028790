/**
 * Matching with several real workers connected at once: cheapest first, measured/advertised
 * throughput breaks price ties, and the consumer's `provider` caps are hard limits. Each worker's
 * engine answers with its own name, so the reply says who served it.
 */
import type OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket } from "../support/market.js";

const MODEL = "shared-model";

interface Seller {
  name: string;
  priceIn: string;
  priceOut: string;
  tps: number;
}

// Prices are credits per 1M tokens.
const SELLERS: Seller[] = [
  { name: "slow-cheap", priceIn: "0.5", priceOut: "0.5", tps: 5 },
  { name: "fast", priceIn: "1", priceOut: "1", tps: 50 },
  { name: "slow", priceIn: "1", priceOut: "1", tps: 10 },
  { name: "pricey", priceIn: "3", priceOut: "3", tps: 100 },
];

describe("matching across several connected workers", () => {
  let market: TestMarket;
  const engines: FakeEngine[] = [];
  const workerIds = new Map<string, string>();
  let client: OpenAI;

  beforeAll(async () => {
    market = await startTestMarket();
    const provider = await market.account("provider");
    const consumer = await market.account("consumer", 100);
    client = market.openai(consumer.apiKey);
    await Promise.all(
      SELLERS.map(async (seller) => {
        const engine = await startFakeEngine({ tokens: [seller.name] });
        engines.push(engine);
        const worker = await market.worker({
          accountId: provider.accountId,
          model: MODEL,
          priceIn: seller.priceIn,
          priceOut: seller.priceOut,
          tps: seller.tps,
          engine: ["--engine", "openai", "--engine-url", engine.url],
        });
        workerIds.set(seller.name, worker.workerId);
      }),
    );
    expect(market.plane.registry.list()).toHaveLength(SELLERS.length);
  });

  afterAll(async () => {
    await market?.close();
    await Promise.all(engines.map((engine) => engine.close()));
  });

  async function servedBy(provider?: Record<string, unknown>): Promise<string> {
    const completion = await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "who are you?" }],
      max_tokens: 5,
      ...(provider ? { provider } : {}),
    } as OpenAI.Chat.Completions.ChatCompletionCreateParamsNonStreaming);
    const text = completion.choices[0]?.message.content ?? "";
    const order = await market.admin.getOrder({ orderId: completion.id });
    expect(order.order?.workerId).toBe(workerIds.get(text));
    return text;
  }

  it("sends a request to the cheapest worker", async () => {
    expect(await servedBy()).toBe("slow-cheap");
  });

  it("breaks a price tie by throughput", async () => {
    expect(await servedBy({ ignore: [workerIds.get("slow-cheap")] })).toBe("fast");
  });

  it("treats min_throughput as a hard floor", async () => {
    expect(await servedBy({ min_throughput: 20 })).toBe("fast");
    expect(await servedBy({ min_throughput: 60 })).toBe("pricey");
  });

  it("treats max_price as a hard cap on both prices", async () => {
    expect(await servedBy({ max_price: { prompt: 2, completion: 2 }, min_throughput: 8 })).toBe("fast");
    expect(await servedBy({ max_price: { prompt: 0.5, completion: 0.5 } })).toBe("slow-cheap");
    const refused = await servedBy({ max_price: { prompt: 0.5, completion: 0.5 }, min_throughput: 8 }).then(
      () => null,
      (error: { status?: number }) => error.status,
    );
    expect(refused).toBe(503);
  });

  it("sorts by throughput when asked", async () => {
    expect(await servedBy({ sort: "throughput" })).toBe("pricey");
  });

  it("tries the workers named in provider.order first", async () => {
    expect(await servedBy({ order: [workerIds.get("slow")] })).toBe("slow");
  });
});

/**
 * A market for the OpenAI endpoint tests: a fake engine (test/support/fake-engine.ts) behind worker
 * processes at known prices, a funded consumer with an `openai` client, and exact money: the
 * consumer paid exactly the cost the response's usage states, that cost is the order's tokens at
 * the worker's prices, the order recorded the tokens the usage states, nothing stays held, and the
 * ledger balances.
 */
import type OpenAI from "openai";
import { expect } from "vitest";
import { orderCost } from "../../server/market/money.js";
import { type FakeEngine, type FakeEngineOptions, startFakeEngine } from "./fake-engine.js";
import { ledgerIsBalanced, startTestMarket, type TestMarket } from "./market.js";

/** What every worker of a priced market charges, in µc per 1M tokens (100 and 250 credits). */
export const PRICES = { perMillionIn: 100_000_000n, perMillionOut: 250_000_000n };

/** A weather function both APIs' tool tests offer the model, and the call the engine makes to it. */
export const WEATHER_FUNCTION = {
  name: "get_weather",
  description: "The current weather in a city.",
  parameters: {
    type: "object",
    properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
    required: ["city", "unit"],
    additionalProperties: false,
  },
  strict: true,
};
export const WEATHER_ARGUMENTS = '{"city":"Lisbon","unit":"celsius"}';

/** What a response said it used and cost (each API names its token counts differently). */
export interface ReportedUsage {
  orderId: string;
  promptTokens: number;
  completionTokens: number;
  costMicroCredits: string;
}

export interface PricedMarket {
  market: TestMarket;
  engine: FakeEngine;
  consumer: { accountId: string; apiKey: string };
  client: OpenAI;
  /** Runs `call` and checks the order it reports was billed exactly its usage. */
  billed(call: () => Promise<ReportedUsage>): Promise<ReportedUsage>;
  close(): Promise<void>;
}

/** One worker per entry of `workers` (a model and extra worker arguments), all on one engine. */
export async function startPricedMarket(
  engineOptions: FakeEngineOptions,
  workers: { model: string; args?: string[] }[],
): Promise<PricedMarket> {
  const engine = await startFakeEngine(engineOptions);
  const market = await startTestMarket({ feeBasisPoints: 500 });
  const consumer = await market.account("consumer", 100);
  const provider = await market.account("provider");
  for (const { model, args = [] } of workers) {
    await market.worker({
      accountId: provider.accountId,
      model,
      priceIn: "100",
      priceOut: "250",
      tps: 40,
      engine: ["--engine", "openai", "--engine-url", engine.url, ...args],
    });
  }
  return {
    market,
    engine,
    consumer,
    client: market.openai(consumer.apiKey),
    billed: (call) => expectBilledExactly(market, consumer.accountId, call),
    async close() {
      await market.close();
      await engine.close();
    },
  };
}

async function expectBilledExactly(
  market: TestMarket,
  consumerAccountId: string,
  call: () => Promise<ReportedUsage>,
): Promise<ReportedUsage> {
  const before = await market.balance(consumerAccountId);
  const reported = await call();
  const after = await market.balance(consumerAccountId);
  const cost = BigInt(reported.costMicroCredits);
  expect(cost).toBe(
    orderCost(reported.promptTokens, reported.completionTokens, PRICES.perMillionIn, PRICES.perMillionOut),
  );
  expect(cost).toBeGreaterThan(0n);
  expect(before.available - after.available).toBe(cost);
  expect(after.held).toBe(0n);
  const { order } = await market.admin.getOrder({ orderId: reported.orderId });
  expect(order?.promptTokens).toBe(reported.promptTokens);
  expect(order?.completionTokens).toBe(reported.completionTokens);
  expect(order?.cost).toBe(cost);
  const audit = await ledgerIsBalanced(market);
  expect(audit.problems).toEqual([]);
  expect(audit.ok).toBe(true);
  return reported;
}

/** The usage of a chat or legacy completion (with the market's cost fields). */
export function chatUsage(
  orderId: string,
  usage: { prompt_tokens: number; completion_tokens: number } | null | undefined,
): ReportedUsage {
  const withCost = usage as { prompt_tokens: number; completion_tokens: number; cost_micro_credits?: string };
  expect(withCost?.cost_micro_credits).toMatch(/^\d+$/);
  return {
    orderId,
    promptTokens: withCost.prompt_tokens,
    completionTokens: withCost.completion_tokens,
    costMicroCredits: withCost.cost_micro_credits ?? "",
  };
}

/**
 * The clients agent loops are built on, unchanged but for their base URL: the Vercel AI SDK's
 * `generateObject` and tool loop, and LangChain's `withStructuredOutput` and `bindTools`, through
 * the control plane's HTTP API and a real worker process to an OpenAI-compatible engine (a test
 * double that answers tool requests with a known tool call, tool results with a known sentence and
 * `response_format` requests with known JSON), each answer exact and each billed exactly what its
 * usage says.
 */
import { createOpenAI } from "@ai-sdk/openai";
import { type AIMessage, type AIMessageChunk, HumanMessage, ToolMessage } from "@langchain/core/messages";
import { ChatOpenAI } from "@langchain/openai";
import { generateObject, generateText, stepCountIs, tool } from "ai";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import { orderCost, platformFee } from "../../server/market/money.js";
import {
  DEFAULT_FAKE_PROMPT_TOKENS,
  type FakeEngine,
  fakeArgumentFragments,
  fakeTokens,
  fakeToolAnswer,
  startFakeEngine,
} from "../support/fake-engine.js";
import { ledgerIsBalanced, platformBalance, startTestMarket, type TestMarket } from "../support/market.js";

const MODEL = "fake-agent-model";
const PRICE_IN = 100_000_000n; // 100 credits per 1M prompt tokens, in µc
const PRICE_OUT = 250_000_000n; // 250 credits per 1M completion tokens
const FEE_BPS = 500;

const CITY = z.object({ city: z.string(), population: z.number().int() });
const CITY_ANSWER = { city: "Lisbon", population: 545_923 };
const CITY_QUESTION = "Which city is the capital of Portugal, and how many people live there?";
const WEATHER_QUESTION = "What is the weather like in Lisbon?";
const WEATHER_CALL = { name: "get_weather", arguments: { city: "Lisbon", unit: "celsius" } };
const WEATHER_REPORT = "18 degrees and sunny";
const WEATHER_TOOL = {
  type: "function" as const,
  function: {
    name: "get_weather",
    description: "The current weather in a city.",
    parameters: {
      type: "object",
      properties: { city: { type: "string" }, unit: { type: "string", enum: ["celsius", "fahrenheit"] } },
      required: ["city", "unit"],
      additionalProperties: false,
    },
  },
};

/** In how many chunks the engine streams a tool call's arguments (several, as real engines do). */
const TOOL_CALL_FRAGMENTS = 3;
/** The engine answers with one token per piece of the text (fakeTokens), a tool call with one token per chunk. */
const JSON_USAGE = usage(fakeTokens(JSON.stringify(CITY_ANSWER)).length);
const TOOL_CALL_USAGE = usage(
  1 + fakeArgumentFragments(JSON.stringify(WEATHER_CALL.arguments), TOOL_CALL_FRAGMENTS).length,
);
const TOOL_ANSWER_USAGE = usage(fakeTokens(fakeToolAnswer(WEATHER_REPORT)).length);

interface Usage {
  promptTokens: number;
  completionTokens: number;
}

/** What one request consumed as the client library reports it, and the order id it came back with. */
interface Reported extends Usage {
  orderId: string;
}

function usage(completionTokens: number): Usage {
  return { promptTokens: DEFAULT_FAKE_PROMPT_TOKENS, completionTokens };
}

describe("agent frameworks against the market", () => {
  let market: TestMarket;
  let engine: FakeEngine;
  let consumer: { accountId: string; apiKey: string };
  let provider: { accountId: string; apiKey: string };
  let baseURL: string;

  beforeAll(async () => {
    engine = await startFakeEngine({
      toolCall: { name: WEATHER_CALL.name, arguments: JSON.stringify(WEATHER_CALL.arguments) },
      toolCallFragments: TOOL_CALL_FRAGMENTS,
      jsonText: JSON.stringify(CITY_ANSWER),
    });
    market = await startTestMarket({ feeBasisPoints: FEE_BPS });
    consumer = await market.account("agent-builder", 100);
    provider = await market.account("provider");
    await market.worker({
      accountId: provider.accountId,
      model: MODEL,
      priceIn: "100",
      priceOut: "250",
      tps: 40,
      engine: ["--engine", "openai", "--engine-url", engine.url, "--capabilities", "tools,json_schema"],
    });
    baseURL = `${market.plane.httpUrl}/v1`;
  });

  afterAll(async () => {
    await market?.close();
    await engine?.close();
  });

  /**
   * Runs `call` and checks that the client reported the engine's usage for each request it made,
   * that each order it names was billed exactly that, and that exactly those orders' costs moved
   * between consumer, provider and platform.
   */
  async function expectBilledAsReported(expected: Usage[], call: () => Promise<Reported[]>): Promise<void> {
    const before = {
      consumer: await market.balance(consumer.accountId),
      provider: await market.balance(provider.accountId),
      platform: await platformBalance(market),
    };
    const reported = await call();
    expect(
      reported.map(({ promptTokens, completionTokens }) => ({ promptTokens, completionTokens })),
    ).toEqual(expected);
    let cost = 0n;
    let fee = 0n;
    for (const { orderId, promptTokens, completionTokens } of reported) {
      const { order } = await market.admin.getOrder({ orderId });
      const orderCharge = orderCost(promptTokens, completionTokens, PRICE_IN, PRICE_OUT);
      expect(order).toMatchObject({
        consumerAccountId: consumer.accountId,
        model: MODEL,
        promptTokens,
        completionTokens,
        cost: orderCharge,
      });
      cost += orderCharge;
      fee += platformFee(orderCharge, FEE_BPS);
    }
    const after = {
      consumer: await market.balance(consumer.accountId),
      provider: await market.balance(provider.accountId),
      platform: await platformBalance(market),
    };
    expect(before.consumer.available - after.consumer.available).toBe(cost);
    expect(after.consumer.held).toBe(0n);
    expect(after.provider.pending - before.provider.pending).toBe(cost - fee);
    expect(after.platform - before.platform).toBe(fee);
    const audit = await ledgerIsBalanced(market);
    expect(audit.problems).toEqual([]);
    expect(audit.ok).toBe(true);
  }

  /** The body the worker sent to the engine for the most recent request. */
  function lastEngineRequest(): Record<string, unknown> {
    return engine.requests[engine.requests.length - 1] as Record<string, unknown>;
  }

  function aiSdk() {
    return createOpenAI({ baseURL, apiKey: consumer.apiKey });
  }

  function langChain(): ChatOpenAI {
    return new ChatOpenAI({
      configuration: { baseURL },
      apiKey: consumer.apiKey,
      model: MODEL,
      maxRetries: 0,
    });
  }

  it("answers the Vercel AI SDK's generateObject over chat completions with the parsed object", async () => {
    await expectBilledAsReported([JSON_USAGE], async () => {
      const result = await generateObject({
        model: aiSdk().chat(MODEL),
        schema: CITY,
        prompt: CITY_QUESTION,
        maxRetries: 0,
      });
      expect(result.object).toEqual(CITY_ANSWER);
      expect(result.finishReason).toBe("stop");
      expect(result.response.modelId).toBe(MODEL);
      expect(lastEngineRequest().response_format).toMatchObject({
        type: "json_schema",
        json_schema: {
          name: "response",
          strict: true,
          schema: { type: "object", required: ["city", "population"] },
        },
      });
      return [reportedByAiSdk(result)];
    });
  });

  it("answers the Vercel AI SDK's generateObject over its default, the Responses API", async () => {
    await expectBilledAsReported([JSON_USAGE], async () => {
      const result = await generateObject({
        model: aiSdk()(MODEL),
        schema: CITY,
        prompt: CITY_QUESTION,
        maxRetries: 0,
      });
      expect(result.object).toEqual(CITY_ANSWER);
      expect(result.finishReason).toBe("stop");
      expect(lastEngineRequest().response_format).toMatchObject({
        type: "json_schema",
        json_schema: { strict: true, schema: { type: "object", required: ["city", "population"] } },
      });
      return [reportedByAiSdk(result)];
    });
  });

  it("runs the Vercel AI SDK's tool loop: the tool call, the tool's result, the final answer", async () => {
    const executed: unknown[] = [];
    const getWeather = tool({
      description: WEATHER_TOOL.function.description,
      inputSchema: z.object({ city: z.string(), unit: z.enum(["celsius", "fahrenheit"]) }),
      execute: async (input) => {
        executed.push(input);
        return WEATHER_REPORT;
      },
    });
    await expectBilledAsReported([TOOL_CALL_USAGE, TOOL_ANSWER_USAGE], async () => {
      const result = await generateText({
        model: aiSdk().chat(MODEL),
        tools: { get_weather: getWeather },
        stopWhen: stepCountIs(2),
        prompt: WEATHER_QUESTION,
        maxRetries: 0,
      });
      expect(executed).toEqual([WEATHER_CALL.arguments]);
      expect(result.steps).toHaveLength(2);
      expect(result.steps[0]?.finishReason).toBe("tool-calls");
      expect(result.steps[0]?.toolCalls).toMatchObject([
        { toolCallId: "call_0", toolName: WEATHER_CALL.name, input: WEATHER_CALL.arguments },
      ]);
      expect(result.text).toBe(fakeToolAnswer(WEATHER_REPORT));
      expect(result.finishReason).toBe("stop");
      return result.steps.map(reportedByAiSdk);
    });
  });

  it("answers LangChain's withStructuredOutput with the parsed object", async () => {
    await expectBilledAsReported([JSON_USAGE], async () => {
      const { parsed, raw } = await langChain()
        .withStructuredOutput(CITY, { includeRaw: true })
        .invoke(CITY_QUESTION);
      expect(parsed).toEqual(CITY_ANSWER);
      expect(lastEngineRequest().response_format).toMatchObject({
        type: "json_schema",
        json_schema: { name: "extract", schema: { type: "object", required: ["city", "population"] } },
      });
      return [reportedByLangChain(raw as AIMessage)];
    });
  });

  it("runs LangChain's bindTools loop: the tool call exact, then the answer to the tool's result", async () => {
    await expectBilledAsReported([TOOL_CALL_USAGE, TOOL_ANSWER_USAGE], async () => {
      const model = langChain().bindTools([WEATHER_TOOL]);
      const question = new HumanMessage(WEATHER_QUESTION);
      const call = await model.invoke([question]);
      expect(call.tool_calls).toEqual([
        { type: "tool_call", id: "call_0", name: WEATHER_CALL.name, args: WEATHER_CALL.arguments },
      ]);
      expect(call.response_metadata.finish_reason).toBe("tool_calls");
      expect(lastEngineRequest().tools).toEqual([WEATHER_TOOL]);

      const answer = await model.invoke([
        question,
        call,
        new ToolMessage({ tool_call_id: "call_0", content: WEATHER_REPORT }),
      ]);
      expect(answer.content).toBe(fakeToolAnswer(WEATHER_REPORT));
      expect(answer.tool_calls).toEqual([]);
      expect(answer.response_metadata.finish_reason).toBe("stop");
      return [reportedByLangChain(call), reportedByLangChain(answer)];
    });
  });

  it("streams LangChain's bindTools tool call in fragments and assembles it exactly", async () => {
    await expectBilledAsReported([TOOL_CALL_USAGE], async () => {
      const stream = await langChain().bindTools([WEATHER_TOOL]).stream(WEATHER_QUESTION);
      const chunks: AIMessageChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      const argumentChunks = chunks.filter((chunk) =>
        (chunk.tool_call_chunks ?? []).some((part) => part.args),
      );
      expect(argumentChunks.length).toBeGreaterThan(1);
      const message = chunks.reduce((whole, chunk) => whole.concat(chunk));
      expect(message.tool_calls).toEqual([
        { type: "tool_call", id: "call_0", name: WEATHER_CALL.name, args: WEATHER_CALL.arguments },
      ]);
      expect(lastEngineRequest().stream).toBe(true);
      return [reportedByLangChain(message)];
    });
  });
});

function reportedByAiSdk(result: {
  response: { id: string };
  usage: { inputTokens?: number; outputTokens?: number };
}): Reported {
  return {
    orderId: result.response.id,
    promptTokens: result.usage.inputTokens ?? -1,
    completionTokens: result.usage.outputTokens ?? -1,
  };
}

function reportedByLangChain(message: AIMessage | AIMessageChunk): Reported {
  return {
    orderId: message.id ?? "",
    promptTokens: message.usage_metadata?.input_tokens ?? -1,
    completionTokens: message.usage_metadata?.output_tokens ?? -1,
  };
}

/**
 * The Responses API (POST /v1/responses) with the official `openai` SDK → the control plane → a
 * real worker process over gRPC → an OpenAI-compatible engine (test/support/fake-engine.ts):
 * plain text and a function-calling loop, streamed (the standard event sequence, each event with
 * its sequence_number) and not, structured output through `text.format`, the stateful fields
 * refused — each answer exact and each order billed exactly its usage.
 */
import type OpenAI from "openai";
import { zodTextFormat } from "openai/helpers/zod";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  DEFAULT_FAKE_JSON,
  DEFAULT_FAKE_PROMPT_TOKENS,
  DEFAULT_FAKE_TOKENS,
  type FakeEngine,
  fakeArgumentFragments,
  fakeTokens,
  fakeToolAnswer,
} from "../support/fake-engine.js";
import type { TestMarket } from "../support/market.js";
import {
  type PricedMarket,
  type ReportedUsage,
  startPricedMarket,
  WEATHER_ARGUMENTS,
  WEATHER_FUNCTION,
} from "../support/priced-market.js";

const MODEL = "fake-responder";
const ARGUMENTS = WEATHER_ARGUMENTS;
const FRAGMENTS = 3;
const TOOL_RESULT = "22 C";
const WEATHER_TOOL: OpenAI.Responses.FunctionTool = { type: "function", ...WEATHER_FUNCTION };
const QUESTION = "What is the weather in Lisbon?";
const HELLO = DEFAULT_FAKE_TOKENS.join("");

function responseUsage(response: OpenAI.Responses.Response): ReportedUsage {
  const usage = response.usage as
    | (OpenAI.Responses.ResponseUsage & { cost_micro_credits?: string })
    | undefined;
  expect(usage?.total_tokens).toBe((usage?.input_tokens ?? 0) + (usage?.output_tokens ?? 0));
  expect(usage?.cost_micro_credits).toMatch(/^\d+$/);
  return {
    orderId: response.id,
    promptTokens: usage?.input_tokens ?? -1,
    completionTokens: usage?.output_tokens ?? -1,
    costMicroCredits: usage?.cost_micro_credits ?? "",
  };
}

describe("the Responses API through a real worker", () => {
  let priced: PricedMarket;
  let market: TestMarket;
  let engine: FakeEngine;
  let consumer: { accountId: string; apiKey: string };
  let client: OpenAI;

  beforeAll(async () => {
    priced = await startPricedMarket({ toolCall: { arguments: ARGUMENTS }, toolCallFragments: FRAGMENTS }, [
      { model: MODEL },
    ]);
    ({ market, engine, consumer, client } = priced);
  });

  afterAll(() => priced?.close());

  const billed = (call: () => Promise<ReportedUsage>) => priced.billed(call);

  it("answers a plain create with a completed Response", async () => {
    const firstRequest = engine.requests.length;
    await billed(async () => {
      const response = await client.responses.create({ model: MODEL, instructions: "Be kind.", input: "Hi" });
      expect(response).toMatchObject({ object: "response", status: "completed", model: MODEL, store: false });
      expect(response.output_text).toBe(HELLO);
      expect(response.output).toEqual([
        {
          id: expect.stringMatching(/^msg_/),
          type: "message",
          status: "completed",
          role: "assistant",
          content: [{ type: "output_text", text: HELLO, annotations: [] }],
        },
      ]);
      expect(response.usage).toMatchObject({
        input_tokens: DEFAULT_FAKE_PROMPT_TOKENS,
        output_tokens: DEFAULT_FAKE_TOKENS.length,
      });
      return responseUsage(response);
    });
    const sent = engine.requests[firstRequest] as { messages: unknown[] };
    expect(sent.messages).toEqual([
      { role: "system", content: "Be kind." },
      { role: "user", content: "Hi" },
    ]);
  });

  it("runs a function-calling loop: function_call, function_call_output, final answer", async () => {
    let first: OpenAI.Responses.Response | undefined;
    await billed(async () => {
      first = await client.responses.create({
        model: MODEL,
        input: [{ role: "user", content: [{ type: "input_text", text: QUESTION }] }],
        tools: [WEATHER_TOOL],
      });
      expect(first.status).toBe("completed");
      expect(first.output).toEqual([
        {
          id: expect.stringMatching(/^fc_/),
          type: "function_call",
          status: "completed",
          call_id: "call_0",
          name: "get_weather",
          arguments: ARGUMENTS,
        },
      ]);
      expect(first.usage?.output_tokens).toBe(1 + fakeArgumentFragments(ARGUMENTS, FRAGMENTS).length);
      return responseUsage(first);
    });
    if (!first) throw new Error("no first response");
    const previous = first;
    const firstRequest = engine.requests.length;
    await billed(async () => {
      const response = await client.responses.create({
        model: MODEL,
        input: [
          { role: "user", content: QUESTION },
          ...(previous.output as OpenAI.Responses.ResponseInputItem[]),
          { type: "function_call_output", call_id: "call_0", output: TOOL_RESULT },
        ],
        tools: [WEATHER_TOOL],
      });
      expect(response.output_text).toBe(fakeToolAnswer(TOOL_RESULT));
      expect(response.output.map((item) => item.type)).toEqual(["message"]);
      expect(response.usage?.output_tokens).toBe(fakeTokens(fakeToolAnswer(TOOL_RESULT)).length);
      return responseUsage(response);
    });
    const sent = engine.requests[firstRequest] as { messages: unknown[]; tools: unknown[] };
    expect(sent.messages).toEqual([
      { role: "user", content: QUESTION },
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "call_0", type: "function", function: { name: "get_weather", arguments: ARGUMENTS } },
        ],
      },
      { role: "tool", tool_call_id: "call_0", content: TOOL_RESULT },
    ]);
    expect(sent.tools).toEqual([
      {
        type: "function",
        function: {
          name: WEATHER_TOOL.name,
          description: WEATHER_TOOL.description,
          parameters: WEATHER_TOOL.parameters,
          strict: true,
        },
      },
    ]);
  });

  it("streams text as the standard event sequence", async () => {
    await billed(async () => {
      const stream = await client.responses.create({ model: MODEL, input: "Hi", stream: true });
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      for await (const event of stream) events.push(event);
      expect(events.map((event) => event.type)).toEqual([
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        ...DEFAULT_FAKE_TOKENS.map(() => "response.output_text.delta"),
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
      ]);
      expect(events.map((event) => event.sequence_number)).toEqual(events.map((_, index) => index));
      const deltas = events.flatMap((event) =>
        event.type === "response.output_text.delta" ? [event.delta] : [],
      );
      expect(deltas).toEqual([...DEFAULT_FAKE_TOKENS]);
      const done = events.find((event) => event.type === "response.output_text.done");
      expect(done).toMatchObject({ text: HELLO, output_index: 0, content_index: 0 });
      const completed = events.at(-1);
      if (completed?.type !== "response.completed") throw new Error("no response.completed");
      expect(completed.response.status).toBe("completed");
      expect(completed.response.output).toEqual([
        expect.objectContaining({
          type: "message",
          content: [{ type: "output_text", text: HELLO, annotations: [] }],
        }),
      ]);
      return responseUsage(completed.response);
    });
  });

  it("names each event on the wire as OpenAI does, with no [DONE]", async () => {
    const response = await fetch(`${market.plane.httpUrl}/v1/responses`, {
      method: "POST",
      headers: { authorization: `Bearer ${consumer.apiKey}`, "content-type": "application/json" },
      body: JSON.stringify({ model: MODEL, input: "Hi", stream: true }),
    });
    expect(response.status).toBe(200);
    expect(response.headers.get("content-type")).toContain("text/event-stream");
    const events = (await response.text()).split("\n\n").filter((event) => event !== "");
    expect(events.length).toBe(4 + DEFAULT_FAKE_TOKENS.length + 4);
    for (const event of events) {
      const [name, data, ...rest] = event.split("\n");
      expect(rest).toEqual([]);
      expect(name).toMatch(/^event: response\./);
      const payload = JSON.parse(data?.slice("data: ".length) ?? "") as { type: string };
      expect(name).toBe(`event: ${payload.type}`);
    }
    const last = JSON.parse(events.at(-1)?.split("\n")[1]?.slice("data: ".length) ?? "") as {
      response: { id: string };
    };
    expect(last.response.id).toBe(response.headers.get("x-request-id"));
  });

  it("streams a function call with its arguments over several events", async () => {
    await billed(async () => {
      const stream = client.responses.stream({ model: MODEL, input: QUESTION, tools: [WEATHER_TOOL] });
      const events: OpenAI.Responses.ResponseStreamEvent[] = [];
      stream.on("event", (event) => events.push(event));
      const response = await stream.finalResponse();
      const fragments = fakeArgumentFragments(ARGUMENTS, FRAGMENTS);
      expect(events.map((event) => event.type)).toEqual([
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        ...fragments.map(() => "response.function_call_arguments.delta"),
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
      ]);
      const deltas = events.flatMap((event) =>
        event.type === "response.function_call_arguments.delta" ? [event.delta] : [],
      );
      expect(deltas).toEqual(fragments);
      expect(response.output).toEqual([
        expect.objectContaining({
          type: "function_call",
          call_id: "call_0",
          name: "get_weather",
          arguments: ARGUMENTS,
        }),
      ]);
      return responseUsage(response);
    });
  });

  it("parses structured output from text.format with a zod schema", async () => {
    const Person = z.object({ name: z.string(), born: z.number().int() });
    await billed(async () => {
      const response = await client.responses.parse({
        model: MODEL,
        input: "Who wrote the first program?",
        text: { format: zodTextFormat(Person, "person") },
      });
      expect(response.output_text).toBe(DEFAULT_FAKE_JSON);
      expect(response.output_parsed).toEqual(JSON.parse(DEFAULT_FAKE_JSON));
      return responseUsage(response);
    });
  });

  it("refuses the stateful fields with a 400 naming each, charging nothing", async () => {
    const before = await market.balance(consumer.accountId);
    const refused: [string, Partial<OpenAI.Responses.ResponseCreateParamsNonStreaming>][] = [
      ["store", { store: true }],
      ["previous_response_id", { previous_response_id: "resp_earlier" }],
    ];
    for (const [param, extra] of refused) {
      const failure = await client.responses.create({ model: MODEL, input: "Hi", ...extra }).then(
        () => null,
        (error: unknown) => error,
      );
      expect(failure).toMatchObject({ status: 400, param });
    }
    expect(await market.balance(consumer.accountId)).toEqual(before);
  });
});

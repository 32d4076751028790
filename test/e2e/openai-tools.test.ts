/**
 * What an agent loop sends through chat completions, with the official `openai` SDK → the control
 * plane → a real worker process over gRPC → an OpenAI-compatible engine that answers tools,
 * response formats and logprobs the way vLLM does (test/support/fake-engine.ts): a complete
 * tool-calling loop streamed and not, `chat.completions.parse` with a zod schema, and logprobs —
 * each answer exact, each billed exactly what its usage says.
 */
import type OpenAI from "openai";
import { zodResponseFormat } from "openai/helpers/zod";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { z } from "zod";
import {
  DEFAULT_FAKE_JSON,
  DEFAULT_FAKE_PROMPT_TOKENS,
  DEFAULT_FAKE_TOKENS,
  type FakeEngine,
  fakeArgumentFragments,
  fakeLogprob,
  fakeTokens,
  fakeToolAnswer,
  fakeTopLogprobs,
} from "../support/fake-engine.js";
import {
  chatUsage,
  type PricedMarket,
  type ReportedUsage,
  startPricedMarket,
  WEATHER_ARGUMENTS,
  WEATHER_FUNCTION,
} from "../support/priced-market.js";

const MODEL = "fake-agent";
/** Served only by a worker whose offer declares no capabilities. */
const PLAIN_MODEL = "fake-plain";
const ARGUMENTS = WEATHER_ARGUMENTS;
const FRAGMENTS = 4;
const TOOL_RESULT = "22 C and sunny";
const WEATHER_TOOL: OpenAI.Chat.Completions.ChatCompletionTool = {
  type: "function",
  function: WEATHER_FUNCTION,
};
const QUESTION: OpenAI.Chat.Completions.ChatCompletionMessageParam = {
  role: "user",
  content: [{ type: "text", text: "What is the weather in Lisbon?" }],
};
/** A tool-call turn is one chunk opening the call, then one per argument fragment. */
const TOOL_TURN_TOKENS = 1 + fakeArgumentFragments(ARGUMENTS, FRAGMENTS).length;

describe("tools, structured output and logprobs through chat completions", () => {
  let priced: PricedMarket;
  let engine: FakeEngine;
  let client: OpenAI;

  beforeAll(async () => {
    priced = await startPricedMarket(
      {
        toolCall: { arguments: ARGUMENTS },
        toolCallFragments: FRAGMENTS,
      },
      [{ model: MODEL }, { model: PLAIN_MODEL, args: ["--capabilities", "none"] }],
    );
    ({ engine, client } = priced);
  });

  afterAll(() => priced?.close());

  const billed = (call: () => Promise<ReportedUsage>) => priced.billed(call);

  /** The conversation after the model's call and the tool's answer to it. */
  function withToolResult(
    call: OpenAI.Chat.Completions.ChatCompletionMessageToolCall,
  ): OpenAI.Chat.Completions.ChatCompletionMessageParam[] {
    return [
      QUESTION,
      { role: "assistant", content: null, tool_calls: [call] },
      { role: "tool", tool_call_id: call.id, content: TOOL_RESULT },
    ];
  }

  it("runs a tool-calling loop: tool call, tool result, final answer", async () => {
    const firstRequest = engine.requests.length;
    let call: OpenAI.Chat.Completions.ChatCompletionMessageToolCall | undefined;
    await billed(async () => {
      const completion = await client.chat.completions.create({
        model: MODEL,
        messages: [QUESTION],
        tools: [WEATHER_TOOL],
        tool_choice: "auto",
        user: "end-user-42",
      });
      const choice = completion.choices[0];
      expect(choice?.finish_reason).toBe("tool_calls");
      expect(choice?.message.content).toBeNull();
      expect(choice?.message.tool_calls).toEqual([
        { id: "call_0", type: "function", function: { name: "get_weather", arguments: ARGUMENTS } },
      ]);
      call = choice?.message.tool_calls?.[0];
      expect(completion.model).toBe(MODEL);
      expect(completion.usage?.completion_tokens).toBe(TOOL_TURN_TOKENS);
      return chatUsage(completion.id, completion.usage);
    });
    const sent = engine.requests[firstRequest] as Record<string, unknown>;
    expect(sent.tools).toEqual([WEATHER_TOOL]);
    expect(sent.user).toBeUndefined();
    expect(JSON.stringify(sent)).not.toContain("end-user-42");

    if (!call) throw new Error("no tool call");
    const toolCall = call;
    await billed(async () => {
      const completion = await client.chat.completions.create({
        model: MODEL,
        messages: withToolResult(toolCall),
        tools: [WEATHER_TOOL],
      });
      const answer = fakeToolAnswer(TOOL_RESULT);
      expect(completion.choices[0]?.message).toMatchObject({ role: "assistant", content: answer });
      expect(completion.choices[0]?.message.tool_calls).toBeUndefined();
      expect(completion.choices[0]?.finish_reason).toBe("stop");
      expect(completion.usage?.completion_tokens).toBe(fakeTokens(answer).length);
      return chatUsage(completion.id, completion.usage);
    });
    const second = engine.requests[firstRequest + 1] as { messages: unknown[] };
    expect(second.messages.slice(1)).toEqual([
      {
        role: "assistant",
        content: null,
        tool_calls: [
          { id: "call_0", type: "function", function: { name: "get_weather", arguments: ARGUMENTS } },
        ],
      },
      { role: "tool", tool_call_id: "call_0", content: TOOL_RESULT },
    ]);
  });

  it("streams the loop with chat.completions.stream: tool-call deltas over several chunks", async () => {
    const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
    let call: OpenAI.Chat.Completions.ChatCompletionMessageToolCall | undefined;
    await billed(async () => {
      const stream = client.chat.completions.stream({
        model: MODEL,
        messages: [QUESTION],
        tools: [WEATHER_TOOL],
        stream_options: { include_usage: true },
      });
      stream.on("chunk", (chunk) => chunks.push(chunk));
      const completion = await stream.finalChatCompletion();
      expect(completion.choices[0]?.finish_reason).toBe("tool_calls");
      expect(completion.choices[0]?.message.tool_calls).toEqual([
        {
          id: "call_0",
          type: "function",
          function: { name: "get_weather", arguments: ARGUMENTS, parsed_arguments: JSON.parse(ARGUMENTS) },
        },
      ]);
      call = completion.choices[0]?.message.tool_calls?.[0];
      expect(completion.usage?.completion_tokens).toBe(TOOL_TURN_TOKENS);
      return chatUsage(completion.id, completion.usage);
    });
    const fragments = chunks.flatMap((chunk) => chunk.choices[0]?.delta.tool_calls ?? []);
    expect(fragments.length).toBeGreaterThanOrEqual(3);
    // OpenAI's shape: the id, type and name come with a call's first fragment only.
    expect(fragments[0]).toMatchObject({
      index: 0,
      id: "call_0",
      type: "function",
      function: { name: "get_weather" },
    });
    for (const later of fragments.slice(1)) expect(Object.keys(later).sort()).toEqual(["function", "index"]);
    expect(fragments.map((fragment) => fragment.function?.arguments ?? "").join("")).toBe(ARGUMENTS);

    if (!call) throw new Error("no tool call");
    const toolCall = call;
    await billed(async () => {
      const stream = client.chat.completions.stream({
        model: MODEL,
        messages: withToolResult(toolCall),
        tools: [WEATHER_TOOL],
        stream_options: { include_usage: true },
      });
      const completion = await stream.finalChatCompletion();
      expect(completion.choices[0]?.message.content).toBe(fakeToolAnswer(TOOL_RESULT));
      expect(completion.choices[0]?.finish_reason).toBe("stop");
      return chatUsage(completion.id, completion.usage);
    });
  });

  it("parses structured output with a zod schema", async () => {
    const Person = z.object({ name: z.string(), born: z.number().int() });
    const firstRequest = engine.requests.length;
    await billed(async () => {
      const completion = await client.chat.completions.parse({
        model: MODEL,
        messages: [{ role: "user", content: "Who wrote the first program?" }],
        response_format: zodResponseFormat(Person, "person"),
      });
      expect(completion.choices[0]?.message.content).toBe(DEFAULT_FAKE_JSON);
      expect(completion.choices[0]?.message.parsed).toEqual(JSON.parse(DEFAULT_FAKE_JSON));
      expect(completion.usage?.completion_tokens).toBe(fakeTokens(DEFAULT_FAKE_JSON).length);
      return chatUsage(completion.id, completion.usage);
    });
    const sent = engine.requests[firstRequest] as { response_format: { type: string; json_schema: unknown } };
    expect(sent.response_format).toEqual(zodResponseFormat(Person, "person"));
  });

  /** The logprob entries the engine gives `tokens` with `top` alternatives, in OpenAI's chat shape. */
  function expectedLogprobs(tokens: readonly string[], top: number) {
    return tokens.map((token, position) => ({
      token,
      logprob: fakeLogprob(position),
      bytes: [...Buffer.from(token)],
      top_logprobs: fakeTopLogprobs(token, position, top).map((alternative) => ({
        ...alternative,
        bytes: [...Buffer.from(alternative.token)],
      })),
    }));
  }

  it("returns logprobs with their top alternatives", async () => {
    await billed(async () => {
      const completion = await client.chat.completions.create({
        model: MODEL,
        messages: [{ role: "user", content: "Hi" }],
        logprobs: true,
        top_logprobs: 2,
      });
      expect(completion.choices[0]?.message.content).toBe(DEFAULT_FAKE_TOKENS.join(""));
      expect(completion.choices[0]?.logprobs).toEqual({
        content: expectedLogprobs(DEFAULT_FAKE_TOKENS, 2),
        refusal: null,
      });
      expect(completion.usage?.prompt_tokens).toBe(DEFAULT_FAKE_PROMPT_TOKENS);
      return chatUsage(completion.id, completion.usage);
    });
  });

  it("streams logprobs chunk by chunk", async () => {
    await billed(async () => {
      const stream = await client.chat.completions.create({
        model: MODEL,
        messages: [{ role: "user", content: "Hi" }],
        logprobs: true,
        top_logprobs: 1,
        stream: true,
        stream_options: { include_usage: true },
      });
      const chunks: OpenAI.Chat.Completions.ChatCompletionChunk[] = [];
      for await (const chunk of stream) chunks.push(chunk);
      const entries = chunks.flatMap((chunk) => chunk.choices[0]?.logprobs?.content ?? []);
      expect(entries).toEqual(expectedLogprobs(DEFAULT_FAKE_TOKENS, 1));
      const text = chunks.map((chunk) => chunk.choices[0]?.delta.content ?? "").join("");
      expect(text).toBe(DEFAULT_FAKE_TOKENS.join(""));
      const last = chunks.at(-1);
      return chatUsage(last?.id ?? "", last?.usage);
    });
  });

  it("does not send logprobs when they were not asked for", async () => {
    const completion = await client.chat.completions.create({
      model: MODEL,
      messages: [{ role: "user", content: "Hi" }],
    });
    expect(completion.choices[0]?.logprobs).toBeNull();
    const sent = engine.requests.at(-1) as Record<string, unknown>;
    expect(sent.logprobs ?? false).toBe(false);
  });

  it("refuses logprobs no worker of the model has, or drops them when told and says so", async () => {
    const request = {
      model: PLAIN_MODEL,
      messages: [{ role: "user" as const, content: "Hi" }],
      logprobs: true,
    };
    const refused = await client.chat.completions.create(request).then(
      () => null,
      (error: unknown) => error,
    );
    expect(refused).toMatchObject({ status: 400, param: "logprobs" });

    await billed(async () => {
      const { data, response } = await client.chat.completions
        .create({ ...request, provider: { require_parameters: false } } as typeof request)
        .withResponse();
      expect(response.headers.get("x-dropped-parameters")).toBe("logprobs");
      expect(data.choices[0]?.message.content).toBe(DEFAULT_FAKE_TOKENS.join(""));
      expect(data.choices[0]?.logprobs).toBeNull();
      return chatUsage(data.id, data.usage);
    });
    const sent = engine.requests.at(-1) as Record<string, unknown>;
    expect(sent.logprobs ?? false).toBe(false);
  });
});

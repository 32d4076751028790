/**
 * Parsing of OpenAI request bodies into the market's CompletionRequest: chat completions (every
 * field OpenAI defines that the market uses, and a 400 naming the field for each malformed one),
 * and the legacy completions and Responses bodies built from the same field parsers.
 */
import { describe, expect, it } from "vitest";
import { parseChatRequest } from "../../server/http/chat-request.js";
import { parseCompletionRequest } from "../../server/http/completions.js";
import { parseResponsesRequest } from "../../server/http/responses.js";
import { MarketError } from "../../server/market/errors.js";

const base = { model: "m", messages: [{ role: "user", content: "Hi" }] };

/** The MarketError `parse` throws for `body`, which must be a 400 naming `param`. */
function rejection(parse: (body: unknown) => unknown, body: unknown): MarketError {
  try {
    parse(body);
  } catch (error) {
    if (!(error instanceof MarketError)) throw error;
    expect(error.code).toBe("invalid_request");
    return error;
  }
  throw new Error("the body was accepted");
}

const WEATHER = {
  type: "function",
  function: {
    name: "get_weather",
    description: "Weather in a city.",
    parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
    strict: true,
  },
};

describe("parseChatRequest", () => {
  it("keeps a plain request as it was", () => {
    const { completion, includeUsage } = parseChatRequest(base);
    expect(completion).toEqual({
      model: "m",
      messages: [{ role: "user", content: "Hi" }],
      sampling: {
        temperature: undefined,
        topP: undefined,
        stop: [],
        seed: undefined,
        presencePenalty: undefined,
        frequencyPenalty: undefined,
      },
      maxTokens: undefined,
      stream: false,
      routing: {},
    });
    expect(includeUsage).toBe(false);
  });

  it("joins text parts and lists image parts", () => {
    const { completion } = parseChatRequest({
      ...base,
      messages: [
        {
          role: "user",
          content: [
            { type: "text", text: "What is " },
            { type: "image_url", image_url: { url: "https://example.com/cat.png", detail: "low" } },
            { type: "text", text: "this?" },
            { type: "image_url", image_url: { url: "data:image/png;base64,AAAA" } },
          ],
        },
      ],
    });
    expect(completion.messages).toEqual([
      {
        role: "user",
        content: "What is this?",
        imageUrls: ["https://example.com/cat.png", "data:image/png;base64,AAAA"],
      },
    ]);
  });

  it("carries assistant tool calls and tool results through a conversation", () => {
    const { completion } = parseChatRequest({
      ...base,
      messages: [
        { role: "user", content: "Weather in Lisbon?" },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_1",
              type: "function",
              function: { name: "get_weather", arguments: '{"city":"Lisbon"}' },
            },
          ],
        },
        { role: "tool", tool_call_id: "call_1", content: [{ type: "text", text: "22 C" }] },
      ],
    });
    expect(completion.messages).toEqual([
      { role: "user", content: "Weather in Lisbon?" },
      {
        role: "assistant",
        content: "",
        toolCalls: [{ id: "call_1", name: "get_weather", arguments: '{"city":"Lisbon"}' }],
      },
      { role: "tool", content: "22 C", toolCallId: "call_1" },
    ]);
  });

  it("reads tools, tool_choice and parallel_tool_calls", () => {
    const { completion } = parseChatRequest({
      ...base,
      tools: [WEATHER, { type: "function", function: { name: "now" } }],
      tool_choice: { type: "function", function: { name: "get_weather" } },
      parallel_tool_calls: false,
    });
    expect(completion.tools).toEqual([
      {
        name: "get_weather",
        description: "Weather in a city.",
        parametersJson: JSON.stringify(WEATHER.function.parameters),
        strict: true,
      },
      { name: "now", description: "", parametersJson: "", strict: false },
    ]);
    expect(completion.toolChoice).toEqual({ mode: "function", functionName: "get_weather" });
    expect(completion.parallelToolCalls).toBe(false);
    for (const mode of ["auto", "none", "required"] as const) {
      expect(
        parseChatRequest({ ...base, tools: [WEATHER], tool_choice: mode }).completion.toolChoice,
      ).toEqual({
        mode,
      });
    }
  });

  it("treats an empty tools array, and tool_choice auto or none without tools, as no tools", () => {
    const { completion } = parseChatRequest({
      ...base,
      tools: [],
      tool_choice: "none",
      parallel_tool_calls: true,
    });
    expect(completion.tools).toBeUndefined();
    expect(completion.toolChoice).toBeUndefined();
    expect(completion.parallelToolCalls).toBeUndefined();
  });

  it("reads each response_format", () => {
    const format = (response_format: unknown) =>
      parseChatRequest({ ...base, response_format }).completion.responseFormat;
    expect(format({ type: "text" })).toEqual({ type: "text" });
    expect(format({ type: "json_object" })).toEqual({ type: "json_object" });
    const schema = { type: "object", properties: { a: { type: "integer" } }, required: ["a"] };
    expect(format({ type: "json_schema", json_schema: { name: "thing", schema, strict: true } })).toEqual({
      type: "json_schema",
      name: "thing",
      schemaJson: JSON.stringify(schema),
      strict: true,
    });
    expect(format({ type: "json_schema", json_schema: { name: "any" } })).toEqual({
      type: "json_schema",
      name: "any",
      schemaJson: "{}",
      strict: false,
    });
  });

  it("reads logprobs and top_logprobs", () => {
    expect(parseChatRequest({ ...base, logprobs: true, top_logprobs: 20 }).completion.logprobs).toEqual({
      top: 20,
    });
    expect(parseChatRequest({ ...base, logprobs: true }).completion.logprobs).toEqual({ top: 0 });
    expect(parseChatRequest({ ...base, logprobs: false }).completion.logprobs).toBeUndefined();
  });

  it("reads sampling, both token limits (the newer first) and stream_options", () => {
    const { completion, includeUsage } = parseChatRequest({
      ...base,
      temperature: 0.5,
      top_p: 0.9,
      stop: "END",
      seed: 42,
      presence_penalty: 1,
      frequency_penalty: -1,
      max_tokens: 10,
      max_completion_tokens: 20,
      stream: true,
      stream_options: { include_usage: true },
    });
    expect(completion.sampling).toEqual({
      temperature: 0.5,
      topP: 0.9,
      stop: ["END"],
      seed: 42n,
      presencePenalty: 1,
      frequencyPenalty: -1,
    });
    expect(completion.maxTokens).toBe(20);
    expect(completion.stream).toBe(true);
    expect(includeUsage).toBe(true);
    expect(parseChatRequest({ ...base, max_tokens: 10, stop: ["a", "b"] }).completion).toMatchObject({
      maxTokens: 10,
      sampling: { stop: ["a", "b"] },
    });
  });

  it("reads OpenRouter's models as fallbacks after model, or as the model itself", () => {
    expect(parseChatRequest({ ...base, models: ["m", "b", "c", "b"] }).completion).toMatchObject({
      model: "m",
      fallbackModels: ["b", "c"],
    });
    const { completion } = parseChatRequest({ messages: base.messages, models: ["a", "b"] });
    expect(completion.model).toBe("a");
    expect(completion.fallbackModels).toEqual(["b"]);
  });

  it("ignores user and fields it does not know", () => {
    const { completion } = parseChatRequest({ ...base, user: "alice", metadata: { a: "b" }, whatever: 1 });
    expect(
      JSON.stringify(completion, (_key, value) => (typeof value === "bigint" ? String(value) : value)),
    ).not.toContain("alice");
    expect(completion).toEqual(parseChatRequest(base).completion);
  });

  it.each([
    ["body", "not an object"],
    ["model", { messages: base.messages }],
    ["model", { ...base, model: " " }],
    ["models", { ...base, models: "b" }],
    ["models[1]", { ...base, models: ["b", ""] }],
    ["messages", { model: "m", messages: [] }],
    ["messages[0].role", { model: "m", messages: [{ role: "robot", content: "x" }] }],
    ["messages[0].content", { model: "m", messages: [{ role: "user", content: 7 }] }],
    [
      "messages[0].content[0]",
      { model: "m", messages: [{ role: "user", content: [{ type: "input_audio" }] }] },
    ],
    [
      "messages[0].content[0].image_url.url",
      {
        model: "m",
        messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: "file:///x" } }] }],
      },
    ],
    ["messages[0].name", { model: "m", messages: [{ role: "user", content: "x", name: 3 }] }],
    [
      "messages[0].tool_calls",
      { model: "m", messages: [{ role: "assistant", content: "", tool_calls: {} }] },
    ],
    [
      "messages[0].tool_calls[0].id",
      {
        model: "m",
        messages: [
          { role: "assistant", tool_calls: [{ type: "function", function: { name: "f", arguments: "{}" } }] },
        ],
      },
    ],
    [
      "messages[0].tool_calls[0].function.arguments",
      {
        model: "m",
        messages: [
          {
            role: "assistant",
            tool_calls: [{ id: "c", type: "function", function: { name: "f", arguments: {} } }],
          },
        ],
      },
    ],
    ["messages[0].tool_call_id", { model: "m", messages: [{ role: "tool", content: "22 C" }] }],
    ["tools", { ...base, tools: WEATHER }],
    ["tools[0].type", { ...base, tools: [{ type: "custom", custom: { name: "x" } }] }],
    ["tools[0].function", { ...base, tools: [{ type: "function" }] }],
    ["tools[0].function.name", { ...base, tools: [{ type: "function", function: { name: "get weather" } }] }],
    [
      "tools[0].function.parameters",
      { ...base, tools: [{ type: "function", function: { name: "f", parameters: "{}" } }] },
    ],
    [
      "tools[0].function.strict",
      { ...base, tools: [{ type: "function", function: { name: "f", strict: "yes" } }] },
    ],
    ["tools[1]", { ...base, tools: [WEATHER, WEATHER] }],
    [
      "tools",
      {
        ...base,
        tools: Array.from({ length: 129 }, (_, i) => ({ type: "function", function: { name: `f${i}` } })),
      },
    ],
    ["tool_choice", { ...base, tools: [WEATHER], tool_choice: "always" }],
    ["tool_choice", { ...base, tool_choice: "required" }],
    [
      "tool_choice",
      { ...base, tools: [WEATHER], tool_choice: { type: "function", function: { name: "other" } } },
    ],
    [
      "tool_choice.function.name",
      { ...base, tools: [WEATHER], tool_choice: { type: "function", function: {} } },
    ],
    ["parallel_tool_calls", { ...base, parallel_tool_calls: "no" }],
    ["functions", { ...base, functions: [WEATHER.function] }],
    ["function_call", { ...base, function_call: "auto" }],
    ["response_format", { ...base, response_format: "json" }],
    ["response_format.type", { ...base, response_format: { type: "xml" } }],
    ["response_format.json_schema", { ...base, response_format: { type: "json_schema" } }],
    [
      "response_format.json_schema.name",
      { ...base, response_format: { type: "json_schema", json_schema: { schema: {} } } },
    ],
    [
      "response_format.json_schema.schema",
      { ...base, response_format: { type: "json_schema", json_schema: { name: "x", schema: [] } } },
    ],
    ["logprobs", { ...base, logprobs: "yes" }],
    ["top_logprobs", { ...base, logprobs: true, top_logprobs: 21 }],
    ["top_logprobs", { ...base, logprobs: true, top_logprobs: 1.5 }],
    ["top_logprobs", { ...base, top_logprobs: 3 }],
    ["temperature", { ...base, temperature: 3 }],
    ["top_p", { ...base, top_p: -0.1 }],
    ["presence_penalty", { ...base, presence_penalty: 2.5 }],
    ["frequency_penalty", { ...base, frequency_penalty: "1" }],
    ["seed", { ...base, seed: 1.5 }],
    ["max_tokens", { ...base, max_tokens: 0 }],
    ["max_completion_tokens", { ...base, max_completion_tokens: 2.5 }],
    ["stop", { ...base, stop: ["a", "b", "c", "d", "e"] }],
    ["stop", { ...base, stop: [1] }],
    ["n", { ...base, n: 2 }],
    ["stream", { ...base, stream: "true" }],
    ["stream_options", { ...base, stream_options: true }],
    ["provider.sort", { ...base, provider: { sort: "cheapest" } }],
    ["provider.max_price.prompt", { ...base, provider: { max_price: { prompt: -1 } } }],
    ["provider.max_price.completion", { ...base, provider: { max_price: { completion: "0.0000001" } } }],
  ])("answers 400 naming %s", (param, body) => {
    const error = rejection(parseChatRequest, body);
    expect(error.param).toBe(param);
    expect(error.message).not.toBe("");
  });
});

describe("parseCompletionRequest", () => {
  it("sends the prompt as it is, with no messages", () => {
    const { completion, includeUsage } = parseCompletionRequest({
      model: "m",
      prompt: ["Once upon a time"],
      max_tokens: 5,
      logprobs: 2,
      stream: true,
      stream_options: { include_usage: true },
      user: "alice",
    });
    expect(completion).toMatchObject({
      model: "m",
      messages: [],
      prompt: "Once upon a time",
      maxTokens: 5,
      logprobs: { top: 2 },
      stream: true,
    });
    expect(includeUsage).toBe(true);
    expect(parseCompletionRequest({ model: "m", prompt: "x" }).completion.logprobs).toBeUndefined();
  });

  it.each([
    ["prompt", { model: "m" }],
    ["prompt", { model: "m", prompt: ["a", "b"] }],
    ["prompt", { model: "m", prompt: [1, 2, 3] }],
    ["logprobs", { model: "m", prompt: "x", logprobs: 21 }],
    ["echo", { model: "m", prompt: "x", echo: true }],
    ["suffix", { model: "m", prompt: "x", suffix: "end" }],
    ["best_of", { model: "m", prompt: "x", best_of: 3 }],
    ["n", { model: "m", prompt: "x", n: 2 }],
    ["max_tokens", { model: "m", prompt: "x", max_tokens: -1 }],
  ])("answers 400 naming %s", (param, body) => {
    expect(rejection(parseCompletionRequest, body).param).toBe(param);
  });
});

describe("parseResponsesRequest", () => {
  it("turns instructions and a string input into a conversation", () => {
    const { completion, echo } = parseResponsesRequest({
      model: "m",
      instructions: "Be brief.",
      input: "Hi",
    });
    expect(completion.messages).toEqual([
      { role: "system", content: "Be brief." },
      { role: "user", content: "Hi" },
    ]);
    expect(echo.instructions).toBe("Be brief.");
    expect(echo.tool_choice).toBe("auto");
  });

  it("turns function_call and function_call_output items into tool calls and tool messages", () => {
    const { completion } = parseResponsesRequest({
      model: "m",
      input: [
        {
          role: "user",
          content: [
            { type: "input_text", text: "Weather in " },
            { type: "input_text", text: "Lisbon?" },
          ],
        },
        { type: "function_call", call_id: "call_1", name: "get_weather", arguments: '{"city":"Lisbon"}' },
        { type: "function_call", call_id: "call_2", name: "get_time", arguments: "{}" },
        { type: "function_call_output", call_id: "call_1", output: "22 C" },
        { type: "function_call_output", call_id: "call_2", output: [{ type: "input_text", text: "noon" }] },
        {
          type: "message",
          role: "assistant",
          id: "msg_1",
          status: "completed",
          content: [{ type: "output_text", text: "Sunny.", annotations: [] }],
        },
      ],
    });
    expect(completion.messages).toEqual([
      { role: "user", content: "Weather in Lisbon?" },
      {
        role: "assistant",
        content: "",
        toolCalls: [
          { id: "call_1", name: "get_weather", arguments: '{"city":"Lisbon"}' },
          { id: "call_2", name: "get_time", arguments: "{}" },
        ],
      },
      { role: "tool", content: "22 C", toolCallId: "call_1" },
      { role: "tool", content: "noon", toolCallId: "call_2" },
      { role: "assistant", content: "Sunny." },
    ]);
  });

  it("reads function tools in the Responses format (strict unless told), text.format and max_output_tokens", () => {
    const parameters = { type: "object", properties: {} };
    const schema = { type: "object", properties: { a: { type: "string" } } };
    const { completion, echo } = parseResponsesRequest({
      model: "m",
      input: "Hi",
      tools: [
        { type: "function", name: "f", description: "F.", parameters },
        { type: "function", name: "g", parameters: null, strict: false },
      ],
      tool_choice: { type: "function", name: "g" },
      text: { format: { type: "json_schema", name: "out", schema, strict: true } },
      max_output_tokens: 64,
      top_logprobs: 3,
      store: false,
    });
    expect(completion.tools).toEqual([
      { name: "f", description: "F.", parametersJson: JSON.stringify(parameters), strict: true },
      { name: "g", description: "", parametersJson: "", strict: false },
    ]);
    expect(completion.toolChoice).toEqual({ mode: "function", functionName: "g" });
    expect(completion.responseFormat).toEqual({
      type: "json_schema",
      name: "out",
      schemaJson: JSON.stringify(schema),
      strict: true,
    });
    expect(completion.maxTokens).toBe(64);
    expect(completion.logprobs).toEqual({ top: 3 });
    expect(echo.tools).toEqual([
      { type: "function", name: "f", description: "F.", parameters, strict: true },
      { type: "function", name: "g", description: null, parameters: null, strict: false },
    ]);
  });

  it("lists input images", () => {
    const { completion } = parseResponsesRequest({
      model: "m",
      input: [
        {
          role: "user",
          content: [
            { type: "input_text", text: "What is this?" },
            { type: "input_image", image_url: "https://example.com/cat.png", detail: "auto" },
          ],
        },
      ],
    });
    expect(completion.messages).toEqual([
      { role: "user", content: "What is this?", imageUrls: ["https://example.com/cat.png"] },
    ]);
  });

  it("asks for logprobs when include names the output text's logprobs", () => {
    const { completion } = parseResponsesRequest({
      model: "m",
      input: "Hi",
      include: ["message.output_text.logprobs"],
    });
    expect(completion.logprobs).toEqual({ top: 0 });
  });

  it.each([
    ["store", { model: "m", input: "Hi", store: true }],
    ["previous_response_id", { model: "m", input: "Hi", previous_response_id: "resp_1" }],
    ["conversation", { model: "m", input: "Hi", conversation: "conv_1" }],
    ["background", { model: "m", input: "Hi", background: true }],
    ["input", { model: "m" }],
    ["input", { model: "m", input: [] }],
    ["input[0].type", { model: "m", input: [{ type: "item_reference", id: "x" }] }],
    ["input[0].role", { model: "m", input: [{ role: "tool", content: "x" }] }],
    [
      "input[0].content[0]",
      { model: "m", input: [{ role: "user", content: [{ type: "input_file", file_id: "f" }] }] },
    ],
    [
      "input[0].content[0].image_url",
      {
        model: "m",
        input: [{ role: "user", content: [{ type: "input_image", image_url: "file:///etc/passwd" }] }],
      },
    ],
    ["input[0].call_id", { model: "m", input: [{ type: "function_call_output", output: "x" }] }],
    [
      "input[0].arguments",
      { model: "m", input: [{ type: "function_call", call_id: "c", name: "f", arguments: {} }] },
    ],
    ["instructions", { model: "m", input: "Hi", instructions: ["x"] }],
    ["tools[0].type", { model: "m", input: "Hi", tools: [{ type: "web_search" }] }],
    ["tools[0].name", { model: "m", input: "Hi", tools: [{ type: "function" }] }],
    [
      "tool_choice",
      {
        model: "m",
        input: "Hi",
        tools: [{ type: "function", name: "f" }],
        tool_choice: { type: "function", name: "g" },
      },
    ],
    ["text", { model: "m", input: "Hi", text: "json" }],
    ["text.format.type", { model: "m", input: "Hi", text: { format: { type: "yaml" } } }],
    ["text.format.name", { model: "m", input: "Hi", text: { format: { type: "json_schema", schema: {} } } }],
    ["max_output_tokens", { model: "m", input: "Hi", max_output_tokens: 0 }],
    ["top_logprobs", { model: "m", input: "Hi", top_logprobs: 50 }],
    ["parallel_tool_calls", { model: "m", input: "Hi", parallel_tool_calls: 1 }],
  ])("answers 400 naming %s", (param, body) => {
    expect(rejection(parseResponsesRequest, body).param).toBe(param);
  });
});

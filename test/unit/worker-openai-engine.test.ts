import { afterEach, describe, expect, it } from "vitest";
import { collectGeneration, EngineError, type GenerateRequest } from "../../worker/engines/engine.js";
import { OpenAiEngine } from "../../worker/engines/openai-engine.js";
import {
  DEFAULT_FAKE_JSON,
  type FakeEngine,
  type FakeEngineOptions,
  fakeArgumentFragments,
  fakeLogprob,
  fakeTokens,
  fakeTopLogprobs,
  startFakeEngine,
} from "../support/fake-engine.js";

const running: FakeEngine[] = [];
afterEach(async () => {
  await Promise.all(running.splice(0).map((engine) => engine.close()));
});

async function fake(options?: FakeEngineOptions): Promise<FakeEngine> {
  const engine = await startFakeEngine(options);
  running.push(engine);
  return engine;
}

function request(overrides: Partial<GenerateRequest> = {}): GenerateRequest {
  return {
    model: "market-model",
    messages: [
      { role: "system", content: "Be brief." },
      { role: "user", content: "Say hello", name: "alice" },
    ],
    sampling: {},
    maxTokens: 0,
    signal: new AbortController().signal,
    ...overrides,
  };
}

describe("startFakeEngine", () => {
  it("serves GET /v1/models and a non-streaming completion", async () => {
    const server = await fake({ model: "m1" });
    const models = (await (await fetch(`${server.url}/models`)).json()) as { data: Array<{ id: string }> };
    expect(models.data.map((m) => m.id)).toEqual(["m1"]);
    const response = await fetch(`${server.url}/chat/completions`, {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ model: "m1", messages: [{ role: "user", content: "hi" }], max_tokens: 3 }),
    });
    const body = (await response.json()) as {
      choices: Array<{ message: { content: string }; finish_reason: string }>;
      usage: { prompt_tokens: number; completion_tokens: number };
    };
    expect(body.choices[0]?.message.content).toBe("Hello, world");
    expect(body.choices[0]?.finish_reason).toBe("length");
    expect(body.usage).toMatchObject({ prompt_tokens: 12, completion_tokens: 3 });
  });
});

describe("OpenAiEngine", () => {
  it("streams one piece per token with the engine's usage and finish reason", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces, text, result } = await collectGeneration(engine.generate(request()));
    expect(pieces).toEqual([
      { text: "Hello", tokenCount: 1 },
      { text: ",", tokenCount: 1 },
      { text: " world", tokenCount: 1 },
      { text: "!", tokenCount: 1 },
    ]);
    expect(text).toBe("Hello, world!");
    expect(result).toEqual({ finishReason: "stop", usage: { promptTokens: 12, completionTokens: 4 } });
  });

  it("sends the request the OpenAI way (stream, include_usage, sampling, model mapping)", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url, model: "engine-model" });
    await collectGeneration(
      engine.generate(
        request({
          maxTokens: 50,
          sampling: {
            temperature: 0.7,
            topP: 0.9,
            stop: ["\n\n"],
            seed: 7,
            presencePenalty: 0.1,
            frequencyPenalty: 0.2,
          },
        }),
      ),
    );
    expect(server.requests).toHaveLength(1);
    expect(server.requests[0]).toEqual({
      model: "engine-model",
      messages: [
        { role: "system", content: "Be brief." },
        { role: "user", content: "Say hello", name: "alice" },
      ],
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: 50,
      temperature: 0.7,
      top_p: 0.9,
      stop: ["\n\n"],
      seed: 7,
      presence_penalty: 0.1,
      frequency_penalty: 0.2,
    });
  });

  it("uses the job's model name when no engine model is configured, and omits unset sampling", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    await collectGeneration(engine.generate(request()));
    const body = server.requests[0] as Record<string, unknown>;
    expect(body.model).toBe("market-model");
    for (const key of ["max_tokens", "temperature", "top_p", "stop", "seed"])
      expect(body).not.toHaveProperty(key);
  });

  it("stops at max_tokens with finish reason 'length'", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { text, pieces, result } = await collectGeneration(engine.generate(request({ maxTokens: 2 })));
    expect(text).toBe("Hello,");
    expect(pieces).toHaveLength(2);
    expect(result).toEqual({ finishReason: "length", usage: { promptTokens: 12, completionTokens: 2 } });
  });

  it("enforces max_tokens itself when the engine ignores it", async () => {
    const server = await fake({ ignoreMaxTokens: true });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { text, result } = await collectGeneration(engine.generate(request({ maxTokens: 3 })));
    expect(text).toBe("Hello, world");
    expect(result.finishReason).toBe("length");
  });

  it("returns 'cancelled' when the job is aborted mid-stream, and closes the request", async () => {
    const server = await fake({ hang: true });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const controller = new AbortController();
    const generation = engine.generate(request({ signal: controller.signal }));
    const first = await generation.next();
    expect(first).toEqual({ done: false, value: { text: "Hello", tokenCount: 1 } });
    controller.abort();
    const last = await generation.next();
    expect(last).toEqual({ done: true, value: { finishReason: "cancelled" } });
    expect(await server.requestClosed(0)).toEqual({ aborted: true });
  });

  it("aborts the HTTP request as soon as the job's signal aborts, while the reader is paused", async () => {
    // A job waiting for its flow-control window does not pull the generation: the abort alone
    // must reach the engine's HTTP request (the SDK was given the signal).
    const server = await fake({ tokens: ["a", "b", "c"], hang: true });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const controller = new AbortController();
    const generation = engine.generate(request({ signal: controller.signal }));
    expect(await generation.next()).toEqual({ done: false, value: { text: "a", tokenCount: 1 } });
    controller.abort(new Error("consumer disconnected"));
    expect(await server.requestClosed(0)).toEqual({ aborted: true });
    expect(await generation.next()).toEqual({ done: true, value: { finishReason: "cancelled" } });
  });

  it("returns 'cancelled' at once for an already aborted signal", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const controller = new AbortController();
    controller.abort();
    const { pieces, result } = await collectGeneration(
      engine.generate(request({ signal: controller.signal })),
    );
    expect(pieces).toEqual([]);
    expect(result.finishReason).toBe("cancelled");
    expect(server.requests).toHaveLength(0);
  });

  it.each([
    [400, "invalid_input"],
    [404, "model_unavailable"],
    [503, "overloaded"],
    [500, "engine_error"],
  ])("maps HTTP %i to EngineError %s", async (status, code) => {
    const server = await fake({ failWith: { status, message: "nope" } });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const error = await collectGeneration(engine.generate(request())).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EngineError);
    expect((error as EngineError).code).toBe(code);
    expect((error as EngineError).message).toContain("nope");
  });

  it("reports an unreachable engine as an engine error", async () => {
    const server = await fake();
    const url = server.url;
    await server.close();
    running.splice(0);
    const engine = new OpenAiEngine({ baseUrl: url });
    const error = await collectGeneration(engine.generate(request())).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EngineError);
    expect((error as EngineError).code).toBe("engine_error");
    expect((error as EngineError).message).toContain("unreachable");
  });
});

const WEATHER_TOOL = {
  name: "get_weather",
  description: "The weather in a city.",
  parameters: { type: "object", properties: { city: { type: "string" } }, required: ["city"] },
  strict: false,
};
const WEATHER_ARGUMENTS = '{"city":"Lisbon","unit":"celsius"}';

async function post(server: FakeEngine, path: string, body: object): Promise<Record<string, unknown>> {
  const response = await fetch(`${server.url}${path}`, {
    method: "POST",
    headers: { "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  return (await response.json()) as Record<string, unknown>;
}

describe("startFakeEngine beyond plain chat", () => {
  it("answers a non-streamed request with tools with one whole tool call", async () => {
    const server = await fake({ toolCall: { arguments: WEATHER_ARGUMENTS } });
    const body = await post(server, "/chat/completions", {
      model: "m",
      messages: [{ role: "user", content: "Weather?" }],
      tools: [{ type: "function", function: { name: "get_weather", parameters: {} } }],
    });
    expect(body.choices).toEqual([
      {
        index: 0,
        message: {
          role: "assistant",
          content: null,
          tool_calls: [
            {
              id: "call_0",
              type: "function",
              function: { name: "get_weather", arguments: WEATHER_ARGUMENTS },
            },
          ],
        },
        finish_reason: "tool_calls",
        logprobs: null,
      },
    ]);
    expect(body.usage).toMatchObject({ completion_tokens: 4 });
  });

  it("answers a non-streamed legacy completion, with logprobs in the legacy shape", async () => {
    const server = await fake({ tokens: ["a", "b"] });
    const body = await post(server, "/completions", { model: "m", prompt: "xy", logprobs: 1 });
    expect(body).toMatchObject({
      object: "text_completion",
      choices: [
        {
          index: 0,
          text: "ab",
          finish_reason: "stop",
          logprobs: {
            tokens: ["a", "b"],
            token_logprobs: [fakeLogprob(0), fakeLogprob(1)],
            top_logprobs: [{ a: fakeLogprob(0) }, { b: fakeLogprob(1) }],
            text_offset: [2, 3],
          },
        },
      ],
      usage: { prompt_tokens: 12, completion_tokens: 2, total_tokens: 14 },
    });
  });
});

describe("OpenAiEngine with tools, response formats and logprobs", () => {
  it("passes tools, tool_choice and parallel_tool_calls, and maps tool-call deltas over several chunks exactly", async () => {
    const server = await fake({ toolCall: { arguments: WEATHER_ARGUMENTS }, toolCallFragments: 4 });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces, result } = await collectGeneration(
      engine.generate(
        request({
          tools: [WEATHER_TOOL],
          toolChoice: { mode: "auto" },
          parallelToolCalls: false,
          maxTokens: 20,
        }),
      ),
    );
    const fragments = fakeArgumentFragments(WEATHER_ARGUMENTS, 4);
    expect(fragments).toHaveLength(4);
    expect(pieces).toEqual([
      {
        text: "",
        tokenCount: 1,
        toolCalls: [{ index: 0, id: "call_0", name: "get_weather", arguments: "" }],
      },
      ...fragments.map((fragment) => ({
        text: "",
        tokenCount: 1,
        toolCalls: [{ index: 0, arguments: fragment }],
      })),
    ]);
    expect(result).toEqual({ finishReason: "tool_calls", usage: { promptTokens: 12, completionTokens: 5 } });
    expect(server.requests[0]).toMatchObject({
      tools: [
        {
          type: "function",
          function: {
            name: "get_weather",
            description: WEATHER_TOOL.description,
            parameters: WEATHER_TOOL.parameters,
          },
        },
      ],
      tool_choice: "auto",
      parallel_tool_calls: false,
    });
    // `strict: false` is the default: it is not sent to engines that may not know it.
    expect((server.requests[0] as { tools: { function: object }[] }).tools[0]?.function).not.toHaveProperty(
      "strict",
    );
  });

  it("forces a named function with tool_choice, sending strict tools as given", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const other = { name: "get_time", description: "", strict: true };
    const { pieces } = await collectGeneration(
      engine.generate(
        request({ tools: [WEATHER_TOOL, other], toolChoice: { mode: "function", functionName: "get_time" } }),
      ),
    );
    expect(pieces[0]?.toolCalls).toEqual([{ index: 0, id: "call_0", name: "get_time", arguments: "" }]);
    expect(server.requests[0]).toMatchObject({
      tools: [
        { function: { name: "get_weather" } },
        { type: "function", function: { name: "get_time", strict: true } },
      ],
      tool_choice: { type: "function", function: { name: "get_time" } },
    });
  });

  it("sends a conversation with tool calls, tool results and images the OpenAI way", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces, text, result } = await collectGeneration(
      engine.generate(
        request({
          tools: [WEATHER_TOOL],
          messages: [
            { role: "user", content: "Weather here?", imageUrls: ["data:image/png;base64,AAAA"] },
            {
              role: "assistant",
              content: "",
              toolCalls: [{ id: "call_9", name: "get_weather", arguments: "{}" }],
            },
            { role: "tool", content: "21 °C", toolCallId: "call_9" },
          ],
        }),
      ),
    );
    expect(server.requests[0]).toMatchObject({
      messages: [
        {
          role: "user",
          content: [
            { type: "text", text: "Weather here?" },
            { type: "image_url", image_url: { url: "data:image/png;base64,AAAA" } },
          ],
        },
        {
          role: "assistant",
          content: null,
          tool_calls: [
            { id: "call_9", type: "function", function: { name: "get_weather", arguments: "{}" } },
          ],
        },
        { role: "tool", content: "21 °C", tool_call_id: "call_9" },
      ],
    });
    expect(text).toBe("The answer is 21 °C.");
    expect(pieces.map((p) => p.text)).toEqual(fakeTokens("The answer is 21 °C."));
    expect(result.finishReason).toBe("stop");
  });

  it("maps each token's logprobs and its top alternatives exactly", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces } = await collectGeneration(engine.generate(request({ logprobs: { top: 2 } })));
    expect(pieces).toEqual(
      ["Hello", ",", " world", "!"].map((token, i) => ({
        text: token,
        tokenCount: 1,
        logprobs: [{ token, logprob: fakeLogprob(i), topLogprobs: fakeTopLogprobs(token, i, 2) }],
      })),
    );
    expect(pieces[1]?.logprobs?.[0]?.topLogprobs).toEqual([
      { token: ",", logprob: -0.2 },
      { token: ",~1", logprob: -1.2 },
    ]);
    expect(server.requests[0]).toMatchObject({ logprobs: true, top_logprobs: 2 });
  });

  it("asks for logprobs without alternatives when top is 0", async () => {
    const server = await fake({ tokens: ["x"] });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces } = await collectGeneration(engine.generate(request({ logprobs: { top: 0 } })));
    expect(pieces).toEqual([
      { text: "x", tokenCount: 1, logprobs: [{ token: "x", logprob: -0.1, topLogprobs: [] }] },
    ]);
    expect(server.requests[0]).toMatchObject({ logprobs: true });
    expect(server.requests[0]).not.toHaveProperty("top_logprobs");
  });

  it("passes response_format json_schema and json_object through", async () => {
    const server = await fake({ jsonText: '{"city":"Lisbon"}' });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const schema = { type: "object", properties: { city: { type: "string" } }, required: ["city"] };
    const { text } = await collectGeneration(
      engine.generate(
        request({ responseFormat: { type: "json_schema", name: "place", schema, strict: true } }),
      ),
    );
    expect(text).toBe('{"city":"Lisbon"}');
    expect(server.requests[0]).toMatchObject({
      response_format: { type: "json_schema", json_schema: { name: "place", schema, strict: true } },
    });
    const other = await fake();
    const plain = new OpenAiEngine({ baseUrl: other.url });
    const { pieces } = await collectGeneration(
      plain.generate(request({ responseFormat: { type: "json_object" } })),
    );
    expect(pieces.map((p) => p.text)).toEqual(fakeTokens(DEFAULT_FAKE_JSON));
    expect(other.requests[0]).toMatchObject({ response_format: { type: "json_object" } });
  });

  it("runs a raw prompt as a streamed legacy completion, with usage and max_tokens", async () => {
    const server = await fake();
    const engine = new OpenAiEngine({ baseUrl: server.url, model: "engine-model" });
    const { pieces, result } = await collectGeneration(
      engine.generate(
        request({ messages: [], prompt: "Once upon a time", maxTokens: 3, sampling: { temperature: 0 } }),
      ),
    );
    expect(pieces).toEqual([
      { text: "Hello", tokenCount: 1 },
      { text: ",", tokenCount: 1 },
      { text: " world", tokenCount: 1 },
    ]);
    expect(result).toEqual({ finishReason: "length", usage: { promptTokens: 12, completionTokens: 3 } });
    expect(server.requests[0]).toEqual({
      model: "engine-model",
      prompt: "Once upon a time",
      stream: true,
      stream_options: { include_usage: true },
      max_tokens: 3,
      temperature: 0,
    });
  });

  it("maps a legacy completion's logprobs (tokens, token_logprobs, top_logprobs), most likely first", async () => {
    const server = await fake({ tokens: ["Once", " more"] });
    const engine = new OpenAiEngine({ baseUrl: server.url });
    const { pieces, result } = await collectGeneration(
      engine.generate(request({ messages: [], prompt: "Again:", logprobs: { top: 3 } })),
    );
    expect(pieces).toEqual(
      ["Once", " more"].map((token, i) => ({
        text: token,
        tokenCount: 1,
        logprobs: [{ token, logprob: fakeLogprob(i), topLogprobs: fakeTopLogprobs(token, i, 3) }],
      })),
    );
    expect(result).toEqual({ finishReason: "stop", usage: { promptTokens: 12, completionTokens: 2 } });
    expect(server.requests[0]).toMatchObject({ prompt: "Again:", logprobs: 3 });
  });
});

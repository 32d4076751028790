import { afterEach, describe, expect, it } from "vitest";
import { collectGeneration, EngineError, type GenerateRequest } from "../../worker/engines/engine.js";
import { OpenAiEngine } from "../../worker/engines/openai-engine.js";
import { type FakeEngine, type FakeEngineOptions, startFakeEngine } from "../support/fake-engine.js";

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

/**
 * The openai engine's HTTP read path (EngineStream in worker/engines/openai-engine.ts), against a
 * scripted `node:http` server: kept-alive connections, the one retry of a connection the engine
 * closed while idle, SSE framing split across reads, and in-band errors.
 */
import { once } from "node:events";
import { createServer, type IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it } from "vitest";
import { collectGeneration, EngineError, type GenerateRequest } from "../../worker/engines/engine.js";
import { OpenAiEngine } from "../../worker/engines/openai-engine.js";

interface Scripted {
  url: string;
  /** TCP connections the server accepted. */
  connections: number;
  /** Requests that reached the handler, in order, with the connection's number. */
  requests: { connection: number; path: string }[];
  server: Server;
}

const servers: Server[] = [];
const engines: OpenAiEngine[] = [];
afterEach(async () => {
  await Promise.all(engines.splice(0).map((engine) => engine.close()));
  for (const server of servers.splice(0)) {
    server.closeAllConnections();
    server.close();
  }
});

async function scripted(
  handler: (
    req: IncomingMessage,
    res: ServerResponse,
    request: { connection: number; index: number },
  ) => void,
): Promise<Scripted> {
  const state: Scripted = { url: "", connections: 0, requests: [], server: createServer() };
  const ids = new WeakMap<object, number>();
  state.server.on("connection", (socket) => {
    state.connections += 1;
    ids.set(socket, state.connections);
  });
  state.server.on("request", (req: IncomingMessage, res: ServerResponse) => {
    req.resume();
    req.on("end", () => {
      const connection = ids.get(req.socket) ?? 0;
      state.requests.push({ connection, path: req.url ?? "" });
      handler(req, res, { connection, index: state.requests.length - 1 });
    });
  });
  state.server.listen(0, "127.0.0.1");
  await once(state.server, "listening");
  servers.push(state.server);
  state.url = `http://127.0.0.1:${(state.server.address() as AddressInfo).port}/v1`;
  return state;
}

function engineFor(server: Scripted): OpenAiEngine {
  const engine = new OpenAiEngine({ baseUrl: server.url });
  engines.push(engine);
  return engine;
}

function request(): GenerateRequest {
  return {
    model: "m",
    messages: [{ role: "user", content: "hi" }],
    sampling: {},
    maxTokens: 0,
    signal: new AbortController().signal,
  };
}

const delta = (content: string) =>
  `data: ${JSON.stringify({ choices: [{ index: 0, delta: { content }, finish_reason: null }] })}\n\n`;
const STOP = `data: ${JSON.stringify({ choices: [{ index: 0, delta: {}, finish_reason: "stop" }] })}\n\n`;

function answer(res: ServerResponse, tokens: string[]): void {
  res.writeHead(200, { "content-type": "text/event-stream" });
  res.end(`${tokens.map(delta).join("")}${STOP}data: [DONE]\n\n`);
}

describe("OpenAiEngine's HTTP read path", () => {
  it("sends consecutive jobs over one kept-alive connection", async () => {
    const server = await scripted((_req, res) => answer(res, ["a", "b"]));
    const engine = engineFor(server);
    for (let i = 0; i < 3; i++) {
      const { text, result } = await collectGeneration(engine.generate(request()));
      expect(text).toBe("ab");
      expect(result.finishReason).toBe("stop");
    }
    expect(server.requests.map((r) => r.connection)).toEqual([1, 1, 1]);
    expect(server.requests[0]?.path).toBe("/v1/chat/completions");
    expect(server.connections).toBe(1);
  });

  it("retries once on a new connection when the engine drops a kept-alive one as it is reused", async () => {
    const server = await scripted((req, res, { index }) => {
      // The second request arrives on the idle connection: the engine closes it without answering.
      if (index === 1) req.socket.destroy();
      else answer(res, ["x"]);
    });
    const engine = engineFor(server);
    expect((await collectGeneration(engine.generate(request()))).text).toBe("x");
    const { text, result } = await collectGeneration(engine.generate(request()));
    expect(text).toBe("x");
    expect(result.finishReason).toBe("stop");
    expect(server.requests.map((r) => r.connection)).toEqual([1, 1, 2]);
  });

  it("does not retry a fresh connection that fails: the job fails as an engine error", async () => {
    const server = await scripted((req) => req.socket.destroy());
    const engine = engineFor(server);
    const error = await collectGeneration(engine.generate(request())).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EngineError);
    expect((error as EngineError).code).toBe("engine_error");
    expect(server.requests).toHaveLength(1);
  });

  it("parses events split anywhere across reads: CRLF line ends, a character cut in two", async () => {
    const body = Buffer.from(
      `${delta("héllo").replace(/\n/g, "\r\n")}: a comment\r\n\r\n${delta(" 世界")}${STOP}data: [DONE]\r\n\r\n`,
    );
    const server = await scripted((_req, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      // One byte per write, each flushed on its own: every boundary is a read boundary somewhere.
      let i = 0;
      const next = () => {
        if (i >= body.length) {
          res.end();
          return;
        }
        res.write(body.subarray(i, i + 1), () => setImmediate(next));
        i += 1;
      };
      next();
    });
    const engine = engineFor(server);
    const { pieces, result } = await collectGeneration(engine.generate(request()));
    expect(pieces).toEqual([
      { text: "héllo", tokenCount: 1 },
      { text: " 世界", tokenCount: 1 },
    ]);
    expect(result.finishReason).toBe("stop");
  });

  it("fails the job with the engine's message on an in-band error event", async () => {
    const server = await scripted((_req, res) => {
      res.writeHead(200, { "content-type": "text/event-stream" });
      res.end(`${delta("a")}data: {"error":{"message":"the model crashed"}}\n\n`);
    });
    const engine = engineFor(server);
    const error = await collectGeneration(engine.generate(request())).catch((e: unknown) => e);
    expect(error).toBeInstanceOf(EngineError);
    expect((error as EngineError).code).toBe("engine_error");
    expect((error as EngineError).message).toContain("the model crashed");
  });
});

/**
 * Timeouts where attackers live, against a real control plane with short limits: HTTP sockets that
 * send a request slowly (slowloris), send nothing, or idle after a response are closed by the
 * server; a streamed answer that outlives the request timeout is not cut; a worker stream that
 * never says Hello ends with DEADLINE_EXCEEDED; a gRPC connection that opens no stream is closed.
 * Every wait is on an event (a socket's 'close', a stream's end), never on a clock.
 */
import { once } from "node:events";
import http2 from "node:http2";
import { connect, type Socket } from "node:net";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createWritableIterable } from "@connectrpc/connect/protocol";
import { createGrpcTransport } from "@connectrpc/connect-node";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { type ConnectRequest, WorkerService } from "../../gen/locallmarket/v1/worker_pb.js";
import { parseServerConfig, serverHelp } from "../../server/config.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { startTestMarket, type TestMarket } from "../support/market.js";

const SLOW_MODEL = "slow-model";

/** Opens a raw TCP connection to the HTTP port; `closed` resolves with everything the server sent. */
async function rawSocket(httpUrl: string): Promise<{ socket: Socket; closed: Promise<string> }> {
  const url = new URL(httpUrl);
  const socket = connect(Number(url.port), url.hostname);
  let received = "";
  socket.on("data", (data: Buffer) => {
    received += data.toString();
  });
  // A reset counts as closed too: either way the server let go.
  socket.on("error", () => {});
  const closed = once(socket, "close").then(() => received);
  await once(socket, "connect");
  return { socket, closed };
}

describe("timeouts where attackers live", () => {
  let market: TestMarket;
  let engine: FakeEngine;
  let openGate: () => void = () => {};

  beforeAll(async () => {
    market = await startTestMarket({
      httpHeadersTimeoutMs: 1_000,
      httpRequestTimeoutMs: 2_000,
      httpKeepAliveTimeoutMs: 1_000,
      helloTimeoutMs: 1_000,
    });
    engine = await startFakeEngine({
      model: SLOW_MODEL,
      gate: new Promise<void>((resolve) => {
        openGate = resolve;
      }),
    });
  });

  afterAll(async () => {
    openGate();
    await market?.close();
    await engine?.close();
  });

  it("has explicit, documented defaults that close a slowloris socket within 30 s", () => {
    const defaults = parseServerConfig([], {});
    expect(defaults).toMatchObject({
      helloTimeoutMs: 10_000,
      httpHeadersTimeoutMs: 10_000,
      httpRequestTimeoutMs: 25_000,
      httpKeepAliveTimeoutMs: 5_000,
      maxConnections: 10_000,
    });
    expect(defaults.httpIdleTimeoutMs).toBeGreaterThanOrEqual(
      defaults.queueTimeoutMs + defaults.jobTimeoutMs,
    );
    const help = serverHelp();
    for (const flag of [
      "--hello-timeout",
      "--http-headers-timeout",
      "--http-request-timeout",
      "--http-keep-alive-timeout",
      "--http-idle-timeout",
      "--max-connections",
    ]) {
      expect(help).toContain(flag);
    }
  });

  it("closes a socket that sends part of its headers and stops", async () => {
    const { socket, closed } = await rawSocket(market.plane.httpUrl);
    socket.write("POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: appl");
    expect(await closed).toMatch(/^HTTP\/1\.1 408 /);
  });

  it("closes a socket that sends nothing at all", async () => {
    const { closed } = await rawSocket(market.plane.httpUrl);
    expect(await closed).toMatch(/^HTTP\/1\.1 408 /);
  });

  it("closes a kept-alive socket that starts no new request", async () => {
    const { socket, closed } = await rawSocket(market.plane.httpUrl);
    socket.write("GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n");
    const received = await closed;
    expect(received).toMatch(/^HTTP\/1\.1 200 /);
    expect(received).toMatch(/keep-alive/i);
  });

  it("closes a socket that sends one body byte and stops, but never cuts a streamed answer", async () => {
    const provider = await market.account("slow-provider");
    const consumer = await market.account("patient-consumer", 10);
    await market.worker({
      accountId: provider.accountId,
      model: SLOW_MODEL,
      priceIn: "1",
      priceOut: "1",
      tps: 1000,
      engine: ["--engine", "openai", "--engine-url", engine.url],
    });
    // The consumer's request is fully received once it reaches the engine, which holds the answer.
    const answer = (async () => {
      const stream = await market.openai(consumer.apiKey).chat.completions.create({
        model: SLOW_MODEL,
        messages: [{ role: "user", content: "Take your time." }],
        stream: true,
      });
      let text = "";
      for await (const chunk of stream) text += chunk.choices[0]?.delta?.content ?? "";
      return text;
    })();
    await engine.requestArrived(0);

    // Started after the stream's request: by the time it is cut, the stream is older than the
    // request timeout, and would have been cut first if the timeout covered responses.
    const { socket, closed } = await rawSocket(market.plane.httpUrl);
    socket.write(
      "POST /v1/chat/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{",
    );
    expect(await closed).toMatch(/^HTTP\/1\.1 408 /);

    openGate();
    expect(await answer).toBe("Hello, world!");
  }, 120_000);

  it("ends a worker stream that sends no Hello with DEADLINE_EXCEEDED", async () => {
    const client = createClient(WorkerService, createGrpcTransport({ baseUrl: market.plane.grpcUrl }));
    // A request stream that stays open and never carries a message, until the test hangs up.
    const nothing = createWritableIterable<ConnectRequest>();
    const outcome = await (async () => {
      const received: unknown[] = [];
      for await (const message of client.connect(nothing)) received.push(message);
      return received;
    })().catch((error: unknown) => error);
    nothing.close();

    expect(outcome).toBeInstanceOf(ConnectError);
    expect((outcome as ConnectError).code).toBe(Code.DeadlineExceeded);
    expect((outcome as ConnectError).rawMessage).toMatch(/Hello/);
  });

  it("closes a gRPC connection that opens no stream", async () => {
    const session = http2.connect(market.plane.grpcUrl);
    session.on("error", () => {});
    await once(session, "connect");
    await once(session, "close");
    expect(session.destroyed).toBe(true);
  });
});

/**
 * The SSE writer coalesces the events of one event-loop turn into one socket write, never holds a
 * lone event past its turn, and reports a mark as written (what billing counts as delivered) only
 * once the text written before it was handed to the socket, after a drain when the socket is full.
 * On a real node:http server and client.
 */
import { createServer, type IncomingMessage, request, type Server, type ServerResponse } from "node:http";
import type { AddressInfo } from "node:net";
import { afterEach, describe, expect, it, vi } from "vitest";
import { SseWriter } from "../../server/http/sse.js";

interface Harness {
  writer: SseWriter;
  raw: ServerResponse;
  /** Calls of raw.write so far (each one a socket write of its own). */
  writes: string[];
  written: number[];
  answer: IncomingMessage;
}

let server: Server | undefined;

afterEach(async () => {
  server?.closeAllConnections();
  await new Promise<void>((resolve) => (server ? server.close(() => resolve()) : resolve()));
  server = undefined;
});

async function harness(): Promise<Harness> {
  let resolveRaw!: (raw: ServerResponse) => void;
  const rawPromise = new Promise<ServerResponse>((resolve) => {
    resolveRaw = resolve;
  });
  server = createServer((_req, res) => resolveRaw(res));
  await new Promise<void>((resolve) => server?.listen(0, "127.0.0.1", resolve));
  const { port } = server.address() as AddressInfo;
  const answerPromise = new Promise<IncomingMessage>((resolve, reject) => {
    const req = request({ host: "127.0.0.1", port, method: "GET", path: "/" }, resolve);
    req.on("error", reject);
    req.end();
  });
  const raw = await rawPromise;
  const writes: string[] = [];
  const write = raw.write.bind(raw) as (chunk: string) => boolean;
  raw.write = ((chunk: string) => {
    writes.push(chunk);
    return write(chunk);
  }) as typeof raw.write;
  const written: number[] = [];
  const writer = new SseWriter(raw, {
    headers: {},
    slowReaderTimeoutMs: 30_000,
    onWritten: (mark) => written.push(mark),
  });
  writer.commit();
  // The writer sends its headers with its first write; the client needs them before the tests.
  raw.flushHeaders();
  const answer = await answerPromise;
  return { writer, raw, writes, written, answer };
}

const nextTurn = () => new Promise<void>((resolve) => setImmediate(resolve));

describe("SseWriter", () => {
  it("writes the events of one turn in one socket write, and reports the mark only after it", async () => {
    const { writer, writes, written } = await harness();
    await writer.dataJson('{"n":1}');
    await writer.dataJson('{"n":2}');
    await writer.dataJson('{"n":3}');
    writer.processed(3);
    // Nothing reached the socket yet, so nothing counts as delivered.
    expect(writes).toEqual([]);
    expect(written).toEqual([]);
    await nextTurn();
    expect(writes).toEqual(['data: {"n":1}\n\ndata: {"n":2}\n\ndata: {"n":3}\n\n']);
    expect(written).toEqual([3]);
  });

  it("writes a lone event at the end of its turn, and confirms a mark at once when nothing waits", async () => {
    const { writer, writes, written } = await harness();
    await writer.dataJson('{"n":1}');
    await nextTurn();
    expect(writes).toEqual(['data: {"n":1}\n\n']);
    writer.processed(1);
    expect(written).toEqual([1]);
  });

  it("confirms what a full socket took only once it drains, and makes the next write wait for that", async () => {
    const { writer, writes, written, answer } = await harness();
    answer.pause();
    // Far more than the socket buffers take: the write is flushed at once and fills the socket.
    const big = `"${"x".repeat(8 << 20)}"`;
    const blocked = writer.dataJson(big);
    writer.processed(1);
    expect(writes).toHaveLength(1);
    let drained = false;
    void blocked.then(() => {
      drained = true;
    });
    await nextTurn();
    expect(written).toEqual([]);
    expect(drained).toBe(false);
    answer.resume();
    answer.on("data", () => {});
    await vi.waitFor(() => expect(written).toEqual([1]), { timeout: 20_000 });
    await blocked;
    expect(drained).toBe(true);
  });
});

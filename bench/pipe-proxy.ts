/**
 * A minimal HTTP relay hop for the pipe benchmark: a node:http server that forwards every request to
 * one upstream origin and pipes the answer's bytes back unchanged (no parsing, no buffering of the
 * answer; the small request body is kept until sent, for one retry on a stale kept-alive
 * connection). Two in a chain are the floor for the platform's two relay hops. Started by
 * bench/pipe.ts; prints one JSON line `{"url": ...}` once listening and exits on SIGTERM or when
 * its stdin closes.
 *
 * Arguments: --upstream ORIGIN (e.g. http://127.0.0.1:4000).
 */
import { Agent, createServer, request } from "node:http";
import type { AddressInfo } from "node:net";
import { parseArgs } from "node:util";

const { values } = parseArgs({ options: { upstream: { type: "string" } } });
if (!values.upstream) throw new Error("--upstream is required");
const upstream = new URL(values.upstream);
// Kept-alive connections upstream, as a real relay would hold them.
const agent = new Agent({ keepAlive: true, maxSockets: Number.POSITIVE_INFINITY });

const server = createServer((req, res) => {
  // The request body (a small JSON document) is kept, so that a request sent on a kept-alive
  // connection the upstream closed just then can be sent again on a new one, as any HTTP client
  // or relay does (the platform's worker too): without it a busy machine fails streams now and
  // then with ECONNRESET, which measures the race, not the relay.
  const body: Buffer[] = [];
  req.on("data", (data: Buffer) => body.push(data));
  req.on("end", () => send(true));
  const send = (mayRetry: boolean) => {
    const forward = request(
      {
        agent,
        host: upstream.hostname,
        port: upstream.port,
        method: req.method,
        path: req.url,
        headers: { ...req.headers, host: upstream.host },
      },
      (answer) => {
        res.writeHead(answer.statusCode ?? 502, answer.headers);
        answer.pipe(res);
      },
    );
    forward.on("error", (error: NodeJS.ErrnoException) => {
      if (mayRetry && forward.reusedSocket && error.code === "ECONNRESET" && !res.headersSent) {
        send(false);
        return;
      }
      if (!res.headersSent) res.writeHead(502);
      res.end(String(error));
    });
    forward.end(Buffer.concat(body));
  };
});
server.keepAliveTimeout = 60_000;
server.listen(0, "127.0.0.1", () => {
  const { port } = server.address() as AddressInfo;
  process.stdout.write(`${JSON.stringify({ url: `http://127.0.0.1:${port}` })}\n`);
});
const stop = () => {
  server.closeAllConnections();
  server.close(() => process.exit(0));
};
process.on("SIGTERM", stop);
process.stdin.on("end", stop);
process.stdin.resume();

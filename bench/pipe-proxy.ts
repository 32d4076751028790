/**
 * A minimal HTTP relay hop for the pipe benchmark: a node:http server that forwards every request to
 * one upstream origin and pipes the answer's bytes back unchanged (no parsing, no buffering). Two in
 * a chain are the floor for the platform's two relay hops. Started by bench/pipe.ts; prints one
 * JSON line `{"url": ...}` once listening and exits on SIGTERM or when its stdin closes.
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
  forward.on("error", (error) => {
    if (!res.headersSent) res.writeHead(502);
    res.end(String(error));
  });
  req.pipe(forward);
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

/**
 * The embedded database's thread: PGlite runs here, off the server's main thread, so relaying and
 * the database use two cores. It serves PostgreSQL's wire protocol on the unix socket it is given
 * (one connection, as PGlite is a single session) until the main thread asks it to close.
 *
 * Started by `embedded-database.ts`; imports nothing of ours, so it loads quickly (and under tsx,
 * compiles almost nothing). Errors end the thread and reach the main thread as its `error` event.
 * Run as a child process instead, it creates a fresh data dir (see createDataDir).
 */
import { type MessagePort, parentPort, workerData } from "node:worker_threads";
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";

export interface EmbeddedThreadData {
  pgdata: string;
  /** Where to listen; the directory exists and only this user may enter it. */
  socketPath: string;
  /** PGlite's WebAssembly, compiled by the main thread (see embedded-database.ts); else PGlite compiles it. */
  wasmModule?: CompiledWasm;
}

/** A WebAssembly.Module (whose type TypeScript declares only with the DOM library). */
export type CompiledWasm = object;

/** Thread → main thread. */
export type EmbeddedThreadMessage = { type: "ready" } | { type: "closed" };
/** Main thread → thread. */
export type EmbeddedThreadCommand = { type: "close" };

/**
 * PostgreSQL's default 128 MB of shared buffers would all become resident WASM memory; the
 * market's working set is small and the operating system caches the data files behind PGlite.
 * This keeps the server's RSS well under 300 MB.
 */
const SETTINGS = ["-c", "shared_buffers=16MB"];

const openPGlite = (pgdata: string, wasmModule?: CompiledWasm) =>
  PGlite.create(pgdata, {
    startParams: [...PGlite.defaultStartParams, ...SETTINGS],
    ...(wasmModule ? { wasmModule } : {}),
  });

if (parentPort) {
  await serve(parentPort, workerData as EmbeddedThreadData);
} else {
  await createDataDir(process.argv[2]);
}

async function serve(port: MessagePort, data: EmbeddedThreadData): Promise<void> {
  const pglite = await openPGlite(data.pgdata, data.wasmModule);
  const server = new PGLiteSocketServer({ db: pglite, path: data.socketPath, maxConnections: 1 });
  try {
    await server.start();
  } catch (error) {
    await pglite.close().catch(() => {});
    throw error;
  }
  port.on("message", (command: EmbeddedThreadCommand) => {
    if (command.type !== "close") return;
    void (async () => {
      await server.stop();
      // PGlite writes its last pages and ends its session; only then may the data dir be unlocked.
      await pglite.close();
      port.postMessage({ type: "closed" } satisfies EmbeddedThreadMessage);
      // With the port closed and the socket server stopped, nothing keeps the thread alive.
      port.close();
    })();
  });
  port.postMessage({ type: "ready" } satisfies EmbeddedThreadMessage);
}

/**
 * Run as a child process (`node embedded-thread.js <pgdata>`): creates a fresh data dir and exits.
 * initdb leaves hundreds of MB behind in the process that ran it, which only its exit gives back.
 * The server that started it holds the data dir's lock: when that server dies (its end of stdin
 * closes), this stops rather than write on into a dir another server may take over.
 */
async function createDataDir(pgdata: string | undefined): Promise<void> {
  if (!pgdata) {
    process.stderr.write("usage: embedded-thread.js <pgdata>, run by the server on a fresh data dir\n");
    process.exit(2);
  }
  process.stdin.on("close", () => process.exit(1));
  process.stdin.resume();
  try {
    const pglite = await openPGlite(pgdata);
    await pglite.close();
  } catch (error) {
    process.stderr.write(`${error instanceof Error ? error.message : String(error)}\n`);
    process.exit(1);
  }
  process.exit(0);
}

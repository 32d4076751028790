/**
 * Runs the embedded database (PGlite, see embedded-thread.ts) in a worker thread, so the relay on
 * the main thread and the database's WASM use two cores. The main thread reaches it as before,
 * with MikroORM's PostgreSQL driver on the thread's unix socket.
 * A fresh data dir is created first by a short-lived child process running the same entry.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { readFile } from "node:fs/promises";
import { createRequire } from "node:module";
import { fileURLToPath, pathToFileURL } from "node:url";
import { Worker } from "node:worker_threads";
import type {
  CompiledWasm,
  EmbeddedThreadCommand,
  EmbeddedThreadData,
  EmbeddedThreadMessage,
} from "./embedded-thread.js";

/** How long the thread may take to write its last pages and close before it is terminated. */
const CLOSE_TIMEOUT_MS = 30_000;

/** The thread ended without being asked to: the database is gone and the server cannot go on. */
export class EmbeddedDatabaseCrashedError extends Error {
  constructor(reason: string) {
    super(`the embedded database (PGlite) thread stopped unexpectedly: ${reason}`);
    this.name = "EmbeddedDatabaseCrashedError";
  }
}

export interface EmbeddedThread {
  /** The worker thread; tests end it to play a crash. */
  readonly worker: Worker;
  /** Closes PGlite (its last pages written) and waits for the thread to end. Idempotent. */
  close(): Promise<void>;
}

/**
 * Creates a fresh data dir in a child process, whose exit gives back the memory initdb leaves
 * behind (hundreds of MB that a thread's end does not return to the system).
 */
export async function initEmbeddedDataDir(pgdata: string): Promise<void> {
  const entry = threadEntry();
  // Its stdin stays open while this process lives: the child stops if the server dies.
  const child = spawn(process.execPath, [...entry.nodeArgs, fileURLToPath(entry.url), pgdata], {
    stdio: ["pipe", "ignore", "pipe"],
  });
  let stderr = "";
  child.stderr.setEncoding("utf8").on("data", (text: string) => {
    stderr += text;
  });
  const stderrClosed = once(child.stderr, "close");
  const [code, signal] = (await once(child, "exit")) as [number | null, NodeJS.Signals | null];
  child.stdin.destroy();
  await stderrClosed;
  if (code !== 0) {
    const how = signal ? `was killed by ${signal}` : `exited with code ${code}`;
    throw new Error(
      `creating the embedded database in ${pgdata} failed: its process ${how}: ${stderr.trim()}`,
    );
  }
}

/**
 * Starts the thread serving `pgdata` on `socketPath` and resolves once it listens. After that,
 * `onCrash` is called once if the thread ends without `close()` (an error in PGlite, WASM out of
 * memory): the main thread's connection is then dead, so the caller should stop.
 */
export async function serveEmbeddedDatabase(
  pgdata: string,
  socketPath: string,
  onCrash: (error: EmbeddedDatabaseCrashedError) => void,
): Promise<EmbeddedThread> {
  const wasmModule = await compiledPglite();
  const thread = startThread({ pgdata, socketPath, ...(wasmModule ? { wasmModule } : {}) });
  await thread.ready;
  let closing: Promise<void> | undefined;
  void thread.exited.then(({ code, error }) => {
    if (closing) return;
    onCrash(new EmbeddedDatabaseCrashedError(error ? error.message : `it exited with code ${code}`));
  });
  return {
    worker: thread.worker,
    close() {
      closing ??= (async () => {
        const command: EmbeddedThreadCommand = { type: "close" };
        thread.worker.postMessage(command);
        let timer: NodeJS.Timeout | undefined;
        const timedOut = new Promise<"timeout">((resolve) => {
          timer = setTimeout(() => resolve("timeout"), CLOSE_TIMEOUT_MS);
        });
        const outcome = await Promise.race([thread.exited, timedOut]);
        clearTimeout(timer);
        if (outcome === "timeout") {
          await thread.worker.terminate();
          throw new Error(
            `the embedded database did not close within ${CLOSE_TIMEOUT_MS} ms; its thread was ended`,
          );
        }
        if (outcome.error) throw outcome.error;
      })();
      return closing;
    },
  };
}

let pgliteModule: Promise<CompiledWasm | undefined> | undefined;

/**
 * PGlite's WebAssembly (9 MB), compiled once per process and handed to every database thread it
 * starts: a WebAssembly.Module crosses to a worker thread as it is, its compiled code shared. A
 * server opens its database once, so this saves it nothing; a process that opens embedded
 * databases again and again (the test suite: some 40 times per run) has each thread ready in
 * about 0.25 s instead of 0.36 s. Undefined when the file is not where PGlite keeps it: the
 * thread's PGlite then finds and compiles it itself.
 */
export function compiledPglite(): Promise<CompiledWasm | undefined> {
  pgliteModule ??= (async () => {
    try {
      // PGlite loads `pglite.wasm` from beside its entry module; its package exports no path to it.
      const entry = pathToFileURL(createRequire(import.meta.url).resolve("@electric-sql/pglite"));
      return await wasm().compile(await readFile(new URL("./pglite.wasm", entry)));
    } catch {
      return undefined;
    }
  })();
  return pgliteModule;
}

/** The WebAssembly global, whose value TypeScript declares only with the DOM library. */
export function wasm(): {
  compile(bytes: Uint8Array): Promise<CompiledWasm>;
  Module: { new (bytes: Uint8Array): CompiledWasm; exports(module: CompiledWasm): unknown[] };
} {
  return (globalThis as unknown as { WebAssembly: ReturnType<typeof wasm> }).WebAssembly;
}

interface StartedThread {
  worker: Worker;
  /** Resolves when the thread says it is ready; rejects with its error if it ends first. */
  ready: Promise<void>;
  /** Resolves when the thread has ended, with the error that ended it, if any. Never rejects. */
  exited: Promise<{ code: number; error: Error | undefined }>;
}

function startThread(data: EmbeddedThreadData): StartedThread {
  const worker = spawnThread(data);
  let failure: Error | undefined;
  worker.on("error", (error) => {
    failure ??= error;
  });
  const exited = new Promise<{ code: number; error: Error | undefined }>((resolve) => {
    worker.once("exit", (code) => resolve({ code, error: failure }));
  });
  const ready = new Promise<void>((resolve, reject) => {
    worker.on("message", (message: EmbeddedThreadMessage) => {
      if (message.type === "ready") resolve();
    });
    void exited.then(({ code, error }) =>
      // Harmless once ready has resolved.
      reject(
        error ?? new Error(`the embedded database's thread exited with code ${code} before it was ready`),
      ),
    );
  });
  return { worker, ready, exited };
}

/** The database thread's young generation, in MiB (V8 sizes it from the machine otherwise). */
export const DATABASE_THREAD_YOUNG_GENERATION_MB = 4;

function spawnThread(data: EmbeddedThreadData): Worker {
  const entry = threadEntry();
  // A worker inherits the process's node options by default, and some break it (`--input-type`
  // fails a file entry; a test runner's or a debugger's flags are not the database's business).
  const options = {
    workerData: data,
    execArgv: [],
    // The thread's JavaScript is PGlite's glue and the socket server; its default young generation
    // (up to 3 × 16 MiB) held 30–50 MiB of heap for 13–24 MiB in use, 16–23 MiB with this.
    resourceLimits: { maxYoungGenerationSizeMb: DATABASE_THREAD_YOUNG_GENERATION_MB },
  };
  if (entry.nodeArgs.length === 0) return new Worker(entry.url, options);
  // From the sources, tsx compiles the entry inside the thread, with a loader scoped to that
  // import. `eval` code is CommonJS, hence the dynamic imports; a failed import rejects, which ends
  // the thread with that error.
  const tsxApi = new URL("api/index.mjs", entry.tsx).href;
  const href = JSON.stringify(entry.url.href);
  const bootstrap = `import(${JSON.stringify(tsxApi)}).then((tsx) => tsx.tsImport(${href}, ${href}));\n`;
  return new Worker(bootstrap, { ...options, eval: true });
}

/**
 * The entry, wherever this code runs: compiled (dist/, an installed package) the `.js` beside this
 * file; from the TypeScript sources (tsx, vitest) the `.ts`, loaded through tsx (a dev dependency,
 * so present wherever the sources run), since neither a thread nor a child process inherits the
 * TypeScript loader this file was loaded with.
 */
function threadEntry(): { url: URL; nodeArgs: string[]; tsx?: URL } {
  const here = import.meta.url;
  if (!here.endsWith(".ts")) return { url: new URL("./embedded-thread.js", here), nodeArgs: [] };
  // tsx's ES module loader, `tsx/esm`, is `<tsx>/dist/esm/index.mjs`.
  const tsx = pathToFileURL(createRequire(here).resolve("tsx/esm"));
  return { url: new URL("./embedded-thread.ts", here), nodeArgs: ["--import", tsx.href], tsx };
}

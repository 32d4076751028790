/**
 * The embedded PGlite runs in a worker thread of its own: the main thread keeps running while the
 * database works, closing ends the thread and frees the data dir, and a thread that dies on its own
 * is reported (in a server process: one clear error line and exit status 1, from the compiled build
 * and from the sources under tsx alike).
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { access, mkdtemp, readdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { pathToFileURL } from "node:url";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it, vi } from "vitest";
import { type Database, openDatabase } from "../../server/store/database.js";
import {
  compiledPglite,
  DATABASE_THREAD_YOUNG_GENERATION_MB,
  EmbeddedDatabaseCrashedError,
  wasm,
} from "../../server/store/embedded-database.js";
import { copyPgdata, type InitialisedDataDir, initialisedDataDir } from "../support/database.js";
import { REPO_ROOT } from "../support/market.js";

/** Creating a fresh data dir takes seconds of initdb, slower still on a busy machine. */
const TIMEOUT_MS = 120_000;

describe("the embedded database's thread", () => {
  /**
   * Only the first test and the child-process one need a fresh data dir (they watch it being
   * created); the others start from a copy of an initialised one, which saves an initdb each.
   */
  let initialised: InitialisedDataDir;
  let dataDir: string;
  let database: Database | undefined;

  beforeAll(async () => {
    initialised = await initialisedDataDir();
  }, TIMEOUT_MS);

  afterAll(async () => {
    await initialised?.remove();
  });

  beforeEach(async () => {
    // Beside the template: on tmpfs when it is there.
    dataDir = await mkdtemp(join(dirname(initialised.dataDir), "locallmarket-thread-"));
  });

  afterEach(async () => {
    await database?.close();
    database = undefined;
    await rm(dataDir, { recursive: true, force: true });
  });

  /** Makes this test's data dir a copy of an initialised one. */
  const startFromInitialised = () => copyPgdata(initialised.dataDir, dataDir);

  it("compiles PGlite's WebAssembly once per process, from where PGlite keeps it", async () => {
    // Undefined would mean PGlite moved the file: every thread would then compile it again.
    const compiled = await compiledPglite();
    expect(compiled).toBeInstanceOf(wasm().Module);
    expect(wasm().Module.exports(compiled as object).length).toBeGreaterThan(0);
    expect(await compiledPglite()).toBe(compiled);
  });

  it(
    "keeps the main thread running while a query runs, and ends with close",
    async () => {
      const crashes: Error[] = [];
      const progress: string[] = [];
      database = await openDatabase({
        dataDir,
        onCrash: (error) => crashes.push(error),
        progress: (message) => progress.push(message),
      });
      expect(progress).toEqual([
        `creating the embedded database in ${join(dataDir, "pgdata")} (first start; a few seconds)…`,
      ]);
      const thread = database.thread;
      expect(thread?.threadId).toBeGreaterThan(0);
      // Its young generation is bounded (V8 would size it from the machine).
      expect(thread?.resourceLimits?.maxYoungGenerationSizeMb).toBe(DATABASE_THREAD_YOUNG_GENERATION_MB);

      // PGlite computes synchronously: on the main thread, no timer could fire while the query
      // sleeps, only before the database picked it up (milliseconds after sending) or once it has
      // answered (2 s after sending at the earliest).
      const connection = database.orm.em.fork().getConnection();
      let pending = true;
      const sent = performance.now();
      const query = connection.execute("select pg_sleep(2) as slept").finally(() => {
        pending = false;
      });
      const ticks: number[] = [];
      const ticker = setInterval(() => {
        if (pending) ticks.push(performance.now() - sent);
      }, 20);
      try {
        expect(await query).toEqual([{ slept: "" }]);
      } finally {
        clearInterval(ticker);
      }
      // Well inside the sleep, the main thread was still turning: ticks are 20 ms apart, so a
      // 1.4 s window leaves room for a busy machine's delays.
      expect(ticks.filter((elapsed) => elapsed > 500 && elapsed < 1_900).length).toBeGreaterThan(0);

      await database.close();
      database = undefined;
      // -1 once the thread no longer runs; the lock and the socket are gone with it.
      expect(thread?.threadId).toBe(-1);
      await expect(access(join(dataDir, "lock"))).rejects.toThrow(/ENOENT/);
      await expect(access(join(dataDir, "socket", ".s.PGSQL.5432"))).rejects.toThrow(/ENOENT/);
      expect(crashes).toEqual([]);
    },
    TIMEOUT_MS,
  );

  it(
    "opens an existing data dir without creating it again, its data kept",
    async () => {
      await startFromInitialised();
      const first = await openDatabase({ dataDir, progress: () => {} });
      await first.orm.em.fork().getConnection().execute("create table kept (v text)");
      await first.orm.em.fork().getConnection().execute("insert into kept values ('still here')");
      await first.close();

      const progress: string[] = [];
      database = await openDatabase({ dataDir, progress: (message) => progress.push(message) });
      expect(progress).toEqual([]);
      expect(await database.orm.em.fork().getConnection().execute("select v from kept")).toEqual([
        { v: "still here" },
      ]);
    },
    TIMEOUT_MS,
  );

  it(
    "reports a thread that ends on its own, once, and still closes and frees the data dir",
    async () => {
      await startFromInitialised();
      const crashes: Error[] = [];
      database = await openDatabase({ dataDir, progress: () => {}, onCrash: (error) => crashes.push(error) });

      await database.thread?.terminate();

      await vi.waitFor(() => expect(crashes).toHaveLength(1), { timeout: 10_000 });
      expect(crashes[0]).toBeInstanceOf(EmbeddedDatabaseCrashedError);
      expect(crashes[0]?.message).toBe(
        "the embedded database (PGlite) thread stopped unexpectedly: it exited with code 1",
      );
      await expect(database.orm.em.fork().getConnection().execute("select 1")).rejects.toThrow();
      await database.close();
      database = undefined;
      await expect(access(join(dataDir, "lock"))).rejects.toThrow(/ENOENT/);
      expect(crashes).toHaveLength(1);
    },
    TIMEOUT_MS,
  );

  it(
    "creates a fresh data dir in a child process that stops when the server that started it dies",
    async () => {
      const pgdata = join(dataDir, "pgdata");
      const module = pathToFileURL(join(REPO_ROOT, "dist/server/store/embedded-database.js")).href;
      const script = `const { initEmbeddedDataDir } = await import(${JSON.stringify(module)}); await initEmbeddedDataDir(${JSON.stringify(pgdata)});`;
      const server = spawn(process.execPath, ["--input-type=module", "-e", script], { stdio: "ignore" });
      const serverExited = once(server, "exit");
      // The child that runs initdb, found by its command line.
      const creator = await vi.waitFor(
        async () => {
          const pid = await processWithArgument(pgdata);
          expect(pid).toBeTypeOf("number");
          return pid as number;
        },
        { timeout: 60_000, interval: 50 },
      );

      server.kill("SIGKILL");
      await serverExited;

      // No orphan keeps writing into a data dir whose lock is gone.
      await vi.waitFor(async () => expect(await processWithArgument(pgdata)).toBeUndefined(), {
        timeout: 60_000,
        interval: 100,
      });
      expect(creator).toBeGreaterThan(0);
      // It was killed while still loading PGlite, so it stopped before initdb wrote the data dir
      // (an orphan would have gone on to create it).
      await expect(access(join(pgdata, "PG_VERSION"))).rejects.toThrow(/ENOENT/);
    },
    TIMEOUT_MS,
  );

  // A process whose database thread dies prints one line and exits 1 (no hang, no stack trace).
  // The module is loaded as each way the code runs loads it: compiled, and from sources under tsx.
  const ways = [
    { name: "compiled (dist/)", module: join(REPO_ROOT, "dist/server/store/database.js"), args: [] },
    {
      name: "from the sources under tsx",
      module: join(REPO_ROOT, "server/store/database.ts"),
      args: ["--import", "tsx"],
    },
  ];
  for (const way of ways) {
    it(
      `ends the process with a clear error when its thread dies, ${way.name}`,
      async () => {
        await startFromInitialised();
        const script = [
          `const { openDatabase } = await import(${JSON.stringify(pathToFileURL(way.module).href)});`,
          `const database = await openDatabase({ dataDir: ${JSON.stringify(dataDir)} });`,
          `await database.orm.em.fork().getConnection().execute("select 1");`,
          `process.stdout.write("open\\n");`,
          "await database.thread.terminate();",
        ].join("\n");
        const child = spawn(process.execPath, [...way.args, "--input-type=module", "-e", script], {
          cwd: REPO_ROOT,
          stdio: ["ignore", "pipe", "pipe"],
        });
        let stdout = "";
        let stderr = "";
        child.stdout.on("data", (data: Buffer) => {
          stdout += data.toString();
        });
        child.stderr.on("data", (data: Buffer) => {
          stderr += data.toString();
        });
        const [code] = await once(child, "exit");

        expect(stdout).toBe("open\n");
        expect(code).toBe(1);
        expect(stderr).toContain(
          "error: the embedded database (PGlite) thread stopped unexpectedly: it exited with code 1\n",
        );
        expect(stderr).not.toMatch(/^\s+at /m);
        // The exit hook removed the lock: the next server may start.
        await expect(access(join(dataDir, "lock"))).rejects.toThrow(/ENOENT/);
      },
      TIMEOUT_MS,
    );
  }
});

/** The pid of a live process (Linux /proc) that has `argument` on its command line, if any. */
async function processWithArgument(argument: string): Promise<number | undefined> {
  for (const entry of await readdir("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    const cmdline = await readFile(`/proc/${entry}/cmdline`, "utf8").catch(() => "");
    if (cmdline.split("\0").includes(argument)) return Number(entry);
  }
  return undefined;
}

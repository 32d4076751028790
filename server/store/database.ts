/**
 * Opens the database: an external PostgreSQL when a URL is given, otherwise an embedded PGlite,
 * running in a worker thread of its own (embedded-database.ts), that MikroORM reaches with its
 * ordinary PostgreSQL driver through a unix socket only this user can open. The embedded data dir
 * is locked first, so a second server on it refuses to start. Pending migrations run before the
 * handle is returned.
 */
import { Buffer } from "node:buffer";
import { access, chmod, lstat, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import type { Worker } from "node:worker_threads";
import { Migrator } from "@mikro-orm/migrations";
import { MikroORM, type Options } from "@mikro-orm/postgresql";
import { acquireDataDirLock } from "./data-dir-lock.js";
import {
  type EmbeddedDatabaseCrashedError,
  initEmbeddedDataDir,
  serveEmbeddedDatabase,
} from "./embedded-database.js";
import { entities } from "./entities.js";
import { migrationsList } from "./migrations/index.js";

export interface OpenDatabaseOptions {
  /** postgres://user:password@host:port/db; when unset the embedded PGlite in dataDir is used. */
  databaseUrl?: string;
  dataDir: string;
  /** Logs SQL and migrations. */
  debug?: boolean;
  /** Told about things an operator should know (a stale lock taken over, a socket moved to tmp). */
  warn?: (message: string) => void;
  /** Told what a slow step is doing (creating a fresh embedded database); stderr by default. */
  progress?: (message: string) => void;
  /**
   * Called once if the embedded database's thread ends on its own: nothing can be stored any more.
   * By default the error is printed and the process exits with status 1, so a supervisor can
   * restart it (the next start settles what was running from its checkpoints).
   */
  onCrash?: (error: EmbeddedDatabaseCrashedError) => void;
}

export interface Database {
  orm: MikroORM;
  close(): Promise<void>;
  /** Where the data lives, safe to log (never includes a password). */
  description: string;
  /** The embedded database's unix socket, which only this user can reach; unset for PostgreSQL. */
  socketPath?: string;
  /** The embedded database's thread; unset for PostgreSQL. Tests end it to play a crash. */
  thread?: Worker;
}

/**
 * `pg` addresses a unix socket as a directory plus a port, and opens `<dir>/.s.PGSQL.<port>` as
 * PostgreSQL itself names it; the port is only part of the file name.
 */
const SOCKET_PORT = 5432;
const SOCKET_FILE_NAME = `.s.PGSQL.${SOCKET_PORT}`;
/** sun_path holds 108 bytes on Linux and 104 on macOS and the BSDs, the terminating NUL included. */
const MAX_SOCKET_PATH_BYTES = process.platform === "linux" ? 107 : 103;

export async function openDatabase(options: OpenDatabaseOptions): Promise<Database> {
  const debug = options.debug ?? false;
  if (options.databaseUrl) {
    const orm = await openOrm({ clientUrl: options.databaseUrl }, debug);
    return { orm, close: () => orm.close(), description: describeUrl(options.databaseUrl) };
  }
  const warn = options.warn ?? ((message: string) => process.stderr.write(`warning: ${message}\n`));
  return openEmbedded(resolve(options.dataDir), debug, warn, {
    progress: options.progress ?? ((message: string) => process.stderr.write(`${message}\n`)),
    onCrash: options.onCrash ?? exitOnCrash,
  });
}

/** What a server does when its embedded database dies under it: say so clearly and stop. */
function exitOnCrash(error: EmbeddedDatabaseCrashedError): void {
  process.stderr.write(`error: ${error.message}\n`);
  // The data dir's lock is removed by its exit hook.
  process.exit(1);
}

async function openEmbedded(
  dataDir: string,
  debug: boolean,
  warn: (message: string) => void,
  hooks: Required<Pick<OpenDatabaseOptions, "progress" | "onCrash">>,
): Promise<Database> {
  const pgdata = join(dataDir, "pgdata");
  await mkdir(pgdata, { recursive: true });
  // Before PGlite touches the files: a second server must not open them at all.
  const lock = await acquireDataDirLock(dataDir, {
    onStaleLock: (stale, lockPath) =>
      warn(
        stale
          ? `took over the stale lock ${lockPath} of pid ${stale.pid} (started ${stale.startedAt}), which is no longer running`
          : `replaced the unreadable lock file ${lockPath}`,
      ),
  });
  const cleanups: Array<() => Promise<void>> = [() => lock.release()];
  // Every step is undone even if an earlier one fails, so the lock is never left behind.
  const cleanUp = async () => {
    let failure: unknown;
    for (const cleanup of cleanups.splice(0).reverse()) {
      try {
        await cleanup();
      } catch (error) {
        failure ??= error;
      }
    }
    if (failure !== undefined) throw failure;
  };
  try {
    const socketDir = await privateSocketDir(dataDir, warn);
    cleanups.push(socketDir.remove);
    const socketPath = join(socketDir.path, SOCKET_FILE_NAME);
    // A crash leaves the socket file behind and listen() would fail on it; holding the lock
    // means no live server owns it.
    await rm(socketPath, { force: true });
    if (!(await exists(join(pgdata, "PG_VERSION")))) {
      hooks.progress(`creating the embedded database in ${pgdata} (first start; a few seconds)…`);
      await initEmbeddedDataDir(pgdata);
    }
    const thread = await serveEmbeddedDatabase(pgdata, socketPath, hooks.onCrash);
    cleanups.push(() => thread.close());
    const orm = await openOrm(
      {
        host: socketDir.path,
        port: SOCKET_PORT,
        user: "postgres",
        dbName: "postgres",
        // PGlite is a single session: the socket server multiplexes connections onto it, and two
        // pooled connections with open transactions interleave and can deadlock. One connection
        // serializes everything, which is what the embedded database does anyway.
        pool: { min: 0, max: 1 },
      },
      debug,
    );
    cleanups.push(() => orm.close());
    return {
      orm,
      description: `embedded PGlite at ${pgdata}`,
      socketPath,
      thread: thread.worker,
      close: cleanUp,
    };
  } catch (error) {
    // The error that stopped the start matters more than one from undoing it.
    await cleanUp().catch(() => {});
    throw error;
  }
}

/**
 * A directory for the embedded database's socket that only this user may enter: `<dataDir>/socket`
 * with mode 0700, or, when that path is too long for a unix socket, a fresh 0700 directory in the
 * system's temporary directory.
 */
async function privateSocketDir(
  dataDir: string,
  warn: (message: string) => void,
): Promise<{ path: string; remove: () => Promise<void> }> {
  const inDataDir = join(dataDir, "socket");
  if (Buffer.byteLength(join(inDataDir, SOCKET_FILE_NAME)) <= MAX_SOCKET_PATH_BYTES) {
    await mkdir(inDataDir, { mode: 0o700, recursive: true });
    const stats = await lstat(inDataDir);
    if (!stats.isDirectory()) throw new Error(`${inDataDir} must be a directory`);
    if (typeof process.getuid === "function" && stats.uid !== process.getuid()) {
      throw new Error(`${inDataDir} belongs to another user; the database socket must be ours alone`);
    }
    // mkdir leaves an existing directory's mode as it was (and a fresh one's is masked by umask).
    await chmod(inDataDir, 0o700);
    return { path: inDataDir, remove: async () => {} };
  }
  // mkdtemp creates the directory with mode 0700.
  const inTmp = await mkdtemp(join(tmpdir(), "locallmarket-db-"));
  if (Buffer.byteLength(join(inTmp, SOCKET_FILE_NAME)) > MAX_SOCKET_PATH_BYTES) {
    await rm(inTmp, { recursive: true, force: true });
    throw new Error(
      `both ${inDataDir} and ${inTmp} are too long for a unix socket path; set TMPDIR to a short path`,
    );
  }
  warn(`the data dir's path is too long for a unix socket; the embedded database's socket is in ${inTmp}`);
  return { path: inTmp, remove: () => rm(inTmp, { recursive: true, force: true }) };
}

async function openOrm(connection: Options, debug: boolean): Promise<MikroORM> {
  const orm = await MikroORM.init({
    ...connection,
    entities,
    extensions: [Migrator],
    migrations: {
      migrationsList,
      // No snapshot files: the schema is defined by the hand-written migrations alone.
      snapshot: false,
      silent: !debug,
    },
    // The database is created by its operator (or by test/support/database.ts), never by the app.
    ensureDatabase: false,
    // Metadata comes from defineEntity, so there is nothing to cache on disk.
    metadataCache: { enabled: false },
    discovery: { warnWhenNoEntities: false },
    debug,
  });
  try {
    await orm.migrator.up();
  } catch (error) {
    await orm.close();
    throw error;
  }
  return orm;
}

async function exists(path: string): Promise<boolean> {
  try {
    await access(path);
    return true;
  } catch {
    return false;
  }
}

function describeUrl(databaseUrl: string): string {
  try {
    const url = new URL(databaseUrl);
    return `PostgreSQL at ${url.hostname}:${url.port || "5432"}${url.pathname}`;
  } catch {
    return "PostgreSQL (unparsable URL)";
  }
}

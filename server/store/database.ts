/**
 * Opens the database: an external PostgreSQL when a URL is given, otherwise an embedded PGlite
 * that MikroORM reaches with its ordinary PostgreSQL driver through a unix socket only this user can
 * open. The embedded data dir is locked first, so a second server on it refuses to start.
 * Pending migrations run before the handle is returned.
 */
import { Buffer } from "node:buffer";
import { chmod, lstat, mkdir, mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join, resolve } from "node:path";
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";
import { Migrator } from "@mikro-orm/migrations";
import { MikroORM, type Options } from "@mikro-orm/postgresql";
import { acquireDataDirLock } from "./data-dir-lock.js";
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
}

export interface Database {
  orm: MikroORM;
  close(): Promise<void>;
  /** Where the data lives, safe to log (never includes a password). */
  description: string;
  /** The embedded database's unix socket, which only this user can reach; unset for PostgreSQL. */
  socketPath?: string;
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
  return openEmbedded(resolve(options.dataDir), debug, warn);
}

async function openEmbedded(
  dataDir: string,
  debug: boolean,
  warn: (message: string) => void,
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
    const pglite = await PGlite.create(pgdata);
    cleanups.push(() => pglite.close());
    // One connection, as the pool below: PGlite is a single session.
    const server = new PGLiteSocketServer({ db: pglite, path: socketPath, maxConnections: 1 });
    await server.start();
    cleanups.push(() => server.stop());
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
    return { orm, description: `embedded PGlite at ${pgdata}`, socketPath, close: cleanUp };
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

function describeUrl(databaseUrl: string): string {
  try {
    const url = new URL(databaseUrl);
    return `PostgreSQL at ${url.hostname}:${url.port || "5432"}${url.pathname}`;
  } catch {
    return "PostgreSQL (unparsable URL)";
  }
}

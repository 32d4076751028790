/**
 * Opens the database: an external PostgreSQL when a URL is given, otherwise an embedded PGlite
 * served on a loopback socket so MikroORM can talk to it with its ordinary PostgreSQL driver.
 * Pending migrations run before the handle is returned.
 */
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { PGlite } from "@electric-sql/pglite";
import { PGLiteSocketServer } from "@electric-sql/pglite-socket";
import { Migrator } from "@mikro-orm/migrations";
import { MikroORM, type Options } from "@mikro-orm/postgresql";
import { entities } from "./entities.js";
import { migrationsList } from "./migrations/index.js";

export interface OpenDatabaseOptions {
  /** postgres://user:password@host:port/db; when unset the embedded PGlite in dataDir is used. */
  databaseUrl?: string;
  dataDir: string;
  /** Logs SQL and migrations. */
  debug?: boolean;
}

export interface Database {
  orm: MikroORM;
  close(): Promise<void>;
  /** Where the data lives, safe to log (never includes a password). */
  description: string;
}

export async function openDatabase(options: OpenDatabaseOptions): Promise<Database> {
  const debug = options.debug ?? false;
  if (options.databaseUrl) {
    const orm = await openOrm({ clientUrl: options.databaseUrl }, debug);
    return { orm, close: () => orm.close(), description: describeUrl(options.databaseUrl) };
  }
  return openEmbedded(options.dataDir, debug);
}

async function openEmbedded(dataDir: string, debug: boolean): Promise<Database> {
  const pgdata = join(dataDir, "pgdata");
  await mkdir(pgdata, { recursive: true });
  const pglite = await PGlite.create(pgdata);
  const server = new PGLiteSocketServer({ db: pglite, host: "127.0.0.1", port: 0 });
  const stopPglite = async () => {
    await server.stop();
    await pglite.close();
  };
  try {
    await server.start();
    const { host, port } = parseHostPort(server.getServerConn());
    const orm = await openOrm(
      {
        host,
        port,
        user: "postgres",
        dbName: "postgres",
        // PGlite is a single session: the socket server multiplexes connections onto it, and two
        // pooled connections with open transactions interleave and can deadlock. One connection
        // serializes everything, which is what the embedded database does anyway.
        pool: { min: 0, max: 1 },
      },
      debug,
    );
    return {
      orm,
      description: `embedded PGlite at ${pgdata}`,
      async close() {
        await orm.close();
        await stopPglite();
      },
    };
  } catch (error) {
    await stopPglite();
    throw error;
  }
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

function parseHostPort(conn: string): { host: string; port: number } {
  const colon = conn.lastIndexOf(":");
  const port = Number(conn.slice(colon + 1));
  if (colon < 0 || !Number.isInteger(port)) {
    throw new Error(`Unexpected PGlite socket address: ${conn}`);
  }
  return { host: conn.slice(0, colon), port };
}

function describeUrl(databaseUrl: string): string {
  try {
    const url = new URL(databaseUrl);
    return `PostgreSQL at ${url.hostname}:${url.port || "5432"}${url.pathname}`;
  } catch {
    return "PostgreSQL (unparsable URL)";
  }
}

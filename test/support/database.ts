/**
 * Fresh, isolated databases for tests. With DATABASE_URL set (CI), each call creates a uniquely
 * named database on that server; otherwise it makes a temporary data directory for embedded PGlite,
 * holding a copy of the run's migrated template when there is one (see TEMPLATE_ENV).
 */
import { randomBytes } from "node:crypto";
import { constants, cpSync } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { dirname, join } from "node:path";
import type { MikroORM } from "@mikro-orm/postgresql";
import pg from "pg";
import { openDatabase } from "../../server/store/database.js";
import { SqlMarketStore } from "../../server/store/market-store.js";

/**
 * The environment variable naming the run's template data dir, set by the vitest globalSetup
 * database-template.ts: its `pgdata` is initialised, migrated and closed. Embedded test databases
 * are made beside it (on tmpfs when it is there) and start as a copy of it. Without it (a bench
 * script, a run with DATABASE_URL) each is created from scratch in the system's temporary directory.
 */
export const TEMPLATE_ENV = "LOCALLMARKET_TEST_TEMPLATE_DIR";

export interface TestDatabase {
  /** The fresh database's URL, or undefined for embedded PGlite in dataDir. */
  databaseUrl: string | undefined;
  dataDir: string;
  /** Drops the database (or removes the data directory). */
  drop(): Promise<void>;
}

/** `serverUrl` null forces embedded PGlite even when DATABASE_URL is set. */
export async function createTestDatabase(
  serverUrl: string | null = process.env.DATABASE_URL ?? null,
): Promise<TestDatabase> {
  const template = serverUrl ? undefined : process.env[TEMPLATE_ENV];
  const dataDir = await mkdtemp(join(template ? dirname(template) : tmpdir(), "locallmarket-test-"));
  const removeDataDir = () => rm(dataDir, { recursive: true, force: true });
  if (!serverUrl) {
    if (template) {
      await copyPgdata(template, dataDir).catch(async (error: unknown) => {
        await removeDataDir();
        throw error;
      });
    }
    return { databaseUrl: undefined, dataDir, drop: removeDataDir };
  }

  const name = `llm_test_${randomBytes(6).toString("hex")}`;
  await withClient(serverUrl, (client) => client.query(`create database ${name}`));
  const url = new URL(serverUrl);
  url.pathname = `/${name}`;
  return {
    databaseUrl: url.toString(),
    dataDir,
    async drop() {
      // FORCE ends sessions a test may have left open (PostgreSQL 13+).
      await withClient(serverUrl, (client) => client.query(`drop database if exists ${name} with (force)`));
      await removeDataDir();
    },
  };
}

/**
 * Copies the `pgdata` of `fromDataDir` (initialised and closed) into `toDataDir`. The server finds
 * PG_VERSION in the copy and opens it as it is: no initdb, no pending migration. A clone where the
 * file system can make one, a plain copy otherwise. Synchronous: Node 20's promise-based `cp`
 * awaits each of pgdata's ~1,000 files in turn and took 0.35-0.45 s on tmpfs, `cpSync` 0.07-0.09 s
 * (a pause that no test's timing comes near).
 */
export async function copyPgdata(fromDataDir: string, toDataDir: string): Promise<void> {
  cpSync(join(fromDataDir, "pgdata"), join(toDataDir, "pgdata"), {
    recursive: true,
    mode: constants.COPYFILE_FICLONE,
  });
}

export interface InitialisedDataDir {
  /** A data dir whose `pgdata` is initialised, migrated and closed: copy it with copyPgdata. */
  dataDir: string;
  /** Removes it if it was made here (the run's template is left to the globalSetup). */
  remove(): Promise<void>;
}

/**
 * For tests that drive the embedded database themselves yet need no fresh data dir: the run's
 * template (TEMPLATE_ENV) when there is one, else one data dir created here through `openDatabase`
 * (seconds of initdb), to be copied by every test of the file instead of each creating its own.
 */
export async function initialisedDataDir(): Promise<InitialisedDataDir> {
  const template = process.env[TEMPLATE_ENV];
  if (template) return { dataDir: template, remove: async () => {} };
  const dataDir = await mkdtemp(join(tmpdir(), "locallmarket-initialised-"));
  const remove = () => rm(dataDir, { recursive: true, force: true });
  try {
    const database = await openDatabase({ dataDir, progress: () => {} });
    await database.close();
  } catch (error) {
    await remove();
    throw error;
  }
  return { dataDir, remove };
}

export interface TestStore {
  store: SqlMarketStore;
  /** The store's ORM, for tests that reach under the store (e.g. to corrupt data on purpose). */
  orm: MikroORM;
  databaseUrl?: string;
  dataDir: string;
  /** Closes the store and its database, then drops the database. */
  close(): Promise<void>;
}

export async function openTestStore(
  serverUrl: string | null = process.env.DATABASE_URL ?? null,
): Promise<TestStore> {
  const testDatabase = await createTestDatabase(serverUrl);
  try {
    const database = await openDatabase({
      databaseUrl: testDatabase.databaseUrl,
      dataDir: testDatabase.dataDir,
    });
    const store = new SqlMarketStore(database.orm, { onClose: database.close });
    return {
      store,
      orm: database.orm,
      databaseUrl: testDatabase.databaseUrl,
      dataDir: testDatabase.dataDir,
      async close() {
        await store.close();
        await testDatabase.drop();
      },
    };
  } catch (error) {
    await testDatabase.drop();
    throw error;
  }
}

async function withClient<T>(url: string, work: (client: pg.Client) => Promise<T>): Promise<T> {
  const client = new pg.Client({ connectionString: url });
  await client.connect();
  try {
    return await work(client);
  } finally {
    await client.end();
  }
}

/**
 * One statement straight on a pooled `pg` client, for the statements every request pays for (the
 * ledger's batches, with their settlements' token-count records). MikroORM's `execute` goes
 * through knex's raw query builder, which scans the text for bindings and interpolates them, then
 * through MikroORM's query logging and its own promise chain: measured under load, that cost about
 * as much control-plane CPU per statement as the rest of the client's work. The client comes from the same pool
 * MikroORM uses (on embedded PGlite, its one connection), so it never competes with MikroORM for
 * more connections than the pool holds, and each statement runs outside any transaction, in the
 * simple query protocol: one message, one socket write.
 *
 * Values are inlined as literals built here ({@link sqlText}, {@link sqlValue}), the way knex
 * inlines them on this path today.
 */
import type { MikroORM } from "@mikro-orm/core";
import type { AbstractSqlConnection } from "@mikro-orm/knex";

/** What this module needs of a `pg` client: one result per statement when a text holds several. */
interface PgClient {
  query(text: string): Promise<{ rows: unknown[] } | Array<{ rows: unknown[] }>>;
}

/** What this module needs of knex's client (its pool). */
interface KnexClient {
  acquireConnection(): Promise<PgClient>;
  releaseConnection(connection: PgClient): Promise<unknown>;
}

/**
 * Runs one statement (no parameters: inline them with sqlText / sqlValue) and returns its rows. A
 * text of several statements separated by semicolons runs them in one transaction (the simple
 * query protocol's rule) and returns the first one's rows.
 */
export async function rawQuery<Row>(orm: MikroORM, text: string): Promise<Row[]> {
  const connection = orm.em.getConnection() as unknown as AbstractSqlConnection;
  const client = connection.getKnex().client as unknown as KnexClient;
  const pg = await client.acquireConnection();
  try {
    const result = await pg.query(text);
    return (Array.isArray(result) ? (result[0]?.rows ?? []) : result.rows) as Row[];
  } finally {
    await client.releaseConnection(pg);
  }
}

/**
 * A string literal for `text`. The escape-string form (E'…') means the same whatever the server's
 * standard_conforming_strings says: backslashes and quotes are doubled, nothing else is special.
 * (PostgreSQL text cannot hold NUL; callers strip it, as they do for bound parameters.)
 */
export function sqlText(text: string): string {
  return `E'${text.replace(/\\/g, "\\\\").replace(/'/g, "''")}'`;
}

/** A literal for a string, a finite number, a boolean or null. */
export function sqlValue(value: string | number | boolean | null): string {
  if (value === null) return "null";
  if (typeof value === "string") return sqlText(value);
  if (typeof value === "boolean") return value ? "true" : "false";
  if (!Number.isFinite(value)) throw new Error(`Cannot write ${value} as an SQL literal.`);
  return String(value);
}

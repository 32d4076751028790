import type { MigrationObject } from "@mikro-orm/core";
import { Migration20250601000000_initial } from "./Migration20250601000000_initial.js";
import { Migration20250801000000_exact_money } from "./Migration20250801000000_exact_money.js";

/**
 * Every migration, oldest first. Listed explicitly (instead of globbed from disk) so they run the
 * same from TypeScript sources, a bundle or a test. Names are spelled out because they are what
 * the mikro_orm_migrations table records: never rename one that has shipped.
 */
export const migrationsList: MigrationObject[] = [
  { name: "Migration20250601000000_initial", class: Migration20250601000000_initial },
  { name: "Migration20250801000000_exact_money", class: Migration20250801000000_exact_money },
];

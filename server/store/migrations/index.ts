import type { MigrationObject } from "@mikro-orm/core";
import { Migration20250601000000_initial } from "./Migration20250601000000_initial.js";
import { Migration20250801000000_exact_money } from "./Migration20250801000000_exact_money.js";
import { Migration20251125000000_ledger_hot_path } from "./Migration20251125000000_ledger_hot_path.js";
import { Migration20251125170000_trust } from "./Migration20251125170000_trust.js";
import { Migration20251125180000_trust_consequences } from "./Migration20251125180000_trust_consequences.js";
import { Migration20251125181000_model_registry } from "./Migration20251125181000_model_registry.js";

/**
 * Every migration, oldest first. Listed explicitly (instead of globbed from disk) so they run the
 * same from TypeScript sources, a bundle or a test. Names are spelled out because they are what
 * the mikro_orm_migrations table records: never rename one that has shipped.
 */
export const migrationsList: MigrationObject[] = [
  { name: "Migration20250601000000_initial", class: Migration20250601000000_initial },
  { name: "Migration20250801000000_exact_money", class: Migration20250801000000_exact_money },
  { name: "Migration20251125000000_ledger_hot_path", class: Migration20251125000000_ledger_hot_path },
  { name: "Migration20251125170000_trust", class: Migration20251125170000_trust },
  { name: "Migration20251125180000_trust_consequences", class: Migration20251125180000_trust_consequences },
  { name: "Migration20251125181000_model_registry", class: Migration20251125181000_model_registry },
];

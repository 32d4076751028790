import { defineConfig } from "vitest/config";

export default defineConfig({
  test: {
    include: ["test/**/*.test.ts"],
    // One migrated PGlite data dir per run, copied by each embedded test database.
    globalSetup: ["test/support/database-template.ts"],
    testTimeout: 60_000,
    hookTimeout: 60_000,
    pool: "forks",
    maxWorkers: 2,
    // No fresh module graph per test file: each of the two worker processes imports the server,
    // MikroORM, gRPC and the rest once and keeps them for the files it runs (about 40 s less on
    // PostgreSQL). Test files must not rely on module state another file may have left behind.
    isolate: false,
  },
});

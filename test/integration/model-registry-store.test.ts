/**
 * The model registry's persistence (server/store/model-registry-store.ts) and its reload at start
 * (server/models/model-registry.ts), on the real store (PGlite, or PostgreSQL with DATABASE_URL)
 * with the real stories260K GGUF: a registration survives a restart, a GGUF that changed since is
 * left inactive (its orders unverified) with the reason. (Per-order counts are written by their
 * settlements: group-commit.test.ts.)
 */
import { copyFileSync, existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { MarketError } from "../../server/market/errors.js";
import { ModelRegistry } from "../../server/models/model-registry.js";
import { ModelRegistryStore } from "../../server/store/model-registry-store.js";
import { openTestStore, type TestStore } from "../support/database.js";
import { STORIES_260K } from "../support/models.js";

const present = existsSync(STORIES_260K);
if (!present) console.warn(`skipping the model registry store tests: ${STORIES_260K} is absent`);

const STORIES_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";
const errors: string[] = [];
const log = {
  info: () => {},
  warn: () => {},
  error: (_fields: object, message: string) => errors.push(message),
};

describe.skipIf(!present)("model registry store and reload", () => {
  let db: TestStore;
  let scratch: string;
  const registries: ModelRegistry[] = [];
  const open = () => {
    const registry = new ModelRegistry(new ModelRegistryStore(db.orm), log);
    registries.push(registry);
    return registry;
  };

  beforeAll(async () => {
    db = await openTestStore();
    scratch = mkdtempSync(join(tmpdir(), "model-registry-store-"));
  });
  afterAll(async () => {
    await Promise.all(registries.map((registry) => registry.close()));
    await db?.close();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  it("keeps a registration across a restart, and leaves a GGUF that changed since inactive", async () => {
    const copy = join(scratch, "stories-copy.gguf");
    copyFileSync(STORIES_260K, copy);
    const first = open();
    await first.register("stories", STORIES_260K, STORIES_SHA256);
    const copied = await first.register("copy", copy, undefined);
    expect(copied.ggufSha256).toBe(STORIES_SHA256);
    expect(first.counterFor("stories")?.ggufSha256).toBe(STORIES_SHA256);

    // The copy changes on disk (same size, another byte at the end) before the next start.
    const bytes = readFileSync(copy);
    bytes[bytes.length - 1] = (bytes[bytes.length - 1] ?? 0) ^ 0xff;
    writeFileSync(copy, bytes);

    const restarted = open();
    await restarted.load();
    expect(restarted.counterFor("stories")?.ggufSha256).toBe(STORIES_SHA256);
    expect(restarted.counterFor("copy")).toBeUndefined();
    const listed = await restarted.list();
    expect(listed.map((m) => [m.name, m.active])).toEqual([
      ["copy", false],
      ["stories", true],
    ]);
    expect(listed[0]?.problem).toContain("changed since registration");
    expect(errors.some((message) => message.includes("its orders are unverified"))).toBe(true);
  });

  it("refuses a relative path and a hash that names another file, registering nothing", async () => {
    const registry = open();
    await expect(registry.register("x", "models/stories.gguf", undefined)).rejects.toThrow(
      /absolute path on the control plane's machine/,
    );
    const wrong = "0".repeat(64);
    const refused = registry.register("x", STORIES_260K, wrong);
    await expect(refused).rejects.toBeInstanceOf(MarketError);
    await expect(refused).rejects.toThrow(`has SHA-256 ${STORIES_SHA256}, not ${wrong}: it is another file`);
    expect((await registry.list()).map((m) => m.name)).not.toContain("x");
  });
});

/**
 * The rooms pack apart: a worker installs and runs without the control plane, so nothing under
 * worker/ may import server/, the admin command (admin-client/, a gRPC client of the control plane)
 * imports neither, and common/ (what they share) imports none of them.
 */
import { readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { fileURLToPath } from "node:url";
import ts from "typescript";
import { describe, expect, it } from "vitest";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "../..");
const packageName = "locallmarket";

function sourceFiles(room: string): string[] {
  return readdirSync(join(root, room), { recursive: true, encoding: "utf8" })
    .filter((file) => /\.[cm]?[jt]sx?$/.test(file) && !file.endsWith(".d.ts"))
    .map((file) => join(root, room, file));
}

/** Every module a file names in an import, export … from, import() or require(). */
function importSpecifiers(source: string): string[] {
  return ts.preProcessFile(source, true, true).importedFiles.map((file) => file.fileName);
}

/** The top-level room (server, worker, common, gen, node_modules…) a specifier lands in. */
function roomOf(importer: string, specifier: string): string {
  if (specifier.startsWith(".")) {
    return relative(root, resolve(dirname(importer), specifier)).split(sep)[0] ?? "";
  }
  if (specifier === packageName || specifier.startsWith(`${packageName}/`)) {
    return specifier.split("/")[1] ?? "";
  }
  return "node_modules";
}

/** "file: specifier" for each import of `files` that lands in one of `forbidden`. */
function crossings(files: string[], forbidden: readonly string[]): string[] {
  return files.flatMap((file) =>
    importSpecifiers(readFileSync(file, "utf8"))
      .filter((specifier) => forbidden.includes(roomOf(file, specifier)))
      .map((specifier) => `${relative(root, file)}: ${specifier}`),
  );
}

describe("layout", () => {
  it("finds imports of every form, so the checks below can see a crossing", () => {
    const importer = join(root, "worker", "engines", "example.ts");
    const source = [
      'import { a } from "../../server/market/money.js";',
      'import type { B } from "../../common/credits.js";',
      'export { c } from "../link-client.js";',
      'const d = await import("../../server/config.js");',
      'const e = require("locallmarket/server/main.js");',
    ].join("\n");
    expect(importSpecifiers(source).map((specifier) => roomOf(importer, specifier))).toEqual([
      "server",
      "common",
      "worker",
      "server",
      "server",
    ]);
  });

  it("nothing under worker/ imports server/", () => {
    const files = sourceFiles("worker");
    expect(files.length).toBeGreaterThan(0);
    // The worker does share code, through common/: proof that imports are being read at all.
    expect(
      files.some((file) => importSpecifiers(readFileSync(file, "utf8")).some((s) => s.includes("common/"))),
    ).toBe(true);
    expect(crossings(files, ["server"])).toEqual([]);
  });

  it("nothing under admin-client/ imports server/ or worker/", () => {
    const files = sourceFiles("admin-client");
    expect(files.length).toBeGreaterThan(0);
    expect(crossings(files, ["server", "worker"])).toEqual([]);
  });

  it("common/ imports none of server/, worker/ and admin-client/", () => {
    const files = sourceFiles("common");
    expect(files.length).toBeGreaterThan(0);
    expect(crossings(files, ["server", "worker", "admin-client"])).toEqual([]);
  });
});

#!/usr/bin/env node
// The `locallmarket` command. It runs the JavaScript that `npm run build` compiles into dist/ (`npm
// ci`, `npm pack` and `npm test` build it). In a source checkout where dist/ is missing, or older
// than a source file, it runs the TypeScript sources through tsx instead (slower to start), so a
// stale build never runs; an installed package has no sources and runs dist/ as it is.
import { existsSync, readdirSync, statSync } from "node:fs";

const root = new URL("../", import.meta.url);
/** Written by `npm run build` when it starts, renamed to `.built` once tsc has succeeded. */
const builtStamp = new URL("dist/.built", root);
/** The folders tsconfig.build.json compiles. */
const SOURCE_DIRS = ["admin-client", "bin", "common", "gen", "server", "worker"];

/** The newest modification time of a TypeScript source file under `dir`, or 0. */
function newestSource(dir) {
  let newest = 0;
  for (const entry of readdirSync(dir, { withFileTypes: true, recursive: true })) {
    if (!entry.isFile() || !entry.name.endsWith(".ts")) continue;
    newest = Math.max(newest, statSync(`${entry.parentPath ?? entry.path}/${entry.name}`).mtimeMs);
  }
  return newest;
}

/** Why dist/ cannot be run, or undefined when it can. */
function whyNotCompiled() {
  // Only a source checkout has the build's configuration; an installed package runs dist/.
  if (!existsSync(new URL("tsconfig.build.json", root))) return undefined;
  if (!existsSync(builtStamp)) return "dist/ is not built";
  const built = statSync(builtStamp).mtimeMs;
  for (const dir of SOURCE_DIRS) {
    const path = new URL(`${dir}/`, root);
    if (existsSync(path) && newestSource(path) > built) return `${dir}/ changed since the last build`;
  }
  return undefined;
}

const reason = whyNotCompiled();
let main;
if (reason === undefined) {
  ({ main } = await import("../dist/bin/commands.js"));
} else {
  process.stderr.write(
    `locallmarket: ${reason}; running the TypeScript sources through tsx ('npm run build' starts faster)\n`,
  );
  const { register } = await import("tsx/esm/api");
  register();
  ({ main } = await import("./commands.ts"));
}
process.exitCode = await main(process.argv.slice(2));

#!/usr/bin/env node
// The `locallmarket` command. The project runs from TypeScript sources through tsx.
import { register } from "tsx/esm/api";

register();
const { main } = await import("./commands.ts");
process.exitCode = await main(process.argv.slice(2));

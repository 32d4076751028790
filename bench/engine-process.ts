/**
 * The test suite's fake OpenAI-compatible engine (test/support/fake-engine.ts) as a process of its
 * own, so that the benchmark process (control plane and consumers) does not also pay for the
 * engine's work. Started by bench/engine.ts; prints one JSON line `{"url": ...}` once listening and
 * exits on SIGTERM or when its stdin closes (the parent went away).
 *
 * Arguments: --tokens N (completion length, default 16), --delay-ms N (per token, default 0).
 */
import { parseArgs } from "node:util";
import { startFakeEngine } from "../test/support/fake-engine.js";

const { values } = parseArgs({
  options: { tokens: { type: "string", default: "16" }, "delay-ms": { type: "string", default: "0" } },
});
const tokenCount = Number(values.tokens);
const delayMs = Number(values["delay-ms"]);

const engine = await startFakeEngine({
  tokens: Array.from({ length: tokenCount }, (_, i) => (i === 0 ? "tok0" : ` tok${i}`)),
  delayMs,
});
let stopping = false;
const stop = async () => {
  if (stopping) return;
  stopping = true;
  await engine.close();
  process.exit(0);
};
process.on("SIGTERM", () => void stop());
process.stdin.on("end", () => void stop());
process.stdin.resume();
process.stdout.write(`${JSON.stringify({ url: engine.url })}\n`);

/**
 * Starts bench/engine-process.ts (the fake OpenAI-compatible engine) as a child process.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";

export interface EngineProcess {
  /** Base URL ending in /v1. */
  url: string;
  close(): Promise<void>;
  /** Ends the process at once (on a timeout or Ctrl-C). */
  kill(): void;
}

export async function startEngineProcess(options: {
  tokens: number;
  delayMs?: number;
}): Promise<EngineProcess> {
  const child = spawn(
    process.execPath,
    [
      "--import",
      "tsx",
      join(REPO_ROOT, "bench/engine-process.ts"),
      "--tokens",
      String(options.tokens),
      "--delay-ms",
      String(options.delayMs ?? 0),
    ],
    { cwd: REPO_ROOT, stdio: ["pipe", "pipe", "inherit"], env: { ...process.env, NODE_NO_WARNINGS: "1" } },
  );
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout });
  const first = await Promise.race([
    once(lines, "line").then(([line]) => String(line)),
    exited.then(([code]) => {
      throw new Error(`the fake engine exited with code ${code} before listening`);
    }),
  ]);
  lines.close();
  const { url } = JSON.parse(first) as { url: string };
  return {
    url,
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.kill("SIGTERM");
      await exited;
    },
    kill: () => child.kill("SIGKILL"),
  };
}

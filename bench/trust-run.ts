/**
 * `npm run bench -- --only trust`: runs bench/trust.ts (real tiny models through node-llama-cpp, one
 * thread), then bench/verifier-cost.ts (the verifier's cost on stories260K and on a wider copy of
 * it), each in a process of its own, shows their progress, and puts the rows of the tables they
 * print in the report. Without the models (or without node-llama-cpp) it reports that it was
 * skipped.
 */
import { spawn } from "node:child_process";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";
import type { BenchContext } from "./context.js";
import { progress, type Report } from "./report.js";

export async function trustBenchmark(context: BenchContext, report: Report): Promise<void> {
  const tokens = String(context.config.trustTokens);
  await tableScript(context, report, "bench/trust.ts", [
    "--jobs",
    String(context.config.trustJobs),
    "--tokens",
    tokens,
  ]);
  await tableScript(context, report, "bench/verifier-cost.ts", ["--tokens", tokens]);
}

/** Runs a script that prints markdown tables; each row becomes report lines under the table's headings. */
async function tableScript(
  context: BenchContext,
  report: Report,
  script: string,
  args: string[],
): Promise<void> {
  const child = spawn(process.execPath, ["--import", "tsx", join(REPO_ROOT, script), ...args], {
    cwd: REPO_ROOT,
    stdio: ["ignore", "pipe", "pipe"],
    env: { ...process.env, NODE_NO_WARNINGS: "1" },
  });
  context.onKill(() => child.kill("SIGKILL"));
  let stderr = "";
  child.stderr.on("data", (data: Buffer) => {
    stderr += data.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", resolve));
  let header: string[] | undefined;
  let scenarios = 0;
  for await (const line of createInterface({ input: child.stdout })) {
    progress(`trust: ${line}`);
    if (!line.startsWith("|")) {
      // A line outside a table ends it: the next table brings its own headings.
      header = undefined;
      continue;
    }
    if (line.startsWith("| ---")) continue;
    const cells = line
      .split("|")
      .slice(1, -1)
      .map((cell) => cell.trim());
    if (!header) {
      header = cells;
      continue;
    }
    // One row per scenario: its name, then a column per figure, reported under the table's headings.
    const [scenario, ...figures] = cells;
    figures.forEach((figure, index) => {
      report.add("trust", `${scenario}: ${header?.[index + 1] ?? `column ${index + 2}`}`, figure);
    });
    scenarios += 1;
  }
  const code = await exited;
  if (code !== 0) throw new Error(`${script} exited with ${code}:\n${stderr.slice(-2000)}`);
  if (scenarios === 0) report.add("trust", `${script}: skipped`, stderr.trim() || "nothing was measured");
}

/**
 * A benchmark helper process driven over JSON lines: the parent writes one command per line to its
 * stdin and reads one answer per line from its stdout (`{"error": …}` for a failure; optional
 * `{"progress": …}` lines before the answer). The process prints one line when it is ready. Used for
 * the consumers of the pipe and concurrency benchmarks, so their CPU is not the control plane's.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { REPO_ROOT } from "../test/support/market.js";

export interface CommandProcess<Command> {
  pid: number;
  /** Sends one command and waits for its answer (one at a time), passing on its progress lines. */
  ask<Answer>(command: Command): Promise<Answer>;
  /** Ends its input and waits for it to exit. */
  close(): Promise<void>;
  /** Ends the process at once (on a timeout or Ctrl-C). */
  kill(): void;
}

/** Starts `bench/<script>` under tsx and resolves once it printed its ready line. */
export async function startCommandProcess<Command>(
  script: string,
  what: string,
  onProgress: (message: string) => void = () => {},
): Promise<CommandProcess<Command>> {
  const child = spawn(process.execPath, ["--import", "tsx", join(REPO_ROOT, "bench", script)], {
    cwd: REPO_ROOT,
    stdio: ["pipe", "pipe", "inherit"],
    env: { ...process.env, NODE_NO_WARNINGS: "1" },
  });
  const exited = once(child, "exit");
  const lines = createInterface({ input: child.stdout });
  const waiting: ((line: string) => void)[] = [];
  const pending: string[] = [];
  lines.on("line", (line) => {
    const next = waiting.shift();
    if (next) next(line);
    else pending.push(line);
  });
  // One rejection for every wait (each wait racing its own would leave the others unhandled).
  const died = exited.then(([code, signal]) => {
    throw new Error(`the ${what} process exited with ${signal ?? `code ${code}`}`);
  });
  died.catch(() => {});
  const nextLine = () =>
    Promise.race([
      pending.length > 0
        ? Promise.resolve(pending.shift() as string)
        : new Promise<string>((resolve) => waiting.push(resolve)),
      died,
    ]);
  await nextLine();
  return {
    pid: child.pid as number,
    async ask<Answer>(command: Command) {
      child.stdin.write(`${JSON.stringify(command)}\n`);
      for (;;) {
        const answer = JSON.parse(await nextLine()) as Answer | { error: string } | { progress: string };
        if (typeof answer === "object" && answer !== null && "progress" in answer) {
          onProgress(answer.progress);
          continue;
        }
        if (typeof answer === "object" && answer !== null && "error" in answer) throw new Error(answer.error);
        return answer as Answer;
      }
    },
    async close() {
      if (child.exitCode !== null || child.signalCode !== null) return;
      child.stdin.end();
      await exited;
    },
    kill: () => child.kill("SIGKILL"),
  };
}

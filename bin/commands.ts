/** Dispatches `locallmarket <command>` to the server, the worker agent or the admin client. */
import type { Command } from "commander";
import { newProgram, parseCommandLine } from "../common/command-line.js";

/** The commands, each loaded only when it runs: the admin command never loads the server's code. */
const COMMANDS: Record<string, { summary: string; run: (args: string[]) => Promise<number> }> = {
  server: {
    summary: "Run the control plane (OpenAI-compatible API, worker gRPC endpoint, ledger).",
    run: async (args) => (await import("../server/main.js")).runServerCli(args),
  },
  worker: {
    summary: "Run a worker: connect to a control plane and sell an engine's tokens.",
    run: async (args) => (await import("../worker/cli.js")).runWorkerCli(args),
  },
  admin: {
    summary: "Administer a control plane: accounts, keys, worker tokens, deposits, orders.",
    run: async (args) => (await import("../admin-client/cli.js")).runAdminCli(args),
  },
};

function program(): Command {
  const program = newProgram("locallmarket")
    .usage("<command> [options]")
    .description("A peer-to-peer market for LLM inference with an OpenAI-compatible API.")
    // What follows a command's name is that command's, even an option this level also knows.
    .enablePositionalOptions()
    .helpCommand("help [command...]", "show the help of a command")
    .addHelpText("after", "\nRun 'locallmarket <command> --help' for a command's options.");
  for (const [name, { summary }] of Object.entries(COMMANDS)) {
    // Each command parses its own options and answers its own --help: it is given the rest as is.
    program.command(name).description(summary).helpOption(false).allowUnknownOption().passThroughOptions();
  }
  return program;
}

export async function main(argv: string[]): Promise<number> {
  // `help <command…>` is `<command…> --help`, answered by the command itself.
  const args = argv[0] === "help" && argv.length > 1 ? [...argv.slice(1), "--help"] : argv;
  const parsed = parseCommandLine(program(), args);
  if (parsed.kind === "help") {
    // Asked for: stdout, exit 0. No command given: the help on stderr, exit 2.
    (parsed.error ? process.stderr : process.stdout).write(parsed.text);
    return parsed.error ? 2 : 0;
  }
  const command = parsed.kind === "parsed" ? COMMANDS[parsed.command.name()] : undefined;
  if (parsed.kind === "usage-error" || command === undefined) {
    const message = parsed.kind === "usage-error" ? parsed.message : "no command given";
    process.stderr.write(`error: ${message}\nRun 'locallmarket --help' for the commands.\n`);
    return 2;
  }
  return command.run(parsed.command.args);
}

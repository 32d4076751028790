/** Dispatches `locallmarket <command>` to the server, the worker agent or the admin client. */
const USAGE = `Usage: locallmarket <command> [options]

Commands:
  server    Run the control plane (OpenAI-compatible API, worker gRPC endpoint, ledger).
  worker    Run a worker: connect to a control plane and sell an engine's tokens.
  admin     Administer a control plane: accounts, keys, worker tokens, deposits, orders.

Run 'locallmarket <command> --help' for a command's options.
`;

export async function main(argv: string[]): Promise<number> {
  const [command, ...rest] = argv;
  switch (command) {
    case "server":
      return (await import("../server/main.js")).runServerCli(rest);
    case "worker":
      return (await import("../worker/cli.js")).runWorkerCli(rest);
    case "admin":
      return (await import("../admin-client/cli.js")).runAdminCli(rest);
    case undefined:
    case "help":
    case "--help":
    case "-h":
      process.stdout.write(USAGE);
      return command === undefined ? 2 : 0;
    default:
      process.stderr.write(`error: unknown command '${command}'\n\n${USAGE}`);
      return 2;
  }
}

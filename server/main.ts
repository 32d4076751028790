/**
 * `locallmarket server`: parses options, starts the control plane, prints where it listens and
 * what to do next, and shuts down gracefully on SIGINT/SIGTERM.
 */
import { parseServerConfig, serverHelp } from "./config.js";
import { startControlPlane } from "./control-plane.js";

export async function runServerCli(argv: string[]): Promise<number> {
  if (argv.includes("--help") || argv.includes("-h")) {
    process.stdout.write(`${serverHelp()}\n`);
    return 0;
  }
  let config: ReturnType<typeof parseServerConfig>;
  try {
    config = parseServerConfig(argv);
  } catch (error) {
    process.stderr.write(
      `error: ${error instanceof Error ? error.message : String(error)}\n\n${serverHelp()}\n`,
    );
    return 2;
  }
  const plane = await startControlPlane(config);
  const grpc = plane.grpcUrl;
  const tokenLine = plane.adminTokenFile
    ? `  admin token:      ${plane.adminToken}\n                    (generated on first start, kept in ${plane.adminTokenFile})`
    : "  admin token:      from LOCALLMARKET_ADMIN_TOKEN / --admin-token, or the admin-token file in the data dir";
  process.stdout.write(
    [
      "",
      "LocalLMarket control plane is up.",
      `  OpenAI API:       ${plane.httpUrl}/v1   (POST /chat/completions, GET /models)`,
      `  worker gRPC:      ${grpc}`,
      `  admin API:        gRPC ${grpc} and Connect/JSON ${plane.httpUrl}`,
      `  database:         ${plane.databaseDescription}`,
      tokenLine,
      "",
      "Next:",
      `  export LOCALLMARKET_ADMIN_TOKEN=${plane.adminTokenFile ? plane.adminToken : "<admin token>"}`,
      `  export LOCALLMARKET_SERVER=${grpc}     # the admin CLI and the worker read it`,
      "  npx locallmarket admin account create --name alice --deposit 10        # a consumer, prints an API key",
      "  npx locallmarket admin account create --name bob                       # a provider",
      "  npx locallmarket admin worker-token create --account <bob's account id>",
      "  npx locallmarket worker --token <worker token> --model llama3.2:1b \\",
      "      --price-in 0.1 --price-out 0.2 --tps 50 --engine openai --engine-url http://127.0.0.1:11434/v1",
      `  curl ${plane.httpUrl}/v1/chat/completions -H "Authorization: Bearer <api key>" \\`,
      `      -H 'content-type: application/json' -d '{"model":"llama3.2:1b","messages":[{"role":"user","content":"Hi"}]}'`,
      "",
    ].join("\n"),
  );
  await new Promise<void>((resolve) => {
    const stop = (signal: string) => {
      process.stdout.write(`\n${signal}: stopping (finishing orders in flight)…\n`);
      resolve();
    };
    process.once("SIGINT", () => stop("SIGINT"));
    process.once("SIGTERM", () => stop("SIGTERM"));
  });
  await plane.close();
  process.stdout.write("stopped.\n");
  return 0;
}

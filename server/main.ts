/**
 * `locallmarket server`: parses options, starts the control plane, prints where it listens and
 * what to do next, and shuts down gracefully on SIGINT/SIGTERM.
 */
import { parseServerConfig, serverHelp } from "./config.js";
import type { ControlPlane } from "./control-plane.js";
import { tightenHeap, useBaselineWasmCompiler } from "./heap.js";
import { DataDirInUseError } from "./store/data-dir-lock.js";

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
      `error: ${error instanceof Error ? error.message : String(error)}\nRun 'locallmarket server --help' for the options.\n`,
    );
    return 2;
  }
  // Before the embedded database's thread compiles PGlite (server/heap.ts).
  const embedded = config.databaseUrl === undefined;
  if (embedded && config.embeddedWasmCompiler === "baseline") useBaselineWasmCompiler();
  // Loaded once the options are good: --help and a usage error answer without the control plane.
  const { startControlPlane } = await import("./control-plane.js");
  let plane: ControlPlane;
  try {
    plane = await startControlPlane(config);
  } catch (error) {
    // A data dir or a port in use is an operator's situation, not a bug: one line, no stack trace.
    if (error instanceof DataDirInUseError) {
      process.stderr.write(`error: ${error.message}\n`);
      return 1;
    }
    if ((error as NodeJS.ErrnoException).syscall === "listen") {
      process.stderr.write(`error: cannot listen: ${(error as Error).message}\n`);
      return 1;
    }
    throw error;
  }
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
      ...(embedded
        ? [
            config.embeddedWasmCompiler === "baseline"
              ? "                    baseline WebAssembly compiler, for memory (--embedded-wasm-compiler optimizing: less CPU)"
              : "                    optimizing WebAssembly compiler, for CPU (--embedded-wasm-compiler baseline: less memory)",
          ]
        : []),
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
  // Start-up's garbage is dead now: on the embedded database, size the heap from what is live.
  if (embedded) tightenHeap();
  let forced = false;
  await new Promise<void>((resolve) => {
    const onSignal = (signal: NodeJS.Signals) => {
      if (!closing) {
        process.stdout.write(
          `\n${signal}: stopping: new requests get 503, workers are drained, running orders may finish within ${config.shutdownGraceMs} ms (${signal} again to cut them now)…\n`,
        );
        closing = plane.close().then(resolve);
        return;
      }
      if (!forced) {
        forced = true;
        process.stdout.write(
          `\n${signal} again: cutting the running orders now (settled at what their consumers received)…\n`,
        );
        void plane.forceClose();
      }
    };
    let closing: Promise<void> | undefined;
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  });
  process.stdout.write(forced ? "stopped (forced).\n" : "stopped: every order settled.\n");
  return forced ? 1 : 0;
}

/**
 * `locallmarket worker`: connects this machine's inference engine to a LocalLMarket control plane.
 *
 * Usable as a library (`runWorkerCli(argv)`, called by bin/locallmarket.js) or directly:
 *   node --import tsx worker/cli.ts --token ... --model ... --engine openai --engine-url ...
 *
 * Exit codes: 0 after a graceful stop (SIGINT/SIGTERM), 1 on a fatal error (token rejected, engine
 * failed to load), 2 on invalid options.
 */
import { existsSync, realpathSync } from "node:fs";
import { pathToFileURL } from "node:url";
import { formatCredits } from "../common/credits.js";
import type { Engine } from "./engines/engine.js";
import { OpenAiEngine } from "./engines/openai-engine.js";
import { AGENT_VERSION, type OfferCapabilities, WorkerLink, WorkerRejectedError } from "./link-client.js";
import { parseWorkerArgs, type WorkerOptions, WorkerOptionsError } from "./options.js";
import { weightsSha256 } from "./weights-hash.js";

/** Where the CLI reads its environment and writes its output (tests replace these). */
export interface WorkerCliIo {
  env?: NodeJS.ProcessEnv;
  /** Receives normal output (usage text). Default: process.stdout. */
  stdout?: (text: string) => void;
  /** Receives log lines and errors. Default: process.stderr. */
  stderr?: (text: string) => void;
  /** Install SIGINT/SIGTERM handlers for a graceful stop. Default true. */
  handleSignals?: boolean;
  /** Called with the link once it is started (tests use it to stop the worker). */
  onLink?: (link: WorkerLink) => void;
}

/** Runs `locallmarket worker` with the given arguments; resolves with the process exit code. */
export async function runWorkerCli(argv: string[], io: WorkerCliIo = {}): Promise<number> {
  const out = io.stdout ?? ((text: string) => process.stdout.write(text));
  const err = io.stderr ?? ((text: string) => process.stderr.write(text));
  const log = (line: string) => err(`${new Date().toISOString()} ${line}\n`);

  let options: WorkerOptions;
  try {
    const parsed = parseWorkerArgs(argv, io.env ?? process.env);
    if (parsed.kind === "help") {
      out(`${parsed.text}\n`);
      return 0;
    }
    options = parsed.options;
  } catch (error) {
    if (error instanceof WorkerOptionsError) {
      err(`locallmarket worker: ${error.message}\nRun "locallmarket worker --help" for usage.\n`);
      return 2;
    }
    throw error;
  }
  if (options.engine.kind === "llama-cpp" && !existsSync(options.engine.modelPath)) {
    err(`locallmarket worker: --model-path: no such file: ${options.engine.modelPath}\n`);
    return 2;
  }

  const engineDescription =
    options.engine.kind === "openai"
      ? `OpenAI-compatible engine at ${options.engine.url} (engine model "${options.engine.model}")`
      : `llama.cpp in process with ${options.engine.modelPath}`;
  log(
    `${AGENT_VERSION}: selling model "${options.model}" from ${engineDescription} ` +
      `to ${options.server} as "${options.name}"; price ${formatCredits(options.pricePerMillionInput)} in / ` +
      `${formatCredits(options.pricePerMillionOutput)} out credits per 1M tokens, ` +
      `concurrency ${options.concurrency}, advertised ${options.tokensPerSecond} tok/s, ` +
      `capabilities: ${describeCapabilities(options.capabilities)}`,
  );

  let engine: Engine;
  let contextLength = options.contextLength;
  // The weights' identity offered on the market: declared for an external engine, computed here
  // from the file for llama-cpp (so what is offered is what is loaded).
  let weights = options.weightsSha256;
  try {
    if (options.engine.kind === "openai") {
      engine = new OpenAiEngine({
        baseUrl: options.engine.url,
        model: options.engine.model,
        ...(options.engine.apiKey ? { apiKey: options.engine.apiKey } : {}),
      });
    } else {
      log(`loading ${options.engine.modelPath}`);
      // Imported lazily: node-llama-cpp is only needed (and only loaded) for this engine.
      const { LlamaCppEngine } = await import("./engines/llama-cpp-engine.js");
      const { engine: llamaOptions } = options;
      // Without --context-size the engine runs with the context offered, if one was given.
      const contextSize =
        llamaOptions.contextSize ?? (options.contextLength > 0 ? options.contextLength : undefined);
      const llamaEngine = await LlamaCppEngine.load({
        modelPath: llamaOptions.modelPath,
        concurrency: options.concurrency,
        gpu: llamaOptions.gpu === "off" ? false : llamaOptions.gpu,
        ...(llamaOptions.threads !== undefined ? { threads: llamaOptions.threads } : {}),
        ...(contextSize !== undefined ? { contextSize } : {}),
      });
      if (contextLength === 0) contextLength = llamaEngine.contextLength;
      log(
        `model loaded on ${llamaEngine.backend === "cpu" ? "the CPU" : llamaEngine.backend} with ` +
          `${llamaEngine.threads} thread(s): context ${llamaEngine.contextLength} tokens x ` +
          `${llamaEngine.concurrency} sequence(s), ` +
          `${llamaEngine.hasChatTemplate ? "chat template from the GGUF" : "no chat template (raw prompt)"}`,
      );
      engine = llamaEngine;
      weights = await weightsSha256(llamaOptions.modelPath);
      log(`weights sha256 ${weights} (${llamaEngine.version})`);
    }
  } catch (error) {
    err(
      `locallmarket worker: cannot start the engine: ${error instanceof Error ? error.message : String(error)}\n`,
    );
    return 1;
  }

  const link = new WorkerLink({
    server: options.server,
    token: options.token,
    name: options.name,
    concurrency: options.concurrency,
    engine,
    log,
    offers: [
      {
        model: options.model,
        pricePerMillionInput: options.pricePerMillionInput,
        pricePerMillionOutput: options.pricePerMillionOutput,
        tokensPerSecond: options.tokensPerSecond,
        maxConcurrency: options.concurrency,
        contextLength,
        engine: engine.name,
        // node-llama-cpp gives token ids and their probabilities: such offers can be audited.
        capabilities: { ...options.capabilities, tokenDetail: options.engine.kind === "llama-cpp" },
        ...(weights ? { weightsSha256: weights } : {}),
        ...(engine.version ? { engineVersion: engine.version } : {}),
      },
    ],
  });

  let signalCount = 0;
  const onSignal = (signal: NodeJS.Signals) => {
    signalCount += 1;
    if (signalCount === 1) {
      log(`received ${signal}: stopping gracefully (send it again to cancel running jobs)`);
      void link.stop(`received ${signal}`);
    } else {
      log(`received ${signal} again: cancelling running jobs`);
      link.cancelAllJobs();
    }
  };
  const handleSignals = io.handleSignals ?? true;
  if (handleSignals) {
    process.on("SIGINT", onSignal);
    process.on("SIGTERM", onSignal);
  }

  let code = 0;
  try {
    const done = link.start();
    io.onLink?.(link);
    await done;
  } catch (error) {
    code = 1;
    if (error instanceof WorkerRejectedError) err(`locallmarket worker: ${error.message}\n`);
    else err(`locallmarket worker: ${error instanceof Error ? error.message : String(error)}\n`);
  } finally {
    if (handleSignals) {
      process.off("SIGINT", onSignal);
      process.off("SIGTERM", onSignal);
    }
    await engine.close().catch(() => undefined);
  }
  return code;
}

function describeCapabilities(capabilities: OfferCapabilities): string {
  const names = Object.entries(capabilities)
    .filter(([, on]) => on)
    .map(([name]) => name);
  return names.length > 0 ? names.join(", ") : "none";
}

function isEntryScript(): boolean {
  const entry = process.argv[1];
  if (!entry) return false;
  try {
    return (
      import.meta.url === pathToFileURL(realpathSync(entry)).href ||
      import.meta.url === pathToFileURL(entry).href
    );
  } catch {
    return false;
  }
}

if (isEntryScript()) {
  runWorkerCli(process.argv.slice(2)).then(
    (code) => {
      process.exitCode = code;
      // Exit even if some library left a handle open; unref'd, so it never delays a clean exit.
      setTimeout(() => process.exit(code), 2_000).unref();
    },
    (error: unknown) => {
      process.stderr.write(
        `locallmarket worker: ${error instanceof Error ? (error.stack ?? error.message) : String(error)}\n`,
      );
      process.exit(1);
    },
  );
}

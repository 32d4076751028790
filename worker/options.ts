/**
 * Command-line and environment options of `locallmarket worker`.
 *
 * Every option can be given on the command line or through its environment variable; the command
 * line wins. Prices are given in credits per one million tokens (decimals allowed, up to 6 places)
 * and converted exactly, with string arithmetic, to integer micro-credits (1 credit = 1,000,000 µc).
 */
import { hostname } from "node:os";
import { parseArgs } from "node:util";
import { parseCredits } from "../server/market/money.js";

/** The engine the worker runs jobs on. */
export type EngineOptions =
  | {
      kind: "openai";
      /** Base URL of the OpenAI-compatible API (e.g. http://127.0.0.1:11434/v1 for Ollama). */
      url: string;
      /** The model name the engine knows; defaults to the offered model name. */
      model: string;
      /** API key for the engine, if it needs one. */
      apiKey?: string;
    }
  | {
      kind: "llama-cpp";
      /** Path of the GGUF file run in process by node-llama-cpp. */
      modelPath: string;
    };

/** Fully validated worker options. */
export interface WorkerOptions {
  /** Control plane URL (gRPC over h2c or TLS), e.g. http://127.0.0.1:50051. */
  server: string;
  /** Worker token issued by the operator (`locallmarket admin worker-token create`). */
  token: string;
  /** The model name consumers ask for, offered on the market. */
  model: string;
  /** Price in micro-credits per one million prompt tokens. */
  pricePerMillionInput: bigint;
  /** Price in micro-credits per one million completion tokens. */
  pricePerMillionOutput: bigint;
  /** Advertised generation speed, tokens per second. */
  tokensPerSecond: number;
  /** Jobs run at once. */
  concurrency: number;
  /** Human-readable machine name shown on the dashboard. */
  name: string;
  /** Context window in tokens; 0 means unknown (the llama.cpp engine then uses the model's). */
  contextLength: number;
  engine: EngineOptions;
}

/** The result of parsing: options to run with, or a request for help. */
export type ParsedWorkerArgs = { kind: "run"; options: WorkerOptions } | { kind: "help"; text: string };

/** A usage error: the message says what is wrong; the CLI exits with code 2. */
export class WorkerOptionsError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "WorkerOptionsError";
  }
}

interface OptionSpec {
  /** Long flag name, without the dashes. */
  flag: string;
  env: string;
  /** Placeholder shown in the usage text; absent for boolean flags. */
  arg?: string;
  description: string;
  /** Default shown in the usage text ("required" when there is none). */
  defaultText: string;
}

/** Every option, in usage order. The CLI contract: keep these names. */
export const WORKER_OPTION_SPECS: readonly OptionSpec[] = [
  {
    flag: "server",
    env: "LOCALLMARKET_SERVER",
    arg: "URL",
    description: "Control plane URL (gRPC; http:// for h2c, https:// for TLS)",
    defaultText: "http://127.0.0.1:50051",
  },
  {
    flag: "token",
    env: "LOCALLMARKET_WORKER_TOKEN",
    arg: "TOKEN",
    description: "Worker token issued by the operator (locallmarket admin worker-token create)",
    defaultText: "required",
  },
  {
    flag: "model",
    env: "LOCALLMARKET_MODEL",
    arg: "NAME",
    description: "Model name offered on the market (what consumers ask for)",
    defaultText: "required",
  },
  {
    flag: "price-in",
    env: "LOCALLMARKET_PRICE_IN",
    arg: "CREDITS",
    description: "Price per 1M prompt tokens, in credits (up to 6 decimals)",
    defaultText: "required",
  },
  {
    flag: "price-out",
    env: "LOCALLMARKET_PRICE_OUT",
    arg: "CREDITS",
    description: "Price per 1M completion tokens, in credits (up to 6 decimals)",
    defaultText: "required",
  },
  {
    flag: "tps",
    env: "LOCALLMARKET_TPS",
    arg: "N",
    description: "Advertised generation speed in tokens per second",
    defaultText: "required",
  },
  {
    flag: "concurrency",
    env: "LOCALLMARKET_CONCURRENCY",
    arg: "K",
    description: "Jobs run at once",
    defaultText: "1",
  },
  {
    flag: "name",
    env: "LOCALLMARKET_WORKER_NAME",
    arg: "NAME",
    description: "Machine name shown on the dashboard",
    defaultText: "the host name",
  },
  {
    flag: "context-length",
    env: "LOCALLMARKET_CONTEXT_LENGTH",
    arg: "N",
    description: "Context window in tokens (0 = unknown; llama-cpp: the model's, at most 4096)",
    defaultText: "0",
  },
  {
    flag: "engine",
    env: "LOCALLMARKET_ENGINE",
    arg: "openai|llama-cpp",
    description: "Inference engine: an OpenAI-compatible server, or a GGUF file in process",
    defaultText: "required",
  },
  {
    flag: "engine-url",
    env: "LOCALLMARKET_ENGINE_URL",
    arg: "URL",
    description: "openai: base URL of the engine's API, e.g. http://127.0.0.1:11434/v1",
    defaultText: "required with --engine openai",
  },
  {
    flag: "engine-model",
    env: "LOCALLMARKET_ENGINE_MODEL",
    arg: "NAME",
    description: "openai: model name on the engine",
    defaultText: "the value of --model",
  },
  {
    flag: "engine-api-key",
    env: "LOCALLMARKET_ENGINE_API_KEY",
    arg: "KEY",
    description: "openai: API key sent to the engine",
    defaultText: "none",
  },
  {
    flag: "model-path",
    env: "LOCALLMARKET_MODEL_PATH",
    arg: "FILE.gguf",
    description: "llama-cpp: path of the GGUF model file",
    defaultText: "required with --engine llama-cpp",
  },
];

export const DEFAULT_SERVER = "http://127.0.0.1:50051";
const INT64_MAX = 9_223_372_036_854_775_807n;
const UINT32_MAX = 4_294_967_295;
const MAX_CONCURRENCY = 1024;

/** The complete usage text printed by `--help`. */
export function workerUsage(): string {
  const lines = [
    "Usage: locallmarket worker --server URL --token WORKER_TOKEN --model NAME",
    "         --price-in CREDITS_PER_1M --price-out CREDITS_PER_1M --tps N",
    "         [--concurrency K] [--name NAME] [--context-length N]",
    "         (--engine openai --engine-url URL [--engine-model NAME] [--engine-api-key KEY]",
    "          | --engine llama-cpp --model-path FILE.gguf)",
    "",
    "Connects this machine to a LocalLMarket control plane and sells LLM inference on it.",
    "Every option can also be set with its environment variable; the command line wins.",
    "",
    "Options:",
  ];
  const left = (spec: OptionSpec) => `  --${spec.flag}${spec.arg ? ` ${spec.arg}` : ""}`;
  const width = Math.max(...WORKER_OPTION_SPECS.map((spec) => left(spec).length), "  -h, --help".length) + 2;
  for (const spec of WORKER_OPTION_SPECS) {
    lines.push(`${left(spec).padEnd(width)}${spec.description}`);
    lines.push(`${"".padEnd(width)}env ${spec.env}; default: ${spec.defaultText}`);
  }
  lines.push(`${"  -h, --help".padEnd(width)}Print this help and exit`);
  lines.push(
    "",
    "Prices are credits per one million tokens; 1 credit = 1,000,000 micro-credits.",
    "Examples:",
    "  locallmarket worker --token wt_... --model llama3.2:1b --price-in 0.5 --price-out 1.5 --tps 40 \\",
    "    --engine openai --engine-url http://127.0.0.1:11434/v1",
    "  locallmarket worker --token wt_... --model stories260k --price-in 0 --price-out 0.1 --tps 2000 \\",
    "    --engine llama-cpp --model-path ./stories260K.gguf",
    "",
    "Exit codes: 0 stopped, 1 fatal error (e.g. token rejected), 2 invalid options.",
  );
  return lines.join("\n");
}

/**
 * Parses a decimal credit amount into micro-credits exactly (the market's own parser), as a
 * WorkerOptionsError naming the option on bad input.
 */
export function creditsToMicroCredits(text: string, what = "amount"): bigint {
  let micro: bigint;
  try {
    micro = parseCredits(text, what);
  } catch (error) {
    throw new WorkerOptionsError(error instanceof Error ? error.message : String(error));
  }
  if (micro > INT64_MAX) throw new WorkerOptionsError(`${what}: "${text}" is too large`);
  return micro;
}

/**
 * Parses `locallmarket worker` arguments (without the program and "worker" words; a leading
 * "worker" is tolerated) and environment variables into validated options.
 * Throws {@link WorkerOptionsError} on missing or invalid options.
 */
export function parseWorkerArgs(
  argv: readonly string[],
  env: NodeJS.ProcessEnv = process.env,
): ParsedWorkerArgs {
  const args = argv[0] === "worker" ? argv.slice(1) : [...argv];
  const optionConfig: Record<string, { type: "string" | "boolean"; short?: string }> = {
    help: { type: "boolean", short: "h" },
  };
  for (const spec of WORKER_OPTION_SPECS) optionConfig[spec.flag] = { type: "string" };

  let values: Record<string, string | boolean | undefined>;
  try {
    ({ values } = parseArgs({ args, options: optionConfig, allowPositionals: false, strict: true }));
  } catch (error) {
    throw new WorkerOptionsError(cleanParseArgsMessage(error));
  }
  if (values.help === true) return { kind: "help", text: workerUsage() };

  const raw = (flag: string): string | undefined => {
    const fromArgs = values[flag];
    if (typeof fromArgs === "string") return fromArgs;
    const spec = WORKER_OPTION_SPECS.find((s) => s.flag === flag);
    const fromEnv = spec ? env[spec.env] : undefined;
    return fromEnv !== undefined && fromEnv !== "" ? fromEnv : undefined;
  };
  const label = (flag: string) => {
    const spec = WORKER_OPTION_SPECS.find((s) => s.flag === flag);
    return spec ? `--${flag} (${spec.env})` : `--${flag}`;
  };
  const required = (flag: string, context = ""): string => {
    const value = raw(flag)?.trim();
    if (!value) throw new WorkerOptionsError(`missing ${label(flag)}${context}`);
    return value;
  };

  const server = checkUrl(raw("server")?.trim() || DEFAULT_SERVER, label("server"));
  const token = required("token");
  const model = required("model");
  const pricePerMillionInput = creditsToMicroCredits(required("price-in"), label("price-in"));
  const pricePerMillionOutput = creditsToMicroCredits(required("price-out"), label("price-out"));

  const tpsText = required("tps");
  const tokensPerSecond = Number(tpsText);
  if (!/^\d+(\.\d+)?$/.test(tpsText) || !Number.isFinite(tokensPerSecond) || tokensPerSecond <= 0) {
    throw new WorkerOptionsError(
      `${label("tps")}: "${tpsText}" must be a positive number of tokens per second`,
    );
  }

  const concurrency = parseInteger(raw("concurrency") ?? "1", label("concurrency"), 1, MAX_CONCURRENCY);
  const contextLength = parseInteger(raw("context-length") ?? "0", label("context-length"), 0, UINT32_MAX);
  const name = raw("name")?.trim() || hostname();

  const engineKind = required("engine", " (openai or llama-cpp)");
  let engine: EngineOptions;
  if (engineKind === "openai") {
    const url = checkUrl(required("engine-url", " (required with --engine openai)"), label("engine-url"));
    const apiKey = raw("engine-api-key");
    engine = {
      kind: "openai",
      url,
      model: raw("engine-model")?.trim() || model,
      ...(apiKey ? { apiKey } : {}),
    };
  } else if (engineKind === "llama-cpp") {
    engine = { kind: "llama-cpp", modelPath: required("model-path", " (required with --engine llama-cpp)") };
  } else {
    throw new WorkerOptionsError(`${label("engine")}: "${engineKind}" is not one of: openai, llama-cpp`);
  }

  return {
    kind: "run",
    options: {
      server,
      token,
      model,
      pricePerMillionInput,
      pricePerMillionOutput,
      tokensPerSecond,
      concurrency,
      name,
      contextLength,
      engine,
    },
  };
}

function parseInteger(text: string, what: string, min: number, max: number): number {
  const value = Number(text.trim());
  if (!/^\d+$/.test(text.trim()) || !Number.isSafeInteger(value) || value < min || value > max) {
    throw new WorkerOptionsError(`${what}: "${text}" must be a whole number from ${min} to ${max}`);
  }
  return value;
}

function checkUrl(text: string, what: string): string {
  let url: URL;
  try {
    url = new URL(text);
  } catch {
    throw new WorkerOptionsError(`${what}: "${text}" is not a valid URL`);
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") {
    throw new WorkerOptionsError(`${what}: "${text}" must be an http:// or https:// URL`);
  }
  return text.replace(/\/+$/, "");
}

function cleanParseArgsMessage(error: unknown): string {
  const message = (error instanceof Error ? error.message : String(error)).replace(/\s*\n\s*/g, " ");
  const unknown = /^Unknown option '(.+?)'/.exec(message);
  if (unknown) return `unknown option ${unknown[1]}`;
  const unexpected = /^Unexpected argument '(.+?)'/.exec(message);
  if (unexpected) return `unexpected argument '${unexpected[1]}' (options are --name value pairs)`;
  return message;
}

/**
 * Command-line and environment options of `locallmarket worker`.
 *
 * Every option can be given on the command line or through its environment variable; the command
 * line wins. Prices are given in credits per one million tokens (decimals allowed, up to 6 places)
 * and converted exactly, with string arithmetic, to integer micro-credits (1 credit = 1,000,000 µc).
 */
import { hostname } from "node:os";
import type { Command } from "commander";
import { declareOption, givenValue, helpText, newProgram, parseCommandLine } from "../common/command-line.js";
import { parseCredits } from "../common/credits.js";
import type { OfferCapabilities } from "./link-client.js";

/** The GPU backend of the llama-cpp engine; "auto" lets node-llama-cpp pick what the machine has. */
export type GpuChoice = "auto" | "cuda" | "vulkan" | "metal" | "off";
const GPU_CHOICES: readonly GpuChoice[] = ["auto", "cuda", "vulkan", "metal", "off"];

/** The names `--capabilities` accepts, as the wire's Capabilities fields. */
const CAPABILITY_NAMES = {
  tools: "tools",
  json_schema: "jsonSchema",
  logprobs: "logprobs",
  vision: "vision",
  completions: "completions",
} as const satisfies Record<string, keyof OfferCapabilities>;

/**
 * What both engines honour by default: the openai engine passes these parameters through (vLLM,
 * llama.cpp's server and Ollama speak them), the llama-cpp engine implements them. Not vision.
 */
export const DEFAULT_CAPABILITIES = "tools,json_schema,logprobs,completions";

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
      /** The GPU backend. */
      gpu: GpuChoice;
      /** CPU threads; absent means node-llama-cpp's choice for the machine. */
      threads?: number;
      /** Context window per sequence, in tokens; absent means the engine's default for the model. */
      contextSize?: number;
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
  /** Context window offered, in tokens; 0 means unknown (the llama.cpp engine then offers its own). */
  contextLength: number;
  /** What the offer supports beyond plain chat. */
  capabilities: OfferCapabilities;
  engine: EngineOptions;
  /** --weights-sha256 (openai engine), lowercase; llama-cpp computes it from the file instead. */
  weightsSha256?: string;
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
    description:
      "Context window offered on the market, in tokens; the market sizes jobs by it (0 = unknown; " +
      "llama-cpp: the context it runs with)",
    defaultText: "0",
  },
  {
    flag: "capabilities",
    env: "LOCALLMARKET_CAPABILITIES",
    arg: "LIST",
    description:
      "What the offer supports beyond plain chat, comma-separated: tools, json_schema, logprobs, " +
      'vision, completions ("none" for nothing). The market sends such requests only to offers ' +
      "declaring them. With --engine openai, narrow it to what the engine honours: vLLM, llama.cpp's " +
      "server and Ollama speak the default; vision needs a vision model",
    defaultText: DEFAULT_CAPABILITIES,
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
    flag: "weights-sha256",
    env: "LOCALLMARKET_WEIGHTS_SHA256",
    arg: "HEX",
    description:
      "openai: SHA-256 of the model file the engine serves (64 hex digits, quantization included), " +
      "shown on the market; audits compare the tokens with a trusted verifier running those weights " +
      "(llama-cpp computes it from the file)",
    defaultText: "undeclared",
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
  {
    flag: "gpu",
    env: "LOCALLMARKET_GPU",
    arg: "auto|cuda|vulkan|metal|off",
    description: "llama-cpp: GPU backend (auto: the best this machine has; off: CPU only)",
    defaultText: "auto",
  },
  {
    flag: "threads",
    env: "LOCALLMARKET_THREADS",
    arg: "N",
    description: "llama-cpp: CPU threads used for inference",
    defaultText: "node-llama-cpp's choice for this machine",
  },
  {
    flag: "context-size",
    env: "LOCALLMARKET_CONTEXT_SIZE",
    arg: "N",
    description: "llama-cpp: context window per running job, in tokens",
    defaultText: "--context-length if given, else the model's training context (at most 4096)",
  },
];

/** Options that only the llama-cpp engine uses. */
const LLAMA_CPP_ONLY = ["gpu", "threads", "context-size"] as const;

export const DEFAULT_SERVER = "http://127.0.0.1:50051";
const INT64_MAX = 9_223_372_036_854_775_807n;
const UINT32_MAX = 4_294_967_295;
const MAX_CONCURRENCY = 1024;
const MAX_THREADS = 1024;

/** `locallmarket worker`'s options, driven by WORKER_OPTION_SPECS: a flag for each row. */
function workerCommand(): Command {
  const command = newProgram("locallmarket worker")
    .usage(
      [
        "--server URL --token WORKER_TOKEN --model NAME",
        "         --price-in CREDITS_PER_1M --price-out CREDITS_PER_1M --tps N",
        "         [--concurrency K] [--name NAME] [--context-length N] [--capabilities LIST]",
        "         (--engine openai --engine-url URL [--engine-model NAME] [--engine-api-key KEY]",
        "           [--weights-sha256 HEX]",
        "          | --engine llama-cpp --model-path FILE.gguf [--gpu auto|cuda|vulkan|metal|off]",
        "            [--threads N] [--context-size N])",
      ].join("\n"),
    )
    .description(
      "Connects this machine to a LocalLMarket control plane and sells LLM inference on it.\n" +
        "Every option can also be set with its environment variable; the command line wins.",
    )
    .addHelpText(
      "after",
      [
        "",
        "Prices are credits per one million tokens; 1 credit = 1,000,000 micro-credits.",
        "Examples:",
        "  locallmarket worker --token wt_... --model llama3.2:1b --price-in 0.5 --price-out 1.5 --tps 40 \\",
        "    --engine openai --engine-url http://127.0.0.1:11434/v1",
        "  locallmarket worker --token wt_... --model stories260k --price-in 0 --price-out 0.1 --tps 2000 \\",
        "    --engine llama-cpp --model-path ./stories260K.gguf --gpu off --threads 1",
        "  (an engine without tool calling: --capabilities logprobs,completions)",
        "",
        "Exit codes: 0 stopped, 1 fatal error (e.g. token rejected), 2 invalid options.",
      ].join("\n"),
    );
  for (const spec of WORKER_OPTION_SPECS) {
    // "required…" is not a default: help says it without "default:".
    const requirement = spec.defaultText.startsWith("required") ? spec.defaultText : undefined;
    command.addOption(
      declareOption({
        flag: spec.flag,
        value: spec.arg,
        description: spec.description,
        env: spec.env,
        defaultText: requirement === undefined ? spec.defaultText : undefined,
        required: requirement === "required" ? true : requirement,
      }),
    );
  }
  return command;
}

/** The complete usage text printed by `--help`. */
export function workerUsage(): string {
  return helpText(workerCommand()).trimEnd();
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
  const parsed = parseCommandLine(workerCommand(), args);
  if (parsed.kind === "usage-error") throw new WorkerOptionsError(parsed.message);
  if (parsed.kind === "help") return { kind: "help", text: parsed.text.trimEnd() };
  const [stray] = parsed.command.args;
  if (stray !== undefined) {
    throw new WorkerOptionsError(`unexpected argument '${stray}' (options are --name value pairs)`);
  }

  const raw = (flag: string): string | undefined => {
    const fromArgs = givenValue(parsed.command, flag);
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
  const capabilities = parseCapabilities(raw("capabilities") ?? DEFAULT_CAPABILITIES, label("capabilities"));

  const engineKind = required("engine", " (openai or llama-cpp)");
  let engine: EngineOptions;
  let weightsText: string | undefined;
  if (engineKind === "openai") {
    for (const flag of LLAMA_CPP_ONLY) {
      if (raw(flag) !== undefined)
        throw new WorkerOptionsError(`${label(flag)} applies only to --engine llama-cpp`);
    }
    const url = checkUrl(required("engine-url", " (required with --engine openai)"), label("engine-url"));
    const apiKey = raw("engine-api-key");
    weightsText = raw("weights-sha256")?.trim();
    if (weightsText !== undefined && !/^[0-9a-fA-F]{64}$/.test(weightsText)) {
      throw new WorkerOptionsError(`${label("weights-sha256")}: "${weightsText}" is not 64 hex digits`);
    }
    engine = {
      kind: "openai",
      url,
      model: raw("engine-model")?.trim() || model,
      ...(apiKey ? { apiKey } : {}),
    };
  } else if (engineKind === "llama-cpp") {
    if (raw("weights-sha256") !== undefined) {
      throw new WorkerOptionsError(
        `${label("weights-sha256")} applies only to --engine openai: llama-cpp computes it from the file`,
      );
    }
    const gpu = (raw("gpu")?.trim() || "auto") as GpuChoice;
    if (!GPU_CHOICES.includes(gpu)) {
      throw new WorkerOptionsError(`${label("gpu")}: "${gpu}" is not one of: ${GPU_CHOICES.join(", ")}`);
    }
    const threads = raw("threads");
    const contextSizeText = raw("context-size");
    const contextSize =
      contextSizeText !== undefined
        ? parseInteger(contextSizeText, label("context-size"), 1, UINT32_MAX)
        : undefined;
    if (contextSize !== undefined && contextLength > contextSize) {
      // An offer must not promise more context than the engine has.
      throw new WorkerOptionsError(
        `${label("context-length")}: ${contextLength} is more than the engine runs with (${label("context-size")} ${contextSize})`,
      );
    }
    engine = {
      kind: "llama-cpp",
      modelPath: required("model-path", " (required with --engine llama-cpp)"),
      gpu,
      ...(threads !== undefined ? { threads: parseInteger(threads, label("threads"), 1, MAX_THREADS) } : {}),
      ...(contextSize !== undefined ? { contextSize } : {}),
    };
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
      capabilities,
      engine,
      ...(weightsText ? { weightsSha256: weightsText.toLowerCase() } : {}),
    },
  };
}

/** Parses `--capabilities`: a comma list of capability names, or "none". */
function parseCapabilities(text: string, what: string): OfferCapabilities {
  const capabilities: OfferCapabilities = {
    tools: false,
    jsonSchema: false,
    logprobs: false,
    vision: false,
    completions: false,
  };
  const names = text
    .split(",")
    .map((name) => name.trim())
    .filter((name) => name !== "");
  if (names.length === 1 && names[0] === "none") return capabilities;
  for (const name of names) {
    if (!Object.hasOwn(CAPABILITY_NAMES, name)) {
      throw new WorkerOptionsError(
        `${what}: "${name}" is not one of: ${Object.keys(CAPABILITY_NAMES).join(", ")} (or "none")`,
      );
    }
    capabilities[CAPABILITY_NAMES[name as keyof typeof CAPABILITY_NAMES]] = true;
  }
  return capabilities;
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

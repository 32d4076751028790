import { describe, expect, it } from "vitest";
import {
  creditsToMicroCredits,
  DEFAULT_SERVER,
  parseWorkerArgs,
  WORKER_OPTION_SPECS,
  type WorkerOptions,
  WorkerOptionsError,
  workerUsage,
} from "../../worker/options.js";

const base = [
  "--token",
  "wt_secret",
  "--model",
  "llama3.2:1b",
  "--price-in",
  "0.5",
  "--price-out",
  "1.25",
  "--tps",
  "42.5",
  "--engine",
  "openai",
  "--engine-url",
  "http://127.0.0.1:11434/v1",
];

const llamaBase = [
  "--token",
  "t",
  "--model",
  "m",
  "--price-in",
  "0",
  "--price-out",
  "0.1",
  "--tps",
  "10",
  "--engine",
  "llama-cpp",
  "--model-path",
  "/m.gguf",
];

const NO_CAPABILITIES = {
  tools: false,
  jsonSchema: false,
  logprobs: false,
  vision: false,
  completions: false,
};
const ALL_CAPABILITIES = { tools: true, jsonSchema: true, logprobs: true, vision: true, completions: true };
const DEFAULT_OFFER_CAPABILITIES = { ...ALL_CAPABILITIES, vision: false };

function parse(argv: string[], env: NodeJS.ProcessEnv = {}): WorkerOptions {
  const parsed = parseWorkerArgs(argv, env);
  if (parsed.kind !== "run") throw new Error("expected options, got help");
  return parsed.options;
}

function parseError(argv: string[], env: NodeJS.ProcessEnv = {}): string {
  try {
    parseWorkerArgs(argv, env);
  } catch (error) {
    expect(error).toBeInstanceOf(WorkerOptionsError);
    return (error as Error).message;
  }
  throw new Error("expected a WorkerOptionsError");
}

describe("creditsToMicroCredits", () => {
  it.each([
    ["0", 0n],
    ["1", 1_000_000n],
    ["0.5", 500_000n],
    ["1.25", 1_250_000n],
    ["0.000001", 1n],
    ["12.345678", 12_345_678n],
    ["0.1", 100_000n],
    ["0.3", 300_000n],
    ["007.50", 7_500_000n],
    ["9223372036854.775807", 9_223_372_036_854_775_807n],
  ])("converts %s credits exactly", (text, micro) => {
    expect(creditsToMicroCredits(text)).toBe(micro);
  });

  it("is exact where floating point is not (0.1 + 0.2, large values)", () => {
    expect(creditsToMicroCredits("0.1") + creditsToMicroCredits("0.2")).toBe(creditsToMicroCredits("0.3"));
    expect(creditsToMicroCredits("123456789012.345679")).toBe(123_456_789_012_345_679n);
  });

  it.each([
    ["0.0000001", /more than 6 decimals/],
    ["1.1234567", /more than 6 decimals/],
    ["-1", /non-negative decimal/],
    ["1e3", /non-negative decimal/],
    [".5", /non-negative decimal/],
    ["5.", /non-negative decimal/],
    ["", /non-negative decimal/],
    [" 1", /non-negative decimal/],
    ["1,5", /non-negative decimal/],
    ["abc", /non-negative decimal/],
    ["9223372036854.775808", /too large/],
  ])("rejects %j", (text, pattern) => {
    expect(() => creditsToMicroCredits(text, "--price-in")).toThrow(pattern);
    expect(() => creditsToMicroCredits(text, "--price-in")).toThrow(WorkerOptionsError);
  });
});

describe("parseWorkerArgs", () => {
  it("parses a complete openai command line with defaults", () => {
    const options = parse(base);
    expect(options).toMatchObject({
      server: DEFAULT_SERVER,
      token: "wt_secret",
      model: "llama3.2:1b",
      pricePerMillionInput: 500_000n,
      pricePerMillionOutput: 1_250_000n,
      tokensPerSecond: 42.5,
      concurrency: 1,
      contextLength: 0,
      engine: { kind: "openai", url: "http://127.0.0.1:11434/v1", model: "llama3.2:1b" },
    });
    expect(options.name.length).toBeGreaterThan(0);
    expect(options.engine).not.toHaveProperty("apiKey");
  });

  it("tolerates a leading 'worker' word", () => {
    expect(parse(["worker", ...base]).model).toBe("llama3.2:1b");
  });

  it("parses every option", () => {
    const options = parse([
      ...base,
      "--server",
      "http://10.0.0.1:6000/",
      "--concurrency",
      "4",
      "--name",
      "box-1",
      "--context-length",
      "8192",
      "--engine-model",
      "llama3.2:1b-instruct-q4",
      "--engine-api-key",
      "sk-local",
    ]);
    expect(options.server).toBe("http://10.0.0.1:6000");
    expect(options.concurrency).toBe(4);
    expect(options.name).toBe("box-1");
    expect(options.contextLength).toBe(8192);
    expect(options.engine).toEqual({
      kind: "openai",
      url: "http://127.0.0.1:11434/v1",
      model: "llama3.2:1b-instruct-q4",
      apiKey: "sk-local",
    });
  });

  it("parses the llama-cpp engine", () => {
    const options = parse([
      "--token",
      "t",
      "--model",
      "stories",
      "--price-in",
      "0",
      "--price-out",
      "0.1",
      "--tps",
      "2000",
      "--engine",
      "llama-cpp",
      "--model-path",
      "/models/stories260K.gguf",
    ]);
    expect(options.engine).toEqual({ kind: "llama-cpp", modelPath: "/models/stories260K.gguf", gpu: "auto" });
    expect(options.pricePerMillionInput).toBe(0n);
    expect(options.pricePerMillionOutput).toBe(100_000n);
    expect(options.capabilities).toEqual(DEFAULT_OFFER_CAPABILITIES);
  });

  it("parses the llama-cpp engine's backend, threads and context size", () => {
    const options = parse([
      ...llamaBase,
      "--gpu",
      "off",
      "--threads",
      "1",
      "--context-size",
      "512",
      "--context-length",
      "256",
    ]);
    expect(options.engine).toEqual({
      kind: "llama-cpp",
      modelPath: "/m.gguf",
      gpu: "off",
      threads: 1,
      contextSize: 512,
    });
    expect(options.contextLength).toBe(256);
    for (const gpu of ["auto", "cuda", "vulkan", "metal"]) {
      expect(parse([...llamaBase, "--gpu", gpu]).engine).toMatchObject({ gpu });
    }
    expect(
      parse(llamaBase, {
        LOCALLMARKET_GPU: "vulkan",
        LOCALLMARKET_THREADS: "3",
        LOCALLMARKET_CONTEXT_SIZE: "1024",
      }).engine,
    ).toEqual({ kind: "llama-cpp", modelPath: "/m.gguf", gpu: "vulkan", threads: 3, contextSize: 1024 });
  });

  it.each([
    [["--gpu", "rocm"], /--gpu \(LOCALLMARKET_GPU\): "rocm" is not one of: auto, cuda, vulkan, metal, off/],
    [["--threads", "0"], /--threads .*whole number from 1/],
    [["--context-size", "0"], /--context-size .*whole number from 1/],
    [
      ["--context-size", "256", "--context-length", "512"],
      /--context-length .*512 is more than the engine runs with .*--context-size .*256/,
    ],
  ])("rejects llama-cpp options %j", (extra, pattern) => {
    expect(parseError([...llamaBase, ...extra])).toMatch(pattern);
  });

  it.each(["--gpu", "--threads", "--context-size"])("rejects %s with --engine openai", (flag) => {
    expect(parseError([...base, flag, flag === "--gpu" ? "off" : "2"])).toMatch(
      new RegExp(`${flag} \\(LOCALLMARKET_[A-Z_]+\\) applies only to --engine llama-cpp`),
    );
  });

  it("declares tools, json_schema, logprobs and completions by default, for both engines", () => {
    expect(parse(base).capabilities).toEqual(DEFAULT_OFFER_CAPABILITIES);
    expect(parse(llamaBase).capabilities).toEqual(DEFAULT_OFFER_CAPABILITIES);
  });

  it.each([
    ["tools", { tools: true }],
    ["json_schema, logprobs", { jsonSchema: true, logprobs: true }],
    ["vision,completions,tools,json_schema,logprobs", ALL_CAPABILITIES],
    ["none", {}],
    ["", {}],
  ])("parses --capabilities %j", (list, declared) => {
    const expected = { ...NO_CAPABILITIES, ...declared };
    expect(parse([...base, "--capabilities", list]).capabilities).toEqual(expected);
    if (list !== "") expect(parse(base, { LOCALLMARKET_CAPABILITIES: list }).capabilities).toEqual(expected);
  });

  it("rejects an unknown capability, naming the ones there are", () => {
    expect(parseError([...base, "--capabilities", "tools,functions"])).toMatch(
      /--capabilities \(LOCALLMARKET_CAPABILITIES\): "functions" is not one of: tools, json_schema, logprobs, vision, completions/,
    );
  });

  it("reads every option from its environment variable; the command line wins", () => {
    const env = {
      LOCALLMARKET_SERVER: "https://market.example",
      LOCALLMARKET_WORKER_TOKEN: "env-token",
      LOCALLMARKET_MODEL: "env-model",
      LOCALLMARKET_PRICE_IN: "2",
      LOCALLMARKET_PRICE_OUT: "3.000001",
      LOCALLMARKET_TPS: "10",
      LOCALLMARKET_CONCURRENCY: "3",
      LOCALLMARKET_WORKER_NAME: "env-name",
      LOCALLMARKET_CONTEXT_LENGTH: "4096",
      LOCALLMARKET_ENGINE: "openai",
      LOCALLMARKET_ENGINE_URL: "http://engine:8000/v1",
      LOCALLMARKET_ENGINE_MODEL: "env-engine-model",
      LOCALLMARKET_ENGINE_API_KEY: "env-key",
      LOCALLMARKET_CAPABILITIES: "tools,logprobs",
    };
    const options = parse([], env);
    expect(options).toEqual({
      server: "https://market.example",
      token: "env-token",
      model: "env-model",
      pricePerMillionInput: 2_000_000n,
      pricePerMillionOutput: 3_000_001n,
      tokensPerSecond: 10,
      concurrency: 3,
      name: "env-name",
      contextLength: 4096,
      capabilities: { ...NO_CAPABILITIES, tools: true, logprobs: true },
      engine: { kind: "openai", url: "http://engine:8000/v1", model: "env-engine-model", apiKey: "env-key" },
    });
    expect(parse(["--token", "cli-token", "--price-in", "0.25"], env)).toMatchObject({
      token: "cli-token",
      pricePerMillionInput: 250_000n,
    });
    expect(
      parse([], { ...env, LOCALLMARKET_ENGINE: "llama-cpp", LOCALLMARKET_MODEL_PATH: "/m.gguf" }).engine,
    ).toEqual({ kind: "llama-cpp", modelPath: "/m.gguf", gpu: "auto" });
  });

  it("returns the usage text for --help and -h, even with other options missing", () => {
    for (const flag of ["--help", "-h"]) {
      const parsed = parseWorkerArgs([flag], {});
      expect(parsed.kind).toBe("help");
      if (parsed.kind === "help") expect(parsed.text).toBe(workerUsage());
    }
  });

  it("documents every option with its environment variable and default in --help", () => {
    const usage = workerUsage();
    // Help wraps long lines; what it says is compared with the spaces and line breaks folded.
    const folded = usage.replace(/\s+/g, " ");
    for (const spec of WORKER_OPTION_SPECS) {
      expect(usage).toContain(`--${spec.flag}`);
      expect(usage).toContain(spec.env);
      // "required…" is said as such, anything else is the default.
      expect(folded).toContain(
        spec.defaultText.startsWith("required")
          ? `(${spec.defaultText}; env: ${spec.env})`
          : `default: ${spec.defaultText}`,
      );
    }
    expect(usage).toMatch(
      /\n {2}--model <NAME> +Model name offered on the market \(what consumers ask for\)\n +\(required; env: LOCALLMARKET_MODEL\)\n/,
    );
    expect(usage).toMatch(/-h, --help\s+show this help/);
    for (const flag of [
      "--server",
      "--token",
      "--price-in",
      "--engine-url",
      "--model-path",
      "--context-length",
      "--capabilities",
      "--gpu",
      "--threads",
      "--context-size",
    ]) {
      expect(usage).toContain(flag);
    }
    // The operator is told to narrow the capabilities to what their engine honours.
    expect(usage.replace(/\s+/g, " ")).toContain(
      "With --engine openai, narrow it to what the engine honours",
    );
    expect(folded).toContain("default: tools,json_schema,logprobs,completions");
  });

  const without = (flag: string) => {
    const i = base.indexOf(flag);
    return [...base.slice(0, i), ...base.slice(i + 2)];
  };

  it.each([
    ["--token", /missing --token \(LOCALLMARKET_WORKER_TOKEN\)/],
    ["--model", /missing --model \(LOCALLMARKET_MODEL\)/],
    ["--price-in", /missing --price-in/],
    ["--price-out", /missing --price-out/],
    ["--tps", /missing --tps/],
    ["--engine", /missing --engine .*openai or llama-cpp/],
    ["--engine-url", /missing --engine-url .*required with --engine openai/],
  ])("reports a missing %s", (flag, pattern) => {
    expect(parseError(without(flag))).toMatch(pattern);
  });

  it.each([
    [["--price-in", "0.1234567"], /--price-in .*more than 6 decimals/],
    [["--price-out=-1"], /--price-out .*"-1" is not a non-negative decimal/],
    [["--price-out", "-1"], /--price-out .*"-1" is not a non-negative decimal/],
    [["--tps", "0"], /--tps .*positive/],
    [["--tps", "fast"], /--tps .*positive/],
    [["--concurrency", "0"], /--concurrency .*from 1 to 1024/],
    [["--concurrency", "1.5"], /--concurrency .*whole number/],
    [["--context-length=-5"], /--context-length .*whole number from 0 to 4294967295/],
    [["--token"], /option '--token <TOKEN>' argument missing/],
    [["--server", "not a url"], /--server .*not a valid URL/],
    [["--server", "ftp://x"], /--server .*http:\/\/ or https:\/\//],
    [["--engine", "vllm"], /--engine .*"vllm" is not one of: openai, llama-cpp/],
    [["--bogus", "1"], /^unknown option '--bogus'$/],
    [["--modle", "m"], /^unknown option '--modle' \(Did you mean --model\?\)$/],
  ])("rejects %j", (extra, pattern) => {
    expect(parseError([...base, ...extra])).toMatch(pattern);
  });

  it("requires --model-path with --engine llama-cpp", () => {
    const argv = [...without("--engine-url").filter((a) => a !== "openai"), "llama-cpp"];
    expect(argv).toContain("--engine");
    expect(parseError(argv)).toMatch(/missing --model-path .*required with --engine llama-cpp/);
  });

  it("rejects stray positional arguments", () => {
    expect(parseError([...base, "extra"])).toMatch(/unexpected argument 'extra'/);
  });
});

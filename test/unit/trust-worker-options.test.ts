/** `locallmarket worker --weights-sha256`: declared for an external engine, computed for llama-cpp. */
import { describe, expect, it } from "vitest";
import { parseWorkerArgs, WorkerOptionsError, workerUsage } from "../../worker/options.js";

const BASE = ["--token", "t", "--model", "m", "--price-in", "1", "--price-out", "2", "--tps", "10"];
const OPENAI = ["--engine", "openai", "--engine-url", "http://127.0.0.1:1/v1"];
const HASH = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";

function error(argv: string[], env: NodeJS.ProcessEnv = {}): string {
  try {
    parseWorkerArgs(argv, env);
  } catch (caught) {
    expect(caught).toBeInstanceOf(WorkerOptionsError);
    return (caught as Error).message;
  }
  throw new Error("expected a WorkerOptionsError");
}

describe("--weights-sha256", () => {
  it("is declared for --engine openai, lowercased, from the flag or LOCALLMARKET_WEIGHTS_SHA256", () => {
    const parsed = parseWorkerArgs([...BASE, ...OPENAI, "--weights-sha256", HASH.toUpperCase()], {});
    expect(parsed.kind === "run" && parsed.options.weightsSha256).toBe(HASH);
    const fromEnv = parseWorkerArgs([...BASE, ...OPENAI], { LOCALLMARKET_WEIGHTS_SHA256: HASH });
    expect(fromEnv.kind === "run" && fromEnv.options.weightsSha256).toBe(HASH);
    const none = parseWorkerArgs([...BASE, ...OPENAI], {});
    expect(none.kind === "run" && none.options.weightsSha256).toBeUndefined();
  });

  it("rejects anything but 64 hex digits, and refuses it with llama-cpp (which computes it)", () => {
    expect(error([...BASE, ...OPENAI, "--weights-sha256", "abc"])).toMatch(/is not 64 hex digits/);
    expect(
      error([...BASE, "--engine", "llama-cpp", "--model-path", "/m.gguf", "--weights-sha256", HASH]),
    ).toMatch(/applies only to --engine openai: llama-cpp computes it from the file/);
  });

  it("is in --help", () => {
    expect(workerUsage()).toMatch(/--weights-sha256 <?HEX>?/);
  });
});

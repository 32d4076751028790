/**
 * `locallmarket server`'s options: the OPTIONS table drives both the parser and `--help`; a flag
 * wins over its env var, which wins over the default; a bad command line is named precisely.
 */
import { describe, expect, it } from "vitest";
import { OPTIONS, parseServerConfig, serverHelp, valueName } from "../../server/config.js";
import { MarketError } from "../../server/market/errors.js";

function parseError(argv: string[], env: NodeJS.ProcessEnv = {}): string {
  try {
    parseServerConfig(argv, env);
  } catch (error) {
    expect(error).toBeInstanceOf(MarketError);
    return (error as Error).message;
  }
  throw new Error("expected a MarketError");
}

describe("parseServerConfig", () => {
  it("takes the flag, else the env var, else the default", () => {
    const env = {
      LOCALLMARKET_HTTP_PORT: "9000",
      LOCALLMARKET_GRPC_PORT: "9001",
      LOCALLMARKET_QUEUE_TIMEOUT: "2m",
    };

    const config = parseServerConfig(["--http-port", "7000", "--host=0.0.0.0"], env);

    expect(config).toMatchObject({
      httpPort: 7000,
      grpcPort: 9001,
      host: "0.0.0.0",
      queueTimeoutMs: 120_000,
    });
    expect(config.feeBasisPoints).toBe(500);
    expect(parseServerConfig([], {}).databaseUrl).toBeUndefined();
  });

  it("reads every option from its flag and from its env var", () => {
    for (const option of OPTIONS) {
      const value =
        option.kind === "string"
          ? "some-value"
          : option.kind === "choice"
            ? (option.choices?.at(-1) ?? "")
            : String(option.min ?? 0);
      const expected = option.kind === "string" || option.kind === "choice" ? value : (option.min ?? 0);
      expect(parseServerConfig([`--${option.flag}`, value], {})[option.key], option.flag).toBe(expected);
      expect(parseServerConfig([], { [option.env]: value })[option.key], option.env).toBe(expected);
    }
  });

  it.each([
    [
      ["--http-port", "70000"],
      /^--http-port \(LOCALLMARKET_HTTP_PORT\) must be an integer from 0 to 65535, got "70000"$/,
    ],
    [["--fee-bps=-1"], /^--fee-bps \(LOCALLMARKET_FEE_BPS\) must be an integer from 0 to 10000, got "-1"$/],
    [
      ["--queue-timeout", "soon"],
      /^--queue-timeout \(LOCALLMARKET_QUEUE_TIMEOUT\) must be a duration such as 500ms.*from 0ms to 1h; got "soon"$/,
    ],
    [["--http-prot", "80"], /^unknown option '--http-prot' \(Did you mean --http-port\?\)$/],
    [["--http-port"], /^option '--http-port <N>' argument missing$/],
    [["8080"], /^unexpected argument '8080'/],
    [
      ["--embedded-wasm-compiler", "turbo"],
      /^--embedded-wasm-compiler \(LOCALLMARKET_EMBEDDED_WASM_COMPILER\) must be one of baseline, optimizing; got "turbo"$/,
    ],
  ])("rejects %j, naming the option and the value", (argv, message) => {
    expect(parseError(argv)).toMatch(message);
  });

  it("compiles the embedded database for memory unless told otherwise", () => {
    expect(parseServerConfig([], {}).embeddedWasmCompiler).toBe("baseline");
    expect(
      parseServerConfig([], { LOCALLMARKET_EMBEDDED_WASM_COMPILER: "optimizing" }).embeddedWasmCompiler,
    ).toBe("optimizing");
  });

  it("checks a value from an env var as it checks a flag's", () => {
    expect(parseError([], { LOCALLMARKET_MAX_QUEUE: "lots" })).toMatch(
      /^--max-queue \(LOCALLMARKET_MAX_QUEUE\) must be an integer from 0 to 1000000, got "lots"$/,
    );
  });
});

describe("serverHelp", () => {
  it("shows every option with its value, env var and default", () => {
    const help = serverHelp();
    // Help wraps long lines; what it says is compared with the spaces and line breaks folded.
    const folded = help.replace(/\s+/g, " ");

    expect(help).toMatch(/^Usage: locallmarket server \[options\]\n/);
    for (const option of OPTIONS) {
      const value = valueName(option);
      expect(help).toContain(`  --${option.flag} <${value}>`);
      expect(folded).toContain(
        option.defaultValue === undefined
          ? `(env: ${option.env})`
          : `(env: ${option.env}; default: ${option.defaultValue})`,
      );
    }
    expect(help).toMatch(/-h, --help +show this help/);
    expect(help).toContain("--embedded-wasm-compiler <baseline|optimizing>");
  });
});

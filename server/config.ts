/**
 * The control plane's options: each one documented once here, reachable by a flag and an env var,
 * with its default. `locallmarket server --help` is generated from this table.
 */
import type { Command } from "commander";
import { declareOption, givenValue, helpText, newProgram, parseCommandLine } from "../common/command-line.js";
import { MarketError } from "./market/errors.js";

export interface ServerConfig {
  host: string;
  httpPort: number;
  grpcPort: number;
  dataDir: string;
  databaseUrl: string | undefined;
  adminToken: string | undefined;
  feeBasisPoints: number;
  heartbeatIntervalMs: number;
  firstTokenTimeoutMs: number;
  jobTimeoutMs: number;
  defaultMaxTokens: number;
  keepAliveMs: number;
  maxBodyBytes: number;
  logLevel: string;
  /** How long a request may wait in its model's queue for a free slot. */
  queueTimeoutMs: number;
  /** Requests waiting per model at most; one more gets 503 with Retry-After. */
  maxQueue: number;
  /** How long a graceful stop lets running streams finish. */
  shutdownGraceMs: number;
  /** How long provider earnings stay pending before they can be withdrawn. */
  settleAfterMs: number;
  /** Share of eligible jobs asked for token detail, in basis points (server/trust/). */
  tokenDetailBasisPoints: number;
  /** Share of eligible jobs audited by a trusted verifier, in basis points (≤ the token-detail share). */
  auditBasisPoints: number;
  /** Share of consumer orders followed by a blind canary, in basis points (server/trust/canary.ts). */
  canaryBasisPoints: number;
  /** A streaming consumer that takes nothing for this long is ended with an error. */
  slowReaderTimeoutMs: number;
  /** How often running orders' relayed token counts are written (a crash loses at most this much). */
  checkpointIntervalMs: number;
  /** A worker stream (or gRPC connection) that says nothing for this long is closed. */
  helloTimeoutMs: number;
  /** An HTTP request's headers must arrive within this long. */
  httpHeadersTimeoutMs: number;
  /** An HTTP request, headers and body, must arrive within this long; the response is not bounded. */
  httpRequestTimeoutMs: number;
  /** An idle kept-alive HTTP connection is closed after this long. */
  httpKeepAliveTimeoutMs: number;
  /** An HTTP connection with no traffic either way for this long is closed. */
  httpIdleTimeoutMs: number;
  /** Open connections per listener at most; more are refused at once. */
  maxConnections: number;
  /** How long a worker that timed out or failed repeatedly is skipped by matching, at first. */
  cooldownMs: number;
  /** Failures in a row a worker may have; the next one cools it down (a first-token timeout at once). */
  allowedFailures: number;
  /** The longest cooldown: each failed probation doubles the previous one up to this. */
  maxCooldownMs: number;
  /** How V8 compiles the embedded database's WebAssembly (see server/heap.ts). */
  embeddedWasmCompiler: "baseline" | "optimizing";
}

export interface OptionSpec {
  key: keyof ServerConfig;
  flag: string;
  env: string;
  defaultValue: string | undefined;
  /** A duration is written as a number with a unit (500ms, 30s, 5m, 24h) and stored in ms. */
  kind: "string" | "integer" | "duration" | "choice";
  /** The values a "choice" accepts. */
  choices?: readonly string[];
  min?: number;
  max?: number;
  help: string;
  secret?: boolean;
}

export const OPTIONS: readonly OptionSpec[] = [
  {
    key: "host",
    flag: "host",
    env: "LOCALLMARKET_HOST",
    defaultValue: "127.0.0.1",
    kind: "string",
    help: "Address both listeners bind to (0.0.0.0 to accept remote workers and consumers).",
  },
  {
    key: "httpPort",
    flag: "http-port",
    env: "LOCALLMARKET_HTTP_PORT",
    defaultValue: "8080",
    kind: "integer",
    min: 0,
    max: 65535,
    help: "HTTP/1.1 port: the OpenAI-compatible API and the admin API over Connect/JSON.",
  },
  {
    key: "grpcPort",
    flag: "grpc-port",
    env: "LOCALLMARKET_GRPC_PORT",
    defaultValue: "50051",
    kind: "integer",
    min: 0,
    max: 65535,
    help: "gRPC (h2c) port: the worker stream and the admin API.",
  },
  {
    key: "dataDir",
    flag: "data-dir",
    env: "LOCALLMARKET_DATA_DIR",
    defaultValue: "./.locallmarket",
    kind: "string",
    help: "Directory for the embedded database and the generated admin token.",
  },
  {
    key: "databaseUrl",
    flag: "database-url",
    env: "DATABASE_URL",
    defaultValue: undefined,
    kind: "string",
    help: "PostgreSQL URL; when unset, an embedded PGlite database lives in the data dir.",
    secret: true,
  },
  {
    key: "adminToken",
    flag: "admin-token",
    env: "LOCALLMARKET_ADMIN_TOKEN",
    defaultValue: undefined,
    kind: "string",
    help: "Admin API token; when unset, one is generated on first start and kept in the data dir.",
    secret: true,
  },
  {
    key: "feeBasisPoints",
    flag: "fee-bps",
    env: "LOCALLMARKET_FEE_BPS",
    defaultValue: "500",
    kind: "integer",
    min: 0,
    max: 10_000,
    help: "Platform fee in basis points of each order's cost (500 = 5%).",
  },
  {
    key: "heartbeatIntervalMs",
    flag: "heartbeat-ms",
    env: "LOCALLMARKET_HEARTBEAT_MS",
    defaultValue: "10000",
    kind: "integer",
    min: 100,
    max: 600_000,
    help: "Heartbeat interval given to workers; 3 missed intervals take a worker offline.",
  },
  {
    key: "firstTokenTimeoutMs",
    flag: "first-token-timeout-ms",
    env: "LOCALLMARKET_FIRST_TOKEN_TIMEOUT_MS",
    defaultValue: "30000",
    kind: "integer",
    min: 100,
    max: 3_600_000,
    help: "A worker with no token after this long is replaced by the next candidate.",
  },
  {
    key: "cooldownMs",
    flag: "cooldown-ms",
    env: "LOCALLMARKET_COOLDOWN_MS",
    defaultValue: "30000",
    kind: "integer",
    min: 10,
    max: 86_400_000,
    help: "A worker that missed the first-token timeout, or failed more than --allowed-failures times in a row, is skipped this long; then one request probes it, and a failed probe doubles the cooldown.",
  },
  {
    key: "allowedFailures",
    flag: "allowed-failures",
    env: "LOCALLMARKET_ALLOWED_FAILURES",
    defaultValue: "3",
    kind: "integer",
    min: 0,
    max: 1000,
    help: "Failures in a row a worker may have; the next one cools it down (a first-token timeout cools it at once).",
  },
  {
    key: "maxCooldownMs",
    flag: "max-cooldown-ms",
    env: "LOCALLMARKET_MAX_COOLDOWN_MS",
    defaultValue: "600000",
    kind: "integer",
    min: 10,
    max: 86_400_000,
    help: "The longest cooldown of a worker that keeps failing its probation.",
  },
  {
    key: "jobTimeoutMs",
    flag: "job-timeout-ms",
    env: "LOCALLMARKET_JOB_TIMEOUT_MS",
    defaultValue: "600000",
    kind: "integer",
    min: 1000,
    max: 86_400_000,
    help: "Longest an order may run before it is stopped and settled.",
  },
  {
    key: "defaultMaxTokens",
    flag: "default-max-tokens",
    env: "LOCALLMARKET_DEFAULT_MAX_TOKENS",
    defaultValue: "4096",
    kind: "integer",
    min: 1,
    max: 1_000_000,
    help: "max_tokens (and the hold) for requests that set none.",
  },
  {
    key: "keepAliveMs",
    flag: "keep-alive-ms",
    env: "LOCALLMARKET_KEEP_ALIVE_MS",
    defaultValue: "5000",
    kind: "integer",
    min: 10,
    max: 600_000,
    help: "While a stream waits for its first token, send an SSE keep-alive comment this often.",
  },
  {
    key: "maxBodyBytes",
    flag: "max-body-bytes",
    env: "LOCALLMARKET_MAX_BODY_BYTES",
    defaultValue: "4194304",
    kind: "integer",
    min: 1024,
    max: 1 << 30,
    help: "Largest accepted request body; larger requests get 413.",
  },
  {
    key: "queueTimeoutMs",
    flag: "queue-timeout",
    env: "LOCALLMARKET_QUEUE_TIMEOUT",
    defaultValue: "30s",
    kind: "duration",
    min: 0,
    max: 3_600_000,
    help: "When every matching worker is busy, a request waits this long for a free slot before 503.",
  },
  {
    key: "maxQueue",
    flag: "max-queue",
    env: "LOCALLMARKET_MAX_QUEUE",
    defaultValue: "1000",
    kind: "integer",
    min: 0,
    max: 1_000_000,
    help: "Requests that may wait per model; past it a request gets 503 with Retry-After at once.",
  },
  {
    key: "shutdownGraceMs",
    flag: "shutdown-grace",
    env: "LOCALLMARKET_SHUTDOWN_GRACE",
    defaultValue: "30s",
    kind: "duration",
    min: 0,
    max: 86_400_000,
    help: "On SIGTERM/SIGINT, how long running streams may finish before they are cut and settled.",
  },
  {
    key: "settleAfterMs",
    flag: "settle-after",
    env: "LOCALLMARKET_SETTLE_AFTER",
    defaultValue: "24h",
    kind: "duration",
    min: 0,
    max: 365 * 86_400_000,
    help: "How long a provider's earnings stay pending (the audit window) before they can be withdrawn.",
  },
  {
    key: "tokenDetailBasisPoints",
    flag: "token-detail-rate",
    env: "LOCALLMARKET_TOKEN_DETAIL_RATE",
    defaultValue: "1000",
    kind: "integer",
    min: 0,
    max: 10_000,
    help:
      "Share of plain jobs (on offers that can give it) asked for per-token detail, in basis points " +
      "(1000 = 10 %); audited jobs are drawn from these afterwards, so workers cannot tell them apart.",
  },
  {
    key: "auditBasisPoints",
    flag: "audit-rate",
    env: "LOCALLMARKET_AUDIT_RATE",
    defaultValue: "200",
    kind: "integer",
    min: 0,
    max: 10_000,
    help:
      "Share of plain jobs audited by a trusted verifier (admin worker trust), in basis points " +
      "(200 = 2 %); at most --token-detail-rate.",
  },
  {
    key: "canaryBasisPoints",
    flag: "canary-rate",
    env: "LOCALLMARKET_CANARY_RATE",
    defaultValue: "50",
    kind: "integer",
    min: 0,
    max: 10_000,
    help:
      "Share of consumer orders followed by a blind canary, in basis points (50 = 0.5 %): a " +
      "platform prompt with a fresh nonce, sent to a worker of the same model like any job, whose " +
      "temperature-0 answer a trusted verifier of the same weights reproduces; never billed.",
  },
  {
    key: "slowReaderTimeoutMs",
    flag: "slow-reader-timeout",
    env: "LOCALLMARKET_SLOW_READER_TIMEOUT",
    defaultValue: "60s",
    kind: "duration",
    min: 100,
    max: 3_600_000,
    help: "A streaming consumer that reads nothing for this long is ended with an error.",
  },
  {
    key: "checkpointIntervalMs",
    flag: "checkpoint-interval",
    env: "LOCALLMARKET_CHECKPOINT_INTERVAL",
    defaultValue: "1s",
    kind: "duration",
    min: 10,
    max: 60_000,
    help: "How often running orders' delivered token counts are saved; a crash bills from the last one.",
  },
  {
    key: "helloTimeoutMs",
    flag: "hello-timeout",
    env: "LOCALLMARKET_HELLO_TIMEOUT",
    defaultValue: "10s",
    kind: "duration",
    min: 100,
    max: 600_000,
    help:
      "A worker stream that sends no Hello within this long is ended with DEADLINE_EXCEEDED, and a " +
      "gRPC connection that opens no stream within this long is closed. Connected workers are never cut.",
  },
  {
    key: "httpHeadersTimeoutMs",
    flag: "http-headers-timeout",
    env: "LOCALLMARKET_HTTP_HEADERS_TIMEOUT",
    defaultValue: "10s",
    kind: "duration",
    min: 100,
    max: 600_000,
    help: "An HTTP client must send a request's headers within this long, or its connection is closed.",
  },
  {
    key: "httpRequestTimeoutMs",
    flag: "http-request-timeout",
    env: "LOCALLMARKET_HTTP_REQUEST_TIMEOUT",
    // 25 s plus node's 1 s check: a slowloris socket is gone within 30 s.
    defaultValue: "25s",
    kind: "duration",
    min: 100,
    max: 3_600_000,
    help:
      "An HTTP client must send a whole request, headers and body, within this long, or it gets 408 and " +
      "its connection is closed. Only receiving is bounded: a streamed answer may last as long as the order.",
  },
  {
    key: "httpKeepAliveTimeoutMs",
    flag: "http-keep-alive-timeout",
    env: "LOCALLMARKET_HTTP_KEEP_ALIVE_TIMEOUT",
    defaultValue: "5s",
    kind: "duration",
    min: 100,
    max: 600_000,
    help: "A kept-alive HTTP connection that starts no new request within this long is closed.",
  },
  {
    key: "httpIdleTimeoutMs",
    flag: "http-idle-timeout",
    env: "LOCALLMARKET_HTTP_IDLE_TIMEOUT",
    defaultValue: "15m",
    kind: "duration",
    min: 1_000,
    max: 86_400_000,
    help:
      "An HTTP connection with no traffic either way for this long is closed. A non-streamed completion " +
      "sends nothing until it is done, so this is never less than --queue-timeout plus --job-timeout-ms.",
  },
  {
    key: "maxConnections",
    flag: "max-connections",
    env: "LOCALLMARKET_MAX_CONNECTIONS",
    defaultValue: "10000",
    kind: "integer",
    min: 1,
    max: 1_000_000,
    help: "Open connections each listener (HTTP and gRPC) accepts at most; more are closed at once.",
  },
  {
    key: "logLevel",
    flag: "log-level",
    env: "LOCALLMARKET_LOG_LEVEL",
    defaultValue: "info",
    kind: "string",
    help: "Log level: fatal, error, warn, info, debug, trace or silent.",
  },
  {
    key: "embeddedWasmCompiler",
    flag: "embedded-wasm-compiler",
    env: "LOCALLMARKET_EMBEDDED_WASM_COMPILER",
    defaultValue: "baseline",
    kind: "choice",
    choices: ["baseline", "optimizing"],
    help:
      "How V8 compiles the embedded database (PGlite's WebAssembly): baseline (Liftoff only: about " +
      "45 MiB less memory) or optimizing (hot code recompiled by TurboFan: about 15 % less database " +
      "CPU per request). Ignored with --database-url.",
  },
];

/** What `--help` shows an option's value as: N, DURATION, its choices (a|b) or VALUE. */
export function valueName(option: OptionSpec): string {
  if (option.kind === "integer") return "N";
  if (option.kind === "duration") return "DURATION";
  if (option.kind === "choice") return (option.choices ?? []).join("|");
  return "VALUE";
}

/** `locallmarket server`'s options, driven by OPTIONS: a flag for each row, its env var in help. */
function serverCommand(): Command {
  const command = newProgram("locallmarket server")
    .description(
      "Runs the control plane: the OpenAI-compatible HTTP API, the worker gRPC endpoint and the ledger.\n" +
        "Every option can also be set with its environment variable; a flag wins over its env var.",
    )
    .addHelpText(
      "after",
      "\nDurations take a unit: 500ms, 30s, 5m, 24h, 7d (a bare number is milliseconds).",
    );
  for (const option of OPTIONS) {
    command.addOption(
      declareOption({
        flag: option.flag,
        value: valueName(option),
        description: option.help,
        env: option.env,
        defaultText: option.defaultValue,
      }),
    );
  }
  return command;
}

/** The text `locallmarket server --help` prints. */
export function serverHelp(): string {
  return helpText(serverCommand()).trimEnd();
}

/**
 * Reads flags, then env vars, then defaults. Throws MarketError("invalid_request") on an unknown
 * option, a stray argument or a bad value; `--help` is the caller's to answer (see serverHelp).
 */
export function parseServerConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): ServerConfig {
  const parsed = parseCommandLine(serverCommand(), argv);
  if (parsed.kind === "usage-error") throw new MarketError("invalid_request", parsed.message);
  if (parsed.kind === "help") {
    throw new MarketError("invalid_request", "--help prints help (serverHelp()), not a configuration");
  }
  const [stray] = parsed.command.args;
  if (stray !== undefined) {
    throw new MarketError(
      "invalid_request",
      `unexpected argument '${stray}' (options are --name value pairs)`,
    );
  }
  const config: Record<string, string | number | undefined> = {};
  for (const option of OPTIONS) {
    const raw =
      (givenValue(parsed.command, option.flag) as string | undefined) ??
      env[option.env] ??
      option.defaultValue;
    if (raw === undefined || raw === "") {
      config[option.key] = undefined;
    } else if (option.kind === "integer") {
      const value = Number(raw);
      if (
        !Number.isInteger(value) ||
        value < (option.min ?? 0) ||
        value > (option.max ?? Number.MAX_SAFE_INTEGER)
      ) {
        throw new MarketError(
          "invalid_request",
          `--${option.flag} (${option.env}) must be an integer from ${option.min} to ${option.max}, got "${raw}"`,
        );
      }
      config[option.key] = value;
    } else if (option.kind === "duration") {
      const value = parseDurationMs(raw);
      if (value === null || value < (option.min ?? 0) || value > (option.max ?? Number.MAX_SAFE_INTEGER)) {
        throw new MarketError(
          "invalid_request",
          `--${option.flag} (${option.env}) must be a duration such as 500ms, 30s, 5m or 24h, from ${formatDurationMs(option.min ?? 0)} to ${formatDurationMs(option.max ?? 0)}; got "${raw}"`,
        );
      }
      config[option.key] = value;
    } else if (option.kind === "choice" && !option.choices?.includes(raw)) {
      throw new MarketError(
        "invalid_request",
        `--${option.flag} (${option.env}) must be one of ${option.choices?.join(", ")}; got "${raw}"`,
      );
    } else {
      config[option.key] = raw;
    }
  }
  return config as unknown as ServerConfig;
}

const DURATION_UNITS_MS: Record<string, number> = { ms: 1, s: 1_000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** "500ms", "30s", "1.5m", "24h", "7d" → milliseconds; a bare number is milliseconds. Null if unparsable. */
export function parseDurationMs(text: string): number | null {
  const match = /^(\d+(?:\.\d+)?)(ms|s|m|h|d)?$/.exec(text.trim());
  if (!match) return null;
  return Math.round(Number(match[1]) * (DURATION_UNITS_MS[match[2] ?? "ms"] ?? 1));
}

function formatDurationMs(ms: number): string {
  for (const unit of ["d", "h", "m", "s"] as const) {
    const size = DURATION_UNITS_MS[unit] as number;
    if (ms >= size && ms % size === 0) return `${ms / size}${unit}`;
  }
  return `${ms}ms`;
}

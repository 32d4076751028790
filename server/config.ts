/**
 * The control plane's options: each one documented once here, reachable by a flag and an env var,
 * with its default. `locallmarket server --help` is generated from this table.
 */
import { parseArgs } from "node:util";
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
}

interface OptionSpec {
  key: keyof ServerConfig;
  flag: string;
  env: string;
  defaultValue: string | undefined;
  kind: "string" | "integer";
  min?: number;
  max?: number;
  help: string;
  secret?: boolean;
}

const OPTIONS: OptionSpec[] = [
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
    key: "logLevel",
    flag: "log-level",
    env: "LOCALLMARKET_LOG_LEVEL",
    defaultValue: "info",
    kind: "string",
    help: "Log level: fatal, error, warn, info, debug, trace or silent.",
  },
];

export function serverHelp(): string {
  const lines = OPTIONS.map((option) => {
    const value = option.kind === "integer" ? "N" : "VALUE";
    const fallback = option.defaultValue === undefined ? "unset" : option.defaultValue;
    return `  --${option.flag} ${value}\n      ${option.help}\n      env ${option.env}; default ${fallback}`;
  });
  return [
    "Usage: locallmarket server [options]",
    "",
    "Runs the control plane: the OpenAI-compatible HTTP API, the worker gRPC endpoint and the ledger.",
    "",
    "Options (a flag wins over its env var):",
    ...lines,
    "  --help\n      Show this help.",
  ].join("\n");
}

/** Reads flags, then env vars, then defaults. Throws MarketError("invalid_request") on a bad value. */
export function parseServerConfig(argv: string[], env: NodeJS.ProcessEnv = process.env): ServerConfig {
  const { values } = parseArgs({
    args: argv,
    options: Object.fromEntries(OPTIONS.map((option) => [option.flag, { type: "string" as const }])),
    strict: true,
    allowPositionals: false,
  });
  const config: Record<string, string | number | undefined> = {};
  for (const option of OPTIONS) {
    const raw = (values[option.flag] as string | undefined) ?? env[option.env] ?? option.defaultValue;
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
    } else {
      config[option.key] = raw;
    }
  }
  return config as unknown as ServerConfig;
}

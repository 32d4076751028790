/**
 * `locallmarket admin …`: the operator's command line, a gRPC client of AdminService.
 *
 * Every command is one row of COMMANDS (name, options, help text, run). Amounts typed on the
 * command line are credits (decimals allowed); amounts printed with --json are micro-credits as
 * decimal strings. Exit codes: 0 success, 1 server error (or a failed ledger audit), 2 usage error.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";
import { stat } from "node:fs/promises";
import { isAbsolute, resolve } from "node:path";
import { toJson } from "@bufbuild/protobuf";
import type { Client } from "@connectrpc/connect";
import type { Command as CommanderCommand } from "commander";
import { declareOption, givenValue, newProgram, parseCommandLine } from "../common/command-line.js";
import { formatCredits, InvalidCreditsError, parseCredits } from "../common/credits.js";
import {
  type Account,
  AdminService,
  type ApiKey,
  AuditLedgerResponseSchema,
  type Balance,
  Book,
  GetAccountResponseSchema,
  GetOrderResponseSchema,
  GetStatementResponseSchema,
  ListAccountsResponseSchema,
  ListApiKeysResponseSchema,
  ListModelsResponseSchema,
  ListOrdersResponseSchema,
  ListWorkersResponseSchema,
  type Order,
  OrderStatus,
  type RegisteredModel,
  RegisterModelResponseSchema,
  RevokeApiKeyResponseSchema,
  type RoutingDefaults,
  type StatementEntry,
  UpdateAccountDefaultsResponseSchema,
} from "../gen/locallmarket/v1/admin_pb.js";
import { adminTokenHeaderInterceptor } from "./token-header.js";
import { WORKER_LIST_HEADERS, workerListRows, workerListTable } from "./worker-list.js";

const PROGRAM = "locallmarket admin";
const DEFAULT_SERVER = "http://127.0.0.1:50051";
const DEFAULT_API_URL = "http://127.0.0.1:8080";
const CALL_TIMEOUT_MS = 30_000;

export interface AdminCliIo {
  /** Receives everything meant for stdout (text ends with "\n"). */
  stdout: (text: string) => void;
  /** Receives errors and diagnostics. */
  stderr: (text: string) => void;
  /** Where LOCALLMARKET_* defaults come from. */
  env: Readonly<Record<string, string | undefined>>;
}

// --- the option and command model ------------------------------------------------------------

interface OptionSpec {
  type: "string" | "boolean";
  /** How a string option's value is shown in help, e.g. "ID". */
  value?: string;
  short?: string;
  description: string;
  required?: boolean;
  env?: string;
  default?: string;
}

type Options = Record<string, OptionSpec>;

class UsageError extends Error {}

type AdminClient = Client<typeof AdminService>;

/** What a command's run() gets: its parsed options, the client and the output. */
class Context {
  constructor(
    readonly client: AdminClient,
    private readonly values: Record<string, string | boolean | undefined>,
    private readonly options: Options,
    private readonly io: AdminCliIo,
    readonly json: boolean,
    readonly server: string,
  ) {}

  /** A string option's value: the flag, else its env var, else its default. */
  text(name: string): string | undefined {
    const spec = this.options[name];
    const flag = this.values[name];
    if (typeof flag === "string") return flag;
    const fromEnv = spec?.env ? nonEmpty(this.io.env[spec.env]) : undefined;
    return fromEnv ?? spec?.default;
  }

  required(name: string): string {
    const value = this.text(name);
    if (value === undefined || value.trim() === "") throw new UsageError(`--${name} is required`);
    return value.trim();
  }

  /** A credit amount typed by the operator, in µc. */
  credits(name: string, rule: "positive" | "non-negative"): bigint | undefined {
    const value = this.text(name);
    if (value === undefined) return undefined;
    const micros = parseCredits(value, `--${name}`);
    if (rule === "positive" && micros <= 0n) throw new UsageError(`--${name} must be more than 0 credits`);
    return micros;
  }

  positiveInteger(name: string): number | undefined {
    const value = this.text(name);
    if (value === undefined) return undefined;
    const number = /^\d+$/.test(value.trim()) ? Number(value) : Number.NaN;
    if (!Number.isSafeInteger(number) || number < 1 || number > 0xffff_ffff) {
      throw new UsageError(`--${name} must be a positive whole number, got "${value}"`);
    }
    return number;
  }

  nonNegativeNumber(name: string): number | undefined {
    const value = this.text(name);
    if (value === undefined) return undefined;
    const number = /^\d+(\.\d+)?$/.test(value.trim()) ? Number(value) : Number.NaN;
    if (!Number.isFinite(number))
      throw new UsageError(`--${name} must be a number, zero or more, got "${value}"`);
    return number;
  }

  /** Prints `human` lines, or `json` as one line of JSON with --json. */
  print(human: () => string[], json: () => unknown): void {
    if (this.json) this.io.stdout(`${stringifyJson(json())}\n`);
    else this.io.stdout(`${human().join("\n")}\n`);
  }
}

interface Command {
  /** One or two words, e.g. "account create". */
  name: string;
  summary: string;
  /** Extra help paragraphs. */
  details?: string[];
  /** What --json prints. */
  jsonOutput: string;
  /** The help's exit-code line, when the command has codes of its own. */
  exitCodes?: string;
  options: Options;
  /** Resolves to the exit code; undefined means 0. */
  run: (ctx: Context) => Promise<number | undefined>;
}

const GLOBAL_OPTIONS: Options = {
  server: {
    type: "string",
    value: "URL",
    description: "the control plane's gRPC address",
    env: "LOCALLMARKET_SERVER",
    default: DEFAULT_SERVER,
  },
  "admin-token": {
    type: "string",
    value: "TOKEN",
    description: "the admin token (printed by the server on its first start, kept in <data-dir>/admin-token)",
    env: "LOCALLMARKET_ADMIN_TOKEN",
  },
  json: { type: "boolean", description: "print one line of JSON; amounts in micro-credits as strings" },
};

const ACCOUNT: OptionSpec = { type: "string", value: "ID", description: "the account's id", required: true };
const LABEL: OptionSpec = { type: "string", value: "LABEL", description: "a label to recognise it by" };
const IDEMPOTENCY_KEY: OptionSpec = {
  type: "string",
  value: "KEY",
  description:
    "a key you choose for this operation: repeating the command with the same key and the same values " +
    "has no further effect and prints the first result; the same key with other values is refused (exit 1)",
};
const EXIT_CODES = "Exit codes: 0 success, 1 server error, 2 usage error.";
const BALANCE_JSON = '{"available":"µc","held":"µc","pending":"µc"}';
const API_URL: OptionSpec = {
  type: "string",
  value: "URL",
  description: "the OpenAI-compatible HTTP API's base URL, used in the printed curl example",
  env: "LOCALLMARKET_API_URL",
  default: DEFAULT_API_URL,
};
const PROTO_JSON = "the response message as proto JSON (camelCase fields, int64 as strings)";

// --- the commands ----------------------------------------------------------------------------

const COMMANDS: Command[] = [
  {
    name: "account create",
    summary: "create an account with a first API key and an optional deposit",
    details: [
      "The API key is printed only once. The account can both consume and provide.",
      "With --idempotency-key, a retry with the same name and deposit creates nothing and prints the",
      'first account again, with an empty API key ("replayed": true); create another key with `key create`.',
    ],
    jsonOutput: `{"accountId":"…","apiKey":"…","name":"…","balance":${BALANCE_JSON},"replayed":false}`,
    options: {
      name: { type: "string", value: "NAME", description: "a display name", required: true },
      deposit: {
        type: "string",
        value: "CREDITS",
        description: "credits to deposit now, decimals allowed",
        default: "0",
      },
      "idempotency-key": IDEMPOTENCY_KEY,
      "api-url": API_URL,
    },
    async run(ctx) {
      const res = await ctx.client.createAccount({
        name: ctx.required("name"),
        initialDeposit: ctx.credits("deposit", "non-negative") ?? 0n,
        idempotencyKey: ctx.text("idempotency-key"),
      });
      const id = res.account?.id ?? "";
      const name = res.account?.name ?? "";
      const balance = balanceJson(res.balance);
      const json = () => ({ accountId: id, apiKey: res.apiKey, name, balance, replayed: res.replayed });
      if (res.replayed) {
        ctx.print(
          () => [
            `Account ${id} ("${name}") was already created with this idempotency key; nothing new was created.`,
            "Its API key was shown only when it was created. To get another one:",
            `  ${PROGRAM} key create --account ${id}`,
            `Balance right after its creation: ${describeBalance(res.balance)}`,
          ],
          json,
        );
        return 0;
      }
      ctx.print(
        () => [
          `Created account ${id} ("${name}").`,
          `API key: ${res.apiKey}`,
          "  It is shown only this once: store it now.",
          `Balance: ${describeBalance(res.balance)}`,
          "",
          "Next:",
          "  Call the API with the key:",
          ...curlExample(ctx.text("api-url") ?? DEFAULT_API_URL, res.apiKey).map((line) => `    ${line}`),
          "  Add credits:",
          `    ${PROGRAM} deposit --account ${id} --amount 10`,
          "  Sell compute with this account (creates the credential a worker connects with):",
          `    ${PROGRAM} worker-token create --account ${id} --label my-gpu`,
        ],
        json,
      );
      return 0;
    },
  },
  {
    name: "account list",
    summary: "list all accounts, newest first",
    jsonOutput: `{"accounts":[…]}, ${PROTO_JSON}`,
    options: {},
    async run(ctx) {
      const res = await ctx.client.listAccounts({});
      ctx.print(
        () =>
          res.accounts.length === 0
            ? ["No accounts yet."]
            : table(
                ["ID", "NAME", "CREATED", "DEFAULTS"],
                res.accounts.map((a) => [
                  a.id,
                  a.name,
                  timestamp(a.createdAtUnixMs),
                  describeDefaults(a.defaults),
                ]),
              ),
        () => toJson(ListAccountsResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "account get",
    summary: "show one account and its balance",
    jsonOutput: `{"account":{…},"balance":{…}}, ${PROTO_JSON}`,
    options: { account: ACCOUNT },
    async run(ctx) {
      const res = await ctx.client.getAccount({ accountId: ctx.required("account") });
      ctx.print(
        () => [...describeAccount(res.account), `Balance:  ${describeBalance(res.balance)}`],
        () => toJson(GetAccountResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "account defaults",
    summary: "set an account's default routing caps (used when a request has no `provider` object)",
    details: ["The caps given replace the old ones entirely: a cap left out is removed."],
    jsonOutput: `{"account":{…}}, ${PROTO_JSON}`,
    options: {
      account: ACCOUNT,
      "max-price-in": {
        type: "string",
        value: "CREDITS_PER_1M",
        description: "highest acceptable price per 1M prompt tokens, credits (default: no cap)",
      },
      "max-price-out": {
        type: "string",
        value: "CREDITS_PER_1M",
        description: "highest acceptable price per 1M completion tokens, credits (default: no cap)",
      },
      "min-tps": {
        type: "string",
        value: "N",
        description: "lowest acceptable throughput, tokens per second (default: no cap)",
      },
    },
    async run(ctx) {
      const res = await ctx.client.updateAccountDefaults({
        accountId: ctx.required("account"),
        defaults: {
          maxPricePerMillionInput: ctx.credits("max-price-in", "non-negative"),
          maxPricePerMillionOutput: ctx.credits("max-price-out", "non-negative"),
          minTokensPerSecond: ctx.nonNegativeNumber("min-tps"),
        },
      });
      ctx.print(
        () => [`Defaults of ${res.account?.id ?? ""}: ${describeDefaults(res.account?.defaults)}`],
        () => toJson(UpdateAccountDefaultsResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "key create",
    summary: "create another API key for an account",
    details: ["The key is printed only once."],
    jsonOutput: '{"apiKey":"…","keyId":"…","accountId":"…","label":"…","prefix":"…"}',
    options: { account: ACCOUNT, label: { ...LABEL, default: "default" }, "api-url": API_URL },
    async run(ctx) {
      const res = await ctx.client.createApiKey({
        accountId: ctx.required("account"),
        label: ctx.text("label"),
      });
      const key = res.key;
      ctx.print(
        () => [
          `Created API key ${key?.id ?? ""} ("${key?.label ?? ""}") for account ${key?.accountId ?? ""}.`,
          `API key: ${res.apiKey}`,
          "  It is shown only this once: store it now.",
          "",
          "Call the API with it:",
          ...curlExample(ctx.text("api-url") ?? DEFAULT_API_URL, res.apiKey).map((line) => `  ${line}`),
        ],
        () => ({
          apiKey: res.apiKey,
          keyId: key?.id ?? "",
          accountId: key?.accountId ?? "",
          label: key?.label ?? "",
          prefix: key?.prefix ?? "",
        }),
      );
      return 0;
    },
  },
  {
    name: "key list",
    summary: "list an account's API keys (never their secrets)",
    jsonOutput: `{"keys":[…]}, ${PROTO_JSON}`,
    options: { account: ACCOUNT },
    async run(ctx) {
      const res = await ctx.client.listApiKeys({ accountId: ctx.required("account") });
      ctx.print(
        () =>
          res.keys.length === 0
            ? ["No API keys."]
            : table(
                ["ID", "LABEL", "PREFIX", "CREATED", "REVOKED"],
                res.keys.map((k) => [
                  k.id,
                  k.label,
                  k.prefix,
                  timestamp(k.createdAtUnixMs),
                  timestamp(k.revokedAtUnixMs),
                ]),
              ),
        () => toJson(ListApiKeysResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "key revoke",
    summary: "revoke an API key; requests with it get 401 from then on",
    jsonOutput: `{"key":{…}}, ${PROTO_JSON}`,
    options: {
      key: { type: "string", value: "KEY_ID", description: "the key's id (not its secret)", required: true },
    },
    async run(ctx) {
      const res = await ctx.client.revokeApiKey({ keyId: ctx.required("key") });
      ctx.print(
        () => [describeRevokedKey(res.key)],
        () => toJson(RevokeApiKeyResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "worker-token create",
    summary: "create a worker token: the credential a worker machine connects with",
    details: [
      "The account is the provider paid for the worker's jobs. The token is printed only once and",
      "always connects as the same worker id.",
    ],
    jsonOutput: '{"workerToken":"…","workerId":"…","accountId":"…"}',
    options: { account: { ...ACCOUNT, value: "ACCOUNT_ID" }, label: { ...LABEL, default: "worker" } },
    async run(ctx) {
      const accountId = ctx.required("account");
      const res = await ctx.client.createWorkerToken({ accountId, label: ctx.text("label") });
      ctx.print(
        () => [
          `Created worker ${res.workerId} for account ${accountId}.`,
          `Worker token: ${res.workerToken}`,
          "  It is shown only this once: give it to the worker machine now.",
          "",
          `Next: on the machine that runs the engine, start a worker (paid into ${accountId}):`,
          `  LOCALLMARKET_WORKER_TOKEN=${res.workerToken} locallmarket worker --server ${ctx.server} \\`,
          "    --model MODEL --price-in CREDITS_PER_1M --price-out CREDITS_PER_1M --tps N",
          "  (`locallmarket worker --help` lists the engine options.)",
          `Then check it is online: ${PROGRAM} workers`,
        ],
        () => ({ workerToken: res.workerToken, workerId: res.workerId, accountId }),
      );
      return 0;
    },
  },
  {
    name: "deposit",
    summary: "add credits to an account from outside the platform",
    jsonOutput: `${BALANCE_JSON} (the balance right after the deposit)`,
    options: {
      account: ACCOUNT,
      amount: {
        type: "string",
        value: "CREDITS",
        description: "credits to add, decimals allowed",
        required: true,
      },
      "idempotency-key": IDEMPOTENCY_KEY,
    },
    async run(ctx) {
      const accountId = ctx.required("account");
      const amount = ctx.credits("amount", "positive") ?? 0n;
      const res = await ctx.client.deposit({
        accountId,
        amount,
        idempotencyKey: ctx.text("idempotency-key"),
      });
      ctx.print(
        () => [
          `Deposited ${formatCredits(amount)} credits into ${accountId}. Balance: ${describeBalance(res.balance)}`,
        ],
        () => balanceJson(res.balance),
      );
      return 0;
    },
  },
  {
    name: "withdraw",
    summary: "pay credits out of an account's available balance",
    details: ["Pending earnings cannot be withdrawn until they mature (the server's --settle-after)."],
    jsonOutput: `${BALANCE_JSON} (the balance right after the withdrawal)`,
    options: {
      account: ACCOUNT,
      amount: {
        type: "string",
        value: "CREDITS",
        description: "credits to pay out, decimals allowed",
        required: true,
      },
      "idempotency-key": IDEMPOTENCY_KEY,
    },
    async run(ctx) {
      const accountId = ctx.required("account");
      const amount = ctx.credits("amount", "positive") ?? 0n;
      const res = await ctx.client.withdraw({
        accountId,
        amount,
        idempotencyKey: ctx.text("idempotency-key"),
      });
      ctx.print(
        () => [
          `Withdrew ${formatCredits(amount)} credits from ${accountId}. Balance: ${describeBalance(res.balance)}`,
        ],
        () => balanceJson(res.balance),
      );
      return 0;
    },
  },
  {
    name: "balance",
    summary: "show an account's balance",
    details: [
      "available: spendable now; held: reserved by orders in flight; pending: provider earnings that",
      "become available once the server's settle-after window (--settle-after, default 24h) has passed.",
    ],
    jsonOutput: BALANCE_JSON,
    options: { account: ACCOUNT },
    async run(ctx) {
      const accountId = ctx.required("account");
      const res = await ctx.client.getBalance({ accountId });
      ctx.print(
        () => [`${accountId}: ${describeBalance(res.balance)}`],
        () => balanceJson(res.balance),
      );
      return 0;
    },
  },
  {
    name: "statement",
    summary: "show an account's ledger entries with running balances, and its orders",
    details: [
      "Entries are the most recent ones, oldest first; each shows the book it moved and that book's",
      "balance right after it. Orders are those the account consumed or served, newest first.",
    ],
    jsonOutput: `{"account":{…},"balance":{…},"entries":[…],"orders":[…]}, ${PROTO_JSON}`,
    options: {
      account: ACCOUNT,
      limit: {
        type: "string",
        value: "N",
        description: "at most this many entries and orders",
        default: "50",
      },
    },
    async run(ctx) {
      const accountId = ctx.required("account");
      const res = await ctx.client.getStatement({ accountId, limit: ctx.positiveInteger("limit") });
      ctx.print(
        () => [
          `Statement of ${accountId} ("${res.account?.name ?? ""}")`,
          `Balance: ${describeBalance(res.balance)}`,
          "",
          ...(res.entries.length === 0
            ? ["No ledger entries."]
            : table(
                ["TIME", "KIND", "ORDER", "BOOK", "AMOUNT", "BALANCE AFTER", "TRANSACTION"],
                res.entries.map(statementRow),
              )),
          "",
          ...(res.orders.length === 0
            ? ["No orders."]
            : table(
                ["ORDER", "ROLE", "STATUS", "MODEL", "TOKENS IN/OUT", "COST", "FEE", "CREATED"],
                res.orders.map((o) => [
                  o.id,
                  o.consumerAccountId === accountId ? "consumer" : "provider",
                  statusName(o.status),
                  o.model,
                  `${o.promptTokens}/${o.completionTokens}`,
                  formatCredits(o.cost),
                  formatCredits(o.fee),
                  timestamp(o.createdAtUnixMs),
                ]),
              )),
        ],
        () => toJson(GetStatementResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "orders",
    summary: "list orders, newest first",
    jsonOutput: `{"orders":[…]}, ${PROTO_JSON}`,
    options: {
      account: {
        type: "string",
        value: "ID",
        description: "only the orders this account consumed or served (default: all)",
      },
      limit: { type: "string", value: "N", description: "at most this many", default: "50" },
    },
    async run(ctx) {
      const res = await ctx.client.listOrders({
        accountId: ctx.text("account"),
        limit: ctx.positiveInteger("limit"),
      });
      ctx.print(
        () =>
          res.orders.length === 0
            ? ["No orders."]
            : table(
                ["ID", "STATUS", "MODEL", "CONSUMER", "WORKER", "TOKENS IN/OUT", "COST", "CREATED"],
                res.orders.map((o) => [
                  o.id,
                  statusName(o.status),
                  o.model,
                  o.consumerAccountId,
                  o.workerId || "-",
                  `${o.promptTokens}/${o.completionTokens}`,
                  formatCredits(o.cost),
                  timestamp(o.createdAtUnixMs),
                ]),
              ),
        () => toJson(ListOrdersResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "order",
    summary: "show one order",
    jsonOutput: `{"order":{…}}, ${PROTO_JSON}`,
    options: { id: { type: "string", value: "ORDER_ID", description: "the order's id", required: true } },
    async run(ctx) {
      const res = await ctx.client.getOrder({ orderId: ctx.required("id") });
      ctx.print(
        () => describeOrder(res.order),
        () => toJson(GetOrderResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "workers",
    summary: "list known workers, their offers and whether they are connected now",
    jsonOutput: `{"workers":[…]}, ${PROTO_JSON}`,
    options: {},
    async run(ctx) {
      const res = await ctx.client.listWorkers({});
      ctx.print(
        () =>
          res.workers.length === 0
            ? ["No workers yet."]
            : table(
                ["ID", "NAME", "ACCOUNT", "STATE", "JOBS", "OFFERS (credits per 1M in/out)", "LAST SEEN"],
                res.workers.map((w) => [
                  w.id,
                  w.name || "-",
                  w.accountId,
                  w.online ? "online" : "offline",
                  String(w.activeJobs),
                  w.offers
                    .map(
                      (o) =>
                        `${o.model} ${formatCredits(o.pricePerMillionInput)}/${formatCredits(o.pricePerMillionOutput)}`,
                    )
                    .join(", ") || "-",
                  timestamp(w.lastSeenUnixMs),
                ]),
              ),
        () => toJson(ListWorkersResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "worker list",
    summary: "list workers per model: advertised and measured speed, reliability, audits, cooldowns",
    details: [
      "One row per worker and model. Speeds and times to first token are timed by the server from",
      "chunk arrival; a worker that timed out or failed repeatedly is 'cooling' (skipped while another",
      "can serve), then on 'probation' until one request shows it answers.",
    ],
    jsonOutput:
      '[{"workerId","accountId","name","model","status","priceIn","priceOut","advertisedTps","measuredTps",' +
      '"ttftMs","successRate","reputation","auditsPassed","auditsFailed","suspended",…}], prices in µc per 1M ' +
      "tokens as strings, figures null until measured",
    options: {},
    async run(ctx) {
      const rows = workerListRows(await ctx.client.listWorkers({}));
      ctx.print(
        () => (rows.length === 0 ? ["No workers yet."] : table(WORKER_LIST_HEADERS, workerListTable(rows))),
        () => rows,
      );
      return 0;
    },
  },
  {
    name: "worker trust",
    summary: "mark a worker as a trusted reference verifier for audits (or --trusted false to withdraw it)",
    details: [
      "Audits send teacher-forced scoring jobs only to connected trusted workers serving the audited",
      "offer's weights SHA-256: run a platform-operated worker with --engine llama-cpp on the reference",
      "GGUF and trust it. The mark survives restarts.",
    ],
    jsonOutput: '{"workerId":"…","trusted":true}',
    options: {
      worker: { type: "string", value: "WORKER_ID", description: "the worker's id", required: true },
      trusted: {
        type: "string",
        value: "true|false",
        description: "trust or withdraw trust",
        default: "true",
      },
    },
    async run(ctx) {
      const flag = ctx.required("trusted");
      if (flag !== "true" && flag !== "false")
        throw new UsageError(`--trusted must be true or false, got "${flag}"`);
      const res = await ctx.client.setWorkerTrusted({
        workerId: ctx.required("worker"),
        trusted: flag === "true",
      });
      ctx.print(
        () => [`Worker ${res.workerId} is ${res.trusted ? "now a trusted verifier" : "no longer trusted"}.`],
        () => ({ workerId: res.workerId, trusted: res.trusted }),
      );
      return 0;
    },
  },
  {
    name: "worker suspend",
    summary: "suspend a worker: never matched, its session ended (Reject BANNED), its token refused",
    details: [
      "Audits suspend a worker on their own after repeated failed tests; this does it by hand. The",
      "worker process stops and does not reconnect; the suspension survives restarts until lifted",
      "with `admin worker unsuspend`.",
    ],
    jsonOutput: '{"workerId":"…","suspended":true}',
    options: {
      worker: { type: "string", value: "WORKER_ID", description: "the worker's id", required: true },
      reason: { type: "string", value: "TEXT", description: "why (shown in the worker list)" },
    },
    async run(ctx) {
      const res = await ctx.client.setWorkerSuspended({
        workerId: ctx.required("worker"),
        suspended: true,
        reason: ctx.text("reason") ?? "",
      });
      ctx.print(
        () => [`Worker ${res.workerId} is suspended.`],
        () => ({ workerId: res.workerId, suspended: res.suspended }),
      );
      return 0;
    },
  },
  {
    name: "worker unsuspend",
    summary: "lift a worker's suspension: its token is accepted again and it can be matched",
    details: [
      "The worker must be started again (a suspended worker stops instead of reconnecting). Its",
      "audit record stays: it is audited at the new-worker rate until it has proven itself again.",
    ],
    jsonOutput: '{"workerId":"…","suspended":false}',
    options: {
      worker: { type: "string", value: "WORKER_ID", description: "the worker's id", required: true },
    },
    async run(ctx) {
      const res = await ctx.client.setWorkerSuspended({ workerId: ctx.required("worker"), suspended: false });
      ctx.print(
        () => [`Worker ${res.workerId} is no longer suspended.`],
        () => ({ workerId: res.workerId, suspended: res.suspended }),
      );
      return 0;
    },
  },
  {
    name: "model register",
    summary: "register a model's tokenizer: the platform then counts and bills that model's tokens itself",
    details: [
      "FILE is a GGUF on the control plane's machine (only its vocabulary is loaded; a model is too big",
      "to send over the admin API, and the server loads it again at every start). When this machine",
      "can read FILE too (the usual case: the same machine or a shared disk), its SHA-256 is computed",
      "here and the server refuses a file that differs. Orders for NAME are then billed by the",
      "platform's own count of the prompt and of the delivered text; the worker's count is only",
      "checked against it. Needs node-llama-cpp installed next to the control plane.",
    ],
    jsonOutput: `{"model":{"name","ggufPath","ggufSha256","tokenizerSha256","active",…}}, ${PROTO_JSON}`,
    options: {
      name: {
        type: "string",
        value: "NAME",
        description: "the model name consumers request and workers offer",
        required: true,
      },
      gguf: {
        type: "string",
        value: "FILE",
        description: "the GGUF's path (as the control plane's machine sees it)",
        required: true,
      },
    },
    async run(ctx) {
      const given = ctx.required("gguf");
      const local = resolve(given);
      const readable = await stat(local).then(
        (file) => file.isFile(),
        () => false,
      );
      if (!readable && !isAbsolute(given)) {
        throw new UsageError(
          `--gguf: no file ${local} here; give the absolute path on the control plane's machine`,
        );
      }
      const path = readable ? local : given;
      const res = await ctx.client.registerModel({
        name: ctx.required("name"),
        ggufPath: path,
        expectedGgufSha256: readable ? await sha256OfFile(path) : "",
      });
      ctx.print(
        () => (res.model ? describeModel(res.model) : ["No model."]),
        () => toJson(RegisterModelResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "model list",
    summary: "list the registered models, their GGUF and tokenizer hashes, and whether they are active",
    jsonOutput: `{"models":[…]}, ${PROTO_JSON}`,
    options: {},
    async run(ctx) {
      const res = await ctx.client.listModels({});
      ctx.print(
        () =>
          res.models.length === 0
            ? ["No registered models: every order's token count is the worker's, byte-bounded (unverified)."]
            : table(
                ["NAME", "STATE", "TOKENIZER", "VOCAB", "GGUF SHA-256", "PATH"],
                res.models.map((m) => [
                  m.name,
                  m.active ? "active" : `inactive (${m.problem})`,
                  `${m.tokenizerModel} ${m.tokenizerSha256.slice(0, 16)}`,
                  String(m.vocabularySize),
                  m.ggufSha256,
                  m.ggufPath,
                ]),
              ),
        () => toJson(ListModelsResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return 0;
    },
  },
  {
    name: "audit-ledger",
    summary: "check the ledger's invariants (exit code 1 when one is violated)",
    details: [
      "Checks that entries sum to zero (in total and per transaction), cached balances equal their",
      "entries, no book is negative, every held amount belongs to a running order, every finished",
      "order was settled exactly once, and matured pending earnings were released.",
      "The report is printed (with or without --json) before exiting 1.",
    ],
    jsonOutput: `{"ok":…,"entriesSum":"…","entryCount":"…","problems":[…]}, ${PROTO_JSON}`,
    exitCodes: "Exit codes: 0 ledger OK, 1 a violated invariant or a server error, 2 usage error.",
    options: {},
    async run(ctx) {
      const res = await ctx.client.auditLedger({});
      ctx.print(
        () => [
          res.ok ? "Ledger OK." : "Ledger NOT OK.",
          `Entries: ${res.entryCount}, sum: ${res.entriesSum} µc`,
          ...res.problems.map((problem) => `  problem: ${problem}`),
        ],
        () => toJson(AuditLedgerResponseSchema, res, { alwaysEmitImplicit: true }),
      );
      return res.ok ? 0 : 1;
    },
  },
];

// --- entry point -----------------------------------------------------------------------------

/** Runs one admin command; resolves to the process exit code. */
export async function runAdminCli(argv: string[], io: Partial<AdminCliIo> = {}): Promise<number> {
  const out: AdminCliIo = {
    stdout: io.stdout ?? ((text) => process.stdout.write(text)),
    stderr: io.stderr ?? ((text) => process.stderr.write(text)),
    env: io.env ?? process.env,
  };
  const usageError = (message: string): number => {
    out.stderr(`error: ${message}\nRun \`${PROGRAM} --help\` for the list of commands.\n`);
    return 2;
  };

  // `help <command>` is `<command> --help`.
  const args = argv[0] === "help" ? [...argv.slice(1), "--help"] : argv;
  const { program, commands } = adminProgram();
  const parsed = parseCommandLine(program, args);
  if (parsed.kind === "help") {
    // Asked for: stdout, exit 0. A command line that names no command: the help on stderr, exit 2.
    (parsed.error ? out.stderr : out.stdout)(parsed.text);
    return parsed.error ? 2 : 0;
  }
  if (parsed.kind === "usage-error") return usageError(parsed.message);
  const command = commands.get(parsed.command);
  if (!command) return usageError("no command given");
  const [stray] = parsed.command.args;
  if (stray !== undefined) return usageError(`unexpected argument '${stray}'`);
  const options = { ...GLOBAL_OPTIONS, ...command.options };
  const values = Object.fromEntries(
    Object.keys(options).map((name) => [name, givenValue(parsed.command, name)]),
  );

  const server =
    typeof values.server === "string"
      ? values.server
      : (nonEmpty(out.env.LOCALLMARKET_SERVER) ?? DEFAULT_SERVER);
  const token =
    typeof values["admin-token"] === "string"
      ? values["admin-token"]
      : nonEmpty(out.env.LOCALLMARKET_ADMIN_TOKEN);
  if (!isHttpUrl(server)) return usageError(`--server must be an http:// or https:// URL, got "${server}"`);
  if (!token) {
    return usageError(
      "no admin token: pass --admin-token or set LOCALLMARKET_ADMIN_TOKEN (the server prints it on its first start)",
    );
  }

  // The gRPC client is loaded only for a command that calls the server (about half of what this
  // module would load at start): --help and usage errors answer without it.
  const [{ Code, ConnectError, createClient }, { createGrpcTransport, Http2SessionManager }] =
    await Promise.all([import("@connectrpc/connect"), import("@connectrpc/connect-node")]);
  const sessionManager = new Http2SessionManager(server);
  const transport = createGrpcTransport({
    baseUrl: server,
    sessionManager,
    interceptors: [adminTokenHeaderInterceptor(token)],
    defaultTimeoutMs: CALL_TIMEOUT_MS,
  });
  const ctx = new Context(
    createClient(AdminService, transport),
    values,
    options,
    out,
    values.json === true,
    server,
  );
  try {
    return (await command.run(ctx)) ?? 0;
  } catch (error) {
    if (error instanceof UsageError || error instanceof InvalidCreditsError) {
      return usageError(error.message);
    }
    if (error instanceof ConnectError) {
      out.stderr(`error: ${error.rawMessage} (${Code[error.code]})\n`);
      const hint = hintFor(Code[error.code], server);
      if (hint) out.stderr(`hint: ${hint}\n`);
      return 1;
    }
    out.stderr(`error: ${error instanceof Error ? error.message : String(error)}\n`);
    return 1;
  } finally {
    sessionManager.abort();
  }
}

/** A hint for a failed call, by its gRPC code's name. */
function hintFor(code: string, server: string): string | undefined {
  switch (code) {
    case "Unavailable":
    case "DeadlineExceeded":
      return `is the control plane running and reachable at ${server}? (--server / LOCALLMARKET_SERVER)`;
    case "Unauthenticated":
      return "check --admin-token / LOCALLMARKET_ADMIN_TOKEN against the token the server printed";
    default:
      return undefined;
  }
}

// --- argument handling -----------------------------------------------------------------------

/**
 * The command line as commander parses it, driven by GLOBAL_OPTIONS and COMMANDS: the global
 * options are the program's (accepted before or after the command), a two-word command is a
 * subcommand of its first word. `commands` maps each parsed command back to its row.
 */
function adminProgram(): { program: CommanderCommand; commands: Map<CommanderCommand, Command> } {
  const program = newProgram(PROGRAM, {
    showGlobalOptions: true,
    // Help lists every command by its full name ("account create"), in the program's help too.
    visibleCommands: (parent) =>
      parent.commands.flatMap((child) => (child.commands.length > 0 ? child.commands : [child])),
    subcommandTerm: (child) =>
      child.parent?.parent ? `${child.parent.name()} ${child.name()}` : child.name(),
  })
    .usage("<command> [options]")
    .description(
      [
        "Operates a LocalLMarket control plane over its admin gRPC API.",
        "Amounts typed on the command line are credits (decimals allowed, e.g. 2.5);",
        "amounts printed with --json are micro-credits (1 credit = 1,000,000 µc) as strings.",
      ].join("\n"),
    )
    .addHelpText(
      "after",
      [
        "",
        `Run \`${PROGRAM} <command> --help\` for a command's options.`,
        "Exit codes: 0 success, 1 server error (or failed ledger audit), 2 usage error.",
      ].join("\n"),
    );
  for (const [name, spec] of Object.entries(GLOBAL_OPTIONS)) program.addOption(optionOf(name, spec));

  const commands = new Map<CommanderCommand, Command>();
  for (const command of COMMANDS) {
    const [first = "", second] = command.name.split(" ");
    let parent = program;
    if (second !== undefined) {
      parent =
        program.commands.find((group) => group.name() === first) ??
        program
          .command(first)
          .usage("<subcommand> [options]")
          .addHelpText("after", `\nRun \`${PROGRAM} ${first} <subcommand> --help\` for its options.`);
    }
    const synopsis = Object.entries(command.options).map(([name, spec]) => {
      const flag = spec.type === "string" ? `--${name} <${spec.value ?? "VALUE"}>` : `--${name}`;
      return spec.required ? flag : `[${flag}]`;
    });
    const leaf = parent
      .command(second ?? first)
      .summary(command.summary)
      .description(
        [
          `${command.summary.charAt(0).toUpperCase()}${command.summary.slice(1)}.`,
          ...(command.details ?? []),
        ].join("\n"),
      )
      .usage([...synopsis, "[global options]"].join(" "))
      .addHelpText(
        "after",
        `\nWith --json, prints: ${command.jsonOutput}\n${command.exitCodes ?? EXIT_CODES}`,
      );
    for (const [name, spec] of Object.entries(command.options)) leaf.addOption(optionOf(name, spec));
    commands.set(leaf, command);
  }
  return { program, commands };
}

function optionOf(flag: string, spec: OptionSpec) {
  return declareOption({
    flag,
    short: spec.short,
    value: spec.type === "string" ? (spec.value ?? "VALUE") : undefined,
    description: spec.description,
    env: spec.env,
    defaultText: spec.default,
    required: spec.required,
  });
}

function nonEmpty(value: string | undefined): string | undefined {
  return value?.trim() ? value.trim() : undefined;
}

function isHttpUrl(text: string): boolean {
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:";
  } catch {
    return false;
  }
}

// --- output ----------------------------------------------------------------------------------

/** JSON.stringify that writes bigints as decimal strings (JSON has no 64-bit integers). */
function stringifyJson(value: unknown): string {
  return JSON.stringify(value, (_key, v: unknown) => (typeof v === "bigint" ? v.toString() : v));
}

function balanceJson(balance: Balance | undefined): { available: string; held: string; pending: string } {
  return {
    available: String(balance?.available ?? 0n),
    held: String(balance?.held ?? 0n),
    pending: String(balance?.pending ?? 0n),
  };
}

function describeBalance(balance: Balance | undefined): string {
  return `${formatCredits(balance?.available ?? 0n)} credits available, ${formatCredits(balance?.held ?? 0n)} held, ${formatCredits(balance?.pending ?? 0n)} pending`;
}

/** Signed credits, so a statement reads as money in and out. */
function signedCredits(micros: bigint): string {
  return micros < 0n ? formatCredits(micros) : `+${formatCredits(micros)}`;
}

function statementRow(entry: StatementEntry): string[] {
  return [
    timestamp(entry.createdAtUnixMs),
    entry.kind,
    entry.orderId || "-",
    (Book[entry.book] ?? "UNSPECIFIED").toLowerCase(),
    signedCredits(entry.amount),
    formatCredits(entry.balanceAfter),
    entry.transactionId,
  ];
}

function describeDefaults(defaults: RoutingDefaults | undefined): string {
  const caps: string[] = [];
  if (defaults?.maxPricePerMillionInput !== undefined) {
    caps.push(`max ${formatCredits(defaults.maxPricePerMillionInput)} credits/1M in`);
  }
  if (defaults?.maxPricePerMillionOutput !== undefined) {
    caps.push(`max ${formatCredits(defaults.maxPricePerMillionOutput)} credits/1M out`);
  }
  if (defaults?.minTokensPerSecond !== undefined) caps.push(`min ${defaults.minTokensPerSecond} tokens/s`);
  return caps.length > 0 ? caps.join(", ") : "no caps";
}

function describeAccount(account: Account | undefined): string[] {
  return [
    `Account:  ${account?.id ?? ""}`,
    `Name:     ${account?.name ?? ""}`,
    `Created:  ${timestamp(account?.createdAtUnixMs ?? 0n)}`,
    `Defaults: ${describeDefaults(account?.defaults)}`,
  ];
}

function describeRevokedKey(key: ApiKey | undefined): string {
  return `Revoked API key ${key?.id ?? ""} ("${key?.label ?? ""}", ${key?.prefix ?? ""}…) of account ${key?.accountId ?? ""} at ${timestamp(key?.revokedAtUnixMs ?? 0n)}.`;
}

function describeOrder(order: Order | undefined): string[] {
  if (!order) return ["No order."];
  return [
    `Order:      ${order.id}`,
    `Status:     ${statusName(order.status)}${order.error ? ` (${order.error})` : ""}`,
    `Model:      ${order.model}`,
    `Consumer:   ${order.consumerAccountId}`,
    `Worker:     ${order.workerId || "-"}${order.providerAccountId ? ` (provider ${order.providerAccountId})` : ""}`,
    `Prices:     ${formatCredits(order.pricePerMillionInput)} in / ${formatCredits(order.pricePerMillionOutput)} out, credits per 1M tokens`,
    `Tokens:     ${order.promptTokens} prompt (bound ${order.promptTokenBound}), ${order.completionTokens} completion`,
    `Hold:       ${formatCredits(order.hold)} credits`,
    `Cost:       ${formatCredits(order.cost)} credits (platform fee ${formatCredits(order.fee)}, ${order.feeBasisPoints} basis points)`,
    `Trust:      ${order.trustSignals.length > 0 ? order.trustSignals.join("; ") : "nothing noticed"}`,
    `Counted:    ${order.tokenCountVerified ? `by the platform (tokenizer of GGUF ${order.tokenCountGgufSha256})` : "by the worker, bounded by bytes (unverified: no registered tokenizer)"}`,
    `Audit:      ${order.auditOutcome ? `${order.auditOutcome} (${order.auditId})${order.auditViolations.length > 0 ? `: ${order.auditViolations.join("; ")}` : ""}` : "not audited"}`,
    `Created:    ${timestamp(order.createdAtUnixMs)}`,
    `First token: ${order.timeToFirstTokenMs > 0 ? `${order.timeToFirstTokenMs} ms` : "-"}`,
    `Duration:   ${order.durationMs > 0 ? `${order.durationMs} ms` : "-"}`,
  ];
}

function describeModel(model: RegisteredModel): string[] {
  return [
    `Model:      ${model.name} (${model.active ? "active: its orders are counted by the platform" : `inactive: ${model.problem}`})`,
    `GGUF:       ${model.ggufPath} (${model.ggufBytes} bytes)`,
    `SHA-256:    ${model.ggufSha256}`,
    `Tokenizer:  ${model.tokenizerModel}, ${model.vocabularySize} tokens, ${model.chatTemplate ? "chat template" : "no chat template"}, SHA-256 ${model.tokenizerSha256}`,
  ];
}

/** The SHA-256 of a local file, hex, read as a stream (a GGUF may be gigabytes). */
async function sha256OfFile(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path)) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

function statusName(status: OrderStatus): string {
  return (OrderStatus[status] ?? "UNSPECIFIED").toLowerCase();
}

function timestamp(unixMs: bigint): string {
  return unixMs > 0n ? new Date(Number(unixMs)).toISOString() : "-";
}

function curlExample(apiUrl: string, apiKey: string): string[] {
  const body = '{"model":"MODEL","messages":[{"role":"user","content":"Hello"}]}';
  return [
    `curl ${apiUrl.replace(/\/+$/, "")}/v1/chat/completions \\`,
    `  -H "Authorization: Bearer ${apiKey}" -H "Content-Type: application/json" \\`,
    `  -d '${body}'`,
  ];
}

function table(headers: string[], rows: string[][]): string[] {
  const widths = headers.map((header, i) =>
    Math.max(header.length, ...rows.map((row) => (row[i] ?? "").length)),
  );
  const line = (cells: string[]) =>
    cells
      .map((cell, i) => (i === cells.length - 1 ? cell : cell.padEnd(widths[i] ?? 0)))
      .join("  ")
      .trimEnd();
  return [line(headers), ...rows.map(line)];
}

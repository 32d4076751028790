/**
 * `locallmarket admin worker list`: one row per worker and model, with what the worker advertises
 * next to what the platform measured of it (the trust contract's flat shape, not the proto's).
 */
import { formatCredits } from "../common/credits.js";
import { type ListWorkersResponse, ReputationState } from "../gen/locallmarket/v1/admin_pb.js";

/** One row of `worker list --json`. Prices are µc per 1M tokens as decimal strings. */
export interface WorkerListRow {
  workerId: string;
  accountId: string;
  name: string;
  /** Empty for a worker that offers nothing and was never tried. */
  model: string;
  /** "suspended", "offline", "cooling", "probation" or "online". */
  status: string;
  priceIn: string | null;
  priceOut: string | null;
  advertisedTps: number | null;
  /** Sustained tokens/s after the first token, timed by the server; null before a timed job. */
  measuredTps: number | null;
  measuredTpsP50: number | null;
  measuredTpsP90: number | null;
  /** Dispatch to first token, ms (decaying average); null before a first token. */
  ttftMs: number | null;
  ttftP50Ms: number | null;
  ttftP90Ms: number | null;
  successRate: number | null;
  attempts: number;
  failures: number;
  reputation: number;
  auditsPassed: number;
  auditsFailed: number;
  suspended: boolean;
  /** Why it is suspended (e.g. the failed audit tests); null when it is not. */
  suspendedReason: string | null;
  /** While cooling, when the cooldown ends (ISO 8601); null otherwise. */
  coolingUntil: string | null;
  activeJobs: number;
}

/** Flattens ListWorkers into one row per worker and model (its offers' models, then others it served). */
export function workerListRows(res: ListWorkersResponse): WorkerListRow[] {
  return res.workers.flatMap((worker) => {
    const models = [
      ...new Set([...worker.offers.map((o) => o.model), ...worker.reputation.map((r) => r.model)]),
    ];
    return (models.length > 0 ? models : [""]).map((model): WorkerListRow => {
      const offer = worker.offers.find((o) => o.model === model);
      const figures = worker.reputation.find((r) => r.model === model);
      const state = figures?.state ?? ReputationState.HEALTHY;
      const status = worker.suspended
        ? "suspended"
        : !worker.online
          ? "offline"
          : state === ReputationState.COOLING
            ? "cooling"
            : state === ReputationState.PROBATION
              ? "probation"
              : "online";
      return {
        workerId: worker.id,
        accountId: worker.accountId,
        name: worker.name,
        model,
        status,
        priceIn: offer ? String(offer.pricePerMillionInput) : null,
        priceOut: offer ? String(offer.pricePerMillionOutput) : null,
        advertisedTps: offer ? offer.advertisedTokensPerSecond : null,
        measuredTps: figures?.measuredTokensPerSecond ?? null,
        measuredTpsP50: figures?.tokensPerSecondP50 ?? null,
        measuredTpsP90: figures?.tokensPerSecondP90 ?? null,
        ttftMs: figures?.timeToFirstTokenMs ?? null,
        ttftP50Ms: figures?.timeToFirstTokenP50Ms ?? null,
        ttftP90Ms: figures?.timeToFirstTokenP90Ms ?? null,
        successRate: figures?.successRate ?? null,
        attempts: figures?.attempts ?? 0,
        failures: figures?.failures ?? 0,
        reputation: figures?.reputation ?? 0,
        auditsPassed: figures?.auditsPassed ?? 0,
        auditsFailed: figures?.auditsFailed ?? 0,
        suspended: worker.suspended,
        suspendedReason: worker.suspended ? worker.suspendedReason || null : null,
        coolingUntil:
          figures && figures.coolingUntilUnixMs > 0n
            ? new Date(Number(figures.coolingUntilUnixMs)).toISOString()
            : null,
        activeJobs: worker.activeJobs,
      };
    });
  });
}

/** The rows as a table for people: prices in credits, figures rounded. */
export function workerListTable(rows: WorkerListRow[]): string[][] {
  const figure = (value: number | null, digits: number) => (value === null ? "-" : value.toFixed(digits));
  return rows.map((row) => [
    row.workerId,
    row.model || "-",
    row.status,
    row.priceIn === null || row.priceOut === null
      ? "-"
      : `${formatCredits(BigInt(row.priceIn))}/${formatCredits(BigInt(row.priceOut))}`,
    row.advertisedTps === null ? "-" : String(row.advertisedTps),
    figure(row.measuredTps, 1),
    figure(row.ttftMs, 0),
    row.successRate === null ? "-" : `${(row.successRate * 100).toFixed(0)}%`,
    row.reputation.toFixed(2),
    `${row.auditsPassed}/${row.auditsFailed}`,
  ]);
}

export const WORKER_LIST_HEADERS = [
  "ID",
  "MODEL",
  "STATUS",
  "PRICE IN/OUT",
  "ADV TPS",
  "TPS",
  "TTFT MS",
  "SUCCESS",
  "REPUTATION",
  "AUDITS OK/FAIL",
];

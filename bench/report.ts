/**
 * Measurement helpers and the report: progress lines while running, one table at the end.
 */

export interface Row {
  benchmark: string;
  metric: string;
  value: string;
  unit: string;
}

const startedAt = performance.now();

/** A progress line, stamped with the seconds since the run started. */
export function progress(message: string): void {
  const seconds = ((performance.now() - startedAt) / 1000).toFixed(1).padStart(6);
  process.stdout.write(`[${seconds} s] ${message}\n`);
}

export class Report {
  readonly rows: Row[] = [];
  /** Set when a benchmark failed or a money invariant broke: the run exits non-zero. */
  failed = false;

  add(benchmark: string, metric: string, value: number | string, unit = "", digits = 1): void {
    const text = typeof value === "number" ? formatNumber(value, digits) : value;
    this.rows.push({ benchmark, metric, value: text, unit });
    progress(`${benchmark}: ${metric} = ${text}${unit ? ` ${unit}` : ""}`);
  }

  table(): string {
    const header: Row = { benchmark: "benchmark", metric: "metric", value: "value", unit: "unit" };
    const all = [header, ...this.rows];
    const width = (key: keyof Row) => Math.max(...all.map((row) => row[key].length));
    const widths = { benchmark: width("benchmark"), metric: width("metric"), value: width("value") };
    const line = (row: Row) =>
      `${row.benchmark.padEnd(widths.benchmark)}  ${row.metric.padEnd(widths.metric)}  ${row.value.padStart(widths.value)}  ${row.unit}`.trimEnd();
    const rule = "-".repeat(widths.benchmark + widths.metric + widths.value + 12);
    return [line(header), rule, ...this.rows.map(line)].join("\n");
  }
}

export function formatNumber(value: number, digits = 1): string {
  if (!Number.isFinite(value)) return String(value);
  return value.toLocaleString("en-US", { minimumFractionDigits: digits, maximumFractionDigits: digits });
}

/** Nearest-rank percentile (p in 0..100) of unsorted samples. */
export function percentile(samples: readonly number[], p: number): number {
  if (samples.length === 0) return Number.NaN;
  const sorted = [...samples].sort((a, b) => a - b);
  const rank = Math.min(sorted.length, Math.max(1, Math.ceil((p / 100) * sorted.length)));
  return sorted[rank - 1] as number;
}

export function median(samples: readonly number[]): number {
  return percentile(samples, 50);
}

export function mib(bytes: number): number {
  return bytes / (1024 * 1024);
}

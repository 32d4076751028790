/**
 * Ledger: SqlMarketStore on its own, no HTTP or workers. One settlement = openOrder (the hold:
 * consumer available → held) then settleOrder (the store computes the bill from the order row:
 * held → provider's pending book, platform fee, change back), each one SQL statement; concurrent
 * ones share transactions (group commit). Sequential (each its own transaction), then
 * `--ledger-lanes` lanes at once and four times as many (16 and 64 by default; each lane its own
 * consumer, every settlement also locks the one provider and the platform account). The latency of
 * a settlement is the open's plus the settle's, as a lane sees it. Also reported: the mean number
 * of opens and settlements per committed batch, and the CPU time per settlement of this process
 * (on PGlite that includes the database) and, when the PostgreSQL server runs on this machine, of
 * its backends. Always on embedded PGlite; also on PostgreSQL when DATABASE_URL is set.
 */
import { randomBytes } from "node:crypto";
import { readFile } from "node:fs/promises";
import type { MikroORM } from "@mikro-orm/postgresql";
import { PLATFORM_ACCOUNT_ID } from "../server/market/store-port.js";
import { SqlMarketStore } from "../server/store/market-store.js";
import { openTestStore, type TestStore } from "../test/support/database.js";
import type { BenchContext } from "./context.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "ledger";
const HOLD = 10_000n;
/** 1,000 prompt tokens at 1 credit/M plus 1,000 completion tokens at 2 credits/M. */
const COST = 3_000n;
const FEE_BASIS_POINTS = 500;
const FEE = 150n;
/** A concurrent series runs at least this many settlements per lane, so it reaches a steady state. */
const MIN_PER_LANE = 25;

interface Target {
  label: string;
  open(): Promise<TestStore>;
}

export async function ledgerBenchmark(context: BenchContext, report: Report): Promise<void> {
  const targets: Target[] = [{ label: "PGlite", open: () => openTestStore(null) }];
  if (process.env.DATABASE_URL) targets.push({ label: "PostgreSQL", open: () => openTestStore() });
  else progress(`${NAME}: DATABASE_URL is not set, so PostgreSQL is skipped`);
  for (const target of targets) await benchTarget(target, context, report);
}

async function benchTarget(target: Target, context: BenchContext, report: Report): Promise<void> {
  const { ledgerOrders: orders, ledgerLanes } = context.config;
  const laneCounts = [...new Set([ledgerLanes, 4 * ledgerLanes])];
  const lanes = Math.max(...laneCounts);
  const started = performance.now();
  const opened = await target.open();
  progress(
    `${NAME}: ${target.label} store open (fresh database, migrated) in ${Math.round(performance.now() - started)} ms`,
  );
  // A store of its own on the same database, counting the items of each batch it commits.
  let batches = 0;
  let batchedItems = 0;
  const store = new SqlMarketStore(opened.orm, {
    groupCommit: {
      beforeBatch: (size) => {
        batches += 1;
        batchedItems += size;
      },
    },
  });
  const close = async () => {
    await store.close();
    await opened.close();
  };
  try {
    const provider = await store.createAccount({ name: "ledger-provider" });
    const { workerId } = await store.createWorkerToken(provider.id, "ledger-worker");
    const consumers = await Promise.all(
      Array.from({ length: lanes }, async (_, i) => {
        const account = await store.createAccount({ name: `ledger-consumer-${i}` });
        await store.deposit(account.id, 1_000_000_000n);
        const { key } = await store.createApiKey(account.id, "bench");
        return { accountId: account.id, apiKeyId: key.id };
      }),
    );
    const platformBefore = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available;

    const settleOne = async (consumer: { accountId: string; apiKeyId: string }) => {
      const start = performance.now();
      const id = `chatcmpl-bench${randomBytes(9).toString("base64url")}`;
      await store.openOrder({
        id,
        consumerAccountId: consumer.accountId,
        apiKeyId: consumer.apiKeyId,
        model: "bench-ledger",
        workerId,
        providerAccountId: provider.id,
        pricePerMillionInput: 1_000_000n,
        pricePerMillionOutput: 2_000_000n,
        hold: HOLD,
        maxTokens: 5_000,
        promptTokenBound: 2_000,
        feeBasisPoints: FEE_BASIS_POINTS,
      });
      const order = await store.settleOrder(id, {
        status: "completed",
        promptTokens: 1_000,
        completionTokens: 1_000,
        reportedPromptTokens: 1_000,
        reportedCompletionTokens: 1_000,
        trustSignals: [],
        finishReason: "stop",
        error: null,
        firstTokenAt: new Date(),
        finishedAt: new Date(),
      });
      if (order.status !== "completed" || order.cost !== COST) throw new Error(`order ${id} did not settle`);
      return performance.now() - start;
    };

    // Warm-up (connection pool, prepared plans).
    for (let i = 0; i < 20; i++) await settleOne(consumers[0] as (typeof consumers)[number]);

    const sequential: number[] = [];
    let begun = performance.now();
    for (let i = 0; i < orders; i++)
      sequential.push(await settleOne(consumers[0] as (typeof consumers)[number]));
    const sequentialSeconds = (performance.now() - begun) / 1000;
    progress(
      `${NAME}: ${target.label}, ${orders} sequential settlements in ${Math.round(sequentialSeconds * 1000)} ms`,
    );

    report.add(NAME, `${target.label}, sequential`, orders / sequentialSeconds, "settlements/s", 0);
    report.add(NAME, `${target.label}, sequential, p50 / p99 per settlement`, pair(sequential), "ms");

    let settledConcurrently = 0;
    for (const laneCount of laneCounts) {
      const perLane = Math.max(MIN_PER_LANE, Math.ceil(orders / laneCount));
      const concurrent: number[] = [];
      const batchesBefore = batches;
      const itemsBefore = batchedItems;
      const databaseBefore = await databaseCpuMs(opened.orm, target.label);
      const cpuBefore = process.cpuUsage();
      begun = performance.now();
      await Promise.all(
        consumers.slice(0, laneCount).map(async (consumer) => {
          for (let i = 0; i < perLane; i++) {
            const took = await settleOne(consumer);
            concurrent.push(took);
          }
        }),
      );
      const concurrentSeconds = (performance.now() - begun) / 1000;
      const cpu = process.cpuUsage(cpuBefore);
      const databaseAfter = await databaseCpuMs(opened.orm, target.label);
      settledConcurrently += laneCount * perLane;
      progress(
        `${NAME}: ${target.label}, ${laneCount} × ${perLane} concurrent settlements in ${Math.round(concurrentSeconds * 1000)} ms`,
      );
      report.add(
        NAME,
        `${target.label}, ${laneCount} concurrent`,
        (laneCount * perLane) / concurrentSeconds,
        "settlements/s",
        0,
      );
      report.add(
        NAME,
        `${target.label}, ${laneCount} concurrent, p50 / p99 per settlement`,
        pair(concurrent),
        "ms",
      );
      report.add(
        NAME,
        `${target.label}, ${laneCount} concurrent, opens + settlements per transaction`,
        (batchedItems - itemsBefore) / Math.max(1, batches - batchesBefore),
        "mean",
      );
      const perSettlement = (cpuMs: number) => (cpuMs * 1000) / (laneCount * perLane);
      report.add(
        NAME,
        `${target.label}, ${laneCount} concurrent, CPU per settlement, this process`,
        perSettlement((cpu.user + cpu.system) / 1000),
        "µs",
        0,
      );
      if (databaseBefore !== null && databaseAfter !== null) {
        report.add(
          NAME,
          `${target.label}, ${laneCount} concurrent, CPU per settlement, database backends`,
          perSettlement(databaseAfter - databaseBefore),
          "µs",
          0,
        );
      }
    }

    const settled = BigInt(20 + orders + settledConcurrently);
    const audit = await store.auditLedger();
    const platformGot = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available - platformBefore;
    // Earnings wait in the pending book for the settle-after window (24 h by default).
    const providerGot = (await store.getBalance(provider.id)).pending;
    const exact = platformGot === settled * FEE && providerGot === settled * (COST - FEE);
    report.add(
      NAME,
      `${target.label}, ledger audit and exact totals`,
      audit.ok && exact ? "ok" : "FAILED",
      `${audit.entryCount} entries, sum ${audit.entriesSum} µc`,
    );
    for (const problem of audit.problems) progress(`${NAME}: audit problem: ${problem}`);
    if (!exact) {
      progress(
        `${NAME}: money invariant broken: platform got ${platformGot} µc (expected ${settled * FEE}), provider ${providerGot} µc (expected ${settled * (COST - FEE)})`,
      );
    }
    if (!audit.ok || !exact) report.failed = true;
  } finally {
    await close();
  }
}

function pair(samples: number[]): string {
  return [50, 99].map((p) => percentile(samples, p).toFixed(2)).join(" / ");
}

/**
 * CPU time (ms) used so far by the PostgreSQL backends serving this database, read from /proc: only
 * when the server runs on this machine (Linux). Null on PGlite (it runs in this process) or when
 * the backends cannot be read.
 */
async function databaseCpuMs(orm: MikroORM, label: string): Promise<number | null> {
  if (label === "PGlite" || process.platform !== "linux") return null;
  const rows = await orm.em
    .getConnection()
    .execute<{ pid: number }[]>("select pid from pg_stat_activity where datname = current_database()");
  let ticks = 0;
  for (const { pid } of rows) {
    try {
      const command = await readFile(`/proc/${pid}/cmdline`, "utf8");
      if (!command.includes("postgres")) return null;
      // Fields after the command name: utime and stime are the 12th and 13th (clock ticks).
      const fields = (await readFile(`/proc/${pid}/stat`, "utf8")).split(") ")[1]?.split(" ") ?? [];
      ticks += Number(fields[11]) + Number(fields[12]);
    } catch {
      return null;
    }
  }
  // USER_HZ is 100 on Linux.
  return ticks * 10;
}

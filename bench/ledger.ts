/**
 * Ledger: SqlMarketStore on its own, no HTTP or workers. One settlement = openOrder (the hold:
 * consumer available → held) then settleOrder (the store computes the bill from the order row:
 * held → provider's pending book, platform fee, change back), each
 * its own database transaction with row locks. Sequential, then several lanes at once (each lane
 * its own consumer; every settlement also locks the one provider and the platform account).
 * Always on embedded PGlite; also on PostgreSQL when DATABASE_URL is set.
 */
import { randomBytes } from "node:crypto";
import { PLATFORM_ACCOUNT_ID } from "../server/market/store-port.js";
import type { SqlMarketStore } from "../server/store/market-store.js";
import { openTestStore } from "../test/support/database.js";
import type { BenchContext } from "./context.js";
import { percentile, progress, type Report } from "./report.js";

const NAME = "ledger";
const HOLD = 10_000n;
/** 1,000 prompt tokens at 1 credit/M plus 1,000 completion tokens at 2 credits/M. */
const COST = 3_000n;
const FEE_BASIS_POINTS = 500;
const FEE = 150n;

interface Target {
  label: string;
  open(): Promise<{ store: SqlMarketStore; close(): Promise<void> }>;
}

export async function ledgerBenchmark(context: BenchContext, report: Report): Promise<void> {
  const targets: Target[] = [{ label: "PGlite", open: () => openTestStore(null) }];
  if (process.env.DATABASE_URL) targets.push({ label: "PostgreSQL", open: () => openTestStore() });
  else progress(`${NAME}: DATABASE_URL is not set, so PostgreSQL is skipped`);
  for (const target of targets) await benchTarget(target, context, report);
}

async function benchTarget(target: Target, context: BenchContext, report: Report): Promise<void> {
  const { ledgerOrders: orders, ledgerLanes: lanes } = context.config;
  const started = performance.now();
  const { store, close } = await target.open();
  progress(
    `${NAME}: ${target.label} store open (fresh database, migrated) in ${Math.round(performance.now() - started)} ms`,
  );
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

    const perLane = Math.ceil(orders / lanes);
    const concurrent: number[] = [];
    begun = performance.now();
    await Promise.all(
      consumers.map(async (consumer) => {
        for (let i = 0; i < perLane; i++) concurrent.push(await settleOne(consumer));
      }),
    );
    const concurrentSeconds = (performance.now() - begun) / 1000;
    progress(
      `${NAME}: ${target.label}, ${lanes} × ${perLane} concurrent settlements in ${Math.round(concurrentSeconds * 1000)} ms`,
    );

    report.add(NAME, `${target.label}, sequential`, orders / sequentialSeconds, "settlements/s", 0);
    report.add(NAME, `${target.label}, sequential, p50 / p99 per settlement`, pair(sequential), "ms");
    report.add(
      NAME,
      `${target.label}, ${lanes} concurrent`,
      (lanes * perLane) / concurrentSeconds,
      "settlements/s",
      0,
    );
    report.add(
      NAME,
      `${target.label}, ${lanes} concurrent, p50 / p99 per settlement`,
      pair(concurrent),
      "ms",
    );

    const settled = BigInt(20 + orders + lanes * perLane);
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

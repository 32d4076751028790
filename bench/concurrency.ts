/**
 * Concurrency: many consumers at once against several worker processes, then the ledger audit and
 * an exact money check. Also the memory benchmark: RSS and heap of this process (which hosts the
 * control plane) before, halfway through and after the run, each after a full garbage collection.
 *
 * The market has no queue: a request arriving while every worker slot is busy gets 503
 * (no_capacity). Consumers here retry those after a short random pause, as an SDK with retries
 * would; they are counted apart. Anything else that is not a complete answer is an error.
 */
import { cpus } from "node:os";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { EXTERNAL_ACCOUNT_ID, PLATFORM_ACCOUNT_ID } from "../server/market/store-port.js";
import { credits, ledgerIsBalanced } from "../test/support/market.js";
import { chatCompletion } from "./consumer.js";
import type { BenchContext } from "./context.js";
import { mib, percentile, progress, type Report } from "./report.js";

const NAME = "concurrency";
const MODEL = "bench-load";
const DEPOSIT_CREDITS = 100;
/** A request that keeps getting 503 for this long counts as an error. */
const GIVE_UP_MS = 30_000;
/** The event-loop delay histogram's timer; its readings include this period, subtracted again. */
const LOOP_RESOLUTION_MS = 2;

export async function concurrencyBenchmark(context: BenchContext, report: Report): Promise<void> {
  const { workers: workerCount, workerConcurrency, consumers, requestsPerConsumer } = context.config;
  const { shortTokens } = context.config;
  const engine = await context.engine(shortTokens);
  const market = await context.market();
  const { providerAccountId, workers } = await context.startWorkers(
    MODEL,
    engine.url,
    workerCount,
    workerConcurrency,
  );
  const store = market.plane.store;
  // One at a time: the admin API is not what is measured here.
  const accounts: { accountId: string; apiKey: string }[] = [];
  for (let i = 0; i < consumers; i++) {
    accounts.push(await market.account(`load-consumer-${i + 1}`, DEPOSIT_CREDITS));
  }
  const url = `${market.plane.httpUrl}/v1`;
  // Warm the path up with an account of its own, so the consumers' books start at their deposit.
  const warmUp = await market.account("load-warm-up", DEPOSIT_CREDITS);
  for (let i = 0; i < 8; i++) {
    await chatCompletion(url, warmUp.apiKey, { model: MODEL, messages: [{ role: "user", content: "hi" }] });
  }
  const providerBefore = (await store.getBalance(providerAccountId)).pending;
  const platformBefore = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available;

  const memoryBefore = settledMemory();
  const loopDelay = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
  loopDelay.enable();
  const cpuBefore = process.cpuUsage();
  const machineBefore = machineCpu();
  let peakRss = memoryBefore.rss;
  const sampler = setInterval(() => {
    peakRss = Math.max(peakRss, process.memoryUsage.rss());
  }, 100);

  const latencies: number[] = [];
  const errors = new Map<string, number>();
  const countError = (message: string) => errors.set(message, (errors.get(message) ?? 0) + 1);
  let completed = 0;
  let capacityRetries = 0;
  let paidByConsumers = 0n;
  const total = consumers * requestsPerConsumer;
  let nextProgress = 0.25;

  const oneRequest = async (apiKey: string, index: number) => {
    // Every other request is streamed.
    const stream = index % 2 === 1;
    const body = {
      model: MODEL,
      messages: [{ role: "user", content: `Request ${index}` }],
      stream,
      ...(stream ? { stream_options: { include_usage: true } } : {}),
    };
    const start = performance.now();
    for (;;) {
      let result: Awaited<ReturnType<typeof chatCompletion>>;
      try {
        result = await chatCompletion(url, apiKey, body);
      } catch (error) {
        countError(`fetch failed: ${error instanceof Error ? error.message : String(error)}`);
        return;
      }
      if (result.status === 503 && performance.now() - start < GIVE_UP_MS) {
        capacityRetries++;
        await new Promise((resolve) => setTimeout(resolve, 2 + Math.random() * 18));
        continue;
      }
      // Several tokens may share a delta (the worker merges them when they come faster than the
      // link drains), so the tokens are counted in the text: the engine's are `tok0 tok1 …`.
      const complete =
        result.completionTokens === shortTokens &&
        (result.contentText.match(/tok\d+/g)?.length ?? 0) === shortTokens &&
        (stream || result.contentChunks === 1);
      if (result.error || !complete) {
        countError(
          `HTTP ${result.status}: ${result.error ?? `incomplete answer (${result.completionTokens} tokens)`}`,
        );
        return;
      }
      completed++;
      paidByConsumers += result.costMicros ?? 0n;
      latencies.push(performance.now() - start);
      const done = completed + countOf(errors);
      if (done / total >= nextProgress) {
        progress(`${NAME}: ${done} of ${total} requests done`);
        nextProgress += 0.25;
      }
      return;
    }
  };

  progress(
    `${NAME}: ${consumers} consumers × ${requestsPerConsumer} requests against ${workerCount} workers × concurrency ${workerConcurrency}`,
  );
  // Two halves with a full GC between them: the second half's heap growth is the leak indicator
  // (the first half also pays for caches and pools filling up).
  const phase = async (from: number, to: number) => {
    const started = performance.now();
    await Promise.all(
      accounts.map(async (account) => {
        for (let i = from; i < to; i++) await oneRequest(account.apiKey, i);
      }),
    );
    return (performance.now() - started) / 1000;
  };
  const half = Math.ceil(requestsPerConsumer / 2);
  const wallStarted = performance.now();
  let seconds = await phase(0, half);
  const completedAtHalf = completed;
  const memoryHalf = settledMemory();
  seconds += await phase(half, requestsPerConsumer);
  const wallSeconds = (performance.now() - wallStarted) / 1000;
  const cpu = process.cpuUsage(cpuBefore);
  const machineAfter = machineCpu();
  loopDelay.disable();
  clearInterval(sampler);
  const memoryAfter = settledMemory();

  const errorCount = countOf(errors);
  const processCpu = (cpu.user + cpu.system) / 1e6 / wallSeconds;
  const machineBusy =
    1 - (machineAfter.idle - machineBefore.idle) / (machineAfter.total - machineBefore.total || 1);
  report.add(NAME, "requests completed", completed, `of ${total}`, 0);
  report.add(NAME, "completed requests per second", completed / seconds, "requests/s", 1);
  report.add(NAME, "latency (incl. any 503 retries), p50/p95/p99", triple(latencies), "ms");
  report.add(NAME, "503 no_capacity answers (retried by the consumers)", capacityRetries, "responses", 0);
  const refused = workers.reduce((sum, worker) => sum + worker.refusedJobs(), 0);
  report.add(NAME, "jobs refused by a full worker (re-routed)", refused, "jobs", 0);
  report.add(NAME, "errors", errorCount, "requests", 0);
  report.add(NAME, "CPU of this process (control plane + consumers)", processCpu * 100, "% of one core", 0);
  report.add(
    NAME,
    "  CPU time of this process per completed request",
    completed > 0 ? (cpu.user + cpu.system) / 1000 / completed : 0,
    "ms",
    2,
  );
  report.add(NAME, `CPU of the whole machine (${cpus().length} vCPU)`, machineBusy * 100, "% busy", 0);
  report.add(
    NAME,
    "event-loop delay of this process, p50 / p99",
    [50, 99]
      .map((p) => Math.max(0, loopDelay.percentile(p) / 1e6 - LOOP_RESOLUTION_MS).toFixed(1))
      .join(" / "),
    "ms",
  );
  for (const [message, count] of errors) progress(`${NAME}: error ×${count}: ${message}`);
  if (errorCount > 0) report.failed = true;

  // Money: the audit, then the exact flows of this run.
  const audit = await ledgerIsBalanced(market);
  report.add(NAME, "ledger audit", audit.ok ? "ok" : "FAILED", `sum ${audit.sum} µc`);
  for (const problem of audit.problems) progress(`${NAME}: audit problem: ${problem}`);
  const broken: string[] = [];
  let debited = 0n;
  for (const account of accounts) {
    const balance = await store.getBalance(account.accountId);
    if (balance.held !== 0n) broken.push(`${account.accountId} still holds ${balance.held} µc`);
    debited += credits(DEPOSIT_CREDITS) - balance.available;
  }
  const providerGot = (await store.getBalance(providerAccountId)).pending - providerBefore;
  const platformGot = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available - platformBefore;
  if (debited !== paidByConsumers) {
    broken.push(
      `consumers were debited ${debited} µc; the responses reported costs of ${paidByConsumers} µc`,
    );
  }
  if (providerGot + platformGot !== debited) {
    broken.push(`consumers paid ${debited} µc; provider + platform received ${providerGot + platformGot} µc`);
  }
  const external = await store.getBalance(EXTERNAL_ACCOUNT_ID);
  if (external.held !== 0n) broken.push(`the external account holds ${external.held} µc`);
  // Exactly one order per answered request, every one of them settled.
  const consumerIds = new Set(accounts.map((account) => account.accountId));
  const orders = (await store.listOrders({ limit: total * 2 + 100 })).filter((order) =>
    consumerIds.has(order.consumerAccountId),
  );
  const completedOrders = orders.filter((order) => order.status === "completed").length;
  if (completedOrders !== completed) {
    broken.push(`${completedOrders} completed orders for ${completed} answered requests`);
  }
  const running = orders.filter((order) => order.status === "running").length;
  if (running > 0) broken.push(`${running} orders are still running`);
  report.add(
    NAME,
    "money check (debits = reported costs = provider + fee)",
    broken.length === 0 ? "ok" : "BROKEN",
    `${debited} µc in ${completedOrders} orders`,
  );
  for (const problem of broken) progress(`${NAME}: money invariant broken: ${problem}`);
  if (!audit.ok || audit.sum !== 0n || broken.length > 0) report.failed = true;

  const memory = "memory";
  const three = (key: "rss" | "heapUsed") =>
    [memoryBefore, memoryHalf, memoryAfter].map((usage) => mib(usage[key]).toFixed(1)).join(" / ");
  report.add(memory, "RSS before / halfway / after the run (after GC)", three("rss"), "MiB");
  report.add(memory, "peak RSS during the run", mib(peakRss), "MiB");
  report.add(memory, "heap used before / halfway / after (after GC)", three("heapUsed"), "MiB");
  const secondHalf = completed - completedAtHalf;
  report.add(
    memory,
    "heap growth per request over the second half",
    secondHalf > 0 ? (memoryAfter.heapUsed - memoryHalf.heapUsed) / secondHalf : 0,
    "bytes",
    0,
  );
}

function countOf(errors: Map<string, number>): number {
  let sum = 0;
  for (const count of errors.values()) sum += count;
  return sum;
}

function triple(samples: number[]): string {
  return [50, 95, 99].map((p) => percentile(samples, p).toFixed(1)).join(" / ");
}

/** Idle and total CPU time of all cores since boot, in ms. */
function machineCpu(): { idle: number; total: number } {
  let idle = 0;
  let total = 0;
  for (const { times } of cpus()) {
    idle += times.idle;
    total += times.user + times.nice + times.sys + times.idle + times.irq;
  }
  return { idle, total };
}

let gc: (() => void) | undefined;

/** Memory after a full garbage collection (twice, so finalizers' garbage goes too). */
function settledMemory(): NodeJS.MemoryUsage {
  if (!gc) {
    setFlagsFromString("--expose-gc");
    gc = runInNewContext("gc") as () => void;
  }
  gc();
  gc();
  return process.memoryUsage();
}

/**
 * Concurrency: many consumers at once against several worker processes, then the ledger audit and
 * an exact money check. The consumers run in a process of their own (bench/load-consumer.ts), so
 * this process hosts nothing but the control plane (and its embedded database, if any): its CPU
 * time per request is the control plane's, read apart from the worker processes' and the
 * consumers' (from /proc). Also the memory benchmark: RSS and heap of this process before, halfway
 * through and after the run, each after a full garbage collection.
 *
 * The market has no queue: a request arriving while every worker slot is busy gets 503
 * (no_capacity). The consumers retry those after a short random pause, as an SDK with retries
 * would; they are counted apart. Anything else that is not a complete answer is an error.
 */

import { readdirSync, readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { monitorEventLoopDelay } from "node:perf_hooks";
import { setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";
import { EXTERNAL_ACCOUNT_ID, PLATFORM_ACCOUNT_ID } from "../server/market/store-port.js";
import { ledgerIsBalanced } from "../test/support/market.js";
import { type CommandProcess, startCommandProcess } from "./command-process.js";
import type { BenchContext } from "./context.js";
import type { LoadAnswer, LoadCommand, WarmUpCommand } from "./load-consumer.js";
import { CLOCK_TICKS_PER_SECOND, cpuMs, statTicks } from "./proc.js";
import { mib, percentile, progress, type Report } from "./report.js";

const NAME = "concurrency";
const MODEL = "bench-load";
const DEPOSIT_CREDITS = 100;
/** Requests per consumer in the unmeasured concurrent warm-up round. */
const WARM_UP_REQUESTS_PER_CONSUMER = 12;
/** A request that keeps getting 503 for this long counts as an error. */
const GIVE_UP_MS = 30_000;
/** The event-loop delay histogram's timer; its readings include this period, subtracted again. */
const LOOP_RESOLUTION_MS = 2;
/** How long this process's CPU is read with no request in flight, before the run. */
const IDLE_WINDOW_MS = 3_000;
/** The issue's target for the server's RSS on embedded PGlite. */
const RSS_TARGET_MIB = 300;

export async function concurrencyBenchmark(context: BenchContext, report: Report): Promise<void> {
  const { workers: workerCount, workerConcurrency, consumers, requestsPerConsumer } = context.config;
  const { shortTokens } = context.config;
  const embedded = !process.env.DATABASE_URL;
  const engine = await context.engine(shortTokens);
  const market = await context.market();
  const { providerAccountId, workers } = await context.startWorkers(
    MODEL,
    engine.url,
    workerCount,
    workerConcurrency,
  );
  const consumer = await startLoadConsumer();
  context.onKill(consumer.kill);
  try {
    const store = market.plane.store;
    // One at a time: the admin API is not what is measured here.
    const accounts: { accountId: string; apiKey: string }[] = [];
    for (let i = 0; i < consumers; i++) {
      accounts.push(await market.account(`load-consumer-${i + 1}`, DEPOSIT_CREDITS));
    }
    const url = `${market.plane.httpUrl}/v1`;
    // Warm the path up: a few sequential requests on an account of its own, then a round of the
    // consumers' own, of the same shape as the measured one, so that what is measured is the steady
    // state of a server that has run a while for returning consumers (their keys authenticated
    // from memory, V8's compilation of the hot code done: with 8 sequential requests only, the first
    // half cost half as much again as the second). Their balances are read after it: the money
    // check covers the measured run.
    const warmUp = await market.account("load-warm-up", DEPOSIT_CREDITS);
    await consumer.ask({ op: "warm-up", url, apiKey: warmUp.apiKey, model: MODEL, requests: 8 });
    /** Every consumer makes its requests number `from` to `to - 1`, all at once. */
    const load = (from: number, to: number) =>
      consumer.ask<LoadAnswer>({
        op: "load",
        url,
        apiKeys: accounts.map((account) => account.apiKey),
        model: MODEL,
        tokens: shortTokens,
        from,
        to,
        giveUpMs: GIVE_UP_MS,
      });
    const warmUpRound = await load(0, WARM_UP_REQUESTS_PER_CONSUMER);
    progress(
      `${NAME}: warm-up round: ${warmUpRound.completed} requests by the ${consumers} consumers, unmeasured`,
    );
    const availableBefore = new Map<string, bigint>();
    for (const account of accounts) {
      availableBefore.set(account.accountId, (await store.getBalance(account.accountId)).available);
    }
    const providerBefore = (await store.getBalance(providerAccountId)).pending;
    const platformBefore = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available;

    const workerPids = workers.flatMap((worker) => (worker.pid === undefined ? [] : [worker.pid]));
    // What the control plane burns with no request at all (heartbeats, timers, the database
    // thread): part of every per-request figure below, the more so the fewer requests per second.
    const idleBefore = process.cpuUsage();
    await new Promise((resolve) => setTimeout(resolve, IDLE_WINDOW_MS));
    const idle = process.cpuUsage(idleBefore);
    const idleCpuShare = (idle.user + idle.system) / 1000 / IDLE_WINDOW_MS;
    const memoryBefore = settledMemory();
    const loopDelay = monitorEventLoopDelay({ resolution: LOOP_RESOLUTION_MS });
    const machineBefore = machineCpu();
    // The kernel's own peak (VmHWM), reset here, costs nothing during the run; a sampler (whose
    // reads would count as control-plane CPU) only where /proc does not offer it.
    let peakRss = memoryBefore.rss;
    const sampler = resetPeakRss()
      ? undefined
      : setInterval(() => {
          peakRss = Math.max(peakRss, process.memoryUsage.rss());
        }, 100);

    const latencies: number[] = [];
    const errors = new Map<string, number>();
    let completed = 0;
    let capacityRetries = 0;
    let paidByConsumers = 0n;
    let seconds = 0;
    const cpu = { process: 0, threads: new Map<number, number>(), workers: 0, consumer: 0 };
    /** This process's CPU ms per completed request in each half (the first also warms the JIT up). */
    const halves: number[] = [];
    let cpuReadable = true;
    const total = consumers * requestsPerConsumer;

    progress(
      `${NAME}: ${consumers} consumers × ${requestsPerConsumer} requests against ${workerCount} workers × concurrency ${workerConcurrency} (consumers in process ${consumer.pid})`,
    );
    // Two halves with a full GC between them: the second half's heap growth is the leak indicator
    // (the first half also pays for caches and pools filling up). The CPU is counted during the
    // halves only, not in the forced collections around them.
    const phase = async (from: number, to: number) => {
      loopDelay.enable();
      const ownBefore = process.cpuUsage();
      const threadsBefore = threadCpuMs();
      const workersBefore = cpuMs(workerPids);
      const consumerBefore = cpuMs([consumer.pid]);
      const answer = await load(from, to);
      const own = process.cpuUsage(ownBefore);
      const threadsAfter = threadCpuMs();
      const workersAfter = cpuMs(workerPids);
      const consumerAfter = cpuMs([consumer.pid]);
      loopDelay.disable();
      cpu.process += (own.user + own.system) / 1000;
      halves.push(answer.completed > 0 ? (own.user + own.system) / 1000 / answer.completed : 0);
      if (threadsBefore && threadsAfter && workersBefore !== null && workersAfter !== null) {
        for (const [tid, ms] of threadsAfter) {
          cpu.threads.set(tid, (cpu.threads.get(tid) ?? 0) + ms - (threadsBefore.get(tid) ?? 0));
        }
        cpu.workers += workersAfter - workersBefore;
        cpu.consumer += (consumerAfter ?? 0) - (consumerBefore ?? 0);
      } else cpuReadable = false;
      completed += answer.completed;
      capacityRetries += answer.capacityRetries;
      paidByConsumers += BigInt(answer.paidMicros);
      latencies.push(...answer.latencies);
      for (const [message, count] of Object.entries(answer.errors)) {
        errors.set(message, (errors.get(message) ?? 0) + count);
      }
      seconds += answer.seconds;
      progress(`${NAME}: ${completed + countOf(errors)} of ${total} requests done`);
    };
    const half = Math.ceil(requestsPerConsumer / 2);
    await phase(0, half);
    const completedAtHalf = completed;
    const memoryHalf = settledMemory();
    await phase(half, requestsPerConsumer);
    const machineAfter = machineCpu();
    clearInterval(sampler);
    const rssAfterRun = process.memoryUsage.rss();
    if (!sampler) peakRss = kernelPeakRss() ?? Math.max(peakRss, rssAfterRun);
    const memoryAfter = settledMemory();

    const errorCount = countOf(errors);
    const machineBusy =
      1 - (machineAfter.idle - machineBefore.idle) / (machineAfter.total - machineBefore.total || 1);
    const perRequest = (ms: number) => (completed > 0 ? ms / completed : 0);
    report.add(NAME, "requests completed", completed, `of ${total}`, 0);
    report.add(NAME, "completed requests per second", completed / seconds, "requests/s", 1);
    report.add(NAME, "latency (incl. any 503 retries), p50/p95/p99", triple(latencies), "ms");
    report.add(NAME, "503 no_capacity answers (retried by the consumers)", capacityRetries, "responses", 0);
    const refused = workers.reduce((sum, worker) => sum + worker.refusedJobs(), 0);
    report.add(NAME, "jobs refused by a full worker (re-routed)", refused, "jobs", 0);
    report.add(NAME, "errors", errorCount, "requests", 0);
    const plane = embedded ? "control plane + its PGlite thread" : "control plane";
    report.add(
      NAME,
      `CPU of this process (${plane})`,
      (cpu.process / 1000 / seconds) * 100,
      "% of one core",
      0,
    );
    report.add(
      NAME,
      `  control-plane CPU per completed request (${plane})`,
      perRequest(cpu.process),
      "ms",
      2,
    );
    report.add(
      NAME,
      `    of which idle cost (${(idleCpuShare * 100).toFixed(1)} % of a core with no request, measured before)`,
      (idleCpuShare * seconds * 1000) / Math.max(1, completed),
      "ms",
      2,
    );
    report.add(
      NAME,
      "    first half / second half, per request",
      halves.map((ms) => ms.toFixed(2)).join(" / "),
      "ms",
    );
    if (cpuReadable) {
      // Thread ids are Linux's: the main thread's is the process id. The other threads are the
      // embedded database's (on PGlite), V8's GC and compiler helpers, libuv's pool and tsx's
      // loader; /proc names them all "node", so they are reported together, the busiest apart.
      const mainThread = cpu.threads.get(process.pid) ?? 0;
      const others = [...cpu.threads].filter(([tid]) => tid !== process.pid).map(([, ms]) => ms);
      const busiest = Math.max(0, ...others);
      const othersTotal = others.reduce((sum, ms) => sum + ms, 0);
      report.add(
        NAME,
        `    main thread / other threads${embedded ? " (PGlite, GC, libuv)" : " (GC, libuv)"}, per request`,
        `${perRequest(mainThread).toFixed(2)} / ${perRequest(othersTotal).toFixed(2)}`,
        "ms",
      );
      report.add(
        NAME,
        `    busiest other thread${embedded ? " (on PGlite, its database thread)" : ""}, per request`,
        perRequest(busiest),
        "ms",
        2,
      );
      report.add(
        NAME,
        `  CPU of the ${workerPids.length} worker processes per completed request`,
        perRequest(cpu.workers),
        "ms",
        2,
      );
      report.add(
        NAME,
        "  CPU of the consumer process per completed request",
        perRequest(cpu.consumer),
        "ms",
        2,
      );
    }
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
      debited += (availableBefore.get(account.accountId) ?? 0n) - balance.available;
    }
    const providerGot = (await store.getBalance(providerAccountId)).pending - providerBefore;
    const platformGot = (await store.getBalance(PLATFORM_ACCOUNT_ID)).available - platformBefore;
    if (debited !== paidByConsumers) {
      broken.push(
        `consumers were debited ${debited} µc; the responses reported costs of ${paidByConsumers} µc`,
      );
    }
    if (providerGot + platformGot !== debited) {
      broken.push(
        `consumers paid ${debited} µc; provider + platform received ${providerGot + platformGot} µc`,
      );
    }
    const external = await store.getBalance(EXTERNAL_ACCOUNT_ID);
    if (external.held !== 0n) broken.push(`the external account holds ${external.held} µc`);
    // Exactly one order per answered request, every one of them settled.
    const consumerIds = new Set(accounts.map((account) => account.accountId));
    const orders = (await store.listOrders({ limit: (total + warmUpRound.completed) * 2 + 100 })).filter(
      (order) => consumerIds.has(order.consumerAccountId),
    );
    // The warm-up round's orders are theirs too.
    const completedOrders =
      orders.filter((order) => order.status === "completed").length - warmUpRound.completed;
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
    // Before the forced collection, as a server's RSS would be seen from outside. This process
    // also carries the benchmark's own code (tsx, the admin client), so it is an upper bound.
    report.add(
      memory,
      `RSS of the control plane's process right after the run (before GC)${embedded ? `, PGlite: target < ${RSS_TARGET_MIB}` : ""}`,
      mib(rssAfterRun),
      "MiB",
    );
  } finally {
    await consumer.close();
  }
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

/** User + system CPU of each thread of this process, in ms, by Linux thread id (null without /proc). */
function threadCpuMs(): Map<number, number> | null {
  try {
    const threads = new Map<number, number>();
    for (const tid of readdirSync("/proc/self/task")) {
      try {
        const ticks = statTicks(readFileSync(`/proc/self/task/${tid}/stat`, "utf8"));
        threads.set(Number(tid), (ticks * 1000) / CLOCK_TICKS_PER_SECOND);
      } catch {
        // The thread ended between the listing and the read.
      }
    }
    return threads;
  } catch {
    return null;
  }
}

/** Resets this process's peak RSS as the kernel keeps it (Linux); false where it cannot. */
function resetPeakRss(): boolean {
  try {
    writeFileSync("/proc/self/clear_refs", "5");
    return kernelPeakRss() !== null;
  } catch {
    return false;
  }
}

/** This process's peak RSS since the last reset (VmHWM), in bytes, or null without /proc. */
function kernelPeakRss(): number | null {
  try {
    const match = /^VmHWM:\s+(\d+) kB$/m.exec(readFileSync("/proc/self/status", "utf8"));
    return match ? Number(match[1]) * 1024 : null;
  } catch {
    return null;
  }
}

/** The consumers' process (bench/load-consumer.ts); its progress lines are printed as ours. */
function startLoadConsumer(): Promise<CommandProcess<WarmUpCommand | LoadCommand>> {
  return startCommandProcess("load-consumer.ts", "load consumer", (message) =>
    progress(`${NAME}: ${message}`),
  );
}

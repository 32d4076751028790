/**
 * What the market benchmarks share: one test market (the real control plane, in this process, over a
 * fresh database), fake engines in their own processes, and worker processes, all started on first
 * use and stopped at the end.
 */
import { startTestMarket, type TestMarket } from "../test/support/market.js";
import { type EngineProcess, startEngineProcess } from "./engine.js";
import { progress } from "./report.js";
import { type BenchWorker, startWorker } from "./workers.js";

export interface BenchConfig {
  relayTokens: number;
  relayRuns: number;
  latencyRequests: number;
  shortTokens: number;
  workers: number;
  workerConcurrency: number;
  consumers: number;
  requestsPerConsumer: number;
  pipeStreams: number;
  ledgerOrders: number;
  ledgerLanes: number;
  trustJobs: number;
  trustTokens: number;
}

export class BenchContext {
  private marketPromise: Promise<TestMarket> | undefined;
  private readonly engines = new Map<number, Promise<EngineProcess>>();
  private readonly startedEngines: EngineProcess[] = [];
  private readonly workers: BenchWorker[] = [];

  constructor(readonly config: BenchConfig) {}

  market(): Promise<TestMarket> {
    this.marketPromise ??= (async () => {
      const started = performance.now();
      // The platform's logs stay quiet: a benchmark must not measure pino writing to a terminal.
      const market = await startTestMarket({ logLevel: "error" });
      progress(
        `market: control plane up on ${market.plane.databaseDescription.split(" at ")[0]} in ${Math.round(performance.now() - started)} ms`,
      );
      return market;
    })();
    return this.marketPromise;
  }

  /** A fake engine process answering every completion with `tokens` tokens, as fast as it can. */
  engine(tokens: number): Promise<EngineProcess> {
    let engine = this.engines.get(tokens);
    if (!engine) {
      engine = startEngineProcess({ tokens }).then((started) => {
        this.startedEngines.push(started);
        return started;
      });
      this.engines.set(tokens, engine);
    }
    return engine;
  }

  /** Starts `count` worker processes offering `model` on `engineUrl` for a new provider account. */
  async startWorkers(
    model: string,
    engineUrl: string,
    count: number,
    concurrency: number,
  ): Promise<{ providerAccountId: string; workers: BenchWorker[] }> {
    const market = await this.market();
    const started = performance.now();
    const provider = await market.account(`provider-${model}`);
    const workers = await Promise.all(
      Array.from({ length: count }, (_, i) =>
        startWorker(market, {
          accountId: provider.accountId,
          model,
          engineUrl,
          concurrency,
          name: `${model}-${i + 1}`,
        }),
      ),
    );
    this.workers.push(...workers);
    progress(
      `market: ${count} worker process(es) × concurrency ${concurrency} for ${model} connected in ${Math.round(performance.now() - started)} ms`,
    );
    return { providerAccountId: provider.accountId, workers };
  }

  /** Kills every child process at once, for a run that must end now. */
  private readonly killers: (() => void)[] = [];

  /** Something of a benchmark's own to end at once when the run is killed (timeout or Ctrl-C). */
  onKill(kill: () => void): void {
    this.killers.push(kill);
  }

  kill(): void {
    for (const kill of this.killers) kill();
    for (const worker of this.workers) worker.kill();
    for (const engine of this.startedEngines) engine.kill();
  }

  async close(): Promise<void> {
    await Promise.allSettled(this.workers.map((worker) => worker.stop()));
    const market = await this.marketPromise?.catch(() => undefined);
    await market?.close();
    await Promise.allSettled([...this.engines.values()].map(async (engine) => (await engine).close()));
  }
}

/**
 * The live market: which workers are connected right now, what they offer, how busy they are and
 * how fast they have measured. Protocol-free: the worker link registers a `WorkerConnection` per
 * open stream and the marketplace reads from here.
 */
import type { OfferRecord } from "./store-port.js";

export type FinishReason = "stop" | "length" | "content_filter" | "cancelled";

export interface JobSpec {
  jobId: string;
  model: string;
  messages: { role: string; content: string; name?: string }[];
  sampling: {
    temperature?: number;
    topP?: number;
    stop: string[];
    seed?: bigint;
    presencePenalty?: number;
    frequencyPenalty?: number;
  };
  maxTokens: number;
  deadlineUnixMs: number;
}

/** How a connection reports a job's progress back to the marketplace. */
export interface JobSink {
  accepted(): void;
  chunk(text: string, tokenCount: number): void;
  done(finishReason: FinishReason, usage: { promptTokens: number; completionTokens: number } | null): void;
  failed(message: string): void;
}

/** One open worker stream, as the market core sees it. */
export interface WorkerConnection {
  readonly workerId: string;
  readonly providerAccountId: string;
  readonly name: string;
  readonly offers: readonly OfferRecord[];
  readonly draining: boolean;
  readonly activeJobs: number;
  /** Sends a job to the worker; progress arrives on the sink until done() or failed(). */
  assign(job: JobSpec, sink: JobSink): void;
  cancel(jobId: string, reason: string): void;
}

/** Throughput the platform measured on a worker's recent jobs (exponential moving average). */
interface Measurements {
  tokensPerSecond: number | null;
  timeToFirstTokenMs: number | null;
  jobs: number;
}

const SMOOTHING = 0.3;

export class WorkerRegistry {
  private readonly connections = new Map<string, WorkerConnection>();
  private readonly measurements = new Map<string, Measurements>();
  private readonly waiters = new Map<string, ((connection: WorkerConnection) => void)[]>();

  /** Registers a connection; returns the one it replaces (same worker reconnecting), if any. */
  register(connection: WorkerConnection): WorkerConnection | undefined {
    const previous = this.connections.get(connection.workerId);
    this.connections.set(connection.workerId, connection);
    for (const resolve of this.waiters.get(connection.workerId) ?? []) resolve(connection);
    this.waiters.delete(connection.workerId);
    return previous === connection ? undefined : previous;
  }

  /** Resolves with the worker's connection as soon as it is (or already was) registered. */
  whenConnected(workerId: string): Promise<WorkerConnection> {
    const connection = this.connections.get(workerId);
    if (connection) return Promise.resolve(connection);
    return new Promise((resolve) => {
      this.waiters.set(workerId, [...(this.waiters.get(workerId) ?? []), resolve]);
    });
  }

  /** Removes a connection, unless a newer one for the same worker already replaced it. */
  unregister(connection: WorkerConnection): void {
    if (this.connections.get(connection.workerId) === connection) {
      this.connections.delete(connection.workerId);
    }
  }

  get(workerId: string): WorkerConnection | undefined {
    return this.connections.get(workerId);
  }

  list(): WorkerConnection[] {
    return [...this.connections.values()];
  }

  /** Measured tokens/s for a worker, or null before its first measured job. */
  measuredTokensPerSecond(workerId: string): number | null {
    return this.measurements.get(workerId)?.tokensPerSecond ?? null;
  }

  measuredTimeToFirstTokenMs(workerId: string): number | null {
    return this.measurements.get(workerId)?.timeToFirstTokenMs ?? null;
  }

  /** Records one finished job's measured speed. Jobs too short to time are ignored. */
  recordJob(
    workerId: string,
    sample: { tokens: number; generationMs: number; timeToFirstTokenMs: number },
  ): void {
    const current = this.measurements.get(workerId) ?? {
      tokensPerSecond: null,
      timeToFirstTokenMs: null,
      jobs: 0,
    };
    const blend = (old: number | null, value: number) =>
      old === null ? value : old + SMOOTHING * (value - old);
    if (sample.tokens >= 2 && sample.generationMs > 0) {
      // The first token's latency is TTFT, so speed counts the tokens after it.
      current.tokensPerSecond = blend(
        current.tokensPerSecond,
        ((sample.tokens - 1) * 1000) / sample.generationMs,
      );
    }
    current.timeToFirstTokenMs = blend(current.timeToFirstTokenMs, sample.timeToFirstTokenMs);
    current.jobs += 1;
    this.measurements.set(workerId, current);
  }
}

/**
 * The live market: which workers are connected right now, what they offer, how busy they are and
 * how fast they have measured. Protocol-free: the worker link registers a `WorkerConnection` per
 * open stream and the marketplace reads from here.
 */
import type { TokenLogprob, ToolCallDelta } from "../../common/generation.js";
import { type ReputationOptions, ReputationTracker } from "./reputation.js";
import type { OfferRecord } from "./store-port.js";

export type FinishReason = "stop" | "length" | "content_filter" | "cancelled" | "tool_calls";

/** One message of a conversation, as the market carries it to a worker. */
export interface ChatMessage {
  role: string;
  content: string;
  name?: string;
  /** On an assistant message: the calls it made. */
  toolCalls?: ToolCall[];
  /** On a tool message: the call it answers. */
  toolCallId?: string;
  /** Images of a multi-part content (https: or data: URLs). */
  imageUrls?: string[];
}

export interface ToolCall {
  id: string;
  name: string;
  /** JSON text. */
  arguments: string;
}

export interface ToolDefinition {
  name: string;
  description: string;
  /** JSON Schema as JSON text, "" when none. */
  parametersJson: string;
  strict: boolean;
}

export type ToolChoice = { mode: "auto" | "none" | "required" } | { mode: "function"; functionName: string };

export type ResponseFormat =
  | { type: "text" }
  | { type: "json_object" }
  | { type: "json_schema"; name: string; schemaJson: string; strict: boolean };

/** What an offer supports beyond plain chat (Offer.capabilities on the wire). */
export interface Capabilities {
  tools: boolean;
  jsonSchema: boolean;
  logprobs: boolean;
  vision: boolean;
  completions: boolean;
  /** Token ids with logprobs on request (audits); absent means no. */
  tokenDetail?: boolean;
}

export type Capability = keyof Capabilities;

export const NO_CAPABILITIES: Readonly<Capabilities> = {
  tools: false,
  jsonSchema: false,
  logprobs: false,
  vision: false,
  completions: false,
};

/** One piece of a job's output, as a worker's chunk carries it. */
export interface JobPiece {
  text: string;
  /** As the worker claimed it (the market counts for itself). */
  tokenCount: number;
  toolCalls: ToolCallDelta[];
  logprobs: TokenLogprob[];
}

/** What a job asks the model for: the conversation (or a raw prompt) and how to answer it. */
export interface GenerationSpec {
  /** Empty for a raw text completion. */
  messages: ChatMessage[];
  /** A raw text completion (legacy completions API): continued as is, no chat template. */
  prompt?: string;
  tools?: ToolDefinition[];
  toolChoice?: ToolChoice;
  parallelToolCalls?: boolean;
  responseFormat?: ResponseFormat;
  /** Per-token log-probabilities with `top` alternatives; undefined when not wanted. */
  logprobs?: { top: number };
  sampling: {
    temperature?: number;
    topP?: number;
    stop: string[];
    seed?: bigint;
    presencePenalty?: number;
    frequencyPenalty?: number;
  };
}

export interface JobSpec extends GenerationSpec {
  jobId: string;
  /** The order the job serves (audits are recorded against it). */
  orderId?: string;
  model: string;
  maxTokens: number;
  deadlineUnixMs: number;
}

/**
 * How a connection reports a job's progress back to the marketplace. Numbers are as the worker
 * sent them (the wire's uint32/uint64 ranges): the marketplace decides what they are worth.
 */
export interface JobSink {
  chunk(piece: JobPiece, sequence: bigint): void;
  done(finishReason: FinishReason, usage: { promptTokens: number; completionTokens: number } | null): void;
  /** `overloaded`: the worker refused the job before starting it (no capacity on its side). */
  failed(message: string, kind: "overloaded" | "error"): void;
}

/**
 * One reserved slot on a worker. Reserved synchronously at match time, so two requests can never
 * book the same slot; freed when the job ends on the worker (done, failure, disconnect, or a cancel
 * the worker confirmed) or when released unused.
 */
export interface SlotLease {
  readonly connection: WorkerConnection;
  /** Sends the job on this slot; progress arrives on the sink. At most once per lease. */
  assign(job: JobSpec, sink: JobSink): void;
  /** The consumer has taken the job's chunks up to `sequence` (flow control towards the worker). */
  acknowledge(sequence: bigint): void;
  /** Stops the job; its later messages are dropped. The slot frees when the worker confirms. */
  cancel(reason: string): void;
  /** Gives the slot back without running a job (the order could not be opened). */
  release(): void;
}

/** One open worker stream, as the market core sees it. */
export interface WorkerConnection {
  readonly workerId: string;
  readonly providerAccountId: string;
  readonly name: string;
  readonly offers: readonly OfferRecord[];
  readonly draining: boolean;
  /** Slots in use: reserved, running, or cancelled and not yet confirmed by the worker. */
  readonly activeJobs: number;
  /** Reserves a slot for a job of `model`; null when the worker is full, draining or gone. */
  reserve(model: string): SlotLease | null;
}

/** The slots an offer allows (max_concurrency 0 is read as 1). */
export function capacityOf(offer: OfferRecord): number {
  return Math.max(1, offer.maxConcurrency);
}

export class WorkerRegistry {
  /** What the platform measured of each worker per model; survives reconnects, not restarts. */
  readonly reputation: ReputationTracker;
  private readonly connections = new Map<string, WorkerConnection>();
  private readonly waiters = new Map<string, ((connection: WorkerConnection) => void)[]>();
  private readonly capacityListeners: ((connection: WorkerConnection) => void)[] = [];

  constructor(reputation: ReputationOptions = {}) {
    this.reputation = new ReputationTracker(reputation);
  }

  /** Called whenever a connection may have a free slot: it registered, freed a slot or changed offers. */
  onCapacity(listener: (connection: WorkerConnection) => void): void {
    this.capacityListeners.push(listener);
  }

  /** A connection reports a slot (or new offers) available. */
  capacityChanged(connection: WorkerConnection): void {
    if (this.connections.get(connection.workerId) !== connection) return;
    for (const listener of this.capacityListeners) listener(connection);
  }

  /**
   * Whether some worker offering `model` has a free slot now: admission's cheap check before it
   * matches a waiting request. True whenever a reservation for the model could succeed.
   */
  hasFreeSlot(model: string): boolean {
    for (const connection of this.connections.values()) {
      if (connection.draining) continue;
      const offer = connection.offers.find((candidate) => candidate.model === model);
      if (offer && connection.activeJobs < capacityOf(offer)) return true;
    }
    return false;
  }

  /** Registers a connection; returns the one it replaces (same worker reconnecting), if any. */
  register(connection: WorkerConnection): WorkerConnection | undefined {
    const previous = this.connections.get(connection.workerId);
    this.connections.set(connection.workerId, connection);
    for (const resolve of this.waiters.get(connection.workerId) ?? []) resolve(connection);
    this.waiters.delete(connection.workerId);
    this.capacityChanged(connection);
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

  /**
   * Measured tokens/s for a worker's offer of `model` (or its best measured offer when no model is
   * given), or null before a measured job.
   */
  measuredTokensPerSecond(workerId: string, model?: string): number | null {
    const models =
      model !== undefined ? [model] : (this.connections.get(workerId)?.offers ?? []).map((o) => o.model);
    let best: number | null = null;
    for (const name of models) {
      const tps = this.reputation.tokensPerSecond(workerId, name);
      if (tps !== null && (best === null || tps > best)) best = tps;
    }
    return best;
  }
}

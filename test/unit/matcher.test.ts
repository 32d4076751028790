import { describe, expect, it } from "vitest";
import { pickWorkers, type RoutingConstraints } from "../../server/market/matcher.js";
import { NO_CAPABILITIES, type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";
import { ADVERTISED_DISCOUNT } from "../../server/market/reputation.js";

function connection(workerId: string, price: bigint, tps: number, maxConcurrency = 1): WorkerConnection {
  return {
    workerId,
    providerAccountId: "acct_provider",
    name: workerId,
    draining: false,
    activeJobs: 0,
    offers: [
      {
        model: "m",
        pricePerMillionInput: price,
        pricePerMillionOutput: price,
        advertisedTokensPerSecond: tps,
        maxConcurrency,
        contextLength: 0,
        quantization: "",
        engine: "",
        capabilities: { ...NO_CAPABILITIES },
      },
    ],
    reserve: () => null,
  };
}

const constraints: RoutingConstraints = {
  sort: "price",
  order: [],
  ignore: [],
  allowFallbacks: true,
  requireParameters: true,
};
const request = {
  model: "m",
  promptTokenBound: 10,
  promptTokenFloor: 1,
  maxTokens: 10,
  defaultMaxTokens: 100,
  requires: [],
  constraints,
};

describe("pickWorkers", () => {
  it("orders by price, then by throughput", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("slow", 5n, 10));
    registry.register(connection("fast", 5n, 50));
    registry.register(connection("cheap", 1n, 1));
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual([
      "cheap",
      "fast",
      "slow",
    ]);
  });

  it("prefers measured throughput over the advertised figure, which counts discounted", () => {
    let now = 0;
    const registry = new WorkerRegistry({ now: () => now });
    registry.register(connection("liar", 5n, 1000));
    registry.register(connection("honest", 5n, 50));
    // The liar streams 20 tokens after its first at 10 tokens/s.
    const watch = registry.reputation.watch("liar", "m");
    for (let i = 0; i <= 20; i++) {
      now += 100;
      watch.chunk(1);
    }
    watch.end("success");
    const candidates = pickWorkers(registry, request);
    expect(candidates.map((c) => c.connection.workerId)).toEqual(["honest", "liar"]);
    expect(candidates[0]?.tokensPerSecond).toBe(50 * ADVERTISED_DISCOUNT);
    expect(candidates[1]?.tokensPerSecond).toBeCloseTo(10, 5);
    expect(candidates[1]?.timeToFirstTokenMs).toBe(100);
  });

  it("skips a cooling worker while another can serve, even a busy one, and uses it when none can", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("hole", 1n, 10));
    registry.register({ ...connection("busy", 5n, 10), activeJobs: 1 });
    registry.reputation.watch("hole", "m").end("timeout");
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual(["busy"]);
    expect(
      pickWorkers(registry, { ...request, constraints: { ...constraints, order: ["hole"] } }).map(
        (c) => c.connection.workerId,
      ),
    ).toEqual(["busy"]);
    registry.unregister(registry.get("busy") as WorkerConnection);
    const lastResort = pickWorkers(registry, request);
    expect(lastResort.map((c) => c.connection.workerId)).toEqual(["hole"]);
    expect(lastResort[0]?.cooling).toBe(true);
  });

  it("keeps a worker's cooldown when it reconnects (reputation is per worker, not per stream)", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("hole", 1n, 10));
    registry.register(connection("other", 5n, 10));
    registry.reputation.watch("hole", "m").end("timeout");
    registry.unregister(registry.get("hole") as WorkerConnection);
    registry.register(connection("hole", 1n, 10));
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual(["other"]);
  });

  it("never offers a suspended worker and says so when it was the only one", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("banned", 1n, 10));
    registry.register(connection("ok", 5n, 10));
    registry.reputation.setSuspended("banned", true);
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual(["ok"]);
    registry.unregister(registry.get("ok") as WorkerConnection);
    expect(() => pickWorkers(registry, request)).toThrow(
      expect.objectContaining({ code: "no_capacity", message: expect.stringContaining("1 suspended") }),
    );
  });

  it("ranks busy workers too (the marketplace reserves a slot or queues) and skips draining ones", () => {
    const registry = new WorkerRegistry();
    registry.register({ ...connection("full", 1n, 10), activeJobs: 1 });
    registry.register({ ...connection("leaving", 0n, 10), draining: true });
    registry.register(connection("free", 9n, 10));
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual(["full", "free"]);
    registry.unregister(registry.get("full") as WorkerConnection);
    registry.unregister(registry.get("free") as WorkerConnection);
    expect(() => pickWorkers(registry, request)).toThrow(
      expect.objectContaining({ code: "no_capacity", message: expect.stringContaining("1 draining") }),
    );
  });

  it("says model_not_found when nobody offers the model and no_capacity when caps exclude all", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("w", 5n, 10));
    expect(() => pickWorkers(registry, { ...request, model: "other" })).toThrow(
      expect.objectContaining({ code: "model_not_found" }),
    );
    expect(() =>
      pickWorkers(registry, { ...request, constraints: { ...constraints, maxPricePerMillionInput: 4n } }),
    ).toThrow(
      expect.objectContaining({ code: "no_capacity", message: expect.stringContaining("max_price") }),
    );
  });
});

describe("pickWorkers and what a request uses", () => {
  function offering(
    workerId: string,
    price: bigint,
    extra: { capabilities?: Partial<typeof NO_CAPABILITIES>; contextLength?: number },
  ): WorkerConnection {
    const base = connection(workerId, price, 10);
    const offer = base.offers[0] as WorkerConnection["offers"][number];
    return {
      ...base,
      offers: [
        {
          ...offer,
          contextLength: extra.contextLength ?? 0,
          capabilities: { ...NO_CAPABILITIES, ...extra.capabilities },
        },
      ],
    };
  }
  const usesTools = { ...request, requires: [{ capability: "tools" as const, param: "tools" }] };

  it("sends a request using tools only to offers that support them, even past a cheaper one", () => {
    const registry = new WorkerRegistry();
    registry.register(offering("cheap-plain", 1n, {}));
    registry.register(offering("dear-tools", 9n, { capabilities: { tools: true } }));
    expect(pickWorkers(registry, usesTools).map((c) => c.connection.workerId)).toEqual(["dear-tools"]);
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual([
      "cheap-plain",
      "dear-tools",
    ]);
  });

  it("answers 400 naming the parameter when no offer supports it", () => {
    const registry = new WorkerRegistry();
    registry.register(offering("plain", 1n, { capabilities: { logprobs: true } }));
    expect(() => pickWorkers(registry, usesTools)).toThrow(
      expect.objectContaining({
        code: "invalid_request",
        param: "tools",
        message: expect.stringContaining("'tools'"),
      }),
    );
  });

  it("sizes max_tokens from the offer's context when the request sets none, and the hold follows", () => {
    const registry = new WorkerRegistry();
    registry.register(offering("small", 1_000_000n, { contextLength: 256 }));
    registry.register(offering("unknown", 1_000_000n, {}));
    const candidates = pickWorkers(registry, { ...request, maxTokens: undefined, promptTokenBound: 40 });
    const small = candidates.find((c) => c.connection.workerId === "small");
    const unknown = candidates.find((c) => c.connection.workerId === "unknown");
    expect(small?.maxTokens).toBe(216);
    // 1 credit per 1M tokens = 1 µc per token: the hold is exactly the context's worth.
    expect(small?.worstCaseCost).toBe(256n);
    expect(unknown?.maxTokens).toBe(100);
  });

  it("answers 400 context_length_exceeded when the prompt cannot fit any offer", () => {
    const registry = new WorkerRegistry();
    registry.register(offering("tiny", 1n, { contextLength: 64 }));
    expect(() => pickWorkers(registry, { ...request, promptTokenFloor: 64 })).toThrow(
      expect.objectContaining({ code: "context_length_exceeded" }),
    );
    registry.register(offering("roomy", 1n, { contextLength: 4096 }));
    expect(
      pickWorkers(registry, { ...request, promptTokenFloor: 64 }).map((c) => c.connection.workerId),
    ).toEqual(["roomy"]);
  });
});

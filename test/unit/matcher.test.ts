import { describe, expect, it } from "vitest";
import { pickWorkers, type RoutingConstraints } from "../../server/market/matcher.js";
import { type WorkerConnection, WorkerRegistry } from "../../server/market/registry.js";

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
      },
    ],
    reserve: () => null,
  };
}

const constraints: RoutingConstraints = { sort: "price", order: [], ignore: [], allowFallbacks: true };
const request = { model: "m", promptTokenBound: 10, maxTokens: 10, constraints };

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

  it("prefers measured throughput over the advertised figure", () => {
    const registry = new WorkerRegistry();
    registry.register(connection("liar", 5n, 1000));
    registry.register(connection("honest", 5n, 50));
    registry.recordJob("liar", { tokens: 11, generationMs: 1000, timeToFirstTokenMs: 5 });
    expect(pickWorkers(registry, request).map((c) => c.connection.workerId)).toEqual(["honest", "liar"]);
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

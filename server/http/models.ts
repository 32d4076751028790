/**
 * GET /v1/models and /v1/models/{id}: the models on offer right now, in OpenAI's list format,
 * with the live price range and capacity under `locallmarket`.
 */
import type { FastifyInstance } from "fastify";
import { MarketError } from "../market/errors.js";
import { formatCredits } from "../market/money.js";
import type { WorkerRegistry } from "../market/registry.js";

interface ModelSummary {
  id: string;
  object: "model";
  created: number;
  owned_by: string;
  locallmarket: {
    workers: number;
    free_slots: number;
    price_per_million_input: { min: string; max: string };
    price_per_million_output: { min: string; max: string };
    best_tokens_per_second: number;
  };
}

function summarize(registry: WorkerRegistry, startedAt: number): ModelSummary[] {
  const byModel = new Map<
    string,
    { workers: number; freeSlots: number; inputs: bigint[]; outputs: bigint[]; tps: number }
  >();
  for (const connection of registry.list()) {
    for (const offer of connection.offers) {
      const entry = byModel.get(offer.model) ?? { workers: 0, freeSlots: 0, inputs: [], outputs: [], tps: 0 };
      entry.workers += 1;
      if (!connection.draining) entry.freeSlots += Math.max(0, offer.maxConcurrency - connection.activeJobs);
      entry.inputs.push(offer.pricePerMillionInput);
      entry.outputs.push(offer.pricePerMillionOutput);
      const tps = registry.measuredTokensPerSecond(connection.workerId) ?? offer.advertisedTokensPerSecond;
      entry.tps = Math.max(entry.tps, tps);
      byModel.set(offer.model, entry);
    }
  }
  const range = (values: bigint[]) => {
    const sorted = [...values].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return { min: formatCredits(sorted[0] ?? 0n), max: formatCredits(sorted[sorted.length - 1] ?? 0n) };
  };
  return [...byModel.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([id, entry]) => ({
      id,
      object: "model",
      created: Math.floor(startedAt / 1000),
      owned_by: "locallmarket",
      locallmarket: {
        workers: entry.workers,
        free_slots: entry.freeSlots,
        price_per_million_input: range(entry.inputs),
        price_per_million_output: range(entry.outputs),
        best_tokens_per_second: Math.round(entry.tps * 10) / 10,
      },
    }));
}

export function registerModels(app: FastifyInstance, registry: WorkerRegistry): void {
  const startedAt = Date.now();
  app.get("/v1/models", async () => ({ object: "list", data: summarize(registry, startedAt) }));
  app.get<{ Params: { "*": string } }>("/v1/models/*", async (request) => {
    const id = request.params["*"];
    const model = summarize(registry, startedAt).find((entry) => entry.id === id);
    if (!model)
      throw new MarketError("model_not_found", `No worker offers the model '${id}' right now.`, "model");
    return model;
  });
}

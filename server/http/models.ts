/**
 * GET /v1/models and /v1/models/{id}: the models on offer right now, in OpenAI's list format, with
 * OpenRouter's `context_length`, `pricing` (credits per token, as exact decimal strings, at the
 * cheapest live offer) and `supported_parameters` (what at least one live offer supports), and the
 * live price range and capacity under `locallmarket`.
 */
import type { FastifyInstance } from "fastify";
import { formatCredits } from "../../common/credits.js";
import { MarketError } from "../market/errors.js";
import type { Capability, WorkerRegistry } from "../market/registry.js";

interface ModelSummary {
  id: string;
  object: "model";
  created: number;
  owned_by: string;
  /** The largest context any live offer declares; null when none says. */
  context_length: number | null;
  pricing: { prompt: string; completion: string };
  supported_parameters: string[];
  locallmarket: {
    workers: number;
    free_slots: number;
    price_per_million_input: { min: string; max: string };
    price_per_million_output: { min: string; max: string };
    best_tokens_per_second: number;
    builds: { weights_sha256: string | null; engine: string; engine_version: string; workers: number }[];
  };
}

/** What every offer takes. */
const BASE_PARAMETERS = [
  "max_tokens",
  "max_completion_tokens",
  "temperature",
  "top_p",
  "stop",
  "seed",
  "presence_penalty",
  "frequency_penalty",
];

const CAPABILITY_PARAMETERS: [Capability, string[]][] = [
  ["tools", ["tools", "tool_choice", "parallel_tool_calls"]],
  ["jsonSchema", ["response_format", "structured_outputs"]],
  ["logprobs", ["logprobs", "top_logprobs"]],
];

const priceRange = ({ min, max }: { min: string; max: string }) => ({ min, max });

/** µc per 1M tokens → credits per token, exactly: the price × 10⁻¹², as a decimal string. */
export function creditsPerToken(pricePerMillion: bigint): string {
  const digits = pricePerMillion.toString().padStart(13, "0");
  const whole = digits.slice(0, -12);
  const fraction = digits.slice(-12).replace(/0+$/, "");
  return fraction ? `${whole}.${fraction}` : whole;
}

function summarize(registry: WorkerRegistry, startedAt: number): ModelSummary[] {
  const byModel = new Map<
    string,
    {
      workers: number;
      freeSlots: number;
      inputs: bigint[];
      outputs: bigint[];
      tps: number;
      context: number;
      parameters: Set<string>;
      /** The builds offered: weights hash, engine and version, with how many workers serve each. */
      builds: Map<
        string,
        { weights_sha256: string | null; engine: string; engine_version: string; workers: number }
      >;
    }
  >();
  for (const connection of registry.list()) {
    for (const offer of connection.offers) {
      const entry: NonNullable<ReturnType<typeof byModel.get>> = byModel.get(offer.model) ?? {
        workers: 0,
        freeSlots: 0,
        inputs: [],
        outputs: [],
        tps: 0,
        context: 0,
        parameters: new Set(BASE_PARAMETERS),
        builds: new Map(),
      };
      const buildKey = `${offer.weightsSha256 ?? ""}\u0000${offer.engine}\u0000${offer.engineVersion ?? ""}`;
      const build = entry.builds.get(buildKey) ?? {
        weights_sha256: offer.weightsSha256 || null,
        engine: offer.engine,
        engine_version: offer.engineVersion ?? "",
        workers: 0,
      };
      build.workers += 1;
      entry.builds.set(buildKey, build);
      entry.context = Math.max(entry.context, offer.contextLength);
      for (const [capability, parameters] of CAPABILITY_PARAMETERS) {
        if (offer.capabilities[capability])
          for (const parameter of parameters) entry.parameters.add(parameter);
      }
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
    return {
      lowest: sorted[0] ?? 0n,
      min: formatCredits(sorted[0] ?? 0n),
      max: formatCredits(sorted[sorted.length - 1] ?? 0n),
    };
  };
  return [...byModel.entries()]
    .sort(([a], [b]) => a.localeCompare(b))
    .map(([id, entry]) => ({
      id,
      object: "model",
      created: Math.floor(startedAt / 1000),
      owned_by: "locallmarket",
      context_length: entry.context > 0 ? entry.context : null,
      pricing: {
        prompt: creditsPerToken(range(entry.inputs).lowest),
        completion: creditsPerToken(range(entry.outputs).lowest),
      },
      supported_parameters: [...entry.parameters].sort(),
      locallmarket: {
        workers: entry.workers,
        free_slots: entry.freeSlots,
        price_per_million_input: priceRange(range(entry.inputs)),
        price_per_million_output: priceRange(range(entry.outputs)),
        best_tokens_per_second: Math.round(entry.tps * 10) / 10,
        // Which exact weights (SHA-256 of the file, quantization included) serve this name: a
        // consumer can tell the reference build from others; audits hold workers to their hash.
        builds: [...entry.builds.values()].sort((a, b) => b.workers - a.workers),
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

/** Liveness for orchestrators: the process answers and knows how many workers are connected. */
import type { FastifyInstance } from "fastify";
import type { WorkerRegistry } from "../market/registry.js";

export function registerHealth(app: FastifyInstance, registry: WorkerRegistry): void {
  app.get("/healthz", async () => ({ status: "ok", workers_online: registry.list().length }));
}

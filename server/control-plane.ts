/**
 * Assembles the control plane from its parts and starts its two listeners:
 * - HTTP/1.1 (fastify): the OpenAI-compatible API, /healthz, and AdminService over Connect/JSON;
 * - h2c (connect-node): WorkerService (the workers' streams) and AdminService over gRPC.
 * Plain-text HTTP/2 cannot also serve HTTP/1.1 on one port, hence two ports.
 * `main.ts` only parses options and calls startControlPlane; tests call it with ports 0.
 */
import { setMaxListeners } from "node:events";
import http2 from "node:http2";
import type { AddressInfo } from "node:net";
import { fastifyConnectPlugin } from "@connectrpc/connect-fastify";
import { connectNodeAdapter } from "@connectrpc/connect-node";
import Fastify, { type FastifyBaseLogger, type FastifyInstance } from "fastify";
import { AdminService } from "../gen/locallmarket/v1/admin_pb.js";
import { WorkerService } from "../gen/locallmarket/v1/worker_pb.js";
import { adminAuthInterceptor, loadAdminToken } from "./admin/admin-auth.js";
import { createAdminService } from "./admin/admin-service.js";
import type { ServerConfig } from "./config.js";
import { registerChatCompletions } from "./http/chat-completions.js";
import { registerHealth } from "./http/health.js";
import { registerModels } from "./http/models.js";
import { openAiErrorHandler, sendOpenAiError } from "./http/openai-error.js";
import { createWorkerService } from "./link/worker-service.js";
import { MarketError } from "./market/errors.js";
import { Marketplace } from "./market/marketplace.js";
import { WorkerRegistry } from "./market/registry.js";
import { openDatabase } from "./store/database.js";
import { SqlMarketStore } from "./store/market-store.js";

export interface ControlPlane {
  httpUrl: string;
  grpcUrl: string;
  adminToken: string;
  /** Set when the token was generated on this start (first run), with where it is kept. */
  adminTokenFile: string | undefined;
  databaseDescription: string;
  store: SqlMarketStore;
  registry: WorkerRegistry;
  marketplace: Marketplace;
  log: FastifyBaseLogger;
  /** Stops taking requests, closes worker streams, settles what it can and closes the database. */
  close(): Promise<void>;
}

/** Largest message on the worker stream or the admin API (a chunk, a job with its prompt). */
const MAX_RPC_MESSAGE_BYTES = 16 * 1024 * 1024;

export async function startControlPlane(config: ServerConfig): Promise<ControlPlane> {
  const app: FastifyInstance = Fastify({
    logger: { level: config.logLevel },
    bodyLimit: config.maxBodyBytes,
  });
  const log = app.log;
  const database = await openDatabase({ databaseUrl: config.databaseUrl, dataDir: config.dataDir });
  const store = new SqlMarketStore(database.orm);
  const registry = new WorkerRegistry();
  const marketplace = new Marketplace(store, registry, config, log);
  await marketplace.settleAbandonedOrders();

  const admin = await loadAdminToken(config.dataDir, config.adminToken);
  const adminService = createAdminService({ store, registry });
  const adminInterceptors = [adminAuthInterceptor(admin.token)];
  const shutdown = new AbortController();
  // connect-node listens on this signal once per call in flight; every worker stream is one.
  setMaxListeners(0, shutdown.signal);

  app.setErrorHandler(openAiErrorHandler);
  app.setNotFoundHandler((request, reply) =>
    sendOpenAiError(reply, new MarketError("not_found", `No route ${request.method} ${request.url}.`)),
  );
  registerHealth(app, registry);
  registerModels(app, registry);
  registerChatCompletions(app, { store, marketplace, keepAliveMs: config.keepAliveMs });
  await app.register(fastifyConnectPlugin, {
    routes: (router) => router.service(AdminService, adminService, { interceptors: adminInterceptors }),
    readMaxBytes: MAX_RPC_MESSAGE_BYTES,
    writeMaxBytes: MAX_RPC_MESSAGE_BYTES,
  });

  const grpcServer = http2.createServer(
    connectNodeAdapter({
      routes: (router) => {
        router.service(
          WorkerService,
          createWorkerService({
            store,
            registry,
            log,
            heartbeatIntervalMs: config.heartbeatIntervalMs,
            maxChunkBytes: 64 * 1024,
            shutdownSignal: shutdown.signal,
          }),
        );
        router.service(AdminService, adminService, { interceptors: adminInterceptors });
      },
      readMaxBytes: MAX_RPC_MESSAGE_BYTES,
      writeMaxBytes: MAX_RPC_MESSAGE_BYTES,
      shutdownSignal: shutdown.signal,
    }),
  );

  // http2's close() waits for every session; workers keep theirs open, so they are closed here.
  const grpcSessions = new Set<http2.ServerHttp2Session>();
  grpcServer.on("session", (session) => {
    grpcSessions.add(session);
    session.once("close", () => grpcSessions.delete(session));
  });

  try {
    await app.listen({ host: config.host, port: config.httpPort });
    await new Promise<void>((resolve, reject) => {
      grpcServer.once("error", reject);
      grpcServer.listen(config.grpcPort, config.host, () => {
        grpcServer.off("error", reject);
        resolve();
      });
    });
  } catch (error) {
    await app.close();
    grpcServer.close();
    await database.close();
    throw error;
  }

  const hostForUrl = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
  const httpPort = (app.server.address() as AddressInfo).port;
  const grpcPort = (grpcServer.address() as AddressInfo).port;

  let closing: Promise<void> | undefined;
  const close = () => {
    closing ??= (async () => {
      // Stop new HTTP requests first, then end worker streams: running orders fail and settle.
      const httpClosed = app.close();
      shutdown.abort();
      const grpcClosed = new Promise<void>((resolve) => grpcServer.close(() => resolve()));
      for (const session of grpcSessions) session.close();
      await grpcClosed;
      await httpClosed;
      await marketplace.whenIdle();
      await database.close();
    })();
    return closing;
  };

  return {
    httpUrl: `http://${hostForUrl}:${httpPort}`,
    grpcUrl: `http://${hostForUrl}:${grpcPort}`,
    adminToken: admin.token,
    adminTokenFile: admin.created ? admin.path : undefined,
    databaseDescription: database.description,
    store,
    registry,
    marketplace,
    log,
    close,
  };
}

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
import { RejectCode, WorkerService } from "../gen/locallmarket/v1/worker_pb.js";
import { adminAuthInterceptor, loadAdminToken } from "./admin/admin-auth.js";
import { createAdminService } from "./admin/admin-service.js";
import type { ServerConfig } from "./config.js";
import { ApiKeyCache } from "./http/api-key-cache.js";
import { registerChatCompletions } from "./http/chat-completions.js";
import { registerCompletions } from "./http/completions.js";
import { registerHealth } from "./http/health.js";
import { registerModels } from "./http/models.js";
import { openAiErrorHandler, sendOpenAiError } from "./http/openai-error.js";
import { registerResponses } from "./http/responses.js";
import { createWorkerService } from "./link/worker-service.js";
import { WorkerSession } from "./link/worker-session.js";
import { MarketError } from "./market/errors.js";
import { Marketplace } from "./market/marketplace.js";
import { WorkerRegistry } from "./market/registry.js";
import { ModelRegistry } from "./models/model-registry.js";
import { openDatabase } from "./store/database.js";
import { SqlMarketStore } from "./store/market-store.js";
import { ModelRegistryStore } from "./store/model-registry-store.js";
import { TrustStore } from "./store/trust-store.js";
import { CanaryService } from "./trust/canary.js";
import { TrustService } from "./trust/trust-service.js";

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
  /** Audits and trusted verifiers (server/trust/). */
  trust: TrustService;
  /** Blind canaries mixed into the traffic (server/trust/canary.ts). */
  canaries: CanaryService;
  log: FastifyBaseLogger;
  /**
   * Stops gracefully: new requests get 503 with Retry-After, workers get Drain, running orders may
   * finish within `graceMs` (default --shutdown-grace) and are then cut and settled at what their
   * consumers took; then the listeners and the database close. Idempotent.
   */
  close(options?: { graceMs?: number }): Promise<void>;
  /** Cuts a graceful close short (a second signal): running orders end now. */
  forceClose(): Promise<void>;
}

/** Largest message on the worker stream or the admin API (a chunk, a job with its prompt). */
const MAX_RPC_MESSAGE_BYTES = 16 * 1024 * 1024;
/** How long a gRPC connection may take to end its streams once the server closes it. */
const GRPC_CLOSE_GRACE_MS = 2_000;
/** Flow-control window per job, in chunks (Welcome.job_window_chunks). */
const JOB_WINDOW_CHUNKS = 64;
/** A probation probe is given up this long after its first-token timeout would have fired. */
const PROBE_GRACE_MS = 5_000;
/** The longest pause between two releases of matured provider earnings. */
const RELEASE_INTERVAL_MS = 60_000;

export async function startControlPlane(config: ServerConfig): Promise<ControlPlane> {
  const app: FastifyInstance = Fastify({
    logger: { level: config.logLevel },
    bodyLimit: config.maxBodyBytes,
    // Slow clients (slowloris) must not hold sockets. Node's request timeout bounds only receiving
    // a request (headers and body), never the response: a stream lasts as long as its order.
    requestTimeout: config.httpRequestTimeoutMs,
    keepAliveTimeout: config.httpKeepAliveTimeoutMs,
    // A non-streamed completion sends nothing until it is done, so a silent socket may be waiting
    // for a queued order that runs to its job timeout.
    connectionTimeout: Math.max(config.httpIdleTimeoutMs, config.queueTimeoutMs + config.jobTimeoutMs),
    http: {
      // Node refuses a headers timeout longer than the request timeout.
      headersTimeout: Math.min(config.httpHeadersTimeoutMs, config.httpRequestTimeoutMs),
      requestTimeout: config.httpRequestTimeoutMs,
      // Node checks both timeouts every 30 s by default, which would let a slow client stay 30 s longer.
      connectionsCheckingInterval: 1_000,
    },
  });
  app.server.maxConnections = config.maxConnections;
  const log = app.log;
  const database = await openDatabase({
    databaseUrl: config.databaseUrl,
    dataDir: config.dataDir,
    warn: (message) => log.warn(message),
  });
  const store = new SqlMarketStore(database.orm, { settleAfterMs: config.settleAfterMs });
  const registry = new WorkerRegistry({
    cooldownMs: config.cooldownMs,
    allowedFailures: config.allowedFailures,
    maxCooldownMs: config.maxCooldownMs,
    // A probe that shows no first token is given up with its order's attempt.
    probeTimeoutMs: config.firstTokenTimeoutMs + PROBE_GRACE_MS,
  });
  const marketplace = new Marketplace(store, registry, config, log);
  const trust = new TrustService({
    connections: () => registry.list(),
    log,
    store: new TrustStore(database.orm),
    detailRate: config.tokenDetailBasisPoints / 10_000,
    auditRate: Math.min(config.auditBasisPoints, config.tokenDetailBasisPoints) / 10_000,
    reputation: registry.reputation,
    // A suspended worker's live session ends at once; its worker stops for good (worker.proto).
    onSuspended: (workerId, reason) => {
      const live = registry.get(workerId);
      if (live instanceof WorkerSession) live.close(`suspended: ${reason}`, RejectCode.BANNED);
    },
  });
  await trust.load();
  const canaries = new CanaryService({
    registry,
    trust,
    log,
    rate: config.canaryBasisPoints / 10_000,
    jobTimeoutMs: config.jobTimeoutMs,
    slotTimeoutMs: config.queueTimeoutMs,
  });
  marketplace.onOrderDispatched = (order) => canaries.afterOrder(order);
  // Registered models' tokenizers load before the first order, so their counting starts at once.
  const models = new ModelRegistry(new ModelRegistryStore(database.orm), log);
  await models.load();
  marketplace.tokenCounts = models;
  await marketplace.settleAbandonedOrders();

  const admin = await loadAdminToken(config.dataDir, config.adminToken);
  const apiKeys = new ApiKeyCache({ store, log });
  const adminService = createAdminService({
    store,
    registry,
    onApiKeyRevoked: (keyId) => apiKeys.forgetKey(keyId),
    onAccountChanged: (accountId) => apiKeys.forgetAccount(accountId),
    models,
    trust,
  });
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
  const runEndpoint = {
    apiKeys,
    marketplace,
    keepAliveMs: config.keepAliveMs,
    slowReaderTimeoutMs: config.slowReaderTimeoutMs,
  };
  registerChatCompletions(app, runEndpoint);
  registerCompletions(app, runEndpoint);
  registerResponses(app, runEndpoint);
  await app.register(fastifyConnectPlugin, {
    routes: (router) => router.service(AdminService, adminService, { interceptors: adminInterceptors }),
    readMaxBytes: MAX_RPC_MESSAGE_BYTES,
    writeMaxBytes: MAX_RPC_MESSAGE_BYTES,
  });

  const grpcServer = http2.createServer(
    // Node's default lets one connection open 2^32-1 streams; a worker needs one, an admin client a few.
    { settings: { maxConcurrentStreams: 1_000 } },
    connectNodeAdapter({
      routes: (router) => {
        router.service(
          WorkerService,
          createWorkerService({
            trust,
            store,
            registry,
            log,
            heartbeatIntervalMs: config.heartbeatIntervalMs,
            maxChunkBytes: 64 * 1024,
            jobWindowChunks: JOB_WINDOW_CHUNKS,
            helloTimeoutMs: config.helloTimeoutMs,
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
  grpcServer.maxConnections = config.maxConnections;
  grpcServer.on("session", (session) => {
    grpcSessions.add(session);
    // A connection that never opens a stream would hold a slot under --max-connections for nothing;
    // streams themselves (a worker's lives for days) are bounded by the Hello deadline instead.
    const noStream = setTimeout(() => session.destroy(), config.helloTimeoutMs);
    session.once("stream", () => clearTimeout(noStream));
    session.once("close", () => {
      clearTimeout(noStream);
      grpcSessions.delete(session);
    });
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
    await apiKeys.close();
    await app.close();
    grpcServer.close();
    await database.close();
    throw error;
  }

  const hostForUrl = config.host === "0.0.0.0" ? "127.0.0.1" : config.host;
  const httpPort = (app.server.address() as AddressInfo).port;
  const grpcPort = (grpcServer.address() as AddressInfo).port;

  const releaseEarnings = async () => {
    try {
      const released = await store.releaseMaturedEarnings();
      if (released > 0) log.info({ released }, "matured provider earnings released");
    } catch (error) {
      log.error({ err: String(error) }, "releasing matured earnings failed; retried at the next tick");
    }
  };
  await releaseEarnings();
  const releaseTimer = setInterval(
    () => void releaseEarnings(),
    Math.max(1_000, Math.min(config.settleAfterMs, RELEASE_INTERVAL_MS)),
  );
  releaseTimer.unref();

  let closing: Promise<void> | undefined;
  let force: () => void = () => {};
  const forced = new Promise<void>((resolve) => {
    force = resolve;
  });
  const close = (options: { graceMs?: number } = {}) => {
    closing ??= (async () => {
      const graceMs = options.graceMs ?? config.shutdownGraceMs;
      marketplace.stopAdmitting();
      canaries.stop();
      for (const connection of registry.list()) {
        if (connection instanceof WorkerSession) connection.drain("the control plane is stopping");
      }
      log.info({ inFlight: marketplace.inFlight, graceMs }, "stopping: finishing orders in flight");
      let graceTimer: NodeJS.Timeout | undefined;
      const graceOver = new Promise<void>((resolve) => {
        graceTimer = setTimeout(resolve, graceMs);
      });
      await Promise.race([marketplace.whenIdle(), graceOver, forced]);
      clearTimeout(graceTimer);
      if (marketplace.inFlight > 0) {
        log.warn({ inFlight: marketplace.inFlight }, "stopping: cutting the orders still running");
        marketplace.abortAll("The control plane stopped before the order finished.");
      }
      await marketplace.whenIdle();
      await marketplace.close();
      clearInterval(releaseTimer);
      await apiKeys.close();
      const httpClosed = app.close();
      shutdown.abort();
      const grpcClosed = new Promise<void>((resolve) => grpcServer.close(() => resolve()));
      for (const session of grpcSessions) {
        session.close();
        // A stream the peer never finishes (one that broke mid-message) would hold close() forever.
        setTimeout(() => session.destroy(), GRPC_CLOSE_GRACE_MS).unref();
      }
      await grpcClosed;
      await httpClosed;
      await database.close();
      await models.close();
    })();
    return closing;
  };
  const forceClose = () => {
    force();
    return close();
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
    trust,
    canaries,
    log,
    close,
    forceClose,
  };
}

/**
 * WorkerService.Connect: authenticates a worker's Hello, registers its session in the live market
 * and then pumps messages both ways until either side ends the stream.
 */
import { randomUUID } from "node:crypto";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, type HandlerContext, type ServiceImpl } from "@connectrpc/connect";
import {
  type ConnectRequest,
  type ConnectResponse,
  ConnectResponseSchema,
  RejectCode,
  type WorkerService,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { isMarketError } from "../market/errors.js";
import type { MarketLogger } from "../market/marketplace.js";
import type { WorkerRegistry } from "../market/registry.js";
import type { MarketStore } from "../market/store-port.js";
import { offersFromWire, offersToWire } from "./offers.js";
import { type SessionTrustHooks, WorkerSession } from "./worker-session.js";

export interface WorkerServiceOptions {
  store: MarketStore;
  registry: WorkerRegistry;
  log: MarketLogger;
  heartbeatIntervalMs: number;
  maxChunkBytes: number;
  /**
   * A stream that sends no Hello within this long is ended with DEADLINE_EXCEEDED, so connections
   * that never identify themselves cannot pile up. Defaults to DEFAULT_HELLO_TIMEOUT_MS.
   */
  helloTimeoutMs?: number;
  /** Flow-control window per job, in chunks (Welcome.job_window_chunks). */
  jobWindowChunks: number;
  /**
   * Aborted when the control plane shuts down. A handler's own signal also aborts when the worker's
   * stream goes away (the worker died or cancelled), so only this one means "shutting down".
   */
  shutdownSignal: AbortSignal;
  /** Seeds, token detail and audits (server/trust/); absent: none. */
  trust?: SessionTrustHooks;
}

export const DEFAULT_HELLO_TIMEOUT_MS = 10_000;

function reject(code: RejectCode, message: string): ConnectResponse {
  return create(ConnectResponseSchema, { message: { case: "reject", value: { code, message } } });
}

export function createWorkerService(options: WorkerServiceOptions): ServiceImpl<typeof WorkerService> {
  const { store, registry, log } = options;

  return {
    async *connect(requests: AsyncIterable<ConnectRequest>, context: HandlerContext) {
      const incoming = requests[Symbol.asyncIterator]();
      const helloTimeoutMs = options.helloTimeoutMs ?? DEFAULT_HELLO_TIMEOUT_MS;
      let helloTimer: NodeJS.Timeout | undefined;
      const first = await Promise.race([
        incoming.next(),
        new Promise<never>((_, noHello) => {
          helloTimer = setTimeout(
            () => noHello(new ConnectError(`no Hello within ${helloTimeoutMs} ms`, Code.DeadlineExceeded)),
            helloTimeoutMs,
          );
        }),
      ]).finally(() => clearTimeout(helloTimer));
      if (first.done || first.value.message.case !== "hello") {
        yield reject(RejectCode.INVALID_HELLO, "the first message must be Hello");
        throw new ConnectError("the first message must be Hello", Code.InvalidArgument);
      }
      const hello = first.value.message.value;
      const worker = await store.authenticateWorkerToken(hello.workerToken);
      if (!worker) {
        yield reject(RejectCode.UNAUTHENTICATED, "unknown or revoked worker token");
        throw new ConnectError("unknown or revoked worker token", Code.Unauthenticated);
      }
      const suspended = options.trust?.suspendedReason?.(worker.id);
      if (suspended !== undefined) {
        // The token is refused while the suspension lasts (admin worker unsuspend lifts it).
        const message = `worker ${worker.id} is suspended: ${suspended}; only the operator can lift it (admin worker unsuspend)`;
        yield reject(RejectCode.BANNED, message);
        throw new ConnectError(message, Code.PermissionDenied);
      }
      let offers: ReturnType<typeof offersFromWire>;
      try {
        offers = offersFromWire(hello.offers, { allowEmpty: false });
      } catch (error) {
        const message = isMarketError(error) ? error.message : "invalid Hello";
        yield reject(RejectCode.INVALID_HELLO, message);
        throw new ConnectError(message, Code.InvalidArgument);
      }
      const name = hello.workerName || worker.name || worker.id;
      await store.recordWorkerConnected(worker.id, { name, agentVersion: hello.agentVersion, offers });

      const session = new WorkerSession({
        workerId: worker.id,
        providerAccountId: worker.accountId,
        name,
        sessionId: randomUUID(),
        offers,
        heartbeatIntervalMs: options.heartbeatIntervalMs,
        maxChunkBytes: options.maxChunkBytes,
        jobWindowChunks: options.jobWindowChunks,
        log,
        onCapacity: (changed) => registry.capacityChanged(changed),
        onClose: (closed) => registry.unregister(closed),
        ...(options.trust ? { trust: options.trust } : {}),
      });
      const replaced = registry.register(session);
      if (replaced instanceof WorkerSession) {
        replaced.close("replaced by a new connection with the same worker token", RejectCode.REPLACED);
      }
      log.info(
        { workerId: worker.id, sessionId: session.sessionId, offers: offers.map((offer) => offer.model) },
        "worker connected",
      );

      const onAbort = () => {
        if (options.shutdownSignal.aborted) {
          session.close("control plane shutting down", RejectCode.SHUTTING_DOWN);
        } else {
          session.close("the worker's stream was cancelled or reset");
        }
      };
      context.signal.addEventListener("abort", onAbort, { once: true });
      void (async () => {
        try {
          for (let next = await incoming.next(); !next.done; next = await incoming.next()) {
            session.handle(next.value);
          }
          session.close("the worker ended the stream");
        } catch (error) {
          session.close(`stream error: ${error instanceof Error ? error.message : String(error)}`);
        }
      })();

      try {
        yield create(ConnectResponseSchema, {
          message: {
            case: "welcome",
            value: {
              workerId: worker.id,
              sessionId: session.sessionId,
              heartbeatIntervalMs: options.heartbeatIntervalMs,
              maxChunkBytes: options.maxChunkBytes,
              acceptedOffers: offersToWire(offers),
              jobWindowChunks: options.jobWindowChunks,
            },
          },
        });
        yield* session.outbound;
      } finally {
        context.signal.removeEventListener("abort", onAbort);
        session.close("stream closed");
      }
    },
  };
}

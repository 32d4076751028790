/**
 * The one place a MarketError becomes an HTTP status and an OpenAI-shaped error body
 * (`{"error": {"message", "type", "param", "code"}}`), so the `openai` SDK raises the right class.
 */
import type { FastifyError, FastifyReply, FastifyRequest } from "fastify";
import { isMarketError, MarketError, type MarketErrorCode } from "../market/errors.js";

const STATUS: Record<MarketErrorCode, { status: number; type: string }> = {
  invalid_request: { status: 400, type: "invalid_request_error" },
  context_length_exceeded: { status: 400, type: "invalid_request_error" },
  unauthenticated: { status: 401, type: "authentication_error" },
  permission_denied: { status: 403, type: "permission_error" },
  insufficient_credits: { status: 402, type: "insufficient_credits" },
  not_found: { status: 404, type: "invalid_request_error" },
  model_not_found: { status: 404, type: "invalid_request_error" },
  payload_too_large: { status: 413, type: "invalid_request_error" },
  rate_limited: { status: 429, type: "rate_limit_error" },
  no_capacity: { status: 503, type: "service_unavailable" },
  worker_failed: { status: 502, type: "upstream_error" },
  conflict: { status: 409, type: "invalid_request_error" },
  // nginx's "client closed request": only ever logged, the consumer is gone.
  cancelled: { status: 499, type: "client_closed_request" },
  shutting_down: { status: 503, type: "service_unavailable" },
  internal: { status: 500, type: "server_error" },
};

export interface OpenAiErrorBody {
  error: { message: string; type: string; param: string | null; code: string };
}

export function httpStatusOf(error: MarketError): number {
  return STATUS[error.code].status;
}

export function openAiErrorBody(error: MarketError): OpenAiErrorBody {
  return {
    error: {
      message: error.message,
      type: STATUS[error.code].type,
      param: error.param ?? null,
      code: error.code,
    },
  };
}

/** Turns whatever was thrown (ours, fastify's body parser, a bug) into a MarketError. */
export function asMarketError(error: unknown): MarketError {
  if (isMarketError(error)) return error;
  const fastifyError = error as Partial<FastifyError>;
  if (fastifyError.code === "FST_ERR_CTP_BODY_TOO_LARGE") {
    return new MarketError("payload_too_large", "The request body is too large.");
  }
  if (typeof fastifyError.statusCode === "number" && fastifyError.statusCode < 500) {
    return new MarketError("invalid_request", fastifyError.message ?? "Invalid request.");
  }
  return new MarketError("internal", "Internal error.");
}

export function sendOpenAiError(reply: FastifyReply, error: MarketError): FastifyReply {
  if (error.retryAfterSeconds !== undefined) reply.header("retry-after", String(error.retryAfterSeconds));
  return reply.code(httpStatusOf(error)).type("application/json").send(openAiErrorBody(error));
}

export function openAiErrorHandler(
  error: unknown,
  request: FastifyRequest,
  reply: FastifyReply,
): FastifyReply {
  const marketError = asMarketError(error);
  if (marketError.code === "internal") request.log.error({ err: error }, "unhandled error");
  return sendOpenAiError(reply, marketError);
}

/**
 * The one place that turns a failure into a Connect error for the gRPC services (admin API and
 * worker link). A MarketError keeps its message and gets the Connect code of its MarketErrorCode;
 * anything else is an unexpected failure: it is logged here and the caller sees only a generic
 * Internal error, so no stack, SQL or file path leaks over the wire.
 */
import { Code, ConnectError } from "@connectrpc/connect";
import { isMarketError, type MarketErrorCode } from "../market/errors.js";

const CONNECT_CODES: Readonly<Record<MarketErrorCode, Code>> = {
  invalid_request: Code.InvalidArgument,
  context_length_exceeded: Code.InvalidArgument,
  unauthenticated: Code.Unauthenticated,
  permission_denied: Code.PermissionDenied,
  insufficient_credits: Code.FailedPrecondition,
  not_found: Code.NotFound,
  model_not_found: Code.NotFound,
  payload_too_large: Code.ResourceExhausted,
  rate_limited: Code.ResourceExhausted,
  no_capacity: Code.Unavailable,
  worker_failed: Code.Unavailable,
  conflict: Code.AlreadyExists,
  cancelled: Code.Canceled,
  shutting_down: Code.Unavailable,
  internal: Code.Internal,
};

/** The Connect code a MarketError code maps to. */
export function connectCodeOf(code: MarketErrorCode): Code {
  return CONNECT_CODES[code];
}

/**
 * Converts anything thrown by a handler into a ConnectError. ConnectErrors pass through unchanged
 * (an interceptor or a nested call already decided); MarketErrors are mapped by code; everything
 * else becomes Internal "internal error" and the original is logged.
 */
export function toConnectError(error: unknown): ConnectError {
  if (error instanceof ConnectError) return error;
  if (isMarketError(error)) {
    return new ConnectError(error.message, connectCodeOf(error.code), undefined, undefined, error);
  }
  console.error("unexpected error in an RPC handler:", error);
  return new ConnectError("internal error", Code.Internal);
}

/**
 * The one error family of the control plane. Every failure a consumer, worker or operator can see
 * is a MarketError with a stable code; the HTTP front door maps the code to a status and an OpenAI
 * error body (server/http/openai-error.ts) and the gRPC services map it to a Connect `Code`
 * (server/admin/connect-error.ts). Nothing else decides statuses.
 */
export type MarketErrorCode =
  | "invalid_request"
  | "context_length_exceeded"
  | "unauthenticated"
  | "permission_denied"
  | "insufficient_credits"
  | "not_found"
  | "model_not_found"
  | "payload_too_large"
  | "rate_limited"
  | "no_capacity"
  | "worker_failed"
  | "conflict"
  | "cancelled"
  | "shutting_down"
  | "internal";

export class MarketError extends Error {
  override readonly name = "MarketError";

  constructor(
    readonly code: MarketErrorCode,
    message: string,
    /** The request field at fault, when there is one (OpenAI's `param`). */
    readonly param?: string,
    /** For a temporary refusal (503, 429): when to try again, sent as `Retry-After`. */
    readonly retryAfterSeconds?: number,
  ) {
    super(message);
  }
}

export function isMarketError(error: unknown): error is MarketError {
  return error instanceof MarketError;
}

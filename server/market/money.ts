/**
 * Money arithmetic. Everything is integer micro-credits (µc, 1 credit = 1,000,000 µc) in bigint;
 * prices are µc per one million tokens. No floats touch an amount. Parsing and formatting credits
 * is common/credits.ts, shared with the worker.
 */
const TOKENS_PER_PRICE_UNIT = 1_000_000n;
const BASIS_POINTS = 10_000n;

function ceilDiv(numerator: bigint, denominator: bigint): bigint {
  return (numerator + denominator - 1n) / denominator;
}

/** Cost = ceil((prompt·p_in + completion·p_out) / 1e6): the platform never rounds a charge to 0 µc. */
export function orderCost(
  promptTokens: number,
  completionTokens: number,
  pricePerMillionInput: bigint,
  pricePerMillionOutput: bigint,
): bigint {
  return ceilDiv(
    orderCostExact(promptTokens, completionTokens, pricePerMillionInput, pricePerMillionOutput),
    TOKENS_PER_PRICE_UNIT,
  );
}

/** prompt·p_in + completion·p_out: a cost in millionths of a µc, before rounding up. */
export function orderCostExact(
  promptTokens: number,
  completionTokens: number,
  pricePerMillionInput: bigint,
  pricePerMillionOutput: bigint,
): bigint {
  return BigInt(promptTokens) * pricePerMillionInput + BigInt(completionTokens) * pricePerMillionOutput;
}

/** The platform's fee, rounded down so rounding always favours the provider. */
export function platformFee(cost: bigint, feeBasisPoints: number): bigint {
  return (cost * BigInt(feeBasisPoints)) / BASIS_POINTS;
}

/** Allowance for a chat template's special tokens, per message and per conversation. */
const TEMPLATE_TOKENS_PER_MESSAGE = 8;
const TEMPLATE_TOKENS_PER_CONVERSATION = 16;
/** Allowance for the tokens a chat template wraps around each tool's definition. */
const TEMPLATE_TOKENS_PER_TOOL = 32;
/**
 * What an image can cost in prompt tokens. Vision encoders turn an image into a fixed or tiled
 * number of tokens; this bound covers the common ones (LLaVA-style 576–2,880, tiled encoders).
 */
const TOKENS_PER_IMAGE = 4_096;
/** No tokenizer the platform meets has tokens longer than this many bytes. */
const MAX_BYTES_PER_TOKEN = 32;

/** What a prompt is made of, for bounding its tokens. */
export interface PromptParts {
  messages: ReadonlyArray<{
    role: string;
    content: string;
    name?: string;
    toolCalls?: ReadonlyArray<{ id: string; name: string; arguments: string }>;
    toolCallId?: string;
    imageUrls?: readonly string[];
  }>;
  /** A raw completion's text. */
  prompt?: string;
  tools?: ReadonlyArray<{ name: string; description: string; parametersJson: string }>;
  /** A JSON schema the engine may put in the prompt. */
  schemaJson?: string;
}

function textBytes(parts: PromptParts): number {
  let bytes = Buffer.byteLength(parts.prompt ?? "") + Buffer.byteLength(parts.schemaJson ?? "");
  for (const message of parts.messages) {
    bytes += Buffer.byteLength(message.role) + Buffer.byteLength(message.content);
    if (message.name) bytes += Buffer.byteLength(message.name);
    if (message.toolCallId) bytes += Buffer.byteLength(message.toolCallId);
    for (const call of message.toolCalls ?? []) {
      bytes += Buffer.byteLength(call.id) + Buffer.byteLength(call.name) + Buffer.byteLength(call.arguments);
    }
  }
  for (const tool of parts.tools ?? []) {
    bytes +=
      Buffer.byteLength(tool.name) +
      Buffer.byteLength(tool.description) +
      Buffer.byteLength(tool.parametersJson);
  }
  return bytes;
}

/**
 * An upper bound on a prompt's tokens that holds for any tokenizer the platform can meet: a token
 * never encodes less than one UTF-8 byte (byte-level BPE and SentencePiece with byte fallback both
 * satisfy this), plus allowances for the special tokens a chat template adds around messages and
 * tools, and for images. Engine-reported prompt counts above it are capped to it and flagged.
 */
export function promptBound(parts: PromptParts): number {
  const images = parts.messages.reduce((count, message) => count + (message.imageUrls?.length ?? 0), 0);
  const templated = parts.prompt === undefined || parts.messages.length > 0;
  return (
    textBytes(parts) +
    (templated ? parts.messages.length * TEMPLATE_TOKENS_PER_MESSAGE + TEMPLATE_TOKENS_PER_CONVERSATION : 1) +
    (parts.tools?.length ?? 0) * TEMPLATE_TOKENS_PER_TOOL +
    images * TOKENS_PER_IMAGE
  );
}

/** A lower bound on a prompt's tokens: no token is longer than MAX_BYTES_PER_TOKEN bytes. */
export function promptFloor(parts: PromptParts): number {
  return Math.ceil(textBytes(parts) / MAX_BYTES_PER_TOKEN);
}

/** promptBound of a plain conversation. */
export function promptTokenBound(messages: PromptParts["messages"]): number {
  return promptBound({ messages });
}

/**
 * A lean consumer on raw `fetch`: POST /chat/completions, streamed (SSE read incrementally) or not,
 * timed. Used where the openai SDK's own cost would blur what is measured (relay, load).
 */

export interface CompletionResult {
  status: number;
  /** Content deltas received (streamed) or 1 (non-streamed success). */
  contentChunks: number;
  /** The content received (all deltas, or the message); the engine's tokens are `tok0 tok1 …`. */
  contentText: string;
  /** Milliseconds from sending the request to the first non-empty content delta (streamed only). */
  firstTokenMs: number | null;
  totalMs: number;
  completionTokens: number | null;
  /** What the platform says the order cost (its `usage.cost_micro_credits`), when it says so. */
  costMicros: bigint | null;
  /** The error message for a non-2xx answer or an error event in the stream. */
  error: string | null;
}

interface Usage {
  completion_tokens?: number;
  cost_micro_credits?: string;
}

/** Options of {@link chatCompletion}. */
export interface CompletionOptions {
  /** Called with `performance.now()` when a non-empty content delta arrives (streamed only). */
  onContent?: (now: number) => void;
}

export async function chatCompletion(
  baseUrl: string,
  apiKey: string,
  body: Record<string, unknown>,
  options: CompletionOptions = {},
): Promise<CompletionResult> {
  const start = performance.now();
  const response = await fetch(`${baseUrl}/chat/completions`, {
    method: "POST",
    headers: { authorization: `Bearer ${apiKey}`, "content-type": "application/json" },
    body: JSON.stringify(body),
  });
  const result: CompletionResult = {
    status: response.status,
    contentChunks: 0,
    contentText: "",
    firstTokenMs: null,
    totalMs: 0,
    completionTokens: null,
    costMicros: null,
    error: null,
  };
  const takeUsage = (usage: Usage | null | undefined) => {
    if (!usage) return;
    if (usage.completion_tokens !== undefined) result.completionTokens = usage.completion_tokens;
    if (usage.cost_micro_credits !== undefined) result.costMicros = BigInt(usage.cost_micro_credits);
  };

  const isStream = (response.headers.get("content-type") ?? "").startsWith("text/event-stream");
  if (!response.ok || !isStream || !response.body) {
    const text = await response.text();
    result.totalMs = performance.now() - start;
    try {
      const json = JSON.parse(text) as {
        error?: { message?: string };
        usage?: Usage;
        choices?: { message?: { content?: string } }[];
      };
      if (!response.ok) result.error = json.error?.message ?? text;
      else {
        result.contentChunks = json.choices?.[0]?.message?.content ? 1 : 0;
        result.contentText = json.choices?.[0]?.message?.content ?? "";
        takeUsage(json.usage);
      }
    } catch {
      result.error = `HTTP ${response.status}: ${text.slice(0, 200)}`;
    }
    return result;
  }

  const decoder = new TextDecoder();
  let buffer = "";
  for await (const bytes of response.body) {
    buffer += decoder.decode(bytes, { stream: true });
    let from = 0;
    for (let end = buffer.indexOf("\n\n"); end !== -1; end = buffer.indexOf("\n\n", from)) {
      const event = buffer.slice(from, end);
      from = end + 2;
      if (!event.startsWith("data: ")) continue;
      const data = event.slice(6);
      if (data === "[DONE]") continue;
      const chunk = JSON.parse(data) as {
        choices?: { delta?: { content?: string }; finish_reason?: string | null }[];
        usage?: Usage | null;
        error?: { message?: string };
      };
      if (chunk.error) result.error = chunk.error.message ?? "error event in the stream";
      if (chunk.choices?.[0]?.delta?.content) {
        const now = performance.now();
        if (result.firstTokenMs === null) result.firstTokenMs = now - start;
        result.contentChunks++;
        result.contentText += chunk.choices[0].delta.content;
        options.onContent?.(now);
      }
      takeUsage(chunk.usage);
    }
    buffer = buffer.slice(from);
  }
  result.totalMs = performance.now() - start;
  return result;
}

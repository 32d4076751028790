/**
 * What generated output carries besides its text, in one shape for the worker's engines and the
 * control plane's relay (JobChunk.tool_calls and JobChunk.logprobs on the wire).
 */

/** A fragment of a tool call, in OpenAI's streaming shape. */
export interface ToolCallDelta {
  /** Which call of this turn, from 0. */
  index: number;
  /** Set on a call's first fragment only. */
  id?: string;
  /** Set on a call's first fragment only. */
  name?: string;
  /** The next piece of the arguments' JSON text. */
  arguments: string;
}

/** The log-probability of one generated token, with its most likely alternatives. */
export interface TokenLogprob {
  token: string;
  logprob: number;
  topLogprobs: { token: string; logprob: number }[];
}

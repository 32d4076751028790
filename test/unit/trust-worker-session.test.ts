/**
 * The worker link's trust promises on the server side (worker.proto): every JobAssign carries a
 * seed; token_detail only when asked (never an `audit` flag); a job's token details reach the
 * trust service at JobDone with the chunks' counts and text; ScoreAssign takes no slot, and its
 * ScoreResult (or the worker's disconnection) settles the verifier call.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import {
  ConnectRequestSchema,
  type ConnectResponse,
  type JobAssign,
  type ScoreAssign,
} from "../../gen/locallmarket/v1/worker_pb.js";
import type { WorkerSession } from "../../server/link/worker-session.js";
import type { JobSink, JobSpec } from "../../server/market/registry.js";
import type { FinishedDetailJob } from "../../server/trust/trust-service.js";
import { testOffer, testSession } from "../support/worker-session.js";

function session(trust?: ConstructorParameters<typeof WorkerSession>[0]["trust"]) {
  const s = testSession(testOffer(true), trust ? { trust } : {});
  const outbound = s.outbound[Symbol.asyncIterator]();
  const next = async (): Promise<ConnectResponse["message"]> =>
    ((await outbound.next()).value as ConnectResponse).message;
  return { s, next };
}

const job = (overrides: Partial<JobSpec> = {}): JobSpec => ({
  jobId: "job_1",
  orderId: "chatcmpl-1",
  model: "m",
  messages: [{ role: "user", content: "hi" }],
  sampling: { stop: [] },
  maxTokens: 8,
  deadlineUnixMs: 0,
  ...overrides,
});

const sink = (): JobSink => ({ chunk: () => {}, done: () => {}, failed: () => {} });

describe("JobAssign and trust", () => {
  it("always carries a seed: the consumer's, else one drawn by the control plane", async () => {
    const { s, next } = session();
    s.reserve("m")?.assign(job(), sink());
    const first = (await next()).value as JobAssign;
    expect(first.sampling?.seed).toBeTypeOf("bigint");
    expect(first.tokenDetail).toBeUndefined();
    expect("audit" in first).toBe(false);
    s.handle(create(ConnectRequestSchema, { message: { case: "jobFailed", value: { jobId: "job_1" } } }));
    s.reserve("m")?.assign(job({ jobId: "job_2", sampling: { stop: [], seed: 77n } }), sink());
    expect(((await next()).value as JobAssign).sampling?.seed).toBe(77n);
  });

  it("asks token detail when the trust service says so, and hands the details over at JobDone", async () => {
    const finished: FinishedDetailJob[] = [];
    const { s, next } = session({
      prepare: (_job, canDetail) => ({ seed: 5n, ...(canDetail ? { tokenDetail: { topK: 3 } } : {}) }),
      finished: (done) => finished.push(done),
    });
    s.reserve("m")?.assign(job(), sink());
    const assign = (await next()).value as JobAssign;
    expect(assign.sampling?.seed).toBe(5n);
    expect(assign.tokenDetail?.topK).toBe(3);
    const detail = (tokenId: number) => ({ tokenId, logprob: -0.5, top: [{ tokenId, logprob: -0.5 }] });
    s.handle(
      create(ConnectRequestSchema, {
        message: {
          case: "jobChunk",
          value: {
            jobId: "job_1",
            sequence: 1n,
            text: "ab",
            tokenCount: 2,
            tokenDetails: [detail(7), detail(8)],
          },
        },
      }),
    );
    s.handle(
      create(ConnectRequestSchema, {
        message: {
          case: "jobChunk",
          value: { jobId: "job_1", sequence: 2n, text: "c", tokenCount: 1, tokenDetails: [detail(9)] },
        },
      }),
    );
    s.handle(
      create(ConnectRequestSchema, {
        message: {
          case: "jobDone",
          value: {
            jobId: "job_1",
            finishReason: 2,
            lastSequence: 2n,
            usage: { promptTokens: 4, completionTokens: 3 },
          },
        },
      }),
    );
    expect(finished).toHaveLength(1);
    expect(finished[0]).toMatchObject({
      workerId: "wkr_1",
      orderId: "chatcmpl-1",
      streamedText: "abc",
      chunkTokenCount: 3,
      usage: { promptTokens: 4, completionTokens: 3 },
      finishReason: "length",
    });
    expect(finished[0]?.tokenDetails.map((t) => t.tokenId)).toEqual([7, 8, 9]);
  });
});

describe("ScoreAssign", () => {
  it("takes no slot and resolves with the worker's ScoreResult; a result for an unknown id is ignored", async () => {
    const { s, next } = session();
    const scoring = s.scoreTokens("aud_1", { jobId: "job_9", model: "m" }, [1, 2, 3], [0, 2], 10_000);
    const sent = (await next()).value as ScoreAssign;
    expect(sent).toMatchObject({ scoreId: "aud_1", tokenIds: [1, 2, 3], positions: [0, 2] });
    expect(s.activeJobs).toBe(0);
    expect(s.reserve("m")).not.toBeNull();
    s.handle(
      create(ConnectRequestSchema, { message: { case: "scoreResult", value: { scoreId: "aud_other" } } }),
    );
    s.handle(
      create(ConnectRequestSchema, {
        message: { case: "scoreResult", value: { scoreId: "aud_1", promptTokens: 4, text: "xyz" } },
      }),
    );
    await expect(scoring).resolves.toMatchObject({ scoreId: "aud_1", promptTokens: 4, text: "xyz" });
  });

  it("rejects when the verifier disconnects, or does not answer in time", async () => {
    const first = session();
    const lost = first.s.scoreTokens("aud_2", { jobId: "j" }, [1], [], 10_000);
    first.s.close("gone");
    await expect(lost).rejects.toThrow(/verifier disconnected before scoring aud_2: gone/);
    const second = session();
    await expect(second.s.scoreTokens("aud_3", { jobId: "j" }, [1], [], 1)).rejects.toThrow(
      /did not score aud_3 within 1 ms/,
    );
  });
});

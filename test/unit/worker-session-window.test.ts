/**
 * The server's side of a job's flow-control window (worker.proto, JobWindow): acknowledgements go
 * to the worker in batches of a quarter of the window, not once per chunk taken, even while the
 * consumer keeps up; a worker that has filled its window is told as soon as the consumer has taken
 * a batch, and may then go on.
 */
import { create } from "@bufbuild/protobuf";
import { describe, expect, it } from "vitest";
import { ConnectRequestSchema, type ConnectResponse } from "../../gen/locallmarket/v1/worker_pb.js";
import type { JobSink, JobSpec } from "../../server/market/registry.js";
import { testOffer, testSession } from "../support/worker-session.js";

const WINDOW = 8;

const JOB: JobSpec = {
  jobId: "job_1",
  orderId: "chatcmpl-1",
  model: "m",
  messages: [{ role: "user", content: "hi" }],
  sampling: { stop: [] },
  maxTokens: 64,
  deadlineUnixMs: 0,
};

/** A session running one job; `taken` lists the chunks its sink got, `failures` why it failed. */
function runningJob() {
  const session = testSession(testOffer(false), { jobWindowChunks: WINDOW });
  const taken: bigint[] = [];
  const failures: string[] = [];
  const sink: JobSink = {
    chunk: (_piece, sequence) => taken.push(sequence),
    done: () => {},
    failed: (message) => failures.push(message),
  };
  const lease = session.reserve("m");
  if (!lease) throw new Error("no slot");
  lease.assign(JOB, sink);
  const outbound = session.outbound[Symbol.asyncIterator]();
  /** Every message the session has queued for the worker so far. */
  const sent = async (): Promise<ConnectResponse["message"][]> => {
    const messages: ConnectResponse["message"][] = [];
    while (session.outbound.size > 0)
      messages.push(((await outbound.next()).value as ConnectResponse).message);
    return messages;
  };
  const chunk = (sequence: bigint) =>
    session.handle(
      create(ConnectRequestSchema, {
        message: { case: "jobChunk", value: { jobId: JOB.jobId, sequence, text: "x", tokenCount: 1 } },
      }),
    );
  const windows = (messages: ConnectResponse["message"][]) =>
    messages.flatMap((message) => (message.case === "jobWindow" ? [message.value.acknowledgedSequence] : []));
  return { lease, taken, failures, sent, chunk, windows };
}

describe("JobWindow acknowledgements", () => {
  it("are sent in batches of a quarter of the window while the consumer keeps up, not once per chunk", async () => {
    const { lease, taken, failures, sent, chunk, windows } = runningJob();
    expect((await sent()).map((message) => message.case)).toEqual(["jobAssign"]);
    // The consumer takes each chunk as soon as it comes (it has caught up after every one).
    for (let sequence = 1n; sequence <= 7n; sequence++) {
      chunk(sequence);
      lease.acknowledge(sequence);
    }
    expect(taken).toEqual([1n, 2n, 3n, 4n, 5n, 6n, 7n]);
    expect(windows(await sent())).toEqual([2n, 4n, 6n]);
    expect(failures).toEqual([]);
  });

  it("tell a worker that filled its window as soon as the consumer took a batch, and it may go on", async () => {
    const { lease, taken, failures, sent, chunk, windows } = runningJob();
    await sent();
    for (let sequence = 1n; sequence <= BigInt(WINDOW); sequence++) chunk(sequence);
    expect(windows(await sent())).toEqual([]);
    // The consumer takes one chunk: less than a batch, nothing to tell yet.
    lease.acknowledge(1n);
    expect(windows(await sent())).toEqual([]);
    lease.acknowledge(2n);
    expect(windows(await sent())).toEqual([2n]);
    // The window now reaches chunk 2 + WINDOW: those chunks are relayed, one more fails the job.
    chunk(BigInt(WINDOW) + 1n);
    chunk(BigInt(WINDOW) + 2n);
    expect(taken).toHaveLength(WINDOW + 2);
    expect(failures).toEqual([]);
    chunk(BigInt(WINDOW) + 3n);
    expect(failures).toHaveLength(1);
    expect(failures[0]).toMatch(/flow-control window exceeded/);
  });
});

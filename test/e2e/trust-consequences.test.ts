/**
 * What a failed audit costs a cheater, end to end with real tiny models, a real control plane on a
 * real database (restarted on it), a real trusted verifier process and the real `openai` SDK: a
 * failed sequential test claws back every pending earning the test covered (not only the audited
 * order's) and refunds the consumer to the micro-credit; two failed tests in a row suspend the
 * worker (Reject BANNED ends its session, its token is refused with PERMISSION_DENIED, matching
 * never picks it); verdicts feed the worker list's audit counts, which survive a restart, as does
 * the suspension; the operator can suspend a real worker process (it stops for good, as worker.proto
 * promises) and lift a suspension. The cheater is a test double (in process, with the worker's own
 * link code and a real engine on another model); the verifier is real.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { existsSync, mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { create } from "@bufbuild/protobuf";
import { Code, ConnectError, createClient } from "@connectrpc/connect";
import { createGrpcTransport } from "@connectrpc/connect-node";
import OpenAI from "openai";
import { afterAll, beforeAll, describe, expect, it, vi } from "vitest";
import { runAdminCli } from "../../admin-client/cli.js";
import { adminTokenHeaderInterceptor } from "../../admin-client/token-header.js";
import type { WorkerListRow } from "../../admin-client/worker-list.js";
import { AdminService } from "../../gen/locallmarket/v1/admin_pb.js";
import {
  type ConnectRequest,
  ConnectRequestSchema,
  RejectCode,
  WorkerService,
} from "../../gen/locallmarket/v1/worker_pb.js";
import { parseServerConfig, type ServerConfig } from "../../server/config.js";
import { type ControlPlane, startControlPlane } from "../../server/control-plane.js";
import { PLATFORM_ACCOUNT_ID } from "../../server/market/store-port.js";
import type { AuditRecord } from "../../server/trust/trust-service.js";
import { LlamaCppEngine } from "../../worker/engines/llama-cpp-engine.js";
import { WorkerLink, WorkerRejectedError } from "../../worker/link-client.js";
import { createTestDatabase, type TestDatabase } from "../support/database.js";
import { writePerturbedGguf } from "../support/gguf-perturb.js";
import { REPO_ROOT, workerArgs } from "../support/market.js";
import { STORIES_260K, TINY_RANDOM } from "../support/models.js";
import { claimedLlamaCppOffer } from "../support/trust.js";

const present = existsSync(STORIES_260K) && existsSync(TINY_RANDOM);
if (!present)
  console.warn(`skipping the trust consequence tests: ${STORIES_260K} or ${TINY_RANDOM} is absent`);

const LLAMA = ["--engine", "llama-cpp", "--gpu", "off", "--threads", "1"];
const CLI = join(REPO_ROOT, "bin/locallmarket.js");
const ADMIN_TOKEN = "test-admin-token";
const CHEAP = "stories-cheap";
const HONEST = "stories-honest";

describe.skipIf(!present)("consequences of failed audits", () => {
  let database: TestDatabase;
  let config: ServerConfig;
  let plane: ControlPlane;
  let admin: ReturnType<typeof createClient<typeof AdminService>>;
  const processes: ChildProcess[] = [];
  const links: WorkerLink[] = [];
  const engines: LlamaCppEngine[] = [];
  let consumer: { accountId: string; apiKey: string };
  let provider: string;
  let verifierId: string;
  let cheater: { workerId: string; token: string; link: WorkerLink };
  let honest: { workerId: string; child: ChildProcess; output: () => string };
  const cheatOrders: string[] = [];

  async function start(): Promise<void> {
    plane = await startControlPlane(config);
    admin = createClient(
      AdminService,
      createGrpcTransport({
        baseUrl: plane.grpcUrl,
        interceptors: [adminTokenHeaderInterceptor(ADMIN_TOKEN)],
      }),
    );
  }

  beforeAll(async () => {
    database = await createTestDatabase();
    config = {
      ...parseServerConfig([], {}),
      httpPort: 0,
      grpcPort: 0,
      dataDir: database.dataDir,
      databaseUrl: database.databaseUrl,
      adminToken: ADMIN_TOKEN,
      logLevel: process.env.LOCALLMARKET_TEST_LOG_LEVEL ?? "warn",
      // Every plain job carries token detail; the audit rate is set per step below.
      tokenDetailBasisPoints: 10_000,
      auditBasisPoints: 10_000,
      // No blind canaries: each verdict here comes from the audit of a consumer's order, counted exactly.
      canaryBasisPoints: 0,
    };
    await start();
    // The same ports after the restart, so the worker processes find the control plane again.
    config.httpPort = Number(new URL(plane.httpUrl).port);
    config.grpcPort = Number(new URL(plane.grpcUrl).port);
    const created = await admin.createAccount({ name: "reader", initialDeposit: 100_000_000n });
    consumer = { accountId: created.account?.id ?? "", apiKey: created.apiKey };
    provider = (await admin.createAccount({ name: "gpu-owner" })).account?.id ?? "";
    const verifier = await spawnWorker("stories260K-reference", STORIES_260K);
    verifierId = verifier.workerId;
    expect((await adminCli(["worker", "trust", "--worker", verifier.workerId])).code).toBe(0);
    honest = await spawnWorker(HONEST, STORIES_260K);
    cheater = await connectCheater();
  }, 120_000);

  afterAll(async () => {
    await Promise.all(links.map((link) => link.stop()));
    // The links do not own their engines: each in-process llama.cpp is freed here.
    await Promise.all(engines.map((engine) => engine.close().catch(() => undefined)));
    for (const child of processes) {
      if (child.exitCode === null && child.signalCode === null) {
        const gone = once(child, "exit");
        child.kill("SIGTERM");
        await gone;
      }
    }
    await plane?.close({ graceMs: 0 });
    await database?.drop();
  });

  /** A real worker process for the provider, serving `modelPath` as `model`. */
  async function spawnWorker(model: string, modelPath: string) {
    const { workerToken, workerId } = await admin.createWorkerToken({ accountId: provider, label: model });
    const args = workerArgs(plane.grpcUrl, workerToken, {
      model,
      priceIn: "1",
      priceOut: "1",
      tps: 500,
      engine: [...LLAMA, "--model-path", modelPath],
    });
    const child = spawn(process.execPath, [CLI, ...args], {
      cwd: REPO_ROOT,
      stdio: ["ignore", "pipe", "pipe"],
      env: { ...process.env, NODE_NO_WARNINGS: "1" },
    });
    processes.push(child);
    let output = "";
    child.stdout?.on("data", (data: Buffer) => {
      output += data.toString();
    });
    child.stderr?.on("data", (data: Buffer) => {
      output += data.toString();
    });
    const exited = once(child, "exit").then(([code]) => {
      throw new Error(`worker exited with code ${code} before connecting:\n${output}`);
    });
    await Promise.race([plane.registry.whenConnected(workerId), exited]);
    exited.catch(() => {});
    return { workerId, child, output: () => output };
  }

  /** The cheater: llama-2-tiny-random's tokens offered as stories260K (its hash claimed). */
  async function connectCheater(
    existing?: { workerId: string; token: string },
    model = CHEAP,
    modelPath = TINY_RANDOM,
  ) {
    const { workerId, workerToken: token } = existing
      ? { workerId: existing.workerId, workerToken: existing.token }
      : await admin.createWorkerToken({ accountId: provider, label: model });
    const engine = await LlamaCppEngine.load({
      modelPath,
      gpu: false,
      threads: 1,
      contextSize: 2048,
    });
    const link = new WorkerLink({
      server: plane.grpcUrl,
      token,
      engine,
      log: () => {},
      offers: [claimedLlamaCppOffer(model)],
    });
    links.push(link);
    engines.push(engine);
    void link.start().catch(() => {});
    return { workerId, token, link };
  }

  async function adminCli(args: string[]): Promise<{ code: number; stdout: string; stderr: string }> {
    let stdout = "";
    let stderr = "";
    const code = await runAdminCli(args, {
      stdout: (text) => {
        stdout += text;
      },
      stderr: (text) => {
        stderr += text;
      },
      env: { LOCALLMARKET_SERVER: plane.grpcUrl, LOCALLMARKET_ADMIN_TOKEN: ADMIN_TOKEN },
    });
    return { code, stdout, stderr };
  }

  async function workerRow(workerId: string, model: string): Promise<WorkerListRow> {
    const result = await adminCli(["worker", "list", "--json"]);
    expect(result.code).toBe(0);
    const row = (JSON.parse(result.stdout) as WorkerListRow[]).find(
      (r) => r.workerId === workerId && r.model === model,
    );
    if (!row) throw new Error(`no row for ${workerId} ${model}`);
    return row;
  }

  async function books() {
    const get = async (accountId: string) => (await admin.getBalance({ accountId })).balance;
    return {
      consumer: (await get(consumer.accountId))?.available,
      provider: (await get(provider))?.pending,
      platform: (await get(PLATFORM_ACCOUNT_ID))?.available,
    };
  }

  /** One request for `model`; resolves with the order id once its audit (if any) has finished. */
  async function ask(model: string, maxTokens = 64, temperature = 0): Promise<string> {
    const client = new OpenAI({
      baseURL: `${plane.httpUrl}/v1`,
      apiKey: consumer.apiKey,
      maxRetries: 0,
      timeout: 20_000,
    });
    const completion = await client.chat.completions.create({
      model,
      messages: [{ role: "user", content: "Once upon a time" }],
      max_tokens: maxTokens,
      temperature,
    });
    return completion.id;
  }

  async function auditOf(workerId: string, orderId: string): Promise<AuditRecord> {
    let found: AuditRecord | undefined;
    await vi.waitFor(
      () => {
        found = plane.trust.audits(workerId).find((a) => a.orderId === orderId);
        expect(found).toBeDefined();
      },
      { timeout: 30_000, interval: 50 },
    );
    await plane.trust.settled();
    return found as AuditRecord;
  }

  /** Opens WorkerService.Connect with `token` and returns the first response and how the call ended. */
  async function rawConnect(token: string) {
    const client = createClient(WorkerService, createGrpcTransport({ baseUrl: plane.grpcUrl }));
    async function* requests(): AsyncIterable<ConnectRequest> {
      yield create(ConnectRequestSchema, {
        message: { case: "hello", value: { workerToken: token, agentVersion: "test" } },
      });
      await new Promise<void>(() => {}); // keep the request side open; the server ends the call
    }
    const received: unknown[] = [];
    try {
      for await (const response of client.connect(requests())) received.push(response.message);
      return { received, error: undefined };
    } catch (error) {
      return { received, error: ConnectError.from(error) };
    }
  }

  it("a failed test claws back the unaudited orders it covered, to the micro-credit, without suspending yet", async () => {
    const before = await books();
    // Not audited: these two orders are paid, pending in the settlement window.
    plane.trust.auditRate = 0;
    cheatOrders.push(await ask(CHEAP), await ask(CHEAP));
    await plane.trust.settled();
    expect(plane.trust.audits(cheater.workerId)).toEqual([]);
    const paid = await books();
    expect(paid.consumer).toBeLessThan(before.consumer ?? 0n);
    expect(paid.provider).toBeGreaterThan(before.provider ?? 0n);
    // This one is audited, and the test fails on it.
    plane.trust.auditRate = 1;
    const auditedOrder = await ask(CHEAP);
    cheatOrders.push(auditedOrder);
    const audit = await auditOf(cheater.workerId, auditedOrder);
    expect(audit.outcome).toBe("failed");
    expect(audit.model).toBe(CHEAP);
    expect(audit.clawBack).toMatchObject({ done: true });
    expect(audit.coveredClawBacks?.map((c) => c.orderId)).toEqual(cheatOrders.slice(0, 2));
    // Every order refunded exactly: provider share and fee back to the consumer.
    expect(await books()).toEqual(before);
    const ledger = await admin.auditLedger({});
    expect(ledger.problems).toEqual([]);
    expect(ledger.ok).toBe(true);
    // One failed test is not enough to suspend (α per test; see trust-service.ts).
    expect(plane.trust.suspendedReason(cheater.workerId)).toBeUndefined();
    expect(await workerRow(cheater.workerId, CHEAP)).toMatchObject({
      auditsPassed: 0,
      auditsFailed: 1,
      suspended: false,
      status: "online",
    });
    // Each order says whether it was audited, and how it went.
    const shown = await adminCli(["order", "--id", auditedOrder, "--json"]);
    expect(JSON.parse(shown.stdout).order).toMatchObject({ auditOutcome: "failed", auditId: audit.auditId });
    expect((await adminCli(["order", "--id", auditedOrder])).stdout).toContain(
      `Audit:      failed (${audit.auditId})`,
    );
    expect((await adminCli(["order", "--id", cheatOrders[0] as string])).stdout).toContain(
      "Audit:      not audited",
    );
  }, 90_000);

  it("a second failed test in a row suspends the cheater: BANNED, token refused, never matched", async () => {
    const before = await books();
    const orderId = await ask(CHEAP);
    cheatOrders.push(orderId);
    const audit = await auditOf(cheater.workerId, orderId);
    expect(audit).toMatchObject({ outcome: "failed", suspended: true, clawBack: { done: true } });
    expect(await books()).toEqual(before);
    // Claw-backs are idempotent: again on every order, nothing moves.
    for (const cheatOrder of cheatOrders) {
      expect(await plane.trust.store?.clawBack(cheatOrder)).toEqual({
        done: false,
        reason: "already_clawed_back",
      });
    }
    expect(await books()).toEqual(before);
    // worker.proto: Reject{BANNED} → stop, do not reconnect.
    const stopped = await cheater.link.done.then(
      () => undefined,
      (error: unknown) => error,
    );
    expect(stopped).toBeInstanceOf(WorkerRejectedError);
    expect((stopped as WorkerRejectedError).code).toBe(RejectCode.BANNED);
    expect((stopped as Error).message).toContain("failed 2 audit tests in a row");
    expect(plane.registry.get(cheater.workerId)).toBeUndefined();
    expect(plane.registry.reputation.availability(cheater.workerId, CHEAP)).toBe("suspended");
    const row = await workerRow(cheater.workerId, CHEAP);
    expect(row).toMatchObject({ auditsFailed: 2, suspended: true, status: "suspended", reputation: 0 });
    expect(row.suspendedReason).toContain("failed 2 audit tests in a row");
    // A reconnect with its token is refused with a clear status.
    const retry = await rawConnect(cheater.token);
    expect(retry.received).toEqual([
      expect.objectContaining({
        case: "reject",
        value: expect.objectContaining({ code: RejectCode.BANNED }),
      }),
    ]);
    expect(retry.error?.code).toBe(Code.PermissionDenied);
    expect(retry.error?.rawMessage).toMatch(/^worker wkr_\S+ is suspended: failed 2 audit tests in a row/);
    // Nobody else serves the model: the consumer is told so, the suspended worker is not tried.
    await expect(ask(CHEAP)).rejects.toThrow();
    expect(await admin.auditLedger({})).toMatchObject({ ok: true });
  }, 90_000);

  it("an honest worker's passed audits feed its counts", async () => {
    const orders = [await ask(HONEST), await ask(HONEST), await ask(HONEST)];
    const audits = await Promise.all(orders.map((orderId) => auditOf(honest.workerId, orderId)));
    expect(audits.map((a) => a.outcome)).not.toContain("failed");
    const passed = audits.filter((a) => a.outcome === "passed").length;
    expect(passed).toBeGreaterThanOrEqual(1);
    expect(await workerRow(honest.workerId, HONEST)).toMatchObject({
      auditsPassed: passed,
      auditsFailed: 0,
      suspended: false,
    });
  }, 90_000);

  it("audit counts and the suspension survive a restart; the operator suspends a real worker process and lifts a suspension", async () => {
    const honestBefore = await workerRow(honest.workerId, HONEST);
    await plane.close({ graceMs: 0 });
    await start();
    // The worker processes reconnect on their own (SHUTTING_DOWN → backoff).
    await plane.registry.whenConnected(honest.workerId);
    expect(await workerRow(honest.workerId, HONEST)).toMatchObject({
      auditsPassed: honestBefore.auditsPassed,
      auditsFailed: 0,
      suspended: false,
    });
    expect(await workerRow(cheater.workerId, CHEAP)).toMatchObject({
      auditsPassed: 0,
      auditsFailed: 2,
      suspended: true,
      status: "suspended",
    });
    expect((await rawConnect(cheater.token)).error?.code).toBe(Code.PermissionDenied);

    // The operator suspends the honest process: it gets Reject{BANNED} and stops for good.
    const exited = once(honest.child, "exit");
    const suspended = await adminCli([
      "worker",
      "suspend",
      "--worker",
      honest.workerId,
      "--reason",
      "maintenance test",
      "--json",
    ]);
    expect(suspended).toEqual({
      code: 0,
      stdout: `{"workerId":"${honest.workerId}","suspended":true}\n`,
      stderr: "",
    });
    const [exitCode] = await exited;
    expect(exitCode).toBe(1);
    expect(honest.output()).toContain("(BANNED)");
    expect(honest.output()).toContain("not reconnecting");
    expect(honest.output()).toContain("maintenance test");

    // Lifting the cheater's suspension lets its token in again.
    const lifted = await adminCli(["worker", "unsuspend", "--worker", cheater.workerId, "--json"]);
    expect(lifted.stdout).toBe(`{"workerId":"${cheater.workerId}","suspended":false}\n`);
    expect((await workerRow(cheater.workerId, CHEAP)).suspended).toBe(false);
    const again = await connectCheater(cheater);
    await plane.registry.whenConnected(cheater.workerId);
    expect(plane.registry.reputation.availability(cheater.workerId, CHEAP)).not.toBe("suspended");
    await again.link.stop();

    const tooLong = await adminCli([
      "worker",
      "suspend",
      "--worker",
      cheater.workerId,
      "--reason",
      "x".repeat(201),
    ]);
    expect(tooLong.code).toBe(1);
    expect(tooLong.stderr).toContain("reason must be at most 200 characters");
    expect((await workerRow(cheater.workerId, CHEAP)).suspended).toBe(false);
    const unknown = await adminCli(["worker", "unsuspend", "--worker", "wkr_nobody"]);
    expect(unknown.code).toBe(1);
    expect(unknown.stderr).toContain("worker wkr_nobody not found");
  }, 120_000);

  it("a subtle substitute (stories260K rounded to fp16 precision) is suspended by the statistics alone", async () => {
    const dir = mkdtempSync(join(tmpdir(), "llm-consequences-"));
    try {
      const copy = join(dir, "stories260K-fp16-precision.gguf");
      writePerturbedGguf(STORIES_260K, copy, { kind: "round", mantissaBits: 10 });
      const subtle = await connectCheater(undefined, "stories-fp16", copy);
      await plane.registry.whenConnected(subtle.workerId);
      // The restart test before this one made the verifier reconnect: an audit without it has no verdict.
      await plane.registry.whenConnected(verifierId);
      const before = await books();
      const audits: AuditRecord[] = [];
      // An answer that ends early (EOS) may leave the test undecided; it carries over. Ask until
      // the second failed test suspends the worker (a handful of 128-token answers at most).
      while (plane.trust.suspendedReason(subtle.workerId) === undefined && audits.length < 8) {
        audits.push(await auditOf(subtle.workerId, await ask("stories-fp16", 128, 1)));
      }
      expect(audits.map((a) => a.outcome)).not.toContain("passed");
      expect(audits.filter((a) => a.outcome === "failed")).toHaveLength(2);
      expect(audits.at(-1)).toMatchObject({ outcome: "failed", suspended: true });
      // Caught by the statistics, not by a count or the vocabulary.
      for (const audit of audits) expect(audit.stats.violations).toEqual([]);
      // Every order it served was refunded, exactly; the ledger holds.
      expect(await books()).toEqual(before);
      expect((await admin.auditLedger({})).problems).toEqual([]);
      await expect(subtle.link.done).rejects.toBeInstanceOf(WorkerRejectedError);
      expect(await workerRow(subtle.workerId, "stories-fp16")).toMatchObject({
        auditsFailed: 2,
        suspended: true,
        status: "suspended",
      });
    } finally {
      rmSync(dir, { recursive: true, force: true });
    }
  }, 120_000);
});

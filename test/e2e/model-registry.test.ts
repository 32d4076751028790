/**
 * The platform counts a registered model's tokens itself (issue 8, item 3).
 *
 * The real stories260K GGUF is registered through the real admin command; a real worker process
 * (its engine a test double: an OpenAI-compatible fake whose usage claims 999 prompt tokens and
 * whose chunks each claim one token while carrying several) serves a consumer using the `openai`
 * SDK. The consumer is billed by the platform's count, which equals the real tokenizer's count of
 * the rendered prompt and of the delivered text, to the micro-credit; the worker's claims only
 * leave trust signals. A model without a registered tokenizer keeps the worker's byte-bounded
 * count, and its order says the count is unverified.
 */
import { execFile } from "node:child_process";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { afterAll, beforeAll, describe, expect, it } from "vitest";
import { createTestDatabase } from "../support/database.js";
import { type FakeEngine, startFakeEngine } from "../support/fake-engine.js";
import { REPO_ROOT, startTestMarket, type TestMarket } from "../support/market.js";
import { STORIES_260K } from "../support/models.js";
import { startServerProcess } from "../support/server-process.js";

const run = promisify(execFile);
const present = existsSync(STORIES_260K);
if (!present) console.warn(`skipping the model registry tests: ${STORIES_260K} is absent`);

const STORIES_SHA256 = "270cba1bd5109f42d03350f60406024560464db173c0e387d91f0426d3bd256d";
const REGISTERED = "stories";
const UNREGISTERED = "unregistered-model";
/** Served by a real llama-cpp worker on the same GGUF, registered under this name too. */
const REAL = "stories-real";
/** Chunks of several tokens each; the openai engine's worker claims one token per chunk. */
const CHUNKS = [" Once upon a time,", " there was a little girl", " named Lily.", " She loved to play."];
const DELIVERED = CHUNKS.join("");
const PROMPT = "Tell me a story about a girl.";
const CLAIMED_PROMPT_TOKENS = 999;
/** 1 and 2 credits per 1M tokens: 1 µc per prompt token, 2 µc per completion token. */
const PRICE_IN = "1";
const PRICE_OUT = "2";
const FEE_BPS = 500;

interface CliResult {
  code: number;
  stdout: string;
  stderr: string;
}

describe.skipIf(!present)("model registry: the platform counts registered models' tokens", () => {
  let market: TestMarket;
  let registeredEngine: FakeEngine;
  let unregisteredEngine: FakeEngine;
  let consumer: { accountId: string; apiKey: string };
  let provider: { accountId: string };
  let scratch: string;
  /** The real tokenizer, loaded independently of the control plane. */
  let tokenize: (text: string) => number;
  let bos: number;

  async function admin(...args: string[]): Promise<CliResult> {
    return run(process.execPath, [join(REPO_ROOT, "bin/locallmarket.js"), "admin", ...args], {
      cwd: REPO_ROOT,
      env: {
        ...process.env,
        LOCALLMARKET_ADMIN_TOKEN: market.plane.adminToken,
        LOCALLMARKET_SERVER: market.plane.grpcUrl,
      },
    }).then(
      ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
      (error: CliResult) => error,
    );
  }

  beforeAll(async () => {
    scratch = mkdtempSync(join(tmpdir(), "model-registry-"));
    const { getLlama, LlamaLogLevel } = await import("node-llama-cpp");
    const llama = await getLlama({ gpu: false, maxThreads: 1, logLevel: LlamaLogLevel.error });
    const model = await llama.loadModel({ modelPath: STORIES_260K, vocabOnly: true });
    tokenize = (text) => model.tokenize(text, false).length;
    bos = model.tokens.bos !== null ? 1 : 0;
    market = await startTestMarket({ feeBasisPoints: FEE_BPS });
    consumer = await market.account("consumer", 10);
    provider = await market.account("provider");
    registeredEngine = await startFakeEngine({ tokens: CHUNKS, promptTokens: CLAIMED_PROMPT_TOKENS });
    unregisteredEngine = await startFakeEngine({ tokens: CHUNKS, promptTokens: CLAIMED_PROMPT_TOKENS });
    await market.worker({
      accountId: provider.accountId,
      model: REAL,
      priceIn: PRICE_IN,
      priceOut: PRICE_OUT,
      tps: 50,
      engine: ["--engine", "llama-cpp", "--model-path", STORIES_260K, "--gpu", "off", "--threads", "1"],
    });
    for (const [name, engine] of [
      [REGISTERED, registeredEngine],
      [UNREGISTERED, unregisteredEngine],
    ] as const) {
      await market.worker({
        accountId: provider.accountId,
        model: name,
        priceIn: PRICE_IN,
        priceOut: PRICE_OUT,
        tps: 50,
        engine: ["--engine", "openai", "--engine-url", engine.url],
      });
    }
  }, 120_000);

  afterAll(async () => {
    await market?.close();
    await registeredEngine?.close();
    await unregisteredEngine?.close();
    if (scratch) rmSync(scratch, { recursive: true, force: true });
  });

  it("registers the GGUF through the admin command, with its SHA-256 and tokenizer identity", async () => {
    const registered = await admin(
      "--json",
      "model",
      "register",
      "--name",
      REGISTERED,
      "--gguf",
      STORIES_260K,
    );
    expect(registered.code).toBe(0);
    const { model } = JSON.parse(registered.stdout);
    expect(model).toMatchObject({
      name: REGISTERED,
      ggufPath: STORIES_260K,
      ggufSha256: STORIES_SHA256,
      ggufBytes: "1185376",
      tokenizerModel: "llama",
      vocabularySize: 512,
      chatTemplate: false,
      active: true,
      problem: "",
    });
    expect(model.tokenizerSha256).toMatch(/^[0-9a-f]{64}$/);

    const listed = await admin("--json", "model", "list");
    expect(listed.code).toBe(0);
    expect(JSON.parse(listed.stdout).models).toEqual([model]);
    const human = await admin("model", "list");
    expect(human.stdout).toContain(`${REGISTERED}`);
    expect(human.stdout).toContain("active");
    expect(human.stdout).toContain(STORIES_SHA256);
  });

  it("refuses a file that is not a GGUF, and a relative path that names nothing here", async () => {
    const notGguf = join(scratch, "notes.gguf");
    writeFileSync(notGguf, "hello, this is not a model");
    const refused = await admin("model", "register", "--name", "bogus", "--gguf", notGguf);
    expect(refused.code).toBe(1);
    expect(refused.stderr).toContain('is not a GGUF file (it does not begin with "GGUF")');
    const relative = await admin("model", "register", "--name", "bogus", "--gguf", "no/such/model.gguf");
    expect(relative.code).toBe(2);
    expect(relative.stderr).toContain("give the absolute path on the control plane's machine");
    const listed = JSON.parse((await admin("--json", "model", "list")).stdout);
    expect(listed.models.map((m: { name: string }) => m.name)).toEqual([REGISTERED]);
  });

  it("bills a registered model's order by the platform's own count, exactly", async () => {
    const before = await market.balance(consumer.accountId);
    const pendingBefore = (await market.balance(provider.accountId)).pending;
    const completion = await market.openai(consumer.apiKey).chat.completions.create({
      model: REGISTERED,
      messages: [{ role: "user", content: PROMPT }],
    });
    expect(completion.choices[0]?.message.content).toBe(DELIVERED);

    // The real tokenizer: the prompt as the engine renders it (BOS + the text, stories260K has no
    // chat template) and the delivered text as it continues the prompt.
    const promptTokens = bos + tokenize(PROMPT);
    const completionTokens = tokenize(PROMPT + DELIVERED) - tokenize(PROMPT);
    // The worker's claims differ both ways: 999 prompt tokens, one token per chunk.
    expect(completionTokens).toBeGreaterThan(CHUNKS.length);
    expect(promptTokens).toBeLessThan(CLAIMED_PROMPT_TOKENS);
    expect(completion.usage).toMatchObject({
      prompt_tokens: promptTokens,
      completion_tokens: completionTokens,
    });

    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(completion.id);
    const shown = await admin("--json", "order", "--id", completion.id);
    expect(shown.code).toBe(0);
    const { order } = JSON.parse(shown.stdout);
    expect(order).toMatchObject({
      promptTokens,
      completionTokens,
      tokenCountVerified: true,
      tokenCountGgufSha256: STORIES_SHA256,
    });
    const cost = BigInt(promptTokens) * 1n + BigInt(completionTokens) * 2n;
    const fee = (cost * BigInt(FEE_BPS)) / 10_000n;
    expect(order.cost).toBe(cost.toString());
    expect(order.fee).toBe(fee.toString());
    expect(order.trustSignals).toEqual(
      expect.arrayContaining([
        `the worker reported ${CLAIMED_PROMPT_TOKENS} prompt tokens; the platform counted ${promptTokens}`,
        `chunks claimed ${CHUNKS.length} tokens in all; the platform counted ${completionTokens}`,
      ]),
    );
    const after = await market.balance(consumer.accountId);
    expect(after.available).toBe(before.available - cost);
    expect(after.held).toBe(before.held);
    expect((await market.balance(provider.accountId)).pending).toBe(pendingBefore + cost - fee);

    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(completion.id);
    const human = await admin("order", "--id", completion.id);
    expect(human.stdout).toContain(`Counted:    by the platform (tokenizer of GGUF ${STORIES_SHA256})`);
  });

  it("keeps the worker's byte-bounded count for an unregistered model, and says it is unverified", async () => {
    const completion = await market.openai(consumer.apiKey).chat.completions.create({
      model: UNREGISTERED,
      messages: [{ role: "user", content: PROMPT }],
    });
    expect(completion.choices[0]?.message.content).toBe(DELIVERED);
    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(completion.id);
    const { order } = JSON.parse((await admin("--json", "order", "--id", completion.id)).stdout);
    // One token claimed per chunk, each far under its bytes; the prompt claim is cut to its bound.
    expect(order.completionTokens).toBe(CHUNKS.length);
    expect(order.promptTokens).toBe(Math.min(CLAIMED_PROMPT_TOKENS, order.promptTokenBound));
    expect(order.tokenCountVerified).toBe(false);
    expect(order.tokenCountGgufSha256).toBe("");
    const cost = BigInt(order.promptTokens) + BigInt(order.completionTokens) * 2n;
    expect(order.cost).toBe(cost.toString());
    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(completion.id);
    const human = await admin("order", "--id", completion.id);
    expect(human.stdout).toContain("Counted:    by the worker, bounded by bytes (unverified");
    const listed = JSON.parse((await admin("--json", "orders")).stdout);
    const byId = new Map(listed.orders.map((o: { id: string; tokenCountVerified: boolean }) => [o.id, o]));
    expect(byId.get(completion.id)).toMatchObject({ tokenCountVerified: false });
  });

  it("streams: bills what was delivered by the platform's count, exactly", async () => {
    const before = await market.balance(consumer.accountId);
    const stream = await market.openai(consumer.apiKey).chat.completions.create({
      model: REGISTERED,
      messages: [{ role: "user", content: PROMPT }],
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let id = "";
    let usage: { prompt_tokens: number; completion_tokens: number } | null | undefined;
    for await (const chunk of stream) {
      id = chunk.id;
      text += chunk.choices[0]?.delta.content ?? "";
      if (chunk.usage) usage = chunk.usage;
    }
    expect(text).toBe(DELIVERED);
    const promptTokens = bos + tokenize(PROMPT);
    const completionTokens = tokenize(PROMPT + DELIVERED) - tokenize(PROMPT);
    expect(usage).toMatchObject({ prompt_tokens: promptTokens, completion_tokens: completionTokens });
    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(id);
    const { order } = JSON.parse((await admin("--json", "order", "--id", id)).stdout);
    expect(order).toMatchObject({ promptTokens, completionTokens, tokenCountVerified: true });
    const cost = BigInt(promptTokens) + BigInt(completionTokens) * 2n;
    expect(order.cost).toBe(cost.toString());
    expect((await market.balance(consumer.accountId)).available).toBe(before.available - cost);
  });

  it("agrees with an honest real llama-cpp worker's own count: no trust signal", async () => {
    const registered = await admin("--json", "model", "register", "--name", REAL, "--gguf", STORIES_260K);
    expect(registered.code).toBe(0);
    const prompt = "Once upon a time";
    const stream = await market.openai(consumer.apiKey).chat.completions.create({
      model: REAL,
      messages: [{ role: "user", content: prompt }],
      temperature: 0,
      max_tokens: 40,
      stream: true,
      stream_options: { include_usage: true },
    });
    let text = "";
    let id = "";
    for await (const chunk of stream) {
      id = chunk.id;
      text += chunk.choices[0]?.delta.content ?? "";
    }
    const completionTokens = tokenize(prompt + text) - tokenize(prompt);
    expect(completionTokens).toBe(40);
    // The count is recorded as the order settles, just after the answer's last event.
    await market.plane.marketplace.whenSettled(id);
    const { order } = JSON.parse((await admin("--json", "order", "--id", id)).stdout);
    expect(order).toMatchObject({
      promptTokens: bos + tokenize(prompt),
      completionTokens,
      tokenCountVerified: true,
      trustSignals: [],
    });
    expect(order.cost).toBe((BigInt(order.promptTokens) + BigInt(completionTokens) * 2n).toString());
  });
});

describe.skipIf(!present)("model registry on a control plane without node-llama-cpp", () => {
  it("answers register with a clear FAILED_PRECONDITION and keeps serving", async () => {
    const database = await createTestDatabase();
    const previous = process.env.NODE_OPTIONS;
    const hide = join(REPO_ROOT, "test/support/hide-node-llama-cpp.mjs");
    process.env.NODE_OPTIONS = `${previous ?? ""} --import ${hide}`.trim();
    let server: Awaited<ReturnType<typeof startServerProcess>> | undefined;
    try {
      server = await startServerProcess(database);
    } finally {
      if (previous === undefined) delete process.env.NODE_OPTIONS;
      else process.env.NODE_OPTIONS = previous;
    }
    try {
      const registered = await run(
        process.execPath,
        [
          join(REPO_ROOT, "bin/locallmarket.js"),
          "admin",
          "model",
          "register",
          "--name",
          "stories",
          "--gguf",
          STORIES_260K,
        ],
        {
          cwd: REPO_ROOT,
          env: {
            ...process.env,
            LOCALLMARKET_ADMIN_TOKEN: "test-admin-token",
            LOCALLMARKET_SERVER: server.grpcUrl,
          },
        },
      ).then(
        ({ stdout, stderr }) => ({ code: 0, stdout, stderr }),
        (error: CliResult) => error,
      );
      expect(registered.code).toBe(1);
      expect(registered.stderr).toContain("(FailedPrecondition)");
      expect(registered.stderr).toContain("node-llama-cpp, an optional dependency, is not installed");
      const { models } = await server.admin.listModels({});
      expect(models).toEqual([]);
      expect(server.alive()).toBe(true);
    } finally {
      await server.stop();
      await database.drop();
    }
  }, 60_000);
});

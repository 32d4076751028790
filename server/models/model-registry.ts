/**
 * The model registry: the models whose tokenizers the platform holds, so that it bills their
 * orders by its own token count (order-run.ts) and the worker's count is only a trust signal.
 *
 * `admin model register --name NAME --gguf FILE` names a GGUF **on the control plane's machine**:
 * the control plane must read the file anyway (node-llama-cpp loads a vocabulary from a GGUF on
 * disk) and again at every start, and a model is gigabytes while an admin call carries at most
 * 16 MiB. The admin command hashes the file when it can read it too, and the control plane refuses
 * a file whose SHA-256 differs (an admin on another machine naming a path that means another file).
 * Registrations survive restarts: at start each GGUF is loaded again, re-hashed when its size or
 * modification time changed, and left inactive (its orders unverified) when it is gone or differs.
 */
import { open, stat } from "node:fs/promises";
import { isAbsolute } from "node:path";
import { MarketError } from "../market/errors.js";
import type { MarketLogger } from "../market/order-run.js";
import type { ModelRegistryStore, OrderTokenCount, StoredModel } from "../store/model-registry-store.js";
import { sha256File, TokenCounter, TokenizerUnavailableError } from "./token-counter.js";

/** A registered model and whether the platform counts its tokens now. */
export interface RegisteredModel extends StoredModel {
  /** True when its tokenizer is loaded and its orders are counted by the platform. */
  active: boolean;
  /** Why it is not active ("" when it is). */
  problem: string;
}

/**
 * What order-run.ts needs: the counter of a model. (How an order was counted is recorded by its
 * settlement, SettleOrderInput.count.)
 */
export interface TokenCountSource {
  counterFor(model: string): TokenCounter | undefined;
}

const MAX_NAME_LENGTH = 200;
const GGUF_MAGIC = "GGUF";

export class ModelRegistry implements TokenCountSource {
  private readonly counters = new Map<string, TokenCounter>();
  private readonly problems = new Map<string, string>();

  constructor(
    private readonly store: ModelRegistryStore,
    private readonly log: MarketLogger,
  ) {}

  /** Loads every registered model's tokenizer (at start). A model that cannot load stays inactive. */
  async load(): Promise<void> {
    for (const model of await this.store.listModels()) {
      try {
        const file = await stat(model.ggufPath);
        let sha = model.ggufSha256;
        if (file.size !== model.ggufBytes || file.mtimeMs !== model.ggufMtimeMs) {
          sha = await sha256File(model.ggufPath);
          if (sha !== model.ggufSha256) {
            throw new Error(
              `${model.ggufPath} changed since registration (SHA-256 ${sha}, registered ${model.ggufSha256})`,
            );
          }
        }
        this.counters.set(model.name, await TokenCounter.load(model.ggufPath, sha));
        this.problems.delete(model.name);
      } catch (error) {
        const problem = error instanceof Error ? error.message : String(error);
        this.problems.set(model.name, problem);
        this.log.error(
          { model: model.name, problem },
          "registered model not loaded; its orders are unverified",
        );
      }
    }
  }

  counterFor(model: string): TokenCounter | undefined {
    return this.counters.get(model);
  }

  orderCounts(orderIds: readonly string[]): Promise<Map<string, OrderTokenCount>> {
    return this.store.orderCounts(orderIds);
  }

  /**
   * Registers (or re-registers) `name` with the GGUF at `path` on this machine. Throws
   * TokenizerUnavailableError when node-llama-cpp is absent, MarketError for bad input.
   */
  async register(name: string, path: string, expectedSha256: string | undefined): Promise<RegisteredModel> {
    if (!name || name.length > MAX_NAME_LENGTH) {
      throw new MarketError(
        "invalid_request",
        `name is required, at most ${MAX_NAME_LENGTH} characters`,
        "name",
      );
    }
    if (!isAbsolute(path)) {
      throw new MarketError(
        "invalid_request",
        `gguf_path must be an absolute path on the control plane's machine, got "${path}"`,
        "gguf_path",
      );
    }
    if (expectedSha256 !== undefined && !/^[0-9a-f]{64}$/.test(expectedSha256)) {
      throw new MarketError(
        "invalid_request",
        "expected_gguf_sha256 must be 64 lowercase hex digits",
        "expected_gguf_sha256",
      );
    }
    const file = await stat(path).catch(() => null);
    if (!file?.isFile()) {
      throw new MarketError(
        "invalid_request",
        `no file at ${path} on the control plane's machine`,
        "gguf_path",
      );
    }
    const handle = await open(path, "r");
    const magic = Buffer.alloc(4);
    try {
      await handle.read(magic, 0, 4, 0);
    } finally {
      await handle.close();
    }
    if (magic.toString("latin1") !== GGUF_MAGIC) {
      throw new MarketError(
        "invalid_request",
        `${path} is not a GGUF file (it does not begin with "GGUF")`,
        "gguf_path",
      );
    }
    const sha = await sha256File(path);
    if (expectedSha256 !== undefined && sha !== expectedSha256) {
      throw new MarketError(
        "invalid_request",
        `the file at ${path} on the control plane's machine has SHA-256 ${sha}, not ${expectedSha256}: it is another file`,
        "gguf_path",
      );
    }
    let counter: TokenCounter;
    try {
      counter = await TokenCounter.load(path, sha);
    } catch (error) {
      if (error instanceof TokenizerUnavailableError) throw error;
      const message = error instanceof Error ? error.message : String(error);
      throw new MarketError(
        "invalid_request",
        `cannot load the vocabulary of ${path}: ${message}`,
        "gguf_path",
      );
    }
    const stored = await this.store.saveModel({
      name,
      ggufPath: path,
      ggufSha256: sha,
      ggufBytes: file.size,
      ggufMtimeMs: file.mtimeMs,
      tokenizerSha256: counter.tokenizerSha256,
      tokenizerModel: counter.tokenizerModel,
      vocabularySize: counter.vocabularySize,
      chatTemplate: counter.chatTemplate,
    });
    const previous = this.counters.get(name);
    this.counters.set(name, counter);
    this.problems.delete(name);
    if (previous) void previous.dispose().catch(() => undefined);
    this.log.info(
      { model: name, ggufSha256: sha, tokenizerSha256: counter.tokenizerSha256 },
      "model registered",
    );
    return { ...stored, active: true, problem: "" };
  }

  /** Every registered model, by name, with whether it is active. */
  async list(): Promise<RegisteredModel[]> {
    const models = await this.store.listModels();
    return models.map((model) => {
      const active = this.counters.get(model.name)?.ggufSha256 === model.ggufSha256;
      return { ...model, active, problem: active ? "" : (this.problems.get(model.name) ?? "not loaded") };
    });
  }

  /** Frees the loaded vocabularies. */
  async close(): Promise<void> {
    const counters = [...this.counters.values()];
    this.counters.clear();
    await Promise.all(counters.map((counter) => counter.dispose().catch(() => undefined)));
  }
}

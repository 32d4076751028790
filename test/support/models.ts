/**
 * Where the tiny real GGUF models for tests live: LOCALLMARKET_TEST_MODELS_DIR, or the `shared/models`
 * folder beside the checkout. Tests that need one skip, saying why, when it is absent.
 */
import { join, resolve } from "node:path";

export const MODELS_DIR =
  process.env.LOCALLMARKET_TEST_MODELS_DIR ?? resolve(import.meta.dirname, "../../../shared/models");
export const STORIES_260K = join(MODELS_DIR, "stories260K.gguf");
export const TINY_RANDOM = join(MODELS_DIR, "llama-2-tiny-random.gguf");

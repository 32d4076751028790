/**
 * The identity of a model build: the SHA-256 of its weights file, quantization included
 * (Offer.weights_sha256). The file is streamed through the hash, so a 40 GB GGUF never has to fit
 * in memory.
 */
import { createHash } from "node:crypto";
import { createReadStream } from "node:fs";

/** The SHA-256 of the file at `path`, 64 lowercase hex digits. */
export async function weightsSha256(path: string): Promise<string> {
  const hash = createHash("sha256");
  for await (const chunk of createReadStream(path, { highWaterMark: 1 << 20 })) hash.update(chunk as Buffer);
  return hash.digest("hex");
}

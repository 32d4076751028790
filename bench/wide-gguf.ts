/**
 * A wider model for the verifier's cost benchmark: stories260K's GGUF (its tokenizer, its five
 * llama blocks) with every width multiplied — embedding 64 → 64·k, feed-forward 172 → 172·k, the
 * key/value width 32 → 32·k, the head dimension with them — and seeded random weights (norms at 1,
 * matrices N(0, 1/fan-in)). At k = 8 it has ~15 M parameters: its per-token matrix work, which a
 * prefill batches, outweighs the per-position attention work that dominates stories260K, as it does
 * in every real model. Its text is gibberish, which does not matter for timing a verifier.
 *
 * It parses GGUF v3 with `test/support/gguf-perturb.ts`'s cursor, copies the metadata with the widths
 * patched, and writes new tensor infos and data (F32, 32-byte aligned).
 */
import { readFileSync, writeFileSync } from "node:fs";
import { GgufCursor, gaussian } from "../test/support/gguf-perturb.js";

const GGUF_TYPE_UINT32 = 4;
const ALIGNMENT = 32;
const GGML_TYPE_F32 = 0;

/** Metadata keys whose value (a uint32 width) is multiplied by the factor. */
const WIDTH_KEYS = ["llama.embedding_length", "llama.feed_forward_length", "llama.rope.dimension_count"];

/** Writes stories260K widened `factor` times to `target`; answers the new model's parameter count. */
export function writeWidenedGguf(source: string, target: string, factor: number, seed = 7): number {
  const file = readFileSync(source);
  const cursor = new GgufCursor(file);
  const u32 = () => cursor.u32();
  const u64 = () => cursor.u64();
  const str = () => cursor.str();
  if (file.toString("latin1", 0, 4) !== "GGUF") throw new Error(`${source} is not a GGUF file`);
  cursor.at = 4;
  if (u32() !== 3) throw new Error(`${source}: only GGUF v3 is supported`);
  const tensorCount = Number(u64());
  const kvCount = Number(u64());
  const metadataStart = cursor.at;
  const patches: number[] = [];
  const widths = new Map<number, number>();
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = u32();
    if (WIDTH_KEYS.includes(key) && type === GGUF_TYPE_UINT32) patches.push(cursor.at);
    if (key === "general.alignment") throw new Error("a GGUF with its own alignment is not supported");
    cursor.skipValue(type);
  }
  const metadata = Buffer.from(file.subarray(metadataStart, cursor.at));
  for (const position of patches) {
    const offset = position - metadataStart;
    const width = metadata.readUInt32LE(offset);
    metadata.writeUInt32LE(width * factor, offset);
  }
  const tensors: { name: string; dims: number[] }[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const dims: number[] = [];
    for (let d = u32(); d > 0; d--) dims.push(Number(u64()));
    if (u32() !== GGML_TYPE_F32) throw new Error(`${name} is not F32`);
    u64();
    tensors.push({ name, dims });
  }
  // Every width of the model: the embedding, the key/value width and the feed-forward width; the
  // vocabulary (the output and embedding tables' other dimension) stays.
  const vocabulary = Math.max(...tensors.flatMap((tensor) => tensor.dims));
  for (const tensor of tensors) {
    for (const dim of tensor.dims) if (dim !== vocabulary) widths.set(dim, dim * factor);
  }
  const widened = tensors.map((tensor) => ({
    name: tensor.name,
    dims: tensor.dims.map((dim) => widths.get(dim) ?? dim),
  }));

  const align = (n: number) => Math.ceil(n / ALIGNMENT) * ALIGNMENT;
  const infos: Buffer[] = [];
  let dataSize = 0;
  const offsets: number[] = [];
  for (const tensor of widened) {
    const name = Buffer.from(tensor.name, "utf8");
    const info = Buffer.alloc(8 + name.length + 4 + 8 * tensor.dims.length + 4 + 8);
    let p = info.writeBigUInt64LE(BigInt(name.length), 0);
    p += name.copy(info, p);
    p = info.writeUInt32LE(tensor.dims.length, p);
    for (const dim of tensor.dims) p = info.writeBigUInt64LE(BigInt(dim), p);
    p = info.writeUInt32LE(GGML_TYPE_F32, p);
    dataSize = align(dataSize);
    offsets.push(dataSize);
    info.writeBigUInt64LE(BigInt(dataSize), p);
    infos.push(info);
    dataSize += 4 * tensor.dims.reduce((a, b) => a * b, 1);
  }
  const header = Buffer.alloc(24);
  header.write("GGUF", 0, "latin1");
  header.writeUInt32LE(3, 4);
  header.writeBigUInt64LE(BigInt(tensorCount), 8);
  header.writeBigUInt64LE(BigInt(kvCount), 16);
  const head = Buffer.concat([header, metadata, ...infos]);
  const out = Buffer.alloc(align(head.length) + align(dataSize));
  head.copy(out, 0);
  const dataStart = align(head.length);
  const normal = gaussian(seed);
  let parameters = 0;
  for (const [i, tensor] of widened.entries()) {
    const count = tensor.dims.reduce((a, b) => a * b, 1);
    parameters += count;
    const view = new Float32Array(out.buffer, out.byteOffset + dataStart + (offsets[i] as number), count);
    if (tensor.dims.length === 1) {
      view.fill(1);
    } else {
      const scale = 1 / Math.sqrt(tensor.dims[0] as number);
      for (let j = 0; j < count; j++) view[j] = normal() * scale;
    }
  }
  writeFileSync(target, out);
  return parameters;
}

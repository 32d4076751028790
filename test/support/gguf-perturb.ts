/**
 * Writes a "subtle substitute" of a GGUF model for the trust tests: the same file (same tokenizer,
 * same metadata, same tensor layout) whose F32 tensor data is rewritten, either rounded to fewer
 * mantissa bits (what a cheaper quantization does) or multiplied by 1 + ε·N(0, 1) noise.
 *
 * It parses just enough of GGUF v3 to find the data: the header, the key/value metadata (for
 * `general.alignment`), the tensor infos (name, dimensions, type, offset), then the aligned data
 * section. Only F32 tensors (type 0) are touched; every other byte is copied as is.
 */
import { readFileSync, writeFileSync } from "node:fs";

/** How to rewrite each F32 weight. */
export type Perturbation =
  | { kind: "round"; mantissaBits: number }
  | { kind: "noise"; relative: number; seed: number };

export interface GgufTensorInfo {
  name: string;
  dims: bigint[];
  type: number;
  /** Offset of the tensor's data from the start of the data section. */
  offset: bigint;
}

export interface GgufLayout {
  version: number;
  alignment: number;
  tensors: GgufTensorInfo[];
  /** Where the data section starts in the file. */
  dataOffset: number;
}

const GGML_TYPE_F32 = 0;
const GGUF_TYPE_STRING = 8;
const GGUF_TYPE_ARRAY = 9;
/** Byte sizes of GGUF's scalar metadata types. */
const SCALAR_SIZES: Record<number, number> = {
  0: 1,
  1: 1,
  2: 2,
  3: 2,
  4: 4,
  5: 4,
  6: 4,
  7: 1,
  10: 8,
  11: 8,
  12: 8,
};

/** Reads GGUF's little-endian fields one after the other from `at`. */
export class GgufCursor {
  constructor(
    private readonly file: Buffer,
    public at = 0,
  ) {}

  u32(): number {
    const v = this.file.readUInt32LE(this.at);
    this.at += 4;
    return v;
  }

  u64(): bigint {
    const v = this.file.readBigUInt64LE(this.at);
    this.at += 8;
    return v;
  }

  str(): string {
    const length = Number(this.u64());
    const s = this.file.toString("utf8", this.at, this.at + length);
    this.at += length;
    return s;
  }

  /** Steps over a metadata value of GGUF type `type`. */
  skipValue(type: number): void {
    if (type === GGUF_TYPE_STRING) {
      this.str();
      return;
    }
    if (type === GGUF_TYPE_ARRAY) {
      const inner = this.u32();
      const count = Number(this.u64());
      for (let i = 0; i < count; i++) this.skipValue(inner);
      return;
    }
    const size = SCALAR_SIZES[type];
    if (size === undefined) throw new Error(`GGUF: unknown metadata type ${type} at byte ${this.at}`);
    this.at += size;
  }
}

/** Parses a GGUF v2/v3 header and tensor infos. Throws on anything else. */
export function parseGguf(file: Buffer): GgufLayout {
  const cursor = new GgufCursor(file);
  const u32 = () => cursor.u32();
  const u64 = () => cursor.u64();
  const str = () => cursor.str();
  if (file.toString("latin1", 0, 4) !== "GGUF") throw new Error("not a GGUF file (bad magic)");
  cursor.at = 4;
  const version = u32();
  if (version !== 2 && version !== 3) throw new Error(`GGUF version ${version} is not supported`);
  const tensorCount = Number(u64());
  const kvCount = Number(u64());
  let alignment = 32;
  for (let i = 0; i < kvCount; i++) {
    const key = str();
    const type = u32();
    if (key === "general.alignment" && type === 4) alignment = file.readUInt32LE(cursor.at);
    cursor.skipValue(type);
  }
  const tensors: GgufTensorInfo[] = [];
  for (let i = 0; i < tensorCount; i++) {
    const name = str();
    const nDims = u32();
    const dims: bigint[] = [];
    for (let d = 0; d < nDims; d++) dims.push(u64());
    const type = u32();
    const offset = u64();
    tensors.push({ name, dims, type, offset });
  }
  const dataOffset = Math.ceil(cursor.at / alignment) * alignment;
  return { version, alignment, tensors, dataOffset };
}

/** A seeded N(0, 1) source (mulberry32 + Box–Muller), so a perturbed copy is reproducible. */
export function gaussian(seed: number): () => number {
  let state = seed >>> 0;
  const uniform = () => {
    state = (state + 0x6d2b79f5) >>> 0;
    let t = state;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
  return () => Math.sqrt(-2 * Math.log(1 - uniform())) * Math.cos(2 * Math.PI * uniform());
}

/**
 * Returns a copy of `file` with every F32 weight rewritten; `changed` counts the weights whose bits
 * changed (a test asserts the copy really differs).
 */
export function perturbGguf(
  file: Buffer,
  perturbation: Perturbation,
): { copy: Buffer; changed: number; f32Tensors: number } {
  const layout = parseGguf(file);
  const copy = Buffer.from(file);
  const view = new DataView(copy.buffer, copy.byteOffset, copy.byteLength);
  const noise = perturbation.kind === "noise" ? gaussian(perturbation.seed) : undefined;
  const dropBits = perturbation.kind === "round" ? 23 - perturbation.mantissaBits : 0;
  if (dropBits < 0 || dropBits > 23) throw new Error("mantissaBits must be within 0..23");
  let changed = 0;
  let f32Tensors = 0;
  for (const tensor of layout.tensors) {
    if (tensor.type !== GGML_TYPE_F32) continue;
    f32Tensors += 1;
    const count = Number(tensor.dims.reduce((a, b) => a * b, 1n));
    const start = layout.dataOffset + Number(tensor.offset);
    for (let i = 0; i < count; i++) {
      const at = start + i * 4;
      const before = view.getUint32(at, true);
      let after: number;
      if (noise) {
        const value = view.getFloat32(at, true);
        view.setFloat32(at, value * (1 + (perturbation as { relative: number }).relative * noise()), true);
        after = view.getUint32(at, true);
      } else {
        // Round to nearest on the kept mantissa bits (ties away from zero), as a cast would.
        const half = dropBits > 0 ? 1 << (dropBits - 1) : 0;
        const mask = dropBits > 0 ? ~((1 << dropBits) - 1) >>> 0 : 0xffffffff;
        after = ((before + half) & mask) >>> 0;
        view.setUint32(at, after, true);
      }
      if (after !== before) changed += 1;
    }
  }
  return { copy, changed, f32Tensors };
}

/** Reads `source`, perturbs it and writes the copy to `target`. */
export function writePerturbedGguf(source: string, target: string, perturbation: Perturbation): number {
  const { copy, changed } = perturbGguf(readFileSync(source), perturbation);
  writeFileSync(target, copy);
  return changed;
}

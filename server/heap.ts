/**
 * Memory settings for a control plane on its embedded database: the zero-setup mode, the one a
 * small machine runs, where the server's RSS should stay under 300 MB. Two of them:
 * {@link useBaselineWasmCompiler} before the database starts, {@link tightenHeap} once it runs.
 *
 * A tighter JavaScript heap:
 *
 * V8 lets its old generation grow to a multiple of what survived the last full collection, and
 * before the first one to a limit set by the machine's memory: on a 24 GiB machine the server's old
 * space grew from 46 to 90 MiB under load while only 33 MiB of it was live, and V8 does not give the
 * pages back. {@link tightenHeap} sets the growth factor to 1.5 and collects once right after
 * start-up, so that limits are derived from the real live set from then on. Measured with a
 * compiled server on PGlite under 64 consumers (BENCHMARKS.md): the old space stayed at 47–58 MiB,
 * with no change in CPU per request beyond the runs' noise (more frequent full collections, each
 * of a heap with ~35 MiB live).
 *
 * With PostgreSQL the defaults stay: that server idles at about 120 MiB and is the one measured
 * for CPU per request.
 */
import { getHeapStatistics, setFlagsFromString } from "node:v8";
import { runInNewContext } from "node:vm";

/**
 * Compiles WebAssembly with V8's baseline compiler (Liftoff) only, not recompiling hot functions
 * with TurboFan: for PGlite, PostgreSQL compiled to WebAssembly, which the embedded database's
 * thread compiles when it starts, so this must run before that. TurboFan's compilations of
 * PostgreSQL's hot functions run on V8's background threads, and the native memory they used
 * stays with those threads' malloc arenas. Measured with the compiled server on PGlite under 64
 * consumers (BENCHMARKS.md, three runs each): idle RSS 219–226 MiB against 252–280, peak 260–261
 * MiB against 293–317, for 1.5–1.6 ms of CPU per request (control plane and database thread)
 * against 1.3–1.4 ms, and a restart 0.8 s against 1.2 s (nothing to recompile in the background).
 * The flags are V8's, process-wide, read when a module is compiled; any WebAssembly compiled later
 * in this process (undici's HTTP parser, if fetch is used) runs on baseline code too.
 */
export function useBaselineWasmCompiler(): void {
  setFlagsFromString("--no-wasm-dynamic-tiering");
  setFlagsFromString("--no-wasm-tier-up");
}

/** How much the old generation may grow past its live size before the next full collection. */
export const HEAP_GROWING_PERCENT = 50;

/** Applies the growth factor and runs one full collection; answers the heap in use after it. */
export function tightenHeap(): { usedBytes: number } {
  setFlagsFromString(`--heap-growing-percent=${HEAP_GROWING_PERCENT}`);
  // V8 offers a full collection to JavaScript only through --expose-gc, which installs `gc` in
  // contexts created while it is set: one new context takes it, and the flag goes off again, so
  // nothing else sees a `gc` global.
  setFlagsFromString("--expose-gc");
  let gc: () => void;
  try {
    gc = runInNewContext("gc") as () => void;
  } finally {
    setFlagsFromString("--no-expose-gc");
  }
  gc();
  return { usedBytes: getHeapStatistics().used_heap_size };
}

/**
 * A tighter JavaScript heap for a control plane on its embedded database: the zero-setup mode, the
 * one a small machine runs, where the server's RSS should stay under 300 MB.
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

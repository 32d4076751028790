/**
 * tightenHeap (used by a server on its embedded database) runs a full collection at once, so the
 * heap's limits follow from what is live, and leaves no `gc` global behind.
 */
import { getHeapStatistics } from "node:v8";
import { describe, expect, it } from "vitest";
import { tightenHeap } from "../../server/heap.js";

describe("tightenHeap", () => {
  it("collects garbage that only a full collection frees, without exposing gc", () => {
    const gcBefore = typeof (globalThis as { gc?: unknown }).gc;
    // About 30 MB that survives the scavenges made while it is built, hence lands in the old
    // generation: only a full collection frees it once it is dropped.
    let junk: { index: number; text: string }[] | undefined = Array.from({ length: 300_000 }, (_, index) => ({
      index,
      text: `item ${index}`,
    }));
    const withJunk = getHeapStatistics().used_heap_size;
    expect(junk.length).toBe(300_000);
    junk = undefined;
    const { usedBytes } = tightenHeap();
    expect(withJunk - usedBytes).toBeGreaterThan(15 * 1024 * 1024);
    expect(typeof (globalThis as { gc?: unknown }).gc).toBe(gcBefore);
  });
});

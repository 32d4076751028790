import { describe, expect, it } from "vitest";
import { AsyncQueue } from "../../server/market/async-queue.js";

describe("AsyncQueue", () => {
  it("delivers pushed items in order, then ends", async () => {
    const queue = new AsyncQueue<number>();
    const received = (async () => {
      const items: number[] = [];
      for await (const item of queue) items.push(item);
      return items;
    })();
    queue.push(1);
    queue.push(2);
    queue.end(3);
    expect(await received).toEqual([1, 2, 3]);
  });

  it("refuses to grow past its limit for a stalled consumer, but always takes the final item", async () => {
    const queue = new AsyncQueue<string>(2);
    queue.push("a");
    queue.push("b");
    expect(() => queue.push("c")).toThrow(/overflow/);
    queue.end("done");
    const items: string[] = [];
    for await (const item of queue) items.push(item);
    expect(items).toEqual(["a", "b", "done"]);
  });

  it("ignores pushes after the end", async () => {
    const queue = new AsyncQueue<number>();
    queue.end();
    queue.push(1);
    expect(await queue.next()).toEqual({ value: undefined, done: true });
  });
});

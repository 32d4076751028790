import { describe, expect, it } from "vitest";
import { formatCredits, parseCredits } from "../../common/credits.js";
import { orderCost, platformFee, promptTokenBound } from "../../server/market/money.js";

describe("money arithmetic", () => {
  it("parses credits into micro-credits exactly and formats them back", () => {
    expect(parseCredits("0.1") + parseCredits("0.2")).toBe(parseCredits("0.3"));
    expect(parseCredits("12.345678")).toBe(12_345_678n);
    expect(formatCredits(500_000n)).toBe("0.5");
    expect(formatCredits(1_000_000n)).toBe("1");
    expect(formatCredits(1n)).toBe("0.000001");
    expect(formatCredits(-12_345_678n)).toBe("-12.345678");
    expect(() => parseCredits("1.0000001", "amount")).toThrow(/more than 6 decimals/);
    expect(() => parseCredits("-1", "amount")).toThrow(/not a non-negative decimal/);
  });

  it("rounds a cost up to the next micro-credit, never to zero", () => {
    // 1 prompt token at 1 µc per 1M tokens is a millionth of a µc: billed as 1 µc.
    expect(orderCost(1, 0, 1n, 0n)).toBe(1n);
    expect(orderCost(0, 0, 5n, 5n)).toBe(0n);
    // 12 × 100 credits/1M + 4 × 250 credits/1M = 1200 + 1000 µc.
    expect(orderCost(12, 4, 100_000_000n, 250_000_000n)).toBe(2200n);
    expect(orderCost(1_000_000, 1_000_000, 3n, 4n)).toBe(7n);
  });

  it("rounds the platform fee down, in the provider's favour", () => {
    expect(platformFee(2200n, 500)).toBe(110n);
    expect(platformFee(19n, 500)).toBe(0n);
    expect(platformFee(21n, 500)).toBe(1n);
    expect(platformFee(1000n, 10_000)).toBe(1000n);
  });

  it("bounds prompt tokens by UTF-8 bytes plus a template allowance", () => {
    const ascii = promptTokenBound([{ role: "user", content: "Hello" }]);
    const emoji = promptTokenBound([{ role: "user", content: "😀" }]);
    expect(ascii).toBe(4 + 5 + 8 + 16);
    expect(emoji).toBe(4 + 4 + 8 + 16);
    expect(
      promptTokenBound([
        { role: "user", content: "" },
        { role: "assistant", content: "" },
      ]),
    ).toBeGreaterThan(ascii - 5);
  });
});

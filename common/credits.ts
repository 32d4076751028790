/**
 * Credit amounts as people type and read them, shared by the control plane and the worker. Amounts
 * are integer micro-credits (µc, 1 credit = 1,000,000 µc) in bigint; no float touches an amount.
 */

export const MICROS_PER_CREDIT = 1_000_000n;

/**
 * A credit amount that does not parse. Each side turns it into its own error (a MarketError with
 * the request field, a CLI usage error), so this module depends on neither.
 */
export class InvalidCreditsError extends Error {
  override readonly name = "InvalidCreditsError";

  constructor(
    /** The field or option the amount came from. */
    readonly field: string,
    message: string,
  ) {
    super(message);
  }
}

/** Parses a decimal credit amount ("12", "0.5", "1.000001") into µc, exactly. */
export function parseCredits(text: string, field = "amount"): bigint {
  const match = /^(\d+)(?:\.(\d+))?$/.exec(text);
  if (!match) {
    throw new InvalidCreditsError(
      field,
      `${field}: "${text}" is not a non-negative decimal number of credits`,
    );
  }
  const fraction = match[2] ?? "";
  if (fraction.length > 6) {
    throw new InvalidCreditsError(
      field,
      `${field}: "${text}" has more than 6 decimals (the smallest unit is 0.000001 credit)`,
    );
  }
  return BigInt(match[1] ?? "0") * MICROS_PER_CREDIT + BigInt(fraction.padEnd(6, "0"));
}

/** Formats µc as a decimal credit string without losing digits ("1.5", "0.000001"). */
export function formatCredits(micros: bigint): string {
  const sign = micros < 0n ? "-" : "";
  const abs = micros < 0n ? -micros : micros;
  const whole = abs / MICROS_PER_CREDIT;
  const fraction = (abs % MICROS_PER_CREDIT).toString().padStart(6, "0").replace(/0+$/, "");
  return `${sign}${whole}${fraction ? `.${fraction}` : ""}`;
}

/**
 * CPU time of processes and threads as Linux's /proc reports it, for the benchmarks that measure
 * processes other than their own (workers, consumers, a compiled server).
 */
import { readFileSync } from "node:fs";

/** Linux's USER_HZ: /proc/PID/stat counts CPU time in these ticks. */
export const CLOCK_TICKS_PER_SECOND = 100;

/** utime + stime of a /proc stat line, in clock ticks. */
export function statTicks(stat: string): number {
  // The fields after the command name, which is in parentheses and may contain spaces: utime and
  // stime are fields 14 and 15 of the whole line.
  const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
  return Number(fields[11]) + Number(fields[12]);
}

/** User + system CPU of these processes, in ms, from /proc (null where it cannot be read). */
export function cpuMs(pids: number[]): number | null {
  try {
    let ticks = 0;
    for (const pid of pids) ticks += statTicks(readFileSync(`/proc/${pid}/stat`, "utf8"));
    return (ticks * 1000) / CLOCK_TICKS_PER_SECOND;
  } catch {
    return null;
  }
}

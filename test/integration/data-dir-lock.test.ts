/**
 * The data dir lock on a real file system: one holder at a time, the holder named in the refusal,
 * a crashed holder's lock taken over, a live or unverifiable one respected, and the file removed
 * on release.
 */
import { spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtemp, readdir, readFile, rm, writeFile } from "node:fs/promises";
import { hostname, tmpdir } from "node:os";
import { join } from "node:path";
import { afterEach, beforeEach, describe, expect, it } from "vitest";
import {
  acquireDataDirLock,
  DataDirInUseError,
  LOCK_FILE_NAME,
  type LockOwner,
  removeStaleLock,
} from "../../server/store/data-dir-lock.js";

/** The pid of a process that has exited: a crashed server's. */
async function deadPid(): Promise<number> {
  const child = spawn(process.execPath, ["-e", ""], { stdio: "ignore" });
  const [code] = await once(child, "exit");
  expect(code).toBe(0);
  expect(child.pid).toBeTypeOf("number");
  return child.pid as number;
}

describe("data dir lock", () => {
  let dataDir: string;
  let lockPath: string;

  beforeEach(async () => {
    dataDir = await mkdtemp(join(tmpdir(), "locallmarket-lock-"));
    lockPath = join(dataDir, LOCK_FILE_NAME);
  });

  afterEach(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });

  const readLock = async () => JSON.parse(await readFile(lockPath, "utf8")) as LockOwner;

  it("records its holder, refuses a second holder naming the dir and the pid, and frees the dir on release", async () => {
    const lock = await acquireDataDirLock(dataDir);
    expect(lock.path).toBe(lockPath);
    expect(await readLock()).toMatchObject({ pid: process.pid, hostname: hostname() });
    expect(Date.parse(lock.owner.startedAt)).not.toBeNaN();

    const second = await acquireDataDirLock(dataDir).catch((error: unknown) => error);
    expect(second).toBeInstanceOf(DataDirInUseError);
    const refusal = second as DataDirInUseError;
    expect(refusal.message).toContain(
      `the data dir ${dataDir} is in use by another LocalLMarket server (pid ${process.pid}, started ${lock.owner.startedAt})`,
    );
    expect(refusal.owner.pid).toBe(process.pid);
    // The refusal left the holder's lock as it was.
    expect(await readLock()).toMatchObject({ pid: process.pid, startedAt: lock.owner.startedAt });

    await lock.release();
    await lock.release();
    expect(await readdir(dataDir)).toEqual([]);
    const again = await acquireDataDirLock(dataDir);
    await again.release();
  });

  it("takes over the lock of a server that is no longer running, and says so", async () => {
    const pid = await deadPid();
    const stale: LockOwner = { pid, startedAt: "2025-01-01T00:00:00.000Z", hostname: hostname() };
    await writeFile(lockPath, JSON.stringify(stale));
    const told: Array<LockOwner | undefined> = [];

    const lock = await acquireDataDirLock(dataDir, { onStaleLock: (owner) => told.push(owner) });

    expect(told).toEqual([stale]);
    expect(await readLock()).toMatchObject({ pid: process.pid });
    await lock.release();
    expect(await readdir(dataDir)).toEqual([]);
  });

  it("replaces a lock file it cannot read", async () => {
    await writeFile(lockPath, "");
    const told: Array<LockOwner | undefined> = [];
    const lock = await acquireDataDirLock(dataDir, { onStaleLock: (owner) => told.push(owner) });
    expect(told).toEqual([undefined]);
    expect(await readLock()).toMatchObject({ pid: process.pid });
    await lock.release();
  });

  it("respects a lock written on another host, whose pid cannot be checked here", async () => {
    const remote: LockOwner = {
      pid: await deadPid(),
      startedAt: "2025-01-01T00:00:00.000Z",
      hostname: "elsewhere",
    };
    await writeFile(lockPath, JSON.stringify(remote));

    const refusal = await acquireDataDirLock(dataDir).catch((error: unknown) => error);

    expect(refusal).toBeInstanceOf(DataDirInUseError);
    expect((refusal as Error).message).toContain(`(pid ${remote.pid} on elsewhere,`);
    expect(await readLock()).toEqual(remote);
  });

  it("never removes a lock that replaced the stale one it judged, however late it acts", async () => {
    // Plays the race: a start read a crashed server's lock; another start took it over since.
    const stale: LockOwner = {
      pid: await deadPid(),
      startedAt: "2025-01-01T00:00:00.000Z",
      hostname: hostname(),
    };
    const staleText = JSON.stringify(stale);
    await writeFile(lockPath, staleText);
    const winner = await acquireDataDirLock(dataDir);
    const winnersText = await readFile(lockPath, "utf8");

    expect(await removeStaleLock(lockPath, staleText)).toBe(false);

    expect(await readFile(lockPath, "utf8")).toBe(winnersText);
    expect(await readdir(dataDir)).toEqual([LOCK_FILE_NAME]);
    await winner.release();
  });

  it("leaves a stale lock alone while another start is taking it over", async () => {
    const stale: LockOwner = {
      pid: await deadPid(),
      startedAt: "2025-01-01T00:00:00.000Z",
      hostname: hostname(),
    };
    const staleText = JSON.stringify(stale);
    await writeFile(lockPath, staleText);
    // Another start holds the takeover mutex right now.
    await writeFile(`${lockPath}.takeover`, "{}");

    expect(await removeStaleLock(lockPath, staleText)).toBe(false);

    expect(await readFile(lockPath, "utf8")).toBe(staleText);
    await rm(`${lockPath}.takeover`);
    expect(await removeStaleLock(lockPath, staleText)).toBe(true);
    expect(await readdir(dataDir)).toEqual([]);
  });

  it("lets exactly one of several racing starts take over a stale lock", async () => {
    const stale: LockOwner = {
      pid: await deadPid(),
      startedAt: "2025-01-01T00:00:00.000Z",
      hostname: hostname(),
    };
    await writeFile(lockPath, JSON.stringify(stale));

    const outcomes = await Promise.allSettled(Array.from({ length: 10 }, () => acquireDataDirLock(dataDir)));

    const winners = outcomes.filter((outcome) => outcome.status === "fulfilled");
    expect(winners).toHaveLength(1);
    for (const outcome of outcomes) {
      if (outcome.status === "rejected") expect(outcome.reason).toBeInstanceOf(DataDirInUseError);
    }
    const winner = (winners[0] as PromiseFulfilledResult<Awaited<ReturnType<typeof acquireDataDirLock>>>)
      .value;
    expect(await readLock()).toMatchObject({ pid: process.pid, startedAt: winner.owner.startedAt });
    await winner.release();
    // No temporary file is left behind by the losers.
    expect(await readdir(dataDir)).toEqual([]);
  });
});

/**
 * A lock file that makes a data dir one server's alone. Two servers on the same embedded PGlite
 * files corrupt them silently, so the second one must refuse to start.
 *
 * `<dataDir>/lock` is created only if absent (atomically, by link) and holds the owner's pid, start
 * time and host. A lock whose pid is no longer alive on this host was left by a crash (kill -9,
 * power loss) and is taken over. A lock written on another host (a data dir on a network share)
 * cannot be checked and is respected.
 */
import { randomUUID } from "node:crypto";
import { unlinkSync } from "node:fs";
import { link, readFile, stat, unlink, writeFile } from "node:fs/promises";
import { hostname } from "node:os";
import { join, resolve } from "node:path";

export const LOCK_FILE_NAME = "lock";

/** What a lock file records about the server holding it. */
export interface LockOwner {
  pid: number;
  /** ISO 8601. */
  startedAt: string;
  hostname: string;
}

export class DataDirInUseError extends Error {
  constructor(
    readonly dataDir: string,
    readonly owner: LockOwner,
    readonly lockPath: string,
  ) {
    const where = owner.hostname === hostname() ? "" : ` on ${owner.hostname}`;
    super(
      `the data dir ${dataDir} is in use by another LocalLMarket server (pid ${owner.pid}${where}, started ${owner.startedAt}); ` +
        `if no such server is running, delete ${lockPath}`,
    );
    this.name = "DataDirInUseError";
  }
}

export interface DataDirLock {
  readonly path: string;
  readonly owner: LockOwner;
  /** Removes the lock file if it is still this lock's. Idempotent. */
  release(): Promise<void>;
}

export interface AcquireOptions {
  /** Told when a stale lock is taken over; `stale` is undefined when the file was unreadable. */
  onStaleLock?: (stale: LockOwner | undefined, lockPath: string) => void;
}

/** Takes the data dir's lock or throws DataDirInUseError naming the holder. The dir must exist. */
export async function acquireDataDirLock(
  dataDir: string,
  options: AcquireOptions = {},
): Promise<DataDirLock> {
  const absoluteDir = resolve(dataDir);
  const lockPath = join(absoluteDir, LOCK_FILE_NAME);
  const owner: LockOwner = {
    pid: process.pid,
    startedAt: new Date().toISOString(),
    hostname: hostname(),
  };
  // The nonce tells this lock apart from any other, even one taken by this process in the same ms.
  const content = `${JSON.stringify({ ...owner, nonce: randomUUID() })}\n`;

  // Each pass either creates the lock, fails on a live holder, or removes one stale lock; a
  // competitor may win the next create, so the loop is bounded by the number of competitors.
  for (;;) {
    if (await createExclusive(lockPath, content)) break;
    const text = await readText(lockPath);
    if (text === undefined) continue;
    // A lock that does not parse has no pid to check; it is treated like a dead holder's.
    const holder = parseOwner(text);
    if (holder && isAlive(holder)) throw new DataDirInUseError(absoluteDir, holder, lockPath);
    if (await removeStaleLock(lockPath, text)) options.onStaleLock?.(holder, lockPath);
  }

  if (heldLocks.size === 0) process.on("exit", releaseHeldLocksOnExit);
  heldLocks.add(lockPath);
  let released: Promise<void> | undefined;
  return {
    path: lockPath,
    owner,
    release() {
      released ??= (async () => {
        heldLocks.delete(lockPath);
        if (heldLocks.size === 0) process.off("exit", releaseHeldLocksOnExit);
        if ((await readText(lockPath)) === content) await unlink(lockPath);
      })();
      return released;
    },
  };
}

/**
 * The lock is written under a temporary name and linked into place: link() fails if the lock
 * exists, and the lock never appears half-written, so an empty lock file always means corruption.
 */
async function createExclusive(lockPath: string, content: string): Promise<boolean> {
  const draft = `${lockPath}.new-${process.pid}-${randomUUID()}`;
  await writeFile(draft, content, { mode: 0o600, flush: true });
  try {
    await link(draft, lockPath);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "EEXIST") return false;
    throw error;
  } finally {
    await unlink(draft);
  }
}

/** Locks this process holds, so one exit hook can remove them all. */
const heldLocks = new Set<string>();

/** A process that exits without closing its database (an uncaught error) still frees its dirs. */
function releaseHeldLocksOnExit(): void {
  for (const lockPath of heldLocks) {
    try {
      unlinkSync(lockPath);
    } catch {
      // Already gone: nothing to release.
    }
  }
}

async function readText(path: string): Promise<string | undefined> {
  try {
    return await readFile(path, "utf8");
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === "ENOENT") return undefined;
    throw error;
  }
}

function parseOwner(text: string): LockOwner | undefined {
  try {
    const parsed = JSON.parse(text) as Partial<LockOwner>;
    if (
      Number.isInteger(parsed.pid) &&
      typeof parsed.startedAt === "string" &&
      typeof parsed.hostname === "string"
    ) {
      return parsed as LockOwner;
    }
  } catch {
    // Falls through: not a lock this code wrote completely.
  }
  return undefined;
}

/** On another host the pid means nothing here, so the holder is presumed alive. */
function isAlive(owner: LockOwner): boolean {
  if (owner.hostname !== hostname()) return true;
  try {
    process.kill(owner.pid, 0);
    return true;
  } catch (error) {
    // EPERM: the process exists but belongs to another user.
    return (error as NodeJS.ErrnoException).code !== "ESRCH";
  }
}

/** A takeover mutex older than this was left by a process that died in the middle of one. */
const TAKEOVER_STALE_MS = 10_000;

/**
 * Removes a stale lock without ever removing a fresh one. Removals are serialised by a second,
 * short-lived lock (`lock.takeover`): under it, the lock is removed only if it still holds exactly
 * the text judged stale. Only a takeover removes a lock, so under the mutex that text cannot be
 * replaced by a fresh lock (whose nonce makes its text unique) between the read and the unlink.
 * False when the lock was not removed here (someone else is taking over, or it changed): the
 * caller looks again. Exported for the test that plays the race.
 */
export async function removeStaleLock(lockPath: string, staleText: string): Promise<boolean> {
  const mutex = `${lockPath}.takeover`;
  if (!(await createExclusive(mutex, `${JSON.stringify({ pid: process.pid, at: Date.now() })}\n`))) {
    await removeAbandonedMutex(mutex);
    // Let the takeover under way finish before looking again.
    await new Promise((resolve) => setTimeout(resolve, 5));
    return false;
  }
  try {
    if ((await readText(lockPath)) !== staleText) return false;
    await unlink(lockPath);
    return true;
  } finally {
    await unlink(mutex).catch(() => {});
  }
}

async function removeAbandonedMutex(mutex: string): Promise<void> {
  try {
    const { mtimeMs } = await stat(mutex);
    if (Date.now() - mtimeMs > TAKEOVER_STALE_MS) await unlink(mutex);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== "ENOENT") throw error;
  }
}

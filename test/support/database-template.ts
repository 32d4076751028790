/**
 * vitest globalSetup: on embedded PGlite (no DATABASE_URL), creates one data dir per run with every
 * migration applied, through the product's own path (`openDatabase`: initdb in a child process,
 * then the migrator). Each test database starts as a copy of it (test/support/database.ts) instead
 * of running initdb and the migrations again: about 7 s of CPU each on a 2-core VM, most of the
 * suite's extra time on PGlite over PostgreSQL. The copy is the data dir a server leaves behind
 * when it stops, which `openDatabase` opens as it is; a truly fresh data dir stays covered by
 * embedded-thread.test.ts and embedded-database.test.ts, which create their own.
 *
 * The template, and so every test's data dir beside it, lives on /dev/shm where that is a tmpfs
 * with room to spare (Linux): a data dir is a thousand small files that PGlite opens and writes
 * through the file system, and on tmpfs that costs a fraction of the system time it does on a disk
 * (a copy: ~0.25 s instead of ~1 s on a VM's ext4). Docker's default /dev/shm (64 MB) is too small
 * and is passed over. A run that is killed leaves its dirs there until they are removed or the
 * machine restarts.
 */
import { constants } from "node:fs";
import { access, mkdtemp, rm, statfs } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { openDatabase } from "../../server/store/database.js";
import { TEMPLATE_ENV } from "./database.js";

/** statfs's f_type for tmpfs on Linux. */
const TMPFS_MAGIC = 0x01021994;
/** Room for the template, two test files' data dirs at a time and what their tests write. */
const MIN_SHM_FREE_BYTES = 1024 ** 3;

export default async function setup(): Promise<(() => Promise<void>) | undefined> {
  // PostgreSQL creates an empty database in milliseconds; an outer run may have made one already.
  if (process.env.DATABASE_URL || process.env[TEMPLATE_ENV]) return undefined;
  const template = await mkdtemp(join(await dataRoot(), "locallmarket-template-"));
  // A thread that dies makes the next query fail; its own error says more.
  let crash: Error | undefined;
  try {
    const database = await openDatabase({
      dataDir: template,
      progress: () => {},
      onCrash: (error) => {
        crash ??= error;
      },
    });
    await database.close();
    if (crash) throw crash;
  } catch (error) {
    await rm(template, { recursive: true, force: true });
    throw crash ?? error;
  }
  // The test processes are forked after this and inherit the environment.
  process.env[TEMPLATE_ENV] = template;
  return async () => {
    delete process.env[TEMPLATE_ENV];
    await rm(template, { recursive: true, force: true });
  };
}

/** /dev/shm if it is a tmpfs we may write with room to spare, else the system's temporary dir. */
async function dataRoot(): Promise<string> {
  const shm = "/dev/shm";
  try {
    const stats = await statfs(shm);
    await access(shm, constants.W_OK);
    if (stats.type === TMPFS_MAGIC && stats.bavail * stats.bsize >= MIN_SHM_FREE_BYTES) return shm;
  } catch {
    // No /dev/shm here (macOS, Windows), or not ours to write.
  }
  return tmpdir();
}

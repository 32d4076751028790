/**
 * The embedded database is one server's alone: real `locallmarket server` processes on one data
 * dir with no DATABASE_URL. A second server refuses to start and names the dir and the holder
 * while the first keeps serving; the embedded PGlite is reachable only through a unix socket in a
 * 0700 directory, never a TCP port; a server killed with SIGKILL leaves a lock the next start takes
 * over. PGlite runs in a worker thread of the server's process, so its socket is the process's own;
 * the first start says that it creates the database.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { access, mkdtemp, readdir, readFile, readlink, rm, stat } from "node:fs/promises";
import { dirname, join } from "node:path";
import { afterAll, afterEach, beforeAll, beforeEach, describe, expect, it } from "vitest";
import { copyPgdata, type InitialisedDataDir, initialisedDataDir } from "../support/database.js";
import { REPO_ROOT } from "../support/market.js";

const CLI = join(REPO_ROOT, "bin/locallmarket.js");
const START_TIMEOUT_MS = 120_000;

interface ServerProcess {
  child: ChildProcess;
  output(): string;
  /** Resolves with the exit code (null when killed by a signal). */
  exited: Promise<number | null>;
}

/** A server's environment with every LocalLMarket setting and DATABASE_URL removed. */
function embeddedEnv(): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { NODE_NO_WARNINGS: "1", LOCALLMARKET_LOG_LEVEL: "warn" };
  for (const [name, value] of Object.entries(process.env)) {
    if (name !== "DATABASE_URL" && !name.startsWith("LOCALLMARKET_")) env[name] = value;
  }
  return env;
}

function startServer(dataDir: string): ServerProcess {
  const child = spawn(
    process.execPath,
    [CLI, "server", "--http-port", "0", "--grpc-port", "0", "--data-dir", dataDir],
    { cwd: REPO_ROOT, stdio: ["ignore", "pipe", "pipe"], env: embeddedEnv() },
  );
  let output = "";
  child.stdout?.on("data", (data: Buffer) => {
    output += data.toString();
  });
  child.stderr?.on("data", (data: Buffer) => {
    output += data.toString();
  });
  const exited = once(child, "exit").then(([code]) => code as number | null);
  return { child, output: () => output, exited };
}

/** Waits until the server prints where it listens; fails if it exits first. */
async function whenUp(server: ServerProcess): Promise<{ httpUrl: string; grpcUrl: string }> {
  const parse = () => {
    const http = /OpenAI API:\s+(http:\/\/\S+)\/v1/.exec(server.output());
    const grpc = /worker gRPC:\s+(http:\/\/\S+)/.exec(server.output());
    return http?.[1] && grpc?.[1] ? { httpUrl: http[1], grpcUrl: grpc[1] } : undefined;
  };
  const printed = new Promise<{ httpUrl: string; grpcUrl: string }>((resolve) => {
    const check = () => {
      const urls = parse();
      if (urls) {
        server.child.stdout?.off("data", check);
        resolve(urls);
      }
    };
    server.child.stdout?.on("data", check);
    check();
  });
  const died = server.exited.then((code) => {
    throw new Error(`the server exited with ${code} before it was up:\n${server.output()}`);
  });
  return Promise.race([printed, died]);
}

/** TCP ports the process listens on, read from /proc (Linux): its socket inodes in LISTEN state. */
async function listeningTcpPorts(pid: number): Promise<number[]> {
  const inodes = new Set<string>();
  for (const fd of await readdir(`/proc/${pid}/fd`)) {
    const target = await readlink(`/proc/${pid}/fd/${fd}`).catch(() => "");
    const match = /^socket:\[(\d+)\]$/.exec(target);
    if (match?.[1]) inodes.add(match[1]);
  }
  const ports: number[] = [];
  for (const table of ["/proc/net/tcp", "/proc/net/tcp6"]) {
    const rows = (await readFile(table, "utf8")).trim().split("\n").slice(1);
    for (const row of rows) {
      const columns = row.trim().split(/\s+/);
      const [localAddress, state, inode] = [columns[1], columns[3], columns[9]];
      // 0A is TCP_LISTEN.
      if (state === "0A" && inode && inodes.has(inode)) {
        ports.push(Number.parseInt(localAddress?.split(":")[1] ?? "", 16));
      }
    }
  }
  return ports.sort((a, b) => a - b);
}

describe.runIf(process.platform === "linux")("the embedded database is one server's alone", () => {
  /** The first test watches a fresh data dir being created; the second starts from a copy. */
  let initialised: InitialisedDataDir;
  let dataDir: string;
  const servers: ServerProcess[] = [];

  beforeAll(async () => {
    initialised = await initialisedDataDir();
  }, START_TIMEOUT_MS);

  afterAll(async () => {
    await initialised?.remove();
  });

  beforeEach(async () => {
    // Beside the template: on tmpfs when it is there.
    dataDir = await mkdtemp(join(dirname(initialised.dataDir), "locallmarket-embedded-"));
  });

  afterEach(async () => {
    for (const server of servers.splice(0)) {
      if (server.child.exitCode === null && server.child.signalCode === null) {
        server.child.kill("SIGKILL");
        await server.exited;
      }
    }
    await rm(dataDir, { recursive: true, force: true });
  });

  const start = (dir: string) => {
    const server = startServer(dir);
    servers.push(server);
    return server;
  };

  it(
    "refuses a second server on the same data dir while the first keeps serving, with no TCP port for the database",
    async () => {
      const first = start(dataDir);
      const { httpUrl, grpcUrl } = await whenUp(first);
      const pid = first.child.pid as number;
      // A fresh data dir takes seconds to create: the first start says what it is doing.
      expect(first.output()).toContain(
        `creating the embedded database in ${join(dataDir, "pgdata")} (first start; a few seconds)…`,
      );

      // Only the two listeners the server announces: the database has no TCP port.
      const announced = [Number(new URL(httpUrl).port), Number(new URL(grpcUrl).port)].sort((a, b) => a - b);
      expect(await listeningTcpPorts(pid)).toEqual(announced);
      // It is reached through a unix socket in a directory only this user may enter.
      const socketDir = join(dataDir, "socket");
      expect((await stat(socketDir)).mode & 0o777).toBe(0o700);
      expect((await stat(join(socketDir, ".s.PGSQL.5432"))).isSocket()).toBe(true);

      const second = start(dataDir);
      const code = await second.exited;
      expect(code).not.toBe(0);
      expect(code).not.toBeNull();
      expect(second.output()).toContain(
        `error: the data dir ${dataDir} is in use by another LocalLMarket server (pid ${pid}, started `,
      );
      // One clear line, not a stack trace.
      expect(second.output()).not.toMatch(/^\s+at /m);

      const health = await fetch(`${httpUrl}/healthz`);
      expect(health.status).toBe(200);
      expect(first.child.exitCode).toBeNull();
    },
    START_TIMEOUT_MS * 2,
  );

  it(
    "takes over the lock of a server killed with SIGKILL, and removes its own lock when it stops",
    async () => {
      // The lock is what this is about: an initialised data dir saves the seconds of creating one.
      await copyPgdata(initialised.dataDir, dataDir);
      const crashed = start(dataDir);
      await whenUp(crashed);
      const crashedPid = crashed.child.pid as number;
      crashed.child.kill("SIGKILL");
      await crashed.exited;
      // The crash left the lock (and the socket file) behind.
      expect(JSON.parse(await readFile(join(dataDir, "lock"), "utf8"))).toMatchObject({ pid: crashedPid });

      const next = start(dataDir);
      const { httpUrl } = await whenUp(next);
      expect(next.output()).toContain(
        `took over the stale lock ${join(dataDir, "lock")} of pid ${crashedPid}`,
      );
      expect((await fetch(`${httpUrl}/healthz`)).status).toBe(200);

      next.child.kill("SIGTERM");
      expect(await next.exited).toBe(0);
      await expect(access(join(dataDir, "lock"))).rejects.toThrow(/ENOENT/);
    },
    START_TIMEOUT_MS * 2,
  );
});

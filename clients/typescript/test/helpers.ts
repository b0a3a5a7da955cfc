/** Shared test plumbing: the repository's scripted OpenAI fixture, server env, clients. */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { RLMClient, type RLMClientOptions } from "../src/index.js";
import type { Logger } from "../src/connection.js";

const here = dirname(fileURLToPath(import.meta.url));
/** clients/typescript (tests run compiled, from build/test/). */
export const PACKAGE_ROOT = resolve(here, "../..");
export const REPO_ROOT = resolve(PACKAGE_ROOT, "../..");
/** The interpreter that has rlm_server installed (`pip install -e .`). */
export const PYTHON = process.env.RLM_TEST_PYTHON ?? "python3";
export const SERVER_ARGS = ["-m", "rlm_server"];

/** Variables the transcript format clears by default, on top of every ELIZA_RLM_*. */
const CLEARED_KEYS = ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "GOOGLE_API_KEY"];

/** `process.env` with `overlay` applied, a key set to undefined removed (as RLMClient does). */
export function applyEnv(overlay: Record<string, string | undefined>): NodeJS.ProcessEnv {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const [key, value] of Object.entries(overlay)) {
    if (value === undefined) delete env[key];
    else env[key] = value;
  }
  return env;
}

/** An env overlay that removes the parent's RLM configuration and keys, then adds `extra`. */
export function serverEnv(
  extra: Record<string, string> = {},
  cleared: readonly string[] = CLEARED_KEYS,
): Record<string, string | undefined> {
  const env: Record<string, string | undefined> = {};
  for (const key of Object.keys(process.env)) {
    if (key.startsWith("ELIZA_RLM_") || cleared.includes(key)) env[key] = undefined;
  }
  return { ...env, ...extra };
}

/** The environment that points the server at the fixture, as the transcripts set it. */
export function openaiEnv(baseUrl: string, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ELIZA_RLM_BACKEND: "openai",
    ELIZA_RLM_BASE_URL: baseUrl,
    ELIZA_RLM_MODEL: "scripted",
    OPENAI_API_KEY: "test-key",
    ELIZA_RLM_RETRY_DELAY: "10",
    ELIZA_RLM_RETRY_MAX_DELAY: "50",
    ...extra,
  };
}

/** Stub mode: the default backend (gemini) with no key. */
export const STUB_ENV = { ELIZA_RLM_BACKEND: "gemini" };

export interface FixtureRule {
  when?: "root" | "sub" | "any";
  contains?: string;
  reply?: string;
  delay_ms?: number;
  status?: number;
  times?: number;
  /** Hold the call until `release()`, so tests observe concurrency instead of timing it. */
  hold?: boolean;
}

export interface FixtureStats {
  requests: number;
  by_kind: { root: number; sub: number };
  in_flight: number;
  max_in_flight: number;
  statuses: Record<string, number>;
}

export interface Fixture {
  baseUrl: string;
  stats(): Promise<FixtureStats>;
  /** The last request bodies the fixture received. */
  requests(): Promise<Array<Record<string, unknown>>>;
  /** Lets every held call go. */
  release(): Promise<void>;
  stop(): Promise<void>;
}

/** A root-model reply whose REPL code sets the answer to the Python expression `expr`. */
export function answerWith(expr: string): string {
  return '```repl\nanswer["content"] = ' + expr + '\nanswer["ready"] = True\n```';
}

/** Starts tests/fixtures/openai_fixture.py with `rules`; resolves once it printed its address. */
export async function startFixture(rules: readonly FixtureRule[]): Promise<Fixture> {
  const dir = mkdtempSync(join(tmpdir(), "rlm-fixture-"));
  const rulesFile = join(dir, "rules.json");
  writeFileSync(rulesFile, JSON.stringify(rules));
  const child = spawn(PYTHON, [join(REPO_ROOT, "tests/fixtures/openai_fixture.py"), "--rules", rulesFile], {
    stdio: ["pipe", "pipe", "inherit"],
  });
  const first = await firstLine(child);
  const { base_url: baseUrl } = JSON.parse(first) as { base_url: string };
  const origin = new URL(baseUrl).origin;
  const get = async <T>(path: string): Promise<T> => (await (await fetch(origin + path)).json()) as T;
  return {
    baseUrl,
    stats: () => get<FixtureStats>("/_fixture/stats"),
    requests: () => get<Array<Record<string, unknown>>>("/_fixture/requests"),
    release: async () => {
      await fetch(origin + "/_fixture/release", { method: "POST", body: "{}" });
    },
    stop: () => stopChild(child),
  };
}

function firstLine(child: ChildProcess): Promise<string> {
  return new Promise((resolveLine, reject) => {
    let buffered = "";
    const onData = (chunk: Buffer): void => {
      buffered += chunk.toString("utf8");
      const newline = buffered.indexOf("\n");
      if (newline === -1) return;
      child.stdout?.off("data", onData);
      resolveLine(buffered.slice(0, newline));
    };
    child.stdout?.on("data", onData);
    child.once("exit", (code) =>
      reject(new Error(`fixture exited with ${code} before printing its address`)),
    );
  });
}

/** Closes stdin (both the fixture and the server stop on EOF) and waits, killing after 5 s. */
export async function stopChild(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((done) => child.once("exit", () => done()));
  child.stdin?.end();
  const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
  await exited;
  clearTimeout(timer);
}

/** A logger that keeps what it is told, for assertions and for debugging a failed test. */
export function memoryLogger(): Logger & { lines: string[] } {
  const lines: string[] = [];
  const keep = (level: string) => (message: string) => {
    lines.push(`${level} ${message}`);
    if (process.env.RLM_TEST_VERBOSE) console.error(`${level} ${message}`);
  };
  return { lines, debug: keep("debug"), info: keep("info"), warn: keep("warn"), error: keep("error") };
}

/** A client for the real server, with the parent's RLM settings cleared and `env` added. */
export function serverClient(
  env: Record<string, string>,
  options: Omit<RLMClientOptions, "env"> & { serverArgs?: string[] } = {},
): RLMClient {
  const { serverArgs = [], ...rest } = options;
  return new RLMClient({
    command: PYTHON,
    args: [...SERVER_ARGS, ...serverArgs],
    env: serverEnv(env),
    logger: memoryLogger(),
    retryBaseDelayMs: 20,
    retryMaxDelayMs: 200,
    ...rest,
  });
}

/** Resolves when `predicate` holds, polling every 50 ms, or rejects after `timeoutMs`. */
export async function eventually<T>(
  probe: () => Promise<T>,
  predicate: (value: T) => boolean,
  timeoutMs = 30_000,
): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await probe();
    if (predicate(value)) return value;
    if (Date.now() > deadline)
      throw new Error(`condition not met within ${timeoutMs} ms: ${JSON.stringify(value)}`);
    await new Promise((done) => setTimeout(done, 50));
  }
}

function isRunning(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

/** Resolves once `pid` is gone (reaped children vanish at once; polled to stay simple). */
export async function gone(pid: number, timeoutMs = 30_000): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (isRunning(pid)) {
    if (Date.now() > deadline) throw new Error(`process ${pid} still running after ${timeoutMs} ms`);
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

/** The `ready` notification a fake server sends, as the real one would. */
export const READY_LINE = JSON.stringify({
  jsonrpc: "2.0",
  method: "ready",
  params: {
    server: "rlm-server",
    version: "0",
    protocol: "1",
    pid: 0,
    available: false,
    stub: true,
    backend: "x",
    model: "x",
    environment: "x",
    sandbox: "off",
    protections: ["private_tmp"],
  },
});

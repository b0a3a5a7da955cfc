/**
 * The elizaOS plugin's TypeScript client (plugins/plugin-rlm/typescript/client.ts in the elizaOS
 * monorepo; not on npm) against our server. Its code is not copied here: this is our own small
 * client that speaks its protocol as its source does: it spawns `$ELIZA_RLM_PYTHON_PATH -m
 * elizaos_plugin_rlm.server` with stdio pipes and `{...process.env}` plus ELIZA_RLM_BACKEND,
 * _ENV, _MAX_ITERATIONS, _MAX_DEPTH and _VERBOSE; reads stdout by lines; takes any line with a
 * `ready` key as the ready message (polling for it every 100 ms, for at most 10 s); numbers
 * requests from 1 (`{id, method, params}`, no `jsonrpc`); sends an infer as `{messages, opts}`
 * with the messages normalised and opts in camelCase; rejects on a string `error`; times out at
 * 60 s; and after `shutdown` answers, kills the child (SIGTERM).
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { mkdtempSync, readFileSync, readdirSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import * as readline from "node:readline";
import { test } from "node:test";
import { PYTHON, answerWith, gone, startFixture } from "./helpers.js";

interface Response {
  id: number;
  result?: unknown;
  error?: string;
}

class PluginProtocolClient {
  private child: ChildProcess | null = null;
  private requestId = 0;
  private readonly pending = new Map<number, (response: Response) => void>();
  private ready = false;
  available = false;

  constructor(
    private readonly pythonPath: string,
    private readonly cwd: string,
  ) {}

  get pid(): number | undefined {
    return this.child?.pid;
  }

  async start(): Promise<void> {
    const child = spawn(this.pythonPath, ["-m", "elizaos_plugin_rlm.server"], {
      stdio: ["pipe", "pipe", "pipe"],
      env: {
        ...process.env,
        ELIZA_RLM_BACKEND: "openai",
        ELIZA_RLM_ENV: "local",
        ELIZA_RLM_MAX_ITERATIONS: "4",
        ELIZA_RLM_MAX_DEPTH: "1",
        ELIZA_RLM_VERBOSE: "false",
      },
      cwd: this.cwd,
    });
    this.child = child;
    readline
      .createInterface({ input: child.stdout!, crlfDelay: Number.POSITIVE_INFINITY })
      .on("line", (line) => this.onLine(line));
    child.stderr?.on("data", () => undefined); // read, as the plugin's client does
    const deadline = Date.now() + 10_000;
    while (!this.ready) {
      if (Date.now() > deadline) throw new Error("RLM server startup timeout");
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
  }

  private onLine(line: string): void {
    const message = JSON.parse(line) as Response | { ready: boolean; available: boolean };
    if ("ready" in message) {
      this.ready = true;
      this.available = message.available;
      return;
    }
    const resolve = this.pending.get(message.id);
    this.pending.delete(message.id);
    resolve?.(message);
  }

  request<T>(method: string, params: Record<string, unknown> = {}): Promise<T> {
    const id = ++this.requestId;
    return new Promise<T>((resolve, reject) => {
      const timeout = setTimeout(() => reject(new Error(`RLM request timeout: ${method}`)), 60_000);
      this.pending.set(id, (response) => {
        clearTimeout(timeout);
        if (response.error) reject(new Error(response.error));
        else resolve(response.result as T);
      });
      this.child?.stdin?.write(`${JSON.stringify({ id, method, params })}\n`);
    });
  }

  infer(
    messages: string,
    opts: Record<string, unknown>,
  ): Promise<{ text: string; metadata: { stub: boolean } }> {
    return this.request("infer", { messages: [{ role: "user", content: messages }], opts });
  }

  async shutdown(): Promise<void> {
    await this.request("shutdown");
    this.child?.kill();
  }
}

/** Every process below `pid`, from /proc. */
function descendants(pid: number): number[] {
  const parents = new Map<number, number>();
  for (const entry of readdirSync("/proc")) {
    if (!/^\d+$/.test(entry)) continue;
    try {
      const stat = readFileSync(`/proc/${entry}/stat`, "utf8");
      parents.set(Number(entry), Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1]));
    } catch {
      // gone meanwhile
    }
  }
  const found: number[] = [];
  for (let frontier = [pid]; frontier.length > 0;) {
    const parent = frontier.pop();
    for (const [child, ppid] of parents) {
      if (ppid === parent && !found.includes(child)) {
        found.push(child);
        frontier.push(child);
      }
    }
  }
  return found;
}

/** A directory with our shim in it (`rlm-server-plugin-shim --target`), put on PYTHONPATH. */
function shimOnPythonPath(): void {
  const target = mkdtempSync(join(tmpdir(), "rlm-shim-"));
  execFileSync(PYTHON, [
    "-c",
    "import sys; from rlm_server.frontends.plugin.shim import main; sys.exit(main(sys.argv[1:]))",
    "--target",
    target,
  ]);
  process.env.PYTHONPATH = [target, process.env.PYTHONPATH].filter(Boolean).join(":");
}

test("the plugin's TypeScript client protocol: ready, a needle through the REPL, status, shutdown", async (t) => {
  const fixture = await startFixture([
    {
      when: "root",
      reply: answerWith('__import__("re").search(r"vault code is (\\w+)", context[0]["content"]).group(1)'),
    },
  ]);
  t.after(() => fixture.stop());
  shimOnPythonPath();
  Object.assign(process.env, {
    ELIZA_RLM_BASE_URL: fixture.baseUrl,
    ELIZA_RLM_ROOT_MODEL: "scripted",
    OPENAI_API_KEY: "test-key",
  });
  const client = new PluginProtocolClient(PYTHON, mkdtempSync(join(tmpdir(), "rlm-cwd-")));
  const started = Date.now();
  await client.start();
  assert.ok(Date.now() - started < 10_000);
  assert.equal(client.available, true);

  const context = `${"filler. ".repeat(20_000)}The vault code is TS7Q. ${"more. ".repeat(100)}`;
  const result = await client.infer(context, { maxIterations: 3, logTrajectories: true, trackCosts: true });
  assert.equal(result.text, "TS7Q");
  assert.equal(result.metadata.stub, false);
  const status = await client.request<Record<string, unknown>>("status");
  assert.deepEqual(
    [status.available, status.backend, status.environment, status.maxIterations, status.maxDepth],
    [true, "openai", "local", 4, 1],
  );
  await assert.rejects(client.request("nope"), /Unknown method: nope/);

  const pid = client.pid;
  assert.ok(pid);
  const family = [pid, ...descendants(pid)];
  assert.ok(family.length >= 2, "server and zygote");
  await client.shutdown();
  for (const member of family) await gone(member, 10_000);
});

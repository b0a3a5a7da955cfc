/**
 * The client's process lifecycle and multiplexing against the real server in stub mode (no model
 * needed): lazy shared start, many concurrent calls, what goes on the wire, close, shutdown,
 * restart, and start-up failures.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { mkdtempSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { Ajv2020 } from "ajv/dist/2020.js";
import { RLMClient, RLMDeadlineError, type RLMError, RLMInternalError } from "../src/index.js";
import {
  PACKAGE_ROOT,
  PYTHON,
  READY_LINE,
  REPO_ROOT,
  STUB_ENV,
  SERVER_ARGS,
  eventually,
  gone,
  memoryLogger,
  openaiEnv,
  serverClient,
  serverEnv,
  startFixture,
} from "./helpers.js";

const STUB_TEXT = "[RLM STUB] RLM backend not available";

function tempFile(name: string): string {
  return join(mkdtempSync(join(tmpdir(), "rlm-client-")), name);
}

/** The built client's entry point, for scripts run in a Node process of their own. */
const INDEX = join(PACKAGE_ROOT, "build/src/index.js");
const STUB_SPEC = { command: PYTHON, args: SERVER_ARGS, env: serverEnv(STUB_ENV) };

/** Runs `body` as an ES module that has RLMClient and writeSync; resolves with its exit code and stdout. */
async function runWithClient(body: string): Promise<{ code: number | null; out: string }> {
  const script = tempFile("host.mjs");
  writeFileSync(
    script,
    `import { RLMClient } from ${JSON.stringify(INDEX)};\nimport { writeSync } from "node:fs";\n${body}`,
  );
  const child = spawn(process.execPath, [script], { stdio: ["ignore", "pipe", "inherit"] });
  let out = "";
  child.stdout.on("data", (chunk: Buffer) => (out += chunk.toString()));
  const code = await new Promise<number | null>((resolve) => child.on("exit", resolve));
  return { code, out };
}

/** A validator for what a client may write, from the schema's ClientMessage. */
function clientMessageValidator(): (value: unknown) => boolean {
  const schema = JSON.parse(readFileSync(join(REPO_ROOT, "protocol/schema.json"), "utf8")) as { $id: string };
  const ajv = new Ajv2020({ allErrors: true, allowUnionTypes: true });
  ajv.addSchema(schema);
  const validate = ajv.getSchema(`${schema.$id}#/$defs/ClientMessage`);
  assert.ok(validate);
  return (value) => validate(value) as boolean;
}

describe("client lifecycle (stub mode)", { concurrency: 4 }, () => {
  test("starts lazily; concurrent first calls share one process", async (t) => {
    const spawns = tempFile("spawns");
    const client = new RLMClient({
      command: "sh",
      args: ["-c", `echo spawned >> '${spawns}'; exec "${PYTHON}" -m rlm_server`],
      env: serverEnv(STUB_ENV),
      logger: memoryLogger(),
    });
    t.after(() => client.close());
    assert.equal(typeof client.serverInfo, "undefined", "constructing spawns nothing");
    const calls = await Promise.all([
      ...Array.from({ length: 10 }, () => client.status()),
      ...Array.from({ length: 10 }, () => client.infer({ context: "ctx" })),
    ]);
    assert.equal(calls.length, 20);
    assert.equal(readFileSync(spawns, "utf8"), "spawned\n");
    assert.equal(client.serverInfo?.stub, true);
  });

  test("without a command it runs $ELIZA_RLM_PYTHON_PATH -m rlm_server", async (t) => {
    const client = new RLMClient({
      env: { ...serverEnv(STUB_ENV), ELIZA_RLM_PYTHON_PATH: PYTHON },
      logger: memoryLogger(),
    });
    t.after(() => client.close());
    assert.equal((await client.status()).server, "rlm-server");
  });

  test("1,000 concurrent calls multiplex over one child, and every line written is a valid ClientMessage", async (t) => {
    const wire = tempFile("wire.jsonl");
    const client = new RLMClient({
      command: "sh",
      args: ["-c", `tee '${wire}' | exec "${PYTHON}" -m rlm_server`],
      env: serverEnv(STUB_ENV),
      logger: memoryLogger(),
    });
    t.after(() => client.close());
    const statuses = Array.from({ length: 1000 }, () => client.status());
    const infers = Array.from({ length: 20 }, (_, i) =>
      client.infer({
        context: [{ role: "user", content: `context ${i}` }],
        query: `question ${i}`,
        options: { maxIterations: 2, maxDepth: 1, temperature: 0.5, maxTokens: 64 },
      }),
    );
    const [statusResults, inferResults] = await Promise.all([Promise.all(statuses), Promise.all(infers)]);
    assert.ok(statusResults.every((status) => status.server === "rlm-server"));
    assert.ok(inferResults.every((result) => result.stub && result.text === STUB_TEXT));
    await client.close();

    const valid = clientMessageValidator();
    const sent = readFileSync(wire, "utf8")
      .trimEnd()
      .split("\n")
      .map((line) => JSON.parse(line) as Record<string, unknown>);
    assert.equal(sent.length, 1021);
    for (const message of sent) assert.ok(valid(message), JSON.stringify(message));
    assert.deepEqual(
      sent.map((message) => message.id).sort((a, b) => Number(a) - Number(b)),
      Array.from({ length: 1021 }, (_, i) => i + 1),
      "ids are 1..N, each used once",
    );
    assert.deepEqual(
      sent.at(-1),
      {
        jsonrpc: "2.0",
        id: 1021,
        method: "shutdown",
        params: { grace_s: 30 },
      },
      "close() asks for the grace it waits for",
    );
    const infer = sent.find((message) => message.method === "infer");
    assert.deepEqual((infer?.params as { options: unknown }).options, {
      max_iterations: 2,
      max_depth: 1,
      temperature: 0.5,
      max_tokens: 64,
    });
  });

  test("stub answers count as stubs, not successes or failures", async (t) => {
    const client = serverClient(STUB_ENV);
    t.after(() => client.close());
    const seen: number[] = [];
    client.onMetrics((metrics) => seen.push(metrics.stubResponses));
    const result = await client.infer({ context: "anything" });
    assert.equal(result.stub, true);
    assert.equal(result.text, STUB_TEXT);
    const metrics = client.getMetrics();
    assert.equal(metrics.totalRequests, 1);
    assert.equal(metrics.stubResponses, 1);
    assert.equal(metrics.successfulRequests, 0);
    assert.equal(metrics.failedRequests, 0);
    assert.deepEqual(seen, [1]);
    const status = await client.status();
    assert.equal(status.available, false);
    assert.equal(typeof status.reason, "string");
    assert.equal(status.metrics.stub_responses, 1);
  });

  test("a lone surrogate is sent as U+FFFD, so the server can parse the request and answer it", async (t) => {
    const client = serverClient(STUB_ENV);
    t.after(() => client.close());
    const result = await client.infer({ context: "broken \ud800 text", query: "\udfff" });
    assert.equal(result.stub, true);
  });

  test("close() ends stdin, the server exits, and the next call starts a new one", async (t) => {
    const client = serverClient(STUB_ENV);
    t.after(() => client.close());
    await client.status();
    const first = client.serverInfo?.pid;
    assert.ok(first);
    await client.close();
    await gone(first);
    assert.equal(typeof client.serverInfo, "undefined");
    await client.status();
    assert.ok(client.serverInfo && client.serverInfo.pid !== first);
  });

  test("shutdown() answers, reaps the child, and the next call restarts", async (t) => {
    const client = serverClient(STUB_ENV);
    t.after(() => client.close());
    await client.status();
    const first = client.serverInfo?.pid;
    assert.ok(first);
    assert.deepEqual(await client.shutdown(0.5), { shutdown: true });
    await gone(first);
    const result = await client.infer({ context: "again" });
    assert.equal(result.stub, true);
    assert.notEqual(client.serverInfo?.pid, first);
  });

  test("a server that ignores EOF and SIGTERM is killed, every wait bounded", async (t) => {
    const stubborn = `import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\nprint(${JSON.stringify(READY_LINE)}, flush=True)\ntime.sleep(60)\n`;
    const logger = memoryLogger();
    const client = new RLMClient({
      command: PYTHON,
      args: ["-c", stubborn],
      logger,
      shutdownGraceS: 0,
      closeTimeoutMs: 200,
    });
    t.after(() => client.close());
    await assert.rejects(client.status({ timeoutMs: 100 }), RLMDeadlineError);
    await client.close();
    assert.ok(logger.lines.some((line) => line.includes("SIGTERM")));
    assert.ok(logger.lines.some((line) => line.includes("SIGKILL")));
  });

  test("a command that cannot be spawned rejects with start_failed, and so does the next call", async () => {
    const client = new RLMClient({ command: join(tmpdir(), "no-such-rlm-server"), logger: memoryLogger() });
    for (let i = 0; i < 2; i += 1) {
      await assert.rejects(client.status(), (error: unknown) => {
        assert.ok(error instanceof RLMInternalError);
        assert.equal(error.code, -32603);
        assert.equal(error.data?.type, "start_failed");
        return true;
      });
    }
  });

  test("a server that exits before ready reports its stderr line", async () => {
    const client = serverClient({ ELIZA_RLM_MAX_ITERATIONS: "abc" });
    await assert.rejects(client.status(), (error: unknown) => {
      assert.ok(error instanceof RLMInternalError);
      assert.equal(error.data?.type, "start_failed");
      assert.match(error.data?.stderr ?? "", /ELIZA_RLM_MAX_ITERATIONS/);
      return true;
    });
  });

  test("ready is awaited with its own timeout", async () => {
    const client = new RLMClient({
      command: PYTHON,
      args: ["-c", "import time; time.sleep(60)"],
      readyTimeoutMs: 300,
      logger: memoryLogger(),
    });
    await assert.rejects(client.status(), (error: unknown) => {
      assert.ok(error instanceof RLMInternalError);
      assert.equal(error.data?.type, "start_failed");
      assert.match(error.message, /ready/);
      return true;
    });
  });

  test("an idle client does not keep Node alive; the server then exits on EOF", async () => {
    const { code, out } = await runWithClient(
      `const client = new RLMClient(${JSON.stringify(STUB_SPEC)});\n` +
        `await client.status();\nconsole.log(client.serverInfo.pid);\n`,
    );
    assert.equal(code, 0);
    await gone(Number(out.trim()));
  });

  test("a host that exits takes its busy server with it, instead of leaving it to drain", async (t) => {
    const fixture = await startFixture([{ when: "root", hold: true, reply: "never" }]);
    t.after(() => fixture.stop());
    // Without the client's exit hook, this server would wait for the held call (60 s) and then
    // drain for its grace (600 s) after the host is gone.
    const spec = {
      command: PYTHON,
      args: SERVER_ARGS,
      env: serverEnv(openaiEnv(fixture.baseUrl, { ELIZA_RLM_SHUTDOWN_GRACE: "600" })),
    };
    const { code, out } = await runWithClient(
      `const client = new RLMClient(${JSON.stringify(spec)});\n` +
        `writeSync(1, (await client.start()).pid + "\\n");\n` +
        `client.infer({ context: "ctx", onProgress: (e) => e.event === "started" && process.exit(3) });\n`,
    );
    assert.equal(code, 3);
    await gone(Number(out.trim()), 20_000);
  });
});

describe("client hooks and lifetime", () => {
  test("start() starts the server and resolves with its ready params; onclose hears close()", async () => {
    const client = serverClient(STUB_ENV);
    let closed = 0;
    client.onclose = () => (closed += 1);
    const info = await client.start();
    assert.equal(info.stub, true);
    assert.ok(["strict", "auto", "off"].includes(info.sandbox), info.sandbox);
    assert.ok(info.protections.includes("private_tmp"), info.protections.join());
    assert.equal(client.serverInfo?.pid, info.pid);
    await client.close();
    await gone(info.pid);
    assert.equal(closed, 1);
  });

  test("onerror hears a server that dies while idle; the next call starts a new one", async (t) => {
    const client = serverClient(STUB_ENV);
    t.after(() => client.close());
    const errors: RLMError[] = [];
    client.onerror = (error) => errors.push(error);
    const { pid } = await client.start();
    process.kill(pid, "SIGKILL");
    await eventually(
      () => Promise.resolve(errors.length),
      (count) => count === 1,
    );
    assert.equal(errors[0]?.data?.type, "server_exited");
    assert.equal(errors[0]?.data?.signal, "SIGKILL");
    assert.notEqual((await client.start()).pid, pid);
  });

  test("await using closes the client at the end of its scope", async () => {
    let pid: number;
    {
      await using client = serverClient(STUB_ENV);
      pid = (await client.start()).pid;
    }
    await gone(pid, 10_000);
  });

  test("one exit listener serves every running child, and is removed once none runs", async () => {
    const before = process.listenerCount("exit");
    const clients = [serverClient(STUB_ENV), serverClient(STUB_ENV)];
    await Promise.all(clients.map((client) => client.start()));
    assert.equal(process.listenerCount("exit"), before + 1);
    await Promise.all(clients.map((client) => client.close()));
    assert.equal(process.listenerCount("exit"), before);
  });
});

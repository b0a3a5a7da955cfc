/**
 * Replays the shared transcripts in protocol/transcripts against the real server and the scripted
 * fixture, reading through the client's own line decoder, and validates every server message
 * against protocol/schema.json.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { Ajv2020 } from "ajv/dist/2020.js";
import { LineDecoder } from "../src/framing.js";
import {
  type FixtureRule,
  PYTHON,
  REPO_ROOT,
  SERVER_ARGS,
  applyEnv,
  serverEnv,
  startFixture,
  stopChild,
} from "./helpers.js";
import { type Bound, matchesAsSet, mismatch, substitute } from "./match.js";

type Step =
  | { send: unknown }
  | { send_raw: string }
  | { expect: unknown }
  | { expect_set: unknown[] }
  | { expect_exit: number };

interface Transcript {
  name: string;
  description: string;
  fixture: FixtureRule[];
  env: Record<string, string>;
  clear_env?: string[];
  args: string[];
  steps: Step[];
}

const READ_TIMEOUT_MS = 30_000;
const TRANSCRIPTS = join(REPO_ROOT, "protocol/transcripts");
const schema: unknown = JSON.parse(readFileSync(join(REPO_ROOT, "protocol/schema.json"), "utf8"));
const validateServerMessage = new Ajv2020({ allErrors: true, allowUnionTypes: true }).compile(
  schema as object,
);

/** The server's stdout as a queue of parsed messages, each checked against the schema. */
class ServerOutput {
  private readonly messages: unknown[] = [];
  private waiter: (() => void) | undefined;
  private ended = false;
  readonly stderr: string[] = [];

  constructor(child: ChildProcess) {
    const lines = new LineDecoder((line) => this.push(JSON.parse(line)));
    child.stdout?.on("data", (chunk: Buffer) => lines.push(chunk));
    child.stdout?.on("end", () => {
      this.ended = true;
      this.waiter?.();
    });
    const errLines = new LineDecoder((line) => this.stderr.push(line));
    child.stderr?.on("data", (chunk: Buffer) => errLines.push(chunk));
  }

  /** The next message, skipping `$/progress` notifications unless `keepProgress`. */
  async next(keepProgress: boolean): Promise<unknown> {
    const deadline = Date.now() + READ_TIMEOUT_MS;
    for (;;) {
      const message = this.messages.shift();
      if (message !== undefined) {
        if (keepProgress || !isProgress(message)) return message;
        continue;
      }
      if (this.ended) throw new Error("server closed stdout while a message was expected");
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`no message within ${READ_TIMEOUT_MS} ms`);
      await new Promise<void>((resolve) => {
        const timer = setTimeout(resolve, left);
        this.waiter = () => {
          clearTimeout(timer);
          resolve();
        };
      });
    }
  }

  private push(message: unknown): void {
    assert.ok(
      validateServerMessage(message),
      `server message does not validate against schema.json: ${JSON.stringify(message).slice(0, 500)}\n` +
        JSON.stringify(validateServerMessage.errors?.slice(0, 5)),
    );
    this.messages.push(message);
    this.waiter?.();
  }
}

function isProgress(message: unknown): boolean {
  return (
    typeof message === "object" &&
    message !== null &&
    (message as { method?: unknown }).method === "$/progress"
  );
}

function hasProgressMethod(pattern: unknown): boolean {
  return isProgress(pattern);
}

function waitForExit(child: ChildProcess, timeoutMs: number): Promise<number | null> {
  if (child.exitCode !== null) return Promise.resolve(child.exitCode);
  return new Promise((resolve, reject) => {
    const timer = setTimeout(
      () => reject(new Error(`server still running ${timeoutMs} ms after EOF`)),
      timeoutMs,
    );
    child.once("exit", (code) => {
      clearTimeout(timer);
      resolve(code);
    });
  });
}

/** Runs one step; `bound` carries the ids `$bind:` patterns matched to later `$ref:`s. */
async function runStep(step: Step, child: ChildProcess, output: ServerOutput, bound: Bound): Promise<void> {
  if ("send" in step) {
    child.stdin?.write(JSON.stringify(substitute(step.send, bound)) + "\n");
  } else if ("send_raw" in step) {
    child.stdin?.write(step.send_raw + "\n");
  } else if ("expect" in step) {
    const message = await output.next(hasProgressMethod(step.expect));
    const found = mismatch(step.expect, message, bound);
    assert.equal(found, undefined, `${found}\nmessage: ${JSON.stringify(message).slice(0, 2000)}`);
  } else if ("expect_set" in step) {
    const messages: unknown[] = [];
    for (const _ of step.expect_set) messages.push(await output.next(false));
    assert.ok(matchesAsSet(step.expect_set, messages, bound), `no pairing of ${JSON.stringify(messages)}`);
  } else {
    child.stdin?.end();
    assert.equal(await waitForExit(child, 20_000), step.expect_exit);
  }
}

async function replay(transcript: Transcript): Promise<void> {
  const fixture = await startFixture(transcript.fixture);
  const env = Object.fromEntries(
    Object.entries(transcript.env).map(([key, value]) => [
      key,
      value.replaceAll("{base_url}", fixture.baseUrl),
    ]),
  );
  const child = spawn(PYTHON, [...SERVER_ARGS, ...transcript.args], {
    env: applyEnv(serverEnv(env, transcript.clear_env)),
    stdio: ["pipe", "pipe", "pipe"],
  });
  const output = new ServerOutput(child);
  const bound: Bound = {};
  try {
    for (const [index, step] of transcript.steps.entries()) {
      try {
        await runStep(step, child, output, bound);
      } catch (error) {
        const stderr = output.stderr.slice(-20).join("\n");
        throw new Error(
          `step ${index} ${JSON.stringify(step).slice(0, 300)}: ${(error as Error).message}\nserver stderr:\n${stderr}`,
        );
      }
    }
  } finally {
    await stopChild(child);
    await fixture.stop();
  }
}

describe("the transcript matcher", () => {
  test("$bind: remembers a string only when the whole message matches; $ref: stands for it", () => {
    const bound: Bound = {};
    assert.notEqual(mismatch({ id: "$bind:ctx", n: 2 }, { id: "ctx-1", n: 1 }, bound), undefined);
    assert.deepEqual(bound, {}); // a failed match binds nothing
    assert.equal(mismatch({ id: "$bind:ctx" }, { id: "ctx-1" }, bound), undefined);
    assert.deepEqual(bound, { ctx: "ctx-1" });
    assert.notEqual(mismatch({ id: "$bind:other" }, { id: 5 }, bound), undefined); // only strings bind
    assert.equal(mismatch(["$ref:ctx"], ["ctx-1"], bound), undefined);
    assert.notEqual(mismatch("$ref:ctx", "ctx-2", bound), undefined);
    assert.notEqual(mismatch("$ref:unbound", "ctx-1", bound), undefined);
    assert.deepEqual(substitute({ params: { context_id: "$ref:ctx", x: ["$ref:ctx", "$ctx"] } }, bound), {
      params: { context_id: "ctx-1", x: ["ctx-1", "$ctx"] },
    });
    assert.throws(() => substitute("$ref:unbound", bound));
  });

  test("an unordered set binds what its pairing matched, and nothing when there is none", () => {
    const bound: Bound = {};
    const patterns = [
      { id: 1, result: "$bind:a" },
      { id: 2, result: "$bind:b" },
    ];
    assert.ok(
      !matchesAsSet(
        patterns,
        [
          { id: 2, result: "y" },
          { id: 3, result: "x" },
        ],
        bound,
      ),
    );
    assert.deepEqual(bound, {});
    assert.ok(
      matchesAsSet(
        patterns,
        [
          { id: 2, result: "y" },
          { id: 1, result: "x" },
        ],
        bound,
      ),
    );
    assert.deepEqual(bound, { a: "x", b: "y" });
  });
});

const files = readdirSync(TRANSCRIPTS)
  .filter((name) => name.endsWith(".json"))
  .sort();

describe("shared transcripts", { concurrency: 3 }, () => {
  test("there are transcripts to replay", () => {
    assert.ok(files.length >= 12, `found only ${files.join(", ")}`);
  });
  for (const file of files) {
    const transcript = JSON.parse(readFileSync(join(TRANSCRIPTS, file), "utf8")) as Transcript;
    test(`${transcript.name}: ${transcript.description}`, () => replay(transcript));
  }
});

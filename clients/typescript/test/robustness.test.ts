/**
 * The client against deliberately broken servers: whatever a server writes, no exception leaves
 * the client (it would crash the host process), and no call waits for an answer that will not
 * come. Each fake server is a small node program that answers its n-th request with the n-th
 * list of scripted lines.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import {
  type RLMClientOptions,
  RLMClient,
  RLMDeadlineError,
  RLMError,
  RLMInternalError,
} from "../src/index.js";
import { READY_LINE, eventually, memoryLogger } from "./helpers.js";

interface FakeServer {
  /** Line lists, one per request in arrival order (the last repeats); `$ID` is the request's id. */
  replies: string[][];
  /** Wait this long before `ready`. */
  readyDelayMs?: number;
  /** Write this many bytes to stderr, with no newline, before anything else. */
  stderrBytes?: number;
  /** `$PAD` in a reply becomes this many `x`. */
  padBytes?: number;
}

/** The fake server's program; its script arrives as argv[1]. `shutdown` is answered as the contract says. */
const FAKE_SERVER = `
const fake = JSON.parse(process.argv[1]);
const send = (line) => process.stdout.write(line + "\\n");
// Written synchronously: an exit must not cut it short.
if (fake.stderrBytes) require("node:fs").writeSync(2, "x".repeat(fake.stderrBytes));
let served = 0;
require("node:readline").createInterface({ input: process.stdin }).on("line", (line) => {
  const request = JSON.parse(line);
  if (request.id === undefined) return;
  if (request.method === "shutdown") {
    send(JSON.stringify({ jsonrpc: "2.0", id: request.id, result: { shutdown: true } }));
    process.exit(0);
  }
  const lines = fake.replies[Math.min(served++, fake.replies.length - 1)];
  for (const reply of lines) {
    send(reply.replaceAll("$ID", String(request.id)).replaceAll("$PAD", "x".repeat(fake.padBytes ?? 0)));
  }
});
setTimeout(() => send(${JSON.stringify(READY_LINE)}), fake.readyDelayMs ?? 0);
`;

/** A client of a fake server, with what it logged and what reached `onerror`. */
function fakeClient(
  t: { after(fn: () => Promise<void>): void },
  fake: FakeServer,
  options: RLMClientOptions = {},
): { client: RLMClient; errors: RLMError[]; logger: ReturnType<typeof memoryLogger> } {
  const logger = memoryLogger();
  const client = new RLMClient({
    command: process.execPath,
    args: ["-e", FAKE_SERVER, JSON.stringify(fake)],
    logger,
    ...options,
  });
  const errors: RLMError[] = [];
  client.onerror = (error) => errors.push(error);
  t.after(() => client.close());
  return { client, errors, logger };
}

/** Asserts that `call` failed with the client's -32603 `protocol_error`. */
async function rejectsAsProtocolError(call: Promise<unknown>, message: RegExp): Promise<void> {
  await assert.rejects(call, (error: unknown) => {
    assert.ok(error instanceof RLMInternalError, String(error));
    assert.equal(error.code, -32603);
    assert.equal(error.data?.type, "protocol_error");
    assert.match(error.message, message);
    return true;
  });
}

const GOOD_STATUS = '{"jsonrpc":"2.0","result":{"server":"rlm-server"},"id":$ID}';

describe("broken servers", { concurrency: 4 }, () => {
  test("odd lines never throw; a malformed answer fails its own call; the rest are reported", async (t) => {
    const { client, errors } = fakeClient(t, {
      replies: [
        [
          "null",
          "42",
          "[]",
          '"text"',
          '{"jsonrpc":"2.0","method":"$/progress"}',
          '{"jsonrpc":"2.0","method":"$/progress","params":null}',
          '{"jsonrpc":"2.0","id":999,"result":{}}',
          '{"jsonrpc":"2.0","id":"abc","result":{}}',
          '{"jsonrpc":"2.0","id":null,"error":{"code":-32700,"message":"bad line"}}',
          '{"jsonrpc":"2.0","id":$ID,"error":null}',
        ],
        ['{"jsonrpc":"2.0","id":$ID}'],
        ['{"jsonrpc":"2.0","result":null,"id":$ID}'],
        ['{"jsonrpc":"2.0","id":$ID,"result":{"cut short'],
        ['{"jsonrpc":"2.0","error":{"code":"-32000"},"id":$ID}'],
        [GOOD_STATUS],
      ],
    });
    await rejectsAsProtocolError(client.status(), /malformed error: null/);
    await rejectsAsProtocolError(client.status(), /without a result object/);
    await rejectsAsProtocolError(client.status(), /without a result object/);
    await rejectsAsProtocolError(client.status(), /not JSON/);
    await rejectsAsProtocolError(client.status(), /malformed error/);
    // The same child (its sixth answer) is still served: nothing above broke the connection.
    assert.deepEqual(await client.status(), { server: "rlm-server" });
    assert.equal(errors.length, 9, errors.map((error) => error.message).join("\n"));
    for (const error of errors) assert.equal(error.data?.type, "protocol_error");
  });

  test("a line over maxLineBytes fails the call it answers, whether its id comes first or last", async (t) => {
    const { client } = fakeClient(
      t,
      {
        padBytes: 4096,
        replies: [
          ['{"jsonrpc":"2.0","result":{"text":"$PAD"},"id":$ID}'],
          ['{"jsonrpc":"2.0","id":$ID,"result":{"text":"$PAD"}}'],
          [GOOD_STATUS],
        ],
      },
      { maxLineBytes: 1024 },
    );
    await rejectsAsProtocolError(client.status(), /longer than 1024 bytes/);
    await rejectsAsProtocolError(client.status(), /longer than 1024 bytes/);
    assert.deepEqual(await client.status(), { server: "rlm-server" });
  });

  test("a line over maxLineBytes that names no call fails every pending call", async (t) => {
    const { client, errors } = fakeClient(
      t,
      {
        padBytes: 4096,
        replies: [['{"jsonrpc":"2.0","method":"$/progress","params":{"text":"$PAD"}}'], [], [GOOD_STATUS]],
      },
      { maxLineBytes: 1024 },
    );
    await client.start();
    const calls = [client.status(), client.status()];
    for (const call of calls) await rejectsAsProtocolError(call, /longer than 1024 bytes/);
    assert.equal(errors.length, 1);
    assert.deepEqual(await client.status(), { server: "rlm-server" });
  });

  test("a call's timeout covers the server's start-up", async (t) => {
    const readyDelayMs = 3_000;
    const { client } = fakeClient(t, { readyDelayMs, replies: [[GOOD_STATUS]] });
    const started = Date.now();
    await assert.rejects(client.status({ timeoutMs: 500 }), (error: unknown) => {
      assert.ok(error instanceof RLMDeadlineError);
      assert.equal(error.data?.type, "deadline_exceeded");
      return true;
    });
    const waited = Date.now() - started;
    assert.ok(waited < readyDelayMs, `rejected after ${waited} ms, not before the server was ready`);
    // The start goes on for later calls.
    assert.deepEqual(await client.status(), { server: "rlm-server" });
  });

  test("stderr without a newline is logged in bounded pieces, not buffered without limit", async (t) => {
    const stderrBytes = 1024 * 1024;
    const { client, logger } = fakeClient(t, { stderrBytes, replies: [[GOOD_STATUS]] });
    await client.start();
    await client.close(); // the server exits: its unfinished last piece is flushed too
    const prefix = "info rlm-server: ";
    const pieces = (): number[] =>
      logger.lines.filter((line) => line.startsWith(prefix)).map((line) => line.length - prefix.length);
    await eventually(
      () => Promise.resolve(pieces().reduce((total, size) => total + size, 0)),
      (total) => total === stderrBytes,
    );
    assert.ok(pieces().length >= 16, `${pieces().length} pieces`);
    for (const size of pieces()) assert.ok(size <= 64 * 1024, `a piece of ${size} bytes`);
  });
});

/**
 * Stored contexts against the real server and the scripted fixture: loadContext from a string,
 * a list, a long string in chunks, a file and a stream (with characters split across reads and
 * chunks), questions by contextId, listContexts, dropContext, typed errors, and the partial
 * context an aborted, timed-out or refused load leaves behind being dropped.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { createHash } from "node:crypto";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import {
  type RLMClient,
  RLMCancelledError,
  RLMInternalError,
  RLMContextStoreFullError,
  RLMDeadlineError,
  RLMInvalidParamsError,
  type StoredContext,
} from "../src/index.js";
import {
  type Fixture,
  STUB_ENV,
  answerWith,
  eventually,
  openaiEnv,
  serverClient,
  startFixture,
} from "./helpers.js";

const SECRET_TEXT =
  "Filler line.\n".repeat(40) + "The secret code is ZEBRA-42.\n" + "Déjà vu filler.\n".repeat(40);

const RULES = [
  { when: "root" as const, contains: "hold-it", hold: true, reply: answerWith("'released'") },
  { when: "root" as const, contains: "echo-it", reply: answerWith("context") },
  { when: "root" as const, contains: "second-content", reply: answerWith('context[1]["content"]') },
  {
    when: "root" as const,
    contains: "secret",
    reply: answerWith('__import__("re").search(r"secret code is ([A-Z]+-[0-9]+)", context).group(1)'),
  },
];

function sha256(data: string | Buffer): string {
  return createHash("sha256").update(data).digest("hex");
}

/** What the server must answer for `text` stored whole. */
function storedAs(text: string | Buffer): Omit<StoredContext, "contextId"> {
  return { bytes: Buffer.byteLength(text), sha256: sha256(text) };
}

function withoutId({ contextId, ...rest }: StoredContext): Omit<StoredContext, "contextId"> {
  assert.match(contextId, /^ctx-[0-9a-f]{32}$/);
  return rest;
}

/** A source that gives `pieces`, then waits forever; `stalled` resolves once it waits. */
function stallingSource(pieces: readonly string[]): {
  source: AsyncIterable<string>;
  stalled: Promise<void>;
} {
  let stalled!: () => void;
  const reached = new Promise<void>((resolve) => (stalled = resolve));
  async function* source(): AsyncGenerator<string> {
    yield* pieces;
    stalled();
    await new Promise(() => undefined);
  }
  return { source: source(), stalled: reached };
}

describe("stored contexts", { timeout: 120_000 }, () => {
  let fixture: Fixture;
  let client: RLMClient;

  before(async () => {
    fixture = await startFixture(RULES);
    client = serverClient(openaiEnv(fixture.baseUrl));
  });

  after(async () => {
    await client.close();
    await fixture.stop();
  });

  /** Asks the model to echo the stored context whole. */
  async function echoed(contextId: string): Promise<string> {
    return (await client.infer({ contextId, query: "echo-it" })).text;
  }

  test("a text loaded once answers two questions by its id, and is listed", async () => {
    const stored = await client.loadContext(SECRET_TEXT);
    assert.deepEqual(withoutId(stored), storedAs(SECRET_TEXT));
    for (const query of ["What is the secret code?", "The secret code, again?"]) {
      assert.equal((await client.infer({ contextId: stored.contextId, query })).text, "ZEBRA-42");
    }
    const list = await client.listContexts();
    const listed = list.contexts.find((entry) => entry.contextId === stored.contextId);
    assert.ok(listed, "the loaded context is not listed");
    assert.deepEqual({ ...listed, lastUsedMs: 0 }, { ...stored, uses: 0, lastUsedMs: 0 });
    assert.ok(listed.lastUsedMs > Date.now() - 60_000 && listed.lastUsedMs <= Date.now() + 1_000);
    assert.ok(list.bytesTotal >= stored.bytes);
    assert.equal(list.bytesLimit, 8 * 1024 ** 3);
  });

  test("a list is stored as it is: the model reads its second message", async () => {
    const messages = [
      { role: "user", content: "first" },
      { role: "assistant", content: "second" },
    ];
    const stored = await client.loadContext(messages);
    assert.deepEqual(withoutId(stored), storedAs(JSON.stringify(messages)));
    assert.equal(
      (await client.infer({ contextId: stored.contextId, query: "second-content" })).text,
      "second",
    );
  });

  test("a string longer than chunkBytes goes in chunks and arrives whole", async () => {
    const text = "Ünïcödé 😀 line — ".repeat(200);
    const stored = await client.loadContext(text, { chunkBytes: 101 });
    assert.deepEqual(withoutId(stored), storedAs(text));
    assert.equal(await echoed(stored.contextId), text);
  });

  test("a file is streamed in chunks, characters split across reads and chunks arrive whole", async () => {
    // fs reads 64 KiB at a time: put a 2-byte and a 4-byte character across those boundaries.
    const read = 64 * 1024;
    const filler = (bytes: number): string => "x".repeat(bytes);
    const text = filler(read - 1) + "é" + filler(read - 3) + "😀" + filler(5_000) + "\n";
    const bytes = Buffer.from(text);
    assert.equal(bytes.subarray(read - 1, read + 1).toString(), "é");
    const path = join(mkdtempSync(join(tmpdir(), "rlm-ctx-")), "context.txt");
    writeFileSync(path, bytes);
    const stored = await client.loadContext({ path }, { chunkBytes: 10_007 });
    assert.deepEqual(withoutId(stored), storedAs(bytes)); // the file's own SHA-256
    assert.equal(await echoed(stored.contextId), text);
  });

  test("a stream of bytes and strings, a character split across two reads, arrives whole", async () => {
    const euro = Buffer.from("costs 5 € or 😀");
    const at = euro.indexOf(Buffer.from("€")) + 1; // inside the euro sign
    async function* source(): AsyncGenerator<string | Uint8Array> {
      yield euro.subarray(0, at);
      yield euro.subarray(at);
      yield " then \ud83d"; // a surrogate pair split between two strings
      yield "\ude00 end";
    }
    const stored = await client.loadContext(source(), { chunkBytes: 8 });
    const text = "costs 5 € or 😀 then 😀 end";
    assert.deepEqual(withoutId(stored), storedAs(text));
    assert.equal(await echoed(stored.contextId), text);
  });

  test("a file that cannot be read rejects with the reading error and stores nothing", async () => {
    const before = (await client.listContexts()).bytesTotal;
    const path = join(tmpdir(), "rlm-no-such-dir", "context.txt");
    await assert.rejects(client.loadContext({ path }), { code: "ENOENT" });
    assert.equal((await client.listContexts()).bytesTotal, before);
  });

  test("a dropped context is unknown: its id is refused with a typed error naming the field", async () => {
    const { contextId } = await client.loadContext("to be dropped");
    assert.equal(await client.dropContext(contextId), true);
    assert.equal(await client.dropContext(contextId), false);
    assert.ok(!(await client.listContexts()).contexts.some((entry) => entry.contextId === contextId));
    await assert.rejects(client.infer({ contextId, query: "echo-it" }), (error: unknown) => {
      assert.ok(error instanceof RLMInvalidParamsError);
      assert.equal(error.code, -32602);
      assert.equal(error.data?.field, "context_id");
      return true;
    });
  });

  test("an aborted chunked load rejects at once and drops the partial context", async () => {
    const before = (await client.listContexts()).bytesTotal;
    const { source, stalled } = stallingSource(["0123456789", "abcdefghij"]);
    const controller = new AbortController();
    const loading = client.loadContext(source, { chunkBytes: 8, signal: controller.signal });
    await stalled;
    await eventually(
      () => client.listContexts(),
      (list) => list.bytesTotal > before, // chunks are stored: an open context
    );
    controller.abort();
    await assert.rejects(loading, RLMCancelledError);
    await eventually(
      () => client.listContexts(),
      (list) => list.bytesTotal === before,
    );
  });

  test("a load past its timeoutMs rejects with RLMDeadlineError and drops the partial context", async () => {
    const before = (await client.listContexts()).bytesTotal;
    const { source } = stallingSource(["0123456789", "abcdefghij"]);
    await assert.rejects(client.loadContext(source, { chunkBytes: 8, timeoutMs: 1_000 }), RLMDeadlineError);
    await eventually(
      () => client.listContexts(),
      (list) => list.bytesTotal === before,
    );
  });
});

describe("a stored context and its server", () => {
  test("a question on a stored context whose server dies is not asked again of a new server", async (t) => {
    const fixture = await startFixture(RULES);
    const client = serverClient(openaiEnv(fixture.baseUrl));
    t.after(async () => {
      await client.close();
      await fixture.stop();
    });
    const { contextId } = await client.loadContext(SECRET_TEXT);
    const asking = client.infer({ contextId, query: "hold-it" });
    await eventually(
      () => fixture.stats(),
      (stats) => stats.in_flight === 1,
    );
    process.kill((await client.start()).pid, "SIGKILL");
    // Sent again, a new server would only say it knows no such context (-32602).
    await assert.rejects(asking, (error: unknown) => {
      assert.ok(error instanceof RLMInternalError, String(error));
      assert.equal(error.data?.type, "server_exited");
      return true;
    });
    assert.equal(client.getMetrics().totalRetries, 0);
  });
});

describe("a full context store", () => {
  test("refuses a load with RLMContextStoreFullError; a refused chunk drops what came before", async (t) => {
    const client = serverClient(STUB_ENV, { serverArgs: ["--context-store-bytes", "1000"] });
    t.after(() => client.close());
    await assert.rejects(client.loadContext("x".repeat(1001)), (error: unknown) => {
      assert.ok(error instanceof RLMContextStoreFullError);
      assert.equal(error.code, -32005);
      assert.equal(error.data?.type, "context_store_full");
      assert.equal(error.data?.limit_bytes, 1000);
      assert.equal(error.retryable, false);
      return true;
    });
    // The first chunk fits, the second would not: the first is dropped again.
    await assert.rejects(client.loadContext("y".repeat(1200), { chunkBytes: 600 }), RLMContextStoreFullError);
    await eventually(
      () => client.listContexts(),
      (list) => list.bytesTotal === 0,
    );
    const { bytes } = await client.loadContext("z".repeat(1000));
    assert.equal(bytes, 1000);
  });

  test("chunkBytes below one character's 4 bytes is a RangeError, before anything is sent", async () => {
    const client = serverClient(STUB_ENV);
    await assert.rejects(client.loadContext("abc", { chunkBytes: 3 }), RangeError);
    assert.equal(client.serverInfo, undefined);
  });
});

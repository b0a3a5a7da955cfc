/**
 * How loadContext cuts a source into context/load requests, without a server: pieces never over
 * their size in UTF-8, never a character split (a surrogate pair, or a UTF-8 sequence split
 * between two reads), and the run that sends them drops what a failed load made.
 */
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { describe, test } from "node:test";
import { type LoadParams, loadRequests, runLoad, textChunks, textPieces } from "../src/contexts.js";
import type { ContextLoadResult } from "../src/generated/protocol.js";

/** ASCII, 2-, 3- and 4-byte characters (the last a surrogate pair), in a mix. */
const MIXED = "a é € 😀 z ".repeat(50) + "😀😀😀";

function bytesOf(text: string): number {
  return Buffer.byteLength(text);
}

function assertWhole(pieces: readonly string[], text: string, maxBytes: number): void {
  assert.equal(pieces.join(""), text);
  for (const piece of pieces) {
    assert.ok(bytesOf(piece) <= maxBytes, `${bytesOf(piece)} > ${maxBytes}: ${JSON.stringify(piece)}`);
    assert.ok(piece.isWellFormed(), `a surrogate pair was cut: ${JSON.stringify(piece)}`);
  }
}

async function collect<T>(source: AsyncIterable<T>): Promise<T[]> {
  const items: T[] = [];
  for await (const item of source) items.push(item);
  return items;
}

async function* streamOf<T>(items: readonly T[]): AsyncGenerator<T> {
  for (const item of items) yield item;
}

describe("textPieces", () => {
  test("cuts ASCII at exactly the size", () => {
    assert.deepEqual([...textPieces("abcdefghij", 4)], ["abcd", "efgh", "ij"]);
    assert.deepEqual([...textPieces("", 4)], []);
  });

  test("keeps every piece within its size in UTF-8 and never cuts a character, at any size", () => {
    for (let maxBytes = 4; maxBytes <= 40; maxBytes += 1) {
      assertWhole([...textPieces(MIXED, maxBytes)], MIXED, maxBytes);
    }
  });

  test("fills pieces: only the last is short by more than one character", () => {
    const pieces = [...textPieces(MIXED, 64)];
    for (const piece of pieces.slice(0, -1)) assert.ok(bytesOf(piece) > 64 - 4, `${bytesOf(piece)}`);
  });
});

describe("textChunks", () => {
  test("joins a UTF-8 character split between two reads, at every byte", async () => {
    const text = "é€😀 after";
    const bytes = Buffer.from(text);
    for (let cut = 1; cut < bytes.length; cut += 1) {
      const reads = [bytes.subarray(0, cut), bytes.subarray(cut)];
      const chunks = await collect(textChunks(streamOf(reads), 5));
      assertWhole(chunks, text, 5);
    }
  });

  test("joins a surrogate pair split between two strings", async () => {
    const chunks = await collect(textChunks(streamOf(["ab\ud83d", "\ude00cd"]), 4));
    assertWhole(chunks, "ab😀cd", 4);
  });

  test("gathers small reads into full chunks, byte by byte too", async () => {
    const bytes = Buffer.from(MIXED);
    const reads = Array.from(bytes, (byte) => Uint8Array.of(byte));
    const chunks = await collect(textChunks(streamOf(reads), 100));
    assertWhole(chunks, MIXED, 100);
    assert.ok(chunks.length <= Math.ceil(bytes.length / 96), `${chunks.length} chunks`);
  });

  test("bytes that are not UTF-8 become U+FFFD; a byte order mark is kept", async () => {
    const reads = [Uint8Array.of(0xef, 0xbb, 0xbf, 0x61, 0xff), Uint8Array.of(0xe2, 0x82)];
    assert.deepEqual(await collect(textChunks(streamOf(reads), 64)), ["\ufeffa\ufffd\ufffd"]);
  });
});

describe("loadRequests", () => {
  test("a short string goes whole as text, a list as messages", async () => {
    assert.deepEqual(await collect(loadRequests("short", 64)), [{ text: "short" }]);
    const list = [{ role: "user", content: "hi" }, "a document", 3];
    assert.deepEqual(await collect(loadRequests(list, 4)), [{ messages: list }]);
  });

  test("a longer string goes in chunks, the last one final", async () => {
    assert.deepEqual(await collect(loadRequests("abcdefghij", 4)), [
      { chunk: "abcd" },
      { chunk: "efgh" },
      { chunk: "ij", final: true },
    ]);
  });

  test("a stream always goes in chunks; an empty one is one empty final chunk", async () => {
    assert.deepEqual(await collect(loadRequests(streamOf(["ab", "c"]), 64)), [{ chunk: "abc", final: true }]);
    assert.deepEqual(await collect(loadRequests(streamOf([]), 64)), [{ chunk: "", final: true }]);
  });

  test("anything else is a TypeError", async () => {
    await assert.rejects(collect(loadRequests(42 as never, 64)), TypeError);
  });
});

describe("runLoad", () => {
  /** A fake server: records each request, answers with context "ctx-1". */
  function fakeLink(signal = new AbortController().signal, failAt = -1) {
    const sent: Array<Record<string, unknown>> = [];
    const dropped: string[] = [];
    let bytes = 0;
    const link = {
      signal,
      load: async (params: LoadParams & { context_id?: string }): Promise<ContextLoadResult> => {
        sent.push(params);
        if (sent.length - 1 === failAt) throw new Error("refused");
        const text = "chunk" in params ? params.chunk : "text" in params ? params.text : "[]";
        bytes += bytesOf(text);
        const done = !("chunk" in params) || params.final === true;
        return { context_id: "ctx-1", bytes, sha256: done ? "f00" : null, sealed: done };
      },
      drop: (contextId: string) => void dropped.push(contextId),
    };
    return { link, sent, dropped };
  }

  test("every chunk after the first names the context the first made", async () => {
    const { link, sent, dropped } = fakeLink();
    const stored = await runLoad(loadRequests("abcdefghij", 4), link);
    assert.deepEqual(stored, { contextId: "ctx-1", bytes: 10, sha256: "f00" });
    assert.deepEqual(sent, [
      { chunk: "abcd" },
      { chunk: "efgh", context_id: "ctx-1" },
      { chunk: "ij", context_id: "ctx-1", final: true },
    ]);
    assert.deepEqual(dropped, []);
  });

  test("a chunk refused midway drops the context; one refused first has nothing to drop", async () => {
    const midway = fakeLink(undefined, 1);
    await assert.rejects(runLoad(loadRequests("abcdefghij", 4), midway.link), /refused/);
    assert.deepEqual(midway.dropped, ["ctx-1"]);
    const first = fakeLink(undefined, 0);
    await assert.rejects(runLoad(loadRequests("abcdefghij", 4), first.link), /refused/);
    assert.deepEqual(first.dropped, []);
  });

  test("given up on while the source is stalled, it drops the partial context at once", async () => {
    const controller = new AbortController();
    const { link, dropped } = fakeLink(controller.signal);
    let stalled!: () => void;
    const reachedStall = new Promise<void>((resolve) => (stalled = resolve));
    async function* stalling(): AsyncGenerator<string> {
      yield "abcdefgh"; // two full chunks: the first is sent once the second is read
      yield "ijkl";
      stalled();
      await new Promise(() => undefined); // never gives more
    }
    const loading = runLoad(loadRequests(stalling(), 4), link);
    await reachedStall;
    controller.abort(new Error("given up"));
    await assert.rejects(loading, /given up/);
    assert.deepEqual(dropped, ["ctx-1"]);
  });
});

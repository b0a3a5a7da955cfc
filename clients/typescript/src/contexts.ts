/**
 * Stored contexts: what `loadContext` takes, cut into the `context/load` requests that carry it,
 * and the run that sends them. A string that fits in one chunk, or a list, goes whole
 * (`{text}`, `{messages}`); a longer string, a stream or a file goes as chunks of text of at most
 * `chunkBytes` bytes of UTF-8 each. A chunk never splits a character: bytes are decoded as
 * UTF-8 as they come (a character split between two reads is joined first), and a surrogate
 * pair is never cut in two. A file is streamed, never read whole.
 */
import { Buffer } from "node:buffer";
import { createReadStream } from "node:fs";
import { protocolError } from "./errors.js";
import type { ContextListResult, ContextLoadResult } from "./generated/protocol.js";

/**
 * What `loadContext` stores: a text; a list (chat messages, documents, any JSON values), sent
 * whole; text or UTF-8 bytes from a stream (a Node `Readable` is one); or a file, by path.
 */
export type ContextSource =
  string | readonly unknown[] | AsyncIterable<string | Uint8Array> | { readonly path: string };

/** The default largest chunk: far below the server's default line limit (1 GiB). */
export const DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024;
/** One character takes at most 4 bytes of UTF-8, so no chunk can be smaller. */
export const MIN_CHUNK_BYTES = 4;

/** A sealed stored context, as `loadContext` answers. */
export interface StoredContext {
  /** Names it in `infer({ contextId })` and `openSession({ contextId })`. */
  contextId: string;
  /** Its size: the text's UTF-8, or the list's compact JSON, as the server stored it. */
  bytes: number;
  /** Hex SHA-256 of those bytes. */
  sha256: string;
}

/** One stored context, as `listContexts` lists it. */
export interface ContextInfo extends StoredContext {
  /** Requests running or waiting on it, and sessions open on it. */
  uses: number;
  /** When it was loaded or a request on it last started or ended, Unix epoch milliseconds. */
  lastUsedMs: number;
}

/** The server's context store. */
export interface ContextList {
  /** The sealed contexts, in the order they were loaded. */
  contexts: ContextInfo[];
  /** Every byte stored: contexts still being loaded and dropped ones still in use included. */
  bytesTotal: number;
  /** The store's size, the server's `--context-store-bytes`. */
  bytesLimit: number;
}

/** The params of one `context/load` request, but for the `context_id` later chunks carry. */
export type LoadParams =
  { text: string } | { messages: readonly unknown[] } | { chunk: string; final?: true };

/** How a load reaches the server. */
export interface LoadLink {
  /** Sends one request and resolves with its answer; it is always answered (never abandoned). */
  load(params: LoadParams & { context_id?: string }): Promise<ContextLoadResult>;
  /** Drops a context the load made and will not hand over (in the background). */
  drop(contextId: string): void;
  /** Aborts, with the error to reject with as its reason, once the caller has given up. */
  signal: AbortSignal;
}

function isHighSurrogate(code: number): boolean {
  return code >= 0xd800 && code <= 0xdbff;
}

/**
 * Where the piece of `text` that starts at `start` ends: as far as `maxBytes` of UTF-8 reach,
 * and never between the two halves of a surrogate pair.
 */
function pieceEnd(text: string, start: number, maxBytes: number): number {
  // Every UTF-16 unit takes at least one byte, so `maxBytes` units is the most that can fit.
  let end = Math.min(text.length, start + maxBytes);
  for (
    let bytes = Buffer.byteLength(text.slice(start, end));
    bytes > maxBytes;
    bytes = Buffer.byteLength(text.slice(start, end))
  ) {
    // At most 3 bytes a unit, so this keeps at least one unit, and always shrinks.
    end = start + Math.floor(((end - start) * maxBytes) / bytes);
  }
  if (end < text.length && isHighSurrogate(text.charCodeAt(end - 1))) {
    end = end - 1 > start ? end - 1 : start + 2; // a pair alone (4 bytes) always fits
  }
  return end;
}

/** `text` in pieces of at most `maxBytes` bytes of UTF-8 (none for ""); a pair is never cut. */
export function* textPieces(text: string, maxBytes: number): Generator<string> {
  for (let start = 0; start < text.length;) {
    const end = pieceEnd(text, start, maxBytes);
    yield text.slice(start, end);
    start = end;
  }
}

/** Yields every piece of `text` but the last, and returns that one: more text may follow it. */
function* allButLast(text: string, maxBytes: number): Generator<string, string> {
  let last = "";
  for (const piece of textPieces(text, maxBytes)) {
    if (last) yield last;
    last = piece;
  }
  return last;
}

/**
 * The text of a stream of strings and UTF-8 bytes, in pieces of at most `maxBytes` bytes: small
 * reads are gathered, and a character split between two reads is joined (bytes go through one
 * streaming decoder; a high surrogate at the end of a string waits for what follows it). Bytes
 * that are not UTF-8 become U+FFFD; a byte order mark is kept, so a file's text has its bytes.
 */
export async function* textChunks(
  source: AsyncIterable<string | Uint8Array> | Iterable<string>,
  maxBytes: number,
): AsyncGenerator<string> {
  const decoder = new TextDecoder("utf-8", { ignoreBOM: true });
  let pending = "";
  let pendingBytes = 0;
  for await (const item of source) {
    // A string after bytes: the bytes' unfinished character, if any, ends there.
    const text = typeof item === "string" ? decoder.decode() + item : decoder.decode(item, { stream: true });
    pending += text;
    pendingBytes += Buffer.byteLength(text);
    if (pendingBytes > maxBytes) {
      pending = yield* allButLast(pending, maxBytes);
      pendingBytes = Buffer.byteLength(pending);
    }
  }
  yield* textPieces(pending + decoder.decode(), maxBytes);
}

function isAsyncIterable(value: unknown): value is AsyncIterable<string | Uint8Array> {
  return typeof value === "object" && value !== null && Symbol.asyncIterator in value;
}

/** What a text source reads as: the string itself, the stream, or the file's stream. */
function textOf(
  source: Exclude<ContextSource, readonly unknown[]>,
): AsyncIterable<string | Uint8Array> | string[] {
  if (typeof source === "string") return [source];
  if (isAsyncIterable(source)) return source;
  if (typeof source === "object" && source !== null && typeof source.path === "string") {
    return createReadStream(source.path);
  }
  throw new TypeError(
    "loadContext takes a string, an array, an async iterable of text or bytes, or { path }",
  );
}

/** The requests that load `source`, in order: one whole text or list, or its chunks. */
export async function* loadRequests(source: ContextSource, chunkBytes: number): AsyncGenerator<LoadParams> {
  if (Array.isArray(source)) {
    yield { messages: source };
  } else if (typeof source === "string" && Buffer.byteLength(source) <= chunkBytes) {
    yield { text: source };
  } else {
    let held: string | undefined; // each chunk waits for the next, to know whether it is the last
    for await (const chunk of textChunks(
      textOf(source as Exclude<ContextSource, readonly unknown[]>),
      chunkBytes,
    )) {
      if (held !== undefined) yield { chunk: held };
      held = chunk;
    }
    yield { chunk: held ?? "", final: true };
  }
}

/** Rejects with the signal's reason once it aborts; never resolves. */
function aborted(signal: AbortSignal): { promise: Promise<never>; dispose(): void } {
  let onAbort!: () => void;
  const promise = new Promise<never>((_, reject) => {
    onAbort = () => reject(signal.reason);
    if (signal.aborted) onAbort();
    else signal.addEventListener("abort", onAbort, { once: true });
  });
  promise.catch(() => undefined); // raced, or never looked at once the load is over
  return { promise, dispose: () => signal.removeEventListener("abort", onAbort) };
}

/**
 * Sends a load's requests one after another, each after the answer to the one before (the
 * server appends chunks in the order it handles them); every chunk after the first names the
 * context the first made. When the load fails or is given up on, even while the source is
 * slow to give its next piece, the context it made is dropped.
 */
export async function runLoad(requests: AsyncIterable<LoadParams>, link: LoadLink): Promise<StoredContext> {
  const givenUp = aborted(link.signal);
  const pieces = requests[Symbol.asyncIterator]();
  let made: string | undefined;
  try {
    let answer: ContextLoadResult | undefined;
    for (;;) {
      const reading = pieces.next();
      reading.catch(() => undefined); // a source that fails after we gave up on it
      const next = await Promise.race([reading, givenUp.promise]);
      if (next.done) break;
      answer = await link.load(made === undefined ? next.value : { ...next.value, context_id: made });
      made = answer.context_id;
    }
    link.signal.throwIfAborted();
    return sealed(answer);
  } catch (error) {
    if (made !== undefined) link.drop(made);
    pieces.return?.().catch(() => undefined); // stop reading (a file is closed)
    throw error;
  } finally {
    givenUp.dispose();
  }
}

function sealed(answer: ContextLoadResult | undefined): StoredContext {
  if (!answer?.sealed || answer.sha256 === null) {
    throw protocolError(`rlm-server did not seal the loaded context: ${JSON.stringify(answer)}`);
  }
  return { contextId: answer.context_id, bytes: answer.bytes, sha256: answer.sha256 };
}

/** `context/list`'s answer, in this API's names. */
export function contextList(result: ContextListResult): ContextList {
  return {
    contexts: result.contexts.map((entry) => ({
      contextId: entry.id,
      bytes: entry.bytes,
      sha256: entry.sha256,
      uses: entry.uses,
      lastUsedMs: entry.last_used_ms,
    })),
    bytesTotal: result.bytes_total,
    bytesLimit: result.bytes_limit,
  };
}

/**
 * Newline framing for the stdio pipes. A long context is the point of the product, so a 200 MB
 * prompt or result is one line like any other; but every line has a ceiling, so that a peer that
 * never writes a newline cannot grow a buffer without limit.
 */
import { constants } from "node:buffer";
import type { Writable } from "node:stream";

const NEWLINE = 0x0a;
/** The longest line one JavaScript string can hold (V8 caps strings near 512 MiB on 64-bit). */
export const MAX_LINE_BYTES = constants.MAX_STRING_LENGTH;
/** How much of each end of an oversized line `onOversized` sees: enough for an `"id"`. */
const END_BYTES = 256;

export interface LineLimit {
  /** Longest line handed over whole, in bytes; at most MAX_LINE_BYTES. */
  maxLineBytes: number;
  /**
   * Called instead of `onLine` for a line longer than the limit, with its first and last bytes
   * (the rest is dropped as it comes). Without it, such a line is handed over in pieces of at
   * most the limit, cut between characters (for logs, where every byte is still worth showing).
   */
  onOversized?: ((head: Buffer, tail: Buffer) => void) | undefined;
}

/** The largest cut at or below `at` that does not split a UTF-8 sequence (`at` if none is). */
function characterBoundary(bytes: Buffer, at: number): number {
  let cut = at;
  while (cut > 0 && ((bytes[cut] as number) & 0xc0) === 0x80) cut -= 1;
  return cut === 0 ? at : cut;
}

/** The last `count` bytes of `parts` taken together. */
function lastBytes(parts: readonly Buffer[], count: number): Buffer {
  const picked: Buffer[] = [];
  for (let i = parts.length - 1, size = 0; i >= 0 && size < count; i -= 1) {
    const part = parts[i] as Buffer;
    picked.unshift(part.subarray(Math.max(0, part.length - (count - size))));
    size += picked[0]?.length ?? 0;
  }
  return Buffer.concat(picked);
}

/**
 * Splits a byte stream into lines. Chunks are kept as they arrive and joined once per line, so
 * a line of N bytes costs one copy rather than one per chunk, and UTF-8 sequences split across
 * chunks decode correctly because decoding happens only on whole lines.
 */
export class LineDecoder {
  private parts: Buffer[] = [];
  private buffered = 0;
  /** While dropping an oversized line: its first bytes, and the last bytes seen so far. */
  private skipped: { head: Buffer; tail: Buffer } | undefined;
  private readonly maxLineBytes: number;

  constructor(
    private readonly onLine: (line: string) => void,
    private readonly limit: LineLimit = { maxLineBytes: MAX_LINE_BYTES },
  ) {
    this.maxLineBytes = Math.max(1, Math.min(limit.maxLineBytes, MAX_LINE_BYTES));
  }

  push(chunk: Buffer): void {
    for (let start = 0; start < chunk.length;) {
      const newline = chunk.indexOf(NEWLINE, start);
      this.take(chunk.subarray(start, newline === -1 ? chunk.length : newline));
      if (newline === -1) return;
      this.endLine();
      start = newline + 1;
    }
  }

  /** Hands over a last line that had no newline (stderr often ends that way). */
  flush(): void {
    this.endLine();
  }

  private take(piece: Buffer): void {
    if (this.skipped) {
      this.skipped.tail = lastBytes([this.skipped.tail, piece], END_BYTES);
      return;
    }
    if (piece.length === 0) return;
    this.parts.push(piece);
    this.buffered += piece.length;
    if (this.buffered > this.maxLineBytes) this.overflow();
  }

  private endLine(): void {
    const skipped = this.skipped;
    this.skipped = undefined;
    if (skipped) this.limit.onOversized?.(skipped.head, skipped.tail);
    else this.emit(this.join());
  }

  private overflow(): void {
    if (this.limit.onOversized) {
      const head = Buffer.concat(this.parts, Math.min(END_BYTES, this.buffered));
      this.skipped = { head, tail: lastBytes(this.parts, END_BYTES) };
      this.parts = [];
      this.buffered = 0;
      return;
    }
    let rest = this.join();
    while (rest.length > this.maxLineBytes) {
      const cut = characterBoundary(rest, this.maxLineBytes);
      this.emit(rest.subarray(0, cut));
      rest = rest.subarray(cut);
    }
    this.take(rest);
  }

  private emit(bytes: Buffer): void {
    if (bytes.length > 0) this.onLine(bytes.toString("utf8"));
  }

  /** Takes what is buffered as one Buffer (no copy for a line that came in one chunk). */
  private join(): Buffer {
    const whole =
      this.parts.length === 1 ? (this.parts[0] as Buffer) : Buffer.concat(this.parts, this.buffered);
    this.parts = [];
    this.buffered = 0;
    return whole;
  }
}

/**
 * The one writer of a pipe. Lines are queued and written while the pipe accepts them; when
 * `write` reports back-pressure the rest waits for `drain`, so a 200 MB prompt is not copied into
 * the stream's buffer behind another, and lines queued in one tick leave in one corked write.
 */
export class LineWriter {
  private queue: string[] = [];
  private waitingForDrain = false;
  private scheduled = false;
  private ending = false;

  constructor(private readonly stream: Writable) {
    stream.on("drain", () => {
      this.waitingForDrain = false;
      this.flush();
    });
  }

  /** Queues one message; `line` must not contain a newline (JSON.stringify never emits one). */
  write(line: string): void {
    if (this.ending || this.stream.destroyed) return;
    this.queue.push(line + "\n");
    this.schedule();
  }

  /** Ends the stream once everything queued has been handed to it. */
  end(): void {
    this.ending = true;
    this.schedule();
  }

  /** Drops whatever is still queued: the reader on the other side is gone. */
  discard(): void {
    this.queue = [];
  }

  private schedule(): void {
    if (this.scheduled || this.waitingForDrain) return;
    this.scheduled = true;
    queueMicrotask(() => this.flush());
  }

  private flush(): void {
    this.scheduled = false;
    if (this.stream.destroyed || this.stream.writableEnded) return;
    const batch = this.queue;
    let sent = 0;
    this.stream.cork();
    while (sent < batch.length && !this.waitingForDrain) {
      this.waitingForDrain = !this.stream.write(batch[sent] as string);
      sent += 1;
    }
    this.stream.uncork();
    this.queue = batch.slice(sent);
    if (this.queue.length === 0 && this.ending && !this.waitingForDrain) this.stream.end();
  }
}

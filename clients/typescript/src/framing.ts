/**
 * Newline framing for the stdio pipes. Lines have no length cap: a long context is the point of
 * the product, so a 200 MB prompt or result is one line like any other.
 */
import type { Writable } from "node:stream";

const NEWLINE = 0x0a;

/**
 * Splits a byte stream into lines. Chunks are kept as they arrive and joined once per line, so
 * a line of N bytes costs one copy rather than one per chunk, and UTF-8 sequences split across
 * chunks decode correctly because decoding happens only on whole lines.
 */
export class LineDecoder {
  private parts: Buffer[] = [];

  /**
   * `onUndecodable` gets the size of a line that no JavaScript string can hold (V8 caps strings
   * near 512 MiB); without it such a line would throw out of a stream's 'data' handler.
   */
  constructor(
    private readonly onLine: (line: string) => void,
    private readonly onUndecodable: (bytes: number) => void = () => undefined,
  ) {}

  push(chunk: Buffer): void {
    let start = 0;
    let newline = chunk.indexOf(NEWLINE);
    while (newline !== -1) {
      const tail = chunk.subarray(start, newline);
      this.emit(this.parts.length === 0 ? tail : this.join(tail));
      start = newline + 1;
      newline = chunk.indexOf(NEWLINE, start);
    }
    if (start < chunk.length) this.parts.push(chunk.subarray(start));
  }

  /** Hands over a last line that had no newline (stderr often ends that way). */
  flush(): void {
    if (this.parts.length > 0) this.emit(this.join(Buffer.alloc(0)));
  }

  private emit(bytes: Buffer): void {
    if (bytes.length === 0) return;
    let line: string;
    try {
      line = bytes.toString("utf8");
    } catch {
      this.onUndecodable(bytes.length);
      return;
    }
    this.onLine(line);
  }

  private join(tail: Buffer): Buffer {
    this.parts.push(tail);
    const whole = Buffer.concat(this.parts);
    this.parts = [];
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

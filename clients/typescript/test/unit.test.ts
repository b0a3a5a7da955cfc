/** Unit tests of the pieces that need no server: framing, options, metrics, errors, backoff, schema. */
import assert from "node:assert/strict";
import { constants } from "node:buffer";
import { execFileSync } from "node:child_process";
import { Writable } from "node:stream";
import { describe, test } from "node:test";
import { backoffDelay } from "../src/client.js";
import {
  RLMBackendError,
  RLMBudgetError,
  RLMCancelledError,
  RLMContextStoreFullError,
  RLMDeadlineError,
  RLMError,
  RLMInternalError,
  RLMInvalidParamsError,
  RLMInvalidRequestError,
  RLMMethodNotFoundError,
  RLMParseError,
  RLMRejectedError,
  RLMUnavailableError,
  rlmError,
} from "../src/errors.js";
import { LineDecoder, LineWriter, MAX_LINE_BYTES } from "../src/framing.js";
import { LATENCY_WINDOW, MetricsRecorder, percentile } from "../src/metrics.js";
import { toWireOptions } from "../src/options.js";
import { ERROR_CODES } from "../src/generated/protocol.js";
import { PACKAGE_ROOT } from "./helpers.js";

describe("LineDecoder", () => {
  test("splits lines across and within chunks and skips empty lines", () => {
    const lines: string[] = [];
    const decoder = new LineDecoder((line) => lines.push(line));
    for (const part of ['{"a":', '1}\n{"b":2}\n\n{"c"', ":3}\n"]) decoder.push(Buffer.from(part));
    assert.deepEqual(lines, ['{"a":1}', '{"b":2}', '{"c":3}']);
  });

  test("decodes a UTF-8 character split between two chunks", () => {
    const lines: string[] = [];
    const decoder = new LineDecoder((line) => lines.push(line));
    const bytes = Buffer.from("héllo ✓\n");
    decoder.push(bytes.subarray(0, 2));
    decoder.push(bytes.subarray(2, 9));
    decoder.push(bytes.subarray(9));
    assert.deepEqual(lines, ["héllo ✓"]);
  });

  test("hands over a last line without newline on flush", () => {
    const lines: string[] = [];
    const decoder = new LineDecoder((line) => lines.push(line));
    decoder.push(Buffer.from("first\nlast words"));
    decoder.flush();
    assert.deepEqual(lines, ["first", "last words"]);
  });

  test("reports a line over the limit once, by its two ends, and drops the rest of it", () => {
    const lines: string[] = [];
    const ends: Array<[string, string]> = [];
    const decoder = new LineDecoder((line) => lines.push(line), {
      maxLineBytes: 16,
      onOversized: (head, tail) => ends.push([head.toString(), tail.toString()]),
    });
    decoder.push(Buffer.from('{"result":"'));
    for (let i = 0; i < 100; i += 1) decoder.push(Buffer.from("x".repeat(100)));
    decoder.push(Buffer.from('","i'));
    decoder.push(Buffer.from('d":7}\nshort\n'));
    assert.equal(ends.length, 1);
    assert.ok(ends[0]?.[0].startsWith('{"result":"xxx'), ends[0]?.[0]);
    assert.ok(ends[0]?.[1].endsWith('xx","id":7}'), ends[0]?.[1]);
    assert.equal(ends[0]?.[1].length, 256);
    assert.deepEqual(lines, ["short"]);
  });

  test("without onOversized, a long line comes in pieces within the limit, characters whole", () => {
    const pieces: string[] = [];
    const decoder = new LineDecoder((line) => pieces.push(line), { maxLineBytes: 10 });
    const text = "aé".repeat(20) + "✓✓✓";
    for (const byte of Buffer.from(text)) decoder.push(Buffer.from([byte]));
    decoder.flush();
    assert.equal(pieces.join(""), text);
    assert.ok(pieces.length >= 7);
    for (const piece of pieces) assert.ok(Buffer.byteLength(piece) <= 10, piece);
  });

  test("the limit cannot exceed what a JavaScript string holds", () => {
    assert.equal(MAX_LINE_BYTES, constants.MAX_STRING_LENGTH);
  });

  test("has no line-length cap: a 64 MiB line in 64 KiB chunks is one line", () => {
    const size = 64 * 1024 * 1024;
    const chunk = Buffer.alloc(64 * 1024, "x");
    const lines: string[] = [];
    const decoder = new LineDecoder((line) => lines.push(line));
    for (let sent = 0; sent < size; sent += chunk.length) decoder.push(chunk);
    decoder.push(Buffer.from("\nnext\n"));
    assert.equal(lines.length, 2);
    assert.equal(lines[0]?.length, size);
    assert.equal(lines[1], "next");
  });
});

/** A slow pipe stand-in with a tiny buffer, recording writes made while it asked to wait. */
function slowSink(): { stream: Writable; received: string[]; writesWhileFull: number } {
  const state = { received: [] as string[], writesWhileFull: 0 };
  const stream = new Writable({
    highWaterMark: 64,
    write(chunk: Buffer, _encoding, done) {
      state.received.push(chunk.toString());
      setImmediate(done);
    },
  });
  const write = stream.write.bind(stream) as (chunk: string) => boolean;
  stream.write = ((chunk: string) => {
    if (stream.writableNeedDrain) state.writesWhileFull += 1;
    return write(chunk);
  }) as typeof stream.write;
  return Object.assign(state, { stream });
}

describe("LineWriter", () => {
  test("waits for drain under back-pressure and keeps the order", async () => {
    const sink = slowSink();
    const writer = new LineWriter(sink.stream);
    const lines = Array.from({ length: 200 }, (_, i) => JSON.stringify({ id: i, pad: "p".repeat(i % 50) }));
    for (const line of lines) writer.write(line);
    writer.end();
    await new Promise((resolve) => sink.stream.on("finish", resolve));
    assert.equal(sink.writesWhileFull, 0);
    assert.equal(sink.received.join(""), lines.map((line) => line + "\n").join(""));
  });

  test("discard drops what is queued", async () => {
    const sink = slowSink();
    const writer = new LineWriter(sink.stream);
    writer.write("a".repeat(100));
    writer.write("dropped");
    await new Promise((resolve) => setImmediate(resolve));
    writer.discard();
    writer.end();
    await new Promise((resolve) => sink.stream.on("finish", resolve));
    assert.deepEqual(sink.received, ["a".repeat(100) + "\n"]);
  });
});

describe("toWireOptions", () => {
  test("converts camelCase to the contract's snake_case", () => {
    assert.deepEqual(
      toWireOptions({
        backend: "openai",
        model: "m",
        subModel: "s",
        baseUrl: "http://x",
        maxIterations: 3,
        maxDepth: 2,
        timeoutS: 1.5,
        temperature: 0,
        maxTokens: 9,
        trajectory: true,
      }),
      {
        backend: "openai",
        model: "m",
        sub_model: "s",
        base_url: "http://x",
        max_iterations: 3,
        max_depth: 2,
        timeout_s: 1.5,
        temperature: 0,
        max_tokens: 9,
        trajectory: true,
      },
    );
  });

  test("passes snake_case and unknown keys through for the server to judge; drops undefined", () => {
    assert.deepEqual(toWireOptions({ max_depth: 1, topP: 0.9, model: undefined }), {
      max_depth: 1,
      topP: 0.9,
    });
  });
});

describe("MetricsRecorder", () => {
  test("puts every settled call in exactly one bucket", () => {
    const metrics = new MetricsRecorder();
    metrics.recordResult(false, 10);
    metrics.recordResult(true, 1);
    metrics.recordError(-32000, "backend down");
    metrics.recordError(-32800, "cancelled");
    metrics.recordError(-32001, "too slow");
    metrics.recordError(undefined, "TypeError");
    metrics.recordRetry();
    const snapshot = metrics.snapshot();
    assert.equal(snapshot.totalRequests, 6);
    assert.equal(snapshot.successfulRequests, 1);
    assert.equal(snapshot.stubResponses, 1);
    assert.equal(snapshot.failedRequests, 2);
    assert.equal(snapshot.cancelledRequests, 1);
    assert.equal(snapshot.timedOutRequests, 1);
    assert.equal(snapshot.totalRetries, 1);
    assert.equal(snapshot.lastError, "TypeError");
    assert.equal(snapshot.averageLatencyMs, 10, "only real results are timed");
    assert.ok(snapshot.lastRequestTimestamp >= (snapshot.lastErrorTimestamp ?? Infinity));
  });

  test("percentiles cover a rolling window of the last LATENCY_WINDOW results", () => {
    const metrics = new MetricsRecorder();
    for (let i = 1; i <= LATENCY_WINDOW + 500; i += 1) metrics.recordResult(false, i);
    const snapshot = metrics.snapshot();
    // The window now holds 501..1500.
    assert.equal(snapshot.averageLatencyMs, 1000.5);
    assert.equal(snapshot.p50LatencyMs, 1000);
    assert.equal(snapshot.p95LatencyMs, 1450);
    assert.equal(snapshot.p99LatencyMs, 1490);
  });

  test("nearest-rank percentile", () => {
    assert.equal(percentile([], 95), 0);
    assert.equal(percentile([7], 50), 7);
    assert.equal(percentile([1, 2, 3, 4], 50), 2);
    assert.equal(percentile([1, 2, 3, 4], 100), 4);
  });
});

describe("errors", () => {
  test("each contract code has its class, and keeps code and data", () => {
    const expected: Array<[number, typeof RLMError]> = [
      [-32700, RLMParseError],
      [-32600, RLMInvalidRequestError],
      [-32601, RLMMethodNotFoundError],
      [-32602, RLMInvalidParamsError],
      [-32603, RLMInternalError],
      [-32000, RLMBackendError],
      [-32001, RLMDeadlineError],
      [-32002, RLMRejectedError],
      [-32003, RLMUnavailableError],
      [-32004, RLMBudgetError],
      [-32005, RLMContextStoreFullError],
      [-32800, RLMCancelledError],
    ];
    for (const [code, Class] of expected) {
      const error = rlmError(code, "m", { type: "internal_error" });
      assert.ok(error instanceof Class, `${code} -> ${error.name}`);
      assert.ok(error instanceof RLMError);
      assert.equal(error.code, code);
      assert.deepEqual(error.data, { type: "internal_error" });
    }
    assert.equal(rlmError(-31999, "m").constructor, RLMError);
  });

  test("retryable only where the server never ran the call to an answer", () => {
    assert.equal(rlmError(-32002, "m", { type: "queue_full" }).retryable, true);
    assert.equal(rlmError(-32603, "m", { type: "server_exited" }).retryable, true);
    assert.equal(rlmError(-32002, "m", { type: "shutting_down" }).retryable, false);
    assert.equal(rlmError(-32000, "m", { type: "backend_error", retryable: true }).retryable, false);
    for (const type of ["start_failed", "protocol_error", "worker_crashed", "internal_error"] as const) {
      assert.equal(rlmError(-32603, "m", { type }).retryable, false, type);
    }
    for (const code of [-32800, -32001, -32602, -32003, -32004, -32005]) {
      assert.equal(rlmError(code, "m", { type: "queue_full", retryable: true }).retryable, false, `${code}`);
    }
  });

  test("usage is read from data.usage, and absent without it", () => {
    const usage = { calls: 1, input_tokens: 10, output_tokens: 2, cost_usd: null, models: {} };
    const error = rlmError(-32004, "m", {
      type: "budget_exceeded",
      limit: "max_calls",
      max: 1,
      scope: "request",
      usage,
    });
    assert.deepEqual(error.usage, usage);
    assert.equal(rlmError(-32000, "m", { type: "backend_error" }).usage, undefined);
    assert.equal(rlmError(-32000, "m").usage, undefined);
  });

  test("every error code of the schema has its own class", () => {
    for (const code of ERROR_CODES) {
      const error = rlmError(code, "m");
      assert.notEqual(error.constructor, RLMError, `${code}`);
      assert.equal(error.code, code);
    }
  });
});

test("backoff grows exponentially with jitter, capped", () => {
  for (let attempt = 0; attempt < 12; attempt += 1) {
    const ceiling = Math.min(5_000, 100 * 2 ** attempt);
    for (let i = 0; i < 50; i += 1) {
      const delay = backoffDelay(attempt, 100, 5_000);
      assert.ok(delay >= ceiling / 2 && delay <= ceiling, `attempt ${attempt}: ${delay}`);
    }
  }
});

test("the committed protocol types match protocol/schema.json", () => {
  execFileSync(process.execPath, ["scripts/gen-types.mjs", "--check"], { cwd: PACKAGE_ROOT, stdio: "pipe" });
});

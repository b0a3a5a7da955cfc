/**
 * One rlm-server child process and the JSON-RPC session over its pipes: one pending map keyed by
 * id, one writer, a timer per request, and everything pending rejected the moment the child is
 * gone. Modelled on the MCP TypeScript SDK's protocol.ts.
 *
 * Nothing the child writes may throw out of here: a stream handler that throws takes the host
 * process down. Every line is checked before use; an unusable answer fails its own call when
 * its id can be read, and is reported (logger, `onError`) when it cannot.
 */
import { type ChildProcess, spawn } from "node:child_process";
import type { Readable, Writable } from "node:stream";
import { killOnExit, release } from "./children.js";
import {
  type RLMError,
  type RLMErrorData,
  RLMInternalError,
  cancelledError,
  deadlineError,
  protocolError,
  rlmError,
} from "./errors.js";
import { LineDecoder, LineWriter } from "./framing.js";
import { ToolRunner, type Tools } from "./tools.js";
import {
  PROTOCOL_VERSION,
  type ProgressNotification,
  type ReadyNotification,
  type ShutdownResult,
} from "./generated/protocol.js";

/** Anything with these four methods (console, pino, the elizaOS logger) will do. */
export interface Logger {
  debug(message: string): void;
  info(message: string): void;
  warn(message: string): void;
  error(message: string): void;
}

export interface SpawnSpec {
  command: string;
  args: readonly string[];
  env: NodeJS.ProcessEnv;
  cwd?: string | undefined;
}

export interface ConnectionOptions {
  logger: Logger;
  readyTimeoutMs: number;
  /** Longest stdout line accepted; a longer answer fails its call (see LineLimit). */
  maxLineBytes: number;
  /** What no call can be told: an unusable line without a readable id, an unexpected exit. */
  onError(error: RLMError): void;
  /** The child is gone and every call has been settled. */
  onClose(): void;
}

/** The `ready` notification's params: who answered, and whether it runs in stub mode. */
export type ReadyInfo = ReadyNotification["params"];
/** A `$/progress` notification's params. */
export type ProgressEvent = ProgressNotification["params"];

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  /** 0 or Infinity: no client-side deadline. */
  timeoutMs?: number | undefined;
  onProgress?: ((event: ProgressEvent) => void) | undefined;
  /** The host tools whose `tool/call`s name this request (an infer's, or its session's). */
  tools?: Tools | undefined;
}

interface Pending {
  resolve(result: unknown): void;
  reject(error: RLMError): void;
  onProgress: ((event: ProgressEvent) => void) | undefined;
  tools: Tools | undefined;
}

type Refable = { ref(): void; unref(): void };
type Json = Record<string, unknown>;

/** How long to wait for the other half of "gone" (exit vs. end of stdout) before giving up on it. */
const GONE_GRACE_MS = 200;
/** setTimeout's largest delay; longer timeouts would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;
/** Each stderr line is logged in pieces of at most this many bytes. */
const STDERR_LINE_BYTES = 64 * 1024;
/** An answer's `"id"` as its first member (after `"jsonrpc"`)... */
const LEADING_ID = /^\s*\{\s*(?:"jsonrpc"\s*:\s*"2\.0"\s*,\s*)?"id"\s*:\s*(\d+)\s*[,}]/;
/** ...or as its last (where the server puts it today): a brace closing a nested object would not match. */
const TRAILING_ID = /[{,]\s*"id"\s*:\s*(\d+)\s*\}\s*$/;

function isObject(value: unknown): value is Json {
  return typeof value === "object" && value !== null && !Array.isArray(value);
}

/** The id of a line that could not be used whole, read from its first or last bytes, if it can be. */
function answerId(head: string, tail: string): number | undefined {
  const match = LEADING_ID.exec(head) ?? TRAILING_ID.exec(tail);
  return match ? Number(match[1]) : undefined;
}

/** A short description of an unusable value, for messages (never the whole of a long line). */
function describe(value: unknown): string {
  const text = JSON.stringify(value) ?? String(value);
  return text.length > 200 ? `${text.slice(0, 200)}...` : text;
}

/**
 * The wire is UTF-8, which cannot carry a lone surrogate; JSON.stringify would escape one as
 * `\ud800`, which the server cannot parse and answers -32700 without an id, leaving the call to
 * its timeout. Such strings are sent as any UTF-8 encoder would send them, with U+FFFD.
 */
function wellFormed(_key: string, value: unknown): unknown {
  return typeof value === "string" && !value.isWellFormed() ? value.toWellFormed() : value;
}

function startFailed(message: string, stderr: string): RLMInternalError {
  return new RLMInternalError(-32603, message, {
    type: "start_failed",
    ...(stderr ? { stderr } : {}),
  });
}

/** A response's outcome: its result, or the error to reject its call with. */
function readAnswer(message: Json): { result: unknown } | { error: RLMError } {
  if ("error" in message) {
    const error = message.error;
    if (!isObject(error) || typeof error.code !== "number" || typeof error.message !== "string") {
      return { error: protocolError(`rlm-server sent a malformed error: ${describe(error)}`) };
    }
    const data = isObject(error.data) ? (error.data as RLMErrorData) : undefined;
    return { error: rlmError(error.code, error.message, data) };
  }
  // Every method of the contract answers with an object.
  if (isObject(message.result)) return { result: message.result };
  return { error: protocolError(`rlm-server sent an answer without a result object: ${describe(message)}`) };
}

export class Connection {
  /** Resolves with the ready params; rejects (-32603 start_failed) if the child never gets there. */
  readonly ready: Promise<ReadyInfo>;
  /** Resolves once the child has exited, or failed to spawn at all. */
  readonly exited: Promise<void>;

  private readonly child: ChildProcess;
  private readonly writer: LineWriter;
  private readonly pending = new Map<number, Pending>();
  private readonly logger: Logger;
  private readonly tools: ToolRunner;
  private nextId = 1;
  private failure: RLMError | undefined;
  /** Set once the client asked the child to stop: its exit is then expected, and final. */
  private stopping: Promise<ShutdownResult> | undefined;
  private exitStatus: { code: number | null; signal: NodeJS.Signals | null } | undefined;
  private stdoutEnded = false;
  private goneTimer: NodeJS.Timeout | undefined;
  private readonly readyTimer: NodeJS.Timeout;
  private lastStderr = "";
  private info: ReadyInfo | undefined;
  /** Whether the child and its pipes currently hold the event loop open (they do from spawn). */
  private referenced = true;
  private settleReady!: { resolve(info: ReadyInfo): void; reject(error: RLMError): void };
  private markExited!: () => void;

  constructor(
    spec: SpawnSpec,
    private readonly options: ConnectionOptions,
  ) {
    const { logger } = options;
    this.logger = logger;
    this.ready = new Promise((resolve, reject) => (this.settleReady = { resolve, reject }));
    // Callers await `ready`; one that gave up (AbortSignal) must not leave it unhandled.
    this.ready.catch(() => undefined);
    this.exited = new Promise((resolve) => (this.markExited = resolve));

    logger.debug(`starting ${spec.command} ${spec.args.join(" ")}`);
    this.child = spawn(spec.command, [...spec.args], {
      env: spec.env,
      stdio: ["pipe", "pipe", "pipe"],
      ...(spec.cwd === undefined ? {} : { cwd: spec.cwd }),
    });
    if (this.child.pid !== undefined) killOnExit(this.child);
    const stdin = this.child.stdin as Writable;
    this.writer = new LineWriter(stdin);
    this.tools = new ToolRunner((message) => this.send(message), logger);
    // EPIPE once the child is gone; the exit handling reports that, so only note it.
    stdin.on("error", (error) => logger.debug(`rlm-server stdin: ${error.message}`));
    this.readStdout(this.child.stdout as Readable);
    this.drainStderr(this.child.stderr as Readable);

    this.child.on("error", (error) => this.onSpawnError(error));
    this.child.on("exit", (code, signal) => {
      release(this.child);
      this.exitStatus = { code, signal };
      this.markExited();
      this.onGone();
    });

    this.readyTimer = setTimeout(
      () =>
        this.fail(
          startFailed(
            `rlm-server sent no ready notification within ${options.readyTimeoutMs} ms`,
            this.lastStderr,
          ),
        ),
      Math.min(options.readyTimeoutMs, MAX_TIMER_MS),
    );
    this.updateRef();
  }

  /** The `ready` params, once they came. */
  get readyInfo(): ReadyInfo | undefined {
    return this.info;
  }

  /** True once the connection can take no more requests (the child is gone or going). */
  get closed(): boolean {
    return this.failure !== undefined || this.stopping !== undefined;
  }

  /** True once the client asked this child to stop; its calls are then not to be retried. */
  get stopRequested(): boolean {
    return this.stopping !== undefined;
  }

  /** Sends a request and resolves with its result, or rejects with a typed RLMError. */
  request<T>(method: string, params: object | undefined, options: RequestOptions = {}): Promise<T> {
    if (this.failure) return Promise.reject(this.failure);
    if (options.signal?.aborted) return Promise.reject(cancelledError());
    const id = this.nextId++;
    // Serialise before registering: a value JSON cannot hold throws here, leaving nothing pending.
    const line = JSON.stringify({ jsonrpc: "2.0", id, method, ...(params ? { params } : {}) }, wellFormed);
    return new Promise<T>((resolve, reject) => {
      const { signal, timeoutMs } = options;
      const onAbort = (): void => this.abandon(id, cancelledError());
      const timer =
        timeoutMs !== undefined && timeoutMs > 0 && Number.isFinite(timeoutMs)
          ? setTimeout(() => this.abandon(id, deadlineError(timeoutMs)), Math.min(timeoutMs, MAX_TIMER_MS))
          : undefined;
      const cleanup = (): void => {
        clearTimeout(timer);
        signal?.removeEventListener("abort", onAbort);
      };
      this.pending.set(id, {
        resolve: (result) => {
          cleanup();
          resolve(result as T);
        },
        reject: (error) => {
          cleanup();
          reject(error);
        },
        onProgress: options.onProgress,
        tools: options.tools,
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      this.writer.write(line);
      this.updateRef();
    });
  }

  /** Sends a notification (no id, no answer). */
  notify(method: string, params: object): void {
    this.send({ jsonrpc: "2.0", method, params });
  }

  /** Writes one message, unless the child is gone; throws only if `message` is not JSON. */
  private send(message: object): void {
    const line = JSON.stringify(message, wellFormed);
    if (!this.failure) this.writer.write(line);
  }

  /**
   * Asks the server to stop: it refuses new work, lets in-flight calls finish within `graceS`,
   * cancels the rest, answers and exits. Sent once; later calls share the first answer. The
   * answer may take the whole grace, so it is waited for `graceS` plus `timeoutMs`.
   */
  shutdown(graceS: number, timeoutMs: number): Promise<ShutdownResult> {
    this.stopping ??= this.request<ShutdownResult>(
      "shutdown",
      { grace_s: graceS },
      {
        timeoutMs: timeoutMs > 0 ? graceS * 1000 + timeoutMs : 0,
      },
    );
    return this.stopping;
  }

  /**
   * Stops the child for good. Asks for a shutdown within `graceS` and waits for its answer (the
   * grace plus `waitMs` at most), then ends stdin and waits `waitMs` for the exit; then SIGTERM,
   * waits `waitMs`; SIGKILL, waits `waitMs`. Stdin is ended only after the answer because the
   * server takes end of input as a stop of its own, with its own grace, which would race ours.
   */
  async close(graceS: number, waitMs: number): Promise<void> {
    // A rejection (the child is already gone) says nothing the exit does not.
    const answered = this.shutdown(graceS, 0).then(
      () => true,
      () => false,
    );
    await this.within(answered, graceS * 1000 + waitMs);
    this.writer.end();
    if (await this.waitForExit(waitMs)) return;
    this.logger.warn(`rlm-server still running ${waitMs} ms after it was asked to stop: SIGTERM`);
    this.child.kill("SIGTERM");
    if (await this.waitForExit(waitMs)) return;
    this.logger.warn(`rlm-server still running ${waitMs} ms after SIGTERM: SIGKILL`);
    this.child.kill("SIGKILL");
    if (!(await this.waitForExit(waitMs))) this.logger.error("rlm-server did not exit after SIGKILL");
  }

  /** Gives up on a request now; the server's late -32800 answer then finds nothing pending. */
  private abandon(id: number, error: RLMError): void {
    if (!this.settle(id, error)) return;
    this.notify("$/cancelRequest", { id });
  }

  /** Settles call `id` with a result or an error; false if nothing waits under that id. */
  private settle(id: number, outcome: { result: unknown } | RLMError): boolean {
    const entry = this.pending.get(id);
    if (!entry) return false;
    this.pending.delete(id);
    if ("result" in outcome) entry.resolve(outcome.result);
    else entry.reject(outcome);
    this.updateRef();
    return true;
  }

  /** Tells whoever listens about something no single call can be failed with. */
  private report(error: RLMError): void {
    this.logger.warn(error.message);
    try {
      this.options.onError(error);
    } catch (thrown) {
      this.logger.warn(`onerror callback threw: ${String(thrown)}`);
    }
  }

  private readStdout(stdout: Readable): void {
    const { maxLineBytes } = this.options;
    const lines = new LineDecoder((line) => this.onLine(line), {
      maxLineBytes,
      onOversized: (head, tail) =>
        this.unusable(
          protocolError(`rlm-server wrote a line longer than ${maxLineBytes} bytes`, maxLineBytes),
          answerId(head.toString("latin1"), tail.toString("latin1")),
        ),
    });
    stdout.on("data", (chunk: Buffer) => lines.push(chunk));
    stdout.on("error", (error) => this.logger.warn(`rlm-server stdout: ${error.message}`));
    stdout.on("end", () => {
      this.stdoutEnded = true;
      this.onGone();
    });
  }

  /**
   * A line that cannot be read whole: its call fails when the line names it. When it names no
   * call, it may have been any call's answer, so every pending call fails (and is cancelled on
   * the server) rather than waiting for an answer that has been thrown away.
   */
  private unusable(error: RLMError, id: number | undefined): void {
    if (id !== undefined) {
      if (!this.settle(id, error)) this.report(error);
      return;
    }
    this.report(error);
    for (const pendingId of [...this.pending.keys()]) this.abandon(pendingId, error);
  }

  private onLine(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      this.unusable(
        protocolError(`rlm-server wrote a line that is not JSON: ${line.slice(0, 200)}`),
        answerId(line.slice(0, 256), line.slice(-256)),
      );
      return;
    }
    if (Array.isArray(message) && message.length > 0) {
      for (const item of message) this.dispatch(item);
    } else {
      this.dispatch(message);
    }
  }

  private dispatch(message: unknown): void {
    if (!isObject(message)) {
      this.report(protocolError(`rlm-server wrote ${describe(message)}, which is not a message`));
    } else if (typeof message.method === "string" && "id" in message) {
      this.onServerRequest(message.id, message.method, message.params);
    } else if (typeof message.method === "string") {
      this.onNotification(message.method, message.params);
    } else {
      this.onResponse(message);
    }
  }

  private onResponse(message: Json): void {
    const id = message.id;
    if (typeof id !== "number" || !this.pending.has(id)) {
      this.onUnmatched(message);
      return;
    }
    const answer = readAnswer(message);
    this.settle(id, "result" in answer ? answer : answer.error);
  }

  /** An answer no call waits for: a late one for a call given up on is normal; others are not. */
  private onUnmatched(message: Json): void {
    const id = message.id;
    if (typeof id === "number" && Number.isInteger(id) && id > 0 && id < this.nextId) {
      this.logger.debug(`rlm-server answered call ${id} after it was given up on`);
      return;
    }
    const answer = readAnswer(message);
    const what = "error" in answer ? `${answer.error.code} ${answer.error.message}` : "a result";
    this.report(
      protocolError(`rlm-server sent ${what} for id ${describe(id)}, which no call is waiting for`),
    );
  }

  private onNotification(method: string, params: unknown): void {
    if (method === "ready") this.onReady(params);
    else if (method === "$/progress") this.onProgress(params);
    else if (method === "$/cancelRequest") this.tools.cancel(isObject(params) ? params.id : undefined);
    else this.logger.debug(`rlm-server sent a notification this client does not know: ${method}`);
  }

  /** The server's own request: a `tool/call` of a pending infer, run by its tools' handler. */
  private onServerRequest(id: unknown, method: string, params: unknown): void {
    if (typeof id !== "string") {
      this.report(protocolError(`rlm-server sent ${method} with id ${describe(id)}, not a string`));
    } else if (method === "tool/call") {
      const requestId = isObject(params) ? params.request_id : undefined;
      const entry = typeof requestId === "number" ? this.pending.get(requestId) : undefined;
      this.tools.call(id, params, entry?.tools);
    } else {
      this.send({ jsonrpc: "2.0", id, error: { code: -32601, message: "Method not found" } });
    }
  }

  private onReady(params: unknown): void {
    if (this.info) {
      this.report(protocolError("rlm-server sent a second ready notification"));
      return;
    }
    clearTimeout(this.readyTimer);
    if (!isObject(params) || params.protocol !== PROTOCOL_VERSION) {
      const protocol = isObject(params) ? describe(params.protocol) : "nothing";
      this.fail(
        startFailed(`rlm-server speaks protocol ${protocol}; this client speaks ${PROTOCOL_VERSION}`, ""),
      );
      return;
    }
    const info = params as ReadyInfo;
    this.info = info;
    this.logger.info(
      `rlm-server ${info.version} ready (pid ${info.pid}, ${info.backend}/${info.model}${info.stub ? ", stub mode" : ""})`,
    );
    this.settleReady.resolve(info);
    this.updateRef();
  }

  private onProgress(params: unknown): void {
    if (!isObject(params)) {
      this.report(protocolError(`rlm-server sent $/progress without params: ${describe(params)}`));
      return;
    }
    const entry = typeof params.id === "number" ? this.pending.get(params.id) : undefined;
    if (!entry?.onProgress) return;
    try {
      entry.onProgress(params as ProgressEvent);
    } catch (error) {
      this.logger.warn(`onProgress callback threw: ${String(error)}`);
    }
  }

  /**
   * Stderr is read as fast as it comes (a full pipe would block the server) and logged by line,
   * a line without end in pieces, so that it cannot grow a buffer without limit.
   */
  private drainStderr(stderr: Readable): void {
    const lines = new LineDecoder(
      (line) => {
        this.lastStderr = line;
        this.logger.info(`rlm-server: ${line}`);
      },
      { maxLineBytes: STDERR_LINE_BYTES },
    );
    stderr.on("data", (chunk: Buffer) => lines.push(chunk));
    stderr.on("error", (error) => this.logger.warn(`rlm-server stderr: ${error.message}`));
    stderr.on("end", () => lines.flush());
  }

  /**
   * Called on exit and on end of stdout. Both are waited for, so answers already in the pipe are
   * read before the rest is rejected; but only briefly, since a worker that inherited stdout or a
   * server that closed it and hangs must not keep callers waiting.
   */
  private onGone(): void {
    if (this.exitStatus && this.stdoutEnded) {
      this.fail(this.goneError());
    } else {
      this.goneTimer ??= setTimeout(() => this.fail(this.goneError()), GONE_GRACE_MS);
    }
  }

  private goneError(): RLMError {
    const status = this.exitStatus;
    const how = !status
      ? "closed its stdout"
      : status.signal
        ? `was killed by ${status.signal}`
        : `exited with code ${status.code}`;
    if (!this.info) return startFailed(`rlm-server ${how} before it was ready`, this.lastStderr);
    return new RLMInternalError(-32603, `rlm-server ${how}`, {
      type: "server_exited",
      exit_code: status?.code ?? null,
      signal: status?.signal ?? null,
      ...(this.lastStderr ? { stderr: this.lastStderr } : {}),
    });
  }

  private onSpawnError(error: Error): void {
    if (this.child.pid !== undefined) {
      this.logger.warn(`rlm-server process error: ${error.message}`);
      return;
    }
    this.fail(startFailed(`cannot start rlm-server: ${error.message}`, ""));
    this.markExited();
  }

  /**
   * Marks the connection dead and rejects everything pending with `error`, once. An end the
   * client did not ask for is also reported, since no call may be there to hear of it.
   */
  private fail(error: RLMError): void {
    if (this.failure) return;
    this.failure = error;
    clearTimeout(this.readyTimer);
    clearTimeout(this.goneTimer);
    this.writer.discard();
    this.tools.abortAll();
    this.settleReady.reject(error);
    const entries = [...this.pending.values()];
    this.pending.clear();
    for (const entry of entries) entry.reject(error);
    if (!this.exitStatus && this.child.pid !== undefined) this.child.kill("SIGKILL");
    this.updateRef();
    if (!this.stopping) this.report(error);
    void this.exited.then(() => this.options.onClose());
  }

  /** Keeps the event loop alive only while a call waits on the child, so an idle client lets Node exit. */
  private updateRef(): void {
    const busy = this.pending.size > 0 || (!this.info && !this.failure);
    if (busy === this.referenced) return;
    this.referenced = busy;
    for (const handle of [this.child, this.child.stdin, this.child.stdout, this.child.stderr]) {
      const refable = handle as unknown as Partial<Refable> | null;
      if (busy) refable?.ref?.();
      else refable?.unref?.();
    }
  }

  private waitForExit(ms: number): Promise<boolean> {
    return this.within(
      this.exited.then(() => true),
      ms,
    );
  }

  /** `promise`'s value, or false if `ms` pass first (or the child exits first). */
  private async within(promise: Promise<boolean>, ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    try {
      return await Promise.race([promise, this.exited.then(() => true), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}

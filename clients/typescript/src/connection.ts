/**
 * One rlm-server child process and the JSON-RPC session over its pipes: one pending map keyed by
 * id, one writer, a timer per request, and everything pending rejected the moment the child is
 * gone. Modelled on the MCP TypeScript SDK's protocol.ts.
 */
import { type ChildProcess, spawn } from "node:child_process";
import type { Readable, Writable } from "node:stream";
import { type RLMError, RLMInternalError, cancelledError, deadlineError, rlmError } from "./errors.js";
import { LineDecoder, LineWriter } from "./framing.js";
import type { ProgressNotification, ReadyNotification, Response } from "./generated/protocol.js";

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

/** The `ready` notification's params: who answered, and whether it runs in stub mode. */
export type ReadyInfo = ReadyNotification["params"];
/** A `$/progress` notification's params. */
export type ProgressEvent = ProgressNotification["params"];

export interface RequestOptions {
  signal?: AbortSignal | undefined;
  /** 0 or Infinity: no client-side deadline. */
  timeoutMs?: number | undefined;
  onProgress?: ((event: ProgressEvent) => void) | undefined;
}

interface Pending {
  resolve(result: unknown): void;
  reject(error: RLMError): void;
  onProgress: ((event: ProgressEvent) => void) | undefined;
}

type Refable = { ref(): void; unref(): void };

/** How long to wait for the other half of "gone" (exit vs. end of stdout) before giving up on it. */
const GONE_GRACE_MS = 200;
/** setTimeout's largest delay; longer timeouts would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

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

export class Connection {
  /** Resolves with the ready params; rejects (-32603 start_failed) if the child never gets there. */
  readonly ready: Promise<ReadyInfo>;
  /** Resolves once the child has exited, or failed to spawn at all. */
  readonly exited: Promise<void>;

  private readonly child: ChildProcess;
  private readonly writer: LineWriter;
  private readonly pending = new Map<number, Pending>();
  private nextId = 1;
  private failure: RLMError | undefined;
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
    private readonly logger: Logger,
    readyTimeoutMs: number,
  ) {
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
    const stdin = this.child.stdin as Writable;
    const stdout = this.child.stdout as Readable;
    this.writer = new LineWriter(stdin);
    // EPIPE once the child is gone; the exit handling reports that, so only note it.
    stdin.on("error", (error) => logger.debug(`rlm-server stdin: ${error.message}`));

    const lines = new LineDecoder(
      (line) => this.onLine(line),
      (bytes) =>
        logger.error(
          `rlm-server wrote a line of ${bytes} bytes, more than a JavaScript string can hold; dropped`,
        ),
    );
    stdout.on("data", (chunk: Buffer) => lines.push(chunk));
    stdout.on("error", (error) => logger.warn(`rlm-server stdout: ${error.message}`));
    stdout.on("end", () => {
      this.stdoutEnded = true;
      this.onGone();
    });
    this.drainStderr(this.child.stderr as Readable);

    this.child.on("error", (error) => this.onSpawnError(error));
    this.child.on("exit", (code, signal) => {
      this.exitStatus = { code, signal };
      this.markExited();
      this.onGone();
    });

    this.readyTimer = setTimeout(
      () =>
        this.fail(
          startFailed(`rlm-server sent no ready notification within ${readyTimeoutMs} ms`, this.lastStderr),
        ),
      Math.min(readyTimeoutMs, MAX_TIMER_MS),
    );
    this.updateRef();
  }

  /** The `ready` params, once they came. */
  get readyInfo(): ReadyInfo | undefined {
    return this.info;
  }

  /** True once the connection can take no more requests (the child is gone or going). */
  get closed(): boolean {
    return this.failure !== undefined;
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
      });
      signal?.addEventListener("abort", onAbort, { once: true });
      this.writer.write(line);
      this.updateRef();
    });
  }

  /** Sends a notification (no id, no answer). */
  notify(method: string, params: object): void {
    if (!this.failure) this.writer.write(JSON.stringify({ jsonrpc: "2.0", method, params }));
  }

  /**
   * Ends stdin (the server then finishes what is in flight and exits 0), waits; SIGTERM, waits;
   * SIGKILL, waits. Every wait is bounded by `waitMs`.
   */
  async close(waitMs: number): Promise<void> {
    this.writer.end();
    if (await this.waitForExit(waitMs)) return;
    this.logger.warn(`rlm-server still running ${waitMs} ms after stdin closed: SIGTERM`);
    this.child.kill("SIGTERM");
    if (await this.waitForExit(waitMs)) return;
    this.logger.warn(`rlm-server still running ${waitMs} ms after SIGTERM: SIGKILL`);
    this.child.kill("SIGKILL");
    if (!(await this.waitForExit(waitMs))) this.logger.error("rlm-server did not exit after SIGKILL");
  }

  /** Gives up on a request now; the server's late -32800 answer then finds nothing pending. */
  private abandon(id: number, error: RLMError): void {
    const entry = this.pending.get(id);
    if (!entry) return;
    this.pending.delete(id);
    this.notify("$/cancelRequest", { id });
    entry.reject(error);
    this.updateRef();
  }

  private onLine(line: string): void {
    let message: unknown;
    try {
      message = JSON.parse(line);
    } catch {
      this.logger.warn(`rlm-server wrote a line that is not JSON (${line.length} chars)`);
      return;
    }
    for (const item of Array.isArray(message) ? message : [message]) {
      this.dispatch(item as Response | ReadyNotification | ProgressNotification);
    }
  }

  private dispatch(message: Response | ReadyNotification | ProgressNotification): void {
    if ("method" in message) {
      if (message.method === "ready") this.onReady(message.params);
      else this.onProgress(message.params);
      return;
    }
    const entry = typeof message.id === "number" ? this.pending.get(message.id) : undefined;
    if (!entry) {
      if (message.id === null && "error" in message) {
        this.logger.warn(`rlm-server error without id: ${message.error.code} ${message.error.message}`);
      }
      return;
    }
    this.pending.delete(message.id as number);
    if ("error" in message) {
      const { code, message: text, data } = message.error;
      entry.reject(rlmError(code, text, data));
    } else {
      entry.resolve(message.result);
    }
    this.updateRef();
  }

  private onReady(info: ReadyInfo): void {
    clearTimeout(this.readyTimer);
    if (info.protocol !== "1") {
      this.fail(startFailed(`rlm-server speaks protocol ${String(info.protocol)}; this client speaks 1`, ""));
      return;
    }
    this.info = info;
    this.logger.info(
      `rlm-server ${info.version} ready (pid ${info.pid}, ${info.backend}/${info.model}${info.stub ? ", stub mode" : ""})`,
    );
    this.settleReady.resolve(info);
    this.updateRef();
  }

  private onProgress(event: ProgressEvent): void {
    const entry = typeof event.id === "number" ? this.pending.get(event.id) : undefined;
    if (!entry?.onProgress) return;
    try {
      entry.onProgress(event);
    } catch (error) {
      this.logger.warn(`onProgress callback threw: ${String(error)}`);
    }
  }

  /** Stderr is read as fast as it comes (a full pipe would block the server) and logged by line. */
  private drainStderr(stderr: Readable): void {
    const lines = new LineDecoder((line) => {
      this.lastStderr = line;
      this.logger.info(`rlm-server: ${line}`);
    });
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

  /** Marks the connection dead and rejects everything pending with `error`, once. */
  private fail(error: RLMError): void {
    if (this.failure) return;
    this.failure = error;
    clearTimeout(this.readyTimer);
    clearTimeout(this.goneTimer);
    this.writer.discard();
    this.settleReady.reject(error);
    const entries = [...this.pending.values()];
    this.pending.clear();
    for (const entry of entries) entry.reject(error);
    if (!this.exitStatus && this.child.pid !== undefined) this.child.kill("SIGKILL");
    this.updateRef();
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

  private async waitForExit(ms: number): Promise<boolean> {
    let timer: NodeJS.Timeout | undefined;
    const timeout = new Promise<boolean>((resolve) => (timer = setTimeout(() => resolve(false), ms)));
    try {
      return await Promise.race([this.exited.then(() => true), timeout]);
    } finally {
      clearTimeout(timer);
    }
  }
}

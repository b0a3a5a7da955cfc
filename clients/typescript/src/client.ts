/**
 * RLMClient: spawns rlm-server on first use, multiplexes any number of concurrent calls over its
 * one pipe, retries what the contract marks retryable, and keeps the seed plugin's metrics.
 */
import { Connection, type Logger, type ProgressEvent, type ReadyInfo, type SpawnSpec } from "./connection.js";
import { RLMError, cancelledError } from "./errors.js";
import type { InferResult, Message, ShutdownResult, StatusResult } from "./generated/protocol.js";
import { type MetricsCallback, MetricsRecorder, type RLMMetrics } from "./metrics.js";
import { type InferOptions, toWireOptions } from "./options.js";

export interface RLMClientOptions {
  /** Server executable. Default: `$ELIZA_RLM_PYTHON_PATH -m rlm_server` when that is set, else `rlm-server`. */
  command?: string;
  /** Server arguments (e.g. `["--max-concurrency", "8"]`); with the default command they follow it. */
  args?: readonly string[];
  /** Merged over `process.env` for the child; a key set to `undefined` is removed. */
  env?: Readonly<Record<string, string | undefined>>;
  cwd?: string;
  /** Client-side deadline per call, retries included; 0 or Infinity for none. Default 600000. */
  requestTimeoutMs?: number;
  /** How long to wait for the `ready` notification after spawning. Default 30000. */
  readyTimeoutMs?: number;
  /** Each of close()'s waits (after closing stdin, after SIGTERM, after SIGKILL). Default 5000. */
  closeTimeoutMs?: number;
  /** Re-sends after a retryable error. Default 3. */
  maxRetries?: number;
  /** First backoff delay, doubled per retry, with jitter. Default 1000. */
  retryBaseDelayMs?: number;
  /** Backoff ceiling. Default 30000. */
  retryMaxDelayMs?: number;
  /** Receives the child's stderr (info) and the client's own notes. Default: warnings to console. */
  logger?: Logger;
}

export type ChatMessage = Message;

export interface InferCallOptions {
  /** The short question shown to the root model; `prompt` is the long context it works over. */
  query?: string;
  /** Per-request overrides, sent as the contract's snake_case names. */
  options?: InferOptions;
  /** Aborting sends `$/cancelRequest` and rejects with RLMCancelledError (-32800). */
  signal?: AbortSignal;
  /** Overrides `requestTimeoutMs` for this call. */
  timeoutMs?: number;
  /** Receives this call's `$/progress` events (and asks the server to send them). */
  onProgress?: (event: ProgressEvent) => void;
}

export interface CallOptions {
  signal?: AbortSignal;
  timeoutMs?: number;
}

const defaultLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: (message) => console.warn(`[rlm] ${message}`),
  error: (message) => console.error(`[rlm] ${message}`),
};

/** Exponential backoff with equal jitter: half the ceiling fixed, half random. */
export function backoffDelay(attempt: number, baseMs: number, maxMs: number): number {
  const ceiling = Math.min(maxMs, baseMs * 2 ** attempt);
  return ceiling / 2 + (Math.random() * ceiling) / 2;
}

function spawnSpec(options: RLMClientOptions): SpawnSpec {
  const env: NodeJS.ProcessEnv = { ...process.env };
  for (const [key, value] of Object.entries(options.env ?? {})) {
    if (value === undefined) delete env[key];
    else env[key] = value;
  }
  const args = options.args ?? [];
  const python = env.ELIZA_RLM_PYTHON_PATH;
  if (options.command !== undefined) return { command: options.command, args, env, cwd: options.cwd };
  if (python) return { command: python, args: ["-m", "rlm_server", ...args], env, cwd: options.cwd };
  return { command: "rlm-server", args, env, cwd: options.cwd };
}

/** Waits for `promise` unless `signal` aborts first (the work itself goes on for others). */
function abortable<T>(promise: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return promise;
  if (signal.aborted) return Promise.reject(cancelledError());
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(cancelledError());
    signal.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const delay = new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)));
  return abortable(delay, signal).finally(() => clearTimeout(timer));
}

export class RLMClient {
  private readonly spec: SpawnSpec;
  private readonly logger: Logger;
  private readonly requestTimeoutMs: number;
  private readonly readyTimeoutMs: number;
  private readonly closeTimeoutMs: number;
  private readonly maxRetries: number;
  private readonly retryBaseDelayMs: number;
  private readonly retryMaxDelayMs: number;
  private readonly metrics = new MetricsRecorder();
  private readonly metricsListeners = new Set<MetricsCallback>();
  private connection: Connection | undefined;

  constructor(options: RLMClientOptions = {}) {
    this.spec = spawnSpec(options);
    this.logger = options.logger ?? defaultLogger;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 600_000;
    this.readyTimeoutMs = options.readyTimeoutMs ?? 30_000;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 5_000;
    this.maxRetries = options.maxRetries ?? 3;
    this.retryBaseDelayMs = options.retryBaseDelayMs ?? 1_000;
    this.retryMaxDelayMs = options.retryMaxDelayMs ?? 30_000;
  }

  /** The running server's `ready` params (pid, version, backend, stub), if it is up. */
  get serverInfo(): ReadyInfo | undefined {
    return this.connection?.closed === false ? this.connection.readyInfo : undefined;
  }

  /**
   * Runs one RLM completion. `prompt` (a string or chat messages) is the long input that the
   * model explores as `context`; `query` is the question about it.
   */
  async infer(prompt: string | readonly ChatMessage[], call: InferCallOptions = {}): Promise<InferResult> {
    const options = {
      ...toWireOptions(call.options ?? {}),
      ...(call.onProgress ? { progress: true } : {}),
    };
    const params = {
      prompt,
      ...(call.query === undefined ? {} : { query: call.query }),
      ...(Object.keys(options).length === 0 ? {} : { options }),
    };
    const started = performance.now();
    try {
      const result = await this.call<InferResult>("infer", params, call);
      this.metrics.recordResult(result.stub, performance.now() - started);
      return result;
    } catch (error) {
      this.metrics.recordError(
        error instanceof RLMError ? error.code : undefined,
        error instanceof Error ? error.message : String(error),
      );
      throw error;
    } finally {
      this.emitMetrics();
    }
  }

  /** The server's configuration, load and server-side metrics. */
  status(call: CallOptions = {}): Promise<StatusResult> {
    return this.call<StatusResult>("status", undefined, call);
  }

  /**
   * Asks the server to stop: it refuses new work, lets in-flight calls finish within `graceS`,
   * cancels the rest, answers and exits; then the child is reaped. A later call starts a new one.
   */
  async shutdown(graceS?: number): Promise<ShutdownResult> {
    const connection = this.connection;
    if (!connection || connection.closed) return { shutdown: true };
    try {
      await connection.ready;
      return await connection.request<ShutdownResult>(
        "shutdown",
        graceS === undefined ? undefined : { grace_s: graceS },
        { timeoutMs: this.requestTimeoutMs },
      );
    } finally {
      await this.closeConnection(connection);
    }
  }

  /** Ends the child: close stdin, wait, SIGTERM, wait, SIGKILL, wait (each wait bounded). */
  async close(): Promise<void> {
    if (this.connection) await this.closeConnection(this.connection);
  }

  getMetrics(): RLMMetrics {
    return this.metrics.snapshot();
  }

  /** Calls `callback` with a snapshot after every settled infer; returns an unsubscribe function. */
  onMetrics(callback: MetricsCallback): () => void {
    this.metricsListeners.add(callback);
    return () => this.metricsListeners.delete(callback);
  }

  /** One call with retries: the deadline covers every attempt and the backoff between them. */
  private async call<T>(
    method: string,
    params: object | undefined,
    call: CallOptions & Pick<InferCallOptions, "onProgress">,
  ): Promise<T> {
    if (call.signal?.aborted) throw cancelledError();
    const timeoutMs = call.timeoutMs ?? this.requestTimeoutMs;
    const bounded = timeoutMs > 0 && Number.isFinite(timeoutMs);
    let deadline: number | undefined;
    for (let attempt = 0; ; attempt += 1) {
      const connection = await this.connect(call.signal);
      deadline ??= Date.now() + timeoutMs;
      try {
        return await connection.request<T>(method, params, {
          signal: call.signal,
          timeoutMs: bounded ? Math.max(1, deadline - Date.now()) : 0,
          onProgress: call.onProgress,
        });
      } catch (error) {
        if (!(error instanceof RLMError) || !error.retryable || attempt >= this.maxRetries) throw error;
        const delay = backoffDelay(attempt, this.retryBaseDelayMs, this.retryMaxDelayMs);
        if (bounded && Date.now() + delay >= deadline) throw error;
        this.metrics.recordRetry();
        this.logger.warn(
          `${method} failed (${error.code} ${error.data?.type ?? ""}); retry ${attempt + 1}/${this.maxRetries} in ${Math.round(delay)} ms`,
        );
        await sleep(delay, call.signal);
      }
    }
  }

  /** Starts the server on first use; concurrent first calls share one start and one `ready`. */
  private async connect(signal: AbortSignal | undefined): Promise<Connection> {
    if (!this.connection || this.connection.closed) {
      this.connection = new Connection(this.spec, this.logger, this.readyTimeoutMs);
    }
    const connection = this.connection;
    await abortable(connection.ready, signal);
    return connection;
  }

  private async closeConnection(connection: Connection): Promise<void> {
    if (this.connection === connection) this.connection = undefined;
    await connection.close(this.closeTimeoutMs);
  }

  private emitMetrics(): void {
    if (this.metricsListeners.size === 0) return;
    const snapshot = this.metrics.snapshot();
    for (const listener of this.metricsListeners) {
      try {
        listener(snapshot);
      } catch (error) {
        this.logger.warn(`onMetrics callback threw: ${String(error)}`);
      }
    }
  }
}

/**
 * RLMClient: spawns rlm-server on first use (or on `start()`), multiplexes any number of
 * concurrent calls over its one pipe, retries only what the server never ran to an answer, and
 * keeps the seed plugin's metrics.
 */
import { Connection, type Logger, type ProgressEvent, type ReadyInfo, type SpawnSpec } from "./connection.js";
import {
  type ContextList,
  type ContextSource,
  DEFAULT_CHUNK_BYTES,
  type LoadLink,
  MIN_CHUNK_BYTES,
  type StoredContext,
  contextList,
  loadRequests,
  runLoad,
} from "./contexts.js";
import { RLMError, cancelledError, deadlineError } from "./errors.js";
import { MAX_LINE_BYTES } from "./framing.js";
import type {
  ContextDropResult,
  ContextListResult,
  ContextLoadResult,
  InferResult,
  Message,
  SessionCloseResult,
  SessionOpenResult,
  ShutdownResult,
  StatusResult,
} from "./generated/protocol.js";
import { type MetricsCallback, MetricsRecorder, type RLMMetrics } from "./metrics.js";
import { type InferOptions, toWireOptions } from "./options.js";
import { Session, type TurnInput, type TurnOptions } from "./session.js";
import { type Tools, toWireTools } from "./tools.js";

/** The server's own default shutdown grace (its ELIZA_RLM_SHUTDOWN_GRACE), in seconds. */
export const DEFAULT_SHUTDOWN_GRACE_S = 30;

export interface RLMClientOptions {
  /** Server executable. Default: `$ELIZA_RLM_PYTHON_PATH -m rlm_server` when that is set, else `rlm-server`. */
  command?: string;
  /** Server arguments (e.g. `["--max-concurrency", "8"]`); with the default command they follow it. */
  args?: readonly string[];
  /** Merged over `process.env` for the child; a key set to `undefined` is removed. */
  env?: Readonly<Record<string, string | undefined>>;
  cwd?: string;
  /** Client-side deadline per call, start-up, retries and backoff included; 0 or Infinity for none. Default 600000. */
  requestTimeoutMs?: number;
  /** How long to wait for the `ready` notification after spawning. Default 30000. */
  readyTimeoutMs?: number;
  /** The grace `close()` and `shutdown()` give in-flight calls, in seconds. Default 30, the server's. */
  shutdownGraceS?: number;
  /** How long close() waits after the grace, after SIGTERM and after SIGKILL. Default 5000. */
  closeTimeoutMs?: number;
  /** Re-sends after queue_full or a server that exited before answering. Default 3. */
  maxRetries?: number;
  /** First backoff delay, doubled per retry, with jitter. Default 1000. */
  retryBaseDelayMs?: number;
  /** Backoff ceiling. Default 30000. */
  retryMaxDelayMs?: number;
  /**
   * Longest line accepted from the server, in bytes; a longer answer fails its call with
   * -32603 `protocol_error`. Default and maximum: what one JavaScript string holds (~512 MiB).
   */
  maxLineBytes?: number;
  /** Receives the child's stderr (info) and the client's own notes. Default: warnings to console. */
  logger?: Logger;
}

export type ChatMessage = Message;

export interface CallOptions {
  /** Aborting sends `$/cancelRequest` and rejects with RLMCancelledError (-32800). */
  signal?: AbortSignal;
  /** Overrides `requestTimeoutMs` for this call; it covers the server's start-up too. */
  timeoutMs?: number;
}

/** What every infer (a session's turns too) takes besides its input and query. */
export interface InferCallOptions extends CallOptions {
  /** Per-request overrides, sent as the contract's snake_case names. */
  options?: InferOptions;
  /** Receives this call's `$/progress` events (and asks the server to send them). */
  onProgress?: (event: ProgressEvent) => void;
}

/** One completion's input: the long context itself, or a stored one named by its id. */
export type InferInput =
  | {
      /** The long input the model explores in its REPL as `context`: text or chat messages. */
      context: string | readonly ChatMessage[];
      contextId?: never;
    }
  | {
      /** A context stored with `loadContext`: it becomes `context` without crossing the pipe again. */
      contextId: string;
      context?: never;
    };

export type InferRequest = InferCallOptions &
  InferInput & {
    /** The short question about the context, shown to the root model. */
    query?: string;
    /**
     * Host tools model code may call: each a Python function of keyword arguments in the REPL,
     * listed with its description in the root model's prompt; its handler runs here.
     */
    tools?: Tools;
  };

/** A JSON Schema (draft 2020-12) for `options.answerSchema`. */
export type AnswerSchema = Readonly<Record<string, unknown>>;

/** Call options that ask for a structured answer: `options.answerSchema` is set. */
export type WithAnswerSchema<R extends InferCallOptions> = R & {
  options: InferOptions & { answerSchema: AnswerSchema };
};

/** An infer that asks for a structured answer. */
export type StructuredRequest = WithAnswerSchema<InferRequest>;

/**
 * The result of an infer with `options.answerSchema`: `value` is the answer, which the server
 * checked against the schema, as the type `T` the caller names (the client does not check it
 * again); `text` is its compact JSON. A stub answer (a server without a backend) has no value.
 */
export type StructuredResult<T> = Omit<InferResult, "value" | "stub"> &
  ({ stub: false; value: T } | { stub: true; value?: undefined });

export interface LoadContextOptions extends CallOptions {
  /**
   * The largest piece of text sent in one line, in bytes of UTF-8 (at least 4): a longer string,
   * and every stream or file, goes in chunks of at most this size. Default 4 MiB; keep it below
   * the server's `--max-message-bytes` (1 GiB by default), with room for JSON's escapes.
   */
  chunkBytes?: number;
}

export interface SessionOptions extends CallOptions {
  /** A stored context: the session's `context` (and `context_0`); the session holds it. */
  contextId?: string;
  /** Host tools every turn's model code may call (see `InferRequest.tools`). */
  tools?: Tools;
}

/**
 * How a call is sent. `connection` pins it to one server process: what a session or a load
 * made lives there alone. `bound` says its params name something that lives in one server
 * process (a `context_id`), which a new server would not know.
 */
interface Route extends CallOptions {
  onProgress?: ((event: ProgressEvent) => void) | undefined;
  /** The handlers of the host tools this call's `tool/call`s name. */
  tools?: Tools | undefined;
  connection?: Connection | undefined;
  bound?: boolean;
}

const defaultLogger: Logger = {
  debug: () => undefined,
  info: () => undefined,
  warn: (message) => console.warn(`[rlm] ${message}`),
  error: (message) => console.error(`[rlm] ${message}`),
};

/** setTimeout's largest delay; longer timeouts would fire at once. */
const MAX_TIMER_MS = 2 ** 31 - 1;

/** When a call must be settled by: epoch ms, and the timeout it came from (for the message). */
interface Deadline {
  at: number;
  timeoutMs: number;
}

function deadlineAfter(timeoutMs: number): Deadline | undefined {
  return timeoutMs > 0 && Number.isFinite(timeoutMs) ? { at: Date.now() + timeoutMs, timeoutMs } : undefined;
}

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

/**
 * Waits for `promise` unless `signal` aborts (RLMCancelledError) or `deadline` passes
 * (RLMDeadlineError) first. The work itself goes on, for whoever else waits on it.
 */
function waitFor<T>(promise: Promise<T>, signal: AbortSignal | undefined, deadline?: Deadline): Promise<T> {
  if (!signal && !deadline) return promise;
  if (signal?.aborted) return Promise.reject(cancelledError());
  return new Promise<T>((resolve, reject) => {
    const onAbort = (): void => reject(cancelledError());
    const timer =
      deadline &&
      setTimeout(
        () => reject(deadlineError(deadline.timeoutMs)),
        Math.min(deadline.at - Date.now(), MAX_TIMER_MS),
      );
    signal?.addEventListener("abort", onAbort, { once: true });
    promise.then(resolve, reject).finally(() => {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    });
  });
}

/**
 * A signal that aborts when `signal` does or `deadline` passes, with what `waitFor` rejects with
 * as its reason; `dispose` lets go of both.
 */
function givingUp(
  signal: AbortSignal | undefined,
  deadline: Deadline | undefined,
): { signal: AbortSignal; dispose(): void } {
  const controller = new AbortController();
  const onAbort = (): void => controller.abort(cancelledError());
  signal?.addEventListener("abort", onAbort, { once: true });
  if (signal?.aborted) onAbort();
  const timer =
    deadline &&
    setTimeout(
      () => controller.abort(deadlineError(deadline.timeoutMs)),
      Math.min(deadline.at - Date.now(), MAX_TIMER_MS),
    );
  const dispose = (): void => {
    clearTimeout(timer);
    signal?.removeEventListener("abort", onAbort);
  };
  return { signal: controller.signal, dispose };
}

/**
 * `waitFor` for a request that makes something on the server (`made`, sent without the caller's
 * signal or deadline, so it is always answered): when the caller gives up first, what it makes
 * is undone once it is answered.
 */
function keepOrUndo<T>(
  made: Promise<T>,
  call: CallOptions,
  deadline: Deadline | undefined,
  undo: (value: T) => void,
): Promise<T> {
  const waited = waitFor(made, call.signal, deadline);
  waited.catch(() => made.then(undo, () => undefined));
  return waited;
}

function sleep(ms: number, signal: AbortSignal | undefined): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const delay = new Promise<void>((resolve) => (timer = setTimeout(resolve, ms)));
  return waitFor(delay, signal).finally(() => clearTimeout(timer));
}

export class RLMClient implements AsyncDisposable {
  /** Called whenever a server process has ended (closed, shut down or died) and its calls are settled. */
  onclose: (() => void) | undefined;
  /**
   * Called with what no call can be rejected with: a server that died or failed to start when
   * not asked to stop, or a line from it that names no waiting call. Calls still get their own.
   */
  onerror: ((error: RLMError) => void) | undefined;

  private readonly spec: SpawnSpec;
  private readonly logger: Logger;
  private readonly requestTimeoutMs: number;
  private readonly readyTimeoutMs: number;
  private readonly shutdownGraceS: number;
  private readonly closeTimeoutMs: number;
  private readonly maxRetries: number;
  private readonly retryBaseDelayMs: number;
  private readonly retryMaxDelayMs: number;
  private readonly maxLineBytes: number;
  private readonly metrics = new MetricsRecorder();
  private readonly metricsListeners = new Set<MetricsCallback>();
  private connection: Connection | undefined;

  constructor(options: RLMClientOptions = {}) {
    this.spec = spawnSpec(options);
    this.logger = options.logger ?? defaultLogger;
    this.requestTimeoutMs = options.requestTimeoutMs ?? 600_000;
    this.readyTimeoutMs = options.readyTimeoutMs ?? 30_000;
    this.shutdownGraceS = options.shutdownGraceS ?? DEFAULT_SHUTDOWN_GRACE_S;
    this.closeTimeoutMs = options.closeTimeoutMs ?? 5_000;
    this.maxRetries = options.maxRetries ?? 3;
    this.retryBaseDelayMs = options.retryBaseDelayMs ?? 1_000;
    this.retryMaxDelayMs = options.retryMaxDelayMs ?? 30_000;
    this.maxLineBytes = options.maxLineBytes ?? MAX_LINE_BYTES;
  }

  /** The running server's `ready` params (pid, version, backend, stub), if it is up. */
  get serverInfo(): ReadyInfo | undefined {
    return this.connection?.closed === false ? this.connection.readyInfo : undefined;
  }

  /**
   * Starts the server now instead of on the first call, and resolves with its `ready` params.
   * Calls made meanwhile share this start. Without a `timeoutMs`, `readyTimeoutMs` bounds it.
   */
  start(call: CallOptions = {}): Promise<ReadyInfo> {
    return waitFor(this.current().ready, call.signal, deadlineAfter(call.timeoutMs ?? 0));
  }

  /**
   * Runs one RLM completion over `context` (the long input, explored in the model's REPL), or
   * over the stored context `contextId`, answering `query` (the short question). Named fields,
   * so the two cannot be swapped.
   */
  infer<T = unknown>(request: StructuredRequest): Promise<StructuredResult<T>>;
  infer(request: InferRequest): Promise<InferResult>;
  /**
   * With `options.answerSchema` (a JSON Schema) the answer is a JSON value valid against it,
   * returned as `value`, typed `T`: `client.infer<Person>({ context, query, options: {
   * answerSchema } })`. An answer that never matches rejects with RLMInvalidAnswerError (-32006).
   */
  async infer<T>(request: InferRequest): Promise<InferResult | StructuredResult<T>> {
    if (typeof request !== "object" || request === null) {
      throw new TypeError(
        "infer takes one object: infer({ context, query }) (or { contextId, query }); " +
          `it was given ${request === null ? "null" : typeof request}`,
      );
    }
    const { context, contextId, query, tools } = request;
    const input = {
      ...(context === undefined ? {} : { prompt: context }),
      ...(contextId === undefined ? {} : { context_id: contextId }),
      ...(tools === undefined ? {} : { tools: toWireTools(tools) }),
    };
    return this.runInfer(input, query, request, { bound: contextId !== undefined, tools });
  }

  /**
   * Stores a context on the server once, for any number of `infer({ contextId })` and sessions:
   * a string, a list (messages, documents), a stream of text or UTF-8 bytes, or a file
   * (`{ path }`, streamed). Text longer than `chunkBytes`, and every stream, goes in chunks, one
   * after another. `signal` and `timeoutMs` cover the whole load; a load that fails or is given
   * up on drops what it had stored. The context lives in the running server process: it is
   * gone when that process ends.
   */
  loadContext(source: ContextSource, options: LoadContextOptions = {}): Promise<StoredContext> {
    const chunkBytes = options.chunkBytes ?? DEFAULT_CHUNK_BYTES;
    if (!Number.isInteger(chunkBytes) || chunkBytes < MIN_CHUNK_BYTES) {
      return Promise.reject(new RangeError(`chunkBytes must be an integer of at least ${MIN_CHUNK_BYTES}`));
    }
    if (options.signal?.aborted) return Promise.reject(cancelledError());
    const deadline = deadlineAfter(options.timeoutMs ?? this.requestTimeoutMs);
    const connection = this.current();
    const givenUp = givingUp(options.signal, deadline);
    const link: LoadLink = {
      load: (params) => this.call<ContextLoadResult>("context/load", params, { connection, timeoutMs: 0 }),
      drop: (contextId) => this.dropInBackground(connection, contextId),
      signal: givenUp.signal,
    };
    const loaded = runLoad(loadRequests(source, chunkBytes), link);
    loaded.then(givenUp.dispose, givenUp.dispose);
    return waitFor(loaded, options.signal, deadline);
  }

  /**
   * Drops a stored context: resolves with whether the server had it. Requests and sessions
   * already using it keep it until they end.
   */
  async dropContext(contextId: string, call: CallOptions = {}): Promise<boolean> {
    const result = await this.call<ContextDropResult>(
      "context/drop",
      { context_id: contextId },
      { ...call, bound: true },
    );
    return result.dropped;
  }

  /** The server's stored contexts (sealed ones), and the store's size and limit. */
  async listContexts(call: CallOptions = {}): Promise<ContextList> {
    return contextList(await this.call<ContextListResult>("context/list", {}, call));
  }

  /**
   * Opens a session: one REPL that lives across turns (`session.infer(query)`), on the stored
   * context `contextId` if given. Close it with `session.close()` (or `await using`); the
   * server also closes it after `--session-idle-s` without a turn, and when it stops.
   */
  openSession(options: SessionOptions = {}): Promise<Session> {
    if (options.signal?.aborted) return Promise.reject(cancelledError());
    const deadline = deadlineAfter(options.timeoutMs ?? this.requestTimeoutMs);
    const connection = this.current();
    const { contextId, tools } = options;
    const params = {
      ...(contextId === undefined ? {} : { context_id: contextId }),
      ...(tools === undefined ? {} : { tools: toWireTools(tools) }),
    };
    const opened = this.call<SessionOpenResult>("session/open", params, { connection, timeoutMs: 0 }).then(
      ({ session_id }) =>
        new Session(session_id, {
          turn: (input: TurnInput, query: string, turn: TurnOptions) =>
            this.runInfer(input, query, turn, { connection, tools }),
          close: (id: string) => this.closeSession(connection, id),
        }),
    );
    return keepOrUndo(opened, options, deadline, (session) => void session.close().catch(() => undefined));
  }

  /** Runs one infer: `input` (prompt, context_id or session_id), the query and options; metrics. */
  private async runInfer(
    input: object,
    query: string | undefined,
    request: InferCallOptions,
    route: Route,
  ): Promise<InferResult> {
    const options = {
      ...toWireOptions(request.options ?? {}),
      ...(request.onProgress ? { progress: true } : {}),
    };
    const params = {
      ...input,
      ...(query === undefined ? {} : { query }),
      ...(Object.keys(options).length === 0 ? {} : { options }),
    };
    const started = performance.now();
    try {
      const result = await this.call<InferResult>("infer", params, { ...request, ...route });
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
   * cancels the rest, answers and exits; then the child is reaped. The answer is awaited for the
   * grace plus `requestTimeoutMs`. A later call starts a new server.
   */
  async shutdown(graceS: number = this.shutdownGraceS): Promise<ShutdownResult> {
    const connection = this.connection;
    if (!connection || connection.closed) return { shutdown: true };
    this.connection = undefined;
    try {
      return await connection.shutdown(graceS, this.requestTimeoutMs);
    } finally {
      await connection.close(graceS, this.closeTimeoutMs);
    }
  }

  /**
   * Ends the server: in-flight calls get `graceS` (default `shutdownGraceS`) to finish, then the
   * child gets `closeTimeoutMs` to exit; then SIGTERM, SIGKILL, each waited for as long.
   */
  async close(graceS: number = this.shutdownGraceS): Promise<void> {
    const connection = this.connection;
    this.connection = undefined;
    await connection?.close(graceS, this.closeTimeoutMs);
  }

  /** `await using client = new RLMClient()` closes it at the end of the scope. */
  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }

  getMetrics(): RLMMetrics {
    return this.metrics.snapshot();
  }

  /** Calls `callback` with a snapshot after every settled infer; returns an unsubscribe function. */
  onMetrics(callback: MetricsCallback): () => void {
    this.metricsListeners.add(callback);
    return () => this.metricsListeners.delete(callback);
  }

  /** A session/close on the session's own server; a server that is gone has closed it already. */
  private async closeSession(connection: Connection, sessionId: string): Promise<boolean> {
    if (connection.closed) return false;
    const result = await this.call<SessionCloseResult>(
      "session/close",
      { session_id: sessionId },
      { connection },
    );
    return result.closed;
  }

  /** Drops a context a load made and will not hand over; a failure is only logged. */
  private dropInBackground(connection: Connection, contextId: string): void {
    if (connection.closed) return; // its contexts went with it
    this.call("context/drop", { context_id: contextId }, { connection }).catch((error: unknown) =>
      this.logger.warn(`could not drop ${contextId} after its load failed: ${String(error)}`),
    );
  }

  /** One call with retries: the deadline covers start-up, every attempt and the backoff between. */
  private async call<T>(method: string, params: object | undefined, call: Route): Promise<T> {
    if (call.signal?.aborted) throw cancelledError();
    const deadline = deadlineAfter(call.timeoutMs ?? this.requestTimeoutMs);
    for (let attempt = 0; ; attempt += 1) {
      const connection = call.connection ?? this.current();
      await waitFor(connection.ready, call.signal, deadline);
      try {
        return await connection.request<T>(method, params, {
          signal: call.signal,
          timeoutMs: deadline ? Math.max(1, deadline.at - Date.now()) : 0,
          onProgress: call.onProgress,
          tools: call.tools,
        });
      } catch (error) {
        if (!this.retries(error, connection, attempt, call)) throw error;
        const delay = backoffDelay(attempt, this.retryBaseDelayMs, this.retryMaxDelayMs);
        if (deadline && Date.now() + delay >= deadline.at) throw error;
        this.metrics.recordRetry();
        this.logger.warn(
          `${method} failed (${error.code} ${error.data?.type ?? ""}); retry ${attempt + 1}/${this.maxRetries} in ${Math.round(delay)} ms`,
        );
        await sleep(delay, call.signal);
      }
    }
  }

  /**
   * Whether to send again: only what the server never ran to an answer (RLMError.retryable),
   * and not when the server exited because this client stopped it. Nor, after its server
   * exited, a call whose params or session live in that server alone: a new one would only say
   * it knows no such id.
   */
  private retries(error: unknown, connection: Connection, attempt: number, route: Route): error is RLMError {
    const lostWithServer =
      error instanceof RLMError &&
      error.data?.type === "server_exited" &&
      (route.bound === true || route.connection !== undefined);
    return (
      error instanceof RLMError &&
      error.retryable &&
      !lostWithServer &&
      attempt < this.maxRetries &&
      !connection.stopRequested
    );
  }

  /** The live connection, started on first use; concurrent first calls share one start. */
  private current(): Connection {
    if (!this.connection || this.connection.closed) {
      this.connection = new Connection(this.spec, {
        logger: this.logger,
        readyTimeoutMs: this.readyTimeoutMs,
        maxLineBytes: this.maxLineBytes,
        onError: (error) => this.onerror?.(error),
        onClose: () => this.emit("onclose", () => this.onclose?.()),
      });
    }
    return this.connection;
  }

  private emitMetrics(): void {
    if (this.metricsListeners.size === 0) return;
    const snapshot = this.metrics.snapshot();
    for (const listener of this.metricsListeners) this.emit("onMetrics", () => listener(snapshot));
  }

  /** Runs a user callback; one that throws is logged, never allowed to break the client. */
  private emit(name: string, callback: () => void): void {
    try {
      callback();
    } catch (error) {
      this.logger.warn(`${name} callback threw: ${String(error)}`);
    }
  }
}

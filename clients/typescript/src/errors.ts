/**
 * Typed errors, one class per JSON-RPC code of the contract. Errors the server sends keep its
 * code and `data`; conditions only the client can see (the child exited, it never became ready)
 * use -32603 with a `data.type` of their own, the code the contract gives a crashed worker.
 */
import type { ErrorCode, ErrorData, Usage } from "./generated/protocol.js";

/**
 * `data.type` values that only the client produces: the child died (`server_exited`), never got
 * ready (`start_failed`), or wrote an answer the client cannot use (`protocol_error`: malformed,
 * or longer than `maxLineBytes`).
 */
export type ClientErrorType = "server_exited" | "start_failed" | "protocol_error";

/** The contract's error data, widened with the fields of client-side errors. */
export type RLMErrorData = Omit<ErrorData, "type"> & {
  type: ErrorData["type"] | ClientErrorType;
  /** server_exited: the child's exit code, or null when a signal ended it. */
  exit_code?: number | null;
  /** server_exited: the signal that ended the child, if any. */
  signal?: string | null;
  /** server_exited, start_failed: the child's last line on stderr, which usually says why. */
  stderr?: string;
};

/** Base class: `code` is the JSON-RPC error code, `data` the structured cause. */
export class RLMError extends Error {
  override name = "RLMError";

  constructor(
    readonly code: ErrorCode,
    message: string,
    readonly data?: RLMErrorData,
  ) {
    super(message);
  }

  /**
   * What the request spent before it ended (`data.usage`): the server sends it on every error
   * that ends an `infer` after a model call was made (cancelled, timed out, failed, over budget),
   * so spend is counted even when there is no result. Undefined when no call was made, and on
   * errors the client itself raised (its own deadline or AbortSignal, a dead child).
   */
  get usage(): Usage | undefined {
    return this.data?.usage;
  }

  /**
   * Whether the client retries this: only work the server never ran to an answer, i.e. a full
   * admission queue, or a server that exited before answering. Never a backend error, whatever
   * its `data.retryable` says: the server has already spent its own retries on it, and each
   * client retry would multiply them (a full RLM run each).
   */
  get retryable(): boolean {
    if (this.code === -32002) return this.data?.type === "queue_full";
    return this.code === -32603 && this.data?.type === "server_exited";
  }
}

/** -32700: the server could not parse a line as JSON. */
export class RLMParseError extends RLMError {
  override name = "RLMParseError";
}
/** -32600: not a JSON-RPC 2.0 request, or a line above the server's size limit. */
export class RLMInvalidRequestError extends RLMError {
  override name = "RLMInvalidRequestError";
}
/** -32601: unknown method. */
export class RLMMethodNotFoundError extends RLMError {
  override name = "RLMMethodNotFoundError";
}
/** -32602: invalid params; `data.field` names the offending field (e.g. `options.max_depth`). */
export class RLMInvalidParamsError extends RLMError {
  override name = "RLMInvalidParamsError";
}
/** -32603: internal error, a crashed worker, or (client side) the server process exited. */
export class RLMInternalError extends RLMError {
  override name = "RLMInternalError";
}
/** -32000: the LLM backend failed after the server's own retries; never retried by the client. */
export class RLMBackendError extends RLMError {
  override name = "RLMBackendError";
}
/** -32001: deadline exceeded, on the server (`options.timeout_s`) or in the client (`timeoutMs`). */
export class RLMDeadlineError extends RLMError {
  override name = "RLMDeadlineError";
}
/** -32002: the server is shutting down or its admission queue is full (`data.type` says which). */
export class RLMRejectedError extends RLMError {
  override name = "RLMRejectedError";
}
/** -32003: the backend is unavailable and the server runs in strict mode. */
export class RLMUnavailableError extends RLMError {
  override name = "RLMUnavailableError";
}
/**
 * -32004: a budget was exhausted: `data.limit` names the limit reached (`max_calls`,
 * `max_input_tokens`, `max_output_tokens` or `max_cost_usd`), `data.max` its value, `data.scope`
 * whether it was the request's `options.budget` (`request`) or the server's lifetime spend limit
 * (`server`), and `data.usage` what the request had spent. Never retried by the client: the same
 * request would meet the same limit.
 */
export class RLMBudgetError extends RLMError {
  override name = "RLMBudgetError";
}
/**
 * -32005: a `context/load` did not fit in the server's context store (`data.limit_bytes`, its
 * `--context-store-bytes`) even after evicting every stored context nothing uses; nothing was
 * stored or evicted. Never retried by the client: only a `dropContext` makes room.
 */
export class RLMContextStoreFullError extends RLMError {
  override name = "RLMContextStoreFullError";
}
/**
 * -32006: the answer never matched `options.answerSchema`, after `options.answerRepairs` repairs:
 * `data.validation_error` says why the last one did not, and `data.usage` what was spent.
 */
export class RLMInvalidAnswerError extends RLMError {
  override name = "RLMInvalidAnswerError";
}
/** -32800: the request was cancelled (AbortSignal, or the server's shutdown grace ran out). */
export class RLMCancelledError extends RLMError {
  override name = "RLMCancelledError";
}

type ErrorClass = new (code: ErrorCode, message: string, data?: RLMErrorData) => RLMError;

/** Exhaustive over the schema's codes: a code added to the contract fails the build until mapped. */
const CLASSES: { readonly [C in ErrorCode]: ErrorClass } = {
  [-32700]: RLMParseError,
  [-32600]: RLMInvalidRequestError,
  [-32601]: RLMMethodNotFoundError,
  [-32602]: RLMInvalidParamsError,
  [-32603]: RLMInternalError,
  [-32000]: RLMBackendError,
  [-32001]: RLMDeadlineError,
  [-32002]: RLMRejectedError,
  [-32003]: RLMUnavailableError,
  [-32004]: RLMBudgetError,
  [-32005]: RLMContextStoreFullError,
  [-32006]: RLMInvalidAnswerError,
  [-32800]: RLMCancelledError,
};

/** Builds the typed error for a code; a code outside the contract becomes a plain RLMError. */
export function rlmError(code: number, message: string, data?: RLMErrorData): RLMError {
  const Class: ErrorClass = CLASSES[code as ErrorCode] ?? RLMError;
  return data === undefined
    ? new Class(code as ErrorCode, message)
    : new Class(code as ErrorCode, message, data);
}

export function cancelledError(): RLMCancelledError {
  return new RLMCancelledError(-32800, "request cancelled", { type: "cancelled" });
}

export function deadlineError(timeoutMs: number): RLMDeadlineError {
  return new RLMDeadlineError(-32001, `no answer within ${timeoutMs} ms`, {
    type: "deadline_exceeded",
    timeout_s: timeoutMs / 1000,
  });
}

/** -32603 `protocol_error`: the server wrote something this client cannot read as an answer. */
export function protocolError(message: string, limit?: number): RLMInternalError {
  return new RLMInternalError(-32603, message, {
    type: "protocol_error",
    ...(limit === undefined ? {} : { limit }),
  });
}

export {
  DEFAULT_SHUTDOWN_GRACE_S,
  RLMClient,
  backoffDelay,
  type CallOptions,
  type ChatMessage,
  type InferRequest,
  type RLMClientOptions,
} from "./client.js";
export type { Logger, ProgressEvent, ReadyInfo } from "./connection.js";
export {
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
  type ClientErrorType,
  type RLMErrorData,
} from "./errors.js";
export {
  ERROR_CODES,
  ERROR_TYPES,
  INFER_OPTION_NAMES,
  PROTOCOL_VERSION,
  type Backend,
  type Budget,
  type ErrorCode,
  type ErrorType,
  type InferResult,
  type Protection,
  type ServerMetrics,
  type ShutdownResult,
  type StatusResult,
  type Usage,
} from "./generated/protocol.js";
export { LATENCY_WINDOW, type MetricsCallback, type RLMMetrics } from "./metrics.js";
export type { InferOptions } from "./options.js";

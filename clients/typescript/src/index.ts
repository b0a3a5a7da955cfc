export {
  DEFAULT_SHUTDOWN_GRACE_S,
  RLMClient,
  backoffDelay,
  type CallOptions,
  type ChatMessage,
  type InferCallOptions,
  type InferInput,
  type InferRequest,
  type AnswerSchema,
  type StructuredRequest,
  type StructuredResult,
  type LoadContextOptions,
  type RLMClientOptions,
  type SessionOptions,
} from "./client.js";
export {
  DEFAULT_CHUNK_BYTES,
  type ContextInfo,
  type ContextList,
  type ContextSource,
  type StoredContext,
} from "./contexts.js";
export { Session, type TurnOptions } from "./session.js";
export {
  TOOL_ERROR_CODE,
  type ToolCall,
  type ToolDefinition,
  type ToolHandler,
  type Tools,
} from "./tools.js";
export type { Logger, ProgressEvent, ReadyInfo } from "./connection.js";
export {
  RLMBackendError,
  RLMBudgetError,
  RLMCancelledError,
  RLMContextStoreFullError,
  RLMDeadlineError,
  RLMError,
  RLMInternalError,
  RLMInvalidAnswerError,
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
  type ExecutorNode,
  type ExecutorStatus,
  type InferResult,
  type Protection,
  type ServerMetrics,
  type ShutdownResult,
  type StatusResult,
  type Usage,
} from "./generated/protocol.js";
export { LATENCY_WINDOW, type MetricsCallback, type RLMMetrics } from "./metrics.js";
export type { InferOptions } from "./options.js";

export {
  RLMClient,
  backoffDelay,
  type CallOptions,
  type ChatMessage,
  type InferCallOptions,
  type RLMClientOptions,
} from "./client.js";
export type { Logger, ProgressEvent, ReadyInfo } from "./connection.js";
export {
  RLMBackendError,
  RLMCancelledError,
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
export type {
  Backend,
  ErrorCode,
  ErrorType,
  InferResult,
  ShutdownResult,
  StatusResult,
  Usage,
} from "./generated/protocol.js";
export { LATENCY_WINDOW, type MetricsCallback, type RLMMetrics } from "./metrics.js";
export type { InferOptions } from "./options.js";
export {
  RLM_MODEL_TYPES,
  createRlmPlugin,
  rlmPlugin,
  type AgentRuntimeLike,
  type GenerateTextParamsLike,
  type ModelHandler,
  type RLMPlugin,
} from "./plugin.js";

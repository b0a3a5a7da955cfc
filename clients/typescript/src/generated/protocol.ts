// GENERATED from protocol/schema.json by scripts/gen-types.mjs. Do not edit by hand:
// run `npm run gen:types`. `npm test` fails when this file and the schema disagree.

export type ServerMessage =
  | Response
  | [Response, ...Response[]]
  | ReadyNotification
  | ProgressNotification
  | ToolCallRequest
  | ToolCancelNotification;
export type Response = SuccessResponse | ErrorResponse;
/**
 * Request id. Integers are kept within 64 bits; fractional numbers and booleans are invalid.
 */
export type Id = string | number;
/**
 * One protection around model code in force on this machine (README, Security): unprivileged_uid (a root server's workers run as nobody); user_namespace, pid_namespace, network_namespace and ipc_namespace (one of each per worker); disk_limit (its directory is a tmpfs of --worker-disk-mb in a mount namespace of its own); no_capabilities; no_new_privs; not_dumpable (server, zygote and workers); landlock_filesystem (reads only the interpreter and system files, writes only its own directory); landlock_signals (signals and abstract sockets scoped to itself); seccomp (cannot clear its parent-death signal); no_unix_sockets (no AF_UNIX socket but its own socketpairs, no io_uring); no_shared_memory (no memfd, no System V shared memory); resource_limits (open files, file size, CPU time, core files); process_limit (its PID namespace's own pid_max, or RLIMIT_NPROC in its user namespace); private_tmp (a directory of its own as cwd and TMPDIR, removed when it ends); private_output (its fds 1 and 2 are a pipe the server drains into its log).
 */
export type Protection =
  | "unprivileged_uid"
  | "user_namespace"
  | "pid_namespace"
  | "network_namespace"
  | "ipc_namespace"
  | "disk_limit"
  | "no_capabilities"
  | "no_new_privs"
  | "not_dumpable"
  | "landlock_filesystem"
  | "landlock_signals"
  | "seccomp"
  | "no_unix_sockets"
  | "no_shared_memory"
  | "resource_limits"
  | "process_limit"
  | "private_tmp"
  | "private_output";
/**
 * -32700 parse error; -32600 invalid request or line too long; -32601 unknown method; -32602 invalid params; -32603 internal error, worker crash or an answer over --max-answer-bytes; -32000 backend failed after retries; -32001 deadline exceeded; -32002 shutting down or queue full; -32003 backend unavailable in strict mode; -32004 a budget was exhausted; -32005 the context store is full even after evicting every unused context; -32006 the answer did not match `options.answer_schema` and its repairs were spent; -32800 cancelled.
 */
export type ErrorCode =
  -32700 | -32600 | -32601 | -32602 | -32603 | -32000 | -32001 | -32002 | -32003 | -32004 | -32005 | -32006 | -32800;
export type ErrorType =
  | "parse_error"
  | "invalid_request"
  | "line_too_long"
  | "method_not_found"
  | "invalid_params"
  | "internal_error"
  | "worker_crashed"
  | "answer_too_large"
  | "backend_error"
  | "replay_miss"
  | "deadline_exceeded"
  | "shutting_down"
  | "queue_full"
  | "backend_unavailable"
  | "budget_exceeded"
  | "context_store_full"
  | "invalid_answer"
  | "cancelled";
/**
 * A request, a batch of requests, or the answer to one of the server's own `tool/call` requests (one per line, never in a batch).
 */
export type ClientMessage = Request | [Request, ...Request[]] | ToolCallResponse;
/**
 * A request (with id) or a notification (without). `params: null` is treated as absent.
 */
export type Request = {
  [k: string]: unknown | undefined;
} & {
  jsonrpc: "2.0";
  id?: Id | null;
  method:
    | "infer"
    | "status"
    | "shutdown"
    | "$/cancelRequest"
    | "context/load"
    | "context/drop"
    | "context/list"
    | "session/open"
    | "session/close";
  params?: {} | null;
};
/**
 * The client's answer to a `tool/call`: `result` (any JSON value, which model code gets), or `error` (model code gets ToolError with its `message`). One per line; its line is bounded by --max-message-bytes like any other.
 */
export type ToolCallResponse = {
  jsonrpc: "2.0";
  id: string;
  result?: unknown;
  error?: {
    code: number;
    message: string;
    data?: unknown;
  };
} & ToolCallResponse1;
export type ToolCallResponse1 = {
  [k: string]: unknown | undefined;
};
/**
 * The long input is exactly one of: `prompt` (or its alias `messages`), which becomes `context` in the REPL; `context_id`, a context stored with context/load; or, with `session_id`, the session's REPL, to which an optional `prompt` (or `messages`) adds the next `context_N`. `query` is the short question shown to the root model.
 */
export type InferParams = {
  prompt?: string | [Message, ...Message[]];
  /**
   * @minItems 1
   */
  messages?: [Message, ...Message[]];
  /**
   * A sealed context from context/load.
   */
  context_id?: string;
  /**
   * A turn of this session (session/open).
   */
  session_id?: string;
  query?: string;
  options?: InferOptions;
  /**
   * Host tools model code may call: each becomes a Python function of keyword arguments in the REPL, listed with its description in the root model's prompt. The server sends `tool/call` for each call; a client that declares none never receives one. Not with `session_id`: a session's turns use the tools declared on session/open.
   *
   * @maxItems 64
   */
  tools?: ToolDeclaration[];
} & InferParams1;
export type Backend =
  "openai" | "anthropic" | "gemini" | "groq" | "openrouter" | "vllm" | "azure_openai" | "portkey" | "vercel";
export type InferParams1 = {
  [k: string]: unknown | undefined;
};
/**
 * Exactly one of: `text` (a whole text), `messages` (a whole list: messages or documents, any JSON values), or `chunk` (one piece of a text: without `context_id` it starts a new context, with it it is appended to that one; `final: true` seals it, and a single chunk may be both first and final).
 */
export type ContextLoadParams = {
  text?: string;
  messages?: unknown[];
  chunk?: string;
  /**
   * Only with `chunk`: the context it continues.
   */
  context_id?: string;
  /**
   * Only with `chunk`: the last chunk; the context is sealed.
   */
  final?: boolean;
} & ContextLoadParams1;
export type ContextLoadParams1 = {
  [k: string]: unknown | undefined;
};

/**
 * Newline-delimited JSON-RPC 2.0 over stdio. Every line the server writes is one `ServerMessage`; every line a client writes is one `ClientMessage`. protocol/README.md is the binding description of the behaviour behind each message.
 */
export interface WireProtocol {
  server?: ServerMessage;
  client?: ClientMessage;
}
export interface SuccessResponse {
  jsonrpc: "2.0";
  id: Id | null;
  result:
    | InferResult
    | StatusResult
    | ShutdownResult
    | ContextLoadResult
    | ContextDropResult
    | ContextListResult
    | SessionOpenResult
    | SessionCloseResult
    | null;
}
export interface InferResult {
  text: string;
  /**
   * With `options.answer_schema`: the answer, a JSON value valid against that schema (`text` is its compact JSON). Absent otherwise, and in a stub answer.
   */
  value?: {} | unknown[] | string | number | boolean | null;
  stub: boolean;
  usage: Usage;
  metadata: {
    backend: string;
    model: string;
    iterations: number;
    depth: number;
    elapsed_ms: number;
    attempts: number;
    /**
     * Model calls that failed after the server's retries and reached model code (options.subcall_errors "model"); 0 otherwise.
     */
    failed_calls: number;
  };
  trajectory?: TrajectoryStep[];
}
export interface Usage {
  calls: number;
  input_tokens: number;
  output_tokens: number;
  cost_usd: number | null;
  models: {
    [k: string]:
      | {
          calls: number;
          input_tokens: number;
          output_tokens: number;
          cost_usd: number | null;
        }
      | undefined;
  };
}
/**
 * One iteration of the root model: what it said, the code it ran and what that printed, its sub-calls. Every string is truncated to at most 4096 characters (a truncated one ends with `…[truncated N chars]`, N the characters left out); never the context or the REPL's variables.
 */
export interface TrajectoryStep {
  iteration: number;
  response: string;
  code_blocks: TrajectoryCodeBlock[];
  final_answer: string | null;
  iteration_time_s: number | null;
  /**
   * The host tool calls this iteration's code made, in the order they returned.
   */
  tool_calls?: TrajectoryToolCall[];
}
export interface TrajectoryCodeBlock {
  code: string;
  stdout: string;
  stderr: string;
  execution_time_s: number | null;
  sub_calls: TrajectorySubCall[];
}
export interface TrajectorySubCall {
  model: string;
  /**
   * The sub-call's prompt, truncated.
   */
  prompt: string;
  /**
   * Its answer, truncated.
   */
  response: string;
  input_tokens: number;
  output_tokens: number;
  execution_time_s: number | null;
}
/**
 * One host tool call: its name, the sizes of its arguments and of its value as JSON, and how long model code waited for it.
 */
export interface TrajectoryToolCall {
  name: string;
  arguments_bytes: number;
  result_bytes: number;
  /**
   * The ToolError's message model code got, or null.
   */
  error: string | null;
  time_s: number;
}
export interface StatusResult {
  server: "rlm-server";
  version: string;
  protocol: "1";
  available: boolean;
  stub: boolean;
  reason?: string;
  backend: string;
  model: string;
  environment: string;
  /**
   * The --sandbox level.
   */
  sandbox: "strict" | "auto" | "off";
  /**
   * What confines model code here, in the order it is applied.
   */
  protections: Protection[];
  max_iterations: number;
  max_depth: number;
  max_concurrency: number;
  /**
   * --max-calls-in-flight: model calls one request may have in flight at once.
   */
  max_calls_in_flight: number;
  /**
   * --max-answer-bytes: the longest answer (UTF-8 bytes) an infer returns; a longer one is -32603 answer_too_large.
   */
  max_answer_bytes: number;
  in_flight: number;
  queued: number;
  uptime_s: number;
  metrics: ServerMetrics;
  /**
   * What context/list lists: how many sealed contexts, and its bytes_total.
   */
  contexts: {
    count: number;
    bytes: number;
  };
  /**
   * Open sessions.
   */
  sessions: {
    count: number;
  };
  executor?: ExecutorStatus;
}
export interface ServerMetrics {
  total_requests: number;
  successful_requests: number;
  failed_requests: number;
  cancelled_requests: number;
  timed_out_requests: number;
  stub_responses: number;
  /**
   * Model calls the broker tried again (each call is retried on its own).
   */
  total_retries: number;
  latency_ms: LatencySummary;
  /**
   * Model calls made over the server's lifetime (every request, every depth).
   */
  total_calls: number;
  total_input_tokens: number;
  total_output_tokens: number;
  /**
   * Null while no call had a known price.
   */
  total_cost_usd: number | null;
}
export interface LatencySummary {
  avg: number;
  p50: number;
  p95: number;
  p99: number;
}
/**
 * Present with --executor ray: where completions run. kind is local when the cluster could not be reached and --executor ray,local let the server run them here.
 */
export interface ExecutorStatus {
  kind: "ray" | "local";
  /**
   * The cluster's nodes that have a node agent (none before the first infer connects).
   */
  nodes: ExecutorNode[];
}
export interface ExecutorNode {
  node_id: string;
  address: string;
  /**
   * Completions this node runs at once (--ray-node-slots, at most its CPUs).
   */
  slots: number;
  in_flight: number;
  /**
   * What confines model code on this node.
   */
  protections: Protection[];
  /**
   * Stored contexts this node fetched from the object store (once each).
   */
  contexts_read: number;
}
export interface ShutdownResult {
  shutdown: true;
}
export interface ContextLoadResult {
  context_id: string;
  /**
   * Bytes stored so far: UTF-8 of a text, JSON of a list.
   */
  bytes: number;
  /**
   * Hex SHA-256 of those bytes; null until sealed.
   */
  sha256: string | null;
  sealed: boolean;
}
export interface ContextDropResult {
  /**
   * False when the id was unknown.
   */
  dropped: boolean;
}
export interface ContextListResult {
  /**
   * Sealed contexts, in the order they were loaded.
   */
  contexts: {
    id: string;
    bytes: number;
    sha256: string;
    /**
     * Requests running or waiting on it, and sessions open on it.
     */
    uses: number;
    /**
     * When it was loaded or last used, Unix epoch milliseconds.
     */
    last_used_ms: number;
  }[];
  /**
   * Every stored byte, contexts still being loaded and dropped ones still in use included.
   */
  bytes_total: number;
  /**
   * --context-store-bytes.
   */
  bytes_limit: number;
}
export interface SessionOpenResult {
  session_id: string;
}
export interface SessionCloseResult {
  /**
   * False when the id was unknown, closed or expired.
   */
  closed: boolean;
}
export interface ErrorResponse {
  jsonrpc: "2.0";
  id: Id | null;
  error: Error;
}
export interface Error {
  code: ErrorCode;
  message: string;
  data?: ErrorData;
}
export interface ErrorData {
  type: ErrorType;
  /**
   * -32602: the offending field, dotted (e.g. `options.max_depth`).
   */
  field?: string;
  /**
   * -32000: always false once the server's own retries are spent; clients never retry -32000.
   */
  retryable?: boolean;
  /**
   * -32000: how many times the call that failed was tried.
   */
  attempts?: number;
  /**
   * -32000: HTTP status from the backend, when it gave one.
   */
  status?: number;
  /**
   * -32600 line_too_long: the maximum line in bytes; -32002 queue_full: the maximum number of queued requests; -32004: the name of the limit that was reached (max_calls, max_input_tokens, max_output_tokens, max_cost_usd or max_tool_calls).
   */
  limit?: number | string;
  timeout_s?: number;
  reason?: string;
  method?: string;
  /**
   * -32002 queue_full: the maximum total prompt size of queued requests; -32005: --context-store-bytes; -32603 answer_too_large: --max-answer-bytes.
   */
  limit_bytes?: number;
  /**
   * -32004: the value of that limit.
   */
  max?: number;
  /**
   * -32004: whether the request's budget or the server's lifetime limit was reached.
   */
  scope?: "request" | "server";
  /**
   * What the request spent before it ended: on every error that ends an infer after a model call was made.
   */
  usage?: Usage;
  /**
   * -32000 replay_miss: the SHA-256 of the model call (backend, model, prompt, sampling) that --replay has no recorded answer for.
   */
  hash?: string;
  /**
   * -32006: why the last answer did not match the schema, in the validator's words (at most 1000 characters).
   */
  validation_error?: string;
}
export interface ReadyNotification {
  jsonrpc: "2.0";
  method: "ready";
  params: {
    server: "rlm-server";
    version: string;
    protocol: "1";
    pid: number;
    available: boolean;
    stub: boolean;
    backend: string;
    model: string;
    environment: string;
    /**
     * The --sandbox level.
     */
    sandbox: "strict" | "auto" | "off";
    /**
     * What confines model code here, in the order it is applied.
     */
    protections: Protection[];
  };
}
export interface ProgressNotification {
  jsonrpc: "2.0";
  method: "$/progress";
  params: {
    id: Id;
    event: "started" | "iteration" | "subcall" | "retry";
    iteration?: number;
    max_iterations?: number;
    elapsed_ms: number;
    message?: string;
  };
}
/**
 * The server's own request: model code of request `request_id` called a host tool. Its `id` is from the server's id space (strings `tool-N`), apart from the client's; the client answers with a ToolCallResponse carrying that id.
 */
export interface ToolCallRequest {
  jsonrpc: "2.0";
  id: string;
  method: "tool/call";
  params: {
    /**
     * The infer whose model code made the call.
     */
    request_id: Id | null;
    name: string;
    /**
     * Valid against the tool's input_schema.
     */
    arguments: {};
  };
}
/**
 * The server no longer waits for this `tool/call` (its infer was cancelled, timed out or ended, or the call passed tool_timeout_s): stop its handler; an answer sent after this is dropped.
 */
export interface ToolCancelNotification {
  jsonrpc: "2.0";
  method: "$/cancelRequest";
  params: {
    id: string;
  };
}
export interface Message {
  role: string;
  content: string;
}
/**
 * Per-request overrides. They apply to this request only.
 */
export interface InferOptions {
  backend?: Backend;
  model?: string;
  sub_model?: string;
  base_url?: string;
  max_iterations?: number;
  max_depth?: number;
  timeout_s?: number;
  temperature?: number;
  max_tokens?: number;
  progress?: boolean;
  trajectory?: boolean;
  budget?: Budget;
  /**
   * A model call that fails after the server's retries: "fail" (default) ends the request with -32000; "model" gives model code the library's error string and counts it in metadata.failed_calls. A budget refusal always ends the request (-32004).
   */
  subcall_errors?: "fail" | "model";
  /**
   * How long one host tool call may take, seconds (default 60): then model code gets ToolError and the client `$/cancelRequest` for it.
   */
  tool_timeout_s?: number;
  /**
   * A JSON Schema (draft 2020-12, at most 65536 bytes as JSON) the answer must match: the root model is told it, each answer it sets is checked, and a valid one comes back as `result.value`. A schema that is not one is -32602 naming `options.answer_schema`.
   */
  answer_schema?: {
    [k: string]: unknown | undefined;
  };
  /**
   * Only with `answer_schema`: how many invalid answers the model may fix, each in another iteration, before the request ends with -32006 `invalid_answer`. Default 2.
   */
  answer_repairs?: number;
}
/**
 * Limits over this request's whole call tree (every model call at every depth). The broker reserves before each call (a call's input is counted as at most its prompt's bytes, its output as at most max_tokens, else 4096) and settles after it, so concurrent requests cannot overspend together. A cost limit on a model without a known price is refused (-32602).
 */
export interface Budget {
  max_calls?: number;
  max_input_tokens?: number;
  max_output_tokens?: number;
  max_cost_usd?: number;
  /**
   * Host tool calls this request may make; the next one ends it with -32004 (limit `max_tool_calls`), before the client sees it.
   */
  max_tool_calls?: number;
}
/**
 * One host tool. `name` is a Python identifier, not a keyword, not starting with `_`, and not a name the REPL already has (`llm_query`, `llm_query_batched`, `rlm_query`, `rlm_query_batched`, `SHOW_VARS`, `FINAL`, `FINAL_VAR`, `answer`, `context`, `history`, `ToolError`); names are unique within a request.
 */
export interface ToolDeclaration {
  name: string;
  description: string;
  /**
   * A JSON Schema (2020-12, at most 65536 bytes as JSON) for the keyword arguments, as one object: every call's arguments are checked against it before the client sees them.
   */
  input_schema: {};
}
export interface ShutdownParams {
  grace_s?: number;
}
export interface CancelParams {
  id: Id;
}
export interface ContextDropParams {
  context_id: string;
}
export interface ContextListParams {}
export interface SessionOpenParams {
  /**
   * A sealed context: the session's `context`.
   */
  context_id?: string;
  /**
   * Host tools every turn of the session may call (see InferParams.tools).
   *
   * @maxItems 64
   */
  tools?: ToolDeclaration[];
}
export interface SessionCloseParams {
  session_id: string;
}

/** The protocol version this client speaks: the `ready` notification's `protocol`. */
export const PROTOCOL_VERSION = "1" as const;
/** Every error code of the contract. */
export const ERROR_CODES = [-32700, -32600, -32601, -32602, -32603, -32000, -32001, -32002, -32003, -32004, -32005, -32006, -32800] as const;
/** Every `data.type` of the contract. */
export const ERROR_TYPES = ["parse_error", "invalid_request", "line_too_long", "method_not_found", "invalid_params", "internal_error", "worker_crashed", "answer_too_large", "backend_error", "replay_miss", "deadline_exceeded", "shutting_down", "queue_full", "backend_unavailable", "budget_exceeded", "context_store_full", "invalid_answer", "cancelled"] as const;
/** Every per-request option, by its wire name. */
export const INFER_OPTION_NAMES = ["backend", "model", "sub_model", "base_url", "max_iterations", "max_depth", "timeout_s", "temperature", "max_tokens", "progress", "trajectory", "budget", "subcall_errors", "tool_timeout_s", "answer_schema", "answer_repairs"] as const;

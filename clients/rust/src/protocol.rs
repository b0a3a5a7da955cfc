//! Serde types for the v1 wire contract (`protocol/schema.json`).
//!
//! Every type mirrors one definition of the schema, field for field, with the schema's
//! snake_case names. Required members are plain fields, so a message missing one does not
//! decode; optional members are `Option`s that are left out when `None`. Unknown members are
//! ignored when decoding, so a newer server that adds a field does not break this client. The
//! test suite replays the shared transcripts in `protocol/transcripts/` and checks that every
//! message decodes into these types and encodes back to the same JSON, which catches a missing,
//! extra or misnamed field.

use std::collections::BTreeMap;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// An enum of the wire's string values, plus `Unknown` for a value this crate does not know
/// (a newer server's), kept as it was sent so that nothing is dropped and it encodes back the
/// same. `KNOWN` lists the wire names, for the test that compares them with the schema.
macro_rules! wire_enum {
    (
        $(#[$meta:meta])*
        $name:ident { $($(#[$variant_meta:meta])* $variant:ident = $wire:literal,)* }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq, Eq, Hash)]
        #[non_exhaustive]
        pub enum $name {
            $($(#[$variant_meta])* $variant,)*
            /// A value this crate does not know yet, as the wire spelled it.
            Unknown(String),
        }

        impl $name {
            /// Every value this crate knows, as spelled on the wire.
            pub const KNOWN: &'static [&'static str] = &[$($wire),*];

            /// The value as spelled on the wire.
            pub fn as_str(&self) -> &str {
                match self {
                    $(Self::$variant => $wire,)*
                    Self::Unknown(other) => other,
                }
            }
        }

        impl From<&str> for $name {
            fn from(wire: &str) -> Self {
                match wire {
                    $($wire => Self::$variant,)*
                    other => Self::Unknown(other.to_owned()),
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let wire = std::borrow::Cow::<'de, str>::deserialize(deserializer)?;
                Ok(Self::from(&*wire))
            }
        }
    };
}

/// A JSON-RPC request id (`Id` in the schema): an integer within 64 bits or a string.
///
/// The client itself only ever sends integers, counting from 1, but a server message may carry
/// either kind, so both decode.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Id {
    /// An integer id.
    Number(i64),
    /// A string id.
    String(String),
}

/// One chat message (`Message`): an alternative to a plain string prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Message {
    /// Who said it: `user`, `assistant`, `system`, ...
    pub role: String,
    /// What was said.
    pub content: String,
}

impl Message {
    /// A message with the given role and content.
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// The long input of an `infer` request, which becomes `context` in the model's REPL.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Prompt {
    /// A plain string.
    Text(String),
    /// A list of chat messages (at least one).
    Messages(Vec<Message>),
}

impl From<String> for Prompt {
    fn from(text: String) -> Self {
        Prompt::Text(text)
    }
}

impl From<&str> for Prompt {
    fn from(text: &str) -> Self {
        Prompt::Text(text.to_owned())
    }
}

impl From<Vec<Message>> for Prompt {
    fn from(messages: Vec<Message>) -> Self {
        Prompt::Messages(messages)
    }
}

wire_enum! {
    /// The LLM backends the server knows (`Backend`). A backend this crate does not know yet
    /// can still be sent as [`Backend::Unknown`].
    Backend {
        /// `openai`, or any OpenAI-compatible server through `base_url`.
        Openai = "openai",
        /// `anthropic`.
        Anthropic = "anthropic",
        /// `gemini`.
        Gemini = "gemini",
        /// `groq`.
        Groq = "groq",
        /// `openrouter`.
        Openrouter = "openrouter",
        /// `vllm`.
        Vllm = "vllm",
        /// `azure_openai`.
        AzureOpenai = "azure_openai",
        /// `portkey`.
        Portkey = "portkey",
        /// `vercel`.
        Vercel = "vercel",
    }
}

wire_enum! {
    /// What a model call that fails after the server's retries does to its request
    /// (`InferOptions.subcall_errors`). A budget refusal always ends the request (-32004).
    SubcallErrors {
        /// The request ends with -32000 `backend_error` (the server's default).
        Fail = "fail",
        /// Model code gets the library's error string in place of the reply, and the result
        /// counts the failures in [`InferMetadata::failed_calls`].
        Model = "model",
    }
}

/// Per-request overrides (`InferOptions`). They apply to one request only and never change
/// the server's shared configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferOptions {
    /// Backend for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// Root model name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// Model for `llm_query` sub-calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sub_model: Option<String>,
    /// Base URL of an OpenAI-compatible server. Refused with -32602 (`data.field` is
    /// `options.base_url`) unless the server was started with `--allow-base-url` for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_url: Option<String>,
    /// Most root-model iterations (1..=1000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    /// Most recursion depth (1..=10).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_depth: Option<u32>,
    /// Server-side deadline in seconds; past it the server answers -32001.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// Sampling temperature (0..=2).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
    /// Most output tokens per model call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    /// Ask for `$/progress` notifications. The client sets this itself when the request has a
    /// progress sink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<bool>,
    /// Return the run's trajectory in [`InferResult::trajectory`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<bool>,
    /// Limits over this request's whole call tree; past one the server answers -32004
    /// ([`crate::RlmError::BudgetExceeded`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
    /// What a model call that fails after the server's retries does: end the request
    /// (`fail`, the default) or reach model code (`model`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subcall_errors: Option<SubcallErrors>,
    /// How long one host tool call may take, in seconds (default 60): then model code gets
    /// `ToolError` and the handler is cancelled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_timeout_s: Option<f64>,
    /// A JSON Schema (draft 2020-12, at most 64 KiB) the answer must match: the root model is
    /// told it, each answer it sets is checked, and the valid one is [`InferResult::value`]
    /// ([`InferResult::answer`] decodes it). One that is not a schema is -32602.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_schema: Option<Value>,
    /// With `answer_schema`: how many invalid answers the model may fix (0..=100, default 2)
    /// before the server answers -32006 ([`crate::RlmError::InvalidAnswer`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answer_repairs: Option<u32>,
}

/// Limits over one request's whole call tree, every model call at every depth (`Budget`).
///
/// The server reserves before each model call (its input counted as at most its prompt's
/// bytes, its output as at most `max_tokens`, else 4096) and settles after it, so concurrent
/// requests cannot overspend together. Past a limit the request ends with -32004
/// ([`crate::RlmError::BudgetExceeded`]), whose data names the limit and carries the usage so
/// far. A cost limit on a model without a known price is refused with -32602.
///
/// ```
/// use rlm_client::{Budget, InferOptions};
/// let options = InferOptions::new().budget(Budget::new().max_calls(20).max_cost_usd(0.5));
/// assert_eq!(options.budget.unwrap().max_calls, Some(20));
/// ```
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Budget {
    /// Most model calls (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_calls: Option<u64>,
    /// Most prompt tokens, over every call (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_input_tokens: Option<u64>,
    /// Most completion tokens, over every call (at least 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_output_tokens: Option<u64>,
    /// Most cost in US dollars (above 0); the model must have a known price.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
    /// Most host tool calls; the next one ends the request with -32004 before the client's
    /// handler sees it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tool_calls: Option<u64>,
}

impl Budget {
    /// No limits of the request's own (the server's configured limits still apply).
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets `max_calls`.
    pub fn max_calls(mut self, value: u64) -> Self {
        self.max_calls = Some(value);
        self
    }

    /// Sets `max_input_tokens`.
    pub fn max_input_tokens(mut self, value: u64) -> Self {
        self.max_input_tokens = Some(value);
        self
    }

    /// Sets `max_output_tokens`.
    pub fn max_output_tokens(mut self, value: u64) -> Self {
        self.max_output_tokens = Some(value);
        self
    }

    /// Sets `max_cost_usd`.
    pub fn max_cost_usd(mut self, value: f64) -> Self {
        self.max_cost_usd = Some(value);
        self
    }

    /// Sets `max_tool_calls`.
    pub fn max_tool_calls(mut self, value: u64) -> Self {
        self.max_tool_calls = Some(value);
        self
    }
}

/// Setters, one per option, for building options outside this crate (the struct is
/// `#[non_exhaustive]`, so a struct literal cannot name all of its fields there):
///
/// ```
/// use rlm_client::{Backend, InferOptions};
/// let options = InferOptions::new().backend(Backend::Openai).max_iterations(8).temperature(0.2);
/// assert_eq!(options.max_iterations, Some(8));
/// ```
impl InferOptions {
    /// No overrides: the server's defaults.
    pub fn new() -> Self {
        Self::default()
    }
}

macro_rules! option_setters {
    ($($(#[$doc:meta])* $field:ident: $ty:ty $(as $into:ident)?;)*) => {
        impl InferOptions {
            $(
                $(#[$doc])*
                pub fn $field(mut self, value: option_setters!(@arg $ty $(, $into)?)) -> Self {
                    self.$field = Some(value.into());
                    self
                }
            )*
        }
    };
    (@arg $ty:ty, into) => { impl Into<$ty> };
    (@arg $ty:ty) => { $ty };
}

option_setters! {
    /// Sets `backend`.
    backend: Backend;
    /// Sets `model`, the root model.
    model: String as into;
    /// Sets `sub_model`, the model of `llm_query` sub-calls.
    sub_model: String as into;
    /// Sets `base_url`, of an OpenAI-compatible server.
    base_url: String as into;
    /// Sets `max_iterations` (1..=1000).
    max_iterations: u32;
    /// Sets `max_depth` (1..=10).
    max_depth: u32;
    /// Sets `timeout_s`, the server-side deadline in seconds.
    timeout_s: f64;
    /// Sets `temperature` (0..=2).
    temperature: f64;
    /// Sets `max_tokens`, per model call.
    max_tokens: u32;
    /// Sets `progress` (the client sets it itself when the request has a progress sink).
    progress: bool;
    /// Sets `trajectory`: return the run's steps in [`InferResult::trajectory`].
    trajectory: bool;
    /// Sets `budget`: limits over the request's whole call tree.
    budget: Budget;
    /// Sets `subcall_errors`: whether a failed model call ends the request or reaches model
    /// code.
    subcall_errors: SubcallErrors;
    /// Sets `tool_timeout_s`, the bound of one host tool call in seconds.
    tool_timeout_s: f64;
    /// Sets `answer_schema`: the JSON Schema the answer must match.
    answer_schema: Value;
    /// Sets `answer_repairs`: how many invalid answers the model may fix (0..=100).
    answer_repairs: u32;
}

/// Params of `infer` (`InferParams`). The long input is one of `prompt`, `context_id` (a
/// context stored with `context/load`), or, with `session_id`, the session's REPL, to which an
/// optional `prompt` adds the turn's new input. The client never sends `messages`, the
/// server's alias of `prompt`; it is here so that every valid request decodes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferParams {
    /// The long input.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<Prompt>,
    /// Alias of `prompt` for a message list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Message>>,
    /// A sealed context stored with `context/load`, instead of `prompt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// A turn of this session (`session/open`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<String>,
    /// The short question shown to the root model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// Per-request options.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub options: Option<InferOptions>,
    /// Host tools model code may call (not with `session_id`: a session has its own).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDeclaration>>,
}

/// One host tool as the server is told of it (`ToolDeclaration`): a Python identifier, what
/// it does (for the root model's prompt), and a JSON Schema for its keyword arguments.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolDeclaration {
    /// The function's name in the REPL.
    pub name: String,
    /// What it does.
    pub description: String,
    /// A JSON Schema object; every call's arguments are checked against it by the server.
    pub input_schema: Value,
}

/// Params of the server's `tool/call` request (`ToolCallRequest`): model code of infer
/// `request_id` called tool `name` with `arguments` (valid against its schema).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ToolCallParams {
    /// The infer whose model code made the call.
    pub request_id: Option<Id>,
    /// The tool.
    pub name: String,
    /// Its keyword arguments.
    pub arguments: Value,
}

/// One host tool call in a trajectory (`TrajectoryToolCall`): sizes as JSON, not contents.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrajectoryToolCall {
    /// The tool.
    pub name: String,
    /// Size of its arguments as JSON, in bytes.
    pub arguments_bytes: u64,
    /// Size of its value as JSON, in bytes.
    pub result_bytes: u64,
    /// The `ToolError` message model code got, if any.
    pub error: Option<String>,
    /// How long model code waited, in seconds.
    pub time_s: f64,
}

/// Params of `context/load` (`ContextLoadParams`): exactly one of `text` (a whole text),
/// `messages` (a whole list of any JSON values) and `chunk` (one piece of a text, which
/// starts a new context without `context_id` and continues that one with it; `final: true`
/// seals it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextLoadParams {
    /// A whole text; in the REPL `context` is that string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    /// A whole list: messages, documents or any JSON values; in the REPL `context` is that
    /// list.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub messages: Option<Vec<Value>>,
    /// One piece of a text too long for one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk: Option<String>,
    /// Only with `chunk`: the context it continues.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// Only with `chunk`: the last chunk; the context is sealed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub r#final: Option<bool>,
}

/// The result of `context/load` (`ContextLoadResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextLoadResult {
    /// The context's id: opaque, random, never reused.
    pub context_id: String,
    /// Bytes stored so far: the text in UTF-8, or the list as compact JSON.
    pub bytes: u64,
    /// Hex SHA-256 of those bytes once sealed; `None` while a chunked load is open.
    pub sha256: Option<String>,
    /// Whether the context is complete and can be used.
    pub sealed: bool,
}

/// Params of `context/drop` (`ContextDropParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextDropParams {
    /// The context to drop.
    pub context_id: String,
}

/// The result of `context/drop` (`ContextDropResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextDropResult {
    /// False when no such context was stored.
    pub dropped: bool,
}

/// Params of `context/list` (`ContextListParams`): none.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextListParams {}

/// The result of `context/list` (`ContextListResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextListResult {
    /// The sealed contexts, in the order they were loaded.
    pub contexts: Vec<StoredContext>,
    /// Every byte stored: contexts still being loaded and dropped ones still in use included.
    pub bytes_total: u64,
    /// The server's `--context-store-bytes`.
    pub bytes_limit: u64,
}

/// One sealed context of `context/list` (`ContextListResult.contexts` items).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StoredContext {
    /// Its id.
    pub id: String,
    /// Its size: the text in UTF-8, or the list as compact JSON.
    pub bytes: u64,
    /// Hex SHA-256 of those bytes.
    pub sha256: String,
    /// Requests running or waiting on it, and sessions open on it.
    pub uses: u64,
    /// When it was loaded or last used, Unix epoch milliseconds.
    pub last_used_ms: i64,
}

/// Params of `session/open` (`SessionOpenParams`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionOpenParams {
    /// A sealed context: the session's `context`, held while the session is open.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub context_id: Option<String>,
    /// Host tools every turn's model code may call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<ToolDeclaration>>,
}

/// The result of `session/open` (`SessionOpenResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionOpenResult {
    /// The session's id: opaque, random.
    pub session_id: String,
}

/// Params of `session/close` (`SessionCloseParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionCloseParams {
    /// The session to close.
    pub session_id: String,
}

/// The result of `session/close` (`SessionCloseResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionCloseResult {
    /// False when the session was unknown, closed already or expired.
    pub closed: bool,
}

/// Params of `shutdown` (`ShutdownParams`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ShutdownParams {
    /// How long in-flight requests may run before they are cancelled, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grace_s: Option<f64>,
}

/// Params of the `$/cancelRequest` notification (`CancelParams`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct CancelParams {
    /// The id of the request to cancel.
    pub id: Id,
}

/// Token and cost accounting of one model (`Usage.models` values).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ModelUsage {
    /// Model calls.
    pub calls: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Cost in US dollars: the provider's, or priced from a table; `None` when the price of
    /// a model is unknown.
    pub cost_usd: Option<f64>,
}

/// Token and cost accounting of one `infer` (`Usage`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Usage {
    /// Model calls, root and sub-calls together, at every depth.
    pub calls: u64,
    /// Prompt tokens.
    pub input_tokens: u64,
    /// Completion tokens.
    pub output_tokens: u64,
    /// Cost in US dollars: the provider's, or priced from a table; `None` when the price of
    /// a model is unknown.
    pub cost_usd: Option<f64>,
    /// The same per model name.
    pub models: BTreeMap<String, ModelUsage>,
}

/// How an `infer` ran (`InferResult.metadata`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferMetadata {
    /// Backend used.
    pub backend: String,
    /// Root model used.
    pub model: String,
    /// Root-model iterations run.
    pub iterations: u64,
    /// Recursion depth used.
    pub depth: u64,
    /// Time the server spent, in milliseconds.
    pub elapsed_ms: f64,
    /// Backend attempts, including the server's own retries.
    pub attempts: u64,
    /// Model calls that failed after the server's retries and reached model code
    /// (`subcall_errors: model`); 0 otherwise.
    #[serde(default)]
    pub failed_calls: u64,
}

/// The result of `infer` (`InferResult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct InferResult {
    /// The answer; with `options.answer_schema`, the compact JSON of [`InferResult::value`].
    pub text: String,
    /// With `options.answer_schema`: the answer, valid against that schema. `None` without
    /// one, and for a stub answer. ([`InferResult::answer`] decodes it into a type.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<Value>,
    /// True only when the server runs in stub mode (no usable backend) and `text` is the
    /// stub message, not an answer.
    pub stub: bool,
    /// Token and cost accounting.
    pub usage: Usage,
    /// How the run went.
    pub metadata: InferMetadata,
    /// The run's steps, when `options.trajectory` was true.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trajectory: Option<Vec<TrajectoryStep>>,
}

impl InferResult {
    /// The structured answer ([`InferResult::value`]) decoded into `T`: the server checked it
    /// against `options.answer_schema`, `T` is the caller's reading of that schema.
    ///
    /// ```
    /// use rlm_client::InferResult;
    /// #[derive(serde::Deserialize)]
    /// struct Found {
    ///     code: String,
    ///     line: u32,
    /// }
    /// # let result: InferResult = serde_json::from_value(serde_json::json!({
    /// #     "text": "{\"code\":\"ZEBRA-42\",\"line\":21}", "value": {"code": "ZEBRA-42", "line": 21},
    /// #     "stub": false,
    /// #     "usage": {"calls": 1, "input_tokens": 9, "output_tokens": 9, "cost_usd": null, "models": {}},
    /// #     "metadata": {"backend": "openai", "model": "m", "iterations": 1, "depth": 1,
    /// #                  "elapsed_ms": 1.0, "attempts": 1}})).unwrap();
    /// let found: Found = result.answer()?;
    /// assert_eq!((found.code.as_str(), found.line), ("ZEBRA-42", 21));
    /// # Ok::<(), rlm_client::RlmError>(())
    /// ```
    ///
    /// # Errors
    ///
    /// [`crate::RlmError::Answer`] when there is no value (no `answer_schema`, or a stub
    /// answer) or it does not decode into `T`.
    pub fn answer<T: DeserializeOwned>(&self) -> Result<T, crate::RlmError> {
        let value = self.value.as_ref().ok_or_else(|| {
            crate::RlmError::Answer("the result has no value: no answer_schema, or a stub".into())
        })?;
        T::deserialize(value).map_err(|error| crate::RlmError::Answer(error.to_string()))
    }
}

/// One iteration of the root model (`TrajectoryStep`): what it said, the code it ran and what
/// that printed, its sub-calls. Every string is cut to at most 4096 characters (a cut one ends
/// with `…[truncated N chars]`); the context and the REPL's variables are never included.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrajectoryStep {
    /// 1 for the first iteration.
    pub iteration: u64,
    /// The root model's reply.
    pub response: String,
    /// The code blocks it ran, in order.
    pub code_blocks: Vec<TrajectoryCodeBlock>,
    /// The answer, when this iteration set it.
    pub final_answer: Option<String>,
    /// How long the iteration took, in seconds.
    pub iteration_time_s: Option<f64>,
    /// The host tool calls its code made (absent from servers without host tools).
    #[serde(default)]
    pub tool_calls: Vec<TrajectoryToolCall>,
}

/// One code block of an iteration (`TrajectoryCodeBlock`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrajectoryCodeBlock {
    /// The code.
    pub code: String,
    /// What it printed.
    pub stdout: String,
    /// What it wrote to stderr.
    pub stderr: String,
    /// How long it ran, in seconds.
    pub execution_time_s: Option<f64>,
    /// The model calls it made.
    pub sub_calls: Vec<TrajectorySubCall>,
}

/// A model call made by code (`TrajectorySubCall`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct TrajectorySubCall {
    /// The model called.
    pub model: String,
    /// Its prompt.
    pub prompt: String,
    /// Its answer.
    pub response: String,
    /// Tokens in.
    pub input_tokens: u64,
    /// Tokens out.
    pub output_tokens: u64,
    /// How long it took, in seconds.
    pub execution_time_s: Option<f64>,
}

/// Latency summary over the server's rolling window (`LatencySummary`), in milliseconds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct LatencySummary {
    /// Mean.
    pub avg: f64,
    /// Median.
    pub p50: f64,
    /// 95th percentile.
    pub p95: f64,
    /// 99th percentile.
    pub p99: f64,
}

/// The server's own counters (`ServerMetrics`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ServerMetrics {
    /// `infer` requests admitted or answered.
    pub total_requests: u64,
    /// Answered with a real (non-stub) result.
    pub successful_requests: u64,
    /// Answered with an error.
    pub failed_requests: u64,
    /// Cancelled by `$/cancelRequest` or shutdown.
    pub cancelled_requests: u64,
    /// Past their deadline.
    pub timed_out_requests: u64,
    /// Answered in stub mode.
    pub stub_responses: u64,
    /// Model calls the server retried (each call is retried on its own).
    pub total_retries: u64,
    /// Latency of the last 1000 `infer`s.
    pub latency_ms: LatencySummary,
    /// Model calls made over the server's lifetime (every request, every depth).
    pub total_calls: u64,
    /// Prompt tokens over the server's lifetime.
    pub total_input_tokens: u64,
    /// Completion tokens over the server's lifetime.
    pub total_output_tokens: u64,
    /// Cost in US dollars over the server's lifetime; `None` while no call had a known price.
    pub total_cost_usd: Option<f64>,
}

/// The result of `status` (`StatusResult`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct StatusResult {
    /// Always `rlm-server`.
    pub server: String,
    /// Server version.
    pub version: String,
    /// Protocol version, `1`.
    pub protocol: String,
    /// Whether the configured backend can be used.
    pub available: bool,
    /// Whether `infer` answers stubs.
    pub stub: bool,
    /// Why the backend is unavailable, when it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Configured backend.
    pub backend: String,
    /// Configured root model.
    pub model: String,
    /// REPL environment (`local`, `docker`, ...).
    pub environment: String,
    /// The `--sandbox` level.
    pub sandbox: SandboxLevel,
    /// What confines model code on this machine, in the order it is applied.
    pub protections: Vec<Protection>,
    /// Default iteration limit.
    pub max_iterations: u64,
    /// Default depth limit.
    pub max_depth: u64,
    /// Completions run at once.
    pub max_concurrency: u64,
    /// Model calls one request may have in flight at once (`--max-calls-in-flight`).
    pub max_calls_in_flight: u64,
    /// The longest answer an `infer` returns, in UTF-8 bytes (`--max-answer-bytes`).
    pub max_answer_bytes: u64,
    /// Completions running now.
    pub in_flight: u64,
    /// Requests waiting for a slot.
    pub queued: u64,
    /// Seconds since start.
    pub uptime_s: f64,
    /// Counters.
    pub metrics: ServerMetrics,
    /// The stored contexts.
    pub contexts: ContextStoreStatus,
    /// The open sessions.
    pub sessions: SessionsStatus,
    /// Where completions run, with `--executor ray`: the cluster's nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub executor: Option<ExecutorStatus>,
}

/// `StatusResult.executor`: present with `--executor ray`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecutorStatus {
    /// `ray`, or `local` when the cluster could not be reached and `--executor ray,local`
    /// let the server run completions itself.
    pub kind: ExecutorKind,
    /// The nodes that have a node agent.
    pub nodes: Vec<ExecutorNode>,
}

wire_enum! {
    /// `ExecutorStatus.kind`.
    ExecutorKind {
        /// On the nodes of a Ray cluster.
        Ray = "ray",
        /// On the server's own machine.
        Local = "local",
    }
}

/// One node of `ExecutorStatus.nodes`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ExecutorNode {
    /// Ray's node id.
    pub node_id: String,
    /// The node's address.
    pub address: String,
    /// Completions this node runs at once.
    pub slots: u64,
    /// Completions running on it now.
    pub in_flight: u64,
    /// What confines model code on this node.
    pub protections: Vec<Protection>,
    /// Stored contexts it fetched from the object store (once each).
    pub contexts_read: u64,
}

/// `StatusResult.contexts`: what `context/list` lists, in short.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ContextStoreStatus {
    /// Sealed stored contexts.
    pub count: u64,
    /// `bytes_total` of `context/list`.
    pub bytes: u64,
}

/// `StatusResult.sessions`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SessionsStatus {
    /// Open sessions.
    pub count: u64,
}

wire_enum! {
    /// The server's `--sandbox` level (`sandbox` of `ready` and `status`).
    SandboxLevel {
        /// Every protection, or the server refuses to start.
        Strict = "strict",
        /// What the machine offers; the server warns of the rest.
        Auto = "auto",
        /// None (for REPL environments that sandbox model code themselves).
        Off = "off",
    }
}

wire_enum! {
    /// One protection around model code in force on the server's machine (`Protection`; the
    /// repository README's Security section says what each one guarantees).
    Protection {
        /// A root server's workers run as `nobody`, never as the server's uid.
        UnprivilegedUid = "unprivileged_uid",
        /// A user namespace per worker.
        UserNamespace = "user_namespace",
        /// A PID namespace per worker.
        PidNamespace = "pid_namespace",
        /// A network namespace per worker: no network.
        NetworkNamespace = "network_namespace",
        /// An IPC namespace per worker.
        IpcNamespace = "ipc_namespace",
        /// Its directory is a tmpfs of `--worker-disk-mb` in a mount namespace of its own.
        DiskLimit = "disk_limit",
        /// No capability in any set.
        NoCapabilities = "no_capabilities",
        /// No way to gain privileges.
        NoNewPrivs = "no_new_privs",
        /// Server, zygote and workers refuse ptrace and `/proc/PID/mem`.
        NotDumpable = "not_dumpable",
        /// Landlock: reads only the interpreter and system files, writes only its directory.
        LandlockFilesystem = "landlock_filesystem",
        /// Landlock: signals and abstract sockets scoped to itself.
        LandlockSignals = "landlock_signals",
        /// seccomp: cannot clear its parent-death signal.
        Seccomp = "seccomp",
        /// seccomp: no AF_UNIX socket but its own socketpairs, no io_uring.
        NoUnixSockets = "no_unix_sockets",
        /// seccomp: no memfd and no System V shared memory.
        NoSharedMemory = "no_shared_memory",
        /// Limits on open files, file size, CPU time and core files.
        ResourceLimits = "resource_limits",
        /// A bound on its processes and threads.
        ProcessLimit = "process_limit",
        /// A directory of its own as working directory and `TMPDIR`.
        PrivateTmp = "private_tmp",
        /// Its fds 1 and 2 are a pipe the server drains into its log.
        PrivateOutput = "private_output",
    }
}

/// The result of `shutdown` (`ShutdownResult`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ShutdownResult {
    /// Always true.
    pub shutdown: bool,
}

/// Params of the `ready` notification, the first line the server writes (`ReadyNotification`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ReadyParams {
    /// Always `rlm-server`.
    pub server: String,
    /// Server version.
    pub version: String,
    /// Protocol version; this client speaks `1`.
    pub protocol: String,
    /// The server's process id.
    pub pid: u32,
    /// Whether the configured backend can be used.
    pub available: bool,
    /// Whether `infer` answers stubs.
    pub stub: bool,
    /// Configured backend.
    pub backend: String,
    /// Configured root model.
    pub model: String,
    /// REPL environment.
    pub environment: String,
    /// The `--sandbox` level.
    pub sandbox: SandboxLevel,
    /// What confines model code on this machine, in the order it is applied.
    pub protections: Vec<Protection>,
}

wire_enum! {
    /// What a `$/progress` notification reports.
    ProgressEvent {
        /// The request got a worker and began.
        Started = "started",
        /// A root-model iteration finished.
        Iteration = "iteration",
        /// Model code made a sub-call.
        Subcall = "subcall",
        /// A backend call failed and is being retried.
        Retry = "retry",
    }
}

/// Params of a `$/progress` notification (`ProgressNotification`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct Progress {
    /// The wire id of the `infer` request (a retry has a new id).
    pub id: Id,
    /// What happened.
    pub event: ProgressEvent,
    /// The iteration that finished, for `iteration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iteration: Option<u32>,
    /// The iteration limit, for `iteration`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_iterations: Option<u32>,
    /// Milliseconds since the request began.
    pub elapsed_ms: f64,
    /// A short human-readable note.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

wire_enum! {
    /// The stable `data.type` of an error (`ErrorType`).
    ErrorType {
        /// -32700: not JSON.
        ParseError = "parse_error",
        /// -32600: not a JSON-RPC 2.0 request.
        InvalidRequest = "invalid_request",
        /// -32600: a line above the server's size limit.
        LineTooLong = "line_too_long",
        /// -32601: unknown method.
        MethodNotFound = "method_not_found",
        /// -32602: invalid params; `field` names the offender.
        InvalidParams = "invalid_params",
        /// -32603: internal error.
        InternalError = "internal_error",
        /// -32603: the worker running the request crashed.
        WorkerCrashed = "worker_crashed",
        /// -32603: the answer is longer than `--max-answer-bytes` (`data.limit_bytes`).
        AnswerTooLarge = "answer_too_large",
        /// -32000: the backend failed after the server's retries.
        BackendError = "backend_error",
        /// -32000: `--replay` has no recorded answer for a model call (`data.hash` names it).
        ReplayMiss = "replay_miss",
        /// -32001: deadline exceeded.
        DeadlineExceeded = "deadline_exceeded",
        /// -32002: the server is shutting down.
        ShuttingDown = "shutting_down",
        /// -32002: the admission queue is full.
        QueueFull = "queue_full",
        /// -32003: backend unavailable in strict mode.
        BackendUnavailable = "backend_unavailable",
        /// -32004: a budget was exhausted.
        BudgetExceeded = "budget_exceeded",
        /// -32005: the context store is full even after evicting every unused context.
        ContextStoreFull = "context_store_full",
        /// -32006: the answer did not match `options.answer_schema`, its repairs spent.
        InvalidAnswer = "invalid_answer",
        /// -32800: cancelled.
        Cancelled = "cancelled",
    }
}

wire_enum! {
    /// The budget limit a -32004 error names in `data.limit`.
    BudgetLimit {
        /// `max_calls`.
        MaxCalls = "max_calls",
        /// `max_input_tokens`.
        MaxInputTokens = "max_input_tokens",
        /// `max_output_tokens`.
        MaxOutputTokens = "max_output_tokens",
        /// `max_cost_usd`.
        MaxCostUsd = "max_cost_usd",
        /// `max_tool_calls`: host tool calls.
        MaxToolCalls = "max_tool_calls",
    }
}

/// `data.limit` of an error: a number for `line_too_long` and `queue_full`, the name of the
/// budget limit that was reached for -32004.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
#[non_exhaustive]
pub enum Limit {
    /// `line_too_long`: the server's line limit in bytes; `queue_full`: the most requests
    /// that may wait.
    Count(u64),
    /// -32004: which budget limit was reached.
    Budget(BudgetLimit),
}

impl Limit {
    /// The number, for `line_too_long` and `queue_full`.
    pub fn count(&self) -> Option<u64> {
        match self {
            Limit::Count(count) => Some(*count),
            Limit::Budget(_) => None,
        }
    }

    /// The budget limit, for -32004.
    pub fn budget(&self) -> Option<&BudgetLimit> {
        match self {
            Limit::Budget(limit) => Some(limit),
            Limit::Count(_) => None,
        }
    }
}

wire_enum! {
    /// Whose limit a -32004 error reached (`data.scope`).
    BudgetScope {
        /// The request's own `options.budget` (or the server's default per request).
        Request = "request",
        /// The server's lifetime spend limit.
        Server = "server",
    }
}

/// The `data` of an error (`ErrorData`). The schema leaves it open, so members it does not
/// name are kept in `extra`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct ErrorData {
    /// The stable error type.
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// -32602: the offending field, dotted (`options.max_depth`); `context_id` or
    /// `session_id` for an id that names nothing usable.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    /// -32000: whether the request may be retried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retryable: Option<bool>,
    /// -32000: how many times the model call that failed was tried.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempts: Option<u64>,
    /// -32000: the backend's HTTP status, when it gave one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<i64>,
    /// `line_too_long`: the server's line limit in bytes; `queue_full`: the most requests
    /// that may wait; -32004: the budget limit that was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<Limit>,
    /// `queue_full`: the most prompt bytes that may wait; -32005: the server's
    /// `--context-store-bytes`; `answer_too_large`: its `--max-answer-bytes`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit_bytes: Option<u64>,
    /// `replay_miss`: the SHA-256 of the model call nothing was recorded for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// -32001: the deadline that passed, in seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_s: Option<f64>,
    /// A short cause.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// -32601: the unknown method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// -32004: the value of the limit that was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f64>,
    /// -32004: whether the request's budget or the server's lifetime limit was reached.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<BudgetScope>,
    /// -32006: why the last answer did not match the schema (at most 1000 characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub validation_error: Option<String>,
    /// What the request spent before it ended: on every error that ends an `infer` after a
    /// model call was made (cancelled, timed out, failed, over budget, an invalid answer).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Members the schema does not name.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

/// A JSON-RPC error object (`Error`), kept whole in [`crate::RlmError`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct RpcError {
    /// The JSON-RPC code (-32700 ... -32800).
    pub code: i64,
    /// A short human-readable message.
    pub message: String,
    /// Structured detail.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<ErrorData>,
}

impl RpcError {
    /// The `data.type`, when the server sent `data`.
    pub fn kind(&self) -> Option<&ErrorType> {
        self.data.as_ref().map(|data| &data.kind)
    }
}

impl std::fmt::Display for RpcError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} (code {}", self.message, self.code)?;
        if let Some(data) = &self.data {
            write!(f, ", {}", serde_json::to_string(data).unwrap_or_default())?;
        }
        write!(f, ")")
    }
}

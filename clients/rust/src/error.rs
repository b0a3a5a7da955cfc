//! [`RlmError`]: one variant per class of failure, with the server's JSON-RPC error kept whole.

use std::time::Duration;

use crate::protocol::{ErrorType, RpcError, Usage};

/// Everything that can go wrong in a call.
///
/// The first group is the client's own (spawning, the child's life, timeouts); the second
/// mirrors the server's error codes one to one and keeps the JSON-RPC error, so `code`,
/// `message` and `data` (with its stable `data.type`) stay available through
/// [`RlmError::rpc`]. The error object is boxed to keep `Result`s small.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RlmError {
    /// The server command could not be started.
    #[error("could not start the server `{command}`: {source}")]
    Spawn {
        /// The command that was run.
        command: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// The server did not send its `ready` notification in time; it was killed.
    #[error("the server did not send `ready` within {0:?}")]
    ReadyTimeout(Duration),
    /// The server process exited (or closed its output) before it sent `ready`: it could not
    /// start (a bad setting, a missing dependency). The text has its exit status and last
    /// stderr line. Not retried: the next attempt would most likely fail the same way.
    #[error("the server exited before it was ready: {0}")]
    StartFailed(String),
    /// The server process exited (or closed its output) while the call was pending. The next
    /// call starts a new one; an `infer` is retried (see [`RlmError::is_retryable`]).
    #[error("the server exited: {0}")]
    Exited(String),
    /// No answer within the call's timeout. The client has sent `$/cancelRequest`.
    #[error("no answer within {0:?}; the request was cancelled")]
    Timeout(Duration),
    /// The server was stopped by [`crate::RlmClient::close`] (or the client was dropped)
    /// before it answered.
    #[error("the server was closed before it answered")]
    Closed,
    /// The server sent something this client cannot read (wrong protocol version, an answer
    /// that does not match the schema). A malformed answer fails its own call at once.
    #[error("protocol violation: {0}")]
    Protocol(String),
    /// The server's answer to this call (or a line whose id could not be read, which fails
    /// every pending call) was longer than [`crate::RlmConfig::max_line_bytes`]; it was
    /// discarded without being kept in memory.
    #[error("the server sent a line of more than {limit} bytes")]
    LineTooLong {
        /// The limit that was exceeded, in bytes.
        limit: usize,
    },
    /// The source of [`crate::RlmClient::load_context`] could not be read (a file that
    /// cannot be opened, a reader that failed). What was loaded of it is dropped.
    #[error("could not read the context to load: {0}")]
    Read(#[source] std::io::Error),
    /// The bytes of [`crate::RlmClient::load_context`]'s reader or file are not UTF-8 (or
    /// end inside a character). What was loaded of it is dropped.
    #[error("the context to load is not UTF-8: bad byte sequence at byte {offset}")]
    InvalidUtf8 {
        /// Where the first byte that is not part of a character is, counted from the start
        /// of the source.
        offset: u64,
    },
    /// -32700: the server could not parse a line as JSON.
    #[error("parse error: {0}")]
    ParseError(Box<RpcError>),
    /// -32600: not a valid JSON-RPC request, or a line above the server's size limit.
    #[error("invalid request: {0}")]
    InvalidRequest(Box<RpcError>),
    /// -32601: unknown method.
    #[error("method not found: {0}")]
    MethodNotFound(Box<RpcError>),
    /// -32602: invalid params; `data.field` names the offending field ([`RlmError::field`]):
    /// `context_id` or `session_id` for an id the server does not know (never loaded or
    /// opened, dropped, evicted, closed, expired, or made by a server that has since exited).
    #[error("invalid params: {0}")]
    InvalidParams(Box<RpcError>),
    /// -32603: internal error, the worker running the request crashed
    /// (`data.type == worker_crashed`), or its answer was longer than the server's
    /// `--max-answer-bytes` (`data.type == answer_too_large`). The server keeps running.
    #[error("internal server error: {0}")]
    Internal(Box<RpcError>),
    /// -32000: the LLM backend failed after the server's own retries. Never retried by the
    /// client, whatever `data.retryable` says: the server has spent its retries already.
    #[error("backend error: {0}")]
    Backend(Box<RpcError>),
    /// -32001: the server-side deadline (`options.timeout_s` or the server default) passed.
    #[error("deadline exceeded: {0}")]
    DeadlineExceeded(Box<RpcError>),
    /// -32002: the server is shutting down or its admission queue is full (`data.type`).
    #[error("request rejected: {0}")]
    Rejected(Box<RpcError>),
    /// -32003: the backend is unavailable and the server runs in strict mode.
    #[error("backend unavailable: {0}")]
    BackendUnavailable(Box<RpcError>),
    /// -32004: a budget was exhausted. `data.limit` names the limit reached
    /// ([`crate::protocol::Limit::Budget`]), `data.max` its value, `data.scope` whether it was
    /// the request's ([`crate::InferOptions::budget`]) or the server's lifetime limit, and
    /// `data.usage` what the request had spent ([`RlmError::usage`]). Never retried: the same
    /// request would meet the same limit.
    #[error("budget exceeded: {0}")]
    BudgetExceeded(Box<RpcError>),
    /// -32005: a `context/load` would not fit in the server's context store even after it
    /// evicted every stored context that nothing uses; nothing was stored or evicted.
    /// `data.limit_bytes` is the store's size. Never retried: only dropping a context
    /// ([`crate::RlmClient::drop_context`]) makes room.
    #[error("context store full: {0}")]
    ContextStoreFull(Box<RpcError>),
    /// -32006: the answer never matched `options.answer_schema`, after `answer_repairs`
    /// repairs. `data.validation_error` says why the last one did not ([`RlmError::rpc`]),
    /// `data.usage` what was spent. Never retried: the same request would most likely fail the
    /// same way.
    #[error("invalid answer: {0}")]
    InvalidAnswer(Box<RpcError>),
    /// [`crate::InferResult::answer`]: the result has no value (the request had no
    /// `answer_schema`, or the server answered in stub mode), or its value does not decode
    /// into the type asked for.
    #[error("the answer does not decode: {0}")]
    Answer(String),
    /// -32800: the request was cancelled (by `$/cancelRequest` or by a server shutdown).
    #[error("cancelled: {0}")]
    Cancelled(Box<RpcError>),
    /// An error code this client does not know.
    #[error("server error: {0}")]
    Rpc(Box<RpcError>),
}

impl RlmError {
    /// The variant for a JSON-RPC error from the server, chosen by its code.
    pub fn from_rpc(error: RpcError) -> Self {
        let error = Box::new(error);
        match error.code {
            -32700 => RlmError::ParseError(error),
            -32600 => RlmError::InvalidRequest(error),
            -32601 => RlmError::MethodNotFound(error),
            -32602 => RlmError::InvalidParams(error),
            -32603 => RlmError::Internal(error),
            -32000 => RlmError::Backend(error),
            -32001 => RlmError::DeadlineExceeded(error),
            -32002 => RlmError::Rejected(error),
            -32003 => RlmError::BackendUnavailable(error),
            -32004 => RlmError::BudgetExceeded(error),
            -32005 => RlmError::ContextStoreFull(error),
            -32006 => RlmError::InvalidAnswer(error),
            -32800 => RlmError::Cancelled(error),
            _ => RlmError::Rpc(error),
        }
    }

    /// The server's JSON-RPC error, when the server answered with one.
    pub fn rpc(&self) -> Option<&RpcError> {
        match self {
            RlmError::ParseError(e)
            | RlmError::InvalidRequest(e)
            | RlmError::MethodNotFound(e)
            | RlmError::InvalidParams(e)
            | RlmError::Internal(e)
            | RlmError::Backend(e)
            | RlmError::DeadlineExceeded(e)
            | RlmError::Rejected(e)
            | RlmError::BackendUnavailable(e)
            | RlmError::BudgetExceeded(e)
            | RlmError::ContextStoreFull(e)
            | RlmError::InvalidAnswer(e)
            | RlmError::Cancelled(e)
            | RlmError::Rpc(e) => Some(e),
            _ => None,
        }
    }

    /// The JSON-RPC error code, when the server answered with one.
    pub fn code(&self) -> Option<i64> {
        self.rpc().map(|e| e.code)
    }

    /// The param the server refused (`data.field` of -32602), dotted: `options.max_depth`,
    /// or `context_id` / `session_id` for an id that names nothing usable.
    pub fn field(&self) -> Option<&str> {
        self.rpc()?.data.as_ref()?.field.as_deref()
    }

    /// What the request spent before the server ended it with this error (`data.usage`):
    /// sent on every error that ends an `infer` after a model call was made (over budget,
    /// failed, timed out or cancelled on the server). `None` when no model call was made, and
    /// for the client's own errors (its timeout, a dropped future, a dead child), which do not
    /// wait for the server's answer.
    pub fn usage(&self) -> Option<&Usage> {
        self.rpc()?.data.as_ref()?.usage.as_ref()
    }

    /// Whether the client retries this error: only what the server could not start, so that
    /// a retry never repeats work (and spending) the server has done. That is a full admission
    /// queue (-32002 `queue_full`) and a server that exited while the call was pending
    /// ([`RlmError::Exited`]). Nothing else: not a backend error (-32000, whatever its
    /// `data.retryable` says: the server retries the backend itself, with
    /// `ELIZA_RLM_MAX_RETRIES`), a cancellation, a deadline, invalid params, a worker crash, a
    /// shutdown, a full context store or a server that could not start. (A request that names
    /// a stored context or a session is not retried after the server exited either: what it
    /// names died with that server.)
    pub fn is_retryable(&self) -> bool {
        match self {
            RlmError::Rejected(e) => e.kind() == Some(&ErrorType::QueueFull),
            RlmError::Exited(_) => true,
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{BudgetLimit, BudgetScope, Limit};
    use serde_json::json;

    fn rpc(value: serde_json::Value) -> RpcError {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn codes_map_to_variants_and_keep_the_error() {
        let error = RlmError::from_rpc(rpc(json!({
            "code": -32602, "message": "bad", "data": {"type": "invalid_params", "field": "options.max_depth"}
        })));
        assert!(matches!(error, RlmError::InvalidParams(_)));
        assert_eq!(error.code(), Some(-32602));
        let data = error.rpc().unwrap().data.as_ref().unwrap();
        assert_eq!(data.field.as_deref(), Some("options.max_depth"));
        assert_eq!(error.field(), Some("options.max_depth"));
        assert_eq!(RlmError::Closed.field(), None);
        assert!(matches!(
            RlmError::from_rpc(rpc(json!({"code": -31999, "message": "new"}))),
            RlmError::Rpc(_)
        ));
    }

    #[test]
    fn only_a_full_queue_and_an_exited_server_are_retried() {
        let retryable = |v| RlmError::from_rpc(rpc(v)).is_retryable();
        assert!(!retryable(
            json!({"code": -32000, "message": "m", "data": {"type": "backend_error", "retryable": true}})
        ));
        assert!(!retryable(
            json!({"code": -32000, "message": "m", "data": {"type": "backend_error", "retryable": false}})
        ));
        assert!(!retryable(json!({"code": -32000, "message": "m"})));
        assert!(retryable(
            json!({"code": -32002, "message": "m", "data": {"type": "queue_full"}})
        ));
        assert!(!retryable(
            json!({"code": -32002, "message": "m", "data": {"type": "shutting_down"}})
        ));
        assert!(!retryable(
            json!({"code": -32800, "message": "m", "data": {"type": "cancelled"}})
        ));
        assert!(!retryable(
            json!({"code": -32001, "message": "m", "data": {"type": "deadline_exceeded"}})
        ));
        assert!(!retryable(
            json!({"code": -32602, "message": "m", "data": {"type": "invalid_params"}})
        ));
        assert!(!retryable(
            json!({"code": -32004, "message": "m", "data": {"type": "budget_exceeded", "limit": "max_calls"}})
        ));
        assert!(!retryable(
            json!({"code": -32603, "message": "m", "data": {"type": "worker_crashed"}})
        ));
        assert!(!retryable(
            json!({"code": -32005, "message": "m", "data": {"type": "context_store_full", "limit_bytes": 8}})
        ));
        assert!(!RlmError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(RlmError::Exited("signal: 9".into()).is_retryable());
        assert!(!RlmError::StartFailed("exit status: 2".into()).is_retryable());
        assert!(!RlmError::Closed.is_retryable());
        assert!(!RlmError::Protocol("bad".into()).is_retryable());
    }

    #[test]
    fn a_budget_error_names_its_limit_and_keeps_the_usage() {
        let error = RlmError::from_rpc(rpc(json!({
            "code": -32004, "message": "Budget exceeded", "data": {
                "type": "budget_exceeded", "limit": "max_cost_usd", "max": 0.5, "scope": "server",
                "usage": {"calls": 2, "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.51,
                          "models": {"m": {"calls": 2, "input_tokens": 10, "output_tokens": 3, "cost_usd": 0.51}}}
            }
        })));
        assert!(matches!(error, RlmError::BudgetExceeded(_)), "{error}");
        let data = error.rpc().unwrap().data.as_ref().unwrap();
        assert_eq!(data.kind, ErrorType::BudgetExceeded);
        assert_eq!(
            data.limit.as_ref().and_then(Limit::budget),
            Some(&BudgetLimit::MaxCostUsd)
        );
        assert_eq!(data.limit.as_ref().and_then(Limit::count), None);
        assert_eq!(
            (data.max, data.scope.as_ref()),
            (Some(0.5), Some(&BudgetScope::Server))
        );
        assert_eq!(
            error.usage().map(|u| (u.calls, u.cost_usd)),
            Some((2, Some(0.51)))
        );
        assert!(
            RlmError::from_rpc(rpc(
                json!({"code": -32000, "message": "m", "data": {"type": "backend_error"}})
            ))
            .usage()
            .is_none()
        );
        assert!(RlmError::Closed.usage().is_none());
    }

    #[test]
    fn a_limit_is_a_count_or_a_name() {
        let count = rpc(
            json!({"code": -32002, "message": "m", "data": {"type": "queue_full", "limit": 64}}),
        );
        let limit = count.data.unwrap().limit.unwrap();
        assert_eq!((limit.count(), limit.budget()), (Some(64), None));
        let name = rpc(
            json!({"code": -32004, "message": "m", "data": {"type": "budget_exceeded", "limit": "max_brand_new"}}),
        );
        let limit = name.data.unwrap().limit.unwrap();
        assert_eq!(
            limit,
            Limit::Budget(BudgetLimit::Unknown("max_brand_new".into()))
        );
        assert_eq!(
            serde_json::to_value(&limit).unwrap(),
            json!("max_brand_new")
        );
        assert_eq!(serde_json::to_value(Limit::Count(7)).unwrap(), json!(7));
    }

    #[test]
    fn unknown_error_types_still_decode() {
        let error =
            rpc(json!({"code": -32603, "message": "m", "data": {"type": "brand_new", "hint": 1}}));
        let data = error.data.unwrap();
        assert_eq!(data.kind, ErrorType::Unknown("brand_new".into()));
        assert_eq!(data.extra["hint"], 1);
        assert_eq!(
            serde_json::to_value(&data).unwrap(),
            json!({"type": "brand_new", "hint": 1}),
            "encodes back as it came"
        );
    }
}

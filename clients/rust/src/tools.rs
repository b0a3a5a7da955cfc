//! Host tools: async functions of this process that model code in the server's REPL calls.
//!
//! A request declares them ([`crate::InferRequest::tool`], or a session's
//! [`crate::SessionRequest::tool`]); for each call model code makes, the server checks the
//! arguments against the tool's schema and sends a `tool/call` request (an id of its own,
//! `tool-N`). The handler runs in a task of its own, so calls run concurrently; its value is
//! the answer, and its error becomes a JSON-RPC error whose message model code gets as
//! `ToolError`. The server's `$/cancelRequest` for a call (its infer was cancelled or timed
//! out, or the call passed `tool_timeout_s`) aborts the task: the handler's future is dropped.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};

use serde_json::{Value, json};
use tokio::task::AbortHandle;

use crate::protocol::ToolDeclaration;

type ToolFuture = Pin<Box<dyn Future<Output = Result<Value, String>> + Send>>;
type Handler = Arc<dyn Fn(Value) -> ToolFuture + Send + Sync>;

/// The code of a tool's error answer: the handler failed; model code sees only the message.
pub(crate) const TOOL_ERROR_CODE: i64 = -32000;

/// One request's (or session's) tools: what the server is told, and the handlers.
#[derive(Clone, Default)]
pub(crate) struct Tools {
    declarations: Vec<ToolDeclaration>,
    handlers: HashMap<String, Handler>,
}

impl Tools {
    /// Adds (or replaces) a tool.
    pub(crate) fn add<F, Fut, E>(
        &mut self,
        name: String,
        description: String,
        schema: Value,
        handler: F,
    ) where
        F: Fn(Value) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Value, E>> + Send + 'static,
        E: fmt::Display,
    {
        let handler: Handler = Arc::new(move |arguments| {
            let call = handler(arguments);
            Box::pin(async move { call.await.map_err(|error| error.to_string()) })
        });
        self.declarations.retain(|declared| declared.name != name);
        self.declarations.push(ToolDeclaration {
            name: name.clone(),
            description,
            input_schema: schema,
        });
        self.handlers.insert(name, handler);
    }

    /// The wire's `tools`, when there are any.
    pub(crate) fn declarations(&self) -> Option<Vec<ToolDeclaration>> {
        (!self.declarations.is_empty()).then(|| self.declarations.clone())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.handlers.is_empty()
    }

    fn handler(&self, name: &str) -> Option<Handler> {
        self.handlers.get(name).cloned()
    }
}

impl fmt::Debug for Tools {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.declarations.iter().map(|declared| &declared.name))
            .finish()
    }
}

/// The tool calls running on one connection, by the server's id, so that its
/// `$/cancelRequest` can abort them.
#[derive(Default)]
pub(crate) struct Running {
    tasks: Mutex<HashMap<String, AbortHandle>>,
}

impl Running {
    /// Runs `name`'s handler from `tools` on `arguments` in a task of its own; `answer` gets
    /// the response line (never sent for a call that was cancelled).
    pub(crate) fn start(
        self: &Arc<Self>,
        id: String,
        name: &str,
        arguments: Value,
        tools: Option<&Tools>,
        answer: impl Fn(String) + Send + 'static,
    ) {
        let Some(handler) = tools.and_then(|tools| tools.handler(name)) else {
            answer(response(
                &id,
                Err(format!("no handler for tool {name:?} in this client")),
            ));
            return;
        };
        let running = self.clone();
        let mut tasks = self.tasks.lock().unwrap_or_else(PoisonError::into_inner);
        let task_id = id.clone();
        let task = tokio::spawn(async move {
            let outcome = handler(arguments).await;
            let finished = running
                .tasks
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(&task_id);
            if finished.is_some() {
                answer(response(&task_id, outcome));
            }
        });
        tasks.insert(id, task.abort_handle());
    }

    /// The server's `$/cancelRequest` for tool call `id`.
    pub(crate) fn cancel(&self, id: &str) {
        let task = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
        if let Some(task) = task {
            task.abort();
        }
    }

    /// The connection is gone: abort every call still running.
    pub(crate) fn abort_all(&self) {
        let tasks: Vec<_> = self
            .tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        for (_, task) in tasks {
            task.abort();
        }
    }
}

/// The answer to tool call `id`: its value, or an error whose message model code gets.
pub(crate) fn response(id: &str, outcome: Result<Value, String>) -> String {
    let message = match outcome {
        Ok(value) => json!({"jsonrpc": "2.0", "id": id, "result": value}),
        Err(message) => json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": TOOL_ERROR_CODE, "message": message},
        }),
    };
    message.to_string()
}

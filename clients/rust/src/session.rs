//! [`Session`]: one REPL on the server that lives across `infer` turns.

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::client::RlmClient;
use crate::connection::Connection;
use crate::error::RlmError;
use crate::protocol::{InferResult, SessionCloseParams, SessionCloseResult};
use crate::request::{InferRequest, encode_params};
use crate::tools::Tools;

/// What [`RlmClient::open_session_with`] opens: a session on a stored context, or on none,
/// with host tools every turn's model code may call.
///
/// ```
/// use rlm_client::SessionRequest;
/// use serde_json::{Value, json};
/// let request = SessionRequest::new().context("ctx-...").tool(
///     "remember",
///     "Store a note in the agent's memory.",
///     json!({"type": "object", "properties": {"note": {"type": "string"}}}),
///     |args: Value| async move { Ok::<_, String>(json!({"stored": args["note"]})) },
/// );
/// # let _ = request;
/// ```
#[derive(Debug, Default)]
#[non_exhaustive]
pub struct SessionRequest {
    context_id: Option<String>,
    tools: Tools,
}

impl SessionRequest {
    /// A session with no stored context and no tools.
    pub fn new() -> Self {
        Self::default()
    }

    /// Opens it on a context stored with [`RlmClient::load_context`].
    pub fn context(mut self, context_id: impl Into<String>) -> Self {
        self.context_id = Some(context_id.into());
        self
    }

    /// Declares a host tool, as [`InferRequest::tool`] does, for every turn.
    pub fn tool<F, Fut, E>(
        mut self,
        name: impl Into<String>,
        description: impl Into<String>,
        schema: serde_json::Value,
        handler: F,
    ) -> Self
    where
        F: Fn(serde_json::Value) -> Fut + Send + Sync + 'static,
        Fut: std::future::Future<Output = Result<serde_json::Value, E>> + Send + 'static,
        E: fmt::Display,
    {
        self.tools
            .add(name.into(), description.into(), schema, handler);
        self
    }

    pub(crate) fn into_parts(self) -> (Option<String>, Tools) {
        (self.context_id, self.tools)
    }
}

/// A session opened with [`RlmClient::open_session`]: one REPL on the server, kept from one
/// turn to the next, so that a turn can read the variables an earlier turn set (and the root
/// model is told about the earlier turns).
///
/// Turns go to the server that opened the session, and only to it: if that server exits, the
/// session is gone with it and its turns fail ([`RlmError::Exited`], not retried). The
/// server runs the turns of one session one at a time, in the order it reads them; wait for
/// a turn's answer when the next one must follow it. A turn cancelled (by its timeout or by
/// dropping its future), past the server's deadline, or whose worker crashed closes the
/// session on the server: later turns fail with [`RlmError::InvalidParams`] whose
/// [`RlmError::field`] is `session_id`, as they do after the server closed an idle session.
///
/// [`Session::close`] closes it; dropping it without closing sends `session/close` as a
/// notification, without waiting. A session keeps its client, and so the server, alive.
pub struct Session {
    client: RlmClient,
    connection: Arc<Connection>,
    id: String,
    tools: Option<Arc<Tools>>,
    closed: AtomicBool,
}

impl Session {
    pub(crate) fn new(
        client: RlmClient,
        connection: Arc<Connection>,
        id: String,
        tools: Option<Arc<Tools>>,
    ) -> Self {
        Self {
            client,
            connection,
            id,
            tools,
            closed: AtomicBool::new(false),
        }
    }

    /// The session's id, as the server made it (`ses-` and 32 hex digits).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// One turn: `query` about what the session holds, with the client's defaults.
    pub async fn infer(&self, query: impl Into<String>) -> Result<InferResult, RlmError> {
        self.infer_with(InferRequest::turn(query)).await
    }

    /// One turn with everything an [`InferRequest`] sets: options, timeout, progress, and a
    /// new input ([`InferRequest::prompt`]), which becomes the REPL's next `context_N`. A
    /// request naming a stored context ([`InferRequest::context`]) is refused by the server:
    /// a session keeps the context it was opened on. Counted in the client's metrics like
    /// any `infer`.
    pub async fn infer_with(&self, request: InferRequest) -> Result<InferResult, RlmError> {
        self.client
            .infer_on(request, Some((&self.id, &self.connection, &self.tools)))
            .await
    }

    /// Closes the session: the server kills its REPL once a turn still running has
    /// finished, and refuses later turns. Returns whether this call closed it: false when
    /// it was closed already, by an earlier call (which sends nothing again) or by the
    /// server. Within [`crate::RlmConfig::request_timeout`].
    pub async fn close(&self) -> Result<bool, RlmError> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(false);
        }
        let params = encode_params("session/close", &self.close_params())?;
        let closed: SessionCloseResult = self
            .client
            .ask(&self.connection, "session/close", Some(params), None)
            .await?;
        Ok(closed.closed)
    }

    fn close_params(&self) -> SessionCloseParams {
        SessionCloseParams {
            session_id: self.id.clone(),
        }
    }
}

impl Drop for Session {
    /// Closes the session on the server, unless [`Session::close`] did: `session/close` as a
    /// notification, which the server carries out without answering. Never waits.
    fn drop(&mut self) {
        if !*self.closed.get_mut() {
            self.connection
                .notify("session/close", &self.close_params());
        }
    }
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("id", &self.id)
            .field("closed", &self.closed.load(Ordering::Acquire))
            .field("pid", &self.connection.pid())
            .finish()
    }
}

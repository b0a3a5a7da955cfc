//! [`RlmClient`]: the handle agents hold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::time::Instant;
use tracing::Instrument;

use crate::config::RlmConfig;
use crate::connection::{Connection, Exit, Reply};
use crate::context::{self, ContextSource, LoadRequest, LoadedContext};
use crate::error::RlmError;
use crate::metrics::{Metrics, Recorder};
use crate::protocol::{
    ContextDropParams, ContextDropResult, ContextListResult, InferResult, ReadyParams,
    SessionOpenParams, SessionOpenResult, ShutdownParams, ShutdownResult, StatusResult,
};
use crate::request::{InferRequest, ProgressSink, Wire, encode_params};
use crate::session::{Session, SessionRequest};
use crate::tools::Tools;

/// A session turn's route: the session's id, its server, and its host tools.
pub(crate) type SessionRef<'a> = (&'a str, &'a Arc<Connection>, &'a Option<Arc<Tools>>);

/// A client of one rlm-server child process, shared by any number of tasks.
///
/// Cloning is cheap and every clone drives the same child: requests from all of them are
/// multiplexed over its one pipe by id, so a slow `infer` never holds up a `status`. The
/// child is started on the first call (or by [`RlmClient::start`]), started again on the
/// call after it dies, and killed when the last clone is dropped. No lock is held while a
/// call waits for its answer.
///
/// All methods must be called from within a Tokio runtime.
///
/// ```no_run
/// # async fn run() -> Result<(), rlm_client::RlmError> {
/// use rlm_client::{InferRequest, RlmClient};
/// let client = RlmClient::from_env();
/// let answer = client
///     .infer(InferRequest::new("...a long document...").query("What is the secret code?"))
///     .await?;
/// println!("{}", answer.text);
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RlmClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: RlmConfig,
    /// Request ids, unique over the client's life (across restarts too), from 1: id 0 once
    /// collided with the server's `id: null` error replies in the elizaOS plugin's client.
    next_id: AtomicU64,
    /// The current child, if any. The lock is held only to look at or replace it.
    current: Mutex<Option<Arc<Connection>>>,
    metrics: Recorder,
}

/// When a call must be over, and the budget to report if it is not.
#[derive(Clone, Copy)]
pub(crate) struct Deadline {
    pub(crate) at: Instant,
    pub(crate) budget: Duration,
}

impl Deadline {
    pub(crate) fn after(budget: Duration) -> Self {
        Self {
            at: Instant::now() + budget,
            budget,
        }
    }
}

impl std::fmt::Debug for RlmClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RlmClient")
            .field("config", &self.inner.config)
            .field("pid", &self.pid())
            .finish()
    }
}

impl RlmClient {
    /// A client that will start the server described by `config` on its first call.
    pub fn new(config: RlmConfig) -> Self {
        let metrics = Recorder::new(config.on_metrics.clone());
        Self {
            inner: Arc::new(Inner {
                config,
                next_id: AtomicU64::new(1),
                current: Mutex::new(None),
                metrics,
            }),
        }
    }

    /// A client configured by [`RlmConfig::from_env`].
    pub fn from_env() -> Self {
        Self::new(RlmConfig::from_env())
    }

    /// The configuration this client was made with.
    pub fn config(&self) -> &RlmConfig {
        &self.inner.config
    }

    /// Starts the server now, if it is not running, and waits for its `ready` notification
    /// (at most [`RlmConfig::ready_timeout`]). Calls do this by themselves; use it to pay the
    /// start-up cost early, or to learn what the server reported.
    pub async fn start(&self) -> Result<ReadyParams, RlmError> {
        let connection = self.connection()?;
        let ready = connection.ready().await?;
        Ok((*ready).clone())
    }

    /// The process id of the running server, if one is running.
    pub fn pid(&self) -> Option<u32> {
        match &*self.current() {
            Some(connection) if !connection.is_down() => connection.pid(),
            _ => None,
        }
    }

    /// Runs one RLM completion.
    ///
    /// What the server could not start ([`RlmError::is_retryable`]: a full queue, a server
    /// that exited) is retried with backoff and jitter within the request's timeout; nothing
    /// else is. When the timeout passes, or when the returned future is dropped, the server is
    /// sent `$/cancelRequest` for the request in flight.
    ///
    /// A request on a stored context ([`InferRequest::context`]) goes to the server that was
    /// running when it was made, and is not sent again to a new one if that server exits: the
    /// context died with it.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResult, RlmError> {
        self.infer_on(request, None).await
    }

    /// [`RlmClient::infer`], or a turn of `session` on the server that holds it, counted in
    /// the metrics.
    pub(crate) async fn infer_on(
        &self,
        request: InferRequest,
        session: Option<SessionRef<'_>>,
    ) -> Result<InferResult, RlmError> {
        let tracked = self.inner.metrics.begin();
        let outcome = self.infer_with_retries(request, session).await;
        tracked.finish(&outcome);
        outcome
    }

    async fn infer_with_retries(
        &self,
        request: InferRequest,
        session: Option<SessionRef<'_>>,
    ) -> Result<InferResult, RlmError> {
        let Wire {
            params,
            timeout,
            progress,
            tools,
            stored,
        } = request.into_wire(session.map(|(id, _, _)| id))?;
        let tools = session.and_then(|(_, _, tools)| tools.clone()).or(tools);
        let deadline = Deadline::after(timeout.unwrap_or(self.inner.config.request_timeout));
        // What names a stored context or a session goes to the server that holds it, only.
        let pinned = match session {
            Some((_, connection, _)) => Some(connection.clone()),
            None if stored => Some(self.connection()?),
            None => None,
        };
        let retry = &self.inner.config.retry;
        let mut retries = 0;
        loop {
            let connection = match &pinned {
                Some(connection) => connection.clone(),
                None => self.connection()?,
            };
            let reply = self
                .call(
                    &connection,
                    "infer",
                    Some(params.clone()),
                    progress.clone(),
                    tools.clone(),
                    deadline,
                )
                .await;
            let error = match reply.and_then(|raw| decode(&raw)) {
                Err(error)
                    if error.is_retryable()
                        && !(pinned.is_some() && matches!(error, RlmError::Exited(_)))
                        && retries < retry.max_retries =>
                {
                    error
                }
                outcome => return outcome,
            };
            let delay = retry.delay(retries);
            if Instant::now() + delay >= deadline.at {
                return Err(error);
            }
            tracing::debug!(%error, ?delay, "retrying infer");
            tokio::time::sleep(delay).await;
            retries += 1;
            self.inner.metrics.retried();
        }
    }

    /// The server's configuration, load and counters, within
    /// [`RlmConfig::request_timeout`], start-up included. Not retried.
    pub async fn status(&self) -> Result<StatusResult, RlmError> {
        let connection = self.connection()?;
        self.ask(&connection, "status", None, None).await
    }

    /// [`RlmClient::status`] within `timeout` instead of the configured one.
    pub async fn status_within(&self, timeout: Duration) -> Result<StatusResult, RlmError> {
        let connection = self.connection()?;
        self.ask(&connection, "status", None, Some(timeout)).await
    }

    /// Stores a context on the server, to ask about it with [`InferRequest::context`] or in
    /// a session ([`RlmClient::open_session`]) without sending it again: a text (`&str`,
    /// `String`), a list (`Vec<serde_json::Value>`, `Vec<Message>`), or a text streamed from
    /// a reader or a file ([`ContextSource::reader`], [`ContextSource::file`]), never read
    /// whole into memory. Within [`RlmConfig::request_timeout`] and
    /// [`RlmConfig::context_chunk_bytes`]; [`RlmClient::load_context_with`] sets both per
    /// load.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), rlm_client::RlmError> {
    /// use rlm_client::{ContextSource, InferRequest, RlmClient};
    /// let client = RlmClient::from_env();
    /// let book = client.load_context(ContextSource::file("book.txt")).await?;
    /// for question in ["Who is the murderer?", "Where was the knife?"] {
    ///     let request = InferRequest::context(&book.context_id).query(question);
    ///     println!("{}", client.infer(request).await?.text);
    /// }
    /// client.drop_context(&book.context_id).await?;
    /// # Ok(()) }
    /// ```
    pub async fn load_context(
        &self,
        source: impl Into<ContextSource>,
    ) -> Result<LoadedContext, RlmError> {
        self.load_context_with(LoadRequest::new(source)).await
    }

    /// Stores a context as [`RlmClient::load_context`] does, with the request's own timeout
    /// and chunk size.
    ///
    /// A text longer than the chunk size goes in `context/load` chunks cut at character
    /// boundaries, each sent after the answer to the one before (cut again to fit, when the
    /// server refuses a line as longer than its `--max-message-bytes`); a list goes in one
    /// line. A reader's or a file's bytes are decoded as UTF-8 as they arrive
    /// ([`RlmError::InvalidUtf8`], [`RlmError::Read`]).
    /// A full store is [`RlmError::ContextStoreFull`]. Nothing is retried. A load that does
    /// not finish (its source fails, the server refuses a chunk, its timeout passes, its
    /// future is dropped) drops what it stored, at once or, for a chunk in flight, when the
    /// server answers it.
    pub async fn load_context_with(&self, request: LoadRequest) -> Result<LoadedContext, RlmError> {
        context::load(self, request).await
    }

    /// Drops a stored context: from now on its id is unknown. Requests and sessions already
    /// using it finish normally. Returns false when the server had no such context. Within
    /// [`RlmConfig::request_timeout`]; not retried.
    pub async fn drop_context(&self, context_id: &str) -> Result<bool, RlmError> {
        let params = ContextDropParams {
            context_id: context_id.to_owned(),
        };
        let params = encode_params("context/drop", &params)?;
        let connection = self.connection()?;
        let dropped: ContextDropResult = self
            .ask(&connection, "context/drop", Some(params), None)
            .await?;
        Ok(dropped.dropped)
    }

    /// The contexts the server stores (sealed ones, in the order they were loaded) and the
    /// store's size and limit. Within [`RlmConfig::request_timeout`]; not retried.
    pub async fn list_contexts(&self) -> Result<ContextListResult, RlmError> {
        let connection = self.connection()?;
        self.ask(&connection, "context/list", None, None).await
    }

    /// Opens a session: one REPL that lives across [`Session::infer`] turns, so that a turn
    /// can use the variables an earlier one set. With `context_id` the session's `context`
    /// is that stored context (held while the session is open); without, each turn may
    /// bring an input of its own. The session lives on the server that is running now;
    /// [`Session::close`] (or dropping it) closes it. Within [`RlmConfig::request_timeout`];
    /// not retried.
    ///
    /// ```no_run
    /// # async fn run() -> Result<(), rlm_client::RlmError> {
    /// let client = rlm_client::RlmClient::from_env();
    /// let logs = client.load_context(std::fs::read_to_string("app.log").unwrap()).await?;
    /// let session = client.open_session(Some(logs.context_id.as_str())).await?;
    /// session.infer("Find every error and keep them in a variable.").await?;
    /// let answer = session.infer("Which of them came first?").await?;
    /// println!("{}", answer.text);
    /// session.close().await?;
    /// # Ok(()) }
    /// ```
    pub async fn open_session(&self, context_id: Option<&str>) -> Result<Session, RlmError> {
        let mut request = SessionRequest::new();
        if let Some(context_id) = context_id {
            request = request.context(context_id);
        }
        self.open_session_with(request).await
    }

    /// [`RlmClient::open_session`] with everything a [`SessionRequest`] sets: a stored
    /// context, and host tools every turn's model code may call.
    pub async fn open_session_with(&self, request: SessionRequest) -> Result<Session, RlmError> {
        let (context_id, tools) = request.into_parts();
        let params = SessionOpenParams {
            context_id,
            tools: tools.declarations(),
        };
        let params = encode_params("session/open", &params)?;
        let connection = self.connection()?;
        let opened: SessionOpenResult = self
            .ask(&connection, "session/open", Some(params), None)
            .await?;
        let tools = (!tools.is_empty()).then(|| Arc::new(tools));
        Ok(Session::new(
            self.clone(),
            connection,
            opened.session_id,
            tools,
        ))
    }

    /// Asks the running server to finish and waits until it has: it stops admitting work,
    /// lets in-flight requests run for up to `grace`, cancels the rest (they fail with
    /// [`RlmError::Cancelled`]), answers, and exits. The answer is awaited for `grace` plus
    /// `timeout` (default [`RlmConfig::request_timeout`]); then the server's input is ended
    /// and it is given [`RlmConfig::close_margin`] to exit before SIGTERM and, after
    /// [`RlmConfig::term_timeout`], SIGKILL. Returns how it ended.
    ///
    /// The next call starts a new server, even while the old one drains. With no server
    /// running there is nothing to do and the answer is [`Exit::NotRunning`].
    pub async fn shutdown(
        &self,
        grace: Duration,
        timeout: Option<Duration>,
    ) -> Result<Exit, RlmError> {
        let Some(connection) = self.retire() else {
            return Ok(Exit::NotRunning);
        };
        let config = &self.inner.config;
        let params = ShutdownParams {
            grace_s: Some(grace.as_secs_f64()),
        };
        let params = encode_params("shutdown", &params)?;
        let budget = grace + timeout.unwrap_or(config.request_timeout);
        let reply = self
            .call(
                &connection,
                "shutdown",
                Some(params),
                None,
                None,
                Deadline::after(budget),
            )
            .await;
        let exit = connection
            .close(None, config.close_margin, config.term_timeout)
            .await;
        let _: ShutdownResult = decode(&reply?)?;
        Ok(exit)
    }

    /// Stops the server, letting its in-flight requests finish: sends it a `shutdown`
    /// notification with [`RlmConfig::shutdown_grace`], waits for it to exit for the grace
    /// plus [`RlmConfig::close_margin`], sends SIGTERM, waits up to
    /// [`RlmConfig::term_timeout`], then kills it. Requests still running when the grace ends
    /// are cancelled by the server; calls still pending when the child is gone fail with
    /// [`RlmError::Closed`]. Returns how the server ended. As after [`RlmClient::shutdown`],
    /// a later call starts a new server.
    pub async fn close(&self) -> Exit {
        let Some(connection) = self.retire() else {
            return Exit::NotRunning;
        };
        let config = &self.inner.config;
        connection
            .close(
                Some(config.shutdown_grace),
                config.shutdown_grace + config.close_margin,
                config.term_timeout,
            )
            .await
    }

    /// A snapshot of the client-side metrics of `infer` calls.
    pub fn metrics(&self) -> Metrics {
        self.inner.metrics.snapshot()
    }

    fn current(&self) -> MutexGuard<'_, Option<Arc<Connection>>> {
        self.inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// The running server, started if there is none or the last one died.
    pub(crate) fn connection(&self) -> Result<Arc<Connection>, RlmError> {
        let mut current = self.current();
        if let Some(connection) = current.as_ref().filter(|c| !c.is_down()) {
            return Ok(connection.clone());
        }
        let connection = Connection::spawn(&self.inner.config)?;
        *current = Some(connection.clone());
        Ok(connection)
    }

    /// Takes the running server out of service, so that later calls start a new one.
    fn retire(&self) -> Option<Arc<Connection>> {
        self.current()
            .take()
            .filter(|connection| !connection.is_down())
    }

    /// One request on `connection`: wait for `ready`, send, wait for the answer, all before
    /// `deadline`, inside a `tracing` span `rlm_request` with the method and the wire id.
    /// Whatever interrupts the wait (the deadline, or the caller dropping this future) drops
    /// the in-flight guard, which cancels the request on the server.
    pub(crate) async fn call(
        &self,
        connection: &Connection,
        method: &str,
        params: Option<Arc<RawValue>>,
        progress: Option<ProgressSink>,
        tools: Option<Arc<Tools>>,
        deadline: Deadline,
    ) -> Reply {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            connection.ready().await?;
            connection
                .request(id, method, params, progress, tools)?
                .response()
                .await
        };
        let span = tracing::debug_span!("rlm_request", method, id);
        let reply = tokio::time::timeout_at(deadline.at, exchange)
            .instrument(span.clone())
            .await
            .unwrap_or(Err(RlmError::Timeout(deadline.budget)));
        if let Err(error) = &reply {
            span.in_scope(|| tracing::debug!(%error, "request failed"));
        }
        reply
    }

    /// One call of `method` on `connection` within `timeout` (default
    /// [`RlmConfig::request_timeout`]), not retried, its result decoded.
    pub(crate) async fn ask<T: DeserializeOwned>(
        &self,
        connection: &Connection,
        method: &str,
        params: Option<Arc<RawValue>>,
        timeout: Option<Duration>,
    ) -> Result<T, RlmError> {
        let deadline = Deadline::after(timeout.unwrap_or(self.inner.config.request_timeout));
        decode(
            &self
                .call(connection, method, params, None, None, deadline)
                .await?,
        )
    }
}

pub(crate) fn decode<T: DeserializeOwned>(raw: &RawValue) -> Result<T, RlmError> {
    serde_json::from_str(raw.get())
        .map_err(|e| RlmError::Protocol(format!("result does not match the schema: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shareable<T: Clone + Send + Sync + 'static>() {}
    fn sendable<T: Send>(_: &T) {}

    #[test]
    fn the_client_and_its_futures_cross_threads() {
        shareable::<RlmClient>();
        let client = RlmClient::new(RlmConfig::default());
        sendable(&client.infer(InferRequest::new("x")));
        sendable(&client.status());
        sendable(&client.load_context("x"));
        sendable(&client.drop_context("ctx"));
        sendable(&client.list_contexts());
        sendable(&client.open_session(None));
        sendable(&client.shutdown(Duration::ZERO, None));
        sendable(&client.close());
    }

    #[tokio::test]
    async fn a_missing_command_is_a_spawn_error() {
        let client = RlmClient::new(
            RlmConfig::builder()
                .program("/nonexistent/rlm-server")
                .build(),
        );
        let error = client.status().await.unwrap_err();
        assert!(matches!(error, RlmError::Spawn { .. }), "{error}");
        assert_eq!(client.pid(), None);
    }

    #[tokio::test]
    async fn shutdown_and_close_with_no_server_running_start_none() {
        let client = RlmClient::new(RlmConfig::default());
        assert_eq!(
            client.shutdown(Duration::ZERO, None).await.unwrap(),
            Exit::NotRunning
        );
        assert_eq!(client.close().await, Exit::NotRunning);
        assert_eq!(client.pid(), None);
    }
}

//! [`RLMClient`]: the handle agents hold.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::config::RLMConfig;
use crate::connection::{Connection, Reply};
use crate::error::RlmError;
use crate::metrics::{Metrics, Recorder};
use crate::protocol::{InferResult, ReadyParams, ShutdownParams, ShutdownResult, StatusResult};
use crate::request::{InferRequest, ProgressSink, Wire};

/// A client of one rlm-server child process, shared by any number of tasks.
///
/// Cloning is cheap and every clone drives the same child: requests from all of them are
/// multiplexed over its one pipe by id, so a slow `infer` never holds up a `status`. The
/// child is started on the first call (or by [`RLMClient::start`]), started again on the
/// call after it dies, and killed when the last clone is dropped. No lock is held while a
/// call waits for its answer.
///
/// All methods must be called from within a Tokio runtime.
///
/// ```no_run
/// # async fn run() -> Result<(), rlm_client::RlmError> {
/// use rlm_client::{InferRequest, RLMClient};
/// let client = RLMClient::from_env()?;
/// let answer = client
///     .infer(InferRequest::new("...a long document...").query("What is the secret code?"))
///     .await?;
/// println!("{}", answer.text);
/// client.close().await;
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct RLMClient {
    inner: Arc<Inner>,
}

struct Inner {
    config: RLMConfig,
    /// Request ids, unique over the client's life (across restarts too), from 1: id 0 once
    /// collided with the server's `id: null` error replies in the elizaOS plugin's client.
    next_id: AtomicU64,
    /// The current child, if any. The lock is held only to look at or replace it.
    current: Mutex<Option<Arc<Connection>>>,
    metrics: Recorder,
}

/// When a call must be over, and the budget to report if it is not.
#[derive(Clone, Copy)]
struct Deadline {
    at: Instant,
    budget: Duration,
}

impl Deadline {
    fn after(budget: Duration) -> Self {
        Self {
            at: Instant::now() + budget,
            budget,
        }
    }
}

impl std::fmt::Debug for RLMClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RLMClient")
            .field("config", &self.inner.config)
            .field("pid", &self.pid())
            .finish()
    }
}

impl RLMClient {
    /// A client that will start the server described by `config` on its first call.
    pub fn new(config: RLMConfig) -> Self {
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

    /// A client configured by [`RLMConfig::from_env`].
    pub fn from_env() -> Result<Self, RlmError> {
        RLMConfig::from_env().map(Self::new)
    }

    /// Starts the server now, if it is not running, and waits for its `ready` notification
    /// (at most [`RLMConfig::ready_timeout`]). Calls do this by themselves; use it to pay the
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
    /// Retryable errors ([`RlmError::is_retryable`]) are retried with backoff and jitter
    /// within the request's timeout. When the timeout passes, or when the returned future is
    /// dropped, the server is sent `$/cancelRequest` for the request in flight.
    pub async fn infer(&self, request: InferRequest) -> Result<InferResult, RlmError> {
        let tracked = self.inner.metrics.begin();
        let outcome = self.infer_with_retries(request).await;
        tracked.finish(&outcome);
        outcome
    }

    async fn infer_with_retries(&self, request: InferRequest) -> Result<InferResult, RlmError> {
        let Wire {
            params,
            timeout,
            progress,
        } = request.into_wire()?;
        let deadline = Deadline::after(timeout.unwrap_or(self.inner.config.request_timeout));
        let retry = &self.inner.config.retry;
        let mut retries = 0;
        loop {
            let connection = self.connection()?;
            let reply = self
                .call(
                    &connection,
                    "infer",
                    Some(params.clone()),
                    progress.clone(),
                    deadline,
                )
                .await;
            let error = match reply.and_then(|raw| decode(&raw)) {
                Err(error) if error.is_retryable() && retries < retry.max_retries => error,
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

    /// The server's configuration, load and counters.
    pub async fn status(&self) -> Result<StatusResult, RlmError> {
        let connection = self.connection()?;
        let deadline = Deadline::after(self.inner.config.request_timeout);
        let raw = self
            .call(&connection, "status", None, None, deadline)
            .await?;
        decode(&raw)
    }

    /// Asks the running server to finish: it stops admitting work, lets in-flight requests
    /// run for up to `grace` (the server's default when `None`), cancels the rest, answers
    /// and exits. Returns once it has exited (bounded as in [`RLMClient::close`]).
    ///
    /// The next call starts a new server, even while the old one drains. With no server
    /// running there is nothing to do and the answer is immediate.
    pub async fn shutdown(&self, grace: Option<Duration>) -> Result<ShutdownResult, RlmError> {
        let Some(connection) = self.retire() else {
            return Ok(ShutdownResult { shutdown: true });
        };
        let params = ShutdownParams {
            grace_s: grace.map(|grace| grace.as_secs_f64()),
        };
        let params = serde_json::value::to_raw_value(&params)
            .map_err(|e| RlmError::Protocol(format!("cannot encode shutdown params: {e}")))?;
        let budget = grace.unwrap_or_default() + self.inner.config.request_timeout;
        let reply = self
            .call(
                &connection,
                "shutdown",
                Some(Arc::from(params)),
                None,
                Deadline::after(budget),
            )
            .await;
        self.close_connection(&connection).await;
        decode(&reply?)
    }

    /// Stops the server: ends its stdin (the server finishes in-flight work and exits),
    /// waits up to [`RLMConfig::close_timeout`], sends SIGTERM, waits up to
    /// [`RLMConfig::term_timeout`], then kills it. Calls still pending when the child is gone
    /// fail with [`RlmError::Closed`]. As after [`RLMClient::shutdown`], a later call starts a
    /// new server.
    pub async fn close(&self) {
        if let Some(connection) = self.retire() {
            self.close_connection(&connection).await;
        }
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
    fn connection(&self) -> Result<Arc<Connection>, RlmError> {
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

    async fn close_connection(&self, connection: &Connection) {
        let config = &self.inner.config;
        connection
            .close(config.close_timeout, config.term_timeout)
            .await;
    }

    /// One request on `connection`: wait for `ready`, send, wait for the answer, all before
    /// `deadline`. Whatever interrupts the wait (the deadline, or the caller dropping this
    /// future) drops the in-flight guard, which cancels the request on the server.
    async fn call(
        &self,
        connection: &Connection,
        method: &str,
        params: Option<Arc<RawValue>>,
        progress: Option<ProgressSink>,
        deadline: Deadline,
    ) -> Reply {
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let exchange = async {
            connection.ready().await?;
            connection
                .request(id, method, params, progress)?
                .response()
                .await
        };
        tokio::time::timeout_at(deadline.at, exchange)
            .await
            .unwrap_or(Err(RlmError::Timeout(deadline.budget)))
    }
}

fn decode<T: DeserializeOwned>(raw: &RawValue) -> Result<T, RlmError> {
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
        shareable::<RLMClient>();
        let client = RLMClient::new(RLMConfig::default());
        sendable(&client.infer(InferRequest::new("x")));
        sendable(&client.status());
        sendable(&client.shutdown(None));
        sendable(&client.close());
    }

    #[tokio::test]
    async fn a_missing_command_is_a_spawn_error() {
        let client = RLMClient::new(RLMConfig {
            command: "/nonexistent/rlm-server".into(),
            ..Default::default()
        });
        let error = client.status().await.unwrap_err();
        assert!(matches!(error, RlmError::Spawn { .. }), "{error}");
        assert_eq!(client.pid(), None);
    }

    #[tokio::test]
    async fn shutdown_and_close_with_no_server_running_start_none() {
        let client = RLMClient::new(RLMConfig::default());
        assert_eq!(
            client.shutdown(None).await.unwrap(),
            ShutdownResult { shutdown: true }
        );
        client.close().await;
        assert_eq!(client.pid(), None);
    }
}

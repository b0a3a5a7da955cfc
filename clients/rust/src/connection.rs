//! One server process: its pipes, the tasks that serve them, and the requests pending on it.
//!
//! Modelled on rmcp's service loop. One map of pending requests keyed by id; one writer task
//! that owns stdin, so any number of callers send without a lock; one reader task that owns
//! stdout and routes every line (answers to their caller, progress to its sink); one task
//! that drains stderr into `tracing`, so the child can never block on a full pipe; and one
//! supervisor that owns the `Child`, notices its exit, and fails everything still pending at
//! once. The supervisor is also the only place that kills the child, and it does so when the
//! connection is dropped.
//!
//! No line can lose a call or grow memory without bound: an answer that does not decode fails
//! its own call at once (its id is read before its body), a stdout line over the configured
//! limit is skipped and fails the call it answers, and stderr is forwarded in bounded pieces.

use std::collections::HashMap;
use std::io;
use std::process::ExitStatus;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::Duration;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;
use tokio::io::{AsyncWriteExt, BufReader, BufWriter};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::{mpsc, oneshot, watch};
use tokio::time::timeout;

use crate::config::RlmConfig;
use crate::error::RlmError;
use crate::lines::{Segment, edge_id, loose_id, read_segment, skip_line, utf8_cut};
use crate::protocol::{
    CancelParams, Id, Progress, ReadyParams, RpcError, ShutdownParams, ToolCallParams,
};
use crate::request::ProgressSink;
use crate::tools::{Running, Tools};

/// The protocol version this client speaks; a server announcing another is refused.
const PROTOCOL: &str = "1";
/// After the child exits, how long to keep reading stdout for answers it wrote just before
/// (a `shutdown` answer is the last line before exit); after stdout closes, how long to wait
/// for the child to exit before killing it.
const LINGER: Duration = Duration::from_secs(1);
/// How long to wait for the child to die after SIGKILL before giving up on reaping it.
const KILL_WAIT: Duration = Duration::from_secs(5);
/// Pipe buffers: big enough that a burst of small requests goes out in one write and a huge
/// answer comes in with few reads.
const IO_BUFFER: usize = 256 * 1024;
/// A line buffer that grew past this for one huge answer is given back afterwards.
const KEEP_LINE_BUFFER: usize = 16 * 1024 * 1024;
/// How much of the last stderr line is kept for error messages.
const STDERR_TAIL: usize = 500;
/// How much of an unreadable line is quoted in its error.
const QUOTE: usize = 200;

/// What a pending call receives: the raw `result`, decoded by the caller in its own task, or
/// the error.
pub(crate) type Reply = Result<Box<RawValue>, RlmError>;

/// The life of a connection, published on a watch channel.
#[derive(Clone)]
pub(crate) enum State {
    /// Spawned; `ready` not seen yet.
    Starting,
    /// `ready` seen.
    Ready(Arc<ReadyParams>),
    /// The child is gone; the next call starts a new one.
    Down(Down),
}

/// Why a connection went down; becomes the error of every call still pending on it.
#[derive(Clone, Debug)]
pub(crate) enum Down {
    Exited(String),
    StartFailed(String),
    ReadyTimeout(Duration),
    Protocol(String),
    Closed,
}

impl Down {
    fn error(&self) -> RlmError {
        match self {
            Down::Exited(detail) => RlmError::Exited(detail.clone()),
            Down::StartFailed(detail) => RlmError::StartFailed(detail.clone()),
            Down::ReadyTimeout(limit) => RlmError::ReadyTimeout(*limit),
            Down::Protocol(detail) => RlmError::Protocol(detail.clone()),
            Down::Closed => RlmError::Closed,
        }
    }
}

/// How the server process ended, as [`crate::RlmClient::close`] and
/// [`crate::RlmClient::shutdown`] report it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Exit {
    /// No server was running.
    NotRunning,
    /// It exited by itself: after the end of its input or a `shutdown`, within the wait, or
    /// earlier, on its own.
    Exited(ExitStatus),
    /// It did not exit in time and ended after SIGTERM.
    Terminated(ExitStatus),
    /// It was killed (SIGKILL): it outlived SIGTERM, or the client was dropped, or it could
    /// not be talked to.
    Killed(ExitStatus),
    /// It could not be reaped; the text says why.
    Unreaped(String),
}

impl Exit {
    /// The exit status, when the process was reaped.
    pub fn status(&self) -> Option<ExitStatus> {
        match self {
            Exit::Exited(status) | Exit::Terminated(status) | Exit::Killed(status) => Some(*status),
            _ => None,
        }
    }

    /// Whether the server exited by itself with status 0: a clean shutdown.
    pub fn success(&self) -> bool {
        matches!(self, Exit::Exited(status) if status.success())
    }

    fn from_wait(status: io::Result<ExitStatus>, ended: fn(ExitStatus) -> Exit) -> Self {
        match status {
            Ok(status) => ended(status),
            Err(error) => Exit::Unreaped(error.to_string()),
        }
    }
}

/// Orders for the supervisor.
enum Control {
    /// Stdin is being closed: wait, SIGTERM, wait, SIGKILL.
    Close { wait: Duration, term_wait: Duration },
    /// Kill the child now, for this reason.
    Kill(Down),
}

/// What the writer task is asked to do.
enum Outgoing {
    Frame(Frame),
    /// Flush and close stdin: the server's signal to finish its work and exit.
    EndOfInput,
}

/// One outgoing line. The params are shared, so a retry resends a huge prompt without copying
/// or re-encoding it.
pub(crate) struct Frame {
    head: String,
    params: Option<Arc<RawValue>>,
}

impl Frame {
    fn request(id: u64, method: &str, params: Option<Arc<RawValue>>) -> Self {
        Self {
            head: format!(r#"{{"jsonrpc":"2.0","id":{id},"method":"{method}""#),
            params,
        }
    }

    fn cancel(id: u64) -> Self {
        let params = CancelParams {
            id: Id::Number(id as i64),
        };
        Self::notification("$/cancelRequest", &params)
    }

    /// `shutdown` as a notification: the server stops, drains for `grace`, and exits, and
    /// nobody waits for its answer.
    fn shutdown(grace: Duration) -> Self {
        let params = ShutdownParams {
            grace_s: Some(grace.as_secs_f64()),
        };
        Self::notification("shutdown", &params)
    }

    /// A whole message, encoded already (an answer to one of the server's requests).
    fn message(json: String) -> Self {
        // `write_to` closes the object: keep everything but its closing brace.
        let head = json.strip_suffix('}').map(str::to_owned).unwrap_or(json);
        Self { head, params: None }
    }

    /// The refusal of a server request whose method this client does not know, shaped as the
    /// TypeScript client's.
    fn method_not_found(id: &Value) -> Self {
        let error = serde_json::json!({
            "jsonrpc": "2.0", "id": id,
            "error": {"code": -32601, "message": "Method not found"},
        });
        Self::message(error.to_string())
    }

    fn notification(method: &str, params: &impl serde::Serialize) -> Self {
        let params = serde_json::value::to_raw_value(params).expect("plain params always encode");
        Self {
            head: format!(r#"{{"jsonrpc":"2.0","method":"{method}""#),
            params: Some(Arc::from(params)),
        }
    }

    async fn write_to(&self, out: &mut BufWriter<ChildStdin>) -> io::Result<()> {
        out.write_all(self.head.as_bytes()).await?;
        if let Some(params) = &self.params {
            out.write_all(br#","params":"#).await?;
            out.write_all(params.get().as_bytes()).await?;
        }
        out.write_all(b"}\n").await
    }
}

/// A request waiting for its answer.
struct Pending {
    reply: oneshot::Sender<Reply>,
    progress: Option<ProgressSink>,
    /// The handlers of the host tools whose `tool/call`s name this request.
    tools: Option<Arc<Tools>>,
}

/// What the connection's tasks share. The pending map is `None` once the connection is down,
/// so nothing can be registered after everything pending was failed.
struct Shared {
    pending: Mutex<Option<HashMap<u64, Pending>>>,
    state: watch::Sender<State>,
    stderr_tail: Mutex<Option<String>>,
    /// How the child ended; set by the supervisor before it publishes `Down`.
    exit: OnceLock<Exit>,
    /// Host tool calls running for the server.
    tools: Arc<Running>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Shared {
    /// Adds a pending request (ids are never reused), unless the connection is down.
    fn register(&self, id: u64, pending: Pending) -> Result<(), RlmError> {
        let registered = lock(&self.pending)
            .as_mut()
            .map(|map| map.insert(id, pending))
            .is_some();
        if registered {
            Ok(())
        } else {
            Err(self.down_error())
        }
    }

    /// Removes a pending request, if it is still waiting.
    fn take(&self, id: u64) -> Option<Pending> {
        lock(&self.pending).as_mut().and_then(|map| map.remove(&id))
    }

    fn down_error(&self) -> RlmError {
        match &*self.state.borrow() {
            State::Down(down) => down.error(),
            _ => RlmError::Closed,
        }
    }

    /// Publishes `Down` and fails every pending request with it. Only the supervisor calls
    /// this, once, after the child has been reaped. A child that exits before `ready` could
    /// not start, which is not the same failure as one that dies while serving.
    fn go_down(&self, down: Down) {
        let down = match down {
            Down::Exited(detail) if matches!(*self.state.borrow(), State::Starting) => {
                Down::StartFailed(detail)
            }
            down => down,
        };
        tracing::debug!(?down, "rlm-server connection down");
        self.state.send_replace(State::Down(down.clone()));
        self.tools.abort_all();
        let pending = lock(&self.pending).take();
        for (_, waiting) in pending.into_iter().flatten() {
            let _ = waiting.reply.send(Err(down.error()));
        }
    }

    /// Routes one line from stdout (a message, or a batch of them). An error means the
    /// server cannot be talked to.
    fn dispatch(&self, line: &[u8], writer: &mpsc::UnboundedSender<Outgoing>) -> Result<(), Down> {
        let line = line.trim_ascii();
        if line.is_empty() {
            return Ok(());
        }
        if line.starts_with(b"[") {
            if let Ok(batch) = serde_json::from_slice::<Vec<Box<RawValue>>>(line) {
                return batch
                    .iter()
                    .try_for_each(|message| self.dispatch_one(message.get().as_bytes(), writer));
            }
        }
        self.dispatch_one(line, writer)
    }

    fn dispatch_one(
        &self,
        line: &[u8],
        writer: &mpsc::UnboundedSender<Outgoing>,
    ) -> Result<(), Down> {
        let message: Incoming = match serde_json::from_slice(line) {
            Ok(message) => message,
            Err(error) => {
                self.unreadable(line, &error);
                return Ok(());
            }
        };
        match message.method.as_deref() {
            Some("ready") => self.on_ready(message.params.as_deref()),
            Some("$/progress") => {
                self.on_progress(message.params.as_deref());
                Ok(())
            }
            Some("tool/call") => {
                self.on_tool_call(message.id, message.params.as_deref(), writer);
                Ok(())
            }
            Some("$/cancelRequest") => {
                match decode_params::<CancelParams>(message.params.as_deref()) {
                    Ok(CancelParams { id: Id::String(id) }) => self.tools.cancel(&id),
                    _ => tracing::warn!("ignoring an unreadable $/cancelRequest"),
                }
                Ok(())
            }
            Some(method) => {
                refuse_unknown(method, message.id, writer);
                Ok(())
            }
            None => {
                self.on_response(message);
                Ok(())
            }
        }
    }

    /// A line that is not a JSON-RPC message: fails the call it answers, if its id can be
    /// read at all, else is logged.
    fn unreadable(&self, line: &[u8], error: &serde_json::Error) {
        let quoted = quote(line);
        match loose_id(line) {
            Some(id) => self.answer(
                id,
                Err(RlmError::Protocol(format!(
                    "unreadable answer to request {id} ({error}): {quoted}"
                ))),
            ),
            None => tracing::warn!(%error, line = %quoted, "ignoring an unreadable server line"),
        }
    }

    fn on_ready(&self, params: Option<&RawValue>) -> Result<(), Down> {
        let ready: ReadyParams = decode_params(params)
            .map_err(|e| Down::Protocol(format!("unreadable `ready` notification: {e}")))?;
        if ready.protocol != PROTOCOL {
            return Err(Down::Protocol(format!(
                "the server speaks protocol {}, this client {PROTOCOL}",
                ready.protocol
            )));
        }
        tracing::info!(
            pid = ready.pid,
            version = %ready.version,
            backend = %ready.backend,
            model = %ready.model,
            stub = ready.stub,
            "rlm-server ready"
        );
        self.state.send_if_modified(|state| {
            let starting = matches!(state, State::Starting);
            if starting {
                *state = State::Ready(Arc::new(ready));
            }
            starting
        });
        Ok(())
    }

    fn on_progress(&self, params: Option<&RawValue>) {
        let progress: Progress = match decode_params(params) {
            Ok(progress) => progress,
            Err(error) => {
                tracing::warn!(%error, "ignoring an unreadable $/progress notification");
                return;
            }
        };
        let Id::Number(id) = progress.id else { return };
        let sink = lock(&self.pending)
            .as_ref()
            .and_then(|map| map.get(&(id as u64)))
            .and_then(|pending| pending.progress.clone());
        if let Some(sink) = sink {
            sink.deliver(progress);
        }
    }

    /// The server's `tool/call`: run the handler of the infer it names, and answer it.
    fn on_tool_call(
        &self,
        id: Option<Value>,
        params: Option<&RawValue>,
        writer: &mpsc::UnboundedSender<Outgoing>,
    ) {
        let Some(Value::String(id)) = id else {
            tracing::warn!(?id, "ignoring a tool/call without a string id");
            return;
        };
        let call: ToolCallParams = match decode_params(params) {
            Ok(call) => call,
            Err(error) => {
                // answered at once, as a call with no handler is: the server would otherwise
                // wait out the call's timeout before model code hears of it
                tracing::warn!(%error, "refusing an unreadable tool/call");
                let line = crate::tools::response(&id, Err("unreadable tool/call params".into()));
                let _ = writer.send(Outgoing::Frame(Frame::message(line)));
                return;
            }
        };
        let tools = match call.request_id {
            Some(Id::Number(request)) => lock(&self.pending)
                .as_ref()
                .and_then(|map| map.get(&(request as u64)))
                .and_then(|pending| pending.tools.clone()),
            _ => None,
        };
        let writer = writer.clone();
        self.tools.start(
            id,
            &call.name,
            call.arguments,
            tools.as_deref(),
            move |line| {
                let _ = writer.send(Outgoing::Frame(Frame::message(line)));
            },
        );
    }

    fn on_response(&self, message: Incoming) {
        let Some(id) = message.id.as_ref().and_then(Value::as_u64) else {
            // Only a line the server could not read at all (not JSON, above its size limit)
            // is answered with id null; it cannot be matched to a request.
            let error = message.error.as_deref().map(|e| quote(e.get().as_bytes()));
            tracing::warn!(?error, "the server answered with no usable id");
            return;
        };
        let reply = match (message.result, message.error) {
            (_, Some(error)) => match serde_json::from_str::<RpcError>(error.get()) {
                Ok(error) => Err(RlmError::from_rpc(error)),
                Err(why) => Err(RlmError::Protocol(format!(
                    "the error answering request {id} does not match the schema ({why}): {}",
                    quote(error.get().as_bytes())
                ))),
            },
            (Some(result), None) => Ok(result),
            (None, None) => Err(RlmError::Protocol(format!(
                "answer {id} has neither result nor error"
            ))),
        };
        self.answer(id, reply);
    }

    /// Settles pending request `id`, if anyone still waits for it.
    fn answer(&self, id: u64, reply: Reply) {
        match self.take(id) {
            Some(pending) => drop(pending.reply.send(reply)),
            None => tracing::debug!(
                id,
                "answer to a request nobody waits for (cancelled or timed out)"
            ),
        }
    }

    /// A stdout line over `limit` bytes, of which only the ends were kept: fails the call
    /// it answers, or, when its id cannot be read, every pending call (which are then
    /// cancelled on the server, since nobody will take their answers). Returns the ids to
    /// cancel.
    fn oversized(&self, head: &[u8], tail: &[u8], limit: usize) -> Vec<u64> {
        let error = || Err(RlmError::LineTooLong { limit });
        if let Some(id) = edge_id(head, tail) {
            tracing::warn!(id, limit, "the server's answer is over the line limit");
            self.answer(id, error());
            return Vec::new();
        }
        tracing::warn!(
            limit,
            head = %quote(head),
            "a server line over the line limit has no readable id; failing every pending call"
        );
        let failed: Vec<(u64, Pending)> = lock(&self.pending)
            .as_mut()
            .map(|map| map.drain().collect())
            .unwrap_or_default();
        failed
            .into_iter()
            .map(|(id, pending)| {
                let _ = pending.reply.send(error());
                id
            })
            .collect()
    }

    fn remember_stderr(&self, line: &str) {
        *lock(&self.stderr_tail) = Some(line.chars().take(STDERR_TAIL).collect());
    }

    /// `exit` in words, with the last thing the server said on stderr, which usually says
    /// why it died.
    fn describe_exit(&self, exit: &Exit) -> String {
        let mut text = match exit {
            Exit::Unreaped(why) => format!("could not be reaped: {why}"),
            exit => exit.status().map(|s| s.to_string()).unwrap_or_default(),
        };
        if let Some(line) = &*lock(&self.stderr_tail) {
            text.push_str("; last stderr line: ");
            text.push_str(line);
        }
        text
    }
}

/// Any message from the server, read just far enough to route it, the id first. `result`
/// stays raw: the reader only finds where it ends, and the caller decodes it in its own task,
/// so decoding a large answer never holds up the answers behind it (and a result of the wrong
/// shape fails that caller with [`RlmError::Protocol`]).
#[derive(Deserialize)]
struct Incoming {
    #[serde(default)]
    id: Option<Value>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    params: Option<Box<RawValue>>,
    #[serde(default)]
    result: Option<Box<RawValue>>,
    /// Raw too: an error that does not decode fails its call, not the whole line.
    #[serde(default)]
    error: Option<Box<RawValue>>,
}

/// A message of a method this client does not know. A request is refused at once, as the
/// TypeScript client refuses it: unanswered, it would keep the server waiting. A notification
/// (no id; `"id": null` reads as none) needs no answer.
fn refuse_unknown(method: &str, id: Option<Value>, writer: &mpsc::UnboundedSender<Outgoing>) {
    match id {
        Some(id) => {
            tracing::warn!(method, %id, "refusing a server request of an unknown method");
            let _ = writer.send(Outgoing::Frame(Frame::method_not_found(&id)));
        }
        None => tracing::debug!(method, "ignoring a server notification"),
    }
}

/// The start of a line, for a log or an error message.
fn quote(line: &[u8]) -> String {
    let end = line.len().min(QUOTE);
    let mut text = String::from_utf8_lossy(&line[..end]).into_owned();
    if end < line.len() {
        text.push_str("...");
    }
    text
}

fn decode_params<T: DeserializeOwned>(params: Option<&RawValue>) -> Result<T, serde_json::Error> {
    serde_json::from_str(params.map_or("null", RawValue::get))
}

/// A running (or starting) server and the handles to its tasks.
///
/// Dropping the last handle drops `_alive`, which tells the supervisor to kill the child.
pub(crate) struct Connection {
    shared: Arc<Shared>,
    writer: mpsc::UnboundedSender<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
    pid: Option<u32>,
    _alive: oneshot::Sender<()>,
}

impl Connection {
    /// Starts the server and its four tasks. Must run inside a Tokio runtime.
    pub(crate) fn spawn(config: &RlmConfig) -> Result<Arc<Self>, RlmError> {
        let mut command = config.server_command();
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let mut child = command.spawn().map_err(|source| RlmError::Spawn {
            command: program.clone(),
            source,
        })?;
        let pid = child.id();
        let stdin = child.stdin.take().expect("stdin is piped");
        let stdout = child.stdout.take().expect("stdout is piped");
        let stderr = child.stderr.take().expect("stderr is piped");
        tracing::debug!(?pid, %program, "spawned rlm-server");

        let shared = Arc::new(Shared {
            pending: Mutex::new(Some(HashMap::new())),
            state: watch::Sender::new(State::Starting),
            stderr_tail: Mutex::new(None),
            exit: OnceLock::new(),
            tools: Arc::default(),
        });
        let (writer, outgoing) = mpsc::unbounded_channel();
        let (control, orders) = mpsc::unbounded_channel();
        let (alive, dropped) = oneshot::channel();
        let (eof, stdout_closed) = oneshot::channel();
        tokio::spawn(write_loop(stdin, outgoing, control.clone()));
        tokio::spawn(read_loop(
            stdout,
            Reader {
                shared: shared.clone(),
                writer: writer.clone(),
                control: control.clone(),
                limit: config.max_line_bytes,
            },
            eof,
        ));
        tokio::spawn(drain_stderr(
            stderr,
            pid,
            shared.clone(),
            config.max_stderr_line.max(4),
        ));
        tokio::spawn(supervise(
            child,
            shared.clone(),
            Signals {
                orders,
                dropped,
                stdout_closed,
            },
            config.ready_timeout,
        ));
        Ok(Arc::new(Self {
            shared,
            writer,
            control,
            pid,
            _alive: alive,
        }))
    }

    /// The child's process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.pid
    }

    pub(crate) fn is_down(&self) -> bool {
        matches!(*self.shared.state.borrow(), State::Down(_))
    }

    /// Waits for `ready` (the supervisor bounds the wait by the ready timeout).
    pub(crate) async fn ready(&self) -> Result<Arc<ReadyParams>, RlmError> {
        if let State::Ready(ready) = &*self.shared.state.borrow() {
            return Ok(ready.clone());
        }
        let mut state = self.shared.state.subscribe();
        let settled = state
            .wait_for(|state| !matches!(state, State::Starting))
            .await
            .map(|state| state.clone());
        match settled {
            Ok(State::Ready(ready)) => Ok(ready),
            Ok(State::Down(down)) => Err(down.error()),
            _ => Err(RlmError::Closed),
        }
    }

    /// Registers request `id` and queues it for the writer. The returned guard cancels the
    /// request on the server if it is dropped before the answer arrives.
    pub(crate) fn request(
        &self,
        id: u64,
        method: &str,
        params: Option<Arc<RawValue>>,
        progress: Option<ProgressSink>,
        tools: Option<Arc<Tools>>,
    ) -> Result<InFlight<'_>, RlmError> {
        let (reply, answer) = oneshot::channel();
        let pending = Pending {
            reply,
            progress,
            tools,
        };
        self.shared.register(id, pending)?;
        let in_flight = InFlight {
            connection: self,
            id,
            answer,
        };
        self.send(Frame::request(id, method, params));
        Ok(in_flight)
    }

    /// Queues a notification (a request the server does not answer) without waiting, so it
    /// can be sent from `Drop`.
    pub(crate) fn notify(&self, method: &str, params: &impl serde::Serialize) {
        self.send(Frame::notification(method, params));
    }

    /// Queues a line without waiting, so it can be called from `Drop`. If the writer is gone
    /// the child is going down and the supervisor fails whatever was pending.
    fn send(&self, frame: Frame) {
        let _ = self.writer.send(Outgoing::Frame(frame));
    }

    /// Asks the child to stop: with a `grace`, by a `shutdown` notification with it; without,
    /// by ending its stdin (after a `shutdown` request was answered). Then waits up to `wait`
    /// for the child to exit, SIGTERM, waits up to `term_wait`, SIGKILL. Returns how the child
    /// ended, once it is reaped and everything still pending has failed.
    ///
    /// Stdin stays open after the notification: a server that reads the end of its input
    /// before it has run the `shutdown` drains for its own configured grace (30 s by
    /// default) instead, whatever `grace` said, and SIGTERM does not shorten that.
    pub(crate) async fn close(
        &self,
        grace: Option<Duration>,
        wait: Duration,
        term_wait: Duration,
    ) -> Exit {
        match grace {
            Some(grace) => self.send(Frame::shutdown(grace)),
            None => drop(self.writer.send(Outgoing::EndOfInput)),
        }
        let _ = self.control.send(Control::Close { wait, term_wait });
        let mut state = self.shared.state.subscribe();
        let _ = state
            .wait_for(|state| matches!(state, State::Down(_)))
            .await;
        self.shared
            .exit
            .get()
            .cloned()
            .unwrap_or_else(|| Exit::Unreaped("the runtime is shutting down".to_owned()))
    }
}

/// A request on the wire. Dropping it while the request is still pending (the caller's
/// future was dropped, or its timeout fired) sends `$/cancelRequest`, without awaiting.
pub(crate) struct InFlight<'a> {
    connection: &'a Connection,
    id: u64,
    answer: oneshot::Receiver<Reply>,
}

impl InFlight<'_> {
    pub(crate) async fn response(mut self) -> Reply {
        match (&mut self.answer).await {
            Ok(reply) => reply,
            Err(_) => Err(self.connection.shared.down_error()),
        }
    }
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        if self.connection.shared.take(self.id).is_some() {
            tracing::debug!(id = self.id, "cancelling an abandoned request");
            self.connection.send(Frame::cancel(self.id));
        }
    }
}

/// Owns stdin: writes queued lines in order, flushing whenever the queue runs dry, so a burst
/// of small requests costs few system calls. Closing stdin is the server's signal to shut down.
async fn write_loop(
    stdin: ChildStdin,
    mut outgoing: mpsc::UnboundedReceiver<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
) {
    let mut out = BufWriter::with_capacity(IO_BUFFER, stdin);
    if let Err(error) = pump(&mut out, &mut outgoing).await {
        tracing::warn!(%error, "writing to rlm-server's stdin failed");
        let _ = control.send(Control::Kill(Down::Exited(format!(
            "its stdin failed ({error})"
        ))));
    }
    let _ = out.shutdown().await;
}

async fn pump(
    out: &mut BufWriter<ChildStdin>,
    outgoing: &mut mpsc::UnboundedReceiver<Outgoing>,
) -> io::Result<()> {
    while let Some(Outgoing::Frame(frame)) = outgoing.recv().await {
        frame.write_to(out).await?;
        loop {
            match outgoing.try_recv() {
                Ok(Outgoing::Frame(frame)) => frame.write_to(out).await?,
                Ok(Outgoing::EndOfInput) => return out.flush().await,
                Err(_) => break,
            }
        }
        out.flush().await?;
    }
    Ok(())
}

/// What the reader task needs besides stdout.
struct Reader {
    shared: Arc<Shared>,
    /// To cancel calls failed by an oversized line with no readable id.
    writer: mpsc::UnboundedSender<Outgoing>,
    control: mpsc::UnboundedSender<Control>,
    /// The longest line kept, in bytes.
    limit: usize,
}

/// Owns stdout: reads lines up to the limit and routes them; a longer line is read to its end
/// without being kept and fails the call it answers. The end of stdout (the child closed it,
/// which means it exited) is reported to the supervisor.
async fn read_loop(stdout: ChildStdout, reader: Reader, eof: oneshot::Sender<()>) {
    let mut input = BufReader::with_capacity(IO_BUFFER, stdout);
    let mut line = Vec::new();
    loop {
        let outcome = match read_segment(&mut input, &mut line, reader.limit).await {
            Ok(Segment::Full) => skip_line(&mut input, &mut line).await.map(|(tail, ended)| {
                for id in reader.shared.oversized(&line, &tail, reader.limit) {
                    let _ = reader.writer.send(Outgoing::Frame(Frame::cancel(id)));
                }
                ended
            }),
            Ok(segment) => {
                if let Err(down) = reader.shared.dispatch(&line, &reader.writer) {
                    tracing::error!(?down, "cannot talk to this rlm-server");
                    let _ = reader.control.send(Control::Kill(down));
                }
                Ok(segment == Segment::Eof)
            }
            Err(error) => Err(error),
        };
        match outcome {
            Ok(false) => {}
            Ok(true) => break,
            Err(error) => {
                tracing::warn!(%error, "reading rlm-server's stdout failed");
                break;
            }
        }
        line.clear();
        if line.capacity() > KEEP_LINE_BUFFER {
            line = Vec::new();
        }
    }
    let _ = eof.send(());
}

/// Reads stderr to its end, one `tracing` event per line (target `rlm_server`), a line longer
/// than `limit` bytes in pieces of at most `limit`, so memory stays bounded whatever the child
/// writes. Reading it at all is the point: a child whose stderr pipe fills up blocks forever.
async fn drain_stderr(stderr: ChildStderr, pid: Option<u32>, shared: Arc<Shared>, limit: usize) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    loop {
        let segment = read_segment(&mut reader, &mut line, limit).await;
        // A piece cut at the limit keeps a split character for the next piece.
        let cut = match segment {
            Ok(Segment::Full) => utf8_cut(&line),
            _ => line.len(),
        };
        let text = String::from_utf8_lossy(line[..cut].trim_ascii_end());
        if !text.is_empty() {
            tracing::info!(target: "rlm_server", pid = pid.unwrap_or(0), "{text}");
            shared.remember_stderr(&text);
        }
        line.drain(..cut);
        if !matches!(segment, Ok(Segment::Line | Segment::Full)) {
            break;
        }
    }
}

/// What the supervisor listens to besides the child itself.
struct Signals {
    orders: mpsc::UnboundedReceiver<Control>,
    dropped: oneshot::Receiver<()>,
    stdout_closed: oneshot::Receiver<()>,
}

enum Event {
    Exited(io::Result<ExitStatus>),
    StdoutClosed,
    Order(Control),
    Dropped,
}

/// Owns the child from spawn to reaping, then takes the connection down. Whatever ends it
/// (exit, closed stdout, close, kill, drop, no `ready` in time), every wait is bounded.
async fn supervise(
    mut child: Child,
    shared: Arc<Shared>,
    signals: Signals,
    ready_timeout: Duration,
) {
    let Signals {
        mut orders,
        mut dropped,
        mut stdout_closed,
    } = signals;
    let event = tokio::select! {
        status = child.wait() => Event::Exited(status),
        _ = &mut stdout_closed => Event::StdoutClosed,
        Some(order) = orders.recv() => Event::Order(order),
        _ = &mut dropped => Event::Dropped,
        _ = ready_watchdog(&shared, ready_timeout) => {
            Event::Order(Control::Kill(Down::ReadyTimeout(ready_timeout)))
        }
    };
    let (down, exit) = match event {
        Event::Exited(status) => {
            let _ = timeout(LINGER, stdout_closed).await;
            let exit = Exit::from_wait(status, Exit::Exited);
            (Down::Exited(shared.describe_exit(&exit)), exit)
        }
        Event::StdoutClosed => {
            let exit = match timeout(LINGER, child.wait()).await {
                Ok(status) => Exit::from_wait(status, Exit::Exited),
                Err(_) => kill_child(&mut child).await,
            };
            (Down::Exited(shared.describe_exit(&exit)), exit)
        }
        Event::Order(Control::Close { wait, term_wait }) => {
            let exit = close_child(&mut child, wait, term_wait).await;
            tracing::debug!(?exit, "rlm-server closed");
            let _ = timeout(LINGER, stdout_closed).await;
            (Down::Closed, exit)
        }
        Event::Order(Control::Kill(Down::Exited(why))) => {
            let exit = kill_child(&mut child).await;
            let down = Down::Exited(format!("{why}; {}", shared.describe_exit(&exit)));
            (down, exit)
        }
        Event::Order(Control::Kill(down)) => (down, kill_child(&mut child).await),
        Event::Dropped => (Down::Closed, kill_child(&mut child).await),
    };
    let _ = shared.exit.set(exit);
    shared.go_down(down);
}

/// Completes only if the server is still starting when `limit` has passed.
async fn ready_watchdog(shared: &Shared, limit: Duration) {
    let mut state = shared.state.subscribe();
    let settled = timeout(limit, state.wait_for(|s| !matches!(s, State::Starting)))
        .await
        .is_ok();
    if settled {
        std::future::pending::<()>().await;
    }
    tracing::error!(?limit, "rlm-server sent no `ready` in time; killing it");
}

/// The child was asked to stop: wait, SIGTERM, wait, SIGKILL.
async fn close_child(child: &mut Child, wait: Duration, term_wait: Duration) -> Exit {
    if let Ok(status) = timeout(wait, child.wait()).await {
        return Exit::from_wait(status, Exit::Exited);
    }
    // `id()` is None once the child is reaped, so the signal cannot hit a reused pid.
    if let Some(pid) = child.id() {
        tracing::warn!(pid, ?wait, "rlm-server did not exit when asked to; SIGTERM");
        terminate(pid);
    }
    if let Ok(status) = timeout(term_wait, child.wait()).await {
        return Exit::from_wait(status, Exit::Terminated);
    }
    tracing::warn!(?term_wait, "rlm-server did not exit after SIGTERM; SIGKILL");
    kill_child(child).await
}

async fn kill_child(child: &mut Child) -> Exit {
    // Fails only when the child was already reaped, and then `wait` answers at once.
    let _ = child.start_kill();
    match timeout(KILL_WAIT, child.wait()).await {
        Ok(status) => Exit::from_wait(status, Exit::Killed),
        Err(_) => Exit::Unreaped("still alive after SIGKILL".to_owned()),
    }
}

/// Sends SIGTERM. Tokio only offers SIGKILL; libc's `kill` is linked into every Unix program,
/// so declaring it costs no dependency.
#[cfg(unix)]
fn terminate(pid: u32) {
    unsafe extern "C" {
        fn kill(pid: i32, signal: i32) -> i32;
    }
    const SIGTERM: i32 = 15;
    // SAFETY: `kill` has no memory-safety preconditions; `pid` is our own unreaped child.
    unsafe {
        kill(pid as i32, SIGTERM);
    }
}

/// No SIGTERM outside Unix: the SIGKILL step follows after its wait.
#[cfg(not(unix))]
fn terminate(_pid: u32) {}

//! [`InferRequest`]: what one `infer` call asks, plus its client-side settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::RlmError;
use crate::protocol::{InferOptions, InferParams, Message, Progress, Prompt};
use crate::tools::Tools;

/// One `infer` call: the wire params (`prompt` or `context_id`, `query`, `options`) plus the
/// client-side `timeout` and an optional progress sink.
///
/// ```
/// use rlm_client::{InferOptions, InferRequest};
/// let request = InferRequest::new("...a long document...")
///     .query("What is the secret code?")
///     .options(InferOptions::new().max_iterations(6))
///     .timeout(std::time::Duration::from_secs(120))
///     .on_progress(|p| println!("{}", p.event));
/// // The same question about a context stored once with `RlmClient::load_context`:
/// let stored = InferRequest::context("ctx-...").query("What is the secret code?");
/// # let _ = (request, stored);
/// ```
#[non_exhaustive]
pub struct InferRequest {
    /// The long input; it becomes `context` in the model's REPL. `None` for a request on a
    /// stored context ([`InferRequest::context`]) and for a session turn with no new input
    /// ([`InferRequest::turn`]).
    pub prompt: Option<Prompt>,
    /// A context stored with [`crate::RlmClient::load_context`], which becomes `context` in
    /// the model's REPL instead of a prompt.
    pub context_id: Option<String>,
    /// The short question shown to the root model.
    pub query: Option<String>,
    /// Per-request options, sent as they are.
    pub options: InferOptions,
    /// Bound of the whole call, retries included; defaults to
    /// [`crate::RlmConfig::request_timeout`]. When it passes the client sends
    /// `$/cancelRequest` and returns [`RlmError::Timeout`].
    pub timeout: Option<Duration>,
    progress: Option<ProgressSink>,
    tools: Tools,
}

impl InferRequest {
    /// A request for a string or message-list prompt.
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        Self::bare().prompt(prompt)
    }

    /// A request whose prompt is a list of chat messages.
    pub fn messages(messages: Vec<Message>) -> Self {
        Self::new(messages)
    }

    /// A request on a context stored with [`crate::RlmClient::load_context`] (its
    /// [`crate::LoadedContext::context_id`]): the context does not cross the pipe again. An
    /// id the server does not know fails with [`RlmError::InvalidParams`] whose
    /// [`RlmError::field`] is `context_id`.
    pub fn context(context_id: impl Into<String>) -> Self {
        Self {
            context_id: Some(context_id.into()),
            ..Self::bare()
        }
    }

    /// A turn of a session ([`crate::Session::infer_with`]): `query` about what the session
    /// holds, with no new input; [`InferRequest::prompt`] adds one.
    pub fn turn(query: impl Into<String>) -> Self {
        Self::bare().query(query)
    }

    fn bare() -> Self {
        Self {
            prompt: None,
            context_id: None,
            query: None,
            options: InferOptions::default(),
            timeout: None,
            progress: None,
            tools: Tools::default(),
        }
    }

    /// Sets the long input (for a session turn: the turn's new input, the session's next
    /// `context_N`).
    pub fn prompt(mut self, prompt: impl Into<Prompt>) -> Self {
        self.prompt = Some(prompt.into());
        self
    }

    /// Sets the question shown to the root model.
    pub fn query(mut self, query: impl Into<String>) -> Self {
        self.query = Some(query.into());
        self
    }

    /// Sets the per-request options.
    pub fn options(mut self, options: InferOptions) -> Self {
        self.options = options;
        self
    }

    /// Sets the bound of the whole call.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }

    /// Calls `callback` with every `$/progress` notification of this call (and asks the server
    /// for them). It runs on the client's reader task, so it must return quickly; use
    /// [`InferRequest::progress_channel`] for anything slow. A panic in it is caught and
    /// logged.
    pub fn on_progress(mut self, callback: impl Fn(Progress) + Send + Sync + 'static) -> Self {
        self.progress = Some(ProgressSink::Callback(Arc::new(callback)));
        self
    }

    /// Sends every `$/progress` notification of this call into `sender` (and asks the server
    /// for them). The channel is unbounded so that a slow reader never stalls the client.
    pub fn progress_channel(mut self, sender: mpsc::UnboundedSender<Progress>) -> Self {
        self.progress = Some(ProgressSink::Channel(sender));
        self
    }

    /// Declares a host tool that model code may call: `name` (a Python identifier) becomes a
    /// function of keyword arguments in the REPL, listed with `description` in the root
    /// model's prompt; the server checks each call's arguments against `schema` (a JSON
    /// Schema object) before `handler` sees them. The handler runs in a task of its own
    /// (calls may overlap); its `Ok` value reaches model code, its `Err` reaches it as
    /// `ToolError` with the error's text. A call the server cancels (the request was
    /// cancelled or timed out, or the call passed [`InferOptions::tool_timeout_s`]) drops the
    /// handler's future.
    ///
    /// ```
    /// use rlm_client::InferRequest;
    /// use serde_json::{Value, json};
    /// let request = InferRequest::new("...").query("Who owns record 42?").tool(
    ///     "lookup",
    ///     "Look a record up by its key.",
    ///     json!({"type": "object", "properties": {"key": {"type": "string"}}, "required": ["key"]}),
    ///     |args: Value| async move { Ok::<_, String>(json!({"owner": "ada", "key": args["key"]})) },
    /// );
    /// # let _ = request;
    /// ```
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

    /// The wire params, encoded once so that retries resend them without re-encoding a
    /// prompt that may be hundreds of megabytes (as a turn of `session_id`, when given); the
    /// timeout; the progress sink.
    pub(crate) fn into_wire(self, session_id: Option<&str>) -> Result<Wire, RlmError> {
        let mut options = self.options;
        if self.progress.is_some() {
            options.progress = Some(true);
        }
        let stored = self.context_id.is_some() || session_id.is_some();
        let params = InferParams {
            prompt: self.prompt,
            messages: None,
            context_id: self.context_id,
            session_id: session_id.map(str::to_owned),
            query: self.query,
            options: (options != InferOptions::default()).then_some(options),
            tools: self.tools.declarations(),
        };
        Ok(Wire {
            params: encode_params("infer", &params)?,
            timeout: self.timeout,
            progress: self.progress,
            tools: (!self.tools.is_empty()).then(|| Arc::new(self.tools)),
            stored,
        })
    }
}

/// Params encoded once, to be sent (and resent) as they are.
pub(crate) fn encode_params(
    method: &str,
    params: &impl serde::Serialize,
) -> Result<Arc<RawValue>, RlmError> {
    serde_json::value::to_raw_value(params)
        .map(Arc::from)
        .map_err(|e| RlmError::Protocol(format!("cannot encode {method} params: {e}")))
}

/// An [`InferRequest`] taken apart for sending.
pub(crate) struct Wire {
    pub(crate) params: Arc<RawValue>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) progress: Option<ProgressSink>,
    /// The handlers of its host tools.
    pub(crate) tools: Option<Arc<Tools>>,
    /// Whether it names what only the server it is sent to holds (a stored context or a
    /// session), so that it must not be sent again to a new server.
    pub(crate) stored: bool,
}

impl fmt::Debug for InferRequest {
    /// Shows the prompt's size, not the prompt: it may be hundreds of megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prompt = match &self.prompt {
            Some(Prompt::Text(text)) => format!("{} bytes of text", text.len()),
            Some(Prompt::Messages(messages)) => format!("{} messages", messages.len()),
            None => "none".to_owned(),
        };
        f.debug_struct("InferRequest")
            .field("prompt", &prompt)
            .field("context_id", &self.context_id)
            .field("query", &self.query)
            .field("options", &self.options)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
            .field("tools", &self.tools)
            .finish()
    }
}

/// Where a call's progress notifications go.
#[derive(Clone)]
pub(crate) enum ProgressSink {
    Callback(Arc<dyn Fn(Progress) + Send + Sync>),
    Channel(mpsc::UnboundedSender<Progress>),
}

impl ProgressSink {
    pub(crate) fn deliver(&self, progress: Progress) {
        match self {
            // It runs on the reader task: a panic must not take the connection down with it.
            ProgressSink::Callback(callback) => {
                let call = std::panic::AssertUnwindSafe(|| callback(progress));
                if std::panic::catch_unwind(call).is_err() {
                    tracing::error!("a progress callback panicked; the call goes on");
                }
            }
            // A receiver that went away just stops listening; the call goes on.
            ProgressSink::Channel(sender) => drop(sender.send(progress)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Backend, Budget, SubcallErrors};
    use serde_json::json;

    fn wire(request: InferRequest) -> serde_json::Value {
        let wire = request.into_wire(None).unwrap();
        serde_json::from_str(wire.params.get()).unwrap()
    }

    #[test]
    fn a_plain_prompt_sends_only_the_prompt() {
        assert_eq!(wire(InferRequest::new("ctx")), json!({"prompt": "ctx"}));
    }

    #[test]
    fn every_option_goes_out_snake_case() {
        let options = InferOptions {
            backend: Some(Backend::AzureOpenai),
            model: Some("m".into()),
            sub_model: Some("s".into()),
            base_url: Some("http://x/v1".into()),
            max_iterations: Some(3),
            max_depth: Some(2),
            timeout_s: Some(1.5),
            temperature: Some(0.2),
            max_tokens: Some(100),
            progress: Some(false),
            trajectory: Some(true),
            budget: Some(Budget::new().max_calls(5).max_cost_usd(0.25)),
            subcall_errors: Some(SubcallErrors::Model),
            tool_timeout_s: Some(2.0),
            answer_schema: Some(json!({"type": "object"})),
            answer_repairs: Some(1),
        };
        let request = InferRequest::messages(vec![Message::new("user", "hi")])
            .query("q")
            .options(options);
        assert_eq!(
            wire(request),
            json!({
                "prompt": [{"role": "user", "content": "hi"}],
                "query": "q",
                "options": {
                    "backend": "azure_openai", "model": "m", "sub_model": "s",
                    "base_url": "http://x/v1", "max_iterations": 3, "max_depth": 2,
                    "timeout_s": 1.5, "temperature": 0.2, "max_tokens": 100,
                    "progress": false, "trajectory": true,
                    "budget": {"max_calls": 5, "max_cost_usd": 0.25},
                    "subcall_errors": "model",
                    "tool_timeout_s": 2.0,
                    "answer_schema": {"type": "object"}, "answer_repairs": 1
                }
            })
        );
    }

    #[test]
    fn a_stored_context_or_a_session_replaces_the_prompt() {
        assert_eq!(
            wire(InferRequest::context("ctx-1").query("q")),
            json!({"context_id": "ctx-1", "query": "q"})
        );
        let turn = InferRequest::turn("q")
            .prompt("more")
            .into_wire(Some("ses-1"));
        let turn = turn.unwrap();
        assert!(turn.stored, "a session turn names what one server holds");
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(turn.params.get()).unwrap(),
            json!({"session_id": "ses-1", "query": "q", "prompt": "more"})
        );
        assert!(
            InferRequest::context("ctx-1")
                .into_wire(None)
                .unwrap()
                .stored
        );
        assert!(!InferRequest::new("p").into_wire(None).unwrap().stored);
    }

    #[test]
    fn a_progress_sink_asks_for_progress() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let request = InferRequest::new("ctx").progress_channel(tx);
        assert_eq!(
            wire(request),
            json!({"prompt": "ctx", "options": {"progress": true}})
        );
    }

    #[test]
    fn a_panicking_callback_is_contained() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let request = InferRequest::new("ctx").on_progress(move |_| {
            counted.fetch_add(1, Ordering::SeqCst);
            panic!("a bug in the callback");
        });
        let sink = request.into_wire(None).unwrap().progress.unwrap();
        let progress: Progress =
            serde_json::from_value(json!({"id": 1, "event": "started", "elapsed_ms": 0.5}))
                .unwrap();
        sink.deliver(progress.clone());
        sink.deliver(progress);
        assert_eq!(
            calls.load(Ordering::SeqCst),
            2,
            "still called after a panic"
        );
    }

    #[test]
    fn debug_does_not_print_the_prompt() {
        let shown = format!("{:?}", InferRequest::new("secret".repeat(10)));
        assert!(
            shown.contains("60 bytes") && !shown.contains("secret"),
            "{shown}"
        );
    }
}

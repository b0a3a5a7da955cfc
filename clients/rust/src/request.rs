//! [`InferRequest`]: what one `infer` call asks, plus its client-side settings.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::RlmError;
use crate::protocol::{InferOptions, InferParams, Message, Progress, Prompt};

/// One `infer` call: the wire params (`prompt`, `query`, `options`) plus the client-side
/// `timeout` and an optional progress sink.
///
/// ```
/// use rlm_client::{InferOptions, InferRequest};
/// let request = InferRequest::new("...a long document...")
///     .query("What is the secret code?")
///     .options(InferOptions::new().max_iterations(6))
///     .timeout(std::time::Duration::from_secs(120))
///     .on_progress(|p| println!("{}", p.event));
/// # let _ = request;
/// ```
#[non_exhaustive]
pub struct InferRequest {
    /// The long input; it becomes `context` in the model's REPL.
    pub prompt: Prompt,
    /// The short question shown to the root model.
    pub query: Option<String>,
    /// Per-request options, sent as they are.
    pub options: InferOptions,
    /// Bound of the whole call, retries included; defaults to
    /// [`crate::RlmConfig::request_timeout`]. When it passes the client sends
    /// `$/cancelRequest` and returns [`RlmError::Timeout`].
    pub timeout: Option<Duration>,
    progress: Option<ProgressSink>,
}

impl InferRequest {
    /// A request for a string or message-list prompt.
    pub fn new(prompt: impl Into<Prompt>) -> Self {
        Self {
            prompt: prompt.into(),
            query: None,
            options: InferOptions::default(),
            timeout: None,
            progress: None,
        }
    }

    /// A request whose prompt is a list of chat messages.
    pub fn messages(messages: Vec<Message>) -> Self {
        Self::new(messages)
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

    /// The wire params, encoded once so that retries resend them without re-encoding a
    /// prompt that may be hundreds of megabytes; the timeout; the progress sink.
    pub(crate) fn into_wire(self) -> Result<Wire, RlmError> {
        let mut options = self.options;
        if self.progress.is_some() {
            options.progress = Some(true);
        }
        let params = InferParams {
            prompt: Some(self.prompt),
            messages: None,
            query: self.query,
            options: (options != InferOptions::default()).then_some(options),
        };
        let encoded = serde_json::value::to_raw_value(&params)
            .map_err(|e| RlmError::Protocol(format!("cannot encode infer params: {e}")))?;
        Ok(Wire {
            params: Arc::from(encoded),
            timeout: self.timeout,
            progress: self.progress,
        })
    }
}

/// An [`InferRequest`] taken apart for sending.
pub(crate) struct Wire {
    pub(crate) params: Arc<RawValue>,
    pub(crate) timeout: Option<Duration>,
    pub(crate) progress: Option<ProgressSink>,
}

impl fmt::Debug for InferRequest {
    /// Shows the prompt's size, not the prompt: it may be hundreds of megabytes.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let prompt = match &self.prompt {
            Prompt::Text(text) => format!("{} bytes of text", text.len()),
            Prompt::Messages(messages) => format!("{} messages", messages.len()),
        };
        f.debug_struct("InferRequest")
            .field("prompt", &prompt)
            .field("query", &self.query)
            .field("options", &self.options)
            .field("timeout", &self.timeout)
            .field("progress", &self.progress.is_some())
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
    use crate::protocol::{Backend, Budget};
    use serde_json::json;

    fn wire(request: InferRequest) -> serde_json::Value {
        let wire = request.into_wire().unwrap();
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
                    "budget": {"max_calls": 5, "max_cost_usd": 0.25}
                }
            })
        );
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
        let sink = request.into_wire().unwrap().progress.unwrap();
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

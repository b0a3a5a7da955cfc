//! Client-side metrics of `infer` calls, the same set as the TypeScript client's.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use crate::config::MetricsCallback;
use crate::error::RlmError;
use crate::protocol::InferResult;

/// How many latencies the averages are computed over (the server uses the same window).
const WINDOW: usize = 1000;

/// A snapshot of the client's `infer` metrics, read with [`crate::RLMClient::metrics`].
///
/// Every `infer` call counts once in `total_requests` and, when it ends, once in exactly one
/// of `successful_requests`, `stub_responses` or `failed_requests`: a stub is not a success and
/// a failure (including a timeout, or a call dropped by its caller) is not a stub. Retries
/// count in `total_retries`, not as requests.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Metrics {
    /// `infer` calls made.
    pub total_requests: u64,
    /// Calls answered with a real (non-stub) result.
    pub successful_requests: u64,
    /// Calls that ended in an error, timed out or were dropped.
    pub failed_requests: u64,
    /// Calls answered by a server in stub mode.
    pub stub_responses: u64,
    /// Retries the client made (not counting the server's own).
    pub total_retries: u64,
    /// Mean latency of the last 1000 answered calls, in milliseconds.
    pub average_latency_ms: f64,
    /// 95th percentile of the same window, in milliseconds.
    pub p95_latency_ms: f64,
    /// When the last call began.
    pub last_request_timestamp: Option<SystemTime>,
    /// When the last failure happened.
    pub last_error_timestamp: Option<SystemTime>,
    /// The last failure, as text.
    pub last_error: Option<String>,
}

/// The counters behind [`Metrics`]: one short lock per update, never held across an await.
pub(crate) struct Recorder {
    state: Mutex<State>,
    on_metrics: Option<MetricsCallback>,
}

#[derive(Default)]
struct State {
    metrics: Metrics,
    latencies_ms: VecDeque<f64>,
}

impl Recorder {
    pub(crate) fn new(on_metrics: Option<MetricsCallback>) -> Self {
        Self {
            state: Mutex::new(State::default()),
            on_metrics,
        }
    }

    /// Counts a new call and returns the guard that records how it ends.
    pub(crate) fn begin(&self) -> Tracked<'_> {
        self.update(|m| {
            m.metrics.total_requests += 1;
            m.metrics.last_request_timestamp = Some(SystemTime::now());
        });
        Tracked {
            recorder: self,
            started: std::time::Instant::now(),
            finished: false,
        }
    }

    pub(crate) fn retried(&self) {
        self.update(|m| m.metrics.total_retries += 1);
    }

    /// A consistent copy, with the averages computed from the window.
    pub(crate) fn snapshot(&self) -> Metrics {
        summarise(&self.state.lock().unwrap_or_else(|e| e.into_inner()))
    }

    fn answered(&self, result: &InferResult, latency: Duration) {
        self.update(|m| {
            if result.stub {
                m.metrics.stub_responses += 1;
            } else {
                m.metrics.successful_requests += 1;
            }
            if m.latencies_ms.len() == WINDOW {
                m.latencies_ms.pop_front();
            }
            m.latencies_ms.push_back(latency.as_secs_f64() * 1000.0);
        });
    }

    fn failed(&self, error: String) {
        self.update(|m| {
            m.metrics.failed_requests += 1;
            m.metrics.last_error_timestamp = Some(SystemTime::now());
            m.metrics.last_error = Some(error);
        });
    }

    /// Applies `change` under the lock, then hands a snapshot to the callback outside it.
    fn update(&self, change: impl FnOnce(&mut State)) {
        let snapshot = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            change(&mut state);
            self.on_metrics.as_ref().map(|_| summarise(&state))
        };
        if let (Some(callback), Some(snapshot)) = (&self.on_metrics, snapshot) {
            callback(&snapshot);
        }
    }
}

fn summarise(state: &State) -> Metrics {
    let mut metrics = state.metrics.clone();
    let mut sorted: Vec<f64> = state.latencies_ms.iter().copied().collect();
    if !sorted.is_empty() {
        sorted.sort_by(f64::total_cmp);
        metrics.average_latency_ms = sorted.iter().sum::<f64>() / sorted.len() as f64;
        let rank = (sorted.len() as f64 * 0.95).ceil() as usize;
        metrics.p95_latency_ms = sorted[rank.clamp(1, sorted.len()) - 1];
    }
    metrics
}

/// One call in progress. Dropping it unfinished (the caller dropped the `infer` future)
/// records a failure, so that every call ends up counted somewhere.
pub(crate) struct Tracked<'a> {
    recorder: &'a Recorder,
    started: std::time::Instant,
    finished: bool,
}

impl Tracked<'_> {
    pub(crate) fn finish(mut self, outcome: &Result<InferResult, RlmError>) {
        self.finished = true;
        match outcome {
            Ok(result) => self.recorder.answered(result, self.started.elapsed()),
            Err(error) => self.recorder.failed(error.to_string()),
        }
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.recorder.failed("dropped by the caller".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    fn result(stub: bool) -> InferResult {
        serde_json::from_value(serde_json::json!({
            "text": "t", "stub": stub,
            "usage": {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": null, "models": {}},
            "metadata": {"backend": "b", "model": "m", "iterations": 0, "depth": 0, "elapsed_ms": 0, "attempts": 0}
        }))
        .unwrap()
    }

    #[test]
    fn every_call_ends_in_exactly_one_bucket() {
        let recorder = Recorder::new(None);
        recorder.begin().finish(&Ok(result(false)));
        recorder.begin().finish(&Ok(result(true)));
        recorder.begin().finish(&Err(RlmError::Closed));
        drop(recorder.begin());
        recorder.retried();
        let m = recorder.snapshot();
        assert_eq!(
            (
                m.total_requests,
                m.successful_requests,
                m.stub_responses,
                m.failed_requests
            ),
            (4, 1, 1, 2)
        );
        assert_eq!(m.total_retries, 1);
        assert_eq!(m.last_error.as_deref(), Some("dropped by the caller"));
        assert!(m.last_request_timestamp.is_some() && m.last_error_timestamp.is_some());
    }

    #[test]
    fn latency_summary_covers_a_rolling_window() {
        let recorder = Recorder::new(None);
        let mut state = recorder.state.lock().unwrap();
        state.latencies_ms.extend((1..=100).map(f64::from));
        drop(state);
        let m = recorder.snapshot();
        assert_eq!(m.average_latency_ms, 50.5);
        assert_eq!(m.p95_latency_ms, 95.0);
        for _ in 0..(WINDOW + 10) {
            recorder.answered(&result(false), Duration::from_millis(1));
        }
        assert_eq!(recorder.state.lock().unwrap().latencies_ms.len(), WINDOW);
    }

    #[test]
    fn the_callback_sees_every_change() {
        let calls = Arc::new(AtomicU64::new(0));
        let seen = calls.clone();
        let recorder = Recorder::new(Some(Arc::new(move |m: &Metrics| {
            seen.store(
                m.total_requests * 10 + m.successful_requests,
                Ordering::SeqCst,
            );
        })));
        recorder.begin().finish(&Ok(result(false)));
        assert_eq!(calls.load(Ordering::SeqCst), 11);
    }
}

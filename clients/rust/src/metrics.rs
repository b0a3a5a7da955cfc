//! Client-side metrics of `infer` calls, with the TypeScript client's names and rules.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use crate::config::MetricsCallback;
use crate::error::RlmError;
use crate::protocol::InferResult;

/// How many latencies the summary is computed over (the server uses the same window).
const WINDOW: usize = 1000;

/// A snapshot of the client's `infer` metrics, read with [`crate::RlmClient::metrics`].
///
/// Every settled `infer` counts once in `total_requests` and once in exactly one bucket, so
/// `total_requests = successful + stub + failed + cancelled + timed_out`: a stub is not a
/// success, a failure is not a stub, and a caller's cancellation is not a failure. Retries
/// count in `total_retries`, not as requests.
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// Settled `infer` calls.
    pub total_requests: u64,
    /// Calls answered with a real (non-stub) result.
    pub successful_requests: u64,
    /// Calls that failed with an error other than a cancellation or a deadline.
    pub failed_requests: u64,
    /// Calls answered by a server in stub mode.
    pub stub_responses: u64,
    /// Calls cancelled: dropped by the caller, or cancelled by the server (-32800, e.g. on
    /// its shutdown).
    pub cancelled_requests: u64,
    /// Calls past their deadline: the client's timeout, or the server's (-32001).
    pub timed_out_requests: u64,
    /// Retries the client made (the server's own are in its `status`).
    pub total_retries: u64,
    /// Mean latency of the last 1000 successful calls, in milliseconds.
    pub average_latency_ms: f64,
    /// Median of the same window, in milliseconds.
    pub p50_latency_ms: f64,
    /// 95th percentile of the same window, in milliseconds.
    pub p95_latency_ms: f64,
    /// 99th percentile of the same window, in milliseconds.
    pub p99_latency_ms: f64,
    /// When the last call settled.
    pub last_request_timestamp: Option<SystemTime>,
    /// When the last failure or timeout happened.
    pub last_error_timestamp: Option<SystemTime>,
    /// The last failure or timeout, as text.
    pub last_error: Option<String>,
}

/// How one call ended.
enum Settled<'a> {
    Answered(&'a InferResult),
    Failed(&'a RlmError),
    Dropped,
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

    /// Starts timing a call; the returned guard records how it settles.
    pub(crate) fn begin(&self) -> Tracked<'_> {
        Tracked {
            recorder: self,
            started: Instant::now(),
            settled: false,
        }
    }

    pub(crate) fn retried(&self) {
        self.lock().metrics.total_retries += 1;
    }

    /// A consistent copy, with the latency summary computed from the window.
    pub(crate) fn snapshot(&self) -> Metrics {
        summarise(&self.lock())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Counts a settled call, then hands a snapshot to the callback outside the lock.
    fn settle(&self, how: Settled<'_>, latency: Duration) {
        let snapshot = {
            let mut state = self.lock();
            state.count(how, latency);
            self.on_metrics.as_ref().map(|_| summarise(&state))
        };
        if let (Some(callback), Some(snapshot)) = (&self.on_metrics, snapshot) {
            callback(&snapshot);
        }
    }
}

impl State {
    fn count(&mut self, how: Settled<'_>, latency: Duration) {
        let now = SystemTime::now();
        let metrics = &mut self.metrics;
        metrics.total_requests += 1;
        metrics.last_request_timestamp = Some(now);
        let failure = match how {
            Settled::Answered(result) if result.stub => {
                metrics.stub_responses += 1;
                return;
            }
            Settled::Answered(_) => {
                metrics.successful_requests += 1;
                if self.latencies_ms.len() == WINDOW {
                    self.latencies_ms.pop_front();
                }
                self.latencies_ms.push_back(latency.as_secs_f64() * 1000.0);
                return;
            }
            Settled::Dropped | Settled::Failed(RlmError::Cancelled(_)) => {
                metrics.cancelled_requests += 1;
                return;
            }
            Settled::Failed(error @ (RlmError::Timeout(_) | RlmError::DeadlineExceeded(_))) => {
                metrics.timed_out_requests += 1;
                error
            }
            Settled::Failed(error) => {
                metrics.failed_requests += 1;
                error
            }
        };
        metrics.last_error_timestamp = Some(now);
        metrics.last_error = Some(failure.to_string());
    }
}

fn summarise(state: &State) -> Metrics {
    let mut metrics = state.metrics.clone();
    let mut sorted: Vec<f64> = state.latencies_ms.iter().copied().collect();
    if !sorted.is_empty() {
        sorted.sort_by(f64::total_cmp);
        metrics.average_latency_ms = sorted.iter().sum::<f64>() / sorted.len() as f64;
        metrics.p50_latency_ms = percentile(&sorted, 50.0);
        metrics.p95_latency_ms = percentile(&sorted, 95.0);
        metrics.p99_latency_ms = percentile(&sorted, 99.0);
    }
    metrics
}

/// Nearest-rank percentile of a non-empty ascending slice.
fn percentile(sorted: &[f64], p: f64) -> f64 {
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

/// One call in progress. Dropping it unsettled (the caller dropped the `infer` future)
/// records a cancellation, so every call is counted once.
pub(crate) struct Tracked<'a> {
    recorder: &'a Recorder,
    started: Instant,
    settled: bool,
}

impl Tracked<'_> {
    pub(crate) fn finish(mut self, outcome: &Result<InferResult, RlmError>) {
        self.settled = true;
        let how = match outcome {
            Ok(result) => Settled::Answered(result),
            Err(error) => Settled::Failed(error),
        };
        self.recorder.settle(how, self.started.elapsed());
    }
}

impl Drop for Tracked<'_> {
    fn drop(&mut self) {
        if !self.settled {
            self.recorder
                .settle(Settled::Dropped, self.started.elapsed());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::RpcError;
    use std::sync::Arc;

    fn result(stub: bool) -> InferResult {
        serde_json::from_value(serde_json::json!({
            "text": "t", "stub": stub,
            "usage": {"calls": 0, "input_tokens": 0, "output_tokens": 0, "cost_usd": null, "models": {}},
            "metadata": {"backend": "b", "model": "m", "iterations": 0, "depth": 0, "elapsed_ms": 0, "attempts": 0}
        }))
        .unwrap()
    }

    fn server_error(code: i64) -> RlmError {
        RlmError::from_rpc(RpcError {
            code,
            message: format!("error {code}"),
            data: None,
        })
    }

    #[test]
    fn every_call_lands_in_exactly_one_bucket() {
        let recorder = Recorder::new(None);
        recorder.begin().finish(&Ok(result(false)));
        recorder.begin().finish(&Ok(result(true)));
        recorder.begin().finish(&Err(server_error(-32000)));
        recorder.begin().finish(&Err(server_error(-32800)));
        drop(recorder.begin());
        recorder.begin().finish(&Err(server_error(-32001)));
        recorder
            .begin()
            .finish(&Err(RlmError::Timeout(Duration::from_secs(1))));
        recorder.retried();
        let m = recorder.snapshot();
        assert_eq!(m.total_requests, 7);
        assert_eq!(
            (m.successful_requests, m.stub_responses, m.failed_requests),
            (1, 1, 1)
        );
        assert_eq!((m.cancelled_requests, m.timed_out_requests), (2, 2));
        assert_eq!(m.total_retries, 1);
        assert!(m.last_error.unwrap().contains("no answer within 1s"));
        assert!(m.last_request_timestamp.is_some() && m.last_error_timestamp.is_some());
    }

    #[test]
    fn cancellations_are_not_errors() {
        let recorder = Recorder::new(None);
        drop(recorder.begin());
        recorder.begin().finish(&Err(server_error(-32800)));
        let m = recorder.snapshot();
        assert_eq!((m.cancelled_requests, m.failed_requests), (2, 0));
        assert_eq!((m.last_error, m.last_error_timestamp), (None, None));
    }

    #[test]
    fn latency_covers_the_last_successes_only() {
        let recorder = Recorder::new(None);
        recorder
            .lock()
            .latencies_ms
            .extend((1..=100).map(f64::from));
        let m = recorder.snapshot();
        assert_eq!(m.average_latency_ms, 50.5);
        assert_eq!(
            (m.p50_latency_ms, m.p95_latency_ms, m.p99_latency_ms),
            (50.0, 95.0, 99.0)
        );
        recorder.begin().finish(&Ok(result(true)));
        recorder.begin().finish(&Err(server_error(-32000)));
        assert_eq!(
            recorder.lock().latencies_ms.len(),
            100,
            "stubs and failures are not timed"
        );
        for _ in 0..(WINDOW + 10) {
            recorder.begin().finish(&Ok(result(false)));
        }
        assert_eq!(recorder.lock().latencies_ms.len(), WINDOW);
    }

    #[test]
    fn the_callback_gets_a_snapshot_per_settled_call() {
        let seen: Arc<Mutex<Vec<Metrics>>> = Arc::default();
        let sink = seen.clone();
        let recorder = Recorder::new(Some(Arc::new(move |m: &Metrics| {
            sink.lock().unwrap().push(m.clone());
        })));
        let tracked = recorder.begin();
        recorder.retried();
        assert!(seen.lock().unwrap().is_empty(), "nothing settled yet");
        tracked.finish(&Ok(result(false)));
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 1);
        assert_eq!(seen[0], recorder.snapshot());
        assert_eq!((seen[0].successful_requests, seen[0].total_retries), (1, 1));
    }
}

//! [`RLMConfig`]: how to start the server and how patient to be with it.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::RlmError;
use crate::metrics::Metrics;

/// Called with a fresh snapshot of the client's metrics after every settled `infer`.
pub type MetricsCallback = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Retry of retryable errors (see [`RlmError::is_retryable`]) with exponential backoff and
/// jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RetryConfig {
    /// Retries after the first attempt; 0 turns retrying off.
    pub max_retries: u32,
    /// Delay before the first retry; it doubles with every retry.
    pub initial_delay: Duration,
    /// Upper bound of the delay.
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    /// The elizaOS plugin's defaults: 3 retries, 1 s doubling up to 30 s.
    fn default() -> Self {
        Self {
            max_retries: 3,
            initial_delay: Duration::from_millis(1000),
            max_delay: Duration::from_millis(30_000),
        }
    }
}

impl RetryConfig {
    /// The delay before retry number `retry` (0-based): the doubled delay, capped, then
    /// scaled by a random factor in [0.5, 1) so that many clients that failed together do
    /// not retry together.
    pub(crate) fn delay(&self, retry: u32) -> Duration {
        let doubled = self.initial_delay.saturating_mul(1u32 << retry.min(20));
        doubled
            .min(self.max_delay)
            .mul_f64(0.5 + random_unit() / 2.0)
    }
}

/// A number in [0, 1). The std hasher is randomly keyed per instance, which is all the
/// randomness jitter needs, without a dependency.
fn random_unit() -> f64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

/// How the client starts and talks to the server.
///
/// Build one with [`RLMConfig::default`] or [`RLMConfig::from_env`] and change the public
/// fields:
///
/// ```
/// use std::time::Duration;
/// let config = rlm_client::RLMConfig {
///     command: "python3".into(),
///     args: vec!["-m".into(), "rlm_server".into()],
///     request_timeout: Duration::from_secs(60),
///     ..Default::default()
/// };
/// # let _ = config;
/// ```
#[derive(Clone)]
pub struct RLMConfig {
    /// Program to run.
    pub command: String,
    /// Its arguments (server flags such as `--max-concurrency 8` go here).
    pub args: Vec<String>,
    /// Variables added to the server's environment, which is otherwise the client's.
    pub env: Vec<(String, String)>,
    /// Variables removed from the server's environment (applied before `env`).
    pub env_remove: Vec<String>,
    /// How long a new server may take to send `ready` before it is killed.
    pub ready_timeout: Duration,
    /// Default bound of one call, retries included; [`crate::InferRequest::timeout`]
    /// overrides it per `infer`. When it passes the client sends `$/cancelRequest`.
    pub request_timeout: Duration,
    /// On close: how long to wait for the server to exit after its stdin is closed (the server
    /// lets in-flight requests finish first), before SIGTERM.
    pub close_timeout: Duration,
    /// On close: how long to wait after SIGTERM before SIGKILL.
    pub term_timeout: Duration,
    /// Retry of retryable errors.
    pub retry: RetryConfig,
    /// Called after every settled `infer` (the TypeScript client's `onMetrics`).
    pub on_metrics: Option<MetricsCallback>,
}

impl Default for RLMConfig {
    /// `rlm-server` on the `PATH`, 30 s to start, 10 min per call, 5 s + 5 s to close: the
    /// TypeScript client's defaults.
    fn default() -> Self {
        Self {
            command: "rlm-server".to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            ready_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            close_timeout: Duration::from_secs(5),
            term_timeout: Duration::from_secs(5),
            retry: RetryConfig::default(),
            on_metrics: None,
        }
    }
}

impl fmt::Debug for RLMConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RLMConfig")
            .field("command", &self.command)
            .field("args", &self.args)
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("env_remove", &self.env_remove)
            .field("ready_timeout", &self.ready_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("close_timeout", &self.close_timeout)
            .field("term_timeout", &self.term_timeout)
            .field("retry", &self.retry)
            .field("on_metrics", &self.on_metrics.is_some())
            .finish()
    }
}

impl RLMConfig {
    /// The defaults, adjusted by the elizaOS plugin's environment variables:
    ///
    /// - `ELIZA_RLM_PYTHON_PATH`: run `$ELIZA_RLM_PYTHON_PATH -m rlm_server` instead of
    ///   `rlm-server`;
    /// - `ELIZA_RLM_MAX_RETRIES`, `ELIZA_RLM_RETRY_DELAY` (ms), `ELIZA_RLM_RETRY_MAX_DELAY`
    ///   (ms): the client's retry settings.
    ///
    /// The server inherits the environment, so its own `ELIZA_RLM_*` settings reach it too.
    /// A value that is not a number, or a delay of 0, is an error naming the variable.
    pub fn from_env() -> Result<Self, RlmError> {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`RLMConfig::from_env`] over any variable lookup, so it can be tested without touching
    /// the process environment.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, RlmError> {
        let mut config = Self::default();
        if let Some(python) = lookup("ELIZA_RLM_PYTHON_PATH").filter(|p| !p.is_empty()) {
            config.command = python;
            config.args = vec!["-m".to_owned(), "rlm_server".to_owned()];
        }
        if let Some(retries) = number(&lookup, "ELIZA_RLM_MAX_RETRIES", 0)? {
            config.retry.max_retries = u32::try_from(retries).unwrap_or(u32::MAX);
        }
        if let Some(ms) = number(&lookup, "ELIZA_RLM_RETRY_DELAY", 1)? {
            config.retry.initial_delay = Duration::from_millis(ms);
        }
        if let Some(ms) = number(&lookup, "ELIZA_RLM_RETRY_MAX_DELAY", 1)? {
            config.retry.max_delay = Duration::from_millis(ms);
        }
        Ok(config)
    }
}

/// The variable `name` as a whole number of at least `min`, if it is set.
fn number(
    lookup: &impl Fn(&str) -> Option<String>,
    name: &str,
    min: u64,
) -> Result<Option<u64>, RlmError> {
    let Some(raw) = lookup(name) else {
        return Ok(None);
    };
    match raw.trim().parse::<u64>() {
        Ok(value) if value >= min => Ok(Some(value)),
        _ => Err(RlmError::Config(format!(
            "{name}={raw:?}: expected a whole number of at least {min}"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lookup(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let vars: Vec<(String, String)> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |name| vars.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    }

    #[test]
    fn defaults_run_rlm_server() {
        let config = RLMConfig::from_lookup(lookup(&[])).unwrap();
        assert_eq!(config.command, "rlm-server");
        assert!(config.args.is_empty());
        assert_eq!(config.retry, RetryConfig::default());
    }

    #[test]
    fn python_path_runs_the_module_and_retry_settings_are_read() {
        let config = RLMConfig::from_lookup(lookup(&[
            ("ELIZA_RLM_PYTHON_PATH", "/opt/py/bin/python"),
            ("ELIZA_RLM_MAX_RETRIES", "0"),
            ("ELIZA_RLM_RETRY_DELAY", "250"),
            ("ELIZA_RLM_RETRY_MAX_DELAY", "4000"),
        ]))
        .unwrap();
        assert_eq!(config.command, "/opt/py/bin/python");
        assert_eq!(config.args, ["-m", "rlm_server"]);
        assert_eq!(config.retry.max_retries, 0);
        assert_eq!(config.retry.initial_delay, Duration::from_millis(250));
        assert_eq!(config.retry.max_delay, Duration::from_secs(4));
    }

    #[test]
    fn bad_values_name_the_variable() {
        for (name, value) in [
            ("ELIZA_RLM_MAX_RETRIES", "abc"),
            ("ELIZA_RLM_MAX_RETRIES", "-1"),
            ("ELIZA_RLM_RETRY_DELAY", "0"),
        ] {
            let error = RLMConfig::from_lookup(lookup(&[(name, value)])).unwrap_err();
            assert!(error.to_string().contains(name), "{error}");
        }
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let retry = RetryConfig {
            max_retries: 10,
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
        };
        for (n, full) in [(0, 100), (1, 200), (3, 800), (4, 1000), (30, 1000)] {
            let delay = retry.delay(n);
            let full = Duration::from_millis(full);
            assert!(delay >= full / 2 && delay < full, "retry {n}: {delay:?}");
        }
    }
}

//! [`RlmConfig`]: how to start the server and how patient to be with it.

use std::fmt;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use tokio::process::Command;

use crate::metrics::Metrics;

/// Called with a fresh snapshot of the client's metrics after every settled `infer`.
pub type MetricsCallback = Arc<dyn Fn(&Metrics) + Send + Sync>;

/// Retry of what the server could not start (see [`crate::RlmError::is_retryable`]), with
/// exponential backoff and jitter.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
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
    /// `max_retries` retries, the first after `initial_delay`, doubling up to `max_delay`.
    pub fn new(max_retries: u32, initial_delay: Duration, max_delay: Duration) -> Self {
        Self {
            max_retries,
            initial_delay,
            max_delay,
        }
    }

    /// No retries.
    pub fn disabled() -> Self {
        Self {
            max_retries: 0,
            ..Self::default()
        }
    }

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

/// Builds the server's command line, when [`RlmConfig::program`] and its companions are not
/// enough (a process group, a umask, a wrapper). Called for every start: the client starts a
/// new server after one dies or is closed.
pub type CommandFactory = Arc<dyn Fn() -> Command + Send + Sync>;

/// How the client starts and talks to the server.
///
/// Build one with [`RlmConfig::builder`] (defaults) or [`RlmConfig::from_env`]; the fields are
/// public to read and to change, and the struct is `#[non_exhaustive]` so that new settings
/// are not breaking changes:
///
/// ```
/// use std::time::Duration;
/// let config = rlm_client::RlmConfig::builder()
///     .program("python3")
///     .args(["-m", "rlm_server", "--max-concurrency", "8"])
///     .env("ELIZA_RLM_BACKEND", "openai")
///     .request_timeout(Duration::from_secs(60))
///     .build();
/// assert_eq!(config.program, "python3");
/// ```
#[derive(Clone)]
#[non_exhaustive]
pub struct RlmConfig {
    /// Program to run.
    pub program: String,
    /// Its arguments (server flags such as `--max-concurrency 8` go here).
    pub args: Vec<String>,
    /// Variables added to the server's environment, which is otherwise the client's.
    pub env: Vec<(String, String)>,
    /// Variables removed from the server's environment (applied before `env`).
    pub env_remove: Vec<String>,
    /// The server's working directory; the client's when `None`.
    pub current_dir: Option<PathBuf>,
    /// When set, the server is started from the [`Command`] this returns (its program,
    /// arguments, working directory and environment), and `program`, `args`, `env`,
    /// `env_remove` and `current_dir` are not used. The client sets the three pipes and
    /// `kill_on_drop(true)` on it.
    pub command: Option<CommandFactory>,
    /// How long a new server may take to send `ready` before it is killed.
    pub ready_timeout: Duration,
    /// Default bound of one call, retries included; [`crate::InferRequest::timeout`] and the
    /// `timeout` arguments of `status` and `shutdown` override it. When it passes the client
    /// sends `$/cancelRequest`.
    pub request_timeout: Duration,
    /// How long [`crate::RlmClient::close`] lets in-flight requests run: it sends `shutdown`
    /// with this grace (the server's own default is 30 s) and ends the server's input.
    pub shutdown_grace: Duration,
    /// On close: how long past the grace to wait for the server to exit (it cancels what is
    /// left when the grace ends, answers, and exits), before SIGTERM.
    pub close_margin: Duration,
    /// On close: how long to wait after SIGTERM before SIGKILL.
    pub term_timeout: Duration,
    /// The longest line accepted from the server's stdout, in bytes. A longer line is read
    /// to its end without being kept and fails the call whose id it carries (or, when no id
    /// can be read, every pending call) with [`crate::RlmError::LineTooLong`].
    pub max_line_bytes: usize,
    /// A stderr line longer than this many bytes is forwarded to `tracing` in pieces of this
    /// size, so that a server writing without newlines cannot grow the client's memory.
    pub max_stderr_line: usize,
    /// Retry of what the server could not start (see [`crate::RlmError::is_retryable`]).
    pub retry: RetryConfig,
    /// The most bytes of text one `context/load` line carries, as a JSON string (escapes
    /// counted): [`crate::RlmClient::load_context`] sends a longer text in chunks of at most
    /// this. The line adds about 150 bytes; a server whose `--max-message-bytes` (1 GiB by
    /// default) is lower refuses it, and the load cuts that text again to fit the limit the
    /// refusal names. At least 6 (one escaped character) is used.
    pub context_chunk_bytes: usize,
    /// Called after every settled `infer` (the TypeScript client's `onMetrics`).
    pub on_metrics: Option<MetricsCallback>,
}

impl Default for RlmConfig {
    /// `rlm-server` on the `PATH`; 30 s to start; 10 min per call; on close, the server's
    /// 30 s of grace plus 5 s, then 5 s after SIGTERM; lines up to 1 GiB (the server's own
    /// input limit); stderr in pieces of 64 KiB; contexts loaded in chunks of 4 MiB.
    fn default() -> Self {
        Self {
            program: "rlm-server".to_owned(),
            args: Vec::new(),
            env: Vec::new(),
            env_remove: Vec::new(),
            current_dir: None,
            command: None,
            ready_timeout: Duration::from_secs(30),
            request_timeout: Duration::from_secs(600),
            shutdown_grace: Duration::from_secs(30),
            close_margin: Duration::from_secs(5),
            term_timeout: Duration::from_secs(5),
            max_line_bytes: 1 << 30,
            max_stderr_line: 64 * 1024,
            retry: RetryConfig::default(),
            context_chunk_bytes: 4 << 20,
            on_metrics: None,
        }
    }
}

impl fmt::Debug for RlmConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RlmConfig")
            .field("program", &self.program)
            .field("args", &self.args)
            // Names only: values may be secrets.
            .field("env", &self.env.iter().map(|(k, _)| k).collect::<Vec<_>>())
            .field("env_remove", &self.env_remove)
            .field("current_dir", &self.current_dir)
            .field("command", &self.command.is_some())
            .field("ready_timeout", &self.ready_timeout)
            .field("request_timeout", &self.request_timeout)
            .field("shutdown_grace", &self.shutdown_grace)
            .field("close_margin", &self.close_margin)
            .field("term_timeout", &self.term_timeout)
            .field("max_line_bytes", &self.max_line_bytes)
            .field("max_stderr_line", &self.max_stderr_line)
            .field("retry", &self.retry)
            .field("context_chunk_bytes", &self.context_chunk_bytes)
            .field("on_metrics", &self.on_metrics.is_some())
            .finish()
    }
}

impl RlmConfig {
    /// A builder starting from the defaults.
    pub fn builder() -> RlmConfigBuilder {
        RlmConfigBuilder {
            config: Self::default(),
        }
    }

    /// A builder starting from this configuration.
    pub fn into_builder(self) -> RlmConfigBuilder {
        RlmConfigBuilder { config: self }
    }

    /// The defaults, with `$ELIZA_RLM_PYTHON_PATH -m rlm_server` as the command when that
    /// variable is set (the elizaOS plugin's convention).
    ///
    /// Nothing else is read: the server inherits the environment, so its own `ELIZA_RLM_*`
    /// settings (`ELIZA_RLM_MAX_RETRIES` and the other retry settings among them) reach it
    /// and configure the server, not the client.
    pub fn from_env() -> Self {
        Self::from_lookup(|name| std::env::var(name).ok())
    }

    /// [`RlmConfig::from_env`] over any variable lookup, so it can be tested without touching
    /// the process environment.
    fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Self {
        let mut config = Self::default();
        if let Some(python) = lookup("ELIZA_RLM_PYTHON_PATH").filter(|p| !p.is_empty()) {
            config.program = python;
            config.args = vec!["-m".to_owned(), "rlm_server".to_owned()];
        }
        config
    }

    /// The command that starts the server, with its pipes and `kill_on_drop`.
    pub(crate) fn server_command(&self) -> Command {
        let mut command = match &self.command {
            Some(factory) => factory(),
            None => {
                let mut command = Command::new(&self.program);
                command.args(&self.args);
                for name in &self.env_remove {
                    command.env_remove(name);
                }
                command.envs(self.env.iter().map(|(k, v)| (k, v)));
                if let Some(dir) = &self.current_dir {
                    command.current_dir(dir);
                }
                command
            }
        };
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        command
    }
}

/// Builds an [`RlmConfig`]; every method sets one field (see there for its meaning).
#[derive(Debug, Clone)]
#[must_use = "a builder does nothing until `build` is called"]
pub struct RlmConfigBuilder {
    config: RlmConfig,
}

impl RlmConfigBuilder {
    /// Sets [`RlmConfig::program`].
    pub fn program(mut self, program: impl Into<String>) -> Self {
        self.config.program = program.into();
        self
    }

    /// Appends one argument to [`RlmConfig::args`].
    pub fn arg(mut self, arg: impl Into<String>) -> Self {
        self.config.args.push(arg.into());
        self
    }

    /// Appends arguments to [`RlmConfig::args`].
    pub fn args(mut self, args: impl IntoIterator<Item = impl Into<String>>) -> Self {
        self.config.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a variable to [`RlmConfig::env`].
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.config.env.push((name.into(), value.into()));
        self
    }

    /// Adds a name to [`RlmConfig::env_remove`].
    pub fn env_remove(mut self, name: impl Into<String>) -> Self {
        self.config.env_remove.push(name.into());
        self
    }

    /// Sets [`RlmConfig::current_dir`].
    pub fn current_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.current_dir = Some(dir.into());
        self
    }

    /// Sets [`RlmConfig::command`]: the server is started from the [`Command`] that
    /// `factory` prepares, which may set anything a `Command` can (working directory,
    /// environment, process group, ...):
    ///
    /// ```
    /// let config = rlm_client::RlmConfig::builder()
    ///     .command(|| {
    ///         let mut command = tokio::process::Command::new("python3");
    ///         command.args(["-m", "rlm_server"]).current_dir("/srv/agent").env_clear();
    ///         command
    ///     })
    ///     .build();
    /// # let _ = config;
    /// ```
    pub fn command(mut self, factory: impl Fn() -> Command + Send + Sync + 'static) -> Self {
        self.config.command = Some(Arc::new(factory));
        self
    }

    /// Sets [`RlmConfig::ready_timeout`].
    pub fn ready_timeout(mut self, timeout: Duration) -> Self {
        self.config.ready_timeout = timeout;
        self
    }

    /// Sets [`RlmConfig::request_timeout`].
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.config.request_timeout = timeout;
        self
    }

    /// Sets [`RlmConfig::shutdown_grace`].
    pub fn shutdown_grace(mut self, grace: Duration) -> Self {
        self.config.shutdown_grace = grace;
        self
    }

    /// Sets [`RlmConfig::close_margin`].
    pub fn close_margin(mut self, margin: Duration) -> Self {
        self.config.close_margin = margin;
        self
    }

    /// Sets [`RlmConfig::term_timeout`].
    pub fn term_timeout(mut self, timeout: Duration) -> Self {
        self.config.term_timeout = timeout;
        self
    }

    /// Sets [`RlmConfig::max_line_bytes`].
    pub fn max_line_bytes(mut self, bytes: usize) -> Self {
        self.config.max_line_bytes = bytes;
        self
    }

    /// Sets [`RlmConfig::max_stderr_line`].
    pub fn max_stderr_line(mut self, bytes: usize) -> Self {
        self.config.max_stderr_line = bytes;
        self
    }

    /// Sets [`RlmConfig::retry`].
    pub fn retry(mut self, retry: RetryConfig) -> Self {
        self.config.retry = retry;
        self
    }

    /// Sets [`RlmConfig::context_chunk_bytes`].
    pub fn context_chunk_bytes(mut self, bytes: usize) -> Self {
        self.config.context_chunk_bytes = bytes;
        self
    }

    /// Sets [`RlmConfig::on_metrics`].
    pub fn on_metrics(mut self, callback: impl Fn(&Metrics) + Send + Sync + 'static) -> Self {
        self.config.on_metrics = Some(Arc::new(callback));
        self
    }

    /// The configuration.
    pub fn build(self) -> RlmConfig {
        self.config
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
        let config = RlmConfig::from_lookup(lookup(&[]));
        assert_eq!(config.program, "rlm-server");
        assert!(config.args.is_empty());
        assert_eq!(config.retry, RetryConfig::default());
    }

    #[test]
    fn python_path_runs_the_module_and_retry_settings_are_the_servers() {
        let config = RlmConfig::from_lookup(lookup(&[
            ("ELIZA_RLM_PYTHON_PATH", "/opt/py/bin/python"),
            ("ELIZA_RLM_MAX_RETRIES", "0"),
            ("ELIZA_RLM_RETRY_DELAY", "250"),
            ("ELIZA_RLM_RETRY_MAX_DELAY", "4000"),
        ]));
        assert_eq!(config.program, "/opt/py/bin/python");
        assert_eq!(config.args, ["-m", "rlm_server"]);
        assert_eq!(
            config.retry,
            RetryConfig::default(),
            "ELIZA_RLM_*RETR* configure the server, not the client"
        );
    }

    #[test]
    fn the_builder_sets_every_field_it_names() {
        let config = RlmConfig::builder()
            .program("python3")
            .arg("-m")
            .args(["rlm_server", "--max-concurrency", "2"])
            .env("A", "1")
            .env_remove("B")
            .current_dir("/tmp")
            .ready_timeout(Duration::from_secs(1))
            .request_timeout(Duration::from_secs(2))
            .shutdown_grace(Duration::from_secs(3))
            .close_margin(Duration::from_secs(4))
            .term_timeout(Duration::from_secs(5))
            .max_line_bytes(6)
            .max_stderr_line(7)
            .retry(RetryConfig::disabled())
            .context_chunk_bytes(8)
            .on_metrics(|_| {})
            .build();
        assert_eq!(config.args, ["-m", "rlm_server", "--max-concurrency", "2"]);
        assert_eq!(config.env, [("A".to_owned(), "1".to_owned())]);
        assert_eq!(config.env_remove, ["B"]);
        assert_eq!(config.current_dir, Some(PathBuf::from("/tmp")));
        let timeouts = [
            config.ready_timeout,
            config.request_timeout,
            config.shutdown_grace,
            config.close_margin,
            config.term_timeout,
        ];
        assert_eq!(timeouts, [1, 2, 3, 4, 5].map(Duration::from_secs));
        assert_eq!((config.max_line_bytes, config.max_stderr_line), (6, 7));
        assert_eq!(config.retry.max_retries, 0);
        assert_eq!(config.context_chunk_bytes, 8);
        assert!(config.on_metrics.is_some() && config.command.is_none());
        let command = config.server_command();
        let std = command.as_std();
        assert_eq!(std.get_program(), "python3");
        assert_eq!(std.get_current_dir(), Some(std::path::Path::new("/tmp")));
        let envs: Vec<_> = std.get_envs().collect();
        assert!(envs.contains(&("A".as_ref(), Some("1".as_ref()))));
        assert!(envs.contains(&("B".as_ref(), None)));
    }

    #[test]
    fn a_command_factory_replaces_the_program() {
        let config = RlmConfig::builder()
            .program("unused")
            .command(|| {
                let mut command = Command::new("prepared");
                command.current_dir("/srv");
                command
            })
            .build();
        let command = config.server_command();
        assert_eq!(command.as_std().get_program(), "prepared");
        assert_eq!(
            command.as_std().get_current_dir(),
            Some(std::path::Path::new("/srv"))
        );
    }

    #[test]
    fn backoff_doubles_is_capped_and_jittered() {
        let retry = RetryConfig::new(10, Duration::from_millis(100), Duration::from_millis(1000));
        for (n, full) in [(0, 100), (1, 200), (3, 800), (4, 1000), (30, 1000)] {
            let delay = retry.delay(n);
            let full = Duration::from_millis(full);
            assert!(delay >= full / 2 && delay < full, "retry {n}: {delay:?}");
        }
    }
}

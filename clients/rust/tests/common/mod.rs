//! What the integration tests share: the real server's command line, an environment cleaned
//! as `protocol/README.md` prescribes, the scripted OpenAI fixture from the repository's
//! `tests/fixtures/`, and a fake server (`fake_server.py`, next to this file) that answers
//! whatever a test scripts, for the lines a real server never writes.
#![allow(dead_code)] // each test binary uses a different part of this module

pub mod capture;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rlm_client::{RetryConfig, RlmConfig, RlmConfigBuilder};
use serde_json::{Value, json};

/// Text of every stub-mode answer.
pub const STUB_TEXT: &str = "[RLM STUB] RLM backend not available";

/// Variables cleared from the server's environment besides every `ELIZA_RLM_*`.
pub const CLEARED: [&str; 4] = [
    "OPENAI_API_KEY",
    "ANTHROPIC_API_KEY",
    "GEMINI_API_KEY",
    "GOOGLE_API_KEY",
];

/// The repository root (above `clients/rust`, or above `clients/compat-tests/rust`, which
/// shares this module), or `None` when the crate is built from its packaged form, where only
/// the crate's own files exist.
pub fn repo_root() -> Option<PathBuf> {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .take(4)
        .find(|dir| dir.join("protocol/schema.json").is_file())
        .map(PathBuf::from)
}

/// The repository root, or returns from the test with a note saying why it is skipped.
#[macro_export]
macro_rules! repo_or_skip {
    () => {
        match common::repo_root() {
            Some(root) => root,
            None => {
                eprintln!(
                    "skipped: needs the rlm-server repository around this crate \
                     (protocol/, tests/fixtures/), which a packaged crate does not have"
                );
                return;
            }
        }
    };
}

/// The interpreter that runs the server and the fixture.
pub fn python() -> String {
    std::env::var("RLM_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned())
}

/// Names to remove from the inherited environment: every `ELIZA_RLM_*` and the provider keys.
pub fn cleared_env(extra: &[&str]) -> Vec<String> {
    std::env::vars()
        .map(|(name, _)| name)
        .filter(|name| name.starts_with("ELIZA_RLM_"))
        .chain(CLEARED.iter().chain(extra).map(|name| name.to_string()))
        .collect()
}

/// A path for a scratch file, unique per test run.
pub fn scratch(name: &str) -> PathBuf {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("rlm-client-{}-{n}-{name}", std::process::id()))
}

/// What every test client shares: start-up and stopping bounded, so a broken server fails a
/// test instead of hanging it, and the client's own retries on (fast).
pub fn bounded(builder: RlmConfigBuilder) -> RlmConfigBuilder {
    builder
        .ready_timeout(Duration::from_secs(60))
        .shutdown_grace(Duration::from_secs(10))
        .close_margin(Duration::from_secs(5))
        .term_timeout(Duration::from_secs(5))
        .retry(RetryConfig::new(
            3,
            Duration::from_millis(20),
            Duration::from_millis(200),
        ))
}

/// A config that runs the real server (`python3 -m rlm_server`) with `env` and `args`, retries
/// quickly, and is bounded everywhere so a broken server fails a test instead of hanging it.
pub fn server_config(env: &[(&str, &str)], args: &[&str]) -> RlmConfig {
    let mut builder = bounded(RlmConfig::builder())
        .program(python())
        .args(["-m", "rlm_server"])
        .args(args.iter().copied())
        .request_timeout(Duration::from_secs(60));
    for name in cleared_env(&[]) {
        builder = builder.env_remove(name);
    }
    for (name, value) in env {
        builder = builder.env(*name, *value);
    }
    builder.build()
}

/// The fake server: `fake_server.py ANSWERS...`, which sends `ready`, then answers the n-th
/// request it reads with the n-th of `answers` (see the script for the forms they take).
pub fn fake_config(answers: &[&str]) -> RlmConfig {
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/common/fake_server.py");
    bounded(RlmConfig::builder())
        .program(python())
        .arg(script.to_string_lossy())
        .args(answers.iter().copied())
        .request_timeout(Duration::from_secs(600))
        .build()
}

/// Stub mode: a backend without credentials.
pub fn stub_config() -> RlmConfig {
    server_config(&[("ELIZA_RLM_BACKEND", "gemini")], &[])
}

/// Runs the server through `sh -c SCRIPT` where `"$@"` is the server's command line, to put
/// something between the client and the server (a `tee`, a flood of stderr, a counter).
pub fn wrapped(mut config: RlmConfig, script: &str) -> RlmConfig {
    let mut args = vec![
        "-c".to_owned(),
        script.to_owned(),
        "rlm-server-wrapper".to_owned(),
        config.program.clone(),
    ];
    args.append(&mut config.args);
    config.program = "sh".to_owned();
    config.args = args;
    config
}

/// Model code for the fixture's root model: a REPL block that sets the answer to `expr`.
pub fn answer(expr: &str) -> String {
    format!("```repl\nanswer[\"content\"] = {expr}\nanswer[\"ready\"] = True\n```")
}

/// The scripted OpenAI-compatible server, stopped when dropped.
pub struct Fixture {
    child: Child,
    _stdin: ChildStdin,
    port: u16,
    pub base_url: String,
}

impl Fixture {
    /// Starts the fixture with `rules` (a JSON array) and reads its address.
    pub fn start(rules: Value) -> Self {
        let path = scratch("rules.json");
        std::fs::write(&path, rules.to_string()).unwrap();
        let root = repo_root().expect("the fixture is in the repository");
        let mut child = Command::new(python())
            .arg(root.join("tests/fixtures/openai_fixture.py"))
            .arg("--rules")
            .arg(&path)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start the fixture");
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut first)
            .unwrap();
        let address: Value = serde_json::from_str(&first).expect("fixture address line");
        Self {
            _stdin: child.stdin.take().unwrap(),
            child,
            port: address["port"].as_u64().unwrap() as u16,
            base_url: address["base_url"].as_str().unwrap().to_owned(),
        }
    }

    /// The environment that points the server at this fixture.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("ELIZA_RLM_BACKEND", "openai".to_owned()),
            ("ELIZA_RLM_BASE_URL", self.base_url.clone()),
            ("ELIZA_RLM_MODEL", "scripted".to_owned()),
            ("OPENAI_API_KEY", "test-key".to_owned()),
            ("ELIZA_RLM_RETRY_DELAY", "10".to_owned()),
            ("ELIZA_RLM_RETRY_MAX_DELAY", "50".to_owned()),
        ]
    }

    /// A server config pointed at this fixture, with `extra` variables and `args`.
    pub fn config(&self, extra: &[(&str, &str)], args: &[&str]) -> RlmConfig {
        let env = self.env();
        let mut pairs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
        pairs.extend_from_slice(extra);
        server_config(&pairs, args)
    }

    /// `GET /_fixture/stats`.
    pub fn stats(&self) -> Value {
        self.http("GET", "/_fixture/stats", None)
    }

    /// `GET /_fixture/requests`: the last request bodies the model got.
    pub fn requests(&self) -> Value {
        self.http("GET", "/_fixture/requests", None)
    }

    /// `POST /_fixture/release`: lets every held call go.
    pub fn release(&self) {
        self.http("POST", "/_fixture/release", Some(json!({})));
    }

    fn http(&self, method: &str, path: &str, body: Option<Value>) -> Value {
        let body = body.map(|b| b.to_string()).unwrap_or_default();
        let mut stream = TcpStream::connect(("127.0.0.1", self.port)).unwrap();
        write!(
            stream,
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        stream.read_to_string(&mut response).unwrap();
        let (_, payload) = response.split_once("\r\n\r\n").expect("an HTTP response");
        serde_json::from_str(payload).unwrap()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `check` every 20 ms until it holds, failing the test after `limit`. For states that
/// arrive asynchronously (a cancel reaching the server), never for measuring time.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never happened: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Whether a process with this id exists.
pub fn is_running(pid: u32) -> bool {
    Command::new("kill")
        .args(["-0", &pid.to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// Sends SIGKILL to `pid`.
pub fn kill9(pid: u32) {
    let status = Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -9 {pid}");
}

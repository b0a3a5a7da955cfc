//! Replays the shared transcripts in `protocol/transcripts/` against the real server, exactly
//! as `protocol/README.md` describes, and checks this crate's serde types on every message:
//! each server message must decode into its type (chosen by its method, or by the method of
//! the request it answers) and encode back to the same JSON, so a missing, extra or misnamed
//! field fails here. Every client message the server accepted goes through the params types
//! the same way. The transcripts live in the repository, not in the packaged crate: built
//! from the package, these tests say so and skip.

mod common;
mod json;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use rlm_client::protocol::{
    CancelParams, InferParams, InferResult, Progress, ReadyParams, RpcError, ShutdownParams,
    ShutdownResult, StatusResult,
};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use common::{Fixture, cleared_env, python};
use json::{round_trip, same};

/// How long one read or one exit may take before the replay fails.
const STEP_LIMIT: Duration = Duration::from_secs(60);

macro_rules! transcripts {
    ($($name:ident),* $(,)?) => {
        /// The transcripts with a test of their own, which runs in parallel with the others.
        const LISTED: &[&str] = &[$(stringify!($name)),*];
        $(
            #[tokio::test]
            async fn $name() {
                replay(stringify!($name)).await;
            }
        )*
    };
}

transcripts!(
    backend_error,
    basic,
    cancel,
    deadline,
    jsonrpc_errors,
    progress,
    queue_full,
    retry,
    shutdown,
    shutdown_cancel,
    strict,
    stub,
);

/// A transcript added to `protocol/` after this list was written is replayed here, so that
/// every suite replays every transcript without anyone editing this file first; one listed
/// above that is no longer there fails here.
#[tokio::test]
async fn transcripts_not_listed_above() {
    let dir = repo_or_skip!().join("protocol/transcripts");
    for name in LISTED {
        assert!(
            dir.join(format!("{name}.json")).is_file(),
            "{name}.json is gone"
        );
    }
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "json"))
        .map(|path| path.file_stem().unwrap().to_string_lossy().into_owned())
        .filter(|name| !LISTED.contains(&name.as_str()))
        .collect();
    names.sort();
    for name in names {
        replay(&name).await;
    }
}

async fn replay(name: &str) {
    let path = repo_or_skip!().join(format!("protocol/transcripts/{name}.json"));
    let transcript: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let fixture = Fixture::start(transcript["fixture"].clone());
    let mut run = Run::start(&transcript, &fixture.base_url);
    for (n, step) in transcript["steps"].as_array().unwrap().iter().enumerate() {
        run.step(step).await.unwrap_or_else(|failure| {
            panic!("{name} step {n} {step}: {failure}\n{}", run.stderr())
        });
    }
}

/// One server process being replayed against.
struct Run {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: BufReader<ChildStdout>,
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
    /// Method of every request sent, by id (as compact JSON), to pick the result type.
    methods: HashMap<String, String>,
    /// Params of every `infer` sent, by id, checked when the answer shows they were valid.
    infer_params: HashMap<String, Value>,
}

impl Run {
    fn start(transcript: &Value, base_url: &str) -> Self {
        let clear: Vec<String> = match transcript.get("clear_env") {
            Some(names) => names
                .as_array()
                .unwrap()
                .iter()
                .map(|n| n.as_str().unwrap().to_owned())
                .chain(
                    cleared_env(&[])
                        .into_iter()
                        .filter(|n| n.starts_with("ELIZA_RLM_")),
                )
                .collect(),
            None => cleared_env(&[]),
        };
        let mut command = Command::new(python());
        command.args(["-m", "rlm_server"]);
        for arg in transcript["args"].as_array().unwrap() {
            command.arg(arg.as_str().unwrap());
        }
        for name in clear {
            command.env_remove(name);
        }
        for (key, value) in transcript["env"].as_object().unwrap() {
            command.env(key, value.as_str().unwrap().replace("{base_url}", base_url));
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("start rlm-server");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let mut pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        tokio::spawn(async move {
            let mut buffer = String::new();
            let _ = pipe.read_to_string(&mut buffer).await;
            sink.lock().unwrap().push_str(&buffer);
        });
        Self {
            stdin: child.stdin.take(),
            stdout: BufReader::new(child.stdout.take().unwrap()),
            child,
            stderr,
            methods: HashMap::new(),
            infer_params: HashMap::new(),
        }
    }

    fn stderr(&self) -> String {
        format!("server stderr:\n{}", self.stderr.lock().unwrap())
    }

    async fn step(&mut self, step: &Value) -> Result<(), String> {
        if let Some(message) = step.get("send") {
            self.note_sent(message)?;
            self.write(&message.to_string()).await
        } else if let Some(raw) = step.get("send_raw") {
            self.write(raw.as_str().unwrap()).await
        } else if let Some(pattern) = step.get("expect") {
            let message = self.next_message(is_progress(pattern)).await?;
            check(pattern, &message)
        } else if let Some(patterns) = step.get("expect_set") {
            self.expect_set(patterns.as_array().unwrap()).await
        } else if let Some(code) = step.get("expect_exit") {
            self.expect_exit(code.as_i64().unwrap()).await
        } else {
            Err(format!("unknown step {step}"))
        }
    }

    async fn write(&mut self, line: &str) -> Result<(), String> {
        let stdin = self.stdin.as_mut().ok_or("stdin already closed")?;
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .await
            .map_err(|e| e.to_string())?;
        stdin.flush().await.map_err(|e| e.to_string())
    }

    /// The next message; `$/progress` notifications are skipped unless `progress` is wanted.
    async fn next_message(&mut self, progress: bool) -> Result<Value, String> {
        loop {
            let mut line = String::new();
            let read = tokio::time::timeout(STEP_LIMIT, self.stdout.read_line(&mut line))
                .await
                .map_err(|_| "no message within the step limit".to_owned())?
                .map_err(|e| e.to_string())?;
            if read == 0 {
                return Err("the server closed stdout".into());
            }
            let message: Value =
                serde_json::from_str(&line).map_err(|e| format!("not JSON ({e}): {line}"))?;
            self.check_types(&message)?;
            if progress || !is_progress(&message) {
                return Ok(message);
            }
        }
    }

    async fn expect_set(&mut self, patterns: &[Value]) -> Result<(), String> {
        let mut left: Vec<&Value> = patterns.iter().collect();
        while !left.is_empty() {
            let message = self.next_message(false).await?;
            let position = left
                .iter()
                .position(|pattern| check(pattern, &message).is_ok())
                .ok_or_else(|| format!("{message} matches none of {left:?}"))?;
            left.remove(position);
        }
        Ok(())
    }

    async fn expect_exit(&mut self, code: i64) -> Result<(), String> {
        drop(self.stdin.take());
        let status = tokio::time::timeout(STEP_LIMIT, self.child.wait())
            .await
            .map_err(|_| "the server did not exit".to_owned())?
            .map_err(|e| e.to_string())?;
        match status.code() {
            Some(actual) if i64::from(actual) == code => Ok(()),
            _ => Err(format!("expected exit {code}, got {status}")),
        }
    }

    /// Remembers what a request was, to type its answer, and checks the params types on the
    /// notifications (which get no answer to wait for).
    fn note_sent(&mut self, message: &Value) -> Result<(), String> {
        if let Some(batch) = message.as_array() {
            return batch.iter().try_for_each(|m| self.note_sent(m));
        }
        let Some(method) = message.get("method").and_then(Value::as_str) else {
            return Ok(());
        };
        let params = message.get("params").cloned().unwrap_or(Value::Null);
        match message.get("id") {
            Some(id) => {
                self.methods.insert(id.to_string(), method.to_owned());
                if method == "infer" {
                    self.infer_params.insert(id.to_string(), params);
                } else if method == "shutdown" && !params.is_null() {
                    round_trip::<ShutdownParams>(&params)?;
                }
                Ok(())
            }
            None if method == "$/cancelRequest" => round_trip::<CancelParams>(&params),
            None => Ok(()),
        }
    }

    /// Decodes `message` into this crate's type for it and checks it encodes back the same.
    fn check_types(&mut self, message: &Value) -> Result<(), String> {
        if let Some(batch) = message.as_array() {
            return batch.iter().try_for_each(|m| self.check_types(m));
        }
        match message.get("method").and_then(Value::as_str) {
            Some("ready") => return round_trip::<ReadyParams>(&message["params"]),
            Some("$/progress") => return round_trip::<Progress>(&message["params"]),
            Some(other) => return Err(format!("unknown server notification {other}")),
            None => {}
        }
        let id = message.get("id").map(Value::to_string).unwrap_or_default();
        if let Some(error) = message.get("error") {
            round_trip::<RpcError>(error)?;
            let invalid = error["code"] == -32602;
            if let Some(params) = self.infer_params.remove(&id).filter(|_| !invalid) {
                round_trip::<InferParams>(&params)?;
            }
            return Ok(());
        }
        let result = message
            .get("result")
            .ok_or(format!("neither result nor error: {message}"))?;
        match self.methods.get(&id).map(String::as_str) {
            Some("infer") => {
                round_trip::<InferParams>(&self.infer_params.remove(&id).unwrap_or_default())?;
                round_trip::<InferResult>(result)
            }
            Some("status") => round_trip::<StatusResult>(result),
            Some("shutdown") => round_trip::<ShutdownResult>(result),
            _ => Err(format!("a result for a request never sent: {message}")),
        }
    }
}

fn is_progress(message: &Value) -> bool {
    message.get("method").and_then(Value::as_str) == Some("$/progress")
}

/// The matcher of `protocol/README.md`.
fn check(pattern: &Value, value: &Value) -> Result<(), String> {
    if matches(pattern, Some(value)) {
        Ok(())
    } else {
        Err(format!("{value} does not match {pattern}"))
    }
}

/// The README's type matchers. Any other string is literal, `"$/progress"` included.
const MATCHERS: [&str; 9] = [
    "$any", "$string", "$number", "$integer", "$boolean", "$object", "$array", "$null", "$absent",
];

fn matches(pattern: &Value, value: Option<&Value>) -> bool {
    if let Some(matcher) = pattern.as_str().filter(|s| MATCHERS.contains(s)) {
        return match (matcher, value) {
            ("$absent", value) => value.is_none(),
            (_, None) => false,
            ("$string", Some(v)) => v.is_string(),
            ("$number", Some(v)) => v.is_number(),
            ("$integer", Some(v)) => v.is_i64() || v.is_u64(),
            ("$boolean", Some(v)) => v.is_boolean(),
            ("$object", Some(v)) => v.is_object(),
            ("$array", Some(v)) => v.is_array(),
            ("$null", Some(v)) => v.is_null(),
            _ => true, // $any
        };
    }
    let Some(value) = value else { return false };
    match (pattern, value) {
        (Value::Object(p), Value::Object(v)) => p
            .iter()
            .all(|(key, expected)| matches(expected, v.get(key))),
        (Value::Array(p), Value::Array(v)) => {
            p.len() == v.len() && p.iter().zip(v).all(|(p, v)| matches(p, Some(v)))
        }
        (Value::Number(p), Value::Number(v)) => p.as_f64() == v.as_f64(),
        _ => pattern == value,
    }
}

#[test]
fn the_matcher_follows_the_readme() {
    use serde_json::json;
    let value = json!({"id": 1, "result": {"text": "x", "n": 2.0, "list": [1, "a"]}});
    assert!(matches(&json!({"id": 1}), Some(&value)));
    assert!(matches(
        &json!({"result": {"n": 2, "list": ["$integer", "$string"]}}),
        Some(&value)
    ));
    assert!(matches(
        &json!({"error": "$absent", "result": "$object"}),
        Some(&value)
    ));
    assert!(!matches(&json!({"result": {"list": [1]}}), Some(&value)));
    assert!(!matches(
        &json!({"result": {"text": "$absent"}}),
        Some(&value)
    ));
    assert!(!matches(&json!({"id": "$string"}), Some(&value)));
    assert!(!matches(&json!({"missing": "$any"}), Some(&value)));
    assert!(matches(
        &json!({"m": "$/progress"}),
        Some(&json!({"m": "$/progress"}))
    ));
    assert!(!matches(
        &json!({"m": "$/progress"}),
        Some(&json!({"m": "ready"}))
    ));
    assert!(same(&json!({"a": [1.0]}), &json!({"a": [1]})));
    assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": null})));
}

//! Replays the shared transcripts in `protocol/transcripts/` against the real server, exactly
//! as `protocol/README.md` describes, and checks this crate's serde types on every message:
//! each server message must decode into its type (chosen by its method, or by the method of
//! the request it answers) and encode back to the same JSON, so a missing, extra or misnamed
//! field fails here. Every client message the server accepted goes through the params types
//! the same way. `$bind:NAME` and `$ref:NAME` carry a value the server made (a context or
//! session id) from one step into later ones. The transcripts live in the repository, not in
//! the packaged crate: built from the package, these tests say so and skip.

mod common;
mod json;

use std::collections::HashMap;
use std::process::Stdio;
use std::time::Duration;

use rlm_client::protocol::{
    CancelParams, ContextDropParams, ContextDropResult, ContextListParams, ContextListResult,
    ContextLoadParams, ContextLoadResult, InferParams, InferResult, Progress, ReadyParams,
    RpcError, SessionCloseParams, SessionCloseResult, SessionOpenParams, SessionOpenResult,
    ShutdownParams, ShutdownResult, StatusResult, ToolCallParams,
};
use serde::Serialize;
use serde::de::DeserializeOwned;
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
    answer_refused,
    answer_repaired,
    answer_valid,
    backend_error,
    basic,
    cancel,
    context,
    deadline,
    jsonrpc_errors,
    progress,
    queue_full,
    retry,
    session,
    shutdown,
    shutdown_cancel,
    strict,
    stub,
    tool_answered,
    tool_cancel,
    tool_error,
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
    /// Method and params of every request sent, by id (as compact JSON), to pick the types of
    /// its params and result, checked when its answer comes.
    sent: HashMap<String, (String, Value)>,
    /// The values `$bind:NAME` remembered, by name.
    bound: Bindings,
}

type Bindings = HashMap<String, String>;

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
            sent: HashMap::new(),
            bound: Bindings::new(),
        }
    }

    fn stderr(&self) -> String {
        format!("server stderr:\n{}", self.stderr.lock().unwrap())
    }

    async fn step(&mut self, step: &Value) -> Result<(), String> {
        if let Some(message) = step.get("send") {
            let message = resolve(message, &self.bound)?;
            self.note_sent(&message)?;
            self.write(&message.to_string()).await
        } else if let Some(raw) = step.get("send_raw") {
            self.write(raw.as_str().unwrap()).await
        } else if let Some(pattern) = step.get("expect") {
            let pattern = resolve(pattern, &self.bound)?;
            let message = self.next_message(is_progress(&pattern)).await?;
            self.bound.extend(check(&pattern, &message)?);
            Ok(())
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
        let mut left = patterns
            .iter()
            .map(|pattern| resolve(pattern, &self.bound))
            .collect::<Result<Vec<_>, _>>()?;
        while !left.is_empty() {
            let message = self.next_message(false).await?;
            let (position, bound) = left
                .iter()
                .enumerate()
                .find_map(|(n, pattern)| check(pattern, &message).ok().map(|bound| (n, bound)))
                .ok_or_else(|| format!("{message} matches none of {left:?}"))?;
            self.bound.extend(bound);
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

    /// Remembers what a request was, to type its params and its answer when that comes, and
    /// checks the params of the notifications (which get no answer to wait for).
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
                self.sent
                    .insert(id.to_string(), (method.to_owned(), params));
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
            Some("tool/call") => return round_trip::<ToolCallParams>(&message["params"]),
            Some("$/cancelRequest") => return round_trip::<CancelParams>(&message["params"]),
            Some(other) => return Err(format!("unknown server notification {other}")),
            None => {}
        }
        let id = message.get("id").map(Value::to_string).unwrap_or_default();
        let sent = self.sent.remove(&id);
        if let Some(error) = message.get("error") {
            round_trip::<RpcError>(error)?;
            // A request refused as malformed may have been malformed on purpose.
            let code = error["code"].as_i64().unwrap_or_default();
            let malformed = [-32700, -32600, -32601, -32602].contains(&code);
            return match sent.filter(|_| !malformed) {
                Some((method, params)) => check_call(&method, &params, None),
                None => Ok(()),
            };
        }
        let result = message
            .get("result")
            .ok_or(format!("neither result nor error: {message}"))?;
        match sent {
            Some((method, params)) => check_call(&method, &params, Some(result)),
            None => Err(format!("a result for a request never sent: {message}")),
        }
    }
}

/// Checks the params of a request the server accepted, and its result when it succeeded,
/// against this crate's types for `method`.
fn check_call(method: &str, params: &Value, result: Option<&Value>) -> Result<(), String> {
    match method {
        "infer" => call_types::<InferParams, InferResult>(params, result),
        "status" => call_types::<Value, StatusResult>(params, result),
        "shutdown" => call_types::<ShutdownParams, ShutdownResult>(params, result),
        "context/load" => call_types::<ContextLoadParams, ContextLoadResult>(params, result),
        "context/drop" => call_types::<ContextDropParams, ContextDropResult>(params, result),
        "context/list" => call_types::<ContextListParams, ContextListResult>(params, result),
        "session/open" => call_types::<SessionOpenParams, SessionOpenResult>(params, result),
        "session/close" => call_types::<SessionCloseParams, SessionCloseResult>(params, result),
        _ => Err(format!(
            "an answer to `{method}`, which this crate does not send"
        )),
    }
}

/// `params` (when sent) round-trips through `P`, `result` (when given) through `R`.
fn call_types<P, R>(params: &Value, result: Option<&Value>) -> Result<(), String>
where
    P: DeserializeOwned + Serialize,
    R: DeserializeOwned + Serialize,
{
    if !params.is_null() {
        round_trip::<P>(params)?;
    }
    result.map_or(Ok(()), round_trip::<R>)
}

fn is_progress(message: &Value) -> bool {
    message.get("method").and_then(Value::as_str) == Some("$/progress")
}

/// The matcher of `protocol/README.md`: what the pattern's `$bind:NAME`s remembered when the
/// whole message matches.
fn check(pattern: &Value, value: &Value) -> Result<Bindings, String> {
    let mut bound = Bindings::new();
    if matches(pattern, Some(value), &mut bound) {
        Ok(bound)
    } else {
        Err(format!("{value} does not match {pattern}"))
    }
}

/// `value` with every `"$ref:NAME"` string replaced by the string bound to `NAME`.
fn resolve(value: &Value, bound: &Bindings) -> Result<Value, String> {
    Ok(match value {
        Value::String(text) => match text.strip_prefix("$ref:") {
            Some(name) => Value::String(
                bound
                    .get(name)
                    .ok_or(format!("`{text}` before any `$bind:{name}`"))?
                    .clone(),
            ),
            None => value.clone(),
        },
        Value::Array(items) => Value::Array(
            items
                .iter()
                .map(|item| resolve(item, bound))
                .collect::<Result<_, _>>()?,
        ),
        Value::Object(members) => Value::Object(
            members
                .iter()
                .map(|(key, item)| Ok((key.clone(), resolve(item, bound)?)))
                .collect::<Result<_, String>>()?,
        ),
        _ => value.clone(),
    })
}

/// The README's type matchers. Any other string is literal, `"$/progress"` included.
const MATCHERS: [&str; 9] = [
    "$any", "$string", "$number", "$integer", "$boolean", "$object", "$array", "$null", "$absent",
];

fn matches(pattern: &Value, value: Option<&Value>, bound: &mut Bindings) -> bool {
    if let Some(name) = pattern.as_str().and_then(|s| s.strip_prefix("$bind:")) {
        return match value.and_then(Value::as_str) {
            Some(text) => {
                bound.insert(name.to_owned(), text.to_owned());
                true
            }
            None => false,
        };
    }
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
            .all(|(key, expected)| matches(expected, v.get(key), bound)),
        (Value::Array(p), Value::Array(v)) => {
            p.len() == v.len() && p.iter().zip(v).all(|(p, v)| matches(p, Some(v), bound))
        }
        (Value::Number(p), Value::Number(v)) => p.as_f64() == v.as_f64(),
        _ => pattern == value,
    }
}

#[test]
fn the_matcher_follows_the_readme() {
    use serde_json::json;
    let fits = |pattern: Value, value: &Value| matches(&pattern, Some(value), &mut Bindings::new());
    let value = json!({"id": 1, "result": {"text": "x", "n": 2.0, "list": [1, "a"]}});
    assert!(fits(json!({"id": 1}), &value));
    assert!(fits(
        json!({"result": {"n": 2, "list": ["$integer", "$string"]}}),
        &value
    ));
    assert!(fits(
        json!({"error": "$absent", "result": "$object"}),
        &value
    ));
    assert!(!fits(json!({"result": {"list": [1]}}), &value));
    assert!(!fits(json!({"result": {"text": "$absent"}}), &value));
    assert!(!fits(json!({"id": "$string"}), &value));
    assert!(!fits(json!({"missing": "$any"}), &value));
    assert!(fits(
        json!({"m": "$/progress"}),
        &json!({"m": "$/progress"})
    ));
    assert!(!fits(json!({"m": "$/progress"}), &json!({"m": "ready"})));
    assert!(same(&json!({"a": [1.0]}), &json!({"a": [1]})));
    assert!(!same(&json!({"a": 1}), &json!({"a": 1, "b": null})));
}

#[test]
fn bind_remembers_a_string_of_a_whole_match_and_ref_stands_for_it() {
    use serde_json::json;
    let answer = json!({"id": 1, "result": {"context_id": "ctx-1", "bytes": 3}});
    let bound = check(&json!({"result": {"context_id": "$bind:ctx"}}), &answer).unwrap();
    assert_eq!(bound["ctx"], "ctx-1");
    assert!(
        check(
            &json!({"result": {"context_id": "$bind:ctx", "bytes": 4}}),
            &answer
        )
        .is_err(),
        "no match, nothing bound"
    );
    assert!(check(&json!({"result": {"bytes": "$bind:n"}}), &answer).is_err());
    let sent = json!({"params": {"context_id": "$ref:ctx", "list": ["$ref:ctx"], "q": "$refx"}});
    assert_eq!(
        resolve(&sent, &bound).unwrap(),
        json!({"params": {"context_id": "ctx-1", "list": ["ctx-1"], "q": "$refx"}})
    );
    assert!(resolve(&json!("$ref:unknown"), &bound).is_err());
}

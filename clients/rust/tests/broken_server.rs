//! The client against `tests/common/fake_server.py`, a fake server that writes whatever a test
//! scripts: the lines and behaviours of issue 14 that a real server does not produce on
//! demand. Every call here runs with the default 600 s request timeout unless a test says
//! otherwise, and is bounded by LIMIT: a call that is not failed at once fails the test
//! instead of hanging it. Nothing here measures time.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rlm_client::{
    ErrorType, Exit, InferRequest, InferResult, ProgressEvent, RlmClient, RlmConfig, RlmError,
};
use serde_json::{Value, json};

use common::capture::capture;
use common::{eventually, fake_config, python, scratch, wrapped};

/// Bound of every wait below: long enough for a slow CI machine, far below the 600 s a lost
/// call would wait.
const LIMIT: Duration = Duration::from_secs(30);

/// A well-formed `infer` answer with `text`, as a fake-server template.
fn infer_ok(text: &str) -> String {
    json!({
        "jsonrpc": "2.0", "id": "{id}",
        "result": {
            "text": text, "stub": false,
            "usage": {"calls": 1, "input_tokens": 1, "output_tokens": 1, "cost_usd": null, "models": {}},
            "metadata": {"backend": "fake", "model": "fake", "iterations": 1, "depth": 1, "elapsed_ms": 1.0, "attempts": 1}
        }
    })
    .to_string()
    .replace(r#""{id}""#, "{id}")
}

/// An error answer with `error` as its error object, as a fake-server template.
fn error_answer(error: Value) -> String {
    json!({"jsonrpc": "2.0", "id": "{id}", "error": error})
        .to_string()
        .replace(r#""{id}""#, "{id}")
}

/// An answer to the client's `infer` `id` whose text is the line the fake server answers with
/// it (the client's answer to a request of the server's own), for the test to read.
fn infer_echoing_read(id: u64) -> String {
    infer_ok("{read}")
        .replace(r#""{read}""#, "{read}")
        .replace("{id}", &id.to_string())
}

async fn infer(client: &RlmClient, prompt: &str) -> Result<InferResult, RlmError> {
    tokio::time::timeout(LIMIT, client.infer(InferRequest::new(prompt)))
        .await
        .expect("settled at once, not after the request timeout")
}

/// Issue 14, defect 1: `retryable: true` on a -32000 is the server's own verdict after its
/// own retries; the client does not retry it. Were it retried, the second attempt would get
/// no answer and the call would time out instead.
#[tokio::test]
async fn a_backend_error_marked_retryable_is_not_retried() {
    let answer = error_answer(json!({
        "code": -32000, "message": "backend failed",
        "data": {"type": "backend_error", "retryable": true, "attempts": 3}
    }));
    let client = RlmClient::new(fake_config(&[&answer]));
    let error = infer(&client, "ctx").await.unwrap_err();
    assert!(matches!(error, RlmError::Backend(_)), "{error}");
    assert_eq!(client.metrics().total_retries, 0);
}

/// Issue 14, defect 1: a server that exits before answering did not finish the request, so
/// the request is retried, on a new server.
#[tokio::test]
async fn an_infer_whose_server_exits_is_retried_on_a_new_server() {
    let marker = scratch("first-server-ran");
    let script = format!(
        r#"if [ -e '{m}' ]; then exec "$@"; else touch '{m}'; exec "$1" "$2" '!exit 3'; fi"#,
        m = marker.display()
    );
    let client = RlmClient::new(wrapped(fake_config(&[&infer_ok("second server")]), &script));
    let first = client.start().await.unwrap().pid;
    let result = infer(&client, "ctx").await.expect("retried");
    assert_eq!(result.text, "second server");
    assert_eq!(client.metrics().total_retries, 1);
    assert_ne!(client.pid(), Some(first));
}

/// Issue 14, defect 3: an answer that does not decode fails its own call at once (it was
/// logged, and its caller waited 600 s); lines with no readable id are logged and change
/// nothing; the connection goes on.
#[tokio::test]
async fn malformed_answers_fail_their_own_call_at_once() {
    let malformed = [
        // data without its required `type`
        error_answer(json!({"code": -32000, "message": "m", "data": {"retryable": true}})),
        // a count written as a float
        error_answer(json!({
            "code": -32000, "message": "m",
            "data": {"type": "backend_error", "retryable": false, "attempts": 2.0}
        })),
        // a result of the wrong shape
        r#"{"jsonrpc":"2.0","id":{id},"result":{"text":5}}"#.to_owned(),
        // neither result nor error
        r#"{"jsonrpc":"2.0","id":{id},"error":null}"#.to_owned(),
        // not JSON at all (an invalid escape), but its id is readable at its end
        r#"{"jsonrpc":"2.0","result":{"text":"\q"},"id":{id}}"#.to_owned(),
    ];
    // Lines with no readable id come first, before the first answer.
    let noise = "null\nnot json\n[1, 2]\n{\"jsonrpc\":\"2.0\",\"method\":\"$/progress\"}\n";
    let first = format!("{noise}{}", malformed[0]);
    let mut answers: Vec<&str> = vec![&first];
    answers.extend(malformed[1..].iter().map(String::as_str));
    let last = infer_ok("still talking");
    answers.push(&last);
    let client = RlmClient::new(fake_config(&answers));
    let pid = client.start().await.unwrap().pid;
    for (n, template) in malformed.iter().enumerate() {
        let error = infer(&client, "ctx").await.unwrap_err();
        let RlmError::Protocol(detail) = &error else {
            panic!("answer {n} ({template}): {error}")
        };
        assert!(!detail.is_empty());
    }
    assert_eq!(infer(&client, "ctx").await.unwrap().text, "still talking");
    assert_eq!(client.pid(), Some(pid), "one server throughout");
    assert_eq!(client.metrics().failed_requests, 5);
}

/// Unknown progress events and error types reach the caller as `Unknown`, not dropped.
#[tokio::test]
async fn unknown_progress_events_and_error_types_are_kept() {
    let progress = r#"{"jsonrpc":"2.0","method":"$/progress","params":{"id":{id},"event":"thinking","elapsed_ms":1}}"#;
    let error = error_answer(json!({
        "code": -32099, "message": "new", "data": {"type": "brand_new", "hint": 1}
    }));
    let answer = format!("{progress}\n{error}");
    let client = RlmClient::new(fake_config(&[&answer]));
    let (sink, mut events) = tokio::sync::mpsc::unbounded_channel();
    let request = InferRequest::new("ctx").progress_channel(sink);
    let error = tokio::time::timeout(LIMIT, client.infer(request))
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(
        events.recv().await.map(|p| p.event),
        Some(ProgressEvent::Unknown("thinking".into()))
    );
    let RlmError::Rpc(rpc) = &error else {
        panic!("{error}")
    };
    assert_eq!(rpc.kind(), Some(&ErrorType::Unknown("brand_new".into())));
    assert_eq!(rpc.data.as_ref().unwrap().extra["hint"], 1);
}

/// A `tool/call` whose params do not decode (a `name` that is not a string) is answered
/// with an error under its id at once: it was only logged, and the server waited out the
/// call's timeout. The fake answers the `infer` (id 1) only once it reads that answer.
#[tokio::test]
async fn an_unreadable_tool_call_is_answered_with_an_error_at_once() {
    let call = r#"{"jsonrpc":"2.0","id":"tool-1","method":"tool/call","params":{"request_id":1,"name":5,"arguments":{}}}"#;
    let client = RlmClient::new(fake_config(&[call, &infer_echoing_read(1)]));
    let text = infer(&client, "ctx")
        .await
        .expect("the infer's answer")
        .text;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(answer["id"], "tool-1", "{answer}");
    assert_eq!(answer["error"]["code"], -32000, "{answer}");
    assert!(answer["error"]["message"].is_string(), "{answer}");
    assert!(answer.get("result").is_none(), "{answer}");
}

/// A request of the server's own whose method the client does not know is refused at once
/// with -32601 under its id, as the TypeScript client refuses it, so the server never waits
/// for an answer; a notification of an unknown method gets none (were it answered, with any
/// id, the fake would take that answer for the one it waits for). The fake answers the
/// `infer` (id 1) only once it reads the client's answer.
#[tokio::test]
async fn a_server_request_of_an_unknown_method_is_refused_at_once() {
    let lines = [
        r#"{"jsonrpc":"2.0","method":"no/such/method","params":{}}"#,
        r#"{"jsonrpc":"2.0","id":"srv-1","method":"no/such/method","params":{}}"#,
    ]
    .join("\n");
    let client = RlmClient::new(fake_config(&[&lines, &infer_echoing_read(1)]));
    let text = infer(&client, "ctx")
        .await
        .expect("the infer's answer")
        .text;
    let answer: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        answer,
        json!({
            "jsonrpc": "2.0", "id": "srv-1",
            "error": {"code": -32601, "message": "Method not found"},
        })
    );
}

/// Issue 14, defect 5: a stdout line over the limit fails the call whose id it carries; the
/// connection goes on.
#[tokio::test]
async fn an_oversized_answer_fails_its_call() {
    let big = r#"{"jsonrpc":"2.0","result":{"text":"{big:3000000}"},"id":{id}}"#;
    let last = infer_ok("small");
    let config = fake_config(&[big, &last])
        .into_builder()
        .max_line_bytes(1 << 20)
        .build();
    let client = RlmClient::new(config);
    let pid = client.start().await.unwrap().pid;
    let error = infer(&client, "ctx").await.unwrap_err();
    assert!(
        matches!(error, RlmError::LineTooLong { limit } if limit == 1 << 20),
        "{error}"
    );
    assert_eq!(infer(&client, "ctx").await.unwrap().text, "small");
    assert_eq!(client.pid(), Some(pid));
}

/// Issue 14, defect 5: a line over the limit with no readable id fails every pending call,
/// and each is cancelled on the server, since its answer could not be told apart.
#[tokio::test(flavor = "current_thread")]
async fn an_oversized_line_without_an_id_fails_every_pending_call() {
    let captured = capture();
    let events = &captured.events;
    // The first request gets no answer; the second gets a big line of no JSON at all.
    let config = fake_config(&["!none", "{big:3000000}"])
        .into_builder()
        .max_line_bytes(1 << 20)
        .build();
    let client = RlmClient::new(config);
    client.start().await.unwrap();
    let calls: Vec<_> = (0..2)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { infer(&client, "ctx").await })
        })
        .collect();
    for call in calls {
        let error = call.await.unwrap().unwrap_err();
        assert!(matches!(error, RlmError::LineTooLong { .. }), "{error}");
    }
    eventually(LIMIT, "both calls cancelled on the server", || async {
        let read = server_read(events);
        [1, 2].iter().all(|id| {
            let cancel =
                format!(r#"{{"jsonrpc":"2.0","method":"$/cancelRequest","params":{{"id":{id}}}}}"#);
            read.contains(&cancel)
        })
    })
    .await;
}

/// Issue 14, defect 5: a stderr line without end is forwarded in pieces of the configured
/// size instead of growing one buffer until the newline that never comes.
#[tokio::test(flavor = "current_thread")]
async fn a_stderr_line_without_end_is_forwarded_in_pieces() {
    let captured = capture();
    let events = &captured.events;
    // 300 pieces and 5 bytes more, and the line never ends: the 300 pieces must arrive.
    let script = "head -c 3000005 /dev/zero | tr '\\0' e >&2; exec \"$@\"";
    let config = fake_config(&[])
        .into_builder()
        .max_stderr_line(10_000)
        .build();
    let client = RlmClient::new(wrapped(config, script));
    client.start().await.unwrap();
    let pieces = || {
        events
            .lock()
            .unwrap()
            .iter()
            .filter(|(target, _)| target == "rlm_server")
            .map(|(_, message)| message.len())
            .collect::<Vec<_>>()
    };
    eventually(LIMIT, "all 3,000,000 bytes forwarded", || async {
        pieces().iter().sum::<usize>() == 3_000_000
    })
    .await;
    assert!(pieces().iter().all(|&len| len <= 10_000), "{:?}", pieces());
}

/// Issue 14, defect 6: `close()` asks for its grace and waits for it. The fake server takes
/// 2 s to finish its work after `shutdown`, longer than the margin but within the grace: it
/// must be allowed to exit by itself, not be sent SIGTERM after the margin.
#[tokio::test(flavor = "current_thread")]
async fn close_sends_its_grace_and_waits_for_it() {
    let captured = capture();
    let events = &captured.events;
    let config = fake_config(&["--drain=2"])
        .into_builder()
        .shutdown_grace(Duration::from_secs(20))
        .close_margin(Duration::from_millis(100))
        .term_timeout(Duration::from_secs(5))
        .build();
    let client = RlmClient::new(config);
    client.start().await.unwrap();
    let exit = client.close().await;
    assert!(exit.success(), "{exit:?}");
    let shutdown = r#"{"jsonrpc":"2.0","method":"shutdown","params":{"grace_s":20.0}}"#;
    eventually(LIMIT, "the server's stderr forwarded", || async {
        !server_read(events).is_empty()
    })
    .await;
    assert_eq!(server_read(events), [shutdown]);
}

/// The lines the fake server says it read (it echoes them to stderr).
fn server_read(events: &common::capture::Events) -> Vec<String> {
    events
        .lock()
        .unwrap()
        .iter()
        .filter(|(target, _)| target == "rlm_server")
        .filter_map(|(_, message)| message.strip_prefix("fake server read: "))
        .map(str::to_owned)
        .collect()
}

/// Issue 14, defect 6: past the grace and the margin, SIGTERM; and `close()` says so.
#[tokio::test]
async fn close_terminates_a_server_that_outlives_the_grace() {
    let config = fake_config(&["--drain=60"])
        .into_builder()
        .shutdown_grace(Duration::from_millis(200))
        .close_margin(Duration::from_millis(200))
        .term_timeout(Duration::from_secs(10))
        .build();
    let client = RlmClient::new(config);
    client.start().await.unwrap();
    let exit = tokio::time::timeout(LIMIT, client.close()).await.unwrap();
    assert!(matches!(exit, Exit::Terminated(_)), "{exit:?}");
    assert_eq!(client.close().await, Exit::NotRunning);
}

/// Issue 14, defect 6: `shutdown(grace, timeout)` waits for the answer for the grace plus
/// the timeout. The fake answers after 2 s of work: past the 1 s timeout alone, within the
/// 5 s grace plus it.
#[tokio::test]
async fn shutdown_waits_for_the_grace_plus_the_timeout() {
    let client = RlmClient::new(fake_config(&["--drain=2"]));
    client.start().await.unwrap();
    let exit = client
        .shutdown(Duration::from_secs(5), Some(Duration::from_secs(1)))
        .await
        .expect("answered within grace + timeout");
    assert!(exit.success(), "{exit:?}");
}

/// A prepared `tokio::process::Command` starts the server, with its working directory and
/// environment, and is prepared again for every new server.
#[tokio::test]
async fn a_prepared_command_starts_every_server() {
    let dir = std::env::temp_dir().canonicalize().unwrap();
    let script =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/common/fake_server.py");
    let prepared = Arc::new(AtomicUsize::new(0));
    let counter = prepared.clone();
    let expected = dir.clone();
    let config = RlmConfig::builder()
        .command(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            let mut command = tokio::process::Command::new("sh");
            command
                .args([
                    "-c",
                    r#"[ "$MARK" = yes ] && [ "$(pwd -P)" = "$WANT" ] && exec "$@""#,
                ])
                .arg("check")
                .arg(python())
                .arg(&script)
                .current_dir(&expected)
                .env("MARK", "yes")
                .env("WANT", &expected);
            command
        })
        .build();
    let client = RlmClient::new(config);
    client
        .start()
        .await
        .expect("started in that directory with that variable");
    assert!(client.close().await.success());
    client.start().await.expect("started again");
    assert_eq!(prepared.load(Ordering::SeqCst), 2);
}

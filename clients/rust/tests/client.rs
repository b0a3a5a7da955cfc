//! The client against the real rlm-server process, with the scripted OpenAI fixture as its
//! model: concurrency, cancellation, a dying child, retries, budgets, progress, large messages,
//! stub mode, stderr, close and shutdown. Nothing here measures time; waits for asynchronous
//! effects poll with a bound, so a broken client fails instead of hanging.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use rlm_client::protocol::{BudgetLimit, BudgetScope, Limit};
use rlm_client::{
    Backend, Budget, ErrorType, Exit, InferOptions, InferRequest, Metrics, Progress, ProgressEvent,
    RetryConfig, RlmClient, RlmConfig, RlmError,
};
use serde_json::{Value, json};

use common::capture::capture;
use common::{
    Fixture, STUB_TEXT, answer, eventually, is_running, kill9, scratch, server_config, stub_config,
    wrapped,
};

/// Bound of the polls below: long enough for a slow CI machine, short enough to fail a hang.
const LIMIT: Duration = Duration::from_secs(30);

/// A root-model rule that waits for `POST /_fixture/release`, then answers `expr`.
fn held(expr: &str) -> Value {
    json!([{"when": "root", "hold": true, "reply": answer(expr)}])
}

/// A root-model answer that does not finish the run, so that the model is called again.
fn first_of_two() -> Value {
    json!({"when": "root", "times": 1, "reply": "```repl\nx = 1\n```"})
}

async fn server_counter(client: &RlmClient, counter: &str) -> u64 {
    let status = client.status().await.expect("status");
    let metrics = serde_json::to_value(&status.metrics).unwrap();
    metrics[counter].as_u64().unwrap()
}

#[tokio::test]
async fn sixteen_tasks_infer_concurrently_over_one_child() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'answer-' + str(len(context))"));
    let client = RlmClient::new(fixture.config(&[], &["--max-concurrency", "16"]));
    let pid = client.start().await.unwrap().pid;
    let tasks: Vec<_> = (1..=16)
        .map(|n| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(InferRequest::new("x".repeat(n))).await })
        })
        .collect();
    eventually(LIMIT, "16 model calls in flight at once", || async {
        fixture.stats()["in_flight"] == 16
    })
    .await;
    fixture.release();
    for (n, task) in (1..=16).zip(tasks) {
        let result = task.await.unwrap().expect("infer");
        assert_eq!(
            result.text,
            format!("answer-{n}"),
            "each answer reaches its own caller"
        );
    }
    assert_eq!(client.pid(), Some(pid), "one child served them all");
    let metrics = client.metrics();
    assert_eq!(
        (metrics.total_requests, metrics.successful_requests),
        (16, 16)
    );
    assert!(metrics.average_latency_ms > 0.0 && metrics.p95_latency_ms > 0.0);
}

#[tokio::test]
async fn dropping_an_infer_future_cancels_it_on_the_server() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'too late'"));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let (progress, mut events) = tokio::sync::mpsc::unbounded_channel();
    let caller = client.clone();
    let task = tokio::spawn(async move {
        let request = InferRequest::new("ctx").progress_channel(progress);
        caller.infer(request).await
    });
    let first = tokio::time::timeout(LIMIT, events.recv()).await.unwrap();
    assert_eq!(first.map(|p| p.event), Some(ProgressEvent::Started));
    task.abort();
    assert!(task.await.unwrap_err().is_cancelled());
    eventually(LIMIT, "the server counts the cancellation", || async {
        server_counter(&client, "cancelled_requests").await == 1
    })
    .await;
    assert_eq!(client.status().await.unwrap().in_flight, 0);
    let metrics = client.metrics();
    assert_eq!((metrics.total_requests, metrics.cancelled_requests), (1, 1));
    assert_eq!((metrics.failed_requests, metrics.last_error), (0, None));
}

#[tokio::test]
async fn a_timeout_sends_cancel_request_and_ids_start_at_one() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'too late'"));
    let wire = scratch("wire.jsonl");
    let script = format!("tee '{}' | exec \"$@\"", wire.display());
    let client = RlmClient::new(wrapped(fixture.config(&[], &[]), &script));
    client.status().await.unwrap();
    let request = InferRequest::new("ctx").timeout(Duration::from_secs(2));
    let error = client.infer(request).await.unwrap_err();
    assert!(
        matches!(error, RlmError::Timeout(t) if t == Duration::from_secs(2)),
        "{error}"
    );
    assert_eq!(client.metrics().timed_out_requests, 1);
    eventually(LIMIT, "the server counts the cancellation", || async {
        server_counter(&client, "cancelled_requests").await == 1
    })
    .await;
    let lines: Vec<Value> = std::fs::read_to_string(&wire)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        lines[0],
        json!({"jsonrpc": "2.0", "id": 1, "method": "status"})
    );
    assert_eq!(lines[1]["id"], 2);
    assert_eq!(lines[1]["method"], "infer");
    assert_eq!(
        lines[2],
        json!({"jsonrpc": "2.0", "method": "$/cancelRequest", "params": {"id": 2}})
    );
}

#[tokio::test]
async fn a_killed_child_fails_pending_calls_at_once_and_the_next_call_restarts_it() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'too late'"));
    // Without retries: an `infer` whose server died is retried on a new one (another test
    // covers that), and here the model would hold the retries too.
    let config = fixture
        .config(&[], &[])
        .into_builder()
        .retry(RetryConfig::disabled())
        .build();
    let client = RlmClient::new(config);
    let pid = client.start().await.unwrap().pid;
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(InferRequest::new("ctx")).await })
        })
        .collect();
    eventually(LIMIT, "3 model calls in flight", || async {
        fixture.stats()["in_flight"] == 3
    })
    .await;
    kill9(pid);
    for task in tasks {
        // The requests' own timeout is 60 s and the model holds them for 60 s: only the
        // client noticing the exit answers them within LIMIT.
        let outcome = tokio::time::timeout(LIMIT, task)
            .await
            .expect("failed at once");
        let error = outcome.unwrap().unwrap_err();
        assert!(
            matches!(&error, RlmError::Exited(detail) if detail.contains("signal: 9")),
            "{error}"
        );
    }
    let status = client
        .status()
        .await
        .expect("the next call starts a new child");
    assert_eq!(status.metrics.total_requests, 0, "a fresh server");
    assert_ne!(client.pid(), Some(pid));
    fixture.release();
}

#[tokio::test]
async fn stub_mode_answers_stubs_and_counts_them_as_stubs() {
    let client = RlmClient::new(stub_config());
    let ready = client.start().await.unwrap();
    assert!(ready.stub && !ready.available);
    let result = client.infer(InferRequest::new("anything")).await.unwrap();
    assert!(result.stub);
    assert_eq!(result.text, STUB_TEXT);
    let status = client.status().await.unwrap();
    assert!(!status.available && status.reason.is_some());
    assert_eq!(status.metrics.stub_responses, 1);
    let metrics = client.metrics();
    assert_eq!(
        (
            metrics.total_requests,
            metrics.stub_responses,
            metrics.successful_requests,
            metrics.failed_requests
        ),
        (1, 1, 0, 0)
    );
}

#[tokio::test]
async fn a_50_mb_prompt_comes_back_as_a_50_mb_answer() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([{"when": "root", "reply": answer("context")}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let mut prompt = "0123456789abcdef\"\\\u{e9}\n".repeat(50 * 1024 * 1024 / 21);
    prompt.push_str("THE END");
    let result = client
        .infer(InferRequest::new(prompt.as_str()))
        .await
        .unwrap();
    assert_eq!(result.text.len(), prompt.len());
    assert!(
        result.text == prompt,
        "the answer is the prompt, byte for byte"
    );
}

#[tokio::test]
async fn progress_reaches_the_callback_in_order() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([
        {"when": "root", "times": 1, "reply": "```repl\nprint(len(context))\n```"},
        {"when": "sub", "reply": "a summary"},
        {"when": "root", "reply": answer("llm_query('Summarise: ' + context[:20])")},
    ]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let seen: Arc<Mutex<Vec<Progress>>> = Arc::default();
    let sink = seen.clone();
    let request = InferRequest::new("Some context to summarise.")
        .options(InferOptions::new().trajectory(true))
        .on_progress(move |progress| sink.lock().unwrap().push(progress));
    let result = client.infer(request).await.unwrap();
    assert_eq!(result.text, "a summary");
    assert!(result.trajectory.is_some_and(|steps| !steps.is_empty()));
    let seen = seen.lock().unwrap();
    let events: Vec<_> = seen
        .iter()
        .map(|p| (p.event.clone(), p.iteration))
        .collect();
    assert_eq!(
        events,
        [
            (ProgressEvent::Started, None),
            (ProgressEvent::Iteration, Some(1)),
            (ProgressEvent::Subcall, None),
            (ProgressEvent::Iteration, Some(2)),
        ]
    );
    assert!(
        seen.iter()
            .all(|p| p.id == rlm_client::protocol::Id::Number(1))
    );
}

#[tokio::test]
async fn every_option_reaches_the_server_and_bad_ones_are_not_retried() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([{"when": "any", "reply": answer("'ok'")}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let options = InferOptions::new()
        .backend(Backend::Openai)
        .model("scripted")
        .sub_model("scripted-sub")
        .base_url(fixture.base_url.as_str())
        .max_iterations(3)
        .max_depth(1)
        .timeout_s(30.0)
        .temperature(0.5)
        .max_tokens(256)
        .progress(false)
        .trajectory(false);
    let request = InferRequest::new("ctx")
        .query("What?")
        .options(options.clone());
    let result = client
        .infer(request)
        .await
        .expect("the server accepts every option");
    assert_eq!(result.text, "ok");
    assert_eq!(result.metadata.model, "scripted");
    let requests = fixture.requests();
    let body = requests.as_array().unwrap().last().unwrap();
    assert_eq!(body["temperature"], 0.5);
    // The OpenAI client of `rlm` renames max_tokens to max_completion_tokens.
    let max_tokens = body.get("max_tokens").or(body.get("max_completion_tokens"));
    assert_eq!(max_tokens, Some(&json!(256)));

    let bad = options.max_depth(0);
    let error = client
        .infer(InferRequest::new("ctx").options(bad))
        .await
        .unwrap_err();
    let RlmError::InvalidParams(rpc) = &error else {
        panic!("{error}")
    };
    assert_eq!(
        rpc.data.as_ref().unwrap().field.as_deref(),
        Some("options.max_depth")
    );
    let metrics = client.metrics();
    assert_eq!((metrics.failed_requests, metrics.total_retries), (1, 0));
    assert!(metrics.last_error.unwrap().contains("invalid params"));
}

/// Issue 14, defect 1: the server retries the backend itself (`ELIZA_RLM_MAX_RETRIES`) and
/// still says `retryable: true` when its retries are spent; a client that retried that too
/// multiplied the runs (and the spending) per `infer`.
#[tokio::test]
async fn backend_errors_are_never_retried_by_the_client() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([
        {"when": "root", "contains": "QUERY-ALPHA", "status": 401},
        {"when": "root", "status": 500},
    ]));
    // the client's own retries are on (common::bounded): it still must not use them here
    let config = fixture.config(&[("ELIZA_RLM_MAX_RETRIES", "1")], &[]);
    let client = RlmClient::new(config);

    let error = client
        .infer(InferRequest::new("ctx").query("QUERY-ALPHA"))
        .await
        .unwrap_err();
    let RlmError::Backend(rpc) = &error else {
        panic!("{error}")
    };
    assert_eq!(rpc.data.as_ref().unwrap().status, Some(401));

    let error = client
        .infer(InferRequest::new("ctx").query("QUERY-BETA"))
        .await
        .unwrap_err();
    assert!(matches!(error, RlmError::Backend(_)), "{error}");
    assert!(!error.is_retryable(), "{error}");
    assert_eq!(client.metrics().total_retries, 0);
    // 1 call for the 401; the server's 2 attempts (1 + 1 retry) for the 500, and no more.
    assert_eq!(fixture.stats()["requests"], 1 + 2);
}

/// Issue 9: a request over its budget ends with -32004, which names the limit and carries what
/// was spent. The client does not send it again: a retry would get a fresh budget and spend it.
#[tokio::test]
async fn a_budget_error_names_its_limit_carries_usage_and_is_not_retried() {
    repo_or_skip!();
    let fixture =
        Fixture::start(json!([first_of_two(), {"when": "root", "reply": answer("'late'")}]));
    // the client's own retries are on (common::bounded): it still must not use them here
    let config = fixture.config(&[], &[]);
    let client = RlmClient::new(config);
    let options = InferOptions::new().budget(Budget::new().max_calls(1));
    let error = client
        .infer(InferRequest::new("ctx").options(options))
        .await
        .unwrap_err();
    let RlmError::BudgetExceeded(rpc) = &error else {
        panic!("{error}")
    };
    assert_eq!(error.code(), Some(-32004));
    let data = rpc.data.as_ref().unwrap();
    assert_eq!(data.kind, ErrorType::BudgetExceeded);
    assert_eq!(data.limit, Some(Limit::Budget(BudgetLimit::MaxCalls)));
    assert_eq!(
        (data.max, data.scope.as_ref()),
        (Some(1.0), Some(&BudgetScope::Request))
    );
    let usage = error.usage().expect("a budget error carries the usage");
    assert_eq!(usage.calls, 1);
    assert!(usage.input_tokens > 0, "{usage:?}");
    assert!(!error.is_retryable());
    // One model call in all: the budget stopped the second, and the client did not resend.
    assert_eq!(fixture.stats()["requests"], 1);
    let metrics = client.metrics();
    assert_eq!((metrics.failed_requests, metrics.total_retries), (1, 0));
    // The server's lifetime totals count that call; the scripted model has no price.
    let server = client.status().await.expect("status").metrics;
    assert_eq!(server.total_calls, 1);
    assert_eq!(
        (server.total_input_tokens, server.total_output_tokens),
        (usage.input_tokens, usage.output_tokens)
    );
    assert_eq!(server.total_cost_usd, None);
}

/// A request the server cancels after a model call reports what that call spent.
#[tokio::test]
async fn a_request_the_server_cancels_carries_the_usage_spent_before() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([
        first_of_two(),
        {"when": "root", "hold": true, "reply": "late"}
    ]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let call = {
        let client = client.clone();
        tokio::spawn(async move { client.infer(InferRequest::new("ctx")).await })
    };
    // The second model call is held: the first one has returned and been counted.
    eventually(LIMIT, "the second model call", || async {
        fixture.stats()["requests"] == 2
    })
    .await;
    client
        .shutdown(Duration::ZERO, None)
        .await
        .expect("shutdown");
    let error = call.await.unwrap().unwrap_err();
    assert!(matches!(error, RlmError::Cancelled(_)), "{error}");
    let usage = error
        .usage()
        .expect("a cancellation after a model call carries the usage");
    assert_eq!(usage.calls, 1);
    assert_eq!(usage.models["scripted"].calls, 1);
    fixture.release();
}

#[tokio::test]
async fn a_full_queue_is_retried_until_there_is_room() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'done'"));
    let mut config = fixture.config(&[], &["--max-concurrency", "1", "--max-queue", "1"]);
    config.retry = RetryConfig::new(200, Duration::from_millis(20), Duration::from_millis(100));
    let client = RlmClient::new(config);
    let tasks: Vec<_> = (0..3)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move { client.infer(InferRequest::new("ctx")).await })
        })
        .collect();
    eventually(LIMIT, "a queue_full retry", || async {
        client.metrics().total_retries > 0
    })
    .await;
    fixture.release();
    for task in tasks {
        assert_eq!(
            task.await.unwrap().expect("admitted in the end").text,
            "done"
        );
    }
}

#[tokio::test]
async fn server_errors_keep_their_code_and_data() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([{"when": "root", "hold": true, "reply": "late"}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let options = InferOptions::new().timeout_s(0.5);
    let error = client
        .infer(InferRequest::new("ctx").options(options))
        .await
        .unwrap_err();
    assert!(matches!(error, RlmError::DeadlineExceeded(_)), "{error}");
    assert_eq!(error.code(), Some(-32001));
    let data = error.rpc().unwrap().data.as_ref().unwrap();
    assert_eq!(
        (&data.kind, data.timeout_s),
        (&ErrorType::DeadlineExceeded, Some(0.5))
    );
    assert!(!error.is_retryable());
    assert_eq!(client.metrics().timed_out_requests, 1);
    fixture.release();
}

#[tokio::test(flavor = "current_thread")]
async fn stderr_is_drained_into_tracing() {
    let captured = capture();
    let lines = &captured.events;
    // 20,000 lines (about 500 KB) before the server starts: far more than a pipe holds, so a
    // client that does not read stderr never sees `ready`.
    let script = "yes 'flood line from the server wrapper' | head -n 20000 >&2; exec \"$@\"";
    let mut config = wrapped(stub_config(), script);
    config.ready_timeout = LIMIT;
    let client = RlmClient::new(config);
    client
        .status()
        .await
        .expect("the server starts despite the flood");
    // The last lines may still be in the pipe when `ready` arrives on stdout.
    let flood = || {
        let lines = lines.lock().unwrap();
        lines
            .iter()
            .filter(|(target, message)| target == "rlm_server" && message.contains("flood line"))
            .count()
    };
    eventually(LIMIT, "every stderr line forwarded", || async {
        flood() == 20_000
    })
    .await;
}

#[tokio::test]
async fn a_server_that_fails_at_start_reports_why_and_is_not_retried() {
    let client = RlmClient::new(server_config(&[("ELIZA_RLM_MAX_ITERATIONS", "abc")], &[]));
    let error = client.infer(InferRequest::new("ctx")).await.unwrap_err();
    let RlmError::StartFailed(detail) = &error else {
        panic!("{error}")
    };
    assert!(detail.contains("exit status: 2"), "{detail}");
    assert!(detail.contains("ELIZA_RLM_MAX_ITERATIONS"), "{detail}");
    assert_eq!(client.metrics().total_retries, 0);
}

#[tokio::test]
async fn a_server_that_never_sends_ready_is_killed() {
    let client = RlmClient::new(
        RlmConfig::builder()
            .program("sleep")
            .arg("30")
            .ready_timeout(Duration::from_millis(300))
            .build(),
    );
    let starting = client.status();
    let error = tokio::time::timeout(LIMIT, starting)
        .await
        .unwrap()
        .unwrap_err();
    assert!(matches!(error, RlmError::ReadyTimeout(_)), "{error}");
    assert_eq!(client.pid(), None, "the child is gone");
}

#[tokio::test]
async fn close_escalates_to_sigterm_and_sigkill() {
    // A "server" that ignores both the end of its input and SIGTERM.
    let client = RlmClient::new(
        RlmConfig::builder()
            .program("sh")
            .args(["-c", "trap '' TERM; exec sleep 30"])
            .request_timeout(Duration::from_millis(200))
            .shutdown_grace(Duration::from_millis(100))
            .close_margin(Duration::from_millis(100))
            .term_timeout(Duration::from_millis(200))
            .build(),
    );
    let error = client.status().await.unwrap_err();
    assert!(matches!(error, RlmError::Timeout(_)), "{error}");
    let pid = client.pid().expect("spawned");
    let exit = tokio::time::timeout(LIMIT, client.close())
        .await
        .expect("close is bounded");
    assert!(matches!(exit, Exit::Killed(_)), "{exit:?}");
    assert!(!is_running(pid));
    assert_eq!(client.pid(), None);
}

#[tokio::test]
async fn close_lets_the_server_finish_its_work() {
    repo_or_skip!();
    let fixture = Fixture::start(held("'finished'"));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let pid = client.start().await.unwrap().pid;
    let caller = client.clone();
    let task = tokio::spawn(async move { caller.infer(InferRequest::new("ctx")).await });
    eventually(LIMIT, "the model call in flight", || async {
        fixture.stats()["in_flight"] == 1
    })
    .await;
    let closing = tokio::spawn({
        let client = client.clone();
        async move { client.close().await }
    });
    fixture.release();
    let exit = closing.await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert_eq!(task.await.unwrap().unwrap().text, "finished");
    assert!(!is_running(pid));
    let ready = client
        .start()
        .await
        .expect("a later call starts a new server");
    assert_ne!(ready.pid, pid);
}

#[tokio::test]
async fn dropping_the_last_clone_kills_the_child() {
    let client = RlmClient::new(stub_config());
    let pid = client.start().await.unwrap().pid;
    let clone = client.clone();
    drop(client);
    assert!(is_running(pid), "a clone still holds it");
    drop(clone);
    eventually(LIMIT, "the child is killed", || async { !is_running(pid) }).await;
}

#[tokio::test]
async fn shutdown_stops_the_server_and_the_next_call_starts_another() {
    let client = RlmClient::new(stub_config());
    let pid = client.start().await.unwrap().pid;
    let exit = client.shutdown(Duration::from_secs(5), None).await.unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!is_running(pid));
    let ready = client.start().await.unwrap();
    assert_ne!(ready.pid, pid);
}

#[tokio::test]
async fn metrics_are_pushed_to_the_callback() {
    let snapshots: Arc<Mutex<Vec<Metrics>>> = Arc::default();
    let sink = snapshots.clone();
    let config = stub_config()
        .into_builder()
        .on_metrics(move |m: &Metrics| sink.lock().unwrap().push(m.clone()))
        .build();
    let client = RlmClient::new(config);
    client.infer(InferRequest::new("x")).await.unwrap();
    let snapshots = snapshots.lock().unwrap();
    assert_eq!(snapshots.len(), 1, "one per settled infer");
    assert_eq!(snapshots[0], client.metrics());
    assert_eq!(snapshots[0].stub_responses, 1);
}

#[tokio::test(flavor = "current_thread")]
async fn each_request_runs_in_a_span_with_its_method_and_id() {
    let captured = capture();
    let client = RlmClient::new(stub_config());
    client.status().await.unwrap();
    client.infer(InferRequest::new("x")).await.unwrap();
    let spans = captured.spans.lock().unwrap();
    let requests: Vec<&Vec<String>> = spans
        .iter()
        .filter(|(name, _)| name == "rlm_request")
        .map(|(_, fields)| fields)
        .collect();
    assert_eq!(
        requests,
        [
            &vec![r#"method="status""#.to_owned(), "id=1".to_owned()],
            &vec![r#"method="infer""#.to_owned(), "id=2".to_owned()],
        ]
    );
}

//! Host tools against the real server, with the scripted OpenAI fixture as its model: model
//! code calls async handlers of this process (two at once), a handler's error reaches it as
//! `ToolError`, a hanging handler hits `tool_timeout_s`, cancelling the infer drops the
//! handler's future, invalid arguments never reach a handler, `max_tool_calls` ends the
//! request, and a session's tools serve its turns.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use rlm_client::protocol::{BudgetLimit, Limit};
use rlm_client::{Budget, InferOptions, InferRequest, RlmClient, RlmError, SessionRequest};
use serde_json::{Value, json};
use tokio::sync::{Barrier, oneshot};

use common::{Fixture, answer, eventually};

fn key_schema() -> Value {
    json!({
        "type": "object",
        "properties": {"key": {"type": "string"}},
        "required": ["key"],
        "additionalProperties": false
    })
}

fn repl(lines: &[&str]) -> String {
    format!("```repl\n{}\n```", lines.join("\n"))
}

fn setup(reply: &str) -> (Fixture, RlmClient) {
    let fixture = Fixture::start(json!([{"when": "root", "reply": reply}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    (fixture, client)
}

/// Catches the ToolError of `call` (a Python expression) and answers its text.
fn caught(call: &str) -> String {
    repl(&[
        "try:",
        &format!("    {call}"),
        "except ToolError as error:",
        "    answer['content'] = str(error)",
        "answer['ready'] = True",
    ])
}

#[tokio::test]
async fn model_code_calls_two_tools_at_once_and_uses_their_values() {
    repo_or_skip!();
    let code = repl(&[
        "from concurrent.futures import ThreadPoolExecutor",
        "with ThreadPoolExecutor(2) as pool:",
        "    a = pool.submit(lookup, key='alpha')",
        "    b = pool.submit(search, q='beta')",
        "    record, hits = a.result(), b.result()",
        "answer['content'] = record['owner'] + ' ' + hits[0]",
        "answer['ready'] = True",
    ]);
    let (_fixture, client) = setup(&code);
    // Each handler waits for the other: the two calls must be in flight together.
    let both = Arc::new(Barrier::new(2));
    let (first, second) = (both.clone(), both);
    let request = InferRequest::new("ctx")
        .tool(
            "lookup",
            "Look a record up.",
            key_schema(),
            move |args: Value| {
                let both = first.clone();
                async move {
                    both.wait().await;
                    Ok::<_, String>(
                        json!({"owner": format!("ada-{}", args["key"].as_str().unwrap())}),
                    )
                }
            },
        )
        .tool(
            "search",
            "Search memory.",
            json!({"type": "object", "properties": {"q": {"type": "string"}}}),
            move |args: Value| {
                let both = second.clone();
                async move {
                    both.wait().await;
                    Ok::<_, String>(json!([format!("hit-{}", args["q"].as_str().unwrap())]))
                }
            },
        );
    let result = client.infer(request).await.expect("infer");
    assert_eq!(result.text, "ada-alpha hit-beta");
    client.close().await;
}

#[tokio::test]
async fn a_handlers_error_reaches_model_code_as_tool_error() {
    repo_or_skip!();
    let (_fixture, client) = setup(&caught("lookup(key='missing')"));
    let request = InferRequest::new("ctx").tool("lookup", "Look up.", key_schema(), |_| async {
        Err::<Value, _>("no record for missing")
    });
    assert_eq!(
        client.infer(request).await.unwrap().text,
        "no record for missing"
    );
    client.close().await;
}

#[tokio::test]
async fn a_hanging_handler_hits_tool_timeout_and_is_dropped() {
    repo_or_skip!();
    let (_fixture, client) = setup(&caught("lookup(key='slow')"));
    let (dropped_tx, dropped) = oneshot::channel::<()>();
    let guard = Arc::new(std::sync::Mutex::new(Some(dropped_tx)));
    let request = InferRequest::new("ctx")
        .options(InferOptions::new().tool_timeout_s(0.3))
        .tool("lookup", "Look up.", key_schema(), move |_| {
            // Held by the future: dropped (and the receiver told) when the call is aborted.
            let held = guard.lock().unwrap().take();
            async move {
                let _held = held;
                std::future::pending::<Result<Value, String>>().await
            }
        });
    let result = client.infer(request).await.unwrap();
    assert_eq!(result.text, "lookup timed out after 0.3 s (tool_timeout_s)");
    let closed = tokio::time::timeout(Duration::from_secs(10), dropped).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the handler's future was dropped"
    );
    client.close().await;
}

#[tokio::test]
async fn cancelling_the_infer_drops_its_pending_tool_call() {
    repo_or_skip!();
    let (_fixture, client) = setup(&answer("lookup(key='x')"));
    let (started_tx, started) = oneshot::channel::<()>();
    let (dropped_tx, dropped) = oneshot::channel::<()>();
    let slots = Arc::new(std::sync::Mutex::new(Some((started_tx, dropped_tx))));
    let request = InferRequest::new("ctx").tool("lookup", "Look up.", key_schema(), move |_| {
        let slot = slots.lock().unwrap().take();
        async move {
            let (started, _held) = slot.unwrap();
            let _ = started.send(());
            std::future::pending::<Result<Value, String>>().await
        }
    });
    let mut running = Box::pin(client.infer(request));
    tokio::select! {
        _ = &mut running => panic!("the infer finished before its tool answered"),
        _ = started => {}
    }
    drop(running); // the client sends $/cancelRequest for the infer
    let closed = tokio::time::timeout(Duration::from_secs(30), dropped).await;
    assert!(
        matches!(closed, Ok(Err(_))),
        "the server cancelled the tool call"
    );
    eventually(
        Duration::from_secs(30),
        "the infer counts as cancelled",
        || async { client.status().await.unwrap().metrics.cancelled_requests == 1 },
    )
    .await;
    client.close().await;
}

#[tokio::test]
async fn invalid_arguments_never_reach_the_handler() {
    repo_or_skip!();
    let (_fixture, client) = setup(&caught("lookup(key=5)"));
    let calls = Arc::new(AtomicUsize::new(0));
    let counted = calls.clone();
    let request = InferRequest::new("ctx").tool("lookup", "Look up.", key_schema(), move |_| {
        counted.fetch_add(1, Ordering::SeqCst);
        async { Ok::<_, String>(json!("asked")) }
    });
    let text = client.infer(request).await.unwrap().text;
    assert!(
        text.starts_with("the arguments of lookup do not match its input schema: key:"),
        "{text}"
    );
    assert_eq!(calls.load(Ordering::SeqCst), 0);
    client.close().await;
}

#[tokio::test]
async fn max_tool_calls_ends_the_request_with_budget_exceeded() {
    repo_or_skip!();
    let code = repl(&[
        "for key in 'abc':",
        "    lookup(key=key)",
        "answer['ready'] = True",
    ]);
    let (_fixture, client) = setup(&code);
    let request = InferRequest::new("ctx")
        .options(InferOptions::new().budget(Budget::new().max_tool_calls(1)))
        .tool("lookup", "Look up.", key_schema(), |_| async {
            Ok::<_, String>(json!("ok"))
        });
    let error = client.infer(request).await.unwrap_err();
    let RlmError::BudgetExceeded(rpc) = &error else {
        panic!("{error}")
    };
    let limit = rpc.data.as_ref().unwrap().limit.clone();
    assert_eq!(limit, Some(Limit::Budget(BudgetLimit::MaxToolCalls)));
    client.close().await;
}

#[tokio::test]
async fn a_sessions_tools_serve_each_turn() {
    repo_or_skip!();
    let (_fixture, client) = setup(&answer("lookup(key='t')"));
    let request = SessionRequest::new().tool(
        "lookup",
        "Look up.",
        key_schema(),
        |args: Value| async move {
            Ok::<_, String>(json!(format!("v-{}", args["key"].as_str().unwrap())))
        },
    );
    let session = client.open_session_with(request).await.unwrap();
    assert_eq!(session.infer("first").await.unwrap().text, "v-t");
    assert_eq!(session.infer("second").await.unwrap().text, "v-t");
    session.close().await.unwrap();
    client.close().await;
}

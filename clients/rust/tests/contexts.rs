//! Stored contexts and sessions against the real server, with the scripted OpenAI fixture as
//! its model: texts, lists, chunked strings, files and readers loaded (a character split
//! across reads and chunks included), asked about by id, listed and dropped; loads that fail
//! or are abandoned leave nothing stored; unknown ids are typed errors naming their field;
//! a session's second turn reads what its first one stored in the REPL.

mod common;

use std::time::Duration;

use rlm_client::protocol::{Protection, SandboxLevel};
use rlm_client::{
    ContextSource, ErrorType, InferRequest, LoadRequest, LoadedContext, Message, RlmClient,
    RlmError,
};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;

use common::{Fixture, answer, eventually, scratch, wrapped};

/// Bound of the polls below.
const LIMIT: Duration = Duration::from_secs(30);

/// Text with characters of one to four bytes, so that chunk and read boundaries fall inside
/// them, and characters JSON escapes.
const MIXED: &str = "The secret code is KITE-7. Déjà vu, 1€, 😀 \"quoted\"\n\ttabbed\u{1}.";

/// A root model that answers the whole context.
fn echo() -> Value {
    json!([{"when": "root", "reply": answer("context")}])
}

/// A root model that answers the code the context holds.
fn finds_the_code() -> Value {
    let code = "import re\ncode = re.search(r\"code is ([A-Z]+-[0-9]+)\", context).group(1)";
    json!([{"when": "root", "reply": format!("```repl\n{code}\n```\n{}", answer("code"))}])
}

fn client(fixture: &Fixture, args: &[&str]) -> RlmClient {
    RlmClient::new(fixture.config(&[], args))
}

async fn ask(client: &RlmClient, context: &LoadedContext) -> Result<String, RlmError> {
    let request = InferRequest::context(&context.context_id).query("What does it say?");
    Ok(client.infer(request).await?.text)
}

fn assert_unknown(error: RlmError, field: &str) {
    assert!(matches!(error, RlmError::InvalidParams(_)), "{error}");
    assert_eq!(error.field(), Some(field), "{error}");
}

async fn bytes_total(client: &RlmClient) -> u64 {
    client
        .list_contexts()
        .await
        .expect("context/list")
        .bytes_total
}

#[tokio::test]
async fn a_text_loaded_once_answers_twice_is_listed_and_dropped() {
    repo_or_skip!();
    let fixture = Fixture::start(finds_the_code());
    let client = client(&fixture, &[]);
    let text = format!("{}\nThe code is ZEBRA-42.\n", "Filler line.\n".repeat(40));
    let loaded = client.load_context(text.as_str()).await.unwrap();
    assert!(loaded.context_id.starts_with("ctx-"), "{loaded:?}");
    assert_eq!((loaded.bytes, loaded.sha256.len()), (text.len() as u64, 64));
    for _ in 0..2 {
        assert_eq!(ask(&client, &loaded).await.unwrap(), "ZEBRA-42");
    }
    let listed = client.list_contexts().await.unwrap();
    assert_eq!(listed.contexts.len(), 1);
    let stored = &listed.contexts[0];
    assert_eq!(
        (&stored.id, stored.bytes, &stored.sha256, stored.uses),
        (&loaded.context_id, loaded.bytes, &loaded.sha256, 0)
    );
    assert_eq!(listed.bytes_total, loaded.bytes);
    let status = client.status().await.unwrap();
    assert_eq!(
        (status.contexts.count, status.contexts.bytes),
        (1, loaded.bytes)
    );
    assert!(client.drop_context(&loaded.context_id).await.unwrap());
    assert_unknown(ask(&client, &loaded).await.unwrap_err(), "context_id");
    assert!(!client.drop_context(&loaded.context_id).await.unwrap());
    assert_eq!(client.metrics().successful_requests, 2);
}

#[tokio::test]
async fn a_list_of_documents_or_messages_becomes_a_list() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([{
        "when": "root",
        "reply": answer("str(len(context)) + ' ' + str(context[-1]).replace(\"'\", '')"),
    }]));
    let client = client(&fixture, &[]);
    let documents = vec![json!("first doc"), json!("second doc"), json!("last doc")];
    let loaded = client.load_context(documents).await.unwrap();
    assert_eq!(ask(&client, &loaded).await.unwrap(), "3 last doc");
    let messages = vec![
        Message::new("user", "first"),
        Message::new("assistant", "x"),
    ];
    let loaded = client.load_context(messages).await.unwrap();
    let answer = ask(&client, &loaded).await.unwrap();
    assert!(
        [
            "2 {role: assistant, content: x}",
            "2 {content: x, role: assistant}"
        ]
        .contains(&answer.as_str()),
        "{answer}"
    );
}

#[tokio::test]
async fn a_long_string_goes_in_chunks_cut_at_characters_each_line_bounded() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let wire = scratch("wire.jsonl");
    let script = format!("tee '{}' | exec \"$@\"", wire.display());
    let config = fixture
        .config(&[], &[])
        .into_builder()
        .context_chunk_bytes(16);
    let client = RlmClient::new(wrapped(config.build(), &script));
    let text = MIXED.repeat(3);
    let chunked = client.load_context(text.as_str()).await.unwrap();
    let whole = client
        .load_context_with(LoadRequest::new(text.as_str()).chunk_bytes(1 << 20))
        .await
        .unwrap();
    assert_eq!(
        (chunked.bytes, &chunked.sha256),
        (whole.bytes, &whole.sha256)
    );
    assert_ne!(chunked.context_id, whole.context_id);
    assert_eq!(ask(&client, &chunked).await.unwrap(), text);

    let loads: Vec<Value> = std::fs::read_to_string(&wire)
        .unwrap()
        .lines()
        .map(|line| serde_json::from_str::<Value>(line).unwrap())
        .filter(|message| message["method"] == "context/load")
        .map(|message| message["params"].clone())
        .collect();
    let (chunks, rest) = loads.split_at(loads.len() - 1);
    assert_eq!(rest, [json!({"text": text})], "the whole load: one line");
    assert!(chunks.len() > 3, "{chunks:?}");
    assert_eq!(chunks[0].as_object().unwrap().len(), 1, "the first creates");
    assert_eq!(chunks[1]["context_id"], json!(chunked.context_id));
    assert_eq!(chunks.last().unwrap()["final"], true);
    assert!(
        chunks[..chunks.len() - 1]
            .iter()
            .all(|c| c.get("final").is_none())
    );
    let mut joined = String::new();
    for chunk in chunks {
        let piece = chunk["chunk"].as_str().unwrap();
        assert!(
            serde_json::to_string(piece).unwrap().len() <= 16 + 2,
            "{piece:?}"
        );
        joined.push_str(piece);
    }
    assert_eq!(joined, text);
}

#[tokio::test]
async fn a_server_with_a_small_line_limit_gets_smaller_chunks() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([{"when": "root", "reply": answer("str(len(context))")}]));
    let client = client(&fixture, &["--max-message-bytes", "20000"]);
    let text = MIXED.repeat(2000); // far above the line limit, far below the chunk size
    let loaded = client.load_context(text.as_str()).await.unwrap();
    assert_eq!(loaded.bytes, text.len() as u64);
    let length = ask(&client, &loaded).await.unwrap();
    assert_eq!(length, text.chars().count().to_string());
    let list = vec![json!("x".repeat(30_000))];
    let error = client.load_context(list).await.unwrap_err();
    assert!(matches!(error, RlmError::InvalidRequest(_)), "{error}");
    let refused = error.rpc().unwrap().data.as_ref().unwrap();
    assert_eq!(refused.kind, ErrorType::LineTooLong, "a list is one line");
}

#[tokio::test]
async fn a_file_and_a_reader_stream_with_characters_split_across_reads() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &[]);
    let text = MIXED.repeat(20);
    let whole = client.load_context(text.as_str()).await.unwrap();

    let path = scratch("context.txt");
    std::fs::write(&path, &text).unwrap();
    let request = LoadRequest::new(ContextSource::file(&path)).chunk_bytes(7);
    let from_file = client.load_context_with(request).await.unwrap();
    assert_eq!(
        (from_file.bytes, &from_file.sha256),
        (whole.bytes, &whole.sha256)
    );

    // A pipe of one byte: every read returns one byte, so every multi-byte character is split.
    let (mut writer, reader) = tokio::io::duplex(1);
    let bytes = text.clone().into_bytes();
    tokio::spawn(async move { writer.write_all(&bytes).await });
    let request = LoadRequest::new(ContextSource::reader(reader)).chunk_bytes(64);
    let from_reader = client.load_context_with(request).await.unwrap();
    assert_eq!(
        (from_reader.bytes, &from_reader.sha256),
        (whole.bytes, &whole.sha256)
    );
    assert_eq!(ask(&client, &from_reader).await.unwrap(), text);
    let _ = std::fs::remove_file(path);
}

#[tokio::test]
async fn bad_sources_are_typed_errors_that_leave_nothing_stored() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &[]);
    let mut bytes = "é".repeat(100).into_bytes();
    bytes.extend_from_slice(b"\xffmore");
    let request = LoadRequest::new(ContextSource::reader(std::io::Cursor::new(bytes)));
    let error = client.load_context_with(request.chunk_bytes(16)).await;
    assert!(
        matches!(error, Err(RlmError::InvalidUtf8 { offset: 200 })),
        "{error:?}"
    );
    let missing = ContextSource::file("/nonexistent/context.txt");
    let error = client.load_context(missing).await.unwrap_err();
    assert!(
        matches!(&error, RlmError::Read(e) if e.kind() == std::io::ErrorKind::NotFound),
        "{error}"
    );
    assert!(
        error.to_string().contains("/nonexistent/context.txt"),
        "{error}"
    );
    eventually(LIMIT, "the partial context is dropped", || async {
        bytes_total(&client).await == 0
    })
    .await;
}

#[tokio::test]
async fn an_abandoned_load_drops_what_it_stored() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &[]);
    // Half of the text arrives, then the source stalls.
    let (mut writer, reader) = tokio::io::duplex(1024);
    writer.write_all("x".repeat(600).as_bytes()).await.unwrap();
    let request = LoadRequest::new(ContextSource::reader(reader))
        .chunk_bytes(100)
        .timeout(Duration::from_secs(2));
    let error = client.load_context_with(request).await.unwrap_err();
    assert!(matches!(error, RlmError::Timeout(_)), "{error}");
    eventually(LIMIT, "the partial context is dropped", || async {
        bytes_total(&client).await == 0
    })
    .await;

    // The same when the caller drops the future.
    let (mut writer, reader) = tokio::io::duplex(1024);
    writer.write_all("y".repeat(600).as_bytes()).await.unwrap();
    let request = LoadRequest::new(ContextSource::reader(reader)).chunk_bytes(100);
    let load = client.load_context_with(request);
    let abandoned = tokio::time::timeout(Duration::from_millis(500), load).await;
    assert!(abandoned.is_err(), "the load waits for the rest");
    eventually(LIMIT, "the partial context is dropped", || async {
        bytes_total(&client).await == 0
    })
    .await;
    drop(writer);
}

#[tokio::test]
async fn a_full_store_is_context_store_full_and_a_refused_chunk_drops_the_rest() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &["--context-store-bytes", "100"]);
    let error = client.load_context("z".repeat(101)).await.unwrap_err();
    assert!(matches!(error, RlmError::ContextStoreFull(_)), "{error}");
    let data = error.rpc().unwrap().data.as_ref().unwrap();
    assert_eq!(
        (&data.kind, data.limit_bytes),
        (&ErrorType::ContextStoreFull, Some(100))
    );
    assert!(!error.is_retryable());
    let request = LoadRequest::new("w".repeat(300)).chunk_bytes(40);
    let error = client.load_context_with(request).await.unwrap_err();
    assert!(matches!(error, RlmError::ContextStoreFull(_)), "{error}");
    eventually(LIMIT, "the chunks stored before are dropped", || async {
        bytes_total(&client).await == 0
    })
    .await;
    let fits = client.load_context("v".repeat(100)).await.unwrap();
    assert_eq!(fits.bytes, 100);
}

#[tokio::test]
async fn unknown_ids_are_invalid_params_naming_their_field() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &[]);
    let request = InferRequest::context("ctx-0123456789abcdef0123456789abcdef");
    assert_unknown(client.infer(request).await.unwrap_err(), "context_id");
    let error = client.open_session(Some("ctx-nope")).await.unwrap_err();
    assert_unknown(error, "context_id");
    assert!(!client.drop_context("ctx-nope").await.unwrap());
    let session = client.open_session(None).await.unwrap();
    assert!(session.close().await.unwrap());
    assert_unknown(
        session.infer("still there?").await.unwrap_err(),
        "session_id",
    );
}

#[tokio::test]
async fn a_session_turn_reads_what_an_earlier_turn_stored() {
    repo_or_skip!();
    let recall = answer("'the code was ' + code");
    let remember = format!(
        "```repl\nimport re\ncode = re.search(r\"code is ([A-Z]+-[0-9]+)\", context).group(1)\n```\n{}",
        answer("'noted'")
    );
    let fixture = Fixture::start(json!([
        {"when": "root", "contains": "prior conversation history", "reply": recall},
        {"when": "root", "reply": remember},
    ]));
    let client = client(&fixture, &[]);
    let loaded = client.load_context(MIXED).await.unwrap();
    let session = client
        .open_session(Some(loaded.context_id.as_str()))
        .await
        .unwrap();
    assert!(session.id().starts_with("ses-"), "{session:?}");
    assert_eq!(session.infer("Find the code.").await.unwrap().text, "noted");
    let second = session
        .infer_with(InferRequest::turn("What was it?").timeout(Duration::from_secs(60)))
        .await
        .unwrap();
    assert_eq!(second.text, "the code was KITE-7");
    assert_eq!(client.status().await.unwrap().sessions.count, 1);
    let listed = client.list_contexts().await.unwrap();
    assert_eq!(listed.contexts[0].uses, 1, "the session holds its context");
    assert!(session.close().await.unwrap());
    assert!(!session.close().await.unwrap(), "closing again is a no-op");
    assert_eq!(client.status().await.unwrap().sessions.count, 0);
    assert_eq!(client.metrics().successful_requests, 2);
}

#[tokio::test]
async fn a_turn_may_bring_its_own_input_and_a_dropped_session_is_closed() {
    repo_or_skip!();
    let fixture = Fixture::start(json!([
        {"when": "root", "contains": "prior conversation history", "reply": answer("context_0 + '+' + context_1")},
        {"when": "root", "reply": answer("context")},
    ]));
    let client = client(&fixture, &[]);
    let session = client.open_session(None).await.unwrap();
    let first = InferRequest::turn("Keep this.").prompt("alpha");
    assert_eq!(session.infer_with(first).await.unwrap().text, "alpha");
    let second = InferRequest::turn("And this.").prompt("beta");
    assert_eq!(session.infer_with(second).await.unwrap().text, "alpha+beta");
    assert_eq!(client.status().await.unwrap().sessions.count, 1);
    drop(session);
    eventually(LIMIT, "the dropped session is closed", || async {
        client.status().await.unwrap().sessions.count == 0
    })
    .await;
}

#[tokio::test]
async fn ready_and_status_say_how_model_code_is_sandboxed() {
    repo_or_skip!();
    let fixture = Fixture::start(echo());
    let client = client(&fixture, &["--sandbox", "off"]);
    let ready = client.start().await.unwrap();
    let status = client.status().await.unwrap();
    assert_eq!(ready.sandbox, SandboxLevel::Off);
    assert_eq!(
        (&status.sandbox, &status.protections),
        (&ready.sandbox, &ready.protections)
    );
    assert!(
        ready
            .protections
            .iter()
            .all(|p| !matches!(p, Protection::Unknown(_))),
        "{:?}",
        ready.protections
    );
}

//! Structured answers (`options.answer_schema`) against the real rlm-server, with the scripted
//! OpenAI fixture as its model: the value decodes into the caller's type; an answer that never
//! matches is `RlmError::InvalidAnswer` with the validator's reason and the usage.

mod common;

use rlm_client::{ErrorType, InferOptions, InferRequest, RlmClient, RlmError};
use serde::Deserialize;
use serde_json::{Value, json};

use common::{Fixture, answer};

#[derive(Debug, PartialEq, Deserialize)]
struct Found {
    code: String,
    line: u32,
}

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {"code": {"type": "string"}, "line": {"type": "integer"}},
        "required": ["code", "line"]
    })
}

fn asking(schema: Value) -> InferRequest {
    InferRequest::new("...")
        .query("Where is the code?")
        .options(InferOptions::new().answer_schema(schema).answer_repairs(1))
}

#[tokio::test]
async fn the_answer_decodes_into_the_callers_type() {
    repo_or_skip!();
    let reply = answer(r#"{"code": "ZEBRA-42", "line": 21}"#);
    let fixture = Fixture::start(json!([{"when": "root", "reply": reply}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let result = client.infer(asking(schema())).await.unwrap();
    let found: Found = result.answer().unwrap();
    assert_eq!(
        found,
        Found {
            code: "ZEBRA-42".into(),
            line: 21
        }
    );
    assert_eq!(result.text, r#"{"code":"ZEBRA-42","line":21}"#);
    assert!(
        matches!(result.answer::<Vec<u8>>(), Err(RlmError::Answer(_))),
        "a type the value does not fit is an error, not a panic"
    );
    let plain = client.infer(InferRequest::new("...")).await.unwrap();
    assert_eq!(plain.value, None);
    assert!(matches!(plain.answer::<Found>(), Err(RlmError::Answer(_))));
    client.close().await;
}

#[tokio::test]
async fn an_answer_that_never_matches_is_invalid_answer() {
    repo_or_skip!();
    let reply = answer(r#"{"code": "ZEBRA-42", "line": "21"}"#);
    let fixture = Fixture::start(json!([{"when": "root", "reply": reply}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let error = client.infer(asking(schema())).await.unwrap_err();
    assert!(matches!(error, RlmError::InvalidAnswer(_)), "{error}");
    assert_eq!(error.code(), Some(-32006));
    let data = error.rpc().unwrap().data.as_ref().unwrap();
    assert_eq!(data.kind, ErrorType::InvalidAnswer);
    assert_eq!(
        data.validation_error.as_deref(),
        Some("at $.line: '21' is not of type 'integer'")
    );
    assert_eq!(error.usage().unwrap().calls, 2, "one answer and one repair");
    assert!(!error.is_retryable());
    let refused = client
        .infer(asking(json!({"type": "strng"})))
        .await
        .unwrap_err();
    assert_eq!(refused.field(), Some("options.answer_schema"));
    client.close().await;
}

//! rlm-client's elizaOS plugin (feature `elizaos`): its model handlers, called as the
//! `elizaos` runtime calls them (`handler(params)`), against the real rlm-server and the
//! scripted model. It lives here, beside the published crate's test, so that CI builds the
//! `elizaos` crate once; it shares the Rust client's test helpers.

#[path = "../../../rust/tests/common/mod.rs"]
mod common;

use std::time::Duration;

use rlm_client::elizaos_plugin::{
    OBJECT_MODEL_TYPES, RLM_MODEL_TYPES, TEXT_MODEL_TYPES, cut_at_stop, infer_request,
};
use rlm_client::{Prompt, RlmClient, RlmPluginOptions, create_rlm_elizaos_plugin_with};
use serde_json::{Value, json};

use common::{Fixture, STUB_TEXT, answer, stub_config};

fn sorted(keys: impl Iterator<Item = String>) -> Vec<String> {
    let mut keys: Vec<String> = keys.collect();
    keys.sort();
    keys
}

#[test]
fn the_text_models_stay_with_the_agents_usual_model_unless_asked_for() {
    let client = RlmClient::new(stub_config());
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), RlmPluginOptions::default());
    assert_eq!(plugin.definition.name, "rlm");
    assert_eq!(plugin.definition.priority, Some(-10));
    assert_eq!(
        sorted(plugin.model_handlers.into_keys()),
        sorted(RLM_MODEL_TYPES.iter().map(|s| s.to_string()))
    );
    let all = create_rlm_elizaos_plugin_with(client, RlmPluginOptions::default().text_models(true));
    let expected = RLM_MODEL_TYPES
        .iter()
        .chain(TEXT_MODEL_TYPES.iter())
        .map(|s| s.to_string());
    assert_eq!(sorted(all.model_handlers.into_keys()), sorted(expected));
    let objects = create_rlm_elizaos_plugin_with(
        RlmClient::new(stub_config()),
        RlmPluginOptions::default().object_models(true),
    );
    let expected = RLM_MODEL_TYPES
        .iter()
        .chain(OBJECT_MODEL_TYPES.iter())
        .map(|s| s.to_string());
    assert_eq!(sorted(objects.model_handlers.into_keys()), sorted(expected));
}

#[tokio::test]
async fn the_prompt_is_the_query_and_the_context_is_explored_in_the_repl() {
    let code = r#"__import__("re").search(r"vault code is (\w+)", context).group(1)"#;
    let fixture = Fixture::start(json!([
        {"when": "root", "contains": "What is the vault code?", "reply": answer(code)}
    ]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), RlmPluginOptions::default());
    let context = format!(
        "{}The vault code is RS4X. {}",
        "filler. ".repeat(20_000),
        "more. ".repeat(50)
    );
    let handler = &plugin.model_handlers["TEXT_RLM_LARGE"];
    let text = handler(json!({"prompt": "What is the vault code?", "context": context}))
        .await
        .unwrap();
    assert_eq!(text, "RS4X");
    let seen = fixture.requests().to_string();
    assert!(seen.contains("What is the vault code?") && !seen.contains("RS4X"));
    client.shutdown(Duration::from_secs(5), None).await.unwrap();
}

#[tokio::test]
async fn stop_sequences_cut_the_answer_and_formats_but_text_and_json_are_refused() {
    let fixture = Fixture::start(json!([{"when": "root", "reply": answer("\"alpha STOP beta\"")}]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let options = RlmPluginOptions::default().text_models(true);
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), options);
    let handler = &plugin.model_handlers["TEXT_LARGE"];
    let text = handler(json!({"prompt": "go", "stopSequences": ["STOP"], "stream": true})).await;
    assert_eq!(text.unwrap(), "alpha ");
    let refused = handler(json!({"prompt": "go", "responseFormat": {"type": "json_schema"}})).await;
    assert!(refused.unwrap_err().to_string().contains("responseFormat"));
    let cut = json!({"prompt": "go", "responseFormat": "json_object", "stopSequences": ["}"]});
    assert!(
        handler(cut)
            .await
            .unwrap_err()
            .to_string()
            .contains("stopSequences")
    );
    assert_eq!(
        fixture.requests().as_array().map(Vec::len),
        Some(1),
        "refused before any call"
    );
    client.shutdown(Duration::from_secs(5), None).await.unwrap();
}

#[tokio::test]
async fn a_json_object_format_on_a_text_model_answers_a_json_object() {
    let fixture = Fixture::start(json!([
        {"when": "root", "reply": answer(r#"{"city": "Lyon", "count": 3}"#)}
    ]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let options = RlmPluginOptions::default().text_models(true);
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), options);
    let params = json!({"prompt": "Which city?", "responseFormat": {"type": "json_object"}});
    let text = plugin.model_handlers["TEXT_SMALL"](params).await.unwrap();
    assert_eq!(text, r#"{"city":"Lyon","count":3}"#);
    let object: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(object, json!({"city": "Lyon", "count": 3}));
    client.shutdown(Duration::from_secs(5), None).await.unwrap();
}

#[tokio::test]
async fn object_large_returns_the_object_valid_against_the_schema() {
    let fixture = Fixture::start(json!([
        {"when": "root", "contains": "Where is the code?", "reply": answer(r#"{"code": "ZEBRA-42", "line": 21}"#)}
    ]));
    let client = RlmClient::new(fixture.config(&[], &[]));
    let options = RlmPluginOptions::default().object_models(true);
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), options);
    let handler = &plugin.model_handlers["OBJECT_LARGE"];
    let schema = json!({
        "type": "object",
        "properties": {"code": {"type": "string"}, "line": {"type": "integer"}},
        "required": ["code", "line"]
    });
    let params = json!({"prompt": "Where is the code?", "context": "...", "schema": schema});
    let text = handler(params).await.unwrap();
    let object: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(object, json!({"code": "ZEBRA-42", "line": 21}));
    // The schema reaches the server, which checks the answer against it.
    let strict = json!({"type": "object", "properties": {"line": {"type": "string"}}});
    let params = json!({"prompt": "Where is the code?", "schema": strict});
    let invalid = handler(params).await.unwrap_err();
    assert!(
        format!("{invalid:#}").contains("invalid_answer"),
        "{invalid:#}"
    );
    let refused = handler(json!({"prompt": "go", "output": "array"})).await;
    assert!(refused.unwrap_err().to_string().contains("output"));
    let refused = handler(json!({"prompt": "go", "stopSequences": ["}"]})).await;
    assert!(refused.unwrap_err().to_string().contains("stopSequences"));
    client.shutdown(Duration::from_secs(5), None).await.unwrap();
}

#[tokio::test]
async fn without_a_backend_an_object_model_is_an_error_not_the_stub_text() {
    let client = RlmClient::new(stub_config());
    let options = RlmPluginOptions::default().object_models(true);
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), options);
    let refused = plugin.model_handlers["OBJECT_SMALL"](json!({"prompt": "hello"})).await;
    assert!(refused.unwrap_err().to_string().contains("stub"));
    client.close().await;
}

#[tokio::test]
async fn without_a_backend_the_handlers_answer_the_stub() {
    let client = RlmClient::new(stub_config());
    let plugin = create_rlm_elizaos_plugin_with(client.clone(), RlmPluginOptions::default());
    let text = plugin.model_handlers["TEXT_RLM_REASONING"](json!({"prompt": "hello"})).await;
    assert_eq!(text.unwrap(), STUB_TEXT);
    client.close().await;
}

#[test]
fn stop_sequences_cut_at_the_first_one() {
    let stops = vec!["STOP".to_owned(), "b".to_owned(), String::new()];
    assert_eq!(cut_at_stop("alpha STOP beta", &stops), "alpha ");
    assert_eq!(cut_at_stop("none here", &[]), "none here");
}

#[test]
fn the_request_carries_the_prompt_as_query_and_the_context_as_prompt() {
    let request = infer_request(&json!({"prompt": "Q?", "context": "long"})).unwrap();
    assert_eq!(request.query.as_deref(), Some("Q?"));
    assert_eq!(request.prompt, Some(Prompt::from("long")));
    let alone =
        infer_request(&json!({"prompt": "Q?", "temperature": 0.5, "maxTokens": 9})).unwrap();
    assert_eq!(alone.prompt, Some(Prompt::from("Q?")));
    assert_eq!(
        (alone.options.temperature, alone.options.max_tokens),
        (Some(0.5), Some(9))
    );
    let messages = json!({"prompt": "Q?", "messages": [{"role": "user", "content": "m"}]});
    assert!(matches!(
        infer_request(&messages).unwrap().prompt,
        Some(Prompt::Messages(_))
    ));
    assert!(infer_request(&json!({"context": "no prompt"})).is_err());
}

//! An elizaOS plugin (feature `elizaos`): model handlers for the [`elizaos`] crate's runtime,
//! answered by rlm-server through an [`RlmClient`].
//!
//! The Rust runtime keeps one handler per model type and the last plugin registered wins; it
//! has no priorities. So that adding this plugin does not take `TEXT_SMALL`/`TEXT_LARGE` or
//! `OBJECT_SMALL`/`OBJECT_LARGE` from the agent's usual model, [`create_rlm_elizaos_plugin`]
//! registers only the RLM's own types, `TEXT_RLM_LARGE` and `TEXT_RLM_REASONING`, unless
//! `ELIZA_RLM_TEXT_MODELS` is true (or [`RlmPluginOptions::text_models`] is set): then the five
//! text types too; and `ELIZA_RLM_OBJECT_MODELS` (or [`RlmPluginOptions::object_models`]) adds
//! the two object types.
//!
//! A handler's params are elizaOS's `GenerateTextParams` (camelCase JSON), or
//! `ObjectGenerationParams` for the object types. Their `prompt` is what the agent asks: the root
//! model's `query`. The long input the RLM explores goes in `context` (a string, or
//! `{role, content}` messages; `messages` is accepted too) and becomes the REPL's `context`;
//! without it the prompt is the context as well. `temperature` and `maxTokens` are sent, and
//! `options` (our `InferOptions`, snake_case) too. `stream`, `stopSequences` and
//! `responseFormat` are honoured or refused, never ignored: a handler returns the whole answer
//! (the runtime's handler type has no stream; an RLM answer exists only once its REPL sets it),
//! the answer is cut at the first stop sequence, a `text` format is what the RLM returns anyway,
//! and a `json_object` format asks the server for an answer that is a JSON object
//! (`options.answer_schema` = `{"type": "object"}`), returned as its JSON text (stop sequences
//! are refused then: a cut would break the JSON); any other format is refused.
//!
//! `OBJECT_SMALL` and `OBJECT_LARGE` answer with an object valid against the params' `schema`
//! when given, else any JSON object, checked by the server before it returns it
//! (`options.answer_schema`). The runtime's handler type returns a `String`, so the object comes
//! as its compact JSON text, to parse with `serde_json::from_str`. `output` other than `object`
//! is refused (give a schema instead), and so are stop sequences; a server in stub mode (no
//! backend) is an error, since it has no object to return.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use anyhow::{Context as _, anyhow};
use elizaos::types::{ModelHandlerFn, Plugin, PluginDefinition, model_type};
use serde_json::{Value, json};

use crate::{InferOptions, InferRequest, Message, Prompt, RlmClient, RlmConfig};

/// The RLM's own model types, always registered.
pub const RLM_MODEL_TYPES: [&str; 2] = ["TEXT_RLM_LARGE", "TEXT_RLM_REASONING"];
/// elizaOS's text model types (the runtime's keys: the reasoning ones are `REASONING_SMALL`
/// and `REASONING_LARGE`), registered only when asked for.
pub const TEXT_MODEL_TYPES: [&str; 5] = [
    model_type::TEXT_SMALL,
    model_type::TEXT_LARGE,
    model_type::TEXT_REASONING_SMALL,
    model_type::TEXT_REASONING_LARGE,
    model_type::TEXT_COMPLETION,
];
/// The setting that asks for [`TEXT_MODEL_TYPES`] as well.
pub const TEXT_MODELS_SETTING: &str = "ELIZA_RLM_TEXT_MODELS";
/// elizaOS's object model types, registered only when asked for: their handlers answer with a
/// JSON object (as its JSON text).
pub const OBJECT_MODEL_TYPES: [&str; 2] = [model_type::OBJECT_SMALL, model_type::OBJECT_LARGE];
/// The setting that asks for [`OBJECT_MODEL_TYPES`] as well.
pub const OBJECT_MODELS_SETTING: &str = "ELIZA_RLM_OBJECT_MODELS";

/// How the plugin is built.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RlmPluginOptions {
    /// Answer `TEXT_SMALL`, `TEXT_LARGE` and the other text types too.
    pub text_models: bool,
    /// Answer `OBJECT_SMALL` and `OBJECT_LARGE` too.
    pub object_models: bool,
}

fn setting_is_true(name: &str) -> bool {
    let raw = std::env::var(name).unwrap_or_default();
    matches!(raw.to_ascii_lowercase().as_str(), "1" | "true" | "yes")
}

impl RlmPluginOptions {
    /// From the environment: `ELIZA_RLM_TEXT_MODELS` and `ELIZA_RLM_OBJECT_MODELS` = 1, true
    /// or yes.
    pub fn from_env() -> Self {
        Self {
            text_models: setting_is_true(TEXT_MODELS_SETTING),
            object_models: setting_is_true(OBJECT_MODELS_SETTING),
        }
    }

    /// Sets [`RlmPluginOptions::text_models`].
    pub fn text_models(mut self, yes: bool) -> Self {
        self.text_models = yes;
        self
    }

    /// Sets [`RlmPluginOptions::object_models`].
    pub fn object_models(mut self, yes: bool) -> Self {
        self.object_models = yes;
        self
    }
}

/// The plugin, with a client configured from the environment ([`RlmConfig::from_env`]); the
/// server starts on the first call.
pub fn create_rlm_elizaos_plugin() -> anyhow::Result<Plugin> {
    Ok(create_rlm_elizaos_plugin_with(
        RlmClient::new(RlmConfig::from_env()),
        RlmPluginOptions::from_env(),
    ))
}

/// The plugin, answering through `client`.
pub fn create_rlm_elizaos_plugin_with(client: RlmClient, options: RlmPluginOptions) -> Plugin {
    let mut types: Vec<&str> = RLM_MODEL_TYPES.to_vec();
    if options.text_models {
        types.extend(TEXT_MODEL_TYPES);
    }
    let mut model_handlers: HashMap<String, ModelHandlerFn> = types
        .into_iter()
        .map(|model_type| (model_type.to_owned(), handler(client.clone())))
        .collect();
    if options.object_models {
        for model_type in OBJECT_MODEL_TYPES {
            model_handlers.insert(model_type.to_owned(), object_handler(client.clone()));
        }
    }
    Plugin {
        definition: PluginDefinition {
            name: "rlm".to_owned(),
            description: "Recursive Language Models through rlm-server: long contexts explored \
                          in a REPL"
                .to_owned(),
            priority: Some(-10),
            ..Default::default()
        },
        model_handlers,
        ..Default::default()
    }
}

type Answer = Pin<Box<dyn Future<Output = anyhow::Result<String>> + Send>>;

fn handler(client: RlmClient) -> ModelHandlerFn {
    Box::new(move |params: Value| -> Answer {
        let client = client.clone();
        Box::pin(async move { answer(&client, &params).await })
    })
}

fn object_handler(client: RlmClient) -> ModelHandlerFn {
    Box::new(move |params: Value| -> Answer {
        let client = client.clone();
        Box::pin(async move { answer_object(&client, &params).await })
    })
}

/// One text model call: refuse what cannot be honoured, run the RLM, cut at a stop sequence.
/// With `responseFormat` `json_object`, the answer is a JSON object's text.
pub async fn answer(client: &RlmClient, params: &Value) -> anyhow::Result<String> {
    let schema = text_format(params)?;
    let mut request = infer_request(params)?;
    if let Some(schema) = schema {
        request.options.answer_schema = Some(schema);
    }
    let result = client.infer(request).await.context("rlm-server")?;
    Ok(cut_at_stop(&result.text, &stop_sequences(params)))
}

/// One object model call: the answer, valid against `schema` (else any JSON object), as its
/// compact JSON text.
pub async fn answer_object(client: &RlmClient, params: &Value) -> anyhow::Result<String> {
    let schema = object_schema(params)?;
    let mut request = infer_request(params)?;
    request.options.answer_schema = Some(schema);
    let result = client.infer(request).await.context("rlm-server")?;
    if result.stub {
        return Err(anyhow!(
            "rlm: the server has no backend (stub mode): no object to return"
        ));
    }
    let value = result
        .value
        .ok_or_else(|| anyhow!("rlm: the server returned no value for an answer_schema"))?;
    Ok(serde_json::to_string(&value)?)
}

/// The schema a text call's `responseFormat` asks for: none for `text`, any object for
/// `json_object`. Anything else is refused before anything runs.
fn text_format(params: &Value) -> anyhow::Result<Option<Value>> {
    let format = &params["responseFormat"];
    let kind = format.get("type").unwrap_or(format);
    match kind {
        Value::Null => Ok(None),
        Value::String(text) if text == "text" => Ok(None),
        Value::String(text) if text == "json_object" => {
            refuse_stops(params, "responseFormat json_object")?;
            Ok(Some(json!({"type": "object"})))
        }
        other => Err(anyhow!(
            "rlm: responseFormat {other} is not supported: use \"text\" or \"json_object\""
        )),
    }
}

/// The schema an object call asks for: `schema`, else any JSON object.
fn object_schema(params: &Value) -> anyhow::Result<Value> {
    refuse_stops(params, "an object model")?;
    match &params["output"] {
        Value::Null => {}
        Value::String(output) if output == "object" => {}
        other => {
            return Err(anyhow!(
                "rlm: output {other} is not supported: give a schema for anything but an object"
            ));
        }
    }
    Ok(match &params["schema"] {
        Value::Null => json!({"type": "object"}),
        schema => schema.clone(),
    })
}

fn refuse_stops(params: &Value, what: &str) -> anyhow::Result<()> {
    if stop_sequences(params).is_empty() {
        Ok(())
    } else {
        Err(anyhow!(
            "rlm: stopSequences are not supported with {what}: a cut would break the JSON"
        ))
    }
}

/// `prompt` -> query; `context` or `messages` (else the prompt) -> the REPL's context.
pub fn infer_request(params: &Value) -> anyhow::Result<InferRequest> {
    let prompt = params["prompt"]
        .as_str()
        .filter(|p| !p.is_empty())
        .ok_or_else(|| anyhow!("rlm: params.prompt (what the agent asks) is required"))?;
    let context = match (&params["context"], &params["messages"]) {
        (Value::String(text), _) => Prompt::from(text.as_str()),
        (Value::Array(_), _) => Prompt::from(messages(&params["context"], "context")?),
        (Value::Null, Value::Array(list)) if !list.is_empty() => {
            Prompt::from(messages(&params["messages"], "messages")?)
        }
        _ => Prompt::from(prompt),
    };
    Ok(InferRequest::new(context)
        .query(prompt)
        .options(options(params)?))
}

fn messages(value: &Value, field: &str) -> anyhow::Result<Vec<Message>> {
    serde_json::from_value(value.clone()).with_context(|| {
        format!("rlm: params.{field} must be a string or {{role, content}} messages")
    })
}

fn options(params: &Value) -> anyhow::Result<InferOptions> {
    let mut options: InferOptions = match &params["options"] {
        Value::Null => InferOptions::new(),
        given => serde_json::from_value(given.clone()).context("rlm: params.options")?,
    };
    if options.temperature.is_none() {
        options.temperature = params["temperature"].as_f64();
    }
    if options.max_tokens.is_none() {
        options.max_tokens = params["maxTokens"]
            .as_u64()
            .and_then(|n| u32::try_from(n).ok());
    }
    Ok(options)
}

fn stop_sequences(params: &Value) -> Vec<String> {
    params["stopSequences"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|s| s.as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The answer up to the first stop sequence, as a model stopping there would have written it.
pub fn cut_at_stop(text: &str, stops: &[String]) -> String {
    let end = stops
        .iter()
        .filter(|stop| !stop.is_empty())
        .filter_map(|stop| text.find(stop.as_str()))
        .min()
        .unwrap_or(text.len());
    text[..end].to_owned()
}

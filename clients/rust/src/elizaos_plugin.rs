//! An elizaOS plugin (feature `elizaos`): model handlers for the [`elizaos`] crate's runtime,
//! answered by rlm-server through an [`RlmClient`].
//!
//! The Rust runtime keeps one handler per model type and the last plugin registered wins; it
//! has no priorities. So that adding this plugin does not take `TEXT_SMALL`/`TEXT_LARGE` from
//! the agent's usual model, [`create_rlm_elizaos_plugin`] registers only the RLM's own types,
//! `TEXT_RLM_LARGE` and `TEXT_RLM_REASONING`, unless `ELIZA_RLM_TEXT_MODELS` is true (or
//! [`RlmPluginOptions::text_models`] is set): then the five text types too.
//!
//! A handler's params are elizaOS's `GenerateTextParams` (camelCase JSON). Their `prompt` is
//! what the agent asks: the root model's `query`. The long input the RLM explores goes in
//! `context` (a string, or `{role, content}` messages; `messages` is accepted too) and becomes
//! the REPL's `context`; without it the prompt is the context as well. `temperature` and
//! `maxTokens` are sent, and `options` (our `InferOptions`, snake_case) too. `stream`,
//! `stopSequences` and `responseFormat` are honoured or refused, never ignored: a handler
//! returns the whole answer (the runtime's handler type has no stream; an RLM answer exists
//! only once its REPL sets it), the answer is cut at the first stop sequence, and a JSON
//! response format is an error, since nothing makes an RLM answer JSON.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;

use anyhow::{Context as _, anyhow};
use elizaos::types::{ModelHandlerFn, Plugin, PluginDefinition, model_type};
use serde_json::Value;

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

/// How the plugin is built.
#[derive(Debug, Clone, Default)]
#[non_exhaustive]
pub struct RlmPluginOptions {
    /// Answer `TEXT_SMALL`, `TEXT_LARGE` and the other text types too.
    pub text_models: bool,
}

impl RlmPluginOptions {
    /// From the environment: `ELIZA_RLM_TEXT_MODELS` = 1, true or yes.
    pub fn from_env() -> Self {
        let raw = std::env::var(TEXT_MODELS_SETTING).unwrap_or_default();
        Self {
            text_models: matches!(raw.to_ascii_lowercase().as_str(), "1" | "true" | "yes"),
        }
    }

    /// Sets [`RlmPluginOptions::text_models`].
    pub fn text_models(mut self, yes: bool) -> Self {
        self.text_models = yes;
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
    let model_handlers: HashMap<String, ModelHandlerFn> = types
        .into_iter()
        .map(|model_type| (model_type.to_owned(), handler(client.clone())))
        .collect();
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

/// One model call: refuse what cannot be honoured, run the RLM, cut at a stop sequence.
pub async fn answer(client: &RlmClient, params: &Value) -> anyhow::Result<String> {
    refuse_unsupported(params)?;
    let request = infer_request(params)?;
    let result = client.infer(request).await.context("rlm-server")?;
    Ok(cut_at_stop(&result.text, &stop_sequences(params)))
}

/// A `responseFormat` other than `text` cannot be honoured: refused before anything runs.
fn refuse_unsupported(params: &Value) -> anyhow::Result<()> {
    let format = &params["responseFormat"];
    let kind = format.get("type").unwrap_or(format);
    match kind {
        Value::Null => Ok(()),
        Value::String(text) if text == "text" => Ok(()),
        other => Err(anyhow!(
            "rlm: responseFormat {other} is not supported: an RLM answer is the text its REPL \
             sets, and nothing makes it JSON"
        )),
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

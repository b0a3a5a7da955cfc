//! One source for what the two clients share: the TypeScript client generates its types from
//! `protocol/schema.json`; this test gives the Rust crate the same guarantee by walking the
//! schema and failing on anything in it the crate does not know:
//!
//! - every object definition is filled with every property it names, decoded into the
//!   crate's type for it and encoded back, which must give the same JSON (a property the
//!   type lacks is dropped, one it spells differently is missing);
//! - every value of the `Backend`, progress `event`, `ErrorType`, error `scope`, `sandbox`
//!   and `Protection` enums must be one the crate knows (and the crate must know no other),
//!   every `ErrorCode` must map to its own `RlmError` variant, and every method must be one
//!   the client implements;
//! - a definition this test has never seen fails it, so a new one cannot slip by.
//!
//! The schema lives in the repository, not in the packaged crate: built from the package,
//! this test says so and skips.

mod common;
mod json;

use json::{decode, round_trip};

use std::collections::BTreeSet;

use rlm_client::protocol::{
    Budget, BudgetScope, CancelParams, ContextDropParams, ContextDropResult, ContextListParams,
    ContextListResult, ContextLoadParams, ContextLoadResult, ErrorData, ExecutorKind, ExecutorNode,
    ExecutorStatus, InferOptions, InferParams, InferResult, LatencySummary, Message, Progress,
    Protection, ReadyParams, RpcError, SandboxLevel, ServerMetrics, SessionCloseParams,
    SessionCloseResult, SessionOpenParams, SessionOpenResult, ShutdownParams, ShutdownResult,
    StatusResult, ToolCallParams, ToolDeclaration, TrajectoryCodeBlock, TrajectoryStep,
    TrajectorySubCall, TrajectoryToolCall, Usage,
};
use rlm_client::{Backend, ErrorType, ProgressEvent, RlmError};
use serde_json::{Map, Value, json};

/// The methods the client implements (`infer`, `status`, `shutdown`, the stored contexts' and
/// the sessions' as calls, `$/cancelRequest` as the cancellation of one).
const METHODS: [&str; 9] = [
    "infer",
    "status",
    "shutdown",
    "$/cancelRequest",
    "context/load",
    "context/drop",
    "context/list",
    "session/open",
    "session/close",
];

/// Definitions that only combine others, checked through the ones they combine.
const UNIONS: [&str; 4] = ["ClientMessage", "ServerMessage", "Response", "Id"];

/// Envelope definitions: the members the client writes or reads, by name.
const ENVELOPES: [(&str, &[&str]); 5] = [
    ("Request", &["jsonrpc", "id", "method", "params"]),
    ("SuccessResponse", &["jsonrpc", "id", "result"]),
    ("ErrorResponse", &["jsonrpc", "id", "error"]),
    ("ToolCallResponse", &["jsonrpc", "id", "result", "error"]),
    ("ToolCancelNotification", &["jsonrpc", "method", "params"]),
];

#[test]
fn the_crate_knows_everything_in_the_schema() {
    let root = repo_or_skip!();
    let text = std::fs::read_to_string(root.join("protocol/schema.json")).unwrap();
    let schema: Value = serde_json::from_str(&text).unwrap();
    let defs = schema["$defs"].as_object().unwrap();
    let mut failures = Vec::new();
    for (name, def) in defs {
        if let Err(failure) = check(name, def, defs) {
            failures.push(format!("{name}: {failure}"));
        }
    }
    assert!(
        failures.is_empty(),
        "protocol/schema.json has what this crate does not know:\n{}",
        failures.join("\n")
    );
}

/// Checks one definition of the schema against the crate.
fn check(name: &str, def: &Value, defs: &Map<String, Value>) -> Result<(), String> {
    let sample = || sample(def, defs);
    match name {
        "Message" => round_trip::<Message>(&sample()),
        "InferParams" => round_trip::<InferParams>(&sample()),
        "InferOptions" => round_trip::<InferOptions>(&sample()),
        "Budget" => round_trip::<Budget>(&sample()),
        "ShutdownParams" => round_trip::<ShutdownParams>(&sample()),
        "CancelParams" => round_trip::<CancelParams>(&sample()),
        "Error" => round_trip::<RpcError>(&sample()),
        "ErrorData" => {
            let data: ErrorData = decode(&sample())?;
            match data.extra.keys().next() {
                Some(unknown) => Err(format!("`{unknown}` is not a field of ErrorData")),
                None => {
                    round_trip::<ErrorData>(&sample())?;
                    let scopes = &def["properties"]["scope"]["enum"];
                    same_names(&strings(scopes), BudgetScope::KNOWN)
                }
            }
        }
        "Usage" => round_trip::<Usage>(&sample()),
        "InferResult" => round_trip::<InferResult>(&sample()),
        "TrajectoryStep" => round_trip::<TrajectoryStep>(&sample()),
        "TrajectoryCodeBlock" => round_trip::<TrajectoryCodeBlock>(&sample()),
        "TrajectorySubCall" => round_trip::<TrajectorySubCall>(&sample()),
        "TrajectoryToolCall" => round_trip::<TrajectoryToolCall>(&sample()),
        "ToolDeclaration" => round_trip::<ToolDeclaration>(&sample()),
        "ToolCallRequest" => {
            same_names(&members(def), &["jsonrpc", "id", "method", "params"])?;
            round_trip::<ToolCallParams>(&sample()["params"])
        }
        "LatencySummary" => round_trip::<LatencySummary>(&sample()),
        "ServerMetrics" => round_trip::<ServerMetrics>(&sample()),
        "StatusResult" => round_trip::<StatusResult>(&sample()),
        "ExecutorStatus" => {
            same_names(
                &strings(&def["properties"]["kind"]["enum"]),
                ExecutorKind::KNOWN,
            )?;
            round_trip::<ExecutorStatus>(&sample())
        }
        "ExecutorNode" => round_trip::<ExecutorNode>(&sample()),
        "ShutdownResult" => round_trip::<ShutdownResult>(&sample()),
        "ContextLoadParams" => round_trip::<ContextLoadParams>(&sample()),
        "ContextLoadResult" => round_trip::<ContextLoadResult>(&sample()),
        "ContextDropParams" => round_trip::<ContextDropParams>(&sample()),
        "ContextDropResult" => round_trip::<ContextDropResult>(&sample()),
        "ContextListParams" => round_trip::<ContextListParams>(&sample()),
        "ContextListResult" => round_trip::<ContextListResult>(&sample()),
        "SessionOpenParams" => round_trip::<SessionOpenParams>(&sample()),
        "SessionOpenResult" => round_trip::<SessionOpenResult>(&sample()),
        "SessionCloseParams" => round_trip::<SessionCloseParams>(&sample()),
        "SessionCloseResult" => round_trip::<SessionCloseResult>(&sample()),
        "ReadyNotification" => {
            same_names(&members(def), &["jsonrpc", "method", "params"])?;
            let params = &def["properties"]["params"]["properties"];
            same_names(&strings(&params["sandbox"]["enum"]), SandboxLevel::KNOWN)?;
            round_trip::<ReadyParams>(&sample()["params"])
        }
        "Protection" => same_names(&strings(&def["enum"]), Protection::KNOWN),
        "ProgressNotification" => {
            same_names(&members(def), &["jsonrpc", "method", "params"])?;
            round_trip::<Progress>(&sample()["params"])?;
            let events = &def["properties"]["params"]["properties"]["event"]["enum"];
            same_names(&strings(events), ProgressEvent::KNOWN)
        }
        "Backend" => same_names(&strings(&def["enum"]), Backend::KNOWN),
        "ErrorType" => same_names(&strings(&def["enum"]), ErrorType::KNOWN),
        "ErrorCode" => def["enum"].as_array().unwrap().iter().try_for_each(|code| {
            let error: RpcError =
                decode(&json!({"code": code, "message": "m"})).map_err(|e| e.to_string())?;
            match RlmError::from_rpc(error) {
                RlmError::Rpc(_) => Err(format!("code {code} has no RlmError variant")),
                _ => Ok(()),
            }
        }),
        "Request" => {
            same_names(&members(def), ENVELOPES[0].1)?;
            same_names(&strings(&def["properties"]["method"]["enum"]), &METHODS)
        }
        _ if UNIONS.contains(&name) => Ok(()),
        _ => match ENVELOPES.iter().find(|(envelope, _)| *envelope == name) {
            Some((_, known)) => same_names(&members(def), known),
            None => Err("a definition this crate (and this test) has never seen".to_owned()),
        },
    }
}

/// A value of `node` with every property it names, one item in each array, the first of
/// each enum and union.
fn sample(node: &Value, defs: &Map<String, Value>) -> Value {
    if let Some(reference) = node.get("$ref").and_then(Value::as_str) {
        let name = reference.trim_start_matches("#/$defs/");
        return sample(&defs[name], defs);
    }
    if let Some(value) = node.get("const") {
        return value.clone();
    }
    if let Some(values) = node.get("enum") {
        return values[0].clone();
    }
    // A `oneOf` beside a `type` only constrains it (InferParams: prompt or messages).
    if let Some(choices) = node.get("oneOf").filter(|_| node.get("type").is_none()) {
        return sample(&choices[0], defs);
    }
    let kind = match &node["type"] {
        Value::Array(kinds) => kinds.iter().find(|k| *k != "null").unwrap_or(&kinds[0]),
        kind => kind,
    };
    match kind.as_str() {
        Some("object") => {
            let mut object = Map::new();
            if let Some(properties) = node.get("properties").and_then(Value::as_object) {
                for (name, property) in properties {
                    object.insert(name.clone(), sample(property, defs));
                }
            }
            if let Some(values) = node.get("additionalProperties").filter(|v| v.is_object()) {
                object.insert("key".to_owned(), sample(values, defs));
            }
            Value::Object(object)
        }
        // An array without `items` holds any JSON values (ContextLoadParams.messages).
        Some("array") => match node.get("items") {
            Some(items) => json!([sample(items, defs)]),
            None => json!([{"role": "user", "content": "text"}, "a document", 1]),
        },
        Some("string") => json!("text"),
        Some("integer") => json!(
            node.get("minimum")
                .and_then(Value::as_i64)
                .unwrap_or(0)
                .max(1)
        ),
        Some("number") => json!(1.5),
        Some("boolean") => json!(true),
        Some("null") => Value::Null,
        _ => panic!("the sampler does not know {node}"),
    }
}

/// The property names of an object definition.
fn members(def: &Value) -> Vec<String> {
    def["properties"]
        .as_object()
        .map(|properties| properties.keys().cloned().collect())
        .unwrap_or_default()
}

fn strings(values: &Value) -> Vec<String> {
    values
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect()
}

/// The schema's names and the crate's are the same set.
fn same_names(schema: &[String], crate_knows: &[&str]) -> Result<(), String> {
    let schema: BTreeSet<&str> = schema.iter().map(String::as_str).collect();
    let known: BTreeSet<&str> = crate_knows.iter().copied().collect();
    let unknown: Vec<_> = schema.difference(&known).collect();
    let extra: Vec<_> = known.difference(&schema).collect();
    if unknown.is_empty() && extra.is_empty() {
        Ok(())
    } else {
        Err(format!(
            "unknown to the crate: {unknown:?}; known to the crate, not in the schema: {extra:?}"
        ))
    }
}

/// The checks catch what they are for: a property, an enum value and a definition the
/// crate does not know.
#[test]
fn the_checks_catch_what_the_crate_does_not_know() {
    let defs = Map::new();
    let options = json!({"type": "object", "properties": {
        "max_depth": {"type": "integer", "minimum": 1},
        "brand_new_option": {"type": "string"}
    }});
    let failure = check("InferOptions", &options, &defs).unwrap_err();
    assert!(failure.contains("brand_new_option"), "{failure}");
    let types = json!({"enum": ErrorType::KNOWN.iter().chain(&["brand_new"]).collect::<Vec<_>>()});
    let failure = check("ErrorType", &types, &defs).unwrap_err();
    assert!(failure.contains("brand_new"), "{failure}");
    assert!(check("SomethingNew", &json!({"type": "object"}), &defs).is_err());
    let codes = json!({"enum": [-32000, -32099]});
    assert!(
        check("ErrorCode", &codes, &defs)
            .unwrap_err()
            .contains("-32099")
    );
}

//! JSON helpers for the tests that compare this crate's types with the wire (schema.rs,
//! transcripts.rs): kept out of `common`, which the compat-tests crate shares without serde.

use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::Value;

/// `value` as a `T`, or why it is not one.
pub fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_json::from_value(value.clone()).map_err(|e| format!("{value} does not decode: {e}"))
}

/// `value` decodes as `T` and encodes back to the same JSON (numbers compared by value).
pub fn round_trip<T: DeserializeOwned + Serialize>(value: &Value) -> Result<(), String> {
    let typed: T = decode(value)?;
    let back = serde_json::to_value(&typed).unwrap();
    if same(value, &back) {
        Ok(())
    } else {
        Err(format!(
            "{} changed {value} into {back}",
            std::any::type_name::<T>()
        ))
    }
}

/// Equal JSON, numbers compared by value (`1` and `1.0` are the same).
pub fn same(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        (Value::Array(x), Value::Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(x, y)| same(x, y))
        }
        (Value::Object(x), Value::Object(y)) => {
            x.len() == y.len() && x.iter().all(|(k, v)| y.get(k).is_some_and(|w| same(v, w)))
        }
        _ => a == b,
    }
}

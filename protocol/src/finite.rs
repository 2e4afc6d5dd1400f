//! Decoders for `f32` fields that refuse numbers an `f32` cannot hold.
//!
//! JSON numbers are read as `f64`; narrowing `1e300` to `f32` gives infinity, which JSON
//! cannot carry back (serde_json writes it as `null`), so a message would decode once and
//! never again. These helpers turn such a number into a decode error instead.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::de::{Deserializer, Error};

fn narrow<E: Error>(value: f64) -> Result<f32, E> {
    #[allow(clippy::cast_possible_truncation)]
    let narrowed = value as f32;
    if narrowed.is_finite() {
        Ok(narrowed)
    } else {
        Err(E::custom(format!(
            "number {value} does not fit a 32-bit float"
        )))
    }
}

pub fn f32<'de, D: Deserializer<'de>>(deserializer: D) -> Result<f32, D::Error> {
    narrow(f64::deserialize(deserializer)?)
}

pub fn option<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<f32>, D::Error> {
    Option::<f64>::deserialize(deserializer)?
        .map(narrow)
        .transpose()
}

pub fn vec<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
    Vec::<f64>::deserialize(deserializer)?
        .into_iter()
        .map(narrow)
        .collect()
}

pub fn map<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, f32>, D::Error> {
    BTreeMap::<String, f64>::deserialize(deserializer)?
        .into_iter()
        .map(|(k, v)| narrow(v).map(|v| (k, v)))
        .collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[derive(serde::Deserialize)]
    struct Sample {
        #[serde(deserialize_with = "super::f32")]
        plain: f32,
        #[serde(default, deserialize_with = "super::option")]
        maybe: Option<f32>,
    }

    #[test]
    fn a_number_too_large_for_f32_is_a_decode_error_not_infinity() {
        assert!(serde_json::from_str::<Sample>(r#"{"plain": 1e300}"#).is_err());
        assert!(serde_json::from_str::<Sample>(r#"{"plain": 1, "maybe": -1e39}"#).is_err());
        let ok: Sample = serde_json::from_str(r#"{"plain": 1.5, "maybe": null}"#).unwrap();
        assert_eq!((ok.plain, ok.maybe), (1.5, None));
    }
}

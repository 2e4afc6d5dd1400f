//! Operator labels: the labels an operator sets on the server, next to the ones a device
//! reports in its retained `info`.
//!
//! Keys and values follow the rules the agent applies to the labels it derives, so both
//! kinds read alike in selectors: a value is 0 to 63 characters of `[a-z0-9._-]`; a key is
//! 1 to 63 characters of `[a-z0-9._/-]` starting with a letter or digit. Selector syntax
//! (`=`, `!`, `(`, `)`, `,`, spaces) can therefore never appear in either.
//!
//! On a conflict the operator's label wins: the server is where rollouts are decided, and an
//! operator who marks a device `ring=canary` or `quarantine=yes` must not be overruled by
//! whatever the robot's own configuration says (or a misconfigured robot's).

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

/// The longest key or value.
pub const MAX_LEN: usize = 63;

/// Why a label was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LabelError {
    #[error(
        "label key {0:?} must be 1 to 63 characters of a-z, 0-9, '.', '_', '-', '/' starting with a letter or digit"
    )]
    Key(String),
    #[error(
        "label {key}: value {value:?} must be at most 63 characters of a-z, 0-9, '.', '_', '-'"
    )]
    Value { key: String, value: String },
    #[error("label {0:?} is both set and removed in one request")]
    SetAndRemoved(String),
    #[error("{0:?} is not key=value (to set) or key- (to remove)")]
    NotAnEdit(String),
}

fn check_key(key: &str) -> Result<(), LabelError> {
    let ok = (1..=MAX_LEN).contains(&key.len())
        && key
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
        && key.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-' | b'/')
        });
    if ok {
        Ok(())
    } else {
        Err(LabelError::Key(key.chars().take(100).collect()))
    }
}

fn check_value(key: &str, value: &str) -> Result<(), LabelError> {
    let ok = value.len() <= MAX_LEN
        && value.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'_' | b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(LabelError::Value {
            key: key.to_owned(),
            value: value.chars().take(100).collect(),
        })
    }
}

/// Checks every key and value of a label set.
pub fn validate(labels: &BTreeMap<String, String>) -> Result<(), LabelError> {
    labels.iter().try_for_each(|(k, v)| {
        check_key(k)?;
        check_value(k, v)
    })
}

/// The body of `PATCH /api/v1/devices/{id}/labels`: keys to set and keys to remove.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabelPatch {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: BTreeSet<String>,
}

impl LabelPatch {
    pub fn validate(&self) -> Result<(), LabelError> {
        validate(&self.set)?;
        self.remove.iter().try_for_each(|k| check_key(k))?;
        match self.set.keys().find(|k| self.remove.contains(*k)) {
            Some(both) => Err(LabelError::SetAndRemoved(both.clone())),
            None => Ok(()),
        }
    }

    /// Parses the CLI's `key=value` (set) and `key-` (remove) arguments.
    pub fn parse_args<S: AsRef<str>>(args: &[S]) -> Result<Self, LabelError> {
        let mut patch = Self::default();
        for arg in args.iter().map(AsRef::as_ref) {
            if let Some((key, value)) = arg.split_once('=') {
                patch.set.insert(key.to_owned(), value.to_owned());
            } else if let Some(key) = arg.strip_suffix('-') {
                patch.remove.insert(key.to_owned());
            } else {
                return Err(LabelError::NotAnEdit(arg.chars().take(100).collect()));
            }
        }
        patch.validate()?;
        Ok(patch)
    }

    /// `labels` with this patch applied.
    pub fn apply(&self, labels: &BTreeMap<String, String>) -> BTreeMap<String, String> {
        let mut out = labels.clone();
        out.retain(|k, _| !self.remove.contains(k));
        out.extend(self.set.clone());
        out
    }
}

/// The labels selectors see: the reported ones, overridden by the operator's.
pub fn effective(
    reported: &BTreeMap<String, String>,
    operator: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut labels = reported.clone();
    labels.extend(operator.clone());
    labels
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn keys_and_values_follow_the_agent_label_rules() {
        assert!(
            validate(&map(&[
                ("ring", "canary"),
                ("site/zone", "a-1.b_2"),
                ("x", "")
            ]))
            .is_ok()
        );
        for bad_key in [
            "",
            "Ring",
            "-ring",
            "a b",
            "a=b",
            "a,b",
            "!a",
            &"k".repeat(64),
        ] {
            assert!(
                matches!(validate(&map(&[(bad_key, "v")])), Err(LabelError::Key(_))),
                "{bad_key:?}"
            );
        }
        for bad_value in ["Canary", "a b", "a,b", "(x)", "a/b", &"v".repeat(64)] {
            assert!(
                matches!(
                    validate(&map(&[("k", bad_value)])),
                    Err(LabelError::Value { .. })
                ),
                "{bad_value:?}"
            );
        }
    }

    #[test]
    fn cli_edits_set_and_remove_and_a_key_cannot_do_both() {
        let patch = LabelPatch::parse_args(&["ring=canary", "site=", "old-"]).unwrap();
        assert_eq!(patch.set, map(&[("ring", "canary"), ("site", "")]));
        assert_eq!(patch.remove, BTreeSet::from(["old".to_owned()]));
        assert_eq!(
            patch.apply(&map(&[("old", "1"), ("ring", "all"), ("keep", "y")])),
            map(&[("keep", "y"), ("ring", "canary"), ("site", "")])
        );
        assert_eq!(
            LabelPatch::parse_args(&["ring=a", "ring-"]),
            Err(LabelError::SetAndRemoved("ring".into()))
        );
        assert!(matches!(
            LabelPatch::parse_args(&["ring"]),
            Err(LabelError::NotAnEdit(_))
        ));
    }

    #[test]
    fn the_operator_wins_over_the_device() {
        let reported = map(&[("ring", "stable"), ("arch", "aarch64")]);
        let operator = map(&[("ring", "canary")]);
        assert_eq!(
            effective(&reported, &operator),
            map(&[("arch", "aarch64"), ("ring", "canary")])
        );
    }
}

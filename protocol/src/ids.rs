//! Validated names. Each of these becomes an MQTT topic level or a file name,
//! so it is checked once, when it is built, and can be trusted afterwards.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Longest id accepted, in bytes.
pub const MAX_ID_LEN: usize = 64;

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("{kind} is empty")]
    Empty { kind: &'static str },
    #[error("{kind} {value:?} is longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str, value: String },
    #[error(
        "{kind} {value:?} contains {found:?}; allowed are ASCII letters, digits, '-', '_' and '.'"
    )]
    BadChar {
        kind: &'static str,
        value: String,
        found: char,
    },
    #[error("{kind} {value:?} must not start with '.' or '-'")]
    BadStart { kind: &'static str, value: String },
}

fn validate(kind: &'static str, value: &str) -> Result<(), IdError> {
    if value.is_empty() {
        return Err(IdError::Empty { kind });
    }
    if value.len() > MAX_ID_LEN {
        return Err(IdError::TooLong {
            kind,
            value: value.chars().take(MAX_ID_LEN).collect(),
        });
    }
    if let Some(found) = value
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(IdError::BadChar {
            kind,
            value: value.to_owned(),
            found,
        });
    }
    // Rules out "." and ".." (path traversal) and option-like names.
    if value.starts_with('.') || value.starts_with('-') {
        return Err(IdError::BadStart {
            kind,
            value: value.to_owned(),
        });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, IdError> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl FromStr for $name {
            type Err = IdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::new(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl Serialize for $name {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let raw = String::deserialize(deserializer)?;
                Self::new(raw).map_err(serde::de::Error::custom)
            }
        }
    };
}

id_type!(
    /// A robot's identity: its MQTT client id, its topic level and its certificate CN.
    DeviceId,
    "device id"
);
id_type!(
    /// A named model slot on a robot (e.g. `orientation`); the inference API serves it by this name.
    SlotName,
    "slot name"
);
id_type!(
    /// A rollout's identity, chosen by the server.
    RolloutId,
    "rollout id"
);
id_type!(
    /// A one-off command's identity, used to make commands idempotent.
    CommandId,
    "command id"
);
id_type!(
    /// An event's identity, chosen by the device, so a replayed event is recognised.
    EventId,
    "event id"
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_names() {
        for ok in ["robot-1", "jetson_orin.lab", "A9", "x"] {
            assert!(DeviceId::new(ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn refuses_topic_wildcards_separators_and_traversal() {
        for bad in [
            "", "a/b", "a+b", "#", "..", ".", ".hidden", "-rf", "a b", "a\nb", "é", "a\0",
        ] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(matches!(
            DeviceId::new("x".repeat(MAX_ID_LEN + 1)),
            Err(IdError::TooLong { .. })
        ));
    }

    #[test]
    fn deserializing_validates() {
        let err = serde_json::from_str::<SlotName>("\"../etc\"");
        assert!(err.is_err());
        let ok: SlotName = serde_json::from_str("\"vision\"").unwrap();
        assert_eq!(ok.as_str(), "vision");
    }
}

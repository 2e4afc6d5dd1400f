//! Who may call the API: named bearer tokens, each with a role.
//!
//! Tokens come from `[auth]` in the configuration and from a token file (one
//! `name role token` per line, so the secret need not sit in the main config). They are
//! kept only as SHA-256 digests and never logged or echoed. With no token configured the
//! API is open, as for the local demo, and start-up says so with a warning.
//!
//! The browser's `EventSource` cannot send headers, so the event stream also accepts a
//! short-lived ticket in its query string, which a token holder gets from
//! `POST /api/v1/events/ticket`; the token itself never appears in a URL.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// How long a stream ticket may be used to open the event stream.
pub const TICKET_TTL: Duration = Duration::from_secs(60);
/// Tickets outstanding at most; the oldest go first.
const MAX_TICKETS: usize = 4096;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Every `GET`, the event stream.
    Read,
    /// Also the mutating calls: uploads, rollouts and their operations.
    Operator,
}

/// One named token in the configuration.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds it; appears in logs instead of the token.
    pub name: String,
    pub role: Role,
    pub token: String,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("role", &self.role)
            .field("token", &"<redacted>")
            .finish()
    }
}

/// `[auth]` in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    pub tokens: Vec<TokenConfig>,
    /// Empty: none. Else a file of `name role token` lines (`#` starts a comment).
    pub token_file: PathBuf,
}

/// Why the tokens could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("cannot read the token file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {path} line {line}: expected `name role token` with role read or operator")]
    Line { path: PathBuf, line: usize },
    #[error("token {name:?} is shorter than 16 characters")]
    Short { name: String },
    #[error("two tokens are named {0:?}")]
    Duplicate(String),
}

/// Who called.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Caller {
    pub name: String,
    pub role: Role,
}

/// The checked tokens and the outstanding stream tickets.
#[derive(Debug)]
pub struct Access {
    tokens: Vec<([u8; 32], Caller)>,
    tickets: Mutex<HashMap<[u8; 32], (Instant, Caller)>>,
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

impl Access {
    /// Loads the configured tokens; logs a warning when there are none.
    pub fn new(config: &AuthConfig) -> Result<Self, AuthError> {
        let mut all = config.tokens.clone();
        if !config.token_file.as_os_str().is_empty() {
            all.extend(read_token_file(&config.token_file)?);
        }
        let mut tokens: Vec<([u8; 32], Caller)> = Vec::new();
        for t in all {
            if t.token.chars().count() < 16 {
                return Err(AuthError::Short { name: t.name });
            }
            if tokens.iter().any(|(_, c)| c.name == t.name) {
                return Err(AuthError::Duplicate(t.name));
            }
            let caller = Caller {
                name: t.name,
                role: t.role,
            };
            tokens.push((digest(&t.token), caller));
        }
        if tokens.is_empty() {
            tracing::warn!(
                "no API token configured ([auth] in the config): the API and dashboard are open to anyone who can reach them"
            );
        } else {
            tracing::info!(tokens = tokens.len(), "API tokens loaded");
        }
        Ok(Self {
            tokens,
            tickets: Mutex::default(),
        })
    }

    /// No token configured: everyone is an operator.
    pub fn is_open(&self) -> bool {
        self.tokens.is_empty()
    }

    /// The holder of `token`, if any.
    pub fn check(&self, token: &str) -> Option<Caller> {
        let wanted = digest(token);
        // Digests are compared, so timing says nothing about the token's bytes.
        self.tokens
            .iter()
            .find(|(d, _)| *d == wanted)
            .map(|(_, caller)| caller.clone())
    }

    /// A fresh ticket for `caller` to open the event stream with, valid for [`TICKET_TTL`].
    pub fn ticket(&self, caller: Caller, now: Instant) -> String {
        let secret: [u8; 32] = rand::random();
        let ticket = hex::encode(secret);
        let mut tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        tickets.retain(|_, (issued, _)| now.saturating_duration_since(*issued) < TICKET_TTL);
        if tickets.len() >= MAX_TICKETS {
            let oldest = tickets.iter().min_by_key(|(_, (i, _))| *i).map(|(k, _)| *k);
            if let Some(oldest) = oldest {
                tickets.remove(&oldest);
            }
        }
        tickets.insert(digest(&ticket), (now, caller));
        ticket
    }

    /// The holder of a ticket still valid at `now`.
    pub fn redeem(&self, ticket: &str, now: Instant) -> Option<Caller> {
        let tickets = self.tickets.lock().unwrap_or_else(PoisonError::into_inner);
        tickets
            .get(&digest(ticket))
            .filter(|(issued, _)| now.saturating_duration_since(*issued) < TICKET_TTL)
            .map(|(_, caller)| caller.clone())
    }
}

fn read_token_file(path: &Path) -> Result<Vec<TokenConfig>, AuthError> {
    let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut tokens = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let bad = || AuthError::Line {
            path: path.to_owned(),
            line: n + 1,
        };
        let mut words = line.split_whitespace();
        let (Some(name), Some(role), Some(token), None) =
            (words.next(), words.next(), words.next(), words.next())
        else {
            return Err(bad());
        };
        let role = match role {
            "read" => Role::Read,
            "operator" => Role::Operator,
            _ => return Err(bad()),
        };
        tokens.push(TokenConfig {
            name: name.to_owned(),
            role,
            token: token.to_owned(),
        });
    }
    Ok(tokens)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn config() -> AuthConfig {
        AuthConfig {
            tokens: vec![TokenConfig {
                name: "ci".into(),
                role: Role::Read,
                token: "read-token-0123456789".into(),
            }],
            token_file: PathBuf::new(),
        }
    }

    #[test]
    fn a_token_is_never_shown_by_debug() {
        let text = format!("{:?}", config());
        assert!(!text.contains("read-token"), "{text}");
    }

    #[test]
    fn tokens_from_a_file_join_the_configured_ones() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("tokens");
        std::fs::write(
            &file,
            "# who role token\nops operator op-token-0123456789\n",
        )
        .unwrap();
        let access = Access::new(&AuthConfig {
            token_file: file,
            ..config()
        })
        .unwrap();
        assert_eq!(
            access.check("op-token-0123456789").unwrap().role,
            Role::Operator
        );
        assert_eq!(
            access.check("read-token-0123456789").unwrap().role,
            Role::Read
        );
        assert!(access.check("nope").is_none());
    }

    #[test]
    fn a_ticket_expires() {
        let access = Access::new(&config()).unwrap();
        let caller = access.check("read-token-0123456789").unwrap();
        let now = Instant::now();
        let ticket = access.ticket(caller, now);
        assert!(access.redeem(&ticket, now).is_some());
        assert!(access.redeem(&ticket, now + TICKET_TTL).is_none());
        assert!(access.redeem("read-token-0123456789", now).is_none());
    }

    #[test]
    fn short_and_duplicate_tokens_are_refused() {
        let mut c = config();
        c.tokens[0].token = "short".into();
        assert!(matches!(Access::new(&c), Err(AuthError::Short { .. })));
        let mut c = config();
        c.tokens.push(c.tokens[0].clone());
        assert!(matches!(Access::new(&c), Err(AuthError::Duplicate(_))));
    }
}

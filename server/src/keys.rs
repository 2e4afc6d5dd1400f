//! The manifest signing key on disk: `ed25519-secret:<base64>`, mode 0600.

use std::io;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};

use botfleet_protocol::ManifestSigner;
use botfleet_protocol::manifest::KeyError;

use crate::files::{self, Replace};

/// Why the signing key could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("cannot read signing key {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("signing key {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: KeyError,
    },
    #[error("cannot write signing key {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("signing key {path} already exists; refusing to overwrite it")]
    Exists { path: PathBuf },
    #[error("the operating system gave no random bytes for a new key: {0}")]
    Random(getrandom::Error),
}

/// Loads the key at `path`.
pub fn load(path: &Path) -> Result<ManifestSigner, KeyFileError> {
    let text = std::fs::read_to_string(path).map_err(|source| KeyFileError::Read {
        path: path.to_owned(),
        source,
    })?;
    if let Ok(meta) = std::fs::metadata(path)
        && meta.permissions().mode() & 0o077 != 0
    {
        tracing::warn!(path = %path.display(), "signing key is readable by group or others; chmod 600 it");
    }
    ManifestSigner::parse(&text).map_err(|source| KeyFileError::Parse {
        path: path.to_owned(),
        source,
    })
}

/// Makes a new key and writes it to `path` (0600); an existing file is never replaced.
pub fn generate(path: &Path) -> Result<ManifestSigner, KeyFileError> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(KeyFileError::Random)?;
    let signer = ManifestSigner::from_secret(secret);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        files::create_dir(dir).map_err(|source| KeyFileError::Write {
            path: path.to_owned(),
            source,
        })?;
    }
    let text = format!("{}\n", signer.to_secret_text());
    files::write_atomic(path, text.as_bytes(), 0o600, Replace::Refuse).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyFileError::Exists {
                path: path.to_owned(),
            }
        } else {
            KeyFileError::Write {
                path: path.to_owned(),
                source,
            }
        }
    })?;
    Ok(signer)
}

/// Loads the key at `path`, generating it first when the file does not exist.
pub fn load_or_generate(path: &Path) -> Result<ManifestSigner, KeyFileError> {
    match generate_if_missing(path)? {
        Some(signer) => {
            tracing::info!(path = %path.display(), key_id = %signer.key_id(), "generated a new signing key");
            Ok(signer)
        }
        None => load(path),
    }
}

fn generate_if_missing(path: &Path) -> Result<Option<ManifestSigner>, KeyFileError> {
    if path.exists() {
        return Ok(None);
    }
    match generate(path) {
        Ok(signer) => Ok(Some(signer)),
        // Someone else made it between the check and the write: use theirs.
        Err(KeyFileError::Exists { .. }) => Ok(None),
        Err(other) => Err(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_generated_key_is_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/signing.key");
        let made = load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = load_or_generate(&path).unwrap();
        assert_eq!(made.key_id(), again.key_id());
        assert_eq!(made.public_key(), again.public_key());
    }

    #[test]
    fn generate_refuses_to_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        generate(&path).unwrap();
        assert!(matches!(generate(&path), Err(KeyFileError::Exists { .. })));
    }

    #[test]
    fn a_garbage_key_file_is_an_error_not_a_new_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k");
        std::fs::write(&path, "hello").unwrap();
        assert!(matches!(
            load_or_generate(&path),
            Err(KeyFileError::Parse { .. })
        ));
    }
}

/// How long a signed rollback order stays valid: a robot that was offline still takes it
/// when its MQTT session hands it over later that day, and a replay after that is refused.
pub const ROLLBACK_ORDER_TTL: jiff::SignedDuration = jiff::SignedDuration::from_secs(24 * 3600);

/// Why no rollback order could be signed.
#[derive(Debug, thiserror::Error)]
pub enum RollbackOrderError {
    #[error("the previous model's manifest is unreadable")]
    Manifest,
    #[error("cannot sign the rollback order: {0}")]
    Sign(#[source] serde_json::Error),
    #[error("rollback order expiry out of range: {0}")]
    Time(#[source] jiff::Error),
}

/// Signs the order for `device` to put `to` (the model it served before) back in `slot`.
pub fn rollback_order(
    signer: &ManifestSigner,
    device: &botfleet_protocol::DeviceId,
    to: &botfleet_protocol::SignedManifest,
    reason: String,
    now: jiff::Timestamp,
) -> Result<botfleet_protocol::SignedRollback, RollbackOrderError> {
    // The server signed `to` itself: its claims are what it once vouched for.
    let manifest = to.claims().ok_or(RollbackOrderError::Manifest)?;
    let order = botfleet_protocol::RollbackOrder {
        schema: botfleet_protocol::rollback::ROLLBACK_SCHEMA,
        device: device.clone(),
        slot: manifest.slot,
        to_sha256: manifest.artifact.sha256,
        to_release: manifest.release,
        reason: Some(reason),
        issued_at: now,
        expires_at: now
            .checked_add(ROLLBACK_ORDER_TTL)
            .map_err(RollbackOrderError::Time)?,
    };
    signer
        .sign_rollback(&order)
        .map_err(RollbackOrderError::Sign)
}

//! Device upload tokens: `{id}:{hex(HMAC-SHA256(device secret, "botfleet-device-token-v1:" + id))}`.
//!
//! A token names the device it was made for and is good for that device id only, so a robot
//! can write only its own samples, and a genuine token of another device is told apart from a
//! forged one (403, not 401) with one MAC. The server keeps no list of tokens: it checks the
//! MAC of the named device from the secret, in constant time.

use std::io;
use std::path::{Path, PathBuf};

use botfleet_protocol::DeviceId;
use hmac::{Hmac, KeyInit as _, Mac as _};
use sha2::Sha256;

use crate::files::{self, Replace};

/// What every token's MAC covers before the device id: a new scheme gets a new context.
pub const TOKEN_CONTEXT: &[u8] = b"botfleet-device-token-v1:";
/// Bytes of a generated secret.
const SECRET_BYTES: usize = 32;
/// The shortest secret taken from a file an operator wrote.
const MIN_SECRET_BYTES: usize = 16;

/// Why the device secret could not be loaded or made.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("cannot read the device secret {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("the device secret {path} must hold at least {MIN_SECRET_BYTES} bytes written as hex")]
    Parse { path: PathBuf },
    #[error("cannot write the device secret {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
}

/// The key every device token derives from. Its `Debug` form never shows it.
#[derive(Clone)]
pub struct DeviceSecret {
    /// The HMAC keyed once; each token clones it.
    keyed: Hmac<Sha256>,
}

impl std::fmt::Debug for DeviceSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceSecret(<redacted>)")
    }
}

impl DeviceSecret {
    /// A secret of these bytes; `None` when shorter than 16 bytes.
    pub fn from_bytes(secret: &[u8]) -> Option<Self> {
        if secret.len() < MIN_SECRET_BYTES {
            return None;
        }
        // HMAC takes a key of any length (a longer one is hashed first): this never fails.
        let keyed = Hmac::<Sha256>::new_from_slice(secret).ok()?;
        Some(Self { keyed })
    }

    fn mac(&self, device: &str) -> Hmac<Sha256> {
        let mut mac = self.keyed.clone();
        mac.update(TOKEN_CONTEXT);
        mac.update(device.as_bytes());
        mac
    }

    /// The upload token of `device` (64 lowercase hex characters). Any text has one; only
    /// a valid device id's can be used, as only those name an upload path.
    pub fn token(&self, device: &(impl AsRef<str> + ?Sized)) -> String {
        let device = device.as_ref();
        let tag = hex::encode(self.mac(device).finalize().into_bytes());
        format!("{device}:{tag}")
    }

    /// Whether `token` is `device`'s, compared in constant time.
    pub fn verify(&self, device: &DeviceId, token: &str) -> bool {
        self.holder(token).as_ref() == Some(device)
    }

    /// The device a genuine token was made for; `None` for anything else.
    pub fn holder(&self, token: &str) -> Option<DeviceId> {
        let (device, tag) = token.trim().rsplit_once(':')?;
        let tag = hex::decode(tag).ok()?;
        self.mac(device).verify_slice(&tag).ok()?;
        DeviceId::new(device).ok()
    }

    /// Reads the secret at `path` (hex).
    pub fn load(path: &Path) -> Result<Self, SecretError> {
        let text = std::fs::read_to_string(path).map_err(|source| SecretError::Read {
            path: path.to_owned(),
            source,
        })?;
        hex::decode(text.trim())
            .ok()
            .and_then(|bytes| Self::from_bytes(&bytes))
            .ok_or_else(|| SecretError::Parse {
                path: path.to_owned(),
            })
    }

    /// Reads the secret at `path`, first writing a new random one (mode 0600) when there is
    /// no file.
    pub fn load_or_generate(path: &Path) -> Result<Self, SecretError> {
        if !path.exists() {
            let write = |source| SecretError::Write {
                path: path.to_owned(),
                source,
            };
            let mut secret = [0u8; SECRET_BYTES];
            getrandom::fill(&mut secret).map_err(|e| write(io::Error::other(e)))?;
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                files::create_dir(dir).map_err(write)?;
            }
            let text = format!("{}\n", hex::encode(secret));
            match files::write_atomic(path, text.as_bytes(), 0o600, Replace::Refuse) {
                Ok(()) => tracing::info!(path = %path.display(), "generated a new device secret"),
                // Someone else made it between the check and the write: use theirs.
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(write(e)),
            }
        }
        Self::load(path)
    }
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn a_token_is_the_documented_hmac_and_good_for_its_device_only() {
        let secret = DeviceSecret::from_bytes(&[7; 32]).unwrap();
        let token = secret.token(&id("robot-1"));
        let mut mac = Hmac::<Sha256>::new_from_slice(&[7; 32]).unwrap();
        mac.update(b"botfleet-device-token-v1:robot-1");
        let tag = hex::encode(mac.finalize().into_bytes());
        assert_eq!(token, format!("robot-1:{tag}"));
        assert_eq!(secret.token("robot-1"), token);
        assert!(secret.verify(&id("robot-1"), &token));
        assert!(secret.verify(&id("robot-1"), &format!("robot-1:{}", tag.to_uppercase())));
        assert_eq!(secret.holder(&token), Some(id("robot-1")));
        assert!(!secret.verify(&id("robot-2"), &token));
        assert_eq!(
            secret.holder(&format!("robot-2:{tag}")),
            None,
            "another id, same MAC"
        );
        assert!(!secret.verify(&id("robot-1"), &token[..token.len() - 2]));
        assert!(!secret.verify(&id("robot-1"), &tag), "no device named");
        assert!(!secret.verify(&id("robot-1"), "robot-1:not hex"));
        assert!(
            !DeviceSecret::from_bytes(&[8; 32])
                .unwrap()
                .verify(&id("robot-1"), &token)
        );
        assert!(!format!("{secret:?}").contains(&tag[..8]));
        assert!(DeviceSecret::from_bytes(&[1; 15]).is_none());
    }

    #[test]
    fn a_generated_secret_is_private_and_loads_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/device-secret");
        let made = DeviceSecret::load_or_generate(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.trim().len(), 64);
        let again = DeviceSecret::load_or_generate(&path).unwrap();
        assert_eq!(made.token(&id("r")), again.token(&id("r")));
        std::fs::write(&path, "abcd\n").unwrap();
        assert!(matches!(
            DeviceSecret::load(&path),
            Err(SecretError::Parse { .. })
        ));
    }
}

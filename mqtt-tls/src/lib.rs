//! How the agent and the server authenticate to an MQTT broker: TLS with a client
//! certificate (rustls, ring) for `mqtts://` URLs, and an optional username/password.
//! Everything is read and checked once, at start, so a missing file or a bad key stops the
//! process with a clear message instead of a reconnect loop. One crate for both, so the two
//! sides of the link cannot drift apart in how they treat certificates and secrets.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rumqttc::{MqttOptions, TlsConfiguration, Transport};
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// The environment variable that may hold the MQTT password (instead of a file).
pub const PASSWORD_ENV: &str = "BOTFLEET_MQTT_PASSWORD";

/// Why the broker credentials were refused.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read the {what} file {path}")]
    Read {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the {what} file {path} holds no PEM certificate")]
    NoCertificate { what: &'static str, path: PathBuf },
    #[error("the {what} file {path} is not valid PEM")]
    Pem {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("the CA file {path} has a certificate rustls cannot use as a trust anchor")]
    TrustAnchor {
        path: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("an mqtts:// broker needs mqtt.ca_file (the CA that signed the broker's certificate)")]
    NoCa,
    #[error("mqtt.cert_file and mqtt.key_file go together: set both or neither")]
    HalfClientIdentity,
    #[error("mqtt.ca_file, cert_file and key_file need an mqtts:// broker URL")]
    TlsFilesWithoutMqtts,
    #[error("the client certificate {cert} and key {key} do not make a TLS identity")]
    ClientIdentity {
        cert: PathBuf,
        key: PathBuf,
        #[source]
        source: rustls::Error,
    },
    #[error("a password (mqtt.password_file or {PASSWORD_ENV}) needs mqtt.username")]
    PasswordWithoutUsername,
}

/// The TLS and credential settings, as configured (paths empty when unset).
#[derive(Clone)]
pub struct SecurityFiles<'a> {
    /// The broker URL is `mqtts://`.
    pub tls: bool,
    pub ca_file: &'a Path,
    pub cert_file: &'a Path,
    pub key_file: &'a Path,
    pub username: &'a str,
    pub password_file: &'a Path,
    /// The password from the environment, if any (the file wins when both are set).
    pub password_env: Option<String>,
}

impl std::fmt::Debug for SecurityFiles<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecurityFiles")
            .field("tls", &self.tls)
            .field("ca_file", &self.ca_file)
            .field("cert_file", &self.cert_file)
            .field("key_file", &self.key_file)
            .field("username", &self.username)
            .field("password_file", &self.password_file)
            .field("password_env", &self.password_env.as_ref().map(|_| "***"))
            .finish()
    }
}

/// Loaded TLS configuration and credentials, applied to the MQTT options.
#[derive(Clone, Default)]
pub struct MqttSecurity {
    tls: Option<Arc<rustls::ClientConfig>>,
    username: Option<String>,
    password: String,
}

impl std::fmt::Debug for MqttSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The password never reaches a log line.
        f.debug_struct("MqttSecurity")
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .field(
                "password",
                &if self.password.is_empty() { "" } else { "***" },
            )
            .finish()
    }
}

impl MqttSecurity {
    /// Reads and checks every file named in `files`.
    pub fn load(files: SecurityFiles<'_>) -> Result<Self, TlsError> {
        let set = |p: &Path| !p.as_os_str().is_empty();
        let tls = if files.tls {
            Some(Arc::new(client_config(&files)?))
        } else if set(files.ca_file) || set(files.cert_file) || set(files.key_file) {
            return Err(TlsError::TlsFilesWithoutMqtts);
        } else {
            None
        };
        let password = if set(files.password_file) {
            let text = read("password", files.password_file)?;
            String::from_utf8_lossy(&text)
                .trim_end_matches(['\r', '\n'])
                .to_owned()
        } else {
            files.password_env.unwrap_or_default()
        };
        let username = Some(files.username.to_owned()).filter(|u| !u.is_empty());
        if username.is_none() && !password.is_empty() {
            return Err(TlsError::PasswordWithoutUsername);
        }
        Ok(Self {
            tls,
            username,
            password,
        })
    }

    /// Whether the connection uses TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The rustls configuration, for clients other than the session's own (MQTT 5 tools).
    pub fn client_config(&self) -> Option<Arc<rustls::ClientConfig>> {
        self.tls.clone()
    }

    /// Sets the transport and the credentials on `options`.
    pub fn apply(&self, options: &mut MqttOptions) {
        if let Some(config) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                config.clone(),
            )));
        }
        if let Some(username) = &self.username {
            options.set_credentials(username.clone(), self.password.clone());
        }
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn certificates(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(what, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            what,
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn client_config(files: &SecurityFiles<'_>) -> Result<rustls::ClientConfig, TlsError> {
    if files.ca_file.as_os_str().is_empty() {
        return Err(TlsError::NoCa);
    }
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates("CA", files.ca_file)? {
        roots.add(cert).map_err(|source| TlsError::TrustAnchor {
            path: files.ca_file.to_owned(),
            source,
        })?;
    }
    // The ring provider explicitly: this runs before any process-wide default is installed.
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::TrustAnchor {
            path: files.ca_file.to_owned(),
            source,
        })?
        .with_root_certificates(roots);
    match (
        files.cert_file.as_os_str().is_empty(),
        files.key_file.as_os_str().is_empty(),
    ) {
        (true, true) => Ok(builder.with_no_client_auth()),
        (false, false) => {
            let chain = certificates("client certificate", files.cert_file)?;
            let pem = read("client key", files.key_file)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
                what: "client key",
                path: files.key_file.to_owned(),
                source,
            })?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|source| TlsError::ClientIdentity {
                    cert: files.cert_file.to_owned(),
                    key: files.key_file.to_owned(),
                    source,
                })
        }
        _ => Err(TlsError::HalfClientIdentity),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn files<'a>(tls: bool, ca: &'a Path, cert: &'a Path, key: &'a Path) -> SecurityFiles<'a> {
        SecurityFiles {
            tls,
            ca_file: ca,
            cert_file: cert,
            key_file: key,
            username: "",
            password_file: Path::new(""),
            password_env: None,
        }
    }

    #[test]
    fn plain_mqtt_without_files_needs_nothing() {
        let none = Path::new("");
        let security = MqttSecurity::load(files(false, none, none, none)).unwrap();
        assert!(!security.is_tls());
    }

    #[test]
    fn configuration_mistakes_are_named() {
        let none = Path::new("");
        let missing = Path::new("/nonexistent/ca.crt");
        assert!(matches!(
            MqttSecurity::load(files(true, none, none, none)),
            Err(TlsError::NoCa)
        ));
        assert!(matches!(
            MqttSecurity::load(files(false, missing, none, none)),
            Err(TlsError::TlsFilesWithoutMqtts)
        ));
        let err = MqttSecurity::load(files(true, missing, none, none)).unwrap_err();
        assert!(matches!(err, TlsError::Read { what: "CA", .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.crt"));
        let dir = tempfile::tempdir().unwrap();
        let junk = dir.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        assert!(matches!(
            MqttSecurity::load(files(true, &junk, none, none)),
            Err(TlsError::NoCertificate { .. })
        ));
    }

    #[test]
    fn a_password_is_never_printed_and_needs_a_username() {
        let none = Path::new("");
        let mut f = files(false, none, none, none);
        f.password_env = Some("hunter2".into());
        assert!(matches!(
            MqttSecurity::load(f.clone()),
            Err(TlsError::PasswordWithoutUsername)
        ));
        f.username = "robot-1";
        let security = MqttSecurity::load(f).unwrap();
        assert!(!format!("{security:?}").contains("hunter2"));
    }
}

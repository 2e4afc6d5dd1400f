//! The server's configuration: a TOML file whose every key has a documented default
//! (`botfleet-server.toml`, printed by `botfleet-server print-config`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botfleet_protocol::Topics;
use botfleet_protocol::engine::EnginePolicy;
use botfleet_protocol::topics::{DEFAULT_PREFIX, PrefixError};
use serde::{Deserialize, Serialize};

/// The default configuration, commented. `Config::default()` is exactly this file.
pub const DEFAULT_TOML: &str = include_str!("../botfleet-server.toml");

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path} is not valid")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<toml::de::Error>,
    },
    #[error("topic_prefix is not valid")]
    TopicPrefix(#[from] PrefixError),
    #[error("public_url {0:?} must start with http:// or https://")]
    PublicUrl(String),
    #[error("mqtt.url {url:?} is not valid: {reason}")]
    MqttUrl { url: String, reason: &'static str },
    #[error("mqtt.client_id must not be empty")]
    ClientId,
    #[error("mqtt.keep_alive_s must be between 5 and 3600, not {0}")]
    KeepAlive(u64),
    #[error("mqtt.connect_timeout_s must be between 1 and 3600, not {0}")]
    ConnectTimeout(u64),
    #[error("max_model_bytes must be at least 1")]
    MaxModelBytes,
    #[error("intake.engines: {0}")]
    IntakeEngines(String),
    #[error("mqtt TLS or credentials")]
    Tls(#[from] crate::tls::TlsError),
    #[error("data.store_url {url:?} is not valid: {reason}")]
    StoreUrl { url: String, reason: &'static str },
    #[error("data.max_sample_bytes must be between 1 and {MAX_SAMPLE_BYTES_LIMIT}, not {0}")]
    MaxSampleBytes(u64),
    #[error(
        "data.max_upload_buffer_bytes ({buffer}) must be at least data.max_sample_bytes ({sample}) and at most {MAX_UPLOAD_BUFFER_LIMIT}"
    )]
    UploadBuffer { buffer: u64, sample: u64 },
}

/// The largest `data.max_sample_bytes`: an upload is held in memory while it is checked.
pub const MAX_SAMPLE_BYTES_LIMIT: u64 = 256 * 1024 * 1024;
/// The largest `data.max_upload_buffer_bytes`.
pub const MAX_UPLOAD_BUFFER_LIMIT: u64 = 64 * 1024 * 1024 * 1024;

/// The whole server configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where models, artifacts, desired documents and the signing key live.
    pub data_dir: PathBuf,
    /// Address of the REST API; port 0 picks a free port.
    pub http_listen: SocketAddr,
    /// Base URL agents download artifacts from; empty: `http://{bound http address}`.
    pub public_url: String,
    /// Prefix of every MQTT topic.
    pub topic_prefix: String,
    /// Largest model upload accepted, in bytes.
    pub max_model_bytes: u64,
    pub mqtt: MqttConfig,
    pub signing: SigningConfig,
    pub metrics: MetricsConfig,
    pub intake: IntakeConfig,
    /// API tokens and roles; none: the API is open.
    pub auth: crate::auth::AuthConfig,
    /// Captured samples: where they are stored, how large one may be, the device secret.
    pub data: DataConfig,
}

/// `[data]`: the sample store and the robots' upload tokens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// Empty: `{data_dir}/samples` on the local disk; else `s3://bucket[/prefix]`.
    pub store_url: String,
    /// An S3-compatible server instead of AWS (`http://127.0.0.1:9000`); empty: AWS.
    pub s3_endpoint: String,
    /// Empty: `AWS_REGION` / `AWS_DEFAULT_REGION`, else `us-east-1`.
    pub s3_region: String,
    /// Allow a plain `http://` endpoint.
    pub s3_allow_http: bool,
    /// A file of `AWS_ACCESS_KEY_ID=…` / `AWS_SECRET_ACCESS_KEY=…` / `AWS_SESSION_TOKEN=…`
    /// lines, read over the environment's; empty: the environment only.
    pub s3_credentials_file: PathBuf,
    /// Largest sample file accepted, in bytes.
    pub max_sample_bytes: u64,
    /// Bytes of uploads held in memory at once, all robots together (each is checked whole
    /// before it is stored); an upload that would pass it gets 429 and is sent again later.
    pub max_upload_buffer_bytes: u64,
    /// The secret the device upload tokens derive from. Empty: `{data_dir}/device-secret`.
    pub device_secret_file: PathBuf,
}

impl Default for DataConfig {
    fn default() -> Self {
        Self {
            store_url: String::new(),
            s3_endpoint: String::new(),
            s3_region: String::new(),
            s3_allow_http: false,
            s3_credentials_file: PathBuf::new(),
            max_sample_bytes: 8 * 1024 * 1024,
            max_upload_buffer_bytes: 256 * 1024 * 1024,
            device_secret_file: PathBuf::new(),
        }
    }
}

/// Where sample blobs (and data set manifests) are kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreTarget {
    /// A directory on the local disk.
    Local(PathBuf),
    /// An S3 bucket, with an optional key prefix (no leading or trailing `/`).
    S3 { bucket: String, prefix: String },
}

/// Parses `data.store_url`: empty for the local `dir`, else `s3://bucket[/prefix]`.
pub fn parse_store_url(url: &str, dir: &Path) -> Result<StoreTarget, ConfigError> {
    let bad = |reason| ConfigError::StoreUrl {
        url: url.to_owned(),
        reason,
    };
    let url = url.trim();
    if url.is_empty() {
        return Ok(StoreTarget::Local(dir.to_owned()));
    }
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| bad("only s3://bucket/prefix is supported (empty: the local disk)"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    let bucket_ok = (3..=63).contains(&bucket.len())
        && bucket
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !bucket_ok {
        return Err(bad(
            "the bucket must be 3 to 63 characters of a-z, 0-9, '-' and '.'",
        ));
    }
    let prefix = prefix.trim_matches('/');
    if prefix
        .split('/')
        .any(|part| matches!(part, "." | "..") || (part.is_empty() && !prefix.is_empty()))
        || prefix.contains(['?', '#', '\\'])
    {
        return Err(bad("the prefix must be plain path segments"));
    }
    Ok(StoreTarget::S3 {
        bucket: bucket.to_owned(),
        prefix: prefix.to_owned(),
    })
}

/// What the server puts in the manifests of uploads that leave it open.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeConfig {
    /// The engine policy of an upload whose metadata has no `engines`: `"auto"`, or a
    /// table in the metadata's form (`{ candidates = [...], tolerance = { fp16 = 0.05 } }`).
    #[serde(with = "engine_setting")]
    pub engines: EnginePolicy,
}

impl Default for IntakeConfig {
    fn default() -> Self {
        Self {
            engines: EnginePolicy::auto(),
        }
    }
}

/// `intake.engines`: the word `"auto"` for [`EnginePolicy::auto`], else the policy itself.
mod engine_setting {
    use botfleet_protocol::engine::EnginePolicy;
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    pub fn serialize<S: Serializer>(policy: &EnginePolicy, s: S) -> Result<S::Ok, S::Error> {
        if policy == &EnginePolicy::auto() {
            s.serialize_str("auto")
        } else {
            policy.serialize(s)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<EnginePolicy, D::Error> {
        // Through a JSON value, so a bad table is explained as the upload metadata's is.
        let value = serde_json::Value::deserialize(d)?;
        match value.as_str() {
            Some("auto") => Ok(EnginePolicy::auto()),
            Some(word) => Err(serde::de::Error::custom(format!(
                "must be \"auto\" or a table like {{ candidates = [\"onnxruntime-cuda\", \"tract\"] }}, not {word:?}"
            ))),
            None => crate::intake::engine_policy(value).map_err(serde::de::Error::custom),
        }
    }
}

/// Cardinality limits of the per-device series on `GET /metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Online devices that get per-device series; the rest are counted as omitted.
    pub max_devices: usize,
    /// Temperature sensors per device (the first by name).
    pub max_sensors_per_device: usize,
    /// GPUs per device.
    pub max_gpus_per_device: usize,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            max_devices: 500,
            max_sensors_per_device: 8,
            max_gpus_per_device: 8,
        }
    }
}

/// How the server reaches MQTT.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// Empty: run the embedded broker; else `mqtt://host:port` of an external one.
    pub url: String,
    /// Listen address of the embedded broker; port 0 picks a free port.
    pub embedded_listen: SocketAddr,
    /// Most devices one rollout may command through the embedded broker (measured to
    /// carry 1,000 and not 10,000); larger ones are refused, pointing at an external broker.
    pub embedded_max_rollout_devices: usize,
    /// The server's stable MQTT client id.
    pub client_id: String,
    pub keep_alive_s: u64,
    /// How long start-up waits for CONNACK and SUBACK.
    pub connect_timeout_s: u64,
    /// `mqtts://` only: the CA that signed the broker's certificate.
    pub ca_file: PathBuf,
    /// The control plane's client certificate (CN `botfleet-server` with the shipped
    /// Mosquitto ACL) and its key, PEM.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub username: String,
    /// File holding the password (else `BOTFLEET_MQTT_PASSWORD`); never logged.
    pub password_file: PathBuf,
}

/// The manifest signing key.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SigningConfig {
    /// Empty: `{data_dir}/signing.key`.
    pub key_file: PathBuf,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("/var/lib/botfleet-server"),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            public_url: String::new(),
            topic_prefix: DEFAULT_PREFIX.to_owned(),
            max_model_bytes: 512 * 1024 * 1024,
            mqtt: MqttConfig::default(),
            signing: SigningConfig::default(),
            metrics: MetricsConfig::default(),
            intake: IntakeConfig::default(),
            auth: crate::auth::AuthConfig::default(),
            data: DataConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            embedded_listen: SocketAddr::from(([127, 0, 0, 1], 1883)),
            embedded_max_rollout_devices: 1000,
            client_id: "botfleet-server".to_owned(),
            keep_alive_s: 30,
            connect_timeout_s: 30,
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            username: String::new(),
            password_file: PathBuf::new(),
        }
    }
}

/// Where the MQTT broker is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BrokerTarget {
    /// Run rumqttd in-process, listening here.
    Embedded(SocketAddr),
    /// Connect to an external broker.
    External(BrokerAddr),
}

/// Host and port of a broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    /// The address as agents are told it: `mqtt://host:port`.
    pub fn url(&self) -> String {
        if self.host.contains(':') {
            format!("mqtt://[{}]:{}", self.host, self.port)
        } else {
            format!("mqtt://{}:{}", self.host, self.port)
        }
    }
}

/// A configuration whose values were checked, with defaults resolved.
#[derive(Debug, Clone)]
pub struct Settings {
    pub config: Config,
    pub topics: Topics,
    pub broker: BrokerTarget,
    pub key_file: PathBuf,
    /// `None`: derive from the bound HTTP address.
    pub public_url: Option<String>,
    pub keep_alive: Duration,
    pub connect_timeout: Duration,
    /// TLS and credentials for an external broker, loaded at validation.
    pub mqtt_security: crate::tls::MqttSecurity,
    /// Where samples are stored.
    pub store: StoreTarget,
    /// The device secret's file.
    pub device_secret_file: PathBuf,
}

impl Config {
    /// Parses TOML text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|source| ConfigError::Parse {
            path: origin.to_owned(),
            source: Box::new(source),
        })
    }

    /// Reads and parses a config file.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// Checks every value and resolves the defaults that depend on others.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        let topics = Topics::new(self.topic_prefix.clone())?;
        let broker = if self.mqtt.url.trim().is_empty() {
            BrokerTarget::Embedded(self.mqtt.embedded_listen)
        } else {
            BrokerTarget::External(parse_mqtt_url(self.mqtt.url.trim())?)
        };
        let mqtt_security = crate::tls::MqttSecurity::load(crate::tls::SecurityFiles {
            tls: self.mqtt.url.trim().starts_with("mqtts://"),
            ca_file: &self.mqtt.ca_file,
            cert_file: &self.mqtt.cert_file,
            key_file: &self.mqtt.key_file,
            username: &self.mqtt.username,
            password_file: &self.mqtt.password_file,
            password_env: std::env::var(crate::tls::PASSWORD_ENV).ok(),
        })?;
        if self.mqtt.client_id.trim().is_empty() {
            return Err(ConfigError::ClientId);
        }
        if !(5..=3600).contains(&self.mqtt.keep_alive_s) {
            return Err(ConfigError::KeepAlive(self.mqtt.keep_alive_s));
        }
        if !(1..=3600).contains(&self.mqtt.connect_timeout_s) {
            return Err(ConfigError::ConnectTimeout(self.mqtt.connect_timeout_s));
        }
        if self.max_model_bytes == 0 {
            return Err(ConfigError::MaxModelBytes);
        }
        crate::intake::check_engine_policy(&self.intake.engines)
            .map_err(ConfigError::IntakeEngines)?;
        let public_url = match self.public_url.trim() {
            "" => None,
            url if url.starts_with("http://") || url.starts_with("https://") => {
                Some(url.trim_end_matches('/').to_owned())
            }
            url => return Err(ConfigError::PublicUrl(url.to_owned())),
        };
        let key_file = if self.signing.key_file.as_os_str().is_empty() {
            self.data_dir.join("signing.key")
        } else {
            self.signing.key_file.clone()
        };
        let store = parse_store_url(&self.data.store_url, &self.data_dir.join("samples"))?;
        if !(1..=MAX_SAMPLE_BYTES_LIMIT).contains(&self.data.max_sample_bytes) {
            return Err(ConfigError::MaxSampleBytes(self.data.max_sample_bytes));
        }
        let (buffer, sample) = (
            self.data.max_upload_buffer_bytes,
            self.data.max_sample_bytes,
        );
        if buffer < sample || buffer > MAX_UPLOAD_BUFFER_LIMIT {
            return Err(ConfigError::UploadBuffer { buffer, sample });
        }
        Ok(Settings {
            config: self.clone(),
            topics,
            broker,
            key_file,
            public_url,
            keep_alive: Duration::from_secs(self.mqtt.keep_alive_s),
            connect_timeout: Duration::from_secs(self.mqtt.connect_timeout_s),
            mqtt_security,
            store,
            device_secret_file: self.device_secret_file(),
        })
    }

    /// The device secret's file: `data.device_secret_file`, else `{data_dir}/device-secret`.
    pub fn device_secret_file(&self) -> PathBuf {
        if self.data.device_secret_file.as_os_str().is_empty() {
            self.data_dir.join("device-secret")
        } else {
            self.data.device_secret_file.clone()
        }
    }
}

/// Parses `mqtt://host[:port]` (port 1883 when absent; `tcp://` is accepted as a synonym)
/// or `mqtts://host[:port]` (TLS, port 8883 when absent).
pub fn parse_mqtt_url(url: &str) -> Result<BrokerAddr, ConfigError> {
    let bad = |reason| ConfigError::MqttUrl {
        url: url.to_owned(),
        reason,
    };
    let (rest, default_port) = match url.strip_prefix("mqtts://") {
        Some(rest) => (rest, 8883),
        None => (
            url.strip_prefix("mqtt://")
                .or_else(|| url.strip_prefix("tcp://"))
                .ok_or_else(|| bad("only mqtt://host:port or mqtts://host:port is supported"))?,
            1883,
        ),
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return Err(bad(
            "it must be mqtt://host:port, without path, user or query",
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        match after {
            "" => (host, None),
            p => (
                host,
                Some(p.strip_prefix(':').ok_or_else(|| bad("junk after ']'"))?),
            ),
        }
    } else {
        match rest.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    let port = match port {
        None => default_port,
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p != 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
    };
    Ok(BrokerAddr {
        host: host.to_owned(),
        port,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_embedded_default_file_is_the_default_config() {
        let parsed = Config::from_toml(DEFAULT_TOML, Path::new("botfleet-server.toml")).unwrap();
        assert_eq!(parsed, Config::default());
        parsed.validate().unwrap();
    }

    #[test]
    fn an_empty_file_is_the_default_config() {
        assert_eq!(
            Config::from_toml("", Path::new("x")).unwrap(),
            Config::default()
        );
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = Config::from_toml("[mqtt]\nurll = \"x\"\n", Path::new("x")).unwrap_err();
        assert!(matches!(err, ConfigError::Parse { .. }), "{err:?}");
    }

    #[test]
    fn intake_engines_is_auto_by_default_or_a_policy_table() {
        assert_eq!(Config::default().intake.engines, EnginePolicy::auto());
        let text = "[intake]\nengines = { candidates = [\"onnxruntime-cuda\", \"tract\"], tolerance = { fp16 = 0.05 } }\n";
        let config = Config::from_toml(text, Path::new("x")).unwrap();
        let policy = &config.intake.engines;
        assert_eq!(
            policy.candidates,
            botfleet_protocol::engine::Candidates::List(vec![
                botfleet_protocol::engine::EngineKind::OnnxruntimeCuda,
                botfleet_protocol::engine::EngineKind::Tract,
            ])
        );
        assert_eq!(
            policy.tolerance[&botfleet_protocol::engine::Precision::Fp16],
            0.05
        );
        config.validate().unwrap();
        for bad in [
            "[intake]\nengines = \"fastest\"\n",
            "[intake]\nengines = { candidates = [\"tensorflow\"] }\n",
            "[intake]\nengines = { candidates = \"auto\", tolerance = { fp16 = -1.0 } }\n",
        ] {
            let err = Config::from_toml(bad, Path::new("x")).unwrap_err();
            assert!(matches!(err, ConfigError::Parse { .. }), "{bad}: {err:?}");
        }
        let mut built = Config::default();
        built.intake.engines = EnginePolicy {
            candidates: botfleet_protocol::engine::Candidates::List(vec![
                botfleet_protocol::engine::EngineKind::OnnxruntimeTensorrtFp16,
            ]),
            tolerance: Default::default(),
        };
        assert!(matches!(
            built.validate(),
            Err(ConfigError::IntakeEngines(_))
        ));
    }

    #[test]
    fn the_key_file_defaults_to_the_data_dir() {
        let config = Config {
            data_dir: "/srv/bf".into(),
            ..Config::default()
        };
        assert_eq!(
            config.validate().unwrap().key_file,
            Path::new("/srv/bf/signing.key")
        );
    }

    #[test]
    fn the_sample_store_is_local_by_default_or_an_s3_bucket() {
        let dir = Path::new("/srv/bf/samples");
        assert_eq!(
            parse_store_url("", dir).unwrap(),
            StoreTarget::Local(dir.to_owned())
        );
        assert_eq!(
            parse_store_url("s3://fleet-data/botfleet/samples/", dir).unwrap(),
            StoreTarget::S3 {
                bucket: "fleet-data".into(),
                prefix: "botfleet/samples".into()
            }
        );
        assert_eq!(
            parse_store_url("s3://fleet-data", dir).unwrap(),
            StoreTarget::S3 {
                bucket: "fleet-data".into(),
                prefix: String::new()
            }
        );
        for bad in [
            "file:///tmp",
            "s3://",
            "s3://Bucket",
            "s3://ab",
            "s3://b-1/a/../c",
            "s3://b-1/a//c",
        ] {
            assert!(
                matches!(parse_store_url(bad, dir), Err(ConfigError::StoreUrl { .. })),
                "{bad}"
            );
        }
        let config = Config {
            data_dir: "/srv/bf".into(),
            ..Config::default()
        };
        let settings = config.validate().unwrap();
        assert_eq!(settings.store, StoreTarget::Local("/srv/bf/samples".into()));
        assert_eq!(
            settings.device_secret_file,
            Path::new("/srv/bf/device-secret")
        );
        let mut config = Config::default();
        config.data.max_sample_bytes = 0;
        assert!(matches!(
            config.validate(),
            Err(ConfigError::MaxSampleBytes(0))
        ));
        let mut config = Config::default();
        config.data.max_upload_buffer_bytes = config.data.max_sample_bytes - 1;
        let err = config.validate().unwrap_err();
        assert!(
            err.to_string().contains("at least data.max_sample_bytes"),
            "{err}"
        );
    }

    #[test]
    fn mqtt_urls_parse_with_and_without_port() {
        let ok = |s: &str| parse_mqtt_url(s).unwrap();
        assert_eq!(
            ok("mqtt://broker.lan:1884"),
            BrokerAddr {
                host: "broker.lan".into(),
                port: 1884
            }
        );
        assert_eq!(ok("mqtt://10.0.0.2").port, 1883);
        assert_eq!(ok("tcp://10.0.0.2:1883/").host, "10.0.0.2");
        assert_eq!(ok("mqtt://[::1]:1999").host, "::1");
        assert_eq!(ok("mqtt://[::1]:1999").url(), "mqtt://[::1]:1999");
        for bad in [
            "http://x:1",
            "mqtt://",
            "mqtt://x:0",
            "mqtt://x:70000",
            "mqtt://x:1/a",
            "mqtt://u@x:1",
            "x:1883",
        ] {
            assert!(parse_mqtt_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn bad_values_are_refused_by_validate() {
        let with = |edit: fn(&mut Config)| {
            let mut c = Config::default();
            edit(&mut c);
            c.validate()
        };
        assert!(matches!(
            with(|c| c.public_url = "ftp://x".into()),
            Err(ConfigError::PublicUrl(_))
        ));
        assert!(matches!(
            with(|c| c.topic_prefix = "a/#".into()),
            Err(ConfigError::TopicPrefix(_))
        ));
        assert!(matches!(
            with(|c| c.mqtt.keep_alive_s = 0),
            Err(ConfigError::KeepAlive(0))
        ));
        assert!(matches!(
            with(|c| c.mqtt.url = "mqtts://x".into()),
            Err(ConfigError::Tls(_))
        ));
        assert_eq!(parse_mqtt_url("mqtts://x").unwrap().port, 8883);
        let ok = with(|c| c.public_url = "https://models.example/".into()).unwrap();
        assert_eq!(ok.public_url.as_deref(), Some("https://models.example"));
    }
}

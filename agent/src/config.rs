//! Agent configuration: the embedded default file, a TOML file, environment and flags.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use botfleet_protocol::{DeviceId, Topics, TrustedKeys};
use serde::{Deserialize, Serialize};

/// The documented default configuration (`botfleet-agent --print-config`).
pub const DEFAULT_CONFIG: &str = include_str!("../botfleet-agent.toml");

/// Why the configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    Parse {
        path: PathBuf,
        source: Box<toml::de::Error>,
    },
    #[error("device_id is not set (config file, BOTFLEET_DEVICE_ID or --device-id)")]
    NoDeviceId,
    #[error("device_id: {0}")]
    DeviceId(#[from] botfleet_protocol::IdError),
    #[error("trusted_keys is empty: the agent would accept no model")]
    NoTrustedKeys,
    #[error("trust_threshold {threshold} can never be met with {keys} trusted key(s)")]
    Threshold { threshold: usize, keys: usize },
    #[error("trusted_keys: {0}")]
    TrustedKey(#[from] botfleet_protocol::manifest::KeyError),
    #[error("topic_prefix: {0}")]
    Prefix(#[from] botfleet_protocol::topics::PrefixError),
    #[error("mqtt.url {url:?}: {message}")]
    MqttUrl { url: String, message: String },
    #[error("{key} must be greater than zero")]
    Zero { key: &'static str },
    #[error("mqtt: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("{key}: {message}")]
    Invalid { key: String, message: String },
}

/// The agent's configuration as written in TOML.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub device_id: String,
    pub data_dir: PathBuf,
    pub topic_prefix: String,
    pub server_url: String,
    pub trusted_keys: Vec<String>,
    /// How many distinct trusted keys must sign a manifest.
    pub trust_threshold: usize,
    pub telemetry_interval_s: u64,
    pub mqtt: MqttConfig,
    pub inference: InferenceConfig,
    pub download: DownloadConfig,
    pub telemetry: TelemetryConfig,
    pub gate: GateConfig,
    pub engine: EngineConfig,
    pub labels: BTreeMap<String, String>,
    pub k3s: K3sConfig,
    pub holds: HoldsConfig,
    pub guards: GuardsConfig,
    pub capture: CaptureConfig,
    pub upload: UploadConfig,
}

pub use crate::capture::settings::{CaptureConfig, CaptureSlotConfig, UploadConfig};

/// When a robot is in no state to benchmark a new model (`crate::guards`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GuardsConfig {
    /// No gate while a thermal zone is at or over this (°C; 0: off).
    pub max_temp_c: f32,
    /// No gate while a battery that is not charging is under this (%; 0: off).
    pub min_battery_percent: u8,
    /// Seconds between looks while a guard holds the gate back.
    pub recheck_s: u64,
}

impl Default for GuardsConfig {
    fn default() -> Self {
        Self {
            max_temp_c: 85.0,
            min_battery_percent: 20,
            recheck_s: 30,
        }
    }
}

/// Holds the robot's own software places on swaps (the local API `/v1/holds`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HoldsConfig {
    /// The longest lease a hold may ask for; the holder renews it before it ends, so a
    /// holder that died releases its hold within this many seconds.
    pub max_ttl_s: u64,
}

impl Default for HoldsConfig {
    fn default() -> Self {
        Self { max_ttl_s: 300 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct K3sConfig {
    pub root: PathBuf,
    pub unit: String,
    pub server_url: String,
    pub label_prefix: String,
    pub taint: String,
    pub join_timeout_s: u64,
}

impl Default for K3sConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            unit: "k3s-agent.service".to_owned(),
            server_url: String::new(),
            label_prefix: "botfleet.io".to_owned(),
            taint: "edge=true:NoSchedule".to_owned(),
            join_timeout_s: 180,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    pub url: String,
    pub keep_alive_s: u64,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    /// CA that signed the broker's certificate (`mqtts://` only).
    pub ca_file: PathBuf,
    /// This robot's client certificate (CN = device id) and its key, PEM.
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub username: String,
    /// File holding the password (else `BOTFLEET_MQTT_PASSWORD`); never logged.
    pub password_file: PathBuf,
    /// Bounds of the on-disk outbox of events and status waiting for the broker's PUBACK.
    pub outbox_max_entries: usize,
    pub outbox_max_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InferenceConfig {
    pub listen: SocketAddr,
    /// Also serve the same API on this Unix socket (empty: not), for clients on the robot
    /// that want to skip TCP: created mode 0660, so the agent's group may connect.
    pub unix_socket: PathBuf,
    pub max_request_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    pub stall_timeout_s: u64,
    pub total_timeout_s: u64,
    pub attempts: u32,
    pub retry_initial_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GateConfig {
    /// The binary run as `PROGRAM __gate` for the benchmark child; empty: this executable.
    pub program: PathBuf,
    pub memory_limit_mb: u64,
    pub timeout_s: u64,
    /// Seconds a new model is watched after its swap (0: not at all).
    pub health_window_s: u64,
}

impl Default for GateConfig {
    fn default() -> Self {
        Self {
            program: PathBuf::new(),
            memory_limit_mb: 4096,
            timeout_s: 300,
            health_window_s: 60,
        }
    }
}

/// Inference engines beyond tract (`[engine.onnxruntime]`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EngineConfig {
    pub onnxruntime: botfleet_engine::OnnxRuntimeSettings,
}

/// Where device facts come from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// Root under which sysfs, /proc/device-tree and /etc are read (tests point it at a
    /// fixture tree).
    pub root: PathBuf,
    /// Ask NVML (libnvidia-ml, loaded at run time) for discrete GPU figures.
    pub nvml: bool,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            root: PathBuf::from("/"),
            nvml: true,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            device_id: String::new(),
            data_dir: PathBuf::from("/var/lib/botfleet-agent"),
            topic_prefix: botfleet_protocol::topics::DEFAULT_PREFIX.to_owned(),
            server_url: String::new(),
            trusted_keys: Vec::new(),
            trust_threshold: 1,
            telemetry_interval_s: 10,
            mqtt: MqttConfig::default(),
            inference: InferenceConfig::default(),
            download: DownloadConfig::default(),
            telemetry: TelemetryConfig::default(),
            gate: GateConfig::default(),
            engine: EngineConfig::default(),
            labels: BTreeMap::new(),
            k3s: K3sConfig::default(),
            holds: HoldsConfig::default(),
            guards: GuardsConfig::default(),
            capture: CaptureConfig::default(),
            upload: UploadConfig::default(),
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            url: "mqtt://127.0.0.1:1883".to_owned(),
            keep_alive_s: 30,
            backoff_initial_ms: 1_000,
            backoff_max_ms: 128_000,
            ca_file: PathBuf::new(),
            cert_file: PathBuf::new(),
            key_file: PathBuf::new(),
            username: String::new(),
            password_file: PathBuf::new(),
            outbox_max_entries: 1_000,
            outbox_max_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8000)),
            unix_socket: PathBuf::new(),
            max_request_bytes: 64 * 1024 * 1024,
        }
    }
}

impl Default for DownloadConfig {
    fn default() -> Self {
        Self {
            stall_timeout_s: 30,
            total_timeout_s: 900,
            attempts: 8,
            retry_initial_ms: 1_000,
        }
    }
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })
    }

    /// Checks everything once, at start, and returns the typed form the agent runs on.
    pub fn validate(&self) -> Result<Settings, ConfigError> {
        if self.device_id.is_empty() {
            return Err(ConfigError::NoDeviceId);
        }
        let device_id = DeviceId::new(self.device_id.clone())?;
        if self.trusted_keys.is_empty() {
            return Err(ConfigError::NoTrustedKeys);
        }
        let trusted = TrustedKeys::parse(self.trusted_keys.iter().map(String::as_str))?
            .with_threshold(self.trust_threshold);
        if self.trust_threshold > self.trusted_keys.len() {
            return Err(ConfigError::Threshold {
                threshold: self.trust_threshold,
                keys: self.trusted_keys.len(),
            });
        }
        let topics = Topics::new(self.topic_prefix.clone())?;
        let broker = BrokerAddr::parse(&self.mqtt.url)?;
        let mqtt_security = crate::tls::MqttSecurity::load(crate::tls::SecurityFiles {
            tls: BrokerAddr::is_tls(&self.mqtt.url),
            ca_file: &self.mqtt.ca_file,
            cert_file: &self.mqtt.cert_file,
            key_file: &self.mqtt.key_file,
            username: &self.mqtt.username,
            password_file: &self.mqtt.password_file,
            password_env: std::env::var(crate::tls::PASSWORD_ENV).ok(),
        })?;
        for (key, value) in [
            ("telemetry_interval_s", self.telemetry_interval_s),
            ("mqtt.keep_alive_s", self.mqtt.keep_alive_s),
            ("mqtt.backoff_initial_ms", self.mqtt.backoff_initial_ms),
            ("download.stall_timeout_s", self.download.stall_timeout_s),
            ("download.total_timeout_s", self.download.total_timeout_s),
            ("gate.memory_limit_mb", self.gate.memory_limit_mb),
            ("gate.timeout_s", self.gate.timeout_s),
        ] {
            if value == 0 {
                return Err(ConfigError::Zero { key });
            }
        }
        let data =
            crate::capture::settings::validate(&self.capture, &self.upload, &self.server_url)?;
        Ok(Settings {
            device_id,
            trusted,
            topics,
            broker,
            mqtt_security,
            data,
            config: self.clone(),
        })
    }
}

/// Host and port of the MQTT broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddr {
    pub host: String,
    pub port: u16,
}

impl BrokerAddr {
    pub fn parse(url: &str) -> Result<Self, ConfigError> {
        let err = |message: &str| ConfigError::MqttUrl {
            url: url.to_owned(),
            message: message.to_owned(),
        };
        let parsed = reqwest::Url::parse(url).map_err(|e| err(&e.to_string()))?;
        let default_port = match parsed.scheme() {
            "mqtt" => 1883,
            "mqtts" => 8883,
            _ => return Err(err("scheme must be mqtt:// or mqtts://")),
        };
        let host = parsed
            .host_str()
            .ok_or_else(|| err("no host"))?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Self {
            host,
            port: parsed.port().unwrap_or(default_port),
        })
    }

    /// `mqtts://`: TLS (see `crate::tls`).
    pub fn is_tls(url: &str) -> bool {
        url.trim()
            .get(..8)
            .is_some_and(|s| s.eq_ignore_ascii_case("mqtts://"))
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub device_id: DeviceId,
    pub trusted: TrustedKeys,
    pub topics: Topics,
    pub broker: BrokerAddr,
    /// TLS and credentials for the broker, loaded at validation.
    pub mqtt_security: crate::tls::MqttSecurity,
    /// Capture, spool and upload; `None` while no slot captures.
    pub data: Option<crate::capture::DataSettings>,
    pub config: Config,
}

impl Settings {
    pub fn telemetry_interval(&self) -> Duration {
        Duration::from_secs(self.config.telemetry_interval_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_documented_default_file_is_the_default() {
        let parsed: Config = toml::from_str(DEFAULT_CONFIG).unwrap();
        assert_eq!(parsed, Config::default());
    }

    #[test]
    fn validation_names_what_is_missing() {
        let mut c = Config::default();
        assert!(matches!(c.validate(), Err(ConfigError::NoDeviceId)));
        c.device_id = "robot/1".into();
        assert!(matches!(c.validate(), Err(ConfigError::DeviceId(_))));
        c.device_id = "robot-1".into();
        assert!(matches!(c.validate(), Err(ConfigError::NoTrustedKeys)));
        c.trusted_keys = vec!["ed25519:nope".into()];
        assert!(matches!(c.validate(), Err(ConfigError::TrustedKey(_))));
        let key = botfleet_protocol::ManifestSigner::from_secret([3; 32]).public_key();
        c.trusted_keys = vec![botfleet_protocol::manifest::format_public_key(&key)];
        assert!(c.validate().is_ok());
        c.mqtt.url = "http://broker".into();
        assert!(matches!(c.validate(), Err(ConfigError::MqttUrl { .. })));
    }

    #[test]
    fn broker_urls_parse() {
        assert_eq!(
            BrokerAddr::parse("mqtt://10.0.0.1:1884").unwrap(),
            BrokerAddr {
                host: "10.0.0.1".into(),
                port: 1884
            }
        );
        assert_eq!(BrokerAddr::parse("mqtt://[::1]").unwrap().host, "::1");
    }
}

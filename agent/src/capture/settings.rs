//! `[capture]` and `[upload]` as written in the configuration file, and the checked form the
//! agent runs on ([`DataSettings`]).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use botfleet_protocol::SlotName;
use botfleet_protocol::messages::InstallWindow;
use serde::{Deserialize, Serialize};

use crate::config::ConfigError;

/// What the robot keeps of the requests it answers. Off unless a slot is named.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The spool's bounds: beyond them the oldest samples go first.
    pub spool_max_bytes: u64,
    pub spool_max_samples: u64,
    /// Samples older than this are deleted unsent (0: no age bound).
    pub spool_max_age_s: u64,
    /// The capture policy of each slot (`[capture.slots.<slot>]`).
    pub slots: BTreeMap<SlotName, CaptureSlotConfig>,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        Self {
            spool_max_bytes: 1024 * 1024 * 1024,
            spool_max_samples: 10_000,
            spool_max_age_s: 7 * 24 * 3600,
            slots: BTreeMap::new(),
        }
    }
}

/// One slot's capture rules; every rule is off by default.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureSlotConfig {
    /// Keep one request in every N (0: off).
    pub sample_every: u64,
    /// Keep a request whose watched output's largest value is under this (0: off).
    pub min_top1: f64,
    /// Keep a request with a value of the watched output outside `[low, high]` (`[]`: off).
    pub range: Vec<f64>,
    /// Keep a request a shadowed candidate answered otherwise.
    pub disagreement: bool,
    /// Let a signed capture order ask for the next requests.
    pub on_demand: bool,
    /// The output `min_top1` and `range` read ("": the first).
    pub output: String,
    /// At most this many samples a minute for the slot, all rules together.
    pub max_per_minute: u32,
}

impl Default for CaptureSlotConfig {
    fn default() -> Self {
        Self {
            sample_every: 0,
            min_top1: 0.0,
            range: Vec::new(),
            disagreement: false,
            on_demand: false,
            output: String::new(),
            max_per_minute: 60,
        }
    }
}

/// Where and when the spool is uploaded.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UploadConfig {
    /// The server's base URL ("": `server_url`).
    pub url: String,
    /// The file holding this robot's device token (`botfleet-server device-token ID`).
    pub token_file: PathBuf,
    /// Upload bandwidth cap in bytes per second (0: none).
    pub max_bytes_per_s: u64,
    /// Daily spans of local time when uploads may run (empty: always).
    pub windows: Vec<InstallWindow>,
    /// Seconds between looks at the spool while the uploader is idle.
    pub interval_s: u64,
}

impl Default for UploadConfig {
    fn default() -> Self {
        Self {
            url: String::new(),
            token_file: PathBuf::new(),
            max_bytes_per_s: 0,
            windows: Vec::new(),
            interval_s: 60,
        }
    }
}

/// One slot's rules, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct SlotPolicy {
    pub sample_every: u64,
    pub min_top1: Option<f64>,
    pub range: Option<(f64, f64)>,
    pub disagreement: bool,
    pub on_demand: bool,
    /// `None`: the first output.
    pub output: Option<String>,
    pub max_per_minute: u32,
}

impl SlotPolicy {
    /// Whether a rule reads the serving model's outputs (so inputs are copied before the
    /// run, not knowing yet whether the request is kept).
    pub fn reads_outputs(&self) -> bool {
        self.min_top1.is_some() || self.range.is_some()
    }

    /// Every rule off, the default rate bound: what tests switch rules on in.
    #[cfg(test)]
    pub(crate) fn off() -> Self {
        Self {
            sample_every: 0,
            min_top1: None,
            range: None,
            disagreement: false,
            on_demand: false,
            output: None,
            max_per_minute: CaptureSlotConfig::default().max_per_minute,
        }
    }
}

/// The spool's bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SpoolBounds {
    pub max_bytes: u64,
    pub max_samples: u64,
    pub max_age: Option<Duration>,
}

/// The device token; its `Debug` form never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceToken(String);

impl DeviceToken {
    pub fn new(token: impl Into<String>) -> Self {
        Self(token.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DeviceToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceToken(…)")
    }
}

/// The uploader's settings, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadSettings {
    /// The server's base URL, without a trailing `/`.
    pub base_url: String,
    pub token: DeviceToken,
    /// 0: no cap.
    pub max_bytes_per_s: u64,
    pub windows: Vec<InstallWindow>,
    pub interval: Duration,
}

/// Capture, spool and upload, checked; present only when a slot captures.
#[derive(Debug, Clone, PartialEq)]
pub struct DataSettings {
    pub slots: BTreeMap<SlotName, SlotPolicy>,
    pub spool: SpoolBounds,
    pub upload: UploadSettings,
}

fn invalid(key: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        key: key.into(),
        message: message.into(),
    }
}

impl CaptureSlotConfig {
    fn policy(&self, slot: &SlotName) -> Result<SlotPolicy, ConfigError> {
        let key = |k: &str| format!("capture.slots.{slot}.{k}");
        if !self.min_top1.is_finite() || self.min_top1 < 0.0 {
            return Err(invalid(
                key("min_top1"),
                format!("must be a number of 0 or more, not {}", self.min_top1),
            ));
        }
        let range = match self.range.as_slice() {
            [] => None,
            &[low, high] if low.is_finite() && high.is_finite() && low <= high => Some((low, high)),
            other => {
                return Err(invalid(
                    key("range"),
                    format!("must be [] or [low, high] with low <= high, not {other:?}"),
                ));
            }
        };
        if self.max_per_minute == 0 {
            return Err(invalid(
                key("max_per_minute"),
                "must be greater than zero (leave the slot out to capture nothing)",
            ));
        }
        let policy = SlotPolicy {
            sample_every: self.sample_every,
            min_top1: (self.min_top1 > 0.0).then_some(self.min_top1),
            range,
            disagreement: self.disagreement,
            on_demand: self.on_demand,
            output: (!self.output.is_empty()).then(|| self.output.clone()),
            max_per_minute: self.max_per_minute,
        };
        let any = policy.sample_every > 0
            || policy.reads_outputs()
            || policy.disagreement
            || policy.on_demand;
        if !any {
            return Err(invalid(
                format!("capture.slots.{slot}"),
                "turns on no rule (sample_every, min_top1, range, disagreement or on_demand)",
            ));
        }
        Ok(policy)
    }
}

/// Checks `[capture]` and `[upload]`; `None` when no slot captures (then nothing is
/// captured and nothing uploaded, and `[upload]` is not looked at).
pub fn validate(
    capture: &CaptureConfig,
    upload: &UploadConfig,
    server_url: &str,
) -> Result<Option<DataSettings>, ConfigError> {
    if capture.slots.is_empty() {
        return Ok(None);
    }
    let slots = capture
        .slots
        .iter()
        .map(|(slot, c)| Ok((slot.clone(), c.policy(slot)?)))
        .collect::<Result<BTreeMap<_, _>, ConfigError>>()?;
    for (key, value) in [
        ("capture.spool_max_bytes", capture.spool_max_bytes),
        ("capture.spool_max_samples", capture.spool_max_samples),
        ("upload.interval_s", upload.interval_s),
    ] {
        if value == 0 {
            return Err(ConfigError::Zero { key });
        }
    }
    let spool = SpoolBounds {
        max_bytes: capture.spool_max_bytes,
        max_samples: capture.spool_max_samples,
        max_age: (capture.spool_max_age_s > 0)
            .then(|| Duration::from_secs(capture.spool_max_age_s)),
    };
    let (url_key, url) = if upload.url.is_empty() {
        ("server_url", server_url)
    } else {
        ("upload.url", upload.url.as_str())
    };
    if url.is_empty() {
        return Err(invalid(
            "upload.url",
            "capture is on but neither upload.url nor server_url says where samples go",
        ));
    }
    match reqwest::Url::parse(url) {
        Ok(parsed) if matches!(parsed.scheme(), "http" | "https") => {}
        Ok(_) => return Err(invalid(url_key, format!("{url:?} is not an http(s) URL"))),
        Err(e) => return Err(invalid(url_key, format!("{url:?}: {e}"))),
    }
    if upload.token_file.as_os_str().is_empty() {
        return Err(invalid(
            "upload.token_file",
            "capture is on but no device token file is set (botfleet-server device-token ID prints the token)",
        ));
    }
    let token = std::fs::read_to_string(&upload.token_file).map_err(|e| {
        invalid(
            "upload.token_file",
            format!("{}: {e}", upload.token_file.display()),
        )
    })?;
    let token = token.trim();
    if token.is_empty() || !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(invalid(
            "upload.token_file",
            format!(
                "{} must hold the device token on one line",
                upload.token_file.display()
            ),
        ));
    }
    Ok(Some(DataSettings {
        slots,
        spool,
        upload: UploadSettings {
            base_url: url.trim_end_matches('/').to_owned(),
            token: DeviceToken::new(token),
            max_bytes_per_s: upload.max_bytes_per_s,
            windows: upload.windows.clone(),
            interval: Duration::from_secs(upload.interval_s),
        },
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(name: &str) -> SlotName {
        SlotName::new(name).unwrap()
    }

    fn with(policy: CaptureSlotConfig) -> CaptureConfig {
        CaptureConfig {
            slots: BTreeMap::from([(slot("digits"), policy)]),
            ..CaptureConfig::default()
        }
    }

    fn upload(dir: &tempfile::TempDir) -> UploadConfig {
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "abc123\n").unwrap();
        UploadConfig {
            token_file,
            ..UploadConfig::default()
        }
    }

    fn message(e: ConfigError) -> String {
        e.to_string()
    }

    #[test]
    fn no_slot_means_capture_is_off_and_upload_is_not_looked_at() {
        let off = validate(&CaptureConfig::default(), &UploadConfig::default(), "").unwrap();
        assert!(off.is_none());
    }

    #[test]
    fn a_slot_with_rules_is_checked_into_its_policy() {
        let dir = tempfile::tempdir().unwrap();
        let config = with(CaptureSlotConfig {
            min_top1: 0.6,
            range: vec![0.0, 1.0],
            output: "probs".into(),
            ..CaptureSlotConfig::default()
        });
        let data = validate(&config, &upload(&dir), "http://127.0.0.1:8080/")
            .unwrap()
            .unwrap();
        let policy = &data.slots[&slot("digits")];
        assert_eq!(policy.min_top1, Some(0.6));
        assert_eq!(policy.range, Some((0.0, 1.0)));
        assert_eq!(policy.output.as_deref(), Some("probs"));
        assert!(policy.reads_outputs());
        assert_eq!(data.upload.base_url, "http://127.0.0.1:8080");
        assert_eq!(data.upload.token.expose(), "abc123");
        assert!(!format!("{:?}", data.upload).contains("abc123"));
    }

    #[test]
    fn bad_capture_settings_are_refused_with_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let up = upload(&dir);
        let url = "http://127.0.0.1:8080";
        let refused = |c: CaptureSlotConfig| message(validate(&with(c), &up, url).unwrap_err());
        assert!(refused(CaptureSlotConfig::default()).contains("turns on no rule"));
        let e = refused(CaptureSlotConfig {
            range: vec![1.0, 0.0],
            ..CaptureSlotConfig::default()
        });
        assert!(e.starts_with("capture.slots.digits.range"), "{e}");
        let e = refused(CaptureSlotConfig {
            min_top1: -1.0,
            ..CaptureSlotConfig::default()
        });
        assert!(e.starts_with("capture.slots.digits.min_top1"), "{e}");
        let e = refused(CaptureSlotConfig {
            sample_every: 10,
            max_per_minute: 0,
            ..CaptureSlotConfig::default()
        });
        assert!(e.starts_with("capture.slots.digits.max_per_minute"), "{e}");
        let sampled = with(CaptureSlotConfig {
            sample_every: 10,
            ..CaptureSlotConfig::default()
        });
        let e = message(validate(&sampled, &up, "").unwrap_err());
        assert!(e.contains("neither upload.url nor server_url"), "{e}");
        let e = message(validate(&sampled, &up, "ftp://x").unwrap_err());
        assert!(e.starts_with("server_url"), "{e}");
        let e = message(validate(&sampled, &UploadConfig::default(), url).unwrap_err());
        assert!(e.starts_with("upload.token_file"), "{e}");
        let missing = UploadConfig {
            token_file: dir.path().join("nope"),
            ..UploadConfig::default()
        };
        let e = message(validate(&sampled, &missing, url).unwrap_err());
        assert!(e.contains("nope"), "{e}");
    }

    #[test]
    fn windows_and_slot_tables_parse_from_toml() {
        let config: crate::Config = toml::from_str(
            r#"
            [capture.slots.digits]
            sample_every = 100
            min_top1 = 0.6
            [upload]
            windows = ["22:00-05:00"]
            max_bytes_per_s = 1000
            "#,
        )
        .unwrap();
        assert_eq!(config.capture.slots[&slot("digits")].sample_every, 100);
        // Written back (as the test harness hands a configuration to the binary), it reads
        // the same.
        let again: crate::Config = toml::from_str(&toml::to_string(&config).unwrap()).unwrap();
        assert_eq!(again, config);
        assert_eq!(config.upload.windows[0].to_string(), "22:00-05:00");
        let bad: Result<crate::Config, _> = toml::from_str("[upload]\nwindows = [\"25:00-05:00\"]");
        assert!(bad.unwrap_err().to_string().contains("HH:MM"));
        let bad: Result<crate::Config, _> =
            toml::from_str("[capture.slots.\"a/b\"]\nsample_every = 1");
        assert!(bad.is_err());
    }
}

//! The topic map. Every topic string of botfleet is built and parsed here, nowhere else.
//!
//! ```text
//! {prefix}/devices/{id}/status      agent → server   QoS 1, retained, last will online=false
//! {prefix}/devices/{id}/info        agent → server   QoS 1, retained
//! {prefix}/devices/{id}/telemetry   agent → server   QoS 0
//! {prefix}/devices/{id}/desired     server → agent   QoS 1, retained
//! {prefix}/devices/{id}/events      agent → server   QoS 1
//! {prefix}/devices/{id}/commands    server → agent   QoS 1
//! ```

use crate::ids::DeviceId;

/// The default topic prefix.
pub const DEFAULT_PREFIX: &str = "botfleet/v1";

/// One kind of per-device topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TopicKind {
    Status,
    Info,
    Telemetry,
    Desired,
    Events,
    Commands,
}

impl TopicKind {
    pub const ALL: [TopicKind; 6] = [
        TopicKind::Status,
        TopicKind::Info,
        TopicKind::Telemetry,
        TopicKind::Desired,
        TopicKind::Events,
        TopicKind::Commands,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TopicKind::Status => "status",
            TopicKind::Info => "info",
            TopicKind::Telemetry => "telemetry",
            TopicKind::Desired => "desired",
            TopicKind::Events => "events",
            TopicKind::Commands => "commands",
        }
    }

    fn parse(level: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.as_str() == level)
    }

    /// Whether the broker should keep the last message on this topic.
    pub fn retained(self) -> bool {
        matches!(
            self,
            TopicKind::Status | TopicKind::Info | TopicKind::Desired
        )
    }

    /// Whether messages on this topic need delivery at least once.
    pub fn at_least_once(self) -> bool {
        !matches!(self, TopicKind::Telemetry)
    }
}

/// Why a topic prefix was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "topic prefix {0:?} must be non-empty, without wildcards, and must not start or end with '/'"
)]
pub struct PrefixError(String);

/// Builds and parses the topics under one prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    prefix: String,
}

impl Default for Topics {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
        }
    }
}

impl Topics {
    pub fn new(prefix: impl Into<String>) -> Result<Self, PrefixError> {
        let prefix = prefix.into();
        let bad = prefix.is_empty()
            || prefix.starts_with('/')
            || prefix.ends_with('/')
            || prefix.contains(['+', '#', '\0']);
        if bad {
            return Err(PrefixError(prefix));
        }
        Ok(Self { prefix })
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// The topic of `kind` for one device.
    pub fn device(&self, id: &DeviceId, kind: TopicKind) -> String {
        format!("{}/devices/{}/{}", self.prefix, id, kind.as_str())
    }

    /// A filter matching `kind` for every device (the server subscribes with it).
    pub fn all_devices(&self, kind: TopicKind) -> String {
        format!("{}/devices/+/{}", self.prefix, kind.as_str())
    }

    /// Splits a concrete topic into device id and kind; `None` for anything that is not ours.
    pub fn parse(&self, topic: &str) -> Option<(DeviceId, TopicKind)> {
        let rest = topic
            .strip_prefix(&self.prefix)?
            .strip_prefix("/devices/")?;
        let (id, kind) = rest.split_once('/')?;
        Some((DeviceId::new(id).ok()?, TopicKind::parse(kind)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    #[test]
    fn every_topic_parses_back_to_what_built_it() {
        let topics = Topics::default();
        for kind in TopicKind::ALL {
            let t = topics.device(&dev("robot-7"), kind);
            assert_eq!(topics.parse(&t), Some((dev("robot-7"), kind)));
        }
        assert_eq!(
            topics.device(&dev("r1"), TopicKind::Desired),
            "botfleet/v1/devices/r1/desired"
        );
        assert_eq!(
            topics.all_devices(TopicKind::Events),
            "botfleet/v1/devices/+/events"
        );
    }

    #[test]
    fn foreign_or_malformed_topics_are_not_ours() {
        let topics = Topics::new("fleet/a").unwrap();
        for t in [
            "botfleet/v1/devices/r1/status",
            "fleet/a/devices/r1/unknown",
            "fleet/a/devices/r1/status/extra",
            "fleet/a/devices/../status",
            "fleet/a/devices//status",
            "fleet/ab/devices/r1/status",
        ] {
            assert_eq!(topics.parse(t), None, "{t}");
        }
    }

    #[test]
    fn prefixes_with_wildcards_are_refused() {
        for p in ["", "/a", "a/", "a/+", "#"] {
            assert!(Topics::new(p).is_err(), "{p}");
        }
    }
}

//! Messages from devices: topic + payload → a typed message, or a reason to drop it.
//! Pure; the link logs the reasons and never stops for them.

use botfleet_protocol::messages::{Event, Info, Status, Telemetry};
use botfleet_protocol::{DeviceId, TopicKind, Topics};

/// A decoded message from a device.
#[derive(Debug, Clone, PartialEq)]
pub enum Inbound {
    Status(Box<Status>),
    Info(Box<Info>),
    Telemetry(Box<Telemetry>),
    Event(Box<Event>),
}

/// Why a message was dropped.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    #[error("topic {0:?} is not a botfleet device topic")]
    Foreign(String),
    #[error("the server does not take {kind} messages (topic {topic:?})")]
    NotInbound { topic: String, kind: &'static str },
    #[error("malformed {kind} message on {topic:?}")]
    Malformed {
        topic: String,
        kind: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("event on {topic:?} claims to come from device {claimed}")]
    WrongDevice { topic: String, claimed: DeviceId },
}

/// Decodes one publish. `Ok(None)`: an empty payload (a retained message being deleted).
pub fn decode(
    topics: &Topics,
    topic: &str,
    payload: &[u8],
) -> Result<Option<(DeviceId, Inbound)>, DecodeError> {
    let (device, kind) = topics
        .parse(topic)
        .ok_or_else(|| DecodeError::Foreign(topic.chars().take(200).collect()))?;
    if payload.is_empty() {
        return Ok(None);
    }
    let malformed = |source| DecodeError::Malformed {
        topic: topic.to_owned(),
        kind: kind.as_str(),
        source,
    };
    let message = match kind {
        TopicKind::Status => Inbound::Status(Box::new(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        TopicKind::Info => Inbound::Info(Box::new(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        TopicKind::Telemetry => Inbound::Telemetry(Box::new(
            serde_json::from_slice(payload).map_err(malformed)?,
        )),
        TopicKind::Events => {
            let event: Event = serde_json::from_slice(payload).map_err(malformed)?;
            // A device speaks for itself only.
            if event.device != device {
                return Err(DecodeError::WrongDevice {
                    topic: topic.to_owned(),
                    claimed: event.device,
                });
            }
            Inbound::Event(Box::new(event))
        }
        TopicKind::Desired | TopicKind::Commands => {
            return Err(DecodeError::NotInbound {
                topic: topic.to_owned(),
                kind: kind.as_str(),
            });
        }
    };
    Ok(Some((device, message)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn topics() -> Topics {
        Topics::default()
    }

    const STATUS: &str = r#"{"online":true,"agent_version":"0.1.0","at":"2025-01-01T00:00:00Z"}"#;

    #[test]
    fn a_status_decodes_with_its_device() {
        let (device, message) = decode(
            &topics(),
            "botfleet/v1/devices/robot-1/status",
            STATUS.as_bytes(),
        )
        .unwrap()
        .unwrap();
        assert_eq!(device.as_str(), "robot-1");
        assert!(matches!(message, Inbound::Status(s) if s.online));
    }

    #[test]
    fn empty_retained_payloads_are_skipped() {
        assert!(
            decode(&topics(), "botfleet/v1/devices/robot-1/info", b"")
                .unwrap()
                .is_none()
        );
    }

    #[test]
    fn malformed_and_foreign_messages_are_errors_not_panics() {
        let t = topics();
        assert!(matches!(
            decode(&t, "botfleet/v1/devices/robot-1/status", b"{not json"),
            Err(DecodeError::Malformed { .. })
        ));
        assert!(matches!(
            decode(&t, "other/devices/robot-1/status", STATUS.as_bytes()),
            Err(DecodeError::Foreign(_))
        ));
        assert!(matches!(
            decode(&t, "botfleet/v1/devices/robot-1/desired", b"{}"),
            Err(DecodeError::NotInbound { .. })
        ));
    }

    #[test]
    fn an_event_for_another_device_is_refused() {
        let event = r#"{"device":"robot-2","slot":"s","sha256":"0000000000000000000000000000000000000000000000000000000000000000","at":"2025-01-01T00:00:00Z","stage":"received"}"#;
        assert!(matches!(
            decode(
                &topics(),
                "botfleet/v1/devices/robot-1/events",
                event.as_bytes()
            ),
            Err(DecodeError::WrongDevice { .. })
        ));
        let ok = event.replace("robot-2", "robot-1");
        assert!(matches!(
            decode(
                &topics(),
                "botfleet/v1/devices/robot-1/events",
                ok.as_bytes()
            ),
            Ok(Some((_, Inbound::Event(_))))
        ));
    }
}

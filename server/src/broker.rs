//! The embedded MQTT broker (rumqttd): zero setup for a lab or a demo.
//!
//! It runs in its own OS thread (rumqttd brings its own runtimes); the server's MQTT client
//! then connects to it over loopback exactly as it would to an external broker. rumqttd has
//! no topic ACLs: production fleets use an external broker (see DESIGN.md).
//!
//! rumqttd cannot be stopped: its thread stays until the process exits. If it ever stops
//! by itself, [`EmbeddedBroker::stopped`] says so and the server shuts down.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use botfleet_protocol::MAX_PACKET_BYTES;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
use tokio::sync::oneshot;

/// The broker configuration; listen address and payload cap are set in code.
const TEMPLATE: &str = r#"
id = 0

[router]
id = 0
max_connections = 10010
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10

[v4.1]
name = "botfleet-v4"
listen = "127.0.0.1:1883"
next_connection_delay_ms = 1

[v4.1.connections]
connection_timeout_ms = 60000
max_payload_size = 524288
max_inflight_count = 100
dynamic_filters = true
"#;

/// How long [`start`] waits for the broker to answer MQTT.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// Why the embedded broker did not start.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("cannot listen on {addr} for the embedded MQTT broker")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the embedded broker configuration is not valid")]
    Config(#[source] Box<toml::de::Error>),
    #[error("the embedded broker template has no v4 listener")]
    NoListener,
    #[error("cannot start the embedded broker thread")]
    Thread(#[source] std::io::Error),
    #[error("the embedded broker stopped: {0}")]
    Stopped(String),
    #[error("the embedded broker did not answer on {addr} within {READY_TIMEOUT:?}")]
    NotReady { addr: SocketAddr },
}

/// A running embedded broker.
#[derive(Debug)]
pub struct EmbeddedBroker {
    addr: SocketAddr,
    stopped: oneshot::Receiver<String>,
}

impl EmbeddedBroker {
    /// Address clients connect to (loopback when listening on every interface).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Resolves when the broker thread ends, which it should never do.
    pub async fn stopped(self) -> BrokerError {
        match self.stopped.await {
            Ok(reason) => BrokerError::Stopped(reason),
            Err(_) => BrokerError::Stopped("its thread ended without a word".to_owned()),
        }
    }
}

/// The rumqttd configuration for one MQTT 3.1.1 listener on `listen`.
fn broker_config(listen: SocketAddr) -> Result<rumqttd::Config, BrokerError> {
    let mut config: rumqttd::Config =
        toml::from_str(TEMPLATE).map_err(|e| BrokerError::Config(Box::new(e)))?;
    let listener = config
        .v4
        .as_mut()
        .and_then(|servers| servers.get_mut("1"))
        .ok_or(BrokerError::NoListener)?;
    listener.listen = listen;
    listener.connections.max_payload_size = MAX_PACKET_BYTES;
    Ok(config)
}

/// Binds `listen` once to learn the port (port 0 picks one) and to fail early with a clear
/// error when it is taken; rumqttd itself only logs a failed bind.
fn resolve_port(listen: SocketAddr) -> Result<SocketAddr, BrokerError> {
    let probe = std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })?;
    probe.local_addr().map_err(|source| BrokerError::Bind {
        addr: listen,
        source,
    })
}

/// Returns once an MQTT CONNECT to `addr` gets its CONNACK. A bare TCP probe would make
/// rumqttd log an error on every start, and so would a DISCONNECT (rumqttd counts it twice):
/// the probe just closes its socket.
async fn answers_mqtt(addr: SocketAddr) {
    let mut options = MqttOptions::new(
        format!("botfleet-server-probe-{}", addr.port()),
        addr.ip().to_string(),
        addr.port(),
    );
    options.set_clean_session(true);
    let (_client, mut eventloop) = AsyncClient::new(options, 1);
    loop {
        match eventloop.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return,
            Ok(_) => {}
            Err(_) => tokio::time::sleep(Duration::from_millis(10)).await,
        }
    }
}

/// Starts rumqttd on `listen` and returns once it answers MQTT.
pub async fn start(listen: SocketAddr) -> Result<EmbeddedBroker, BrokerError> {
    let bound = resolve_port(listen)?;
    let config = broker_config(bound)?;
    let (stopped_tx, mut stopped) = oneshot::channel();
    std::thread::Builder::new()
        .name("mqtt-broker".to_owned())
        .spawn(move || {
            let mut broker = rumqttd::Broker::new(config);
            let reason = match broker.start() {
                Ok(()) => "its listeners returned".to_owned(),
                Err(err) => err.to_string(),
            };
            tracing::error!(%reason, "embedded MQTT broker stopped");
            let _ = stopped_tx.send(reason);
        })
        .map_err(BrokerError::Thread)?;

    let addr = if bound.ip().is_unspecified() {
        let loopback = match bound.ip() {
            IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
            IpAddr::V6(_) => IpAddr::V6(std::net::Ipv6Addr::LOCALHOST),
        };
        SocketAddr::new(loopback, bound.port())
    } else {
        bound
    };
    // rumqttd binds in its own thread and has no "ready" signal: wait until it answers.
    let ready = answers_mqtt(addr);
    tokio::select! {
        () = ready => {}
        reason = &mut stopped => {
            return Err(BrokerError::Stopped(reason.unwrap_or_else(|_| "thread ended".to_owned())));
        }
        () = tokio::time::sleep(READY_TIMEOUT) => return Err(BrokerError::NotReady { addr }),
    }
    tracing::info!(%bound, "embedded MQTT broker listening (MQTT 3.1.1)");
    Ok(EmbeddedBroker { addr, stopped })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_template_has_one_v4_listener_with_our_packet_cap() {
        let addr: SocketAddr = "127.0.0.1:4567".parse().unwrap();
        let config = broker_config(addr).unwrap();
        let v4 = config.v4.unwrap();
        assert_eq!(v4.len(), 1);
        let listener = &v4["1"];
        assert_eq!(listener.listen, addr);
        assert_eq!(listener.connections.max_payload_size, MAX_PACKET_BYTES);
        assert!(listener.connections.dynamic_filters);
        assert!(config.v5.is_none() && config.ws.is_none() && config.console.is_none());
    }
}

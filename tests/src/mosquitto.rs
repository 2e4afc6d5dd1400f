//! A real Mosquitto broker on a loopback port (or a given address), for one fleet; it can be
//! killed and started again on the same port, with or without persistence. Beyond what one
//! broker process carries (its open files), [`Mosquitto::start_leaf`] starts a leaf broker
//! bridged to a central one: devices connect to leaves, the server to the central broker.

use std::net::IpAddr;
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use botfleet_protocol::{DeviceId, TopicKind, Topics};
use rumqttc::{AsyncClient, Event as MqttEvent, Packet, QoS};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// A running `mosquitto`, killed on drop.
pub struct Mosquitto {
    child: Option<Child>,
    addr: IpAddr,
    port: u16,
    persistence: bool,
    /// Configuration after the common part (a leaf's bridge).
    extra: String,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Starts `mosquitto` (from PATH) on a free loopback port, without persistence, and
    /// waits for its "running" log line.
    pub async fn start() -> Result<Self> {
        Self::start_on(IpAddr::from([127, 0, 0, 1]), false).await
    }

    /// Starts one listening on `addr` (a free port); with `persistence`, sessions, queued
    /// messages and retained messages survive [`Self::kill`] + [`Self::restart`] (saved
    /// after every change, so even SIGKILL loses nothing).
    pub async fn start_on(addr: IpAddr, persistence: bool) -> Result<Self> {
        let port = std::net::TcpListener::bind((addr, 0))?.local_addr()?.port();
        let mut broker = Self {
            child: None,
            addr,
            port,
            persistence,
            extra: String::new(),
            dir: tempfile::tempdir()?,
        };
        broker.restart().await?;
        Ok(broker)
    }

    /// Starts a loopback leaf broker bridged to `central` (as bridge `name`) for `devices`
    /// under `prefix`, and returns once a message published on `central` reached it over
    /// the bridge.
    ///
    /// What devices send (status, info, telemetry, events) goes `out` to the central
    /// broker through one `+` filter per kind; what the server sends them (desired,
    /// commands) comes `in` per device, so a leaf receives only its own devices' messages,
    /// never another leaf's. Retained flags and last wills cross the bridge as they are
    /// (`try_private`, Mosquitto's default, tells the central broker it is a bridge).
    pub async fn start_leaf(
        central: &Mosquitto,
        name: &str,
        prefix: &str,
        devices: &[String],
    ) -> Result<Self> {
        let topics = Topics::new(prefix)?;
        let probe = format!("{prefix}/bridge-probe/{name}");
        // Unlimited QoS 1 in flight: the bridge carries a whole leaf's upward traffic on one
        // connection, which Mosquitto's default of 20 would throttle to round trips.
        let mut extra = format!(
            "max_inflight_messages 0\n\
             connection {name}\naddress {}:{}\nremote_clientid {name}\n\
             cleansession true\nnotifications false\n",
            central.addr, central.port
        );
        for kind in TopicKind::ALL {
            let qos = u8::from(kind.at_least_once());
            match bridge_direction(kind) {
                Direction::Out => {
                    extra.push_str(&format!("topic {} out {qos}\n", topics.all_devices(kind)));
                }
                Direction::In => {
                    for device in devices {
                        let id = DeviceId::new(device.as_str())?;
                        extra.push_str(&format!("topic {} in {qos}\n", topics.device(&id, kind)));
                    }
                }
            }
        }
        // Last: the bridge subscribes in this order, so once the probe comes through, the
        // central broker holds every subscription above.
        extra.push_str(&format!("topic {probe} in 1\n"));
        let port = std::net::TcpListener::bind((central.addr, 0))?
            .local_addr()?
            .port();
        let mut leaf = Self {
            child: None,
            addr: central.addr,
            port,
            persistence: false,
            extra,
            dir: tempfile::tempdir()?,
        };
        leaf.restart().await?;
        tokio::time::timeout(Duration::from_secs(60), round_trip(central, &leaf, &probe))
            .await
            .with_context(|| format!("bridge {name}: nothing came through within 60 s"))?
            .with_context(|| format!("bridge {name}"))?;
        Ok(leaf)
    }

    /// Starts the broker again on the same address and port (after [`Self::kill`]).
    pub async fn restart(&mut self) -> Result<()> {
        self.kill().await?;
        let conf = self.dir.path().join("mosquitto.conf");
        let persistence = if self.persistence {
            format!(
                "persistence true\npersistence_location {}/\nautosave_interval 1\nautosave_on_changes true\n",
                self.dir.path().display()
            )
        } else {
            "persistence false\n".to_owned()
        };
        std::fs::write(
            &conf,
            format!(
                "user root\nlistener {} {}\nallow_anonymous true\n{persistence}\
                 log_dest stderr\nlog_type error\nlog_type warning\nlog_type notice\nlog_type information\n\
                 max_packet_size {}\n\
                 # As deploy/mosquitto/mosquitto.conf: the server subscribes to the whole\n\
                 # fleet, and a wave's events must queue for it, not be dropped at 1,000.\n\
                 max_queued_messages 200000\n{}",
                self.port,
                self.addr,
                botfleet_protocol::MAX_PACKET_BYTES,
                self.extra,
            ),
        )?;
        let mut child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("cannot run `mosquitto` (apt-get install -y mosquitto, or set BOTFLEET_MOSQUITTO_URL)")?;
        let stderr = child.stderr.take().context("mosquitto stderr")?;
        let mut lines = BufReader::new(stderr).lines();
        let ready = tokio::time::timeout(Duration::from_secs(10), async {
            while let Some(line) = lines.next_line().await? {
                // "mosquitto version 2.0.11 running"
                if line.contains(" running") {
                    return Ok::<bool, std::io::Error>(true);
                }
            }
            Ok(false)
        })
        .await;
        match ready {
            Ok(Ok(true)) => {}
            Ok(Ok(false)) => bail!("mosquitto exited before it was running"),
            Ok(Err(e)) => bail!("reading mosquitto's log: {e}"),
            Err(_) => bail!("mosquitto did not report running within 10 s"),
        }
        // Keep draining its log so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.child = Some(child);
        Ok(())
    }

    pub fn url(&self) -> String {
        format!("mqtt://{}:{}", self.addr, self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the next [`Self::restart`] keeps what the broker saved. Turning it off
    /// also deletes what was saved: the broker comes back knowing nothing (no sessions, no
    /// retained messages).
    pub fn set_persistence(&mut self, on: bool) -> Result<()> {
        self.persistence = on;
        if !on {
            for entry in std::fs::read_dir(self.dir.path())? {
                let path = entry?.path();
                if path.extension().is_some_and(|e| e == "db") {
                    std::fs::remove_file(path)?;
                }
            }
        }
        Ok(())
    }

    /// Kills the broker now with SIGKILL (network fault tests); a no-op when not running.
    pub async fn kill(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill().await?;
        }
        Ok(())
    }
}

/// Which way a bridge carries a kind of device topic.
enum Direction {
    /// Leaf to central: a device's own messages.
    Out,
    /// Central to leaf: the server's messages to a device.
    In,
}

fn bridge_direction(kind: TopicKind) -> Direction {
    match kind {
        TopicKind::Status | TopicKind::Info | TopicKind::Telemetry | TopicKind::Events => {
            Direction::Out
        }
        TopicKind::Desired | TopicKind::Commands => Direction::In,
    }
}

/// Publishes `topic` retained on `central` and waits until a client of `leaf` gets it
/// (retained on subscribing, or live when the bridge delivers it), then clears it.
async fn round_trip(central: &Mosquitto, leaf: &Mosquitto, topic: &str) -> Result<()> {
    let client_id = |side: &str| format!("bridge-probe-{side}-{}", leaf.port);
    let (publisher, mut publisher_loop) = AsyncClient::new(
        crate::watch::mqtt_options(&central.url(), client_id("central"))?,
        8,
    );
    publisher
        .publish(topic, QoS::AtLeastOnce, true, "up")
        .await?;
    loop {
        if let MqttEvent::Incoming(Packet::PubAck(_)) = publisher_loop.poll().await? {
            break;
        }
    }
    let (watcher, mut watcher_loop) = AsyncClient::new(
        crate::watch::mqtt_options(&leaf.url(), client_id("leaf"))?,
        8,
    );
    watcher.subscribe(topic, QoS::AtLeastOnce).await?;
    loop {
        if let MqttEvent::Incoming(Packet::Publish(p)) = watcher_loop.poll().await?
            && p.topic == topic
        {
            break;
        }
    }
    publisher
        .publish(topic, QoS::AtLeastOnce, true, Vec::<u8>::new())
        .await?;
    loop {
        if let MqttEvent::Incoming(Packet::PubAck(_)) = publisher_loop.poll().await? {
            return Ok(());
        }
    }
}

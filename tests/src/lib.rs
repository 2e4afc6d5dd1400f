//! End-to-end harness: a real server (with its embedded broker or a real Mosquitto), real
//! agents, real HTTP and real models, all in one process on loopback. Used by the
//! workspace's end-to-end tests and by the `botfleet-demo` binary.

#![allow(missing_debug_implementations)] // test harness handles, never logged

pub mod disk;
pub mod hostile;
pub mod mosquitto;
pub mod process;
pub mod proxy;
pub mod secure_broker;
pub mod sim_fleet;
pub mod simulated;
pub mod watch;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, Result, bail};
use botfleet_protocol::messages::{BenchReport, Event, Stage};
use serde_json::{Value, json};

pub use mosquitto::Mosquitto;
pub use watch::EventWatch;

/// A fixture model shipped in `tests/fixtures/models`.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/models")
        .join(name)
}

/// A reference file in `tests/fixtures/reference`.
pub fn reference(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures/reference")
        .join(name)
}

/// The program that runs the agent's benchmark gate child (`PROGRAM __gate`).
///
/// In production that is `botfleet-agent` itself; in this package it is `botfleet-demo`,
/// which cargo builds before this package's tests run (test binaries live in
/// `target/<profile>/deps`, the demo one level up).
pub fn gate_program() -> PathBuf {
    sibling_binary("botfleet-demo").unwrap_or_else(|| std::env::current_exe().unwrap_or_default())
}

/// The ONNX Runtime library for tests of the onnxruntime engine: `ORT_DYLIB_PATH`, else
/// the onnxruntime wheel in the repository's `.venv` (`.ci/run` installs it).
pub use onnxruntime_library::onnxruntime_library;
#[path = "../../engine/tests/support/onnxruntime_library.rs"]
mod onnxruntime_library;

/// A binary of this workspace's build next to the running test (test binaries live in
/// `target/<profile>/deps`, the workspace's binaries one level up).
pub fn sibling_binary(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let file = format!("{name}{}", std::env::consts::EXE_SUFFIX);
    exe.ancestors()
        .skip(1)
        .take(2)
        .map(|dir| dir.join(&file))
        .find(|candidate| candidate.is_file())
}

/// A loopback port free a moment ago (for a process that must be told its address).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_or(0, |a| a.port())
}

/// Which broker the fleet talks through.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BrokerKind {
    /// rumqttd inside botfleet-server (the zero-setup default).
    Embedded,
    /// A real Mosquitto: `BOTFLEET_MOSQUITTO_URL` if set, else one started for this fleet.
    Mosquitto,
    /// A Mosquitto started for this fleet alone, even when `BOTFLEET_MOSQUITTO_URL` is set:
    /// fault tests kill and restart it ([`Fleet::mosquitto`]).
    OwnMosquitto,
}

/// A short random suffix, so fleets sharing one broker never share a name.
fn suffix() -> String {
    format!("{:08x}", rand::random::<u32>())
}

/// A server, its broker and its agents.
pub struct Fleet {
    pub server: botfleet_server::Running,
    /// What the server was started with (a restart reuses it).
    config: botfleet_server::Config,
    pub prefix: String,
    pub mqtt_url: String,
    pub dir: tempfile::TempDir,
    http: reqwest::Client,
    tag: String,
    _mosquitto: Option<Mosquitto>,
}

/// One running agent.
pub struct Agent {
    pub id: String,
    pub running: botfleet_agent::Running,
    pub data_dir: PathBuf,
}

impl Agent {
    pub fn base_url(&self) -> String {
        format!("http://{}", self.running.inference_addr())
    }
}

impl Fleet {
    /// Starts a server on `broker` with a fresh data directory.
    pub async fn start(broker: BrokerKind) -> Result<Self> {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let dir = tempfile::tempdir()?;
        let tag = suffix();
        let prefix = format!("botfleet-test/{tag}");
        let mosquitto = match broker {
            BrokerKind::Embedded => None,
            BrokerKind::OwnMosquitto => Some(Mosquitto::start().await?),
            BrokerKind::Mosquitto if std::env::var_os("BOTFLEET_MOSQUITTO_URL").is_some() => None,
            BrokerKind::Mosquitto => Some(Mosquitto::start().await?),
        };
        let external = match broker {
            BrokerKind::Embedded => String::new(),
            BrokerKind::Mosquitto | BrokerKind::OwnMosquitto => match &mosquitto {
                Some(m) => m.url(),
                None => std::env::var("BOTFLEET_MOSQUITTO_URL")?,
            },
        };
        let mut config = botfleet_server::Config {
            data_dir: dir.path().join("server"),
            http_listen: "127.0.0.1:0".parse()?,
            topic_prefix: prefix.clone(),
            ..Default::default()
        };
        config.mqtt.url = external;
        config.mqtt.embedded_listen = "127.0.0.1:0".parse()?;
        config.mqtt.client_id = format!("botfleet-server-{tag}");
        let server = botfleet_server::start(config.clone())
            .await
            .context("starting botfleet-server")?;
        let mqtt_url = server.mqtt_url();
        Ok(Self {
            server,
            config,
            prefix,
            mqtt_url,
            dir,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(120))
                .build()?,
            tag,
            _mosquitto: mosquitto,
        })
    }

    /// Stops the server and starts it again on the same data directory, HTTP address and
    /// (embedded) MQTT address: artifact URLs and agents' broker stay valid.
    pub async fn restart_server(self) -> Result<Self> {
        let mut config = self.config.clone();
        config.http_listen = self.server.http_addr();
        if config.mqtt.url.is_empty() {
            let addr = self.mqtt_url.trim_start_matches("mqtt://");
            config.mqtt.embedded_listen = addr.parse().context("embedded broker address")?;
        }
        self.server
            .shutdown()
            .await
            .context("stopping botfleet-server")?;
        let server = botfleet_server::start(config.clone())
            .await
            .context("starting botfleet-server again")?;
        Ok(Self {
            server,
            config,
            ..self
        })
    }

    /// Sends a JSON body to a server API path with `method`; the status and the answer.
    pub async fn send(
        &self,
        method: reqwest::Method,
        path: &str,
        body: &Value,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let response = self
            .http
            .request(method, format!("{}{path}", self.server.base_url()))
            .json(body)
            .send()
            .await?;
        let status = response.status();
        Ok((status, response.json().await.unwrap_or(Value::Null)))
    }

    /// The Mosquitto this fleet started, if any (fault tests kill and restart it).
    pub fn mosquitto(&mut self) -> Option<&mut Mosquitto> {
        self._mosquitto.as_mut()
    }

    /// A device id unique to this fleet.
    pub fn device_id(&self, name: &str) -> String {
        format!("{name}-{}", self.tag)
    }

    /// The agent configuration this fleet uses for `device`.
    pub fn agent_config(&self, device: &str, labels: &[(&str, &str)]) -> botfleet_agent::Config {
        let mut config = botfleet_agent::Config {
            device_id: device.to_owned(),
            data_dir: self.dir.path().join("agents").join(device),
            topic_prefix: self.prefix.clone(),
            trusted_keys: vec![self.server.public_key()],
            ..Default::default()
        };
        config.mqtt.url = self.mqtt_url.clone();
        config.gate.program = gate_program();
        config.mqtt.backoff_initial_ms = 100;
        config.mqtt.backoff_max_ms = 2_000;
        config.inference.listen = "127.0.0.1:0".parse().unwrap_or(config.inference.listen);
        config.labels = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect::<BTreeMap<_, _>>();
        config
    }

    /// `config` with a capture policy (`[capture]`) and upload settings (`[upload]`, over
    /// the defaults: this fleet's server, with the device's token in a file next to its data).
    pub fn with_capture(
        &self,
        config: botfleet_agent::Config,
        capture: Value,
        upload: Value,
    ) -> Result<botfleet_agent::Config> {
        let token_file = config.data_dir.with_extension("token");
        if let Some(dir) = token_file.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&token_file, self.device_token(&config.device_id))?;
        let mut value = serde_json::to_value(&config)?;
        value["capture"] = capture;
        let mut defaults = json!({
            "url": self.server.base_url(),
            "token_file": token_file,
        });
        if let (Some(defaults), Some(upload)) = (defaults.as_object_mut(), upload.as_object()) {
            defaults.extend(upload.clone());
        }
        value["upload"] = defaults;
        serde_json::from_value(value).context("the capture or upload settings")
    }

    /// The upload token of `device`, as `botfleet-server device-token` prints it.
    pub fn device_token(&self, device: &str) -> String {
        self.server.device_token(device)
    }

    /// Starts an agent for `device` with the fleet's defaults.
    pub async fn start_agent(&self, device: &str) -> Result<Agent> {
        self.start_agent_with(self.agent_config(device, &[])).await
    }

    pub async fn start_agent_with(&self, config: botfleet_agent::Config) -> Result<Agent> {
        let data_dir = config.data_dir.clone();
        let id = config.device_id.clone();
        let running = botfleet_agent::start(config)
            .await
            .context("starting botfleet-agent")?;
        Ok(Agent {
            id,
            running,
            data_dir,
        })
    }

    /// Subscribes to `device`'s events; returns once the broker confirmed the subscription.
    pub async fn watch_events(&self, device: &str) -> Result<EventWatch> {
        EventWatch::subscribe(&self.mqtt_url, &self.prefix, device).await
    }

    /// Uploads a model through the HTTP API; returns the server's JSON answer.
    pub async fn push_model(&self, file: &Path, metadata: Value) -> Result<Value> {
        let (status, body) = self.upload(file, metadata, None).await?;
        if !status.is_success() {
            bail!("model upload: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// Uploads a model with the accuracy gate's evaluation set (the `evaluation` part).
    pub async fn push_model_with_evaluation(
        &self,
        file: &Path,
        metadata: Value,
        evaluation: &Path,
    ) -> Result<Value> {
        let (status, body) = self.upload(file, metadata, Some(evaluation)).await?;
        if !status.is_success() {
            bail!("model upload: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// POST /api/v1/models as it is: the status and JSON answer, whatever they are.
    pub async fn upload(
        &self,
        file: &Path,
        metadata: Value,
        evaluation: Option<&Path>,
    ) -> Result<(reqwest::StatusCode, Value)> {
        upload_model(
            &self.http,
            &self.server.base_url(),
            file,
            &metadata,
            evaluation,
        )
        .await
    }

    /// Starts a rollout of `slot`@`version` to `devices`; returns the rollout id.
    pub async fn roll_out(&self, slot: &str, version: &str, devices: &[&str]) -> Result<String> {
        let body = json!({ "slot": slot, "version": version, "devices": devices });
        let (status, answer) = self.post_rollout(&body, None).await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("rollout: HTTP {status}: {answer}");
        }
        answer["rollout_id"]
            .as_str()
            .map(str::to_owned)
            .context("rollout answer without rollout_id")
    }

    /// POST /api/v1/rollouts as it is, with an optional Idempotency-Key.
    pub async fn post_rollout(
        &self,
        body: &Value,
        key: Option<&str>,
    ) -> Result<(reqwest::StatusCode, Value)> {
        post_rollout(&self.http, &self.server.base_url(), body, key).await
    }

    /// GET a server API path as JSON.
    pub async fn get(&self, path: &str) -> Result<Value> {
        let response = self
            .http
            .get(format!("{}{path}", self.server.base_url()))
            .send()
            .await?;
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("GET {path}: HTTP {status}: {body}");
        }
        Ok(body)
    }

    /// Polls the rollout view until `done` holds (the server folds device events after the
    /// device sent them, so what a device's own events say may not be in the view yet).
    /// Fails with the last view after `limit`.
    pub async fn wait_rollout(
        &self,
        id: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        self.wait_for(&format!("/api/v1/rollouts/{id}"), limit, done)
            .await
    }

    /// Polls a server API path until its JSON answer satisfies `done`; fails with the last
    /// answer after `limit`.
    pub async fn wait_for(
        &self,
        path: &str,
        limit: Duration,
        done: impl Fn(&Value) -> bool,
    ) -> Result<Value> {
        let mut last = Value::Null;
        let reached = tokio::time::timeout(limit, async {
            loop {
                last = self.get(path).await?;
                if done(&last) {
                    return Ok::<_, anyhow::Error>(());
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
        .await;
        match reached {
            Ok(Ok(())) => Ok(last),
            Ok(Err(e)) => Err(e),
            Err(_) => bail!("{path} never got there within {limit:?}: {last}"),
        }
    }

    /// One OIP v2 inference on `agent`; returns (HTTP status, JSON body).
    pub async fn infer(
        &self,
        agent: &Agent,
        model: &str,
        request: &Value,
    ) -> Result<(reqwest::StatusCode, Value)> {
        let response = self
            .http
            .post(format!("{}/v2/models/{model}/infer", agent.base_url()))
            .json(request)
            .send()
            .await?;
        Ok((response.status(), response.json().await?))
    }

    pub async fn shutdown(self, agents: Vec<Agent>) -> Result<()> {
        for agent in agents {
            agent.running.shutdown().await;
        }
        self.server.shutdown().await?;
        Ok(())
    }
}

/// The `benchmarked` event's report among `events`.
pub fn benchmark_of(events: &[Event]) -> BenchReport {
    events
        .iter()
        .find_map(|e| match &e.stage {
            Stage::Benchmarked(r) => Some(r.clone()),
            _ => None,
        })
        .unwrap_or_else(|| panic!("no benchmark event: {}", describe(events)))
}

/// The terminal event of a stage list, for messages.
pub fn describe(events: &[Event]) -> String {
    events
        .iter()
        .map(|e| match &e.stage {
            Stage::Rejected { reason, message } => format!("rejected ({reason:?}: {message})"),
            Stage::Failed { message } => format!("failed ({message})"),
            other => other.name().to_owned(),
        })
        .collect::<Vec<_>>()
        .join(" → ")
}

/// POST `{base}/api/v1/models` with `file` (and an evaluation set) as it is: the status and
/// JSON answer, whatever they are.
pub async fn upload_model(
    http: &reqwest::Client,
    base: &str,
    file: &Path,
    metadata: &Value,
    evaluation: Option<&Path>,
) -> Result<(reqwest::StatusCode, Value)> {
    let bytes = std::fs::read(file).with_context(|| file.display().to_string())?;
    let mut form = reqwest::multipart::Form::new()
        .text("metadata", metadata.to_string())
        .part(
            "model",
            reqwest::multipart::Part::bytes(bytes).file_name("model.onnx"),
        );
    if let Some(path) = evaluation {
        let set = std::fs::read(path).with_context(|| path.display().to_string())?;
        form = form.part(
            "evaluation",
            reqwest::multipart::Part::bytes(set).file_name("evaluation.json"),
        );
    }
    let response = http
        .post(format!("{base}/api/v1/models"))
        .multipart(form)
        .send()
        .await?;
    Ok((response.status(), response.json().await?))
}

/// POST `{base}/api/v1/rollouts` as it is, with an optional Idempotency-Key.
pub async fn post_rollout(
    http: &reqwest::Client,
    base: &str,
    body: &Value,
    key: Option<&str>,
) -> Result<(reqwest::StatusCode, Value)> {
    let mut request = http.post(format!("{base}/api/v1/rollouts")).json(body);
    if let Some(key) = key {
        request = request.header("Idempotency-Key", key);
    }
    let response = request.send().await?;
    Ok((response.status(), response.json().await?))
}

//! `botfleet-agent`: the daemon on every robot.
//!
//! It keeps an MQTT session to the fleet's broker ([`link`]), reports device facts and
//! telemetry ([`telemetry`]), and reconciles the server's desired state ([`rollout`]): each
//! new model is verified against trusted keys, downloaded with its digest checked while
//! streaming ([`fetch`]), stored crash-safely ([`store`]), loaded and benchmarked against
//! its gate with tract (`botfleet-engine`), then swapped in atomically ([`slots`]) behind
//! the local inference API ([`serve`], KServe Open Inference Protocol v2). The last good
//! model keeps serving through every failure. Where the robot's own policy says so,
//! [`capture`] keeps copies of live requests in a spool and uploads them to the server.
//!
//! [`start`] runs it all on the current tokio runtime; [`run`] is what `main` calls.

pub mod backoff;
pub mod bench;
pub mod capture;
pub mod config;
pub mod engines;
pub mod failpoint;
pub mod fetch;
pub mod gate;
pub mod guards;
pub mod holds;
pub mod k3s;
pub mod link;
pub mod loader;
pub mod logging;
pub mod notify;
pub mod outbox;
pub mod rollout;
pub mod serve;
pub mod shadow;
pub mod slots;
pub mod store;
pub mod telemetry;
/// How the MQTT sessions authenticate (shared with the other side of the link).
pub use botfleet_mqtt_tls as tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::messages::{CommandKind, Status};
use jiff::Timestamp;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

pub use config::{Config, ConfigError};

use crate::link::{Incoming, Publisher};
use crate::slots::Slots;
use crate::store::Store;

/// How long a stop may take before tasks are abandoned (systemd's stop timeout is longer).
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How often the main loop proves it is alive (see [`notify`]).
const HEARTBEAT: Duration = Duration::from_secs(1);
/// Time the root K3s helper gets beyond the join timeout to start and answer.
const K3S_HELPER_MARGIN: Duration = Duration::from_secs(60);

/// Why the agent could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("configuration: {0}")]
    Config(#[from] ConfigError),
    #[error("model store: {0}")]
    Store(#[from] store::StoreError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot listen on the Unix socket {path}: {source}")]
    BindUnix {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("task {0} stopped unexpectedly")]
    TaskDied(&'static str),
    #[error("outbox: {0}")]
    Outbox(#[from] outbox::OutboxError),
    #[error("cannot start the capture writer: {0}")]
    Capture(#[source] std::io::Error),
}

/// A started agent.
#[derive(Debug)]
pub struct Running {
    inference_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: JoinSet<&'static str>,
    heartbeat: watch::Receiver<tokio::time::Instant>,
}

impl Running {
    /// When the main loop last went round; [`notify::watchdog`] pings systemd only while
    /// this moves.
    pub fn heartbeat(&self) -> watch::Receiver<tokio::time::Instant> {
        self.heartbeat.clone()
    }

    /// Where the inference API listens.
    pub fn inference_addr(&self) -> SocketAddr {
        self.inference_addr
    }

    /// Waits until a task stops on its own, which is always an error.
    pub async fn failed(&mut self) -> AgentError {
        match self.tasks.join_next().await {
            Some(Ok(name)) => AgentError::TaskDied(name),
            Some(Err(e)) if e.is_panic() => AgentError::TaskDied("(panicked)"),
            _ => AgentError::TaskDied("(unknown)"),
        }
    }

    /// Stops every task, marking the device offline, within a time limit.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let drain = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
            warn!("tasks did not stop within {SHUTDOWN_GRACE:?}; aborting them");
            self.tasks.abort_all();
        }
    }
}

/// Starts the agent: store, serving, MQTT session, reporting and reconciliation.
pub async fn start(config: Config) -> Result<Running, AgentError> {
    let settings = config.validate()?;
    // reqwest is built without a default TLS provider (keeps aws-lc out); install ring once.
    let _ = rustls::crypto::ring::default_provider().install_default();

    let store = Store::open(&settings.config.data_dir)?;
    let state = store.load_state()?;
    let slots = Arc::new(Slots::default());
    let gate = rollout::GateSettings {
        program: gate_program(&settings.config.gate.program),
        memory_limit_bytes: settings
            .config
            .gate
            .memory_limit_mb
            .saturating_mul(1024 * 1024),
        timeout: Duration::from_secs(settings.config.gate.timeout_s),
    };
    let engines = Arc::new(
        engines::probe(
            &settings.config.engine.onnxruntime,
            &gate.program,
            &settings.config.data_dir,
        )
        .await,
    );
    let mut sampler = telemetry::Sampler::new(
        settings.device_id.clone(),
        &settings.config.data_dir,
        &settings.config.telemetry,
    );
    sampler.set_engines(engines.info().clone());
    let engine_key = engines::cache_key(engines.info(), &sampler.engine_hardware());
    rollout::restore(
        &store,
        &settings.trusted,
        &engines,
        &engine_key,
        &slots,
        &state,
    )
    .await;

    let listen = settings.config.inference.listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| AgentError::Bind {
            addr: listen,
            source,
        })?;
    let inference_addr = listener.local_addr().map_err(|source| AgentError::Bind {
        addr: listen,
        source,
    })?;
    let unix_socket = &settings.config.inference.unix_socket;
    let unix_listener = if unix_socket.as_os_str().is_empty() {
        None
    } else {
        Some(
            serve::bind_unix(unix_socket).map_err(|source| AgentError::BindUnix {
                path: unix_socket.clone(),
                source,
            })?,
        )
    };

    let offline = Status {
        online: false,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        active: Default::default(),
        desired_generation: None,
        at: Timestamp::now(),
        k3s: None,
        deferred: Default::default(),
    };
    // A broker that considers the retained desired state delivered to our persistent session
    // will not send it again after a restart: start from the copy kept on disk.
    let last_desired = store.load_desired().unwrap_or_else(|e| {
        warn!(error = %e, "ignoring the saved desired state");
        None
    });
    let (link, publisher, incoming) = link::new(&settings, &offline, last_desired, store.clone())?;
    let (processed_tx, processed_rx) = watch::channel(None);
    let cancel = CancellationToken::new();
    let mut tasks = JoinSet::new();

    let c = cancel.clone();
    tasks.spawn(async move {
        link.run(c).await;
        "link"
    });

    let Incoming {
        desired,
        commands,
        connected,
    } = incoming;
    let (heartbeat_tx, heartbeat) = watch::channel(tokio::time::Instant::now());
    let (requests_tx, requests_rx) = tokio::sync::mpsc::channel(16);
    let holds = holds::Holds::open(&settings.config.data_dir, settings.config.holds.max_ttl_s);
    let metered = capture::Metered::open(&settings.config.data_dir);
    let capture = match &settings.data {
        None => None,
        Some(data) => {
            let http = reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .build()?;
            let started = capture::start(
                &settings.device_id,
                &settings.config.data_dir,
                data,
                metered.clone(),
                http,
            )
            .map_err(AgentError::Capture)?;
            let c = cancel.clone();
            let uploader = started.uploader;
            tasks.spawn(async move {
                uploader.run(c).await;
                "uploader"
            });
            info!(slots = data.slots.len(), upload = %data.upload.base_url, "data capture on");
            Some(started.capture)
        }
    };
    let (deferred_tx, deferred) = watch::channel(Default::default());
    let reporter = Reporter {
        deferred,
        requests: requests_tx.clone(),
        publisher: publisher.clone(),
        slots: Arc::clone(&slots),
        labels: settings.config.labels.clone(),
        sampler,
        interval: settings.telemetry_interval(),
        heartbeat: heartbeat_tx,
        k3s: k3s::helper::Handoff::new(&settings.config.data_dir),
        k3s_limit: Duration::from_secs(settings.config.k3s.join_timeout_s) + K3S_HELPER_MARGIN,
        k3s_jobs: JoinSet::new(),
        capture: capture.clone(),
        device: settings.device_id.clone(),
        trusted: settings.trusted.clone(),
    };
    let c = cancel.clone();
    tasks.spawn(async move {
        reporter.run(connected, processed_rx, commands, c).await;
        "reporter"
    });

    let reconciler = rollout::Reconciler {
        device: settings.device_id.clone(),
        trusted: settings.trusted.clone(),
        store,
        slots: Arc::clone(&slots),
        publisher,
        http: reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()?,
        server_url: settings.config.server_url.clone(),
        limits: fetch::Limits {
            stall: Duration::from_secs(settings.config.download.stall_timeout_s),
            total: Duration::from_secs(settings.config.download.total_timeout_s),
            attempts: settings.config.download.attempts.max(1),
            retry_initial: Duration::from_millis(settings.config.download.retry_initial_ms),
        },
        gate,
        engines,
        engine_key,
        board: telemetry::board_at(&settings.config.telemetry.root),
        processed: processed_tx,
        state,
        health_window: Duration::from_secs(settings.config.gate.health_window_s),
        requests_tx,
        watchers: JoinSet::new(),
        holds: holds.clone(),
        guards: guards::Guards::discover(&settings.config.telemetry.root, &settings.config.guards),
        parked: Default::default(),
        shadow_refused: Default::default(),
        deferred: deferred_tx,
        capture: capture.clone(),
    };
    let c = cancel.clone();
    tasks.spawn(async move {
        reconciler.run(desired, requests_rx, c).await;
        "reconciler"
    });

    let app = serve::router_capturing(
        Arc::clone(&slots),
        settings.config.inference.max_request_bytes,
        capture,
    );
    // Holds and the link's metering are for the robot's own processes: on the Unix socket,
    // and on TCP only when it listens on loopback.
    let local = app
        .clone()
        .merge(holds::router(holds))
        .merge(capture::metered::router(metered));
    let app = if listen.ip().is_loopback() {
        local.clone()
    } else {
        app
    };
    if let Some(unix_listener) = unix_listener {
        let (c, app, path) = (cancel.clone(), local, unix_socket.clone());
        tasks.spawn(async move {
            serve_api(unix_listener, app, c, "inference API (Unix socket)").await;
            let _ = std::fs::remove_file(&path);
            "inference API (Unix socket)"
        });
    }
    let c = cancel.clone();
    tasks.spawn(async move {
        serve_api(listener, app, c, "inference API").await;
        "inference API"
    });

    info!(
        device = %settings.device_id,
        version = env!("CARGO_PKG_VERSION"),
        inference = %inference_addr,
        unix_socket = %unix_socket.display(),
        broker = %settings.config.mqtt.url,
        "botfleet-agent started"
    );
    Ok(Running {
        inference_addr,
        cancel,
        tasks,
        heartbeat,
    })
}

/// Serves the inference API on `listener` until `cancel`; a failure is logged as `what`.
async fn serve_api<L>(listener: L, app: axum::Router, cancel: CancellationToken, what: &str)
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(cancel.cancelled_owned())
        .await;
    if let Err(e) = served {
        error!(error = %e, "{what} failed");
    }
}

/// The benchmark child's program: as configured, else this executable.
fn gate_program(configured: &std::path::Path) -> std::path::PathBuf {
    if !configured.as_os_str().is_empty() {
        return configured.to_owned();
    }
    std::env::current_exe().unwrap_or_else(|_| std::path::PathBuf::from("botfleet-agent"))
}

/// Runs the agent until `shutdown` resolves (clean exit) or a task dies (error).
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), AgentError> {
    let mut running = start(config).await?;
    let outcome = tokio::select! {
        () = shutdown => Ok(()),
        err = running.failed() => Err(err),
    };
    running.shutdown().await;
    outcome
}

/// Publishes info and status on every connection, status after every reconciliation,
/// and telemetry on a timer.
struct Reporter {
    /// Models ready and waiting for their swap (from the reconciler).
    deferred: watch::Receiver<
        std::collections::BTreeMap<
            botfleet_protocol::SlotName,
            botfleet_protocol::messages::DeferredModel,
        >,
    >,
    /// Rollback commands go to the reconciler, which owns the slots' state.
    requests: tokio::sync::mpsc::Sender<rollout::Request>,
    publisher: Publisher,
    slots: Arc<Slots>,
    labels: std::collections::BTreeMap<String, String>,
    sampler: telemetry::Sampler,
    interval: Duration,
    heartbeat: watch::Sender<tokio::time::Instant>,
    /// K3s operations go to the root helper; their outcome goes into the status.
    k3s: k3s::helper::Handoff,
    k3s_limit: Duration,
    k3s_jobs: JoinSet<botfleet_protocol::messages::K3sNode>,
    /// Data capture, when a slot captures: its counters go into telemetry, capture orders
    /// to it.
    capture: Option<Arc<capture::Capture>>,
    device: botfleet_protocol::DeviceId,
    /// Capture orders are verified with the manifest keys, as rollback orders are.
    trusted: botfleet_protocol::TrustedKeys,
}

impl Reporter {
    fn status(&self, processed: Option<u64>) -> Status {
        Status {
            online: true,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            active: self.slots.active(),
            desired_generation: processed,
            at: Timestamp::now(),
            k3s: self.k3s.last(),
            deferred: self.deferred.borrow().clone(),
        }
    }

    /// One telemetry message, with the data capture counters when capture is on.
    fn telemetry(&mut self) {
        let mut sample = self.sampler.sample(&self.slots);
        sample.data = self.capture.as_ref().map(|c| c.telemetry());
        self.publisher.telemetry(&sample);
    }

    /// Puts a signed capture order into effect, or reports its refusal as a rejected
    /// command (the event names no rollout, as a refused rollback order's does not).
    fn capture_order(
        &self,
        command_id: &botfleet_protocol::CommandId,
        order: &botfleet_protocol::SignedCapture,
    ) {
        let accepted = capture::accept_order(
            self.capture.as_deref(),
            order,
            &self.trusted,
            &self.device,
            Timestamp::now(),
        );
        let Err(refusal) = accepted else {
            return;
        };
        warn!(%command_id, slot = ?refusal.slot, why = %refusal.message, "capture command refused");
        let serving =
            |slot: &botfleet_protocol::SlotName| self.slots.current(slot).map(|m| m.sha256());
        if let Some(event) = refusal.event(&self.device, command_id, serving) {
            self.publisher.event(&event);
        }
    }

    async fn run(
        mut self,
        mut connected: watch::Receiver<u64>,
        mut processed: watch::Receiver<Option<u64>>,
        mut commands: tokio::sync::mpsc::Receiver<botfleet_protocol::messages::Command>,
        cancel: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut beat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = beat.tick() => {
                    self.heartbeat.send_replace(tokio::time::Instant::now());
                }
                Some(done) = self.k3s_jobs.join_next(), if !self.k3s_jobs.is_empty() => {
                    if let Ok(node) = done {
                        info!(command_id = %node.command_id, k3s = ?node.state, "k3s operation done");
                    }
                    self.publisher.status(&self.status(*processed.borrow()));
                }
                changed = connected.changed() => {
                    if changed.is_err() { return; }
                    // Re-read on every connection: facts change with upgrades and disks.
                    self.publisher.info(&self.sampler.info(&self.labels));
                    self.publisher.status(&self.status(*processed.borrow()));
                }
                changed = processed.changed() => {
                    if changed.is_err() { return; }
                    let p = *processed.borrow_and_update();
                    self.publisher.status(&self.status(p));
                }
                changed = self.deferred.changed() => {
                    if changed.is_err() { return; }
                    self.deferred.borrow_and_update();
                    self.publisher.status(&self.status(*processed.borrow()));
                }
                _ = ticker.tick() => self.telemetry(),
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    info!(command_id = %command.command_id, "command received");
                    match command.kind {
                        CommandKind::ReportNow => {
                            self.publisher.info(&self.sampler.info(&self.labels));
                            self.publisher.status(&self.status(*processed.borrow()));
                            self.telemetry();
                        }
                        CommandKind::Rollback { slot, .. } => {
                            // Only a signed order may take a model out of service.
                            let request = rollout::Request::Unsigned {
                                command_id: command.command_id,
                                slot,
                            };
                            if self.requests.send(request).await.is_err() {
                                return;
                            }
                        }
                        CommandKind::SignedRollback { order } => {
                            let request = rollout::Request::Ordered {
                                command_id: command.command_id,
                                order,
                            };
                            if self.requests.send(request).await.is_err() {
                                return;
                            }
                        }
                        CommandKind::SignedCapture { order } => {
                            self.capture_order(&command.command_id, &order);
                        }
                        ref kind @ (CommandKind::K3sJoin { .. }
                        | CommandKind::K3sLeave
                        | CommandKind::K3sRotateToken { .. }) => {
                            if let Some(op) = k3s::Operation::from_command(kind) {
                                let handoff = self.k3s.clone();
                                let limit = self.k3s_limit;
                                let id = command.command_id.clone();
                                self.k3s_jobs.spawn(async move { handoff.ask(id, op, limit).await });
                            }
                        }
                    }
                }
            }
        }
    }
}

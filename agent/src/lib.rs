//! `botfleet-agent`: the daemon on every robot.
//!
//! It keeps an MQTT session to the fleet's broker ([`link`]), reports device facts and
//! telemetry ([`telemetry`]), and reconciles the server's desired state ([`rollout`]): each
//! new model is verified against trusted keys, downloaded with its digest checked while
//! streaming ([`fetch`]), stored crash-safely ([`store`]), loaded and benchmarked against
//! its gate with tract (`botfleet-engine`), then swapped in atomically ([`slots`]) behind
//! the local inference API ([`serve`], KServe Open Inference Protocol v2). The last good
//! model keeps serving through every failure.
//!
//! [`start`] runs it all on the current tokio runtime; [`run`] is what `main` calls.

pub mod backoff;
pub mod config;
pub mod fetch;
pub mod link;
pub mod rollout;
pub mod serve;
pub mod slots;
pub mod store;
pub mod telemetry;

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
    #[error("HTTP client: {0}")]
    HttpClient(#[from] reqwest::Error),
    #[error("task {0} stopped unexpectedly")]
    TaskDied(&'static str),
}

/// A started agent.
#[derive(Debug)]
pub struct Running {
    inference_addr: SocketAddr,
    cancel: CancellationToken,
    tasks: JoinSet<&'static str>,
}

impl Running {
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
    rollout::restore(&store, &settings.trusted, &slots, &state).await;

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

    let offline = Status {
        online: false,
        agent_version: env!("CARGO_PKG_VERSION").to_owned(),
        active: Default::default(),
        desired_generation: None,
        at: Timestamp::now(),
    };
    let (link, publisher, incoming) = link::new(&settings, &offline);
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
    let reporter = Reporter {
        publisher: publisher.clone(),
        slots: Arc::clone(&slots),
        labels: settings.config.labels.clone(),
        sampler: telemetry::Sampler::new(&settings.config.data_dir),
        interval: settings.telemetry_interval(),
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
        },
        board: telemetry::board(),
        processed: processed_tx,
        state,
    };
    let c = cancel.clone();
    tasks.spawn(async move {
        reconciler.run(desired, c).await;
        "reconciler"
    });

    let app = serve::router(
        Arc::clone(&slots),
        settings.config.inference.max_request_bytes,
    );
    let c = cancel.clone();
    tasks.spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(c.cancelled_owned())
            .await;
        if let Err(e) = served {
            error!(error = %e, "inference API failed");
        }
        "inference API"
    });

    info!(
        device = %settings.device_id,
        version = env!("CARGO_PKG_VERSION"),
        inference = %inference_addr,
        broker = %settings.config.mqtt.url,
        "botfleet-agent started"
    );
    Ok(Running {
        inference_addr,
        cancel,
        tasks,
    })
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
    publisher: Publisher,
    slots: Arc<Slots>,
    labels: std::collections::BTreeMap<String, String>,
    sampler: telemetry::Sampler,
    interval: Duration,
}

impl Reporter {
    fn status(&self, processed: Option<u64>) -> Status {
        Status {
            online: true,
            agent_version: env!("CARGO_PKG_VERSION").to_owned(),
            active: self.slots.active(),
            desired_generation: processed,
            at: Timestamp::now(),
        }
    }

    async fn run(
        mut self,
        mut connected: watch::Receiver<u64>,
        mut processed: watch::Receiver<Option<u64>>,
        mut commands: tokio::sync::mpsc::Receiver<botfleet_protocol::messages::Command>,
        cancel: CancellationToken,
    ) {
        let info = telemetry::info(&self.labels);
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = connected.changed() => {
                    if changed.is_err() { return; }
                    self.publisher.info(&info);
                    self.publisher.status(&self.status(*processed.borrow()));
                }
                changed = processed.changed() => {
                    if changed.is_err() { return; }
                    let p = *processed.borrow_and_update();
                    self.publisher.status(&self.status(p));
                }
                _ = ticker.tick() => {
                    let sample = self.sampler.sample(self.slots.drain_stats());
                    self.publisher.telemetry(&sample);
                }
                command = commands.recv() => {
                    let Some(command) = command else { return };
                    info!(command_id = %command.command_id, "command received");
                    match command.kind {
                        CommandKind::ReportNow => {
                            self.publisher.info(&info);
                            self.publisher.status(&self.status(*processed.borrow()));
                            let sample = self.sampler.sample(self.slots.drain_stats());
                            self.publisher.telemetry(&sample);
                        }
                    }
                }
            }
        }
    }
}

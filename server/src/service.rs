//! Bringing the server up ([`start`]), keeping it up ([`run`]) and taking it down
//! ([`Running::shutdown`]).

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::manifest::format_public_key;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::broker::{self, BrokerError};
use crate::channels::Channels;
use crate::config::{BrokerTarget, Config, ConfigError, Settings};
use crate::db::{Db, DbError};
use crate::desired::{DesiredError, DesiredStore};
use crate::devices::Devices;
use crate::fleet::Fleet;
use crate::http::{self, App};
use crate::keys::{self, KeyFileError};
use crate::link::{Link, LinkError, LinkOptions, LinkState, PublishError};
use crate::registry::{Registry, RegistryError};
use crate::rollouts::Rollouts;
use crate::rollouts::create::{CreateError, RolloutService};
use crate::tasks::Tasks;

/// How long shutdown waits for tasks (in-flight requests, the MQTT disconnect).
const DRAIN_GRACE: Duration = Duration::from_secs(5);

/// Why the server did not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot create the data directory {path}")]
    DataDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Auth(#[from] crate::auth::AuthError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Desired(#[from] DesiredError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    DeviceSecret(#[from] crate::data::SecretError),
    #[error(transparent)]
    Store(#[from] crate::data::StoreError),
    #[error("rollouts cannot go on")]
    Rollouts(#[source] CreateError),
    #[error("cannot listen on {addr} for HTTP")]
    HttpBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("the HTTP server failed")]
    Http(#[source] std::io::Error),
    #[error(transparent)]
    Broker(#[from] BrokerError),
    #[error("no MQTT session with {url} within {}s (last error: {})", timeout.as_secs(), last_error.as_deref().unwrap_or("none"))]
    MqttConnect {
        url: String,
        timeout: Duration,
        last_error: Option<String>,
    },
    #[error(transparent)]
    Link(#[from] LinkError),
    #[error("republishing desired documents failed")]
    Republish(#[source] PublishError),
    #[error("publishing what rollouts decided failed")]
    Publish(#[source] PublishError),
    #[error("task {task} stopped without being asked to")]
    TaskExited { task: &'static str },
    #[error("task {task} {message}")]
    TaskFailed { task: &'static str, message: String },
    #[error("tasks {left:?} did not stop within {grace:?}")]
    DrainTimeout {
        grace: Duration,
        left: Vec<&'static str>,
    },
}

/// A started server.
pub struct Running {
    http_addr: SocketAddr,
    mqtt_url: String,
    public_key: String,
    /// What the robots' upload tokens derive from.
    device_secret: crate::data::DeviceSecret,
    tasks: Tasks,
    /// Resolves once the database file is closed (the last task or request holding it gone).
    db_released: std::pin::Pin<Box<dyn Future<Output = ()> + Send>>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("http_addr", &self.http_addr)
            .field("mqtt_url", &self.mqtt_url)
            .field("tasks", &self.tasks)
            .finish_non_exhaustive()
    }
}

impl Running {
    /// The bound HTTP address (the real port when the config said 0).
    pub fn http_addr(&self) -> SocketAddr {
        self.http_addr
    }

    /// `http://{http_addr}`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    /// The broker agents should use: `mqtt://host:port`.
    pub fn mqtt_url(&self) -> String {
        self.mqtt_url.clone()
    }

    /// The manifest signing key, `ed25519:<base64>`: what agents must trust.
    pub fn public_key(&self) -> String {
        self.public_key.clone()
    }

    /// The sample upload token of `device`, as `botfleet-server device-token` prints it.
    pub fn device_token(&self, device: &str) -> String {
        self.device_secret.token(device)
    }

    /// Waits until a task fails; the server should then be shut down.
    pub async fn failed(&mut self) -> Error {
        self.tasks.failure().await
    }

    /// Stops every task, waiting at most 5 s for in-flight work, then for the database
    /// file to be closed: once this returns, a new server can open the same data directory.
    pub async fn shutdown(self) -> Result<(), Error> {
        let result = self.tasks.shutdown(DRAIN_GRACE).await;
        // A connection task or a blocking write can still hold the database for a moment
        // after its task has been joined.
        let released = tokio::time::timeout(DRAIN_GRACE, self.db_released).await;
        tracing::info!("botfleet-server stopped");
        result?;
        released.map_err(|_| Error::DrainTimeout {
            grace: DRAIN_GRACE,
            left: vec!["database"],
        })
    }
}

/// Starts the server, runs it until `shutdown` resolves or a task fails, then stops it.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), Error> {
    let mut running = start(config).await?;
    tokio::select! {
        () = shutdown => {
            tracing::info!("shutdown requested");
            running.shutdown().await
        }
        fatal = running.failed() => {
            tracing::error!(error = %fatal, "a server task failed; stopping");
            if let Err(err) = running.shutdown().await {
                tracing::error!(error = %err, "shutdown after the failure was not clean");
            }
            Err(fatal)
        }
    }
}

/// An address others can reach for one that listens on every interface.
fn reachable(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv4Addr::LOCALHOST.into(), addr.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(Ipv6Addr::LOCALHOST.into(), addr.port())
        }
        _ => addr,
    }
}

/// Binds, starts the broker (if embedded) and every task; returns once HTTP listens and the
/// server's MQTT session is connected and subscribed.
pub async fn start(config: Config) -> Result<Running, Error> {
    let settings = config.validate()?;
    let data_dir = settings.config.data_dir.clone();
    crate::files::create_dir(&data_dir).map_err(|source| Error::DataDir {
        path: data_dir.clone(),
        source,
    })?;
    let signer = Arc::new(keys::load_or_generate(&settings.key_file)?);
    let public_key = format_public_key(&signer.public_key());

    let listen = settings.config.http_listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|source| Error::HttpBind {
            addr: listen,
            source,
        })?;
    let http_addr = listener.local_addr().map_err(|source| Error::HttpBind {
        addr: listen,
        source,
    })?;
    let public_url = settings.public_url.clone().unwrap_or_else(|| {
        if http_addr.ip().is_unspecified() {
            tracing::warn!(
                "http_listen is a wildcard address; set public_url so robots can download artifacts"
            );
        }
        format!("http://{}", reachable(http_addr))
    });

    let access = Arc::new(crate::auth::Access::new(&settings.config.auth)?);
    let device_secret = crate::data::DeviceSecret::load_or_generate(&settings.device_secret_file)?;
    let store = crate::data::BlobStore::open(&settings.store, &settings.config.data)?;
    let store_url = store.url().to_owned();
    let db = Arc::new(Db::open(&data_dir.join("botfleet.redb"))?);
    let db_released = Box::pin(db.released());
    let registry = Arc::new(Registry::open(
        &data_dir,
        db.clone(),
        public_url.clone(),
        signer.clone(),
        settings.config.intake.engines.clone(),
    )?);
    let desired = DesiredStore::open(&data_dir.join("desired"))?;
    let loaded = db.load()?;
    let devices = Devices::restore(db.load_devices()?);
    let channels = Channels::restore(db.load_channels()?);
    if !loaded.rollouts.is_empty() {
        tracing::info!(
            rollouts = loaded.rollouts.len(),
            "rollouts loaded from the database"
        );
    }

    let mut tasks = Tasks::new(CancellationToken::new());
    let (link_options, mqtt_url) = match broker_target(&settings, &mut tasks).await {
        Ok(target) => target,
        Err(err) => {
            let _ = tasks.shutdown(DRAIN_GRACE).await;
            return Err(err);
        }
    };

    let fleet = Arc::new(Fleet::restore(
        Rollouts::restore(loaded.rollouts, loaded.keys),
        devices,
        channels,
        db.clone(),
    ));
    let (link, publisher, mut link_state) =
        Link::new(&link_options, settings.topics.clone(), fleet.clone());
    let data = Arc::new(crate::data::DataService::new(
        store,
        db.clone(),
        device_secret.clone(),
        crate::data::Limits {
            sample_bytes: settings.config.data.max_sample_bytes,
            buffer_bytes: settings.config.data.max_upload_buffer_bytes,
        },
        fleet.clone(),
        signer.clone(),
        publisher.clone(),
    ));
    let (rollouts, fanout) = RolloutService::new(
        desired,
        fleet.clone(),
        registry.clone(),
        publisher,
        db,
        match settings.broker {
            BrokerTarget::Embedded(_) => Some(settings.config.mqtt.embedded_max_rollout_devices),
            BrokerTarget::External(_) => None,
        },
    );
    let rollouts = Arc::new(rollouts);
    let app = Arc::new(App {
        registry,
        rollouts: rollouts.clone(),
        fleet: fleet.clone(),
        key_id: signer.key_id().to_string(),
        public_key: public_key.clone(),
        max_model_bytes: settings.config.max_model_bytes,
        metrics: settings.config.metrics,
        access,
        data,
        stop: tasks.cancel_token().clone(),
    });

    let cancel = tasks.cancel_token().clone();
    tasks.spawn("mqtt-link", {
        let cancel = cancel.clone();
        async move { link.run(cancel).await.map_err(Error::from) }
    });
    tasks.spawn("device-writer", {
        let fleet = fleet.clone();
        let cancel = cancel.clone();
        async move {
            fleet.run_device_writer(cancel).await;
            Ok(())
        }
    });
    tasks.spawn("rollout-driver", {
        let rollouts = rollouts.clone();
        let cancel = cancel.clone();
        async move {
            rollouts.recover().await.map_err(Error::Rollouts)?;
            rollouts.run_driver(cancel).await.map_err(Error::Rollouts)
        }
    });
    tasks.spawn("fan-out", {
        let rollouts = rollouts.clone();
        let cancel = cancel.clone();
        async move {
            rollouts
                .run_fanout(fanout, cancel)
                .await
                .map_err(Error::Publish)
        }
    });
    tasks.spawn(
        "republish",
        republish(rollouts.clone(), link_state.clone(), cancel.clone()),
    );
    tasks.spawn("rejoin", rejoin(rollouts, fleet.clone(), cancel.clone()));
    tasks.spawn("http", {
        let router = http::router(app);
        let stop = cancel.clone().cancelled_owned();
        async move {
            axum::serve(listener, router)
                .with_graceful_shutdown(stop)
                .await
                .map_err(Error::Http)
        }
    });

    let mut running = Running {
        http_addr,
        mqtt_url,
        public_key,
        device_secret,
        tasks,
        db_released,
    };
    if let Err(err) = wait_for_link(&mut running, &mut link_state, settings.connect_timeout).await {
        if let Err(stop) = running.shutdown().await {
            tracing::warn!(error = %stop, "stopping after a failed start was not clean");
        }
        return Err(err);
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"), http = %running.http_addr, mqtt = %running.mqtt_url,
        %public_url, key_id = %signer.key_id(), samples = %store_url, "botfleet-server started"
    );
    Ok(running)
}

/// Waits until the link is subscribed, a task fails, or `timeout` passes.
async fn wait_for_link(
    running: &mut Running,
    state: &mut watch::Receiver<LinkState>,
    timeout: Duration,
) -> Result<(), Error> {
    let ready = tokio::time::timeout(
        timeout,
        state.wait_for(|s| matches!(s, LinkState::Ready { .. })),
    );
    let ready = tokio::select! {
        // `true`: subscribed; `false`: the link task is gone.
        ready = ready => ready.map(|state| state.is_ok()),
        fatal = running.failed() => return Err(fatal),
    };
    match ready {
        Ok(true) => return Ok(()),
        // The link task ended: its own error says why.
        Ok(false) => return Err(running.failed().await),
        Err(_elapsed) => {}
    }
    let last_error = match &*state.borrow() {
        LinkState::Connecting { last_error } => last_error.clone(),
        LinkState::Ready { .. } => None,
    };
    Err(Error::MqttConnect {
        url: running.mqtt_url(),
        timeout,
        last_error,
    })
}

/// Starts the embedded broker when configured; says where the link should connect.
async fn broker_target(
    settings: &Settings,
    tasks: &mut Tasks,
) -> Result<(LinkOptions, String), Error> {
    let (host, port, url) = match &settings.broker {
        BrokerTarget::Embedded(listen) => {
            let embedded = broker::start(*listen).await?;
            let addr = embedded.addr();
            let cancel = tasks.cancel_token().clone();
            tasks.spawn("mqtt-broker", async move {
                tokio::select! {
                    () = cancel.cancelled() => Ok(()),
                    err = embedded.stopped() => Err(Error::Broker(err)),
                }
            });
            (addr.ip().to_string(), addr.port(), format!("mqtt://{addr}"))
        }
        BrokerTarget::External(addr) => (addr.host.clone(), addr.port, addr.url()),
    };
    let options = LinkOptions {
        host,
        port,
        client_id: settings.config.mqtt.client_id.clone(),
        keep_alive: settings.keep_alive,
        security: settings.mqtt_security.clone(),
    };
    Ok((options, url))
}

/// Publishes a device's desired document again when it comes back online behind it.
async fn rejoin(
    service: Arc<RolloutService>,
    fleet: Arc<Fleet>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut returned = fleet.returned();
    loop {
        let id = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            id = returned.recv() => match id {
                Ok(id) => id,
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::debug!(missed, "returning devices not checked (a mass reconnect)");
                    continue;
                }
                Err(broadcast::error::RecvError::Closed) => return Ok(()),
            },
        };
        let processed = fleet
            .devices()
            .get(&id)
            .and_then(|view| view.status)
            .and_then(|status| status.desired_generation);
        match service.republish_if_behind(&id, processed).await {
            Ok(true) => {
                tracing::info!(device = %id, "desired document published again for a returning device")
            }
            Ok(false) => {}
            // The link is down: the republish after its reconnect covers this device.
            Err(e) => tracing::warn!(device = %id, error = %e, "cannot publish desired document"),
        }
    }
}

/// Publishes every desired document again after each new MQTT session.
async fn republish(
    service: Arc<RolloutService>,
    mut state: watch::Receiver<LinkState>,
    cancel: CancellationToken,
) -> Result<(), Error> {
    let mut done = 0u64;
    loop {
        let connection = tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            changed = state.wait_for(|s| matches!(s, LinkState::Ready { connection } if *connection > done)) => {
                changed.ok().and_then(|state| match *state {
                    LinkState::Ready { connection } => Some(connection),
                    LinkState::Connecting { .. } => None,
                })
            }
        };
        let Some(connection) = connection else {
            // The link task ended and reports its own error; wait to be stopped.
            cancel.cancelled().await;
            return Ok(());
        };
        done = connection;
        tokio::select! {
            () = cancel.cancelled() => return Ok(()),
            published = service.republish_all() => {
                let count = published.map_err(Error::Republish)?;
                if count > 0 {
                    tracing::info!(count, "desired documents published again after connecting");
                }
            }
        }
    }
}

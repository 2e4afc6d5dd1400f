//! botfleet-server: the control plane that takes models from the ML pipeline, signs them,
//! serves their bytes, and rolls them out to robots over MQTT.
//!
//! How the pieces fit:
//!
//! ```text
//!  pipeline ──HTTP──► http ──► registry (intake: load + test-run with the engine, sign)
//!                      │          └─ {data_dir}/artifacts, records in db
//!                      └──► rollouts::create ──► desired (on disk) ──► link ──MQTT──► agents
//!  agents ──MQTT status/info/telemetry/events──► link ──► fleet (devices + rollout folds)
//! ```
//!
//! - [`config`]: the TOML configuration, every key with a documented default.
//! - `broker`: the embedded rumqttd (default); an external broker is just a URL.
//! - `link`: the one task that owns the MQTT session; others publish through a handle.
//! - `registry` + `intake`: model uploads become signed manifests and stored artifacts.
//! - `rollouts`: plans in waves, the pure rollout state machine, the event fold, idempotency,
//!   and the service that drives them; `db`: the embedded database (redb) they survive in.
//! - `devices` + `fleet`: what the server knows about each robot (kept in `db`); `labels`:
//!   the operator labels set on the server next to the ones a robot reports.
//! - `data`: the fleet data loop's server half: robots' sample uploads (device tokens), the
//!   blob store (disk or S3), data sets frozen from samples and exported as tar, capture
//!   orders.
//! - `http`: the REST API; [`cli`] drives the same API from a shell.
//!
//! [`start`] brings everything up and returns a [`Running`] server once HTTP listens and the
//! MQTT session is subscribed; [`run`] is what `main` calls. All tasks share one
//! cancellation token; the first task that fails stops the server with its error.

pub mod auth;
mod broker;
mod changes;
mod channels;
pub mod cli;
mod client;
pub mod config;
pub mod data;
mod data_cli;
mod db;
mod desired;
mod devices;
mod files;
mod fleet;
mod history;
mod http;
mod inbound;
mod intake;
mod keys;
mod labels;
mod link;
mod progress;
mod registry;
mod rollouts;
mod service;
mod tasks;
/// How the MQTT sessions authenticate (shared with the other side of the link).
pub use botfleet_mqtt_tls as tls;

pub use config::Config;
pub use service::{Error, Running, run, start};

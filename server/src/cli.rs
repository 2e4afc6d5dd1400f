//! The command line: `serve` runs the server; the other commands manage keys or drive a
//! running server through its REST API and print its answers (`--output json`: as is).

use std::io::IsTerminal as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use botfleet_protocol::manifest::format_public_key;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use crate::client::{ApiClient, ClientError, PushMetadata};
use crate::config::{Config, ConfigError, DEFAULT_TOML};
pub use crate::data_cli::{DatasetCommand, SamplesCommand, SelectionArgs};
use crate::keys::{self, KeyFileError};
use crate::progress::Shown;

/// botfleet control plane: model intake and signing, artifact serving, rollouts over MQTT.
#[derive(Debug, Parser)]
#[command(name = "botfleet-server", version)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server until SIGINT or SIGTERM.
    Serve(ServeArgs),
    /// Print the default configuration, commented.
    PrintConfig,
    /// Generate a signing key (mode 0600) and print its public key.
    Keygen {
        /// Where to write the key; an existing file is never replaced.
        #[arg(long)]
        out: PathBuf,
    },
    /// Print the public key (`ed25519:…`) agents must trust.
    Pubkey {
        /// The signing key file (default: the configured one).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Config file naming the key (when --key is not given).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Models in the registry.
    #[command(subcommand)]
    Model(ModelCommand),
    /// Rollouts of models to devices.
    #[command(subcommand)]
    Rollout(RolloutCommand),
    /// List devices and what they report (same as `device list`).
    Devices(ServerArg),
    /// Devices.
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Channels: a selector with a pinned model per slot, followed by the devices it
    /// selects (robots that join later too).
    #[command(subcommand)]
    Channel(ChannelCommand),
    /// Data sets: samples frozen into an immutable manifest, exported as tar for training.
    #[command(subcommand)]
    Dataset(DatasetCommand),
    /// Samples the robots uploaded.
    #[command(subcommand)]
    Samples(SamplesCommand),
    /// Print a robot's sample upload token (offline: from the configured device secret).
    DeviceToken {
        /// The robot's device id.
        id: String,
        /// The device secret file (default: the configured one).
        #[arg(long)]
        secret: Option<PathBuf>,
        /// Config file naming the secret (when --secret is not given).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Order a robot to keep copies of the next requests one of its slots answers (a signed
    /// capture order; the robot's capture policy must allow on-demand capture).
    Capture {
        device: String,
        #[arg(long)]
        slot: String,
        /// How many of the next requests (1 to 10,000).
        #[arg(long)]
        requests: u32,
        /// Why, for the robot's log.
        #[arg(long)]
        reason: Option<String>,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum ChannelCommand {
    /// List channels: selector, priority, pins and how many followers serve them.
    List(ServerArg),
    /// Show a channel and each device that follows it.
    Show {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Create or change a channel (the same again changes nothing).
    Set {
        name: String,
        /// Which devices it is for, e.g. ring=stable.
        #[arg(long)]
        selector: String,
        /// Where channels overlap, the higher priority is followed.
        #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
        priority: i32,
        /// Pin a slot to a version, `slot=version` (repeatable): holds the channel's
        /// devices there.
        #[arg(long = "pin")]
        pins: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Remove a channel; its devices keep what they were told last.
    Delete {
        name: String,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Subcommand)]
pub enum DeviceCommand {
    /// List devices: presence, status, info, telemetry.
    List(ServerArg),
    /// Set (`key=value`) or remove (`key-`) operator labels; the operator's win over the
    /// labels the device reports.
    Label {
        id: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        edits: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (default: built-in defaults; see print-config).
    #[arg(long, env = "BOTFLEET_SERVER_CONFIG")]
    pub config: Option<PathBuf>,
    /// Overrides `data_dir`.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// Overrides `http_listen`.
    #[arg(long)]
    pub http_listen: Option<SocketAddr>,
    /// Overrides `mqtt.url` (external broker, mqtt://host:port).
    #[arg(long)]
    pub mqtt_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct ServerArg {
    /// Base URL of the server's API.
    #[arg(long, env = "BOTFLEET_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token (`[auth]` in the server's config); needed when the server has tokens.
    #[arg(long, env = "BOTFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// `text` for people, `json` (the API's answer as is) for scripts.
    #[arg(long, value_enum, default_value_t = Output::Text)]
    pub output: Output,
}

/// How a command prints its answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    Text,
    Json,
}

impl ServerArg {
    pub(crate) fn client(&self) -> Result<ApiClient, ClientError> {
        let mut client = ApiClient::new(&self.server, self.token.as_deref())?;
        client.progress = self.output == Output::Text && std::io::stderr().is_terminal();
        Ok(client)
    }

    fn show(&self, shown: Shown, value: &Value) {
        match self.output {
            Output::Json => print_json(value),
            Output::Text => print_line(&crate::progress::text(shown, value)),
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// Upload an ONNX model; the server checks, signs and stores it.
    Push {
        /// The ONNX file.
        file: PathBuf,
        /// Model slot (required unless in --metadata).
        #[arg(long)]
        slot: Option<String>,
        /// Model name (required unless in --metadata).
        #[arg(long)]
        name: Option<String>,
        /// Version label (required unless in --metadata).
        #[arg(long)]
        version: Option<String>,
        /// Release number (default: the slot's highest + 1).
        #[arg(long)]
        release: Option<u64>,
        /// fp32, fp16, int8_qdq or int8_dynamic (default fp32).
        #[arg(long)]
        quantization: Option<String>,
        /// Input signature NAME:DATATYPE:SHAPE, e.g. x:FP32:1x3x224x224 (repeatable).
        #[arg(long = "input")]
        inputs: Vec<String>,
        /// JSON file with more metadata (gate, provenance, compatibility, …); flags win.
        #[arg(long)]
        metadata: Option<PathBuf>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List the models in the registry.
    List(ServerArg),
}

#[derive(Debug, Subcommand)]
pub enum RolloutCommand {
    /// Roll a model version out to devices.
    #[command(group = clap::ArgGroup::new("target").required(true).args(["devices", "selector", "channel"]))]
    Create {
        #[arg(long)]
        slot: String,
        #[arg(long)]
        version: String,
        /// Target device (repeatable).
        #[arg(long = "device")]
        devices: Vec<String>,
        /// Label selector, e.g. site=lab,arch=aarch64.
        #[arg(long)]
        selector: Option<String>,
        /// A channel: its followers get the model, and the channel pins it once complete.
        #[arg(long)]
        channel: Option<String>,
        /// Makes retries safe: the same key and request give the same rollout.
        #[arg(long)]
        idempotency_key: Option<String>,
        /// Strategy as JSON, e.g. '{"waves":[{"count":1},{"percent":100}],"bake_s":600}'.
        #[arg(long)]
        strategy: Option<String>,
        /// Take over devices a live rollout of the slot still owns.
        #[arg(long)]
        supersede: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Start no more devices until resumed.
    Pause {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Go on after a pause; the paused wave's thresholds are waived.
    Resume {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Stop; devices that have not taken the model keep theirs.
    Abort {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Stop; devices that took the model get their previous one back.
    Rollback {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Order the install of a rollout whose strategy installs on command: the devices
    /// (or all) swap the model they downloaded and gated.
    Install {
        id: String,
        /// A device whose install is ordered (repeatable); none: every device.
        #[arg(long = "device")]
        devices: Vec<String>,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Show a rollout's progress per device.
    Status {
        id: String,
        /// Follow it live (a progress bar per wave) until it is no longer in progress.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List rollouts.
    List(ServerArg),
}

/// Why a command failed.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Server(#[from] crate::Error),
    #[error(transparent)]
    Key(#[from] KeyFileError),
    #[error(transparent)]
    Client(#[from] ClientError),
    #[error(transparent)]
    Labels(#[from] crate::labels::LabelError),
    #[error("--pin {0:?} is not slot=version")]
    Pin(String),
    #[error(transparent)]
    Secret(#[from] crate::data::SecretError),
    #[error("{0}")]
    Id(#[from] botfleet_protocol::IdError),
}

/// Resolves when SIGINT or SIGTERM arrives.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let terminate = async {
        match signal(SignalKind::terminate()) {
            Ok(mut sigterm) => {
                sigterm.recv().await;
            }
            Err(err) => {
                tracing::warn!(error = %err, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    let interrupt = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    tokio::select! {
        () = terminate => {}
        () = interrupt => {}
    }
}

pub(crate) fn print_json(value: &Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string());
    print_line(&text);
}

/// Prints to stdout; a closed pipe (`| head`) is not an error worth a panic.
pub(crate) fn print_line(text: &str) {
    use std::io::Write as _;
    let _ = writeln!(std::io::stdout().lock(), "{text}");
}

/// The config `serve` runs with: file (or defaults), then flags.
pub fn serve_config(args: &ServeArgs) -> Result<Config, ConfigError> {
    let mut config = match &args.config {
        Some(path) => Config::from_file(path)?,
        None => Config::default(),
    };
    if let Some(dir) = &args.data_dir {
        config.data_dir.clone_from(dir);
    }
    if let Some(listen) = args.http_listen {
        config.http_listen = listen;
    }
    if let Some(url) = &args.mqtt_url {
        config.mqtt.url.clone_from(url);
    }
    Ok(config)
}

/// Runs one command.
pub async fn run(cli: Cli) -> Result<(), CliError> {
    match cli.command {
        Command::Serve(args) => crate::run(serve_config(&args)?, shutdown_signal()).await?,
        Command::PrintConfig => print!("{DEFAULT_TOML}"),
        Command::Keygen { out } => {
            let signer = keys::generate(&out)?;
            eprintln!("wrote {} (key id {})", out.display(), signer.key_id());
            println!("{}", format_public_key(&signer.public_key()));
        }
        Command::Pubkey { key, config } => {
            let path = match (key, config) {
                (Some(key), _) => key,
                (None, Some(config)) => Config::from_file(&config)?.validate()?.key_file,
                (None, None) => Config::default().validate()?.key_file,
            };
            let signer = keys::load(&path)?;
            println!("{}", format_public_key(&signer.public_key()));
        }
        Command::Model(ModelCommand::Push {
            file,
            slot,
            name,
            version,
            release,
            quantization,
            inputs,
            metadata,
            server,
        }) => {
            let meta = PushMetadata {
                file: metadata,
                slot,
                name,
                version,
                release,
                quantization,
                inputs,
            }
            .build()?;
            server.show(
                Shown::Other,
                &server.client()?.push_model(&file, &meta).await?,
            );
        }
        Command::Model(ModelCommand::List(server)) => {
            server.show(
                Shown::Models,
                &server.client()?.get("/api/v1/models").await?,
            );
        }
        Command::Rollout(RolloutCommand::Create {
            slot,
            version,
            devices,
            selector,
            channel,
            idempotency_key,
            strategy,
            supersede,
            server,
        }) => {
            let mut body = match (selector, channel) {
                (Some(selector), _) => {
                    json!({"slot": slot, "version": version, "selector": selector})
                }
                (None, Some(channel)) => {
                    json!({"slot": slot, "version": version, "channel": channel})
                }
                (None, None) => json!({"slot": slot, "version": version, "devices": devices}),
            };
            if let Some(strategy) = strategy {
                body["strategy"] = serde_json::from_str::<Value>(&strategy).map_err(|source| {
                    ClientError::BadJson {
                        what: "--strategy",
                        source,
                    }
                })?;
            }
            if supersede {
                body["supersede"] = json!(true);
            }
            let client = server.client()?;
            let created = client
                .create_rollout(&body, idempotency_key.as_deref())
                .await?;
            server.show(Shown::Other, &created);
        }
        Command::Rollout(RolloutCommand::Status { id, watch, server }) => {
            let client = server.client()?;
            if watch {
                let json = server.output == Output::Json;
                let last = crate::progress::watch(&client, &id, json).await?;
                if !json {
                    server.show(Shown::Rollout, &last);
                }
            } else {
                let path = format!("/api/v1/rollouts/{id}");
                server.show(Shown::Rollout, &client.get(&path).await?);
            }
        }
        Command::Rollout(RolloutCommand::Install {
            id,
            devices,
            server,
        }) => {
            let body = if devices.is_empty() {
                json!({})
            } else {
                json!({"devices": devices})
            };
            let path = format!("/api/v1/rollouts/{id}/install");
            let view = server.client()?.post_json(&path, &body).await?;
            server.show(Shown::Rollout, &view);
        }
        Command::Rollout(RolloutCommand::List(server)) => {
            server.show(
                Shown::Rollouts,
                &server.client()?.get("/api/v1/rollouts").await?,
            );
        }
        Command::Rollout(
            op @ (RolloutCommand::Pause { .. }
            | RolloutCommand::Resume { .. }
            | RolloutCommand::Abort { .. }
            | RolloutCommand::Rollback { .. }),
        ) => {
            let (verb, id, server) = match op {
                RolloutCommand::Pause { id, server } => ("pause", id, server),
                RolloutCommand::Resume { id, server } => ("resume", id, server),
                RolloutCommand::Abort { id, server } => ("abort", id, server),
                RolloutCommand::Rollback { id, server } => ("rollback", id, server),
                _ => return Ok(()),
            };
            let path = format!("/api/v1/rollouts/{id}/{verb}");
            server.show(Shown::Rollout, &server.client()?.post(&path).await?);
        }
        Command::Device(DeviceCommand::Label { id, edits, server }) => {
            let patch = crate::labels::LabelPatch::parse_args(&edits)?;
            let path = format!("/api/v1/devices/{id}/labels");
            let body = json!({"set": patch.set, "remove": patch.remove});
            server.show(Shown::Other, &server.client()?.patch(&path, &body).await?);
        }
        Command::Channel(ChannelCommand::List(server)) => {
            server.show(
                Shown::Channels,
                &server.client()?.get("/api/v1/channels").await?,
            );
        }
        Command::Channel(ChannelCommand::Show { name, server }) => {
            let path = format!("/api/v1/channels/{name}");
            server.show(Shown::Channels, &server.client()?.get(&path).await?);
        }
        Command::Channel(ChannelCommand::Set {
            name,
            selector,
            priority,
            pins,
            server,
        }) => {
            let mut pinned = serde_json::Map::new();
            for pin in &pins {
                let Some((slot, version)) = pin.split_once('=') else {
                    return Err(CliError::Pin(pin.clone()));
                };
                pinned.insert(slot.to_owned(), json!(version));
            }
            let body = json!({"selector": selector, "priority": priority, "pins": pinned});
            let path = format!("/api/v1/channels/{name}");
            server.show(Shown::Channels, &server.client()?.put(&path, &body).await?);
        }
        Command::Channel(ChannelCommand::Delete { name, server }) => {
            let path = format!("/api/v1/channels/{name}");
            server.client()?.delete(&path).await?;
            if server.output == Output::Text {
                print_line(&format!("channel {name} removed"));
            }
        }
        Command::Dataset(command) => crate::data_cli::dataset(command).await?,
        Command::Samples(command) => crate::data_cli::samples(command).await?,
        Command::DeviceToken { id, secret, config } => {
            let path = match (secret, config) {
                (Some(secret), _) => secret,
                (None, Some(config)) => Config::from_file(&config)?.device_secret_file(),
                (None, None) => Config::default().device_secret_file(),
            };
            let id = botfleet_protocol::DeviceId::new(id)?;
            let secret = crate::data::DeviceSecret::load(&path)?;
            print_line(&secret.token(&id));
        }
        Command::Capture {
            device,
            slot,
            requests,
            reason,
            server,
        } => crate::data_cli::capture(&device, &slot, requests, reason, &server).await?,
        Command::Devices(server) | Command::Device(DeviceCommand::List(server)) => {
            server.show(
                Shown::Devices,
                &server.client()?.get("/api/v1/devices").await?,
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_cli_is_well_formed() {
        Cli::command().debug_assert();
    }

    #[test]
    fn a_rollout_needs_devices_or_a_selector() {
        let parse = |args: &[&str]| Cli::try_parse_from(args);
        let base = [
            "botfleet-server",
            "rollout",
            "create",
            "--slot",
            "s",
            "--version",
            "1",
        ];
        assert!(parse(&base).is_err());
        assert!(parse(&[&base[..], &["--device", "r1", "--device", "r2"]].concat()).is_ok());
        assert!(parse(&[&base[..], &["--selector", "site=lab"]].concat()).is_ok());
        assert!(parse(&[&base[..], &["--device", "r1", "--selector", "a=b"]].concat()).is_err());
        assert!(parse(&[&base[..], &["--channel", "stable"]].concat()).is_ok());
        assert!(
            parse(&[&base[..], &["--channel", "stable", "--selector", "a=b"]].concat()).is_err()
        );
    }

    #[test]
    fn channel_commands_parse() {
        let cli = Cli::try_parse_from([
            "botfleet-server",
            "channel",
            "set",
            "lab",
            "--selector",
            "site=lab",
            "--priority",
            "-5",
            "--pin",
            "detector=3",
            "--pin",
            "ocr=1",
        ])
        .unwrap();
        let Command::Channel(ChannelCommand::Set {
            name,
            priority,
            pins,
            ..
        }) = cli.command
        else {
            panic!("not channel set: {cli:?}");
        };
        assert_eq!((name.as_str(), priority), ("lab", -5));
        assert_eq!(pins, ["detector=3", "ocr=1"]);
        for args in [
            &["botfleet-server", "channel", "list"][..],
            &["botfleet-server", "channel", "show", "lab"],
            &["botfleet-server", "channel", "delete", "lab"],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["botfleet-server", "channel", "set", "lab"]).is_err());
    }

    #[test]
    fn rollout_operations_and_device_list_parse() {
        for op in ["pause", "resume", "abort", "rollback", "install"] {
            let cli = Cli::try_parse_from(["botfleet-server", "rollout", op, "r-1"]).unwrap();
            assert!(matches!(cli.command, Command::Rollout(_)), "{op}");
        }
        let cli = Cli::try_parse_from(["botfleet-server", "device", "list"]).unwrap();
        assert!(matches!(
            cli.command,
            Command::Device(DeviceCommand::List(_))
        ));
        let strategy = r#"{"waves":[{"count":1}]}"#;
        let cli = Cli::try_parse_from([
            "botfleet-server",
            "rollout",
            "create",
            "--slot",
            "s",
            "--version",
            "1",
            "--device",
            "r1",
            "--strategy",
            strategy,
            "--supersede",
        ]);
        assert!(cli.is_ok());
    }

    #[test]
    fn device_label_takes_edits_and_needs_at_least_one() {
        let cli = Cli::try_parse_from([
            "botfleet-server",
            "device",
            "label",
            "r1",
            "ring=canary",
            "old-",
        ])
        .unwrap();
        assert!(matches!(
            cli.command,
            Command::Device(DeviceCommand::Label { ref id, ref edits, .. })
                if id == "r1" && edits.len() == 2
        ));
        assert!(Cli::try_parse_from(["botfleet-server", "device", "label", "r1"]).is_err());
    }

    #[test]
    fn data_commands_parse() {
        for args in [
            &["botfleet-server", "dataset", "list"][..],
            &["botfleet-server", "dataset", "show", "ds-1"],
            &[
                "botfleet-server",
                "dataset",
                "export",
                "ds-1",
                "--output",
                "x.tar",
            ],
            &[
                "botfleet-server",
                "dataset",
                "create",
                "--name",
                "night",
                "--device",
                "r1",
                "--device",
                "r2",
                "--rule",
                "low_confidence",
                "--since",
                "2026-01-01T00:00:00Z",
            ],
            &[
                "botfleet-server",
                "samples",
                "list",
                "--device",
                "r1",
                "--limit",
                "5",
            ],
            &[
                "botfleet-server",
                "device-token",
                "r1",
                "--config",
                "/etc/botfleet/server.toml",
            ],
            &[
                "botfleet-server",
                "capture",
                "r1",
                "--slot",
                "digits",
                "--requests",
                "20",
            ],
        ] {
            assert!(Cli::try_parse_from(args).is_ok(), "{args:?}");
        }
        assert!(Cli::try_parse_from(["botfleet-server", "dataset", "export", "ds-1"]).is_err());
        assert!(Cli::try_parse_from(["botfleet-server", "capture", "r1", "--slot", "d"]).is_err());
    }

    #[test]
    fn serve_flags_override_the_config() {
        let cli = Cli::try_parse_from([
            "botfleet-server",
            "serve",
            "--data-dir",
            "/tmp/bf",
            "--http-listen",
            "127.0.0.1:0",
            "--mqtt-url",
            "mqtt://127.0.0.1:1883",
        ])
        .unwrap();
        let Command::Serve(args) = cli.command else {
            panic!("not serve");
        };
        let config = serve_config(&args).unwrap();
        assert_eq!(config.data_dir, PathBuf::from("/tmp/bf"));
        assert_eq!(config.http_listen.port(), 0);
        assert_eq!(config.mqtt.url, "mqtt://127.0.0.1:1883");
    }
}

//! The data loop's commands: `dataset create|list|show|export`, `samples list`, `capture`
//! (through the API) and `device-token` (offline, from the device secret).

use std::path::{Path, PathBuf};

use clap::{Args, Subcommand};
use futures_util::StreamExt as _;
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt as _;

use crate::cli::{Output, ServerArg};
use crate::client::{ApiClient, ClientError};
use crate::data::check::{Checked, ExportCheck};
use crate::http::datasets::DIGEST_HEADER;

#[derive(Debug, Subcommand)]
pub enum DatasetCommand {
    /// Freeze the samples a selection names into a data set (an immutable manifest).
    Create {
        /// What the data set is called (it need not be unique; its id is).
        #[arg(long)]
        name: String,
        #[command(flatten)]
        selection: SelectionArgs,
        #[command(flatten)]
        server: ServerArg,
    },
    /// List data sets, newest first.
    List(ServerArg),
    /// Show a data set: its digest, selection and size.
    Show {
        id: String,
        #[command(flatten)]
        server: ServerArg,
    },
    /// Download a data set as tar, checking the manifest's and every sample's digest while
    /// writing; a file that does not check out is not kept.
    Export {
        id: String,
        /// Where to write the tar.
        #[arg(long, short)]
        output: PathBuf,
        #[command(flatten)]
        server: Connection,
        /// Print what was written as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Which server and token (`--output` names the file here, so there is no format flag).
#[derive(Debug, Clone, Args)]
pub struct Connection {
    /// Base URL of the server's API.
    #[arg(long, env = "BOTFLEET_SERVER", default_value = "http://127.0.0.1:8080")]
    pub server: String,
    /// API token (`[auth]` in the server's config); needed when the server has tokens.
    #[arg(long, env = "BOTFLEET_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
}

/// Which samples (every part given must match).
#[derive(Debug, Clone, Args)]
pub struct SelectionArgs {
    /// A device (repeatable).
    #[arg(long = "device")]
    pub devices: Vec<String>,
    /// Devices whose labels match, as a rollout's selector (site=lab,ring in (a,b)).
    #[arg(long)]
    pub selector: Option<String>,
    /// A slot (repeatable).
    #[arg(long = "slot")]
    pub slots: Vec<String>,
    /// A capture rule (repeatable): sampled, low_confidence, out_of_range, disagreement,
    /// on_demand.
    #[arg(long = "rule")]
    pub rules: Vec<String>,
    /// A model version or model SHA-256 (repeatable).
    #[arg(long = "model")]
    pub models: Vec<String>,
    /// Captured at or after (RFC 3339).
    #[arg(long)]
    pub since: Option<String>,
    /// Captured before (RFC 3339).
    #[arg(long)]
    pub until: Option<String>,
}

#[derive(Debug, Subcommand)]
pub enum SamplesCommand {
    /// List samples, newest first.
    List {
        #[arg(long)]
        device: Option<String>,
        #[arg(long)]
        slot: Option<String>,
        #[arg(long)]
        rule: Option<String>,
        /// Captured at or after (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Captured before (RFC 3339).
        #[arg(long)]
        until: Option<String>,
        /// At most this many (the server's default: 100).
        #[arg(long)]
        limit: Option<usize>,
        #[command(flatten)]
        server: ServerArg,
    },
}

/// The request body of `dataset create`.
pub fn dataset_body(name: &str, s: &SelectionArgs) -> Value {
    let mut body = json!({"name": name});
    for (key, list) in [
        ("devices", &s.devices),
        ("slots", &s.slots),
        ("rules", &s.rules),
        ("models", &s.models),
    ] {
        if !list.is_empty() {
            body[key] = json!(list);
        }
    }
    for (key, value) in [
        ("selector", &s.selector),
        ("since", &s.since),
        ("until", &s.until),
    ] {
        if let Some(value) = value {
            body[key] = json!(value);
        }
    }
    body
}

/// `/api/v1/samples` with the filters given.
pub fn samples_path(filters: &[(&str, Option<String>)]) -> String {
    let query: Vec<String> = filters
        .iter()
        .filter_map(|(key, value)| {
            value
                .as_ref()
                .map(|v| format!("{key}={}", percent_encode(v)))
        })
        .collect();
    if query.is_empty() {
        "/api/v1/samples".to_owned()
    } else {
        format!("/api/v1/samples?{}", query.join("&"))
    }
}

/// Escapes a query value (RFC 3986 unreserved characters stay as they are).
fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Runs one dataset command.
pub async fn dataset(command: DatasetCommand) -> Result<(), ClientError> {
    match command {
        DatasetCommand::Create {
            name,
            selection,
            server,
        } => {
            let body = dataset_body(&name, &selection);
            let created = server
                .client()?
                .post_json("/api/v1/datasets", &body)
                .await?;
            show(&server, &created, datasets_text);
        }
        DatasetCommand::List(server) => {
            let list = server.client()?.get("/api/v1/datasets").await?;
            show(&server, &list, datasets_text);
        }
        DatasetCommand::Show { id, server } => {
            let path = format!("/api/v1/datasets/{}", percent_encode(&id));
            let dataset = server.client()?.get(&path).await?;
            show(&server, &dataset, datasets_text);
        }
        DatasetCommand::Export {
            id,
            output,
            server,
            json,
        } => {
            let server = ServerArg {
                server: server.server,
                token: server.token,
                output: if json { Output::Json } else { Output::Text },
            };
            let checked = export(&server.client()?, &id, &output).await?;
            let answer = json!({
                "dataset": id, "output": output, "digest": checked.digest,
                "samples": checked.samples, "sample_bytes": checked.sample_bytes
            });
            show(&server, &answer, |v| {
                format!(
                    "wrote {}: data set {}, {} samples ({} bytes), manifest sha256 {}",
                    v["output"].as_str().unwrap_or(""),
                    v["dataset"].as_str().unwrap_or(""),
                    v["samples"],
                    v["sample_bytes"],
                    v["digest"].as_str().unwrap_or("")
                )
            });
        }
    }
    Ok(())
}

/// Runs one samples command.
pub async fn samples(command: SamplesCommand) -> Result<(), ClientError> {
    let SamplesCommand::List {
        device,
        slot,
        rule,
        since,
        until,
        limit,
        server,
    } = command;
    let path = samples_path(&[
        ("device", device),
        ("slot", slot),
        ("rule", rule),
        ("since", since),
        ("until", until),
        ("limit", limit.map(|n| n.to_string())),
    ]);
    let list = server.client()?.get(&path).await?;
    show(&server, &list, samples_text);
    Ok(())
}

/// `capture DEVICE --slot S --requests N`.
pub async fn capture(
    device: &str,
    slot: &str,
    requests: u32,
    reason: Option<String>,
    server: &ServerArg,
) -> Result<(), ClientError> {
    let mut body = json!({"slot": slot, "requests": requests});
    if let Some(reason) = reason {
        body["reason"] = json!(reason);
    }
    let path = format!("/api/v1/devices/{}/capture", percent_encode(device));
    let sent = server.client()?.post_json(&path, &body).await?;
    show(server, &sent, |v| {
        format!(
            "capture order {} sent to {}: the next {} requests of {} (valid until {})",
            v["command_id"].as_str().unwrap_or(""),
            v["device"].as_str().unwrap_or(""),
            v["requests"],
            v["slot"].as_str().unwrap_or(""),
            v["expires_at"].as_str().unwrap_or("")
        )
    });
    Ok(())
}

/// Downloads data set `id`'s export to `output`, checked while it is written (to
/// `output.part`, renamed once it checks out, removed if it does not).
pub async fn export(client: &ApiClient, id: &str, output: &Path) -> Result<Checked, ClientError> {
    let path = format!("/api/v1/datasets/{}/export", percent_encode(id));
    let (response, url) = client.get_response(&path).await?;
    let digest = response
        .headers()
        .get(DIGEST_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .ok_or(ClientError::NoDigest("X-Botfleet-Dataset-Digest"))?;
    let mut part = output.as_os_str().to_owned();
    part.push(".part");
    let part = PathBuf::from(part);
    let write = |source| ClientError::Write {
        path: part.clone(),
        source,
    };
    let mut file = tokio::fs::File::create(&part).await.map_err(write)?;
    let mut check = ExportCheck::new(digest);
    let mut chunks = response.bytes_stream();
    let written = async {
        while let Some(chunk) = chunks.next().await {
            let chunk = chunk.map_err(|source| ClientError::Http {
                url: url.clone(),
                source,
            })?;
            check.feed(&chunk).map_err(|source| ClientError::Export {
                path: output.to_owned(),
                source,
            })?;
            file.write_all(&chunk).await.map_err(write)?;
        }
        file.sync_all().await.map_err(write)?;
        check.finish().map_err(|source| ClientError::Export {
            path: output.to_owned(),
            source,
        })
    }
    .await;
    drop(file);
    match written {
        Ok(checked) => {
            tokio::fs::rename(&part, output)
                .await
                .map_err(|source| ClientError::Write {
                    path: output.to_owned(),
                    source,
                })?;
            Ok(checked)
        }
        Err(err) => {
            // Best effort: the download already failed; a stray .part would say so too.
            let _ = tokio::fs::remove_file(&part).await;
            Err(err)
        }
    }
}

fn show(server: &ServerArg, value: &Value, text: impl Fn(&Value) -> String) {
    match server.output {
        Output::Json => crate::cli::print_json(value),
        Output::Text => crate::cli::print_line(&text(value)),
    }
}

fn datasets_text(v: &Value) -> String {
    let rows = match v {
        Value::Array(rows) => rows.clone(),
        one => vec![one.clone()],
    };
    let mut out = String::new();
    for d in rows {
        out += &format!(
            "{:<16} {:<24} {:>6} samples {:>12} B  {}  sha256 {}\n",
            d["id"].as_str().unwrap_or(""),
            d["name"].as_str().unwrap_or(""),
            d["samples"],
            d["bytes"],
            d["created_at"].as_str().unwrap_or(""),
            d["digest"].as_str().unwrap_or("")
        );
    }
    out.trim_end().to_owned()
}

fn samples_text(v: &Value) -> String {
    let mut out = String::new();
    for r in v.as_array().into_iter().flatten() {
        out += &format!(
            "{:<28} {:<20} {:<12} {:<16} {:<10} {:>8} B  {}\n",
            r["captured_at"].as_str().unwrap_or(""),
            r["device"].as_str().unwrap_or(""),
            r["slot"].as_str().unwrap_or(""),
            r["rule"].as_str().unwrap_or(""),
            r["model"]["version"].as_str().unwrap_or(""),
            r["bytes"],
            r["sha256"].as_str().unwrap_or("")
        );
    }
    out.trim_end().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dataset_body_names_only_what_was_given() {
        let s = SelectionArgs {
            devices: vec!["robot-1".into()],
            selector: None,
            slots: vec![],
            rules: vec!["on_demand".into(), "sampled".into()],
            models: vec![],
            since: Some("2026-01-01T00:00:00Z".into()),
            until: None,
        };
        assert_eq!(
            dataset_body("n", &s),
            json!({"name": "n", "devices": ["robot-1"], "rules": ["on_demand", "sampled"],
                   "since": "2026-01-01T00:00:00Z"})
        );
    }

    #[test]
    fn sample_filters_are_escaped_into_the_query() {
        assert_eq!(samples_path(&[("device", None)]), "/api/v1/samples");
        assert_eq!(
            samples_path(&[
                ("device", Some("robot-1".into())),
                ("since", Some("2026-01-01T00:00:00+01:00".into()))
            ]),
            "/api/v1/samples?device=robot-1&since=2026-01-01T00%3A00%3A00%2B01%3A00"
        );
    }
}

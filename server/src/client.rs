//! The CLI's HTTP client: the same REST API the pipeline uses.

use std::path::{Path, PathBuf};

use reqwest::multipart::{Form, Part};
use reqwest::{RequestBuilder, StatusCode};
use serde_json::{Map, Value, json};

/// Why a client command failed.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a JSON object")]
    Metadata {
        path: PathBuf,
        #[source]
        source: Option<serde_json::Error>,
    },
    #[error("{what} is not valid JSON")]
    BadJson {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("--input {0:?} must look like NAME:FP32:1x3x224x224")]
    Input(String),
    #[error("cannot set up the HTTP client")]
    Setup(#[source] reqwest::Error),
    #[error(
        "cannot reach {url}; is botfleet-server running there? (set --server or BOTFLEET_SERVER)"
    )]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("the server sent no {0} header with the export")]
    NoDigest(&'static str),
    #[error("the export of {path} did not check out; nothing was kept")]
    Export {
        path: PathBuf,
        #[source]
        source: crate::data::check::ExportError,
    },
    #[error("cannot write {path}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The server's own one-line error, and what to do about it where that is clear.
    #[error("{message} (HTTP {status}){}", hint(*status))]
    Server { status: StatusCode, message: String },
}

fn hint(status: StatusCode) -> &'static str {
    match status {
        StatusCode::UNAUTHORIZED => "; pass --token or set BOTFLEET_TOKEN",
        StatusCode::FORBIDDEN => "; use a token with the operator role",
        _ => "",
    }
}

/// Parses `NAME:DATATYPE:DxDxD` (the name may itself contain ':').
pub fn parse_input(text: &str) -> Result<Value, ClientError> {
    let bad = || ClientError::Input(text.to_owned());
    let mut parts = text.rsplitn(3, ':');
    let (Some(shape), Some(datatype), Some(name)) = (parts.next(), parts.next(), parts.next())
    else {
        return Err(bad());
    };
    let shape = shape
        .split('x')
        .map(|d| d.trim().parse::<i64>().map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    if name.is_empty() || datatype.is_empty() {
        return Err(bad());
    }
    Ok(json!({"name": name, "datatype": datatype.to_ascii_uppercase(), "shape": shape}))
}

/// What `model push` sends as metadata: the file's object, overridden by the flags.
#[derive(Debug, Default)]
pub struct PushMetadata {
    pub file: Option<PathBuf>,
    pub slot: Option<String>,
    pub name: Option<String>,
    pub version: Option<String>,
    pub release: Option<u64>,
    pub quantization: Option<String>,
    pub inputs: Vec<String>,
}

impl PushMetadata {
    pub fn build(&self) -> Result<Value, ClientError> {
        let mut meta = match &self.file {
            None => Map::new(),
            Some(path) => {
                let text = std::fs::read(path).map_err(|source| ClientError::Read {
                    path: path.clone(),
                    source,
                })?;
                match serde_json::from_slice(&text) {
                    Ok(Value::Object(map)) => map,
                    Ok(_) => {
                        return Err(ClientError::Metadata {
                            path: path.clone(),
                            source: None,
                        });
                    }
                    Err(e) => {
                        return Err(ClientError::Metadata {
                            path: path.clone(),
                            source: Some(e),
                        });
                    }
                }
            }
        };
        for (key, value) in [
            ("slot", &self.slot),
            ("name", &self.name),
            ("version", &self.version),
            ("quantization", &self.quantization),
        ] {
            if let Some(value) = value {
                meta.insert(key.to_owned(), Value::String(value.clone()));
            }
        }
        if let Some(release) = self.release {
            meta.insert("release".to_owned(), json!(release));
        }
        if !self.inputs.is_empty() {
            let inputs = self
                .inputs
                .iter()
                .map(|i| parse_input(i))
                .collect::<Result<Vec<_>, _>>()?;
            meta.insert("inputs".to_owned(), Value::Array(inputs));
        }
        Ok(Value::Object(meta))
    }
}

/// A client of one server.
#[derive(Debug)]
pub struct ApiClient {
    http: reqwest::Client,
    base: String,
    /// Sent as `Authorization: Bearer`; never printed.
    token: Option<String>,
    /// Draw progress bars on stderr.
    pub progress: bool,
}

impl ApiClient {
    pub fn new(base: &str, token: Option<&str>) -> Result<Self, ClientError> {
        let http = reqwest::Client::builder()
            .user_agent(concat!("botfleet-server-cli/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(ClientError::Setup)?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_owned(),
            token: token.filter(|t| !t.is_empty()).map(str::to_owned),
            progress: false,
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `request`: a success's response as it came (its body unread), else the
    /// server's error.
    async fn respond(
        &self,
        url: &str,
        request: RequestBuilder,
    ) -> Result<reqwest::Response, ClientError> {
        let http = |source| ClientError::Http {
            url: url.to_owned(),
            source,
        };
        let request = match &self.token {
            Some(token) => request.bearer_auth(token),
            None => request,
        };
        let response = request.send().await.map_err(http)?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.bytes().await.map_err(http)?;
        let message = serde_json::from_slice::<Value>(&body)
            .ok()
            .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_owned());
        Err(ClientError::Server { status, message })
    }

    async fn send(&self, url: String, request: RequestBuilder) -> Result<Value, ClientError> {
        let response = self.respond(&url, request).await?;
        let body = response.bytes().await.map_err(|source| ClientError::Http {
            url: url.clone(),
            source,
        })?;
        Ok(serde_json::from_slice(&body).unwrap_or(Value::Null))
    }

    /// `GET` whose body the caller reads (a download); its URL for errors.
    pub async fn get_response(
        &self,
        path: &str,
    ) -> Result<(reqwest::Response, String), ClientError> {
        let url = self.url(path);
        let response = self.respond(&url, self.http.get(&url)).await?;
        Ok((response, url))
    }

    pub async fn get(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.get(&url)).await
    }

    /// `POST` without a body (rollout operations).
    pub async fn post(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.post(&url)).await
    }

    /// `POST` with a JSON body.
    pub async fn post_json(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.post(&url).json(body))
            .await
    }

    /// `PUT` with a JSON body (a channel).
    pub async fn put(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.put(&url).json(body)).await
    }

    pub async fn delete(&self, path: &str) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.delete(&url)).await
    }

    /// `PATCH` with a JSON body (label edits).
    pub async fn patch(&self, path: &str, body: &Value) -> Result<Value, ClientError> {
        let url = self.url(path);
        self.send(url.clone(), self.http.patch(&url).json(body))
            .await
    }

    pub async fn push_model(&self, file: &Path, metadata: &Value) -> Result<Value, ClientError> {
        let bytes = tokio::fs::read(file)
            .await
            .map_err(|source| ClientError::Read {
                path: file.to_owned(),
                source,
            })?;
        let file_name = file.file_name().map_or_else(
            || "model.onnx".to_owned(),
            |n| n.to_string_lossy().into_owned(),
        );
        let length = bytes.len() as u64;
        let (body, bar) = crate::progress::upload_body(bytes, self.progress);
        let form = Form::new().text("metadata", metadata.to_string()).part(
            "model",
            Part::stream_with_length(body, length).file_name(file_name),
        );
        let url = self.url("/api/v1/models");
        let answer = self
            .send(url.clone(), self.http.post(&url).multipart(form))
            .await;
        bar.finish_and_clear();
        answer
    }

    pub async fn create_rollout(
        &self,
        body: &Value,
        idempotency_key: Option<&str>,
    ) -> Result<Value, ClientError> {
        let url = self.url("/api/v1/rollouts");
        let mut request = self.http.post(&url).json(body);
        if let Some(key) = idempotency_key {
            request = request.header("Idempotency-Key", key);
        }
        self.send(url.clone(), request).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inputs_parse_with_colons_in_names() {
        assert_eq!(
            parse_input("x:fp32:1x3x224x224").unwrap(),
            json!({"name": "x", "datatype": "FP32", "shape": [1, 3, 224, 224]})
        );
        assert_eq!(
            parse_input("input_1:0:FP32:1x12x12x3").unwrap()["name"],
            "input_1:0"
        );
        for bad in ["x", "x:FP32", "x:FP32:1xax3", ":FP32:1"] {
            assert!(parse_input(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn flags_override_the_metadata_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("m.json");
        std::fs::write(
            &file,
            r#"{"slot":"a","name":"n","provenance":{"commit":"abc"}}"#,
        )
        .unwrap();
        let meta = PushMetadata {
            file: Some(file),
            slot: Some("b".into()),
            version: Some("2".into()),
            release: Some(7),
            ..PushMetadata::default()
        }
        .build()
        .unwrap();
        assert_eq!(
            meta,
            json!({"slot": "b", "name": "n", "version": "2", "release": 7, "provenance": {"commit": "abc"}})
        );
    }
}

//! The blob store: sample files and data set manifests, by key, through `object_store`.
//!
//! One code path for both backends: the local disk (`LocalFileSystem`, the default) and S3
//! or an S3-compatible server (`AmazonS3`), both behind `Arc<dyn ObjectStore>`. Inside the
//! store: `samples/<sha256>.bfs` and `datasets/<id>.json`. A put is atomic on both (a
//! temp file renamed; one S3 PUT), so a reader sees a whole blob or none.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use botfleet_protocol::manifest::Sha256Digest;
use bytes::Bytes;
use futures_util::stream::{BoxStream, StreamExt as _};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::local::LocalFileSystem;
use object_store::path::Path as Key;
use object_store::prefix::PrefixStore;
use object_store::{ClientOptions, ObjectStore, ObjectStoreExt as _, PutPayload, RetryConfig};

use crate::config::{DataConfig, StoreTarget};

/// A store request that has not finished by then has failed (the uploader sends again).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Retries of a failed S3 request, and how long they may take in all: a robot's upload
/// waits for them.
const MAX_RETRIES: usize = 3;
const RETRY_TIMEOUT: Duration = Duration::from_secs(20);
/// The credential variables an `s3_credentials_file` may set.
const CREDENTIAL_KEYS: [&str; 3] = [
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
];

/// Why the store could not be opened or used.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cannot create the sample directory {path}")]
    Dir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot open the sample store {url}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
    #[error("cannot read the S3 credentials file {path}")]
    CredentialsRead {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "S3 credentials file {path} line {line}: expected NAME=value with NAME one of AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN"
    )]
    CredentialsLine { path: PathBuf, line: usize },
    #[error("{key} is not in the sample store")]
    NotFound { key: String },
    #[error("the sample store failed on {key}")]
    Backend {
        key: String,
        #[source]
        source: object_store::Error,
    },
}

impl StoreError {
    fn backend(key: &Key) -> impl FnOnce(object_store::Error) -> Self + '_ {
        move |source| match source {
            object_store::Error::NotFound { .. } => Self::NotFound {
                key: key.to_string(),
            },
            source => Self::Backend {
                key: key.to_string(),
                source,
            },
        }
    }
}

/// Sample files and manifests by key.
#[derive(Debug, Clone)]
pub struct BlobStore {
    inner: Arc<dyn ObjectStore>,
    /// Where it is, for log lines.
    url: String,
}

/// The key of a sample file.
pub fn sample_key(sha256: &Sha256Digest) -> Key {
    Key::from(format!("samples/{}.bfs", sha256.to_hex()))
}

/// The key of a data set's manifest.
pub fn manifest_key(id: &str) -> Key {
    Key::from(format!("datasets/{id}.json"))
}

impl BlobStore {
    /// Opens the configured store; the local directory is created when missing. Nothing is
    /// sent to S3 until the first request.
    pub fn open(target: &StoreTarget, config: &DataConfig) -> Result<Self, StoreError> {
        match target {
            StoreTarget::Local(dir) => {
                crate::files::create_dir(dir).map_err(|source| StoreError::Dir {
                    path: dir.clone(),
                    source,
                })?;
                let url = dir.display().to_string();
                let local =
                    LocalFileSystem::new_with_prefix(dir).map_err(|source| StoreError::Open {
                        url: url.clone(),
                        source,
                    })?;
                Ok(Self {
                    inner: Arc::new(local),
                    url,
                })
            }
            StoreTarget::S3 { bucket, prefix } => {
                let url = format!("s3://{bucket}/{prefix}");
                let mut builder = AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_client_options(
                        ClientOptions::new()
                            .with_timeout(REQUEST_TIMEOUT)
                            .with_connect_timeout(CONNECT_TIMEOUT),
                    )
                    .with_retry(RetryConfig {
                        max_retries: MAX_RETRIES,
                        retry_timeout: RETRY_TIMEOUT,
                        ..RetryConfig::default()
                    });
                if !config.s3_endpoint.trim().is_empty() {
                    builder = builder.with_endpoint(config.s3_endpoint.trim());
                }
                if !config.s3_region.trim().is_empty() {
                    builder = builder.with_region(config.s3_region.trim());
                }
                if config.s3_allow_http {
                    builder = builder.with_allow_http(true);
                }
                if !config.s3_credentials_file.as_os_str().is_empty() {
                    for (name, value) in read_credentials(&config.s3_credentials_file)? {
                        let key: AmazonS3ConfigKey =
                            name.to_ascii_lowercase().parse().map_err(|source| {
                                StoreError::Open {
                                    url: url.clone(),
                                    source,
                                }
                            })?;
                        builder = builder.with_config(key, value);
                    }
                }
                let s3 = builder.build().map_err(|source| StoreError::Open {
                    url: url.clone(),
                    source,
                })?;
                let inner: Arc<dyn ObjectStore> = if prefix.is_empty() {
                    Arc::new(s3)
                } else {
                    Arc::new(PrefixStore::new(s3, prefix.as_str()))
                };
                Ok(Self { inner, url })
            }
        }
    }

    /// Where the store is (`/var/lib/botfleet-server/samples`, `s3://bucket/prefix`).
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Writes `bytes` at `key`, replacing what was there.
    pub async fn put(&self, key: &Key, bytes: Bytes) -> Result<(), StoreError> {
        self.inner
            .put(key, PutPayload::from_bytes(bytes))
            .await
            .map(drop)
            .map_err(StoreError::backend(key))
    }

    /// The whole blob at `key`.
    pub async fn get(&self, key: &Key) -> Result<Bytes, StoreError> {
        let found = self
            .inner
            .get(key)
            .await
            .map_err(StoreError::backend(key))?;
        found.bytes().await.map_err(StoreError::backend(key))
    }

    /// The blob at `key`, a chunk at a time.
    pub async fn stream(
        &self,
        key: &Key,
    ) -> Result<BoxStream<'static, Result<Bytes, StoreError>>, StoreError> {
        let found = self
            .inner
            .get(key)
            .await
            .map_err(StoreError::backend(key))?;
        let owned = key.clone();
        Ok(found
            .into_stream()
            .map(move |chunk| chunk.map_err(StoreError::backend(&owned)))
            .boxed())
    }
}

/// `NAME=value` lines (systemd's `EnvironmentFile` form; `#` starts a comment).
fn read_credentials(path: &Path) -> Result<Vec<(String, String)>, StoreError> {
    let text = std::fs::read_to_string(path).map_err(|source| StoreError::CredentialsRead {
        path: path.to_owned(),
        source,
    })?;
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let parsed = line
            .split_once('=')
            .map(|(k, v)| (k.trim(), v.trim().trim_matches('"')))
            .filter(|(k, v)| CREDENTIAL_KEYS.contains(k) && !v.is_empty());
        let Some((name, value)) = parsed else {
            return Err(StoreError::CredentialsLine {
                path: path.to_owned(),
                line: n + 1,
            });
        };
        out.push((name.to_owned(), value.to_owned()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_by_digest_and_by_id() {
        let sha = Sha256Digest::of(b"x");
        assert_eq!(
            sample_key(&sha).as_ref(),
            format!("samples/{}.bfs", sha.to_hex())
        );
        assert_eq!(manifest_key("ds-1").as_ref(), "datasets/ds-1.json");
    }

    #[test]
    fn a_credentials_file_names_only_credentials() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s3.env");
        std::fs::write(
            &path,
            "# moto\nAWS_ACCESS_KEY_ID=key\nAWS_SECRET_ACCESS_KEY=\"secret\"\n",
        )
        .unwrap();
        assert_eq!(
            read_credentials(&path).unwrap(),
            [
                ("AWS_ACCESS_KEY_ID".to_owned(), "key".to_owned()),
                ("AWS_SECRET_ACCESS_KEY".to_owned(), "secret".to_owned())
            ]
        );
        std::fs::write(&path, "AWS_ENDPOINT=http://x\n").unwrap();
        assert!(matches!(
            read_credentials(&path),
            Err(StoreError::CredentialsLine { line: 1, .. })
        ));
    }

    #[tokio::test]
    async fn a_local_store_puts_gets_and_streams() {
        let dir = tempfile::tempdir().unwrap();
        let target = StoreTarget::Local(dir.path().join("samples"));
        let store = BlobStore::open(&target, &DataConfig::default()).unwrap();
        let sha = Sha256Digest::of(b"hello");
        let key = sample_key(&sha);
        assert!(matches!(
            store.get(&key).await,
            Err(StoreError::NotFound { .. })
        ));
        store.put(&key, Bytes::from_static(b"hello")).await.unwrap();
        assert_eq!(store.get(&key).await.unwrap(), Bytes::from_static(b"hello"));
        let mut chunks = store.stream(&key).await.unwrap();
        let mut all = Vec::new();
        while let Some(chunk) = chunks.next().await {
            all.extend_from_slice(&chunk.unwrap());
        }
        assert_eq!(all, b"hello");
        assert!(
            dir.path()
                .join(format!("samples/samples/{}.bfs", sha.to_hex()))
                .exists()
        );
    }
}

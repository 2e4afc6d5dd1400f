//! Checks a data set export while it is written, a chunk at a time: the first entry is
//! `manifest.json` with the digest the server announced, then exactly the manifest's
//! samples in its order, each with the SHA-256 its name and the manifest give, then the
//! end of the archive. A truncated, padded, swapped or reordered export never checks out.

use std::collections::VecDeque;

use botfleet_protocol::manifest::Sha256Digest;
use sha2::{Digest as _, Sha256};

use super::dataset::Manifest;
use super::export::{MANIFEST_ENTRY, sample_entry};

const BLOCK: usize = 512;
/// The largest manifest taken (a data set of the most samples is far smaller).
const MAX_MANIFEST_BYTES: u64 = 1 << 30;

/// Why an export did not check out.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ExportError {
    #[error("the export is not a tar archive: {0}")]
    Format(String),
    #[error("the first entry is {0:?}, not manifest.json")]
    NoManifest(String),
    #[error("the manifest's SHA-256 is {actual}, not {expected} as the server said")]
    ManifestDigest {
        expected: Sha256Digest,
        actual: Sha256Digest,
    },
    #[error("the manifest is not valid: {0}")]
    Manifest(String),
    #[error("entry {found:?} where the manifest has {expected:?} next")]
    Order { expected: String, found: String },
    #[error("{entry} is {actual} bytes; the manifest says {expected}")]
    Size {
        entry: String,
        expected: u64,
        actual: u64,
    },
    #[error("{entry} has SHA-256 {actual}, not its name's")]
    SampleDigest { entry: String, actual: Sha256Digest },
    #[error("the export ends early: {0}")]
    Truncated(String),
    #[error("the export goes on after its end")]
    Trailing,
}

/// What a checked export held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub digest: Sha256Digest,
    pub samples: u64,
    pub sample_bytes: u64,
}

enum State {
    /// Collecting a 512-byte header block.
    Header(Vec<u8>),
    Manifest {
        size: u64,
        bytes: Vec<u8>,
    },
    Sample {
        entry: String,
        sha256: Sha256Digest,
        size: u64,
        left: u64,
        hasher: Sha256,
    },
    /// Zero bytes to the next block.
    Padding(u64),
    /// After the first zero block: `n` zero bytes of the end seen so far.
    End(u64),
}

/// The check of one export, fed as it arrives.
pub struct ExportCheck {
    digest: Sha256Digest,
    state: State,
    /// The samples still to come, from the manifest; `None` before it.
    expected: Option<VecDeque<(Sha256Digest, u64)>>,
    samples: u64,
    sample_bytes: u64,
}

impl std::fmt::Debug for ExportCheck {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExportCheck")
            .field("digest", &self.digest)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}

fn padding(size: u64) -> u64 {
    (BLOCK as u64 - size % BLOCK as u64) % BLOCK as u64
}

impl ExportCheck {
    /// A check of the export of the data set whose manifest digest is `digest`.
    pub fn new(digest: Sha256Digest) -> Self {
        Self {
            digest,
            state: State::Header(Vec::with_capacity(BLOCK)),
            expected: None,
            samples: 0,
            sample_bytes: 0,
        }
    }

    /// Takes the next bytes of the export.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), ExportError> {
        while !data.is_empty() {
            let state = std::mem::replace(&mut self.state, State::End(0));
            self.state = match state {
                State::Header(mut block) => {
                    let take = (BLOCK - block.len()).min(data.len());
                    block.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if block.len() < BLOCK {
                        State::Header(block)
                    } else {
                        self.entry(&block)?
                    }
                }
                State::Manifest { size, mut bytes } => {
                    let left = usize::try_from(size - bytes.len() as u64).unwrap_or(usize::MAX);
                    let take = left.min(data.len());
                    bytes.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    if (bytes.len() as u64) < size {
                        State::Manifest { size, bytes }
                    } else {
                        self.manifest(&bytes)?;
                        State::Padding(padding(size))
                    }
                }
                State::Sample {
                    entry,
                    sha256,
                    size,
                    left,
                    mut hasher,
                } => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    hasher.update(&data[..take]);
                    data = &data[take..];
                    let left = left - take as u64;
                    if left > 0 {
                        State::Sample {
                            entry,
                            sha256,
                            size,
                            left,
                            hasher,
                        }
                    } else {
                        let actual = Sha256Digest::from_bytes(hasher.finalize().into());
                        if actual != sha256 {
                            return Err(ExportError::SampleDigest { entry, actual });
                        }
                        self.samples += 1;
                        State::Padding(padding(size))
                    }
                }
                State::Padding(left) => {
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(data.len());
                    data = &data[take..];
                    match left - take as u64 {
                        0 => State::Header(Vec::with_capacity(BLOCK)),
                        left => State::Padding(left),
                    }
                }
                State::End(seen) => {
                    if data.iter().any(|&b| b != 0) {
                        return Err(ExportError::Trailing);
                    }
                    let seen = seen + data.len() as u64;
                    data = &[];
                    State::End(seen)
                }
            };
        }
        Ok(())
    }

    /// Reads one header block: what the next entry is and whether it is the one expected.
    fn entry(&mut self, block: &[u8]) -> Result<State, ExportError> {
        if block.iter().all(|&b| b == 0) {
            return Ok(State::End(BLOCK as u64));
        }
        let header = tar::Header::from_byte_slice(block);
        let stored = header
            .cksum()
            .map_err(|e| ExportError::Format(e.to_string()))?;
        let computed: u32 = block
            .iter()
            .enumerate()
            .map(|(i, &b)| {
                if (148..156).contains(&i) {
                    32
                } else {
                    u32::from(b)
                }
            })
            .sum();
        if stored != computed {
            return Err(ExportError::Format("a header's checksum is wrong".into()));
        }
        let name = String::from_utf8_lossy(&header.path_bytes()).into_owned();
        let size = header
            .entry_size()
            .map_err(|e| ExportError::Format(e.to_string()))?;
        let Some(expected) = &mut self.expected else {
            if name != MANIFEST_ENTRY {
                return Err(ExportError::NoManifest(name));
            }
            if size > MAX_MANIFEST_BYTES {
                return Err(ExportError::Manifest(format!("{size} bytes is too large")));
            }
            return Ok(State::Manifest {
                size,
                bytes: Vec::with_capacity(usize::try_from(size).unwrap_or(0)),
            });
        };
        let Some((sha256, bytes)) = expected.pop_front() else {
            return Err(ExportError::Order {
                expected: "the end of the archive".into(),
                found: name,
            });
        };
        let wanted = sample_entry(&sha256);
        if name != wanted {
            return Err(ExportError::Order {
                expected: wanted,
                found: name,
            });
        }
        if size != bytes {
            return Err(ExportError::Size {
                entry: name,
                expected: bytes,
                actual: size,
            });
        }
        self.sample_bytes += size;
        // An empty entry's state ends on the next byte fed (the end blocks always follow).
        Ok(State::Sample {
            entry: name,
            sha256,
            size,
            left: size,
            hasher: Sha256::new(),
        })
    }

    fn manifest(&mut self, bytes: &[u8]) -> Result<(), ExportError> {
        let actual = Sha256Digest::of(bytes);
        if actual != self.digest {
            return Err(ExportError::ManifestDigest {
                expected: self.digest,
                actual,
            });
        }
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ExportError::Manifest(e.to_string()))?;
        self.expected = Some(
            manifest
                .samples
                .iter()
                .map(|s| (s.sha256, s.bytes))
                .collect(),
        );
        Ok(())
    }

    /// The export is complete: every sample of the manifest and the archive's end came.
    pub fn finish(self) -> Result<Checked, ExportError> {
        match self.state {
            State::End(seen) if seen >= 2 * BLOCK as u64 => {}
            State::End(_) => return Err(ExportError::Truncated("in its end blocks".into())),
            _ if self.expected.is_none() => {
                return Err(ExportError::Truncated("before the manifest".into()));
            }
            _ => return Err(ExportError::Truncated("inside an entry".into())),
        }
        match self.expected {
            None => Err(ExportError::Truncated("before the manifest".into())),
            Some(left) if !left.is_empty() => Err(ExportError::Truncated(format!(
                "{} samples of the manifest are missing",
                left.len()
            ))),
            Some(_) => Ok(Checked {
                digest: self.digest,
                samples: self.samples,
                sample_bytes: self.sample_bytes,
            }),
        }
    }
}

//! A data set's export: a tar stream of `manifest.json`, then `samples/<sha256>.bfs` in
//! manifest order, each file read from the blob store as it is sent (never the whole tar
//! in memory). Each entry is a ustar header, the data, zeros to the next 512-byte block;
//! two zero blocks end the archive. A sample whose stored bytes do not have the length and
//! digest its record says ends the stream with an error, so the client sees a cut
//! download, never a wrong file.

use std::io;

use botfleet_protocol::manifest::Sha256Digest;
use bytes::{Bytes, BytesMut};
use futures_util::stream::{self, BoxStream, Stream, StreamExt as _};
use sha2::{Digest as _, Sha256};

use super::record::SampleRecord;
use super::store::{BlobStore, sample_key};

/// The first entry of every export.
pub const MANIFEST_ENTRY: &str = "manifest.json";
const BLOCK: u64 = 512;

/// The name of a sample's entry.
pub fn sample_entry(sha256: &Sha256Digest) -> String {
    format!("samples/{}.bfs", sha256.to_hex())
}

fn padding(size: u64) -> u64 {
    (BLOCK - size % BLOCK) % BLOCK
}

/// The exact length of the tar of a manifest of `manifest_len` bytes and `samples`.
pub fn tar_length(manifest_len: u64, samples: &[SampleRecord]) -> u64 {
    let entry = |size: u64| BLOCK + size + padding(size);
    entry(manifest_len) + samples.iter().map(|s| entry(s.bytes)).sum::<u64>() + 2 * BLOCK
}

fn header(path: &str, size: u64, mtime: u64) -> io::Result<Bytes> {
    let mut header = tar::Header::new_ustar();
    header.set_path(path)?;
    header.set_size(size);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_cksum();
    Ok(Bytes::copy_from_slice(header.as_bytes()))
}

fn zeros(n: u64) -> Bytes {
    Bytes::from(vec![0u8; usize::try_from(n).unwrap_or(0)])
}

/// One sample file being sent.
struct Sending {
    record: SampleRecord,
    chunks: BoxStream<'static, Result<Bytes, super::store::StoreError>>,
    hasher: Sha256,
    seen: u64,
}

enum Phase {
    Manifest(Bytes),
    Next,
    Body(Box<Sending>),
    Done,
}

struct Export {
    store: BlobStore,
    samples: std::vec::IntoIter<SampleRecord>,
    mtime: u64,
    phase: Phase,
}

/// The tar of `manifest` (its exact bytes) and `samples` (its records, in its order).
pub fn stream_tar(
    store: BlobStore,
    manifest: Bytes,
    samples: Vec<SampleRecord>,
    mtime: u64,
) -> impl Stream<Item = io::Result<Bytes>> + Send + 'static {
    let export = Export {
        store,
        samples: samples.into_iter(),
        mtime,
        phase: Phase::Manifest(manifest),
    };
    stream::unfold(export, |mut export| async move {
        let item = export.next().await?;
        Some((item, export))
    })
}

impl Export {
    /// The next piece of the tar; after an error, nothing more.
    async fn next(&mut self) -> Option<io::Result<Bytes>> {
        loop {
            match std::mem::replace(&mut self.phase, Phase::Done) {
                Phase::Done => return None,
                Phase::Manifest(manifest) => {
                    let size = manifest.len() as u64;
                    let head = match header(MANIFEST_ENTRY, size, self.mtime) {
                        Ok(head) => head,
                        Err(err) => return Some(Err(err)),
                    };
                    let mut entry = BytesMut::with_capacity(head.len() + manifest.len() + 512);
                    entry.extend_from_slice(&head);
                    entry.extend_from_slice(&manifest);
                    entry.extend_from_slice(&zeros(padding(size)));
                    self.phase = Phase::Next;
                    return Some(Ok(entry.freeze()));
                }
                Phase::Next => {
                    let Some(record) = self.samples.next() else {
                        // Phase stays Done: the end of the archive is the last piece.
                        return Some(Ok(zeros(2 * BLOCK)));
                    };
                    let head = match header(&sample_entry(&record.sha256), record.bytes, self.mtime)
                    {
                        Ok(head) => head,
                        Err(err) => return Some(Err(err)),
                    };
                    let chunks = match self.store.stream(&sample_key(&record.sha256)).await {
                        Ok(chunks) => chunks,
                        Err(err) => return Some(Err(io::Error::other(err))),
                    };
                    self.phase = Phase::Body(Box::new(Sending {
                        record,
                        chunks,
                        hasher: Sha256::new(),
                        seen: 0,
                    }));
                    return Some(Ok(head));
                }
                Phase::Body(mut sending) => match sending.chunks.next().await {
                    Some(Ok(chunk)) => {
                        sending.seen += chunk.len() as u64;
                        if sending.seen > sending.record.bytes {
                            return Some(Err(corrupt(
                                &sending.record,
                                "is longer than its record says",
                            )));
                        }
                        sending.hasher.update(&chunk);
                        self.phase = Phase::Body(sending);
                        return Some(Ok(chunk));
                    }
                    Some(Err(err)) => return Some(Err(io::Error::other(err))),
                    None => {
                        let Sending {
                            record,
                            hasher,
                            seen,
                            ..
                        } = *sending;
                        if seen != record.bytes {
                            return Some(Err(corrupt(&record, "is shorter than its record says")));
                        }
                        if hasher.finalize().as_slice() != record.sha256.as_bytes() {
                            return Some(Err(corrupt(&record, "does not have its digest")));
                        }
                        self.phase = Phase::Next;
                        let pad = padding(record.bytes);
                        if pad > 0 {
                            return Some(Ok(zeros(pad)));
                        }
                    }
                },
            }
        }
    }
}

fn corrupt(record: &SampleRecord, what: &str) -> io::Error {
    tracing::error!(sha256 = %record.sha256, "a stored sample {what}; export cut");
    io::Error::new(
        io::ErrorKind::InvalidData,
        format!("stored sample {} {what}", record.sha256),
    )
}

#[cfg(test)]
mod tests {
    use std::io::Read as _;

    use botfleet_protocol::sample::CaptureRule;
    use futures_util::TryStreamExt as _;
    use jiff::Timestamp;

    use super::*;
    use crate::config::{DataConfig, StoreTarget};
    use crate::data::check::{ExportCheck, ExportError};
    use crate::data::dataset::{Selection, freeze};
    use crate::data::record::tests::header;

    /// A local store holding samples of 3, 600 and 1024 bytes, and a data set of them.
    async fn fixture(
        dir: &std::path::Path,
    ) -> (
        BlobStore,
        Vec<Vec<u8>>,
        Bytes,
        Vec<SampleRecord>,
        Sha256Digest,
    ) {
        let store = BlobStore::open(
            &StoreTarget::Local(dir.join("samples")),
            &DataConfig::default(),
        )
        .unwrap();
        let mut files = Vec::new();
        let mut records = Vec::new();
        for (i, len) in [3usize, 600, 1024].into_iter().enumerate() {
            let file: Vec<u8> = (0..len).map(|b| (b * 7 + i) as u8).collect();
            let sha = Sha256Digest::of(&file);
            store
                .put(&sample_key(&sha), Bytes::from(file.clone()))
                .await
                .unwrap();
            let at = format!("2026-01-01T10:0{i}:00Z");
            let h = header("robot-1", CaptureRule::Sampled, &at);
            records.push(SampleRecord::new(sha, h, len as u64, Timestamp::UNIX_EPOCH));
            files.push(file);
        }
        let (dataset, manifest) = freeze(
            "ds-1".into(),
            "n".into(),
            Selection::default(),
            records.clone(),
            Timestamp::UNIX_EPOCH,
        )
        .unwrap();
        (store, files, Bytes::from(manifest), records, dataset.digest)
    }

    async fn collect(
        store: &BlobStore,
        manifest: &Bytes,
        records: &[SampleRecord],
    ) -> io::Result<Vec<u8>> {
        let chunks: Vec<Bytes> = stream_tar(store.clone(), manifest.clone(), records.to_vec(), 0)
            .try_collect()
            .await?;
        Ok(chunks.concat())
    }

    fn check(tar: &[u8], digest: Sha256Digest, chunk: usize) -> Result<u64, ExportError> {
        let mut check = ExportCheck::new(digest);
        for piece in tar.chunks(chunk) {
            check.feed(piece)?;
        }
        check.finish().map(|c| c.samples)
    }

    #[tokio::test]
    async fn an_export_is_the_manifest_then_each_file_in_order_and_checks_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, files, manifest, records, digest) = fixture(dir.path()).await;
        let tar = collect(&store, &manifest, &records).await.unwrap();
        assert_eq!(
            tar.len() as u64,
            tar_length(manifest.len() as u64, &records)
        );
        let mut archive = tar::Archive::new(tar.as_slice());
        let mut entries = Vec::new();
        for entry in archive.entries().unwrap() {
            let mut entry = entry.unwrap();
            let name = entry.path().unwrap().to_string_lossy().into_owned();
            let mut data = Vec::new();
            entry.read_to_end(&mut data).unwrap();
            entries.push((name, data));
        }
        assert_eq!(entries[0], (MANIFEST_ENTRY.to_owned(), manifest.to_vec()));
        for ((name, data), (file, record)) in entries[1..].iter().zip(files.iter().zip(&records)) {
            assert_eq!(name, &sample_entry(&record.sha256));
            assert_eq!(data, file);
        }
        for chunk in [1, 7, 512, 513, 100_000] {
            assert_eq!(check(&tar, digest, chunk), Ok(3), "chunks of {chunk}");
        }
    }

    #[tokio::test]
    async fn a_changed_truncated_or_reordered_export_does_not_check_out() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _, manifest, records, digest) = fixture(dir.path()).await;
        let tar = collect(&store, &manifest, &records).await.unwrap();
        let wrong = Sha256Digest::of(b"another manifest");
        assert!(matches!(
            check(&tar, wrong, 512),
            Err(ExportError::ManifestDigest { .. })
        ));
        for cut in [100, 512 + 10, tar.len() - 1024, tar.len() - 1] {
            assert!(
                matches!(
                    check(&tar[..cut], digest, 64),
                    Err(ExportError::Truncated(_))
                ),
                "cut at {cut}"
            );
        }
        let mut flipped = tar.clone();
        let at = tar.len() - 1024 - 600; // inside the last sample's data
        flipped[at] ^= 1;
        assert!(matches!(
            check(&flipped, digest, 4096),
            Err(ExportError::SampleDigest { .. })
        ));
        let mut trailing = tar.clone();
        trailing.push(1);
        assert_eq!(check(&trailing, digest, 4096), Err(ExportError::Trailing));
        let mut swapped = records.clone();
        swapped.swap(0, 1);
        let reordered = collect(&store, &manifest, &swapped).await.unwrap();
        assert!(matches!(
            check(&reordered, digest, 4096),
            Err(ExportError::Order { .. })
        ));
    }

    #[tokio::test]
    async fn a_stored_file_without_its_digest_cuts_the_stream() {
        let dir = tempfile::tempdir().unwrap();
        let (store, files, manifest, records, _) = fixture(dir.path()).await;
        let mut forged = files[1].clone();
        forged[0] ^= 1;
        store
            .put(&sample_key(&records[1].sha256), Bytes::from(forged))
            .await
            .unwrap();
        let err = collect(&store, &manifest, &records).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        store
            .put(
                &sample_key(&records[1].sha256),
                Bytes::from_static(b"short"),
            )
            .await
            .unwrap();
        assert!(collect(&store, &manifest, &records).await.is_err());
    }
}

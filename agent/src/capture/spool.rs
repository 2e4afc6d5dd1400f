//! The spool: captured samples on disk (`{data_dir}/spool`), one file each, until the
//! uploader has handed them to the server.
//!
//! A file is named `{capture time, unix ns, 20 digits}-{sha256 of the file}.bfs`, so names
//! sort oldest first and the index is rebuilt from the folder at start. Files are written
//! crash-safe ([`crate::store::write_atomic`]: temp → fsync → rename → fsync of the folder);
//! a temp file left by a killed write is removed at start. The bounds (bytes, count, age)
//! are enforced after each write and at start, oldest first, each deletion counted.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use botfleet_protocol::manifest::Sha256Digest;
use jiff::Timestamp;
use tokio::sync::{Notify, watch};
use tracing::{debug, info, warn};

use super::settings::SpoolBounds;

/// The spool's folder under the data directory.
pub const DIR: &str = "spool";
const EXTENSION: &str = "bfs";
/// What [`crate::store::write_atomic`] names its temporary file.
const TEMP_EXTENSION: &str = "tmp";

/// One spooled sample. Ordered by capture time, so the first is the oldest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Entry {
    /// Capture time, nanoseconds since the Unix epoch.
    pub captured_ns: u64,
    /// The sample's id: the SHA-256 of its file.
    pub sha256: Sha256Digest,
    pub bytes: u64,
}

impl Entry {
    pub fn file_name(&self) -> String {
        format!(
            "{:020}-{}.{EXTENSION}",
            self.captured_ns,
            self.sha256.to_hex()
        )
    }

    /// Reads a spool file's name; `None` for anything else.
    fn parse(name: &str, bytes: u64) -> Option<Self> {
        let stem = name.strip_suffix(".bfs")?;
        let (time, sha) = stem.split_once('-')?;
        if time.len() != 20 || !time.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self {
            captured_ns: time.parse().ok()?,
            sha256: sha.parse().ok()?,
            bytes,
        })
    }

    fn age(&self, now: Timestamp) -> Duration {
        let now_ns = u64::try_from(now.as_nanosecond()).unwrap_or(0);
        Duration::from_nanos(now_ns.saturating_sub(self.captured_ns))
    }
}

/// Nanoseconds since the Unix epoch (0 before it).
pub fn unix_ns(at: Timestamp) -> u64 {
    u64::try_from(at.as_nanosecond()).unwrap_or(0)
}

/// Samples in the spool and their bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SpoolStats {
    pub samples: u64,
    pub bytes: u64,
}

/// Why a sample was not spooled.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// The disk refused it (full, read-only, the folder gone).
    #[error("{0}")]
    Write(#[from] crate::store::StoreError),
    #[error("a sample of {bytes} bytes is over capture.spool_max_bytes ({max})")]
    TooLarge { bytes: u64, max: u64 },
}

#[derive(Debug, Default)]
struct Index {
    entries: BTreeSet<Entry>,
    bytes: u64,
}

impl Index {
    fn stats(&self) -> SpoolStats {
        SpoolStats {
            samples: self.entries.len() as u64,
            bytes: self.bytes,
        }
    }

    fn insert(&mut self, entry: Entry) {
        if self.entries.insert(entry) {
            self.bytes = self.bytes.saturating_add(entry.bytes);
        }
    }

    fn remove(&mut self, entry: &Entry) -> bool {
        let removed = self.entries.remove(entry);
        if removed {
            self.bytes = self.bytes.saturating_sub(entry.bytes);
        }
        removed
    }
}

/// The spool; shared by the writer thread (adds) and the uploader (takes the oldest).
#[derive(Debug)]
pub struct Spool {
    dir: PathBuf,
    bounds: SpoolBounds,
    index: Mutex<Index>,
    stats: watch::Sender<SpoolStats>,
    /// Woken when a sample is added.
    added: Notify,
    /// Samples deleted unsent to stay within the bounds.
    dropped: AtomicU64,
}

impl Spool {
    /// Opens the spool in `dir`: removes leftovers of killed writes, rebuilds the index from
    /// the files and enforces the bounds at `now`. Never fails: a folder that cannot be made
    /// or read is logged, and every write to it then fails (and is counted).
    pub fn open(dir: &Path, bounds: SpoolBounds, now: Timestamp) -> Self {
        let mut index = Index::default();
        if let Err(e) = std::fs::create_dir_all(dir) {
            warn!(dir = %dir.display(), error = %e, "cannot make the spool folder; captured samples will not be kept");
        }
        match std::fs::read_dir(dir) {
            Ok(listing) => {
                for item in listing.flatten() {
                    let path = item.path();
                    let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    if path.extension().is_some_and(|e| e == TEMP_EXTENSION) {
                        match std::fs::remove_file(&path) {
                            Ok(()) => debug!(file = name, "removed a half-written sample"),
                            Err(e) => {
                                warn!(file = name, error = %e, "cannot remove a half-written sample")
                            }
                        }
                        continue;
                    }
                    let bytes = item.metadata().map(|m| m.len()).unwrap_or(0);
                    match Entry::parse(name, bytes) {
                        Some(entry) => index.insert(entry),
                        None => debug!(file = name, "not a spooled sample; left alone"),
                    }
                }
            }
            Err(e) => warn!(dir = %dir.display(), error = %e, "cannot read the spool folder"),
        }
        let stats = index.stats();
        let spool = Self {
            dir: dir.to_owned(),
            bounds,
            index: Mutex::new(index),
            stats: watch::Sender::new(stats),
            added: Notify::new(),
            dropped: AtomicU64::new(0),
        };
        spool.enforce(now);
        if stats.samples > 0 {
            info!(
                samples = stats.samples,
                bytes = stats.bytes,
                "spooled samples found"
            );
        }
        spool
    }

    fn index(&self) -> MutexGuard<'_, Index> {
        // Every change is one insert or remove with its byte count: a panic cannot leave
        // it half-done.
        self.index.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn path(&self, entry: &Entry) -> PathBuf {
        self.dir.join(entry.file_name())
    }

    /// Writes one sample file captured at `captured_ns`, then adds it ([`Spool::add`]).
    pub fn write(
        &self,
        captured_ns: u64,
        file: &[u8],
        now: Timestamp,
    ) -> Result<Entry, SpoolError> {
        let entry = self.store(captured_ns, file)?;
        self.add(entry, now);
        Ok(entry)
    }

    /// Writes one sample file, crash-safe, without indexing it yet.
    pub fn store(&self, captured_ns: u64, file: &[u8]) -> Result<Entry, SpoolError> {
        let bytes = file.len() as u64;
        if bytes > self.bounds.max_bytes {
            self.dropped.fetch_add(1, Ordering::Relaxed);
            return Err(SpoolError::TooLarge {
                bytes,
                max: self.bounds.max_bytes,
            });
        }
        let entry = Entry {
            captured_ns,
            sha256: Sha256Digest::of(file),
            bytes,
        };
        let path = self.path(&entry);
        if let Err(e) = crate::store::write_atomic(&path, file) {
            // A full disk leaves a partial temp file: do not keep it until the next start.
            let _ = std::fs::remove_file(path.with_extension(TEMP_EXTENSION));
            return Err(e.into());
        }
        Ok(entry)
    }

    /// Indexes a stored sample, enforces the bounds at `now` and wakes the uploader.
    pub fn add(&self, entry: Entry, now: Timestamp) {
        self.index().insert(entry);
        self.enforce(now);
        self.added.notify_one();
    }

    /// Deletes the oldest samples until the spool is within its bounds at `now`.
    pub fn enforce(&self, now: Timestamp) {
        let mut index = self.index();
        let mut dropped = 0u64;
        while let Some(oldest) = index.entries.first().copied() {
            let over = index.entries.len() as u64 > self.bounds.max_samples
                || index.bytes > self.bounds.max_bytes
                || self.bounds.max_age.is_some_and(|max| oldest.age(now) > max);
            if !over {
                break;
            }
            self.delete(&mut index, &oldest);
            dropped += 1;
        }
        if dropped > 0 {
            self.dropped.fetch_add(dropped, Ordering::Relaxed);
            info!(
                dropped,
                samples = index.entries.len(),
                "oldest spooled samples deleted to stay within the spool's bounds"
            );
        }
        self.stats.send_replace(index.stats());
    }

    fn delete(&self, index: &mut Index, entry: &Entry) {
        let path = self.path(entry);
        match std::fs::remove_file(&path) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(file = %path.display(), error = %e, "cannot delete a spooled sample"),
        }
        index.remove(entry);
    }

    /// The oldest sample, to upload next.
    pub fn oldest(&self) -> Option<Entry> {
        self.index().entries.first().copied()
    }

    /// Deletes `entry` (uploaded, refused or unreadable); `false` when the spool no longer
    /// had it (a bound took it meanwhile).
    pub fn remove(&self, entry: &Entry) -> bool {
        let mut index = self.index();
        let had = index.entries.contains(entry);
        self.delete(&mut index, entry);
        self.stats.send_replace(index.stats());
        had
    }

    /// Counts a sample lost from the spool other than by its bounds (unreadable, corrupt).
    pub fn count_lost(&self) {
        self.dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub fn stats(&self) -> SpoolStats {
        *self.stats.borrow()
    }

    /// Changes with every sample added or deleted.
    pub fn subscribe(&self) -> watch::Receiver<SpoolStats> {
        self.stats.subscribe()
    }

    /// Resolves when a sample is added (or was added since the last call).
    pub async fn added(&self) {
        self.added.notified().await;
    }

    /// Samples deleted unsent (bounds, or unreadable).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bounds(max_samples: u64, max_bytes: u64) -> SpoolBounds {
        SpoolBounds {
            max_bytes,
            max_samples,
            max_age: None,
        }
    }

    fn at(s: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + s).unwrap()
    }

    fn names(spool: &Spool) -> Vec<u64> {
        spool
            .index()
            .entries
            .iter()
            .map(|e| e.captured_ns)
            .collect()
    }

    #[test]
    fn samples_come_out_oldest_first_and_leave_on_remove() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), bounds(10, 1 << 20), at(0));
        let late = spool.write(unix_ns(at(2)), b"second", at(2)).unwrap();
        let early = spool.write(unix_ns(at(1)), b"first", at(2)).unwrap();
        assert_eq!(spool.oldest(), Some(early));
        assert_eq!(
            spool.stats(),
            SpoolStats {
                samples: 2,
                bytes: 11
            }
        );
        assert_eq!(std::fs::read(spool.path(&early)).unwrap(), b"first");
        assert_eq!(early.sha256, Sha256Digest::of(b"first"));
        assert!(spool.remove(&early));
        assert!(!spool.path(&early).exists());
        assert!(!spool.remove(&early), "gone already");
        assert_eq!(spool.oldest(), Some(late));
        assert_eq!(spool.dropped(), 0);
    }

    #[test]
    fn the_count_bound_drops_the_oldest_and_counts_them() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), bounds(3, 1 << 20), at(0));
        for s in 1..=5 {
            spool.write(unix_ns(at(s)), &[s as u8; 4], at(5)).unwrap();
        }
        assert_eq!(
            names(&spool),
            [unix_ns(at(3)), unix_ns(at(4)), unix_ns(at(5))]
        );
        assert_eq!(spool.dropped(), 2);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 3);
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_and_refuses_one_sample_over_it() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), bounds(100, 10), at(0));
        spool.write(unix_ns(at(1)), b"aaaa", at(1)).unwrap();
        spool.write(unix_ns(at(2)), b"bbbb", at(2)).unwrap();
        spool.write(unix_ns(at(3)), b"cccc", at(3)).unwrap();
        assert_eq!(names(&spool), [unix_ns(at(2)), unix_ns(at(3))]);
        assert_eq!(spool.stats().bytes, 8);
        assert!(matches!(
            spool.write(unix_ns(at(4)), &[0; 11], at(4)),
            Err(SpoolError::TooLarge { bytes: 11, max: 10 })
        ));
        assert_eq!(
            spool.stats().samples,
            2,
            "a sample too large drops nothing else"
        );
        assert_eq!(spool.dropped(), 2);
    }

    #[test]
    fn the_age_bound_drops_old_samples_at_start_and_later() {
        let dir = tempfile::tempdir().unwrap();
        let aged = SpoolBounds {
            max_age: Some(Duration::from_secs(60)),
            ..bounds(100, 1 << 20)
        };
        let spool = Spool::open(dir.path(), aged, at(0));
        spool.write(unix_ns(at(0)), b"old", at(0)).unwrap();
        spool.write(unix_ns(at(50)), b"new", at(50)).unwrap();
        spool.enforce(at(61));
        assert_eq!(names(&spool), [unix_ns(at(50))]);
        drop(spool);
        let reopened = Spool::open(dir.path(), aged, at(200));
        assert_eq!(reopened.stats().samples, 0);
        assert_eq!(reopened.dropped(), 1);
    }

    #[test]
    fn a_restart_rebuilds_the_index_and_removes_half_written_files() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = {
            let spool = Spool::open(dir.path(), bounds(10, 1 << 20), at(0));
            (
                spool.write(unix_ns(at(1)), b"one", at(1)).unwrap(),
                spool.write(unix_ns(at(2)), b"two!", at(2)).unwrap(),
            )
        };
        // What a write killed before its rename leaves, and a stranger's file.
        std::fs::write(dir.path().join("00000000000000000003-abc.tmp"), b"torn").unwrap();
        std::fs::write(dir.path().join("notes.txt"), b"mine").unwrap();
        let spool = Spool::open(dir.path(), bounds(10, 1 << 20), at(3));
        assert_eq!(spool.oldest(), Some(a));
        assert_eq!(
            spool.stats(),
            SpoolStats {
                samples: 2,
                bytes: 7
            }
        );
        assert!(spool.remove(&a));
        assert_eq!(spool.oldest(), Some(b));
        assert!(!dir.path().join("00000000000000000003-abc.tmp").exists());
        assert!(
            dir.path().join("notes.txt").exists(),
            "not ours, left alone"
        );
    }

    #[test]
    fn a_restart_over_smaller_bounds_drops_the_oldest() {
        let dir = tempfile::tempdir().unwrap();
        {
            let spool = Spool::open(dir.path(), bounds(10, 1 << 20), at(0));
            for s in 1..=4 {
                spool.write(unix_ns(at(s)), &[s as u8], at(s)).unwrap();
            }
        }
        let spool = Spool::open(dir.path(), bounds(1, 1 << 20), at(5));
        assert_eq!(names(&spool), [unix_ns(at(4))]);
        assert_eq!(spool.dropped(), 3);
    }

    #[test]
    fn a_write_the_disk_refuses_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        // A file where the folder should be: every write fails, whoever runs the test.
        let blocked = dir.path().join("spool");
        std::fs::write(&blocked, b"in the way").unwrap();
        let spool = Spool::open(&blocked, bounds(10, 1 << 20), at(0));
        assert!(matches!(
            spool.write(unix_ns(at(1)), b"x", at(1)),
            Err(SpoolError::Write(_))
        ));
        assert_eq!(spool.stats().samples, 0);
        // The folder gone after the start: the same.
        let gone = dir.path().join("gone");
        let spool = Spool::open(&gone, bounds(10, 1 << 20), at(0));
        std::fs::remove_dir(&gone).unwrap();
        assert!(spool.write(unix_ns(at(1)), b"x", at(1)).is_err());
        assert_eq!(spool.dropped(), 0, "a refused write is not a spool drop");
    }

    #[test]
    fn names_sort_by_capture_time_and_parse_back() {
        let e = Entry {
            captured_ns: 42,
            sha256: Sha256Digest::of(b"x"),
            bytes: 9,
        };
        let name = e.file_name();
        assert!(name.starts_with("00000000000000000042-"), "{name}");
        assert_eq!(Entry::parse(&name, 9), Some(e));
        assert_eq!(Entry::parse("42-abc.bfs", 1), None);
        assert_eq!(Entry::parse(&name.replace(".bfs", ".tmp"), 1), None);
    }
}

//! Messages that must reach the server (rollout events, status, info) wait here, on disk,
//! until the broker has acknowledged them (QoS 1 PUBACK).
//!
//! Layout: `{data_dir}/outbox/{seq:020}.{kind}`, one file per message, its bytes exactly as
//! published. One file per message rather than an append log: messages are few (a handful
//! per rollout stage and status change), a write is temp → fsync → rename → fsync(dir) as
//! for every other committed file of the agent, so a file either exists whole or not at all,
//! and removing an acknowledged message is one `unlink` with no log to compact. A power cut
//! between PUBACK and `unlink` publishes the message again; events carry an id, so the server
//! counts that as a duplicate and changes nothing.
//!
//! Status and info are retained snapshots: a new one replaces the one waiting before it
//! (only the latest matters). Bounded by entries and bytes: when full, snapshots go first,
//! then, as a last resort, the oldest events. Every drop is counted and reported in
//! telemetry (`dropped_messages`).

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, Write as _};
use std::path::{Path, PathBuf};

use botfleet_protocol::EventId;
use tracing::warn;

/// What an entry is; decides its topic and whether a newer one makes it obsolete.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum EntryKind {
    /// A rollout event: every one matters, dropped only as a last resort.
    Event,
    /// The retained status: only the latest matters.
    Status,
    /// The retained static facts: only the latest matters.
    Info,
}

impl EntryKind {
    fn extension(self) -> &'static str {
        match self {
            EntryKind::Event => "event",
            EntryKind::Status => "status",
            EntryKind::Info => "info",
        }
    }

    fn from_extension(ext: &str) -> Option<Self> {
        match ext {
            "event" => Some(EntryKind::Event),
            "status" => Some(EntryKind::Status),
            "info" => Some(EntryKind::Info),
            _ => None,
        }
    }

    /// Superseded by a newer entry of the same kind.
    fn is_snapshot(self) -> bool {
        !matches!(self, EntryKind::Event)
    }
}

/// One message waiting for its PUBACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub seq: u64,
    pub kind: EntryKind,
    pub payload: Vec<u8>,
}

/// How much the outbox may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_entries: usize,
    pub max_bytes: usize,
}

/// Why the outbox could not be opened or written.
#[derive(Debug, thiserror::Error)]
pub enum OutboxError {
    #[error("cannot open the outbox {path}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write outbox entry {path}; it is kept in memory only")]
    Write {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("a {size}-byte message does not fit an outbox of {max} bytes; dropped")]
    TooLarge { size: usize, max: usize },
}

/// The on-disk outbox. Pure bookkeeping plus explicit file writes; the link decides when
/// entries are published and acknowledged.
#[derive(Debug)]
pub struct Outbox {
    dir: PathBuf,
    limits: Limits,
    entries: BTreeMap<u64, Entry>,
    bytes: usize,
    next_seq: u64,
    dropped: u64,
}

/// A fresh, unique event id (128 random bits).
pub fn event_id() -> EventId {
    let id = format!("e-{:032x}", rand::random::<u128>());
    // 34 characters of `[0-9a-f-]`: always a valid id.
    EventId::new(id).unwrap_or_else(|_| unreachable!("a hex event id is valid"))
}

impl Outbox {
    /// Opens (creating) `dir` and loads what an earlier run left. Temp files of an
    /// interrupted write and files that are not ours are removed.
    pub fn open(dir: &Path, limits: Limits) -> Result<Self, OutboxError> {
        let open_err = |source| OutboxError::Open {
            path: dir.to_owned(),
            source,
        };
        fs::create_dir_all(dir).map_err(open_err)?;
        let mut entries = BTreeMap::new();
        let mut bytes = 0;
        for item in fs::read_dir(dir).map_err(open_err)? {
            let path = item.map_err(open_err)?.path();
            let Some((seq, kind)) = parse_name(&path) else {
                // An interrupted write (`*.tmp`) or a stranger: never published.
                let _ = fs::remove_file(&path);
                continue;
            };
            match fs::read(&path) {
                Ok(payload)
                    if serde_json::from_slice::<serde::de::IgnoredAny>(&payload).is_ok() =>
                {
                    bytes += payload.len();
                    entries.insert(seq, Entry { seq, kind, payload });
                }
                _ => {
                    warn!(path = %path.display(), "unreadable outbox entry removed");
                    let _ = fs::remove_file(&path);
                }
            }
        }
        let next_seq = entries.keys().next_back().map_or(0, |s| s + 1);
        let mut outbox = Self {
            dir: dir.to_owned(),
            limits,
            entries,
            bytes,
            next_seq,
            dropped: 0,
        };
        // Limits may have shrunk since the last run.
        outbox.make_room(None);
        Ok(outbox)
    }

    /// Appends a message, durably, making room first. The entry is kept (in memory) even
    /// when the write fails, so the message still goes out while the process lives.
    pub fn push(&mut self, kind: EntryKind, payload: Vec<u8>) -> Result<u64, OutboxError> {
        if payload.len() > self.limits.max_bytes {
            self.dropped += 1;
            return Err(OutboxError::TooLarge {
                size: payload.len(),
                max: self.limits.max_bytes,
            });
        }
        if kind.is_snapshot() {
            // A retained document replaces the one before it: only the latest matters.
            let older: Vec<u64> = self
                .entries
                .values()
                .filter(|e| e.kind == kind)
                .map(|e| e.seq)
                .collect();
            for seq in older {
                self.remove(seq);
            }
        }
        self.make_room(Some(payload.len()));
        let seq = self.next_seq;
        self.next_seq += 1;
        let path = self.path(seq, kind);
        let written = write_durably(&self.dir, &path, &payload);
        self.bytes += payload.len();
        self.entries.insert(seq, Entry { seq, kind, payload });
        written.map_err(|source| OutboxError::Write { path, source })?;
        Ok(seq)
    }

    /// The broker acknowledged `seq`: forget it.
    pub fn remove(&mut self, seq: u64) {
        if let Some(entry) = self.entries.remove(&seq) {
            self.bytes -= entry.payload.len();
            // A file that survives a crash here is published again and deduplicated.
            let _ = fs::remove_file(self.path(seq, entry.kind));
        }
    }

    /// Entries in the order they were appended.
    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn get(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(&seq)
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Messages dropped since this outbox was opened.
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// Over the limits once `incoming` (an entry's size) is added.
    fn is_full(&self, incoming: Option<usize>) -> bool {
        let (count, bytes) = incoming.map_or((0, 0), |size| (1, size));
        self.entries.len() + count > self.limits.max_entries
            || self.bytes + bytes > self.limits.max_bytes
    }

    /// Frees space for an incoming entry (its size): snapshots first (the agent publishes
    /// status and info again on every connection), then the oldest events.
    fn make_room(&mut self, incoming: Option<usize>) {
        while self.is_full(incoming) {
            let victim = self
                .entries
                .values()
                .find(|e| e.kind.is_snapshot())
                .or_else(|| self.entries.values().next())
                .map(|e| e.seq);
            let Some(seq) = victim else { return };
            self.drop_entry(seq);
        }
    }

    fn drop_entry(&mut self, seq: u64) {
        if let Some(entry) = self.entries.get(&seq) {
            warn!(
                seq,
                kind = entry.kind.extension(),
                "outbox full; message dropped"
            );
        }
        self.remove(seq);
        self.dropped += 1;
    }

    fn path(&self, seq: u64, kind: EntryKind) -> PathBuf {
        self.dir.join(format!("{seq:020}.{}", kind.extension()))
    }
}

fn parse_name(path: &Path) -> Option<(u64, EntryKind)> {
    let seq = path.file_stem()?.to_str()?.parse().ok()?;
    let kind = EntryKind::from_extension(path.extension()?.to_str()?)?;
    Some((seq, kind))
}

/// temp → fsync → rename → fsync(dir): the entry exists whole or not at all.
fn write_durably(dir: &Path, path: &Path, bytes: &[u8]) -> io::Result<()> {
    let temp = path.with_extension("tmp");
    let written = (|| {
        let mut file = File::create(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        fs::rename(&temp, path)
    })();
    if written.is_err() {
        // A full disk must not keep half a message around (nor the space it took).
        let _ = fs::remove_file(&temp);
    }
    written?;
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_entries: 4,
        max_bytes: 1024,
    };

    fn kinds(outbox: &Outbox) -> Vec<(EntryKind, Vec<u8>)> {
        outbox
            .entries()
            .map(|e| (e.kind, e.payload.clone()))
            .collect()
    }

    #[test]
    fn entries_survive_a_reopen_in_order_until_acknowledged() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        let a = outbox
            .push(EntryKind::Event, b"{\"n\":1}".to_vec())
            .unwrap();
        outbox
            .push(EntryKind::Status, b"{\"n\":2}".to_vec())
            .unwrap();
        outbox.remove(a);
        let c = outbox
            .push(EntryKind::Event, b"{\"n\":3}".to_vec())
            .unwrap();
        drop(outbox);

        let mut outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(
            kinds(&outbox),
            [
                (EntryKind::Status, b"{\"n\":2}".to_vec()),
                (EntryKind::Event, b"{\"n\":3}".to_vec())
            ]
        );
        // New entries sort after the old ones.
        let d = outbox.push(EntryKind::Event, b"{}".to_vec()).unwrap();
        assert!(d > c);
    }

    #[test]
    fn a_partial_write_is_discarded_on_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        outbox
            .push(EntryKind::Event, b"{\"whole\":true}".to_vec())
            .unwrap();
        drop(outbox);
        // A crash before the rename leaves a temp file; a torn file (no rename, e.g. copied
        // back from a broken disk) does not parse.
        std::fs::write(dir.path().join("00000000000000000007.tmp"), b"{\"half").unwrap();
        std::fs::write(dir.path().join("00000000000000000008.event"), b"{\"half").unwrap();

        let outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        assert_eq!(
            kinds(&outbox),
            [(EntryKind::Event, b"{\"whole\":true}".to_vec())]
        );
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 1, "the leftovers are removed");
    }

    #[test]
    fn a_new_status_replaces_the_waiting_one_and_snapshots_go_before_events() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        outbox
            .push(EntryKind::Status, b"{\"s\":1}".to_vec())
            .unwrap();
        outbox
            .push(EntryKind::Event, b"{\"e\":1}".to_vec())
            .unwrap();
        outbox
            .push(EntryKind::Status, b"{\"s\":2}".to_vec())
            .unwrap();
        outbox.push(EntryKind::Info, b"{\"i\":1}".to_vec()).unwrap();
        assert_eq!(
            kinds(&outbox),
            [
                (EntryKind::Event, b"{\"e\":1}".to_vec()),
                (EntryKind::Status, b"{\"s\":2}".to_vec()),
                (EntryKind::Info, b"{\"i\":1}".to_vec()),
            ]
        );
        assert_eq!(outbox.dropped(), 0, "a superseded snapshot is not a loss");

        // Full: the oldest snapshot makes room, not an event.
        outbox
            .push(EntryKind::Event, b"{\"e\":2}".to_vec())
            .unwrap();
        outbox
            .push(EntryKind::Event, b"{\"e\":3}".to_vec())
            .unwrap();
        assert_eq!(outbox.dropped(), 1);
        assert_eq!(
            kinds(&outbox),
            [
                (EntryKind::Event, b"{\"e\":1}".to_vec()),
                (EntryKind::Info, b"{\"i\":1}".to_vec()),
                (EntryKind::Event, b"{\"e\":2}".to_vec()),
                (EntryKind::Event, b"{\"e\":3}".to_vec()),
            ]
        );
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, 4);
    }

    #[test]
    fn as_a_last_resort_the_oldest_events_are_dropped_and_counted() {
        let dir = tempfile::tempdir().unwrap();
        let mut outbox = Outbox::open(dir.path(), LIMITS).unwrap();
        for n in 0..10 {
            outbox
                .push(EntryKind::Event, format!("{{\"e\":{n}}}").into_bytes())
                .unwrap();
        }
        assert_eq!(outbox.len(), LIMITS.max_entries);
        assert_eq!(outbox.dropped(), 6);
        assert_eq!(outbox.entries().next().unwrap().payload, b"{\"e\":6}");
        let files = std::fs::read_dir(dir.path()).unwrap().count();
        assert_eq!(files, LIMITS.max_entries);
    }

    #[test]
    fn the_byte_bound_holds_and_an_oversized_message_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let limits = Limits {
            max_entries: 100,
            max_bytes: 100,
        };
        let mut outbox = Outbox::open(dir.path(), limits).unwrap();
        let forty = format!("\"{}\"", "x".repeat(38)).into_bytes();
        for _ in 0..3 {
            outbox.push(EntryKind::Event, forty.clone()).unwrap();
        }
        assert_eq!(outbox.len(), 2);
        assert_eq!(outbox.dropped(), 1);
        assert!(matches!(
            outbox.push(EntryKind::Event, vec![b' '; 101]),
            Err(OutboxError::TooLarge { .. })
        ));
        assert_eq!(outbox.dropped(), 2);
    }

    #[test]
    fn event_ids_are_unique() {
        let ids: std::collections::HashSet<_> = (0..1000).map(|_| event_id()).collect();
        assert_eq!(ids.len(), 1000);
    }
}

//! Crash-safe file writes: temp file in the same directory → fsync → rename → fsync directory.
//! A reader (or a restarted server) sees the old file or the new one, never half of one.

use std::fs::{File, OpenOptions};
use std::io::{self, Write as _};
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};

/// Prefix of temp files; never a valid digest, device id or version, so never served.
pub const TEMP_PREFIX: &str = ".tmp-";

/// Whether an existing destination may be replaced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replace {
    Allow,
    /// Fail with `AlreadyExists` (for keys: never overwrite one silently).
    Refuse,
}

fn temp_path(dest: &Path) -> io::Result<PathBuf> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let name = dest
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "path has no file name"))?;
    let mut suffix = [0u8; 6];
    getrandom::fill(&mut suffix).map_err(io::Error::other)?;
    Ok(dir.join(format!(
        "{TEMP_PREFIX}{}-{}",
        name.to_string_lossy(),
        hex::encode(suffix)
    )))
}

/// Writes `bytes` to `dest` atomically with permission bits `mode`.
pub fn write_atomic(dest: &Path, bytes: &[u8], mode: u32, replace: Replace) -> io::Result<()> {
    let temp = temp_path(dest)?;
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(&temp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        match replace {
            Replace::Allow => std::fs::rename(&temp, dest)?,
            // A hard link fails when `dest` exists: "create if absent" without a race.
            Replace::Refuse => {
                std::fs::hard_link(&temp, dest)?;
                std::fs::remove_file(&temp)?;
            }
        }
        sync_dir(dest)
    })();
    if result.is_err() {
        // Best effort: the write already failed, a stray temp file is harmless.
        let _ = std::fs::remove_file(&temp);
    }
    result
}

/// Writes many files of one directory atomically, each with permission bits `mode`: every
/// file is new-or-old, never half written. Instead of an fsync per file (about a
/// millisecond each: ten seconds for ten thousand robots' desired documents) the data of all
/// temp files is flushed with one `syncfs`, then they are renamed and the directory is
/// flushed once.
///
/// The temp files are written a part at a time ([`Batch::write`], so a caller never holds
/// every file's bytes at once), then flushed and renamed together ([`Batch::finish`]).
/// Temp files of a batch dropped unfinished are removed.
#[derive(Debug)]
pub struct Batch {
    dir: PathBuf,
    /// (temp, destination) of every file written so far.
    written: Vec<(PathBuf, PathBuf)>,
}

impl Batch {
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            written: Vec::new(),
        }
    }

    /// Writes the temp files of `files`, with permission bits `mode`.
    pub fn write(&mut self, files: &[(PathBuf, Vec<u8>)], mode: u32) -> io::Result<()> {
        self.written.reserve(files.len());
        for (dest, bytes) in files {
            let temp = temp_path(dest)?;
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(mode)
                .open(&temp)?;
            self.written.push((temp, dest.clone()));
            file.write_all(bytes)?;
        }
        Ok(())
    }

    /// Flushes every temp file with one `syncfs`, renames them, flushes the directory.
    pub fn finish(mut self) -> io::Result<()> {
        let dir_file = File::open(&self.dir)?;
        rustix::fs::syncfs(&dir_file)?;
        while let Some((temp, dest)) = self.written.pop() {
            if let Err(err) = std::fs::rename(&temp, &dest) {
                self.written.push((temp, dest));
                return Err(err);
            }
        }
        dir_file.sync_all()
    }
}

impl Drop for Batch {
    fn drop(&mut self) {
        // Best effort: the batch already failed, a stray temp file is harmless.
        for (temp, _) in &self.written {
            let _ = std::fs::remove_file(temp);
        }
    }
}

/// Flushes the directory entry of `path` (the rename) to disk.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    File::open(dir)?.sync_all()
}

/// Creates `dir` and its parents, new levels with mode 0750.
pub fn create_dir(dir: &Path) -> io::Result<()> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o750)
        .create(dir)
}

/// Removes temp files a crash left in `dir`.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
            std::fs::remove_file(entry.path())?;
            removed += 1;
        }
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    #[test]
    fn writes_replace_and_keep_the_mode() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.json");
        write_atomic(&path, b"one", 0o600, Replace::Allow).unwrap();
        write_atomic(&path, b"two", 0o600, Replace::Allow).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    fn write_many(dir: &Path, files: &[(PathBuf, Vec<u8>)]) {
        let mut batch = Batch::new(dir);
        let (first, rest) = files.split_at(files.len() / 2);
        batch.write(first, 0o640).unwrap();
        batch.write(rest, 0o640).unwrap();
        batch.finish().unwrap();
    }

    #[test]
    fn many_files_are_written_and_replaced_with_no_temp_left() {
        let dir = tempfile::tempdir().unwrap();
        let files: Vec<(PathBuf, Vec<u8>)> = (0..20)
            .map(|i| (dir.path().join(format!("{i}.json")), vec![b'a'; i]))
            .collect();
        write_many(dir.path(), &files);
        let again: Vec<(PathBuf, Vec<u8>)> = files
            .iter()
            .map(|(p, _)| (p.clone(), b"new".to_vec()))
            .collect();
        write_many(dir.path(), &again);
        for (path, _) in &again {
            assert_eq!(std::fs::read(path).unwrap(), b"new");
            let mode = std::fs::metadata(path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o640);
        }
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 20);
    }

    #[test]
    fn refuse_never_overwrites() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_atomic(&path, b"first", 0o600, Replace::Refuse).unwrap();
        let err = write_atomic(&path, b"second", 0o600, Replace::Refuse).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::AlreadyExists);
        assert_eq!(std::fs::read(&path).unwrap(), b"first");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn stale_temps_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".tmp-x-123"), b"").unwrap();
        std::fs::write(dir.path().join("keep"), b"").unwrap();
        assert_eq!(remove_stale_temps(dir.path()).unwrap(), 1);
        assert!(dir.path().join("keep").exists());
    }
}

//! A small real filesystem that fills up: a tmpfs, for full-disk tests (root only).

use std::io::Write as _;
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A tmpfs mounted for a test; unmounted (lazily, so a file still open cannot block it)
/// when dropped.
pub struct Tmpfs {
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`mount -o size=`, e.g. `2m`) on `dir`; `None` where this
    /// process may not mount (not root, no CAP_SYS_ADMIN).
    pub fn mount(dir: &Path, size: &str) -> Option<Self> {
        std::fs::create_dir_all(dir).ok()?;
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .ok()?;
        status.success().then(|| Self {
            dir: dir.to_owned(),
        })
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Whether this process runs as root (mounting a tmpfs needs it).
pub fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// Writes `path` until the filesystem has no page left.
pub fn fill(path: &Path) -> std::io::Result<()> {
    let mut file = std::fs::File::create(path)?;
    for chunk in [64 * 1024, 4096, 1] {
        let block = vec![0xeeu8; chunk];
        while file.write_all(&block).is_ok() {}
    }
    let _ = file.sync_all();
    Ok(())
}

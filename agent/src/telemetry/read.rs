//! Defensive reads of small kernel files (sysfs, procfs, /etc): size-capped, any bytes
//! accepted (non-UTF-8 is replaced), trailing NULs and whitespace trimmed, numbers parsed
//! without ever panicking. A file that is missing, unreadable, empty or garbage is `None`.

use std::io::Read;
use std::path::Path;

/// Kernel attribute files are one page at most; nothing we read is larger.
const MAX_FILE_BYTES: u64 = 4096;

/// Why a file gave no value (for the one debug line a missing probe logs).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("cannot read: {0}")]
    Io(#[from] std::io::Error),
    #[error("empty")]
    Empty,
    #[error("not a number: {0:?}")]
    NotANumber(String),
}

/// The file's text: at most a page, lossy UTF-8, without trailing NULs or whitespace.
pub fn text(path: &Path) -> Result<String, ReadError> {
    let file = std::fs::File::open(path)?;
    let mut bytes = Vec::new();
    file.take(MAX_FILE_BYTES).read_to_end(&mut bytes)?;
    let text = String::from_utf8_lossy(&bytes);
    let text = text.trim_matches(|c: char| c == '\0' || c.is_whitespace());
    if text.is_empty() {
        return Err(ReadError::Empty);
    }
    Ok(text.to_owned())
}

/// `text`, or `None`.
pub fn opt_text(path: &Path) -> Option<String> {
    text(path).ok()
}

/// The first whitespace-separated token as an integer (`"32760 ma"` → 32760).
pub fn int(path: &Path) -> Result<i64, ReadError> {
    parse_int(&text(path)?)
}

pub fn parse_int(text: &str) -> Result<i64, ReadError> {
    let token = text.split_whitespace().next().unwrap_or_default();
    token
        .parse::<i64>()
        .map_err(|_| ReadError::NotANumber(token.chars().take(32).collect()))
}

/// A non-negative integer that fits `u64`, or `None`.
pub fn opt_u64(path: &Path) -> Option<u64> {
    int(path).ok().and_then(|v| u64::try_from(v).ok())
}

/// Hz → MHz, `None` for values no clock has (negative or beyond 100 GHz).
pub fn hz_to_mhz(hz: i64) -> Option<u32> {
    if !(0..=100_000_000_000).contains(&hz) {
        return None;
    }
    u32::try_from(hz / 1_000_000).ok()
}

/// The names in a directory (lossy), sorted, so every scan sees the same order.
pub fn dir_names(path: &Path) -> Vec<String> {
    let Ok(entries) = std::fs::read_dir(path) else {
        return Vec::new();
    };
    let mut names: Vec<String> = entries
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Bounded, printable sensor or rail name.
pub fn clean_name(raw: &str) -> Option<String> {
    let name: String = raw
        .chars()
        .filter(|c| !c.is_control())
        .take(64)
        .collect::<String>()
        .trim()
        .to_owned();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_truncated_and_huge_values_are_none_never_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, bytes: &[u8]| {
            let p = dir.path().join(name);
            std::fs::write(&p, bytes).unwrap();
            p
        };
        assert!(matches!(
            int(&write("garbage", b"\xff\xfe not a number")),
            Err(ReadError::NotANumber(_))
        ));
        assert!(matches!(
            int(&write("empty", b"\0\n")),
            Err(ReadError::Empty)
        ));
        assert!(int(&write("huge", b"99999999999999999999999999")).is_err());
        assert_eq!(int(&write("unit", b"32760 ma\n")).unwrap(), 32760);
        assert_eq!(opt_u64(&write("negative", b"-256000")), None);
        assert!(matches!(
            int(&dir.path().join("missing")),
            Err(ReadError::Io(_))
        ));
        // A file far larger than a page is read only up to the cap.
        let big = write("big", &vec![b'7'; 1 << 20]);
        assert!(text(&big).unwrap().len() <= 4096);
        assert_eq!(hz_to_mhz(1_300_500_000), Some(1300));
        assert_eq!(hz_to_mhz(-1), None);
        assert_eq!(hz_to_mhz(i64::MAX), None);
    }

    #[test]
    fn names_are_bounded_and_printable() {
        assert_eq!(clean_name("GPU-therm\u{7}").as_deref(), Some("GPU-therm"));
        assert_eq!(clean_name(" \n"), None);
        assert_eq!(clean_name(&"x".repeat(500)).map(|n| n.len()), Some(64));
    }
}

//! Where logs go: the journal (structured fields) when systemd started us, else stderr.

use std::ffi::OsStr;
use std::io::IsTerminal;

use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// The chosen log destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogTarget {
    Journald,
    Stderr,
}

/// systemd sets `JOURNAL_STREAM` when our stderr is connected to the journal.
pub fn target(journal_stream: Option<&OsStr>) -> LogTarget {
    match journal_stream {
        Some(v) if !v.is_empty() => LogTarget::Journald,
        _ => LogTarget::Stderr,
    }
}

/// Installs the global subscriber; `RUST_LOG` filters (default `info`). Falls back to
/// stderr if the journal's socket cannot be opened. Returns where logs go.
pub fn init() -> LogTarget {
    let filter = || EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    if target(std::env::var_os("JOURNAL_STREAM").as_deref()) == LogTarget::Journald
        && let Ok(journald) = tracing_journald::layer()
    {
        // Span and event fields (device, slot, …) become journal fields:
        // `journalctl -u botfleet-agent SLOT=orientation`.
        tracing_subscriber::registry()
            .with(filter())
            .with(journald.with_syslog_identifier("botfleet-agent".to_owned()))
            .init();
        return LogTarget::Journald;
    }
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    LogTarget::Stderr
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_journal_stream_logs_go_to_stderr() {
        assert_eq!(target(None), LogTarget::Stderr);
        assert_eq!(target(Some(OsStr::new(""))), LogTarget::Stderr);
        assert_eq!(target(Some(OsStr::new("8:12345"))), LogTarget::Journald);
    }
}

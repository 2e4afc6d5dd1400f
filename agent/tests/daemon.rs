//! The agent binary as systemd runs it: start-up line, READY=1 only once the inference
//! API listens, watchdog pings, STOPPING=1 and a clean exit on SIGTERM; logs on stderr
//! when there is no journal.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixDatagram;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(30);

/// The agent's configuration in `dir`; `inference` adds to its `[inference]` table.
fn config(dir: &std::path::Path, inference: &str) -> std::path::PathBuf {
    let key = botfleet_protocol::manifest::format_public_key(
        &botfleet_protocol::ManifestSigner::from_secret([3; 32]).public_key(),
    );
    let path = dir.join("agent.toml");
    std::fs::write(
        &path,
        format!(
            "device_id = \"robot-1\"\ndata_dir = \"{}\"\ntrusted_keys = [\"{key}\"]\n\
             [mqtt]\nurl = \"mqtt://127.0.0.1:9\"\n[inference]\nlisten = \"127.0.0.1:0\"\n{inference}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    path
}

/// Stderr lines, as they come.
fn lines(child: &mut Child) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    let stderr = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { return };
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

fn wait_for_line(rx: &mpsc::Receiver<String>, needle: &str) -> String {
    loop {
        let line = rx
            .recv_timeout(WAIT)
            .unwrap_or_else(|_| panic!("no line with {needle:?}"));
        if line.contains(needle) {
            return line;
        }
    }
}

fn datagram(sock: &UnixDatagram) -> String {
    let mut buf = [0u8; 512];
    let n = sock
        .recv(&mut buf)
        .unwrap_or_else(|e| panic!("no notification within the timeout: {e} ({:?})", e.kind()));
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

#[test]
fn under_systemd_ready_comes_after_the_api_listens_then_watchdog_pings_then_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).unwrap();
    sock.set_read_timeout(Some(WAIT)).unwrap();
    // The inference API on a Unix socket too, where an earlier run left its socket.
    let api_socket = dir.path().join("inference.sock");
    drop(std::os::unix::net::UnixListener::bind(&api_socket).unwrap());
    let inference = format!("unix_socket = \"{}\"", api_socket.display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_botfleet-agent"))
        .arg("--config")
        .arg(config(dir.path(), &inference))
        .env_remove("JOURNAL_STREAM")
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let rx = lines(&mut child);
    let first = wait_for_line(&rx, "botfleet-agent starting");
    assert!(first.contains(env!("CARGO_PKG_VERSION")), "{first}");
    assert!(first.contains("commit="), "{first}");
    assert!(first.contains("agent.toml"), "{first}");

    assert_eq!(datagram(&sock), "READY=1\n");
    // By READY the API is up: the started line (logged before READY) names its address.
    let started = wait_for_line(&rx, "botfleet-agent started");
    let addr = started
        .split_whitespace()
        .find_map(|w| w.strip_prefix("inference="))
        .unwrap();
    std::net::TcpStream::connect(addr).unwrap();
    // So does the Unix socket: the stale one replaced, mode 0660, speaking the same API.
    let mode = std::fs::metadata(&api_socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660, "{mode:o}");
    let mut stream = std::os::unix::net::UnixStream::connect(&api_socket).unwrap();
    stream.set_read_timeout(Some(WAIT)).unwrap();
    stream
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: robot\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(r#"{"live":true}"#), "{answer}");
    assert_eq!(datagram(&sock), "WATCHDOG=1\n");
    assert_eq!(datagram(&sock), "WATCHDOG=1\n");

    Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    assert_eq!(datagram(&sock), "STOPPING=1\n");
    assert!(child.wait().unwrap().success());
    assert!(
        !api_socket.exists(),
        "the socket is removed on a clean stop"
    );
}

#[test]
fn a_file_that_is_not_a_socket_where_the_unix_socket_goes_stops_the_start_with_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let in_the_way = dir.path().join("inference.sock");
    std::fs::write(&in_the_way, "precious").unwrap();
    let inference = format!("unix_socket = \"{}\"", in_the_way.display());
    let out = Command::new(env!("CARGO_BIN_EXE_botfleet-agent"))
        .arg("--config")
        .arg(config(dir.path(), &inference))
        .env_remove("JOURNAL_STREAM")
        .env_remove("NOTIFY_SOCKET")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen on the Unix socket"),
        "{stderr}"
    );
    assert!(stderr.contains("not a socket"), "{stderr}");
    assert_eq!(std::fs::read_to_string(&in_the_way).unwrap(), "precious");
}

#[test]
fn without_a_journal_the_logs_go_to_stderr_even_if_journal_stream_is_set() {
    let dir = tempfile::tempdir().unwrap();
    for journal_stream in [None, Some("8:12345")] {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_botfleet-agent"));
        cmd.arg("--config").arg(dir.path().join("missing.toml"));
        cmd.env_remove("JOURNAL_STREAM").env("RUST_LOG", "info");
        if let Some(v) = journal_stream {
            if std::path::Path::new("/run/systemd/journal/socket").exists() {
                continue; // a real journal would take these lines
            }
            cmd.env("JOURNAL_STREAM", v);
        }
        let out = cmd.output().unwrap();
        assert_eq!(out.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stderr.contains("missing.toml"),
            "{journal_stream:?}: {stderr}"
        );
    }
}

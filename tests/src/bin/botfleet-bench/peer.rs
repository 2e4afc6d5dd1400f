//! Python onnxruntime as a child process (`bench/ort_peer.py`), one JSON line per request:
//! its runs are timed inside Python around `session.run`, so the pipe costs nothing measured,
//! and they can alternate run by run with the engines timed here.

use std::io::{BufRead, BufReader, Write};
use std::path::Path;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{Context, Result, bail};
use serde_json::{Value, json};

use crate::fixtures::root;

pub struct Peer {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `bench/ort_peer.py` with `python` (a venv with onnxruntime and numpy).
    pub fn start(python: &Path) -> Result<Self> {
        let mut child = Command::new(python)
            .arg(root().join("bench/ort_peer.py"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("starting the onnxruntime peer with {}", python.display()))?;
        let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
            bail!("the onnxruntime peer has no pipes");
        };
        Ok(Self {
            child,
            stdin,
            stdout: BufReader::new(stdout),
        })
    }

    /// One request, one answer; an answer with `error` is an error.
    pub fn ask(&mut self, request: &Value) -> Result<Value> {
        writeln!(self.stdin, "{request}")?;
        self.stdin.flush()?;
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("the onnxruntime peer exited");
        }
        let answer: Value = serde_json::from_str(&line).context("the peer's answer")?;
        if let Some(e) = answer["error"].as_str() {
            bail!("onnxruntime peer: {e}");
        }
        Ok(answer)
    }

    /// One inference, timed by the peer, in ms.
    pub fn run(&mut self) -> Result<f64> {
        self.ask(&json!({"op": "run"}))?["ms"]
            .as_f64()
            .context("the peer's answer has no time")
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.stdin.flush();
        let _ = self.child.wait();
    }
}

//! The writer thread: takes copies off the serving path's queue, encodes them as sample
//! files ([`botfleet_protocol::sample::encode`]) and spools them. A write the disk refuses
//! is counted and logged (at most once a minute), never more.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use botfleet_engine::Tensor;
use botfleet_protocol::DeviceId;
use botfleet_protocol::sample::{SAMPLE_SCHEMA, SampleHeader, SampleTensor, encode};
use jiff::Timestamp;
use tracing::warn;

use super::spool::{Spool, SpoolError, unix_ns};
use super::{Counters, Pending};

/// The least time between two warnings about refused writes.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// Lets one warning through per [`LOG_EVERY`] and counts the ones held back.
#[derive(Debug, Default)]
pub struct LogLimit {
    last: Option<Instant>,
    held_back: u64,
}

impl LogLimit {
    /// `Some(held back since the last one)` when a warning may go out at `now`.
    pub fn allow(&mut self, now: Instant) -> Option<u64> {
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < LOG_EVERY)
        {
            self.held_back += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.held_back))
    }
}

/// A sample file's header and tensor bytes for `pending`.
pub fn sample_file(device: &DeviceId, pending: &Pending) -> Result<Vec<u8>, String> {
    fn describe(tensors: &[Tensor]) -> Vec<SampleTensor> {
        tensors
            .iter()
            .map(|t| SampleTensor {
                name: t.name.clone(),
                datatype: t.data.datatype(),
                shape: t.shape.clone(),
            })
            .collect()
    }
    let header = SampleHeader {
        schema: SAMPLE_SCHEMA,
        device: device.clone(),
        slot: pending.served.slot.clone(),
        model: pending.served.model.clone(),
        engine: pending.served.engine,
        captured_at: pending.captured_at,
        rule: pending.fired.rule,
        detail: pending.fired.detail.clone(),
        candidate: pending.candidate.clone(),
        latency_ms: pending.latency_ms,
        inputs: describe(&pending.inputs),
        outputs: describe(&pending.outputs),
        candidate_outputs: describe(&pending.candidate_outputs),
    };
    let data: Vec<Vec<u8>> = pending
        .inputs
        .iter()
        .chain(&pending.outputs)
        .chain(&pending.candidate_outputs)
        .map(|t| {
            let mut bytes = Vec::new();
            crate::serve::encode_tensor(&t.data, &mut bytes);
            bytes
        })
        .collect();
    let parts: Vec<&[u8]> = data.iter().map(Vec::as_slice).collect();
    encode(&header, &parts).map_err(|e| e.to_string())
}

/// The writer's state.
#[derive(Debug)]
pub struct Writer {
    pub device: DeviceId,
    pub spool: Arc<Spool>,
    pub counters: Arc<Counters>,
    pub log: LogLimit,
    /// The queue's byte count, given back as each copy is done with.
    pub queued: Arc<AtomicUsize>,
}

impl Writer {
    /// Spools every copy from `rx` until the serving path's end is gone. Blocking.
    pub fn run(mut self, rx: &Receiver<Pending>) {
        crate::loader::lower_priority();
        self.drain(rx);
    }

    /// Spools every copy from `rx`, giving its bytes back to the queue, until the serving
    /// path's end is gone.
    pub fn drain(&mut self, rx: &Receiver<Pending>) {
        for pending in rx {
            self.write(&pending);
            self.queued.fetch_sub(pending.size(), Ordering::Relaxed);
        }
    }

    /// Encodes and spools one copy; counts what happened.
    pub fn write(&mut self, pending: &Pending) {
        let file = match sample_file(&self.device, pending) {
            Ok(file) => file,
            Err(e) => {
                self.refused(&format!("the sample could not be encoded: {e}"));
                return;
            }
        };
        match self.spool.store(unix_ns(pending.captured_at), &file) {
            // Counted before the spool shows it, so telemetry never shows a sample it
            // has not counted.
            Ok(entry) => {
                self.counters.captured(pending.fired.rule);
                self.spool.add(entry, Timestamp::now());
            }
            // Counted by the spool, as its bounds' drops are.
            Err(e @ SpoolError::TooLarge { .. }) => {
                if self.log.allow(Instant::now()).is_some() {
                    warn!(slot = %pending.served.slot, error = %e, "captured sample not kept");
                }
            }
            Err(SpoolError::Write(e)) => self.refused(&e.to_string()),
        }
    }

    fn refused(&mut self, why: &str) {
        self.counters.dropped_write();
        if let Some(held_back) = self.log.allow(Instant::now()) {
            warn!(
                error = why,
                held_back, "captured sample not written (serving goes on)"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_a_minute_goes_out_and_the_rest_are_counted() {
        let t0 = Instant::now();
        let mut limit = LogLimit::default();
        assert_eq!(limit.allow(t0), Some(0));
        assert_eq!(limit.allow(t0 + Duration::from_secs(1)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(59)), None);
        assert_eq!(limit.allow(t0 + Duration::from_secs(60)), Some(2));
        assert_eq!(limit.allow(t0 + Duration::from_secs(61)), None);
    }
}

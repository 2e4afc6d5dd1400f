//! The agent's own cost: CPU time from `/proc/self/stat`, resident memory from
//! `/proc/self/status` (proc(5)). Always the real procfs: it measures this process.

use std::path::Path;
use std::time::Instant;

use super::read;

/// procfs reports CPU times in USER_HZ ticks, fixed at 100 on Linux for every architecture
/// we run on (the kernel's `CONFIG_HZ` is not visible here).
const USER_HZ: f64 = 100.0;

/// The shortest window a CPU figure is given for.
const MIN_WINDOW_S: f64 = 0.2;

/// CPU ticks at the previous sample.
#[derive(Debug)]
pub struct SelfUsage {
    last: Option<(u64, Instant)>,
}

impl Default for SelfUsage {
    /// Starts the window now.
    fn default() -> Self {
        Self {
            last: cpu_ticks(Path::new("/proc/self/stat")).map(|t| (t, Instant::now())),
        }
    }
}

impl SelfUsage {
    /// CPU use since the last call, in percent of one core; resident memory in bytes.
    pub fn sample(&mut self) -> (Option<f32>, Option<u64>) {
        let now = Instant::now();
        let ticks = cpu_ticks(Path::new("/proc/self/stat"));
        let cpu = match (self.last, ticks) {
            (Some((before, at)), Some(t)) if t >= before => {
                let secs = now.duration_since(at).as_secs_f64();
                // Ticks are 10 ms: over a shorter window the figure is noise.
                (secs >= MIN_WINDOW_S)
                    .then(|| ((t - before) as f64 / USER_HZ / secs * 100.0) as f32)
            }
            _ => None,
        };
        self.last = ticks.map(|t| (t, now));
        (cpu, rss_bytes(Path::new("/proc/self/status")))
    }
}

/// utime + stime (fields 14 and 15). The command name (field 2) may hold spaces and
/// parentheses, so fields are counted after its last `)`.
pub fn cpu_ticks(stat: &Path) -> Option<u64> {
    parse_cpu_ticks(&read::opt_text(stat)?)
}

pub fn parse_cpu_ticks(text: &str) -> Option<u64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut fields = rest.split_whitespace().skip(11); // field 3 is the first after ')'
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    utime.checked_add(stime)
}

/// `VmRSS:     12345 kB` → bytes.
pub fn rss_bytes(status: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(status).ok()?;
    parse_rss(&text)
}

pub fn parse_rss(text: &str) -> Option<u64> {
    let line = text.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_lines_with_odd_command_names_parse() {
        let stat = "4242 (bot fleet) (x)) S 1 4242 4242 0 -1 4194560 900 0 0 0 250 50 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("4242 (truncated) S 1 2"), None);
        assert_eq!(parse_cpu_ticks("no parenthesis"), None);
    }

    #[test]
    fn rss_is_read_in_bytes() {
        assert_eq!(
            parse_rss("Name:\tx\nVmRSS:\t   9876 kB\n"),
            Some(9876 * 1024)
        );
        assert_eq!(parse_rss("VmRSS: lots kB"), None);
        assert!(SelfUsage::default().sample().1.is_some_and(|rss| rss > 0));
    }
}

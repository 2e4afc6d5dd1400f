//! NVIDIA Jetson facts and figures from sysfs and /etc, under a root path so tests can
//! point it at a fixture tree. NVML reports "Not Supported" on Jetson, so the integrated
//! GPU is read the way jetson_stats (github.com/rbonghi/jetson_stats) reads it; each path
//! below names the jetson_stats file that uses it.

use std::path::{Path, PathBuf};

use botfleet_protocol::messages::{BoardTelemetry, GpuSource, GpuTelemetry, JetsonInfo};

use super::power::Rails;
use super::read;

/// Device-tree names of Jetson integrated GPUs (jtop/core/gpu.py, `find_igpu`).
const IGPU_NAMES: [&str; 4] = ["gv11b", "gp10b", "ga10b", "gpu"];

/// The EMC clock rate in Hz (jtop/core/memory.py, `read_emc`).
const EMC_RATE: &str = "sys/kernel/debug/bpmp/debug/clk/emc/rate";

/// L4T release → JetPack, from NVIDIA's JetPack archive
/// (jtop/core/jetson_variables.py keeps the same table as `NVIDIA_JETPACK`).
const JETPACK: &[(&str, &str)] = &[
    ("36.4.3", "6.2"),
    ("36.4.0", "6.1"),
    ("36.3.0", "6.0"),
    ("36.2.0", "6.0 DP"),
    ("35.6.0", "5.1.4"),
    ("35.5.0", "5.1.3"),
    ("35.4.1", "5.1.2"),
    ("35.3.1", "5.1.1"),
    ("35.2.1", "5.1"),
    ("35.1.0", "5.0.2"),
    ("32.7.4", "4.6.4"),
    ("32.7.3", "4.6.3"),
    ("32.7.2", "4.6.2"),
    ("32.7.1", "4.6.1"),
    ("32.6.1", "4.6"),
    ("32.5.1", "4.5.1"),
    ("32.5.0", "4.5"),
];

/// The board model from the device tree: `{root}/proc/device-tree/model`
/// (jtop/core/jetson_variables.py reads the same node as `/sys/firmware/devicetree/base/model`).
pub fn board_model(root: &Path) -> Option<String> {
    read::opt_text(&root.join("proc/device-tree/model")).and_then(|m| read::clean_name(&m))
}

/// `# R35 (release), REVISION: 4.1, GCID: …` → `35.4.1` (jetson_variables.py, `get_nvidia_l4t`).
pub fn parse_l4t(text: &str) -> Option<String> {
    let first = text.lines().next()?;
    let mut parts = first.split(',');
    let release = parts.next()?.trim().strip_prefix("# R")?;
    let release = release.split_whitespace().next()?;
    let revision = parts.next()?.trim().strip_prefix("REVISION:")?.trim();
    let valid = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_digit() || c == '.');
    (valid(release) && valid(revision)).then(|| format!("{release}.{revision}"))
}

/// The JetPack version of an L4T release, where known.
pub fn jetpack_for(l4t: &str) -> Option<&'static str> {
    JETPACK.iter().find(|(r, _)| *r == l4t).map(|(_, jp)| *jp)
}

/// The integrated GPU: its devfreq node (clocks) and its device node (load).
#[derive(Debug, Clone)]
struct Igpu {
    name: String,
    devfreq: PathBuf,
}

/// Jetson probes found at start-up.
#[derive(Debug)]
pub struct Jetson {
    root: PathBuf,
    igpu: Option<Igpu>,
    rails: Rails,
}

impl Jetson {
    pub fn discover(root: &Path) -> Self {
        let igpu = find_igpu(root);
        if igpu.is_none() {
            tracing::debug!(root = %root.display(), "no Jetson integrated GPU in /sys/class/devfreq");
        }
        if let Err(e) = read::int(&root.join(EMC_RATE)) {
            tracing::debug!(error = %e, "no EMC clock (debugfs, root only); EMC figures absent");
        }
        if power_mode(root).is_none() {
            tracing::debug!("no readable nvpmodel state; power mode absent");
        }
        Self {
            root: root.to_owned(),
            igpu,
            rails: Rails::discover(root),
        }
    }

    /// Static facts; `None` on a machine that is not a Jetson.
    pub fn info(&self) -> Option<JetsonInfo> {
        let l4t =
            read::opt_text(&self.root.join("etc/nv_tegra_release")).and_then(|t| parse_l4t(&t));
        if l4t.is_none() && self.igpu.is_none() {
            tracing::debug!("no /etc/nv_tegra_release and no integrated GPU: not a Jetson");
            return None;
        }
        Some(JetsonInfo {
            jetpack: l4t.as_deref().and_then(jetpack_for).map(str::to_owned),
            l4t,
            gpu: self.igpu.as_ref().map(|g| g.name.clone()),
        })
    }

    /// The integrated GPU's load and clocks; `gpu_temp` comes from the thermal zones.
    pub fn gpu(&self, gpu_temp: Option<f32>) -> Option<GpuTelemetry> {
        let igpu = self.igpu.as_ref()?;
        // jtop/core/gpu.py `igpu_read_status`: `{device}/load` is per mille.
        let load_percent = read::int(&igpu.devfreq.join("device/load"))
            .ok()
            .filter(|l| (0..=1000).contains(l))
            .map(|l| l as f32 / 10.0);
        // jtop/core/gpu.py `igpu_read_freq`: devfreq `cur_freq`/`max_freq` in Hz.
        let freq = |f: &str| {
            read::int(&igpu.devfreq.join(f))
                .ok()
                .and_then(read::hz_to_mhz)
        };
        let max_freq_mhz = freq("max_freq");
        let top = read::opt_text(&igpu.devfreq.join("available_frequencies")).and_then(|t| {
            t.split_whitespace()
                .filter_map(|f| read::parse_int(f).ok().and_then(read::hz_to_mhz))
                .max()
        });
        // The governor's ceiling below the hardware's top clock: nvpmodel or thermal capping.
        let throttle = match (max_freq_mhz, top) {
            (Some(max), Some(top)) if max < top => vec!["freq_capped".to_owned()],
            _ => Vec::new(),
        };
        Some(GpuTelemetry {
            source: GpuSource::JetsonSysfs,
            name: Some(igpu.name.clone()),
            load_percent,
            memory_used_bytes: None,
            memory_total_bytes: None,
            temperature_c: gpu_temp,
            power_mw: self.rails.gpu_mw(),
            freq_mhz: freq("cur_freq"),
            max_freq_mhz,
            throttle,
        })
    }

    /// EMC, power rails and power mode; `None` when none of them is readable.
    pub fn board(&self) -> Option<BoardTelemetry> {
        let kernel = self.root.join("sys/kernel");
        // jtop/core/memory.py `read_emc`: BPMP debugfs clock rate in Hz (root only on most
        // images), utilisation from the activity monitor: mc_all / rate in kHz = percent.
        let emc_hz = read::int(&self.root.join(EMC_RATE)).ok();
        let emc_freq_mhz = emc_hz.and_then(read::hz_to_mhz);
        let emc_load_percent = match (
            emc_hz,
            read::int(&kernel.join("actmon_avg_activity/mc_all")),
        ) {
            (Some(hz), Ok(mc_all)) if hz >= 1000 && mc_all >= 0 => {
                Some((mc_all as f64 / (hz / 1000) as f64).clamp(0.0, 100.0) as f32)
            }
            _ => None,
        };
        let board = BoardTelemetry {
            emc_freq_mhz,
            emc_load_percent,
            rails_mw: self.rails.read(),
            power_mode: power_mode(&self.root),
        };
        (board != BoardTelemetry::default()).then_some(board)
    }
}

/// `{root}/sys/class/devfreq/*/device/of_node/name` naming a GPU (jtop/core/gpu.py, `find_igpu`).
fn find_igpu(root: &Path) -> Option<Igpu> {
    let base = root.join("sys/class/devfreq");
    read::dir_names(&base).into_iter().find_map(|entry| {
        let devfreq = base.join(&entry);
        let name = read::opt_text(&devfreq.join("device/of_node/name"))?;
        let is_gpu = IGPU_NAMES.contains(&name.as_str());
        is_gpu.then_some(Igpu { name, devfreq })
    })
}

/// nvpmodel's own state: `{root}/var/lib/nvpmodel/status` (`pmode:0002`) named through
/// `{root}/etc/nvpmodel.conf` (`< POWER_MODEL ID=2 NAME=MODE_30W >`). jetson_stats asks
/// `nvpmodel -q` (jtop/core/nvpmodel.py), which reads these files; we spawn nothing.
pub fn power_mode(root: &Path) -> Option<String> {
    let status = read::opt_text(&root.join("var/lib/nvpmodel/status"))?;
    let id = status
        .split_whitespace()
        .find_map(|t| t.strip_prefix("pmode:"))?
        .parse::<u32>()
        .ok()?;
    let conf = read_conf(&root.join("etc/nvpmodel.conf")).unwrap_or_default();
    let named = conf.lines().find_map(|line| {
        let rest = line.trim().strip_prefix("< POWER_MODEL")?;
        let mut line_id = None;
        let mut name = None;
        for token in rest.split_whitespace() {
            if let Some(v) = token.strip_prefix("ID=") {
                line_id = v.parse::<u32>().ok();
            } else if let Some(v) = token.strip_prefix("NAME=") {
                name = read::clean_name(v);
            }
        }
        (line_id == Some(id)).then_some(name).flatten()
    });
    Some(named.unwrap_or_else(|| id.to_string()))
}

/// nvpmodel.conf is tens of KiB: read it whole, capped, lossy.
fn read_conf(path: &Path) -> Option<String> {
    use std::io::Read;
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .ok()?
        .take(1 << 20)
        .read_to_end(&mut bytes)
        .ok()?;
    Some(String::from_utf8_lossy(&bytes).into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn l4t_release_lines_parse_and_map_to_jetpack() {
        let orin = "# R35 (release), REVISION: 4.1, GCID: 33958178, BOARD: t186ref, EABI: aarch64, DATE: Tue Aug  1 19:57:35 UTC 2023";
        assert_eq!(parse_l4t(orin).as_deref(), Some("35.4.1"));
        assert_eq!(jetpack_for("35.4.1"), Some("5.1.2"));
        assert_eq!(jetpack_for("99.0.0"), None);
        for bad in [
            "",
            "# R35",
            "R35 (release), REVISION: 4.1",
            "# R3$ (release), REVISION: x",
        ] {
            assert_eq!(parse_l4t(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn an_empty_root_is_not_a_jetson() {
        let dir = tempfile::tempdir().unwrap();
        let jetson = Jetson::discover(dir.path());
        assert!(jetson.info().is_none());
        assert!(jetson.gpu(None).is_none());
        assert!(jetson.board().is_none());
        assert!(board_model(dir.path()).is_none());
    }

    #[test]
    fn an_unnamed_power_mode_is_its_number() {
        let dir = tempfile::tempdir().unwrap();
        let status = dir.path().join("var/lib/nvpmodel");
        std::fs::create_dir_all(&status).unwrap();
        std::fs::write(status.join("status"), "pmode:0007\n").unwrap();
        assert_eq!(power_mode(dir.path()).as_deref(), Some("7"));
        std::fs::write(status.join("status"), "pmode:garbage\n").unwrap();
        assert_eq!(power_mode(dir.path()), None);
    }
}

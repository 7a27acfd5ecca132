//! CPU package and DRAM energy from Linux powercap (RAPL).
//!
//! Zones: each `intel-rapl:N` (or `amd-rapl:N`) under the powercap root
//! whose `name` is `package-N` (domain "cpu", named `package-N`), and its
//! subzone named `dram` (domain "dram", `package-N/dram`). AMD CPUs expose
//! the same tree, under the same `intel-rapl` names on current kernels.
//! `psys`, `core` and `uncore` are not read (psys is the whole platform on
//! some laptops; core and uncore are inside the package).
//!
//! `energy_uj` is a counter in µJ that wraps to 0 after
//! `max_energy_range_uj`. The agent undoes the wraps in integers: when a
//! value is below the previous one, the counter went round once, and the
//! delta is `(max_energy_range_uj - previous) + value + 1`. It sends the
//! cumulative energy (the first value read plus every delta since) as its
//! floor in mJ, keeping the µJ total, so no remainder is ever lost.
//!
//! *Bound:* two wraps between two reads look like one. That takes an
//! energy of `max_energy_range_uj` within one read interval: on Intel the
//! range is ~262 kJ (2³² energy units of 61 µJ), which at the default 1 s
//! is 262 kW and at the longest interval allowed (60 s) still 4.4 kW, more
//! than any CPU package draws (~500 W). The kernel scales a raw 32-bit
//! register by the energy unit, so its true period can exceed
//! `max_energy_range_uj + 1` by up to one unit (61 µJ) per wrap: below the
//! mJ resolution sent, once per several minutes at full power.
//!
//! `energy_uj` is readable by root only since Linux 5.10 (CVE-2020-8694):
//! run the agent as a user the file is readable by (a udev rule or
//! `CAP_DAC_READ_SEARCH`), else RAPL is reported unavailable at start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Failure, Reader, SourceInfo, Value};
use crate::config::RaplSettings;

/// A wrapping µJ counter made cumulative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// `max_energy_range_uj`: the largest value before it wraps to 0.
    max_uj: u64,
    last_raw: Option<u64>,
    /// Cumulative µJ: the first value plus every delta.
    total_uj: u128,
}

impl Counter {
    pub fn new(max_uj: u64) -> Self {
        Self {
            max_uj,
            last_raw: None,
            total_uj: 0,
        }
    }

    /// Takes a raw value; returns the µJ since the previous one (`None`
    /// for the first).
    pub fn update(&mut self, raw: u64) -> Result<Option<u64>, Failure> {
        if raw > self.max_uj {
            return Err(Failure::new(
                "out_of_range",
                format!("energy_uj {raw} above max_energy_range_uj {}", self.max_uj),
            ));
        }
        let delta = match self.last_raw {
            None => {
                self.total_uj = u128::from(raw);
                None
            }
            Some(last) if raw >= last => Some(raw - last),
            // A wrap: from `last` up to `max`, then 0 up to `raw`.
            Some(last) => Some((self.max_uj - last) + raw + 1),
        };
        if let Some(d) = delta {
            self.total_uj += u128::from(d);
        }
        self.last_raw = Some(raw);
        Ok(delta)
    }

    /// The cumulative energy, mJ (floor; the µJ below it are kept).
    pub fn millijoules(&self) -> u64 {
        u64::try_from(self.total_uj / 1000).unwrap_or(u64::MAX)
    }

    pub fn microjoules(&self) -> u128 {
        self.total_uj
    }
}

struct Zone {
    dir: PathBuf,
    counter: Counter,
    last_read: Option<Instant>,
}

/// Every package and dram zone, read together.
pub struct RaplReader {
    zones: Vec<Zone>,
}

fn read_u64(path: &Path) -> Result<u64, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        let reason = if e.kind() == std::io::ErrorKind::PermissionDenied {
            "permission"
        } else {
            "unreadable"
        };
        Failure::new(reason, format!("{}: {e}", path.display()))
    })?;
    text.trim().parse().map_err(|_| {
        Failure::new(
            "not_number",
            format!("{}: not a number: {:?}", path.display(), text.trim()),
        )
    })
}

fn read_name(dir: &Path) -> Option<String> {
    std::fs::read_to_string(dir.join("name"))
        .ok()
        .map(|s| s.trim().to_string())
}

/// `N` of a zone directory `intel-rapl:N` / `amd-rapl:N` (one level).
fn zone_number(file_name: &str) -> Option<u32> {
    let rest = file_name
        .strip_prefix("intel-rapl:")
        .or_else(|| file_name.strip_prefix("amd-rapl:"))?;
    rest.parse().ok()
}

/// The zone directories under `dir` named `prefix` and a number, sorted.
fn numbered(dir: &Path, parse: impl Fn(&str) -> Option<u32>) -> Vec<(u32, PathBuf)> {
    let mut out: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            Some((parse(&name)?, e.path()))
        })
        .collect();
    out.sort();
    out
}

impl RaplReader {
    /// Finds the zones under `cfg.root` and reads each once.
    pub fn open(cfg: &RaplSettings) -> Result<(Self, Vec<SourceInfo>), Failure> {
        let root = &cfg.root;
        if !root.is_dir() {
            return Err(Failure::new(
                "unsupported",
                format!("no powercap tree at {}", root.display()),
            ));
        }
        let mut found: Vec<(String, &'static str, PathBuf)> = Vec::new();
        for (_, dir) in numbered(root, zone_number) {
            let Some(name) = read_name(&dir) else {
                continue;
            };
            if !name.starts_with("package-") || name.contains('/') {
                continue;
            }
            let parent = dir
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or_default()
                .to_string();
            let sub_prefix = format!("{parent}:");
            let subs = numbered(&dir, |n| n.strip_prefix(&sub_prefix)?.parse().ok());
            found.push((name.clone(), "cpu", dir.clone()));
            if let Some((_, sub)) = subs
                .into_iter()
                .find(|(_, d)| read_name(d).as_deref() == Some("dram"))
            {
                found.push((format!("{name}/dram"), "dram", sub));
            }
        }
        if found.is_empty() {
            return Err(Failure::new(
                "unsupported",
                format!("no RAPL package zone under {}", root.display()),
            ));
        }
        let mut zones = Vec::new();
        let mut infos = Vec::new();
        for (name, domain, dir) in found {
            let max = read_u64(&dir.join("max_energy_range_uj"))?;
            if max == 0 {
                return Err(Failure::new(
                    "out_of_range",
                    format!("{}: max_energy_range_uj is 0", dir.display()),
                ));
            }
            // Readable now, or unavailable (root-only since Linux 5.10).
            read_u64(&dir.join("energy_uj"))?;
            zones.push(Zone {
                dir,
                counter: Counter::new(max),
                last_read: None,
            });
            infos.push(SourceInfo {
                kind: "rapl",
                domain,
                name,
                energy_counter_supported: true,
                interval: cfg.interval,
            });
        }
        Ok((Self { zones }, infos))
    }

    /// Reads one zone: its cumulative energy, and its average power since
    /// the previous read.
    fn read_zone(zone: &mut Zone) -> Result<Value, Failure> {
        let raw = read_u64(&zone.dir.join("energy_uj"))?;
        let now = Instant::now();
        let delta = zone.counter.update(raw)?;
        let power = match (delta, zone.last_read) {
            (Some(d), Some(then)) => {
                let ns = now.duration_since(then).as_nanos().max(1);
                u64::try_from(u128::from(d) * 1_000_000 / ns).ok()
            }
            _ => None,
        };
        zone.last_read = Some(now);
        Ok(Value {
            power_milliwatts: power,
            energy_millijoules: Some(zone.counter.millijoules()),
            energy_failure: None,
        })
    }
}

impl Reader for RaplReader {
    fn read(&mut self) -> Vec<Result<Value, Failure>> {
        self.zones.iter_mut().map(Self::read_zone).collect()
    }
}

/// The read interval at which a zone of range `max_uj` could wrap twice
/// between reads at `watts`.
pub fn ambiguous_after(max_uj: u64, watts: u64) -> Duration {
    Duration::from_micros(max_uj / watts.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A powercap tree: zones (dir, name, energy, max), written fresh.
    struct Tree(tempfile::TempDir);

    impl Tree {
        fn new() -> Self {
            Self(tempfile::tempdir().unwrap())
        }
        fn zone(&self, rel: &str, name: &str, energy: u64, max: u64) {
            let dir = self.0.path().join(rel);
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("name"), format!("{name}\n")).unwrap();
            std::fs::write(dir.join("max_energy_range_uj"), format!("{max}\n")).unwrap();
            self.set(rel, energy);
        }
        fn set(&self, rel: &str, energy: u64) {
            std::fs::write(
                self.0.path().join(rel).join("energy_uj"),
                format!("{energy}\n"),
            )
            .unwrap();
        }
        fn settings(&self) -> RaplSettings {
            RaplSettings {
                enabled: true,
                root: self.0.path().to_path_buf(),
                interval: Duration::from_secs(1),
            }
        }
    }

    fn energies(reader: &mut RaplReader) -> Vec<Option<u64>> {
        reader
            .read()
            .into_iter()
            .map(|r| r.unwrap().energy_millijoules)
            .collect()
    }

    #[test]
    fn two_packages_and_dram_with_a_wrap_are_exact_to_the_millijoule() {
        const MAX: u64 = 262_143_328_850;
        let t = Tree::new();
        t.zone("intel-rapl:0", "package-0", MAX - 1_500, MAX);
        t.zone("intel-rapl:0/intel-rapl:0:0", "core", 5, MAX);
        t.zone("intel-rapl:0/intel-rapl:0:1", "dram", 999, 65_712_999_613);
        t.zone("intel-rapl:1", "package-1", 10_000_123, MAX);
        t.zone("intel-rapl:1/intel-rapl:1:0", "dram", 0, 65_712_999_613);
        // A platform zone and the flat links of subzones are not packages.
        t.zone("intel-rapl:2", "psys", 1, MAX);
        t.zone("intel-rapl:0:0", "core", 5, MAX);
        let (mut reader, infos) = RaplReader::open(&t.settings()).unwrap();
        let names: Vec<_> = infos.iter().map(|i| (i.name.as_str(), i.domain)).collect();
        assert_eq!(
            names,
            [
                ("package-0", "cpu"),
                ("package-0/dram", "dram"),
                ("package-1", "cpu"),
                ("package-1/dram", "dram"),
            ]
        );
        // The first values, floored: 262 143 327 350 µJ.
        assert_eq!(
            energies(&mut reader),
            [Some(262_143_327), Some(0), Some(10_000), Some(0)]
        );
        // package-0 wraps: 1 500 µJ to the top, 1 to reach 0, 2 499 more:
        // 4 000 µJ in all, on top of the 262 143 327 350.
        t.set("intel-rapl:0", 2_499);
        t.set("intel-rapl:0/intel-rapl:0:1", 1_998);
        t.set("intel-rapl:1", 10_000_999);
        t.set("intel-rapl:1/intel-rapl:1:0", 1_001);
        assert_eq!(
            energies(&mut reader),
            [Some(262_143_331), Some(1), Some(10_000), Some(1)]
        );
        // The µJ remainders carry: 350 µJ + 650 µJ make the next mJ.
        t.set("intel-rapl:0", 2_499 + 650);
        assert_eq!(energies(&mut reader)[0], Some(262_143_332));
        assert_eq!(reader.zones[0].counter.microjoules(), 262_143_332_000);
    }

    #[test]
    fn counter_wraps_exactly_and_refuses_values_above_its_range() {
        let mut c = Counter::new(999);
        assert_eq!(c.update(990).unwrap(), None);
        assert_eq!(c.update(995).unwrap(), Some(5));
        // 995 → 999 (4), → 0 (1), → 7 (7).
        assert_eq!(c.update(7).unwrap(), Some(12));
        assert_eq!(c.microjoules(), 1_007);
        assert_eq!(c.update(1_000).unwrap_err().reason, "out_of_range");
        assert_eq!(c.update(7).unwrap(), Some(0));
    }

    #[test]
    fn missing_tree_unreadable_and_garbage_files_are_named_failures() {
        let t = Tree::new();
        let err = RaplReader::open(&t.settings()).err().unwrap();
        assert_eq!(err.reason, "unsupported");
        t.zone("intel-rapl:0", "package-0", 1, 1_000);
        let (mut reader, _) = RaplReader::open(&t.settings()).unwrap();
        std::fs::write(t.0.path().join("intel-rapl:0/energy_uj"), "lots\n").unwrap();
        let err = reader.read().remove(0).unwrap_err();
        assert_eq!(err.reason, "not_number");
        assert!(err.message.contains("energy_uj"), "{}", err.message);
        let mut missing = t.settings();
        missing.root = t.0.path().join("nope");
        assert_eq!(
            RaplReader::open(&missing).err().unwrap().reason,
            "unsupported"
        );
    }

    #[test]
    fn the_documented_ambiguity_bound() {
        // Intel's range: 60 s holds below 4.4 kW, 1 s below 262 kW.
        assert!(ambiguous_after(262_143_328_850, 4_000) > Duration::from_secs(60));
        assert!(ambiguous_after(262_143_328_850, 262_000) > Duration::from_secs(1));
    }
}

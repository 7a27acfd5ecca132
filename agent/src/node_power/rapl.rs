//! CPU package and DRAM energy from Linux powercap (RAPL).
//!
//! Zones: each `intel-rapl:N` (or `amd-rapl:N`) under the powercap root
//! whose `name` is `package-N` (domain "cpu", named `package-N`), and its
//! subzone named `dram` (domain "dram", `package-N/dram`). AMD CPUs expose
//! the same tree, under the same `intel-rapl` names on current kernels.
//! `psys`, `core` and `uncore` are not read (psys is the whole platform on
//! some laptops; core and uncore are inside the package).
//!
//! `energy_uj` is a counter in µJ whose range is `max_energy_range_uj`
//! (the kernel's powercap ABI: "Range of the above energy counter in
//! micro-joules"); it wraps to 0 after reaching it. The agent sends the
//! energy counted since it started (starting at 0, never at the first raw
//! value, so a restarted agent books nothing it did not see) as its floor
//! in mJ, keeping the µJ total, so no remainder is lost. Between two reads
//! `dt` apart, the most a zone can plausibly use is its plausible maximum
//! power ([`MAX_PACKAGE_WATTS`], [`MAX_DRAM_WATTS`]) over `dt` plus
//! [`SLACK`]:
//! - a value at or above the previous one is a delta, if plausible;
//! - a value below it is a wrap, `(max_energy_range_uj - previous) + value
//!   + 1`, if that is plausible;
//! - anything else (a package reset, a resume from suspend, a VM moved to
//!   another host, or a worker stalled so long that one wrap cannot be told
//!   from two) is a reset: nothing is counted for that interval, the read
//!   is refused (`counter_reset`: counted and logged), and counting goes on
//!   from the new value.
//!
//! *Bound:* the wrap arithmetic is not exact to the µJ. The kernel scales
//! a raw 32-bit register by the zone's energy unit (61 µJ on most Intel
//! servers, 15.3 µJ on others, not exposed in sysfs), so the true period
//! is `max_energy_range_uj` plus one unit, not plus 1 µJ: each wrap
//! undercounts by less than one unit. At 500 W a ~262 kJ range wraps every
//! ~9 minutes, ~165 times a day: under 10 mJ a day per zone, accumulating.
//!
//! `energy_uj` is readable by root only since Linux 5.10 (CVE-2020-8694):
//! run the agent as a user the file is readable by (a udev rule or
//! `CAP_DAC_READ_SEARCH`), else RAPL is reported unavailable at start.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{Failure, Reader, SourceInfo, Value};
use crate::config::RaplSettings;

/// Most watts a CPU package zone plausibly draws on average over a read
/// interval (the largest server CPUs draw ~500 W).
pub const MAX_PACKAGE_WATTS: u64 = 2_000;

/// Most watts a DRAM zone plausibly draws.
pub const MAX_DRAM_WATTS: u64 = 1_000;

/// Added to the time between two reads when judging what is plausible:
/// the reads' timing is not the counter's.
pub const SLACK: Duration = Duration::from_millis(100);

/// A wrapping µJ counter made cumulative.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Counter {
    /// `max_energy_range_uj`: the largest value before it wraps to 0.
    max_uj: u64,
    /// Plausible maximum power of the zone.
    max_watts: u64,
    last_raw: Option<u64>,
    /// Cumulative µJ since the first value.
    total_uj: u128,
}

impl Counter {
    pub fn new(max_uj: u64, max_watts: u64) -> Self {
        Self {
            max_uj,
            max_watts,
            last_raw: None,
            total_uj: 0,
        }
    }

    /// Takes a raw value read `elapsed` after the previous one; returns
    /// the µJ since the previous one (`None` for the first). A reset (see
    /// the module) is a `counter_reset` failure, the new value the base.
    pub fn update(&mut self, raw: u64, elapsed: Duration) -> Result<Option<u64>, Failure> {
        if raw > self.max_uj {
            return Err(Failure::new(
                "out_of_range",
                format!("energy_uj {raw} above max_energy_range_uj {}", self.max_uj),
            ));
        }
        let Some(last) = self.last_raw.replace(raw) else {
            return Ok(None);
        };
        let delta = if raw >= last {
            raw - last
        } else {
            // A wrap: from `last` up to `max`, then 0 up to `raw`.
            (self.max_uj - last) + raw + 1
        };
        // W × µs = µJ.
        let plausible = u128::from(self.max_watts) * (elapsed + SLACK).as_micros();
        // With `plausible` beyond the range, a wrap cannot be told from two
        // or from a reset.
        if u128::from(delta) > plausible || (raw < last && plausible >= u128::from(self.max_uj)) {
            return Err(Failure::new(
                "counter_reset",
                format!(
                    "energy_uj went from {last} to {raw} in {} ms: more than {} W could use, or ambiguous; counted from {raw} on, nothing for the interval",
                    elapsed.as_millis(),
                    self.max_watts
                ),
            ));
        }
        self.total_uj += u128::from(delta);
        Ok(Some(delta))
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
            let watts = if domain == "dram" {
                MAX_DRAM_WATTS
            } else {
                MAX_PACKAGE_WATTS
            };
            zones.push(Zone {
                dir,
                counter: Counter::new(max, watts),
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
        let elapsed = zone.last_read.map(|then| now.duration_since(then));
        // A reset is refused, and the next read measures from this one.
        let updated = zone.counter.update(raw, elapsed.unwrap_or_default());
        zone.last_read = Some(now);
        let delta = updated?;
        let power = match (delta, elapsed) {
            (Some(d), Some(dt)) => {
                let ns = dt.as_nanos().max(1);
                u64::try_from(u128::from(d) * 1_000_000 / ns).ok()
            }
            _ => None,
        };
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
    fn two_packages_and_dram_with_a_wrap_are_counted_from_zero() {
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
        // The first values are the base: nothing counted yet.
        assert_eq!(energies(&mut reader), [Some(0); 4]);
        // package-0 wraps: 1 500 µJ to the top, 1 to reach 0, 2 499 more:
        // 4 000 µJ in all.
        t.set("intel-rapl:0", 2_499);
        t.set("intel-rapl:0/intel-rapl:0:1", 1_998);
        t.set("intel-rapl:1", 10_000_999);
        t.set("intel-rapl:1/intel-rapl:1:0", 1_001);
        assert_eq!(energies(&mut reader), [Some(4), Some(0), Some(0), Some(1)]);
        // The µJ remainders carry: package-1's 876 µJ and 124 more make
        // its first mJ.
        t.set("intel-rapl:1", 10_000_999 + 124);
        assert_eq!(energies(&mut reader)[2], Some(1));
        assert_eq!(reader.zones[2].counter.microjoules(), 1_000);
    }

    const INTEL_MAX: u64 = 262_143_328_850;
    const SECOND: Duration = Duration::from_secs(1);

    #[test]
    fn counter_wraps_and_refuses_values_above_its_range() {
        let mut c = Counter::new(INTEL_MAX, MAX_PACKAGE_WATTS);
        assert_eq!(c.update(INTEL_MAX - 10, SECOND).unwrap(), None);
        assert_eq!(c.microjoules(), 0, "the first value is the base");
        assert_eq!(c.update(INTEL_MAX - 5, SECOND).unwrap(), Some(5));
        // MAX - 5 → MAX (5), → 0 (1), → 7 (7).
        assert_eq!(c.update(7, SECOND).unwrap(), Some(13));
        assert_eq!(c.microjoules(), 18);
        assert_eq!(
            c.update(INTEL_MAX + 1, SECOND).unwrap_err().reason,
            "out_of_range"
        );
        assert_eq!(c.update(7, SECOND).unwrap(), Some(0));
    }

    /// Regression: every drop was taken as one wrap, so a counter reset
    /// booked up to the whole range (~262 kJ) that was never used.
    #[test]
    fn a_reset_counts_nothing_for_its_interval_and_counting_goes_on() {
        let mut c = Counter::new(INTEL_MAX, MAX_PACKAGE_WATTS);
        c.update(100_000_000_000, SECOND).unwrap();
        assert_eq!(c.update(100_000_500_000, SECOND).unwrap(), Some(500_000));
        // Reset to near 0: as a wrap that would be ~162 kJ in a second.
        assert_eq!(c.update(5_000, SECOND).unwrap_err().reason, "counter_reset");
        assert_eq!(c.microjoules(), 500_000);
        assert_eq!(c.update(6_000, SECOND).unwrap(), Some(1_000));
        // A jump forward no package could draw (a VM moved to a host whose
        // counter is ahead) is a reset too.
        assert_eq!(
            c.update(200_000_000_000, SECOND).unwrap_err().reason,
            "counter_reset"
        );
        assert_eq!(c.update(200_000_001_000, SECOND).unwrap(), Some(1_000));
        assert_eq!(c.microjoules(), 502_000);
    }

    /// A worker stalled for longer than the counter's range takes at full
    /// power: one wrap cannot be told from two, so nothing is guessed.
    #[test]
    fn a_drop_after_a_stall_longer_than_a_wrap_is_not_guessed() {
        let mut c = Counter::new(INTEL_MAX, MAX_PACKAGE_WATTS);
        c.update(INTEL_MAX - 1_000, SECOND).unwrap();
        let stall = Duration::from_secs(600);
        assert_eq!(c.update(1_000, stall).unwrap_err().reason, "counter_reset");
        assert_eq!(c.microjoules(), 0);
        // The same drop within a second is one wrap.
        let mut c = Counter::new(INTEL_MAX, MAX_PACKAGE_WATTS);
        c.update(INTEL_MAX - 1_000, SECOND).unwrap();
        assert_eq!(c.update(1_000, SECOND).unwrap(), Some(2_001));
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
}

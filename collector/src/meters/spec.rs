//! `[[meter]]` entries of the collector config: what the file says
//! ([`MeterConfig`]) and what the collector polls after checking it
//! ([`MeterSpec`]). Every error names the meter and the setting.

use std::path::PathBuf;
use std::time::Duration;

use globset::{Glob, GlobMatcher};
use serde::{Deserialize, Serialize};

use crate::accounting::facility::{Step, WordOrder, bounded_step};

/// One `[[meter]]` entry as written.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    /// Names the meter in labels, the ledger and the API: `[a-z0-9_-]`,
    /// unique.
    pub id: String,
    /// `modbus` (a Modbus TCP revenue meter) or `redfish_pdu`.
    pub kind: MeterKind,
    /// The nodes the meter feeds: names or globs (`gpu-rack1-*`).
    pub nodes: Vec<String>,
    /// How often the meter is read.
    #[serde(with = "capwatch_common::duration", default = "default_interval")]
    pub interval: Duration,
    /// Longest one reading may take (connect included); a meter that does
    /// not answer by then counts a timeout, nothing else waits for it.
    #[serde(with = "capwatch_common::duration", default = "default_timeout")]
    pub timeout: Duration,
    /// Drift alert bounds of metered / measured energy.
    #[serde(default = "default_min_ratio")]
    pub min_ratio: f64,
    #[serde(default = "default_max_ratio")]
    pub max_ratio: f64,
    /// The most power (kW) the meter can see: a step between two readings
    /// implying more over the time between them (plus one count, or 1 kWh
    /// for a PDU) is refused as `invalid` and the baseline kept. Default
    /// 10000 (10 MW) for modbus, 1000 (1 MW, what a PDU reading may carry)
    /// for redfish_pdu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_kw: Option<f64>,
    /// modbus: `host:port` of the meter or its gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// modbus: the unit (slave) id. Default 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<u8>,
    /// modbus: address of the energy register's first word. Default 0.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub register: Option<u16>,
    /// modbus: `holding` (function 3, the default) or `input` (4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub registers: Option<RegisterBank>,
    /// modbus: `u32` (two words, the default) or `u64` (four).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<RegisterFormat>,
    /// modbus: `big` (most significant word first, the default) or
    /// `little`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub word_order: Option<WordOrderSetting>,
    /// modbus: watt-hours one count stands for; must be a whole number of
    /// millijoules (0.001 Wh = 3600 mJ). Default 1000 (a kWh register).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wh_per_count: Option<f64>,
    /// modbus: the count at which the register wraps to 0. Default 2^32
    /// or 2^64 by `format`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollover: Option<u64>,
    /// redfish_pdu: the PDU's resource,
    /// `https://pdu/redfish/v1/PowerEquipment/RackPDUs/1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// redfish_pdu: a file with one line `user:password`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credentials_file: Option<PathBuf>,
    /// redfish_pdu: PEM CA bundle the PDU's certificate must chain to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// redfish_pdu: accept any certificate (logged at warn at start).
    #[serde(default)]
    pub insecure: bool,
}

fn default_interval() -> Duration {
    Duration::from_secs(15)
}
fn default_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_min_ratio() -> f64 {
    DEFAULT_MIN_RATIO
}
fn default_max_ratio() -> f64 {
    DEFAULT_MAX_RATIO
}

/// Metered below this share of measured is drift: a meter reading less
/// than its nodes say they drew is missing something.
pub const DEFAULT_MIN_RATIO: f64 = 0.95;
/// Metered above this multiple of measured is drift (facility overhead
/// beyond a PUE of 2, or nodes under the meter that capwatch does not see).
pub const DEFAULT_MAX_RATIO: f64 = 2.0;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MeterKind {
    Modbus,
    RedfishPdu,
}

impl MeterKind {
    pub fn label(self) -> &'static str {
        match self {
            MeterKind::Modbus => "modbus",
            MeterKind::RedfishPdu => "redfish_pdu",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterBank {
    Holding,
    Input,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RegisterFormat {
    U32,
    U64,
}

impl RegisterFormat {
    pub fn words(self) -> u16 {
        match self {
            RegisterFormat::U32 => 2,
            RegisterFormat::U64 => 4,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WordOrderSetting {
    Big,
    Little,
}

/// A Modbus meter, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ModbusSpec {
    pub address: String,
    pub unit: u8,
    pub register: u16,
    pub bank: RegisterBank,
    pub format: RegisterFormat,
    pub word_order: WordOrder,
    /// Energy of one count, in millijoules (a whole number).
    pub mj_per_count: u64,
    /// The count at which the register wraps to 0.
    pub rollover: u128,
}

/// A Redfish PDU, checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RedfishPduSpec {
    pub url: String,
    pub credentials_file: Option<PathBuf>,
    pub ca_file: Option<PathBuf>,
    pub insecure: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub enum Source {
    Modbus(ModbusSpec),
    RedfishPdu(RedfishPduSpec),
}

impl Source {
    pub fn kind_label(&self) -> &'static str {
        match self {
            Source::Modbus(_) => MeterKind::Modbus.label(),
            Source::RedfishPdu(_) => MeterKind::RedfishPdu.label(),
        }
    }
}

/// A meter the collector polls.
#[derive(Debug, Clone)]
pub struct MeterSpec {
    pub id: String,
    pub nodes: Vec<String>,
    matchers: Vec<NodePattern>,
    pub interval: Duration,
    pub timeout: Duration,
    pub min_ratio: f64,
    pub max_ratio: f64,
    /// The most power the meter can see (`max_kw`), in milliwatts.
    pub max_mw: u64,
    pub source: Source,
}

/// `max_kw` when not set: a modbus meter (a feeder or a row).
pub const DEFAULT_MODBUS_MAX_KW: f64 = 10_000.0;
/// `max_kw` when not set: a PDU (the most its reading may carry).
pub const DEFAULT_PDU_MAX_KW: f64 = (capwatch_common::redfish::MAX_PDU_WATTS / 1_000) as f64;
/// Largest `max_kw` accepted (1 GW).
pub const MAX_MAX_KW: f64 = 1_000_000.0;
/// The slack of a PDU's energy step: its `EnergykWh` is often whole kWh.
const PDU_SLACK_MJ: u128 = 3_600_000_000;

#[derive(Debug, Clone)]
enum NodePattern {
    Exact(String),
    Glob(GlobMatcher),
}

impl MeterSpec {
    /// What the raw reading `now` (a register count, or a PDU's energy in
    /// mJ) means after `prev`, `elapsed_ns` before: a step is plausible
    /// only within `max_kw` over that time plus one count (1 kWh for a
    /// PDU); a drop is a wrap only if the wrapped step is plausible.
    pub fn step(&self, prev: u64, now: u64, elapsed_ns: i64) -> Step {
        let elapsed = u128::try_from(elapsed_ns.max(0)).unwrap_or(0);
        let max_mj = u128::from(self.max_mw) * elapsed / 1_000_000_000;
        match &self.source {
            Source::Modbus(m) => bounded_step(
                prev,
                now,
                m.rollover,
                max_mj / u128::from(m.mj_per_count) + 1,
            ),
            Source::RedfishPdu(_) => bounded_step(prev, now, 1 << 64, max_mj + PDU_SLACK_MJ),
        }
    }

    /// The energy (mJ) of `counts` counts (a PDU counts millijoules);
    /// `None` past 2^64 mJ.
    pub fn energy_of(&self, counts: u64) -> Option<u64> {
        match &self.source {
            Source::Modbus(m) => counts.checked_mul(m.mj_per_count),
            Source::RedfishPdu(_) => Some(counts),
        }
    }

    /// Whether a raw reading is one the meter can give at all.
    pub fn in_range(&self, raw: u64) -> bool {
        match &self.source {
            Source::Modbus(m) => u128::from(raw) < m.rollover,
            Source::RedfishPdu(_) => true,
        }
    }

    /// Whether the meter feeds node `node`.
    pub fn covers(&self, node: &str) -> bool {
        self.matchers.iter().any(|m| match m {
            NodePattern::Exact(n) => n == node,
            NodePattern::Glob(g) => g.is_match(node),
        })
    }
}

/// Why a `[[meter]]` entry is refused: the meter, the setting, the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("meter {meter:?}: `{setting}`: {reason}")]
pub struct MeterError {
    /// The meter's id, or `#N` (from 1) for an entry whose id is unusable.
    pub meter: String,
    pub setting: &'static str,
    pub reason: String,
}

/// Most meters one collector polls.
pub const MAX_METERS: usize = 1_000;
/// Longest list of node names and globs one meter may have.
pub const MAX_NODES_PER_METER: usize = 10_000;

fn label_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

fn is_glob(s: &str) -> bool {
    s.contains(['*', '?', '[', '{'])
}

/// Millijoules per count for `wh` watt-hours per count, if that is a whole
/// number of at least 1 (1 Wh = 3,600,000 mJ).
pub fn mj_per_count(wh: f64) -> Option<u64> {
    let mj = wh * 3_600_000.0;
    if !(1.0..=1e15).contains(&mj) {
        return None;
    }
    let whole = mj.round();
    // Within the float's own precision of a whole number.
    ((mj - whole).abs() <= 1e-6 * whole.max(1.0) / 1e3).then_some(whole as u64)
}

/// Checks every entry: a clear error naming the meter and the setting.
pub fn check(entries: &[MeterConfig]) -> Result<Vec<MeterSpec>, MeterError> {
    if entries.len() > MAX_METERS {
        return Err(MeterError {
            meter: format!("#{}", MAX_METERS + 1),
            setting: "id",
            reason: format!("at most {MAX_METERS} meters"),
        });
    }
    let mut specs: Vec<MeterSpec> = Vec::with_capacity(entries.len());
    for (i, e) in entries.iter().enumerate() {
        let spec = check_one(i, e)?;
        if specs.iter().any(|s| s.id == spec.id) {
            return Err(MeterError {
                meter: spec.id,
                setting: "id",
                reason: "two meters have this id".into(),
            });
        }
        specs.push(spec);
    }
    overlaps(&specs)?;
    Ok(specs)
}

/// Refuses a node the config shows under two meters: an exact name that
/// another meter's name or glob covers, or the same glob twice. Each
/// meter allocates all of its energy to the tenants under it, so such a
/// node's tenants would be billed for it twice. Globs that overlap only
/// for some names (`gpu-a*`, `gpu-*a`) are not decidable here: the
/// allocation counts connected nodes under two meters
/// (`capwatch_meter_nodes_overlapping`) and warns.
fn overlaps(specs: &[MeterSpec]) -> Result<(), MeterError> {
    for (i, a) in specs.iter().enumerate() {
        for b in &specs[i + 1..] {
            for n in &a.nodes {
                let shared = if is_glob(n) {
                    b.nodes.iter().any(|m| m == n)
                } else {
                    b.covers(n)
                };
                let reverse = b.nodes.iter().find(|m| !is_glob(m) && a.covers(m));
                let node = if shared { Some(n) } else { reverse };
                if let Some(node) = node {
                    return Err(MeterError {
                        meter: b.id.clone(),
                        setting: "nodes",
                        reason: format!(
                            "{node:?} is under meter {:?} too: each meter allocates all of its energy, so that node's would be billed twice",
                            a.id
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

fn check_one(i: usize, e: &MeterConfig) -> Result<MeterSpec, MeterError> {
    if !label_ok(&e.id) {
        return Err(MeterError {
            meter: format!("#{}", i + 1),
            setting: "id",
            reason: format!(
                "{:?} must be 1-64 characters of a-z, 0-9, '-' and '_'",
                e.id
            ),
        });
    }
    let bad = |setting: &'static str, reason: String| MeterError {
        meter: e.id.clone(),
        setting,
        reason,
    };
    if e.nodes.is_empty() {
        return Err(bad("nodes", "must name at least one node or glob".into()));
    }
    if e.nodes.len() > MAX_NODES_PER_METER {
        return Err(bad(
            "nodes",
            format!("at most {MAX_NODES_PER_METER} names and globs"),
        ));
    }
    let mut matchers = Vec::with_capacity(e.nodes.len());
    for n in &e.nodes {
        if n.is_empty() || n.len() > 253 || n.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad(
                "nodes",
                format!("{n:?} is not a node name or glob (1-253 characters, no whitespace)"),
            ));
        }
        if is_glob(n) {
            let g = Glob::new(n).map_err(|err| bad("nodes", format!("glob {n:?}: {err}")))?;
            matchers.push(NodePattern::Glob(g.compile_matcher()));
        } else {
            matchers.push(NodePattern::Exact(n.clone()));
        }
    }
    if e.interval < Duration::from_secs(1) || e.interval > Duration::from_secs(3600) {
        return Err(bad("interval", "must be between 1s and 1h".into()));
    }
    if e.timeout < Duration::from_millis(100) || e.timeout > e.interval {
        return Err(bad(
            "timeout",
            "must be at least 100ms and at most the interval".into(),
        ));
    }
    let ratio_ok = |r: f64| r.is_finite() && r > 0.0 && r <= 10.0;
    if !ratio_ok(e.min_ratio) {
        return Err(bad("min_ratio", "must be above 0 and at most 10".into()));
    }
    if !ratio_ok(e.max_ratio) {
        return Err(bad("max_ratio", "must be above 0 and at most 10".into()));
    }
    if e.min_ratio >= e.max_ratio {
        return Err(bad("min_ratio", "must be below max_ratio".into()));
    }
    let max_kw = e.max_kw.unwrap_or(match e.kind {
        MeterKind::Modbus => DEFAULT_MODBUS_MAX_KW,
        MeterKind::RedfishPdu => DEFAULT_PDU_MAX_KW,
    });
    if !(max_kw.is_finite() && (0.001..=MAX_MAX_KW).contains(&max_kw)) {
        return Err(bad(
            "max_kw",
            format!("{max_kw} must be at least 0.001 (1 W) and at most {MAX_MAX_KW} (1 GW)"),
        ));
    }
    // Within 0.001..=1e6 kW, so a whole number of milliwatts up to 1e12.
    let max_mw = (max_kw * 1_000_000.0).round() as u64;
    let source = match e.kind {
        MeterKind::Modbus => {
            for (set, name) in [
                (e.url.is_some(), "url"),
                (e.credentials_file.is_some(), "credentials_file"),
                (e.ca_file.is_some(), "ca_file"),
                (e.insecure, "insecure"),
            ] {
                if set {
                    return Err(bad(name, "is a redfish_pdu setting, not modbus".into()));
                }
            }
            let Some(address) = e.address.clone() else {
                return Err(bad("address", "a modbus meter needs host:port".into()));
            };
            match address.rsplit_once(':') {
                Some((host, port))
                    if !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p > 0) => {}
                _ => return Err(bad("address", format!("{address:?} is not host:port"))),
            }
            let unit = e.unit.unwrap_or(1);
            if unit == 0 {
                return Err(bad(
                    "unit",
                    "0 is Modbus broadcast, which no meter answers: use the meter's own unit id (1-247)".into(),
                ));
            }
            let format = e.format.unwrap_or(RegisterFormat::U32);
            let register = e.register.unwrap_or(0);
            if u32::from(register) + u32::from(format.words()) > 0x1_0000 {
                return Err(bad(
                    "register",
                    format!(
                        "{register} + {} words runs past register 65535",
                        format.words()
                    ),
                ));
            }
            let wh = e.wh_per_count.unwrap_or(1000.0);
            let Some(mj) = mj_per_count(wh) else {
                return Err(bad(
                    "wh_per_count",
                    format!(
                        "{wh} Wh is {} mJ per count: must be a whole number of millijoules, at least 1 (e.g. 0.001, 0.01, 1, 1000)",
                        wh * 3_600_000.0
                    ),
                ));
            };
            let max = 1u128 << (16 * u32::from(format.words()));
            let rollover = match e.rollover {
                None => max,
                Some(r) if r >= 2 && u128::from(r) <= max => u128::from(r),
                Some(r) => {
                    return Err(bad(
                        "rollover",
                        format!(
                            "{r} must be between 2 and 2^{} (what the register holds)",
                            16 * format.words()
                        ),
                    ));
                }
            };
            Source::Modbus(ModbusSpec {
                address,
                unit,
                register,
                bank: e.registers.unwrap_or(RegisterBank::Holding),
                format,
                word_order: match e.word_order.unwrap_or(WordOrderSetting::Big) {
                    WordOrderSetting::Big => WordOrder::Big,
                    WordOrderSetting::Little => WordOrder::Little,
                },
                mj_per_count: mj,
                rollover,
            })
        }
        MeterKind::RedfishPdu => {
            for (set, name) in [
                (e.address.is_some(), "address"),
                (e.unit.is_some(), "unit"),
                (e.register.is_some(), "register"),
                (e.registers.is_some(), "registers"),
                (e.format.is_some(), "format"),
                (e.word_order.is_some(), "word_order"),
                (e.wh_per_count.is_some(), "wh_per_count"),
                (e.rollover.is_some(), "rollover"),
            ] {
                if set {
                    return Err(bad(name, "is a modbus setting, not redfish_pdu".into()));
                }
            }
            let Some(url) = e.url.clone() else {
                return Err(bad(
                    "url",
                    "a redfish_pdu meter needs the PDU's URL (…/redfish/v1/PowerEquipment/RackPDUs/ID)".into(),
                ));
            };
            if !(url.starts_with("https://") || url.starts_with("http://"))
                || !url.contains("/PowerEquipment/RackPDUs/")
            {
                return Err(bad(
                    "url",
                    format!("{url:?} is not an http(s) URL of a RackPDUs member"),
                ));
            }
            if url.starts_with("https://") && e.ca_file.is_some() && e.insecure {
                return Err(bad(
                    "insecure",
                    "ca_file and insecure exclude each other".into(),
                ));
            }
            Source::RedfishPdu(RedfishPduSpec {
                url,
                credentials_file: e.credentials_file.clone(),
                ca_file: e.ca_file.clone(),
                insecure: e.insecure,
            })
        }
    };
    Ok(MeterSpec {
        id: e.id.clone(),
        nodes: e.nodes.clone(),
        matchers,
        interval: e.interval,
        timeout: e.timeout,
        min_ratio: e.min_ratio,
        max_ratio: e.max_ratio,
        max_mw,
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Vec<MeterConfig> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            meter: Vec<MeterConfig>,
        }
        toml::from_str::<File>(text).expect("valid TOML").meter
    }

    const MODBUS: &str = "[[meter]]\nid = \"m1\"\nkind = \"modbus\"\nnodes = [\"gpu-*\"]\naddress = \"10.0.0.5:502\"\n";

    /// (what is added to a valid modbus entry, setting named, piece of the reason)
    #[test]
    fn bad_entries_name_the_meter_and_the_setting() {
        let cases: &[(&str, &str, &str)] = &[
            ("wh_per_count = 0.0000001\n", "wh_per_count", "whole number"),
            ("wh_per_count = 0.0000004\n", "wh_per_count", "whole number"),
            ("wh_per_count = -1.0\n", "wh_per_count", "whole number"),
            ("rollover = 1\n", "rollover", "between 2"),
            ("rollover = 4294967297\n", "rollover", "between 2"),
            ("min_ratio = 2.5\n", "min_ratio", "below max_ratio"),
            ("max_ratio = 0.0\n", "max_ratio", "above 0"),
            ("min_ratio = nan\n", "min_ratio", "above 0"),
            (
                "interval = \"10s\"\ntimeout = \"11s\"\n",
                "timeout",
                "at most the interval",
            ),
            ("register = 65535\n", "register", "past register 65535"),
            ("unit = 0\n", "unit", "broadcast"),
            ("max_kw = 0.0\n", "max_kw", "at least 0.001"),
            ("max_kw = inf\n", "max_kw", "at most"),
            (
                "url = \"https://x/redfish/v1/PowerEquipment/RackPDUs/1\"\n",
                "url",
                "redfish_pdu setting",
            ),
        ];
        for (extra, setting, reason) in cases {
            let e = check(&parse(&format!("{MODBUS}{extra}"))).expect_err(extra);
            assert_eq!(
                (e.meter.as_str(), e.setting),
                ("m1", *setting),
                "{extra}: {e}"
            );
            assert!(e.to_string().contains(reason), "{extra}: {e}");
        }
        let whole = |text: &str| check(&parse(text)).expect_err(text).to_string();
        assert!(whole(&MODBUS.replace("address = \"10.0.0.5:502\"\n", "")).contains("`address`"));
        assert!(whole(&MODBUS.replace("10.0.0.5:502", "10.0.0.5")).contains("not host:port"));
        assert!(whole(&MODBUS.replace("[\"gpu-*\"]", "[]")).contains("`nodes`"));
        assert!(whole(&MODBUS.replace("[\"gpu-*\"]", "[\"gpu-[\"]")).contains("glob"));
        assert!(whole(&MODBUS.replace("\"m1\"", "\"M 1\"")).contains("meter \"#1\": `id`"));
        assert!(whole(&format!("{MODBUS}{MODBUS}")).contains("two meters have this id"));
        // A node under two meters, by name or by the same glob.
        let second = |nodes: &str| {
            format!(
                "{MODBUS}{}",
                MODBUS
                    .replace("\"m1\"", "\"m2\"")
                    .replace("[\"gpu-*\"]", nodes)
            )
        };
        for nodes in ["[\"gpu-7\"]", "[\"cpu-1\", \"gpu-*\"]"] {
            let e = check(&parse(&second(nodes))).expect_err(nodes);
            assert_eq!((e.meter.as_str(), e.setting), ("m2", "nodes"), "{e}");
            assert!(e.reason.contains("billed twice"), "{e}");
        }
        // Other nodes, or globs that may overlap only for some names: fine.
        assert!(check(&parse(&second("[\"cpu-1\", \"g*-9\"]"))).is_ok());
        let pdu = "[[meter]]\nid = \"p\"\nkind = \"redfish_pdu\"\nnodes = [\"n1\"]\nurl = \"https://pdu/redfish/v1/Chassis/1\"\n";
        assert!(whole(pdu).contains("RackPDUs member"));
        assert!(whole(&format!("{pdu}register = 3\n")).contains("modbus setting"));
    }

    #[test]
    fn a_valid_entry_gets_its_defaults() {
        let specs = check(&parse(MODBUS)).expect("valid");
        let s = &specs[0];
        assert_eq!(
            (s.interval, s.timeout),
            (Duration::from_secs(15), Duration::from_secs(5))
        );
        assert!(s.covers("gpu-7") && !s.covers("cpu-1"));
        assert_eq!(
            s.source,
            Source::Modbus(ModbusSpec {
                address: "10.0.0.5:502".into(),
                unit: 1,
                register: 0,
                bank: RegisterBank::Holding,
                format: RegisterFormat::U32,
                word_order: WordOrder::Big,
                mj_per_count: 3_600_000_000,
                rollover: 1 << 32,
            })
        );
    }

    #[test]
    fn watt_hours_per_count_become_whole_millijoules() {
        for (wh, mj) in [
            (0.001, Some(3_600)),
            (0.01, Some(36_000)),
            (1.0, Some(3_600_000)),
            (1000.0, Some(3_600_000_000)),
            (0.1, Some(360_000)),
            (1e-7, None),
            (0.0, None),
            (f64::NAN, None),
            (0.00012345, None),
        ] {
            assert_eq!(mj_per_count(wh), mj, "{wh}");
        }
    }
}

//! Agent configuration: TOML file, then `CAPWATCH_*` environment, then
//! flags (the last wins). Every setting has a default and a variable
//! (`CAPWATCH_` and its dotted name in upper case, `.` as `_`); the
//! checked-in `deploy/examples/agent.toml` lists them all and a test
//! parses it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use capwatch_common::LogFormat;

use crate::source::mock::{Model, Profile};

/// Which backend reads the GPUs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// Real GPUs through NVML.
    Nvml,
    /// A simulated node, for hosts without GPUs.
    Mock,
}

/// The order a node tries its collectors in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum CollectorOrder {
    /// By a rendezvous hash of (node id, endpoint): a fleet given one list
    /// spreads evenly over it, and losing a collector moves only its nodes.
    Hashed,
    /// In the order listed.
    Listed,
}

/// The collector an agent streams to when none is configured.
pub const DEFAULT_COLLECTOR: &str = "http://127.0.0.1:7070";

/// Most endpoints in `collectors`.
const MAX_COLLECTORS: usize = 64;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Node identity reported to the collector. Empty: the hostname.
    pub node_id: String,
    /// Collector gRPC endpoint, `http://host:port` or `https://host:port`.
    /// Unset (and `collectors` unset): [`DEFAULT_COLLECTOR`].
    pub collector: Option<String>,
    /// Several collector endpoints to fail over between (instead of
    /// `collector`). From the environment: comma-separated.
    #[serde(deserialize_with = "list_or_commas", default)]
    pub collectors: Option<Vec<String>>,
    /// The order the endpoints are tried in.
    pub collector_order: CollectorOrder,
    /// While streaming to an endpoint other than the most preferred, how
    /// often (±20 %) to try the most preferred again; zero: never.
    #[serde(with = "capwatch_common::duration")]
    pub failback_after: Duration,
    /// Sampling interval.
    #[serde(with = "capwatch_common::duration")]
    pub interval: Duration,
    /// GPU backend.
    pub source: SourceKind,
    /// Unacknowledged samples kept for re-sending (oldest dropped first).
    pub spool_capacity: usize,
    /// Directory keeping the spool on disk, so unacked samples survive a
    /// restart (a crash too); one per node. Unset: the spool is in memory.
    pub spool_dir: Option<PathBuf>,
    /// Most bytes the spool's files take; when full, the oldest eighth of
    /// the samples is dropped (and counted).
    pub spool_max_bytes: u64,
    /// How often samples appended to the disk spool are synced (fsync);
    /// a sample is sent only once synced. `0s`: each one as it is taken.
    #[serde(with = "capwatch_common::duration")]
    pub spool_fsync_interval: Duration,
    /// Most samples in one message to the collector.
    pub batch_max: usize,
    /// On shutdown, how long to keep trying to deliver the spool.
    #[serde(with = "capwatch_common::duration")]
    pub drain_timeout: Duration,
    /// First delay before reconnecting; doubles up to `reconnect_max`.
    #[serde(with = "capwatch_common::duration")]
    pub reconnect_initial: Duration,
    /// Longest delay between reconnect attempts.
    #[serde(with = "capwatch_common::duration")]
    pub reconnect_max: Duration,
    /// File holding the token the collector asks agents for (the
    /// `CAPWATCH_TOKEN` environment variable may carry it instead).
    pub token_file: Option<PathBuf>,
    /// PEM CA bundle the collector's certificate must chain to; needed for
    /// an `https://` collector.
    pub tls_ca: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (names this node); with
    /// `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// Name the collector's certificate must carry. Unset: the host of
    /// `collector`.
    pub tls_domain: Option<String>,
    /// Log format: `plain` or `json`.
    pub log_format: LogFormat,
    /// Address of the agent's own HTTP port (`/healthz`, `/livez`,
    /// `/metrics`). Unset: no port.
    pub http_listen: Option<std::net::SocketAddr>,
    /// `/healthz` fails once samples wait this long without an ack.
    #[serde(with = "capwatch_common::duration")]
    pub health_max_undelivered: Duration,
    pub nvml: NvmlConfig,
    pub mock: MockSettings,
    pub redfish: RedfishSettings,
    pub ipmi: IpmiSettings,
    pub rapl: RaplSettings,
}

/// The node's BMC over Redfish: whole-node power, and energy where the BMC
/// has an energy sensor. Off unless `url` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedfishSettings {
    /// BMC base URL (`https://10.0.0.9`); the agent discovers
    /// `/redfish/v1/Chassis`. Unset: no Redfish source.
    pub url: Option<String>,
    /// Chassis id to read. Unset: the one top-level node chassis with
    /// power readings (see `node_power::redfish`).
    pub chassis: Option<String>,
    /// File with one line `user:password`.
    pub credentials_file: Option<PathBuf>,
    /// PEM CA bundle the BMC's certificate must chain to.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (no verification; warned about at start).
    pub insecure: bool,
    /// Deadline of each request to the BMC.
    #[serde(with = "capwatch_common::duration")]
    pub timeout: Duration,
    /// How often the BMC is read.
    #[serde(with = "capwatch_common::duration")]
    pub interval: Duration,
}

/// The BMC over IPMI DCMI (`ipmitool dcmi power reading`): whole-node
/// power, no energy. Off unless `command` is set.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IpmiSettings {
    /// The ipmitool program (a name on the PATH or a path). Unset: no
    /// IPMI source.
    pub command: Option<PathBuf>,
    /// Deadline of each run; the process is killed at it.
    #[serde(with = "capwatch_common::duration")]
    pub timeout: Duration,
    /// How often it is run.
    #[serde(with = "capwatch_common::duration")]
    pub interval: Duration,
}

/// CPU package and DRAM energy from Linux powercap (RAPL).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RaplSettings {
    /// Read the RAPL zones.
    pub enabled: bool,
    /// The powercap tree.
    pub root: PathBuf,
    /// How often the zones are read.
    #[serde(with = "capwatch_common::duration")]
    pub interval: Duration,
}

impl Default for RedfishSettings {
    fn default() -> Self {
        Self {
            url: None,
            chassis: None,
            credentials_file: None,
            ca_file: None,
            insecure: false,
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(10),
        }
    }
}

impl Default for IpmiSettings {
    fn default() -> Self {
        Self {
            command: None,
            timeout: Duration::from_secs(5),
            interval: Duration::from_secs(10),
        }
    }
}

impl Default for RaplSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            root: PathBuf::from("/sys/class/powercap"),
            interval: Duration::from_secs(1),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct NvmlConfig {
    /// Path of libnvidia-ml. Unset: `libnvidia-ml.so.1` from the system's
    /// library path.
    pub library: Option<PathBuf>,
    /// File keeping the XID counts across agent restarts, as the driver
    /// keeps its ECC and PCIe counters. Unset: they start from 0 with
    /// each agent start.
    pub xid_counts_file: Option<PathBuf>,
    /// How often each board's MIG layout (MIG mode and instances) is read
    /// again; a change makes the agent say Hello again with the new
    /// inventory.
    #[serde(with = "capwatch_common::duration")]
    pub mig_check_interval: Duration,
}

impl Default for NvmlConfig {
    fn default() -> Self {
        Self {
            library: None,
            xid_counts_file: None,
            mig_check_interval: crate::source::nvml::MIG_CHECK_EVERY,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MockSettings {
    /// Number of simulated GPUs.
    pub gpus: u32,
    /// Workload: training, inference, idle or mixed.
    pub profile: Profile,
    /// GPU model: h100 or h200.
    pub model: Model,
    /// Seed; the same seed and node id give the same readings.
    pub seed: u64,
    /// Whether the simulated GPUs have an energy counter.
    pub energy_counter: bool,
    /// File keeping the simulated counters across agent restarts, as a
    /// loaded driver keeps real ones. Unset: counters start afresh.
    pub counter_file: Option<PathBuf>,
    /// Simulate the whole node's power (GPUs plus CPUs, fans and PSU
    /// losses) as a node power source of kind "mock".
    pub node_power: bool,
    /// Simulate SXM boards, each with 18 NVLink links (traffic, a few
    /// replays); off: PCIe boards without NVLink readings.
    pub nvlink: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            node_id: String::new(),
            collector: None,
            collectors: None,
            collector_order: CollectorOrder::Hashed,
            failback_after: Duration::from_secs(300),
            interval: Duration::from_secs(1),
            source: SourceKind::Nvml,
            spool_capacity: 3600,
            spool_dir: None,
            spool_max_bytes: 64 << 20,
            spool_fsync_interval: Duration::ZERO,
            batch_max: 64,
            drain_timeout: Duration::from_secs(5),
            reconnect_initial: Duration::from_millis(250),
            reconnect_max: Duration::from_secs(30),
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_domain: None,
            log_format: LogFormat::Plain,
            http_listen: None,
            health_max_undelivered: Duration::from_secs(120),
            nvml: NvmlConfig::default(),
            mock: MockSettings::default(),
            redfish: RedfishSettings::default(),
            ipmi: IpmiSettings::default(),
            rapl: RaplSettings::default(),
        }
    }
}

impl Default for MockSettings {
    fn default() -> Self {
        Self {
            gpus: 8,
            profile: Profile::Mixed,
            model: Model::H100,
            seed: 0,
            energy_counter: true,
            counter_file: None,
            node_power: true,
            nvlink: true,
        }
    }
}

pub use capwatch_common::settings::ConfigError;

/// `collectors` as a TOML list, or as one comma-separated string (the form
/// `CAPWATCH_COLLECTORS` takes).
fn list_or_commas<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Form {
        List(Vec<String>),
        Commas(String),
    }
    Ok(Some(match Form::deserialize(d)? {
        Form::List(l) => l,
        Form::Commas(s) if s.trim().is_empty() => Vec::new(),
        Form::Commas(s) => s.split(',').map(|e| e.trim().to_string()).collect(),
    }))
}

/// `url` with the user name and password of its authority (before the
/// last `@` ahead of the path) replaced by `…`, for error messages.
fn without_userinfo(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    match rest[..end].rfind('@') {
        Some(at) => format!("{scheme}://…{}", &rest[at..]),
        None => url.to_string(),
    }
}

/// Why `url` is not a collector endpoint, if it is not one.
fn endpoint_problem(url: &str) -> Option<String> {
    let scheme_ok = url.starts_with("http://") || url.starts_with("https://");
    if !scheme_ok {
        return Some("must be an http:// or https:// URL".into());
    }
    let uri: tonic::codegen::http::Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => return Some(format!("not a URL: {e}")),
    };
    match uri.host() {
        None | Some("") => return Some("has no host".into()),
        Some(_) => {}
    }
    if uri.authority().is_some_and(|a| a.as_str().contains('@')) {
        return Some("must not carry a user name or password".into());
    }
    if uri.path_and_query().is_some_and(|p| p.as_str() != "/") {
        return Some("must be scheme://host:port, without a path or query".into());
    }
    None
}

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(capwatch_common::files::read_toml(path)?)
    }

    /// Every setting and its environment variable: (dotted name, variable).
    pub fn env_vars() -> Vec<(String, String)> {
        use capwatch_common::settings::{env_vars, fields};
        let tables = [
            ("", fields::<Config>()),
            ("nvml", fields::<NvmlConfig>()),
            ("mock", fields::<MockSettings>()),
            ("redfish", fields::<RedfishSettings>()),
            ("ipmi", fields::<IpmiSettings>()),
            ("rapl", fields::<RaplSettings>()),
        ];
        env_vars(&tables, &[])
    }

    /// The file at `path` (defaults without one), then the `CAPWATCH_*`
    /// variables `lookup` finds (`std::env::var_os` in the binary).
    pub fn load(
        path: Option<&Path>,
        lookup: impl Fn(&str) -> Option<std::ffi::OsString>,
    ) -> Result<Self, ConfigError> {
        capwatch_common::settings::load(path, &Self::env_vars(), lookup)
    }

    /// The configuration as TOML that [`Config::from_file`] reads back
    /// (unset settings left out).
    pub fn to_toml(&self) -> Result<String, ConfigError> {
        Ok(toml::to_string(self)?)
    }

    /// The collector endpoints as configured, in the order given.
    pub fn endpoints(&self) -> Vec<String> {
        match (&self.collectors, &self.collector) {
            (Some(list), _) => list.clone(),
            (None, Some(one)) => vec![one.clone()],
            (None, None) => vec![DEFAULT_COLLECTOR.to_string()],
        }
    }

    /// Checks the endpoints: one of `collector` and `collectors`, each a
    /// URL the agent can dial, all with one scheme.
    fn validate_endpoints(&self) -> Result<(), ConfigError> {
        let setting = if self.collectors.is_some() {
            "collectors"
        } else {
            "collector"
        };
        if self.collector.is_some() && self.collectors.is_some() {
            return Err(ConfigError::invalid(
                "collectors",
                "set either collector (one endpoint) or collectors (a list), not both",
            ));
        }
        let endpoints = self.endpoints();
        if endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "collectors",
                "must list at least one endpoint",
            ));
        }
        if endpoints.len() > MAX_COLLECTORS {
            return Err(ConfigError::invalid(
                "collectors",
                format!("at most {MAX_COLLECTORS} endpoints"),
            ));
        }
        for (i, url) in endpoints.iter().enumerate() {
            // Named without any credentials it carries: errors go to logs.
            let shown = without_userinfo(url);
            let which = if setting == "collectors" {
                format!("endpoint {} ({shown:?})", i + 1)
            } else {
                format!("{shown:?}")
            };
            if let Some(problem) = endpoint_problem(url) {
                return Err(ConfigError::invalid(setting, format!("{which} {problem}")));
            }
            if endpoints[..i].contains(url) {
                return Err(ConfigError::invalid(
                    setting,
                    format!("{which} is listed twice"),
                ));
            }
        }
        let https = endpoints
            .iter()
            .filter(|e| e.starts_with("https://"))
            .count();
        if https != 0 && https != endpoints.len() {
            return Err(ConfigError::invalid(
                setting,
                "mixes http:// and https:// endpoints; use one scheme for all",
            ));
        }
        Ok(())
    }

    /// The disk spool's settings, if there is one.
    pub fn spool_disk(&self) -> Option<crate::spool::DiskConfig> {
        self.spool_dir.as_ref().map(|dir| crate::spool::DiskConfig {
            dir: dir.clone(),
            max_bytes: self.spool_max_bytes,
            fsync_interval: self.spool_fsync_interval,
            lock_wait: crate::spool::disk::LOCK_WAIT,
            stall_after: crate::spool::disk::STALL_AFTER,
        })
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: &str| Err(ConfigError::invalid(setting, reason.to_string()));
        if self.interval < Duration::from_millis(10) || self.interval > Duration::from_secs(3600) {
            return bad("interval", "must be between 10ms and 1h");
        }
        if self.spool_capacity == 0 {
            return bad("spool_capacity", "must be at least 1");
        }
        if !(1 << 20..=1 << 40).contains(&self.spool_max_bytes) {
            return bad("spool_max_bytes", "must be between 1 MiB and 1 TiB");
        }
        if self.spool_fsync_interval > Duration::from_secs(60) {
            return bad("spool_fsync_interval", "must be at most 60s");
        }
        if self
            .spool_dir
            .as_ref()
            .is_some_and(|d| d.as_os_str().is_empty())
        {
            return bad(
                "spool_dir",
                "must not be empty (unset it to keep the spool in memory)",
            );
        }
        if !(1..=10_000).contains(&self.batch_max) {
            return bad("batch_max", "must be between 1 and 10000");
        }
        if self.reconnect_initial.is_zero() || self.reconnect_max < self.reconnect_initial {
            return bad(
                "reconnect_initial",
                "must be above zero and not above reconnect_max",
            );
        }
        self.validate_endpoints()?;
        let https = self.endpoints().iter().all(|e| e.starts_with("https://"));
        if https && self.tls_ca.is_none() {
            return bad(
                "tls_ca",
                "an https:// collector needs tls_ca, the CA that signed its certificate",
            );
        }
        if !https && (self.tls_ca.is_some() || self.tls_cert.is_some() || self.tls_domain.is_some())
        {
            return bad("collector", "TLS settings need an https:// collector URL");
        }
        if !self.failback_after.is_zero()
            && (self.failback_after < Duration::from_millis(100)
                || self.failback_after > Duration::from_secs(86_400))
        {
            return bad(
                "failback_after",
                "must be 0s (never) or between 100ms and 24h",
            );
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key go together");
        }
        if self.drain_timeout > Duration::from_secs(3600)
            || self.reconnect_max > Duration::from_secs(3600)
        {
            return bad(
                "drain_timeout",
                "drain_timeout and reconnect_max must be at most 1h",
            );
        }
        if self.health_max_undelivered < Duration::from_secs(1)
            || self.health_max_undelivered > Duration::from_secs(86_400)
        {
            return bad("health_max_undelivered", "must be between 1s and 24h");
        }
        if self.mock.gpus == 0 || self.mock.gpus > 1024 {
            return bad("mock.gpus", "must be between 1 and 1024");
        }
        if self.node_id.len() > 253 || self.node_id.chars().any(char::is_control) {
            return bad("node_id", "must be at most 253 printable characters");
        }
        self.validate_node_power()
    }

    /// Loads the files the node power sources need (`redfish.credentials_file`,
    /// `redfish.ca_file`) and checks them, as the agent does at start: a
    /// missing or malformed file is an error naming the setting and the
    /// file, not a source silently left out of the run. Separate from
    /// [`Config::validate`], which checks the settings themselves (and so
    /// passes on a machine without the files, for `--print-config`).
    pub fn check_files(&self) -> Result<(), ConfigError> {
        use capwatch_common::redfish::{Client, Options, SetupError};
        let Some(url) = &self.redfish.url else {
            return Ok(());
        };
        let mut opts = Options::new(url.clone());
        opts.credentials_file = self.redfish.credentials_file.clone();
        opts.ca_file = self.redfish.ca_file.clone();
        opts.insecure = self.redfish.insecure;
        match Client::new(&opts) {
            Ok(_) => Ok(()),
            Err(e @ SetupError::Credentials { .. }) => Err(ConfigError::invalid(
                "redfish.credentials_file",
                e.to_string(),
            )),
            Err(e @ SetupError::Ca { .. }) => {
                Err(ConfigError::invalid("redfish.ca_file", e.to_string()))
            }
            Err(e @ SetupError::CaAndInsecure) => {
                Err(ConfigError::invalid("redfish.insecure", e.to_string()))
            }
            Err(e @ SetupError::Url { .. }) => {
                Err(ConfigError::invalid("redfish.url", e.to_string()))
            }
        }
    }

    /// Checks the node power sources: at most one whole-node source, each
    /// deadline within its interval.
    fn validate_node_power(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: &str| Err(ConfigError::invalid(setting, reason.to_string()));
        let timing = |timeout: Duration, interval: Duration| {
            (Duration::from_millis(100)..=Duration::from_secs(60)).contains(&timeout)
                && (Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&interval)
                && timeout <= interval
        };
        let redfish = &self.redfish;
        if let Some(url) = &redfish.url {
            let mut opts = capwatch_common::redfish::Options::new(url.clone());
            opts.insecure = redfish.insecure;
            if let Err(e) = capwatch_common::redfish::Client::new(&opts) {
                return Err(ConfigError::invalid("redfish.url", e.to_string()));
            }
            if redfish.insecure && redfish.ca_file.is_some() {
                return bad(
                    "redfish.insecure",
                    "ca_file and insecure exclude each other: verify with the CA, or not at all",
                );
            }
            if redfish
                .chassis
                .as_deref()
                .is_some_and(|c| c.is_empty() || c.contains(['/', '?', '#']) || c.len() > 128)
            {
                return bad(
                    "redfish.chassis",
                    "must be a chassis id (as in /redfish/v1/Chassis/ID), 1 to 128 characters without / ? #",
                );
            }
        } else if redfish.chassis.is_some()
            || redfish.credentials_file.is_some()
            || redfish.ca_file.is_some()
            || redfish.insecure
        {
            return bad("redfish.url", "the other redfish settings need redfish.url");
        }
        if !timing(redfish.timeout, redfish.interval) {
            return bad(
                "redfish.timeout",
                "timeout must be 100ms to 60s and interval 1s to 1h, the timeout not above the interval",
            );
        }
        if self
            .ipmi
            .command
            .as_ref()
            .is_some_and(|c| c.as_os_str().is_empty())
        {
            return bad("ipmi.command", "must name the ipmitool program");
        }
        if !timing(self.ipmi.timeout, self.ipmi.interval) {
            return bad(
                "ipmi.timeout",
                "timeout must be 100ms to 60s and interval 1s to 1h, the timeout not above the interval",
            );
        }
        if redfish.url.is_some() && self.ipmi.command.is_some() {
            return bad(
                "ipmi.command",
                "redfish.url and ipmi.command are two whole-node power sources; configure one",
            );
        }
        let whole_node = redfish.url.is_some() || self.ipmi.command.is_some();
        if whole_node && self.source == SourceKind::Mock && self.mock.node_power {
            return bad(
                "mock.node_power",
                "the mock simulates the node's power and a BMC is configured: two whole-node sources; set mock.node_power = false",
            );
        }
        // Slow enough to miss a wrap of the counter only at powers no CPU
        // package draws (see node_power::rapl).
        if !(Duration::from_millis(100)..=Duration::from_secs(60)).contains(&self.rapl.interval) {
            return bad("rapl.interval", "must be between 100ms and 60s");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_settings_name_the_setting() {
        type Change = fn(&mut Config);
        // (change to the defaults, setting the error must name)
        let cases: [(Change, &str); 26] = [
            (|c| c.collector = Some("https://c:7070".into()), "tls_ca"),
            (|c| c.tls_ca = Some("ca.pem".into()), "collector"),
            (|c| c.collector = Some("c:7070".into()), "collector"),
            (
                |c| c.collector = Some("http://c:7070/ingest".into()),
                "collector",
            ),
            (|c| c.collectors = Some(Vec::new()), "collectors"),
            (
                |c| {
                    c.collector = Some("http://a:7070".into());
                    c.collectors = Some(vec!["http://b:7070".into()]);
                },
                "collectors",
            ),
            (
                |c| c.collectors = Some(vec!["http://a:7070".into(), "b:7070".into()]),
                "collectors",
            ),
            (
                |c| c.collectors = Some(vec!["http://a:7070".into(), "http://:7070".into()]),
                "collectors",
            ),
            (
                |c| c.collectors = Some(vec!["http://a:7070".into(), "http://a:7070".into()]),
                "collectors",
            ),
            (
                |c| c.collectors = Some(vec!["http://a:7070".into(), "https://b:7070".into()]),
                "collectors",
            ),
            (
                |c| c.failback_after = Duration::from_millis(1),
                "failback_after",
            ),
            (|c| c.interval = Duration::ZERO, "interval"),
            (
                |c| c.drain_timeout = Duration::from_secs(86_400),
                "drain_timeout",
            ),
            (|c| c.spool_capacity = 0, "spool_capacity"),
            (|c| c.spool_max_bytes = 1000, "spool_max_bytes"),
            (
                |c| c.spool_fsync_interval = Duration::from_secs(61),
                "spool_fsync_interval",
            ),
            (|c| c.spool_dir = Some(PathBuf::new()), "spool_dir"),
            (
                |c| c.health_max_undelivered = Duration::ZERO,
                "health_max_undelivered",
            ),
            (|c| c.mock.gpus = 0, "mock.gpus"),
            (
                |c| c.redfish.url = Some("bmc.example".into()),
                "redfish.url",
            ),
            (|c| c.redfish.insecure = true, "redfish.url"),
            (
                |c| {
                    c.redfish.url = Some("https://bmc".into());
                    c.redfish.timeout = Duration::from_secs(30);
                },
                "redfish.timeout",
            ),
            (
                |c| {
                    c.redfish.url = Some("https://bmc".into());
                    c.redfish.chassis = Some("a/b".into());
                },
                "redfish.chassis",
            ),
            (
                |c| {
                    c.redfish.url = Some("https://bmc".into());
                    c.ipmi.command = Some("ipmitool".into());
                },
                "ipmi.command",
            ),
            (
                |c| {
                    c.source = SourceKind::Mock;
                    c.ipmi.command = Some("ipmitool".into());
                },
                "mock.node_power",
            ),
            (
                |c| c.rapl.interval = Duration::from_secs(120),
                "rapl.interval",
            ),
        ];
        for (change, setting) in cases {
            let mut cfg = Config::default();
            change(&mut cfg);
            let err = cfg.validate().unwrap_err().to_string();
            assert!(err.contains(&format!("`{setting}`")), "{err}");
        }
        Config::default().validate().unwrap();
    }

    /// Regression: a bad credentials or CA file used to be found only by
    /// the source at start, which then left itself out of the run.
    #[test]
    fn node_power_files_are_checked_and_named() {
        let dir = tempfile::tempdir().unwrap();
        let cred = dir.path().join("bmc.cred");
        let ca = dir.path().join("bmc-ca.pem");
        std::fs::write(&ca, "not a certificate\n").unwrap();
        let mut cfg = Config::default();
        cfg.redfish.url = Some("https://bmc".into());
        cfg.check_files().unwrap();
        cfg.redfish.credentials_file = Some(cred.clone());
        let err = cfg.check_files().unwrap_err().to_string();
        assert!(
            err.contains("`redfish.credentials_file`") && err.contains("bmc.cred"),
            "{err}"
        );
        std::fs::write(&cred, "no colon\n").unwrap();
        let err = cfg.check_files().unwrap_err().to_string();
        assert!(err.contains("`redfish.credentials_file`"), "{err}");
        std::fs::write(&cred, "root:pw\n").unwrap();
        cfg.check_files().unwrap();
        cfg.redfish.ca_file = Some(ca);
        let err = cfg.check_files().unwrap_err().to_string();
        assert!(
            err.contains("`redfish.ca_file`") && err.contains("bmc-ca.pem"),
            "{err}"
        );
    }
}

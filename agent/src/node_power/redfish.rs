//! Whole-node power (and energy, where the BMC has an energy sensor) from
//! the node's BMC over Redfish.
//!
//! Discovery, on the source's worker thread at start: the configured
//! chassis, or the one chassis of `/redfish/v1/Chassis` (at most
//! [`MAX_CHASSIS`] looked at) that stands for the whole node: a top-level
//! chassis (not `Links.ContainedBy` another) of a node's type
//! ([`NODE_TYPES`]: `RackMount`, `Enclosure`, `StandAlone`, ...) with power
//! readings. A GPU baseboard, an NVSwitch tray, a drive backplane (types
//! `Module`, `Component`, `Card`, or contained by another chassis) has
//! power readings of its own that are not the node's, and is skipped. The
//! candidates are logged; when several top-level chassis qualify,
//! discovery refuses to guess (`ambiguous_chassis`) and asks for
//! `redfish.chassis`.
//!
//! A chassis that links `EnvironmentMetrics` with a `PowerWatts` reading is
//! read there (newer BMCs, beside `PowerSubsystem`; its `EnergyJoules` /
//! `EnergykWh` sensor, if present, is the energy counter); otherwise, or
//! when that link is broken (an HTTP error or a body that is not a
//! reading), its `Power` resource (`PowerControl[].PowerConsumedWatts`, no
//! energy). Only a refusal or silence of the BMC as a whole (unauthorized,
//! timeout, TLS, transport) ends the lookup. The chassis chosen at start is
//! the source's name for the run; after [`REDISCOVER_AFTER`] failed reads in
//! a row its links are looked up again (a BMC firmware update may move
//! them). Each request is bounded by `redfish.timeout`; a read that looks
//! the links up again makes up to three requests (the chassis, then
//! `EnvironmentMetrics` and `Power`), the reading taken from the lookup, so
//! such a read can take up to three timeouts. It runs on the worker thread:
//! the samples never wait for it.
//!
//! The Hello waits for discovery at most one request timeout (see
//! [`super::NodePower::list`]). Without a configured chassis a BMC that has
//! not answered by then leaves the source out of the run (logged and
//! counted); with one, the source is listed and found when the BMC answers.
//! A configured chassis is listed with an energy counter only if its first
//! reading, within that wait, had one: the Hello cannot change later, and
//! declaring a counter the BMC may not have would be a guess.
//!
//! An energy reading below the previous one is refused
//! (`counter_backwards`): a BMC that glitches back must not look like a
//! counter restart, which the collector would book as new energy. Two in a
//! row are a restart (a BMC reset): the second is sent as the new base.
//! An unusable energy field keeps the power reading (the energy failure is
//! counted on its own).

use std::time::Instant;

use tracing::{info, warn};

use capwatch_common::redfish::{
    Client, FetchError, Options, Parsed, ReadingError, link, members, parse_environment_metrics,
    parse_power,
};

use super::{Failure, Reader, SourceInfo, Value};
use crate::config::RedfishSettings;

/// Most chassis looked at by discovery.
pub const MAX_CHASSIS: usize = 16;

/// Chassis types that stand for a whole node. Others (`Module`,
/// `Component`, `Card`, `Rack`, ...) are parts of a node or hold several.
pub const NODE_TYPES: &[&str] = &[
    "RackMount",
    "Enclosure",
    "StandAlone",
    "Sled",
    "Blade",
    "Drawer",
    "Cartridge",
];

/// Failed reads in a row after which the chassis' links are looked up
/// again.
pub const REDISCOVER_AFTER: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Schema {
    EnvironmentMetrics,
    Power,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Target {
    path: String,
    schema: Schema,
}

/// The Redfish source.
pub struct RedfishReader {
    client: Client,
    /// `/redfish/v1/Chassis/{id}`, fixed for the run.
    chassis_path: String,
    target: Option<Target>,
    failed_in_a_row: u32,
    last_energy: Option<u64>,
    backwards_in_a_row: u32,
}

fn fetch_failure(e: FetchError) -> Failure {
    Failure::new(e.reason(), e.to_string())
}

fn reading_failure(url: &str, e: ReadingError) -> Failure {
    Failure::new(e.reason(), format!("{url}: {e}"))
}

/// Whether a failure is the BMC's as a whole (no point asking it more).
fn is_bmc_wide(f: &Failure) -> bool {
    matches!(f.reason, "unauthorized" | "timeout" | "tls" | "transport")
}

/// How the Hello lists chassis `id`.
pub fn listing(id: &str, cfg: &RedfishSettings, energy: bool) -> SourceInfo {
    SourceInfo {
        kind: "redfish",
        domain: "node",
        name: id.to_string(),
        energy_counter_supported: energy,
        interval: cfg.interval,
    }
}

/// The id of a chassis at `path` (its last segment).
fn chassis_id(path: &str) -> &str {
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(path)
}

impl RedfishReader {
    /// Connects to the BMC at `url` and discovers its chassis.
    pub fn open(url: &str, cfg: &RedfishSettings) -> Result<(Self, SourceInfo), Failure> {
        let mut opts = Options::new(url);
        opts.credentials_file = cfg.credentials_file.clone();
        opts.ca_file = cfg.ca_file.clone();
        opts.insecure = cfg.insecure;
        opts.timeout = cfg.timeout;
        let client = Client::new(&opts).map_err(|e| Failure::new("setup", e.to_string()))?;
        if cfg.insecure {
            warn!(
                url,
                "redfish.insecure: the BMC's certificate is not verified; anyone on the path can read the credentials and fake the readings"
            );
        }
        if client.is_plaintext() && cfg.credentials_file.is_some() {
            warn!(
                url,
                "the BMC credentials travel in plaintext; use an https:// BMC URL"
            );
        }
        let mut this = Self {
            client,
            chassis_path: String::new(),
            target: None,
            failed_in_a_row: 0,
            last_energy: None,
            backwards_in_a_row: 0,
        };
        let deadline = Instant::now() + cfg.timeout.saturating_mul(3);
        let info = |name: &str, energy: bool| listing(name, cfg, energy);
        match &cfg.chassis {
            Some(id) => {
                this.chassis_path = format!("/redfish/v1/Chassis/{id}");
                match this.resolve(&this.chassis_path.clone()) {
                    Ok((target, reading)) => {
                        this.target = Some(target);
                        Ok((this, info(id, reading.reading.energy_millijoules.is_some())))
                    }
                    Err(e) => {
                        warn!(url, chassis = %id, reason = e.reason, error = %e.message, "BMC chassis not readable at start; listed without an energy counter, retried every interval");
                        Ok((this, info(id, false)))
                    }
                }
            }
            None => {
                let (id, target, reading) = this.discover(deadline)?;
                this.chassis_path = format!("/redfish/v1/Chassis/{id}");
                this.target = Some(target);
                Ok((
                    this,
                    info(&id, reading.reading.energy_millijoules.is_some()),
                ))
            }
        }
    }

    /// The one top-level node chassis with power readings: (id, target,
    /// its reading).
    fn discover(&self, deadline: Instant) -> Result<(String, Target, Parsed), Failure> {
        let collection_url = self.client.url("/redfish/v1/Chassis");
        let collection = self
            .client
            .get_json("/redfish/v1/Chassis")
            .map_err(fetch_failure)?;
        let mut last = Failure::new(
            "no_power_readings",
            format!(
                "{collection_url}: no top-level node chassis has power readings; set redfish.chassis"
            ),
        );
        let mut found: Vec<(String, Target, Parsed)> = Vec::new();
        for path in members(&collection).into_iter().take(MAX_CHASSIS) {
            if Instant::now() > deadline {
                last = Failure::new(
                    "timeout",
                    format!(
                        "{collection_url}: discovery ran past its deadline; set redfish.chassis"
                    ),
                );
                break;
            }
            let id = chassis_id(path).to_string();
            let chassis = match self.client.get_json(path).map_err(fetch_failure) {
                Ok(c) => c,
                Err(e) if is_bmc_wide(&e) => return Err(e),
                Err(e) => {
                    info!(chassis = %id, reason = e.reason, error = %e.message, "Redfish chassis candidate: unreadable");
                    last = e;
                    continue;
                }
            };
            let kind = chassis["ChassisType"].as_str().unwrap_or("");
            let contained_by = chassis["Links"]["ContainedBy"]["@odata.id"].as_str();
            if let Some(parent) = contained_by {
                info!(chassis = %id, chassis_type = kind, contained_by = parent, "Redfish chassis candidate: skipped, part of another chassis");
                continue;
            }
            if !NODE_TYPES.contains(&kind) {
                info!(chassis = %id, chassis_type = kind, "Redfish chassis candidate: skipped, not a node's chassis type");
                continue;
            }
            match self.resolve_body(path, &chassis) {
                Ok((target, reading)) => {
                    info!(chassis = %id, chassis_type = kind, reading = %target.path, "Redfish chassis candidate: a node chassis with power readings");
                    found.push((id, target, reading));
                }
                Err(e) if is_bmc_wide(&e) => return Err(e),
                Err(e) => {
                    info!(chassis = %id, chassis_type = kind, reason = e.reason, "Redfish chassis candidate: no usable reading");
                    last = e;
                }
            }
        }
        match found.len() {
            0 => Err(last),
            1 => Ok(found.remove(0)),
            _ => {
                let ids: Vec<&str> = found.iter().map(|(id, _, _)| id.as_str()).collect();
                Err(Failure::new(
                    "ambiguous_chassis",
                    format!(
                        "{collection_url}: several top-level chassis have power readings ({}); set redfish.chassis to the one that is the whole node",
                        ids.join(", ")
                    ),
                ))
            }
        }
    }

    /// Where the chassis at `path` has its power reading, and one reading
    /// from there.
    fn resolve(&self, path: &str) -> Result<(Target, Parsed), Failure> {
        let chassis = self.client.get_json(path).map_err(fetch_failure)?;
        self.resolve_body(path, &chassis)
    }

    /// [`Self::resolve`] with the chassis' body at hand: EnvironmentMetrics
    /// when it has a power reading, else (absent, broken, or without
    /// power) `Power`; only a BMC-wide failure ends the lookup.
    fn resolve_body(
        &self,
        path: &str,
        chassis: &serde_json::Value,
    ) -> Result<(Target, Parsed), Failure> {
        let candidates = [
            (
                link(chassis, "EnvironmentMetrics"),
                Schema::EnvironmentMetrics,
            ),
            (link(chassis, "Power"), Schema::Power),
        ];
        let mut last = Failure::new(
            "no_power_readings",
            format!(
                "{}: no EnvironmentMetrics or Power reading",
                self.client.url(path)
            ),
        );
        for (link, schema) in candidates {
            let Some(link) = link else { continue };
            let target = Target {
                path: link.to_string(),
                schema,
            };
            match self.read_target(&target) {
                Ok(reading) if reading.reading.power_milliwatts.is_some() => {
                    return Ok((target, reading));
                }
                // No PowerWatts there (only temperatures, say): the next.
                Ok(_) => {}
                Err(e) if is_bmc_wide(&e) => return Err(e),
                // A broken link (404, 500, not a reading): the next, and
                // this failure the answer if none serves.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    fn read_target(&self, target: &Target) -> Result<Parsed, Failure> {
        let body = self.client.get_json(&target.path).map_err(fetch_failure)?;
        let parsed = match target.schema {
            Schema::EnvironmentMetrics => parse_environment_metrics(&body),
            Schema::Power => parse_power(&body).map(|reading| Parsed {
                reading,
                energy_error: None,
            }),
        };
        parsed.map_err(|e| reading_failure(&self.client.url(&target.path), e))
    }

    fn read_once(&mut self) -> Result<Value, Failure> {
        let parsed = match &self.target {
            Some(t) => {
                let target = t.clone();
                self.read_target(&target).map(|r| (target, r))
            }
            // Looked up again: the lookup's reading is this read's.
            None => self.resolve(&self.chassis_path.clone()),
        };
        let (target, parsed) = match parsed {
            Ok((target, parsed)) => {
                self.target = Some(target.clone());
                (target, parsed)
            }
            Err(e) => {
                self.failed_in_a_row += 1;
                if self.failed_in_a_row >= REDISCOVER_AFTER {
                    self.target = None;
                    self.failed_in_a_row = 0;
                }
                return Err(e);
            }
        };
        let reading = parsed.reading;
        let energy_failure = parsed
            .energy_error
            .map(|e| reading_failure(&self.client.url(&target.path), e));
        self.failed_in_a_row = 0;
        if let (Some(e), Some(last)) = (reading.energy_millijoules, self.last_energy)
            && e < last
        {
            self.backwards_in_a_row += 1;
            if self.backwards_in_a_row < 2 {
                return Err(Failure::new(
                    "counter_backwards",
                    format!(
                        "{}: energy {e} mJ below the previous {last} mJ",
                        self.client.url(&target.path)
                    ),
                ));
            }
            warn!(url = %self.client.url(&target.path), energy_mj = e, previous_mj = last, "BMC energy counter restarted");
        }
        self.backwards_in_a_row = 0;
        if reading.energy_millijoules.is_some() {
            self.last_energy = reading.energy_millijoules;
        }
        Ok(Value {
            power_milliwatts: reading.power_milliwatts,
            energy_millijoules: reading.energy_millijoules,
            energy_failure,
        })
    }
}

impl Reader for RedfishReader {
    fn read(&mut self) -> Vec<Result<Value, Failure>> {
        vec![self.read_once()]
    }
}

//! Whole-node power (and energy, where the BMC has an energy sensor) from
//! the node's BMC over Redfish.
//!
//! Discovery, at start: the configured chassis, or each member of
//! `/redfish/v1/Chassis` in order (at most [`MAX_CHASSIS`]) until one has
//! power readings. A chassis that links `EnvironmentMetrics` with a
//! `PowerWatts` reading is read there (newer BMCs, beside
//! `PowerSubsystem`; its `EnergyJoules` / `EnergykWh` sensor, if present,
//! is the energy counter); otherwise its `Power` resource
//! (`PowerControl[].PowerConsumedWatts`, no energy). The chassis chosen at
//! start is the source's name for the run; after [`REDISCOVER_AFTER`]
//! failed reads in a row its links are looked up again (a BMC firmware
//! update may move them).
//!
//! Start-up waits for the BMC at most about four request timeouts: without
//! a configured chassis a BMC that does not answer leaves the source out of
//! the run (logged and counted); with one, the source is listed (without an
//! energy counter, since none was seen) and found when the BMC answers.
//!
//! An energy reading below the previous one is refused
//! (`counter_backwards`): a BMC that glitches back must not look like a
//! counter restart, which the collector would book as new energy. Two in a
//! row are a restart (a BMC reset): the second is sent as the new base.

use std::time::Instant;

use tracing::warn;

use capwatch_common::redfish::{
    Client, FetchError, Options, Reading, ReadingError, link, members, parse_environment_metrics,
    parse_power,
};

use super::{Failure, Reader, SourceInfo, Value};
use crate::config::RedfishSettings;

/// Most chassis looked at by discovery.
pub const MAX_CHASSIS: usize = 16;

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
        let info = |name: String, energy: bool| SourceInfo {
            kind: "redfish",
            domain: "node",
            name,
            energy_counter_supported: energy,
            interval: cfg.interval,
        };
        match &cfg.chassis {
            Some(id) => {
                this.chassis_path = format!("/redfish/v1/Chassis/{id}");
                match this.resolve(&this.chassis_path.clone()) {
                    Ok((target, reading)) => {
                        this.target = Some(target);
                        Ok((this, info(id.clone(), reading.energy_millijoules.is_some())))
                    }
                    Err(e) => {
                        warn!(url, chassis = %id, reason = e.reason, error = %e.message, "BMC chassis not readable at start; listed without an energy counter, retried every interval");
                        Ok((this, info(id.clone(), false)))
                    }
                }
            }
            None => {
                let (id, target, reading) = this.discover(deadline)?;
                this.chassis_path = format!("/redfish/v1/Chassis/{id}");
                this.target = Some(target);
                Ok((this, info(id, reading.energy_millijoules.is_some())))
            }
        }
    }

    /// The first chassis with power readings: (id, target, its reading).
    fn discover(&self, deadline: Instant) -> Result<(String, Target, Reading), Failure> {
        let collection = self
            .client
            .get_json("/redfish/v1/Chassis")
            .map_err(fetch_failure)?;
        let mut last = Failure::new(
            "no_power_readings",
            format!(
                "{}: no chassis has power readings",
                self.client.url("/redfish/v1/Chassis")
            ),
        );
        for path in members(&collection).into_iter().take(MAX_CHASSIS) {
            if Instant::now() > deadline {
                break;
            }
            match self.resolve(path) {
                Ok((target, reading)) => {
                    let id = path
                        .trim_end_matches('/')
                        .rsplit('/')
                        .next()
                        .unwrap_or(path);
                    return Ok((id.to_string(), target, reading));
                }
                // The BMC as a whole refuses or does not answer: stop.
                Err(e) if matches!(e.reason, "unauthorized" | "timeout" | "tls" | "transport") => {
                    return Err(e);
                }
                // This chassis has no usable reading: the next.
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    /// Where the chassis at `path` has its power reading, preferring
    /// EnvironmentMetrics, and one reading from there.
    fn resolve(&self, path: &str) -> Result<(Target, Reading), Failure> {
        let chassis = self.client.get_json(path).map_err(fetch_failure)?;
        let candidates = [
            (
                link(&chassis, "EnvironmentMetrics"),
                Schema::EnvironmentMetrics,
            ),
            (link(&chassis, "Power"), Schema::Power),
        ];
        for (link, schema) in candidates {
            let Some(link) = link else { continue };
            let target = Target {
                path: link.to_string(),
                schema,
            };
            match self.read_target(&target) {
                Ok(reading) if reading.power_milliwatts.is_some() => return Ok((target, reading)),
                // No PowerWatts there (only temperatures, say): the next.
                Ok(_) => {}
                Err(e) if e.reason == "missing" => {}
                Err(e) => return Err(e),
            }
        }
        Err(Failure::new(
            "no_power_readings",
            format!(
                "{}: no EnvironmentMetrics or Power reading",
                self.client.url(path)
            ),
        ))
    }

    fn read_target(&self, target: &Target) -> Result<Reading, Failure> {
        let body = self.client.get_json(&target.path).map_err(fetch_failure)?;
        let parsed = match target.schema {
            Schema::EnvironmentMetrics => parse_environment_metrics(&body),
            Schema::Power => parse_power(&body),
        };
        parsed.map_err(|e| reading_failure(&self.client.url(&target.path), e))
    }

    fn read_once(&mut self) -> Result<Value, Failure> {
        let target = match &self.target {
            Some(t) => t.clone(),
            None => {
                let (target, _) = self.resolve(&self.chassis_path.clone())?;
                self.target = Some(target.clone());
                target
            }
        };
        let reading = match self.read_target(&target) {
            Ok(r) => r,
            Err(e) => {
                self.failed_in_a_row += 1;
                if self.failed_in_a_row >= REDISCOVER_AFTER {
                    self.target = None;
                    self.failed_in_a_row = 0;
                }
                return Err(e);
            }
        };
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
        })
    }
}

impl Reader for RedfishReader {
    fn read(&mut self) -> Vec<Result<Value, Failure>> {
        vec![self.read_once()]
    }
}

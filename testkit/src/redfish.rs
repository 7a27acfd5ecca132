//! A stand-in Redfish service: a BMC (old `Power` or new
//! `EnvironmentMetrics` schema) or a rack PDU, over HTTP/1.1 on
//! `127.0.0.1:0`, optionally TLS with a certificate of its own CA
//! ([`Service::ca_pem`]) and basic auth.
//!
//! The test sets the power and advances the ground-truth energy counter
//! (integer mJ) and reads them back exactly ([`Service::energy_mj`]); the
//! service exposes them as the schema does (watts and joules with three
//! decimals, kWh with eight: a kWh counter's resolution is 1e-8 kWh =
//! 36 mJ, so in kWh mode the ground truth is the counter as exposed, whole
//! multiples of 36 mJ). It can hang ([`Slow`], [`Service::hanging`] says how
//! many requests it holds), fail ([`Fault`]), list further chassis before
//! the node's (a GPU baseboard with a reading of its own, a second node
//! chassis: [`ExtraChassis`]), break its EnvironmentMetrics link
//! ([`Options::broken_environment_metrics`]) and counts requests.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// Which Redfish service it plays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// A BMC with only `Chassis/1/Power` (`PowerControl`), no energy.
    OldPower,
    /// A BMC with `PowerSubsystem` and `EnvironmentMetrics`, its energy
    /// sensor in joules.
    NewJoules,
    /// The same, its energy sensor in kWh.
    NewKwh,
    /// A rack PDU: `PowerEquipment/RackPDUs/1/Metrics` in kWh.
    Pdu,
}

/// How the service hangs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Slow {
    No,
    /// Each request waits this long before its answer.
    For(Duration),
    /// Each request waits until [`Service::release`] (or the service
    /// stops).
    Forever,
}

/// How the reading endpoints answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    None,
    /// HTTP 500.
    ServerError,
    /// A 200 whose body is not JSON.
    Garbage,
    /// Watts below zero.
    NegativeWatts,
    /// Ten megawatts.
    AbsurdWatts,
    /// The energy reading 1000 J below the ground truth.
    CounterBackwards,
    /// An energy reading of a billion kWh (a PDU answering garbage that
    /// parses).
    AbsurdEnergy,
}

/// A further chassis a BMC lists before `Chassis/1`, with a power reading
/// of its own (`EnvironmentMetrics.PowerWatts`): a GPU baseboard
/// (`Module`, contained by `Chassis/1`), or a second node-type chassis.
#[derive(Debug, Clone)]
pub struct ExtraChassis {
    pub id: String,
    pub chassis_type: String,
    /// `Links.ContainedBy`: the id of the chassis it is part of.
    pub contained_by: Option<String>,
    pub power_watts: u64,
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    pub schema: Schema,
    pub tls: bool,
    /// (user, password) to require; `None`: no auth.
    pub credentials: Option<(String, String)>,
    /// Listed first in `/redfish/v1/Chassis`.
    pub extra_chassis: Vec<ExtraChassis>,
    /// A new-schema BMC whose `EnvironmentMetrics` link answers this HTTP
    /// status; `Chassis/1` then links `Power` too, which answers as the old
    /// schema does.
    pub broken_environment_metrics: Option<u16>,
}

impl Options {
    pub fn new(schema: Schema) -> Self {
        Self {
            schema,
            tls: false,
            credentials: None,
            extra_chassis: Vec::new(),
            broken_environment_metrics: None,
        }
    }
    pub fn chassis(mut self, extra: ExtraChassis) -> Self {
        self.extra_chassis.push(extra);
        self
    }
    pub fn broken_environment_metrics(mut self, status: u16) -> Self {
        self.broken_environment_metrics = Some(status);
        self
    }
    pub fn tls(mut self) -> Self {
        self.tls = true;
        self
    }
    pub fn auth(mut self, user: &str, password: &str) -> Self {
        self.credentials = Some((user.into(), password.into()));
        self
    }
}

struct State {
    power_mw: u64,
    /// Ground truth, mJ.
    energy_mj: u64,
    slow: Slow,
    fault: Fault,
    /// Reading answers left with `fault`; `None`: until changed.
    fault_left: Option<u64>,
    /// Bumped by release(): requests waiting before it go on.
    releases: u64,
}

struct Shared {
    schema: Schema,
    extra_chassis: Vec<ExtraChassis>,
    broken_environment_metrics: Option<u16>,
    /// Requests waiting in a slow mode now.
    hanging: AtomicU64,
    authorization: Option<String>,
    state: Mutex<State>,
    wake: Condvar,
    stop: AtomicBool,
    requests: AtomicU64,
    reading_requests: AtomicU64,
}

/// A running stand-in; stops when dropped.
pub struct Service {
    addr: SocketAddr,
    tls: bool,
    ca_pem: Option<String>,
    shared: Arc<Shared>,
}

/// kWh resolution of the stand-in's counters, mJ (1e-8 kWh).
pub const KWH_RESOLUTION_MJ: u64 = 36;

fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ABC[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// (CA PEM, server config) for a certificate naming 127.0.0.1 and
/// localhost.
fn tls_config() -> (String, Arc<rustls::ServerConfig>) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_pem = ca_params.self_signed(&ca_key).unwrap().pem();
    let issuer = Issuer::new(ca_params, ca_key);
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()]).unwrap();
    let cert = params.signed_by(&key, &issuer).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![cert.der().clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
        )
        .unwrap();
    (ca_pem, Arc::new(config))
}

impl Service {
    pub fn start(opts: Options) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let (ca_pem, tls) = if opts.tls {
            let (pem, config) = tls_config();
            (Some(pem), Some(config))
        } else {
            (None, None)
        };
        let shared = Arc::new(Shared {
            schema: opts.schema,
            extra_chassis: opts.extra_chassis,
            broken_environment_metrics: opts.broken_environment_metrics,
            hanging: AtomicU64::new(0),
            authorization: opts
                .credentials
                .map(|(u, p)| format!("Basic {}", base64(format!("{u}:{p}").as_bytes()))),
            state: Mutex::new(State {
                power_mw: 0,
                energy_mj: 0,
                slow: Slow::No,
                fault: Fault::None,
                fault_left: None,
                releases: 0,
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            reading_requests: AtomicU64::new(0),
        });
        let accept = shared.clone();
        std::thread::Builder::new()
            .name("redfish-standin".into())
            .spawn(move || {
                for conn in listener.incoming() {
                    if accept.stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let shared = accept.clone();
                    let tls = tls.clone();
                    std::thread::spawn(move || {
                        let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
                        match tls {
                            Some(config) => {
                                let Ok(server) = rustls::ServerConnection::new(config) else {
                                    return;
                                };
                                serve(&shared, rustls::StreamOwned::new(server, conn));
                            }
                            None => serve(&shared, conn),
                        }
                    });
                }
            })
            .unwrap();
        Self {
            addr,
            tls: opts.tls,
            ca_pem,
            shared,
        }
    }

    /// `https://127.0.0.1:port` (or `http://`).
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The PDU's resource URL (for a [`Schema::Pdu`] service).
    pub fn pdu_url(&self) -> String {
        format!("{}/redfish/v1/PowerEquipment/RackPDUs/1", self.url())
    }

    /// PEM of the CA that signed the service's certificate (TLS only).
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.shared.state.lock().unwrap()
    }

    pub fn set_power_mw(&self, mw: u64) {
        self.state().power_mw = mw;
    }

    /// Adds `mj` to the ground-truth counter.
    pub fn advance_mj(&self, mj: u64) {
        self.state().energy_mj += mj;
    }

    /// The ground-truth counter as the service exposes it, mJ.
    pub fn energy_mj(&self) -> u64 {
        exposed_mj(self.shared.schema, self.state().energy_mj)
    }

    pub fn power_mw(&self) -> u64 {
        self.state().power_mw
    }

    pub fn set_slow(&self, slow: Slow) {
        self.state().slow = slow;
        self.shared.wake.notify_all();
    }

    /// Lets every waiting request answer (the slow mode stays as set).
    pub fn release(&self) {
        self.state().releases += 1;
        self.shared.wake.notify_all();
    }

    pub fn set_fault(&self, fault: Fault) {
        let mut state = self.state();
        state.fault = fault;
        state.fault_left = None;
    }

    /// `fault` for the next `reads` answers of the reading resource, then
    /// none.
    pub fn set_fault_for(&self, fault: Fault, reads: u64) {
        let mut state = self.state();
        state.fault = fault;
        state.fault_left = Some(reads);
    }

    /// Whether a fault set for some reads is still to be answered.
    pub fn fault_pending(&self) -> bool {
        let state = self.state();
        state.fault != Fault::None && state.fault_left.is_some_and(|n| n > 0)
    }

    /// Requests received, any path.
    pub fn requests(&self) -> u64 {
        self.shared.requests.load(Ordering::SeqCst)
    }

    /// Requests waiting in the slow mode now (hanging, not yet answered).
    pub fn hanging(&self) -> u64 {
        self.shared.hanging.load(Ordering::SeqCst)
    }

    /// Requests for the reading resource (Power, EnvironmentMetrics or
    /// the PDU's Metrics) received, answered or hanging.
    pub fn reading_requests(&self) -> u64 {
        self.shared.reading_requests.load(Ordering::SeqCst)
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        self.shared.wake.notify_all();
        // Wake the accept loop so it sees the flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
    }
}

fn exposed_mj(schema: Schema, mj: u64) -> u64 {
    match schema {
        Schema::NewKwh | Schema::Pdu => mj / KWH_RESOLUTION_MJ * KWH_RESOLUTION_MJ,
        _ => mj,
    }
}

/// `n / 10^places` as decimal text with exactly `places` decimals.
fn decimal(n: u64, places: u32) -> String {
    let div = 10u64.pow(places);
    format!("{}.{:0width$}", n / div, n % div, width = places as usize)
}

/// One connection: requests until it closes, the service stops, or a
/// request is malformed.
fn serve<S: Read + Write>(shared: &Shared, stream: S) {
    let mut reader = BufReader::new(stream);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let path = line.split_whitespace().nth(1).unwrap_or("").to_string();
        let mut authorization = None;
        let mut close = false;
        loop {
            let mut header = String::new();
            if reader.read_line(&mut header).unwrap_or(0) == 0 {
                return;
            }
            let header = header.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                let value = value.trim();
                if name.eq_ignore_ascii_case("authorization") {
                    authorization = Some(value.to_string());
                } else if name.eq_ignore_ascii_case("connection")
                    && value.eq_ignore_ascii_case("close")
                {
                    close = true;
                }
            }
        }
        shared.requests.fetch_add(1, Ordering::SeqCst);
        let (status, body) = answer(shared, &path, authorization.as_deref());
        if shared.stop.load(Ordering::SeqCst) {
            return;
        }
        let reason = match status {
            200 => "OK",
            401 => "Unauthorized",
            404 => "Not Found",
            _ => "Internal Server Error",
        };
        let head = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if status == 401 {
                "WWW-Authenticate: Basic realm=\"bmc\"\r\n"
            } else {
                ""
            },
        );
        let out = reader.get_mut();
        if out.write_all(head.as_bytes()).is_err()
            || out.write_all(body.as_bytes()).is_err()
            || out.flush().is_err()
            || close
        {
            return;
        }
    }
}

/// Waits as the slow mode says; false when the service stopped meanwhile.
fn wait_slow(shared: &Shared) -> bool {
    shared.hanging.fetch_add(1, Ordering::SeqCst);
    let answered = wait_slow_counted(shared);
    shared.hanging.fetch_sub(1, Ordering::SeqCst);
    answered
}

fn wait_slow_counted(shared: &Shared) -> bool {
    let mut state = shared.state.lock().unwrap();
    let start = Instant::now();
    let seen = state.releases;
    loop {
        if shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        if state.releases != seen {
            return true;
        }
        let wait = match state.slow {
            Slow::No => return true,
            Slow::For(d) => match d.checked_sub(start.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => return true,
            },
            Slow::Forever => Duration::from_secs(3600),
        };
        state = shared.wake.wait_timeout(state, wait).unwrap().0;
    }
}

fn answer(shared: &Shared, path: &str, authorization: Option<&str>) -> (u16, String) {
    let schema = shared.schema;
    let reading_path = match schema {
        Schema::OldPower => "/redfish/v1/Chassis/1/Power",
        Schema::NewJoules | Schema::NewKwh => "/redfish/v1/Chassis/1/EnvironmentMetrics",
        Schema::Pdu => "/redfish/v1/PowerEquipment/RackPDUs/1/Metrics",
    };
    let path = path.trim_end_matches('/');
    let broken = shared
        .broken_environment_metrics
        .filter(|_| matches!(schema, Schema::NewJoules | Schema::NewKwh));
    let reading_path = if broken.is_some() {
        "/redfish/v1/Chassis/1/Power"
    } else {
        reading_path
    };
    // Counted on arrival, hung or not.
    let is_reading = path == reading_path;
    if is_reading {
        shared.reading_requests.fetch_add(1, Ordering::SeqCst);
    }
    if !wait_slow(shared) {
        return (500, String::new());
    }
    if let Some(want) = &shared.authorization
        && authorization != Some(want.as_str())
    {
        return (
            401,
            r##"{"error":{"code":"Base.1.8.AccessDenied","message":"credentials required"}}"##
                .into(),
        );
    }
    if is_reading {
        return reading(
            shared,
            if broken.is_some() {
                Schema::OldPower
            } else {
                schema
            },
        );
    }
    if let Some(status) = broken
        && path == "/redfish/v1/Chassis/1/EnvironmentMetrics"
    {
        return (
            status,
            r##"{"error":{"code":"Base.1.8.InternalError"}}"##.into(),
        );
    }
    for extra in &shared.extra_chassis {
        let at = format!("/redfish/v1/Chassis/{}", extra.id);
        if path == at {
            let links = match &extra.contained_by {
                Some(parent) => format!(
                    r##","Links":{{"ContainedBy":{{"@odata.id":"/redfish/v1/Chassis/{parent}"}}}}"##
                ),
                None => String::new(),
            };
            return (
                200,
                format!(
                    r##"{{"@odata.id":"{at}","@odata.type":"#Chassis.v1_23_0.Chassis","Id":"{}","Name":"{}","ChassisType":"{}","EnvironmentMetrics":{{"@odata.id":"{at}/EnvironmentMetrics"}}{links}}}"##,
                    extra.id, extra.id, extra.chassis_type
                ),
            );
        }
        if path == format!("{at}/EnvironmentMetrics") {
            return (
                200,
                format!(
                    r##"{{"@odata.id":"{at}/EnvironmentMetrics","@odata.type":"#EnvironmentMetrics.v1_3_0.EnvironmentMetrics","Id":"EnvironmentMetrics","Name":"Environment Metrics","PowerWatts":{{"Reading":{}}}}}"##,
                    extra.power_watts
                ),
            );
        }
    }
    let new = matches!(schema, Schema::NewJoules | Schema::NewKwh);
    let body = match path {
        "/redfish/v1" => r##"{"@odata.id":"/redfish/v1","@odata.type":"#ServiceRoot.v1_15_0.ServiceRoot","Id":"RootService","Name":"Root Service","RedfishVersion":"1.17.0","Chassis":{"@odata.id":"/redfish/v1/Chassis"},"PowerEquipment":{"@odata.id":"/redfish/v1/PowerEquipment"}}"##.to_string(),
        "/redfish/v1/Chassis" if schema != Schema::Pdu => {
            let mut members: Vec<String> = shared
                .extra_chassis
                .iter()
                .map(|e| format!(r##"{{"@odata.id":"/redfish/v1/Chassis/{}"}}"##, e.id))
                .collect();
            members.push(r##"{"@odata.id":"/redfish/v1/Chassis/Backplane"}"##.into());
            members.push(r##"{"@odata.id":"/redfish/v1/Chassis/1"}"##.into());
            format!(
                r##"{{"@odata.id":"/redfish/v1/Chassis","@odata.type":"#ChassisCollection.ChassisCollection","Name":"Chassis Collection","Members@odata.count":{},"Members":[{}]}}"##,
                members.len(),
                members.join(",")
            )
        }
        // A chassis without power readings, listed first, as drive
        // backplanes often are.
        "/redfish/v1/Chassis/Backplane" if schema != Schema::Pdu => r##"{"@odata.id":"/redfish/v1/Chassis/Backplane","@odata.type":"#Chassis.v1_23_0.Chassis","Id":"Backplane","Name":"Drive Backplane","ChassisType":"Module","Status":{"State":"Enabled","Health":"OK"}}"##.to_string(),
        "/redfish/v1/Chassis/1" if !new && schema != Schema::Pdu => r##"{"@odata.id":"/redfish/v1/Chassis/1","@odata.type":"#Chassis.v1_10_0.Chassis","Id":"1","Name":"Computer System Chassis","ChassisType":"RackMount","Manufacturer":"Contoso","Model":"GPU-8U","PowerState":"On","Status":{"State":"Enabled","Health":"OK"},"Power":{"@odata.id":"/redfish/v1/Chassis/1/Power"},"Thermal":{"@odata.id":"/redfish/v1/Chassis/1/Thermal"}}"##.to_string(),
        "/redfish/v1/Chassis/1" if new && broken.is_some() => r##"{"@odata.id":"/redfish/v1/Chassis/1","@odata.type":"#Chassis.v1_23_0.Chassis","Id":"1","Name":"Computer System Chassis","ChassisType":"RackMount","EnvironmentMetrics":{"@odata.id":"/redfish/v1/Chassis/1/EnvironmentMetrics"},"Power":{"@odata.id":"/redfish/v1/Chassis/1/Power"}}"##.to_string(),
        "/redfish/v1/Chassis/1" if new => r##"{"@odata.id":"/redfish/v1/Chassis/1","@odata.type":"#Chassis.v1_23_0.Chassis","Id":"1","Name":"Computer System Chassis","ChassisType":"RackMount","Manufacturer":"Contoso","Model":"GPU-8U","PowerState":"On","Status":{"State":"Enabled","Health":"OK"},"PowerSubsystem":{"@odata.id":"/redfish/v1/Chassis/1/PowerSubsystem"},"ThermalSubsystem":{"@odata.id":"/redfish/v1/Chassis/1/ThermalSubsystem"},"EnvironmentMetrics":{"@odata.id":"/redfish/v1/Chassis/1/EnvironmentMetrics"},"Sensors":{"@odata.id":"/redfish/v1/Chassis/1/Sensors"}}"##.to_string(),
        "/redfish/v1/Chassis/1/PowerSubsystem" if new => r##"{"@odata.id":"/redfish/v1/Chassis/1/PowerSubsystem","@odata.type":"#PowerSubsystem.v1_1_0.PowerSubsystem","Id":"PowerSubsystem","Name":"Power Subsystem","CapacityWatts":12000,"Allocation":{"RequestedWatts":10400,"AllocatedWatts":12000},"PowerSupplies":{"@odata.id":"/redfish/v1/Chassis/1/PowerSubsystem/PowerSupplies"},"Status":{"State":"Enabled","Health":"OK"}}"##.to_string(),
        "/redfish/v1/PowerEquipment" if schema == Schema::Pdu => r##"{"@odata.id":"/redfish/v1/PowerEquipment","@odata.type":"#PowerEquipment.v1_2_0.PowerEquipment","Id":"PowerEquipment","Name":"Power Equipment","RackPDUs":{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs"}}"##.to_string(),
        "/redfish/v1/PowerEquipment/RackPDUs" if schema == Schema::Pdu => r##"{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs","@odata.type":"#PowerDistributionCollection.PowerDistributionCollection","Name":"Rack PDUs","Members@odata.count":1,"Members":[{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs/1"}]}"##.to_string(),
        "/redfish/v1/PowerEquipment/RackPDUs/1" if schema == Schema::Pdu => r##"{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs/1","@odata.type":"#PowerDistribution.v1_3_0.PowerDistribution","Id":"1","Name":"Rack PDU 1","EquipmentType":"RackPDU","Model":"PDU-48","Status":{"State":"Enabled","Health":"OK"},"Metrics":{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs/1/Metrics"}}"##.to_string(),
        _ => return (404, r##"{"error":{"code":"Base.1.8.ResourceNotFound","message":"no such resource"}}"##.into()),
    };
    (200, body)
}

fn reading(shared: &Shared, schema: Schema) -> (u16, String) {
    let (power_mw, energy_mj, fault) = {
        let mut state = shared.state.lock().unwrap();
        let fault = state.fault;
        if let Some(left) = &mut state.fault_left {
            *left = left.saturating_sub(1);
            if *left == 0 {
                state.fault = Fault::None;
                state.fault_left = None;
            }
        }
        (
            state.power_mw,
            exposed_mj(shared.schema, state.energy_mj),
            fault,
        )
    };
    let watts = match fault {
        Fault::ServerError => {
            return (
                500,
                r##"{"error":{"code":"Base.1.8.InternalError"}}"##.into(),
            );
        }
        Fault::Garbage => return (200, "<html>Service Unavailable".into()),
        Fault::NegativeWatts => format!("-{}", decimal(power_mw.max(1000), 3)),
        Fault::AbsurdWatts => "10000000.0".to_string(),
        _ => decimal(power_mw, 3),
    };
    let energy_mj = match fault {
        Fault::CounterBackwards => energy_mj.saturating_sub(1_000_000),
        Fault::AbsurdEnergy => 1_000_000_000 * 3_600_000_000,
        _ => energy_mj,
    };
    let body = match schema {
        Schema::OldPower => format!(
            r##"{{"@odata.id":"/redfish/v1/Chassis/1/Power","@odata.type":"#Power.v1_7_1.Power","Id":"Power","Name":"Power","PowerControl":[{{"@odata.id":"/redfish/v1/Chassis/1/Power#/PowerControl/0","MemberId":"0","Name":"System Power Control","PowerConsumedWatts":{watts},"PowerRequestedWatts":10400,"PowerAvailableWatts":1600,"PowerCapacityWatts":12000,"PowerAllocatedWatts":12000,"PowerMetrics":{{"IntervalInMin":1,"MinConsumedWatts":5012,"MaxConsumedWatts":10221,"AverageConsumedWatts":8200}},"PowerLimit":{{"LimitInWatts":null,"LimitException":"NoAction"}}}}],"PowerSupplies":[{{"MemberId":"0","Name":"PSU 1","PowerInputWatts":null,"Status":{{"State":"Enabled","Health":"OK"}}}}]}}"##
        ),
        Schema::NewJoules => format!(
            r##"{{"@odata.id":"/redfish/v1/Chassis/1/EnvironmentMetrics","@odata.type":"#EnvironmentMetrics.v1_3_0.EnvironmentMetrics","Id":"EnvironmentMetrics","Name":"Chassis Environment Metrics","TemperatureCelsius":{{"DataSourceUri":"/redfish/v1/Chassis/1/Sensors/Inlet","Reading":24.5}},"PowerWatts":{{"DataSourceUri":"/redfish/v1/Chassis/1/Sensors/TotalPower","Reading":{watts}}},"EnergyJoules":{{"DataSourceUri":"/redfish/v1/Chassis/1/Sensors/TotalEnergy","Reading":{}}}}}"##,
            decimal(energy_mj, 3)
        ),
        Schema::NewKwh => format!(
            r##"{{"@odata.id":"/redfish/v1/Chassis/1/EnvironmentMetrics","@odata.type":"#EnvironmentMetrics.v1_3_0.EnvironmentMetrics","Id":"EnvironmentMetrics","Name":"Chassis Environment Metrics","PowerWatts":{{"DataSourceUri":"/redfish/v1/Chassis/1/Sensors/TotalPower","Reading":{watts}}},"EnergykWh":{{"DataSourceUri":"/redfish/v1/Chassis/1/Sensors/TotalEnergy","Reading":{},"SensorResetTime":"2026-01-01T00:00:00Z"}}}}"##,
            decimal(energy_mj / KWH_RESOLUTION_MJ, 8)
        ),
        Schema::Pdu => format!(
            r##"{{"@odata.id":"/redfish/v1/PowerEquipment/RackPDUs/1/Metrics","@odata.type":"#PowerDistributionMetrics.v1_3_0.PowerDistributionMetrics","Id":"Metrics","Name":"Summary Metrics","PowerWatts":{{"DataSourceUri":"/redfish/v1/PowerEquipment/RackPDUs/1/Sensors/PDUPower","Reading":{watts}}},"EnergykWh":{{"DataSourceUri":"/redfish/v1/PowerEquipment/RackPDUs/1/Sensors/PDUEnergy","Reading":{}}}}}"##,
            decimal(energy_mj / KWH_RESOLUTION_MJ, 8)
        ),
    };
    (200, body)
}

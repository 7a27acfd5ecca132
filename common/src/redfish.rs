//! A small blocking Redfish client and the parsing of the power and energy
//! readings capwatch takes from Redfish services: a node's BMC (the agent)
//! and a rack PDU (the collector's meters).
//!
//! The client is one base URL, its trust (a CA file, or an explicit
//! `insecure` switch that turns verification off and that the caller logs),
//! HTTP basic auth from a credentials file, one overall deadline per
//! request and a cap on the body. [`Client::get_json`] returns the parsed
//! body or a [`FetchError`] naming the URL and what was wrong.
//!
//! The parsers read the DMTF schema properties:
//! - `Chassis/{id}/Power` (Power schema, deprecated but still the only
//!   reading on many BMCs): `PowerControl[].PowerConsumedWatts`, the first
//!   entry that has one (the chassis total is listed first).
//! - `Chassis/{id}/EnvironmentMetrics` (newer BMCs, beside
//!   `PowerSubsystem`): `PowerWatts.Reading`, and the energy sensor's
//!   `EnergyJoules.Reading` or `EnergykWh.Reading`, the energy since the
//!   sensor was last reset (a lifetime counter unless someone resets it).
//! - `PowerEquipment/RackPDUs/{id}/Metrics` (PowerDistributionMetrics):
//!   `PowerWatts.Reading`, `EnergykWh.Reading`.
//!
//! *Invariant:* a reading is converted from the decimal text of the JSON
//! number, exactly (u128 decimal arithmetic), and rounded half up once to
//! the integer unit (mW, mJ). JSON numbers arrive as `f64`; the text
//! converted is the shortest text that round-trips that `f64` (at most 17
//! significant digits), which is the text sent for any number of at most
//! 15 significant digits. A service computing in doubles sends up to 17
//! (`0.30000000000000004`, `123456789.1234568`): those are accepted; for
//! them the text converted is within half a unit in the last place of the
//! `f64` of the text sent (a relative 1.2 × 10⁻¹⁶), below 1 mJ for any
//! reading under 4 × 10¹⁵ mJ (1.1 GWh). A number too large for the unit
//! in `u64` is refused ([`ReadingError::Imprecise`]).
//!
//! The energy sensor is read beside the power: an unusable energy field
//! (negative, not a number, too large) does not cost the power reading;
//! [`parse_environment_metrics`] returns the power with the energy's error
//! for the caller to count.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;

/// Largest body a Redfish answer may have. Readings are a few kB; a larger
/// body is refused rather than read.
pub const DEFAULT_MAX_BODY_BYTES: u64 = 1 << 20;

/// Most watts a node's reading may carry: a whole rack-scale chassis (a
/// 72-GPU rack is ~130 kW) is below it; anything above is a broken sensor.
pub const MAX_NODE_WATTS: u64 = 200_000;

/// Most watts a PDU's reading may carry (1 MW: well above any rack or row
/// PDU).
pub const MAX_PDU_WATTS: u64 = 1_000_000;

/// What to connect to and how.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    /// Base URL, `https://host[:port][/path]` (`http://` works, without
    /// protection). Relative paths given to [`Client::get_json`] are joined
    /// to it; absolute paths (`/redfish/v1/...`) to its origin.
    pub url: String,
    /// File with one line `user:password` (split at the first `:`).
    pub credentials_file: Option<PathBuf>,
    /// PEM CA bundle the service's certificate must chain to. Unset (and
    /// not `insecure`): the bundled web roots.
    pub ca_file: Option<PathBuf>,
    /// Accept any certificate (no verification). The caller logs it.
    pub insecure: bool,
    /// Deadline of each request, connect to last byte.
    pub timeout: Duration,
    /// Largest body accepted.
    pub max_body_bytes: u64,
}

impl Options {
    /// `url` with the defaults: no credentials, web roots, 5s, 1 MiB.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            credentials_file: None,
            ca_file: None,
            insecure: false,
            timeout: Duration::from_secs(5),
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
        }
    }
}

/// Why a client could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("Redfish URL {url:?}: {reason}")]
    Url { url: String, reason: String },
    #[error("credentials file {}: {reason}", path.display())]
    Credentials { path: PathBuf, reason: String },
    #[error("CA file {}: {reason}", path.display())]
    Ca { path: PathBuf, reason: String },
    #[error("ca_file and insecure exclude each other: verify with the CA, or not at all")]
    CaAndInsecure,
}

/// Why a request failed. Every variant names the URL.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FetchError {
    #[error("{url}: the service refused the credentials (HTTP {status})")]
    Unauthorized { url: String, status: u16 },
    #[error("{url}: HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("{url}: no answer within {}", humantime::format_duration(*after))]
    Timeout { url: String, after: Duration },
    #[error("{url}: TLS: {reason}")]
    Tls { url: String, reason: String },
    #[error("{url}: body larger than {limit} bytes")]
    TooLarge { url: String, limit: u64 },
    #[error("{url}: not JSON: {reason}")]
    NotJson { url: String, reason: String },
    #[error("{url}: {reason}")]
    Transport { url: String, reason: String },
}

impl FetchError {
    /// A short label for counters: `unauthorized`, `http_status`,
    /// `timeout`, `tls`, `too_large`, `not_json`, `transport`.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Unauthorized { .. } => "unauthorized",
            Self::Status { .. } => "http_status",
            Self::Timeout { .. } => "timeout",
            Self::Tls { .. } => "tls",
            Self::TooLarge { .. } => "too_large",
            Self::NotJson { .. } => "not_json",
            Self::Transport { .. } => "transport",
        }
    }
}

/// A blocking Redfish client for one service. Its `Debug` leaves the
/// credentials out.
#[derive(Clone)]
pub struct Client {
    base: String,
    origin: String,
    agent: ureq::Agent,
    authorization: Option<String>,
    timeout: Duration,
    max_body_bytes: u64,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("base", &self.base)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "<redacted>"),
            )
            .field("timeout", &self.timeout)
            .field("max_body_bytes", &self.max_body_bytes)
            .finish_non_exhaustive()
    }
}

/// Reads `user:password` from `path`: one line (a final newline allowed),
/// split at the first `:`, the user not empty.
pub fn read_credentials(path: &Path) -> Result<(String, String), SetupError> {
    let bad = |reason: &str| SetupError::Credentials {
        path: path.to_path_buf(),
        reason: reason.to_string(),
    };
    crate::warn_if_exposed(path, "credentials_file");
    let text = std::fs::read_to_string(path).map_err(|e| bad(&e.to_string()))?;
    let line = text
        .strip_suffix('\n')
        .map(|l| l.strip_suffix('\r').unwrap_or(l))
        .unwrap_or(&text);
    if line.contains('\n') || line.contains('\r') {
        return Err(bad("must be one line `user:password`"));
    }
    let Some((user, password)) = line.split_once(':') else {
        return Err(bad("must be one line `user:password` (no `:` found)"));
    };
    if user.is_empty() {
        return Err(bad("the user name (before the first `:`) is empty"));
    }
    if line.chars().any(char::is_control) {
        return Err(bad("contains control characters"));
    }
    Ok((user.to_string(), password.to_string()))
}

/// Standard base64 (RFC 4648, padded), for the basic auth header.
fn base64(bytes: &[u8]) -> String {
    const ABC: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18u32, 12, 6, 0].into_iter().enumerate() {
            if i <= chunk.len() {
                out.push(char::from(ABC[((n >> shift) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// (origin `scheme://authority`, base without a trailing `/`) of `url`.
fn split_url(url: &str) -> Result<(String, String), SetupError> {
    let bad = |reason: &str| SetupError::Url {
        url: url.to_string(),
        reason: reason.to_string(),
    };
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .ok_or_else(|| bad("must start with https:// or http://"))?;
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    if authority.is_empty() {
        return Err(bad("has no host"));
    }
    if authority.contains('@') {
        return Err(bad(
            "must not carry a user name or password; use credentials_file",
        ));
    }
    if rest.contains(['?', '#']) {
        return Err(bad("must not have a query or fragment"));
    }
    let scheme_len = url.len() - rest.len();
    let origin = url[..scheme_len + authority.len()].to_string();
    Ok((origin, url.trim_end_matches('/').to_string()))
}

impl Client {
    pub fn new(opts: &Options) -> Result<Self, SetupError> {
        let (origin, base) = split_url(&opts.url)?;
        if opts.insecure && opts.ca_file.is_some() {
            return Err(SetupError::CaAndInsecure);
        }
        let mut tls = ureq::tls::TlsConfig::builder();
        if opts.insecure {
            tls = tls.disable_verification(true);
        }
        if let Some(path) = &opts.ca_file {
            let bad = |reason: String| SetupError::Ca {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|e| bad(e.to_string()))?;
            let mut certs = Vec::new();
            for item in ureq::tls::parse_pem(&pem) {
                match item.map_err(|e| bad(e.to_string()))? {
                    ureq::tls::PemItem::Certificate(c) => certs.push(c),
                    _ => return Err(bad("holds something other than certificates".into())),
                }
            }
            if certs.is_empty() {
                return Err(bad("holds no PEM certificate".into()));
            }
            tls = tls.root_certs(ureq::tls::RootCerts::new_with_certs(&certs));
        }
        let authorization = match &opts.credentials_file {
            Some(path) => {
                let (user, password) = read_credentials(path)?;
                Some(format!(
                    "Basic {}",
                    base64(format!("{user}:{password}").as_bytes())
                ))
            }
            None => None,
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            // A redirect could carry the credentials elsewhere; a BMC has
            // no reason to send one.
            .max_redirects(0)
            .timeout_global(Some(opts.timeout))
            .tls_config(tls.build())
            .user_agent(concat!("capwatch/", env!("CARGO_PKG_VERSION")))
            .build()
            .into();
        Ok(Self {
            base,
            origin,
            agent,
            authorization,
            timeout: opts.timeout,
            max_body_bytes: opts.max_body_bytes,
        })
    }

    /// The base URL, without a trailing `/`.
    pub fn base(&self) -> &str {
        &self.base
    }

    /// Whether requests travel in plaintext (`http://`).
    pub fn is_plaintext(&self) -> bool {
        self.base.starts_with("http://")
    }

    /// The URL of `path`: an absolute path (`/redfish/v1/...`, as in
    /// `@odata.id`) on the base's origin; a relative one under the base;
    /// the base itself for `""`.
    pub fn url(&self, path: &str) -> String {
        if path.is_empty() {
            self.base.clone()
        } else if path.starts_with('/') {
            format!("{}{path}", self.origin)
        } else {
            format!("{}/{path}", self.base)
        }
    }

    /// GETs `path` (see [`Client::url`]) and parses the body as JSON.
    pub fn get_json(&self, path: &str) -> Result<Value, FetchError> {
        let url = self.url(path);
        let mut request = self
            .agent
            .get(&url)
            .header("Accept", "application/json")
            .header("OData-Version", "4.0");
        if let Some(auth) = &self.authorization {
            request = request.header("Authorization", auth);
        }
        let mut response = request.call().map_err(|e| self.classify(&url, e))?;
        let status = response.status().as_u16();
        if status == 401 || status == 403 {
            return Err(FetchError::Unauthorized { url, status });
        }
        if !(200..300).contains(&status) {
            return Err(FetchError::Status { url, status });
        }
        let body = response
            .body_mut()
            .with_config()
            .limit(self.max_body_bytes)
            .read_to_vec()
            .map_err(|e| self.classify(&url, e))?;
        serde_json::from_slice(&body).map_err(|e| FetchError::NotJson {
            url,
            reason: e.to_string(),
        })
    }

    fn classify(&self, url: &str, e: ureq::Error) -> FetchError {
        let url = url.to_string();
        match e {
            ureq::Error::Timeout(_) => FetchError::Timeout {
                url,
                after: self.timeout,
            },
            ureq::Error::BodyExceedsLimit(_) => FetchError::TooLarge {
                url,
                limit: self.max_body_bytes,
            },
            ureq::Error::Tls(_) | ureq::Error::Rustls(_) | ureq::Error::Pem(_) => FetchError::Tls {
                url,
                reason: e.to_string(),
            },
            ureq::Error::Io(io) => {
                // rustls reports a refused certificate or a failed
                // handshake as invalid data on the connection.
                if io.kind() == std::io::ErrorKind::TimedOut {
                    FetchError::Timeout {
                        url,
                        after: self.timeout,
                    }
                } else if io.kind() == std::io::ErrorKind::InvalidData && !self.is_plaintext() {
                    FetchError::Tls {
                        url,
                        reason: io.to_string(),
                    }
                } else {
                    FetchError::Transport {
                        url,
                        reason: io.to_string(),
                    }
                }
            }
            other => FetchError::Transport {
                url,
                reason: other.to_string(),
            },
        }
    }
}

/// What a reading said: power and, where the service has an energy
/// sensor, its cumulative energy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Reading {
    pub power_milliwatts: Option<u64>,
    pub energy_millijoules: Option<u64>,
}

/// Why a body holds no usable reading.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReadingError {
    #[error("no {0} in the answer")]
    Missing(&'static str),
    #[error("{field} is not a number: {value}")]
    NotNumber { field: &'static str, value: String },
    #[error("{field} is negative: {value}")]
    Negative { field: &'static str, value: String },
    #[error("{field} is {value}, above the {cap} plausible")]
    Absurd {
        field: &'static str,
        value: String,
        cap: String,
    },
    #[error("{field} {value} is too large to convert exactly")]
    Imprecise { field: &'static str, value: String },
}

impl ReadingError {
    /// A short label for counters.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::Missing(_) => "missing",
            Self::NotNumber { .. } => "not_number",
            Self::Negative { .. } => "negative",
            Self::Absurd { .. } => "absurd",
            Self::Imprecise { .. } => "imprecise",
        }
    }
}

/// `value × 10^scale` for the decimal text of a JSON number, rounded half
/// up to an integer, exactly; `None` when it has more than 17 significant
/// digits (more than an `f64`'s shortest text ever has: not what we were
/// given) or overflows `u64`.
/// Negative numbers are the caller's to refuse first.
fn scaled(text: &str, scale: u32, multiplier: u64) -> Option<u64> {
    let (mantissa, exp) = match text.split_once(['e', 'E']) {
        Some((m, e)) => (m, e.parse::<i32>().ok()?),
        None => (text, 0),
    };
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits: String = format!("{int}{frac}");
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let significant = digits.trim_start_matches('0').trim_end_matches('0').len();
    if significant > 17 {
        return None;
    }
    let digits = digits.trim_start_matches('0');
    let n: u128 = if digits.is_empty() {
        0
    } else {
        digits.parse().ok()?
    };
    // value = n × 10^(exp - frac.len()); want value × 10^scale × multiplier.
    let power = i64::from(exp) - frac.len() as i64 + i64::from(scale);
    let product = n.checked_mul(u128::from(multiplier))?;
    let result = if power >= 0 {
        let p = u32::try_from(power).ok()?;
        product.checked_mul(10u128.checked_pow(p)?)?
    } else {
        let p = u32::try_from(-power).ok()?;
        match 10u128.checked_pow(p) {
            // Half up, without adding to a product that may fill u128.
            Some(div) => {
                let (q, r) = (product / div, product % div);
                q + u128::from(r >= div - r)
            }
            // Smaller than any representable unit.
            None => 0,
        }
    };
    u64::try_from(result).ok()
}

/// The number at `field` of `v`, checked: a finite, non-negative JSON
/// number; `None` when absent or null.
fn number<'a>(
    v: &'a Value,
    field: &'static str,
) -> Result<Option<&'a serde_json::Number>, ReadingError> {
    match v {
        Value::Null => Ok(None),
        Value::Number(n) => {
            let f = n.as_f64().unwrap_or(f64::NAN);
            if !f.is_finite() {
                return Err(ReadingError::NotNumber {
                    field,
                    value: n.to_string(),
                });
            }
            if f < 0.0 && f != 0.0 {
                return Err(ReadingError::Negative {
                    field,
                    value: n.to_string(),
                });
            }
            Ok(Some(n))
        }
        other => Err(ReadingError::NotNumber {
            field,
            value: other.to_string(),
        }),
    }
}

/// The text of a non-negative number, without a sign (`-0` is 0).
fn text(n: &serde_json::Number) -> String {
    n.to_string().trim_start_matches('-').to_string()
}

/// Watts at `v` as milliwatts, refused above `cap_watts`.
pub fn watts_to_milliwatts(
    v: &Value,
    field: &'static str,
    cap_watts: u64,
) -> Result<Option<u64>, ReadingError> {
    let Some(n) = number(v, field)? else {
        return Ok(None);
    };
    let mw = scaled(&text(n), 3, 1).ok_or_else(|| ReadingError::Imprecise {
        field,
        value: n.to_string(),
    })?;
    if mw > cap_watts.saturating_mul(1000) {
        return Err(ReadingError::Absurd {
            field,
            value: n.to_string(),
            cap: format!("{cap_watts} W"),
        });
    }
    Ok(Some(mw))
}

/// Kilowatt-hours at `v` as millijoules (1 kWh = 3.6 × 10⁹ mJ), exact to
/// the mJ.
pub fn kwh_to_millijoules(v: &Value, field: &'static str) -> Result<Option<u64>, ReadingError> {
    let Some(n) = number(v, field)? else {
        return Ok(None);
    };
    scaled(&text(n), 0, 3_600_000_000)
        .map(Some)
        .ok_or_else(|| ReadingError::Imprecise {
            field,
            value: n.to_string(),
        })
}

/// Joules at `v` as millijoules, exact to the mJ.
pub fn joules_to_millijoules(v: &Value, field: &'static str) -> Result<Option<u64>, ReadingError> {
    let Some(n) = number(v, field)? else {
        return Ok(None);
    };
    scaled(&text(n), 3, 1)
        .map(Some)
        .ok_or_else(|| ReadingError::Imprecise {
            field,
            value: n.to_string(),
        })
}

/// A `Chassis/{id}/Power` body: the first `PowerControl` entry with a
/// `PowerConsumedWatts`. No energy (the Power schema has none).
pub fn parse_power(body: &Value) -> Result<Reading, ReadingError> {
    let controls = body["PowerControl"]
        .as_array()
        .ok_or(ReadingError::Missing("PowerControl"))?;
    for control in controls {
        let v = &control["PowerConsumedWatts"];
        if let Some(mw) = watts_to_milliwatts(v, "PowerConsumedWatts", MAX_NODE_WATTS)? {
            return Ok(Reading {
                power_milliwatts: Some(mw),
                energy_millijoules: None,
            });
        }
    }
    Err(ReadingError::Missing("PowerControl[].PowerConsumedWatts"))
}

/// Energy from `EnergyJoules.Reading`, else `EnergykWh.Reading`.
fn energy(body: &Value) -> Result<Option<u64>, ReadingError> {
    if let Some(mj) =
        joules_to_millijoules(&body["EnergyJoules"]["Reading"], "EnergyJoules.Reading")?
    {
        return Ok(Some(mj));
    }
    kwh_to_millijoules(&body["EnergykWh"]["Reading"], "EnergykWh.Reading")
}

/// A reading, and why its energy field was refused where it was (the
/// power is kept).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Parsed {
    pub reading: Reading,
    pub energy_error: Option<ReadingError>,
}

fn metrics(body: &Value, cap_watts: u64) -> Result<Parsed, ReadingError> {
    let power = watts_to_milliwatts(
        &body["PowerWatts"]["Reading"],
        "PowerWatts.Reading",
        cap_watts,
    )?;
    let (energy, energy_error) = match energy(body) {
        Ok(e) => (e, None),
        // Without power the energy's error is the answer's.
        Err(e) if power.is_none() => return Err(e),
        Err(e) => (None, Some(e)),
    };
    if power.is_none() && energy.is_none() {
        return Err(ReadingError::Missing("PowerWatts.Reading"));
    }
    Ok(Parsed {
        reading: Reading {
            power_milliwatts: power,
            energy_millijoules: energy,
        },
        energy_error,
    })
}

/// A `Chassis/{id}/EnvironmentMetrics` body: `PowerWatts.Reading` and the
/// energy sensor (`EnergyJoules` or `EnergykWh`), where present. An
/// unusable energy field leaves the power and is returned beside it.
pub fn parse_environment_metrics(body: &Value) -> Result<Parsed, ReadingError> {
    metrics(body, MAX_NODE_WATTS)
}

/// A `PowerEquipment/RackPDUs/{id}/Metrics` body: `PowerWatts.Reading`
/// and `EnergykWh.Reading`. A meter is read for its energy: an unusable
/// energy field refuses the whole reading.
pub fn parse_pdu_metrics(body: &Value) -> Result<Reading, ReadingError> {
    let parsed = metrics(body, MAX_PDU_WATTS)?;
    match parsed.energy_error {
        Some(e) => Err(e),
        None => Ok(parsed.reading),
    }
}

/// The `@odata.id` of link `name` in `body` (`"Power": {"@odata.id":
/// "..."}`), if it has one.
pub fn link<'a>(body: &'a Value, name: &str) -> Option<&'a str> {
    body[name]["@odata.id"].as_str()
}

/// The `@odata.id` of each member of a collection body.
pub fn members(body: &Value) -> Vec<&str> {
    body["Members"]
        .as_array()
        .map(|m| m.iter().filter_map(|e| e["@odata.id"].as_str()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn base64_matches_rfc_4648() {
        for (plain, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("admin:pa:ss", "YWRtaW46cGE6c3M="),
        ] {
            assert_eq!(base64(plain.as_bytes()), want, "{plain}");
        }
    }

    #[test]
    fn credentials_split_at_the_first_colon_and_bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bmc.cred");
        std::fs::write(&path, "root:pa:ss\n").unwrap();
        assert_eq!(
            read_credentials(&path).unwrap(),
            ("root".to_string(), "pa:ss".to_string())
        );
        for bad in ["rootpass\n", ":pass\n", "a:b\nc:d\n", ""] {
            std::fs::write(&path, bad).unwrap();
            let err = read_credentials(&path).unwrap_err().to_string();
            assert!(err.contains("bmc.cred"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn debug_output_leaves_the_credentials_out() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bmc.cred");
        std::fs::write(&path, "root:hunter2\n").unwrap();
        let mut opts = Options::new("https://bmc");
        opts.credentials_file = Some(path);
        let shown = format!("{:?}", Client::new(&opts).unwrap());
        let secret = base64(b"root:hunter2");
        assert!(!shown.contains(&secret), "{shown}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("<redacted>"), "{shown}");
    }

    #[test]
    fn urls_join_to_the_base_or_its_origin() {
        let c = Client::new(&Options::new(
            "https://pdu:8443/redfish/v1/PowerEquipment/RackPDUs/1/",
        ))
        .unwrap();
        assert_eq!(
            c.url(""),
            "https://pdu:8443/redfish/v1/PowerEquipment/RackPDUs/1"
        );
        assert_eq!(
            c.url("Metrics"),
            "https://pdu:8443/redfish/v1/PowerEquipment/RackPDUs/1/Metrics"
        );
        assert_eq!(
            c.url("/redfish/v1/Chassis"),
            "https://pdu:8443/redfish/v1/Chassis"
        );
        for bad in [
            "bmc",
            "https://",
            "https://u:p@bmc",
            "ftp://bmc",
            "https://bmc/?x=1",
        ] {
            assert!(Client::new(&Options::new(bad)).is_err(), "{bad}");
        }
    }

    /// (mW, mJ) read, or the reason it was refused.
    type Want = Result<(Option<u64>, Option<u64>), &'static str>;

    /// (body, expected reading or error reason) through one parser.
    fn check(parse: impl Fn(&Value) -> Result<Reading, ReadingError>, cases: &[(Value, Want)]) {
        for (body, want) in cases {
            let got = parse(body)
                .map(|r| (r.power_milliwatts, r.energy_millijoules))
                .map_err(|e| e.reason());
            assert_eq!(&got, want, "{body}");
        }
    }

    #[test]
    fn old_schema_power_control() {
        check(
            parse_power,
            &[
                (
                    json!({"PowerControl": [{"PowerConsumedWatts": 5321.5}]}),
                    Ok((Some(5_321_500), None)),
                ),
                (
                    json!({"PowerControl": [{"PowerConsumedWatts": null}, {"PowerConsumedWatts": 812}]}),
                    Ok((Some(812_000), None)),
                ),
                (json!({"PowerControl": []}), Err("missing")),
                (json!({}), Err("missing")),
                (
                    json!({"PowerControl": [{"PowerConsumedWatts": -3}]}),
                    Err("negative"),
                ),
                (
                    json!({"PowerControl": [{"PowerConsumedWatts": 1e9}]}),
                    Err("absurd"),
                ),
                (
                    json!({"PowerControl": [{"PowerConsumedWatts": "12"}]}),
                    Err("not_number"),
                ),
            ],
        );
    }

    #[test]
    fn new_schema_environment_metrics_is_exact_to_the_millijoule() {
        check(
            |b| parse_environment_metrics(b).map(|p| p.reading),
            &[
                (
                    json!({"PowerWatts": {"Reading": 9876.543}, "EnergyJoules": {"Reading": 123456789.123}}),
                    Ok((Some(9_876_543), Some(123_456_789_123))),
                ),
                // 1e-8 kWh = 36 mJ.
                (
                    json!({"PowerWatts": {"Reading": 10}, "EnergykWh": {"Reading": 1234567.12345678}}),
                    Ok((Some(10_000), Some(4_444_441_644_444_408))),
                ),
                // 16 and 17 significant digits, as a service computing
                // in doubles sends them.
                (
                    json!({"EnergykWh": {"Reading": 12345678.12345678}}),
                    Ok((None, Some(44_444_441_244_444_408))),
                ),
                (
                    json!({"PowerWatts": {"Reading": 0.30000000000000004}, "EnergyJoules": {"Reading": 123456789.1234568}}),
                    Ok((Some(300), Some(123_456_789_123))),
                ),
                (json!({"EnergykWh": {"Reading": 1e300}}), Err("imprecise")),
                (
                    json!({"EnergykWh": {"Reading": 0.000000001}}),
                    Ok((None, Some(4))),
                ),
                (
                    json!({"EnergykWh": {"Reading": 1e3}}),
                    Ok((None, Some(3_600_000_000_000))),
                ),
                (json!({"PowerWatts": {"Reading": null}}), Err("missing")),
                (json!({"EnergyJoules": {"Reading": -1}}), Err("negative")),
                (json!({"PowerWatts": {"Reading": 250000}}), Err("absurd")),
            ],
        );
    }

    /// Regression: an energy field the parser refuses used to cost the
    /// power reading beside it.
    #[test]
    fn a_bad_energy_field_keeps_the_power_and_says_why() {
        for energy in [json!(-1), json!("many"), json!(1e300)] {
            let body =
                json!({"PowerWatts": {"Reading": 812.5}, "EnergyJoules": {"Reading": energy}});
            let parsed = parse_environment_metrics(&body).unwrap();
            assert_eq!(
                parsed.reading,
                Reading {
                    power_milliwatts: Some(812_500),
                    energy_millijoules: None
                },
                "{body}"
            );
            assert!(parsed.energy_error.is_some(), "{body}");
            // A meter's reading is its energy: refused whole.
            assert!(parse_pdu_metrics(&body).is_err(), "{body}");
        }
    }

    #[test]
    fn pdu_metrics_allow_a_larger_cap() {
        check(
            parse_pdu_metrics,
            &[
                (
                    json!({"PowerWatts": {"Reading": 250000}, "EnergykWh": {"Reading": 98765.4321}}),
                    Ok((Some(250_000_000), Some(355_555_555_560_000))),
                ),
                (json!({"PowerWatts": {"Reading": 2e6}}), Err("absurd")),
            ],
        );
    }

    #[test]
    fn scaled_rounds_half_up_once_and_refuses_what_it_cannot_know() {
        assert_eq!(scaled("1.0005", 3, 1), Some(1001));
        assert_eq!(scaled("1.0004", 3, 1), Some(1000));
        assert_eq!(scaled("1.5e-3", 3, 1), Some(2));
        assert_eq!(scaled("0", 3, 1), Some(0));
        assert_eq!(scaled("1e30", 3, 1), None);
        assert_eq!(
            scaled("1234567890123456", 0, 1),
            Some(1_234_567_890_123_456)
        );
        assert_eq!(scaled("0.30000000000000004", 3, 1), Some(300));
        assert_eq!(scaled("123456789012345678", 0, 1), None);
        assert_eq!(scaled("abc", 0, 1), None);
    }

    #[test]
    fn scaled_rounds_a_product_near_the_top_of_its_range_without_overflow() {
        // 17 significant digits and many trailing zeros: n × multiplier
        // nearly fills a u128 before it is divided back down.
        let watts = "34028236692093.8460000000000000000000000";
        assert_eq!(scaled(watts, 3, 1), Some(34_028_236_692_093_846));
        let kwh = "9452287.9700260684000000000000";
        assert_eq!(scaled(kwh, 0, 3_600_000_000), Some(34_028_236_692_093_846));
        assert_eq!(
            scaled("9452.2879700260684000000000000", 0, 3_600_000_000),
            Some(34_028_236_692_094)
        );
    }
}

//! Collector configuration: TOML file, then `CAPWATCH_*` environment, then
//! flags (the last wins). Every setting has a default and a variable
//! (`CAPWATCH_` and its name in upper case; `CAPWATCH_TENANTS` and
//! `CAPWATCH_LEDGER` for the two files); the checked-in
//! `deploy/examples/collector.toml` lists them all and a test parses it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use capwatch_common::LogFormat;

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Address of the gRPC ingest server agents stream to.
    pub grpc_listen: SocketAddr,
    /// Address of the HTTP server (status page, `/metrics`, `/healthz`,
    /// `/readyz`, the usage API).
    pub http_listen: SocketAddr,
    /// Tenant file (contracts and leases). Reloaded on SIGHUP without a
    /// restart. Unset: no tenants, every GPU is `unassigned`.
    pub tenants_file: Option<PathBuf>,
    /// The billing ledger (SQLite). Created once with `capwatch-collector
    /// init-ledger`; a collector never starts on a missing, empty or
    /// unwritable one.
    pub ledger_path: PathBuf,
    /// The billing ledger on PostgreSQL instead of SQLite
    /// (`postgres://user@host1:5432,host2:5432/db?target_session_attrs=read-write`),
    /// which several collectors may share. Its schema is created once with
    /// `capwatch-collector init-ledger --ledger-url URL`. Unset: SQLite at
    /// `ledger_path` (setting both, `ledger_path` not at its default, is
    /// an error).
    pub ledger_url: Option<String>,
    /// A file holding the PostgreSQL password, so that it is not in the
    /// URL or the config (a password in `ledger_url` is refused).
    pub ledger_password_file: Option<PathBuf>,
    /// Most connections to PostgreSQL open at once.
    pub ledger_pool_size: usize,
    /// A PostgreSQL connection older than this is closed instead of being
    /// reused (so that connections move to a new primary, and to servers
    /// behind a load balancer, in time).
    #[serde(with = "capwatch_common::duration")]
    pub ledger_connection_max_age: Duration,
    /// How long connecting to PostgreSQL may take.
    #[serde(with = "capwatch_common::duration")]
    pub ledger_connect_timeout: Duration,
    /// Longest one PostgreSQL statement may run (the server's
    /// `statement_timeout`), and longest a ledger connection may sit idle
    /// inside a transaction before the server ends it
    /// (`idle_in_transaction_session_timeout`: a collector cut off
    /// mid-commit releases its row locks then). A ledger call, waiting for
    /// a connection included, gives up after the connect timeout plus
    /// twice this.
    #[serde(with = "capwatch_common::duration")]
    pub ledger_statement_timeout: Duration,
    /// How often accepted samples are committed to the ledger; agents get
    /// their acks after the commit.
    #[serde(with = "capwatch_common::duration")]
    pub commit_interval: Duration,
    /// How long after a minute closes late samples may still change it: the
    /// ledger's watermark (the usage API's `finalized_through`) trails the
    /// clock by this much (rounded down to a quarter-hour), and what arrives later for a minute before it is
    /// booked as an adjustment.
    #[serde(with = "capwatch_common::duration")]
    pub finalize_grace: Duration,
    /// How long minute buckets are kept. Usage rows in this window have
    /// every figure; before it, rows come from hourly rollups (whole
    /// hours only, no `p95_power_watts`). At least `max_sample_age` plus
    /// 7 days (the longest counter gap spread back) plus 1 hour.
    #[serde(with = "capwatch_common::duration")]
    pub minute_retention: Duration,
    /// How long hourly rollups (per tenant and node, with each tenant's
    /// peak quarter-hour) are kept; at least `minute_retention`.
    #[serde(with = "capwatch_common::duration")]
    pub hour_retention: Duration,
    /// How long daily rollups (UTC days) are kept; at least
    /// `hour_retention`. Unset: forever.
    #[serde(with = "capwatch_common::duration::option")]
    pub day_retention: Option<Duration>,
    /// Whether the ledger keeps each GPU's figures per hour (the rows of
    /// `/v2/usage?group_by=gpu`), kept as long as `hour_retention`. Off
    /// (the default: they make a site-scale commit about four times
    /// slower), the ledger records them incomplete and refuses rows per
    /// GPU until the first whole hour after every collector keeps them.
    pub usage_gpu_rows: bool,
    /// A GPU whose latest reading is older than this, by the reading's own
    /// timestamp, is stale; also the most time one reading's power stands
    /// for. Unset: three times the interval its agent announced.
    #[serde(with = "capwatch_common::duration::option")]
    pub stale_after: Option<Duration>,
    /// No longer used: over-contract time is evaluated per minute from the
    /// ledger's energy. Accepted (with a warning) so that existing config
    /// files still load.
    #[serde(with = "capwatch_common::duration::option")]
    pub evaluate_interval: Option<Duration>,
    /// Export per-GPU series. Switch off for very large fleets; tenant and
    /// node series stay.
    pub per_gpu_metrics: bool,
    /// Export per-node series (`capwatch_node_*`). Off with
    /// `per_gpu_metrics` too, `/metrics` carries tenants and the collector
    /// only: the cheapest scrape for a site of 100,000 GPUs and more.
    pub per_node_metrics: bool,
    /// Largest GPU inventory one node may announce.
    pub max_gpus_per_node: u32,
    /// How far ahead of the collector's clock a sample may be stamped;
    /// later ones are rejected (`reason="timestamp"`). Older samples are
    /// fine: agents re-send their spool after an outage.
    #[serde(with = "capwatch_common::duration")]
    pub max_clock_skew: Duration,
    /// How far behind the collector's clock a sample may be stamped; older
    /// ones are rejected (`reason="timestamp"`). Longer than any agent's
    /// spool covers.
    #[serde(with = "capwatch_common::duration")]
    pub max_sample_age: Duration,
    /// Largest gRPC message accepted, in bytes.
    pub max_message_bytes: usize,
    /// How long a new stream may take to send its Hello.
    #[serde(with = "capwatch_common::duration")]
    pub hello_timeout: Duration,
    /// On shutdown, how long open streams get to finish.
    #[serde(with = "capwatch_common::duration")]
    pub shutdown_grace: Duration,
    /// Names this collector (on `/metrics` and in the ledger's node
    /// claims). Its fencing holder is `<collector_id>/<random hex>`, new
    /// at every start, so two processes never share a holder. Unset: the
    /// hostname.
    pub collector_id: Option<String>,
    /// Once ledger commits have failed for this long, every stream ends
    /// with UNAVAILABLE and Hellos are refused until a commit succeeds, so
    /// agents move to a collector that can commit.
    #[serde(with = "capwatch_common::duration")]
    pub shed_streams_after: Duration,
    /// Tokens agents and usage API clients must present (see
    /// `deploy/examples/auth.toml`). Reloaded on SIGHUP. Unset: none asked.
    pub auth_file: Option<PathBuf>,
    /// `/metrics` needs an admin API token too (the status page always
    /// does once API tokens are configured).
    pub metrics_auth: bool,
    /// PEM certificate chain the gRPC server presents (TLS). With
    /// `tls_key`.
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of `tls_cert`.
    pub tls_key: Option<PathBuf>,
    /// PEM CA bundle client certificates must chain to (mutual TLS); a
    /// node's certificate must then name the node (DNS SAN).
    pub tls_client_ca: Option<PathBuf>,
    /// Allow plaintext gRPC on an address other than loopback.
    pub insecure_plaintext: bool,
    /// Most agent streams open at once.
    pub max_streams: usize,
    /// Most node samples per second one stream may deliver; faster
    /// senders are slowed down (not refused), so a spool re-sent after an
    /// outage still arrives whole.
    pub max_node_sample_rate: u32,
    /// Longest an HTTP request may take.
    #[serde(with = "capwatch_common::duration")]
    pub http_request_timeout: Duration,
    /// Most HTTP connections open at once; more are refused at accept.
    /// Kept to at most a quarter of the descriptor limit, so HTTP clients
    /// can never take the descriptors agent streams need.
    pub http_max_connections: usize,
    /// How long a client has to send a whole request head, counted from
    /// when the connection opens or its previous response was sent: also
    /// how long an idle keep-alive connection is kept.
    #[serde(with = "capwatch_common::duration")]
    pub http_header_read_timeout: Duration,
    /// A client that takes no bytes of its response for this long is
    /// disconnected.
    #[serde(with = "capwatch_common::duration")]
    pub http_write_timeout: Duration,
    /// Log format: `plain` or `json`.
    pub log_format: LogFormat,
    /// Facility meters (`[[meter]]` entries): Modbus TCP revenue meters
    /// and Redfish PDUs, each feeding a set of nodes, whose energy is
    /// allocated to the tenants under them. None by default.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub meter: Vec<crate::meters::MeterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            grpc_listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 9470)),
            tenants_file: None,
            ledger_path: PathBuf::from(DEFAULT_LEDGER_PATH),
            ledger_url: None,
            ledger_password_file: None,
            ledger_pool_size: 4,
            ledger_connection_max_age: Duration::from_secs(30 * 60),
            ledger_connect_timeout: Duration::from_secs(5),
            ledger_statement_timeout: Duration::from_secs(10),
            commit_interval: Duration::from_secs(1),
            finalize_grace: Duration::from_secs(600),
            minute_retention: Duration::from_secs(35 * 86_400),
            hour_retention: Duration::from_secs(400 * 86_400),
            day_retention: None,
            usage_gpu_rows: false,
            stale_after: None,
            evaluate_interval: None,
            per_gpu_metrics: true,
            per_node_metrics: true,
            max_gpus_per_node: 64,
            max_clock_skew: Duration::from_secs(600),
            max_sample_age: Duration::from_secs(7 * 86_400),
            max_message_bytes: 4 << 20,
            hello_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(5),
            collector_id: None,
            shed_streams_after: Duration::from_secs(30),
            auth_file: None,
            metrics_auth: false,
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            insecure_plaintext: false,
            max_streams: 50_000,
            max_node_sample_rate: 1_000,
            http_request_timeout: Duration::from_secs(30),
            http_max_connections: 256,
            http_header_read_timeout: Duration::from_secs(10),
            http_write_timeout: Duration::from_secs(10),
            log_format: LogFormat::Plain,
            meter: Vec::new(),
        }
    }
}

pub use capwatch_common::settings::ConfigError;

/// Why `id` cannot name a collector, if it cannot: it goes into label
/// values and the ledger's holder ids.
pub fn collector_id_ok(id: &str) -> Result<(), &'static str> {
    if id.is_empty() || id.len() > 200 {
        return Err("must be 1-200 bytes");
    }
    if id
        .chars()
        .any(|c| c.is_control() || c.is_whitespace() || c == '/')
    {
        return Err("must not hold whitespace, control characters or '/'");
    }
    Ok(())
}

/// `ledger_path` where none is set.
pub const DEFAULT_LEDGER_PATH: &str = "capwatch-ledger.db";

/// Which ledger the configuration selects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LedgerChoice {
    Sqlite(PathBuf),
    Postgres(crate::ledger::PgSettings),
}

/// Settings whose variable is not their name: kept from the flags'.
const ENV_RENAMES: &[(&str, &str)] = &[
    ("tenants_file", "CAPWATCH_TENANTS"),
    ("ledger_path", "CAPWATCH_LEDGER"),
];

impl Config {
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        Ok(capwatch_common::files::read_toml(path)?)
    }

    /// Every setting and its environment variable: (name, variable).
    pub fn env_vars() -> Vec<(String, String)> {
        use capwatch_common::settings::{env_vars, fields};
        // Meters are tables of their own, in the file only.
        env_vars(&[("", fields::<Config>())], ENV_RENAMES)
            .into_iter()
            .filter(|(setting, _)| setting != "meter")
            .collect()
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

    /// The ledger `ledger_url` or `ledger_path` selects.
    pub fn ledger(&self) -> LedgerChoice {
        match &self.ledger_url {
            Some(url) => LedgerChoice::Postgres(crate::ledger::PgSettings {
                url: url.clone(),
                password_file: self.ledger_password_file.clone(),
                pool_size: self.ledger_pool_size,
                connection_max_age: self.ledger_connection_max_age,
                connect_timeout: self.ledger_connect_timeout,
                statement_timeout: self.ledger_statement_timeout,
            }),
            None => LedgerChoice::Sqlite(self.ledger_path.clone()),
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |setting, reason: &str| Err(ConfigError::invalid(setting, reason.to_string()));
        if let Some(url) = &self.ledger_url {
            if self.ledger_path != Path::new(DEFAULT_LEDGER_PATH) {
                return bad(
                    "ledger_url",
                    "ledger_url (PostgreSQL) and ledger_path (SQLite) are both set: choose one",
                );
            }
            match url.parse::<tokio_postgres::Config>() {
                Err(e) => {
                    return Err(ConfigError::invalid(
                        "ledger_url",
                        format!("not a PostgreSQL URL: {e}"),
                    ));
                }
                // A secret in a setting shows wherever settings do
                // (`--print-config`, process listings, unit files).
                Ok(cfg) if cfg.get_password().is_some() => {
                    return bad(
                        "ledger_url",
                        "must not carry a password: put it in a file named by ledger_password_file",
                    );
                }
                Ok(_) => {}
            }
        }
        if self.ledger_password_file.is_some() && self.ledger_url.is_none() {
            return bad("ledger_password_file", "needs ledger_url");
        }
        if !(1..=1000).contains(&self.ledger_pool_size) {
            return bad("ledger_pool_size", "must be between 1 and 1000");
        }
        if self.ledger_connection_max_age < Duration::from_secs(1) {
            return bad("ledger_connection_max_age", "must be at least 1s");
        }
        if self.ledger_connect_timeout < Duration::from_millis(100)
            || self.ledger_connect_timeout > Duration::from_secs(600)
        {
            return bad("ledger_connect_timeout", "must be between 100ms and 10m");
        }
        if self.ledger_statement_timeout < Duration::from_millis(100)
            || self.ledger_statement_timeout > Duration::from_secs(3600)
        {
            return bad("ledger_statement_timeout", "must be between 100ms and 1h");
        }
        if self
            .stale_after
            .is_some_and(|d| d < Duration::from_millis(10))
        {
            return bad("stale_after", "must be at least 10ms");
        }
        // Agents wait 10 s for their Welcome, which may wait for a commit.
        if self.commit_interval < Duration::from_millis(10)
            || self.commit_interval > Duration::from_secs(5)
        {
            return bad("commit_interval", "must be between 10ms and 5s");
        }
        if !(1..=100_000).contains(&self.max_gpus_per_node) {
            return bad("max_gpus_per_node", "must be between 1 and 100000");
        }
        if self.max_message_bytes < 1024 {
            return bad("max_message_bytes", "must be at least 1024");
        }
        if self.max_clock_skew < Duration::from_secs(1)
            || self.max_clock_skew > Duration::from_secs(86_400)
        {
            return bad("max_clock_skew", "must be between 1s and 24h");
        }
        if self.max_sample_age < Duration::from_secs(60)
            || self.max_sample_age > Duration::from_secs(366 * 86_400)
        {
            return bad("max_sample_age", "must be between 1m and 366d");
        }
        // A late sample, or the energy of a counter gap spread back over
        // it, must land in minutes that are still kept.
        let latest_write =
            self.max_sample_age + crate::edge::MAX_SPREAD + Duration::from_secs(3600);
        if self.minute_retention < latest_write {
            return Err(ConfigError::invalid(
                "minute_retention",
                format!(
                    "must be at least max_sample_age + 7d + 1h ({})",
                    humantime::format_duration(latest_write)
                ),
            ));
        }
        if self.hour_retention < self.minute_retention {
            return bad("hour_retention", "must be at least minute_retention");
        }
        if self.day_retention.is_some_and(|d| d < self.hour_retention) {
            return bad("day_retention", "must be at least hour_retention");
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return bad("tls_cert", "tls_cert and tls_key go together");
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return bad("tls_client_ca", "mutual TLS needs tls_cert and tls_key");
        }
        if self.tls_cert.is_none()
            && !self.grpc_listen.ip().is_loopback()
            && !self.insecure_plaintext
        {
            return Err(ConfigError::invalid(
                "grpc_listen",
                format!(
                    "{} is not loopback and TLS is off: set tls_cert and tls_key, or insecure_plaintext = true",
                    self.grpc_listen
                ),
            ));
        }
        if self.max_streams == 0 {
            return bad("max_streams", "must be at least 1");
        }
        if self.max_node_sample_rate == 0 {
            return bad("max_node_sample_rate", "must be at least 1");
        }
        if self.http_request_timeout < Duration::from_millis(100) {
            return bad("http_request_timeout", "must be at least 100ms");
        }
        if self.http_max_connections == 0 {
            return bad("http_max_connections", "must be at least 1");
        }
        if self.http_header_read_timeout < Duration::from_millis(100)
            || self.http_header_read_timeout > Duration::from_secs(600)
        {
            return bad("http_header_read_timeout", "must be between 100ms and 10m");
        }
        if self.http_write_timeout < Duration::from_millis(100)
            || self.http_write_timeout > Duration::from_secs(600)
        {
            return bad("http_write_timeout", "must be between 100ms and 10m");
        }
        if self.hello_timeout < Duration::from_millis(100)
            || self.hello_timeout > Duration::from_secs(600)
        {
            return bad("hello_timeout", "must be between 100ms and 10m");
        }
        if self.shutdown_grace > Duration::from_secs(600) {
            return bad("shutdown_grace", "must be at most 10m");
        }
        if let Some(id) = &self.collector_id
            && let Err(reason) = collector_id_ok(id)
        {
            return bad("collector_id", reason);
        }
        if self.shed_streams_after < Duration::from_secs(1)
            || self.shed_streams_after > Duration::from_secs(86_400)
        {
            return bad("shed_streams_after", "must be between 1s and 24h");
        }
        self.meters()?;
        Ok(())
    }

    /// The `[[meter]]` entries, checked.
    pub fn meters(&self) -> Result<Vec<crate::meters::MeterSpec>, ConfigError> {
        crate::meters::check(&self.meter).map_err(|e| ConfigError::invalid("meter", e.to_string()))
    }
}

//! `capwatch-collector`: parse flags, set up logging, run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;

use capwatch_collector::config::{Config, LedgerChoice};
use capwatch_collector::ledger::LedgerWriter as _;
use capwatch_collector::tenants::{TenantHistory, Tenants};
use capwatch_common::LogFormat;

/// capwatch collector: receives GPU samples from capwatch agents over gRPC,
/// attributes every GPU to a tenant, tracks each tenant's power against its
/// contract and exports Prometheus metrics on /metrics.
///
/// Settings come from the config file, then CAPWATCH_* environment
/// variables, then flags; the last wins. SIGHUP reloads the tenant file
/// and the auth file.
#[derive(Debug, Parser)]
#[command(name = "capwatch-collector", version)]
struct Args {
    /// TOML config file (every setting is optional).
    #[arg(short, long, env = "CAPWATCH_CONFIG", global = true)]
    config: Option<PathBuf>,
    /// Tenant file: contracts and what each tenant leases.
    #[arg(short, long, env = "CAPWATCH_TENANTS", global = true)]
    tenants: Option<PathBuf>,
    /// The billing ledger file (SQLite).
    #[arg(long, env = "CAPWATCH_LEDGER", global = true)]
    ledger: Option<PathBuf>,
    /// The billing ledger on PostgreSQL instead
    /// (postgres://user@host1,host2/db?target_session_attrs=read-write).
    #[arg(long, env = "CAPWATCH_LEDGER_URL", global = true)]
    ledger_url: Option<String>,
    /// Tokens agents and usage API clients must present (TOML).
    #[arg(long, env = "CAPWATCH_AUTH_FILE")]
    auth_file: Option<PathBuf>,
    /// gRPC ingest address agents connect to.
    #[arg(long, env = "CAPWATCH_GRPC_LISTEN")]
    grpc_listen: Option<SocketAddr>,
    /// HTTP address for the status page, /metrics, /healthz, /readyz and
    /// the usage API.
    #[arg(long, env = "CAPWATCH_HTTP_LISTEN")]
    http_listen: Option<SocketAddr>,
    /// No sample for this long makes a GPU stale [default: 3 agent intervals].
    #[arg(long, env = "CAPWATCH_STALE_AFTER", value_parser = humantime::parse_duration)]
    stale_after: Option<Duration>,
    /// Export per-GPU series (true/false).
    #[arg(long, env = "CAPWATCH_PER_GPU_METRICS")]
    per_gpu_metrics: Option<bool>,
    /// Allow plaintext gRPC on a non-loopback address (true/false).
    #[arg(long, env = "CAPWATCH_INSECURE_PLAINTEXT")]
    insecure_plaintext: Option<bool>,
    /// Log format.
    #[arg(long, env = "CAPWATCH_LOG_FORMAT")]
    log_format: Option<LogFormat>,
    /// Check the config and tenant file, print a summary and exit.
    #[arg(long)]
    check: bool,
    /// Start on a ledger whose latest commits are missing (its
    /// .last-commit file records more than it holds: restored from a
    /// backup, or its -wal file lost), accepting it as it stands. The
    /// ledger gets a new ledger_id. For one start; never set it for good.
    #[arg(long)]
    recover_ledger: bool,
    /// Print the effective configuration as TOML (a config file) and exit.
    #[arg(long)]
    print_config: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

// Parsed once per run: the size of the larger variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, clap::Subcommand)]
enum Command {
    /// Create a new, empty ledger at --ledger (or the config's
    /// ledger_path), or its schema in the PostgreSQL database at
    /// --ledger-url, and exit. Needed once, before the first start: the
    /// collector never creates one itself, so that a lost ledger is not
    /// taken for a new one. Refused where a ledger or a trace of one
    /// (-wal, -shm, .last-commit) exists.
    InitLedger,
    /// Print per-tenant usage from the ledger file (for billing jobs; safe
    /// while the collector runs; uses --ledger and --tenants), or ask a
    /// running collector's usage API. --ledger, --tenants and --config may
    /// come before or after `usage`.
    Usage {
        /// Ask the collector at this base URL (http://host:9470) instead of
        /// reading the ledger file.
        #[arg(long)]
        url: Option<String>,
        /// With --url: file holding an API token (or set CAPWATCH_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Only this tenant [default: every tenant].
        #[arg(long)]
        tenant: Option<String>,
        /// Start, inclusive, RFC 3339 (2026-11-01T00:00:00Z or
        /// 2026-11-01T00:00:00+01:00), on a row boundary.
        #[arg(long)]
        from: String,
        /// End, exclusive, RFC 3339, on a row boundary.
        #[arg(long)]
        to: String,
        /// Row length: 1m, 15m, 1h, 1d, month, or total (one row for the whole period).
        #[arg(long, default_value = "1h")]
        step: String,
        /// IANA time zone rows are cut in (days and months start at local
        /// midnight).
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Output: table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
        /// Only adjustments booked after this revision (the `revision` of
        /// an earlier answer) [default: every adjustment of the period].
        #[arg(long)]
        since_revision: Option<String>,
    },
    /// Copy the SQLite ledger (--ledger) to a new file, safe while a
    /// collector writes it (SQLite's online backup API): one
    /// self-contained file, checked whole, written beside its final name
    /// and renamed into place. An existing file is refused.
    Backup {
        /// The backup file to write, or a directory to write
        /// <ledger file name>-YYYYMMDDTHHMMSSZ.backup (UTC) into.
        #[arg(long)]
        to: PathBuf,
        /// With a directory --to: keep only the newest N backups of that
        /// name there (the new one always among them).
        #[arg(long)]
        keep: Option<usize>,
    },
    /// Put a backup in place of the SQLite ledger (--ledger), atomically.
    /// Refused while a collector holds that ledger. The restored ledger
    /// gets a new ledger_id: it lacks every commit after the backup.
    Restore {
        /// The backup file to restore.
        #[arg(long)]
        from: PathBuf,
        /// Replace an existing ledger (or what is left of one) at --ledger;
        /// its commits since the backup are lost.
        #[arg(long)]
        replace: bool,
    },
    /// Recompute every hourly and daily rollup and every tenant total of
    /// the SQLite ledger (--ledger) from its minutes, rollups and
    /// adjustments, as far as retention allows, and report each
    /// difference. Safe while a collector runs. Exit status 2 when the
    /// ledger differs.
    Verify {
        /// Output: table or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
    /// Forget a node that is gone for good, on a running collector
    /// (POST /v1/nodes/NODE/retire, an admin token): its series and
    /// CapwatchAgentDown stop; its history stays in the ledger, and a
    /// Hello from it brings it back. Refused for a node streaming now.
    RetireNode {
        /// The node id, as its agent names it.
        node: String,
        /// The collector's base URL (http://host:9470).
        #[arg(long)]
        url: String,
        /// File holding an admin API token (or set CAPWATCH_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
    },
    /// Print the facility meters' reconciliation from the ledger (per
    /// meter and row: metered, measured, ratio, loss and each tenant's
    /// allocated kWh; final minutes only), or ask a running collector's
    /// /v1/meters (an admin token).
    Meters {
        /// Ask the collector at this base URL (http://host:9470) instead of
        /// reading the ledger.
        #[arg(long)]
        url: Option<String>,
        /// With --url: file holding an admin API token (or set
        /// CAPWATCH_TOKEN).
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Start, inclusive, RFC 3339, on a row boundary.
        #[arg(long)]
        from: String,
        /// End, exclusive, RFC 3339, on a row boundary.
        #[arg(long)]
        to: String,
        /// Row length: 1m, 15m, 1h, 1d, month, or total (one row for the whole period).
        #[arg(long, default_value = "1h")]
        step: String,
        /// IANA time zone rows are cut in.
        #[arg(long, default_value = "UTC")]
        tz: String,
        /// Output: table, csv or json.
        #[arg(long, default_value = "table")]
        format: String,
    },
}

/// The API token of `usage --url` and `meters --url`: from `--token-file`,
/// else `CAPWATCH_TOKEN`, else none.
fn api_token(token_file: Option<&std::path::Path>) -> anyhow::Result<Option<String>> {
    Ok(match token_file {
        Some(p) => Some(
            capwatch_common::read_token(p, "--token-file")
                .with_context(|| format!("reading {}", p.display()))?,
        ),
        None => std::env::var("CAPWATCH_TOKEN").ok(),
    })
}

/// The ledger the config names, opened for reading.
fn open_reader(cfg: &Config) -> anyhow::Result<capwatch_collector::ledger::AnyReader> {
    Ok(match cfg.ledger() {
        LedgerChoice::Sqlite(path) => Box::new(capwatch_collector::ledger::Reader::open(&path)?),
        LedgerChoice::Postgres(settings) => {
            Box::new(capwatch_collector::ledger::PgReader::open(&settings)?)
        }
    })
}

/// The query of a period (`usage --url`, `meters --url`), in `wire` format.
fn period_query<'a>(
    from: &'a str,
    to: &'a str,
    step: &'a str,
    tz: &'a str,
    wire: &'a str,
) -> Vec<(&'static str, &'a str)> {
    vec![
        ("from", from),
        ("to", to),
        ("step", step),
        ("tz", tz),
        ("format", wire),
    ]
}

/// `capwatch-collector meters`: the ledger's meter-minutes, or a running
/// collector's /v1/meters.
fn meters_command(cfg: &Config, cmd: &Command) -> anyhow::Result<()> {
    use capwatch_collector::usage::{self, Format, meters};
    let Command::Meters {
        url,
        token_file,
        from,
        to,
        step,
        tz,
        format,
    } = cmd
    else {
        anyhow::bail!("not a meters command");
    };
    let format = Format::parse(format)?;
    if let Some(url) = url {
        let wire = if format == Format::Csv { "csv" } else { "json" };
        let token = api_token(token_file.as_deref())?;
        let query = period_query(from, to, step, tz, wire);
        let body = usage::fetch(url, "/v1/meters", token.as_deref(), &query)?;
        match format {
            Format::Table => print!("{}", meters::table(&serde_json::from_str(&body)?)),
            Format::Json => println!("{body}"),
            Format::Csv => print!("{body}"),
        }
        return Ok(());
    }
    let reader = open_reader(cfg)?;
    let configured: Vec<String> = cfg.meter.iter().map(|m| m.id.clone()).collect();
    let report = meters::run(
        &reader,
        &configured,
        Some(from),
        Some(to),
        Some(step),
        Some(tz),
    )?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Csv => print!("{}", meters::csv(&report)),
        Format::Table => print!("{}", meters::table(&report)),
    }
    Ok(())
}

/// `capwatch-collector usage`: reads the ledger file directly.
fn usage_command(cfg: &Config, tenants: Arc<Tenants>, cmd: &Command) -> anyhow::Result<()> {
    use capwatch_collector::usage::{self, Format};
    let Command::Usage {
        url,
        token_file,
        tenant,
        from,
        to,
        step,
        tz,
        format,
        since_revision,
    } = cmd
    else {
        anyhow::bail!("not a usage command");
    };
    let format = Format::parse(format)?;
    if let Some(url) = url {
        let path = match tenant {
            Some(t) => format!("/v1/tenants/{t}/usage"),
            None => "/v1/usage".to_string(),
        };
        let wire = if format == Format::Csv { "csv" } else { "json" };
        let token = api_token(token_file.as_deref())?;
        let mut query = period_query(from, to, step, tz, wire);
        if let Some(r) = since_revision {
            query.push(("since_revision", r));
        }
        let body = usage::fetch(url, &path, token.as_deref(), &query)?;
        match format {
            Format::Table => print!("{}", usage::table(&serde_json::from_str(&body)?)),
            Format::Json => println!("{body}"),
            Format::Csv => print!("{body}"),
        }
        return Ok(());
    }
    let reader = open_reader(cfg)?;
    // Contracts by the versions the collector recorded in the ledger, each
    // from when it took effect; the tenant file alone for a ledger that
    // recorded none.
    let history = capwatch_collector::tenant_history_of(&reader.tenant_versions()?)?
        .unwrap_or_else(|| TenantHistory::new(tenants.clone()));
    let meters = cfg.meters()?;
    let report = usage::run(
        &reader,
        &tenants,
        &history,
        &meters,
        tenant.as_deref(),
        Some(from),
        Some(to),
        Some(step),
        Some(tz),
        since_revision.as_deref(),
    )?;
    match format {
        Format::Json => println!("{}", serde_json::to_string_pretty(&report)?),
        Format::Csv => print!("{}", usage::csv(&report)?),
        Format::Table => print!("{}", usage::table(&report)),
    }
    Ok(())
}

/// `backup`, `restore` and `verify`: the SQLite ledger file, with no
/// collector needed (one may run).
fn ledger_file_command(cfg: &Config, cmd: &Command) -> anyhow::Result<()> {
    use capwatch_collector::ledger;
    let LedgerChoice::Sqlite(path) = cfg.ledger() else {
        anyhow::bail!(
            "backup, restore and verify are for a SQLite ledger (--ledger); back a PostgreSQL ledger up with pg_dump or PostgreSQL's point-in-time recovery"
        );
    };
    match cmd {
        Command::Backup { to, keep } => {
            let (to, done) = if to.is_dir() {
                let (to, done, removed) = ledger::backup_into(
                    &path,
                    to,
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs() as i64),
                    *keep,
                )?;
                for old in removed {
                    println!("removed older backup {}", old.display());
                }
                (to, done)
            } else if keep.is_some() {
                anyhow::bail!("--keep needs --to to be a directory");
            } else {
                (to.clone(), ledger::backup(&path, to)?)
            };
            println!(
                "backed up ledger {} (ledger_id {}, revision {}, schema {}, {} pages) to {}",
                path.display(),
                done.ledger_id,
                done.revision,
                done.schema,
                done.pages,
                to.display()
            );
        }
        Command::Restore { from, replace } => {
            let done = ledger::restore(from, &path, *replace).map_err(|e| match e {
                ledger::LedgerError::Exists { .. } | ledger::LedgerError::Traces { .. } => {
                    anyhow::anyhow!(
                        "{e}; pass --replace to replace it (its commits since the backup are lost)"
                    )
                }
                e => e.into(),
            })?;
            println!(
                "restored ledger {} from {} (backup of ledger_id {} at revision {}); new ledger_id {}",
                path.display(),
                from.display(),
                done.from_ledger_id,
                done.revision,
                done.ledger_id
            );
        }
        Command::Verify { format } => {
            if format != "table" && format != "json" {
                anyhow::bail!("--format {format:?}: expected table or json");
            }
            let reader = ledger::Reader::open(&path)?;
            let history = capwatch_collector::tenant_history_of(
                &ledger::LedgerReader::tenant_versions(&reader)?,
            )?;
            drop(reader);
            let found = ledger::verify(&path, history.as_ref())?;
            if format == "json" {
                println!("{}", serde_json::to_string_pretty(&found)?);
            } else {
                print!("{}", verify_table(&found));
            }
            if !found.differences.is_empty() {
                eprintln!(
                    "Error: ledger {} differs from what it is made of in {} places",
                    path.display(),
                    found.differences.len()
                );
                std::process::exit(2);
            }
        }
        _ => anyhow::bail!("not a ledger file command"),
    }
    Ok(())
}

/// `retire-node`: asks the collector at `base` to forget `node`.
fn retire_node(node: &str, base: &str, token: Option<&str>) -> anyhow::Result<()> {
    let path: String = node
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            b => format!("%{b:02X}"),
        })
        .collect();
    let url = format!("{}/v1/nodes/{path}/retire", base.trim_end_matches('/'));
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(std::time::Duration::from_secs(30)))
        .build()
        .into();
    let mut request = agent.post(&url);
    if let Some(t) = token {
        request = request.header("Authorization", format!("Bearer {t}"));
    }
    let mut response = request
        .send_empty()
        .with_context(|| format!("POST {url}"))?;
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .read_to_string()
        .with_context(|| format!("POST {url}"))?;
    if status >= 400 {
        let message = serde_json::from_str::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| {
                v["error"]
                    .as_str()
                    .or_else(|| v["detail"].as_str())
                    .map(str::to_string)
            })
            .unwrap_or(body);
        anyhow::bail!("POST {url}: {status}: {}", message.trim_end());
    }
    println!("retired node {node} on {base}");
    Ok(())
}

/// `verify`'s report as text.
fn verify_table(v: &capwatch_collector::ledger::Verification) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "ledger_id {} revision {}: {} hourly and {} daily rollup rows, {} tenant totals checked; {} differences",
        v.ledger_id,
        v.revision,
        v.hour_rows_checked,
        v.day_rows_checked,
        v.tenants_checked,
        v.differences.len()
    );
    for n in &v.not_checked {
        let _ = writeln!(out, "not checked: {n}");
    }
    if !v.differences.is_empty() {
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:<20} {:<16} {:<16} {:<18} {:>20} {:>20}",
            "table", "period", "start", "tenant", "node", "column", "recorded", "recomputed"
        );
    }
    let opt = |x: Option<i64>| x.map_or("(none)".to_string(), |x| x.to_string());
    for d in &v.differences {
        let _ = writeln!(
            out,
            "{:<14} {:>6} {:<20} {:<16} {:<16} {:<18} {:>20} {:>20}",
            d.table,
            d.period.map_or("-".to_string(), |p| p.to_string()),
            d.start
                .map_or("-".to_string(), capwatch_collector::usage::rfc3339),
            d.tenant,
            d.node.as_deref().unwrap_or("-"),
            d.column,
            opt(d.recorded),
            opt(d.recomputed)
        );
    }
    out
}

impl Args {
    fn config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::load(self.config.as_deref(), |var| std::env::var_os(var))?;
        if self.tenants.is_some() {
            cfg.tenants_file = self.tenants.clone();
        }
        if self.stale_after.is_some() {
            cfg.stale_after = self.stale_after;
        }
        if self.auth_file.is_some() {
            cfg.auth_file = self.auth_file.clone();
        }
        if let Some(v) = &self.ledger {
            cfg.ledger_path = v.clone();
        }
        if let Some(v) = &self.ledger_url {
            cfg.ledger_url = Some(v.clone());
        }
        if let Some(v) = self.grpc_listen {
            cfg.grpc_listen = v;
        }
        if let Some(v) = self.http_listen {
            cfg.http_listen = v;
        }
        if let Some(v) = self.per_gpu_metrics {
            cfg.per_gpu_metrics = v;
        }
        if let Some(v) = self.insecure_plaintext {
            cfg.insecure_plaintext = v;
        }
        if let Some(v) = self.log_format {
            cfg.log_format = v;
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let cfg = args.config().context("configuration")?;
    if args.print_config {
        print!("{}", cfg.to_toml()?);
        return Ok(());
    }
    if let Some(Command::RetireNode {
        node,
        url,
        token_file,
    }) = &args.command
    {
        return retire_node(node, url, api_token(token_file.as_deref())?.as_deref());
    }
    if let Some(cmd @ (Command::Backup { .. } | Command::Restore { .. } | Command::Verify { .. })) =
        &args.command
    {
        return ledger_file_command(&cfg, cmd);
    }
    let tenants = capwatch_collector::load_tenants(&cfg).context("tenant file")?;
    let auth = capwatch_collector::load_auth(&cfg).context("auth file")?;
    if let Some(Command::InitLedger) = &args.command {
        let (name, id) = match cfg.ledger() {
            LedgerChoice::Sqlite(path) => {
                let ledger = capwatch_collector::ledger::Ledger::create(&path)?;
                (
                    path.display().to_string(),
                    ledger.identity().ledger_id.clone(),
                )
            }
            LedgerChoice::Postgres(settings) => {
                let ledger = capwatch_collector::ledger::PgLedger::create(&settings)?;
                (
                    ledger.database().to_string(),
                    ledger.identity().ledger_id.clone(),
                )
            }
        };
        println!("created ledger {name} (ledger_id {id})");
        return Ok(());
    }
    if let Some(cmd @ Command::Meters { .. }) = &args.command {
        return meters_command(&cfg, cmd);
    }
    if let Some(cmd) = &args.command {
        return usage_command(&cfg, Arc::new(tenants), cmd);
    }
    if args.check {
        println!("configuration ok: {} tenants", tenants.all().len() - 1);
        for t in tenants.all() {
            println!(
                "  {:<24} {:>12.3} kW  {}",
                t.id,
                t.contracted_milliwatts as f64 / 1e6,
                t.name
            );
        }
        if let Some(from) = tenants.effective_from_ns() {
            println!(
                "leases take effect at {}",
                capwatch_collector::usage::rfc3339(from.div_euclid(1_000_000_000))
            );
        }
        for m in cfg.meters()? {
            println!(
                "meter {:<24} {:<12} every {}, nodes {}",
                m.id,
                m.source.kind_label(),
                humantime::format_duration(m.interval),
                m.nodes.join(",")
            );
        }
        if cfg.auth_file.is_some() {
            println!(
                "auth: agents need a token: {}; the usage API needs a token: {}",
                auth.agents_required(),
                auth.api_required()
            );
        }
        return Ok(());
    }
    capwatch_common::init_logging(cfg.log_format);
    if args.recover_ledger && cfg.ledger_url.is_some() {
        anyhow::bail!(
            "--recover-ledger is for a SQLite ledger (ledger_path); a PostgreSQL ledger is recovered with PostgreSQL's own tools"
        );
    }
    if args.recover_ledger {
        // Accepts the ledger as it stands (and logs what was wrong); the
        // start below then opens it as usual.
        drop(
            capwatch_collector::ledger::Ledger::recover(&cfg.ledger_path)
                .context("--recover-ledger")?,
        );
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("capwatch-collector")
        .build()
        .context("starting the runtime")?;
    rt.block_on(async {
        let shutdown =
            capwatch_common::shutdown_on_signals().context("installing signal handlers")?;
        capwatch_collector::run(cfg, shutdown).await?;
        anyhow::Ok(())
    })
}

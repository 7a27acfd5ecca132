//! What both capwatch binaries share: log set-up, the shutdown signal,
//! settings from `CAPWATCH_*` environment variables ([`settings`]) and
//! durations in config files ([`duration`]), and the Redfish client the
//! agent reads BMCs with and the collector reads PDUs with ([`redfish`]).

use tokio::sync::watch;

pub mod duration;
pub mod files;
pub mod redfish;
pub mod settings;

/// How logs are written.
#[derive(
    Debug,
    Clone,
    Copy,
    Default,
    PartialEq,
    Eq,
    clap::ValueEnum,
    serde::Deserialize,
    serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Plain,
    /// One JSON object per line, for log shippers.
    Json,
}

/// Installs the global tracing subscriber. The filter comes from `RUST_LOG`
/// when set, `info` otherwise. Logs go to stderr so stdout stays free for
/// command output; plain lines are coloured only on a terminal (not in
/// journald, a pipe or a file) and never with `NO_COLOR` set.
pub fn init_logging(format: LogFormat) {
    use std::io::IsTerminal;
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let colour = std::io::stderr().is_terminal()
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(colour)
        .with_writer(std::io::stderr);
    // A second initialisation (as in tests) keeps the first subscriber.
    let _ = match format {
        LogFormat::Plain => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// A shutdown flag that flips to `true` on SIGTERM or SIGINT (Ctrl-C); a
/// second signal ends the process at once (exit status 130).
///
/// Long-running tasks hold a clone of the receiver and stop when it changes.
pub fn shutdown_on_signals() -> std::io::Result<watch::Receiver<bool>> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        let which = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        tracing::info!(
            signal = which,
            "shutdown requested; a second signal stops at once"
        );
        let _ = tx.send(true);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::warn!("second signal: stopping without draining");
        std::process::exit(130);
    });
    Ok(rx)
}

/// Resolves once `rx` reads `true` (or its sender is gone).
pub async fn wait_for_shutdown(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Logs a warning when a file holding secrets (`setting` names it) is
/// accessible to others or writable by its group. Read access for a
/// dedicated group, as Kubernetes gives Secret volumes with `fsGroup`, is
/// fine.
pub fn warn_if_exposed(path: &std::path::Path, setting: &str) {
    use std::os::unix::fs::PermissionsExt;
    if let Ok(meta) = std::fs::metadata(path) {
        let mode = meta.permissions().mode();
        if mode & 0o027 != 0 {
            tracing::warn!(
                file = %path.display(),
                setting,
                mode = format!("{:o}", mode & 0o777),
                "file holding secrets is readable by others or writable by its group; chmod 600 (or 640 for a dedicated group) it"
            );
        }
    }
}

/// Reads a token from `path` (surrounding whitespace and the final newline
/// dropped), warning first if the file is exposed.
pub fn read_token(path: &std::path::Path, setting: &str) -> std::io::Result<String> {
    warn_if_exposed(path, setting);
    Ok(std::fs::read_to_string(path)?.trim().to_string())
}

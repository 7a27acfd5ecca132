//! Which ledger backend the configuration selects, opened: SQLite at
//! `ledger_path` or PostgreSQL at `ledger_url`, as one writer and one
//! reader behind the ledger interfaces.

use crate::config::{Config, LedgerChoice};
use crate::ledger::{self, AnyReader, AnyWriter, LedgerError};

/// The ledger's writer and reader, and how logs name it.
pub(super) struct Opened {
    pub writer: AnyWriter,
    pub reader: AnyReader,
    /// The SQLite file, or the PostgreSQL database (no password).
    pub name: String,
    /// PostgreSQL's pool figures, for `/metrics` (SQLite has no pool).
    pub pool: Option<ledger::PgPoolStats>,
}

/// Opens the ledger `cfg` selects, off the runtime's workers (connecting
/// to PostgreSQL may take up to its connect timeout).
pub(super) async fn open(cfg: &Config) -> Result<Opened, super::CollectorError> {
    let choice = cfg.ledger();
    tokio::task::spawn_blocking(move || open_blocking(choice))
        .await
        .map_err(|e| super::CollectorError::Serve {
            what: "ledger opening",
            error: e.into(),
        })?
        .map_err(Into::into)
}

fn open_blocking(choice: LedgerChoice) -> Result<Opened, LedgerError> {
    Ok(match choice {
        LedgerChoice::Sqlite(path) => {
            let writer = ledger::Ledger::open(&path)?;
            let reader = ledger::Reader::open(&path)?;
            Opened {
                writer: Box::new(writer),
                reader: Box::new(reader),
                name: path.display().to_string(),
                pool: None,
            }
        }
        LedgerChoice::Postgres(settings) => {
            let writer = ledger::PgLedger::open(&settings)?;
            // The usage API and the status page read on a pool of their
            // own: slow or many reads must never keep the committer and
            // the claims from a connection (acks and Hellos wait on them).
            let reader = ledger::PgReader::open(&ledger::PgSettings {
                pool_size: settings.pool_size.div_ceil(2),
                ..settings.clone()
            })?;
            Opened {
                reader: Box::new(reader),
                name: writer.database().to_string(),
                pool: Some(writer.pool_stats()),
                writer: Box::new(writer),
            }
        }
    })
}

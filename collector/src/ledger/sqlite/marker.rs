//! `<ledger>.last-commit`: the revision of the last commit, written after
//! it, so that a ledger found behind its marker is known to have lost
//! commits.

use std::path::{Path, PathBuf};

use super::Ledger;

/// Appended to the ledger's path (symlinks resolved) for the file that
/// records the ledger's last commit.
pub(super) const MARKER_SUFFIX: &str = ".last-commit";

/// What the marker holds: the ledger id and the revision of its last
/// commit, in a fixed length so that it is rewritten in place.
pub(super) fn marker_record(ledger_id: &str, revision: u64) -> String {
    format!("{ledger_id} {revision:020}\n")
}

/// The marker's (ledger id, revision); `Ok(None)` when there is none.
pub(super) fn read_marker(path: &Path) -> Result<Option<(String, u64)>, String> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("unreadable ({e})")),
    };
    let parsed = text
        .strip_suffix('\n')
        .and_then(|t| t.split_once(' '))
        .and_then(|(id, rev)| Some((id.to_string(), rev.parse::<u64>().ok()?)));
    parsed.map(Some).ok_or_else(|| "malformed".to_string())
}

/// The file recording the last commit's revision, rewritten in place and
/// synced after every commit.
pub(super) struct Marker {
    pub(super) path: PathBuf,
    pub(super) file: std::fs::File,
    /// Whether the last write failed (logged once until one succeeds).
    pub(super) failing: bool,
}

impl Marker {
    pub(super) fn write(&mut self, ledger_id: &str, revision: u64) -> std::io::Result<()> {
        use std::os::unix::fs::FileExt;
        self.file
            .write_all_at(marker_record(ledger_id, revision).as_bytes(), 0)?;
        self.file.sync_data()
    }
}

impl Ledger {
    /// Records the committed revision in the marker. A failure is logged
    /// (once until a write succeeds), not returned: the commit is already
    /// durable, and a marker that lags behind the ledger is only a lost
    /// chance to notice lost commits, never a false alarm.
    pub(super) fn mark(&mut self) {
        match self.marker.write(&self.identity.ledger_id, self.revision) {
            Ok(()) => self.marker.failing = false,
            Err(error) if !self.marker.failing => {
                self.marker.failing = true;
                tracing::error!(marker = %self.marker.path.display(), %error, "recording the ledger's last commit failed; lost commits would go unnoticed until it works again");
            }
            Err(_) => {}
        }
    }
}

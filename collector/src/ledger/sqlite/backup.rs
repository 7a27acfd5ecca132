//! Backup and restore of a ledger file: `capwatch-collector backup` copies
//! a ledger while a collector writes it (SQLite's online backup API), and
//! `restore` puts a copy in place of a ledger, atomically, under a new
//! ledger id.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags, OptionalExtension};

use super::schema::{MIGRATIONS, new_ledger_id};
use super::{Ledger, sqlite_err, traces, watermark};
use crate::ledger::LedgerError;

/// Pages copied per step: about 4 MiB at SQLite's default page size.
const PAGES_PER_STEP: i32 = 1024;

/// Pause between steps, so that a backup of a large ledger leaves the disk
/// to the collector's commits now and then.
const STEP_PAUSE: Duration = Duration::from_millis(5);

/// What a backup or restore copied.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Copied {
    /// The ledger id of the copy (for a restore: the new one).
    pub ledger_id: String,
    /// The ledger id of the ledger the copy was taken from.
    pub from_ledger_id: String,
    /// Commits the copy holds (`watermark.revision`).
    pub revision: u64,
    /// The copy's schema version.
    pub schema: i64,
    /// Pages copied.
    pub pages: i32,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> LedgerError + '_ {
    move |error| LedgerError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Opens `path` read-only as a ledger of a schema this collector knows.
fn open_source(path: &Path) -> Result<(Connection, i64), LedgerError> {
    if path.symlink_metadata().is_err() {
        return Err(LedgerError::Missing {
            path: path.to_owned(),
        });
    }
    let err = sqlite_err(path);
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(err)?;
    conn.busy_timeout(Duration::from_secs(5)).map_err(err)?;
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(err)?;
    if version == 0 {
        return Err(LedgerError::NotALedger {
            path: path.to_owned(),
        });
    }
    if version as usize > MIGRATIONS.len() {
        return Err(LedgerError::TooNew {
            path: path.to_owned(),
            found: version,
            known: MIGRATIONS.len(),
        });
    }
    Ok((conn, version))
}

/// The ledger id (none before schema 9) and revision `conn` sees.
fn identity_of(conn: &Connection, path: &Path) -> Result<(String, u64), LedgerError> {
    let id: Option<String> = conn
        .query_row("SELECT ledger_id FROM ledger_identity", [], |r| r.get(0))
        .optional()
        .or_else(|e| match e {
            // A ledger from before its identity was kept.
            rusqlite::Error::SqliteFailure(_, Some(ref m)) if m.contains("no such table") => {
                Ok(None)
            }
            e => Err(e),
        })
        .map_err(sqlite_err(path))?;
    let (revision, _) = watermark(conn, path)?;
    Ok((id.unwrap_or_default(), revision))
}

/// Copies every page of `src` into `dst` in steps. `src` holds a read
/// transaction for the whole copy: each step reads the same snapshot, so
/// the copy is of one moment even while another process commits (without
/// it SQLite starts the copy over after each commit, and a copy slower
/// than the commit interval would never end). In WAL mode a reader never
/// blocks the writer; it only keeps the WAL from being checkpointed past
/// its snapshot until the copy ends.
fn copy_pages(src: &Connection, dst: &mut Connection, path: &Path) -> Result<i32, LedgerError> {
    let err = sqlite_err(path);
    let backup = Backup::new(src, dst).map_err(err)?;
    loop {
        match backup.step(PAGES_PER_STEP).map_err(err)? {
            StepResult::Done => break,
            StepResult::More => std::thread::sleep(STEP_PAUSE),
            // The destination is ours alone; the source is only read, and
            // a WAL reader waits for nothing but a checkpoint's moment.
            StepResult::Busy | StepResult::Locked => std::thread::sleep(Duration::from_millis(50)),
            _ => std::thread::sleep(Duration::from_millis(50)),
        }
    }
    Ok(backup.progress().pagecount)
}

/// Fails unless SQLite finds the database `conn` whole.
fn integrity(conn: &Connection, path: &Path) -> Result<(), LedgerError> {
    let result: String = conn
        .query_row("PRAGMA integrity_check(1)", [], |r| r.get(0))
        .map_err(sqlite_err(path))?;
    if result != "ok" {
        return Err(LedgerError::Corrupt {
            path: path.to_owned(),
            problem: result,
        });
    }
    Ok(())
}

/// Syncs the directory holding `path`, so that a rename into it survives
/// a power loss.
fn sync_dir(path: &Path) -> Result<(), LedgerError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// A file beside `target`, removed unless it is renamed into place.
fn beside(target: &Path, what: &str) -> Result<tempfile::TempPath, LedgerError> {
    let dir = match target.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    tempfile::Builder::new()
        .prefix(&format!(".{name}.{what}-"))
        .tempfile_in(dir)
        .map(tempfile::NamedTempFile::into_temp_path)
        .map_err(io_err(dir))
}

/// Copies the ledger at `ledger` to a new file `to`, safe while a
/// collector writes the ledger. The copy is one self-contained file (no
/// `-wal`), checked whole, synced and renamed into place: `to` is either
/// absent or a whole backup. An existing `to` is refused.
pub fn backup(ledger: &Path, to: &Path) -> Result<Copied, LedgerError> {
    if to.symlink_metadata().is_ok() {
        return Err(LedgerError::Exists {
            path: to.to_owned(),
        });
    }
    let (src, schema) = open_source(ledger)?;
    let err = sqlite_err(ledger);
    // One read transaction for the identity and every page.
    src.execute_batch("BEGIN DEFERRED").map_err(err)?;
    let (ledger_id, revision) = identity_of(&src, ledger)?;
    let tmp = beside(to, "backup")?;
    let tmp_err = sqlite_err(&tmp);
    let mut dst = Connection::open(&tmp).map_err(tmp_err)?;
    let pages = copy_pages(&src, &mut dst, ledger)?;
    src.execute_batch("COMMIT").map_err(err)?;
    drop(src);
    // The copy keeps the source's WAL mode in its header; a backup file
    // is better one file that a plain `cp` or upload takes whole.
    dst.pragma_update(None, "journal_mode", "DELETE")
        .map_err(tmp_err)?;
    integrity(&dst, &tmp)?;
    dst.close().map_err(|(_, e)| tmp_err(e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    // Never over a file that appeared meanwhile.
    tmp.persist_noclobber(to)
        .map_err(|e| match e.error.kind() {
            std::io::ErrorKind::AlreadyExists => LedgerError::Exists {
                path: to.to_owned(),
            },
            _ => io_err(to)(e.error),
        })?;
    sync_dir(to)?;
    Ok(Copied {
        ledger_id: ledger_id.clone(),
        from_ledger_id: ledger_id,
        revision,
        schema,
        pages,
    })
}

/// Puts the backup `from` in place of the ledger at `ledger`: refused
/// where a collector holds that ledger, and where a ledger or a trace of
/// one is there unless `replace`. The copy is checked whole, written
/// beside the ledger, synced and renamed into place, so the ledger is the
/// old one or the restored one, never part of either. What the old ledger
/// left (`-wal`, `-shm`, `.last-commit`) is removed first: a `-wal` left
/// beside another database would be replayed into it.
///
/// The restored ledger gets a new ledger id and a `.last-commit` marker
/// for its own revision: it holds none of the commits made after the
/// backup, and must not pass for the ledger that did
/// (`CapwatchLedgerChanged` fires, billing sees the id change). The
/// compaction lease it was copied with is dropped. It is
/// migrated to this collector's schema, as a start would.
pub fn restore(from: &Path, ledger: &Path, replace: bool) -> Result<Copied, LedgerError> {
    let (src, _) = open_source(from)?;
    let src_err = sqlite_err(from);
    integrity(&src, from)?;
    src.execute_batch("BEGIN DEFERRED").map_err(src_err)?;
    let (from_ledger_id, revision) = identity_of(&src, from)?;
    // Renamed onto the file itself, not onto a symlink that reaches it:
    // the marker goes by the resolved path too.
    let target: PathBuf = match std::fs::canonicalize(ledger) {
        Ok(p) => p,
        Err(_) => ledger.to_owned(),
    };
    let present = target.symlink_metadata().is_ok();
    if !replace {
        if present {
            return Err(LedgerError::Exists {
                path: ledger.to_owned(),
            });
        }
        if let Some(trace) = traces(&target).find(|t| t.symlink_metadata().is_ok()) {
            return Err(LedgerError::Traces {
                path: ledger.to_owned(),
                trace,
            });
        }
    }
    // The old ledger's lock, held until the new file is in place: a
    // collector that starts meanwhile is refused, as one that runs now is.
    let _held = if present {
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&target)
            .map_err(io_err(ledger))?;
        match file.try_lock() {
            Ok(()) => Some(file),
            Err(std::fs::TryLockError::WouldBlock) => {
                return Err(LedgerError::InUse {
                    path: ledger.to_owned(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(io_err(ledger)(e)),
        }
    } else {
        None
    };
    let tmp = beside(&target, "restore")?;
    let tmp_err = sqlite_err(&tmp);
    let mut dst = Connection::open(&tmp).map_err(tmp_err)?;
    let pages = copy_pages(&src, &mut dst, from)?;
    src.execute_batch("COMMIT").map_err(src_err)?;
    drop(src);
    dst.pragma_update(None, "journal_mode", "DELETE")
        .map_err(tmp_err)?;
    // A ledger from before identities were kept gets one as it migrates.
    let has_identity: bool = dst
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'ledger_identity')",
            [],
            |r| r.get(0),
        )
        .map_err(tmp_err)?;
    if has_identity {
        dst.execute(
            concat!("UPDATE ledger_identity SET ledger_id = ", new_ledger_id!()),
            [],
        )
        .map_err(tmp_err)?;
    }
    // The compaction lease of the collector the backup was taken from
    // would keep the restored ledger's own collector from compacting
    // until it expired.
    let has_lease: bool = dst
        .query_row(
            "SELECT EXISTS (SELECT 1 FROM sqlite_master WHERE name = 'compaction_lease')",
            [],
            |r| r.get(0),
        )
        .map_err(tmp_err)?;
    if has_lease {
        dst.execute("DELETE FROM compaction_lease", [])
            .map_err(tmp_err)?;
    }
    integrity(&dst, &tmp)?;
    dst.close().map_err(|(_, e)| tmp_err(e))?;
    std::fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(&tmp))?;
    for trace in traces(&target) {
        match std::fs::remove_file(&trace) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err(&trace)(e)),
        }
    }
    tmp.persist(&target).map_err(|e| io_err(ledger)(e.error))?;
    sync_dir(&target)?;
    // Opened as a start would open it: migrated, and its marker written
    // for the revision it holds (there is none yet, which a ledger with
    // commits is only accepted as by recovery).
    let opened = Ledger::recover(&target)?;
    let ledger_id = opened.identity().ledger_id.clone();
    let schema = MIGRATIONS.len() as i64;
    drop(opened);
    Ok(Copied {
        ledger_id,
        from_ledger_id,
        revision,
        schema,
        pages,
    })
}

/// A backup into the directory `dir`, named by the ledger's file name and
/// the UTC time `now` (Unix seconds), `<name>-YYYYMMDDTHHMMSSZ.backup`, so
/// that the names sort by age. With `keep`, the backups of that name in
/// `dir` beyond the newest `keep` are removed once the new one is in
/// place. Returns the new backup's path, what it copied, and what was
/// removed.
pub fn backup_into(
    ledger: &Path,
    dir: &Path,
    now: i64,
    keep: Option<usize>,
) -> Result<(PathBuf, Copied, Vec<PathBuf>), LedgerError> {
    let prefix = format!(
        "{}-",
        ledger
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "ledger".to_string())
    );
    const SUFFIX: &str = ".backup";
    let stamp = jiff::Timestamp::from_second(now)
        .map_err(|_| LedgerError::Range {
            path: ledger.to_owned(),
            what: "backup time",
        })?
        .strftime("%Y%m%dT%H%M%SZ")
        .to_string();
    let to = dir.join(format!("{prefix}{stamp}{SUFFIX}"));
    let copied = backup(ledger, &to)?;
    let mut removed = Vec::new();
    if let Some(keep) = keep {
        let mut ours: Vec<PathBuf> = std::fs::read_dir(dir)
            .map_err(io_err(dir))?
            .filter_map(Result::ok)
            .filter(|e| {
                let name = e.file_name();
                let name = name.to_string_lossy();
                // Exactly the names this function makes: nothing else in
                // the directory is touched.
                name.strip_prefix(&prefix)
                    .and_then(|n| n.strip_suffix(SUFFIX))
                    .is_some_and(|t| {
                        t.len() == 16
                            && t.bytes().enumerate().all(|(i, b)| match i {
                                8 => b == b'T',
                                15 => b == b'Z',
                                _ => b.is_ascii_digit(),
                            })
                    })
                    && e.file_type().is_ok_and(|t| t.is_file())
                    && e.path() != to
            })
            .map(|e| e.path())
            .collect();
        // The new one is kept whatever its name sorts as (a clock set
        // back), with the newest `keep - 1` of the others.
        ours.sort();
        let excess = ours.len().saturating_sub(keep.max(1) - 1);
        for old in ours.into_iter().take(excess) {
            std::fs::remove_file(&old).map_err(io_err(&old))?;
            removed.push(old);
        }
    }
    Ok((to, copied, removed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backups_into_a_directory_keep_the_newest_and_touch_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.db");
        drop(Ledger::create(&ledger).unwrap());
        let backups = dir.path().join("backups");
        std::fs::create_dir(&backups).unwrap();
        std::fs::write(backups.join("notes.txt"), "mine").unwrap();
        std::fs::write(backups.join("ledger.db-latest.backup"), "mine").unwrap();
        const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
        for i in 0..4 {
            backup_into(&ledger, &backups, T + i * 3600, Some(2)).unwrap();
        }
        // A clock set back: the new backup stays, the oldest goes.
        let (new, copied, removed) = backup_into(&ledger, &backups, T - 3600, Some(2)).unwrap();
        assert_eq!(copied.revision, 0);
        assert_eq!(
            removed,
            vec![backups.join("ledger.db-20270101T020000Z.backup")]
        );
        let mut names: Vec<String> = std::fs::read_dir(&backups)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(
            names,
            [
                "ledger.db-20261231T230000Z.backup",
                "ledger.db-20270101T030000Z.backup",
                "ledger.db-latest.backup",
                "notes.txt",
            ]
        );
        assert_eq!(new, backups.join(&names[0]));
        // The same second again: refused, nothing overwritten.
        let again = backup_into(&ledger, &backups, T - 3600, Some(2)).unwrap_err();
        assert!(matches!(again, LedgerError::Exists { .. }), "{again:?}");
    }

    /// Invariant: a backup of a ledger another connection commits to all
    /// the while ends, and is of one moment: a copy in several steps that
    /// SQLite started over at each commit would never end here.
    #[test]
    fn a_backup_in_many_steps_ends_while_another_connection_commits() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.db");
        let mut l = Ledger::create(&ledger).unwrap();
        // About 24 MiB: several steps.
        let file = "x".repeat(1 << 20);
        for i in 0..24 {
            l.add_tenant_version(&crate::ledger::TenantVersion {
                effective_from_ns: i,
                loaded_at_ns: i,
                file: file.clone(),
            })
            .unwrap();
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let writer = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut n = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    l.commit(&crate::ledger::Commit::default()).unwrap();
                    n += 1;
                }
                n
            })
        };
        let to = dir.path().join("copy.backup");
        let (done, got) = std::sync::mpsc::channel();
        {
            let (ledger, to) = (ledger.clone(), to.clone());
            std::thread::spawn(move || done.send(backup(&ledger, &to)).unwrap());
        }
        let copied = got
            .recv_timeout(Duration::from_secs(120))
            .expect("the backup never ended")
            .unwrap();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let commits = writer.join().unwrap();
        assert!(copied.pages > 3 * PAGES_PER_STEP, "{copied:?}");
        assert!(commits > copied.revision, "commits went on during the copy");
        // The copy holds the revision it reported, and every page of it.
        let c = Connection::open(&to).unwrap();
        integrity(&c, &to).unwrap();
        assert_eq!(identity_of(&c, &to).unwrap().1, copied.revision);
        let versions: i64 = c
            .query_row("SELECT COUNT(*) FROM tenant_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(versions, 24);
    }

    #[test]
    fn a_restore_is_refused_over_a_held_ledger_and_over_one_not_to_be_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = dir.path().join("ledger.db");
        let held = Ledger::create(&ledger).unwrap();
        let copy = dir.path().join("copy.backup");
        backup(&ledger, &copy).unwrap();
        let e = restore(&copy, &ledger, true).unwrap_err();
        assert!(matches!(e, LedgerError::InUse { .. }), "{e:?}");
        drop(held);
        let e = restore(&copy, &ledger, false).unwrap_err();
        assert!(matches!(e, LedgerError::Exists { .. }), "{e:?}");
        let done = restore(&copy, &ledger, true).unwrap();
        assert_ne!(done.ledger_id, done.from_ledger_id);
        // Not a ledger: refused, nothing replaced.
        let junk = dir.path().join("junk");
        std::fs::write(&junk, "not a database at all, not even close to one").unwrap();
        assert!(restore(&junk, &ledger, true).is_err());
        assert_eq!(
            Ledger::open(&ledger).unwrap().identity().ledger_id,
            done.ledger_id
        );
    }
}

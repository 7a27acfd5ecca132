//! The ledger's safety against the real collector binary: one writer per
//! database file whatever path reaches it, and a lost ledger (deleted,
//! truncated, read-only, its -wal gone after a crash) refused at start
//! instead of being taken for a new, empty one. A new ledger is made only
//! on purpose (`init-ledger`), and its identity is on /metrics.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::Path;
use std::time::Duration;

use crate::support::*;

const NO_TENANTS: &str = "";

/// The ledger id `/metrics` shows.
fn ledger_id(collector: &Collector) -> String {
    let m = collector.metrics();
    let found = m.select("capwatch_ledger_info", &[]);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].1, 1.0);
    found[0].0["ledger_id"].clone()
}

fn now_unix() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// A collector that committed an agent's samples and was then SIGKILLed,
/// so that its latest commits are in `ledger.db-wal` only.
fn crashed_with_commits(dir: &Path) {
    let mut collector = Collector::start(dir, NO_TENANTS, 0, &["--stale-after", "5m"]);
    Agent::start(dir, &collector.endpoint(), "n1", 20, "").finish(Duration::from_secs(30));
    let m = collector.metrics();
    assert!(
        m.one(
            "capwatch_collector_ledger_commits_total",
            &[("result", "success")]
        ) >= 1.0
    );
    collector.child.kill().unwrap();
    collector.child.wait().unwrap();
    assert!(
        dir.join("ledger.db-wal").exists(),
        "no -wal after a SIGKILL"
    );
}

/// Invariant: one collector writes a ledger. A second one is refused
/// whether it reaches the database through a symlink, through a hard
/// link, or after the lock file beside it was deleted, and the refusal
/// names the path it was given.
#[test]
fn a_second_collector_is_refused_through_a_symlink_a_hard_link_or_without_a_lock_file() {
    let dir = tempfile::tempdir().unwrap();
    let first = Collector::start(dir.path(), NO_TENANTS, 0, &[]);
    let symlinked = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(
        dir.path().join("ledger.db"),
        symlinked.path().join("ledger.db"),
    )
    .unwrap();
    let hard_linked = tempfile::tempdir().unwrap();
    std::fs::hard_link(
        dir.path().join("ledger.db"),
        hard_linked.path().join("ledger.db"),
    )
    .unwrap();
    for other in [symlinked.path(), hard_linked.path()] {
        let err = Collector::refused(other, NO_TENANTS, &[]);
        assert!(err.contains("in use by another collector"), "{err}");
        let path = other.join("ledger.db");
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
    let _ = std::fs::remove_file(dir.path().join("ledger.db.lock"));
    let err = Collector::refused(dir.path(), NO_TENANTS, &[]);
    assert!(err.contains("in use by another collector"), "{err}");
    // The first one is untouched, and readers still read.
    assert!(http_get(first.http, "/healthz").contains("ok"));
    first.stop();
    Collector::start(symlinked.path(), NO_TENANTS, 0, &[]).stop();
}

/// A collector never creates a ledger: without one it refuses to start
/// and says how to make one; `init-ledger` makes one (once), and its id
/// and creation time are on /metrics, the same after a restart.
#[test]
fn a_new_ledger_is_made_only_on_purpose_and_shows_its_identity() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let err = Collector::refused(dir.path(), NO_TENANTS, &[]);
    assert!(
        err.contains(&format!("no ledger at {}", path.display())) && err.contains("init-ledger"),
        "{err}"
    );
    assert!(!path.exists(), "a refused start created the ledger");
    let before = now_unix().floor();
    let id = init_ledger(dir.path());
    assert_eq!(id.len(), 36, "{id}");
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &[]);
    assert_eq!(ledger_id(&collector), id);
    let created = collector
        .metrics()
        .one("capwatch_ledger_created_timestamp_seconds", &[]);
    assert!(created >= before && created <= now_unix(), "{created}");
    collector.stop();
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &[]);
    assert_eq!(ledger_id(&collector), id);
    collector.stop();
    // A second init-ledger changes nothing.
    let out = Collector::command(dir.path(), NO_TENANTS, 0, &["init-ledger"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("already exists"),
        "{err}"
    );
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &[]);
    assert_eq!(ledger_id(&collector), id);
    collector.stop();
    // Another ledger has another id.
    let other = tempfile::tempdir().unwrap();
    assert_ne!(init_ledger(other.path()), id);
}

/// A ledger truncated to nothing is a lost ledger, not a new one.
#[test]
fn a_zero_length_ledger_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    Collector::start(dir.path(), NO_TENANTS, 0, &[]).stop();
    let path = dir.path().join("ledger.db");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(0)
        .unwrap();
    let err = Collector::refused(dir.path(), NO_TENANTS, &[]);
    assert!(
        err.contains(&format!("ledger {} is empty (0 bytes)", path.display())),
        "{err}"
    );
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 0);
}

/// A ledger the collector cannot write is refused at start, before it
/// listens, instead of failing every commit afterwards. As root the file
/// mode does not bind, so the collector then runs as `nobody`.
#[test]
fn a_read_only_ledger_is_refused() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    let dir = tempfile::tempdir().unwrap();
    Collector::start(dir.path(), NO_TENANTS, 0, &[]).stop();
    let path = dir.path().join("ledger.db");
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    let mut cmd = Collector::command(dir.path(), NO_TENANTS, 0, &[]);
    // A directory this process made is owned by its effective user.
    if std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(dir.path()).unwrap()) == 0 {
        // Everything the collector made is `nobody`'s, who runs it now.
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            std::os::unix::fs::chown(entry.unwrap().path(), Some(65534), Some(65534)).unwrap();
        }
        std::os::unix::fs::chown(dir.path(), Some(65534), Some(65534)).unwrap();
        cmd.uid(65534).gid(65534);
    }
    let err = expect_refused(cmd);
    assert!(
        err.contains(&format!("ledger {} cannot be written", path.display())),
        "{err}"
    );
}

/// Deleting the database after a crash leaves its -wal: that is a lost
/// ledger, refused at start and by `init-ledger` alike.
#[test]
fn a_deleted_ledger_with_its_wal_left_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    crashed_with_commits(dir.path());
    let path = dir.path().join("ledger.db");
    std::fs::remove_file(&path).unwrap();
    let err = Collector::refused(dir.path(), NO_TENANTS, &[]);
    let wal = format!("{}-wal", path.display());
    assert!(
        err.contains(&format!("no ledger at {}", path.display()))
            && err.contains(&wal)
            && err.contains("was lost"),
        "{err}"
    );
    let out = Collector::command(dir.path(), NO_TENANTS, 0, &["init-ledger"])
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains(&wal), "{err}");
    assert!(!path.exists());
}

/// After a crash the latest commits are in the -wal only; deleting it
/// rewinds the ledger. The `.last-commit` file records more commits than
/// the ledger then holds, so the start is refused; `--recover-ledger`
/// accepts the ledger as it stands, under a new ledger id.
#[test]
fn a_lost_wal_is_refused_and_recovery_is_explicit_and_visible() {
    let dir = tempfile::tempdir().unwrap();
    let id = init_ledger(dir.path());
    crashed_with_commits(dir.path());
    for suffix in ["-wal", "-shm"] {
        std::fs::remove_file(dir.path().join(format!("ledger.db{suffix}"))).unwrap();
    }
    let err = Collector::refused(dir.path(), NO_TENANTS, &[]);
    assert!(
        err.contains("latest commits are lost") && err.contains("--recover-ledger"),
        "{err}"
    );
    let recovered = Collector::start(dir.path(), NO_TENANTS, 0, &["--recover-ledger"]);
    let new_id = ledger_id(&recovered);
    assert_ne!(new_id, id);
    recovered.stop();
    // Recovered once, the ledger starts as usual again.
    let collector = Collector::start(dir.path(), NO_TENANTS, 0, &[]);
    assert_eq!(ledger_id(&collector), new_id);
    collector.stop();
}

//! Bakes the source revision into the binary for
//! `capwatch_collector_build_info{revision}`: `CAPWATCH_REVISION` when the
//! build sets it (a release pipeline, a source tarball), else
//! `git rev-parse HEAD`, else "unknown" (no git, no repository).

use std::path::Path;
use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git").args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8(out.stdout).ok()?;
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=CAPWATCH_REVISION");
    let (revision, from) = match std::env::var("CAPWATCH_REVISION") {
        Ok(r) if !r.trim().is_empty() => (r.trim().to_owned(), "build environment"),
        _ => {
            // Built again when HEAD moves: HEAD itself (a checkout), the
            // branch it names (a commit) and the packed refs.
            for name in ["HEAD", "packed-refs"] {
                if let Some(path) = git(&["rev-parse", "--git-path", name]) {
                    watch(&path);
                }
            }
            if let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"])
                && let Some(path) = git(&["rev-parse", "--git-path", &branch])
            {
                watch(&path);
            }
            match git(&["rev-parse", "HEAD"]) {
                Some(r) => (r, "git"),
                None => ("unknown".to_owned(), "nowhere"),
            }
        }
    };
    println!("cargo:rustc-env=CAPWATCH_REVISION={revision}");
    // Where it came from, for the test that checks it.
    println!("cargo:rustc-env=CAPWATCH_REVISION_FROM={from}");
}

/// Reruns this script when `path` changes, where it exists (cargo would
/// rerun on every build for a missing one).
fn watch(path: &str) {
    if Path::new(path).exists() {
        println!("cargo:rerun-if-changed={path}");
    }
}

//! `scripts/demo.sh`, the README's local demo, run for real on the binaries
//! this suite built (`DEMO_BIN_DIR`) with its files in a temp directory:
//! it refuses ports another process holds, and it stops at once, children
//! and all, on SIGTERM while it sleeps.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::{Log, bin, eventually, http_get_status, terminate, wait_timeout};

const SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../scripts/demo.sh");

/// A loopback port nothing listens on (for the moment).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// The demo's process group, killed whole when a test ends (a failed test
/// leaves no collector or agents behind).
struct Group(u32);

impl Drop for Group {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0)])
            .stderr(Stdio::null())
            .status();
    }
}

/// Starts the demo on `grpc` and `http` for `seconds`, its output captured.
fn demo(dir: &Path, grpc: u16, http: u16, seconds: u64) -> (Child, Log, Group) {
    demo_with(dir, grpc, http, seconds, &[])
}

/// `demo`, with `env` set for it (and so for the processes it starts).
fn demo_with(
    dir: &Path,
    grpc: u16,
    http: u16,
    seconds: u64,
    env: &[(&str, &str)],
) -> (Child, Log, Group) {
    let bin_dir = bin("capwatch-collector");
    let mut child = capwatch_testkit::clean_command("bash")
        .arg(SCRIPT)
        .envs(env.iter().copied())
        .env("DEMO_BIN_DIR", bin_dir.parent().unwrap())
        .env("DEMO_DIR", dir.join("nodes"))
        .env("DEMO_SECONDS", seconds.to_string())
        .env("CAPWATCH_LEDGER", dir.join("ledger.db"))
        .env("CAPWATCH_GRPC_LISTEN", format!("127.0.0.1:{grpc}"))
        .env("CAPWATCH_HTTP_LISTEN", format!("127.0.0.1:{http}"))
        .env("DEMO_METER_LISTEN", format!("127.0.0.1:{}", free_port()))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("run scripts/demo.sh");
    let group = Group(child.id());
    let log = Log::default();
    log.capture(child.stdout.take().unwrap(), "demo stdout".into());
    log.capture(child.stderr.take().unwrap(), "demo".into());
    (child, log, group)
}

/// A port another process holds makes the demo fail, naming the port,
/// instead of claiming to run.
#[test]
fn demo_fails_when_its_ports_are_taken() {
    for which in ["gRPC", "HTTP"] {
        let dir = tempfile::tempdir().unwrap();
        let taken = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let (grpc, http) = match which {
            "gRPC" => (port, free_port()),
            _ => (free_port(), port),
        };
        let (mut child, log, _group) = demo(dir.path(), grpc, http, 30);
        let status = wait_timeout(&mut child, Duration::from_secs(30));
        let out = log.lines().join("\n");
        assert!(
            !status.success(),
            "{which} port taken, yet: {status}\n{out}"
        );
        assert!(
            out.contains(&format!("127.0.0.1:{port} is in use")),
            "{which}: the error does not name the port:\n{out}"
        );
        assert!(!out.contains("capwatch demo running"), "{out}");
    }
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so after the ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            found.push(child);
        }
    }
    found
}

/// Whether `pid` is still running (a zombie waiting to be reaped is not).
fn running(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .and_then(|(_, r)| r.split_whitespace().next().map(str::to_owned))
        })
        .is_some_and(|state| state != "Z" && state != "X")
}

/// An agent that cannot start (here a bad agent setting in the demo's
/// environment) makes the demo fail, instead of claiming to run without it.
#[test]
fn demo_fails_when_an_agent_cannot_start() {
    let dir = tempfile::tempdir().unwrap();
    let (mut child, log, _group) = demo_with(
        dir.path(),
        free_port(),
        free_port(),
        30,
        &[("CAPWATCH_SPOOL_CAPACITY", "bogus")],
    );
    let status = wait_timeout(&mut child, Duration::from_secs(60));
    let out = log.lines().join("\n");
    assert!(
        !status.success(),
        "an agent could not start, yet: {status}\n{out}"
    );
    assert!(out.contains("an agent exited at start"), "{out}");
    assert!(!out.contains("capwatch demo running"), "{out}");
}

/// SIGTERM while the demo sleeps stops it within a couple of seconds, with
/// the collector and every agent stopped.
#[test]
fn demo_stops_promptly_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (free_port(), free_port());
    let (mut child, log, _group) = demo(dir.path(), grpc, http, 600);
    log.wait_for("capwatch demo running", Duration::from_secs(60));
    let addr = format!("127.0.0.1:{http}").parse().unwrap();
    assert_eq!(http_get_status(addr, "/healthz").0, 200);
    // Every agent streams: none took a setting meant for the collector
    // from the demo's environment (its HTTP port, say) and died.
    eventually(Duration::from_secs(30), "five agents connected", || {
        let (status, body) = http_get_status(addr, "/metrics");
        status == 200
            && body
                .lines()
                .any(|l| l.starts_with("capwatch_collector_agents_connected") && l.ends_with(" 5"))
    });
    // The collector, five agents, the meter and the sleep.
    let mut kids = Vec::new();
    eventually(Duration::from_secs(10), "the demo's eight children", || {
        kids = children(child.id());
        kids.len() >= 8
    });

    let asked = Instant::now();
    terminate(&child);
    let status = wait_timeout(&mut child, Duration::from_secs(20));
    let took = asked.elapsed();
    eprintln!("demo stopped {took:?} after SIGTERM: {status}");
    assert!(
        took < Duration::from_secs(4),
        "the demo took {took:?} to stop"
    );
    assert_eq!(status.code(), Some(143), "{status}");
    let left: Vec<u32> = kids.into_iter().filter(|&k| running(k)).collect();
    assert!(left.is_empty(), "still running after the demo: {left:?}");
    assert!(std::net::TcpStream::connect(addr).is_err());
}

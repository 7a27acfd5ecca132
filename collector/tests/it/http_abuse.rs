//! The HTTP server under abuse, against the real collector binary on
//! loopback: clients that request `/metrics` and never read it, slowloris
//! connections that never finish their headers, and a flood of connections
//! beyond the cap. Each test bounds the collector's memory (its RSS from
//! `/proc`) and has a real agent connect over gRPC and get its samples
//! acked while the abuse goes on.

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// Resident memory of process `pid`, in bytes (`VmRSS`).
fn rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status");
    kb * 1024
}

/// Starts the collector with `settings` (TOML) as its config file, under a
/// descriptor limit of `nofile` (soft and hard) when given.
fn start(dir: &Path, settings: &str, nofile: Option<u64>) -> Collector {
    crate::support::init_ledger(dir);
    let config = dir.join("collector.toml");
    std::fs::write(&config, settings).unwrap();
    let mut cmd = match nofile {
        Some(n) => {
            let mut c = Command::new("sh");
            c.arg("-c")
                .arg(format!("ulimit -n {n} && exec \"$0\" \"$@\""))
                .arg(bin("capwatch-collector"));
            c
        }
        None => Command::new(bin("capwatch-collector")),
    };
    cmd.args(["--log-format", "json", "--http-listen", "127.0.0.1:0"])
        .args(["--grpc-listen", "127.0.0.1:0", "--stale-after", "1h"])
        .arg("--config")
        .arg(&config)
        .arg("--ledger")
        .arg(dir.join("ledger.db"))
        .env("RUST_LOG", "info")
        .stdout(Stdio::null());
    Collector::spawn(cmd)
}

/// A real agent delivers 5 samples and gets every one acked.
fn agent_gets_acked(collector: &Collector, dir: &Path, node: &str) {
    let agent = Agent::start(dir, &collector.endpoint(), node, 5, "");
    let log = agent.finish(Duration::from_secs(30));
    log.wait_for("\"undelivered\":0", Duration::from_secs(1));
}

/// Whether the server closed `s` (EOF or reset) within `limit`, reading
/// and discarding what it sent.
fn closed_within(s: &mut TcpStream, limit: Duration) -> bool {
    let until = Instant::now() + limit;
    let mut buf = [0u8; 64 << 10];
    loop {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
    }
}

/// A scrape that may fail (refused or cut): `None` then.
fn try_metrics(addr: SocketAddr) -> Option<Metrics> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    head.contains(" 200 ").then(|| Metrics::parse(body))
}

fn connect(addr: SocketAddr) -> TcpStream {
    TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect")
}

/// Invariant: clients that request `/metrics` and never read it cost the
/// collector a bounded amount of memory, not a body each: concurrent
/// scrapes share one render, and a client that reads nothing for
/// `http_write_timeout` is disconnected. gRPC keeps serving meanwhile.
#[test]
fn slow_metrics_readers_keep_memory_bounded() {
    const READERS: usize = 40;
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path(), "http_write_timeout = \"3s\"\n", None);
    // 150 nodes of 64 GPUs: a /metrics body of about 15 MB.
    let fleet = Command::new(bin("capwatch-fleet"))
        .args(["--collector", &collector.endpoint(), "--nodes", "150"])
        .args(["--gpus", "64", "--interval", "2s", "--duration", "1s"])
        .args(["--nodes-per-connection", "50", "--log-format", "json"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run capwatch-fleet");
    assert!(fleet.success(), "fleet: {fleet}");
    let body = http_get(collector.http, "/metrics").len() as u64;
    assert!(body > 10 << 20, "a large /metrics body: {body} bytes");
    let pid = collector.child.id();
    let before = rss(pid);

    let mut readers: Vec<TcpStream> = (0..READERS)
        .map(|_| {
            let mut s = connect(collector.http);
            write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            s
        })
        .collect();
    // Each reader's response has begun (peeked, not read): its body was
    // rendered and is being written to a client that does not read.
    let mut peak = before;
    let mut started = [false; READERS];
    eventually(Duration::from_secs(60), "every response started", || {
        for (s, done) in readers.iter().zip(started.iter_mut()) {
            s.set_nonblocking(true).unwrap();
            *done |= s.peek(&mut [0u8; 1]).is_ok_and(|n| n > 0);
            s.set_nonblocking(false).unwrap();
        }
        peak = peak.max(rss(pid));
        started.iter().all(|d| *d)
    });
    agent_gets_acked(&collector, dir.path(), "slow-readers");
    peak = peak.max(rss(pid));
    let grew = peak.saturating_sub(before);
    eprintln!(
        "body {body} B, RSS before {before} B, peak {peak} B, grew {grew} B ({:.1} bodies)",
        grew as f64 / body as f64
    );
    assert!(
        grew < 10 * body,
        "{READERS} slow readers grew the collector by {grew} bytes ({body}-byte body)"
    );

    // Every reader that never reads is cut off (counted before anything
    // here reads, which would let a response finish).
    let cut = |c: &Collector| {
        c.metrics().one(
            "capwatch_collector_http_connections_closed_total",
            &[("reason", "write_timeout")],
        )
    };
    eventually(Duration::from_secs(30), "slow readers cut off", || {
        cut(&collector) == READERS as f64
    });
    for s in &mut readers {
        assert!(closed_within(s, Duration::from_secs(5)), "disconnected");
    }
    drop(readers);
    assert_eq!(cut(&collector), READERS as f64);
    collector.stop();
}

/// Invariant: a connection that does not finish its request headers within
/// `http_header_read_timeout` is closed, and so is one that sends nothing
/// or stays idle after its response; hundreds of them hold no memory to
/// speak of and gRPC keeps serving.
#[test]
fn slowloris_connections_are_closed_after_the_header_timeout() {
    const SLOW: usize = 200;
    let dir = tempfile::tempdir().unwrap();
    let collector = start(dir.path(), "http_header_read_timeout = \"2s\"\n", None);
    let pid = collector.child.id();
    let before = rss(pid);

    // Headers started and never finished.
    let mut slow: Vec<TcpStream> = (0..SLOW)
        .map(|_| {
            let mut s = connect(collector.http);
            write!(s, "GET /metrics HTTP/1.1\r\nHost: x\r\nX-Slow: ").unwrap();
            s
        })
        .collect();
    // Nothing sent at all.
    let mut silent = connect(collector.http);
    // One request answered, then idle on a kept-alive connection.
    let mut idle = connect(collector.http);
    write!(idle, "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let mut head = [0u8; 12];
    idle.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");

    agent_gets_acked(&collector, dir.path(), "slowloris");
    let grew = rss(pid).saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "{SLOW} slowloris connections grew the collector by {grew} bytes"
    );
    let opened = Instant::now();
    for s in slow.iter_mut().chain([&mut silent, &mut idle]) {
        assert!(
            closed_within(s, Duration::from_secs(10)),
            "an unfinished or idle connection is closed after the header timeout"
        );
    }
    assert!(opened.elapsed() < Duration::from_secs(10));
    drop(slow);
    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_collector_http_connections_closed_total",
            &[("reason", "header_timeout")]
        ),
        SLOW as f64
    );
    assert_eq!(
        m.one(
            "capwatch_collector_http_connections_closed_total",
            &[("reason", "idle")]
        ),
        2.0
    );
    collector.stop();
}

/// Invariant: HTTP connections beyond `http_max_connections` (itself kept
/// well below the descriptor limit) are refused at once and counted, so
/// they can never take the descriptors gRPC needs: with the HTTP port
/// flooded past the limit, a real agent still connects and gets acked.
#[test]
fn connection_flood_beyond_the_cap_leaves_grpc_available() {
    const NOFILE: u64 = 256;
    const FLOOD: usize = 400;
    let dir = tempfile::tempdir().unwrap();
    let collector = start(
        dir.path(),
        "http_header_read_timeout = \"5m\"\n",
        Some(NOFILE),
    );
    collector
        .log
        .wait_for("file descriptors", Duration::from_secs(1));
    let pid = collector.child.id();
    let before = rss(pid);

    let mut flood: Vec<TcpStream> = Vec::with_capacity(FLOOD);
    for _ in 0..FLOOD {
        flood.push(connect(collector.http));
    }
    agent_gets_acked(&collector, dir.path(), "flooded");
    let grew = rss(pid).saturating_sub(before);
    assert!(
        grew < 64 << 20,
        "{FLOOD} idle HTTP connections grew the collector by {grew} bytes"
    );
    // The last connection is over the cap: refused at once.
    let last = flood.last_mut().unwrap();
    assert!(
        closed_within(last, Duration::from_secs(5)),
        "a connection over the cap is closed"
    );
    let refused_logs = |c: &Collector| {
        c.log
            .lines()
            .iter()
            .filter(|l| l.contains("HTTP connections refused"))
            .count()
    };
    assert_eq!(refused_logs(&collector), 1, "one log line for the burst");
    drop(flood);
    // Once the flood is gone, HTTP serves again.
    let mut m = None;
    eventually(Duration::from_secs(10), "HTTP serving again", || {
        m = try_metrics(collector.http);
        m.is_some()
    });
    let m = m.unwrap();
    let refused = m.one(
        "capwatch_collector_http_connections_refused_total",
        &[("reason", "limit")],
    );
    let cap = NOFILE / 4;
    assert!(
        refused >= (FLOOD as u64 - cap) as f64,
        "{refused} refused of {FLOOD} with a cap of {cap}"
    );
    collector.stop();
}

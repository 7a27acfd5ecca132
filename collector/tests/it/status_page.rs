//! The status page at `/`, against a running collector with mock agents:
//! over plain HTTP (every tenant named, hostile names escaped) and in
//! headless Chromium, which renders it and takes screenshots
//! (`target/status-page.png`, `target/status-tenant-page.png`); with the
//! charts drawn from the ledger once a minute has closed, and a tenant's
//! page with its nodes and GPUs.
//!
//! `scripts/install-test-tools.sh` installs Chromium and `scripts/test.sh`
//! sets `CAPWATCH_REQUIRE_TOOLS=1`, so in the suite a missing browser fails
//! the test; run alone without it, the browser test skips loudly.
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::support::*;

/// A tenant whose display name is markup, and one with quotes and an
/// ampersand: the page must show them as text.
const TENANTS: &str = r#"
[[tenant]]
id = "lab-a"
name = "<script>alert('owned')</script>"
contracted_kw = 2.5
nodes = ["sp-a-*"]

[[tenant]]
id = "lab-b"
name = "Lab \"B\" & Sons"
contracted_kw = 50
nodes = ["sp-b-*"]
"#;

const NAMES_ESCAPED: [&str; 3] = [
    "&lt;script&gt;alert(&#39;owned&#39;)&lt;/script&gt;",
    "Lab &quot;B&quot; &amp; Sons",
    "unassigned",
];

/// A collector with agents on both tenants, one more on no tenant, and a
/// node whose agent has stopped.
fn fleet(dir: &Path) -> (Collector, Vec<Agent>) {
    let collector = Collector::start(dir, TENANTS, 0, &[]);
    let ep = collector.endpoint();
    let agents = vec![
        Agent::start(dir, &ep, "sp-a-1", 100_000, ""),
        Agent::start(dir, &ep, "sp-b-1", 100_000, ""),
        Agent::start(dir, &ep, "sp-spare-1", 100_000, ""),
    ];
    Agent::start(dir, &ep, "sp-gone-1", 5, "").finish(Duration::from_secs(30));
    eventually(Duration::from_secs(30), "every tenant reporting", || {
        let m = collector.metrics();
        ["lab-a", "lab-b", "unassigned"].iter().all(|t| {
            m.select("capwatch_tenant_power_watts", &[("tenant", t)])
                .first()
                .is_some_and(|(_, w)| *w > 0.0)
        }) && m.one("capwatch_node_up", &[("node", "sp-gone-1")]) == 0.0
    });
    (collector, agents)
}

#[test]
fn status_page_names_every_tenant_and_escapes_their_names() {
    let dir = tempfile::tempdir().unwrap();
    let (collector, _agents) = fleet(dir.path());
    let page = http_get(collector.http, "/");
    for name in NAMES_ESCAPED {
        assert!(page.contains(name), "{name} missing:\n{page}");
    }
    for id in ["lab-a", "lab-b", "unassigned"] {
        assert!(page.contains(&format!("id=\"tenant-{id}\"")), "{id}");
    }
    assert!(!page.contains("<script"), "unescaped markup:\n{page}");
    assert!(!page.contains("Lab \"B\""), "unescaped quotes");
    assert!(page.contains("<meta http-equiv=\"refresh\""));
    assert!(page.contains("href=\"/metrics\""));
    assert!(page.contains("href=\"/v1/usage?from="));
    assert!(page.contains("sp-gone-1"), "stale node listed");
    // lab-a's 8 mock GPUs draw several kW against 2.5 kW.
    assert!(page.contains("fill over"), "lab-a over contract");
    assert!(page.contains(" kWh"), "energy today from the ledger");
    assert!(!page.contains("unavailable"), "ledger read");
    // The collector's own health and the time of the page.
    assert!(page.contains("As of <time datetime=\""), "as of");
    assert!(page.contains("<table id=\"health\">"), "health");
    assert!(page.contains("<th>finalized through</th>"), "watermark");
    assert!(page.contains(" ok, 0 failed"), "commits");
    assert!(
        page.contains("href=\"/status/tenant/lab-a\""),
        "tenant link"
    );

    // Once a minute has closed, each reporting tenant's chart draws it.
    let page = charted(&collector);
    assert_eq!(page.matches("<svg class=\"chart\"").count(), 3, "{page}");
    assert!(page.contains("<path class=\"contract\""), "contract line");
    let row = |page: &str, id: &str| -> String {
        page.split(&format!("id=\"tenant-{id}\""))
            .nth(1)
            .and_then(|r| r.split("</tr>").next())
            .unwrap()
            .to_string()
    };
    assert!(
        row(&page, "lab-a").contains("<path class=\"power\""),
        "{page}"
    );
    // lab-a draws more than its contract: once a whole minute of it is in
    // the ledger (the first may be cut short by the agents' start), it has
    // time over contract today, in whole minutes; lab-b never does.
    eventually(Duration::from_secs(150), "lab-a over contract", || {
        row(&http_get(collector.http, "/"), "lab-a").contains("<span class=\"over\">")
    });
    let page = http_get(collector.http, "/");
    assert!(row(&page, "lab-a").contains(" min</span>"), "{page}");
    assert!(
        row(&page, "lab-b").contains("<td class=\"num\">0 min</td>"),
        "{page}"
    );

    // A tenant's page: its nodes and GPUs, and its chart.
    let page = http_get(collector.http, "/status/tenant/lab-a");
    assert!(page.contains(NAMES_ESCAPED[0]), "{page}");
    assert!(!page.contains("<script"), "unescaped markup:\n{page}");
    assert!(page.contains("<td>sp-a-1</td><td>up</td>"), "{page}");
    assert!(!page.contains("sp-b-1"), "another tenant's node: {page}");
    assert_eq!(
        page.matches("<td>fresh</td>").count(),
        8,
        "8 mock GPUs: {page}"
    );
    assert!(
        page.contains("<svg class=\"chart\" xmlns=\"http://www.w3.org/2000/svg\" width=\"720\""),
        "{page}"
    );
    assert!(page.contains("<path class=\"power\""), "{page}");
    // The stopped node is marked stale on its tenant's page.
    let page = http_get(collector.http, "/status/tenant/unassigned");
    assert!(
        page.contains("<td>sp-gone-1</td><td><strong class=\"nodata\">STALE</strong></td>"),
        "{page}"
    );
    assert!(page.contains("<td>sp-spare-1</td><td>up</td>"), "{page}");
    let (status, _) = http_get_status(collector.http, "/status/tenant/nobody");
    assert_eq!(status, 404);
    collector.stop();
}

/// The overview once every reporting tenant's chart has a point: the
/// first minute the ledger holds has closed.
fn charted(collector: &Collector) -> String {
    let mut page = String::new();
    eventually(Duration::from_secs(100), "a closed minute charted", || {
        page = http_get(collector.http, "/");
        page.matches("<path class=\"power\"").count() == 3
    });
    page
}

/// Chromium, in its own process group so that its helpers die with it.
struct Browser(Child);

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-KILL", "--", &format!("-{}", self.0.id())])
            .status();
        let _ = self.0.wait();
    }
}

/// Runs headless Chromium with `args` and returns its stdout.
fn chromium(bin: &Path, profile: &Path, args: &[String]) -> String {
    let child = Command::new(bin)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--hide-scrollbars",
            "--window-size=1280,720",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .expect("start chromium");
    let mut browser = Browser(child);
    let mut stdout = browser.0.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut stdout, &mut s).unwrap();
        s
    });
    let log = Log::default();
    log.capture(browser.0.stderr.take().unwrap(), "chromium".into());
    let status = wait_timeout(&mut browser.0, Duration::from_secs(90));
    assert!(status.success(), "chromium: {status}");
    reader.join().unwrap()
}

fn target_dir() -> PathBuf {
    // target/<profile>/deps/<test>
    let exe = std::env::current_exe().unwrap();
    exe.ancestors().nth(3).unwrap().to_path_buf()
}

#[test]
fn status_page_renders_in_headless_chromium() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let Some(bin) = std::env::split_paths(&path)
        .map(|d| d.join("chromium"))
        .find(|p| p.is_file())
    else {
        assert!(
            std::env::var("CAPWATCH_REQUIRE_TOOLS").as_deref() != Ok("1"),
            "chromium is missing and CAPWATCH_REQUIRE_TOOLS=1: run scripts/install-test-tools.sh"
        );
        eprintln!(
            "\n!!!!! SKIPPED: chromium is missing; run scripts/install-test-tools.sh !!!!!\n"
        );
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (collector, _agents) = fleet(dir.path());
    let url = format!("http://{}/", collector.http);
    let profile = dir.path().join("chromium-profile");

    // The DOM as the browser built it, serialized again: every tenant's
    // name is a text node (only <, > and & come back escaped), and no
    // script element exists.
    let dom = chromium(&bin, &profile, &["--dump-dom".into(), url.clone()]);
    for name in [
        "&lt;script&gt;alert('owned')&lt;/script&gt;",
        "Lab \"B\" &amp; Sons",
        "GPUs no tenant leases",
    ] {
        assert!(
            dom.contains(name),
            "{name} not in the rendered page:\n{dom}"
        );
    }
    assert!(!dom.contains("<script"), "{dom}");
    assert!(dom.contains("capwatch status"));

    // The charts, as the browser parsed them: SVG elements with the
    // power line, the contract line and the gap bands.
    charted(&collector);
    let dom = chromium(&bin, &profile, &["--dump-dom".into(), url.clone()]);
    assert_eq!(dom.matches("<svg class=\"chart\"").count(), 3, "{dom}");
    for part in [
        "<path class=\"power\"",
        "<path class=\"contract\"",
        "<rect class=\"gap\"",
    ] {
        assert!(
            dom.contains(part),
            "{part} not in the rendered page:\n{dom}"
        );
    }
    let tenant_url = format!("http://{}/status/tenant/lab-a", collector.http);
    let dom = chromium(&bin, &profile, &["--dump-dom".into(), tenant_url.clone()]);
    assert!(
        dom.contains("&lt;script&gt;alert('owned')&lt;/script&gt;"),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");
    assert!(dom.contains("<td>sp-a-1</td>"), "{dom}");
    assert!(dom.contains("<svg class=\"chart\""), "{dom}");
    screenshot(&bin, &profile, "status-tenant-page.png", tenant_url);

    screenshot(&bin, &profile, "status-page.png", url);
    collector.stop();
}

/// A screenshot of `url` as `target/<name>`, checked to be a full,
/// non-blank 1280x720 PNG.
fn screenshot(bin: &Path, profile: &Path, name: &str, url: String) {
    let png = target_dir().join(name);
    let _ = std::fs::remove_file(&png);
    let started = Instant::now();
    chromium(
        bin,
        profile,
        &[format!("--screenshot={}", png.display()), url],
    );
    eprintln!("screenshot {} in {:?}", png.display(), started.elapsed());
    let bytes = std::fs::read(&png).expect("the screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n", "a PNG");
    // IHDR: width and height, big-endian, at bytes 16..24.
    let width = u32::from_be_bytes(bytes[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(bytes[20..24].try_into().unwrap());
    assert_eq!((width, height), (1280, 720));
    // A blank 1280x720 page compresses to a few hundred bytes.
    assert!(bytes.len() > 10_000, "{} bytes", bytes.len());
}

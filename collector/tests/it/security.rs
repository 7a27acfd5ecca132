//! Trust boundaries with real processes on loopback: agent tokens scoped to
//! nodes, API tokens scoped to tenants, TLS and mutual TLS with
//! certificates made here (a wrong CA and expired certificates included).

#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::path::Path;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    date_time_ymd,
};

use crate::support::*;

const SAMPLES: u64 = 10;

const TENANTS: &str = TWO_LABS;

const AGENT_A: &str = "agent-token-for-a-nodes-0001";
const ADMIN: &str = "admin-api-token-000000000001";
const LAB_A: &str = "lab-a-api-token-00000000001";

fn write_secret(dir: &Path, name: &str, text: &str) -> String {
    secret(dir, name, text).to_str().unwrap().to_string()
}

/// Asserts that `agent` exits without delivering (a bounded run that could
/// not deliver fails) and that its log says `why`.
fn assert_refused(agent: &mut Agent, why: &str) {
    let status = wait_timeout(&mut agent.child, Duration::from_secs(30));
    assert!(
        !status.success(),
        "{} delivered without being allowed",
        agent.node
    );
    agent.log.wait_for(why, Duration::from_secs(1));
}

/// The energy mock agent `node` reported over `SAMPLES` samples, all GPUs.
fn node_energy(node: &str) -> u64 {
    let t = Truth::of(node, SAMPLES);
    (0..t.uuids.len()).map(|g| t.energy(g, 1, SAMPLES)).sum()
}

/// Invariant: an agent token reports only for the nodes it was given, an
/// agent without a token is refused, and nothing refused reaches the
/// ledger; an API token reads only its tenant, and `/metrics` needs an
/// admin token when so configured. Every refusal is counted.
#[test]
fn tokens_decide_who_may_report_and_who_may_read() {
    let dir = tempfile::tempdir().unwrap();
    let auth = write_secret(
        dir.path(),
        "auth.toml",
        &format!(
            "[[agent]]\nname = \"a-racks\"\ntoken = \"{AGENT_A}\"\nnodes = [\"a-*\"]\n\n\
             [[api]]\nname = \"billing\"\ntoken = \"{ADMIN}\"\n\n\
             [[api]]\nname = \"lab-a\"\ntoken = \"{LAB_A}\"\ntenant = \"lab-a\"\n"
        ),
    );
    let config = dir.path().join("collector.toml");
    std::fs::write(&config, "metrics_auth = true\n").unwrap();
    let collector = Collector::start(
        dir.path(),
        TENANTS,
        0,
        &[
            "--config",
            config.to_str().unwrap(),
            "--auth-file",
            &auth,
            "--stale-after",
            "5m",
        ],
    );
    let token_file = write_secret(dir.path(), "agent.token", &format!("{AGENT_A}\n"));
    let with_token = format!("token_file = \"{token_file}\"\ndrain_timeout = \"2s\"\n");
    // a-1 is allowed; b-1 uses a-1's token to report for another tenant's
    // node; c-1 has no token.
    let good = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "a-1",
        SAMPLES,
        &with_token,
    );
    let spoof = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "b-1",
        SAMPLES,
        &with_token,
    );
    let anonymous = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "c-1",
        SAMPLES,
        "drain_timeout = \"2s\"\n",
    );
    good.finish(Duration::from_secs(30))
        .wait_for("\"undelivered\":0", Duration::from_secs(1));
    for (mut agent, why) in [
        (spoof, "may not report for node"),
        (anonymous, "agent token: no bearer token"),
    ] {
        assert_refused(&mut agent, why);
    }

    // /metrics: admin only.
    let (status, _) = http_get_token(collector.http, "/metrics", None);
    assert_eq!(status, 401);
    let (status, _) = http_get_token(collector.http, "/metrics", Some(LAB_A));
    assert_eq!(status, 403);
    let (status, body) = http_get_token(collector.http, "/metrics", Some(ADMIN));
    assert_eq!(status, 200);
    let m = Metrics::parse(&body);
    let refused = |surface: &str, reason: &str| {
        m.one(
            "capwatch_collector_auth_refused_total",
            &[("surface", surface), ("reason", reason)],
        )
    };
    assert!(refused("grpc", "node_not_allowed") >= 1.0);
    assert!(refused("grpc", "unauthenticated") >= 1.0);
    assert_eq!(refused("http", "unauthenticated"), 1.0);
    assert_eq!(refused("http", "forbidden"), 1.0);
    assert!(
        m.select("capwatch_node_samples_total", &[("node", "b-1")])
            .is_empty()
    );
    assert!(
        m.select("capwatch_node_samples_total", &[("node", "c-1")])
            .is_empty()
    );
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-a")]
        )),
        node_energy("a-1")
    );
    assert_eq!(
        m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-b")]
        ),
        0.0
    );
    // The spoofing agent was logged once (an agent without a token is
    // refused before it names a node: counted, not logged), and no token
    // was logged.
    let log = collector.log.lines().join("\n");
    assert_eq!(log.matches("agent refused").count(), 1, "{log}");
    assert!(!log.contains(AGENT_A) && !log.contains(ADMIN), "{log}");

    // The usage API: a tenant token reads its tenant only.
    let now = now_secs();
    let period = format!(
        "from={}&to={}&step=1h",
        capwatch_collector::usage::rfc3339(now / 3600 * 3600),
        capwatch_collector::usage::rfc3339(now / 3600 * 3600 + 3600)
    );
    // Which token may read which path (401, 403, 200 and the
    // WWW-Authenticate header) is checked in-process: http_api.rs.
    // What a tenant token sees of everything is its own tenant.
    let (_, body) = http_get_token(collector.http, &format!("/v1/usage?{period}"), Some(LAB_A));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let rows = v["rows"].as_array().unwrap();
    assert!(
        !rows.is_empty() && rows.iter().all(|r| r["tenant"] == "lab-a"),
        "{body}"
    );
    assert_eq!(energy_mj(rows), node_energy("a-1"));
    let (_, body) = http_get_token(collector.http, "/v1/tenants", Some(LAB_A));
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<&str> = v["tenants"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["id"].as_str().unwrap())
        .collect();
    assert_eq!(ids, ["lab-a"]);
    // The billing command asks the API with a token file, or is refused.
    let ask = |token: Option<&str>| {
        let mut cmd = std::process::Command::new(bin("capwatch-collector"));
        cmd.args(["usage", "--url", &format!("http://{}", collector.http)])
            .args(["--tenant", "lab-a", "--step", "1h", "--format", "csv"])
            .args([
                "--from",
                &capwatch_collector::usage::rfc3339(now / 3600 * 3600),
                "--to",
                &capwatch_collector::usage::rfc3339(now / 3600 * 3600 + 3600),
            ])
            .env_remove("CAPWATCH_TOKEN");
        if let Some(t) = token {
            cmd.args(["--token-file", &write_secret(dir.path(), "api.token", t)]);
        }
        cmd.output().unwrap()
    };
    let out = ask(Some(LAB_A));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout).lines().count(), 2);
    let out = ask(None);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("answered 401"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    collector.stop();
}

/// Invariant: a token removed from the auth file ends the streams that use
/// it at the next batch after SIGHUP; the agent cannot reconnect with it.
#[test]
fn a_revoked_token_ends_the_streams_that_use_it() {
    let dir = tempfile::tempdir().unwrap();
    let entry =
        format!("[[agent]]\nname = \"a-racks\"\ntoken = \"{AGENT_A}\"\nnodes = [\"a-*\"]\n");
    let auth = write_secret(dir.path(), "auth.toml", &entry);
    let collector = Collector::start(dir.path(), TENANTS, 0, &["--auth-file", &auth]);
    let token_file = write_secret(dir.path(), "agent.token", AGENT_A);
    let agent = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "a-1",
        10_000,
        &format!("token_file = \"{token_file}\"\n"),
    );
    agent.log.wait_for("\"connected\"", Duration::from_secs(10));
    // Rotated out: another token only.
    write_secret(
        dir.path(),
        "auth.toml",
        "[[agent]]\nname = \"next\"\ntoken = \"the-next-agent-token-0002\"\nnodes = [\"a-*\"]\n",
    );
    std::process::Command::new("kill")
        .args(["-HUP", &collector.child.id().to_string()])
        .status()
        .unwrap();
    agent
        .log
        .wait_for("the agent token was revoked", Duration::from_secs(10));
    agent
        .log
        .wait_for("agent token: unknown token", Duration::from_secs(10));
    let m = collector.metrics();
    assert!(
        m.one(
            "capwatch_collector_auth_refused_total",
            &[("surface", "grpc"), ("reason", "unauthenticated")]
        ) >= 2.0
    );
    drop(agent);
    collector.stop();
}

/// A certificate for `names` (the first is also its common name), valid
/// from 2020 to 2100; a CA's names are its common name only.
fn params(names: &[&str], ca: bool) -> CertificateParams {
    let sans = if ca { &[][..] } else { names };
    let mut p =
        CertificateParams::new(sans.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.not_before = date_time_ymd(2020, 1, 1);
    p.not_after = date_time_ymd(2100, 1, 1);
    if ca {
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    }
    p
}

struct Ca {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Self {
        let key = KeyPair::generate().unwrap();
        let p = params(&[name], true);
        let pem = p.self_signed(&key).unwrap().pem();
        Self {
            pem,
            issuer: Issuer::new(p, key),
        }
    }

    /// (certificate PEM, key PEM) for `names`; `expired` ends it in 2021.
    fn issue(&self, names: &[&str], expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = params(names, false);
        if expired {
            p.not_after = date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

/// (node, CA the agent trusts, its client certificate and key, what its
/// log must say).
type Refusal<'a> = (&'a str, &'a str, Option<(String, String)>, &'a str);

/// Writes a certificate and key; returns their paths.
fn write_pair(dir: &Path, name: &str, pair: &(String, String)) -> (String, String) {
    let cert = dir.join(format!("{name}.pem"));
    std::fs::write(&cert, &pair.0).unwrap();
    (
        cert.to_str().unwrap().to_string(),
        write_secret(dir, &format!("{name}.key"), &pair.1),
    )
}

/// Invariant: over TLS with client certificates, an agent whose
/// certificate is from the agents' CA and names its node delivers every
/// sample; one with a certificate naming another node, from a wrong CA, or
/// expired is refused; an agent that does not trust the collector's CA, or
/// meets an expired server certificate, does not connect.
#[test]
fn tls_and_mutual_tls_with_generated_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let server_ca = Ca::new("capwatch test server CA");
    let agents_ca = Ca::new("capwatch test agents CA");
    let rogue_ca = Ca::new("somebody else's CA");
    let write = |name: &str, text: &str| {
        let p = d.join(name);
        std::fs::write(&p, text).unwrap();
        p.to_str().unwrap().to_string()
    };
    let server_ca_pem = write("server-ca.pem", &server_ca.pem);
    let agents_ca_pem = write("agents-ca.pem", &agents_ca.pem);
    let rogue_ca_pem = write("rogue-ca.pem", &rogue_ca.pem);
    let (cert, key) = write_pair(d, "collector", &server_ca.issue(&["localhost"], false));
    let config = d.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "tls_cert = \"{cert}\"\ntls_key = \"{key}\"\ntls_client_ca = \"{agents_ca_pem}\"\n"
        ),
    )
    .unwrap();
    let collector = Collector::start(
        d,
        TENANTS,
        0,
        &["--config", config.to_str().unwrap(), "--stale-after", "5m"],
    );
    // By address, so nothing depends on how this host resolves localhost.
    let url = format!("https://{}", collector.grpc);
    let agent_config = |node: &str, ca: &str, pair: Option<(String, String)>| {
        let mut c =
            format!("tls_ca = \"{ca}\"\ntls_domain = \"localhost\"\ndrain_timeout = \"2s\"\n");
        if let Some(pair) = pair {
            let (cert, key) = write_pair(d, &format!("client-{node}"), &pair);
            c.push_str(&format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"));
        }
        c
    };
    let good = Agent::start(
        d,
        &url,
        "a-1",
        SAMPLES,
        &agent_config(
            "a-1",
            &server_ca_pem,
            Some(agents_ca.issue(&["a-1"], false)),
        ),
    );
    good.finish(Duration::from_secs(30))
        .wait_for("\"undelivered\":0", Duration::from_secs(1));

    // (node, CA the agent trusts, client certificate, what its log says)
    let refused: [Refusal; 5] = [
        // A certificate from the agents' CA, for another node.
        (
            "a-2",
            &server_ca_pem,
            Some(agents_ca.issue(&["a-1"], false)),
            "does not name node",
        ),
        // A client certificate from a CA the collector does not trust, an
        // expired one, none: the collector ends the TLS handshake. (With TLS
        // 1.3 the client may see the alert or only a closed connection.)
        (
            "a-3",
            &server_ca_pem,
            Some(rogue_ca.issue(&["a-3"], false)),
            "stream to collector failed",
        ),
        (
            "a-4",
            &server_ca_pem,
            Some(agents_ca.issue(&["a-4"], true)),
            "stream to collector failed",
        ),
        ("a-5", &server_ca_pem, None, "stream to collector failed"),
        // The agent does not trust the collector's CA.
        (
            "a-6",
            &rogue_ca_pem,
            Some(agents_ca.issue(&["a-6"], false)),
            "UnknownIssuer",
        ),
    ];
    let started: Vec<(Agent, &str)> = refused
        .into_iter()
        .map(|(node, ca, pair, why)| {
            (
                Agent::start(d, &url, node, SAMPLES, &agent_config(node, ca, pair)),
                why,
            )
        })
        .collect();
    for (mut agent, why) in started {
        assert_refused(&mut agent, why);
    }
    let m = collector.metrics();
    assert!(
        m.one(
            "capwatch_collector_auth_refused_total",
            &[("surface", "grpc"), ("reason", "certificate")]
        ) >= 1.0
    );
    let nodes: Vec<String> = m
        .select("capwatch_node_samples_total", &[])
        .into_iter()
        .map(|(labels, _)| labels["node"].clone())
        .collect();
    assert_eq!(nodes, ["a-1"]);
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-a")]
        )),
        node_energy("a-1")
    );
    collector.stop();

    // An expired server certificate: the agent does not talk to it.
    let (cert, key) = write_pair(d, "expired", &server_ca.issue(&["localhost"], true));
    std::fs::write(
        &config,
        format!("tls_cert = \"{cert}\"\ntls_key = \"{key}\"\n"),
    )
    .unwrap();
    let collector = Collector::start(d, TENANTS, 0, &["--config", config.to_str().unwrap()]);
    let url = format!("https://{}", collector.grpc);
    let mut agent = Agent::start(
        d,
        &url,
        "a-7",
        SAMPLES,
        &agent_config("a-7", &server_ca_pem, None),
    );
    assert_refused(&mut agent, "certificate expired");
    assert!(
        collector
            .metrics()
            .select("capwatch_node_samples_total", &[("node", "a-7")])
            .is_empty()
    );
    collector.stop();
}

// ---- GPU leases that a node cannot forge ---------------------------------

const AGENT_SHARED: &str = "agent-token-for-shared-0001";
const AGENT_EVIL: &str = "agent-token-for-evil-00001";

/// An auth file: one token for the shared node, one that may report only
/// for `evil-*`.
fn lease_auth(dir: &Path) -> String {
    write_secret(
        dir,
        "auth.toml",
        &format!(
            "[[agent]]\nname = \"shared\"\ntoken = \"{AGENT_SHARED}\"\nnodes = [\"shared-*\"]\n\n\
             [[agent]]\nname = \"evil\"\ntoken = \"{AGENT_EVIL}\"\nnodes = [\"evil-*\"]\n"
        ),
    )
}

/// Opens an ingest stream with `token` whose Hello names `node` and lists
/// `uuids` (with energy counters); returns the collector's answer to it.
fn hello_as(
    endpoint: &str,
    token: &str,
    node: &str,
    uuids: &[String],
) -> Result<(), tonic::Status> {
    use capwatch_proto::v1 as pb;
    let hello = pb::AgentMessage {
        body: Some(pb::agent_message::Body::Hello(pb::Hello {
            node_power_sources: Vec::new(),
            node_id: node.into(),
            agent_version: "crafted".into(),
            stream_epoch: 1,
            interval_millis: 1000,
            gpus: uuids
                .iter()
                .enumerate()
                .map(|(i, u)| pb::GpuInfo {
                    index: i as u32,
                    uuid: u.clone(),
                    model: "H100".into(),
                    power_limit_milliwatts: Some(700_000),
                    memory_total_bytes: None,
                    energy_counter_supported: true,
                    ..Default::default()
                })
                .collect(),
            host: None,
        })),
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut client =
            capwatch_proto::v1::ingest_client::IngestClient::connect(endpoint.to_string())
                .await
                .unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        tx.send(hello).await.unwrap();
        let mut req = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        req.metadata_mut()
            .insert("authorization", format!("Bearer {token}").parse().unwrap());
        let mut answers = client.stream(req).await?.into_inner();
        match answers.message().await? {
            Some(_) => Ok(()),
            None => Err(tonic::Status::unknown("closed without a Welcome")),
        }
    })
}

fn claims_refused(m: &Metrics, reason: &str) -> f64 {
    m.one(
        "capwatch_collector_gpu_claims_refused_total",
        &[("reason", reason)],
    )
}

/// Invariant: a GPU leased by UUID is billed to its tenant only as
/// reported by the node that holds it. With node `shared-1`'s real agent
/// connected, node `evil-1` (whose token allows only `evil-*`) announcing
/// one of shared-1's leased UUIDs is refused (FAILED_PRECONDITION naming the
/// GPU and its node), counted, and lab-c is billed exactly what shared-1's
/// GPU used.
#[test]
fn a_node_cannot_bill_a_leased_gpu_that_another_node_holds() {
    const N: u64 = 60;
    let dir = tempfile::tempdir().unwrap();
    let truth = Truth::of("shared-1", N);
    let tenants = format!(
        "[[tenant]]\nid = \"lab-c\"\ncontracted_kw = 10\ngpus = [\"{}\"]\n\n\
         [[tenant]]\nid = \"evil\"\ncontracted_kw = 10\nnodes = [\"evil-*\"]\n",
        truth.uuids[0]
    );
    let auth = lease_auth(dir.path());
    let collector = Collector::start(
        dir.path(),
        &tenants,
        0,
        &["--auth-file", &auth, "--stale-after", "5m"],
    );
    let token_file = write_secret(dir.path(), "shared.token", AGENT_SHARED);
    let agent = Agent::start(
        dir.path(),
        &collector.endpoint(),
        "shared-1",
        N,
        &format!("token_file = \"{token_file}\"\ndrain_timeout = \"5s\"\n"),
    );
    eventually(Duration::from_secs(20), "shared-1 reporting", || {
        !collector
            .metrics()
            .select("capwatch_node_samples_total", &[("node", "shared-1")])
            .is_empty()
    });
    let refused = hello_as(
        &collector.endpoint(),
        AGENT_EVIL,
        "evil-1",
        &[truth.uuids[0].clone()],
    )
    .expect_err("evil-1 may not report shared-1's leased GPU");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
    for want in [truth.uuids[0].as_str(), "shared-1", "lab-c"] {
        assert!(refused.message().contains(want), "{refused}: lacks {want}");
    }
    agent
        .finish(Duration::from_secs(30))
        .wait_for("\"undelivered\":0", Duration::from_secs(1));
    let m = collector.metrics();
    assert_eq!(claims_refused(&m, "held_by_other_node"), 1.0);
    assert_eq!(claims_refused(&m, "lease_node"), 0.0);
    assert!(m.one("capwatch_collector_streams_refused_total", &[]) >= 1.0);
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-c")]
        )),
        truth.energy(0, 1, N)
    );
    assert_eq!(
        m.one("capwatch_tenant_energy_joules_total", &[("tenant", "evil")]),
        0.0
    );
    assert!(
        m.select("capwatch_node_samples_total", &[("node", "evil-1")])
            .is_empty()
    );
    collector.stop();
}

/// Invariant: a UUID lease that names its node (`{ uuid, node }`) counts
/// only there: any other node announcing that UUID is refused
/// (PERMISSION_DENIED naming the GPU and the node allowed) even while the
/// GPU's own node is away, and the lessee is billed only its own node's
/// readings.
#[test]
fn a_gpu_lease_pinned_to_a_node_counts_only_on_that_node() {
    const N: u64 = 20;
    let dir = tempfile::tempdir().unwrap();
    let truth = Truth::of("shared-1", N);
    let tenants = format!(
        "[[tenant]]\nid = \"lab-c\"\ncontracted_kw = 10\n\
         gpus = [{{ uuid = \"{}\", node = \"shared-*\" }}, \"{}\"]\n",
        truth.uuids[0], truth.uuids[1]
    );
    let auth = lease_auth(dir.path());
    let collector = Collector::start(
        dir.path(),
        &tenants,
        0,
        &["--auth-file", &auth, "--stale-after", "5m"],
    );
    // shared-1 has not reported yet: only the lease tells where the GPU is.
    let refused = hello_as(
        &collector.endpoint(),
        AGENT_EVIL,
        "evil-1",
        &[truth.uuids[0].clone()],
    )
    .expect_err("evil-1 may not report a GPU leased on shared-*");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    for want in [truth.uuids[0].as_str(), "shared-*", "evil-1"] {
        assert!(refused.message().contains(want), "{refused}: lacks {want}");
    }
    let token_file = write_secret(dir.path(), "shared.token", AGENT_SHARED);
    Agent::start(
        dir.path(),
        &collector.endpoint(),
        "shared-1",
        N,
        &format!("token_file = \"{token_file}\"\ndrain_timeout = \"5s\"\n"),
    )
    .finish(Duration::from_secs(30))
    .wait_for("\"undelivered\":0", Duration::from_secs(1));
    let m = collector.metrics();
    assert_eq!(claims_refused(&m, "lease_node"), 1.0);
    assert_eq!(
        milli(m.one(
            "capwatch_tenant_energy_joules_total",
            &[("tenant", "lab-c")]
        )),
        truth.energy(0, 1, N) + truth.energy(1, 1, N)
    );
    collector.stop();
}

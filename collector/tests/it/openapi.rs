//! The usage API's OpenAPI document proven with the real tools: the
//! checked-in document is valid OpenAPI (openapi-spec-validator), and
//! schemathesis drives every documented operation of a running collector
//! with generated requests, valid and not: no answer is a 5xx, and every
//! status, content type, header and body conforms to the document.
//!
//! `scripts/install-test-tools.sh` installs both into `target/api-venv`;
//! `scripts/test.sh` sets `CAPWATCH_REQUIRE_TOOLS=1`, so in the suite a
//! missing tool fails the test. Run alone without them, the test says
//! loudly that it skipped and passes.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use capwatch_collector::ledger::{BucketDelta, Commit, Ledger};

use crate::support::{Collector, TWO_LABS, init_ledger};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// A tool of the API virtual environment, or `None` after a loud skip
/// (a failure when `CAPWATCH_REQUIRE_TOOLS=1`, as in the suite and CI).
fn api_tool(name: &str) -> Option<PathBuf> {
    let venv = std::env::var_os("CAPWATCH_API_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/api-venv"));
    let p = venv.join("bin").join(name);
    if p.is_file() {
        return Some(p);
    }
    let required = std::env::var("CAPWATCH_REQUIRE_TOOLS").is_ok_and(|v| v == "1");
    assert!(
        !required,
        "{} is missing and CAPWATCH_REQUIRE_TOOLS=1: run scripts/install-test-tools.sh",
        p.display()
    );
    eprintln!(
        "\n!!!!! SKIPPED: {} is missing; run scripts/install-test-tools.sh !!!!!\n",
        p.display()
    );
    None
}

fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("$ {cmd:?}\n{text}");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{text}",
        out.status
    );
    text
}

#[test]
fn the_checked_in_document_is_valid_openapi() {
    let Some(validator) = api_tool("openapi-spec-validator") else {
        return;
    };
    let doc = repo().join("collector/openapi.json");
    let out = run_ok(Command::new(validator).arg(&doc));
    assert!(out.contains("OK"), "{out}");
}

/// Invariant: whatever a client sends to a documented operation, the
/// collector answers as documented, and never with a server error.
#[test]
fn schemathesis_finds_every_answer_as_documented() {
    let Some(schemathesis) = api_tool("schemathesis") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    init_ledger(dir.path());
    // Three hours of minutes from the documented example period, final
    // through the second, so that valid requests find rows, partial and
    // final, and an adjustment.
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    {
        let mut l = Ledger::open(&dir.path().join("ledger.db")).unwrap();
        let mut c = Commit::default();
        for tenant in ["lab-a", "lab-b"] {
            for m in 0..180 {
                let e = 30_000_000 + m as u64;
                c.buckets.insert(
                    (Arc::from(tenant), Arc::from("node-1"), T0 + m * 60),
                    BucketDelta {
                        energy_mj: e,
                        gpu_ns: 60_000_000_000,
                        busy_gpu_ns: 30_000_000_000,
                        samples: 60,
                        expected_gpu_ns: 60_000_000_000,
                        ..BucketDelta::default()
                    },
                );
                *c.tenant_energy.entry(Arc::from(tenant)).or_default() += e;
            }
        }
        l.commit_at(&c, T0 + 7300, T0 + 7200).unwrap();
        let mut late = Commit::default();
        late.buckets.insert(
            (Arc::from("lab-a"), Arc::from("node-1"), T0),
            BucketDelta {
                energy_mj: 5_000,
                samples: 1,
                ..BucketDelta::default()
            },
        );
        l.commit_at(&late, T0 + 7400, T0 + 7200).unwrap();
    }
    // Without API tokens; then with them, as a tenant (403 for other
    // tenants and admin pages, 404 for no tenant) and with a token that is
    // not one (401 with `WWW-Authenticate`).
    const LAB_A: &str = "lab-a-api-token-00000000001";
    let auth = crate::support::secret(
        dir.path(),
        "auth.toml",
        &format!(
            "[[api]]\nname = \"billing\"\ntoken = \"admin-api-token-000000000001\"\n\n\
             [[api]]\nname = \"lab-a\"\ntoken = \"{LAB_A}\"\ntenant = \"lab-a\"\n"
        ),
    );
    let auth = auth.to_str().unwrap();
    for (extra, header) in [
        (&[][..], None),
        (
            &["--auth-file", auth][..],
            Some(format!("Authorization: Bearer {LAB_A}")),
        ),
        (
            &["--auth-file", auth][..],
            Some("Authorization: Bearer not-a-token-of-this-collector".to_string()),
        ),
    ] {
        let collector = Collector::start(dir.path(), TWO_LABS, 0, extra);
        let url = format!("http://{}/openapi.json", collector.http);
        let mut cmd = Command::new(&schemathesis);
        // Hypothesis keeps its database in the working directory.
        cmd.current_dir(dir.path())
            .args(["--no-color", "run", &url])
            .args([
                "--checks",
                "not_a_server_error,status_code_conformance,content_type_conformance,\
                 response_schema_conformance,response_headers_conformance",
                "--max-examples",
                "40",
                "--seed",
                "20261201",
                "--request-timeout",
                "30",
            ]);
        if let Some(h) = &header {
            cmd.args(["--header", h]);
        }
        let out = run_ok(&mut cmd);
        // Every documented operation was exercised, but the one serving the
        // document itself, which schemathesis leaves out.
        let operations = std::fs::read_to_string(repo().join("collector/openapi.json"))
            .unwrap()
            .matches("\"operationId\"")
            .count()
            - 1;
        for line in [
            format!("Selected: {operations}/{operations}"),
            format!("Tested: {operations}"),
        ] {
            assert!(
                out.contains(&line),
                "{header:?}: not all {operations} operations tested:\n{out}"
            );
        }
        collector.stop();
    }
}

//! The HTTP surface's answers, in-process: the router the collector serves
//! called with `oneshot` on a fresh ledger. Bad queries, refused tokens
//! and unknown routes each get their status and a JSON body naming the
//! problem. What needs a real process (connection caps, timeouts, TLS,
//! signals) stays in `http_abuse`, `security` and `health`.

use expect_test::expect_file;

use crate::support::router::Api;
use crate::support::{TWO_LABS, now_secs};

const TENANTS: &str = TWO_LABS;

const ADMIN: &str = "admin-api-token-000000000001";
const LAB_A: &str = "lab-a-api-token-00000000001";

/// An admin API token and one for lab-a.
fn auth() -> String {
    format!(
        "[[api]]\nname = \"billing\"\ntoken = \"{ADMIN}\"\n\n\
         [[api]]\nname = \"lab-a\"\ntoken = \"{LAB_A}\"\ntenant = \"lab-a\"\n"
    )
}

fn rfc3339(t: i64) -> String {
    capwatch_collector::usage::rfc3339(t)
}

/// Invariant: a bad usage query is answered with its status and a JSON
/// `error` naming the problem: an unknown tenant, a bad or misaligned
/// time, a repeated or unknown parameter, an unknown time zone, too many
/// rows, an unknown format, a bad `since_revision`.
#[tokio::test]
async fn bad_usage_queries_name_the_problem() {
    let api = Api::new(TENANTS, None, false);
    let now = now_secs() as u64;
    let (from, to) = (now / 60 * 60 - 600, now / 60 * 60 + 600);
    let period = format!(
        "from={}&to={}&step=1m",
        rfc3339(from as i64),
        rfc3339(to as i64)
    );
    let hour = now as i64 / 3600 * 3600;
    let hourly = format!(
        "/v1/usage?from={}&to={}&step=1m",
        rfc3339(hour),
        rfc3339(hour + 3600)
    );
    // (path, status, text the error must name)
    let errors = [
        (
            format!("/v1/tenants/nobody/usage?{period}"),
            404,
            "unknown tenant",
        ),
        (
            "/v1/tenants/lab-a/usage?from=yesterday&to=2027-01-01T00:00:00Z".to_string(),
            400,
            "`from`",
        ),
        (
            "/v1/usage?from=2027-01-01T00:30:00Z&to=2027-01-01T02:00:00Z&step=1h".to_string(),
            400,
            "must be at the start of a 1h row",
        ),
        (
            format!("/v1/usage?{period}&from=2027-01-01T00:00:00Z"),
            400,
            "duplicate field `from`",
        ),
        (
            format!("/v1/usage?{period}&timezone=UTC"),
            400,
            "unknown field `timezone`",
        ),
        (
            format!("/v1/usage?{period}&tz=Mars/Olympus_Mons"),
            400,
            "`tz`",
        ),
        (
            "/v1/usage?from=2027-01-01T00:00:00Z&to=2027-02-01T00:00:00Z&step=1m".to_string(),
            400,
            "at most",
        ),
        (format!("/v1/usage?{period}&format=xml"), 400, "`format`"),
    ];
    for (path, status, text) in errors {
        let r = api.get(&path, None).await;
        assert_eq!(r.status, status, "{path}: {}", r.body);
        assert!(
            r.json()["error"].as_str().unwrap().contains(text),
            "{path}: {}",
            r.body
        );
    }
    // A cursor that is not a revision, or one from another ledger, is
    // refused by name.
    for (r, says) in [
        ("soon", "is not a revision"),
        ("99999", "is ahead of the ledger"),
    ] {
        let r = api.get(&format!("{hourly}&since_revision={r}"), None).await;
        assert_eq!(r.status, 400, "{}", r.body);
        assert!(
            r.body.contains("since_revision") && r.body.contains(says),
            "{}",
            r.body
        );
    }
}

/// Invariant: with API tokens configured, a tenant token reads only its
/// tenant, no token or an unknown one is 401 (with `WWW-Authenticate:
/// Bearer`), another tenant's data or an admin page is 403, and
/// `/healthz` stays open; every refusal is counted.
#[tokio::test]
async fn api_tokens_decide_who_may_read() {
    let api = Api::new(TENANTS, Some(&auth()), true);
    let now = now_secs();
    let period = format!(
        "from={}&to={}&step=1h",
        rfc3339(now / 3600 * 3600),
        rfc3339(now / 3600 * 3600 + 3600)
    );
    let cases: [(&str, Option<&str>, u16); 7] = [
        ("/v1/tenants/lab-a/usage", None, 401),
        (
            "/v1/tenants/lab-a/usage",
            Some("not-a-token-at-all-000"),
            401,
        ),
        ("/v1/tenants/lab-b/usage", Some(LAB_A), 403),
        ("/v1/tenants/lab-a/usage", Some(LAB_A), 200),
        ("/v1/tenants/lab-b/usage", Some(ADMIN), 200),
        ("/v1/usage", Some(LAB_A), 200),
        ("/v1/tenants", Some(LAB_A), 200),
    ];
    for (path, token, want) in cases {
        let r = api.get(&format!("{path}?{period}"), token).await;
        assert_eq!(r.status, want, "{path} with {token:?}: {}", r.body);
        let v = r.json();
        if want != 200 {
            assert!(v["error"].is_string(), "{}", r.body);
        }
    }
    let r = api.get("/v1/usage", None).await;
    assert_eq!(
        r.headers
            .get("www-authenticate")
            .and_then(|v| v.to_str().ok()),
        Some("Bearer"),
        "{:?}",
        r.headers
    );
    // /metrics (metrics_auth) and the status page: admin only.
    for path in ["/metrics", "/"] {
        assert_eq!(api.get(path, None).await.status, 401, "{path}");
        assert_eq!(api.get(path, Some(LAB_A)).await.status, 403, "{path}");
        assert_eq!(api.get(path, Some(ADMIN)).await.status, 200, "{path}");
    }
    let page = api.get("/", Some(ADMIN)).await;
    assert!(page.body.contains("lab-b"), "{}", page.body);
    // /healthz stays open for probes.
    let r = api.get("/healthz", None).await;
    assert_eq!((r.status, r.body.as_str()), (200, "ok\n"));
    // Every refusal above was counted, by surface and reason.
    let metrics = api.get("/metrics", Some(ADMIN)).await.body;
    let m = crate::support::Metrics::parse(&metrics);
    let refused = |reason: &str| {
        m.one(
            "capwatch_collector_auth_refused_total",
            &[("surface", "http"), ("reason", reason)],
        )
    };
    // 401: two usage cases, the bare /v1/usage, /metrics and /.
    assert_eq!(refused("unauthenticated"), 5.0);
    // 403: lab-a reading lab-b, /metrics and /.
    assert_eq!(refused("forbidden"), 3.0);
}

/// The metric families a collector with tenants and no agents exports,
/// with their help and type lines: a change to a name, a help text or a
/// type shows here as a diff (`UPDATE_EXPECT=1` to accept one).
#[tokio::test]
async fn metric_listing() {
    let api = Api::new(TENANTS, None, false);
    let r = api.get("/metrics", None).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let listing: String = r
        .body
        .lines()
        .filter(|l| l.starts_with("# "))
        .map(|l| format!("{l}\n"))
        .collect();
    expect_file!["snapshots/metric-listing.txt"].assert_eq(&listing);
}

/// A path the collector does not serve is 404.
#[tokio::test]
async fn unknown_routes_are_not_found() {
    let api = Api::new(TENANTS, None, false);
    for path in ["/nope", "/v1", "/v1/tenants/lab-a", "/metrics/extra"] {
        assert_eq!(api.get(path, None).await.status, 404, "{path}");
    }
}

/// A facility-basis tenant's usage over HTTP is its meter's allocation
/// on the metered node (the collector's meters say which node is under
/// one) plus the PUE times its unmetered node's energy, to the millijoule.
#[tokio::test]
async fn facility_usage_takes_the_configured_meters_allocation() {
    use capwatch_collector::ledger::{BucketDelta, Commit, Ledger, MeterMinute, MeterState};
    use std::sync::Arc;
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    let api = Api::new(
        "[[tenant]]\nid = \"lab-f\"\ncontracted_kw = 1\nnodes = [\"m-1\", \"u-1\"]\nbasis = \"facility\"\npue = 1.5\n",
        Some(&auth()),
        false,
    );
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<capwatch_collector::meters::MeterConfig>,
    }
    let file: File = toml::from_str(
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m-*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    api.state
        .set_meters(Arc::new(capwatch_collector::meters::Board::new(
            capwatch_collector::meters::check(&file.meter).unwrap(),
        )));
    {
        let mut l = Ledger::open(&api.ledger_path).unwrap();
        let mut c = Commit::default();
        for (node, mj) in [("m-1", 60_000), ("u-1", 40_001)] {
            c.buckets.insert(
                (Arc::from("lab-f"), Arc::from(node), T0),
                BucketDelta {
                    node_energy_mj: mj,
                    node_ns: 60_000_000_000,
                    samples: 1,
                    ..BucketDelta::default()
                },
            );
        }
        l.commit_at(&c, T0 + 70, T0 + 900).unwrap();
        let minute = MeterMinute {
            minute: T0,
            metered_mj: 90_001,
            measured_mj: 60_000,
            unallocated_mj: 0,
            tenants: vec![("lab-f".into(), 60_000, 90_001)],
        };
        let state = MeterState {
            allocated_through: T0 + 60,
            reading_at_ns: (T0 + 60) * 1_000_000_000,
            reading_raw: 0,
            carry_mj: 0,
        };
        assert!(l.allocate_meter("row-a", None, &state, &[minute]).unwrap());
    }
    let r = api
        .get(
            "/v1/tenants/lab-f/usage?from=2027-01-01T00:00:00Z&to=2027-01-01T00:01:00Z&step=1m",
            Some(ADMIN),
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let row = &r.json()["rows"][0];
    // 90,001 + 40,001 × 1.5 = 150,002.5, rounded half up.
    assert_eq!(row["facility_energy_millijoules"], "150003", "{row}");
    assert_eq!(row["facility_energy_pending"], false);
    assert_eq!(row["facility_energy_estimated"], true);
}

/// The meters' reconciliation names every tenant under each meter: only an
/// admin token reads it; its query is checked like usage's.
#[tokio::test]
async fn meters_need_an_admin_token() {
    let api = Api::new(TENANTS, Some(&auth()), false);
    let q = "from=2027-01-15T08:00:00Z&to=2027-01-15T09:00:00Z&step=15m";
    let cases: [(String, Option<&str>, u16); 6] = [
        (format!("/v1/meters?{q}"), None, 401),
        (format!("/v1/meters?{q}"), Some(LAB_A), 403),
        (format!("/v1/meters?{q}"), Some(ADMIN), 200),
        (format!("/v1/meters?{q}&format=csv"), Some(ADMIN), 200),
        (format!("/v1/meters?{q}&meter=x"), Some(ADMIN), 400),
        (
            "/v1/meters?from=2027-01-15T08:00:01Z&to=2027-01-15T09:00:00Z".into(),
            Some(ADMIN),
            400,
        ),
    ];
    for (path, token, want) in cases {
        let r = api.get(&path, token).await;
        assert_eq!(r.status, want, "{path} with {token:?}: {}", r.body);
    }
    let r = api.get(&format!("/v1/meters?{q}"), Some(ADMIN)).await;
    assert_eq!(
        r.json()["rows"],
        serde_json::json!([]),
        "no meters, no rows"
    );
}

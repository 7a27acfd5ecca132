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
    // /metrics (metrics_auth) and the status pages: admin only (a tenant
    // token sees not even its own tenant's page: it names the nodes and
    // the collector's health).
    for path in [
        "/metrics",
        "/",
        "/status/tenant/lab-a",
        "/status/tenant/lab-b",
    ] {
        assert_eq!(api.get(path, None).await.status, 401, "{path}");
        assert_eq!(api.get(path, Some(LAB_A)).await.status, 403, "{path}");
        assert_eq!(api.get(path, Some(ADMIN)).await.status, 200, "{path}");
    }
    let page = api.get("/", Some(ADMIN)).await;
    assert!(page.body.contains("lab-b"), "{}", page.body);
    // An unknown tenant's page is 404, after the token is checked.
    let r = api.get("/status/tenant/nobody", Some(ADMIN)).await;
    assert_eq!(r.status, 404, "{}", r.body);
    assert_eq!(
        api.get("/status/tenant/nobody", Some(LAB_A)).await.status,
        403
    );
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
    // 401: two usage cases, the bare /v1/usage, /metrics, / and two tenant pages.
    assert_eq!(refused("unauthenticated"), 7.0);
    // 403: lab-a reading lab-b, /metrics, /, two tenant pages and nobody's.
    assert_eq!(refused("forbidden"), 6.0);
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
    use capwatch_collector::ledger::{
        BucketDelta, Commit, Ledger, MeterMinute, MeterShare, MeterState,
    };
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
            tenants: vec![MeterShare::new("lab-f", 60_000, 90_001, 60_000)],
        };
        let state = MeterState {
            allocated_through: T0 + 60,
            reading_at_ns: (T0 + 60) * 1_000_000_000,
            reading_raw: 0,
            carry_mj: 0,
            revision: 0,
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

/// Invariant: every error of the API, a route the collector does not
/// serve and a method a route does not take are answered as RFC 9457
/// problem documents (`application/problem+json`: type, title, the
/// response's own status, detail), naming the query parameter at fault
/// where there is one; the `error` member of earlier answers stays.
#[tokio::test]
async fn errors_are_problem_documents_naming_the_parameter() {
    let api = Api::new(TENANTS, None, false);
    let good = "from=2027-01-01T00:00:00Z&to=2027-01-01T01:00:00Z";
    // (method, path, status, problem type's last part, parameter)
    let cases: [(&str, String, u16, &str, Option<&str>); 14] = [
        (
            "GET",
            format!("/v1/usage?{good}&tz=Mars/Olympus"),
            400,
            "invalid-parameter",
            Some("tz"),
        ),
        (
            "GET",
            format!("/v1/usage?{good}&timezone=UTC"),
            400,
            "invalid-parameter",
            Some("timezone"),
        ),
        (
            "GET",
            "/v1/usage?to=2027-01-01T01:00:00Z".into(),
            400,
            "missing-parameter",
            Some("from"),
        ),
        (
            "GET",
            format!("/v1/tenants/nobody/usage?{good}"),
            404,
            "unknown-tenant",
            Some("tenant"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&tenant=nobody"),
            404,
            "unknown-tenant",
            Some("tenant"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&page_token=garbled!"),
            400,
            "invalid-page-token",
            Some("page_token"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&limit=0"),
            400,
            "invalid-parameter",
            Some("limit"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&step=1h&anchor=2027-01-01T00:00:00Z"),
            400,
            "invalid-parameter",
            Some("step"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&from=2027-01-01T00:00:00Z"),
            400,
            "invalid-parameter",
            Some("from"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&bogus=1"),
            400,
            "invalid-parameter",
            Some("bogus"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&since_revision=99"),
            400,
            "revision-ahead",
            Some("since_revision"),
        ),
        (
            "GET",
            format!("/v2/usage?{good}&format=xml"),
            400,
            "invalid-parameter",
            Some("format"),
        ),
        ("GET", "/no/such/path".into(), 404, "", None),
        ("POST", format!("/v2/usage?{good}"), 405, "", None),
    ];
    for (method, path, status, kind, parameter) in cases {
        let r = api.request(method, &path, &[]).await;
        assert_eq!(r.status, status, "{method} {path}: {}", r.body);
        assert_eq!(
            r.headers.get("content-type").and_then(|v| v.to_str().ok()),
            Some("application/problem+json"),
            "{path}"
        );
        let p = r.json();
        let want_type = if kind.is_empty() {
            "about:blank".to_string()
        } else {
            format!("{}{kind}", capwatch_collector::http::PROBLEM_TYPES)
        };
        assert_eq!(p["type"], want_type.as_str(), "{path}: {p}");
        assert_eq!(p["status"], status, "{path}: {p}");
        assert!(p["title"].as_str().is_some_and(|t| !t.is_empty()), "{p}");
        let detail = p["detail"].as_str().unwrap();
        assert!(!detail.is_empty(), "{p}");
        assert_eq!(p["error"], detail, "{p}");
        assert_eq!(p["parameter"].as_str(), parameter, "{path}: {p}");
    }
    // 405 says what the route takes.
    let r = api.request("DELETE", "/v1/usage", &[]).await;
    assert_eq!(r.status, 405);
    assert_eq!(
        r.headers.get("allow").and_then(|v| v.to_str().ok()),
        Some("GET,HEAD")
    );
}

/// Writes three hours of minutes for lab-a and lab-b from T0 (final
/// through T0 + 2 h), each minute's energy unique.
fn three_hours(api: &Api, t0: i64) -> u64 {
    use capwatch_collector::ledger::{BucketDelta, Commit, Ledger};
    use std::sync::Arc;
    let mut l = Ledger::open(&api.ledger_path).unwrap();
    let mut c = Commit::default();
    let mut total = 0;
    for (i, tenant) in ["lab-a", "lab-b"].iter().enumerate() {
        for m in 0..180 {
            let e = 1_000_000 * (i as u64 + 1) + m as u64;
            total += e;
            c.buckets.insert(
                (Arc::from(*tenant), Arc::from("node-1"), t0 + m * 60),
                BucketDelta {
                    energy_mj: e,
                    gpu_ns: 60_000_000_000,
                    samples: 60,
                    expected_gpu_ns: 60_000_000_000,
                    ..BucketDelta::default()
                },
            );
            *c.tenant_energy.entry(Arc::from(*tenant)).or_default() += e;
        }
    }
    l.commit_at(&c, t0 + 7300, t0 + 7200).unwrap();
    total
}

/// Invariant: `/v2/usage` pages through any number of rows, several
/// tenants at once, in key order, every row once with its identity
/// (`id`) and revision (null while it may change), the energy of all pages adding up
/// to what was committed; JSON and CSV (asked by `Accept`) say the same,
/// CSV with every JSON field as a column.
#[tokio::test]
async fn v2_pages_through_every_row_of_several_tenants_in_json_and_csv() {
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    let api = Api::new(TENANTS, None, false);
    let total = three_hours(&api, T0);
    let base = "/v2/usage?tenant=lab-b&tenant=lab-a&from=2027-01-01T00:00:00Z&to=2027-01-01T03:00:00Z&step=1m&limit=70";
    let (mut path, mut rows, mut pages) = (base.to_string(), Vec::new(), 0);
    loop {
        let r = api.get(&path, None).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let p = r.json();
        pages += 1;
        rows.extend(p["rows"].as_array().unwrap().iter().cloned());
        match p["next_page_token"].as_str() {
            Some(t) => {
                assert_eq!(
                    r.headers
                        .get("capwatch-next-page-token")
                        .and_then(|v| v.to_str().ok()),
                    Some(t)
                );
                path = format!("{base}&page_token={t}");
            }
            None => break,
        }
    }
    assert_eq!((pages, rows.len()), (6, 360));
    let keys: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| {
            (
                r["tenant"].as_str().unwrap().to_string(),
                r["start"].as_str().unwrap().to_string(),
                r["step"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(keys, sorted, "in key order, each once");
    let energy: u64 = rows
        .iter()
        .map(|r| {
            r["energy_millijoules"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(energy, total);
    // A revision for each final row, none for one that may still change.
    for r in &rows {
        let settled = r["partial"] == false && r["facility_energy_pending"] == false;
        assert_eq!(r["revision"].is_u64(), settled, "{r}");
        assert_eq!(r["revision"].is_null(), !settled, "{r}");
    }
    assert!(rows.iter().any(|r| r["revision"].is_u64()));
    assert!(rows.iter().any(|r| r["revision"].is_null()));
    let ids: std::collections::BTreeSet<&str> =
        rows.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids.len(), rows.len(), "every row its own id");

    // The whole period as one row per tenant, in CSV by Accept.
    let totals = "/v2/usage?from=2027-01-01T00:00:00Z&to=2027-01-01T03:00:00Z&step=total&tenant=lab-a&tenant=lab-b";
    let json = api.get(totals, None).await.json();
    let csv = api
        .request("GET", totals, &[("accept", "text/csv".to_string())])
        .await;
    assert_eq!(csv.status, 200, "{}", csv.body);
    assert!(
        csv.headers["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/csv")
    );
    let mut reader = csv::Reader::from_reader(csv.body.as_bytes());
    let header: Vec<String> = reader
        .headers()
        .unwrap()
        .iter()
        .map(str::to_string)
        .collect();
    let records: Vec<csv::StringRecord> = reader.records().map(Result::unwrap).collect();
    let json_rows = json["rows"].as_array().unwrap();
    assert_eq!(records.len(), json_rows.len());
    for (rec, row) in records.iter().zip(json_rows) {
        assert_eq!(&rec[0], "usage");
        for (k, v) in row.as_object().unwrap() {
            let col = header
                .iter()
                .position(|h| h == k)
                .unwrap_or_else(|| panic!("JSON field {k} is not a CSV column: {header:?}"));
            let want = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Null => String::new(),
                v => v.to_string(),
            };
            assert_eq!(rec[col], want, "{k}");
        }
    }
    let sum: u64 = json_rows
        .iter()
        .map(|r| {
            r["energy_millijoules"]
                .as_str()
                .unwrap()
                .parse::<u64>()
                .unwrap()
        })
        .sum();
    assert_eq!(sum, total);
}

/// A tenant token on `/v2/usage`: its own rows by default, 403 for any
/// other tenant named (alone or beside its own), and a page token from an
/// admin's walk of every tenant is no way into the others' rows.
#[tokio::test]
async fn v2_answers_a_tenant_token_its_own_rows_only() {
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    let api = Api::new(TENANTS, Some(&auth()), false);
    three_hours(&api, T0);
    let q = "from=2027-01-01T00:00:00Z&to=2027-01-01T03:00:00Z&step=1h&limit=2";
    let own = api.get(&format!("/v2/usage?{q}"), Some(LAB_A)).await;
    assert_eq!(own.status, 200, "{}", own.body);
    let p = own.json();
    assert_eq!(p["tenants"], serde_json::json!(["lab-a"]));
    assert!(
        p["rows"]
            .as_array()
            .unwrap()
            .iter()
            .all(|r| r["tenant"] == "lab-a")
    );
    let named = api
        .get(&format!("/v2/usage?{q}&tenant=lab-a"), Some(LAB_A))
        .await;
    assert_eq!(named.json()["rows"], p["rows"]);
    for tenants in [
        "tenant=lab-b",
        "tenant=lab-a&tenant=lab-b",
        "tenant=unassigned",
    ] {
        let r = api
            .get(&format!("/v2/usage?{q}&{tenants}"), Some(LAB_A))
            .await;
        assert_eq!(r.status, 403, "{tenants}: {}", r.body);
        assert_eq!(r.json()["status"], 403);
    }
    assert_eq!(api.get(&format!("/v2/usage?{q}"), None).await.status, 401);
    // An admin's walk of every tenant: its next page token, replayed with
    // lab-a's token and the same parameters, is refused by name.
    let admin = api.get(&format!("/v2/usage?{q}"), Some(ADMIN)).await.json();
    assert!(admin["tenants"].as_array().unwrap().len() > 1, "{admin}");
    let token = admin["next_page_token"].as_str().unwrap();
    let r = api
        .get(&format!("/v2/usage?{q}&page_token={token}"), Some(LAB_A))
        .await;
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(r.json()["parameter"], "page_token");
}

/// The OpenAPI document the collector serves is the one checked in.
#[tokio::test]
async fn the_served_openapi_document_is_the_checked_in_one() {
    let api = Api::new(TENANTS, Some(&auth()), true);
    // Open without a token, like the probes.
    let r = api.get("/openapi.json", None).await;
    assert_eq!(r.status, 200);
    let file =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/openapi.json")).unwrap();
    assert_eq!(r.body, file);
    assert_eq!(r.json()["openapi"].as_str().map(|v| &v[..2]), Some("3."));
}

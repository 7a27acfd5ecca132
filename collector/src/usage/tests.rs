use super::render::CSV_HEADER;
use super::*;
use crate::accounting::Basis;
use crate::ledger::{BucketDelta, Reader, Span, Usage};

const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

fn d(energy_mj: u64, gpu_s: u64, busy_s: u64, samples: u64) -> BucketDelta {
    BucketDelta {
        energy_mj,
        gpu_ns: gpu_s * 1_000_000_000,
        busy_gpu_ns: busy_s * 1_000_000_000,
        samples,
        expected_gpu_ns: gpu_s * 1_000_000_000,
        ..BucketDelta::default()
    }
}

#[test]
fn query_errors_name_the_parameter() {
    let ok = Some("2027-01-01T00:00:00Z");
    type Case<'a> = (
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        Option<&'a str>,
        UsageError,
    );
    // (from, to, step, tz, expected error)
    let cases: [Case; 9] = [
        (None, ok, None, None, UsageError::Missing { param: "from" }),
        (
            Some("yesterday"),
            ok,
            None,
            None,
            UsageError::Time {
                param: "from",
                value: "yesterday".into(),
            },
        ),
        (
            Some("2027-01-01T00:30:00Z"),
            Some("2027-01-01T02:00:00Z"),
            Some("1h"),
            None,
            UsageError::Misaligned {
                param: "from",
                step: "1h",
                tz: "UTC".into(),
            },
        ),
        (
            ok,
            Some("2027-01-01T01:30:00Z"),
            Some("1h"),
            Some("Australia/Adelaide"),
            UsageError::Misaligned {
                param: "from",
                step: "1h",
                tz: "Australia/Adelaide".into(),
            },
        ),
        (ok, ok, None, None, UsageError::Empty),
        (
            Some("2027-01-02T00:00:00Z"),
            ok,
            None,
            None,
            UsageError::Empty,
        ),
        (
            ok,
            Some("2027-03-01T00:00:00Z"),
            Some("1m"),
            None,
            UsageError::TooManyRows {
                rows: 84_960,
                max: MAX_ROWS,
            },
        ),
        (
            ok,
            Some("2027-01-02T00:00:00Z"),
            Some("5m"),
            None,
            UsageError::Step("5m".into()),
        ),
        (
            ok,
            Some("2027-01-02T00:00:00Z"),
            None,
            Some("Mars/Olympus_Mons"),
            UsageError::TimeZone("Mars/Olympus_Mons".into()),
        ),
    ];
    for (from, to, step, tz, want) in cases {
        assert_eq!(
            Query::parse(from, to, step, tz, 1),
            Err(want.clone()),
            "{from:?} {to:?} {step:?}"
        );
    }
    let q = Query::parse(ok, Some("2027-01-01T02:00:00Z"), Some("1h"), Some("UTC"), 1).unwrap();
    assert_eq!((q.from, q.to, q.step), (T, T + 7200, Step::Hour));
    assert_eq!(q.bounds, vec![T, T + 3600, T + 7200]);
}

/// Minute buckets as the ledger reads them, all minutes kept.
fn usage_of(minutes: Vec<(String, i64, BucketDelta)>) -> Usage {
    Usage {
        spans: minutes
            .into_iter()
            .map(|(t, start, delta)| {
                (
                    t,
                    Span {
                        node_peak_quarter_mj: None,
                        metered: crate::accounting::Metered::NONE,
                        facility_peak_quarter_mj: None,
                        start,
                        seconds: 60,
                        delta,
                        peak_quarter_mj: None,
                    },
                )
            })
            .collect(),
        ..Usage::default()
    }
}

fn minutes() -> Usage {
    usage_of(crafted())
}

/// A crafted load: tenant a draws 36 kJ/min (600 W) for the first
/// quarter-hour, then 3.6 kJ/min (60 W); tenant b one burst minute.
fn crafted() -> Vec<(String, i64, BucketDelta)> {
    let mut m = Vec::new();
    for i in 0..30 {
        let e = if i < 15 { 36_000_000 } else { 3_600_000 };
        m.push((
            "a".to_string(),
            T + i * 60,
            d(e, 60, if i < 15 { 60 } else { 6 }, 60),
        ));
    }
    m.push(("b".to_string(), T + 20 * 60, d(90_000_000, 60, 60, 1)));
    // a: never over its 1 kW contract; estimated energy in minute 16,
    // with a gap: 30 s of its 60 s not backed by readings.
    m[16].2.estimated_mj = 1_000;
    m[16].2.gpu_ns = 30_000_000_000;
    m
}

#[test]
fn peak_demand_is_the_highest_quarter_hour_average() {
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T01:00:00Z"),
        Some("1h"),
        None,
        2,
    )
    .unwrap();
    let tenants = [
        Terms::new("a", Some(1_000_000), None),
        Terms::new("b", None, None),
    ];
    let r = report(&q, &tenants, &minutes(), &Facility::NONE);
    assert_eq!(r.rows.len(), 2);
    let a = &r.rows[0];
    assert_eq!(a.energy_millijoules, 15 * 36_000_000 + 15 * 3_600_000);
    assert_eq!(a.peak_demand_watts.unwrap(), 600.0);
    assert!((a.average_power_watts - 165.0).abs() < 1e-9);
    assert_eq!(a.capacity_utilization, Some(0.165));
    // b: 90 kJ in one minute is 1500 W for that minute but only 100 W
    // over its quarter-hour, which is what demand is billed on.
    assert_eq!(r.rows[1].peak_demand_watts.unwrap(), 100.0);
    // p95 of the twelve 5-minute averages: a has three at 600 W.
    assert_eq!(a.p95_power_watts, Some(600.0));
    assert_eq!(r.rows[1].p95_power_watts, Some(300.0));
    assert_eq!(r.rows[1].contracted_power_watts, None);
}

#[test]
fn every_minute_row_of_a_quarter_has_the_quarters_demand() {
    // b draws only in minute 00:20 of the quarter 00:15-00:30 (100 W
    // over the quarter). Every 1m row of that quarter overlaps it, with
    // or without a bucket of its own, at the quarter's start, inside
    // it or ending on its last boundary (00:29-00:30); the rows of
    // the quarters before and after have no demand.
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:45:00Z"),
        Some("1m"),
        None,
        1,
    )
    .unwrap();
    let r = report(
        &q,
        &[Terms::new("b", None, None)],
        &minutes(),
        &Facility::NONE,
    );
    let peaks: Vec<(String, f64)> = r
        .rows
        .iter()
        .map(|r| (r.start.clone(), r.peak_demand_watts.unwrap()))
        .collect();
    let want: Vec<(String, f64)> = (0..45)
        .map(|i| {
            let w = if (15..30).contains(&i) { 100.0 } else { 0.0 };
            (rfc3339(T + i * 60), w)
        })
        .collect();
    assert_eq!(peaks, want);
}

#[test]
fn over_contract_is_each_minutes_average_against_the_contract() {
    // Against a 0.5 kW contract (30 kJ a minute), a's first quarter
    // (36 kJ a minute) is over in every minute, by 6 kJ; its second
    // (3.6 kJ) never. A minute bucket's own over-contract fields count
    // for nothing: minutes are evaluated from their energy when read.
    let mut usage = minutes();
    usage.spans[3].1.delta.over_contract_ns = 7;
    usage.spans[20].1.delta.overage_mj = 7;
    let terms = [Terms::new("a", Some(500_000), None)];
    let rows = |usage: &Usage, step, from, to| {
        let q = Query::parse(Some(from), Some(to), Some(step), None, 1).unwrap();
        report(&q, &terms, usage, &Facility::NONE)
            .rows
            .iter()
            .map(|r| {
                (
                    r.seconds_over_contract.unwrap(),
                    (r.overage_kwh.unwrap() * 3.6e9).round() as u64,
                )
            })
            .collect::<Vec<_>>()
    };
    let (h0, h1, h2) = (
        "2027-01-01T00:00:00Z",
        "2027-01-01T01:00:00Z",
        "2027-01-01T02:00:00Z",
    );
    let by_minute = rows(&usage, "1m", h0, h1);
    assert_eq!(by_minute[..15], [(60.0, 6_000_000); 15]);
    assert_eq!(by_minute[15..], [(0.0, 0); 45]);
    assert_eq!(
        rows(&usage, "15m", h0, h1),
        vec![(900.0, 90_000_000), (0.0, 0), (0.0, 0), (0.0, 0)]
    );
    // At the contract exactly is not over it.
    let at = usage_of(vec![("a".to_string(), T, d(30_000_000, 60, 60, 60))]);
    assert_eq!(rows(&at, "1h", h0, h1), vec![(0.0, 0)]);
    // A rollup carries what its minutes were evaluated to when it was
    // rolled up; its sums cannot say it (its average is under).
    usage.minutes_from = T + 3600;
    usage.spans.retain(|(_, s)| s.start >= T + 3600);
    let mut rolled = d(594_000_000, 3600, 1000, 3600);
    rolled.over_contract_ns = 900_000_000_000;
    rolled.overage_mj = 90_000_000;
    usage.spans.insert(
        0,
        (
            "a".to_string(),
            Span {
                node_peak_quarter_mj: None,
                metered: crate::accounting::Metered::NONE,
                facility_peak_quarter_mj: None,
                start: T,
                seconds: 3600,
                delta: rolled,
                peak_quarter_mj: Some(540_000_000),
            },
        ),
    );
    assert_eq!(
        rows(&usage, "1h", h0, h2),
        vec![(900.0, 90_000_000), (0.0, 0)]
    );
}

#[test]
fn golden_json_and_csv() {
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:30:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    let tenants = [Terms::new("a", Some(1_000_000), Some(1.2))];
    // The watermark inside the second quarter: it is partial.
    let usage = Usage {
        finalized_through: T + 16 * 60,
        revision: 7,
        ..minutes()
    };
    let r = report(&q, &tenants, &usage, &Facility::NONE);
    let json = serde_json::to_string_pretty(&r).unwrap();
    // Exact bytes of both formats; `UPDATE_EXPECT=1 cargo test` rewrites
    // the files after a change meant to alter them.
    expect_test::expect_file!["snapshots/report.json"].assert_eq(&json);
    expect_test::expect_file!["snapshots/report.csv"].assert_eq(&csv(&r).unwrap());
}

#[test]
fn exact_amounts_above_2_pow_53_survive_a_double_based_parser() {
    // 2^53 + 1: the first integer a double cannot hold.
    let big = (1u64 << 53) + 1;
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:01:00Z"),
        Some("1m"),
        None,
        1,
    )
    .unwrap();
    let r = report(
        &q,
        &[Terms::new("a", None, None)],
        &usage_of(vec![("a".to_string(), T, d(big, 60, 60, 1))]),
        &Facility::NONE,
    );
    let json = serde_json::to_string(&r).unwrap();
    assert!(
        json.contains("\"energy_millijoules\":\"9007199254740993\""),
        "{json}"
    );
    // What a JavaScript or spreadsheet importer does with a number.
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let amount = &v["rows"][0]["energy_millijoules"];
    assert_eq!(amount.as_f64(), None, "a string, not a number");
    assert_eq!(amount.as_str().unwrap().parse::<u64>().unwrap(), big);
    // And back through the API's own types (the `usage --url` table).
    let back: Report = serde_json::from_str(&json).unwrap();
    assert_eq!(back.rows[0].energy_millijoules, big);
    // Floats stay numbers.
    assert!(v["rows"][0]["energy_kwh"].is_f64());
}

#[test]
fn adjustments_are_summed_per_revision_tenant_node_and_row() {
    use crate::ledger::Adjustment;
    let adj = |revision, tenant: &str, node: &str, minute: i64, e: u64| Adjustment {
        revision,
        booked_at: T + 3 * 3600 + revision as i64,
        tenant: tenant.to_string(),
        node: node.to_string(),
        minute_start: T + minute * 60,
        delta: d(e, 30, 15, 30),
        metered: crate::accounting::MeteredChange::NONE,
    };
    let usage = Usage {
        finalized_through: T + 3600,
        revision: 9,
        adjustments: vec![
            // Revision 4: two minutes of one row on n1, one of the
            // next row, and one on n2.
            adj(4, "a", "n1", 1, 1_000),
            adj(4, "a", "n1", 14, 2_000),
            adj(4, "a", "n1", 15, 4_000),
            adj(4, "a", "n2", 3, 8_000),
            // Revision 9: the first row again; a tenant not asked for;
            // a minute outside the period.
            adj(9, "a", "n1", 2, 16_000),
            adj(9, "b", "n1", 2, 32_000),
            adj(9, "a", "n1", 30, 64_000),
        ],
        ..minutes()
    };
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:30:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    let r = report(
        &q,
        &[Terms::new("a", Some(1_000_000), None)],
        &usage,
        &Facility::NONE,
    );
    let got: Vec<(u64, &str, &str, &str, u64, u64)> = r
        .adjustments
        .iter()
        .map(|a| {
            (
                a.revision,
                a.tenant.as_str(),
                a.node.as_str(),
                a.start.as_str(),
                a.energy_millijoules,
                a.readings,
            )
        })
        .collect();
    assert_eq!(
        got,
        vec![
            (4, "a", "n1", "2027-01-01T00:00:00Z", 3_000, 60),
            (4, "a", "n1", "2027-01-01T00:15:00Z", 4_000, 30),
            (4, "a", "n2", "2027-01-01T00:00:00Z", 8_000, 30),
            (9, "a", "n1", "2027-01-01T00:00:00Z", 16_000, 30),
        ]
    );
    assert_eq!(r.revision, 9);
    let first = &r.adjustments[0];
    assert_eq!(first.booked_at, "2027-01-01T03:00:04Z");
    assert_eq!(first.end, "2027-01-01T00:15:00Z");
    assert_eq!(
        (first.gpu_hours, first.busy_gpu_hours),
        (60.0 / 3600.0, 30.0 / 3600.0)
    );
    assert_eq!(first.expected_gpu_hours, 60.0 / 3600.0);
    // The rows are what the minutes say, adjustments or not.
    assert_eq!(
        r.rows,
        report(
            &q,
            &[Terms::new("a", Some(1_000_000), None)],
            &Usage {
                adjustments: Vec::new(),
                ..usage.clone()
            },
            &Facility::NONE
        )
        .rows
    );
    let csv = csv(&r).unwrap();
    let lines: Vec<&str> = csv.lines().filter(|l| l.contains(",adjustment,")).collect();
    assert_eq!(
        lines,
        vec![
            "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,3000,0.0000008333333333333333,0.016666666666666666,0.008333333333333333,0.0033333333333333335,,,,,0,0,,false,,60,false,adjustment,n1,4,2027-01-01T03:00:04Z,0.016666666666666666,,0,0,,false,,,,,0",
            "a,2027-01-01T00:15:00Z,2027-01-01T00:30:00Z,4000,0.000001111111111111111,0.008333333333333333,0.004166666666666667,0.0044444444444444444,,,,,0,0,,false,,30,false,adjustment,n1,4,2027-01-01T03:00:04Z,0.008333333333333333,,0,0,,false,,,,,0",
            "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,8000,0.000002222222222222222,0.008333333333333333,0.004166666666666667,0.008888888888888889,,,,,0,0,,false,,30,false,adjustment,n2,4,2027-01-01T03:00:04Z,0.008333333333333333,,0,0,,false,,,,,0",
            "a,2027-01-01T00:00:00Z,2027-01-01T00:15:00Z,16000,0.000004444444444444444,0.008333333333333333,0.004166666666666667,0.017777777777777778,,,,,0,0,,false,,30,false,adjustment,n1,9,2027-01-01T03:00:09Z,0.008333333333333333,,0,0,,false,,,,,0",
        ]
    );
    // Every line has the header's columns.
    let columns = CSV_HEADER.split(',').count();
    assert!(
        csv.lines().all(|l| l.split(',').count() == columns),
        "{csv}"
    );
    let json: serde_json::Value = serde_json::to_value(&r).unwrap();
    assert_eq!(json["adjustments"][0]["energy_millijoules"], "3000");
}

#[test]
fn rows_sum_to_the_period_whatever_the_step() {
    // Conservation across steps: the 1m, 15m and 1h rows of the same
    // hour add up to the same energy.
    let tenants = [Terms::new("a", None, None)];
    let total = |step| {
        let q = Query::parse(
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T01:00:00Z"),
            Some(step),
            None,
            1,
        )
        .unwrap();
        report(&q, &tenants, &minutes(), &Facility::NONE)
            .rows
            .iter()
            .map(|r| r.energy_millijoules)
            .sum::<u64>()
    };
    assert_eq!(total("1m"), 594_000_000);
    assert_eq!(total("15m"), 594_000_000);
    assert_eq!(total("1h"), 594_000_000);
}

/// Row (start, end) pairs as formatted in the report.
fn spans_of(r: &Report) -> Vec<(String, String)> {
    r.rows
        .iter()
        .map(|r| (r.start.clone(), r.end.clone()))
        .collect()
}

#[test]
fn days_and_months_follow_the_time_zone() {
    // Europe/Paris moves to summer time on 2027-03-28: that day is 23
    // hours long, and rows carry the local offset.
    let days = Query::parse(
        Some("2027-03-27T00:00:00+01:00"),
        Some("2027-03-29T22:00:00Z"),
        Some("1d"),
        Some("Europe/Paris"),
        1,
    )
    .unwrap();
    let lengths: Vec<i64> = days.bounds.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(lengths, vec![86_400, 82_800, 86_400]);
    let r = report(
        &days,
        &[Terms::new("a", None, None)],
        &Usage::default(),
        &Facility::NONE,
    );
    assert_eq!(
        spans_of(&r)[1],
        (
            "2027-03-28T00:00:00+01:00".to_string(),
            "2027-03-29T00:00:00+02:00".to_string()
        )
    );
    assert_eq!(r.time_zone, "Europe/Paris");

    let months = Query::parse(
        Some("2027-01-01T00:00:00+01:00"),
        Some("2027-04-01T00:00:00+02:00"),
        Some("month"),
        Some("Europe/Paris"),
        1,
    )
    .unwrap();
    let lengths: Vec<i64> = months.bounds.windows(2).map(|w| w[1] - w[0]).collect();
    assert_eq!(lengths, vec![31 * 86_400, 28 * 86_400, 31 * 86_400 - 3600]);

    // Midnight UTC is not midnight in Paris; the 2nd is not a month
    // start; a day does not divide into months.
    let bad: [(&str, &str, &str, &str); 4] = [
        (
            "2027-01-01T00:00:00Z",
            "2027-01-03T00:00:00+01:00",
            "1d",
            "from",
        ),
        (
            "2027-01-01T00:00:00+01:00",
            "2027-02-02T00:00:00+01:00",
            "month",
            "to",
        ),
        (
            "2027-01-02T00:00:00+01:00",
            "2027-02-01T00:00:00+01:00",
            "month",
            "from",
        ),
        (
            "2027-01-01T00:00:00+01:00",
            "2027-01-02T12:00:00+01:00",
            "1d",
            "to",
        ),
    ];
    for (from, to, step, param) in bad {
        let err = Query::parse(Some(from), Some(to), Some(step), Some("Europe/Paris"), 1);
        assert!(
            matches!(&err, Err(UsageError::Misaligned { param: p, .. }) if *p == param),
            "{from} {to} {step}: {err:?}"
        );
    }
    // Kathmandu is UTC+05:45: its hours start at a quarter past in UTC.
    let q = Query::parse(
        Some("2027-01-01T00:15:00Z"),
        Some("2027-01-01T02:15:00Z"),
        Some("1h"),
        Some("Asia/Kathmandu"),
        1,
    )
    .unwrap();
    assert_eq!(q.bounds.len(), 3);
    // Too many months for many tenants.
    assert_eq!(
        Query::parse(
            Some("2000-01-01T00:00:00Z"),
            Some("2100-01-01T00:00:00Z"),
            Some("month"),
            None,
            10
        ),
        Err(UsageError::TooManyRows {
            rows: 12_000,
            max: MAX_ROWS
        })
    );
}

#[test]
fn local_days_conserve_energy() {
    // The crafted load sits in the first hour of 2027 UTC, i.e. in
    // 2026-12-31 in New York: daily rows there hold all of it.
    let q = Query::parse(
        Some("2026-12-31T00:00:00-05:00"),
        Some("2027-01-02T00:00:00-05:00"),
        Some("1d"),
        Some("America/New_York"),
        1,
    )
    .unwrap();
    let r = report(
        &q,
        &[Terms::new("a", None, None)],
        &minutes(),
        &Facility::NONE,
    );
    let energy: Vec<u64> = r.rows.iter().map(|r| r.energy_millijoules).collect();
    assert_eq!(energy, vec![594_000_000, 0]);
    assert_eq!(r.rows[0].peak_demand_watts.unwrap(), 600.0);
    assert_eq!(r.rows[0].start, "2026-12-31T00:00:00-05:00");
}

#[test]
fn rows_before_the_kept_minutes_come_from_rollups() {
    // Minutes are kept from T + 1 h on; before, one hourly rollup of
    // tenant a with a stored peak quarter of 900 kJ (1000 W).
    let mut usage = usage_of(
        crafted()
            .into_iter()
            .map(|(t, m, d)| (t, m + 3600, d))
            .collect(),
    );
    usage.minutes_from = T + 3600;
    usage.spans.insert(
        0,
        (
            "a".to_string(),
            Span {
                node_peak_quarter_mj: None,
                metered: crate::accounting::Metered::NONE,
                facility_peak_quarter_mj: None,
                start: T,
                seconds: 3600,
                delta: d(1_800_000_000, 3600, 1800, 3600),
                peak_quarter_mj: Some(900_000_000),
            },
        ),
    );
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T02:00:00Z"),
        Some("1h"),
        None,
        1,
    )
    .unwrap();
    q.check_detail(&usage).unwrap();
    let r = report(&q, &[Terms::new("a", None, None)], &usage, &Facility::NONE);
    let a: Vec<(u64, f64, Option<f64>)> = r
        .rows
        .iter()
        .map(|r| {
            (
                r.energy_millijoules,
                r.peak_demand_watts.unwrap(),
                r.p95_power_watts,
            )
        })
        .collect();
    assert_eq!(
        a,
        vec![
            (1_800_000_000, 1000.0, None),
            (594_000_000, 600.0, Some(600.0))
        ]
    );
    // A day row over both: sums, and the higher of the two peaks.
    let day = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-02T00:00:00Z"),
        Some("1d"),
        None,
        1,
    )
    .unwrap();
    let r = report(
        &day,
        &[Terms::new("a", None, None)],
        &usage,
        &Facility::NONE,
    );
    assert_eq!(r.rows[0].energy_millijoules, 2_394_000_000);
    assert_eq!(r.rows[0].peak_demand_watts.unwrap(), 1000.0);
    assert_eq!(r.rows[0].p95_power_watts, None);
    // Quarter-hour rows cannot be cut from an hourly rollup.
    let quarters = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T02:00:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    assert_eq!(
        quarters.check_detail(&usage),
        Err(UsageError::Compacted {
            before: "2027-01-01T01:00:00Z".into(),
            granularity: "hourly",
            unit: "hours"
        })
    );
    assert!(
        quarters
            .check_detail(&Usage {
                minutes_from: T,
                ..Usage::default()
            })
            .is_ok()
    );
    // Nor Paris days from UTC daily rollups.
    let paris = Query::parse(
        Some("2027-01-01T00:00:00+01:00"),
        Some("2027-01-02T00:00:00+01:00"),
        Some("1d"),
        Some("Europe/Paris"),
        1,
    )
    .unwrap();
    assert!(matches!(
        paris.check_detail(&Usage {
            minutes_from: T + 86_400 * 2,
            hours_from: T + 86_400 * 2,
            ..Usage::default()
        }),
        Err(UsageError::Compacted {
            granularity: "daily",
            ..
        })
    ));
    assert!(
        paris
            .check_detail(&Usage {
                minutes_from: T + 86_400 * 2,
                ..Usage::default()
            })
            .is_ok()
    );
    // Before the daily rollups kept, nothing is: refused, not zero.
    assert_eq!(
        paris.check_detail(&Usage {
            days_from: T + 86_400 * 2,
            ..Usage::default()
        }),
        Err(UsageError::Expired {
            before: "2027-01-03T00:00:00Z".into()
        })
    );
}

/// A `since_revision` past any revision a ledger can hold (above
/// 2^63 - 1) is a cursor from another ledger, refused by name as a
/// request error, not a failure to read the ledger.
#[test]
fn a_revision_beyond_any_ledger_is_ahead_of_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    drop(crate::ledger::Ledger::create(&path).unwrap());
    let reader = Reader::open(&path).unwrap();
    for since in ["9223372036854775808", "18446744073709551615"] {
        let got = run(
            &reader,
            &crate::tenants::Tenants::empty(),
            &TenantHistory::new(std::sync::Arc::new(crate::tenants::Tenants::empty())),
            &[],
            None,
            Some("2027-01-01T00:00:00Z"),
            Some("2027-01-01T01:00:00Z"),
            Some("1h"),
            None,
            Some(since),
        );
        assert!(
            matches!(
                got,
                Err(QueryError::Usage(UsageError::RevisionAhead {
                    revision: 0,
                    ..
                }))
            ),
            "{since}: {got:?}"
        );
    }
}

/// Node ids are the agent's to choose and may hold commas and quotes:
/// an adjustment's line must still have the header's columns, with
/// the node read back as sent (RFC 4180 quoting).
/// Every exact amount of a report, in its rows and its adjustments, the
/// signed restatement of facility energy too, is a decimal string in JSON.
#[test]
fn every_millijoule_amount_of_rows_and_adjustments_is_a_decimal_string() {
    use crate::ledger::Adjustment;
    let usage = Usage {
        finalized_through: T + 3600,
        revision: 2,
        adjustments: vec![Adjustment {
            revision: 2,
            booked_at: T + 7200,
            tenant: "a".to_string(),
            node: "n".to_string(),
            minute_start: T,
            delta: d(1_000, 60, 60, 60),
            metered: crate::accounting::MeteredChange::NONE,
        }],
        ..minutes()
    };
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:15:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    let mut r = report(
        &q,
        &[Terms::new("a", None, Some(1.2))],
        &usage,
        &Facility::NONE,
    );
    assert_eq!(r.adjustments.len(), 1);
    r.adjustments[0].facility_energy_restated_millijoules = Some(-(1i64 << 60));
    let v = serde_json::to_value(&r).unwrap();
    let mut seen = 0;
    for record in v["rows"]
        .as_array()
        .unwrap()
        .iter()
        .chain(v["adjustments"].as_array().unwrap())
    {
        for (name, value) in record.as_object().unwrap() {
            if name.ends_with("_millijoules") && !value.is_null() {
                seen += 1;
                assert!(value.is_string(), "{name}: {value}");
            }
        }
    }
    assert!(seen >= 6, "{seen}");
    let restated = &v["adjustments"][0]["facility_energy_restated_millijoules"];
    assert_eq!(restated, &serde_json::json!((-(1i64 << 60)).to_string()));
    // And back through the API's own types.
    let back: Report = serde_json::from_value(v).unwrap();
    assert_eq!(
        back.adjustments[0].facility_energy_restated_millijoules,
        Some(-(1i64 << 60))
    );
}

#[test]
fn an_adjustment_from_a_node_with_a_comma_stays_in_its_columns() {
    use crate::ledger::Adjustment;
    let node = "evil,1,\"99\"";
    let usage = Usage {
        finalized_through: T + 3600,
        revision: 2,
        adjustments: vec![Adjustment {
            revision: 2,
            booked_at: T + 7200,
            tenant: "a".to_string(),
            node: node.to_string(),
            minute_start: T,
            delta: d(1_000, 60, 60, 60),
            metered: crate::accounting::MeteredChange::NONE,
        }],
        ..minutes()
    };
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:15:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    let r = report(&q, &[Terms::new("a", None, None)], &usage, &Facility::NONE);
    // Fields of one CSV line, quotes undone.
    let fields = |line: &str| -> Vec<String> {
        let (mut out, mut cur, mut quoted) = (Vec::new(), String::new(), false);
        let mut chars = line.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, quoted) {
                ('"', true) if chars.peek() == Some(&'"') => {
                    cur.push('"');
                    chars.next();
                }
                ('"', _) => quoted = !quoted,
                (',', false) => out.push(std::mem::take(&mut cur)),
                _ => cur.push(c),
            }
        }
        out.push(cur);
        out
    };
    let header = fields(CSV_HEADER);
    let text = csv(&r).unwrap();
    let line = text
        .lines()
        .find(|l| l.contains(",adjustment,"))
        .expect("an adjustment line");
    let got = fields(line);
    assert_eq!(got.len(), header.len(), "{line}");
    let column = |name: &str| header.iter().position(|h| h == name).unwrap();
    assert_eq!(got[column("node")], node);
    assert_eq!(got[column("revision")], "2");
    assert_eq!(got[column("energy_millijoules")], "1000");
}

/// A billing job told to ask "since a later revision" would skip the
/// adjustments booked before it: the error must point to what is safe
/// (a shorter period or one tenant), never to moving the cursor.
#[test]
fn too_many_adjustments_does_not_advise_skipping_revisions() {
    let text = UsageError::TooManyAdjustments {
        count: 10_001,
        since: 4,
        max: MAX_ROWS,
    }
    .to_string();
    assert!(!text.contains("later revision"), "{text}");
    assert!(text.contains("shorter period"), "{text}");
}

/// The tenants are listed before the snapshot is read: a tenant whose
/// first energy is committed in between (a tenant file reloaded
/// meanwhile, a late spool for its GPUs) has adjustments in the
/// snapshot, and the answer's revision covers them. They must be in
/// the answer, or a job asking since that revision never sees them.
#[test]
fn adjustments_of_a_tenant_not_yet_listed_are_not_skipped() {
    use crate::ledger::{Commit, Ledger};
    use std::sync::Arc;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let mut l = Ledger::create(&path).unwrap();
    l.commit_at(&Commit::default(), T + 7200, T + 3600).unwrap();
    // A delta for a final minute of tenant `x`, which the ledger's
    // list of tenants does not hold yet (its total is not written).
    let mut late = Commit::default();
    late.buckets
        .insert((Arc::from("x"), Arc::from("n1"), T), d(5_000, 60, 60, 60));
    assert_eq!(l.commit_at(&late, T + 7300, T + 3600).unwrap().revision, 2);
    drop(l);
    let reader = Reader::open(&path).unwrap();
    let r = run(
        &reader,
        &crate::tenants::Tenants::empty(),
        &TenantHistory::new(std::sync::Arc::new(crate::tenants::Tenants::empty())),
        &[],
        None,
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T01:00:00Z"),
        Some("1h"),
        None,
        Some("1"),
    )
    .unwrap();
    assert_eq!(r.revision, 2);
    let got: Vec<(&str, u64, u64)> = r
        .adjustments
        .iter()
        .map(|a| (a.tenant.as_str(), a.revision, a.energy_millijoules))
        .collect();
    assert_eq!(got, vec![("x", 2, 5_000)]);
    assert!(r.rows.iter().any(|row| row.tenant == "x"), "{:?}", r.rows);
}

/// A tenant whose GPUs draw 300 W while its share of the node draws 600 W
/// (the first half of each minute covered by node readings), for a
/// quarter-hour.
fn with_node_energy() -> Usage {
    usage_of(
        (0..15)
            .map(|i| {
                let mut delta = d(18_000_000, 60, 60, 60);
                delta.node_energy_mj = 36_000_000;
                delta.node_ns = 30_000_000_000;
                (String::from("a"), T + i * 60, delta)
            })
            .collect(),
    )
}

#[test]
fn power_contract_and_overage_follow_the_basis_and_energy_stays_gpu_energy() {
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:15:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    let usage = with_node_energy();
    // (basis, average W, overage per minute against 0.5 kW (30 kJ), PUE)
    let cases = [
        (Basis::Gpu, 300.0, 0, None),
        (Basis::Node, 600.0, 6_000_000, None),
        // 36 kJ × 1.25 = 45 kJ a minute.
        (Basis::Facility, 750.0, 15_000_000, Some(1.25)),
    ];
    for (basis, watts, overage_mj, pue) in cases {
        let terms = [Terms::new("a", Some(500_000), pue).on(basis)];
        let r = report(&q, &terms, &usage, &Facility::NONE);
        let row = &r.rows[0];
        assert_eq!(row.basis, basis.label());
        assert_eq!(row.energy_millijoules, 15 * 18_000_000, "{basis:?}");
        assert_eq!(row.node_energy_millijoules, 15 * 36_000_000);
        assert_eq!(row.node_coverage, Some(0.5));
        assert_eq!(row.average_power_watts, watts, "{basis:?}");
        assert_eq!(row.peak_demand_watts.unwrap(), watts, "{basis:?}");
        assert_eq!(row.p95_power_watts, Some(watts), "{basis:?}");
        assert_eq!(row.capacity_utilization, Some(watts / 500.0), "{basis:?}");
        let over = if overage_mj > 0 { 900.0 } else { 0.0 };
        assert_eq!(row.seconds_over_contract.unwrap(), over, "{basis:?}");
        assert_eq!(
            (row.overage_kwh.unwrap() * 3.6e9).round() as u64,
            15 * overage_mj,
            "{basis:?}"
        );
        assert_eq!(
            row.facility_energy_kwh.map(|k| (k * 3.6e9).round() as u64),
            pue.map(|_| 15 * 45_000_000)
        );
        assert_eq!(row.facility_energy_estimated, pue.is_some());
    }
    // Without node readings there is no facility energy to estimate.
    let gpu_only = usage_of(vec![(String::from("a"), T, d(18_000_000, 60, 60, 60))]);
    let terms = [Terms::new("a", Some(500_000), Some(1.25)).on(Basis::Facility)];
    let row = &report(&q, &terms, &gpu_only, &Facility::NONE).rows[0];
    assert_eq!(
        (row.node_coverage, row.facility_energy_kwh),
        (Some(0.0), None)
    );
}

#[test]
fn a_rollups_peak_and_over_contract_follow_the_basis() {
    // One hour kept only as a rollup: its node peak is what a node basis
    // sees.
    let mut delta = d(3_600_000_000, 3600, 3600, 3600);
    delta.node_energy_mj = 7_200_000_000;
    delta.over_contract_ns = 5;
    let usage = Usage {
        spans: vec![(
            "a".to_string(),
            Span {
                start: T,
                seconds: 3600,
                delta,
                peak_quarter_mj: Some(900_000_000),
                node_peak_quarter_mj: Some(1_800_000_000),
                metered: crate::accounting::Metered::NONE,
                facility_peak_quarter_mj: None,
            },
        )],
        minutes_from: T + 3600,
        ..Usage::default()
    };
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T01:00:00Z"),
        Some("1h"),
        None,
        1,
    )
    .unwrap();
    for (basis, peak, average) in [(Basis::Gpu, 1000.0, 1000.0), (Basis::Node, 2000.0, 2000.0)] {
        let terms = [Terms::new("a", Some(500_000), None).on(basis)];
        let row = &report(&q, &terms, &usage, &Facility::NONE).rows[0];
        assert_eq!(row.peak_demand_watts.unwrap(), peak, "{basis:?}");
        assert_eq!(row.average_power_watts, average, "{basis:?}");
        // What the rollup stored when it was rolled up.
        assert_eq!(row.seconds_over_contract.unwrap(), 5e-9);
    }
}

/// The configured meters of `toml` (`[[meter]]` entries).
fn meters_of(toml: &str) -> Vec<crate::meters::MeterSpec> {
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<crate::meters::MeterConfig>,
    }
    crate::meters::check(&toml::from_str::<File>(toml).unwrap().meter).unwrap()
}

/// Tenant a's first `minutes` minutes from T on node m1: 36 kJ of node
/// energy each.
fn node_minutes_on_m1(minutes: i64) -> Vec<crate::ledger::NodeMinute> {
    (0..minutes)
        .map(|i| crate::ledger::NodeMinute {
            tenant: "a".into(),
            node: "m1".into(),
            minute: T + i * 60,
            measured_mj: 36_000_000,
            node_energy_mj: 36_000_000,
        })
        .collect()
}

/// Meter row-a, over the nodes m*.
fn row_a_over_m() -> Vec<crate::meters::MeterSpec> {
    meters_of(
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m*\"]\naddress = \"127.0.0.1:502\"\n",
    )
}

/// Row-a's allocation of the first 5 minutes from T: 54 kJ each to a,
/// replacing its 36 kJ of node energy.
fn row_a_allocates_the_first_five_minutes() -> Vec<(String, crate::ledger::MeterMinute)> {
    (0..5)
        .map(|i| {
            (
                "row-a".to_string(),
                crate::ledger::MeterMinute {
                    minute: T + i * 60,
                    metered_mj: 54_000_000,
                    measured_mj: 36_000_000,
                    unallocated_mj: 0,
                    tenants: vec![crate::ledger::MeterShare::new(
                        "a", 36_000_000, 54_000_000, 36_000_000,
                    )],
                },
            )
        })
        .collect()
}

#[test]
fn peak_and_p95_of_a_facility_tenant_follow_its_allocated_minutes() {
    let q = Query::parse(
        Some("2027-01-01T00:00:00Z"),
        Some("2027-01-01T00:15:00Z"),
        Some("15m"),
        None,
        1,
    )
    .unwrap();
    // 36 kJ of node energy a minute on node "m1", under meter "row-a".
    let usage = with_node_energy();
    let nodes = node_minutes_on_m1(15);
    let meters = row_a_over_m();
    // The meter allocated the first 5 minutes, 54 kJ each (1.5 × node);
    // the other 10 are the estimate, 36 kJ × 1.25 = 45 kJ.
    let allocated = row_a_allocates_the_first_five_minutes();
    let allocation = crate::ledger::UsageAllocation {
        minutes: allocated,
        nodes,
        started: vec![("row-a".into(), T)],
    };
    let facility = Facility::of(&meters, &allocation);
    let terms = [Terms::new("a", Some(800_000), Some(1.25)).on(Basis::Facility)];
    let row = &report(&q, &terms, &usage, &facility).rows[0];
    let mj = 5 * 54_000_000 + 10 * 45_000_000;
    assert_eq!(row.facility_energy_millijoules, Some(mj));
    assert!(row.facility_energy_estimated && row.facility_energy_pending);
    assert_eq!(row.average_power_watts, mj as f64 / 1000.0 / 900.0);
    assert_eq!(row.peak_demand_watts.unwrap(), mj as f64 / 1000.0 / 900.0);
    // The 5-minute windows: 900 W (allocated), 750 W twice; nearest rank 95.
    assert_eq!(row.p95_power_watts, Some(900.0));
    // 54 kJ over 48 kJ (800 W × 60 s) in the 5 allocated minutes only.
    assert_eq!(row.seconds_over_contract.unwrap(), 300.0);
    assert_eq!(
        (row.overage_kwh.unwrap() * 3.6e9).round() as u64,
        5 * 6_000_000
    );
    // A meter no longer configured: the minutes it allocated stand; the
    // nodes are under no meter, so the others are the estimate, no longer
    // pending.
    let gone = Facility::of(&[], &allocation);
    let row = &report(&q, &terms, &usage, &gone).rows[0];
    assert_eq!(row.facility_energy_millijoules, Some(mj));
    assert!(row.facility_energy_estimated && !row.facility_energy_pending);
}

/// The allocation read as of an earlier revision (a walk's) takes back
/// what the meters booked after it: a minute allocated since is the
/// estimate again, a minute split again since has its part of then, and
/// both were still to change then: pending. At the snapshot's own
/// revision nothing changes.
#[test]
fn the_facility_as_of_a_revision_takes_back_what_was_booked_after_it() {
    use crate::accounting::MeteredChange;
    use crate::ledger::Adjustment;
    let nodes = node_minutes_on_m1(5);
    let meters = row_a_over_m();
    let allocated = row_a_allocates_the_first_five_minutes();
    let booked = |minute: i64, allocated_mj: i64, node_mj: i64| Adjustment {
        revision: 9,
        booked_at: T + 3_600,
        tenant: "a".into(),
        node: String::new(),
        minute_start: minute,
        delta: BucketDelta::default(),
        metered: MeteredChange {
            allocated_mj,
            node_mj,
        },
    };
    // Revision 9 allocated the last minute and split the one before again
    // (its part grew by 1 J).
    let adjustments = [
        booked(T + 180, 1_000, 0),
        booked(T + 240, 54_000_000, 36_000_000),
    ];
    let allocation = crate::ledger::UsageAllocation {
        minutes: allocated,
        nodes,
        started: vec![("row-a".into(), T)],
    };
    let now = Facility::of(&meters, &allocation);
    let mut at_9 = now.clone();
    at_9.as_of(&adjustments, 9);
    let mut at_8 = now.clone();
    at_8.as_of(&adjustments, 8);
    let (now, at_9, at_8) = (now.of_tenant("a"), at_9.of_tenant("a"), at_8.of_tenant("a"));
    for minute in (0..5).map(|i| T + i * 60) {
        assert_eq!(at_9.at(minute), now.at(minute));
    }
    assert_eq!(at_8.at(T), now.at(T));
    assert_eq!(
        at_8.at(T + 180).metered,
        crate::accounting::Metered {
            allocated_mj: 54_000_000 - 1_000,
            node_mj: 36_000_000,
        }
    );
    assert!(at_8.at(T + 180).pending);
    assert_eq!(
        at_8.at(T + 240),
        FacilityMinute {
            metered: crate::accounting::Metered::NONE,
            pending: true,
        }
    );
}

/// The boundaries of `step` rows over `[from, to)` in `tz` from `anchor`,
/// as RFC 3339 in that zone, or the error's parameter.
fn anchored(
    from: &str,
    to: &str,
    step: &str,
    tz: &str,
    anchor: Option<&str>,
) -> Result<Vec<String>, Option<String>> {
    let t = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    let zone = Zone::parse(Some(tz)).unwrap();
    Query::build(
        t(from),
        t(to),
        Step::parse(step).unwrap(),
        zone.clone(),
        anchor.map(t),
        1000,
    )
    .map(|q| q.bounds.iter().map(|b| zone.format(*b)).collect())
    .map_err(|e| e.param().map(str::to_string))
}

/// Billing periods from the 15th in Berlin: each starts at local midnight
/// on the 15th, so the one holding the spring change is an hour short and
/// the autumn one an hour long; energy rows and the hours between their
/// boundaries are exact.
#[test]
fn months_anchored_on_the_15th_follow_the_zone_across_daylight_saving() {
    let b = anchored(
        "2026-01-14T23:00:00Z",
        "2027-01-14T23:00:00Z",
        "month",
        "Europe/Berlin",
        Some("2026-01-15T00:00:00+01:00"),
    )
    .unwrap();
    assert_eq!(b.len(), 13);
    assert_eq!(b[0], "2026-01-15T00:00:00+01:00");
    assert_eq!(b[2], "2026-03-15T00:00:00+01:00");
    assert_eq!(b[3], "2026-04-15T00:00:00+02:00");
    assert_eq!(b[9], "2026-10-15T00:00:00+02:00");
    assert_eq!(b[10], "2026-11-15T00:00:00+01:00");
    let secs = |s: &str| s.parse::<jiff::Timestamp>().unwrap().as_second();
    // 15 March to 15 April: 31 days less the hour skipped on 29 March.
    assert_eq!(secs(&b[3]) - secs(&b[2]), 31 * 86_400 - 3600);
    // 15 October to 15 November: 31 days and the hour repeated on 25 October.
    assert_eq!(secs(&b[10]) - secs(&b[9]), 31 * 86_400 + 3600);
    // The anchor is any of the rows' starts: a later one gives the same rows.
    let later = anchored(
        "2026-01-14T23:00:00Z",
        "2027-01-14T23:00:00Z",
        "month",
        "Europe/Berlin",
        Some("2030-06-15T00:00:00+02:00"),
    );
    assert_eq!(later.as_ref(), Ok(&b));
    // A period that does not start on one is refused by name.
    assert_eq!(
        anchored(
            "2026-01-01T00:00:00Z",
            "2026-02-15T00:00:00Z",
            "month",
            "UTC",
            Some("2026-01-15T00:00:00Z")
        ),
        Err(Some("from".into()))
    );
}

/// A month anchored on the 31st starts on the last day of shorter months
/// and comes back to the 31st after them.
#[test]
fn months_anchored_on_the_31st_start_on_the_last_day_of_shorter_ones() {
    let b = anchored(
        "2027-01-31T00:00:00Z",
        "2027-05-31T00:00:00Z",
        "month",
        "UTC",
        Some("2027-01-31T00:00:00Z"),
    )
    .unwrap();
    assert_eq!(
        b,
        [
            "2027-01-31T00:00:00Z",
            "2027-02-28T00:00:00Z",
            "2027-03-31T00:00:00Z",
            "2027-04-30T00:00:00Z",
            "2027-05-31T00:00:00Z"
        ]
    );
}

/// Days anchored at 06:00 local time stay at 06:00 across a change (the
/// day holding it is 23 hours); without an anchor, months start at
/// midnight on the 1st as before; an anchor needs a calendar step; a total
/// is one row.
#[test]
fn anchored_days_totals_and_misplaced_anchors() {
    let b = anchored(
        "2027-03-27T05:00:00Z",
        "2027-03-30T04:00:00Z",
        "1d",
        "Europe/Berlin",
        Some("2020-01-01T06:00:00+01:00"),
    )
    .unwrap();
    assert_eq!(
        b,
        [
            "2027-03-27T06:00:00+01:00",
            "2027-03-28T06:00:00+02:00",
            "2027-03-29T06:00:00+02:00",
            "2027-03-30T06:00:00+02:00"
        ]
    );
    let months = anchored(
        "2026-12-31T23:00:00Z",
        "2027-03-31T22:00:00Z",
        "month",
        "Europe/Berlin",
        None,
    )
    .unwrap();
    assert_eq!(months[3], "2027-04-01T00:00:00+02:00");
    assert_eq!(
        anchored(
            "2027-01-01T00:00:00Z",
            "2027-01-02T00:00:00Z",
            "1h",
            "UTC",
            Some("2027-01-01T00:00:00Z")
        ),
        Err(Some("step".into()))
    );
    assert_eq!(
        anchored(
            "2027-01-01T00:07:00Z",
            "2027-01-09T13:00:00Z",
            "total",
            "Asia/Kolkata",
            None
        ),
        Ok(vec![
            "2027-01-01T05:37:00+05:30".to_string(),
            "2027-01-09T18:30:00+05:30".to_string()
        ])
    );
    assert_eq!(
        anchored(
            "2027-01-01T00:07:30Z",
            "2027-01-09T13:00:00Z",
            "total",
            "UTC",
            None
        ),
        Err(Some("from".into()))
    );
}

/// An anchor at the second occurrence of a repeated hour is its own rows'
/// first start (a day later, the same wall-clock time is unambiguous); a
/// wall-clock time a change skips moves on by the change.
#[test]
fn an_anchor_in_a_repeated_or_skipped_hour_starts_its_rows() {
    // 02:30 happens twice in Berlin on 2026-10-25: +02:00, then +01:00.
    let second = "2026-10-25T02:30:00+01:00";
    assert_eq!(
        anchored(
            second,
            "2026-10-27T02:30:00+01:00",
            "1d",
            "Europe/Berlin",
            Some(second)
        ),
        Ok(vec![
            "2026-10-25T02:30:00+01:00".to_string(),
            "2026-10-26T02:30:00+01:00".to_string(),
            "2026-10-27T02:30:00+01:00".to_string(),
        ])
    );
    // 02:30 does not happen on 2027-03-28: that day's row starts at 03:30.
    let anchor = "2027-03-27T02:30:00+01:00";
    assert_eq!(
        anchored(
            anchor,
            "2027-03-29T02:30:00+02:00",
            "1d",
            "Europe/Berlin",
            Some(anchor)
        ),
        Ok(vec![
            "2027-03-27T02:30:00+01:00".to_string(),
            "2027-03-28T03:30:00+02:00".to_string(),
            "2027-03-29T02:30:00+02:00".to_string(),
        ])
    );
}

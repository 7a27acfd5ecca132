//! Usage in pages (the `/v2/usage` API): any number of rows, for one,
//! several or every tenant, walked in key order (tenant, start) a page at
//! a time with an opaque page token.
//!
//! Each row carries its identity (tenant, start, step) and a revision: for
//! a row that is final, the revision of the last adjustment booked to it
//! (0 for none), so a billing job that kept a row sees it was restated
//! when the revision differs; for a row that may still change (partial, or
//! facility energy still pending), the ledger's revision when it was read.
//!
//! Every page of one walk lists the adjustments booked after
//! `since_revision` and up to the revision of the walk's first page (kept
//! in the token): asking `since_revision` that revision next time gets the
//! adjustments booked since, each exactly once.

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::cursor::{Cursor, fingerprint};
use super::periods::parse_time;
use super::{
    AdjustmentRow, QueryError, Row, Step, Terms, UsageError, Zone, facility_of, known_terms,
    parse_revision, report,
};
use crate::accounting::Contract;
use crate::ledger::{Adjustment, LedgerReader};
use crate::meters::MeterSpec;
use crate::tenants::{TenantHistory, Tenants};

/// Rows per page unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 1000;
/// Most rows per page.
pub const MAX_LIMIT: usize = 10_000;
/// Most rows of one tenant a walk may cover (their boundaries are held in
/// memory): ten years of minutes.
pub const MAX_WALK_ROWS: i64 = 5_300_000;

/// The parameters of a request for a page, as the client sent them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageRequest {
    /// Tenants to answer; none: every tenant the caller may read.
    pub tenants: Vec<String>,
    pub from: Option<String>,
    pub to: Option<String>,
    pub step: Option<String>,
    pub tz: Option<String>,
    pub anchor: Option<String>,
    pub since_revision: Option<String>,
    pub limit: Option<String>,
    pub page_token: Option<String>,
}

/// One row of a page: a usage row with its identity and revision.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct PagedRow {
    /// With `tenant` and `start`, the row's identity.
    pub step: String,
    /// For a final row, the revision of the last adjustment booked to it
    /// (0: none); for one that may still change (`partial`, or
    /// `facility_energy_pending`), the ledger's revision when read. A row
    /// whose revision differs from the one kept was restated.
    pub revision: u64,
    #[serde(flatten)]
    pub usage: Row,
}

/// A page of usage rows.
#[derive(Debug, Serialize, Deserialize, ToSchema)]
pub struct Page {
    pub from: String,
    pub to: String,
    pub step: String,
    pub time_zone: String,
    /// Where daily or monthly rows are anchored, when asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub anchor: Option<String>,
    /// The tenants the walk covers, in the order of the rows.
    pub tenants: Vec<String>,
    /// Rows ending at or before this never change (the ledger's
    /// watermark); energy that arrives later for them is an adjustment.
    pub finalized_through: String,
    /// The revision of the walk's first page: adjustments are listed up to
    /// it on every page. Ask `since_revision` this next time.
    pub revision: u64,
    /// Ordered by tenant, then start.
    pub rows: Vec<PagedRow>,
    /// Late deltas to the page's rows that were already final, booked
    /// after `since_revision` and up to `revision`.
    pub adjustments: Vec<AdjustmentRow>,
    /// Pass as `page_token`, with the same other parameters, for the next
    /// page; null on the last page.
    pub next_page_token: Option<String>,
}

fn parse_limit(v: Option<&str>) -> Result<usize, UsageError> {
    match v {
        None => Ok(DEFAULT_LIMIT),
        Some(text) => text
            .parse()
            .ok()
            .filter(|n| (1..=MAX_LIMIT).contains(n))
            .ok_or_else(|| UsageError::Limit(text.to_string())),
    }
}

/// The highest revision of the adjustments to each row of `bounds`.
fn row_revisions(bounds: &[i64], adjustments: &[Adjustment]) -> Vec<u64> {
    let mut out = vec![0; bounds.len().saturating_sub(1)];
    let (first, last) = (bounds[0], bounds[bounds.len() - 1]);
    for a in adjustments {
        if a.minute_start >= first && a.minute_start < last {
            let row = bounds.partition_point(|b| *b <= a.minute_start) - 1;
            out[row] = out[row].max(a.revision);
        }
    }
    out
}

/// Answers one page from the ledger, as `super::run` answers a whole
/// report (the same rows, the same contracts and facility energy).
pub fn page(
    reader: &dyn LedgerReader,
    tenants: &Tenants,
    history: &TenantHistory,
    meters: &[MeterSpec],
    req: &PageRequest,
) -> Result<Page, QueryError> {
    let since = parse_revision(req.since_revision.as_deref())?;
    let limit = parse_limit(req.limit.as_deref())?;
    let zone = Zone::parse(req.tz.as_deref())?;
    let step = Step::parse(req.step.as_deref().unwrap_or("1h"))?;
    let from = parse_time("from", req.from.as_deref())?;
    let to = parse_time("to", req.to.as_deref())?;
    let anchor = match req.anchor.as_deref() {
        Some(a) => Some(parse_time("anchor", Some(a))?),
        None => None,
    };
    let q = super::Query::build(from, to, step, zone, anchor, MAX_WALK_ROWS)?;

    // The revision first, then the tenants: every tenant with energy at
    // or before the revision is listed.
    let probe = reader.usage_since(None, from, from, u64::MAX)?;
    q.check_detail(&probe)?;
    if since > probe.revision {
        return Err(UsageError::RevisionAhead {
            since,
            revision: probe.revision,
        }
        .into());
    }
    let known = known_terms(reader, tenants)?;
    let mut selected: Vec<Terms> = if req.tenants.is_empty() {
        known
    } else {
        let mut wanted: Vec<&str> = req.tenants.iter().map(String::as_str).collect();
        wanted.sort_unstable();
        wanted.dedup();
        let mut out = Vec::with_capacity(wanted.len());
        for id in wanted {
            let t = known
                .iter()
                .find(|t| t.tenant == id)
                .ok_or_else(|| UsageError::UnknownTenant(id.to_string()))?;
            out.push(t.clone());
        }
        out
    };
    selected.sort_by(|a, b| a.tenant.cmp(&b.tenant));

    let mut asked: Vec<&str> = req.tenants.iter().map(String::as_str).collect();
    asked.sort_unstable();
    asked.dedup();
    let asked = asked.join("\n");
    let anchor_text = anchor.map(|a| a.to_string()).unwrap_or_default();
    let query = fingerprint(&[
        &asked,
        &from.to_string(),
        &to.to_string(),
        step.label(),
        &q.zone.name,
        &anchor_text,
        &since.to_string(),
    ]);
    let cursor = match req.page_token.as_deref() {
        Some(t) => Some(Cursor::decode(t, &query)?),
        None => None,
    };
    let pinned = cursor.as_ref().map_or(probe.revision, |c| c.revision);
    if pinned > probe.revision {
        return Err(
            UsageError::PageToken("is ahead of this ledger: it comes from another one").into(),
        );
    }

    let per_tenant = q.bounds.len() - 1;
    let (mut ti, mut bi) = match &cursor {
        None => (0, 0),
        Some(c) => {
            let ti = selected.partition_point(|t| t.tenant.as_str() < c.tenant.as_str());
            if selected.get(ti).is_some_and(|t| t.tenant == c.tenant) {
                let row = q.bounds[..per_tenant]
                    .binary_search(&c.start)
                    .map_err(|_| UsageError::PageToken("does not point at a row of this query"))?;
                (ti, row + 1)
            } else {
                // Its tenant is gone from the list: on from the next one.
                (ti, 0)
            }
        }
    };

    let contracts = history.contract_terms_by_tenant();
    let mut rows = Vec::new();
    let mut adjustments = Vec::new();
    let mut finalized = probe.finalized_through;
    let mut last: Option<(String, i64)> = None;
    while rows.len() < limit && ti < selected.len() {
        if bi >= per_tenant {
            (ti, bi) = (ti + 1, 0);
            continue;
        }
        let take = (limit - rows.len()).min(per_tenant - bi);
        let mut terms = selected[ti].clone();
        terms.contracts = contracts
            .get(terms.tenant.as_str())
            .cloned()
            .unwrap_or_else(|| vec![(i64::MIN, Contract::default())]);
        let sub = super::Query {
            from: q.bounds[bi],
            to: q.bounds[bi + take],
            bounds: q.bounds[bi..=bi + take].to_vec(),
            ..q.clone()
        };
        let (lo, hi) = sub.read_range();
        let mut usage = reader.usage_since(Some(&terms.tenant), lo, hi, 0)?;
        sub.check_detail(&usage)?;
        finalized = finalized.min(usage.finalized_through);
        usage.adjustments.retain(|a| a.revision <= pinned);
        let revisions = row_revisions(&sub.bounds, &usage.adjustments);
        usage.adjustments.retain(|a| a.revision > since);
        let facility = facility_of(reader, meters, Some(&terms.tenant), &usage, lo, hi)?;
        let r = report(&sub, std::slice::from_ref(&terms), &usage, &facility);
        for (row, revision) in r.rows.into_iter().zip(revisions) {
            let unsettled = row.partial || row.facility_energy_pending;
            rows.push(PagedRow {
                step: step.label().to_string(),
                revision: if unsettled { usage.revision } else { revision },
                usage: row,
            });
        }
        adjustments.extend(r.adjustments);
        last = Some((terms.tenant.clone(), q.bounds[bi + take - 1]));
        bi += take;
    }
    let more = (ti < selected.len() && bi < per_tenant) || ti + 1 < selected.len();
    let next_page_token = last.filter(|_| more).map(|(tenant, start)| {
        Cursor {
            tenant,
            start,
            revision: pinned,
        }
        .encode(&query)
    });
    Ok(Page {
        from: q.zone.format(q.from),
        to: q.zone.format(q.to),
        step: step.label().to_string(),
        time_zone: q.zone.name.clone(),
        anchor: anchor.map(|a| q.zone.format(a)),
        tenants: selected.into_iter().map(|t| t.tenant).collect(),
        finalized_through: q.zone.format(finalized),
        revision: pinned,
        rows,
        adjustments,
        next_page_token,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::sync::Arc;

    use super::*;
    use crate::ledger::{BucketDelta, Commit, Ledger, Reader};

    const T: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z

    fn d(energy_mj: u64) -> BucketDelta {
        BucketDelta {
            energy_mj,
            gpu_ns: 60_000_000_000,
            busy_gpu_ns: 60_000_000_000,
            samples: 60,
            expected_gpu_ns: 60_000_000_000,
            ..BucketDelta::default()
        }
    }

    /// Minute buckets of `tenants` on node n1 from `from` for `minutes`,
    /// each with an energy unique to its tenant and minute.
    fn minutes(tenants: &[&str], from: i64, minutes: i64) -> Commit {
        let mut c = Commit::default();
        for (i, t) in tenants.iter().enumerate() {
            for m in 0..minutes {
                let at = from + m * 60;
                let e = 1_000 * (i as u64 + 1) + (at - T) as u64;
                c.buckets.insert((Arc::from(*t), Arc::from("n1"), at), d(e));
                // As the committer does: the tenant's total with its energy.
                *c.tenant_energy.entry(Arc::from(*t)).or_default() += e;
            }
        }
        c
    }

    struct Fixture {
        _dir: tempfile::TempDir,
        ledger: Ledger,
        reader: Reader,
        tenants: Arc<Tenants>,
    }

    /// A ledger with tenants a and b configured and c only in the ledger,
    /// each with three hours of minutes from T, final through T + 2 h.
    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut ledger = Ledger::create(&path).unwrap();
        ledger
            .commit_at(&minutes(&["a", "b", "c"], T, 180), T + 7300, T + 7200)
            .unwrap();
        let reader = Reader::open(&path).unwrap();
        let tenants = Arc::new(
            Tenants::from_toml("[[tenant]]\nid = \"a\"\ncontracted_kw = 1\n\n[[tenant]]\nid = \"b\"\ncontracted_kw = 2\n")
                .unwrap(),
        );
        Fixture {
            _dir: dir,
            ledger,
            reader,
            tenants,
        }
    }

    fn request(tenants: &[&str], step: &str, limit: usize) -> PageRequest {
        PageRequest {
            tenants: tenants.iter().map(|t| t.to_string()).collect(),
            from: Some(super::super::rfc3339(T)),
            to: Some(super::super::rfc3339(T + 3 * 3600)),
            step: Some(step.into()),
            limit: Some(limit.to_string()),
            ..PageRequest::default()
        }
    }

    fn page_of(f: &Fixture, req: &PageRequest) -> Result<Page, QueryError> {
        let history = TenantHistory::new(f.tenants.clone());
        page(&f.reader, &f.tenants, &history, &[], req)
    }

    /// Every page of a walk, following `next_page_token`; `between` runs
    /// after each page.
    fn walk(f: &mut Fixture, req: &PageRequest, mut between: impl FnMut(&mut Ledger)) -> Vec<Page> {
        let mut req = req.clone();
        let mut pages = Vec::new();
        loop {
            let p = page_of(f, &req).unwrap();
            let next = p.next_page_token.clone();
            pages.push(p);
            match next {
                Some(t) => req.page_token = Some(t),
                None => return pages,
            }
            between(&mut f.ledger);
            assert!(pages.len() < 1000, "the walk does not end");
        }
    }

    /// Invariant: a walk in pages of any size gives every row of the
    /// whole report once, in key order (tenant, start), with the same
    /// figures.
    #[test]
    fn pages_of_any_size_give_the_whole_reports_rows_once_in_key_order() {
        let mut f = fixture();
        let history = TenantHistory::new(f.tenants.clone());
        let whole = super::super::run(
            &f.reader,
            &f.tenants,
            &history,
            &[],
            None,
            Some(&super::super::rfc3339(T)),
            Some(&super::super::rfc3339(T + 3 * 3600)),
            Some("15m"),
            None,
            None,
        )
        .unwrap();
        let mut want: Vec<Row> = whole.rows.clone();
        want.sort_by(|x, y| (&x.tenant, &x.start).cmp(&(&y.tenant, &y.start)));
        // a, b, c and unassigned, 12 quarter-hours each.
        assert_eq!(want.len(), 48);
        for limit in [1, 5, 12, 13, 47, 48, 10_000] {
            let pages = walk(&mut f, &request(&[], "15m", limit), |_| {});
            assert_eq!(pages.len(), 48usize.div_ceil(limit), "limit {limit}");
            let got: Vec<Row> = pages
                .iter()
                .flat_map(|p| p.rows.iter().map(|r| r.usage.clone()))
                .collect();
            assert_eq!(got, want, "limit {limit}");
            assert!(pages.iter().all(|p| p.rows.len() <= limit));
            assert!(pages.iter().all(|p| p.rows.iter().all(|r| r.step == "15m")));
        }
        // Several tenants: only theirs, whatever order they are asked in.
        let pages = walk(&mut f, &request(&["c", "a", "c"], "1h", 2), |_| {});
        let keys: Vec<(String, String)> = pages
            .iter()
            .flat_map(|p| {
                p.rows
                    .iter()
                    .map(|r| (r.usage.tenant.clone(), r.usage.start.clone()))
            })
            .collect();
        let hours = |t: &'static str| {
            (0..3).map(move |h| (t.to_string(), super::super::rfc3339(T + h * 3600)))
        };
        assert_eq!(keys, hours("a").chain(hours("c")).collect::<Vec<_>>());
        assert_eq!(pages[0].tenants, ["a", "c"]);
    }

    /// Invariant: minutes committed between pages (new energy in partial
    /// rows, late energy for final ones) neither repeat nor skip a row;
    /// every page lists adjustments up to the first page's revision, and
    /// the next walk since that revision gets the later ones, once.
    #[test]
    fn a_walk_is_stable_under_commits_and_keeps_its_first_revision() {
        let mut f = fixture();
        let first = page_of(&f, &request(&[], "15m", 5)).unwrap();
        let pinned = first.revision;
        let mut booked = 0;
        let pages = walk(&mut f, &request(&[], "15m", 5), |l| {
            booked += 1;
            // A late minute of b (final: an adjustment) and new minutes of a.
            let mut c = minutes(&["b"], T + 60 * booked, 1);
            c.buckets
                .extend(minutes(&["a"], T + 7200 + 60 * booked, 1).buckets);
            l.commit_at(&c, T + 7400 + booked, T + 7200).unwrap();
        });
        assert!(booked > 3);
        let keys: Vec<(String, String)> = pages
            .iter()
            .flat_map(|p| {
                p.rows
                    .iter()
                    .map(|r| (r.usage.tenant.clone(), r.usage.start.clone()))
            })
            .collect();
        let unique: BTreeSet<_> = keys.iter().cloned().collect();
        assert_eq!((keys.len(), unique.len()), (48, 48));
        assert!(pages.iter().all(|p| p.revision == pinned));
        assert!(
            pages.iter().all(|p| p.adjustments.is_empty()),
            "none booked by the pinned revision"
        );
        // The next walk since the pinned revision: every late minute once.
        let mut next = request(&["b"], "15m", 3);
        next.since_revision = Some(pinned.to_string());
        let later = walk(&mut f, &next, |_| {});
        let late: u64 = later
            .iter()
            .flat_map(|p| &p.adjustments)
            .map(|a| a.energy_millijoules)
            .sum();
        let want: u64 = (1..=booked).map(|i| 1_000 + 60 * i as u64).sum();
        assert_eq!(late, want);
        // Restated rows show it: the first quarter-hour of b has the last
        // revision booked to it; a final row nothing was booked to has 0;
        // a partial row the ledger's revision.
        let rows: Vec<&PagedRow> = later.iter().flat_map(|p| &p.rows).collect();
        let revision_now = later[0].revision;
        assert!(revision_now > pinned);
        let late_in_first_quarter = (1..=booked).filter(|i| 60 * i < 900).count() as u64;
        assert_eq!(rows[0].revision, pinned + late_in_first_quarter);
        assert_eq!(rows[7].revision, 0, "{:?}", rows[7]);
        assert!(rows[8].usage.partial);
        assert_eq!(rows[8].revision, revision_now);
    }

    /// A token from another query, or garbled, is refused by name; so are
    /// a bad limit and an anchor with a fixed step.
    #[test]
    fn bad_page_parameters_name_the_parameter() {
        let f = fixture();
        let first = page_of(&f, &request(&["a"], "15m", 5)).unwrap();
        let token = first.next_page_token.clone().unwrap();
        let mut other = request(&["b"], "15m", 5);
        other.page_token = Some(token.clone());
        let mut garbled = request(&["a"], "15m", 5);
        garbled.page_token = Some(format!("x{token}"));
        let mut anchored = request(&[], "1h", 5);
        anchored.anchor = Some("2027-01-01T00:00:00Z".into());
        let mut unknown = request(&["nobody"], "1h", 5);
        unknown.limit = None;
        for (req, param) in [
            (other, "page_token"),
            (garbled, "page_token"),
            (request(&[], "15m", 0), "limit"),
            (request(&[], "15m", 10_001), "limit"),
            (anchored, "step"),
            (unknown, "tenant"),
        ] {
            match page_of(&f, &req) {
                Err(QueryError::Usage(e)) => assert_eq!(e.param(), Some(param), "{e}"),
                other => panic!("{req:?}: {other:?}"),
            }
        }
    }

    /// One row for the whole period: the sum of the finer rows.
    #[test]
    fn a_total_is_the_sum_of_the_rows() {
        let mut f = fixture();
        let total = page_of(&f, &request(&["a"], "total", 10)).unwrap();
        assert_eq!(total.rows.len(), 1);
        let minutes: u64 = walk(&mut f, &request(&["a"], "1m", 10_000), |_| {})
            .iter()
            .flat_map(|p| &p.rows)
            .map(|r| r.usage.energy_millijoules)
            .sum();
        assert_eq!(total.rows[0].usage.energy_millijoules, minutes);
        assert_eq!(total.rows[0].step, "total");
        assert!(total.rows[0].usage.partial);
    }
}

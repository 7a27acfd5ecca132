//! The report: per-tenant rows and the adjustments to rows already
//! final, computed from the ledger's spans; serialised as the usage API's
//! JSON.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{FIVE_MINUTES, Facility, QUARTER, Query, Terms};
use crate::accounting::{Metered, MeteredChange};
use crate::ledger::{BucketDelta, Span, Usage};

/// Exact integer amounts in JSON are decimal strings, as payment APIs send
/// amounts: a JSON number above 2^53 comes out rounded from a parser that
/// reads numbers as doubles (JavaScript, Python's `float`, most spreadsheet
/// importers). Figures that are floats anyway (kWh, hours, watts) stay
/// numbers.
mod decimal {
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(d)?;
        text.parse()
            .map_err(|_| D::Error::custom(format!("{text:?} is not a decimal amount")))
    }

    /// As above, for an amount that may be unknown (absent).
    pub mod opt {
        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(v: &Option<u64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => super::serialize(v, s),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
            #[derive(Deserialize)]
            struct Amount(#[serde(with = "super")] u64);
            Ok(Option::<Amount>::deserialize(d)?.map(|a| a.0))
        }
    }

    /// A signed amount (a split made again lowers a tenant's part as
    /// often as it raises one).
    pub mod signed {
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        pub fn serialize<S: Serializer>(v: &i64, s: S) -> Result<S::Ok, S::Error> {
            s.collect_str(v)
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
            let text = std::borrow::Cow::<str>::deserialize(d)?;
            text.parse()
                .map_err(|_| D::Error::custom(format!("{text:?} is not a decimal amount")))
        }
    }

    /// A signed amount that may be absent (a restatement lowers a figure
    /// as often as it raises it).
    pub mod signed_opt {
        use serde::{Deserialize, Deserializer, Serializer, de::Error};

        pub fn serialize<S: Serializer>(v: &Option<i64>, s: S) -> Result<S::Ok, S::Error> {
            match v {
                Some(v) => s.collect_str(v),
                None => s.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<i64>, D::Error> {
            Option::<std::borrow::Cow<'de, str>>::deserialize(d)?
                .map(|text| {
                    text.parse()
                        .map_err(|_| D::Error::custom(format!("{text:?} is not a decimal amount")))
                })
                .transpose()
        }
    }
}

/// One row of usage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Row {
    pub tenant: String,
    pub start: String,
    pub end: String,
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal")]
    #[schema(value_type = String, pattern = "^[0-9]+$")]
    pub energy_millijoules: u64,
    pub energy_joules: f64,
    pub energy_kwh: f64,
    pub gpu_hours: f64,
    /// GPU time weighted by utilization, of the GPU time whose readings
    /// carried one (`gpu_hours` less `busy_unknown_gpu_hours`).
    pub busy_gpu_hours: f64,
    /// GPU time whose readings carried no utilization (every MIG board on
    /// a real driver, a GPU whose utilization call fails): neither busy
    /// nor idle. 0 in rows booked before it was kept, whose busy time is a
    /// share of all their GPU time.
    #[serde(default)]
    #[schema(required = true)]
    pub busy_unknown_gpu_hours: f64,
    pub average_power_watts: f64,
    /// The highest 15-minute average power in the row. Absent in rows
    /// grouped by node: rollups keep it per tenant only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peak_demand_watts: Option<f64>,
    /// The contract in force at the row's last minute (a row the contract
    /// changed in is judged minute by minute, each by its own).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub contracted_power_watts: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub capacity_utilization: Option<f64>,
    /// 95th percentile of the 5-minute average power within the row (rows
    /// of 15 minutes or more whose minutes are still kept).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p95_power_watts: Option<f64>,
    /// Time in minutes whose average power was above the contract: 60 s
    /// per such minute, by the samples' own time. Absent in rows grouped
    /// by node: a contract is the tenant's, not a node's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds_over_contract: Option<f64>,
    /// Energy above the contract in those minutes (minute energy −
    /// contract × 60 s): what committed-plus-overage contracts bill.
    /// Absent in rows grouped by node, as `seconds_over_contract`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overage_kwh: Option<f64>,
    /// Share of the GPU time between readings that readings back.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub coverage: Option<f64>,
    /// Some energy was integrated from power instead of read from the
    /// GPUs' energy counters.
    pub estimated: bool,
    /// Energy times the site's PUE: an estimate of facility energy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facility_energy_kwh_estimated: Option<f64>,
    pub readings: u64,
    /// The row ends after `finalized_through`: it may still change.
    pub partial: bool,
    /// What the contract is measured on ("gpu", "node", "facility"), as
    /// in force at the row's last minute: average, peak and p95 power,
    /// capacity utilization, time over contract and overage are on it.
    /// `energy_*` stay GPU energy.
    pub basis: String,
    /// The tenant's share of its nodes' whole-node energy (0 where its
    /// nodes report none; see `node_coverage`). Exact: a decimal string.
    #[serde(with = "decimal")]
    #[schema(value_type = String, pattern = "^[0-9]+$")]
    pub node_energy_millijoules: u64,
    pub node_energy_kwh: f64,
    /// Share of the tenant's GPU time on nodes with whole-node readings.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub node_coverage: Option<f64>,
    /// Some node energy was integrated from power (no energy counter).
    pub node_energy_estimated: bool,
    /// Facility energy, minute by minute: what the meters allocated where
    /// the tenant's nodes are under a meter that allocated the minute,
    /// plus node energy times the tenant's PUE for the rest (nodes under
    /// no meter, minutes not allocated yet). Absent where some of it needs
    /// a PUE the tenant does not have, or the row has neither node
    /// readings nor an allocation. Exact: a decimal string.
    #[serde(
        default,
        with = "decimal::opt",
        skip_serializing_if = "Option::is_none"
    )]
    #[schema(value_type = Option<String>, pattern = "^[0-9]+$")]
    pub facility_energy_millijoules: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub facility_energy_kwh: Option<f64>,
    /// Some of `facility_energy_*` is node energy times the PUE, not a
    /// meter's allocation.
    pub facility_energy_estimated: bool,
    /// Some of it is the PUE estimate for minutes of nodes under a meter
    /// that has not allocated them yet (not final, or the meter was
    /// down): the meter's allocation replaces the estimate once made, and
    /// the row's facility figures (and, on the facility basis, its power,
    /// time over contract and overage) change with it. Settle a facility
    /// invoice on rows where this is false.
    #[serde(default)]
    pub facility_energy_pending: bool,
}

#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Report {
    pub from: String,
    pub to: String,
    pub step: String,
    pub time_zone: String,
    /// Rows ending at or before this never change: the ledger's
    /// watermark. Energy that arrives later for them is an adjustment.
    pub finalized_through: String,
    /// The ledger's revision when it answered: ask `since_revision` this
    /// next time to get only the adjustments booked after this answer.
    pub revision: u64,
    pub rows: Vec<Row>,
    /// Late deltas to rows that were already final, one per revision,
    /// tenant, node and row.
    pub adjustments: Vec<AdjustmentRow>,
}

/// What arrived for one row after the row was final: booked by
/// `revision` at `booked_at`, for the minutes of `[start, end)` on one
/// node. Its figures add to the row's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct AdjustmentRow {
    pub tenant: String,
    pub node: String,
    /// The row it belongs to.
    pub start: String,
    pub end: String,
    pub revision: u64,
    pub booked_at: String,
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal")]
    #[schema(value_type = String, pattern = "^[0-9]+$")]
    pub energy_millijoules: u64,
    pub energy_kwh: f64,
    pub gpu_hours: f64,
    pub busy_gpu_hours: f64,
    /// As a row's `busy_unknown_gpu_hours`.
    #[serde(default)]
    #[schema(required = true)]
    pub busy_unknown_gpu_hours: f64,
    /// GPU time between readings, gaps included (what coverage is
    /// measured against).
    pub expected_gpu_hours: f64,
    /// The energy over the row's length.
    pub average_power_watts: f64,
    pub seconds_over_contract: f64,
    pub overage_kwh: f64,
    pub estimated: bool,
    pub readings: u64,
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal")]
    #[schema(value_type = String, pattern = "^[0-9]+$")]
    pub node_energy_millijoules: u64,
    pub node_energy_kwh: f64,
    /// Some of the node energy was integrated from power.
    pub node_energy_estimated: bool,
    /// What a facility meter's allocation booked by this revision gave
    /// the tenant in the row; where the meter split allocated minutes
    /// again for energy booked after their split, the change of the
    /// tenant's part, negative where it shrank (0 in other adjustments).
    /// Exact: a decimal string in JSON.
    #[serde(with = "decimal::signed")]
    #[schema(value_type = String, pattern = "^-?[0-9]+$")]
    pub facility_allocated_millijoules: i64,
    /// The node energy that allocation replaces (whose facility energy
    /// was its PUE estimate until then), or its change where the minutes
    /// were split again. Exact: a decimal string in JSON.
    #[serde(with = "decimal::signed")]
    #[schema(value_type = String, pattern = "^-?[0-9]+$")]
    pub facility_replaced_node_millijoules: i64,
    /// The change this revision made to the row's facility energy: the
    /// allocation (or the change of the tenant's part, where minutes were
    /// split again) minus the PUE estimate of the node energy it replaces
    /// (each minute on its contract's PUE), negative where the meter read
    /// less; for energy booked late, the PUE estimate of its node energy
    /// on a node no configured meter covers (or in a minute before the
    /// first its meter allocated), 0 on a metered node (the meter's split
    /// holds it). Absent where a PUE estimate is needed and
    /// the tenant has no PUE (its facility energy is then the allocation
    /// itself). Exact: a decimal string in JSON.
    #[serde(with = "decimal::signed_opt")]
    #[schema(value_type = Option<String>, pattern = "^-?[0-9]+$")]
    pub facility_energy_restated_millijoules: Option<i64>,
}

/// Builds the report for `tenants` from the usage read over
/// `q.read_range()`. Every tenant gets a row for every step, with zeros
/// where nothing was recorded. Rows ending after the ledger's watermark
/// are partial; adjustments are summed per revision, tenant, node and
/// row. Rows must fit the usage's rollups (`Query::check_detail`).
/// `facility` is what the meters allocated of the tenants' minutes: on
/// the facility basis, each minute's energy is
/// `Contract::basis_energy` with it.
pub fn report(q: &Query, tenants: &[Terms], usage: &Usage, facility: &Facility<'_>) -> Report {
    let mut by_tenant: BTreeMap<&str, BTreeMap<i64, Span>> = BTreeMap::new();
    for (t, span) in &usage.spans {
        by_tenant
            .entry(t.as_str())
            .or_default()
            .insert(span.start, *span);
    }
    // A minute the meters gave a tenant part of without a bucket of its
    // own (all its energy there was booked late, before the allocation)
    // is a minute of no energy: its part counts like any other.
    for (tenant, minute) in facility.allocated() {
        by_tenant
            .entry(tenant)
            .or_default()
            .entry(minute)
            .or_insert(Span {
                start: minute,
                seconds: 60,
                delta: BucketDelta::default(),
                peak_quarter_mj: None,
                node_peak_quarter_mj: None,
                metered: Metered::NONE,
                facility_peak_quarter_mj: None,
            });
    }
    let finalized = usage.finalized_through;
    let empty = BTreeMap::new();
    let mut rows = Vec::new();
    for terms in tenants {
        let tenant = &terms.tenant;
        let spans = by_tenant.get(tenant.as_str()).unwrap_or(&empty);
        let facility = facility.of_tenant(tenant);
        // What the meters allocated of a span: a minute's allocation, or
        // what a rollup kept of its minutes'.
        let metered = |t: i64, s: &Span| -> Metered {
            if s.peak_quarter_mj.is_some() {
                s.metered
            } else {
                facility.at(t).metered
            }
        };
        let sum = |from: i64, to: i64| {
            spans
                .range(from..to)
                .fold(BucketDelta::default(), |mut acc, (_, s)| {
                    acc.add(&s.delta);
                    acc
                })
        };
        // Energy of the minute buckets in [from, to), on the basis of
        // each minute's contract.
        let minute_energy = |from: i64, to: i64| -> u64 {
            spans
                .range(from..to)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
                .map(|(t, s)| s.basis_energy(&terms.contract_at(*t), metered(*t, s)))
                .fold(0u64, u64::saturating_add)
        };
        for w in q.bounds.windows(2) {
            let (start, end) = (w[0], w[1]);
            let seconds = end - start;
            let d = sum(start, end);
            // Each minute against its contract, in sample time; rollups
            // carry the evaluation of their minutes.
            let (over_ns, overage_mj) =
                spans.range(start..end).fold((0u64, 0u64), |acc, (t, s)| {
                    let (ns, mj) = s.over_contract(&terms.contract_at(*t), metered(*t, s));
                    (acc.0.saturating_add(ns), acc.1.saturating_add(mj))
                });
            // Highest quarter-hour average: from the minutes' quarter-hours
            // overlapping the row, and from the peaks stored in rollups.
            let rolled_up_peak = spans
                .range(start..end)
                .filter_map(|(t, s)| s.basis_peak_quarter_mj(&terms.contract_at(*t)))
                .max();
            let mut peak_mj = rolled_up_peak.unwrap_or(0);
            // The quarter-hours overlapping the row reach beyond it where
            // the row does not start or end on a quarter boundary (a 1m
            // row): each is summed over all its minutes, visited once per
            // quarter that holds any, so a long row with little detail (a
            // month, mostly rolled up) stays cheap and a row without a
            // bucket of its own still sees its quarter.
            let (quarters_from, quarters_to) = (
                start.div_euclid(QUARTER) * QUARTER,
                (end + QUARTER - 1).div_euclid(QUARTER) * QUARTER,
            );
            let mut summed = None;
            for (t, _) in spans
                .range(quarters_from..quarters_to)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
            {
                let quarter = t.div_euclid(QUARTER) * QUARTER;
                if summed != Some(quarter) {
                    summed = Some(quarter);
                    peak_mj = peak_mj.max(minute_energy(quarter, quarter + QUARTER));
                }
            }
            // 5-minute windows are walked only between the row's first and
            // last minute bucket.
            let minutes_in_row = spans
                .range(start..end)
                .filter(|(_, s)| s.peak_quarter_mj.is_none())
                .map(|(t, _)| *t);
            let (first_minute, last_minute) = minutes_in_row
                .fold(None, |acc: Option<(i64, i64)>, t| {
                    Some(acc.map_or((t, t), |(a, _)| (a, t)))
                })
                .unwrap_or((end, start));
            // Average power on the basis of each span's contract.
            let basis_mj = spans
                .range(start..end)
                .map(|(t, s)| s.basis_energy(&terms.contract_at(*t), metered(*t, s)))
                .fold(0u64, u64::saturating_add);
            let average_w = basis_mj as f64 / 1000.0 / seconds as f64;
            // The contract in force at the row's last minute.
            let last_contract = terms.contract_at(end - 60);
            let contracted_w = Some(last_contract.milliwatts)
                .filter(|c| *c > 0)
                .map(|c| c as f64 / 1000.0);
            // Facility energy, span by span on each span's PUE: the
            // allocation where a meter made one, else the PUE estimate;
            // unknown (not 0) where a PUE is missing or nothing backs it.
            let mut facility_mj = Some(0u64);
            let (mut facility_estimated, mut facility_pending, mut allocated) =
                (false, false, false);
            for (t, s) in spans.range(start..end) {
                let m = metered(*t, s);
                facility_pending |= s.peak_quarter_mj.is_none() && facility.at(*t).pending;
                facility_estimated |= s.delta.node_energy_mj > m.node_mj;
                allocated |= m.allocated_mj > 0 || m.node_mj > 0;
                let e = terms
                    .contract_at(*t)
                    .facility_energy(s.delta.node_energy_mj, m);
                facility_mj = facility_mj.zip(e).map(|(a, b)| a.saturating_add(b));
            }
            let facility_mj =
                facility_mj.filter(|_| d.node_ns > 0 || d.node_energy_mj > 0 || allocated);
            let p95 = (seconds >= QUARTER
                && rolled_up_peak.is_none()
                && start >= usage.minutes_from)
                .then(|| {
                    // Windows without minutes are zeros; only those with
                    // some are summed.
                    let windows = (seconds / FIVE_MINUTES) as usize;
                    let mut fives: Vec<u64> = vec![0; windows];
                    if first_minute <= last_minute {
                        let lo = ((first_minute - start) / FIVE_MINUTES) as usize;
                        let hi = (((last_minute - start) / FIVE_MINUTES) as usize).min(windows - 1);
                        for (i, slot) in fives.iter_mut().enumerate().take(hi + 1).skip(lo) {
                            let s = start + i as i64 * FIVE_MINUTES;
                            *slot = minute_energy(s, s + FIVE_MINUTES);
                        }
                    }
                    fives.sort_unstable();
                    // Nearest rank: the smallest value with at least 95 % at
                    // or below it.
                    let rank = (fives.len() * 95).div_ceil(100).max(1);
                    fives.get(rank - 1).copied().unwrap_or(0) as f64 / 1000.0 / FIVE_MINUTES as f64
                });
            let energy_kwh = d.energy_mj as f64 / 3.6e9;
            rows.push(Row {
                tenant: tenant.clone(),
                start: q.zone.format(start),
                end: q.zone.format(end),
                energy_millijoules: d.energy_mj,
                energy_joules: d.energy_mj as f64 / 1000.0,
                energy_kwh,
                gpu_hours: d.gpu_ns as f64 / 3.6e12,
                busy_gpu_hours: d.busy_gpu_ns as f64 / 3.6e12,
                busy_unknown_gpu_hours: d.busy_unknown_gpu_ns as f64 / 3.6e12,
                average_power_watts: average_w,
                peak_demand_watts: Some(peak_mj as f64 / 1000.0 / QUARTER as f64),
                contracted_power_watts: contracted_w,
                capacity_utilization: contracted_w.filter(|c| *c > 0.0).map(|c| average_w / c),
                p95_power_watts: p95,
                seconds_over_contract: Some(over_ns as f64 / 1e9),
                overage_kwh: Some(overage_mj as f64 / 3.6e9),
                coverage: (d.expected_gpu_ns > 0)
                    .then(|| d.gpu_ns as f64 / d.expected_gpu_ns as f64),
                estimated: d.estimated_mj > 0,
                facility_energy_kwh_estimated: terms.pue.map(|pue| energy_kwh * pue),
                readings: d.samples,
                partial: end > finalized,
                basis: last_contract.basis.label().to_string(),
                node_energy_millijoules: d.node_energy_mj,
                node_energy_kwh: d.node_energy_mj as f64 / 3.6e9,
                node_coverage: (d.expected_gpu_ns > 0)
                    .then(|| (d.node_ns as f64 / d.expected_gpu_ns as f64).min(1.0)),
                node_energy_estimated: d.node_estimated_mj > 0,
                facility_energy_millijoules: facility_mj,
                facility_energy_kwh: facility_mj.map(|mj| mj as f64 / 3.6e9),
                facility_energy_estimated: facility_mj.is_some() && facility_estimated,
                facility_energy_pending: facility_mj.is_some() && facility_pending,
            });
        }
    }
    Report {
        from: q.zone.format(q.from),
        to: q.zone.format(q.to),
        step: q.step.label().to_string(),
        time_zone: q.zone.name.clone(),
        finalized_through: q.zone.format(finalized),
        revision: usage.revision,
        rows,
        adjustments: adjustment_rows(q, tenants, usage, facility),
    }
}

/// The usage's adjustments within the period, summed per revision,
/// tenant, node and row of `q`. The facility energy each changes: an
/// allocation's, its part less the estimate it replaces; energy booked
/// late on a node no configured meter covers, or before the meter's first
/// minute, its PUE estimate (as a row's); energy booked late on a metered
/// node, none of its own (the
/// meter's energy of the minute is split among the tenants, late energy
/// weighed where it came before the split).
fn adjustment_rows(
    q: &Query,
    tenants: &[Terms],
    usage: &Usage,
    facility: &Facility<'_>,
) -> Vec<AdjustmentRow> {
    let (first, last) = (q.bounds[0], q.bounds[q.bounds.len() - 1]);
    type Sums = (i64, BucketDelta, MeteredChange, Option<i64>);
    let mut sums: BTreeMap<(u64, &str, &str, usize), Sums> = BTreeMap::new();
    for a in &usage.adjustments {
        let Some(terms) = tenants.iter().find(|t| t.tenant == a.tenant) else {
            continue;
        };
        if a.minute_start < first || a.minute_start >= last {
            continue;
        }
        let row = q.bounds.partition_point(|b| *b <= a.minute_start) - 1;
        let e = sums
            .entry((a.revision, &a.tenant, &a.node, row))
            .or_insert((
                a.booked_at,
                BucketDelta::default(),
                MeteredChange::NONE,
                Some(0),
            ));
        e.1.add(&a.delta);
        e.2.add(a.metered);
        // The allocation (or its change) less the estimate of the node
        // energy it replaces (or of its change), on the minute's PUE; late
        // node energy off the meters, its estimate (unknown without a PUE,
        // unless there is no node energy to estimate).
        let contract = terms.contract_at(a.minute_start);
        let estimate = |node_mj: i64| -> Option<i64> {
            let est = contract.facility_energy(node_mj.unsigned_abs(), Metered::NONE);
            match node_mj {
                0 => Some(0),
                n if n < 0 => est.map(|e| -i64::try_from(e).unwrap_or(i64::MAX)),
                _ => est.map(|e| i64::try_from(e).unwrap_or(i64::MAX)),
            }
        };
        let change = if a.metered == MeteredChange::NONE {
            if a.delta.node_energy_mj == 0
                || a.node.is_empty()
                || facility.metered(&a.node, a.minute_start)
            {
                Some(0)
            } else {
                estimate(i64::try_from(a.delta.node_energy_mj).unwrap_or(i64::MAX))
            }
        } else {
            estimate(a.metered.node_mj).map(|est| a.metered.allocated_mj.saturating_sub(est))
        };
        e.3 = e.3.zip(change).map(|(sum, c)| sum.saturating_add(c));
    }
    sums.into_iter()
        .map(
            |((revision, tenant, node, row), (booked_at, d, m, restated))| {
                let (start, end) = (q.bounds[row], q.bounds[row + 1]);
                AdjustmentRow {
                    tenant: tenant.to_string(),
                    node: node.to_string(),
                    start: q.zone.format(start),
                    end: q.zone.format(end),
                    revision,
                    booked_at: q.zone.format(booked_at),
                    energy_millijoules: d.energy_mj,
                    energy_kwh: d.energy_mj as f64 / 3.6e9,
                    gpu_hours: d.gpu_ns as f64 / 3.6e12,
                    busy_gpu_hours: d.busy_gpu_ns as f64 / 3.6e12,
                    busy_unknown_gpu_hours: d.busy_unknown_gpu_ns as f64 / 3.6e12,
                    expected_gpu_hours: d.expected_gpu_ns as f64 / 3.6e12,
                    average_power_watts: d.energy_mj as f64 / 1000.0 / (end - start) as f64,
                    seconds_over_contract: d.over_contract_ns as f64 / 1e9,
                    overage_kwh: d.overage_mj as f64 / 3.6e9,
                    estimated: d.estimated_mj > 0,
                    readings: d.samples,
                    node_energy_millijoules: d.node_energy_mj,
                    node_energy_kwh: d.node_energy_mj as f64 / 3.6e9,
                    node_energy_estimated: d.node_estimated_mj > 0,
                    facility_allocated_millijoules: m.allocated_mj,
                    facility_replaced_node_millijoules: m.node_mj,
                    facility_energy_restated_millijoules: restated,
                }
            },
        )
        .collect()
}

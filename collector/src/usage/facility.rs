//! What the facility meters allocated, per tenant and minute, as the
//! usage rows set it beside node energy: each minute of a tenant's node
//! under a meter is either allocated (the meter's allocation replaces the
//! node energy its nodes had when it was made, kept with it, times the
//! PUE) or not yet (not final, or the meter was down: the PUE estimate
//! stands, flagged, until the meter allocates it). Nodes under no meter
//! are the PUE estimate.

use std::collections::{BTreeMap, BTreeSet};

use crate::accounting::{Metered, MeteredChange};
use crate::ledger::{Adjustment, UsageAllocation};
use crate::meters::MeterSpec;

/// One tenant-minute: what its meters allocated of it, and whether some of
/// it lies on a metered node its meter has not allocated yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FacilityMinute {
    pub metered: Metered,
    pub pending: bool,
}

/// The meters' allocation by tenant, then minute start, and the
/// configured meters (which nodes are metered today) with the first
/// minute each allocated.
#[derive(Debug, Clone, Default)]
pub struct Facility<'m> {
    tenants: ByTenant,
    meters: Vec<(&'m MeterSpec, i64)>,
}

impl<'m> Facility<'m> {
    /// No meter: facility energy is node energy times the PUE throughout.
    pub const NONE: Facility<'m> = Facility {
        tenants: BTreeMap::new(),
        meters: Vec::new(),
    };

    /// Whether a configured meter splits `node`'s energy in the minute
    /// starting at `minute`: it covers the node and had started
    /// allocating by then. Energy booked late there is the meter's to
    /// split (before it allocates the minute, or again after), not a PUE
    /// estimate; a minute before a meter's first is never split by it.
    pub fn metered(&self, node: &str, minute: i64) -> bool {
        self.meters
            .iter()
            .any(|(m, from)| minute >= *from && m.covers(node))
    }

    /// From the meters' allocated minutes (each tenant's part keeps the
    /// node energy it replaced, whatever the meters' node lists say
    /// today) and the configured `meters`, whose node lists say only
    /// which minutes of `allocation.nodes` still wait for an allocation
    /// (pending: from the meter's first minute on, `allocation.started`;
    /// none of a meter with no state yet: it allocates from its first
    /// reading on, so no minute final before it has one is ever its). A
    /// meter no longer configured still counts for the minutes it
    /// allocated.
    pub fn of(meters: &'m [MeterSpec], allocation: &UsageAllocation) -> Self {
        let allocated = &allocation.minutes;
        let started: BTreeMap<&str, i64> = (allocation.started.iter())
            .map(|(m, from)| (m.as_str(), *from))
            .collect();
        let meters: Vec<(&MeterSpec, i64)> = meters
            .iter()
            .filter_map(|m| Some((m, *started.get(m.id.as_str())?)))
            .collect();
        let mut tenants = ByTenant::new();
        let mut done: BTreeSet<(&str, i64)> = BTreeSet::new();
        for (meter, mm) in allocated {
            done.insert((meter.as_str(), mm.minute));
            for share in &mm.tenants {
                slot(&mut tenants, &share.tenant, mm.minute)
                    .metered
                    .add(Metered {
                        allocated_mj: share.allocated_mj,
                        node_mj: share.node_mj,
                    });
            }
        }
        for n in &allocation.nodes {
            let mut under = meters
                .iter()
                .filter(|(m, from)| n.minute >= *from && m.covers(&n.node))
                .peekable();
            if under.peek().is_none() {
                continue;
            }
            if !under.any(|(m, _)| done.contains(&(m.id.as_str(), n.minute))) {
                slot(&mut tenants, &n.tenant, n.minute).pending = true;
            }
        }
        Self { tenants, meters }
    }

    /// As it stood at `revision`, from an allocation read with
    /// `adjustments` in one snapshot (all those of the period booked
    /// since, at least): takes back what the allocations and the minutes
    /// split again booked after `revision` (their `metered` changes). A
    /// tenant-minute something was taken back of was still to change at
    /// `revision`: pending (a minute first allocated since is the
    /// estimate again).
    pub fn as_of(&mut self, adjustments: &[Adjustment], revision: u64) {
        let back = |v: u64, change: i64| {
            let v = i128::from(v) - i128::from(change);
            u64::try_from(v.max(0)).unwrap_or(u64::MAX)
        };
        for a in adjustments
            .iter()
            .filter(|a| a.revision > revision && a.metered != MeteredChange::NONE)
        {
            let Some(m) =
                (self.tenants.get_mut(&a.tenant)).and_then(|t| t.get_mut(&a.minute_start))
            else {
                continue;
            };
            m.metered = Metered {
                allocated_mj: back(m.metered.allocated_mj, a.metered.allocated_mj),
                node_mj: back(m.metered.node_mj, a.metered.node_mj),
            };
            m.pending = true;
        }
    }

    /// Every tenant-minute the meters allocated something of (a tenant
    /// whose energy in that minute was all booked late has a part but no
    /// minute bucket).
    pub fn allocated(&self) -> impl Iterator<Item = (&str, i64)> {
        self.tenants.iter().flat_map(|(tenant, minutes)| {
            minutes
                .iter()
                .filter(|(_, m)| m.metered != Metered::NONE)
                .map(move |(minute, _)| (tenant.as_str(), *minute))
        })
    }

    /// One tenant's minutes.
    pub fn of_tenant(&self, tenant: &str) -> TenantFacility<'_> {
        TenantFacility(self.tenants.get(tenant))
    }
}

type ByTenant = BTreeMap<String, BTreeMap<i64, FacilityMinute>>;

fn slot<'a>(tenants: &'a mut ByTenant, tenant: &str, minute: i64) -> &'a mut FacilityMinute {
    tenants
        .entry(tenant.to_string())
        .or_default()
        .entry(minute)
        .or_default()
}

/// One tenant's minutes of a [`Facility`].
#[derive(Debug, Clone, Copy)]
pub struct TenantFacility<'a>(Option<&'a BTreeMap<i64, FacilityMinute>>);

impl TenantFacility<'_> {
    /// The minute starting at `minute` (nothing allocated where the
    /// meters have nothing of it).
    pub fn at(&self, minute: i64) -> FacilityMinute {
        self.0
            .and_then(|m| m.get(&minute))
            .copied()
            .unwrap_or_default()
    }
}

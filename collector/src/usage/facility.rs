//! What the facility meters allocated, per tenant and minute, as the
//! usage rows set it beside node energy: each minute of a tenant's node
//! under a meter is either allocated (the meter's allocation replaces the
//! node's energy times the PUE) or not yet (not final, or the meter was
//! down: the PUE estimate stands, flagged, until the meter allocates it).
//! Nodes under no configured meter are always the PUE estimate.

use std::collections::{BTreeMap, BTreeSet};

use crate::accounting::Metered;
use crate::ledger::{MeterMinute, NodeMinute};
use crate::meters::MeterSpec;

/// One tenant-minute: what its meters allocated of it, and whether some of
/// it lies on a metered node its meter has not allocated yet.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FacilityMinute {
    pub metered: Metered,
    pub pending: bool,
}

/// The meters' allocation by (tenant, minute start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Facility {
    minutes: BTreeMap<(String, i64), FacilityMinute>,
}

impl Facility {
    /// No meter: facility energy is node energy times the PUE throughout.
    pub const NONE: Facility = Facility {
        minutes: BTreeMap::new(),
    };

    /// From the configured `meters` (their node globs say which node a
    /// meter feeds), their allocated minutes and what each node measured.
    /// Minutes of meters no longer configured are left out: which nodes
    /// they fed is not known, so those nodes count as under no meter.
    pub fn of(
        meters: &[MeterSpec],
        allocated: &[(String, MeterMinute)],
        nodes: &[NodeMinute],
    ) -> Self {
        let mut minutes: BTreeMap<(String, i64), FacilityMinute> = BTreeMap::new();
        let mut done: BTreeSet<(&str, i64)> = BTreeSet::new();
        for (meter, mm) in allocated {
            if !meters.iter().any(|m| &m.id == meter) {
                continue;
            }
            done.insert((meter.as_str(), mm.minute));
            for (tenant, _, share) in &mm.tenants {
                minutes
                    .entry((tenant.clone(), mm.minute))
                    .or_default()
                    .metered
                    .add(Metered {
                        allocated_mj: *share,
                        node_mj: 0,
                    });
            }
        }
        for n in nodes {
            let mut under = meters.iter().filter(|m| m.covers(&n.node)).peekable();
            if under.peek().is_none() {
                continue;
            }
            let e = minutes.entry((n.tenant.clone(), n.minute)).or_default();
            if under.any(|m| done.contains(&(m.id.as_str(), n.minute))) {
                e.metered.add(Metered {
                    allocated_mj: 0,
                    node_mj: n.node_energy_mj,
                });
            } else {
                e.pending = true;
            }
        }
        Self { minutes }
    }

    /// The tenant-minute starting at `minute` (nothing allocated where
    /// the meters have nothing of it).
    pub fn at(&self, tenant: &str, minute: i64) -> FacilityMinute {
        // No meter: nothing to look up (the key is an owned string).
        if self.minutes.is_empty() {
            return FacilityMinute::default();
        }
        self.minutes
            .get(&(tenant.to_string(), minute))
            .copied()
            .unwrap_or_default()
    }
}

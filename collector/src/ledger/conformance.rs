//! The conformance suite every ledger backend passes: written against
//! [`LedgerWriter`] and [`LedgerReader`] only. A backend runs it with
//! `conformance_tests!(fresh)`, where `fresh()` returns a [`Fresh`] on a
//! new, empty ledger; each case becomes a test of its own.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use super::{
    BucketDelta, Commit, Compaction, CompactionLease, GpuCursor, LedgerError, LedgerReader,
    LedgerWriter, MeterMinute, MeterResplit, MeterShare, MeterState, NodeCursor, NodeMinute,
    PlacingHold, TenantVersion,
};
use crate::accounting::{Run, StretchWeight};
use crate::tenants::{TenantHistory, Tenants};

/// A new, empty ledger: its writer, a reader of the same ledger, and
/// whatever must live as long as they do (a temporary directory).
pub(crate) struct Fresh<W, R> {
    pub writer: W,
    pub reader: R,
    pub _keep: Box<dyn std::any::Any>,
}

/// One test per case of the suite, on ledgers made by `$fresh`.
macro_rules! conformance_tests {
    ($fresh:expr) => {
        $crate::ledger::conformance::conformance_tests!(@cases $fresh;
            commit_reads_back_to_the_millijoule,
            a_refused_commit_writes_nothing,
            a_commit_after_another_holders_claim_is_fenced,
            a_claim_by_the_same_holder_keeps_its_generation,
            holders_name_the_last_claim_and_claim_nothing,
            restore_returns_what_was_committed,
            tenant_totals_add_up_every_holders_commits,
            the_compaction_lease_is_exclusive_and_expires,
            tenant_versions_round_trip,
            late_deltas_after_the_watermark_are_adjustments,
            a_commit_with_an_id_is_written_once,
            one_refusal_names_every_node_another_holder_took,
            node_energy_rolls_up_and_adds_to_the_tenant_totals,
            over_contract_is_measured_on_each_tenants_basis,
            meter_minutes_are_allocated_once_and_read_back,
            node_minutes_measure_node_energy_else_gpu_energy,
            each_nodes_placing_hold_is_kept_with_its_cursor,
            facility_usage_is_the_allocation_plus_pue_times_unmetered_node_energy,
            usage_pages_give_every_row_once_and_each_adjustment_once,
            usage_rows_per_node_sum_to_the_tenants_rows,
            usage_rows_per_gpu_sum_to_the_tenants_and_nodes_rows,
            gpu_hours_are_kept_for_the_hour_retention,
            allocated_facility_energy_survives_compaction,
            a_part_without_a_bucket_survives_compaction,
            a_minute_split_again_replaces_its_parts_once,
            meter_reports_read_the_same_after_compaction,
        );
    };
    (@cases $fresh:expr; $($case:ident),* $(,)?) => {
        $(
            #[test]
            fn $case() {
                $crate::ledger::conformance::$case($fresh());
            }
        )*
    };
}
pub(crate) use conformance_tests;

const MINUTE: i64 = 1_800_000_000; // 2027-01-15T08:00:00Z, whole hour

fn delta(energy_mj: u64, samples: u64) -> BucketDelta {
    BucketDelta {
        energy_mj,
        gpu_ns: samples * 1_000_000_000,
        busy_gpu_ns: samples * 500_000_000,
        samples,
        expected_gpu_ns: samples * 1_000_000_000,
        // Node energy, its estimated part and its time differ from every
        // GPU field, so that a column mixed up or dropped shows.
        node_energy_mj: energy_mj * 2,
        node_estimated_mj: energy_mj,
        node_ns: samples * 2_000_000_000,
        busy_unknown_gpu_ns: samples * 250_000_000,
        ..BucketDelta::default()
    }
}

fn cursor(epoch: u64, last_seq: u64, counter: u64) -> NodeCursor {
    NodeCursor {
        // An open whole-node stretch, one tenant of it with GPU energy
        // only.
        stretch: vec![
            (
                Arc::from("t"),
                StretchWeight {
                    gpu_energy_mj: counter,
                    gpu_ns: 7,
                    runs: vec![
                        Run {
                            from_ns: -3,
                            to_ns: 2,
                            gpu_ns: 5,
                        },
                        Run {
                            from_ns: 4,
                            to_ns: i64::try_from(last_seq).unwrap(),
                            gpu_ns: 2,
                        },
                    ],
                },
            ),
            (
                Arc::from("u"),
                StretchWeight {
                    gpu_energy_mj: 1,
                    gpu_ns: 0,
                    runs: Vec::new(),
                },
            ),
        ],
        epoch,
        last_seq,
        gpus: vec![(
            Arc::from("GPU-1"),
            GpuCursor {
                changed_ns: None,
                last_counter_mj: Some(counter),
                last_timestamp_ns: Some(i64::try_from(last_seq).unwrap() * 1_000_000_000),
                remainder_mw_ns: 123,
                energy_mj: counter,
                counter_resets: 1,
            },
        )],
        power: vec![
            (
                Arc::from("redfish/1"),
                GpuCursor {
                    changed_ns: Some(i64::try_from(last_seq).unwrap() * 1_000_000_000),
                    last_counter_mj: Some(counter * 10),
                    last_timestamp_ns: Some(i64::try_from(last_seq).unwrap() * 2_000_000_000),
                    remainder_mw_ns: 7,
                    energy_mj: counter * 9,
                    counter_resets: 2,
                },
            ),
            (
                Arc::from("rapl/package-0"),
                GpuCursor {
                    changed_ns: None,
                    last_counter_mj: None,
                    last_timestamp_ns: None,
                    remainder_mw_ns: 999_999,
                    energy_mj: counter * 3,
                    counter_resets: 0,
                },
            ),
        ],
    }
}

/// A commit of `node`'s cursor and `energy` mJ for tenant `t` in `minute`.
fn booking(node: &str, c: NodeCursor, t: &str, minute: i64, energy: u64) -> Commit {
    let mut commit = Commit::default();
    commit.nodes.insert(Arc::from(node), c);
    commit
        .buckets
        .insert((Arc::from(t), Arc::from(node), minute), delta(energy, 3));
    commit.tenant_energy.insert(Arc::from(t), energy);
    commit
}

fn no_contracts() -> TenantHistory {
    TenantHistory::new(Arc::new(Tenants::empty()))
}

/// Bookings read back exactly: minutes, usage spans, tenants and totals.
pub(crate) fn commit_reads_back_to_the_millijoule<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let mut c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_234_567);
    c.buckets.insert(
        (Arc::from("lab-a"), Arc::from("n1"), MINUTE + 60),
        delta(7_654_321, 2),
    );
    c.buckets
        .insert((Arc::from("lab-b"), Arc::from("n1"), MINUTE), delta(1, 1));
    c.tenant_energy
        .insert(Arc::from("lab-a"), 1_234_567 + 7_654_321);
    c.tenant_energy.insert(Arc::from("lab-b"), 1);
    let done = w.commit_as("a", &c, MINUTE + 120, i64::MIN).unwrap();
    assert_eq!(done.revision, 1);
    // The same minutes again add up.
    let again = booking("n1", cursor(1, 11, 6_000), "lab-a", MINUTE, 3);
    assert_eq!(
        w.commit_as("a", &again, MINUTE + 121, i64::MIN)
            .unwrap()
            .revision,
        2
    );

    let r = &f.reader;
    assert_eq!(
        r.minutes(Some("lab-a"), MINUTE, MINUTE + 3600).unwrap(),
        vec![
            ("lab-a".to_string(), MINUTE, {
                let mut d = delta(1_234_567, 3);
                d.add(&delta(3, 3));
                d
            }),
            ("lab-a".to_string(), MINUTE + 60, delta(7_654_321, 2)),
        ]
    );
    let usage = r.usage(None, MINUTE, MINUTE + 3600).unwrap();
    let energy: HashMap<&str, u64> = usage.spans.iter().fold(HashMap::new(), |mut m, (t, s)| {
        *m.entry(t.as_str()).or_default() += s.delta.energy_mj;
        m
    });
    assert_eq!(energy["lab-a"], 1_234_567 + 3 + 7_654_321);
    assert_eq!(energy["lab-b"], 1);
    assert_eq!(usage.revision, 2);
    assert!(usage.adjustments.is_empty());
    assert_eq!(r.tenants().unwrap(), vec!["lab-a", "lab-b"]);
    let mut totals = f.writer.restore().unwrap().tenant_energy;
    totals.sort();
    assert_eq!(
        totals,
        vec![
            ("lab-a".to_string(), 1_234_567 + 3 + 7_654_321),
            ("lab-b".to_string(), 1)
        ]
    );
}

/// A fenced commit is refused as a whole: no bucket, no cursor, no total,
/// no revision, and it claims nothing.
pub(crate) fn a_refused_commit_writes_nothing<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let b = w.claim("b", "n1").unwrap();
    let mut c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    c.nodes.insert(Arc::from("n2"), cursor(1, 3, 9_000));
    c.buckets.insert(
        (Arc::from("lab-a"), Arc::from("n2"), MINUTE),
        delta(2_000, 1),
    );
    match w.commit_as("a", &c, MINUTE + 60, MINUTE + 3600) {
        Err(LedgerError::Fenced {
            node,
            holder,
            generation,
            others,
        }) => assert_eq!(
            (node.as_str(), holder.as_str(), generation, others),
            ("n1", "b", b.generation, vec![])
        ),
        other => panic!("a fenced commit went through: {other:?}"),
    }
    let snap = w.restore().unwrap();
    assert!(snap.nodes.is_empty(), "{snap:?}");
    assert!(snap.tenant_energy.is_empty(), "{snap:?}");
    assert_eq!(w.finalized_through().unwrap(), 0, "the watermark moved");
    // n2, in the refused commit, was not claimed by it.
    assert_eq!(w.claim("c", "n2").unwrap().generation, 1);
    let r = &f.reader;
    assert!(r.minutes(None, 0, i64::MAX).unwrap().is_empty());
    let usage = r.usage(None, 0, i64::MAX).unwrap();
    assert_eq!((usage.revision, usage.spans.len()), (0, 0));
    assert!(r.tenants().unwrap().is_empty());
}

/// Holder A claims, holder B claims: A's commit is refused, B's goes
/// through, and A's claim afterwards finds B's cursor under a new
/// generation.
pub(crate) fn a_commit_after_another_holders_claim_is_fenced<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    let a = w.claim("a", "n1").unwrap();
    assert_eq!(a.cursor, None);
    let b = w.claim("b", "n1").unwrap();
    assert!(b.generation > a.generation, "{a:?} then {b:?}");
    let from_a = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    assert!(matches!(
        w.commit_as("a", &from_a, MINUTE + 60, i64::MIN),
        Err(LedgerError::Fenced { .. })
    ));
    let from_b = booking("n1", cursor(2, 4, 7_000), "lab-a", MINUTE, 2_000);
    w.commit_as("b", &from_b, MINUTE + 60, i64::MIN).unwrap();
    let back = w.claim("a", "n1").unwrap();
    assert!(back.generation > b.generation);
    assert_eq!(back.cursor, Some(cursor(2, 4, 7_000)));
    // B lost it in turn.
    assert!(matches!(
        w.commit_as("b", &from_b, MINUTE + 60, i64::MIN),
        Err(LedgerError::Fenced { .. })
    ));
    let mins = f.reader.minutes(None, 0, i64::MAX).unwrap();
    assert_eq!(mins.len(), 1);
    assert_eq!(mins[0].2.energy_mj, 2_000, "only B's commit counted");
}

/// A holder claiming a node it holds (its agent reconnected) keeps the
/// generation, and its pending commit still goes through.
/// `holders` names each node's holder by its last claim (or the commit
/// that claimed it), `None` for a node never claimed, in the order asked,
/// and takes no claim itself.
pub(crate) fn holders_name_the_last_claim_and_claim_nothing<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    assert_eq!(w.holders(&[]).unwrap(), Vec::<Option<String>>::new());
    assert_eq!(w.holders(&["n1"]).unwrap(), [None]);
    let first = w.claim("a", "n1").unwrap();
    w.claim("b", "n2").unwrap();
    let c = booking("n3", cursor(1, 1, 1), "lab-a", MINUTE, 5);
    w.commit_as("b", &c, MINUTE + 60, i64::MIN).unwrap();
    let some = |h: &str| Some(h.to_string());
    assert_eq!(
        w.holders(&["n2", "n9", "n1", "n3", "n1"]).unwrap(),
        [some("b"), None, some("a"), some("b"), some("a")]
    );
    w.claim("b", "n1").unwrap();
    assert_eq!(w.holders(&["n1"]).unwrap(), [some("b")]);
    // Asking moved nothing: a claim back by "a" bumps the generation once
    // more, from the one "b" took.
    let back = w.claim("a", "n1").unwrap();
    assert_eq!(back.generation, first.generation + 2);
}

pub(crate) fn a_claim_by_the_same_holder_keeps_its_generation<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    let first = w.claim("a", "n1").unwrap();
    let again = w.claim("a", "n1").unwrap();
    assert_eq!(again.generation, first.generation);
    let both = w.claim_nodes("a", &["n1", "n2"]).unwrap();
    assert_eq!(both[0].generation, first.generation);
    let c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    w.commit_as("a", &c, MINUTE + 60, i64::MIN).unwrap();
    assert_eq!(w.claim("a", "n1").unwrap().generation, first.generation);
    // A node first seen in a commit is claimed by it.
    let mut c = booking("n3", cursor(1, 1, 1), "lab-a", MINUTE, 5);
    c.nodes.insert(Arc::from("n1"), cursor(1, 11, 5_001));
    w.commit_as("a", &c, MINUTE + 60, i64::MIN).unwrap();
    let n3 = w.claim("a", "n3").unwrap();
    assert_eq!(n3.cursor, Some(cursor(1, 1, 1)));
    assert!(matches!(
        w.commit_as(
            "b",
            &booking("n3", cursor(1, 2, 2), "lab-a", MINUTE, 1),
            MINUTE + 60,
            i64::MIN
        ),
        Err(LedgerError::Fenced { .. })
    ));
    assert_eq!(
        f.reader.minutes(None, 0, i64::MAX).unwrap()[0].2.energy_mj,
        1_005
    );
}

/// What a restore returns is what was committed: the latest cursor of
/// every node, whoever committed it, and the tenant totals.
pub(crate) fn restore_returns_what_was_committed<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    assert!(w.restore().unwrap().nodes.is_empty());
    w.claim("a", "n1").unwrap();
    w.claim("b", "n2").unwrap();
    let mut c = booking("n1", cursor(3, 10, 5_000), "lab-a", MINUTE, 1_000);
    w.commit_as("a", &c, MINUTE + 60, i64::MIN).unwrap();
    c = booking("n1", cursor(3, 12, 6_000), "lab-a", MINUTE + 60, 500);
    w.commit_as("a", &c, MINUTE + 120, i64::MIN).unwrap();
    c = booking("n2", cursor(1, 1, 42), "lab-b", MINUTE, 7);
    w.commit_as("b", &c, MINUTE + 120, i64::MIN).unwrap();
    let mut snap = w.restore().unwrap();
    snap.nodes.sort_by(|a, b| a.0.cmp(&b.0));
    snap.tenant_energy.sort();
    assert_eq!(
        snap.nodes,
        vec![
            ("n1".to_string(), cursor(3, 12, 6_000)),
            ("n2".to_string(), cursor(1, 1, 42))
        ]
    );
    assert_eq!(
        snap.tenant_energy,
        vec![("lab-a".to_string(), 1_500), ("lab-b".to_string(), 7)]
    );
    assert_eq!(
        w.claim("b", "n1").unwrap().cursor,
        Some(cursor(3, 12, 6_000))
    );
}

/// The tenants' totals are the sum of every holder's commits, read alone
/// as `restore` returns them.
pub(crate) fn tenant_totals_add_up_every_holders_commits<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    assert_eq!(w.tenant_totals().unwrap(), Default::default());
    w.claim("a", "n1").unwrap();
    w.claim("b", "n2").unwrap();
    let c = booking("n1", cursor(3, 10, 5_000), "lab-a", MINUTE, 1_000);
    w.commit_as("a", &c, MINUTE + 60, i64::MIN).unwrap();
    let c = booking("n2", cursor(1, 1, 42), "lab-a", MINUTE, 7);
    w.commit_as("b", &c, MINUTE + 60, i64::MIN).unwrap();
    let mut totals = w.tenant_totals().unwrap();
    totals.tenant_energy.sort();
    assert_eq!(totals.tenant_energy, vec![("lab-a".to_string(), 1_007)]);
    let mut snap = w.restore().unwrap();
    snap.tenant_energy.sort();
    snap.tenant_over_contract_ns.sort();
    totals.tenant_over_contract_ns.sort();
    assert_eq!(snap.tenant_energy, totals.tenant_energy);
    assert_eq!(snap.tenant_over_contract_ns, totals.tenant_over_contract_ns);
    totals.tenant_node_energy.sort();
    assert_eq!(
        totals.tenant_node_energy,
        vec![("lab-a".to_string(), 2 * 1_007)]
    );
    snap.tenant_node_energy.sort();
    assert_eq!(snap.tenant_node_energy, totals.tenant_node_energy);
}

/// The compaction lease is one holder's until it expires or is released;
/// compaction under a lease that passed on is refused. The clock is an
/// argument: no sleeps.
pub(crate) fn the_compaction_lease_is_exclusive_and_expires<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    let ttl = Duration::from_secs(60);
    let policy = Compaction {
        closed_before: 0,
        minutes_from: 0,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    let contracts = no_contracts();
    let a = w.acquire_compaction("a", 1_000, ttl).unwrap();
    assert_eq!(
        a,
        CompactionLease {
            holder: "a".into(),
            expires_at: 1_060
        }
    );
    match w.acquire_compaction("b", 1_030, ttl) {
        Err(LedgerError::LeaseHeld { holder, until }) => {
            assert_eq!((holder.as_str(), until), ("a", 1_060))
        }
        other => panic!("a second holder got the lease: {other:?}"),
    }
    w.compact_under(&a, 1_030, &policy, &contracts).unwrap();
    // Renewed by its holder.
    let a = w.acquire_compaction("a", 1_050, ttl).unwrap();
    assert_eq!(a.expires_at, 1_110);
    assert!(matches!(
        w.acquire_compaction("b", 1_109, ttl),
        Err(LedgerError::LeaseHeld { .. })
    ));
    // Expired: another holder takes it, and the first may not compact.
    assert!(matches!(
        w.compact_under(&a, 1_110, &policy, &contracts),
        Err(LedgerError::LeaseLost { .. })
    ));
    let b = w.acquire_compaction("b", 1_110, ttl).unwrap();
    assert!(matches!(
        w.compact_under(&a, 1_111, &policy, &contracts),
        Err(LedgerError::LeaseLost { .. })
    ));
    w.compact_under(&b, 1_111, &policy, &contracts).unwrap();
    // Released: free at once; releasing a lease no longer held changes
    // nothing.
    w.release_compaction(&b).unwrap();
    let a = w.acquire_compaction("a", 1_112, ttl).unwrap();
    w.release_compaction(&b).unwrap();
    assert!(matches!(
        w.acquire_compaction("b", 1_113, ttl),
        Err(LedgerError::LeaseHeld { .. })
    ));
    w.compact_under(&a, 1_113, &policy, &contracts).unwrap();
}

/// Tenant file versions come back in the order they were added, through
/// the writer and the reader.
pub(crate) fn tenant_versions_round_trip<W: LedgerWriter, R: LedgerReader>(mut f: Fresh<W, R>) {
    let w = &mut f.writer;
    assert!(w.tenant_versions().unwrap().is_empty());
    let versions = [
        TenantVersion {
            effective_from_ns: 5,
            loaded_at_ns: 10,
            file: "[[tenant]]\nid = \"b\"\n".into(),
        },
        TenantVersion {
            effective_from_ns: 1,
            loaded_at_ns: 20,
            file: "[[tenant]]\nid = \"a\"\n".into(),
        },
    ];
    for v in &versions {
        w.add_tenant_version(v).unwrap();
    }
    assert_eq!(w.tenant_versions().unwrap(), versions);
    assert_eq!(f.reader.tenant_versions().unwrap(), versions);
    assert_eq!(f.reader.tenant_version_count().unwrap(), 2);
}

/// A delta for a minute behind the watermark is an adjustment of the
/// revision that booked it; the minute itself stays as it was.
pub(crate) fn late_deltas_after_the_watermark_are_adjustments<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    w.commit_as("a", &c, MINUTE + 60, MINUTE + 900).unwrap();
    assert_eq!(w.finalized_through().unwrap(), MINUTE + 900);
    // The watermark never moves back.
    let c = booking("n1", cursor(1, 11, 5_250), "lab-a", MINUTE, 250);
    let done = w.commit_as("a", &c, MINUTE + 4_000, 0).unwrap();
    assert_eq!(done.revision, 2);
    assert_eq!(w.finalized_through().unwrap(), MINUTE + 900);
    let r = &f.reader;
    let usage = r.usage_since(None, MINUTE, MINUTE + 3600, 0).unwrap();
    assert_eq!(usage.finalized_through, MINUTE + 900);
    assert_eq!(usage.spans.len(), 1);
    assert_eq!(
        usage.spans[0].1.delta.energy_mj, 1_000,
        "a final minute changed"
    );
    assert_eq!(usage.adjustments.len(), 1);
    let adj = &usage.adjustments[0];
    assert_eq!(
        (
            adj.revision,
            adj.booked_at,
            adj.tenant.as_str(),
            adj.node.as_str(),
            adj.minute_start
        ),
        (2, MINUTE + 4_000, "lab-a", "n1", MINUTE)
    );
    assert_eq!(adj.delta, delta(250, 3));
    assert!(
        r.usage_since(None, MINUTE, MINUTE + 3600, 2)
            .unwrap()
            .adjustments
            .is_empty()
    );
    assert_eq!(
        r.usage(None, MINUTE, MINUTE + 3600)
            .unwrap()
            .adjustments
            .len(),
        1
    );
    // The adjustments alone: the same, with the snapshot's revision and
    // watermark, and no span.
    let alone = r.adjustments_since(None, MINUTE, MINUTE + 3600, 0).unwrap();
    assert!(alone.spans.is_empty());
    assert_eq!(alone.adjustments, usage.adjustments);
    assert_eq!(
        (alone.revision, alone.finalized_through),
        (usage.revision, usage.finalized_through)
    );
    for (tenant, from, since) in [
        (Some("lab-b"), MINUTE, 0),
        (None, MINUTE + 60, 0),
        (None, MINUTE, 2),
    ] {
        assert!(
            r.adjustments_since(tenant, from, MINUTE + 3600, since)
                .unwrap()
                .adjustments
                .is_empty(),
            "{tenant:?} from {from} since {since}"
        );
    }
    let snap = w.restore().unwrap();
    assert_eq!(snap.tenant_energy, vec![("lab-a".to_string(), 1_250)]);
    // An adjustment's node energy counts in the total as a minute's does.
    assert_eq!(
        snap.tenant_node_energy,
        vec![("lab-a".to_string(), 2 * 1_250)]
    );
}

/// A commit with an id: once written, `commit_written` says so, and the
/// same commit again (a retry of a commit whose answer was lost) is
/// refused and writes nothing; ids are each holder's own.
pub(crate) fn a_commit_with_an_id_is_written_once<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let mut c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    c.id = Some(7);
    assert!(!w.commit_written("a", 7).unwrap(), "not written yet");
    w.commit_as("a", &c, MINUTE + 60, 0).unwrap();
    assert!(w.commit_written("a", 7).unwrap());
    assert!(!w.commit_written("a", 8).unwrap());
    assert!(!w.commit_written("b", 7).unwrap(), "another holder's");
    match w.commit_as("a", &c, MINUTE + 60, 0) {
        Err(LedgerError::Superseded {
            holder,
            id,
            expected,
            found,
        }) => assert_eq!(
            (holder.as_str(), id, expected, found),
            ("a", 7, Some(7), Some(7))
        ),
        other => panic!("a commit was written twice: {other:?}"),
    }
    c.id = Some(8);
    w.commit_as("a", &c, MINUTE + 60, 0).unwrap();
    w.claim("b", "n2").unwrap();
    let mut other = booking("n2", cursor(1, 3, 1_000), "lab-a", MINUTE, 10);
    other.id = Some(1);
    w.commit_as("b", &other, MINUTE + 60, 0).unwrap();
    assert_eq!(
        f.reader.minutes(None, 0, i64::MAX).unwrap(),
        vec![("lab-a".to_string(), MINUTE, {
            let mut d = delta(2_000, 6);
            d.add(&delta(10, 3));
            d
        })]
    );
}

/// A commit several of whose nodes other holders took is refused once,
/// naming them all (in byte order), so that the committer drops them in
/// one go rather than retrying once per node.
pub(crate) fn one_refusal_names_every_node_another_holder_took<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    let nodes = ["n1", "n2", "n3", "n10"];
    w.claim_nodes("a", &nodes).unwrap();
    let g2 = w.claim("b", "n2").unwrap().generation;
    let g10 = w.claim("c", "n10").unwrap().generation;
    let g3 = w.claim("b", "n3").unwrap().generation;
    let mut c = Commit::default();
    for n in nodes {
        c.nodes.insert(Arc::from(n), cursor(1, 5, 100));
    }
    match w.commit_as("a", &c, MINUTE, 0) {
        Err(LedgerError::Fenced {
            node,
            holder,
            generation,
            others,
        }) => assert_eq!(
            (node, holder, generation, others),
            (
                "n10".to_string(),
                "c".to_string(),
                g10,
                vec![
                    ("n2".to_string(), "b".to_string(), g2),
                    ("n3".to_string(), "b".to_string(), g3)
                ]
            )
        ),
        other => panic!("a fenced commit went through: {other:?}"),
    }
    assert!(w.restore().unwrap().nodes.is_empty(), "nothing written");
}

/// Node energy, its estimated part and its time are kept through the
/// hourly rollup with the quarter-hour peak of node energy, and each
/// tenant's node energy total is the sum of its buckets and adjustments,
/// whoever committed them.
pub(crate) fn node_energy_rolls_up_and_adds_to_the_tenant_totals<
    W: LedgerWriter,
    R: LedgerReader,
>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    w.claim("b", "n2").unwrap();
    let node = |node_energy_mj: u64, node_estimated_mj: u64, node_ns: u64| BucketDelta {
        energy_mj: 1,
        node_energy_mj,
        node_estimated_mj,
        node_ns,
        ..BucketDelta::default()
    };
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 1, 10));
    // Two minutes of the first quarter-hour, one of the second.
    for (minute, d) in [
        (MINUTE, node(4_000, 1_000, 60_000_000_000)),
        (MINUTE + 60, node(5_000, 0, 30_000_000_000)),
        (MINUTE + 900, node(8_000, 8_000, 60_000_000_000)),
    ] {
        c.buckets
            .insert((Arc::from("lab-a"), Arc::from("n1"), minute), d);
    }
    // Another tenant on the node, with GPU energy and no node energy.
    c.buckets
        .insert((Arc::from("lab-b"), Arc::from("n1"), MINUTE), node(0, 0, 0));
    w.commit_as("a", &c, MINUTE + 1_000, MINUTE + 60).unwrap();
    // Another holder's node, and a late delta for the final first minute.
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n2"), cursor(1, 1, 10));
    c.buckets.insert(
        (Arc::from("lab-a"), Arc::from("n2"), MINUTE),
        node(300, 0, 6_000_000_000),
    );
    w.commit_as("b", &c, MINUTE + 1_000, MINUTE + 60).unwrap();

    let mut totals = w.tenant_totals().unwrap();
    totals.tenant_node_energy.sort();
    assert_eq!(
        totals.tenant_node_energy,
        vec![("lab-a".to_string(), 4_000 + 5_000 + 8_000 + 300)]
    );
    let usage = f
        .reader
        .usage(Some("lab-a"), MINUTE, MINUTE + 3600)
        .unwrap();
    assert_eq!(usage.adjustments.len(), 1);
    assert_eq!(usage.adjustments[0].delta, node(300, 0, 6_000_000_000));

    // The watermark passes the hour: it may be rolled up.
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 2, 11));
    w.commit_as("a", &c, MINUTE + 4_000, MINUTE + 3600).unwrap();
    let lease = w
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 3600,
        minutes_from: MINUTE + 3600,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    let done = w
        .compact_under(&lease, 1_001, &policy, &no_contracts())
        .unwrap();
    assert_eq!(done.hours_rolled_up, 1);
    let usage = f
        .reader
        .usage(Some("lab-a"), MINUTE, MINUTE + 3600)
        .unwrap();
    assert_eq!(usage.spans.len(), 1, "{usage:?}");
    let span = &usage.spans[0].1;
    assert_eq!(span.seconds, 3600);
    assert_eq!(
        (
            span.delta.node_energy_mj,
            span.delta.node_estimated_mj,
            span.delta.node_ns
        ),
        (4_000 + 5_000 + 8_000, 1_000 + 8_000, 150_000_000_000)
    );
    assert_eq!(span.node_peak_quarter_mj, Some(4_000 + 5_000));
    assert_eq!(span.peak_quarter_mj, Some(2));
}

/// Over-contract time and overage are measured on the tenant's basis: a
/// node-basis tenant by its node energy, a facility one by node energy
/// times its PUE, a GPU one by GPU energy; at commit and in the rollup.
pub(crate) fn over_contract_is_measured_on_each_tenants_basis<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    // 1 mW: 60 mJ a minute.
    let tenants = Tenants::from_toml(
        "[[tenant]]\nid = \"g\"\ncontracted_kw = 0.000001\n
         [[tenant]]\nid = \"n\"\ncontracted_kw = 0.000001\nbasis = \"node\"\n
         [[tenant]]\nid = \"f\"\ncontracted_kw = 0.000001\nbasis = \"facility\"\npue = 1.5\n",
    )
    .unwrap();
    let history = Arc::new(TenantHistory::new(Arc::new(tenants)));
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 1, 10));
    // GPU energy under the contract, node energy over it; facility: 50 ×
    // 1.5 = 75 mJ, over by 15.
    let bucket = BucketDelta {
        energy_mj: 10,
        node_energy_mj: 50,
        ..BucketDelta::default()
    };
    for t in ["g", "n", "f"] {
        c.buckets
            .insert((Arc::from(t), Arc::from("n1"), MINUTE), bucket);
    }
    c.contracts = Some(history.clone());
    let done = w.commit_as("a", &c, MINUTE + 30, i64::MIN).unwrap();
    assert_eq!(
        done.over_contract_ns,
        vec![(Arc::from("f"), 60_000_000_000)]
    );
    // More node energy in the same minute puts "n" over too.
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 2, 11));
    for t in ["g", "n", "f"] {
        c.buckets.insert(
            (Arc::from(t), Arc::from("n1"), MINUTE),
            BucketDelta {
                node_energy_mj: 20,
                ..BucketDelta::default()
            },
        );
    }
    c.contracts = Some(history.clone());
    let done = w.commit_as("a", &c, MINUTE + 40, MINUTE + 3600).unwrap();
    assert_eq!(
        done.over_contract_ns,
        vec![(Arc::from("n"), 60_000_000_000)]
    );
    let lease = w
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 3600,
        minutes_from: MINUTE + 3600,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    w.compact_under(&lease, 1_001, &policy, &history).unwrap();
    let usage = f.reader.usage(None, MINUTE, MINUTE + 3600).unwrap();
    let over: Vec<(&str, u64, u64)> = usage
        .spans
        .iter()
        .map(|(t, s)| (t.as_str(), s.delta.over_contract_ns, s.delta.overage_mj))
        .collect();
    // f: 70 × 1.5 = 105 mJ, 45 over; n: 70, 10 over.
    assert_eq!(
        over,
        vec![
            ("f", 60_000_000_000, 45),
            ("g", 0, 0),
            ("n", 60_000_000_000, 10)
        ]
    );
}
/// A meter's minutes are written with its state moved from where the
/// writer saw it, and only then: a second writer starting from the same
/// state (another collector) writes nothing. They read back whole, every
/// tenant's part with them, a raw register value past 2^63 included.
pub(crate) fn meter_minutes_are_allocated_once_and_read_back<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    assert_eq!(w.meter_state("row-a").unwrap(), None);
    let first = MeterState {
        allocated_through: MINUTE,
        reading_at_ns: MINUTE * 1_000_000_000 - 7,
        reading_raw: u64::MAX - 3,
        carry_mj: 12,
        revision: 0,
    };
    assert!(w.allocate_meter("row-a", None, &first, &[]).unwrap());
    // Another collector that also saw no state: refused.
    assert!(!w.allocate_meter("row-a", None, &first, &[]).unwrap());
    assert_eq!(w.meter_state("row-a").unwrap(), Some(first));
    let minutes = vec![
        MeterMinute {
            minute: MINUTE,
            metered_mj: 1_000,
            measured_mj: 900,
            unallocated_mj: 0,
            tenants: vec![
                MeterShare::new("lab-a", 600, 667, 598),
                MeterShare::new("lab-b", 300, 333, 0),
            ],
        },
        MeterMinute {
            minute: MINUTE + 60,
            metered_mj: 50,
            measured_mj: 0,
            unallocated_mj: 50,
            tenants: vec![],
        },
    ];
    let next = MeterState {
        allocated_through: MINUTE + 120,
        reading_at_ns: (MINUTE + 110) * 1_000_000_000,
        reading_raw: 5,
        carry_mj: 3,
        revision: 0,
    };
    assert!(
        w.allocate_meter("row-a", Some(&first), &next, &minutes)
            .unwrap()
    );
    // The same minutes from the same stale state: written once only.
    let twice = w.allocate_meter("row-a", Some(&first), &next, &minutes);
    assert!(!twice.unwrap());
    assert_eq!(w.meter_state("row-a").unwrap(), Some(next));
    // The read connection sees the same (the allocation reads there).
    assert_eq!(f.reader.meter_state("row-a").unwrap(), Some(next));
    assert_eq!(f.reader.meter_state("row-z").unwrap(), None);
    // Another meter's minutes are its own.
    let other = MeterMinute {
        minute: MINUTE,
        metered_mj: 7,
        measured_mj: 7,
        unallocated_mj: 0,
        tenants: vec![MeterShare::new("lab-b", 7, 7, 6)],
    };
    assert!(
        w.allocate_meter("row-b", None, &next, std::slice::from_ref(&other))
            .unwrap()
    );
    let r = &f.reader;
    let read = r
        .meter_minutes(Some("row-a"), MINUTE, MINUTE + 3600)
        .unwrap();
    assert_eq!(
        read,
        minutes
            .iter()
            .map(|m| ("row-a".to_string(), m.clone()))
            .collect::<Vec<_>>()
    );
    let all = r.meter_minutes(None, MINUTE, MINUTE + 60).unwrap();
    assert_eq!(
        all,
        vec![
            ("row-a".to_string(), minutes[0].clone()),
            ("row-b".to_string(), other)
        ]
    );
}

/// Each committed cursor keeps where its node's power readings may still
/// book energy (`NodeCursor::placing`): the earliest coarse source's last
/// change, else its newest reading (a fine counter that stands still
/// books from its last reading, not back to its last change), the newest
/// reading; a node without power readings holds nothing, and a later
/// commit of the node replaces its hold, on a fresh claim too.
pub(crate) fn each_nodes_placing_hold_is_kept_with_its_cursor<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let s = 1_000_000_000i64;
    // A whole-kWh counter's value.
    let coarse = 7 * 3_600_000_000;
    let counter = |mj: u64, changed: Option<i64>, at: i64| GpuCursor {
        last_counter_mj: Some(mj),
        last_timestamp_ns: Some(at),
        remainder_mw_ns: 0,
        energy_mj: 5,
        counter_resets: 0,
        changed_ns: changed,
    };
    let source = |changed: Option<i64>, at: i64| counter(coarse, changed, at);
    let w = &mut f.writer;
    assert_eq!(f.reader.placing_holds().unwrap(), vec![]);
    w.claim("a", "n1").unwrap();
    w.claim("a", "n2").unwrap();
    let mut c = Commit::default();
    let mut n1 = cursor(1, 10, 5_000);
    n1.power = vec![
        // A coarse counter unchanged since 08:05:30, read at 08:20:10.
        (
            Arc::from("redfish/bmc"),
            source(Some((MINUTE + 330) * s), (MINUTE + 1210) * s),
        ),
        // A fine one (RAPL) read at 08:20:40.
        (
            Arc::from("rapl/package-0"),
            counter(123_456_789, Some((MINUTE + 1240) * s), (MINUTE + 1240) * s),
        ),
    ];
    c.nodes.insert(Arc::from("n1"), n1.clone());
    // A fine counter that froze at 08:01 (a BMC answering a stale value),
    // read at 08:20:30: its next reading books from this one, so it holds
    // only from 08:20.
    let mut n3 = cursor(1, 10, 5_000);
    n3.power = vec![(
        Arc::from("redfish/bmc"),
        counter(123_456_789, Some((MINUTE + 60) * s), (MINUTE + 1230) * s),
    )];
    w.claim("a", "n3").unwrap();
    c.nodes.insert(Arc::from("n3"), n3);
    // GPUs only: no power readings, no hold.
    let n2 = NodeCursor {
        power: Vec::new(),
        ..cursor(1, 10, 5_000)
    };
    c.nodes.insert(Arc::from("n2"), n2);
    w.commit_as("a", &c, MINUTE + 1300, i64::MIN).unwrap();
    let hold = PlacingHold {
        node: "n1".into(),
        from_minute: MINUTE + 300,
        seen: MINUTE + 1240,
    };
    let frozen = PlacingHold {
        node: "n3".into(),
        from_minute: MINUTE + 1200,
        seen: MINUTE + 1230,
    };
    let mut holds = f.reader.placing_holds().unwrap();
    holds.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(holds, vec![hold.clone(), frozen.clone()]);
    let holds_of_n1 = |r: &R| {
        r.placing_holds()
            .unwrap()
            .into_iter()
            .filter(|h| h.node == "n1")
            .collect::<Vec<_>>()
    };
    // The counter steps at 08:21:10: the hold moves on.
    n1.power[0].1 = source(Some((MINUTE + 1270) * s), (MINUTE + 1270) * s);
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), n1.clone());
    w.commit_as("a", &c, MINUTE + 1300, i64::MIN).unwrap();
    let moved = PlacingHold {
        from_minute: MINUTE + 1200,
        seen: MINUTE + 1270,
        ..hold
    };
    assert_eq!(holds_of_n1(&f.reader), vec![moved.clone()]);
    // Another holder takes the node over and commits: its row, its hold.
    w.claim("b", "n1").unwrap();
    let mut c = Commit::default();
    n1.power.truncate(1);
    n1.power[0].1 = source(None, (MINUTE + 1330) * s);
    c.nodes.insert(Arc::from("n1"), n1);
    w.commit_as("b", &c, MINUTE + 1400, i64::MIN).unwrap();
    assert_eq!(
        holds_of_n1(&f.reader),
        vec![PlacingHold {
            from_minute: MINUTE + 1320,
            seen: MINUTE + 1330,
            ..moved
        }]
    );
}

/// What a node measured is its node energy where it has a whole-node
/// source (node time or node energy above 0), else its GPU energy. Node
/// energy booked without node time (a reading interval longer than the
/// staleness window carries energy but no coverage) is still node energy.
/// Energy booked late for a final minute counts as well.
pub(crate) fn node_minutes_measure_node_energy_else_gpu_energy<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    w.claim("a", "n2").unwrap();
    let mut c = booking("n1", cursor(1, 10, 5_000), "lab-a", MINUTE, 1_000);
    c.nodes.insert(Arc::from("n2"), cursor(1, 10, 5_000));
    c.buckets.insert(
        (Arc::from("lab-b"), Arc::from("n2"), MINUTE),
        BucketDelta {
            energy_mj: 444,
            samples: 1,
            ..BucketDelta::default()
        },
    );
    c.buckets.insert(
        (Arc::from("lab-a"), Arc::from("n1"), MINUTE + 60),
        delta(5, 1),
    );
    c.buckets.insert(
        (Arc::from("lab-c"), Arc::from("n2"), MINUTE),
        BucketDelta {
            energy_mj: 100,
            node_energy_mj: 7_000,
            node_ns: 0,
            samples: 1,
            ..BucketDelta::default()
        },
    );
    w.commit_as("a", &c, MINUTE + 120, i64::MIN).unwrap();
    let got = w.node_minutes(MINUTE, MINUTE + 60).unwrap();
    assert_eq!(
        got,
        vec![
            NodeMinute {
                tenant: "lab-a".into(),
                node: "n1".into(),
                minute: MINUTE,
                // delta(): node energy is twice the GPU energy.
                measured_mj: 2_000,
                node_energy_mj: 2_000,
            },
            NodeMinute {
                tenant: "lab-b".into(),
                node: "n2".into(),
                minute: MINUTE,
                measured_mj: 444,
                node_energy_mj: 0,
            },
            NodeMinute {
                tenant: "lab-c".into(),
                node: "n2".into(),
                minute: MINUTE,
                measured_mj: 7_000,
                node_energy_mj: 7_000,
            },
        ]
    );
    assert_eq!(w.node_minutes(MINUTE, MINUTE + 120).unwrap().len(), 4);
    assert_eq!(f.reader.node_minutes(MINUTE, MINUTE + 60).unwrap(), got);
    // One tenant's, chosen by the ledger.
    let r = &f.reader;
    assert_eq!(
        r.tenant_node_minutes(Some("lab-c"), MINUTE, MINUTE + 60)
            .unwrap(),
        vec![got[2].clone()]
    );
    assert_eq!(
        r.tenant_node_minutes(None, MINUTE, MINUTE + 60).unwrap(),
        got
    );
    assert!(
        r.tenant_node_minutes(Some("nobody"), MINUTE, MINUTE + 60)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        f.reader.finalized_through().unwrap(),
        f.writer.finalized_through().unwrap()
    );
    // The minute becomes final, then energy for it arrives late: its
    // adjustments are measured energy too (a tenant only they name
    // included), while the node energy a meter's allocation replaces
    // stays the bucket's.
    let w = &mut f.writer;
    w.commit_as("a", &Commit::default(), MINUTE + 180, MINUTE + 60)
        .unwrap();
    let mut late = booking("n1", cursor(1, 11, 5_300), "lab-a", MINUTE, 0);
    late.buckets
        .insert((Arc::from("lab-a"), Arc::from("n1"), MINUTE), delta(300, 1));
    late.nodes.insert(Arc::from("n2"), cursor(1, 11, 5_050));
    late.buckets.insert(
        (Arc::from("lab-d"), Arc::from("n2"), MINUTE),
        BucketDelta {
            energy_mj: 50,
            samples: 1,
            ..BucketDelta::default()
        },
    );
    let done = w.commit_as("a", &late, MINUTE + 240, MINUTE + 60).unwrap();
    let usage = f.reader.usage_since(None, MINUTE, MINUTE + 60, 0).unwrap();
    assert_eq!(
        usage.adjustments.len(),
        2,
        "the late energy is no adjustment"
    );
    assert!(done.revision > 0);
    let mut want = got.clone();
    want[0].measured_mj += 600;
    want.push(NodeMinute {
        tenant: "lab-d".into(),
        node: "n2".into(),
        minute: MINUTE,
        measured_mj: 50,
        node_energy_mj: 0,
    });
    assert_eq!(w.node_minutes(MINUTE, MINUTE + 60).unwrap(), want);
    assert_eq!(f.reader.node_minutes(MINUTE, MINUTE + 60).unwrap(), want);
    assert_eq!(
        f.reader
            .tenant_node_minutes(Some("lab-d"), MINUTE, MINUTE + 60)
            .unwrap(),
        vec![want[3].clone()]
    );
}

/// A facility-basis tenant with one node under a meter and one under
/// none: before the meter allocates a minute, its usage row is node
/// energy times the PUE, flagged estimated and pending; once allocated,
/// the allocation plus the unmetered node's energy times the PUE, to the
/// millijoule, and time over contract and overage are measured on that.
/// A tenant without a PUE under the meter has no facility energy until
/// the meter allocates (absent, not 0), then its allocation.
pub(crate) fn facility_usage_is_the_allocation_plus_pue_times_unmetered_node_energy<
    W: LedgerWriter,
    R: LedgerReader,
>(
    mut f: Fresh<W, R>,
) {
    // 2.5 W: 150,000 mJ a minute.
    let tenants = Arc::new(
        Tenants::from_toml(
            "[[tenant]]\nid = \"f\"\nnodes = [\"m1\", \"u1\"]\ncontracted_kw = 0.0025\nbasis = \"facility\"\npue = 1.5\n
             [[tenant]]\nid = \"x\"\nnodes = [\"m2\"]\ncontracted_kw = 1\n",
        )
        .unwrap(),
    );
    let history = Arc::new(TenantHistory::new(tenants.clone()));
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<crate::meters::MeterConfig>,
    }
    let file: File = toml::from_str(
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    let meters = crate::meters::check(&file.meter).unwrap();
    let w = &mut f.writer;
    let mut c = Commit::default();
    for node in ["m1", "u1", "m2"] {
        w.claim("a", node).unwrap();
        c.nodes.insert(Arc::from(node), cursor(1, 1, 10));
    }
    let node_energy = |gpu: u64, node: u64| BucketDelta {
        energy_mj: gpu,
        node_energy_mj: node,
        node_ns: 60_000_000_000,
        samples: 1,
        ..BucketDelta::default()
    };
    for minute in [MINUTE, MINUTE + 60] {
        c.buckets.insert(
            (Arc::from("f"), Arc::from("m1"), minute),
            node_energy(20_000, 60_000),
        );
        c.buckets.insert(
            (Arc::from("f"), Arc::from("u1"), minute),
            node_energy(10_000, 40_000),
        );
        c.buckets.insert(
            (Arc::from("x"), Arc::from("m2"), minute),
            node_energy(5_000, 30_000),
        );
    }
    c.contracts = Some(history.clone());
    // (100,000 mJ × 1.5 at commit: not over the contract.)
    let done = w.commit_as("a", &c, MINUTE + 130, MINUTE + 900).unwrap();
    assert!(
        done.over_contract_ns.is_empty(),
        "{:?}",
        done.over_contract_ns
    );
    let rows_with = |r: &R, meters: &[crate::meters::MeterSpec]| {
        let reader: &dyn LedgerReader = r;
        crate::usage::run(
            reader,
            &tenants,
            &history,
            meters,
            None,
            Some("2027-01-15T08:00:00Z"),
            Some("2027-01-15T08:02:00Z"),
            Some("1m"),
            None,
            None,
        )
        .unwrap()
        .rows
        .into_iter()
        .filter(|r| r.tenant != "unassigned")
        .map(|r| {
            (
                r.tenant,
                r.start,
                r.facility_energy_millijoules,
                r.facility_energy_estimated,
                r.facility_energy_pending,
                r.seconds_over_contract.unwrap(),
                (r.overage_kwh.unwrap() * 3.6e9).round() as u64,
                (r.average_power_watts * 60_000.0).round() as u64,
            )
        })
        .collect::<Vec<_>>()
    };
    let rows = |r: &R| rows_with(r, &meters);
    let (m0, m1) = ("2027-01-15T08:00:00Z", "2027-01-15T08:01:00Z");
    let row = |t: &str, at: &str, mj, est, pending, over, overage, basis_mj| {
        (
            t.to_string(),
            at.to_string(),
            mj,
            est,
            pending,
            over,
            overage,
            basis_mj,
        )
    };
    // A meter that never answered has no first minute: none of these is
    // its to allocate, so the estimate stands, not pending.
    let estimate = rows(&f.reader);
    assert!(estimate.iter().all(|r| !r.4), "{estimate:?}");
    // Its first round, from 08:00: its state, no minute yet.
    let start = MeterState {
        allocated_through: MINUTE,
        reading_at_ns: MINUTE * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision: 0,
    };
    assert!(f.writer.allocate_meter("row-a", None, &start, &[]).unwrap());
    // Before any allocation: the estimate, 150,000 mJ, flagged; "x" has no
    // PUE and so no facility energy yet. ("x" is on GPU energy.)
    assert_eq!(
        rows(&f.reader),
        vec![
            row("f", m0, Some(150_000), true, true, 0.0, 0, 150_000),
            row("f", m1, Some(150_000), true, true, 0.0, 0, 150_000),
            row("x", m0, None, false, false, 0.0, 0, 5_000),
            row("x", m1, None, false, false, 0.0, 0, 5_000),
        ]
    );
    // The meter allocates the first minute: 90,001 mJ to "f" for its
    // 60,000 on m1, 44,999 to "x".
    let allocated = MeterMinute {
        minute: MINUTE,
        metered_mj: 135_000,
        measured_mj: 90_000,
        unallocated_mj: 0,
        tenants: vec![
            MeterShare::new("f", 60_000, 90_001, 60_000),
            MeterShare::new("x", 30_000, 44_999, 30_000),
        ],
    };
    let state = MeterState {
        allocated_through: MINUTE + 60,
        reading_at_ns: (MINUTE + 60) * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision: 0,
    };
    assert!(
        f.writer
            .allocate_meter(
                "row-a",
                Some(&start),
                &state,
                std::slice::from_ref(&allocated)
            )
            .unwrap()
    );
    // The allocation is booked as adjustments of a revision of its own:
    // each tenant-minute's part and the node energy it replaces; the
    // report restates f's facility energy by 90,001 − 1.5 × 60,000 = 1 mJ,
    // and x's (no PUE, so no estimate) is its allocation alone.
    let after = f.reader.usage(None, MINUTE, MINUTE + 120).unwrap();
    assert_eq!(after.revision, done.revision + 1);
    let booked: Vec<_> = after
        .adjustments
        .iter()
        .map(|a| {
            (
                a.revision,
                a.tenant.as_str(),
                a.node.as_str(),
                a.minute_start,
                a.metered,
                a.delta,
            )
        })
        .collect();
    let part = |allocated_mj, node_mj| crate::accounting::MeteredChange {
        allocated_mj,
        node_mj,
    };
    assert_eq!(
        booked,
        vec![
            (
                after.revision,
                "f",
                "",
                MINUTE,
                part(90_001, 60_000),
                BucketDelta::default()
            ),
            (
                after.revision,
                "x",
                "",
                MINUTE,
                part(44_999, 30_000),
                BucketDelta::default()
            ),
        ]
    );
    // Once: the same allocation from the same state books nothing.
    assert!(
        !f.writer
            .allocate_meter("row-a", None, &state, &[allocated])
            .unwrap()
    );
    assert_eq!(f.reader.usage(None, MINUTE, MINUTE + 120).unwrap(), after);
    let restated = {
        let reader: &dyn LedgerReader = &f.reader;
        crate::usage::run(
            reader,
            &tenants,
            &history,
            &meters,
            None,
            Some("2027-01-15T08:00:00Z"),
            Some("2027-01-15T08:02:00Z"),
            Some("1m"),
            None,
            Some(&done.revision.to_string()),
        )
        .unwrap()
        .adjustments
        .into_iter()
        .map(|a| {
            (
                a.tenant,
                a.facility_allocated_millijoules,
                a.facility_replaced_node_millijoules,
                a.facility_energy_restated_millijoules,
            )
        })
        .collect::<Vec<_>>()
    };
    assert_eq!(
        restated,
        vec![
            ("f".to_string(), 90_001, 60_000, Some(1)),
            ("x".to_string(), 44_999, 30_000, None),
        ]
    );
    // f: 90,001 + 40,000 × 1.5 = 150,001 mJ, 1 mJ over the contract; the
    // second minute is still the estimate.
    assert_eq!(
        rows(&f.reader),
        vec![
            row("f", m0, Some(150_001), true, false, 60.0, 1, 150_001),
            row("f", m1, Some(150_000), true, true, 0.0, 0, 150_000),
            row("x", m0, Some(44_999), false, false, 0.0, 0, 5_000),
            row("x", m1, None, false, false, 0.0, 0, 5_000),
        ]
    );
    // The meter's node list changes to feed u1 instead: the allocated
    // minute stays as allocated (its parts keep the node energy they
    // replaced); the other one is pending on u1 now, not on m1.
    let file: File = toml::from_str(
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"u*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    let moved = crate::meters::check(&file.meter).unwrap();
    assert_eq!(
        rows_with(&f.reader, &moved),
        vec![
            row("f", m0, Some(150_001), true, false, 60.0, 1, 150_001),
            row("f", m1, Some(150_000), true, true, 0.0, 0, 150_000),
            row("x", m0, Some(44_999), false, false, 0.0, 0, 5_000),
            row("x", m1, None, false, false, 0.0, 0, 5_000),
        ]
    );
    // Energy booked late, for final minutes: on u1, under no meter, its
    // facility energy is its PUE estimate, as a row's is; on a metered
    // node it is none of its own (the meter's energy for the minute is all
    // given, and a split made later weighs it).
    let mut late = Commit::default();
    for (t, node, minute, gpu, node_mj) in [
        ("f", "u1", MINUTE, 1_000, 10_000),
        ("f", "m1", MINUTE + 60, 2_000, 20_000),
        ("x", "m2", MINUTE, 500, 2_000),
    ] {
        late.nodes.insert(Arc::from(node), cursor(1, 2, 11));
        late.buckets.insert(
            (Arc::from(t), Arc::from(node), minute),
            node_energy(gpu, node_mj),
        );
    }
    late.contracts = Some(history.clone());
    let booked = f
        .writer
        .commit_as("a", &late, MINUTE + 1_000, MINUTE + 900)
        .unwrap();
    let reader: &dyn LedgerReader = &f.reader;
    let late_rows: Vec<_> = crate::usage::run(
        reader,
        &tenants,
        &history,
        &meters,
        None,
        Some("2027-01-15T08:00:00Z"),
        Some("2027-01-15T08:02:00Z"),
        Some("1m"),
        None,
        Some(&(booked.revision - 1).to_string()),
    )
    .unwrap()
    .adjustments
    .into_iter()
    .filter(|a| !a.node.is_empty())
    .map(|a| {
        (
            a.tenant,
            a.node,
            a.start,
            a.node_energy_millijoules,
            a.facility_energy_restated_millijoules,
        )
    })
    .collect();
    let late_row = |t: &str, node: &str, at: &str, node_mj: u64, facility: Option<i64>| {
        (
            t.to_string(),
            node.to_string(),
            at.to_string(),
            node_mj,
            facility,
        )
    };
    assert_eq!(
        late_rows,
        vec![
            late_row("f", "m1", m1, 20_000, Some(0)),
            late_row("f", "u1", m0, 10_000, Some(15_000)),
            late_row("x", "m2", m0, 2_000, Some(0)),
        ]
    );
}

/// `/v2/usage` pages on this backend: a walk in pages of any size gives the
/// whole report's rows once, in key order, with the same figures; commits
/// between pages change nothing of the walk; the next walk since its
/// revision gets the adjustments booked meanwhile, once.
pub(crate) fn usage_pages_give_every_row_once_and_each_adjustment_once<
    W: LedgerWriter,
    R: LedgerReader,
>(
    mut f: Fresh<W, R>,
) {
    use crate::usage::{PageQuery, PageRequest, page, run};
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 10, 5_000));
    for (t, base) in [("lab-a", 1_000), ("lab-b", 2_000)] {
        for m in 0..60 {
            c.buckets.insert(
                (Arc::from(t), Arc::from("n1"), MINUTE + m * 60),
                delta(base + m as u64, 3),
            );
        }
        c.tenant_energy.insert(Arc::from(t), 60 * base + 1_770);
    }
    w.commit_as("a", &c, MINUTE + 3_660, MINUTE + 1_800)
        .unwrap();
    let tenants = Tenants::empty();
    let history = no_contracts();
    let (from, to) = ("2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z");
    let request = |limit: usize, since: Option<u64>| PageRequest {
        tenants: vec!["lab-b".into(), "lab-a".into()],
        from: Some(from.into()),
        to: Some(to.into()),
        step: Some("15m".into()),
        limit: Some(limit.to_string()),
        since_revision: since.map(|s| s.to_string()),
        ..PageRequest::default()
    };
    let whole = run(
        &f.reader,
        &tenants,
        &history,
        &[],
        None,
        Some(from),
        Some(to),
        Some("15m"),
        None,
        None,
    )
    .unwrap();
    let mut want: Vec<_> = whole
        .rows
        .into_iter()
        .filter(|r| r.tenant != "unassigned")
        .collect();
    want.sort_by(|x, y| (&x.tenant, &x.start).cmp(&(&y.tenant, &y.start)));
    assert_eq!(want.len(), 8);
    // Late energy goes to lab-b's second quarter-hour (final), which every
    // walk but the one of 8-row pages reaches on a later page.
    let late_row = (String::from("lab-b"), String::from("2027-01-15T08:15:00Z"));
    let mut late = 0u64;
    for limit in [1, 3, 8] {
        let mut req = request(limit, None);
        let mut rows = Vec::new();
        let mut revisions = Vec::new();
        let mut listed = 0;
        let late_before = late;
        let mut paged_rows = Vec::new();
        loop {
            let p = page(
                &f.reader,
                &tenants,
                &history,
                &[],
                &PageQuery::parse(&req).unwrap(),
            )
            .unwrap();
            listed += p
                .adjustments
                .iter()
                .map(|a| a.energy_millijoules)
                .sum::<u64>();
            rows.extend(p.rows.iter().map(|r| r.usage.clone()));
            paged_rows.extend(p.rows);
            revisions.push(p.revision);
            let Some(t) = p.next_page_token else { break };
            req.page_token = Some(t);
            // Late energy for a final minute of lab-b between pages.
            late += 1;
            let booked = booking(
                "n1",
                cursor(1, 10 + late, 5_000),
                "lab-b",
                MINUTE + 1_200,
                7,
            );
            f.writer
                .commit_as("a", &booked, MINUTE + 3_700 + late as i64, MINUTE + 1_800)
                .unwrap();
        }
        assert_eq!(rows, want, "limit {limit}");
        assert!(
            revisions.iter().all(|r| *r == revisions[0]),
            "{revisions:?}"
        );
        // Every page lists the adjustments up to the first page's revision:
        // those booked before the walk, not those booked during it.
        assert_eq!(listed, 7 * late_before, "limit {limit}");
        // Row revisions: the late row's is the last booked by the walk's
        // revision (each booking is a commit); untouched final rows 0;
        // partial rows none.
        for r in &paged_rows {
            let key = (r.usage.tenant.clone(), r.usage.start.clone());
            let want = if r.usage.partial {
                None
            } else if key == late_row && late_before > 0 {
                Some(revisions[0])
            } else {
                Some(0)
            };
            assert_eq!(r.revision, want, "limit {limit}: {key:?}");
        }
        assert!(paged_rows.iter().any(|r| r.revision.is_none()));
    }
    // Since the first walk's revision: all the late energy, once.
    let mut req = request(2, Some(1));
    let mut energy = 0;
    loop {
        let p = page(
            &f.reader,
            &tenants,
            &history,
            &[],
            &PageQuery::parse(&req).unwrap(),
        )
        .unwrap();
        energy += p
            .adjustments
            .iter()
            .map(|a| a.energy_millijoules)
            .sum::<u64>();
        let Some(t) = p.next_page_token else { break };
        req.page_token = Some(t);
    }
    assert_eq!(energy, 7 * late);
}

/// The tenants and the meter of the facility cases: "f" on metered m1
/// alone; "g" on metered m2 and unmetered u1; both on the facility basis
/// (PUE 1.5), "f" with 2.5 W contracted (150,000 mJ a minute).
fn facility_site() -> (
    Arc<Tenants>,
    Arc<TenantHistory>,
    Vec<crate::meters::MeterSpec>,
) {
    let tenants = Arc::new(
        Tenants::from_toml(
            "[[tenant]]\nid = \"f\"\nnodes = [\"m1\"]\ncontracted_kw = 0.0025\nbasis = \"facility\"\npue = 1.5\n
             [[tenant]]\nid = \"g\"\nnodes = [\"m2\", \"u1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
        )
        .unwrap(),
    );
    let history = Arc::new(TenantHistory::new(tenants.clone()));
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<crate::meters::MeterConfig>,
    }
    let file: File = toml::from_str(
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    (tenants, history, crate::meters::check(&file.meter).unwrap())
}

/// An hour of the facility site, committed and final: per minute k, "f"
/// has 60,000 mJ of node energy on m1 (80,000 in the last quarter-hour),
/// "g" 30,000 on m2 and 40,000 on u1. Returns the meter's minutes: "f"
/// gets 149,990 + 2k mJ (over its contract from k = 6 on), "g" 45,000 + k.
fn facility_hour<W: LedgerWriter>(w: &mut W, history: &Arc<TenantHistory>) -> Vec<MeterMinute> {
    let mut c = Commit::default();
    for node in ["m1", "m2", "u1"] {
        w.claim("a", node).unwrap();
        c.nodes.insert(Arc::from(node), cursor(1, 1, 10));
    }
    let node_energy = |node: u64| BucketDelta {
        energy_mj: node / 3,
        node_energy_mj: node,
        node_ns: 60_000_000_000,
        samples: 1,
        ..BucketDelta::default()
    };
    let mut minutes = Vec::new();
    for k in 0..60u64 {
        let minute = MINUTE + 60 * k as i64;
        let on_m1 = if k >= 45 { 80_000 } else { 60_000 };
        for (t, n, e) in [("f", "m1", on_m1), ("g", "m2", 30_000), ("g", "u1", 40_000)] {
            c.buckets
                .insert((Arc::from(t), Arc::from(n), minute), node_energy(e));
        }
        let (af, ag) = (149_990 + 2 * k, 45_000 + k);
        minutes.push(MeterMinute {
            minute,
            metered_mj: af + ag,
            measured_mj: on_m1 + 30_000,
            unallocated_mj: 0,
            tenants: vec![
                MeterShare::new("f", on_m1, af, on_m1),
                MeterShare::new("g", 30_000, ag, 30_000),
            ],
        });
    }
    c.contracts = Some(history.clone());
    w.commit_as("a", &c, MINUTE + 3_700, MINUTE + 3_600)
        .unwrap();
    minutes
}

/// What a facility tenant's usage rows say: (tenant, facility mJ,
/// estimated, pending, seconds over contract, overage mJ, peak demand mW,
/// average power mW).
type FacilityRow = (String, Option<u64>, bool, bool, u64, u64, u64, u64);

fn facility_rows<R: LedgerReader>(
    r: &R,
    site: &(
        Arc<Tenants>,
        Arc<TenantHistory>,
        Vec<crate::meters::MeterSpec>,
    ),
    step: &str,
) -> Vec<FacilityRow> {
    let reader: &dyn LedgerReader = r;
    crate::usage::run(
        reader,
        &site.0,
        &site.1,
        &site.2,
        None,
        Some("2027-01-15T08:00:00Z"),
        Some("2027-01-15T09:00:00Z"),
        Some(step),
        None,
        None,
    )
    .unwrap()
    .rows
    .into_iter()
    .filter(|r| r.tenant != "unassigned")
    .map(|r| {
        (
            r.tenant,
            r.facility_energy_millijoules,
            r.facility_energy_estimated,
            r.facility_energy_pending,
            r.seconds_over_contract.unwrap().round() as u64,
            (r.overage_kwh.unwrap() * 3.6e9).round() as u64,
            (r.peak_demand_watts.unwrap() * 1000.0).round() as u64,
            (r.average_power_watts * 1000.0).round() as u64,
        )
    })
    .collect()
}

/// An hour the meter allocated reads the same once rolled up and its
/// minutes dropped: the rollup keeps each tenant's allocation and the
/// node energy it replaced, and its time over contract, overage and peak
/// quarter-hour are measured on the allocation, as the minutes were. A
/// fully metered tenant stays unflagged; one with an unmetered node keeps
/// that node's PUE estimate beside its allocation. Minutes a meter has
/// yet to allocate are kept past their retention, and an hour rolled up
/// before its allocation is rolled up again with it.
pub(crate) fn allocated_facility_energy_survives_compaction<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let site = facility_site();
    let minutes = facility_hour(&mut f.writer, &site.1);
    let contracts = (*site.1).clone();
    let state = |through: i64| MeterState {
        allocated_through: through,
        reading_at_ns: through * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision: 0,
    };
    let half = state(MINUTE + 1_800);
    assert!(
        f.writer
            .allocate_meter("row-a", None, &half, &minutes[..30])
            .unwrap()
    );
    // Past its retention, with half of it still to allocate: the hour is
    // rolled up, its minutes kept.
    let lease = f
        .writer
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = |allocating_from: Option<i64>| Compaction {
        closed_before: MINUTE + 3_600,
        minutes_from: MINUTE + 3_600,
        hours_from: 0,
        days_from: None,
        allocating_from,
    };
    let waiting = f
        .writer
        .meter_state("row-a")
        .unwrap()
        .map(|s| s.allocated_through);
    assert_eq!(waiting, Some(MINUTE + 1_800));
    let done = f
        .writer
        .compact_under(&lease, 1_001, &policy(waiting), &contracts)
        .unwrap();
    assert_eq!((done.hours_rolled_up, done.minute_rows_dropped), (1, 0));
    assert!(
        f.writer
            .allocate_meter("row-a", Some(&half), &state(MINUTE + 3_600), &minutes[30..])
            .unwrap()
    );
    let before = facility_rows(&f.reader, &site, "1h");
    let f_mj: u64 = (0..60).map(|k| 149_990 + 2 * k).sum();
    let g_mj: u64 = (0..60).map(|k| 45_000 + k).sum::<u64>() + 60 * 60_000;
    assert_eq!(
        before
            .iter()
            .map(|r| (r.0.as_str(), r.1, r.2, r.3))
            .collect::<Vec<_>>(),
        vec![
            ("f", Some(f_mj), false, false),
            ("g", Some(g_mj), true, false)
        ]
    );
    assert!(before[0].4 > 0 && before[0].5 > 0, "f is over its contract");
    let done = f
        .writer
        .compact_under(&lease, 1_002, &policy(Some(MINUTE + 3_600)), &contracts)
        .unwrap();
    assert_eq!(
        done.hours_rolled_up, 1,
        "rolled up again with its allocation"
    );
    assert!(done.minute_rows_dropped > 0);
    let after = f.reader.usage(None, MINUTE, MINUTE + 3_600).unwrap();
    assert!(after.spans.iter().all(|(_, s)| s.seconds == 3_600));
    assert_eq!(facility_rows(&f.reader, &site, "1h"), before);
}

/// An allocated minute split again (energy booked for it after its split)
/// has its parts replaced and each tenant's change booked, signed, as an
/// adjustment of the allocation's revision, in the transaction that moves
/// the meter's state; from a state that moved meanwhile (its minutes or
/// its revision), or for a minute no longer kept, nothing is written.
pub(crate) fn a_minute_split_again_replaces_its_parts_once<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let site = facility_site();
    let minutes = facility_hour(&mut f.writer, &site.1);
    let committed = f.reader.revision().unwrap();
    let state = |through: i64, revision: u64| MeterState {
        allocated_through: through,
        reading_at_ns: through * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision,
    };
    let first = state(MINUTE + 120, committed);
    assert!(
        f.writer
            .allocate_meter("row-a", None, &first, &minutes[..2])
            .unwrap()
    );
    assert_eq!(f.writer.meter_state("row-a").unwrap(), Some(first));
    let allocated = f.reader.revision().unwrap();
    // Minute 1 again: "f" measured 500 mJ more, so takes 10 mJ of "g"'s.
    let mut again = minutes[1].clone();
    again.measured_mj += 500;
    again.tenants[0].measured_mj += 500;
    again.tenants[0].allocated_mj += 10;
    again.tenants[1].allocated_mj -= 10;
    let resplit = MeterResplit {
        minute: again.clone(),
        changes: vec![("f".into(), 10, 0), ("g".into(), -10, 0)],
    };
    let later = state(MINUTE + 120, allocated + 7);
    // From a state whose revision moved meanwhile: refused.
    assert!(
        !f.writer
            .allocate_meter_again(
                "row-a",
                Some(&state(MINUTE + 120, committed + 1)),
                &later,
                &[],
                std::slice::from_ref(&resplit),
            )
            .unwrap()
    );
    // A minute that is not kept (never allocated): refused, whole.
    let mut missing = resplit.clone();
    missing.minute.minute = MINUTE + 600;
    assert!(
        !f.writer
            .allocate_meter_again(
                "row-a",
                Some(&first),
                &later,
                &[],
                &[resplit.clone(), missing]
            )
            .unwrap()
    );
    assert_eq!(f.reader.revision().unwrap(), allocated);
    assert_eq!(f.writer.meter_state("row-a").unwrap(), Some(first));
    assert!(
        f.writer
            .allocate_meter_again(
                "row-a",
                Some(&first),
                &later,
                &[],
                std::slice::from_ref(&resplit),
            )
            .unwrap()
    );
    // Once: the same write from the same state books nothing.
    assert!(
        !f.writer
            .allocate_meter_again(
                "row-a",
                Some(&first),
                &later,
                &[],
                std::slice::from_ref(&resplit),
            )
            .unwrap()
    );
    assert_eq!(f.writer.meter_state("row-a").unwrap(), Some(later));
    let read = f
        .reader
        .meter_minutes(Some("row-a"), MINUTE, MINUTE + 120)
        .unwrap();
    assert_eq!(
        read,
        vec![
            ("row-a".to_string(), minutes[0].clone()),
            ("row-a".to_string(), again)
        ]
    );
    let usage = f
        .reader
        .usage_since(None, MINUTE, MINUTE + 3_600, allocated)
        .unwrap();
    assert_eq!(usage.revision, allocated + 1);
    let booked: Vec<_> = usage
        .adjustments
        .iter()
        .map(|a| {
            (
                a.revision,
                a.tenant.as_str(),
                a.node.as_str(),
                a.minute_start,
                a.metered,
            )
        })
        .collect();
    let change = |allocated_mj, node_mj| crate::accounting::MeteredChange {
        allocated_mj,
        node_mj,
    };
    assert_eq!(
        booked,
        vec![
            (allocated + 1, "f", "", MINUTE + 60, change(10, 0)),
            (allocated + 1, "g", "", MINUTE + 60, change(-10, 0)),
        ]
    );
    // The usage with the allocation of its minutes, in one snapshot: the
    // same as the separate reads when nothing is committed between.
    let (with, allocation) = f
        .reader
        .usage_allocated_since(None, MINUTE, MINUTE + 3_600, allocated, true)
        .unwrap();
    assert_eq!(with, usage);
    assert_eq!(
        allocation.minutes,
        f.reader
            .meter_minutes(None, MINUTE, MINUTE + 3_600)
            .unwrap()
    );
    let nodes = f
        .reader
        .tenant_node_minutes(None, MINUTE, MINUTE + 3_600)
        .unwrap();
    assert!(!nodes.is_empty());
    assert_eq!(allocation.nodes, nodes);
    let (_, of_f) = f
        .reader
        .usage_allocated_since(Some("f"), MINUTE, MINUTE + 3_600, 0, false)
        .unwrap();
    assert_eq!(of_f.minutes, allocation.minutes, "every tenant's parts");
    assert!(of_f.nodes.is_empty(), "node minutes only where asked");
    // From where minutes are kept only: none before.
    let (_, none) = f
        .reader
        .usage_allocated_since(None, 0, MINUTE, 0, true)
        .unwrap();
    assert_eq!(
        (none.minutes, none.nodes),
        (vec![], vec![]),
        "the minutes' allocation of kept minutes only"
    );
    // Where each meter started: its first minute, whatever it allocated
    // since; a meter with a state and no minute yet at its state's.
    assert_eq!(none.started, vec![("row-a".to_string(), MINUTE)]);
    assert!(
        f.writer
            .allocate_meter("row-b", None, &state(MINUTE + 600, allocated), &[])
            .unwrap()
    );
    let (_, started) = f
        .reader
        .usage_allocated_since(None, 0, MINUTE, 0, false)
        .unwrap();
    assert_eq!(
        started.started,
        vec![
            ("row-a".to_string(), MINUTE),
            ("row-b".to_string(), MINUTE + 600)
        ]
    );
}

/// A tenant whose energy in a minute was all booked late, before the
/// meter allocated it, has a part of the minute but no bucket: its rows
/// read that part, before and after the hour is rolled up.
pub(crate) fn a_part_without_a_bucket_survives_compaction<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let (_, _, meters) = facility_site();
    let tenants = Arc::new(
        Tenants::from_toml(
            "[[tenant]]\nid = \"f\"\nnodes = [\"m1\"]\ncontracted_kw = 0.0025\nbasis = \"facility\"\npue = 1.5\n
             [[tenant]]\nid = \"g\"\nnodes = [\"m2\", \"u1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n
             [[tenant]]\nid = \"h\"\nnodes = [\"m3\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
        )
        .unwrap(),
    );
    let site = (
        tenants.clone(),
        Arc::new(TenantHistory::new(tenants)),
        meters,
    );
    let mut minutes = facility_hour(&mut f.writer, &site.1);
    let late = &mut minutes[7];
    late.tenants.push(MeterShare::new("h", 5_000, 7_000, 0));
    late.metered_mj += 7_000;
    late.measured_mj += 5_000;
    let through = MeterState {
        allocated_through: MINUTE + 3_600,
        reading_at_ns: (MINUTE + 3_600) * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision: 0,
    };
    assert!(
        f.writer
            .allocate_meter("row-a", None, &through, &minutes)
            .unwrap()
    );
    let of_h = |rows: Vec<FacilityRow>| {
        rows.into_iter()
            .filter(|r| r.0 == "h")
            .map(|r| (r.1, r.2, r.3))
            .collect::<Vec<_>>()
    };
    let before = facility_rows(&f.reader, &site, "1h");
    assert_eq!(of_h(before.clone()), vec![(Some(7_000), false, false)]);
    let lease = f
        .writer
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 3_600,
        minutes_from: MINUTE + 3_600,
        hours_from: 0,
        days_from: None,
        allocating_from: Some(MINUTE + 3_600),
    };
    let done = f
        .writer
        .compact_under(&lease, 1_001, &policy, &site.1)
        .unwrap();
    assert_eq!(done.hours_rolled_up, 1);
    assert!(done.minute_rows_dropped > 0);
    assert_eq!(facility_rows(&f.reader, &site, "1h"), before);
}

/// The meters' report (`/v1/meters`, the `meters` command) of rows of
/// whole hours reads the same once the meter-minutes are folded into
/// hourly sums, to the millijoule, each row still adding up to its meter
/// (allocated plus unallocated); a row that would cut an hour of sums is
/// refused, not guessed.
pub(crate) fn meter_reports_read_the_same_after_compaction<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let site = facility_site();
    let minutes = facility_hour(&mut f.writer, &site.1);
    let state = |through: i64| MeterState {
        allocated_through: through,
        reading_at_ns: through * 1_000_000_000,
        reading_raw: 0,
        carry_mj: 0,
        revision: 0,
    };
    let w = &mut f.writer;
    assert!(
        w.allocate_meter("row-a", None, &state(MINUTE + 3_600), &minutes)
            .unwrap()
    );
    // Another meter with nothing measured under it: all unallocated.
    let idle: Vec<MeterMinute> = (0..7)
        .map(|k| MeterMinute {
            minute: MINUTE + 600 + 60 * k,
            metered_mj: 1_000 + k as u64,
            measured_mj: 0,
            unallocated_mj: 1_000 + k as u64,
            tenants: vec![],
        })
        .collect();
    assert!(
        w.allocate_meter("row-b", None, &state(MINUTE + 1_020), &idle)
            .unwrap()
    );
    let names = ["row-a".to_string(), "row-b".to_string()];
    let report = |r: &R, step: &str| {
        let reader: &dyn LedgerReader = r;
        let (from, to) = match step {
            "1d" => ("2027-01-15T00:00:00Z", "2027-01-16T00:00:00Z"),
            _ => ("2027-01-15T08:00:00Z", "2027-01-15T10:00:00Z"),
        };
        crate::usage::meters::run(reader, &names, Some(from), Some(to), Some(step), None)
    };
    let hourly = report(&f.reader, "1h").unwrap();
    let daily = report(&f.reader, "1d").unwrap();
    assert!(report(&f.reader, "15m").is_ok());
    for row in hourly.rows.iter().chain(&daily.rows) {
        let parts: u64 = row.tenants.iter().map(|t| t.allocated_mj).sum();
        assert_eq!(parts + row.unallocated_mj, row.metered_mj, "{row:?}");
    }
    let a = &hourly.rows[0];
    assert_eq!((a.meter.as_str(), a.minutes), ("row-a", 60));
    assert_eq!(
        a.metered_mj,
        minutes.iter().map(|m| m.metered_mj).sum::<u64>()
    );
    assert_eq!(
        (hourly.rows[2].minutes, hourly.rows[2].unallocated_mj),
        (7, 7_021)
    );
    let lease = f
        .writer
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 3_600,
        minutes_from: MINUTE + 3_600,
        hours_from: 0,
        days_from: None,
        allocating_from: Some(MINUTE + 3_600),
    };
    let done = f
        .writer
        .compact_under(&lease, 1_001, &policy, &no_contracts())
        .unwrap();
    assert_eq!(done.meter_rows_rolled_up, 67);
    assert!(
        f.reader
            .meter_minutes(None, MINUTE, MINUTE + 3_600)
            .unwrap()
            .is_empty()
    );
    assert_eq!(report(&f.reader, "1h").unwrap(), hourly);
    assert_eq!(report(&f.reader, "1d").unwrap(), daily);
    // Where each meter started, from its hourly sums once its minutes
    // are folded: the hour's start (the sums keep no minute).
    let (_, allocation) = f
        .reader
        .usage_allocated_since(None, MINUTE, MINUTE + 3_600, 0, false)
        .unwrap();
    assert_eq!(
        allocation.started,
        vec![("row-a".to_string(), MINUTE), ("row-b".to_string(), MINUTE)]
    );
    let cut = report(&f.reader, "15m").unwrap_err().to_string();
    assert!(cut.contains("hourly"), "{cut}");
}

/// Invariant: rows grouped by node sum to the tenant's rows, to the
/// millijoule, for every figure the ledger keeps per node: in rolled-up
/// hours (before the minutes' retention) and in minutes, with a late
/// adjustment on one node; each node row and adjustment carries its node,
/// and the figures a contract decides for the whole tenant are absent.
pub(crate) fn usage_rows_per_node_sum_to_the_tenants_rows<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    use crate::usage::{PageQuery, PageRequest, page};
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    w.claim("a", "n2").unwrap();
    // Two hours of lab-a on n1 and n2 (n2 only in the second), lab-b on n1.
    let mut c = Commit::default();
    c.nodes.insert(Arc::from("n1"), cursor(1, 10, 5_000));
    c.nodes.insert(Arc::from("n2"), cursor(1, 10, 5_000));
    for m in 0..120 {
        let at = MINUTE + m * 60;
        let mut put = |t: &str, n: &str, e: u64| {
            c.buckets
                .insert((Arc::from(t), Arc::from(n), at), delta(e, 1 + m as u64 % 3));
            *c.tenant_energy.entry(Arc::from(t)).or_default() += e;
        };
        put("lab-a", "n1", 1_000 + m as u64);
        if m >= 60 {
            put("lab-a", "n2", 7_000 + 3 * m as u64);
        }
        put("lab-b", "n1", 500 + m as u64);
    }
    w.commit_as("a", &c, MINUTE + 7_300, MINUTE + 7_200)
        .unwrap();
    // The first hour rolled up (its minutes dropped), per node.
    let lease = w
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: MINUTE + 3600,
        minutes_from: MINUTE + 3600,
        hours_from: 0,
        days_from: None,
        allocating_from: None,
    };
    let done = w
        .compact_under(&lease, 1_001, &policy, &no_contracts())
        .unwrap();
    assert!(done.hours_rolled_up >= 1, "{done:?}");
    // A late minute on n2 of a final minute: an adjustment by node.
    let late = booking("n2", cursor(1, 11, 5_000), "lab-a", MINUTE + 3_660, 77);
    w.commit_as("a", &late, MINUTE + 7_400, MINUTE + 7_200)
        .unwrap();
    let tenants =
        Tenants::from_toml("[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 0.001\n").unwrap();
    let history = TenantHistory::new(Arc::new(
        Tenants::from_toml("[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 0.001\n").unwrap(),
    ));
    let walk = |group_by: &str| {
        let mut req = PageRequest {
            tenants: vec!["lab-a".into(), "lab-b".into()],
            from: Some("2027-01-15T08:00:00Z".into()),
            to: Some("2027-01-15T10:00:00Z".into()),
            step: Some("1h".into()),
            limit: Some("1".into()),
            group_by: Some(group_by.into()),
            ..PageRequest::default()
        };
        let mut pages = Vec::new();
        loop {
            let p = page(
                &f.reader,
                &tenants,
                &history,
                &[],
                &PageQuery::parse(&req).unwrap(),
            )
            .unwrap();
            let next = p.next_page_token.clone();
            pages.push(p);
            match next {
                Some(t) => req.page_token = Some(t),
                None => return pages,
            }
        }
    };
    let by_tenant = walk("tenant");
    let by_node = walk("node");
    let node_rows: Vec<_> = by_node.iter().flat_map(|p| &p.rows).collect();
    // lab-a on n1 and n2, lab-b on n1: two hours each, in key order; n2
    // has no data in the first hour and shows zeros there.
    let keys: Vec<(&str, &str, &str)> = node_rows
        .iter()
        .map(|r| {
            (
                r.usage.tenant.as_str(),
                r.node.as_deref().unwrap(),
                r.usage.start.as_str(),
            )
        })
        .collect();
    let (h8, h9) = ("2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z");
    assert_eq!(
        keys,
        [
            ("lab-a", "n1", h8),
            ("lab-a", "n1", h9),
            ("lab-a", "n2", h8),
            ("lab-a", "n2", h9),
            ("lab-b", "n1", h8),
            ("lab-b", "n1", h9)
        ]
    );
    assert_eq!(node_rows[2].usage.energy_millijoules, 0);
    assert!(node_rows.iter().all(|r| r.id.ends_with(&format!(
        "-{}/{}",
        r.usage.tenant,
        r.node.as_deref().unwrap()
    ))));
    type Sums = (u64, u64, u64, u64, u64, bool);
    let sums = |rows: &mut dyn Iterator<Item = &crate::usage::PagedRow>| {
        let mut out: std::collections::BTreeMap<(String, String), Sums> = Default::default();
        for r in rows {
            let u = &r.usage;
            let e = out.entry((u.tenant.clone(), u.start.clone())).or_default();
            e.0 += u.energy_millijoules;
            e.1 += u.node_energy_millijoules;
            e.2 += u.readings;
            e.3 += (u.gpu_hours * 3.6e12).round() as u64;
            e.4 += (u.busy_gpu_hours * 3.6e12).round() as u64;
            e.5 |= u.estimated || u.node_energy_estimated;
        }
        out
    };
    let want = sums(&mut by_tenant.iter().flat_map(|p| &p.rows));
    assert_eq!(sums(&mut node_rows.iter().copied()), want);
    assert_eq!(
        want[&("lab-a".to_string(), h9.to_string())].0,
        (60..120).map(|m| 1_000 + m + 7_000 + 3 * m).sum::<u64>()
    );
    assert_eq!(
        want[&("lab-a".to_string(), h8.to_string())].0,
        (0..60).map(|m| 1_000 + m).sum::<u64>()
    );
    // Per tenant only: absent from node rows, present in tenant rows.
    for r in &node_rows {
        let j = serde_json::to_value(r).unwrap();
        for k in [
            "contracted_power_watts",
            "capacity_utilization",
            "peak_demand_watts",
            "p95_power_watts",
            "seconds_over_contract",
            "overage_kwh",
            "facility_energy_millijoules",
        ] {
            assert!(j.get(k).is_none(), "{k} in {j}");
        }
    }
    let tenant_row = serde_json::to_value(&by_tenant[0].rows[0]).unwrap();
    assert!(tenant_row.get("node").is_none());
    assert!(tenant_row["peak_demand_watts"].is_number());
    // The adjustment is on n2's page, with its node.
    let adjustments: Vec<(String, String, u64)> = by_node
        .iter()
        .flat_map(|p| {
            let row_node = p.rows[0].node.clone().unwrap();
            p.adjustments
                .iter()
                .map(move |a| (a.node.clone(), row_node.clone(), a.energy_millijoules))
        })
        .collect();
    assert_eq!(adjustments, [("n2".into(), "n2".into(), 77)]);
    // A token of one grouping is refused by the other.
    let mut req = PageRequest {
        tenants: vec!["lab-a".into()],
        from: Some("2027-01-15T08:00:00Z".into()),
        to: Some("2027-01-15T10:00:00Z".into()),
        limit: Some("1".into()),
        page_token: by_node[0].next_page_token.clone(),
        ..PageRequest::default()
    };
    req.group_by = Some("node".into());
    req.tenants.push("lab-b".into());
    assert!(PageQuery::parse(&req).is_ok());
    req.group_by = None;
    assert_eq!(
        PageQuery::parse(&req).unwrap_err().param(),
        Some("page_token")
    );
}

/// GPU readings booked as the collector books them (`billing::Booking`
/// through `OnGpu`): each (tenant, node, GPU, minute, energy) into its
/// tenant's minute bucket and its GPU's hour alike, and whole-node energy
/// into the minute buckets alone (it is not per GPU).
fn gpu_commit(readings: &[(&str, &str, &str, i64, u64)]) -> Commit {
    use crate::accounting::{Book, MinuteFigures, OnGpu};
    let mut c = Commit::default();
    let mut by_node: std::collections::BTreeMap<&str, crate::billing::Booking> = Default::default();
    for &(tenant, node, gpu, minute, energy_mj) in readings {
        let b = by_node
            .entry(node)
            .or_insert_with(|| crate::billing::Booking::new(true));
        let (tenant, gpu): (Arc<str>, Arc<str>) = (Arc::from(tenant), Arc::from(gpu));
        let f = MinuteFigures {
            energy_mj,
            estimated_mj: energy_mj % 7,
            gpu_ns: 60_000_000_000,
            busy_gpu_ns: 20_000_000_000 + energy_mj,
            busy_unknown_gpu_ns: 15_000_000_000 + energy_mj % 11,
            expected_gpu_ns: 61_000_000_000,
            samples: 60,
            ..MinuteFigures::default()
        };
        b.add(
            &OnGpu {
                tenant: &tenant,
                gpu: &gpu,
            },
            minute,
            &f,
        );
        let whole_node = MinuteFigures {
            node_energy_mj: 3 * energy_mj,
            node_ns: 60_000_000_000,
            ..MinuteFigures::default()
        };
        Book::<Arc<str>>::add(b, &tenant, minute, &whole_node);
        *c.tenant_energy.entry(tenant).or_default() += energy_mj;
    }
    for (node, b) in by_node {
        let node: Arc<str> = Arc::from(node);
        b.into_commit(&mut c, &node, true);
        c.nodes.insert(node, cursor(1, 10, 5_000));
    }
    c
}

/// Every page of a walk of `req` (its tokens followed to the end).
fn walk_pages(
    reader: &dyn LedgerReader,
    tenants: &str,
    mut req: crate::usage::PageRequest,
) -> Vec<crate::usage::Page> {
    use crate::usage::{PageQuery, page};
    let history = TenantHistory::new(Arc::new(Tenants::from_toml(tenants).unwrap()));
    let tenants = &Tenants::from_toml(tenants).unwrap();
    let mut pages = Vec::new();
    loop {
        let p = page(
            reader,
            tenants,
            &history,
            &[],
            &PageQuery::parse(&req).unwrap(),
        )
        .unwrap();
        let next = p.next_page_token.clone();
        pages.push(p);
        match next {
            Some(t) => req.page_token = Some(t),
            None => return pages,
        }
    }
}

/// *Invariant:* rows grouped by GPU sum exactly (in millijoules, GPU time
/// and readings) to the tenant's rows and to its node rows, hour by hour,
/// a MIG instance a GPU of its own; late energy for a final minute is
/// added to its GPU's hour, whose revision becomes the commit's; steps
/// that cut hours and periods from before the ledger kept every GPU's
/// hours are refused by name.
pub(crate) fn usage_rows_per_gpu_sum_to_the_tenants_and_nodes_rows<
    W: LedgerWriter,
    R: LedgerReader,
>(
    mut f: Fresh<W, R>,
) {
    use crate::usage::{PageQuery, PageRequest, PagedRow, page};
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    w.claim("a", "n2").unwrap();
    // lab-a: two boards on n1, one on n2 (the second hour only), and a
    // MIG instance of n1's MIG board; lab-b: a board and the other
    // instance on n1.
    let mut readings = Vec::new();
    for m in 0..120 {
        let at = MINUTE + m * 60;
        let e = m as u64;
        readings.push(("lab-a", "n1", "GPU-a1", at, 1_000 + e));
        readings.push(("lab-a", "n1", "GPU-a2", at, 2_000 + 3 * e));
        readings.push(("lab-a", "n1", "MIG-m1", at, 300 + e % 7));
        readings.push(("lab-b", "n1", "GPU-b1", at, 4_000 + e));
        readings.push(("lab-b", "n1", "MIG-m2", at, 500 + e % 5));
        if m >= 60 {
            readings.push(("lab-a", "n2", "GPU-a3", at, 7_000 + 2 * e));
        }
    }
    let mut c = gpu_commit(&readings);
    c.gpu_rows = super::GpuRows::Kept;
    w.commit_as("a", &c, MINUTE + 7_300, MINUTE + 7_200)
        .unwrap();
    let tenants = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 0.001\n[[tenant]]\nid = \"lab-b\"\ncontracted_kw = 50\n";
    let request = |group_by: &str, limit: &str| PageRequest {
        tenants: vec!["lab-a".into(), "lab-b".into()],
        from: Some("2027-01-15T08:00:00Z".into()),
        to: Some("2027-01-15T10:00:00Z".into()),
        step: Some("1h".into()),
        limit: Some(limit.into()),
        group_by: Some(group_by.into()),
        ..PageRequest::default()
    };
    let rows_of = |pages: &[crate::usage::Page]| -> Vec<PagedRow> {
        pages.iter().flat_map(|p| p.rows.clone()).collect()
    };
    let by_tenant = rows_of(&walk_pages(&f.reader, tenants, request("tenant", "100")));
    let by_node = rows_of(&walk_pages(&f.reader, tenants, request("node", "100")));
    let (h8, h9) = ("2027-01-15T08:00:00Z", "2027-01-15T09:00:00Z");
    let mut want_keys = Vec::new();
    for (t, n, g) in [
        ("lab-a", "n1", "GPU-a1"),
        ("lab-a", "n1", "GPU-a2"),
        ("lab-a", "n1", "MIG-m1"),
        ("lab-a", "n2", "GPU-a3"),
        ("lab-b", "n1", "GPU-b1"),
        ("lab-b", "n1", "MIG-m2"),
    ] {
        for h in [h8, h9] {
            want_keys.push((t.to_string(), n.to_string(), g.to_string(), h.to_string()));
        }
    }
    // Pages of any size: every GPU row once, in key order, the last page
    // not empty.
    let mut by_gpu = Vec::new();
    for limit in ["1", "3", "5", "1000"] {
        let pages = walk_pages(&f.reader, tenants, request("gpu", limit));
        assert!(!pages.last().unwrap().rows.is_empty(), "limit {limit}");
        assert!(
            pages
                .iter()
                .all(|p| p.group_by == "gpu" && p.adjustments.is_empty())
        );
        let rows = rows_of(&pages);
        let keys: Vec<(String, String, String, String)> = rows
            .iter()
            .map(|r| {
                (
                    r.usage.tenant.clone(),
                    r.node.clone().unwrap(),
                    r.gpu.clone().unwrap(),
                    r.usage.start.clone(),
                )
            })
            .collect();
        assert_eq!(keys, want_keys, "limit {limit}");
        by_gpu = rows;
    }
    // The sums: per tenant and hour, and per tenant, node and hour.
    type Sums = (u64, u64, u64, u64, u64);
    let sums = |rows: &[PagedRow], per_node: bool| {
        let mut out: std::collections::BTreeMap<(String, String, String), Sums> =
            Default::default();
        for r in rows {
            let u = &r.usage;
            let node = if per_node {
                r.node.clone().unwrap()
            } else {
                String::new()
            };
            let e = out
                .entry((u.tenant.clone(), node, u.start.clone()))
                .or_default();
            e.0 += u.energy_millijoules;
            e.1 += u.readings;
            e.2 += (u.gpu_hours * 3.6e12).round() as u64;
            e.3 += (u.busy_gpu_hours * 3.6e12).round() as u64;
            e.4 |= u64::from(u.estimated);
        }
        out
    };
    let want = sums(&by_tenant, false);
    assert_eq!(sums(&by_gpu, false), want);
    // Node rows list lab-a's n2 in both hours (zeros in the first).
    assert_eq!(sums(&by_gpu, true), sums(&by_node, true));
    assert_eq!(
        want[&("lab-a".to_string(), String::new(), h9.to_string())].0,
        (60..120u64)
            .map(|m| 1_000 + m + 2_000 + 3 * m + 300 + m % 7 + 7_000 + 2 * m)
            .sum::<u64>()
    );
    // GPU figures only: no whole-node energy, no tenant-wide figures.
    assert!(
        by_tenant
            .iter()
            .all(|r| r.usage.node_energy_millijoules > 0)
    );
    for r in &by_gpu {
        assert_eq!(r.usage.node_energy_millijoules, 0);
        assert_eq!(r.usage.basis, "gpu");
        assert_eq!(r.revision, Some(0), "{r:?}");
        let (node, gpu) = (r.node.as_deref().unwrap(), r.gpu.as_deref().unwrap());
        assert!(
            r.id.ends_with(&format!("-{}/{node}/{gpu}", r.usage.tenant)),
            "{}",
            r.id
        );
        let j = serde_json::to_value(r).unwrap();
        for k in [
            "contracted_power_watts",
            "capacity_utilization",
            "peak_demand_watts",
            "p95_power_watts",
            "seconds_over_contract",
            "overage_kwh",
            "facility_energy_millijoules",
            "node_coverage",
        ] {
            assert!(j.get(k).is_none(), "{k} in {j}");
        }
        assert_eq!(j["gpu"], gpu);
    }
    // Late energy for a final minute of GPU-a2's second hour: added to
    // that hour, which takes the commit's revision; the tenant row lists
    // it as an adjustment of the same revision.
    let late = gpu_commit(&[("lab-a", "n1", "GPU-a2", MINUTE + 3_660, 77)]);
    let rev = w
        .commit_as("a", &late, MINUTE + 7_400, MINUTE + 7_200)
        .unwrap()
        .revision;
    let after = rows_of(&walk_pages(&f.reader, tenants, request("gpu", "2")));
    let tenant_after = walk_pages(&f.reader, tenants, request("tenant", "100"));
    for (before, now) in by_gpu.iter().zip(&after) {
        if now.gpu.as_deref() == Some("GPU-a2") && now.usage.start == h9 {
            assert_eq!(now.revision, Some(rev));
            assert_eq!(
                now.usage.energy_millijoules,
                before.usage.energy_millijoules + 77
            );
        } else {
            assert_eq!(now, before);
        }
    }
    let a9 = tenant_after[0]
        .rows
        .iter()
        .find(|r| r.usage.tenant == "lab-a" && r.usage.start == h9)
        .unwrap();
    assert_eq!(a9.revision, Some(rev));
    let adjusted: u64 = tenant_after[0]
        .adjustments
        .iter()
        .filter(|a| a.tenant == "lab-a" && a.start == h9)
        .map(|a| a.energy_millijoules)
        .sum();
    let gpu_a9: u64 = after
        .iter()
        .filter(|r| r.usage.tenant == "lab-a" && r.usage.start == h9)
        .map(|r| r.usage.energy_millijoules)
        .sum();
    assert_eq!(gpu_a9, a9.usage.energy_millijoules + adjusted);
    assert_eq!(adjusted, 77);
    let refused = |req: &PageRequest| -> String {
        let history = TenantHistory::new(Arc::new(Tenants::from_toml(tenants).unwrap()));
        let t = Tenants::from_toml(tenants).unwrap();
        let e = match PageQuery::parse(req) {
            Err(e) => e,
            Ok(q) => match page(&f.reader, &t, &history, &[], &q) {
                Err(crate::usage::QueryError::Usage(e)) => e,
                other => panic!("{req:?}: {:?}", other.map(|p| p.rows.len())),
            },
        };
        format!("{}: {e}", e.param().unwrap_or("-"))
    };
    // Steps that cut hours: refused, naming step.
    for (step, tz) in [("1m", None), ("15m", None), ("1d", Some("Asia/Kolkata"))] {
        let mut req = request("gpu", "10");
        req.step = Some(step.into());
        if let Some(tz) = tz {
            req.tz = Some(tz.into());
            req.from = Some("2027-01-15T00:00:00+05:30".into());
            req.to = Some("2027-01-16T00:00:00+05:30".into());
        }
        let e = refused(&req);
        assert!(e.starts_with("step: "), "{step}: {e}");
    }
    // GPU walks list no adjustments: since_revision is refused, not
    // taken and ignored.
    let mut req = request("gpu", "10");
    req.since_revision = Some("0".into());
    let e = refused(&req);
    assert!(e.starts_with("since_revision: "), "{e}");
    // A writer that keeps no per-GPU rows commits: they are refused (from),
    // then, kept again, refused before the next whole hour after.
    let mut off = booking("n1", cursor(1, 12, 5_000), "lab-a", MINUTE + 7_200, 5);
    off.gpu_rows = super::GpuRows::NotKept;
    w.commit_as("a", &off, MINUTE + 7_500, MINUTE + 7_200)
        .unwrap();
    assert_eq!(f.reader.gpu_rows_from().unwrap(), None);
    let e = refused(&request("gpu", "10"));
    assert!(e.starts_with("from: ") && e.contains("not complete"), "{e}");
    // It also booked a minute of the next hour, 11:02, from an agent
    // whose clock is ahead (within the collector's max_clock_skew): that
    // hour misses energy too.
    let mut ahead = booking("n1", cursor(1, 13, 5_000), "lab-a", MINUTE + 10_920, 5);
    ahead.gpu_rows = super::GpuRows::NotKept;
    w.commit_as("a", &ahead, MINUTE + 7_530, MINUTE + 7_200)
        .unwrap();
    let mut on = gpu_commit(&[("lab-a", "n1", "GPU-a1", MINUTE + 7_260, 9)]);
    on.gpu_rows = super::GpuRows::Kept;
    w.commit_as("a", &on, MINUTE + 7_600, MINUTE + 7_200)
        .unwrap();
    // Complete from the whole hour after both the commit and every minute
    // a writer that kept none booked: 12:00, not 11:00.
    assert_eq!(f.reader.gpu_rows_from().unwrap(), Some(MINUTE + 4 * 3600));
    let e = refused(&request("gpu", "10"));
    assert!(
        e.starts_with("from: ") && e.contains("2027-01-15T12:00:00Z"),
        "{e}"
    );
    let mut later = request("gpu", "10");
    later.from = Some("2027-01-15T12:00:00Z".into());
    later.to = Some("2027-01-15T13:00:00Z".into());
    let pages = walk_pages(&f.reader, tenants, later);
    assert!(pages.iter().all(|p| p.rows.is_empty()));
}

/// Per-GPU hours are dropped with the hourly rollups, past the hour
/// retention, and rows per GPU are refused before it.
pub(crate) fn gpu_hours_are_kept_for_the_hour_retention<W: LedgerWriter, R: LedgerReader>(
    mut f: Fresh<W, R>,
) {
    let day = MINUTE - 8 * 3600; // 2027-01-15T00:00:00Z
    let w = &mut f.writer;
    w.claim("a", "n1").unwrap();
    let c = gpu_commit(&[
        ("lab-a", "n1", "GPU-1", day - 86_400 + 3_600, 11),
        ("lab-a", "n1", "GPU-1", day + 3_600, 13),
        ("lab-a", "n1", "MIG-2", day + 3_600, 17),
    ]);
    w.commit_as("a", &c, day + 7_300, day + 7_200).unwrap();
    assert_eq!(f.reader.gpu_rows_from().unwrap(), Some(0));
    let hours = |r: &R| -> Vec<(String, i64, u64)> {
        let mut out = Vec::new();
        for (node, gpu) in r.usage_gpus("lab-a", 0, i64::MAX).unwrap() {
            assert_eq!(node, "n1");
            for h in r
                .gpu_usage("lab-a", &node, &gpu, 0, i64::MAX)
                .unwrap()
                .hours
            {
                out.push((gpu.clone(), h.start, h.delta.energy_mj));
            }
        }
        out
    };
    assert_eq!(
        hours(&f.reader),
        [
            ("GPU-1".to_string(), day - 86_400 + 3_600, 11),
            ("GPU-1".to_string(), day + 3_600, 13),
            ("MIG-2".to_string(), day + 3_600, 17)
        ]
    );
    let lease = w
        .acquire_compaction("a", 1_000, Duration::from_secs(60))
        .unwrap();
    let policy = Compaction {
        closed_before: day + 7_200,
        minutes_from: day,
        hours_from: day,
        days_from: None,
        allocating_from: None,
    };
    let done = w
        .compact_under(&lease, 1_001, &policy, &no_contracts())
        .unwrap();
    assert_eq!(done.gpu_hour_rows_dropped, 1, "{done:?}");
    assert_eq!(
        hours(&f.reader),
        [
            ("GPU-1".to_string(), day + 3_600, 13),
            ("MIG-2".to_string(), day + 3_600, 17)
        ]
    );
    assert_eq!(f.reader.gpu_rows_from().unwrap(), Some(day));
}

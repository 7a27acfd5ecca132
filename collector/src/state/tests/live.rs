//! Attribution to tenants and the live figures.

use super::*;

// ---- 8. Attribution and live figures -----------------------------------

#[test]
fn attribution_by_glob_and_uuid() {
    // Invariant: a GPU goes to the tenant claiming its UUID, else to
    // the one leasing its node, and its energy lands there.
    // (node, GPUs, tenant per GPU, node tenant)
    type Case = (&'static str, usize, &'static [&'static str], &'static str);
    let cases: [Case; 4] = [
        ("a-1", 2, &["lab-a", "lab-a"], "lab-a"),
        ("a-2", 2, &["lab-a", "lab-b"], "lab-a"),
        ("z-1", 2, &["lab-b", UNASSIGNED], UNASSIGNED),
        ("b-1", 1, &[UNASSIGNED], UNASSIGNED),
    ];
    let state = new_state(TENANTS, None);
    let mut want: HashMap<&str, u64> = HashMap::new();
    for (k, (node, n, tenants, node_tenant)) in cases.into_iter().enumerate() {
        let h = connect(&state, node, 1, n);
        let step = 1_000 * (k as u64 + 1);
        let counters0: Vec<(u64, Option<u64>)> = (0..n).map(|_| (1, Some(0))).collect();
        let counters1: Vec<(u64, Option<u64>)> =
            (0..n).map(|i| (1, Some(step * (i as u64 + 1)))).collect();
        ingest(
            &state,
            &h,
            vec![sample(1, T0, &counters0), sample(2, T0 + SEC, &counters1)],
        );
        let g = lock(h.node());
        let got: Vec<&str> = g.gpus().iter().map(|g| &**g.tenant()).collect();
        assert_eq!(got, tenants, "{node}");
        assert_eq!(&**g.tenant(), node_tenant, "{node}");
        for (i, t) in tenants.iter().enumerate() {
            *want.entry(t).or_default() += step * (i as u64 + 1);
        }
    }
    for (t, e) in want {
        assert_eq!(tenant_energy(&state, t), e, "{t}");
    }
    assert_totals_match_gpus(&state);
}

#[test]
fn a_leased_gpu_is_reported_by_one_connected_node_at_a_time() {
    // Invariant: a GPU leased by UUID without a node is admitted on one
    // connected node at a time; another node announcing it is refused
    // (counted, no node created) until the holder's stream ends or its
    // inventory drops the GPU. A lease naming its node admits it there
    // only. Unleased UUIDs are not policed.
    let tenants = format!(
        "{TENANTS}\n[[tenant]]\nid = \"lab-p\"\ncontracted_kw = 1\n\
         gpus = [{{ uuid = \"pinned-0\", node = \"p-*\" }}]\n"
    );
    let state = new_state(&tenants, None);
    let held = |s: &State| s.counters.gpu_claims_refused(ClaimReason::HeldByOtherNode);
    let z = state
        .hello(hello_with("z-1", 1, &["z-1-gpu0", "z-1-gpu1"]))
        .unwrap()
        .0;
    match state.hello(hello_with("evil-1", 1, &["free-0", "z-1-gpu0"])) {
        Err(HelloError::GpuHeldElsewhere {
            uuid,
            tenant,
            holder,
            node,
        }) => {
            assert_eq!(
                (&*uuid, &*tenant, &*holder, &*node),
                ("z-1-gpu0", "lab-b", "z-1", "evil-1")
            );
        }
        other => panic!("evil-1 admitted with z-1's leased GPU: {other:?}"),
    }
    assert_eq!(held(&state), 1);
    assert!(state.node("evil-1").is_none());
    // An unleased UUID held elsewhere is not policed; z-1 itself may
    // reconnect with its GPU.
    state.hello(hello_with("evil-2", 1, &["z-1-gpu1"])).unwrap();
    state.hello(hello_with("z-1", 1, &["z-1-gpu0"])).unwrap();
    state.disconnect(&z); // the superseded stream ends: changes nothing
    assert!(state.hello(hello_with("evil-1", 1, &["z-1-gpu0"])).is_err());
    // The GPU leaves z-1's inventory: it may turn up elsewhere.
    let z = state.hello(hello_with("z-1", 2, &["z-1-gpu1"])).unwrap().0;
    let m = state.hello(hello_with("m-1", 1, &["z-1-gpu0"])).unwrap().0;
    assert_eq!(&**lock(m.node()).gpus()[0].tenant(), "lab-b");
    // Its new node's stream ends: z-1 may take it back.
    state.disconnect(&m);
    state.disconnect(&z);
    state.hello(hello_with("z-1", 3, &["z-1-gpu0"])).unwrap();
    assert_eq!(held(&state), 2);
    // A lease naming its node: refused elsewhere, even unheld.
    match state.hello(hello_with("evil-1", 1, &["pinned-0"])) {
        Err(HelloError::GpuLeasedElsewhere {
            uuid,
            tenant,
            allowed,
            node,
        }) => {
            assert_eq!(
                (&*uuid, &*tenant, &*allowed, &*node),
                ("pinned-0", "lab-p", "p-*", "evil-1")
            );
        }
        other => panic!("evil-1 admitted with a GPU leased on p-*: {other:?}"),
    }
    assert_eq!(state.counters.gpu_claims_refused(ClaimReason::LeaseNode), 1);
    let p = state.hello(hello_with("p-7", 1, &["pinned-0"])).unwrap().0;
    assert_eq!(&**lock(p.node()).gpus()[0].tenant(), "lab-p");
    // A GPU leased by a reload is held by the connected node that has
    // it from then on.
    assert!(state.hello(hello_with("evil-3", 1, &["late-0"])).is_ok());
    state.hello(hello_with("q-1", 1, &["late-0"])).unwrap();
    state.reload_tenants(
        Tenants::from_toml(&format!(
            "{tenants}\n[[tenant]]\nid = \"lab-q\"\ncontracted_kw = 1\ngpus = [\"late-0\"]\n"
        ))
        .unwrap(),
    );
    assert!(matches!(
        state.hello(hello_with("evil-4", 1, &["late-0"])),
        Err(HelloError::GpuHeldElsewhere { .. })
    ));
}

#[test]
fn tenant_power_sums_only_fresh_gpus() {
    // Invariant: live power counts a GPU only while its last reading is
    // within the stale window and not lost; the others count as stale.
    // (configured stale_after, offset of `now`, expected lab-a
    //  (power, reporting, stale), lab-b (power, reporting, stale))
    type Live = (u64, u64, u64);
    let s = Duration::from_secs;
    let cases: [(Option<Duration>, Duration, Live, Live); 6] = [
        (Some(s(5)), s(0), (350_000, 3, 1), (70_000, 1, 0)),
        (Some(s(5)), s(4), (350_000, 3, 1), (70_000, 1, 0)),
        (Some(s(5)), s(6), (0, 0, 4), (0, 0, 1)),
        // Unset: three report intervals (1 s each).
        (None, s(2), (350_000, 3, 1), (70_000, 1, 0)),
        (None, s(4), (0, 0, 4), (0, 0, 1)),
        (Some(s(3600)), s(60), (350_000, 3, 1), (70_000, 1, 0)),
    ];
    for (stale_after, offset, want_a, want_b) in cases {
        let state = new_state(TENANTS, stale_after);
        let a1 = connect(&state, "a-1", 1, 2);
        let a2 = connect(&state, "a-2", 1, 3);
        // Stamped as they arrive (see
        // old_samples_that_just_arrived_are_not_live_power for late).
        let t0 = unix_nanos_now();
        ingest(
            &state,
            &a1,
            vec![sample(1, t0, &[(100_000, None), (200_000, None)])],
        );
        // a-2's GPU 2 (lab-a) never reports: always stale.
        ingest(
            &state,
            &a2,
            vec![sample(1, t0, &[(50_000, None), (70_000, None)])],
        );
        let now = Instant::now() + offset;
        let live = live(&state, now);
        let got = |t: &str| {
            let l = &live[t];
            (l.power_milliwatts, l.reporting, l.stale)
        };
        assert_eq!(got("lab-a"), want_a, "{stale_after:?} +{offset:?}");
        assert_eq!(got("lab-b"), want_b, "{stale_after:?} +{offset:?}");
        assert_eq!(got(UNASSIGNED), (0, 0, 0));
        let n = lock(a2.node());
        let window = n.stale_window(stale_after);
        let fresh: Vec<bool> = n.gpus().iter().map(|g| g.fresh(now, window)).collect();
        let reporting = want_b.1 == 1;
        assert_eq!(fresh, vec![reporting, reporting, false]);
    }
}

#[test]
fn old_samples_that_just_arrived_are_not_live_power() {
    // A spool replayed 45 minutes late: its samples arrive now, but by
    // their own timestamps they are long past the staleness window, so
    // none of them is live power; the energy still counts. The first
    // sample stamped now is live again.
    let state = new_state(TENANTS, Some(Duration::from_secs(30)));
    let h = connect(&state, "a-1", 1, 2);
    let late = unix_nanos_now() - 45 * 60 * SEC;
    let replay: Vec<NodeSample> = (0..10)
        .map(|k| {
            let e = Some(k * 700_000);
            sample(k + 1, late + k as i64 * SEC, &[(700_000, e), (700_000, e)])
        })
        .collect();
    ingest(&state, &h, replay);
    assert_eq!(tenant_energy(&state, "lab-a"), 2 * 9 * 700_000);
    let now = Instant::now();
    let l = live(&state, now)["lab-a"];
    assert_eq!((l.power_milliwatts, l.reporting, l.stale), (0, 0, 2));
    let n = lock(h.node());
    let window = n.stale_window(Some(Duration::from_secs(30)));
    assert!(n.gpus().iter().all(|g| !g.fresh(now, window)));
    assert_eq!(
        parts(|add| n.live(now, window, add)),
        parts(|add| n.walk_live(now, window, add))
    );
    drop(n);
    let e = Some(20 * 700_000);
    ingest(
        &state,
        &h,
        vec![sample(11, unix_nanos_now(), &[(500_000, e), (600_000, e)])],
    );
    let l = live(&state, Instant::now())["lab-a"];
    assert_eq!(
        (l.power_milliwatts, l.reporting, l.stale),
        (1_100_000, 2, 0)
    );
}

#[test]
fn reload_reattributes_without_losing_energy() {
    // Invariant: a reload moves GPUs to their new tenant for future
    // energy and live power; energy already counted stays where it was.
    const MOVED: &str = r#"
        [[tenant]]
        id = "lab-b"
        contracted_kw = 0.5
        nodes = ["a-1"]

        [[tenant]]
        id = "lab-c"
        contracted_kw = 2
        gpus = ["a-2-gpu0"]
    "#;
    let state = new_state(TENANTS, None);
    let a1 = connect(&state, "a-1", 1, 2);
    let a2 = connect(&state, "a-2", 1, 2);
    // Stamped now, so that live power can follow the reload.
    let t0 = unix_nanos_now();
    let batch =
        |seq: u64, c: u64| vec![sample(seq, t0 + seq as i64 * SEC, &[(100_000, Some(c)); 2])];
    ingest(&state, &a1, batch(1, 0));
    ingest(&state, &a2, batch(1, 0));
    ingest(&state, &a1, batch(2, 1_000));
    ingest(&state, &a2, batch(2, 1_000));
    // Before: lab-a has a-1 ×2 and a-2 GPU 0; lab-b has a-2 GPU 1.
    assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 1_000);

    // In force from just after the samples so far (this test's clock
    // runs in 2023: a reload now would not cover its later samples).
    state.reload_tenants_from(Tenants::from_toml(MOVED).unwrap(), T0 + 2 * SEC + 1);
    assert_eq!(state.counters.reloads_ok.load(Ordering::Relaxed), 1);
    // (handle, tenant per GPU, node tenant) after the reload
    let after: [(&StreamHandle, [&str; 2], &str); 2] = [
        (&a1, ["lab-b", "lab-b"], "lab-b"),
        (&a2, ["lab-c", UNASSIGNED], UNASSIGNED),
    ];
    for (h, gpus, node) in after {
        let n = lock(h.node());
        let got: Vec<&str> = n.gpus().iter().map(|g| &**g.tenant()).collect();
        assert_eq!(got, gpus);
        assert_eq!(&**n.tenant(), node);
    }
    // Nothing counted so far moved.
    assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 1_000);

    ingest(&state, &a1, batch(3, 1_500));
    ingest(&state, &a2, batch(3, 1_700));
    assert_eq!(tenant_energy(&state, "lab-a"), 3_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 1_000 + 2 * 500);
    assert_eq!(tenant_energy(&state, "lab-c"), 700);
    assert_eq!(tenant_energy(&state, UNASSIGNED), 700);
    // No energy lost or doubled across the reload.
    let all: u64 = state.totals().values().map(|t| t.energy_millijoules).sum();
    let gpus: u64 = gpu_energy(&a1).iter().chain(&gpu_energy(&a2)).sum();
    assert_eq!(all, gpus);
    assert_eq!(gpus, 2 * 1_500 + 2 * 1_700);
    // Live power follows the new file.
    let live = live(&state, Instant::now());
    assert_eq!(live["lab-b"].power_milliwatts, 200_000);
    assert_eq!(live["lab-c"].power_milliwatts, 100_000);
    assert_eq!(live[UNASSIGNED].power_milliwatts, 100_000);
    assert!(!live.contains_key("lab-a"));
}

#[test]
fn energy_is_attributed_by_the_lease_in_force_at_the_sample_time() {
    // Invariant: an interval belongs to the tenant of the version in
    // force at its end (its sample's timestamp), whenever it arrives:
    // a sample delivered after a lease change but stamped before it
    // stays with the old tenant, in its own minute; a version that
    // takes effect in the future applies once its time has come.
    const V2: &str = "[[tenant]]\nid = \"lab-b\"\ncontracted_kw = 1\nnodes = [\"a-1\"]\n";
    const V3: &str = "[[tenant]]\nid = \"lab-c\"\ncontracted_kw = 1\nnodes = [\"a-*\"]\n";
    let state = new_state(TENANTS, None);
    let h = connect(&state, "a-1", 1, 1);
    let at =
        |seq: u64, secs: i64, c: u64| vec![sample(seq, T0 + secs * SEC, &[(100_000, Some(c))])];
    ingest(&state, &h, at(1, 0, 0));
    ingest(&state, &h, at(2, 10, 1_000));
    // a-1 moves to lab-b 100 s after T0 (T0 is 20 s into its minute).
    let change = T0 + 100 * SEC;
    state.reload_tenants_from(Tenants::from_toml(V2).unwrap(), change);
    assert_eq!(&**lock(h.node()).gpus()[0].tenant(), "lab-b");
    // Delivered now, stamped before the change: lab-a's, in its minute.
    ingest(&state, &h, at(3, 70, 3_000));
    ingest(&state, &h, at(4, 99, 4_000));
    // Stamped from the change on: lab-b's.
    ingest(&state, &h, at(5, 100, 4_500));
    ingest(&state, &h, at(6, 130, 6_000));
    assert_eq!(tenant_energy(&state, "lab-a"), 4_000);
    assert_eq!(tenant_energy(&state, "lab-b"), 2_000);
    let (_, c) = state.take_pending();
    let minute = |secs: i64| (T0 + secs * SEC).div_euclid(60 * SEC) * 60;
    // (tenant, minute, energy): the interval 10-70 s (30-90 s of
    // T0's minute) is split by minute, all of it lab-a's; 99-100 s is
    // lab-b's (by its end).
    let mut got: Vec<(String, i64, u64)> = c
        .buckets
        .iter()
        .filter(|(_, d)| d.energy_mj > 0)
        .map(|((t, _, m), d)| (t.to_string(), *m, d.energy_mj))
        .collect();
    got.sort();
    let m0 = minute(0);
    assert_eq!(
        got,
        [
            ("lab-a".to_string(), m0, 1_000 + 1_000),
            ("lab-a".to_string(), m0 + 60, 1_000 + 1_000),
            ("lab-b".to_string(), m0 + 60, 500),
            ("lab-b".to_string(), m0 + 120, 1_500),
        ]
    );
    // A version taking effect in the future: lab-b stays in force (and
    // the fast path books to it) until then.
    let soon = unix_nanos_now() + 200_000_000;
    state.reload_tenants_from(Tenants::from_toml(V3).unwrap(), soon);
    assert_eq!(&**lock(h.node()).gpus()[0].tenant(), "lab-b");
    assert_eq!(state.tenants().all()[0].id.as_ref(), "lab-b");
    let until = Instant::now() + Duration::from_secs(10);
    while &**lock(h.node()).gpus()[0].tenant() != "lab-c" {
        assert!(
            Instant::now() < until,
            "the future version never came into force"
        );
        std::thread::sleep(Duration::from_millis(10));
        state.advance_tenants();
    }
    assert_eq!(state.tenants().all()[0].id.as_ref(), "lab-c");
    // Still stamped in lab-b's time: lab-b's.
    ingest(&state, &h, at(7, 140, 7_000));
    assert_eq!(tenant_energy(&state, "lab-b"), 3_000);
    assert_eq!(tenant_energy(&state, "lab-c"), 0);
}

#[test]
fn node_views_show_what_the_surfaces_read() {
    // What `/metrics` and the status page read of a node, through its
    // view: nothing measured before the first sample; then the latest
    // reading, live within the node's stale window and not after it.
    let window = Duration::from_secs(30);
    let state = new_state(TENANTS, Some(window));
    let h = connect(&state, "a-2", 1, 2);
    connect(&state, "z-1", 1, 1);
    let now = Instant::now();
    let mut visited = Vec::new();
    state.for_each_node(|n| {
        visited.push(n.id().to_string());
        if n.id() != "a-2" {
            return;
        }
        assert_eq!(n.tenant(), "lab-a");
        assert_eq!(n.stale_window(), window);
        assert!(!n.up(now));
        assert_eq!(n.silent_for(now), None);
        assert_eq!(n.last_sample_unix_nanos(), None);
        assert_eq!(n.samples_accepted(), 0);
        assert!(n.host().is_none());
        let gpus: Vec<_> = n
            .gpus()
            .map(|g| (g.uuid(), g.tenant(), g.model(), g.last().is_some()))
            .collect();
        assert_eq!(
            gpus,
            vec![
                ("a-2-gpu0", "lab-a", "H200", false),
                ("a-2-gpu1", "lab-b", "H200", false),
            ]
        );
        for g in n.gpus() {
            assert!(!g.fresh(now));
            assert_eq!((g.energy_millijoules(), g.counter_resets()), (0, 0));
            assert_eq!(g.memory_total_bytes(), Some(1 << 30));
            assert_eq!(g.power_limit_milliwatts(), Some(LIMIT_MW));
        }
    });
    visited.sort();
    assert_eq!(visited, ["a-2", "z-1"], "every node once");

    let t0 = unix_nanos_now() - SEC;
    ingest(
        &state,
        &h,
        vec![
            sample(1, t0, &[(100_000, Some(1_000)), (200_000, Some(5_000))]),
            sample(
                2,
                t0 + SEC,
                &[(100_000, Some(101_000)), (200_000, Some(205_000))],
            ),
        ],
    );
    let now = Instant::now();
    let mut seen = 0;
    state.for_each_node(|n| {
        if n.id() != "a-2" {
            return;
        }
        seen += 1;
        assert!(n.up(now));
        assert!(n.silent_for(now).is_some_and(|d| d <= window));
        assert_eq!(n.last_sample_unix_nanos(), Some(t0 + SEC));
        assert_eq!(n.samples_accepted(), 2);
        let got: Vec<_> = n
            .gpus()
            .map(|g| {
                let power = g.last().and_then(|r| r.power_milliwatts);
                (g.fresh(now), power, g.energy_millijoules())
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (true, Some(100_000), 100_000),
                (true, Some(200_000), 200_000)
            ]
        );
        let live = parts(|add| n.live(now, add));
        let live: Vec<_> = live
            .iter()
            .map(|(t, l)| (t.as_str(), l.power_milliwatts, l.reporting, l.stale))
            .collect();
        assert_eq!(
            live,
            vec![("lab-a", 100_000, 1, 0), ("lab-b", 200_000, 1, 0)]
        );
        // Past the window: silent, stale, the energy kept.
        let later = now + window + Duration::from_secs(1);
        assert!(!n.up(later));
        assert!(n.gpus().all(|g| !g.fresh(later)));
        assert_eq!(
            n.gpus().map(|g| g.energy_millijoules()).sum::<u64>(),
            300_000
        );
        let stale: u64 = parts(|add| n.live(later, add))
            .iter()
            .map(|(_, l)| l.stale)
            .sum();
        assert_eq!(stale, 2);
    });
    assert_eq!(seen, 1);
}

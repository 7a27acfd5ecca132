//! Meters polled against the stand-in Modbus TCP meter: energy exactly
//! the register's counts, wraps exact, resets counted, a hung or failing
//! meter bounded and counted.

use std::sync::Arc;

use capwatch_agent::meter_sim::{Layout, ModbusMeter, Mode};

use super::*;

/// 3600 mJ (1 mWh... 0.001 Wh) per count.
const MJ: u64 = 3_600;

fn meter(stand_in: &ModbusMeter, extra: &str) -> Meter {
    let text = format!(
        "[[meter]]\nid = \"m1\"\nkind = \"modbus\"\nnodes = [\"n-*\"]\naddress = \"{}\"\nwh_per_count = 0.001\ninterval = \"1s\"\ntimeout = \"200ms\"\n{extra}",
        stand_in.addr()
    );
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<MeterConfig>,
    }
    let file: File = toml::from_str(&text).expect("valid TOML");
    let spec = check(&file.meter).expect("a valid meter").remove(0);
    Meter {
        spec,
        live: Default::default(),
    }
}

thread_local! {
    /// The test's clock (each test runs on a thread of its own).
    static NOW: std::cell::Cell<i64> = const { std::cell::Cell::new(1_700_000_000_000_000_000) };
}

/// A reading every 15 s, as a meter is polled: the plausibility bound
/// (`max_kw` over the time between readings) sees real intervals.
fn every_15s() -> i64 {
    NOW.with(|n| {
        n.set(n.get() + 15_000_000_000);
        n.get()
    })
}

fn poller(m: &Meter) -> Poller {
    Poller::new(&m.spec).unwrap().with_clock(every_15s)
}

fn covered(n: u64) -> CoveredNodes {
    Arc::new(move |_| n)
}

async fn poll(p: &mut Poller, m: &Meter) -> Outcome {
    p.poll(m, &covered(1)).await
}

fn energy(m: &Meter) -> u64 {
    lock(&m.live).energy_mj
}

#[tokio::test]
async fn energy_is_the_registers_counts_in_either_layout() {
    let layouts = [
        (Layout::default(), ""),
        (
            Layout {
                register: 100,
                input: true,
                words: 4,
                little: true,
            },
            "register = 100\nregisters = \"input\"\nformat = \"u64\"\nword_order = \"little\"\n",
        ),
    ];
    for (layout, extra) in layouts {
        let stand_in = ModbusMeter::start(layout).unwrap();
        stand_in.set_count(0x0001_0000_0000_0005 & ((1 << (16 * layout.words as u32 - 1)) - 1));
        let m = meter(&stand_in, extra);
        let mut p = poller(&m);
        assert_eq!(poll(&mut p, &m).await, Outcome::Ok, "{extra}");
        assert_eq!(energy(&m), 0, "the first reading is the baseline");
        stand_in.advance(70_000);
        assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
        stand_in.advance(5);
        assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
        assert_eq!(energy(&m), 70_005 * MJ, "{extra}");
        let live = lock(&m.live);
        assert!(live.up);
        assert_eq!(live.polls_of(Outcome::Ok), 3);
        assert_eq!(live.readings.back().map(|r| r.energy_mj), Some(70_005 * MJ));
        assert!(live.power_mw.is_some());
    }
}

#[tokio::test]
async fn a_wrapping_register_counts_exactly_across_the_wrap() {
    // The register's own 2^32, and a rollover set in the config.
    for (rollover, extra) in [(1u128 << 32, ""), (1_000_000, "rollover = 1000000\n")] {
        let stand_in = ModbusMeter::start(Layout::default()).unwrap();
        stand_in.set_rollover(rollover);
        stand_in.set_count((rollover - 7) as u64);
        let m = meter(&stand_in, extra);
        let mut p = poller(&m);
        assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
        stand_in.advance(20);
        assert_eq!(stand_in.count(), 13, "the stand-in wrapped");
        assert_eq!(poll(&mut p, &m).await, Outcome::Ok, "{extra}");
        assert_eq!(energy(&m), 20 * MJ, "{extra}");
        assert_eq!(lock(&m.live).polls_of(Outcome::Reset), 0);
    }
}

#[tokio::test]
async fn a_register_that_goes_down_is_a_counted_reset_never_negative_energy() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    stand_in.set_count(5_000);
    let m = meter(&stand_in, "");
    let mut p = poller(&m);
    poll(&mut p, &m).await;
    stand_in.advance(100);
    poll(&mut p, &m).await;
    // A replaced meter starting at 40: held until the next reading goes
    // on from it.
    stand_in.set_count(40);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    assert_eq!(energy(&m), 100 * MJ);
    stand_in.advance(2);
    assert_eq!(poll(&mut p, &m).await, Outcome::Reset);
    assert_eq!(energy(&m), 102 * MJ, "counting again from the new value");
    stand_in.advance(3);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    assert_eq!(energy(&m), 105 * MJ);
    let live = lock(&m.live);
    assert_eq!(live.polls_of(Outcome::Reset), 1);
    assert!(
        live.readings
            .iter()
            .zip(live.readings.iter().skip(1))
            .all(|(a, b)| a.energy_mj <= b.energy_mj)
    );
}

/// A gateway answering 0 while its meter is down, then the real count
/// again: the drop from three quarters of the register is no wrap (that
/// would be a quarter of a 32-bit kWh register, about 1 TWh, in 15 s),
/// and no reset either, since the next good reading carries on from the
/// count before it. Only the real counts are booked.
#[tokio::test]
async fn a_gateway_answering_zero_for_a_while_books_only_the_real_counts() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    stand_in.set_count(3_000_000_000);
    let m = meter(&stand_in, "");
    let mut p = poller(&m);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    stand_in.advance(100);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    stand_in.answer_wrong_for(0, 3);
    for _ in 0..3 {
        stand_in.advance(10);
        assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    }
    stand_in.advance(10);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    assert_eq!(energy(&m), 140 * MJ, "the register's real counts");
    // The allocation, recounting from the raw readings, agrees.
    let raw: Vec<(i64, u64)> = lock(&m.live).raw.iter().copied().collect();
    let (first, last) = (raw[0], raw[raw.len() - 1]);
    let from_raw: u64 = raw
        .windows(2)
        .map(|w| allocate::raw_delta(&m.spec, w[0].1, w[1].1, w[1].0 - w[0].0))
        .sum();
    assert_eq!(from_raw, 140 * MJ);
    assert_eq!(last.1 - first.1, 140);
    let live = lock(&m.live);
    assert_eq!(
        (
            live.polls_of(Outcome::Invalid),
            live.polls_of(Outcome::Reset)
        ),
        (3, 0)
    );
}

/// A rise beyond `max_kw` over the time since the last reading is refused
/// and the baseline kept; one that persists (a replaced meter starting
/// higher) is taken as a reset once the next reading goes on from it.
#[tokio::test]
async fn a_rise_beyond_max_kw_is_refused_unless_the_meter_goes_on_from_it() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    stand_in.set_count(1_000);
    // 1 kW: 15 s is 15 kJ, about 4167 counts of 3.6 J.
    let m = meter(&stand_in, "max_kw = 1.0\n");
    let mut p = poller(&m);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    stand_in.answer_wrong_for(900_000, 1);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    stand_in.advance(4_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok, "back on the count");
    assert_eq!(energy(&m), 4_000 * MJ);
    stand_in.set_count(2_000_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    stand_in.advance(3_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Reset);
    assert_eq!(energy(&m), 7_000 * MJ, "counted on from the new count");
}

#[tokio::test]
async fn a_hung_meter_times_out_and_the_next_poll_recovers() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    stand_in.set_count(10);
    let m = meter(&stand_in, "");
    let mut p = poller(&m);
    poll(&mut p, &m).await;
    stand_in.set_mode(Mode::Hang);
    stand_in.advance(3);
    // Bounded by the meter's own timeout: the poll returns.
    assert_eq!(poll(&mut p, &m).await, Outcome::Timeout);
    assert!(!lock(&m.live).up);
    stand_in.set_mode(Mode::Normal);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok, "a fresh connection");
    let live = lock(&m.live);
    assert!(live.up);
    assert_eq!(live.polls_of(Outcome::Timeout), 1);
    assert_eq!(
        live.energy_mj,
        3 * MJ,
        "the interval the hang covered is counted once"
    );
}

#[tokio::test]
async fn an_exception_is_counted_and_the_meter_is_down() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    let m = meter(&stand_in, "");
    let mut p = poller(&m);
    poll(&mut p, &m).await;
    stand_in.set_mode(Mode::Exception);
    assert_eq!(poll(&mut p, &m).await, Outcome::Exception);
    {
        let live = lock(&m.live);
        assert!(!live.up);
        assert_eq!(live.polls_of(Outcome::Exception), 1);
        assert_eq!(live.power_mw, None, "no reading, no power");
    }
    // A register the meter does not have is an exception too.
    stand_in.set_mode(Mode::Normal);
    let wrong = meter(&stand_in, "register = 8\n");
    let mut q = poller(&wrong);
    assert_eq!(poll(&mut q, &wrong).await, Outcome::Exception);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
}

/// An answer of too few words is invalid, changes nothing, and the next
/// whole answer counts on from the last good reading.
#[tokio::test]
async fn a_short_answer_is_invalid_and_the_baseline_kept() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    stand_in.set_count(70_000);
    let m = meter(&stand_in, "");
    let mut p = poller(&m);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    stand_in.set_mode(Mode::Short);
    stand_in.advance(5);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    assert_eq!(energy(&m), 0);
    stand_in.set_mode(Mode::Normal);
    stand_in.advance(5);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    assert_eq!(energy(&m), 10 * MJ);
    assert_eq!(lock(&m.live).polls_of(Outcome::Invalid), 1);
}

#[tokio::test]
async fn a_meter_nobody_listens_on_is_an_error() {
    let stand_in = ModbusMeter::start(Layout::default()).unwrap();
    let m = meter(&stand_in, "");
    drop(stand_in);
    let mut p = poller(&m);
    assert_eq!(poll(&mut p, &m).await, Outcome::Error);
    assert_eq!(lock(&m.live).polls_of(Outcome::Error), 1);
}

/// One meter hanging does not hold up another: both poll on their own
/// tasks, and the answering one keeps counting while the other times out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_meter_does_not_hold_up_another() {
    let hung = ModbusMeter::start(Layout::default()).unwrap();
    hung.set_mode(Mode::Hang);
    let fine = ModbusMeter::start(Layout::default()).unwrap();
    let mut a = meter(&hung, "").spec;
    a.id = "hung".into();
    let b = meter(&fine, "").spec;
    let board = Arc::new(Board::new(vec![a, b]));
    let (stop, shutdown) = watch::channel(false);
    let tasks = spawn(&board, pollers(&board).unwrap(), covered(1), shutdown);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let ok = lock(&board.meters[1].live).polls_of(Outcome::Ok);
        if ok >= 3 {
            break;
        }
        fine.advance(1);
        assert!(
            std::time::Instant::now() < deadline,
            "the answering meter stopped"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let _ = stop.send(true);
    for t in tasks {
        t.await.unwrap();
    }
    let hung_live = lock(&board.meters[0].live);
    assert!(!hung_live.up);
    assert_eq!(hung_live.polls_of(Outcome::Ok), 0);
    assert!(hung_live.polls_of(Outcome::Timeout) >= 1);
}

fn pdu_meter(pdu: &capwatch_testkit::redfish::Service, extra: &str) -> Meter {
    let text = format!(
        "[[meter]]\nid = \"pdu\"\nkind = \"redfish_pdu\"\nnodes = [\"n-1\"]\nurl = \"{}\"\ninterval = \"1s\"\ntimeout = \"300ms\"\n{extra}",
        pdu.pdu_url()
    );
    #[derive(serde::Deserialize)]
    struct File {
        meter: Vec<MeterConfig>,
    }
    let file: File = toml::from_str(&text).expect("valid TOML");
    Meter::new(check(&file.meter).expect("a valid meter").remove(0))
}

/// A PDU over TLS with basic auth: its energy counter's steps exactly, its
/// own power reading, a counter that goes back as a reset, a hung PDU
/// bounded by the timeout and a 500 as an exception.
#[tokio::test]
async fn a_redfish_pdu_is_read_exactly_and_its_faults_are_counted() {
    use capwatch_testkit::redfish::{Fault, Options, Schema, Service, Slow};
    let pdu = Service::start(Options::new(Schema::Pdu).tls().auth("meter", "s3cret"));
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pdu.ca_pem().unwrap()).unwrap();
    let creds = dir.path().join("creds");
    std::fs::write(&creds, "meter:s3cret\n").unwrap();
    let m = pdu_meter(
        &pdu,
        &format!(
            "ca_file = {:?}\ncredentials_file = {:?}\n",
            ca.display().to_string(),
            creds.display().to_string()
        ),
    );
    let mut p = poller(&m);
    pdu.advance_mj(36_000_000);
    pdu.set_power_mw(12_345_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    let start = pdu.energy_mj();
    // kWh with eight decimals: whole multiples of 36 mJ are exact.
    pdu.advance_mj(36 * 1_234_567);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    assert_eq!(energy(&m), pdu.energy_mj() - start);
    assert_eq!(
        lock(&m.live).power_mw,
        Some(12_345_000),
        "the PDU's own power"
    );

    // A reading 1 kJ behind, once: no step the PDU can make, refused; it
    // is no reset since the next reading carries on.
    pdu.set_fault(Fault::CounterBackwards);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    pdu.set_fault(Fault::ServerError);
    assert_eq!(poll(&mut p, &m).await, Outcome::Exception);
    pdu.set_fault(Fault::None);
    pdu.set_slow(Slow::Forever);
    assert_eq!(poll(&mut p, &m).await, Outcome::Timeout);
    assert!(!lock(&m.live).up);
    pdu.set_slow(Slow::No);
    pdu.release();
    // The hung read ends by its own deadline; the poll that waits for it
    // counts a timeout rather than start another read.
    let mut polls = 0;
    while poll(&mut p, &m).await != Outcome::Ok {
        polls += 1;
        assert!(polls < 5, "the PDU never answered again");
    }
    let live = lock(&m.live);
    assert!(live.up);
    for o in [Outcome::Invalid, Outcome::Exception] {
        assert_eq!(live.polls_of(o), 1, "{o:?}");
    }
    assert_eq!(live.polls_of(Outcome::Reset), 0);
    assert_eq!(live.polls_of(Outcome::Timeout), 1 + polls);
    // Energy never went back.
    assert!(
        live.readings
            .iter()
            .zip(live.readings.iter().skip(1))
            .all(|(a, b)| a.energy_mj <= b.energy_mj)
    );
}

/// A PDU answering an absurd `EnergykWh` once, then its real figure: the
/// absurd one is refused and nothing booked for it; a PDU without an
/// energy reading is invalid too.
#[tokio::test]
async fn an_absurd_pdu_energy_reading_is_refused_and_the_next_carries_on() {
    use capwatch_testkit::redfish::{Fault, Options, Schema, Service};
    let pdu = Service::start(Options::new(Schema::Pdu));
    let m = pdu_meter(&pdu, "");
    let mut p = poller(&m);
    pdu.advance_mj(36_000_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    let start = pdu.energy_mj();
    pdu.set_fault_for(Fault::AbsurdEnergy, 1);
    assert_eq!(poll(&mut p, &m).await, Outcome::Invalid);
    pdu.advance_mj(36 * 1_000_000);
    assert_eq!(poll(&mut p, &m).await, Outcome::Ok);
    assert_eq!(energy(&m), pdu.energy_mj() - start);
    let live = lock(&m.live);
    assert_eq!(
        (
            live.polls_of(Outcome::Invalid),
            live.polls_of(Outcome::Reset)
        ),
        (1, 0)
    );
}

/// Answers a read cannot use are `Invalid`, counted, and change nothing:
/// a PDU reading without energy, a count past the rollover.
#[test]
fn unusable_answers_are_invalid_and_keep_the_baseline() {
    let spec = |kind: &str, extra: &str| {
        let cfg: MeterConfig = toml::from_str(&format!(
            "id = \"x\"\nkind = \"{kind}\"\nnodes = [\"n\"]\n{extra}"
        ))
        .unwrap();
        check(&[cfg]).unwrap().remove(0)
    };
    let t = 1_700_000_000_000_000_000i64;
    let pdu = spec(
        "redfish_pdu",
        "url = \"http://p/redfish/v1/PowerEquipment/RackPDUs/1\"\n",
    );
    let mut live = Live::default();
    let no_energy = capwatch_common::redfish::Reading {
        power_milliwatts: Some(1_000),
        energy_millijoules: None,
    };
    assert_eq!(
        live.apply(&pdu, t, Ok(Raw::Pdu(no_energy))),
        Outcome::Invalid
    );
    assert!(live.readings.is_empty() && !live.up);
    let modbus = spec("modbus", "address = \"h:502\"\nrollover = 1000\n");
    let mut live = Live::default();
    assert_eq!(live.apply(&modbus, t, Ok(Raw::Count(10))), Outcome::Ok);
    assert_eq!(
        live.apply(&modbus, t + SEC15, Ok(Raw::Count(1_000))),
        Outcome::Invalid
    );
    // A PDU's figure given to a modbus meter (never happens) is refused.
    assert_eq!(
        live.apply(&modbus, t + 2 * SEC15, Ok(Raw::Pdu(no_energy))),
        Outcome::Invalid
    );
    assert_eq!(
        live.apply(&modbus, t + 3 * SEC15, Ok(Raw::Count(12))),
        Outcome::Ok
    );
    assert_eq!(live.energy_mj, 2 * 3_600_000_000);
    assert_eq!(live.polls_of(Outcome::Invalid), 2);
}

const SEC15: i64 = 15_000_000_000;

/// A reset confirmed after the collector's clock stepped back: the live
/// count and the allocation's recount of the raw readings judge the step
/// from the candidate over the same time (the one the readings stand at),
/// so they book the same millijoules.
#[test]
fn a_reset_confirmed_after_a_clock_step_back_is_judged_alike_live_and_in_the_ledger() {
    let cfg: MeterConfig = toml::from_str(
        "id = \"x\"\nkind = \"modbus\"\nnodes = [\"n\"]\naddress = \"h:502\"\nwh_per_count = 0.001\nmax_kw = 1.0\n",
    )
    .unwrap();
    let spec = check(&[cfg]).unwrap().remove(0);
    let t = 1_700_000_000_000_000_000i64;
    let mut live = Live::default();
    let recount = |live: &Live| -> u64 {
        let raw: Vec<(i64, u64)> = live.raw.iter().copied().collect();
        raw.windows(2)
            .map(|w| allocate::raw_delta(&spec, w[0].1, w[1].1, w[1].0 - w[0].0))
            .sum()
    };
    // (seconds after t, count, outcome): 1 kW is 15 kJ (4167 counts) in
    // 15 s. The clock steps back 40 s after the second reading; the meter
    // is replaced (a count no step reaches) and counts on from there.
    let polls = [
        (0, 1_000, Outcome::Ok),
        (60, 2_000, Outcome::Ok),
        (20, 900_000, Outcome::Invalid),
        (40, 902_000, Outcome::Invalid),
        (75, 903_000, Outcome::Reset),
        (90, 904_000, Outcome::Ok),
    ];
    for (s, count, want) in polls {
        let got = live.apply(&spec, t + s * 1_000_000_000, Ok(Raw::Count(count)));
        assert_eq!(got, want, "the reading at {s} s");
        assert_eq!(live.energy_mj, recount(&live), "after the reading at {s} s");
    }
    assert_eq!(live.energy_mj, (1_000 + 1_000 + 1_000) * MJ);
}

#[test]
fn a_pdu_whose_credentials_file_is_missing_refuses_the_start() {
    let pdu = capwatch_testkit::redfish::Service::start(capwatch_testkit::redfish::Options::new(
        capwatch_testkit::redfish::Schema::Pdu,
    ));
    let m = pdu_meter(&pdu, "credentials_file = \"/nonexistent/creds\"\n");
    let e = Poller::new(&m.spec).err().expect("refused");
    assert_eq!((e.meter.as_str(), e.setting), ("pdu", "url"));
    assert!(e.reason.contains("credentials"), "{e}");
}

/// `/metrics` shows each meter's figures, and none it has not given.
#[test]
fn metrics_show_each_meters_figures_and_nothing_it_has_not_given() {
    use crate::state::{State, StateConfig};
    use std::time::Duration;
    let cfgs: Vec<MeterConfig> = ["a", "b"]
        .iter()
        .map(|id| {
            toml::from_str(&format!(
                "id = \"{id}\"\nkind = \"modbus\"\nnodes = [\"n-{id}*\"]\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\nmin_ratio = 1.0\nmax_ratio = 1.25\n"
            ))
            .unwrap()
        })
        .collect();
    let board = Board::new(check(&cfgs).unwrap());
    {
        let m = &board.meters[0];
        let mut live = lock(&m.live);
        live.apply(&m.spec, 1_700_000_000_000_000_000, Ok(Raw::Count(10)));
        // 1000 counts of 3.6 J over 10 s: 360 W.
        live.apply(&m.spec, 1_700_000_010_000_000_000, Ok(Raw::Count(1_010)));
        live.nodes_connected = 3;
        let b = &board.meters[1];
        lock(&b.live).apply(&b.spec, 1_700_000_000_000_000_000, Err(ReadError::Timeout));
    }
    let state = State::new(
        StateConfig {
            stale_after: None,
            max_gpus_per_node: 64,
            max_clock_skew: Duration::from_secs(600),
            max_sample_age: Duration::from_secs(86_400),
        },
        crate::tenants::Tenants::empty(),
    );
    state.set_meters(Arc::new(board));
    let text = crate::metrics::render_text(&state, crate::metrics::Detail::ALL);
    let meter_lines: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("capwatch_meter_"))
        .collect();
    expect_test::expect![[r#"
        capwatch_meter_up{meter="a"} 1
        capwatch_meter_up{meter="b"} 0
        capwatch_meter_polls_total{meter="a",outcome="ok"} 2
        capwatch_meter_polls_total{meter="a",outcome="reset"} 0
        capwatch_meter_polls_total{meter="a",outcome="timeout"} 0
        capwatch_meter_polls_total{meter="a",outcome="error"} 0
        capwatch_meter_polls_total{meter="a",outcome="exception"} 0
        capwatch_meter_polls_total{meter="a",outcome="invalid"} 0
        capwatch_meter_polls_total{meter="b",outcome="ok"} 0
        capwatch_meter_polls_total{meter="b",outcome="reset"} 0
        capwatch_meter_polls_total{meter="b",outcome="timeout"} 1
        capwatch_meter_polls_total{meter="b",outcome="error"} 0
        capwatch_meter_polls_total{meter="b",outcome="exception"} 0
        capwatch_meter_polls_total{meter="b",outcome="invalid"} 0
        capwatch_meter_power_watts{meter="a"} 360
        capwatch_meter_energy_joules_total{meter="a"} 3600
        capwatch_meter_energy_joules_total{meter="b"} 0
        capwatch_meter_allocated_energy_joules_total{meter="a"} 0
        capwatch_meter_allocated_energy_joules_total{meter="b"} 0
        capwatch_meter_measured_energy_joules_total{meter="a"} 0
        capwatch_meter_measured_energy_joules_total{meter="b"} 0
        capwatch_meter_last_success_timestamp_seconds{meter="a"} 1700000010
        capwatch_meter_ratio_bound{meter="a",bound="min"} 1
        capwatch_meter_ratio_bound{meter="a",bound="max"} 1.25
        capwatch_meter_ratio_bound{meter="b",bound="min"} 1
        capwatch_meter_ratio_bound{meter="b",bound="max"} 1.25
        capwatch_meter_nodes_connected{meter="a"} 3
        capwatch_meter_nodes_connected{meter="b"} 0
        capwatch_meter_allocation_holding_nodes{meter="a"} 0
        capwatch_meter_allocation_holding_nodes{meter="b"} 0
        capwatch_meter_resplits_total{meter="a"} 0
        capwatch_meter_resplits_total{meter="b"} 0
        capwatch_meter_nodes_overlapping{meter="a"} 0
        capwatch_meter_nodes_overlapping{meter="b"} 0
    "#]]
    .assert_eq(&(meter_lines.join("\n") + "\n"));
}

mod allocation {
    //! Meter minutes allocated from a real SQLite ledger's minute buckets.

    use std::sync::{Arc, Mutex};

    use super::super::*;
    use crate::ledger::{
        AnyWriter, BucketDelta, Commit, Ledger, MeterMinute, MeterShare, NodeCursor, NodeMinute,
        Reader,
    };

    /// The ledger as the allocation sees it: the writer, and a read
    /// connection of its own.
    struct Ledgers {
        writer: Mutex<AnyWriter>,
        reader: Mutex<Reader>,
    }

    fn round(m: &Meter, l: &Ledgers) -> Result<Vec<MeterMinute>, crate::ledger::LedgerError> {
        super::super::allocate::round(m, &l.reader, &l.writer)
    }

    fn round_all(
        ms: &[&Meter],
        l: &Ledgers,
    ) -> Result<Vec<Vec<MeterMinute>>, (String, crate::ledger::LedgerError)> {
        super::super::allocate::round_all(ms, &l.reader, &l.writer)
    }

    /// 2027-01-15T08:00:00Z.
    const M: i64 = 1_800_000_000;
    const NS: i64 = 1_000_000_000;

    fn modbus(extra: &str) -> Meter {
        let cfg: MeterConfig = toml::from_str(&format!(
            "id = \"row-a\"\nkind = \"modbus\"\nnodes = [\"n-1\", \"n-2\"]\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\n{extra}"
        ))
        .unwrap();
        Meter::new(check(&[cfg]).unwrap().remove(0))
    }

    /// A ledger whose minutes `M..M+minutes` hold, per minute k: lab-a on
    /// n-1 with node energy (node_ns > 0), lab-b on n-2 with GPU energy
    /// only, lab-c on n-3 (not under the meter); all final.
    fn ledger(minutes: i64) -> (Ledgers, Reader, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ledger.db");
        let mut w = Ledger::create(&path).unwrap();
        let mut c = Commit::default();
        for n in ["n-1", "n-2", "n-3"] {
            c.nodes.insert(Arc::from(n), NodeCursor::default());
        }
        for k in 0..minutes {
            let minute = M + 60 * k;
            let k = k as u64;
            let rows = [
                (
                    "lab-a",
                    "n-1",
                    BucketDelta {
                        energy_mj: 1,
                        node_energy_mj: 3_000 + k,
                        node_ns: NS as u64,
                        ..Default::default()
                    },
                ),
                (
                    "lab-b",
                    "n-2",
                    BucketDelta {
                        energy_mj: 1_000 + 7 * k,
                        ..Default::default()
                    },
                ),
                (
                    "lab-c",
                    "n-3",
                    BucketDelta {
                        energy_mj: 99_999,
                        ..Default::default()
                    },
                ),
            ];
            for (t, n, d) in rows {
                c.buckets.insert((Arc::from(t), Arc::from(n), minute), d);
            }
        }
        w.commit_at(&c, M + 86_400, M + 86_400).unwrap();
        let reader = Reader::open(&path).unwrap();
        let w: AnyWriter = Box::new(w);
        let ledgers = Ledgers {
            writer: Mutex::new(w),
            reader: Mutex::new(Reader::open(&path).unwrap()),
        };
        (ledgers, reader, dir)
    }

    /// Counts of a meter polled every 15 s from `M - 30 s` (on minute
    /// boundaries too), starting at `start` and wrapping at `rollover`:
    /// (time, count) pairs, and the unwrapped counts (ground truth).
    fn readings(start: u64, per_poll: &[u64], rollover: u64) -> Vec<(i64, u64, u64)> {
        let mut out = Vec::new();
        let mut total = start;
        for (i, add) in per_poll.iter().enumerate() {
            total += add;
            out.push(((M - 30 + 15 * i as i64) * NS, total % rollover, total));
        }
        out
    }

    fn poll_all(m: &Meter, polls: &[(i64, u64, u64)]) {
        let mut live = lock(&m.live);
        for (at, count, _) in polls {
            let o = live.apply(&m.spec, *at, Ok(Raw::Count(*count)));
            assert_eq!(o, Outcome::Ok);
        }
    }

    /// The ground truth at minute boundary `b` (a reading is taken on it).
    fn truth_at(polls: &[(i64, u64, u64)], b: i64) -> u64 {
        polls.iter().find(|p| p.0 == b * NS).unwrap().2 * 3_600
    }

    #[test]
    fn each_minute_is_the_meters_energy_split_exactly_by_measured_shares() {
        let (ledger, reader, _dir) = ledger(10);
        let m = modbus("rollover = 100000\n");
        // Irregular steps, wrapping at 100000 counts twice.
        let steps: Vec<u64> = (0..45).map(|i| 3_000 + (i * 7_919) % 5_000).collect();
        let polls = readings(90_000, &steps, 100_000);
        poll_all(&m, &polls);
        let written = round(&m, &ledger).unwrap();
        // Readings reach M+10:00 (the 42nd); whole minutes M..M+10 are final.
        assert_eq!(written.len(), 10, "{written:?}");
        let total: u64 = written.iter().map(|w| w.metered_mj).sum();
        assert_eq!(total, truth_at(&polls, M + 600) - truth_at(&polls, M));
        for (k, w) in written.iter().enumerate() {
            let b = M + 60 * k as i64;
            assert_eq!(w.minute, b);
            // Boundaries are readings: each minute is exact, not rounded.
            assert_eq!(w.metered_mj, truth_at(&polls, b + 60) - truth_at(&polls, b));
            let k = k as u64;
            let (a, bb) = (3_000 + k, 1_000 + 7 * k);
            assert_eq!(w.measured_mj, a + bb, "lab-c's node is not under the meter");
            let parts: u64 = w.tenants.iter().map(|t| t.allocated_mj).sum();
            assert_eq!(parts + w.unallocated_mj, w.metered_mj);
            assert_eq!(w.unallocated_mj, 0);
            assert_eq!(
                w.tenants
                    .iter()
                    .map(|t| (t.tenant.as_str(), t.measured_mj))
                    .collect::<Vec<_>>(),
                vec![("lab-a", a), ("lab-b", bb)]
            );
            let exact_a = u128::from(w.metered_mj) * u128::from(a) / u128::from(a + bb);
            assert!(u128::from(w.tenants[0].allocated_mj) - exact_a <= 1);
        }
        // The ledger holds the same, once.
        let stored = reader.meter_minutes(None, M - 3600, M + 3600).unwrap();
        assert_eq!(
            stored,
            written
                .iter()
                .map(|w| ("row-a".to_string(), w.clone()))
                .collect::<Vec<_>>()
        );
        // A second round has nothing new.
        assert!(round(&m, &ledger).unwrap().is_empty());
        assert_eq!(lock(&m.live).allocated_mj, total);
        // Live facility power takes the latest minute's ratio.
        let last = &written[9];
        assert_eq!(
            lock(&m.live).ratio_ppm,
            Some(last.metered_mj * 1_000_000 / last.measured_mj)
        );
    }

    /// Three hours final at once (an outage's catch-up): each round
    /// allocates at most an hour, so no round holds the ledger long, and
    /// the rounds together add up to the meter's difference, exactly and
    /// in order, as the ledger stores them.
    #[test]
    fn a_long_catch_up_goes_an_hour_per_round_and_adds_up_exactly() {
        let (ledger, reader, _dir) = ledger(180);
        let m = modbus("");
        let steps: Vec<u64> = (0..725).map(|i| 500 + (i * 7_919) % 3_000).collect();
        let polls = readings(12_345, &steps, u64::MAX);
        poll_all(&m, &polls);
        let mut rounds = Vec::new();
        loop {
            let w = round(&m, &ledger).unwrap();
            if w.is_empty() {
                break;
            }
            rounds.push(w.len());
        }
        assert_eq!(rounds, vec![60, 60, 60]);
        let stored = reader
            .meter_minutes(Some("row-a"), M, M + 3 * 3600)
            .unwrap();
        assert_eq!(stored.len(), 180);
        for (i, (_, mm)) in stored.iter().enumerate() {
            assert_eq!(mm.minute, M + 60 * i as i64);
        }
        let sum: u64 = stored.iter().map(|(_, mm)| mm.metered_mj).sum();
        assert_eq!(sum, truth_at(&polls, M + 3 * 3600) - truth_at(&polls, M));
    }

    /// A second collector, polling the same meter at other moments, picks
    /// up from the reading the ledger names: the minutes of both add up to
    /// the meter's energy exactly, none twice.
    #[test]
    fn another_collector_counts_on_from_the_reading_the_ledger_names() {
        let (ledger, reader, _dir) = ledger(20);
        let first = modbus("");
        let steps: Vec<u64> = (0..25).map(|i| 1_000 + i * 37).collect();
        let mut polls = readings(7, &steps, u64::MAX);
        // No reading on the last boundary (M+5:00): it is interpolated,
        // and what of the energy after the last reading before it was
        // allocated already is carried in the ledger.
        polls.remove(22);
        poll_all(&first, &polls);
        let a = round(&first, &ledger).unwrap();
        assert_eq!(a.len(), 5);
        // The second collector polls at :37 and :52 and :07 and :22, with
        // the meter going on from where the first's polls ended.
        let second = modbus("");
        let mut count = polls.last().unwrap().2;
        let mut truth = vec![(polls.last().unwrap().0, count)];
        {
            let mut live = lock(&second.live);
            for i in 0..40 {
                count += 2_000 + i * 11;
                let at = (M + 5 * 60 + 37 + 15 * i as i64) * NS;
                truth.push((at, count));
                assert_eq!(
                    live.apply(&second.spec, at, Ok(Raw::Count(count))),
                    Outcome::Ok
                );
            }
        }
        let b = round(&second, &ledger).unwrap();
        assert!(!b.is_empty());
        assert_eq!(b[0].minute, M + 300, "on from the first's last minute");
        let all = reader
            .meter_minutes(Some("row-a"), M - 3600, M + 7200)
            .unwrap();
        for (i, (_, mm)) in all.iter().enumerate() {
            assert_eq!(mm.minute, M + 60 * i as i64, "every minute once, in order");
        }
        let end = all.last().unwrap().1.minute + 60;
        let sum: u64 = all.iter().map(|(_, mm)| mm.metered_mj).sum();
        // The meter's energy from M to `end`: M is a reading of the first
        // collector; `end` lies between two of the second's.
        let start_mj = truth_at(&polls, M);
        let series: Vec<crate::accounting::facility::Reading> = truth
            .iter()
            .map(|(at, c)| crate::accounting::facility::Reading {
                at_ns: *at,
                energy_mj: c * 3_600,
            })
            .collect();
        let end_mj = crate::accounting::facility::energy_at(&series, end * NS).unwrap();
        assert_eq!(sum, end_mj - start_mj);
    }

    /// One round for several meters reads the measured minutes once and
    /// gives each meter its own nodes' share.
    #[test]
    fn one_round_allocates_every_meter_from_its_own_nodes() {
        let (ledger, _reader, _dir) = ledger(3);
        let a = modbus("");
        let cfg: MeterConfig = toml::from_str(
            "id = \"row-c\"\nkind = \"modbus\"\nnodes = [\"n-3\"]\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\n",
        )
        .unwrap();
        let c = Meter::new(check(&[cfg]).unwrap().remove(0));
        let polls = readings(0, &[10; 20], u64::MAX);
        poll_all(&a, &polls);
        poll_all(&c, &polls);
        let written = round_all(&[&a, &c], &ledger).unwrap();
        // Readings reach M+4:15: four whole minutes, the ledger's buckets
        // three of them.
        assert_eq!(written[0].len(), 4);
        assert_eq!(written[1].len(), 4);
        assert_eq!(written[1][3].unallocated_mj, written[1][3].metered_mj);
        for (wa, wc) in written[0].iter().zip(&written[1]).take(3) {
            assert_eq!(wa.metered_mj, wc.metered_mj, "the same readings");
            assert_eq!(
                wc.tenants,
                vec![MeterShare::new("lab-c", 99_999, wc.metered_mj, 0)]
            );
            assert!(wa.tenants.iter().all(|t| t.tenant != "lab-c"));
        }
    }

    /// Two meters whose globs overlap (not decidable from the config): the
    /// round counts the nodes both cover, on each meter, and only those.
    #[test]
    fn nodes_under_two_meters_are_counted_on_each() {
        let (ledger, _reader, _dir) = ledger(3);
        let meter_of = |id: &str, nodes: &str| {
            let cfg: MeterConfig = toml::from_str(&format!(
                "id = \"{id}\"\nkind = \"modbus\"\nnodes = {nodes}\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\n"
            ))
            .unwrap();
            cfg
        };
        let specs = check(&[
            meter_of("row-a", "[\"n-[12]\"]"),
            meter_of("row-x", "[\"n-[23]\"]"),
        ])
        .unwrap();
        let (a, x) = (Meter::new(specs[0].clone()), Meter::new(specs[1].clone()));
        let polls = readings(0, &[10; 20], u64::MAX);
        poll_all(&a, &polls);
        poll_all(&x, &polls);
        round_all(&[&a, &x], &ledger).unwrap();
        assert_eq!(lock(&a.live).nodes_overlapping, 1, "n-2");
        assert_eq!(lock(&x.live).nodes_overlapping, 1, "n-2");
        let alone = modbus("");
        poll_all(&alone, &polls);
        round(&alone, &ledger).unwrap();
        assert_eq!(lock(&alone.live).nodes_overlapping, 0);
    }

    /// Commits `node`'s cursor with one whole-node source whose counter
    /// last changed at `changed` and was read at `seen` (Unix seconds).
    fn read_power(l: &Ledgers, node: &str, changed: i64, seen: i64) {
        let mut c = Commit::default();
        let cursor = NodeCursor {
            power: vec![(
                Arc::from("redfish/bmc"),
                crate::ledger::GpuCursor {
                    last_counter_mj: Some(3_600_000),
                    last_timestamp_ns: Some(seen * NS),
                    remainder_mw_ns: 0,
                    energy_mj: 3_600_000,
                    counter_resets: 0,
                    changed_ns: Some(changed * NS),
                },
            )],
            ..NodeCursor::default()
        };
        c.nodes.insert(Arc::from(node), cursor);
        lock(&l.writer)
            .commit_as(
                crate::ledger::sqlite::LOCAL_HOLDER,
                &c,
                M + 86_400,
                M + 86_400,
            )
            .unwrap();
    }

    /// A node under the meter whose coarse whole-node counter has stood
    /// still since 08:05:30 will spread its next step back over the
    /// minutes from then: they wait for it, while the minutes before are
    /// allocated; once the counter steps, the rest go. A node that stopped
    /// reading long before the watermark, or one under no meter, holds
    /// nothing.
    #[test]
    fn minutes_a_nodes_open_stretch_may_still_fill_wait_for_it() {
        let (ledger, _reader, _dir) = ledger(10);
        let m = modbus("");
        let polls = readings(0, &[10; 45], u64::MAX);
        poll_all(&m, &polls);
        let watermark = M + 86_400;
        read_power(&ledger, "n-1", M + 330, watermark - 20);
        // Stopped reading an hour before the watermark.
        read_power(&ledger, "n-2", M + 60, watermark - 3_600);
        // Not under the meter.
        read_power(&ledger, "n-3", M, watermark - 20);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(
            written.iter().map(|w| w.minute).collect::<Vec<_>>(),
            (0..5).map(|k| M + 60 * k).collect::<Vec<_>>()
        );
        assert!(round(&m, &ledger).unwrap().is_empty(), "still held");
        {
            let live = lock(&m.live);
            assert_eq!(
                (live.allocated_through, live.holding_nodes),
                (Some(M + 300), 1)
            );
        }
        // The counter steps at 08:08:10 (its energy booked back to
        // 08:05:30): the minutes up to 08:08 go.
        read_power(&ledger, "n-1", M + 490, watermark - 10);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(
            written.iter().map(|w| w.minute).collect::<Vec<_>>(),
            (5..8).map(|k| M + 60 * k).collect::<Vec<_>>()
        );
        // And every minute once it has been read since the last one.
        read_power(&ledger, "n-1", M + 86_000, watermark - 5);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(written.len(), 2, "{written:?}");
        assert_eq!(lock(&m.live).holding_nodes, 0);
        let total: u64 = lock(&m.live).allocated_mj;
        assert_eq!(total, truth_at(&polls, M + 600) - truth_at(&polls, M));
    }

    /// Books `node_mj` of node energy for `tenant` on `node` in `minute`,
    /// a final minute: an adjustment, as a node's coarse counter stepping
    /// late, or a spool delivered late, books it.
    fn book_late(l: &Ledgers, tenant: &str, node: &str, minute: i64, node_mj: u64) {
        let mut c = Commit::default();
        c.nodes.insert(Arc::from(node), NodeCursor::default());
        c.buckets.insert(
            (Arc::from(tenant), Arc::from(node), minute),
            BucketDelta {
                node_energy_mj: node_mj,
                node_ns: NS as u64,
                ..Default::default()
            },
        );
        lock(&l.writer)
            .commit_as(
                crate::ledger::sqlite::LOCAL_HOLDER,
                &c,
                M + 86_400,
                M + 86_400,
            )
            .unwrap();
    }

    /// Energy booked for a final minute before its meter allocates it (what
    /// the placing hold waits for: a coarse counter's step spread back) is
    /// an adjustment, and the split weighs it like the minute's bucket: the
    /// late tenant gets its part of the meter. Each part keeps the node
    /// energy of the bucket alone, which is what the row's estimate is of.
    #[test]
    fn energy_booked_late_before_the_allocation_is_in_the_split() {
        let (ledger, reader, _dir) = ledger(2);
        let m = modbus("");
        let polls = readings(0, &[10; 20], u64::MAX);
        poll_all(&m, &polls);
        // lab-a's n-1 in 08:01, and lab-d, which has no bucket there, on
        // n-2 beside lab-b.
        book_late(&ledger, "lab-a", "n-1", M + 60, 9_000);
        book_late(&ledger, "lab-d", "n-2", M + 60, 4_000);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(written.len(), 4, "{written:?}");
        let late = &written[1];
        assert_eq!(late.minute, M + 60);
        let parts: Vec<(&str, u64, u64)> = late
            .tenants
            .iter()
            .map(|t| (t.tenant.as_str(), t.measured_mj, t.node_mj))
            .collect();
        assert_eq!(
            parts,
            vec![
                ("lab-a", 3_001 + 9_000, 3_001),
                ("lab-b", 1_007, 0),
                ("lab-d", 4_000, 0),
            ]
        );
        assert_eq!(late.measured_mj, 3_001 + 9_000 + 1_007 + 4_000);
        let given: u64 = late.tenants.iter().map(|t| t.allocated_mj).sum();
        assert_eq!(given, late.metered_mj);
        let exact_a = u128::from(late.metered_mj) * 12_001 / u128::from(late.measured_mj);
        assert!(u128::from(late.tenants[0].allocated_mj).abs_diff(exact_a) <= 1);
        // The minute before has no late energy: split as before.
        assert_eq!(written[0].measured_mj, 3_000 + 1_000);
        // Each tenant's facility energy of the minute is its part, lab-d's
        // too, though it has no bucket there (the late energy itself is in
        // the adjustments, with no facility energy of its own: the part
        // holds it).
        let tenants = Arc::new(
            crate::tenants::Tenants::from_toml(
                "[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n\
                 [[tenant]]\nid = \"lab-d\"\nnodes = []\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        );
        let history = crate::tenants::TenantHistory::new(tenants.clone());
        let report = crate::usage::run(
            &reader,
            &tenants,
            &history,
            std::slice::from_ref(&m.spec),
            None,
            Some("2027-01-15T08:01:00Z"),
            Some("2027-01-15T08:02:00Z"),
            Some("1m"),
            None,
            None,
        )
        .unwrap();
        let facility: Vec<(&str, Option<u64>, bool)> = report
            .rows
            .iter()
            .filter(|r| ["lab-a", "lab-d"].contains(&r.tenant.as_str()))
            .map(|r| {
                (
                    r.tenant.as_str(),
                    r.facility_energy_millijoules,
                    r.facility_energy_pending,
                )
            })
            .collect();
        assert_eq!(
            facility,
            vec![
                ("lab-a", Some(late.tenants[0].allocated_mj), false),
                ("lab-d", Some(late.tenants[2].allocated_mj), false),
            ]
        );
        let restated: Vec<(&str, &str, Option<i64>)> = report
            .adjustments
            .iter()
            .filter(|a| ["lab-a", "lab-d"].contains(&a.tenant.as_str()))
            .map(|a| {
                (
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.facility_energy_restated_millijoules,
                )
            })
            .collect();
        let signed = |v: u64| i64::try_from(v).unwrap();
        assert_eq!(
            restated,
            vec![
                ("lab-a", "n-1", Some(0)),
                ("lab-d", "n-2", Some(0)),
                // The allocation's: lab-a's part less 1.5 × its bucket's
                // node energy (4,501.5, rounded half up), lab-d's part less
                // nothing.
                (
                    "lab-a",
                    "",
                    Some(signed(late.tenants[0].allocated_mj) - 4_502)
                ),
                ("lab-d", "", Some(signed(late.tenants[2].allocated_mj))),
            ]
        );
    }

    /// Energy booked for a minute after its meter allocated it (a node's
    /// spool delivered late) is split into it by the next round: the same
    /// metered energy, split by what the nodes measured now, with each
    /// tenant's change booked as an adjustment, summing to 0. The minute
    /// then reads as if the energy had come before its split, and the
    /// round after books nothing.
    #[test]
    fn energy_booked_after_the_allocation_is_split_into_it_again() {
        let (ledger, reader, _dir) = ledger(2);
        let m = modbus("");
        let polls = readings(0, &[10; 20], u64::MAX);
        poll_all(&m, &polls);
        let first = round(&m, &ledger).unwrap();
        assert_eq!(first.len(), 4, "{first:?}");
        let revision = crate::ledger::LedgerReader::revision(&*lock(&ledger.reader)).unwrap();
        let stored = |minute: i64| {
            lock(&ledger.reader)
                .meter_minutes(Some("row-a"), minute, minute + 60)
                .unwrap()
                .remove(0)
                .1
        };
        assert_eq!(stored(M + 60), first[1]);
        book_late(&ledger, "lab-a", "n-1", M + 60, 9_000);
        book_late(&ledger, "lab-d", "n-2", M + 60, 4_000);
        // On a node under no meter: nothing to split.
        book_late(&ledger, "lab-c", "n-3", M + 60, 5_000);
        assert_eq!(round(&m, &ledger).unwrap(), Vec::<MeterMinute>::new());
        assert_eq!(lock(&m.live).minutes_split_again, 1);
        let again = stored(M + 60);
        let parts: Vec<(&str, u64, u64)> = again
            .tenants
            .iter()
            .map(|t| (t.tenant.as_str(), t.measured_mj, t.node_mj))
            .collect();
        assert_eq!(
            parts,
            vec![
                ("lab-a", 3_001 + 9_000, 3_001),
                ("lab-b", 1_007, 0),
                ("lab-d", 4_000, 0),
            ]
        );
        assert_eq!(again.metered_mj, first[1].metered_mj);
        assert_eq!(again.measured_mj, 3_001 + 9_000 + 1_007 + 4_000);
        let given: u64 = again.tenants.iter().map(|t| t.allocated_mj).sum();
        assert_eq!(given + again.unallocated_mj, again.metered_mj);
        // As the split made after the late energy would be.
        let split = crate::accounting::facility::allocate(
            again.metered_mj,
            &[
                ("lab-a".to_string(), 12_001),
                ("lab-b".to_string(), 1_007),
                ("lab-d".to_string(), 4_000),
            ],
        );
        let want: Vec<u64> = split.shares.iter().map(|s| s.1).collect();
        let got: Vec<u64> = again.tenants.iter().map(|t| t.allocated_mj).collect();
        assert_eq!(got, want);
        // The other minutes are as they were.
        assert_eq!(stored(M), first[0]);
        // The changes, as adjustments of a revision of their own.
        let usage = lock(&ledger.reader)
            .usage_since(None, M, M + 120, revision)
            .unwrap();
        let changes: Vec<(&str, &str, i64, i64)> = usage
            .adjustments
            .iter()
            .filter(|a| a.revision == usage.revision)
            .map(|a| {
                (
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.metered.allocated_mj,
                    a.metered.node_mj,
                )
            })
            .collect();
        let signed = |v: u64| i64::try_from(v).unwrap();
        let was = |t: usize| signed(first[1].tenants[t].allocated_mj);
        assert_eq!(
            changes,
            vec![
                ("lab-a", "", signed(got[0]) - was(0), 0),
                ("lab-b", "", signed(got[1]) - was(1), 0),
                ("lab-d", "", signed(got[2]), 0),
            ]
        );
        assert!(changes[1].2 < 0, "lab-b's part shrinks");
        assert_eq!(changes.iter().map(|c| c.2).sum::<i64>(), 0);
        // Each facility tenant's rows are its new part; the adjustments a
        // billing job reads since the first split restate them to it.
        let tenants = Arc::new(
            crate::tenants::Tenants::from_toml(
                "[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n\
                 [[tenant]]\nid = \"lab-b\"\nnodes = [\"n-2\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n\
                 [[tenant]]\nid = \"lab-d\"\nnodes = []\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        );
        let history = crate::tenants::TenantHistory::new(tenants.clone());
        let report = |since: Option<&str>| {
            crate::usage::run(
                &reader,
                &tenants,
                &history,
                std::slice::from_ref(&m.spec),
                None,
                Some("2027-01-15T08:01:00Z"),
                Some("2027-01-15T08:02:00Z"),
                Some("1m"),
                None,
                since,
            )
            .unwrap()
        };
        let now = report(None);
        let facility: Vec<(&str, Option<u64>)> = now
            .rows
            .iter()
            .filter(|r| r.tenant.starts_with("lab-") && r.tenant != "lab-c")
            .map(|r| (r.tenant.as_str(), r.facility_energy_millijoules))
            .collect();
        assert_eq!(
            facility,
            vec![
                ("lab-a", Some(got[0])),
                ("lab-b", Some(got[1])),
                ("lab-d", Some(got[2])),
            ]
        );
        let since = report(Some(&revision.to_string()));
        let restated: Vec<(&str, &str, Option<i64>)> = since
            .adjustments
            .iter()
            .filter(|a| a.tenant != "lab-c")
            .map(|a| {
                (
                    a.tenant.as_str(),
                    a.node.as_str(),
                    a.facility_energy_restated_millijoules,
                )
            })
            .collect();
        assert_eq!(
            restated,
            vec![
                ("lab-a", "n-1", Some(0)),
                ("lab-d", "n-2", Some(0)),
                ("lab-a", "", Some(changes[0].2)),
                ("lab-b", "", Some(changes[1].2)),
                ("lab-d", "", Some(changes[2].2)),
            ]
        );
        // Once: the next round finds nothing left to split.
        let before = crate::ledger::LedgerReader::revision(&*lock(&ledger.reader)).unwrap();
        assert_eq!(round(&m, &ledger).unwrap(), Vec::<MeterMinute>::new());
        assert_eq!(
            crate::ledger::LedgerReader::revision(&*lock(&ledger.reader)).unwrap(),
            before
        );
        assert_eq!(lock(&m.live).minutes_split_again, 1);
    }

    /// Late energy that changes no split (a late delta with no energy on a
    /// node the meter covers) moves the meter's state to the revision it
    /// was read as of, with nothing booked, even while the meter has no
    /// new minute: later rounds do not read it again, nor stay behind it.
    #[test]
    fn late_energy_that_changes_no_split_is_passed_once() {
        use crate::ledger::LedgerReader;
        let (ledger, _reader, _dir) = ledger(2);
        let m = modbus("");
        poll_all(&m, &readings(0, &[10; 20], u64::MAX));
        assert_eq!(round(&m, &ledger).unwrap().len(), 4);
        book_late(&ledger, "lab-a", "n-1", M + 60, 0);
        let r = || lock(&ledger.reader);
        let revision = crate::ledger::LedgerReader::revision(&*r()).unwrap();
        assert!(r().meter_state("row-a").unwrap().unwrap().revision < revision);
        assert_eq!(round(&m, &ledger).unwrap(), Vec::<MeterMinute>::new());
        assert_eq!(lock(&m.live).minutes_split_again, 0);
        assert_eq!(
            r().meter_state("row-a").unwrap().unwrap().revision,
            revision
        );
        assert_eq!(
            crate::ledger::LedgerReader::revision(&*r()).unwrap(),
            revision,
            "nothing booked"
        );
    }

    /// Energy booked late for a minute before the meter's first (a meter
    /// added to a running site, or down since it was configured) is in no
    /// split, now or later: it carries its PUE estimate, and the minute is
    /// not pending. In a minute the meter allocated it is split in again
    /// and carries nothing of its own.
    #[test]
    fn late_energy_before_a_meters_first_minute_carries_its_estimate() {
        let (ledger, reader, _dir) = ledger(4);
        let m = modbus("");
        let polls = readings(0, &[10; 20], u64::MAX);
        // The first reading at 08:01:30: the first minute is 08:02.
        poll_all(&m, &polls[8..]);
        let first = round(&m, &ledger).unwrap();
        assert_eq!(first[0].minute, M + 120, "{first:?}");
        let revision = crate::ledger::LedgerReader::revision(&*lock(&ledger.reader)).unwrap();
        let tenants = Arc::new(
            crate::tenants::Tenants::from_toml(
                "[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        );
        let history = crate::tenants::TenantHistory::new(tenants.clone());
        let report = |since: Option<&str>| {
            crate::usage::run(
                &reader,
                &tenants,
                &history,
                std::slice::from_ref(&m.spec),
                Some("lab-a"),
                Some("2027-01-15T08:00:00Z"),
                Some("2027-01-15T08:03:00Z"),
                Some("1m"),
                None,
                since,
            )
            .unwrap()
        };
        let before = report(None);
        book_late(&ledger, "lab-a", "n-1", M, 9_000);
        book_late(&ledger, "lab-a", "n-1", M + 120, 1_000);
        assert_eq!(round(&m, &ledger).unwrap(), Vec::<MeterMinute>::new());
        assert_eq!(lock(&m.live).minutes_split_again, 1);
        let report_since = report(Some(&revision.to_string()));
        let late: Vec<(&str, &str, Option<i64>)> = report_since
            .adjustments
            .iter()
            .filter(|a| !a.node.is_empty())
            .map(|a| {
                (
                    a.start.as_str(),
                    a.node.as_str(),
                    a.facility_energy_restated_millijoules,
                )
            })
            .collect();
        assert_eq!(
            late,
            vec![
                ("2027-01-15T08:00:00Z", "n-1", Some(13_500)),
                ("2027-01-15T08:02:00Z", "n-1", Some(0)),
            ]
        );
        let pending: Vec<bool> = report_since
            .rows
            .iter()
            .map(|r| r.facility_energy_pending)
            .collect();
        assert_eq!(pending, [false, false, false]);
        // A job that read the rows before adds every change since; one
        // that reads afresh takes the rows and the late energy's changes
        // (the meters' are in the rows): the same facility energy.
        let facility = |r: &crate::usage::Report| -> i64 {
            r.rows
                .iter()
                .map(|r| i64::try_from(r.facility_energy_millijoules.unwrap()).unwrap())
                .sum()
        };
        let changes = |r: &crate::usage::Report, late_only: bool| -> i64 {
            r.adjustments
                .iter()
                .filter(|a| !late_only || !a.node.is_empty())
                .map(|a| a.facility_energy_restated_millijoules.unwrap())
                .sum()
        };
        let incremental = facility(&before) + changes(&report_since, false);
        let fresh = report(None);
        assert_eq!(facility(&fresh) + changes(&fresh, true), incremental);
        assert_ne!(
            changes(&report_since, false),
            13_500,
            "the split again moved some"
        );
    }

    /// A walk of usage pages is as of its first page's revision, facility
    /// energy included: a minute split again between two of its pages
    /// shows on neither, and a walk since that revision restates each row
    /// to the new parts exactly once.
    #[test]
    fn a_walk_keeps_its_revisions_split_of_a_minute_split_again_meanwhile() {
        use crate::usage::paged::{PageQuery, PageRequest, page};
        let (ledger, reader, _dir) = ledger(2);
        let m = modbus("");
        poll_all(&m, &readings(0, &[10; 20], u64::MAX));
        assert_eq!(round(&m, &ledger).unwrap().len(), 4);
        book_late(&ledger, "lab-a", "n-1", M + 60, 9_000);
        let tenants = Arc::new(
            crate::tenants::Tenants::from_toml(
                "[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n\
                 [[tenant]]\nid = \"lab-b\"\nnodes = [\"n-2\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        );
        let history = crate::tenants::TenantHistory::new(tenants.clone());
        let ask = |req: &PageRequest| {
            page(
                &reader,
                &tenants,
                &history,
                std::slice::from_ref(&m.spec),
                &PageQuery::parse(req).unwrap(),
            )
            .unwrap()
        };
        let req = PageRequest {
            tenants: vec!["lab-a".into(), "lab-b".into()],
            from: Some("2027-01-15T08:01:00Z".into()),
            to: Some("2027-01-15T08:02:00Z".into()),
            step: Some("1m".into()),
            limit: Some("1".into()),
            ..PageRequest::default()
        };
        let first = ask(&req);
        // Between the pages, the meter splits the minute again.
        assert_eq!(round(&m, &ledger).unwrap(), Vec::<MeterMinute>::new());
        assert_eq!(lock(&m.live).minutes_split_again, 1);
        let second = ask(&PageRequest {
            page_token: first.next_page_token.clone(),
            ..req.clone()
        });
        assert_eq!(second.revision, first.revision);
        assert_eq!(second.next_page_token, None);
        let facility = |pages: &[&crate::usage::paged::Page]| -> Vec<(String, u64)> {
            pages
                .iter()
                .flat_map(|p| &p.rows)
                .map(|r| {
                    (
                        r.usage.tenant.clone(),
                        r.usage.facility_energy_millijoules.unwrap(),
                    )
                })
                .collect()
        };
        let walked = facility(&[&first, &second]);
        let since = ask(&PageRequest {
            since_revision: Some(first.revision.to_string()),
            limit: Some("10".into()),
            ..req.clone()
        });
        let now = facility(&[&since]);
        assert_eq!(now.len(), 2);
        assert_ne!(walked, now, "the split again moved energy between them");
        for ((tenant, was), (_, is)) in walked.iter().zip(&now) {
            let restated: i64 = since
                .adjustments
                .iter()
                .filter(|a| a.tenant == *tenant)
                .map(|a| a.facility_energy_restated_millijoules.unwrap())
                .sum();
            assert_eq!(
                i64::try_from(*was).unwrap() + restated,
                i64::try_from(*is).unwrap(),
                "{tenant}: the walk's row plus what was booked since"
            );
        }
    }

    /// A round splits whole revisions' late minutes again, in order, up to
    /// its bound (a revision alone may pass it), on the meter's nodes only,
    /// and is as of the last revision it took.
    #[test]
    fn late_minutes_are_taken_a_whole_revision_at_a_time() {
        use super::super::allocate::{MAX_MINUTES_SPLIT_AGAIN_PER_ROUND as CAP, late_minutes};
        let spec = modbus("").spec;
        let at =
            |revision: u64, k: usize, node: &str| (revision, M + 60 * k as i64, node.to_string());
        // Revision 5 on n-3 (no meter's) and on n-1; 6 on n-2, twice the
        // same minute.
        let late = vec![
            at(5, 0, "n-1"),
            at(5, 1, "n-3"),
            at(6, 2, "n-2"),
            at(6, 2, "n-1"),
        ];
        assert_eq!(late_minutes(&spec, &late, 9), (vec![M, M + 120], 9));
        assert_eq!(late_minutes(&spec, &[], 9), (vec![], 9));
        // Past the bound: the revisions before the one that passes it.
        let mut many: Vec<_> = (0..CAP - 1).map(|k| at(3, k, "n-1")).collect();
        many.extend((CAP - 1..CAP + 2).map(|k| at(4, k, "n-2")));
        let (minutes, as_of) = late_minutes(&spec, &many, 9);
        assert_eq!((minutes.len(), as_of), (CAP - 1, 3));
        // A first revision past the bound alone is taken whole.
        let alone: Vec<_> = (0..CAP + 5).map(|k| at(3, k, "n-1")).collect();
        let (minutes, as_of) = late_minutes(&spec, &alone, 9);
        assert_eq!((minutes.len(), as_of), (CAP + 5, 9));
    }

    /// Minute M of a meter split 3:1 between lab-a (on n-1, with node
    /// energy) and lab-b (on n-2, GPU energy only).
    fn split_of_lab_a_and_b() -> MeterMinute {
        MeterMinute {
            minute: M,
            metered_mj: 10_000,
            measured_mj: 4_000,
            unallocated_mj: 0,
            tenants: vec![
                MeterShare::new("lab-a", 3_000, 7_500, 3_000),
                MeterShare::new("lab-b", 1_000, 2_500, 0),
            ],
        }
    }

    /// What `tenant` measured on `node` in minute M.
    fn row(tenant: &str, node: &str, measured_mj: u64, node_energy_mj: u64) -> NodeMinute {
        NodeMinute {
            tenant: tenant.into(),
            node: node.into(),
            minute: M,
            measured_mj,
            node_energy_mj,
        }
    }

    /// A minute split again keeps its metered energy and each part's node
    /// energy; a minute whose measured energy did not change (late energy
    /// on a node of another meter) is not split again.
    #[test]
    fn split_again_moves_parts_by_the_energy_booked_meanwhile() {
        use super::super::allocate::split_again;
        let spec = modbus("").spec;
        let stored = split_of_lab_a_and_b();
        let then = vec![
            row("lab-a", "n-1", 3_000, 3_000),
            row("lab-b", "n-2", 1_000, 0),
        ];
        let mut elsewhere = then.clone();
        elsewhere.push(row("lab-c", "n-3", 50_000, 0));
        assert_eq!(split_again(&spec, &stored, &elsewhere, &then), None);
        let now = vec![
            row("lab-a", "n-1", 3_000, 3_000),
            row("lab-b", "n-2", 6_000, 0),
        ];
        let again = split_again(&spec, &stored, &now, &then).unwrap();
        assert_eq!(
            again.minute,
            MeterMinute {
                minute: M,
                metered_mj: 10_000,
                measured_mj: 9_000,
                unallocated_mj: 0,
                tenants: vec![
                    MeterShare::new("lab-a", 3_000, 3_333, 3_000),
                    MeterShare::new("lab-b", 6_000, 6_667, 0),
                ],
            }
        );
        assert_eq!(
            again.changes,
            vec![("lab-a".into(), -4_167, 0), ("lab-b".into(), 4_167, 0)]
        );
    }

    /// A meter whose node list grew after a minute was split: a tenant on
    /// a node it covers only now, with nothing booked late, stays out of
    /// the minute split again for another tenant's late energy (it was
    /// never in that split; adding it with part 0 would take its PUE
    /// estimate off its row). One with energy booked late there joins by
    /// that energy alone, replacing no node energy: its bucket on the node
    /// was never in the split and keeps its estimate.
    #[test]
    fn split_again_leaves_out_a_tenant_on_a_node_covered_only_later() {
        use super::super::allocate::split_again;
        let cfg: MeterConfig = toml::from_str(
            "id = \"row-a\"\nkind = \"modbus\"\nnodes = [\"n-1\", \"n-2\", \"n-3\", \"n-4\"]\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\n",
        )
        .unwrap();
        let spec = check(&[cfg]).unwrap().remove(0);
        // Split when the meter covered n-1 and n-2 only.
        let stored = split_of_lab_a_and_b();
        let then = vec![
            row("lab-a", "n-1", 3_000, 3_000),
            row("lab-b", "n-2", 1_000, 0),
            row("lab-c", "n-3", 2_000, 2_000),
            row("lab-d", "n-4", 500, 500),
        ];
        let mut now = then.clone();
        now[1] = row("lab-b", "n-2", 6_000, 0);
        // lab-d: energy booked late on n-4, beside its bucket there.
        now[3] = row("lab-d", "n-4", 1_500, 500);
        let again = split_again(&spec, &stored, &now, &then).unwrap();
        let tenants: Vec<&str> = again
            .minute
            .tenants
            .iter()
            .map(|t| t.tenant.as_str())
            .collect();
        assert_eq!(tenants, ["lab-a", "lab-b", "lab-d"]);
        assert_eq!(again.minute.measured_mj, 3_000 + 6_000 + 1_000);
        let d = &again.minute.tenants[2];
        assert_eq!(
            (d.measured_mj, d.allocated_mj, d.node_mj),
            (1_000, 1_000, 0)
        );
        assert!(again.changes.iter().all(|c| c.0 != "lab-c"));
        assert_eq!(
            again.changes.iter().map(|c| c.1).sum::<i64>(),
            0,
            "the metered energy is only moved between tenants"
        );
        assert!(again.changes.iter().all(|c| c.2 == 0));
    }

    /// Nothing measured under the meter: its energy is kept as unallocated,
    /// no tenant billed for it.
    #[test]
    fn a_minute_with_nothing_measured_is_unallocated_not_lost() {
        let (ledger, _reader, _dir) = ledger(0);
        let m = modbus("");
        let polls = readings(0, &[10; 12], u64::MAX);
        poll_all(&m, &polls);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(written.len(), 2);
        for w in &written {
            assert_eq!(
                (w.metered_mj, w.unallocated_mj, w.measured_mj),
                (40 * 3_600, 40 * 3_600, 0)
            );
            assert!(w.tenants.is_empty());
        }
    }

    /// A facility tenant's rows of minutes a meter allocated stay what the
    /// allocation made them when the meter's node list changes later:
    /// each tenant's part keeps the node energy it replaced, rather than
    /// the rows judging it again by the meters' node lists of today.
    #[test]
    fn a_meters_node_list_changed_later_changes_no_allocated_minute() {
        let (ledger, reader, _dir) = ledger(3);
        let m = modbus("");
        let polls = readings(0, &[10; 20], u64::MAX);
        poll_all(&m, &polls);
        let written = round(&m, &ledger).unwrap();
        assert_eq!(written.len(), 4);
        let tenants = Arc::new(
            crate::tenants::Tenants::from_toml(
                "[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\ncontracted_kw = 1\nbasis = \"facility\"\npue = 1.5\n",
            )
            .unwrap(),
        );
        let history = crate::tenants::TenantHistory::new(tenants.clone());
        let rows = |meters: &[MeterSpec]| {
            crate::usage::run(
                &reader,
                &tenants,
                &history,
                meters,
                Some("lab-a"),
                Some("2027-01-15T08:00:00Z"),
                Some("2027-01-15T08:03:00Z"),
                Some("1m"),
                None,
                None,
            )
            .unwrap()
            .rows
            .into_iter()
            .map(|r| {
                (
                    r.facility_energy_millijoules,
                    r.facility_energy_estimated,
                    r.facility_energy_pending,
                )
            })
            .collect::<Vec<_>>()
        };
        let before = rows(std::slice::from_ref(&m.spec));
        // lab-a's only node is metered: each row is its allocated part.
        let parts: Vec<_> = written[..3]
            .iter()
            .map(|w| (Some(w.tenants[0].allocated_mj), false, false))
            .collect();
        assert_eq!(before, parts);
        // The meter now feeds n-2 and n-3, not lab-a's n-1.
        let cfg: MeterConfig = toml::from_str(
            "id = \"row-a\"\nkind = \"modbus\"\nnodes = [\"n-[23]\"]\naddress = \"127.0.0.1:1\"\nwh_per_count = 0.001\n",
        )
        .unwrap();
        let moved = check(&[cfg]).unwrap();
        assert_eq!(rows(&moved), before);
        // And with the meter gone from the config altogether.
        assert_eq!(rows(&[]), before);
    }
}

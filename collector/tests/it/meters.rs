//! Facility meters polled by a real collector process: a stand-in Modbus
//! TCP meter and a stand-in Redfish PDU, nodes streamed by mock agents.
//!
//! What is checked here is the polling and its figures end to end (config
//! file → tasks → `/metrics`): energy exactly the stand-ins' ground truth,
//! a hung meter bounded and counted while samples keep arriving. The
//! allocation of meter-minutes waits for the ledger's watermark (a
//! quarter-hour and more behind the clock), so it is checked against a
//! real ledger in-process (`meters::tests::allocation`), not here.

use std::time::Duration;

use capwatch_agent::meter_sim::{Layout, ModbusMeter, Mode};
use capwatch_testkit::eventually;
use capwatch_testkit::redfish::{Options, Schema, Service};

use crate::support::{Agent, Collector, Metrics, milli};

const TENANTS: &str = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 10\nnodes = [\"m-*\"]\n";

/// 0.001 Wh per count.
const MJ_PER_COUNT: u64 = 3_600;

fn value(m: &Metrics, name: &str, meter: &str) -> Option<f64> {
    m.select(name, &[("meter", meter)]).first().map(|s| s.1)
}

#[test]
fn a_collector_polls_its_meters_exactly_and_a_hung_one_stalls_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let modbus = ModbusMeter::start(Layout::default()).unwrap();
    modbus.set_rollover(1_000_000);
    modbus.set_count(999_000);
    let pdu = Service::start(Options::new(Schema::Pdu));
    pdu.set_power_mw(2_500_000);
    let config = dir.path().join("meters.toml");
    std::fs::write(
        &config,
        format!(
            "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m-1*\"]\naddress = \"{}\"\nwh_per_count = 0.001\nrollover = 1000000\ninterval = \"1s\"\ntimeout = \"300ms\"\n\n\
             [[meter]]\nid = \"pdu-1\"\nkind = \"redfish_pdu\"\nnodes = [\"m-2\", \"elsewhere\"]\nurl = \"{}\"\ninterval = \"1s\"\ntimeout = \"300ms\"\n",
            modbus.addr(),
            pdu.pdu_url()
        ),
    )
    .unwrap();
    let collector = Collector::start(
        dir.path(),
        TENANTS,
        0,
        &["--config", config.to_str().unwrap()],
    );
    let _a = Agent::start(dir.path(), &collector.endpoint(), "m-1", 100_000, "");
    let _b = Agent::start(dir.path(), &collector.endpoint(), "m-2", 100_000, "");
    let limit = Duration::from_secs(30);

    // Both meters answered once (their baselines), both nodes are up.
    eventually(limit, "first readings and nodes", || {
        let m = collector.metrics();
        value(&m, "capwatch_meter_up", "row-a") == Some(1.0)
            && value(&m, "capwatch_meter_up", "pdu-1") == Some(1.0)
            && value(&m, "capwatch_meter_nodes_connected", "row-a") == Some(1.0)
            && value(&m, "capwatch_meter_nodes_connected", "pdu-1") == Some(1.0)
    });
    // The register runs on through its rollover; the PDU's counter on.
    modbus.advance(1_500);
    assert_eq!(modbus.count(), 500, "the stand-in wrapped");
    pdu.advance_mj(36 * 1_000_003);
    let want_modbus = 1_500 * MJ_PER_COUNT;
    let want_pdu = 36 * 1_000_003;
    eventually(limit, "the meters' energy", || {
        let m = collector.metrics();
        value(&m, "capwatch_meter_energy_joules_total", "row-a").map(milli) == Some(want_modbus)
            && value(&m, "capwatch_meter_energy_joules_total", "pdu-1").map(milli) == Some(want_pdu)
    });
    let m = collector.metrics();
    assert_eq!(
        m.one(
            "capwatch_meter_polls_total",
            &[("meter", "row-a"), ("outcome", "reset")]
        ),
        0.0,
        "a wrap is not a reset"
    );
    assert_eq!(
        value(&m, "capwatch_meter_power_watts", "pdu-1"),
        Some(2_500.0)
    );

    // The Modbus meter hangs: its polls time out, the PDU and the
    // samples go on.
    modbus.set_mode(Mode::Hang);
    let accepted = |m: &Metrics| {
        m.one(
            "capwatch_collector_samples_total",
            &[("outcome", "accepted")],
        )
    };
    let before = accepted(&collector.metrics());
    eventually(limit, "timeouts counted while samples arrive", || {
        let m = collector.metrics();
        m.one(
            "capwatch_meter_polls_total",
            &[("meter", "row-a"), ("outcome", "timeout")],
        ) >= 2.0
            && value(&m, "capwatch_meter_up", "row-a") == Some(0.0)
            && value(&m, "capwatch_meter_up", "pdu-1") == Some(1.0)
            && accepted(&m) >= before + 4.0
    });
    // Back: what ran on during the hang is counted once.
    modbus.advance(10);
    modbus.set_mode(Mode::Normal);
    eventually(limit, "the meter answering again", || {
        let m = collector.metrics();
        value(&m, "capwatch_meter_up", "row-a") == Some(1.0)
            && value(&m, "capwatch_meter_energy_joules_total", "row-a").map(milli)
                == Some(want_modbus + 10 * MJ_PER_COUNT)
    });
    collector.stop();
}

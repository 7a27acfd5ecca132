//! The real NVML backend ([`NvmlSource`], through nvml-wrapper) against a
//! stand-in `libnvidia-ml.so` built from `tests/fake_nvml/fake_nvml.c`.
//!
//! Every test compiles its own copy of the fake, with its behaviour chosen
//! by `-D` switches, into its own temporary directory, so tests run in
//! parallel without sharing state and nothing is written into the source
//! tree. The fake's values are documented at the top of the C file and
//! mirrored in [`FAKE_GPUS`].

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;

use capwatch_agent::source::nvml::NvmlSource;
use capwatch_agent::source::{
    EarlierLayout, GpuHealth, GpuInfo, GpuReading, GpuSource, MigInstance, NvLinkErrors,
    SourceError, layout_id,
};
use nvml_wrapper::error::NvmlError;
use tempfile::TempDir;

/// What one fake GPU reports, in NVML units (which are the agent's units).
struct FakeGpu {
    uuid: &'static str,
    model: &'static str,
    power_mw: u64,
    energy_start_mj: u64,
    energy_step_mj: u64,
    util_gpu: u32,
    util_memory: u32,
    memory_total: u64,
    memory_used: u64,
    temperature_c: i32,
    sm_clock_mhz: u32,
    power_limit_mw: u64,
    pci_bus_id: &'static str,
    serial: &'static str,
}

const DRIVER_VERSION: &str = "550.54.15";

/// The fake node, as `fake_nvml.c` describes it.
const FAKE_GPUS: [FakeGpu; 2] = [
    FakeGpu {
        uuid: "GPU-00000000-1111-2222-3333-444444444444",
        model: "NVIDIA H100 80GB HBM3",
        power_mw: 312_345,
        energy_start_mj: 987_654_321,
        energy_step_mj: 1000,
        util_gpu: 87,
        util_memory: 45,
        memory_total: 85_899_345_920,
        memory_used: 12_884_901_888,
        temperature_c: 61,
        sm_clock_mhz: 1980,
        power_limit_mw: 700_000,
        pci_bus_id: "00000000:18:00.0",
        serial: "1654321098765",
    },
    FakeGpu {
        uuid: "GPU-55555555-6666-7777-8888-999999999999",
        model: "NVIDIA A100-SXM4-40GB",
        power_mw: 98_765,
        energy_start_mj: 123_456_789,
        energy_step_mj: 250,
        util_gpu: 12,
        util_memory: 3,
        memory_total: 42_949_672_960,
        memory_used: 1_073_741_824,
        temperature_c: 47,
        sm_clock_mhz: 1410,
        power_limit_mw: 400_000,
        pci_bus_id: "00000000:2A:00.0",
        serial: "1320921012345",
    },
];

/// The health readings of fake GPU `index`, in NVML units, as the C file
/// documents them.
fn fake_health(index: u32) -> GpuHealth {
    if index == 0 {
        GpuHealth {
            clock_event_reasons: Some(0x44),
            power_violation_nanoseconds: Some(123_456_789_012),
            thermal_violation_nanoseconds: Some(987_654_321),
            ecc_volatile_corrected: Some(17),
            ecc_volatile_uncorrected: Some(2),
            ecc_aggregate_corrected: Some(1234),
            ecc_aggregate_uncorrected: Some(5),
            retired_pages_single_bit: Some(3),
            retired_pages_double_bit: Some(1),
            retired_pages_pending: Some(true),
            remapped_rows_correctable: Some(4),
            remapped_rows_uncorrectable: Some(1),
            remapped_rows_pending: Some(true),
            remapped_rows_failed: Some(false),
            memory_temperature_celsius: Some(78),
            // The memory clock, not another one (see `clock_of`).
            memory_clock_mhz: Some(2619),
            encoder_utilization_percent: Some(11),
            decoder_utilization_percent: Some(23),
            pcie_replays: Some(42),
            pcie_tx_kilobytes_per_second: Some(123_456),
            pcie_rx_kilobytes_per_second: Some(654_321),
            // An SXM board: no fan of its own.
            fan_speed_percent: None,
            power_instant_milliwatts: Some(345_678),
            power_average_milliwatts: Some(311_111),
            // No XID event injected.
            xid_errors: BTreeMap::new(),
            last_xid: None,
            // No NVLink unless the fake is built with FAKE_GPU0_NVLINKS.
            nvlink_active_links: None,
            nvlinks: Vec::new(),
        }
    } else {
        GpuHealth {
            clock_event_reasons: Some(0x1),
            power_violation_nanoseconds: Some(0),
            thermal_violation_nanoseconds: Some(5),
            ecc_volatile_corrected: Some(1),
            ecc_volatile_uncorrected: Some(0),
            ecc_aggregate_corrected: Some(3),
            ecc_aggregate_uncorrected: Some(0),
            retired_pages_single_bit: Some(0),
            retired_pages_double_bit: Some(0),
            retired_pages_pending: Some(false),
            remapped_rows_correctable: Some(0),
            remapped_rows_uncorrectable: Some(0),
            remapped_rows_pending: Some(false),
            remapped_rows_failed: Some(true),
            memory_temperature_celsius: Some(55),
            memory_clock_mhz: Some(1215),
            encoder_utilization_percent: Some(0),
            decoder_utilization_percent: Some(4),
            pcie_replays: Some(7),
            pcie_tx_kilobytes_per_second: Some(2000),
            pcie_rx_kilobytes_per_second: Some(3000),
            fan_speed_percent: Some(67),
            power_instant_milliwatts: Some(101_010),
            power_average_milliwatts: Some(98_000),
            xid_errors: BTreeMap::new(),
            last_xid: None,
            // No NVLink unless the fake is built with FAKE_GPU0_NVLINKS.
            nvlink_active_links: None,
            nvlinks: Vec::new(),
        }
    }
}

/// A compiled copy of the fake; the directory lives as long as this does.
struct FakeNvml {
    _dir: TempDir,
    lib: PathBuf,
}

/// Compiles `fake_nvml.c` with `defines` into a fresh temporary directory
/// as `libnvidia-ml.so.1`.
fn build_fake(defines: &[&str]) -> FakeNvml {
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
    let dir = tempfile::Builder::new()
        .prefix("capwatch-fake-nvml-")
        .tempdir()
        .expect("creating a temporary directory for the fake libnvidia-ml.so");
    let lib = dir.path().join("libnvidia-ml.so.1");
    let compiler = std::env::var_os("CC").unwrap_or_else(|| OsString::from("cc"));
    let output = Command::new(&compiler)
        .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
        .arg(&lib)
        .args(defines)
        .arg(&source)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "the NVML tests build a stand-in libnvidia-ml.so from {} and need a C compiler: \
                 running `{}` failed ({e}); install one (e.g. gcc) or point CC at it",
                source.display(),
                compiler.to_string_lossy(),
            )
        });
    assert!(
        output.status.success(),
        "compiling {} with {defines:?} failed ({}):\n{}",
        source.display(),
        output.status,
        String::from_utf8_lossy(&output.stderr),
    );
    FakeNvml { _dir: dir, lib }
}

/// Opens the NVML source on `fake`, failing the test with the error's text.
fn open(fake: &FakeNvml) -> NvmlSource {
    match NvmlSource::open(Some(&fake.lib)) {
        Ok(source) => source,
        Err(e) => panic!("opening NVML from {}: {e}", fake.lib.display()),
    }
}

/// Opens the NVML source on `library`, expecting it to fail.
fn open_err(library: &Path) -> SourceError {
    match NvmlSource::open(Some(library)) {
        Ok(_) => panic!(
            "opening NVML from {} unexpectedly succeeded",
            library.display()
        ),
        Err(e) => e,
    }
}

fn expected_info(index: u32, energy_counter_supported: bool) -> GpuInfo {
    let gpu = &FAKE_GPUS[index as usize];
    GpuInfo {
        index,
        uuid: gpu.uuid.into(),
        model: gpu.model.into(),
        power_limit_milliwatts: Some(gpu.power_limit_mw),
        memory_total_bytes: Some(gpu.memory_total),
        energy_counter_supported,
        pci_bus_id: Some(gpu.pci_bus_id.into()),
        serial: Some(gpu.serial.into()),
        driver_version: Some(DRIVER_VERSION.into()),
        multiprocessor_count: None,
        gpu_instance_slice_count: None,
        mig: Vec::new(),
        mig_layout: mig_off(index),
        earlier_mig: Vec::new(),
    }
}

/// The layout id of GPU `index` with MIG mode off: GPU 0 can be put in
/// MIG mode, the others cannot (no id).
fn mig_off(index: u32) -> Option<u64> {
    (index == 0).then(|| layout_id(None, None, &[]))
}

/// The full reading of GPU `index` on the `sample`-th call to `sample()`
/// (1-based). `NvmlSource::open` reads the energy counter once to probe for
/// it, so the `sample`-th reading is `sample` steps past the start.
fn expected_reading(index: u32, sample: u64) -> GpuReading {
    let gpu = &FAKE_GPUS[index as usize];
    GpuReading {
        index,
        power_milliwatts: Some(gpu.power_mw),
        energy_millijoules: Some(gpu.energy_start_mj + sample * gpu.energy_step_mj),
        utilization_percent: Some(gpu.util_gpu),
        memory_utilization_percent: Some(gpu.util_memory),
        memory_used_bytes: Some(gpu.memory_used),
        temperature_celsius: Some(gpu.temperature_c),
        sm_clock_mhz: Some(gpu.sm_clock_mhz),
        power_limit_milliwatts: Some(gpu.power_limit_mw),
        health: fake_health(index),
        lost: false,
        mig_layout: mig_off(index),
    }
}

#[test]
fn inventory_lists_both_gpus_in_nvml_units() {
    let fake = build_fake(&[]);
    let source = open(&fake);
    assert_eq!(source.name(), "nvml");
    assert_eq!(
        source.inventory(),
        [expected_info(0, true), expected_info(1, true)]
    );
}

/// The node-scale stand-in (`FAKE_EXTRA_GPUS`, what the agent's cost is
/// measured on): GPUs 2.. are GPU 0's copies under identities of their
/// own, each read as its own board, with GPU 0's NVLinks.
#[test]
fn extra_gpus_are_boards_of_their_own_reading_as_gpu_0() {
    let fake = build_fake(&["-DFAKE_EXTRA_GPUS=6", "-DFAKE_GPU0_NVLINKS=18"]);
    let mut source = open(&fake);
    let inventory = source.inventory().to_vec();
    assert_eq!(inventory.len(), 8);
    assert_eq!(
        inventory[..2],
        [expected_info(0, true), expected_info(1, true)]
    );
    for (i, info) in inventory.iter().enumerate().skip(2) {
        let want = GpuInfo {
            index: i as u32,
            uuid: format!("GPU-00000000-1111-2222-3333-{i:012}"),
            pci_bus_id: Some(format!("00000000:{:02X}:00.0", 0x40 + i)),
            serial: Some(format!("16543210{i:05}")),
            // MIG stays GPU 0's.
            mig_layout: None,
            ..expected_info(0, true)
        };
        assert_eq!(*info, want);
    }
    let readings = source.sample(0);
    assert_eq!(readings.len(), 8);
    for r in &readings[2..] {
        let want = GpuReading {
            index: r.index,
            health: GpuHealth {
                nvlink_active_links: Some(18),
                nvlinks: fake_nvlinks(0..18),
                ..fake_health(0)
            },
            mig_layout: None,
            ..expected_reading(0, 1)
        };
        assert_eq!(*r, want, "GPU {}", r.index);
    }
    assert_eq!(readings[1].health.nvlink_active_links, None);
}

#[test]
fn unidentifiable_gpu_is_left_out_and_the_others_are_renumbered() {
    // Invariant: a GPU whose UUID cannot be read at start-up does not stop
    // the agent; the others are reported under contiguous indices.
    let fake = build_fake(&["-DFAKE_NO_UUID_GPU=0"]);
    let mut source = open(&fake);
    let mut info = expected_info(1, true);
    info.index = 0;
    assert_eq!(source.inventory(), [info]);
    let mut reading = expected_reading(1, 1);
    reading.index = 0;
    assert_eq!(source.sample(0), [reading]);
}

#[test]
fn readings_carry_every_field_in_nvml_units() {
    let fake = build_fake(&[]);
    let mut source = open(&fake);
    let first = source.sample(1_000_000_000);
    assert_eq!(first, [expected_reading(0, 1), expected_reading(1, 1)]);
    let second = source.sample(2_000_000_000);
    assert_eq!(second, [expected_reading(0, 2), expected_reading(1, 2)]);
    for (index, gpu) in FAKE_GPUS.iter().enumerate() {
        let before = first[index]
            .energy_millijoules
            .expect("energy in the first sample");
        let after = second[index]
            .energy_millijoules
            .expect("energy in the second sample");
        assert_eq!(
            after - before,
            gpu.energy_step_mj,
            "energy step of GPU {index}"
        );
    }
}

#[test]
fn unsupported_fields_are_absent_not_zero() {
    struct Case {
        defines: &'static [&'static str],
        no_energy: bool,
        no_temperature: bool,
    }
    let cases = [
        Case {
            defines: &["-DFAKE_GPU1_NO_ENERGY"],
            no_energy: true,
            no_temperature: false,
        },
        Case {
            defines: &["-DFAKE_GPU1_NO_TEMPERATURE"],
            no_energy: false,
            no_temperature: true,
        },
        Case {
            defines: &["-DFAKE_GPU1_NO_ENERGY", "-DFAKE_GPU1_NO_TEMPERATURE"],
            no_energy: true,
            no_temperature: true,
        },
    ];
    for case in cases {
        let fake = build_fake(case.defines);
        let mut source = open(&fake);
        assert_eq!(
            source.inventory(),
            [expected_info(0, true), expected_info(1, !case.no_energy)],
            "inventory with {:?}",
            case.defines,
        );
        // Twice: a field reported absent once stays absent (and is only
        // logged once), and the GPU is not taken for lost.
        for sample in 1..=2 {
            let mut gpu1 = expected_reading(1, sample);
            if case.no_energy {
                gpu1.energy_millijoules = None;
            }
            if case.no_temperature {
                gpu1.temperature_celsius = None;
            }
            assert_eq!(
                source.sample(0),
                [expected_reading(0, sample), gpu1],
                "sample {sample} with {:?}",
                case.defines,
            );
        }
    }
}

/// Invariant: a health reading the GPU does not support, or whose
/// function an older driver lacks, is absent alone: the other readings
/// of the GPU are there, the GPU is not lost, and it is no error.
#[test]
fn each_unsupported_or_missing_health_reading_is_absent_alone() {
    type Clear = fn(&mut GpuHealth);
    // (unsupported on GPU 1, or left out of the library, what is absent)
    let cases: &[(&str, Clear)] = &[
        ("nvmlDeviceGetCurrentClocksThrottleReasons", |h| {
            h.clock_event_reasons = None
        }),
        ("nvmlDeviceGetViolationStatus", |h| {
            h.power_violation_nanoseconds = None;
            h.thermal_violation_nanoseconds = None;
        }),
        ("nvmlDeviceGetTotalEccErrors", |h| {
            h.ecc_volatile_corrected = None;
            h.ecc_volatile_uncorrected = None;
            h.ecc_aggregate_corrected = None;
            h.ecc_aggregate_uncorrected = None;
        }),
        ("nvmlDeviceGetEncoderUtilization", |h| {
            h.encoder_utilization_percent = None
        }),
        ("nvmlDeviceGetDecoderUtilization", |h| {
            h.decoder_utilization_percent = None
        }),
        ("nvmlDeviceGetPcieReplayCounter", |h| h.pcie_replays = None),
        ("nvmlDeviceGetPcieThroughput", |h| {
            h.pcie_tx_kilobytes_per_second = None;
            h.pcie_rx_kilobytes_per_second = None;
        }),
        ("nvmlDeviceGetFanSpeed_v2", |h| h.fan_speed_percent = None),
        ("nvmlDeviceGetFieldValues", |h| {
            h.memory_temperature_celsius = None;
            h.power_instant_milliwatts = None;
            h.power_average_milliwatts = None;
            h.retired_pages_single_bit = None;
            h.retired_pages_double_bit = None;
            h.retired_pages_pending = None;
            h.remapped_rows_correctable = None;
            h.remapped_rows_uncorrectable = None;
            h.remapped_rows_pending = None;
            h.remapped_rows_failed = None;
        }),
    ];
    // One field value unsupported leaves the others of the same call.
    let fields: &[(&str, Clear)] = &[
        ("NVML_FI_DEV_MEMORY_TEMP", |h| {
            h.memory_temperature_celsius = None
        }),
        ("NVML_FI_DEV_POWER_INSTANT", |h| {
            h.power_instant_milliwatts = None
        }),
        ("NVML_FI_DEV_POWER_AVERAGE", |h| {
            h.power_average_milliwatts = None
        }),
        ("NVML_FI_DEV_RETIRED_PENDING", |h| {
            h.retired_pages_pending = None
        }),
        ("NVML_FI_DEV_REMAPPED_FAILURE", |h| {
            h.remapped_rows_failed = None
        }),
    ];
    let check = |defines: &[&str], clear0: Option<Clear>, clear1: Clear| {
        let fake = build_fake(defines);
        let mut source = open(&fake);
        for sample in 1..=2 {
            let mut want = [expected_reading(0, sample), expected_reading(1, sample)];
            if let Some(clear) = clear0 {
                clear(&mut want[0].health);
            }
            clear1(&mut want[1].health);
            assert_eq!(source.sample(0), want, "sample {sample} with {defines:?}");
        }
        let errors = source.errors().expect("NVML counts its errors").by_field();
        assert_eq!(errors, [], "not errors, with {defines:?}");
    };
    for (function, clear) in cases.iter().chain(fields) {
        check(
            &[&format!("-DFAKE_GPU1_UNSUPPORTED=\"{function}\"")],
            None,
            *clear,
        );
    }
    for (function, clear) in cases {
        check(&[&format!("-DFAKE_OMIT_{function}")], Some(*clear), *clear);
    }
}

// ---- NVLink ----

/// The error counters of GPU 0's links `links`, as the fake counts them.
fn fake_nvlinks(links: impl IntoIterator<Item = u32>) -> Vec<NvLinkErrors> {
    links
        .into_iter()
        .map(|link| {
            let base = 1000 * u64::from(link);
            NvLinkErrors {
                link,
                replay: Some(base + 1),
                recovery: Some(base + 2),
                crc_flit: Some((1 << 40) + base + 3),
                crc_data: Some(base + 4),
                transmit_bytes: Some(((1 << 33) + 7000 * u64::from(link)) * 1024),
                receive_bytes: Some((9000 * u64::from(link) + 5) * 1024),
            }
        })
        .collect()
}

/// Invariant: a GPU with NVLink reports how many of its links are active
/// and the four data-link error counters and the data sent and received
/// (NVML's KiB as bytes) of each active link, as NVML counts them (64-bit,
/// by link: the throughput fields asked with each link as their scope); a GPU without NVLink (GPU 1, as a PCIe
/// board) reports none; a driver that lacks a function leaves its
/// readings absent alone: no error, the rest of the sample whole.
#[test]
fn nvlink_reports_its_active_links_and_their_error_counters() {
    // (defines, GPU 0's active links, its error counters)
    let cases: Vec<(&[&str], Option<u32>, Vec<NvLinkErrors>)> = vec![
        (&[], None, Vec::new()),
        // An 18-link board with 2 links up: links 4 and 17.
        (
            &[
                "-DFAKE_GPU0_NVLINKS=18",
                "-DFAKE_GPU0_NVLINK_ACTIVE=0x20010",
            ],
            Some(2),
            fake_nvlinks([4, 17]),
        ),
        // 12 links (A100), all up: links 12-17 do not exist.
        (&["-DFAKE_GPU0_NVLINKS=12"], Some(12), fake_nvlinks(0..12)),
        (
            &["-DFAKE_GPU0_NVLINKS=18", "-DFAKE_GPU0_NVLINK_ACTIVE=0"],
            Some(0),
            Vec::new(),
        ),
        // Links 2 and 5 asleep (low power): up, not active, no error.
        (
            &[
                "-DFAKE_GPU0_NVLINKS=18",
                "-DFAKE_GPU0_NVLINK_ACTIVE=0x3",
                "-DFAKE_GPU0_NVLINK_SLEEP=0x24",
            ],
            Some(2),
            fake_nvlinks([0, 1]),
        ),
        // An older driver without the error counters: the count and the
        // throughput stay.
        (
            &[
                "-DFAKE_GPU0_NVLINKS=18",
                "-DFAKE_GPU0_NVLINK_ACTIVE=0x3",
                "-DFAKE_OMIT_nvmlDeviceGetNvLinkErrorCounter",
            ],
            Some(2),
            fake_nvlinks([0, 1])
                .into_iter()
                .map(|l| NvLinkErrors {
                    replay: None,
                    recovery: None,
                    crc_flit: None,
                    crc_data: None,
                    ..l
                })
                .collect(),
        ),
        // A driver without the throughput fields: the error counters stay.
        (
            &[
                "-DFAKE_GPU0_NVLINKS=18",
                "-DFAKE_GPU0_NVLINK_ACTIVE=0x3",
                "-DFAKE_NO_NVLINK_THROUGHPUT",
            ],
            Some(2),
            fake_nvlinks([0, 1])
                .into_iter()
                .map(|l| NvLinkErrors {
                    transmit_bytes: None,
                    receive_bytes: None,
                    ..l
                })
                .collect(),
        ),
        // Without the link state nothing says which links exist.
        (
            &[
                "-DFAKE_GPU0_NVLINKS=18",
                "-DFAKE_OMIT_nvmlDeviceGetNvLinkState",
            ],
            None,
            Vec::new(),
        ),
    ];
    for (defines, active, links) in cases {
        let fake = build_fake(defines);
        let mut source = open(&fake);
        for sample in 1..=2 {
            let mut want = [expected_reading(0, sample), expected_reading(1, sample)];
            want[0].health.nvlink_active_links = active;
            want[0].health.nvlinks = links.clone();
            assert_eq!(source.sample(0), want, "sample {sample} with {defines:?}");
        }
        let errors = source.errors().expect("NVML counts its errors").by_field();
        assert_eq!(errors, [], "not errors, with {defines:?}");
    }
}

/// Invariant: a link whose state cannot be read (an NVML error, not "no
/// such link") makes the GPU's NVLink readings absent on that tick, never
/// a count that leaves it out; the failure is counted on every tick, the
/// GPU is not lost and its other readings are whole.
#[test]
fn a_link_state_that_cannot_be_read_leaves_nvlink_absent_and_counts_it() {
    let fake = build_fake(&[
        "-DFAKE_GPU0_NVLINKS=18",
        "-DFAKE_GPU0_NVLINK_ACTIVE=0x3",
        "-DFAKE_GPU0_NVLINK_STATE_FAILS=1",
    ]);
    let mut source = open(&fake);
    for sample in 1..=2 {
        let want = [expected_reading(0, sample), expected_reading(1, sample)];
        assert_eq!(source.sample(0), want, "sample {sample}");
    }
    let errors = source.errors().expect("NVML counts its errors").by_field();
    assert_eq!(errors, [("nvlink_state", 2)]);
}

/// Invariant: a GPU without NVLink costs no NVLink call after the agent
/// opens NVML: with every NVLink function hanging, a sample of a node of
/// PCIe boards returns at once and whole.
#[test]
fn a_gpu_without_nvlink_is_not_asked_about_links_after_start() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let block = dir.path().join("nvml-block");
    let fake = build_fake(&[&format!("-DFAKE_BLOCK_FILE=\"{}\"", block.display())]);
    let mut source = open(&fake);
    for function in [
        "nvmlDeviceGetNvLinkState",
        "nvmlDeviceGetNvLinkErrorCounter",
    ] {
        std::fs::write(&block, format!("{function} 20000")).expect("writing the control file");
        let started = std::time::Instant::now();
        let got = source.sample(0);
        assert!(
            started.elapsed() < std::time::Duration::from_secs(5),
            "{function} was called: {:?}",
            started.elapsed()
        );
        assert!(
            got.iter()
                .all(|r| !r.lost && r.health.nvlink_active_links.is_none())
        );
    }
}

/// Clock-event reasons are NVML's bits, several at once.
#[test]
fn clock_event_reasons_are_nvmls_bits() {
    // Power brake | sync boost | HW slowdown.
    let fake = build_fake(&["-DFAKE_GPU0_CLOCK_EVENT_REASONS=0x98"]);
    let mut source = open(&fake);
    let r = source.sample(0);
    assert_eq!(r[0].health.clock_event_reasons, Some(0x98));
}

#[test]
fn lost_gpu_is_reported_lost_and_the_others_keep_reporting() {
    // GPU 1 answers `lost_after` power reads, then falls off the bus: first
    // in the middle of a read (the power read fails after utilization and
    // memory were read), then already at the handle lookup.
    for lost_after in [0u64, 2] {
        let fake = build_fake(&[&format!("-DFAKE_GPU1_LOST_AFTER={lost_after}")]);
        let mut source = open(&fake);
        assert_eq!(
            source.inventory(),
            [expected_info(0, true), expected_info(1, true)]
        );
        for sample in 1..=lost_after + 3 {
            let readings = source.sample(0);
            let gpu1 = if sample <= lost_after {
                expected_reading(1, sample)
            } else {
                GpuReading {
                    index: 1,
                    lost: true,
                    ..GpuReading::default()
                }
            };
            assert_eq!(
                readings,
                [expected_reading(0, sample), gpu1],
                "sample {sample} with GPU 1 lost after {lost_after} power reads",
            );
        }
        // The inventory is fixed for the life of the source.
        assert_eq!(
            source.inventory(),
            [expected_info(0, true), expected_info(1, true)]
        );
    }
}

#[test]
fn missing_library_is_an_init_error_naming_the_path() {
    let dir = tempfile::tempdir().expect("creating a temporary directory");
    let path = dir.path().join("no-such-dir/libnvidia-ml.so.1");
    let path_text = path.to_string_lossy().into_owned();
    let err = open_err(&path);
    let message = err.to_string();
    match err {
        SourceError::NvmlInit {
            library,
            error: NvmlError::LibloadingError(_),
        } => assert_eq!(library, path_text),
        other => panic!("expected NvmlInit with a libloading error, got {other:?}"),
    }
    assert!(
        message.contains(&path_text),
        "message names the path: {message}"
    );
}

#[test]
fn driver_not_loaded_is_an_init_error() {
    let fake = build_fake(&["-DFAKE_INIT_FAILS"]);
    let path_text = fake.lib.to_string_lossy().into_owned();
    let err = open_err(&fake.lib);
    let message = err.to_string();
    match err {
        SourceError::NvmlInit {
            library,
            error: NvmlError::DriverNotLoaded,
        } => assert_eq!(library, path_text),
        other => panic!("expected NvmlInit with DriverNotLoaded, got {other:?}"),
    }
    assert!(
        message.contains(&path_text),
        "message names the path: {message}"
    );
    assert!(
        message.contains("NVIDIA driver is not loaded"),
        "message says the driver is not loaded: {message}",
    );
}

#[test]
fn copies_loaded_side_by_side_keep_separate_state() {
    // The premise of running these tests in parallel: two copies of the
    // fake, loaded from different paths, do not share their counters.
    let fake_a = build_fake(&[]);
    let fake_b = build_fake(&[]);
    let mut a = open(&fake_a);
    let mut b = open(&fake_b);
    assert_eq!(
        a.sample(0),
        [expected_reading(0, 1), expected_reading(1, 1)]
    );
    assert_eq!(
        a.sample(0),
        [expected_reading(0, 2), expected_reading(1, 2)]
    );
    assert_eq!(
        b.sample(0),
        [expected_reading(0, 1), expected_reading(1, 1)]
    );
    drop(a);
    assert_eq!(
        b.sample(0),
        [expected_reading(0, 2), expected_reading(1, 2)]
    );
}

/// Invariant: an NVML call that hangs never holds the sampler for more
/// than its deadline; the GPUs are absent (not zero) while it hangs, the
/// stall is counted once, the hung read's late answer is dropped, and the
/// next read is used again, its counter carrying the energy of the gap.
#[tokio::test(flavor = "current_thread")]
async fn a_hung_nvml_call_is_a_counted_stall_and_the_counter_carries_the_gap() {
    use capwatch_agent::source::worker::{Outcome, Reader};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use tokio::time::Instant;

    let control = tempfile::tempdir().expect("a temporary directory");
    let block = control.path().join("block");
    let define = format!("-DFAKE_BLOCK_FILE=\"{}\"", block.display());
    let fake = build_fake(&[&define]);
    let mut source = open(&fake);
    let mut reader =
        Reader::spawn("gpu", move |at| source.sample(at)).expect("starting the worker");
    let stats = reader.stats();
    let step = Duration::from_millis(50);
    let mut read = async |at: i64, wait: Duration| {
        reader.start(at);
        reader.finish(Instant::now() + wait).await
    };
    // Read 1: answered.
    assert_eq!(
        read(1, Duration::from_secs(10)).await,
        Outcome::Fresh(vec![expected_reading(0, 1), expected_reading(1, 1)])
    );
    // Read 2 hangs in the power call: absent, and so are the ticks after
    // it, with no second read started (the counter does not move).
    std::fs::write(&block, "nvmlDeviceGetPowerUsage 60000").expect("writing the control file");
    for at in 2..6 {
        let started = std::time::Instant::now();
        assert_eq!(read(at, step).await, Outcome::Stalled, "tick {at}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "tick {at} waited"
        );
    }
    assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
    assert_eq!(stats.stalled_samples.load(Ordering::Relaxed), 4);
    assert!(stats.stalled.load(Ordering::Relaxed));
    // The hang ends: the late answer (read 2) is dropped and read 3 is
    // used, three counter steps after read 1 with the probe at open.
    std::fs::remove_file(&block).expect("removing the control file");
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let fresh = loop {
        match read(6, Duration::from_secs(10)).await {
            Outcome::Fresh(r) => break r,
            Outcome::Stalled => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "no read after the hang"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    };
    assert_eq!(fresh, [expected_reading(0, 3), expected_reading(1, 3)]);
    assert_eq!(stats.late_answers.load(Ordering::Relaxed), 1);
    assert_eq!(stats.stalls.load(Ordering::Relaxed), 1);
    assert!(!stats.stalled.load(Ordering::Relaxed));
}

/// A fake whose XID events come from the control file `xid`, with
/// `defines` besides; the file lives as long as the returned directory.
fn build_fake_with_xids(defines: &[&str]) -> (FakeNvml, TempDir, PathBuf) {
    let control = tempfile::tempdir().expect("a temporary directory");
    let xid = control.path().join("xid");
    let define = format!("-DFAKE_XID_FILE=\"{}\"", xid.display());
    let mut all = vec![define.as_str()];
    all.extend_from_slice(defines);
    (build_fake(&all), control, xid)
}

/// Appends XID events ("GPU XID" lines) to the fake's control file.
fn inject(xid: &Path, events: &[(u32, u32)]) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(xid)
        .expect("the XID control file");
    let text: String = events.iter().map(|(g, x)| format!("{g} {x}\n")).collect();
    f.write_all(text.as_bytes()).expect("writing XID events");
}

/// The XID readings of each GPU, sampled until `done` holds for them (or
/// ten seconds pass: then the test fails naming what it saw).
fn xids_until(
    source: &mut NvmlSource,
    done: impl Fn(&[(BTreeMap<u32, u64>, Option<u32>)]) -> bool,
) -> Vec<GpuReading> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let readings = source.sample(0);
        let seen: Vec<_> = readings
            .iter()
            .map(|r| {
                (
                    r.health.xid_errors.clone(),
                    r.health.last_xid.map(|(c, _)| c),
                )
            })
            .collect();
        if done(&seen) {
            return readings;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "XID readings: {seen:?}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Invariant: every injected XID event is counted once, under its GPU and
/// code, and becomes that GPU's last XID with the time it arrived; the
/// other readings are untouched.
#[test]
fn xid_events_are_counted_once_each_by_gpu_and_code() {
    let (fake, _control, xid) = build_fake_with_xids(&[]);
    let mut source = open(&fake);
    let before = unix_nanos_now();
    inject(&xid, &[(0, 79), (0, 79), (1, 48)]);
    let counts = |pairs: &[(u32, u64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
    let want = [
        (counts(&[(79, 2)]), Some(79)),
        (counts(&[(48, 1)]), Some(48)),
    ];
    let readings = xids_until(&mut source, |seen| seen == want);
    let after = unix_nanos_now();
    for r in &readings {
        let (_, at) = r.health.last_xid.expect("a last XID");
        assert!((before..=after).contains(&at), "{at} in {before}..={after}");
    }
    // Everything else as without events.
    let mut gpu0 = readings[0].clone();
    gpu0.health.xid_errors.clear();
    gpu0.health.last_xid = None;
    gpu0.energy_millijoules = None;
    let mut plain = expected_reading(0, 1);
    plain.energy_millijoules = None;
    assert_eq!(gpu0, plain);
    // Counted once: later samples (well past a wait's timeout) repeat the
    // counts, not add to them.
    std::thread::sleep(capwatch_agent::source::xid::WAIT * 2);
    xids_until(&mut source, |seen| seen == want);
    // A new code on GPU 0 joins the old one and is the last.
    inject(&xid, &[(0, 31)]);
    xids_until(&mut source, |seen| {
        seen[0] == (counts(&[(31, 1), (79, 2)]), Some(31)) && seen[1] == want[1]
    });
}

fn unix_nanos_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_nanos() as i64
}

/// Invariant: a GPU or driver without XID events has no XID readings, and
/// its sample is otherwise complete (no error, the GPU not lost).
#[test]
fn without_xid_events_the_readings_are_absent_and_the_sample_intact() {
    // (defines, GPUs whose events still arrive)
    let cases: [(&[&str], &[usize]); 3] = [
        (&["-DFAKE_NO_EVENTS"], &[]),
        (&["-DFAKE_OMIT_nvmlEventSetCreate"], &[]),
        (
            &["-DFAKE_GPU1_UNSUPPORTED=\"nvmlDeviceRegisterEvents\""],
            &[0],
        ),
    ];
    for (defines, delivered) in cases {
        let (fake, _control, xid) = build_fake_with_xids(defines);
        let mut source = open(&fake);
        let errors = source.errors().expect("the NVML source counts errors");
        inject(&xid, &[(0, 79), (1, 48)]);
        let mut readings = if delivered.is_empty() {
            std::thread::sleep(capwatch_agent::source::xid::WAIT * 3);
            source.sample(0)
        } else {
            xids_until(&mut source, |seen| !seen[0].0.is_empty())
        };
        for (i, r) in readings.iter_mut().enumerate() {
            assert_eq!(
                r.health.xid_errors.is_empty(),
                !delivered.contains(&i),
                "GPU {i} with {defines:?}"
            );
            r.health.xid_errors.clear();
            r.health.last_xid = None;
            r.energy_millijoules = None;
        }
        let plain = |i| GpuReading {
            energy_millijoules: None,
            ..expected_reading(i, 0)
        };
        assert_eq!(readings, [plain(0), plain(1)], "{defines:?}");
        assert_eq!(errors.by_field(), [], "{defines:?}");
    }
}

/// Invariant: a wait that hangs in the driver holds nothing up: readings
/// go on, dropping the source (the agent stopping) waits for the XID
/// thread about one wait timeout at most, and events are counted again
/// once the wait returns.
#[test]
fn a_hung_xid_wait_holds_up_neither_readings_nor_shutdown() {
    let control = tempfile::tempdir().expect("a temporary directory");
    let block = control.path().join("block");
    std::fs::write(&block, "nvmlEventSetWait_v2 600000").expect("the block file");
    let define = format!("-DFAKE_BLOCK_FILE=\"{}\"", block.display());
    let (fake, _xids, xid) = build_fake_with_xids(&[&define]);
    let mut source = open(&fake);
    inject(&xid, &[(0, 94)]);
    std::thread::sleep(capwatch_agent::source::xid::WAIT * 2);
    let readings = source.sample(0);
    assert!(
        readings
            .iter()
            .all(|r| r.health.xid_errors.is_empty() && !r.lost)
    );
    assert!(readings[0].power_milliwatts.is_some());
    std::fs::remove_file(&block).expect("ending the hang");
    xids_until(&mut source, |seen| seen[0].1 == Some(94));

    std::fs::write(&block, "nvmlEventSetWait_v2 600000").expect("the block file");
    std::thread::sleep(capwatch_agent::source::xid::WAIT * 2);
    let asked = std::time::Instant::now();
    drop(source);
    let took = asked.elapsed();
    assert!(
        took < capwatch_agent::source::xid::WAIT * 4,
        "dropping took {took:?}"
    );
}

/// Opens the NVML source on `fake`, keeping XID counts in `counts`.
fn open_keeping(fake: &FakeNvml, counts: &Path) -> NvmlSource {
    match NvmlSource::open_with(Some(&fake.lib), Some(counts)) {
        Ok(source) => source,
        Err(e) => panic!("opening NVML from {}: {e}", fake.lib.display()),
    }
}

/// Invariant: with a counts file, a restarted agent's XID counts (and
/// last XID) go on from where the last run left them, by GPU UUID, so the
/// counter never goes back; without one they start from 0.
#[test]
fn xid_counts_kept_in_their_file_go_on_across_a_restart() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let counts_file = dir.path().join("xid-counts");
    let counts = |pairs: &[(u32, u64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
    // Each run is its own stand-in library (its own events to deliver),
    // reporting the same GPUs.
    let (first, _c1, xid1) = build_fake_with_xids(&[]);
    let mut source = open_keeping(&first, &counts_file);
    inject(&xid1, &[(0, 79), (0, 79), (1, 48)]);
    let want = [
        (counts(&[(79, 2)]), Some(79)),
        (counts(&[(48, 1)]), Some(48)),
    ];
    let before = xids_until(&mut source, |seen| seen == want);
    drop(source);

    let (second, _c2, xid2) = build_fake_with_xids(&[]);
    let mut source = open_keeping(&second, &counts_file);
    let after = xids_until(&mut source, |seen| seen == want);
    for (b, a) in before.iter().zip(&after) {
        assert_eq!(
            a.health.last_xid, b.health.last_xid,
            "the last XID and its time"
        );
    }
    inject(&xid2, &[(0, 79), (1, 94)]);
    xids_until(&mut source, |seen| {
        seen[0] == (counts(&[(79, 3)]), Some(79))
            && seen[1] == (counts(&[(48, 1), (94, 1)]), Some(94))
    });
    assert_eq!(
        source.errors().expect("NVML counts its errors").by_field(),
        []
    );
    drop(source);

    // The same run without the file starts from 0.
    let (third, _c3, _xid3) = build_fake_with_xids(&[]);
    let mut source = open(&third);
    std::thread::sleep(capwatch_agent::source::xid::WAIT * 2);
    let none = (BTreeMap::new(), None);
    xids_until(&mut source, |seen| seen == [none.clone(), none.clone()]);
}

/// Invariant: a counts file that cannot be used is logged and counted
/// (`xid_counts_file`), the counts start from 0 and the readings are
/// otherwise whole; the next XID writes a sound file over it.
#[test]
fn a_damaged_xid_counts_file_is_counted_and_counting_starts_afresh() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let counts_file = dir.path().join("xid-counts");
    std::fs::write(&counts_file, "capwatch-xid-counts 1\nGPU-x count 79 zero\n").unwrap();
    let (fake, _control, xid) = build_fake_with_xids(&[]);
    let mut source = open_keeping(&fake, &counts_file);
    let readings = xids_until(&mut source, |seen| {
        seen == [(BTreeMap::new(), None), (BTreeMap::new(), None)]
    });
    assert!(
        readings
            .iter()
            .all(|r| !r.lost && r.power_milliwatts.is_some())
    );
    // The XID thread reads the file: counted once it has.
    let errors = source.errors().expect("NVML counts its errors");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while errors.by_field().is_empty() && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(errors.by_field(), [("xid_counts_file", 1)]);
    inject(&xid, &[(1, 63)]);
    xids_until(&mut source, |seen| seen[1].1 == Some(63));
    let text = std::fs::read_to_string(&counts_file).unwrap();
    let kept = capwatch_agent::source::xid::parse_counts(&text).expect("a sound file");
    let uuid = &source.inventory()[1].uuid;
    assert_eq!(kept[uuid].counts, BTreeMap::from([(63, 1)]));
}

// ---- MIG ----

/// A MIG device as `fake_nvml.c` describes it.
fn mig(
    uuid: &str,
    gpu_instance_id: u32,
    multiprocessor_count: u32,
    slices: u32,
    profile: &str,
) -> MigInstance {
    MigInstance {
        uuid: uuid.into(),
        gpu_instance_id,
        compute_instance_id: 0,
        multiprocessor_count,
        // One compute instance taking its whole GPU instance.
        gpu_instance_slice_count: slices,
        compute_instance_slice_count: slices,
        profile: profile.into(),
    }
}

/// The fake's layout 1 on GPU 0: 3g + 2g + 1g, 84 of its 98 SMs.
fn layout_1() -> Vec<MigInstance> {
    vec![
        mig(
            "MIG-11111111-0000-0000-0000-000000000001",
            1,
            42,
            3,
            "3g.40gb",
        ),
        mig(
            "MIG-11111111-0000-0000-0000-000000000002",
            5,
            28,
            2,
            "2g.20gb",
        ),
        // Its name is not given: the profile comes from its one slice.
        mig("MIG-11111111-0000-0000-0000-000000000003", 13, 14, 1, "1g"),
    ]
}

#[test]
fn a_board_in_mig_mode_lists_its_instances_and_is_still_read_whole() {
    let fake = build_fake(&["-DFAKE_MIG_LAYOUT=1"]);
    let mut source = open(&fake);
    let mut board = expected_info(0, true);
    // The board's SM count from its full GPU-instance profile: NVML
    // answers nvmlDeviceGetAttributes_v2 for MIG device handles only.
    board.multiprocessor_count = Some(98);
    board.gpu_instance_slice_count = Some(7);
    board.mig = layout_1();
    board.mig_layout = Some(layout_id(Some(98), Some(7), &layout_1()));
    assert_eq!(source.inventory(), [board.clone(), expected_info(1, true)]);
    // Samples stay per board: the board's counter once, no reading per
    // instance, stamped with the layout; without utilization, which NVML
    // does not give for a board in MIG mode (absent, never 0 %).
    let readings = source.sample(0);
    let whole = GpuReading {
        mig_layout: board.mig_layout,
        utilization_percent: None,
        memory_utilization_percent: None,
        ..expected_reading(0, 1)
    };
    assert_eq!(readings, [whole, expected_reading(1, 1)]);
}

#[test]
fn a_changed_mig_layout_is_read_again_and_published() {
    let dir = TempDir::new().expect("a temporary directory");
    let control = dir.path().join("mig-layout");
    std::fs::write(&control, "1").expect("writing the layout file");
    let define = format!("-DFAKE_MIG_FILE=\"{}\"", control.display());
    let fake = build_fake(&[&define]);
    let mut source = open(&fake).with_mig_check_every(std::time::Duration::ZERO);
    let mut layout = source.layout().expect("NVML publishes its layout");
    assert_eq!(source.inventory()[0].mig, layout_1());
    let id_1 = layout_id(Some(98), Some(7), &layout_1());
    assert_eq!(source.inventory()[0].mig_layout, Some(id_1));

    // Unchanged: nothing is published; readings carry the layout's id.
    let stamps = |r: Vec<GpuReading>| r.iter().map(|r| r.mig_layout).collect::<Vec<_>>();
    assert_eq!(stamps(source.sample(0)), [Some(id_1), None]);
    assert!(!layout.has_changed().expect("the source is alive"));

    // 4g + 3g, the second in slot 3 (slots 1 and 2 empty): the readings
    // taken after the change are stamped with the new layout.
    std::fs::write(&control, "2").expect("writing the layout file");
    let after = stamps(source.sample(0));
    assert!(layout.has_changed().expect("the source is alive"));
    let published = layout.borrow_and_update().clone();
    let id_2 = layout_id(Some(98), Some(7), &published[0].mig);
    assert_ne!(id_2, id_1);
    assert_eq!(published[0].mig_layout, Some(id_2));
    assert_eq!(after, [Some(id_2), None]);
    // Layout 1 is listed as an earlier one, for a collector that never
    // heard it.
    let earlier_1 = EarlierLayout {
        id: id_1,
        multiprocessor_count: Some(98),
        gpu_instance_slice_count: Some(7),
        mig: layout_1(),
    };
    assert_eq!(published[0].earlier_mig, std::slice::from_ref(&earlier_1));
    assert_eq!(
        published[0].mig,
        [
            mig(
                "MIG-22222222-0000-0000-0000-000000000001",
                2,
                56,
                4,
                "4g.40gb"
            ),
            mig(
                "MIG-22222222-0000-0000-0000-000000000002",
                1,
                42,
                3,
                "3g.40gb"
            ),
        ]
    );
    assert_eq!(published, source.inventory());
    assert_eq!(published[0].multiprocessor_count, Some(98));
    assert_eq!(published[0].gpu_instance_slice_count, Some(7));
    assert!(published[1].mig.is_empty());

    // MIG mode off: the board is whole again, under a layout id of its
    // own (its samples must not be split by a layout announced later).
    std::fs::write(&control, "0").expect("writing the layout file");
    assert_eq!(stamps(source.sample(0)), [mig_off(0), None]);
    assert!(layout.has_changed().expect("the source is alive"));
    assert!(layout.borrow_and_update()[0].mig.is_empty());
    assert_eq!(source.inventory()[0].mig_layout, mig_off(0));
    assert_ne!(mig_off(0), Some(id_1));
    let earlier: Vec<u64> = source.inventory()[0]
        .earlier_mig
        .iter()
        .map(|e| e.id)
        .collect();
    assert_eq!(earlier, [id_1, id_2]);
    assert_eq!(source.inventory()[0].earlier_mig[0], earlier_1);
}

#[test]
fn the_layout_is_read_again_only_at_its_interval() {
    let dir = TempDir::new().expect("a temporary directory");
    let control = dir.path().join("mig-layout");
    std::fs::write(&control, "1").expect("writing the layout file");
    let define = format!("-DFAKE_MIG_FILE=\"{}\"", control.display());
    let fake = build_fake(&[&define]);
    let mut source = open(&fake).with_mig_check_every(std::time::Duration::from_secs(3600));
    let layout = source.layout().expect("NVML publishes its layout");
    std::fs::write(&control, "2").expect("writing the layout file");
    source.sample(0);
    assert!(!layout.has_changed().expect("the source is alive"));
    assert_eq!(source.inventory()[0].mig, layout_1());
}

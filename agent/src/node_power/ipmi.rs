//! Whole-node power from the BMC over IPMI DCMI, for BMCs without Redfish:
//! `ipmitool dcmi power reading`, run as a child process on each read and
//! killed (its whole process group) at the deadline.
//!
//! Why ipmitool: talking to `/dev/ipmi0` directly takes ioctls, and this
//! workspace forbids `unsafe` code (no FFI for the agent beyond NVML's
//! crate); an in-process IPMI stack would be a large new dependency for a
//! fallback path. ipmitool is packaged by every distribution (Debian's
//! `ipmitool`), speaks to the local BMC through the kernel driver with no
//! network setup, and its DCMI output is stable. FreeIPMI's
//! `ipmi-dcmi --get-system-power-statistics` would do as well, but prints
//! a different format; one parser, one tool. A child process also keeps a
//! wedged driver call out of the agent: a hung BMC costs a killed process,
//! never a stuck thread.
//!
//! Parsed: `Instantaneous power reading: N Watts`; a reading while
//! `Power reading state is: deactivated` is refused (the BMC is not
//! measuring). DCMI has no energy counter, so the collector integrates.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use super::{Failure, Reader, SourceInfo, Value};
use crate::config::IpmiSettings;

/// Most output read from one run.
const MAX_OUTPUT_BYTES: u64 = 64 * 1024;

/// Most watts a node's DCMI reading may carry (as for Redfish).
const MAX_WATTS: u64 = capwatch_common::redfish::MAX_NODE_WATTS;

/// Parses ipmitool's `dcmi power reading` output: the instantaneous
/// reading in mW.
pub fn parse(output: &str) -> Result<u64, Failure> {
    let mut watts = None;
    for line in output.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let key = key.trim();
        let value = value.trim();
        if key.eq_ignore_ascii_case("Power reading state is")
            && value.eq_ignore_ascii_case("deactivated")
        {
            return Err(Failure::new(
                "deactivated",
                "the BMC says its power reading is deactivated",
            ));
        }
        if key.eq_ignore_ascii_case("Instantaneous power reading") {
            let number = value
                .strip_suffix("Watts")
                .or_else(|| value.strip_suffix("watts"))
                .map(str::trim)
                .ok_or_else(|| {
                    Failure::new(
                        "unparsable",
                        format!("power reading without Watts: {value:?}"),
                    )
                })?;
            if number.starts_with('-') {
                return Err(Failure::new(
                    "negative",
                    format!("power reading {number} W"),
                ));
            }
            let w: u64 = number.parse().map_err(|_| {
                Failure::new(
                    "unparsable",
                    format!("power reading not a whole number of watts: {number:?}"),
                )
            })?;
            watts = Some(w);
        }
    }
    let w = watts.ok_or_else(|| {
        Failure::new(
            "unparsable",
            "no `Instantaneous power reading: N Watts` line in the output",
        )
    })?;
    if w > MAX_WATTS {
        return Err(Failure::new(
            "absurd",
            format!("power reading {w} W, above {MAX_WATTS} W"),
        ));
    }
    Ok(w * 1000)
}

/// Runs `program dcmi power reading` with a deadline: its stdout, or why
/// not.
pub fn run(program: &Path, timeout: Duration) -> Result<String, Failure> {
    use std::os::unix::process::CommandExt;
    let mut child = Command::new(program)
        .args(["dcmi", "power", "reading"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group, so the deadline kills whatever it started.
        .process_group(0)
        .spawn()
        .map_err(|e| Failure::new("spawn", format!("running {}: {e}", program.display())))?;
    let pid = rustix::process::Pid::from_child(&child);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(Failure::new("spawn", "no pipes to the child"));
    };
    let (tx, rx) = std::sync::mpsc::channel();
    // The readers end when the group is gone and the pipes close.
    let out_tx = tx.clone();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stdout.take(MAX_OUTPUT_BYTES).read_to_end(&mut buf);
        let _ = out_tx.send((true, buf));
    });
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let _ = stderr.take(MAX_OUTPUT_BYTES).read_to_end(&mut buf);
        let _ = tx.send((false, buf));
    });
    let deadline = std::time::Instant::now() + timeout;
    let (mut out, mut err) = (None, None);
    while out.is_none() || err.is_none() {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        match rx.recv_timeout(left) {
            Ok((true, b)) => out = Some(b),
            Ok((false, b)) => err = Some(b),
            Err(_) => break,
        }
    }
    let timed_out = out.is_none() || err.is_none();
    if timed_out {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
    }
    // Reaped either way: the group is killed, or it closed its output and
    // is exiting.
    let status = child.wait();
    if timed_out {
        return Err(Failure::new(
            "timeout",
            format!(
                "{} dcmi power reading: no answer within {}; killed",
                program.display(),
                humantime::format_duration(timeout)
            ),
        ));
    }
    let status = status.map_err(|e| Failure::new("spawn", e.to_string()))?;
    let stdout = String::from_utf8_lossy(&out.unwrap_or_default()).into_owned();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&err.unwrap_or_default()).into_owned();
        let first = stderr.lines().next().unwrap_or("").trim().to_string();
        return Err(Failure::new(
            "exit_status",
            format!(
                "{} dcmi power reading: {status}: {first}",
                program.display()
            ),
        ));
    }
    Ok(stdout)
}

/// The IPMI source.
pub struct IpmiReader {
    program: PathBuf,
    timeout: Duration,
}

impl IpmiReader {
    pub fn new(program: &Path, cfg: &IpmiSettings) -> (Self, SourceInfo) {
        (
            Self {
                program: program.to_path_buf(),
                timeout: cfg.timeout,
            },
            SourceInfo {
                kind: "ipmi",
                domain: "node",
                name: "dcmi".into(),
                energy_counter_supported: false,
                interval: cfg.interval,
            },
        )
    }
}

impl Reader for IpmiReader {
    fn read(&mut self) -> Vec<Result<Value, Failure>> {
        let reading = run(&self.program, self.timeout).and_then(|out| parse(&out));
        vec![reading.map(|mw| Value {
            power_milliwatts: Some(mw),
            energy_millijoules: None,
            energy_failure: None,
        })]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUTPUT: &str = "
    Instantaneous power reading:                  4123 Watts
    Minimum during sampling period:                 98 Watts
    Maximum during sampling period:               9750 Watts
    Average power reading over sample period:     6011 Watts
    IPMI timestamp:                           Tue Dec  1 16:00:00 2026
    Sampling period:                          00000001 Seconds.
    Power reading state is:                   activated
";

    #[test]
    fn dcmi_output_parses_and_bad_output_is_a_named_failure() {
        assert_eq!(parse(OUTPUT).unwrap(), 4_123_000);
        for (text, reason) in [
            (OUTPUT.replace("activated", "deactivated"), "deactivated"),
            (OUTPUT.replace("4123", "-5"), "negative"),
            (OUTPUT.replace("4123", "900000"), "absurd"),
            (OUTPUT.replace("4123", "41.5"), "unparsable"),
            ("Error: DCMI not supported\n".to_string(), "unparsable"),
        ] {
            assert_eq!(parse(&text).unwrap_err().reason, reason, "{text}");
        }
    }

    /// A fake ipmitool: a script in a temp dir.
    fn script(dir: &tempfile::TempDir, body: &str) -> PathBuf {
        use std::os::unix::fs::PermissionsExt;
        let path = dir.path().join("ipmitool");
        std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }

    fn read(program: PathBuf, timeout: Duration) -> Result<Value, Failure> {
        let cfg = IpmiSettings {
            command: Some(program.clone()),
            timeout,
            interval: Duration::from_secs(1),
        };
        IpmiReader::new(&program, &cfg).0.read().remove(0)
    }

    #[test]
    fn a_fake_ipmitool_is_read_and_its_arguments_are_dcmi_power_reading() {
        let dir = tempfile::tempdir().unwrap();
        let args = dir.path().join("args");
        let program = script(
            &dir,
            &format!(
                "echo \"$@\" > {}\ncat <<'EOF'\n{OUTPUT}\nEOF",
                args.display()
            ),
        );
        let v = read(program, Duration::from_secs(10)).unwrap();
        assert_eq!(v.power_milliwatts, Some(4_123_000));
        assert_eq!(v.energy_millijoules, None);
        assert_eq!(
            std::fs::read_to_string(&args).unwrap(),
            "dcmi power reading\n"
        );

        let failing = script(&dir, "echo 'Could not open device' >&2\nexit 1");
        let err = read(failing, Duration::from_secs(10)).unwrap_err();
        assert_eq!(err.reason, "exit_status");
        assert!(
            err.message.contains("Could not open device"),
            "{}",
            err.message
        );

        let err = read(dir.path().join("missing"), Duration::from_secs(1)).unwrap_err();
        assert_eq!(err.reason, "spawn");
    }

    #[test]
    fn a_hung_ipmitool_is_killed_at_the_deadline_with_its_children() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        // The shell starts a child that holds the output open.
        let program = script(
            &dir,
            &format!("sleep 300 &\necho $! > {}\nwait", pidfile.display()),
        );
        let start = std::time::Instant::now();
        let err = read(program, Duration::from_millis(300)).unwrap_err();
        assert_eq!(err.reason, "timeout", "{}", err.message);
        assert!(start.elapsed() < Duration::from_secs(60));
        // The grandchild is gone too: its /proc entry disappears once
        // reaped by init (or shows as a zombie, state Z).
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        let stat = Path::new("/proc").join(pid.trim()).join("stat");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            match std::fs::read_to_string(&stat) {
                Err(_) => break,
                Ok(s) if s.split(' ').nth(2) == Some("Z") => break,
                Ok(_) => assert!(std::time::Instant::now() < deadline, "sleep still runs"),
            }
            std::thread::yield_now();
        }
    }
}

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
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

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

/// How often the child's exit is checked once its output has closed, and
/// how long a killed child is waited for.
const EXIT_POLL: Duration = Duration::from_millis(5);
const KILLED_GRACE: Duration = Duration::from_secs(1);

/// Runs `program dcmi power reading` with a deadline: its stdout, or why
/// not. Everything happens on the calling thread: the output is read by
/// poll(2) on non-blocking pipes and the exit checked with `try_wait`, both
/// until the deadline; then the process group is killed. No thread or
/// blocking call outlives the deadline (but for at most [`KILLED_GRACE`]
/// to reap the killed child; one stuck in the kernel beyond that is left
/// unreaped rather than wait for it).
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
    let deadline = Instant::now() + timeout;
    let kill = |child: &mut std::process::Child| {
        let _ = rustix::process::kill_process_group(pid, rustix::process::Signal::KILL);
        let until = Instant::now() + KILLED_GRACE;
        while Instant::now() < until && matches!(child.try_wait(), Ok(None)) {
            std::thread::sleep(EXIT_POLL);
        }
    };
    let timed_out = || {
        Failure::new(
            "timeout",
            format!(
                "{} dcmi power reading: no answer within {}; killed",
                program.display(),
                humantime::format_duration(timeout)
            ),
        )
    };
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        kill(&mut child);
        return Err(Failure::new("spawn", "no pipes to the child"));
    };
    let (mut stdout, mut stderr) = (Some(stdout), Some(stderr));
    let (mut stdout_buf, mut stderr_buf) = (Vec::new(), Vec::new());
    for fd in [
        stdout.as_ref().map(|p| p.as_fd()),
        stderr.as_ref().map(|p| p.as_fd()),
    ]
    .into_iter()
    .flatten()
    {
        if let Err(e) = rustix::io::ioctl_fionbio(fd, true) {
            kill(&mut child);
            return Err(Failure::new("spawn", format!("pipe: {e}")));
        }
    }
    while stdout.is_some() || stderr.is_some() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            kill(&mut child);
            return Err(timed_out());
        }
        let wait = rustix::event::Timespec {
            tv_sec: i64::try_from(left.as_secs()).unwrap_or(i64::MAX),
            tv_nsec: i64::from(left.subsec_nanos()),
        };
        let (out_ready, err_ready) = {
            let mut fds = Vec::with_capacity(2);
            if let Some(p) = &stdout {
                fds.push(rustix::event::PollFd::new(p, rustix::event::PollFlags::IN));
            }
            if let Some(p) = &stderr {
                fds.push(rustix::event::PollFd::new(p, rustix::event::PollFlags::IN));
            }
            match rustix::event::poll(&mut fds, Some(&wait)) {
                Ok(_) | Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    drop(fds);
                    kill(&mut child);
                    return Err(Failure::new("spawn", format!("poll: {e}")));
                }
            }
            let ready: Vec<bool> = fds.iter().map(|f| !f.revents().is_empty()).collect();
            let out = stdout.is_some() && ready.first().copied().unwrap_or(false);
            let err = stderr.is_some()
                && ready
                    .get(usize::from(stdout.is_some()))
                    .copied()
                    .unwrap_or(false);
            (out, err)
        };
        if out_ready && !drain(&mut stdout, &mut stdout_buf) {
            stdout = None;
        }
        if err_ready && !drain(&mut stderr, &mut stderr_buf) {
            stderr = None;
        }
    }
    // The output is closed: the child is exiting. Wait for it until the
    // deadline, not beyond.
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if Instant::now() < deadline => std::thread::sleep(EXIT_POLL),
            Ok(None) => {
                kill(&mut child);
                return Err(timed_out());
            }
            Err(e) => {
                kill(&mut child);
                return Err(Failure::new("spawn", e.to_string()));
            }
        }
    };
    let stdout = String::from_utf8_lossy(&stdout_buf).into_owned();
    if !status.success() {
        let stderr = String::from_utf8_lossy(&stderr_buf).into_owned();
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

/// Reads what `pipe` has now into `buf` (up to [`MAX_OUTPUT_BYTES`]);
/// false when it is done: closed, failed, or over the cap.
fn drain<R: Read>(pipe: &mut Option<R>, buf: &mut Vec<u8>) -> bool {
    let Some(p) = pipe else { return false };
    let mut chunk = [0u8; 4096];
    loop {
        match p.read(&mut chunk) {
            Ok(0) => return false,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if buf.len() as u64 >= MAX_OUTPUT_BYTES {
                    buf.truncate(MAX_OUTPUT_BYTES as usize);
                    return false;
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return false,
        }
    }
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
        // A script just written can be refused with ETXTBSY while another
        // test's fork still holds its write descriptor (until that child
        // execs): a race of the test harness, not of a real ipmitool.
        for _ in 0..100 {
            match IpmiReader::new(&program, &cfg).0.read().remove(0) {
                Err(f) if f.reason == "spawn" && f.message.contains("Text file busy") => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                other => return other,
            }
        }
        panic!("{} stayed busy", program.display());
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

    /// Regression: once its output closed, the child was waited for without
    /// a deadline: one that closed its output and stayed (a wedged driver
    /// call after printing) held the reader forever.
    #[test]
    fn a_child_that_closes_its_output_and_stays_is_killed_at_the_deadline() {
        let dir = tempfile::tempdir().unwrap();
        let pidfile = dir.path().join("pid");
        let program = script(
            &dir,
            &format!(
                "echo $$ > {}\nexec >/dev/null 2>&1\nexec sleep 300",
                pidfile.display()
            ),
        );
        let err = read(program, Duration::from_millis(300)).unwrap_err();
        assert_eq!(err.reason, "timeout", "{}", err.message);
        let pid = std::fs::read_to_string(&pidfile).unwrap();
        // Killed and reaped: no such process any more.
        assert!(
            !Path::new("/proc").join(pid.trim()).exists(),
            "the child still runs"
        );
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

//! Helpers the integration tests of the agent and the collector share:
//! running a binary with a clean environment, reading what it wrote,
//! waiting for a child process, following its log, checking that an
//! example config documents every setting at its default; a PostgreSQL
//! server of the tests' own ([`pg`]), a TCP proxy that cuts or stalls
//! its connections ([`proxy`]), a stand-in Redfish BMC or PDU
//! ([`redfish`]).
#![allow(clippy::unwrap_used)] // test code: a panic is a failed test

use std::collections::BTreeSet;
use std::io::{BufRead, BufReader, Read};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Output};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub mod pg;
pub mod proxy;
pub mod redfish;

/// The sentence both binaries' `--help` ends with.
pub const LAYERING: &str = "Settings come from the config file, then CAPWATCH_* environment \
                            variables, then flags; the last wins.";

/// A command for `bin` that does not inherit any `CAPWATCH_*` variable of
/// the test's own environment.
pub fn clean_command(bin: impl AsRef<Path>) -> Command {
    let mut cmd = Command::new(bin.as_ref());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CAPWATCH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs `bin` with `args` and `env` only (see [`clean_command`]) to the
/// end.
pub fn run_clean(bin: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> Output {
    let bin = bin.as_ref();
    clean_command(bin)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", bin.display()))
}

pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Which long flags (`--name`) a `--help` text shows.
pub fn help_flags(help: &str) -> BTreeSet<&str> {
    help.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect()
}

/// Asserts that `help` shows exactly the long flags of `flags`, the
/// environment variable of each that has one, and the layering sentence.
pub fn assert_help_lists(help: &str, flags: &[(&str, Option<&str>)]) {
    let want: BTreeSet<&str> = flags.iter().map(|(flag, _)| *flag).collect();
    assert_eq!(
        help_flags(help),
        want,
        "flags in --help vs FLAGS here:\n{help}"
    );
    for (flag, env) in flags {
        if let Some(env) = env {
            assert!(
                help.contains(&format!("[env: {env}=]")),
                "{flag}: no {env} in --help:\n{help}"
            );
        }
    }
    assert!(flat(help).contains(LAYERING), "{help}");
}

/// `text` with every run of white space folded to one space.
pub fn flat(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// What `child` writes to stderr until a line containing `needle` (at most
/// 20 s); then it is killed.
pub fn stderr_until(mut child: Child, needle: &str) -> Vec<u8> {
    let mut err = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = std::sync::mpsc::channel();
    let want = needle.as_bytes().to_vec();
    std::thread::spawn(move || {
        let (mut seen, mut buf) = (Vec::new(), [0u8; 4096]);
        while let Ok(n @ 1..) = err.read(&mut buf) {
            seen.extend_from_slice(&buf[..n]);
            if seen.windows(want.len()).any(|w| w == want) {
                break;
            }
        }
        let _ = tx.send(seen);
    });
    let seen = rx.recv_timeout(Duration::from_secs(20));
    let _ = child.kill();
    let _ = child.wait();
    let seen = seen.expect("stderr within 20 s");
    assert!(
        seen.windows(needle.len()).any(|w| w == needle.as_bytes()),
        "no {needle:?} in {}",
        String::from_utf8_lossy(&seen)
    );
    seen
}

/// Asserts that `seen` (a log written to a pipe) holds no ANSI escape.
pub fn assert_no_colour(seen: &[u8]) {
    assert!(
        !seen.contains(&0x1b),
        "ANSI escapes in {}",
        String::from_utf8_lossy(seen)
    );
}

/// Sends SIGTERM, as systemd and Kubernetes do.
pub fn terminate(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("run kill")
        .success();
    assert!(ok, "kill -TERM {}", child.id());
}

/// Waits for `child` to exit; kills it and fails after `limit`.
pub fn wait_timeout(child: &mut Child, limit: Duration) -> ExitStatus {
    let until = Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!("process {} still running after {limit:?}", child.id());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Polls `f` until it returns true.
pub fn eventually(limit: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let until = Instant::now() + limit;
    while !f() {
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Lines a child wrote to stderr, kept for assertions and failure output.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    pub fn capture(&self, stream: impl Read + Send + 'static, prefix: String) {
        let lines = self.0.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                eprintln!("[{prefix}] {line}");
                lines.lock().unwrap().push(line);
            }
        });
    }

    pub fn lines(&self) -> Vec<String> {
        self.0.lock().unwrap().clone()
    }

    /// Waits for a line containing `needle` and returns it.
    pub fn wait_for(&self, needle: &str, limit: Duration) -> String {
        let until = Instant::now() + limit;
        loop {
            if let Some(l) = self.lines().into_iter().find(|l| l.contains(needle)) {
                return l;
            }
            assert!(
                Instant::now() < until,
                "no log line with {needle:?} within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// A string field of a JSON log line (values without escapes).
pub fn json_field(line: &str, key: &str) -> Option<String> {
    let pat = format!("\"{key}\":\"");
    let start = line.find(&pat)? + pat.len();
    let end = line[start..].find('"')? + start;
    Some(line[start..end].to_string())
}

/// The unsigned number after `"key":` in a JSON log line.
pub fn json_number(line: &str, key: &str) -> u64 {
    let pat = format!("\"{key}\":");
    let start = line
        .find(&pat)
        .unwrap_or_else(|| panic!("no {key} in {line}"))
        + pat.len();
    let digits: String = line[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().unwrap()
}

/// Dotted names of every setting, read from the pretty `Debug` of a
/// config: a field whose value opens a struct (`mock: MockSettings {`) is a
/// TOML table.
pub fn setting_names(debug: &str) -> BTreeSet<String> {
    let mut table = None;
    let mut names = BTreeSet::new();
    for line in debug.lines() {
        let indent = line.len() - line.trim_start().len();
        let Some((name, value)) = line.trim().split_once(": ") else {
            continue;
        };
        match indent {
            4 if value.ends_with(" {") => table = Some(name.to_string()),
            4 => {
                table = None;
                names.insert(name.to_string());
            }
            8 => {
                if let Some(t) = &table {
                    names.insert(format!("{t}.{name}"));
                }
            }
            _ => {}
        }
    }
    names
}

/// A setting's line, `key = value` or commented out as `# key = value`:
/// (whether commented out, key, value).
pub fn setting_line(line: &str) -> Option<(bool, &str, &str)> {
    let line = line.trim();
    let (commented, body) = match line.strip_prefix('#') {
        Some(body) => (true, body.trim()),
        None => (false, line),
    };
    let (key, value) = body.split_once(" = ")?;
    key.bytes()
        .all(|b| b.is_ascii_lowercase() || b == b'_')
        .then_some((commented, key, value))
}

/// Dotted names of the settings a TOML file sets or shows commented out,
/// checking that the comments above each one state its default:
/// `Default: VALUE` with the value it is set to, `Default: unset` for one
/// shown commented out, or what `other_defaults` gives for a setting the
/// file sets to something else on purpose.
pub fn documented_settings(text: &str, other_defaults: &[(&str, &str)]) -> BTreeSet<String> {
    let mut table = None;
    let mut comments = String::new();
    let mut names = BTreeSet::new();
    for line in text.lines().map(str::trim) {
        if let Some((commented, key, value)) = setting_line(line) {
            let name = match &table {
                Some(t) => format!("{t}.{key}"),
                None => key.to_string(),
            };
            let default = match other_defaults.iter().find(|(n, _)| *n == name) {
                Some((_, default)) => default,
                None if commented => "unset",
                None => value,
            };
            assert!(
                comments.contains(&format!("Default: {default}")),
                "the comments above `{name}` do not say `Default: {default}`: {comments:?}"
            );
            names.insert(name);
            comments.clear();
        } else if let Some(t) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = Some(t.to_string());
            comments.clear();
        } else if let Some(comment) = line.strip_prefix('#') {
            comments.push_str(comment);
        }
    }
    names
}

/// `text` with the settings shown commented out put in force.
pub fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match setting_line(line) {
            Some((true, key, value)) => format!("{key} = {value}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

/// Asserts that a bad config run (`out`) failed, wrote nothing to stdout,
/// and that its error names every piece of `want`, with `{path}` standing
/// for `path`. `what` names the case in failure messages.
pub fn assert_error_names(out: &Output, path: &str, want: &[&str], what: &str) {
    let err = stderr(out);
    assert!(!out.status.success(), "{what} was accepted:\n{err}");
    assert_eq!(out.stdout, b"", "{what}");
    for w in want {
        let w = w.replace("{path}", path);
        assert!(err.contains(&w), "{what}: error lacks {w:?}:\n{err}");
    }
}

/// Asserts that the workspace's `README.md` documents every environment
/// variable of `vars` ((setting, variable) pairs) in backticks.
pub fn assert_readme_documents(vars: &[(String, String)]) {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"))
        .expect("the workspace README");
    for (setting, var) in vars {
        assert!(
            readme.contains(&format!("`{var}`")),
            "README does not document {var} ({setting})"
        );
    }
}

/// Runs `bin` as [`run_clean`] does and returns its stdout; the run must
/// succeed.
pub fn run_ok(bin: impl AsRef<Path>, args: &[&str], env: &[(&str, &str)]) -> String {
    let out = run_clean(bin, args, env);
    assert!(
        out.status.success(),
        "{args:?} {env:?}: {}\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

/// Asserts that each of `want` is a whole line of `text`.
pub fn assert_lines(text: &str, want: &[&str]) {
    for want in want {
        assert!(text.lines().any(|l| l == *want), "no {want}:\n{text}");
    }
}

/// Asserts that a run given `var=value` failed and that its error names
/// both.
pub fn assert_bad_env_named(out: &Output, var: &str, value: &str) {
    assert!(!out.status.success());
    let err = stderr(out);
    assert!(err.contains(var) && err.contains(value), "{err}");
}

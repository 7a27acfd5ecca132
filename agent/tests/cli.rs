//! The `capwatch-agent` command line, run as a real process: `--help` and
//! `--version`, the checked-in configs, clear errors for bad configs, and
//! the layering of file, `CAPWATCH_*` environment and flags.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use capwatch_agent::config::Config;

const BIN: &str = env!("CARGO_BIN_EXE_capwatch-agent");
const EXAMPLE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/examples/agent.toml");
const KUBERNETES: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/kubernetes/config/agent.toml"
);

/// Every long flag of the agent, and the environment variable that sets it
/// where there is one.
const FLAGS: &[(&str, Option<&str>)] = &[
    ("--config", Some("CAPWATCH_CONFIG")),
    ("--collector", Some("CAPWATCH_COLLECTOR")),
    ("--node-id", Some("CAPWATCH_NODE_ID")),
    ("--source", Some("CAPWATCH_SOURCE")),
    ("--interval", Some("CAPWATCH_INTERVAL")),
    ("--nvml-library", Some("CAPWATCH_NVML_LIBRARY")),
    ("--mock-gpus", Some("CAPWATCH_MOCK_GPUS")),
    ("--mock-profile", Some("CAPWATCH_MOCK_PROFILE")),
    ("--mock-model", Some("CAPWATCH_MOCK_MODEL")),
    ("--mock-seed", Some("CAPWATCH_MOCK_SEED")),
    ("--spool-capacity", Some("CAPWATCH_SPOOL_CAPACITY")),
    ("--token-file", Some("CAPWATCH_TOKEN_FILE")),
    ("--max-samples", None),
    ("--log-format", Some("CAPWATCH_LOG_FORMAT")),
    ("--print-config", None),
    ("--help", None),
    ("--version", None),
];

const LAYERING: &str = "Settings come from the config file, then CAPWATCH_* environment \
                        variables, then flags; the last wins.";

/// Runs the agent with `args` and `env` only: no `CAPWATCH_*` variable of
/// the test's own environment leaks in.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CAPWATCH_") {
            cmd.env_remove(key);
        }
    }
    cmd.args(args)
        .envs(env.iter().copied())
        .output()
        .expect("the agent binary runs")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The effective configuration (`--print-config`), which must succeed.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    let out = agent(&[args, &["--print-config"]].concat(), env);
    assert!(
        out.status.success(),
        "{args:?} {env:?}: {}\n{}",
        out.status,
        stderr(&out)
    );
    stdout(&out)
}

/// Dotted names of every setting, read from the pretty `Debug` of a
/// config: a field whose value opens a struct (`mock: MockSettings {`) is a
/// TOML table.
fn setting_names(debug: &str) -> BTreeSet<String> {
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
fn setting_line(line: &str) -> Option<(bool, &str, &str)> {
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
fn documented_settings(text: &str, other_defaults: &[(&str, &str)]) -> BTreeSet<String> {
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
fn uncommented(text: &str) -> String {
    text.lines()
        .map(|line| match setting_line(line) {
            Some((true, key, value)) => format!("{key} = {value}\n"),
            _ => format!("{line}\n"),
        })
        .collect()
}

#[test]
fn help_lists_every_flag_and_the_layering() {
    let out = agent(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    let shown: BTreeSet<&str> = help
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| w.starts_with("--") && w.len() > 2)
        .collect();
    let flags: BTreeSet<&str> = FLAGS.iter().map(|(flag, _)| *flag).collect();
    assert_eq!(shown, flags, "flags in --help vs FLAGS here:\n{help}");
    for (flag, env) in FLAGS {
        if let Some(env) = env {
            assert!(
                help.contains(&format!("[env: {env}=]")),
                "{flag}: no {env} in --help:\n{help}"
            );
        }
    }
    let flat = help.split_whitespace().collect::<Vec<_>>().join(" ");
    assert!(flat.contains(LAYERING), "{help}");
}

#[test]
fn version_prints_the_crate_version() {
    let out = agent(&["--version"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("capwatch-agent {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The example sets every setting to its default, so it documents the
/// defaults truthfully.
#[test]
fn example_config_lists_every_setting_at_its_default() {
    let cfg = Config::from_file(Path::new(EXAMPLE)).unwrap();
    cfg.validate().unwrap();
    assert_eq!(cfg, Config::default());

    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    assert_eq!(
        documented_settings(&text, &[]),
        setting_names(&format!("{:#?}", Config::default())),
        "settings in {EXAMPLE} vs the Config struct"
    );

    // The settings shown commented out parse and are valid too (the TLS
    // ones with an https:// collector).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    let tls = uncommented(&text).replace("collector = \"http://", "collector = \"https://");
    std::fs::write(&path, tls).unwrap();
    let cfg = Config::from_file(&path).unwrap();
    cfg.validate().unwrap();
    assert!(cfg.tls_ca.is_some() && cfg.token_file.is_some());
    assert!(
        cfg.nvml.library.is_some(),
        "nvml.library is shown in {EXAMPLE}"
    );

    let printed = print_config(&["--config", EXAMPLE], &[]);
    std::fs::write(&path, &printed).unwrap();
    assert_eq!(
        Config::from_file(&path).unwrap(),
        Config::default(),
        "{printed}"
    );
}

#[test]
fn kubernetes_config_is_valid() {
    let cfg = Config::from_file(Path::new(KUBERNETES)).unwrap();
    cfg.validate().unwrap();
    print_config(&["--config", KUBERNETES], &[]);
}

/// Bad configs fail with a non-zero exit and a message naming the problem.
#[test]
fn config_errors_name_the_problem() {
    // (file contents, or None for a file that does not exist; text the
    // error must contain, with {path} standing for the file's path)
    let cases: &[(Option<&str>, &[&str])] = &[
        (
            Some("colour = \"red\"\n"),
            &["{path}", "unknown field `colour`"],
        ),
        (
            Some("[mock]\ngpu = 3\n"),
            &["{path}", "unknown field `gpu`"],
        ),
        (
            Some("interval = \"0s\"\n"),
            &["`interval`", "between 10ms and 1h"],
        ),
        (Some("interval = \"soon\"\n"), &["{path}", "interval"]),
        (
            Some("source = \"NVML\"\n"),
            &["{path}", "unknown variant `NVML`"],
        ),
        (Some("[mock]\ngpus = 0\n"), &["`mock.gpus`"]),
        (
            Some("collector = \"collector:7070\"\n"),
            &["`collector`", "http://"],
        ),
        (None, &["{path}", "No such file"]),
    ];
    for (contents, want) in cases {
        check_error(*contents, want);
    }
}

fn check_error(contents: Option<&str>, want: &[&str]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("agent.toml");
    if let Some(text) = contents {
        std::fs::write(&path, text).expect("writing the test file");
    }
    let path = path.to_str().expect("temp paths are UTF-8");
    let out = agent(&["--config", path, "--print-config"], &[]);
    let err = stderr(&out);
    assert!(!out.status.success(), "{contents:?} was accepted:\n{err}");
    assert_eq!(out.stdout, b"", "{contents:?}");
    for w in want {
        let w = w.replace("{path}", path);
        assert!(err.contains(&w), "{contents:?}: error lacks {w:?}:\n{err}");
    }
}

/// Command-line arguments, environment, and what the result must show.
type Layers<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("agent.toml");
    std::fs::write(&file, "source = \"mock\"\n[mock]\ngpus = 2\n").unwrap();
    let file = file.to_str().unwrap();
    // (args, environment, gpus expected)
    let cases: &[Layers] = &[
        (
            &["--source", "mock"],
            &[("CAPWATCH_MOCK_GPUS", "3")],
            "gpus = 3",
        ),
        (
            &["--source", "mock", "--mock-gpus", "5"],
            &[("CAPWATCH_MOCK_GPUS", "3")],
            "gpus = 5",
        ),
        (&["--config", file], &[], "gpus = 2"),
        (
            &["--config", file],
            &[("CAPWATCH_MOCK_GPUS", "3")],
            "gpus = 3",
        ),
        (&[], &[("CAPWATCH_CONFIG", file)], "gpus = 2"),
        (
            &["--config", file, "--mock-gpus", "5"],
            &[("CAPWATCH_MOCK_GPUS", "3")],
            "gpus = 5",
        ),
    ];
    for (args, env, want) in cases {
        let printed = print_config(args, env);
        assert!(
            printed.lines().any(|l| l == *want),
            "{args:?} {env:?}: no {want}:\n{printed}"
        );
    }

    let printed = print_config(
        &["--interval", "250ms", "--node-id", "flag-node"],
        &[
            ("CAPWATCH_SOURCE", "mock"),
            ("CAPWATCH_INTERVAL", "5s"),
            ("CAPWATCH_NODE_ID", "env-node"),
            ("CAPWATCH_COLLECTOR", "http://collector.example:7070"),
            ("CAPWATCH_LOG_FORMAT", "json"),
        ],
    );
    for want in [
        "source = \"mock\"",
        "interval = \"250ms\"",
        "node_id = \"flag-node\"",
        "collector = \"http://collector.example:7070\"",
        "log_format = \"json\"",
    ] {
        assert!(printed.lines().any(|l| l == want), "no {want}:\n{printed}");
    }
}

/// `--print-config` prints TOML that `--config` reads back to the same
/// configuration: durations, enums, paths and numbers in the form the file
/// takes.
#[test]
fn print_config_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let printed = print_config(
        &[
            "--source",
            "mock",
            "--interval",
            "250ms",
            "--node-id",
            "node-7",
            "--mock-profile",
            "training",
            "--mock-model",
            "h200",
            "--nvml-library",
            "/opt/nvidia/libnvidia-ml.so.1",
        ],
        &[
            ("CAPWATCH_DRAIN_TIMEOUT", "90s"),
            ("CAPWATCH_RECONNECT_MAX", "2m"),
            ("CAPWATCH_MOCK_ENERGY_COUNTER", "false"),
        ],
    );
    let path = dir.path().join("printed.toml");
    std::fs::write(&path, &printed).unwrap();
    let cfg = Config::from_file(&path).unwrap();
    assert_eq!(cfg.interval, Duration::from_millis(250));
    assert_eq!(cfg.drain_timeout, Duration::from_secs(90));
    assert_eq!(cfg.reconnect_max, Duration::from_secs(120));
    assert!(!cfg.mock.energy_counter);
    assert_eq!(
        cfg.nvml.library.as_deref(),
        Some(Path::new("/opt/nvidia/libnvidia-ml.so.1"))
    );
    let path_str = path.to_str().unwrap();
    assert_eq!(print_config(&["--config", path_str], &[]), printed);
}

/// Every setting can come from a `CAPWATCH_*` variable (the setting's name,
/// upper case, `.` as `_`), documented in the README; a bad value names the
/// variable.
#[test]
fn every_setting_has_an_environment_variable() {
    let printed = print_config(
        &[],
        &[
            ("CAPWATCH_BATCH_MAX", "7"),
            ("CAPWATCH_RECONNECT_INITIAL", "1s"),
            ("CAPWATCH_MOCK_ENERGY_COUNTER", "false"),
            ("CAPWATCH_MOCK_GPUS", "3"),
        ],
    );
    for want in [
        "batch_max = 7",
        "reconnect_initial = \"1s\"",
        "energy_counter = false",
        "gpus = 3",
    ] {
        assert!(printed.lines().any(|l| l == want), "no {want}:\n{printed}");
    }

    let out = agent(&["--print-config"], &[("CAPWATCH_BATCH_MAX", "many")]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("CAPWATCH_BATCH_MAX") && err.contains("many"),
        "{err}"
    );

    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let vars = Config::env_vars();
    assert!(
        vars.iter()
            .any(|(k, v)| k == "mock.energy_counter" && v == "CAPWATCH_MOCK_ENERGY_COUNTER")
    );
    for (setting, var) in vars {
        assert!(
            readme.contains(&format!("`{var}`")),
            "README does not document {var} ({setting})"
        );
    }
}

/// What `child` writes to stderr until a line containing `needle` (at most
/// 20 s); then it is killed.
fn stderr_until(mut child: Child, needle: &str) -> Vec<u8> {
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

/// Plain logs to a pipe (journald, a file, a log shipper) carry no ANSI
/// colour codes.
#[test]
fn logs_have_no_colour_when_stderr_is_not_a_terminal() {
    let mut cmd = Command::new(BIN);
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("CAPWATCH_") {
            cmd.env_remove(key);
        }
    }
    let child = cmd
        .args(["--source", "mock", "--node-id", "node-1"])
        // Nothing listens there: the agent logs its reconnects.
        .args(["--collector", "http://127.0.0.1:9"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    let seen = stderr_until(child, "node-1");
    assert!(
        !seen.contains(&0x1b),
        "ANSI escapes in {}",
        String::from_utf8_lossy(&seen)
    );
}

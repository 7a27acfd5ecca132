//! The `capwatch-agent` command line, run as a real process: `--help` and
//! `--version`, the checked-in configs, clear errors for bad configs, and
//! the layering of file, `CAPWATCH_*` environment and flags.

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::Duration;

use expect_test::expect_file;

use capwatch_testkit::*;

use capwatch_agent::config::{CollectorOrder, Config};

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
    ("--collectors", Some("CAPWATCH_COLLECTORS")),
    ("--collector-order", Some("CAPWATCH_COLLECTOR_ORDER")),
    ("--failback-after", Some("CAPWATCH_FAILBACK_AFTER")),
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

/// Runs the agent with `args` and `env` only: no `CAPWATCH_*` variable of
/// the test's own environment leaks in.
fn agent(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_clean(BIN, args, env)
}

/// The effective configuration (`--print-config`), which must succeed.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    run_ok(BIN, &[args, &["--print-config"]].concat(), env)
}

/// The config file at `path`, which must read and validate.
fn valid_config(path: &Path) -> Config {
    let cfg = Config::from_file(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cfg.validate()
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    cfg
}

#[test]
fn help_lists_every_flag_and_the_layering() {
    let out = agent(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    assert_help_lists(&help, FLAGS);
    expect_file!["snapshots/agent-help.txt"].assert_eq(&help);
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
    let cfg = valid_config(Path::new(EXAMPLE));
    assert_eq!(cfg, Config::default());

    let text = std::fs::read_to_string(EXAMPLE).unwrap();
    assert_eq!(
        documented_settings(&text, &[]),
        setting_names(&format!("{:#?}", Config::default())),
        "settings in {EXAMPLE} vs the Config struct"
    );

    // The settings shown commented out parse and are valid too (the TLS
    // ones with https:// collectors; `collectors` in place of `collector`,
    // since only one of them may be set).
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    // ipmi.command is left out too: the BMC is either Redfish or IPMI.
    let tls: String = uncommented(&text)
        .lines()
        .filter(|l| !l.starts_with("collector = ") && !l.starts_with("command = "))
        .map(|l| format!("{}\n", l.replace("\"http://", "\"https://")))
        .collect();
    std::fs::write(&path, tls).unwrap();
    let cfg = valid_config(&path);
    assert!(cfg.tls_ca.is_some() && cfg.token_file.is_some());
    assert_eq!(cfg.endpoints().len(), 2, "collectors is shown in {EXAMPLE}");
    assert!(
        cfg.nvml.library.is_some(),
        "nvml.library is shown in {EXAMPLE}"
    );
    assert!(
        cfg.redfish.url.is_some() && cfg.redfish.credentials_file.is_some(),
        "the [redfish] settings are shown in {EXAMPLE}"
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
    valid_config(Path::new(KUBERNETES));
    print_config(&["--config", KUBERNETES], &[]);
}

/// The agent configs for several collectors (README, "Several
/// collectors") read and validate, and say what their comments say: the
/// systemd one lists two collectors ranked by hash, the Kubernetes one the
/// headless Service's one name. So does the README's command line for two
/// local collectors.
#[test]
fn several_collector_configs_are_valid() {
    let ha = |file: &str| format!("{}/../deploy/{file}", env!("CARGO_MANIFEST_DIR"));
    let systemd = ha("examples/ha/agent.toml");
    let cfg = valid_config(Path::new(&systemd));
    assert_eq!(
        cfg.endpoints(),
        ["https://collector-a:7070", "https://collector-b:7070"]
    );
    assert_eq!(cfg.collector, None);
    assert_eq!(cfg.collector_order, CollectorOrder::Hashed);
    assert_eq!(cfg.failback_after, Duration::from_secs(300));
    assert!(cfg.tls_ca.is_some() && cfg.token_file.is_some());
    print_config(&["--config", &systemd], &[]);

    let kubernetes = ha("kubernetes/ha/config/agent.toml");
    let cfg = valid_config(Path::new(&kubernetes));
    assert_eq!(cfg.endpoints(), ["https://capwatch-collector:7070"]);
    assert!(cfg.tls_ca.is_some() && cfg.token_file.is_some());
    // The DaemonSet passes the node's name.
    print_config(
        &["--config", &kubernetes],
        &[("CAPWATCH_NODE_ID", "gpu-node-1")],
    );

    let printed = print_config(
        &["--source", "mock", "--node-id", "lab-a-node-1"],
        &[(
            "CAPWATCH_COLLECTORS",
            "http://127.0.0.1:7070,http://127.0.0.1:7071",
        )],
    );
    assert!(
        printed.contains("collectors = [\"http://127.0.0.1:7070\", \"http://127.0.0.1:7071\"]"),
        "{printed}"
    );
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
        (
            Some("collector = \"http://a:7070\"\ncollectors = [\"http://b:7070\"]\n"),
            &["`collectors`", "collector (one endpoint)", "not both"],
        ),
        (
            Some("collectors = []\n"),
            &["`collectors`", "at least one endpoint"],
        ),
        (
            Some("collectors = [\"http://a:7070\", \"b:7070\"]\n"),
            &["`collectors`", "endpoint 2 (\"b:7070\")", "http://"],
        ),
        (
            Some("collector_order = \"random\"\n"),
            &["{path}", "unknown variant `random`"],
        ),
        (
            Some("failback_after = \"5ms\"\n"),
            &["`failback_after`", "0s (never)"],
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
    assert_error_names(&out, path, want, &format!("{contents:?}"));
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
    assert_lines(
        &printed,
        &[
            "source = \"mock\"",
            "interval = \"250ms\"",
            "node_id = \"flag-node\"",
            "collector = \"http://collector.example:7070\"",
            "log_format = \"json\"",
        ],
    );
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
            "--collectors",
            "http://a:7070,http://b:7070",
            "--collector-order",
            "listed",
            "--failback-after",
            "10s",
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
    assert_eq!(cfg.endpoints(), ["http://a:7070", "http://b:7070"]);
    assert_eq!(cfg.collector_order, CollectorOrder::Listed);
    assert_eq!(cfg.failback_after, Duration::from_secs(10));
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
            ("CAPWATCH_REDFISH_URL", "https://bmc.example"),
            ("CAPWATCH_REDFISH_INTERVAL", "30s"),
            ("CAPWATCH_RAPL_ENABLED", "true"),
        ],
    );
    assert_lines(
        &printed,
        &[
            "batch_max = 7",
            "reconnect_initial = \"1s\"",
            "energy_counter = false",
            "gpus = 3",
            "url = \"https://bmc.example\"",
            "interval = \"30s\"",
            "enabled = true",
        ],
    );

    // A list from the environment is comma-separated.
    let printed = print_config(
        &[],
        &[
            ("CAPWATCH_COLLECTORS", "http://a:7070, http://b:7070"),
            ("CAPWATCH_COLLECTOR_ORDER", "listed"),
            ("CAPWATCH_FAILBACK_AFTER", "30s"),
        ],
    );
    assert_lines(
        &printed,
        &[
            "collectors = [\"http://a:7070\", \"http://b:7070\"]",
            "collector_order = \"listed\"",
            "failback_after = \"30s\"",
        ],
    );
    let out = agent(
        &["--print-config"],
        &[("CAPWATCH_COLLECTORS", "http://a:7070,ftp://b")],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains("endpoint 2 (\"ftp://b\")"),
        "{}",
        stderr(&out)
    );

    let out = agent(&["--print-config"], &[("CAPWATCH_BATCH_MAX", "many")]);
    assert_bad_env_named(&out, "CAPWATCH_BATCH_MAX", "many");

    let vars = Config::env_vars();
    assert!(
        vars.iter()
            .any(|(k, v)| k == "mock.energy_counter" && v == "CAPWATCH_MOCK_ENERGY_COUNTER")
    );
    assert_readme_documents(&vars);
}

/// A collector URL carrying credentials is refused, and the error (which
/// goes to the journal) names the endpoint without them.
#[test]
fn a_collector_url_with_a_password_is_refused_without_showing_it() {
    // (arguments, environment)
    type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let cases: [Case; 2] = [
        (&["--collector", "https://capwatch:hunter2@c1:7070"], &[]),
        (
            &[],
            &[(
                "CAPWATCH_COLLECTORS",
                "https://c0:7070,https://capwatch:hunter2@c1:7070",
            )],
        ),
    ];
    for (args, env) in cases {
        let out = agent(&[args, &["--print-config"]].concat(), env);
        let err = stderr(&out);
        assert!(!out.status.success(), "{args:?} {env:?}");
        assert!(err.contains("user name or password"), "{err}");
        assert!(err.contains("c1:7070"), "the endpoint is not named: {err}");
        assert!(!err.contains("hunter2"), "{err}");
    }
}

/// Plain logs to a pipe (journald, a file, a log shipper) carry no ANSI
/// colour codes.
#[test]
fn logs_have_no_colour_when_stderr_is_not_a_terminal() {
    let child = clean_command(BIN)
        .args(["--source", "mock", "--node-id", "node-1"])
        // Nothing listens there: the agent logs its reconnects.
        .args(["--collector", "http://127.0.0.1:9"])
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the agent");
    assert_no_colour(&stderr_until(child, "node-1"));
}

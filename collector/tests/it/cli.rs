//! The `capwatch-collector` command line, run as a real process: `--help`
//! and `--version`, the checked-in configs and tenant files, clear errors
//! for bad ones, and the layering of file, `CAPWATCH_*` environment and
//! flags. Also keeps the Prometheus rules in `deploy/` on the metric names
//! the collector exports.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use expect_test::expect_file;

use capwatch_testkit::*;

use capwatch_collector::config::Config;
use capwatch_collector::tenants::{Tenants, UNASSIGNED};

const BIN: &str = env!("CARGO_BIN_EXE_capwatch-collector");
const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy");

/// Every long flag of the collector, and the environment variable that sets
/// it where there is one.
const FLAGS: &[(&str, Option<&str>)] = &[
    ("--config", Some("CAPWATCH_CONFIG")),
    ("--tenants", Some("CAPWATCH_TENANTS")),
    ("--auth-file", Some("CAPWATCH_AUTH_FILE")),
    ("--ledger", Some("CAPWATCH_LEDGER")),
    ("--ledger-url", Some("CAPWATCH_LEDGER_URL")),
    ("--grpc-listen", Some("CAPWATCH_GRPC_LISTEN")),
    ("--http-listen", Some("CAPWATCH_HTTP_LISTEN")),
    ("--stale-after", Some("CAPWATCH_STALE_AFTER")),
    ("--per-gpu-metrics", Some("CAPWATCH_PER_GPU_METRICS")),
    ("--insecure-plaintext", Some("CAPWATCH_INSECURE_PLAINTEXT")),
    ("--log-format", Some("CAPWATCH_LOG_FORMAT")),
    ("--check", None),
    ("--recover-ledger", None),
    ("--print-config", None),
    ("--help", None),
    ("--version", None),
];

/// Where the example collector.toml points tenants_file: where the systemd
/// unit's install steps put the tenant file.
const EXAMPLE_TENANTS_FILE: &str = "/etc/capwatch/tenants.toml";

/// A file under `deploy/`.
fn deploy(path: &str) -> String {
    format!("{DEPLOY}/{path}")
}

/// Runs the collector with `args` and `env` only: no `CAPWATCH_*` variable
/// of the test's own environment leaks in.
fn collector(args: &[&str], env: &[(&str, &str)]) -> Output {
    run_clean(BIN, args, env)
}

/// The `--check` summary, which must succeed.
fn check(args: &[&str], env: &[(&str, &str)]) -> String {
    run_ok(BIN, &[args, &["--check"]].concat(), env)
}

/// Asserts that a `--check` summary lists exactly `tenants` (id, kW) and
/// `unassigned`.
fn assert_tenants(summary: &str, tenants: &[(&str, &str)]) {
    let mut lines = summary.lines();
    assert_eq!(
        lines.next(),
        Some(format!("configuration ok: {} tenants", tenants.len()).as_str()),
        "{summary}"
    );
    let listed: Vec<(&str, &str)> = lines
        .filter(|l| l.starts_with("  "))
        .map(|l| {
            let mut words = l.split_whitespace();
            let id = words.next().expect("a tenant line starts with its id");
            let kw = words.next().expect("then its contracted kW");
            (id, kw)
        })
        .collect();
    let mut want = tenants.to_vec();
    want.push((UNASSIGNED, "0.000"));
    assert_eq!(listed, want, "{summary}");
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
    let out = collector(&["--help"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = stdout(&out);
    assert_help_lists(&help, FLAGS);
    let flat = flat(&help);
    assert!(
        flat.contains("SIGHUP reloads the tenant file and the auth file"),
        "{help}"
    );
    expect_file!["snapshots/collector-help.txt"].assert_eq(&help);
}

#[test]
fn version_prints_the_crate_version() {
    let out = collector(&["--version"], &[]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        stdout(&out),
        format!("capwatch-collector {}\n", env!("CARGO_PKG_VERSION"))
    );
}

/// The example sets every setting to its default except tenants_file, so it
/// documents the defaults truthfully.
#[test]
fn example_config_lists_every_setting_at_its_default() {
    let example = deploy("examples/collector.toml");
    let mut cfg = valid_config(Path::new(&example));
    // The one deliberate difference: where the tenant file is installed.
    assert_eq!(cfg.tenants_file, Some(PathBuf::from(EXAMPLE_TENANTS_FILE)));
    cfg.tenants_file = None;
    assert_eq!(cfg, Config::default());

    let text = std::fs::read_to_string(&example).unwrap();
    assert_eq!(
        documented_settings(&text, &[("tenants_file", "unset")]),
        setting_names(&format!("{:#?}", Config::default())),
        "settings in {example} vs the Config struct"
    );

    // The settings shown commented out parse and are valid too.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("collector.toml");
    std::fs::write(&path, uncommented(&text)).unwrap();
    let cfg = valid_config(&path);
    assert!(
        cfg.stale_after.is_some(),
        "stale_after is shown in {example}"
    );
}

#[test]
fn example_configs_pass_check() {
    let summary = check(
        &[
            "--config",
            &deploy("examples/collector.toml"),
            "--tenants",
            &deploy("examples/tenants.toml"),
        ],
        &[],
    );
    assert_tenants(
        &summary,
        &[
            ("frontier-lab", "160.000"),
            ("vision-team", "10.000"),
            ("inference-startup", "2.400"),
        ],
    );
    let summary = check(&["--tenants", &deploy("examples/demo-tenants.toml")], &[]);
    assert_tenants(
        &summary,
        &[("lab-a", "15.000"), ("lab-b", "9.000"), ("lab-c", "4.000")],
    );
}

/// The example meter config passes `--check`, which lists its meters.
#[test]
fn example_meter_config_passes_check() {
    let summary = check(
        &[
            "--config",
            &deploy("examples/collector-meters.toml"),
            "--tenants",
            &deploy("examples/tenants.toml"),
        ],
        &[],
    );
    assert_lines(
        &summary,
        &[
            "meter row-a-main               modbus       every 15s, nodes gpu-a*",
            "meter rack-b7-pdu              redfish_pdu  every 30s, nodes gpu-b7-01,gpu-b7-02,gpu-b7-03,gpu-b7-04",
        ],
    );
    // The meters print back as tables that read in again unchanged.
    let example = deploy("examples/collector-meters.toml");
    let printed = print_config(&["--config", &example], &[]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("printed.toml");
    std::fs::write(&path, &printed).unwrap();
    let cfg = valid_config(&path);
    assert_eq!(cfg.meter.len(), 2, "{printed}");
    assert_eq!(cfg, valid_config(Path::new(&example)));
}

/// `KEY=VALUE` lines of a systemd `EnvironmentFile=` (comments left out).
fn environment_file(path: &str) -> Vec<(String, String)> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| {
            let (k, v) = l.split_once('=').unwrap_or_else(|| panic!("{path}: {l}"));
            (k.to_string(), v.to_string())
        })
        .collect()
}

/// The collector configs for several collectors (README, "Several
/// collectors") pass `--check` as the README runs it (the tenant and auth
/// files they name are the host's: the examples stand in for them), select
/// the PostgreSQL ledger with its password from a file and no SQLite path,
/// and each host's environment file names its collector. So do the README's
/// command lines for two collectors on one machine.
#[test]
fn several_collector_configs_pass_check() {
    let stand_ins = [
        ("CAPWATCH_TENANTS", deploy("examples/tenants.toml")),
        ("CAPWATCH_AUTH_FILE", deploy("examples/auth.toml")),
    ];
    let stand_ins: Vec<(&str, &str)> = stand_ins.iter().map(|(k, v)| (*k, v.as_str())).collect();
    for file in [
        "examples/ha/collector.toml",
        "kubernetes/ha/config/collector.toml",
    ] {
        let path = deploy(file);
        let cfg = valid_config(Path::new(&path));
        let url = cfg
            .ledger_url
            .clone()
            .unwrap_or_else(|| panic!("{file}: no ledger_url"));
        assert!(
            url.starts_with("postgres://") && url.contains("target_session_attrs=read-write"),
            "{file}: {url}"
        );
        let user = url["postgres://".len()..].split('@').next().unwrap();
        assert!(!user.contains(':'), "{file}: a password in the URL");
        assert!(cfg.ledger_password_file.is_some(), "{file}");
        assert!(
            matches!(
                cfg.ledger(),
                capwatch_collector::config::LedgerChoice::Postgres(_)
            ),
            "{file}"
        );
        assert_eq!(
            cfg.collector_id, None,
            "{file}: one file for every collector"
        );
        let summary = check(&["--config", &path], &stand_ins);
        assert!(
            summary.starts_with("configuration ok: 3 tenants"),
            "{file}: {summary}"
        );
        assert!(
            summary.contains("auth: agents need a token: true"),
            "{file}: {summary}"
        );
    }
    // Kubernetes: each replica's pod name is its collector_id, and the
    // ledger-init Job creates the ledger the collectors' config names,
    // with the password from the same Secret.
    let kubernetes = deploy("kubernetes/ha/config/collector.toml");
    let pod = [(
        "CAPWATCH_COLLECTOR_ID",
        "capwatch-collector-7d9f8b6c5d-x2lqp",
    )];
    let printed = print_config(
        &["--config", &kubernetes],
        &[&pod[..], &stand_ins[..]].concat(),
    );
    assert!(printed.contains("collector_id = \"capwatch-collector-7d9f8b6c5d-x2lqp\"\n"));
    let job =
        std::fs::read_to_string(deploy("kubernetes/ha/ledger-init/ledger-init-job.yaml")).unwrap();
    let job_url = job
        .lines()
        .find_map(|l| l.trim().strip_prefix("- --ledger-url="))
        .expect("--ledger-url= in the ledger-init Job");
    let cfg = valid_config(Path::new(&kubernetes));
    assert_eq!(
        Some(job_url),
        cfg.ledger_url.as_deref(),
        "the ledger-init Job's URL"
    );
    let password = cfg.ledger_password_file.unwrap();
    assert!(
        job.contains(&format!("value: {}\n", password.display())),
        "the ledger-init Job reads another password file than {}",
        password.display()
    );
    // The Job's arguments parse (the flag after the subcommand).
    let printed = run_ok(
        BIN,
        &[
            "--print-config",
            "init-ledger",
            &format!("--ledger-url={job_url}"),
        ],
        &[],
    );
    assert!(
        printed.contains(&format!("ledger_url = \"{job_url}\"\n")),
        "{printed}"
    );

    let config = deploy("examples/ha/collector.toml");
    // The README creates the ledger the systemd example names.
    let readme = std::fs::read_to_string(format!("{DEPLOY}/../README.md")).unwrap();
    let url = valid_config(Path::new(&config)).ledger_url.unwrap();
    assert!(
        readme.contains(&format!("init-ledger \\\n    --ledger-url '{url}'")),
        "README's init-ledger is not for {url}"
    );
    for (host, id) in [("a", "collector-a"), ("b", "collector-b")] {
        let env = environment_file(&deploy(&format!("examples/ha/collector-{host}.env")));
        let env: Vec<(&str, &str)> = env
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .chain(stand_ins.iter().copied())
            .collect();
        check(&["--config", &config], &env);
        let printed = print_config(&["--config", &config], &env);
        assert!(
            printed.contains(&format!("collector_id = \"{id}\"\n")),
            "{printed}"
        );
    }

    // README: two collectors on one machine, a local PostgreSQL.
    let dir = tempfile::tempdir().unwrap();
    let password = dir.path().join("ledger.password");
    std::fs::write(&password, "secret\n").unwrap();
    let url = "postgres://capwatch@127.0.0.1:5432/capwatch?target_session_attrs=read-write";
    for (id, grpc, http) in [
        ("collector-a", "127.0.0.1:7070", "127.0.0.1:9470"),
        ("collector-b", "127.0.0.1:7071", "127.0.0.1:9471"),
    ] {
        let args = [
            "--ledger-url",
            url,
            "--tenants",
            &deploy("examples/tenants.toml"),
            "--grpc-listen",
            grpc,
            "--http-listen",
            http,
        ];
        let env = [
            ("CAPWATCH_LEDGER_PASSWORD_FILE", password.to_str().unwrap()),
            ("CAPWATCH_COLLECTOR_ID", id),
        ];
        check(&args, &env);
        let printed = print_config(&args, &env);
        for want in [
            format!("collector_id = \"{id}\"\n"),
            format!("ledger_url = \"{url}\"\n"),
            format!("grpc_listen = \"{grpc}\"\n"),
        ] {
            assert!(printed.contains(&want), "no {want} in {printed}");
        }
    }
}

/// The example tenant files attribute GPUs as their comments say.
#[test]
fn example_tenants_attribute_as_documented() {
    // (node, GPU UUID, tenant)
    let attributes = |file: &str, cases: &[(&str, &str, &str)]| {
        let tenants = Tenants::from_file(Path::new(&deploy(file))).unwrap();
        for (node, uuid, want) in cases {
            let got = &tenants.all()[tenants.attribute(node, uuid)].id;
            assert_eq!(&**got, *want, "{file}: {node} {uuid}");
        }
    };
    attributes(
        "examples/demo-tenants.toml",
        &[
            ("lab-a-node-1", "GPU-x", "lab-a"),
            ("lab-a-node-2", "GPU-x", "lab-a"),
            ("lab-b-node-1", "GPU-x", "lab-b"),
            ("lab-c-node-1", "GPU-x", "lab-c"),
            ("spare-node-1", "GPU-x", UNASSIGNED),
        ],
    );
    let leased = "GPU-3f2a1c4e-8b7d-4e21-9a6f-0c5d2e8b1a47";
    attributes(
        "examples/tenants.toml",
        &[
            ("rack-a1-node-01", "GPU-x", "frontier-lab"),
            ("rack-a4-node-16", "GPU-x", "frontier-lab"),
            ("rack-a5-node-01", "GPU-x", UNASSIGNED),
            ("gpu-node-017", "GPU-x", "vision-team"),
            ("gpu-node-018", "GPU-x", "vision-team"),
            ("gpu-node-019", "GPU-x", UNASSIGNED),
            ("shared-node-1", leased, "inference-startup"),
            ("shared-node-1", "GPU-x", UNASSIGNED),
            // Pinned to shared-node-1: announced elsewhere, not the lessee's.
            ("gpu-node-017", leased, "vision-team"),
        ],
    );
    attributes(
        "kubernetes/config/tenants.toml",
        &[("gpu-pool-a-7", "GPU-x", "example-lab")],
    );
}

/// The Kubernetes config is valid, and its tenant file is where the
/// Deployment mounts the tenant ConfigMap.
#[test]
fn kubernetes_config_passes_check() {
    let config = deploy("kubernetes/config/collector.toml");
    let cfg = valid_config(Path::new(&config));
    let tenants_dir = cfg
        .tenants_file
        .as_deref()
        .and_then(Path::parent)
        .and_then(Path::to_str)
        .expect("the Kubernetes config names a tenant file")
        .to_string();
    let deployment =
        std::fs::read_to_string(deploy("kubernetes/collector-deployment.yaml")).unwrap();
    assert!(
        deployment.contains(&format!("mountPath: {tenants_dir}\n")),
        "collector-deployment.yaml does not mount the tenants at {tenants_dir}"
    );
    let summary = check(
        &[
            "--config",
            &config,
            "--tenants",
            &deploy("kubernetes/config/tenants.toml"),
            "--auth-file",
            &deploy("examples/auth.toml"),
        ],
        &[],
    );
    assert_tenants(&summary, &[("example-lab", "50.000")]);
    assert!(
        summary.contains("agents need a token: true; the usage API needs a token: true"),
        "{summary}"
    );
}

/// Bad configs and tenant files fail with a non-zero exit and a message
/// naming the problem.
#[test]
fn config_errors_name_the_problem() {
    const TWO_CLAIM_ONE_GPU: &str = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 10\n\
        gpus = [\"GPU-1234\"]\n\n[[tenant]]\nid = \"lab-b\"\ncontracted_kw = 5\n\
        gpus = [\"GPU-5678\", \"GPU-1234\"]\n";
    const TWO_CLAIM_ONE_NODE: &str = "[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 10\n\
        nodes = [\"node-1\"]\n\n[[tenant]]\nid = \"lab-b\"\ncontracted_kw = 5\n\
        nodes = [\"node-1\"]\n";
    // (flag the file is passed with, its contents or None for a file that
    // does not exist, text the error must contain with {path} standing for
    // the file's path)
    let cases: &[(&str, Option<&str>, &[&str])] = &[
        (
            "--config",
            Some("grpc_port = 7070\n"),
            &["{path}", "unknown field `grpc_port`"],
        ),
        (
            "--config",
            Some("grpc_listen = \"localhost:7070\"\n"),
            &["{path}", "grpc_listen", "invalid socket address"],
        ),
        (
            "--config",
            Some("stale_after = \"1ms\"\n"),
            &["`stale_after`", "at least 10ms"],
        ),
        (
            "--config",
            Some("max_message_bytes = 10\n"),
            &["`max_message_bytes`", "at least 1024"],
        ),
        ("--config", None, &["{path}", "No such file"]),
        (
            "--config",
            Some("minute_retention = \"7d\"\n"),
            &[
                "`minute_retention`",
                "max_sample_age + 7d + 1h",
                "14days 1h",
            ],
        ),
        (
            "--config",
            Some("hour_retention = \"30d\"\n"),
            &["`hour_retention`", "at least minute_retention"],
        ),
        (
            "--config",
            Some(
                "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"gpu-*\"]\naddress = \"10.0.0.5:502\"\nwh_per_count = 0.0000004\n",
            ),
            &["\"row-a\"", "`wh_per_count`", "whole number of millijoules"],
        ),
        (
            "--config",
            Some(
                "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = []\naddress = \"10.0.0.5:502\"\n",
            ),
            &["\"row-a\"", "`nodes`"],
        ),
        (
            "--config",
            Some(
                "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"n\"]\naddress = \"10.0.0.5:502\"\nregister_count = 2\n",
            ),
            &["{path}", "unknown field `register_count`"],
        ),
        (
            "--tenants",
            Some("[[tenant]]\nid = \"lab-a\"\ncontracted_kw = 10\ncolour = \"red\"\n"),
            &["{path}", "unknown field `colour`"],
        ),
        (
            "--tenants",
            Some("[[tenant]]\nid = \"lab-a\"\nnodes = [\"n-1\"]\n"),
            &["{path}", "missing field `contracted_kw`"],
        ),
        (
            "--tenants",
            Some(TWO_CLAIM_ONE_GPU),
            &["GPU-1234", "\"lab-a\"", "\"lab-b\""],
        ),
        (
            "--tenants",
            Some(TWO_CLAIM_ONE_NODE),
            &["\"node-1\"", "\"lab-a\"", "\"lab-b\""],
        ),
        (
            "--tenants",
            Some("[[tenant]]\nid = \"lab-a\"\ncontracted_kw = -5\n"),
            &["\"lab-a\"", "contracted_kw", "-5"],
        ),
        (
            "--tenants",
            Some("[[tenant]]\nid = \"Lab A\"\ncontracted_kw = 5\n"),
            &["\"Lab A\"", "a-z"],
        ),
        ("--tenants", None, &["{path}", "No such file"]),
    ];
    for (flag, contents, want) in cases {
        check_error(flag, *contents, want);
    }
}

#[test]
fn usage_command_names_a_missing_or_unmigrated_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let ledger = path.to_str().unwrap();
    let usage = [
        "--ledger",
        ledger,
        "usage",
        "--from",
        "2027-01-01T00:00:00Z",
        "--to",
        "2027-01-02T00:00:00Z",
    ];
    let out = collector(&usage, &[]);
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("ledger {ledger} does not exist")),
        "{}",
        stderr(&out)
    );
    // A ledger written by an older collector (schema version 1).
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 1)
        .unwrap();
    let out = collector(&usage, &[]);
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains("schema version 1 is older") && err.contains("start the collector once"),
        "{err}"
    );
}

fn check_error(flag: &str, contents: Option<&str>, want: &[&str]) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("file.toml");
    if let Some(text) = contents {
        std::fs::write(&path, text).expect("writing the test file");
    }
    let path = path.to_str().expect("temp paths are UTF-8");
    let out = collector(&[flag, path, "--check"], &[]);
    assert_error_names(&out, path, want, &format!("{flag} {contents:?}"));
}

/// Command-line arguments, environment, and what the result must show.
type Layers<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn environment_overrides_the_file_and_flags_override_both() {
    let dir = tempfile::tempdir().unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.to_str().unwrap().to_string()
    };
    let tenants = |id: &str| format!("[[tenant]]\nid = \"{id}\"\ncontracted_kw = 1\n");
    let from_file = file("file.toml", &tenants("from-file"));
    let from_env = file("env.toml", &tenants("from-env"));
    let from_flag = file("flag.toml", &tenants("from-flag"));
    let config = file(
        "collector.toml",
        &format!("tenants_file = {from_file:?}\nstale_after = \"1ms\"\n"),
    );
    // (args, environment, the tenant listed). The file's stale_after is
    // invalid, so each case must also override it.
    let cases: &[Layers] = &[
        (
            &["--config", &config, "--stale-after", "1s"],
            &[],
            "from-file",
        ),
        (
            &["--config", &config],
            &[("CAPWATCH_STALE_AFTER", "1s")],
            "from-file",
        ),
        (
            &[],
            &[("CAPWATCH_CONFIG", &config), ("CAPWATCH_STALE_AFTER", "1s")],
            "from-file",
        ),
        (
            &["--config", &config],
            &[
                ("CAPWATCH_TENANTS", &from_env),
                ("CAPWATCH_STALE_AFTER", "1s"),
            ],
            "from-env",
        ),
        (
            &["--config", &config, "--tenants", &from_flag],
            &[
                ("CAPWATCH_TENANTS", &from_env),
                ("CAPWATCH_STALE_AFTER", "1s"),
            ],
            "from-flag",
        ),
        (
            &["--config", &config, "--stale-after", "1s"],
            &[("CAPWATCH_STALE_AFTER", "1ms")],
            "from-file",
        ),
    ];
    for (args, env, want) in cases {
        assert_tenants(&check(args, env), &[(want, "1.000")]);
    }

    // Environment values are checked like the file's.
    let out = collector(
        &["--config", &config, "--check"],
        &[("CAPWATCH_STALE_AFTER", "5ms")],
    );
    assert!(!out.status.success());
    assert!(stderr(&out).contains("`stale_after`"), "{}", stderr(&out));
}

/// The Prometheus rules (and their unit tests) query only metric names the
/// collector or the agent exports, and find the collector by the scrape
/// job's name.
#[test]
fn prometheus_rules_use_exported_metric_names() {
    // The collector's families, and the agent's own (its HTTP port).
    let source = [
        concat!(env!("CARGO_MANIFEST_DIR"), "/src/metrics.rs"),
        concat!(env!("CARGO_MANIFEST_DIR"), "/../agent/src/http.rs"),
    ]
    .map(|path| std::fs::read_to_string(path).unwrap())
    .join("\n");
    let exported: BTreeSet<&str> = source
        .split('"')
        .filter(|s| s.starts_with("capwatch_") && !s.contains(char::is_whitespace))
        .collect();
    assert!(
        exported.contains("capwatch_tenant_power_watts"),
        "{exported:?}"
    );

    for file in [
        "prometheus/rules/capwatch.rules.yml",
        "prometheus/tests/capwatch.rules.test.yml",
    ] {
        let text = std::fs::read_to_string(deploy(file)).unwrap();
        let used: BTreeSet<&str> = text
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_' || c == ':'))
            .filter(|w| w.starts_with("capwatch_"))
            .collect();
        assert!(!used.is_empty(), "{file}");
        let unknown: Vec<_> = used.difference(&exported).collect();
        assert!(
            unknown.is_empty(),
            "{file} uses metrics neither the collector nor the agent exports: {unknown:?}"
        );
    }

    let scrape = std::fs::read_to_string(deploy("prometheus/prometheus.yml")).unwrap();
    let rules = std::fs::read_to_string(deploy("prometheus/rules/capwatch.rules.yml")).unwrap();
    assert!(scrape.contains("job_name: capwatch-collector\n"));
    assert!(rules.contains("up{job=\"capwatch-collector\"}"));
}

/// The effective configuration (`--print-config`), which must succeed.
fn print_config(args: &[&str], env: &[(&str, &str)]) -> String {
    run_ok(BIN, &[args, &["--print-config"]].concat(), env)
}

/// `--print-config` prints TOML that `--config` reads back to the same
/// configuration: durations, optional durations, addresses, paths, numbers,
/// booleans and the log format in the form the file takes.
#[test]
fn print_config_round_trips_through_a_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("printed.toml");
    let path_str = path.to_str().unwrap();

    let defaults = print_config(&[], &[]);
    expect_file!["snapshots/collector-default-config.toml"].assert_eq(&defaults);
    std::fs::write(&path, &defaults).unwrap();
    assert_eq!(
        Config::from_file(&path).unwrap(),
        Config::default(),
        "{defaults}"
    );

    let printed = print_config(
        &[
            "--stale-after",
            "90s",
            "--ledger",
            "/var/lib/capwatch/ledger.db",
            "--http-listen",
            "127.0.0.1:9999",
            "--log-format",
            "json",
        ],
        &[
            ("CAPWATCH_COMMIT_INTERVAL", "250ms"),
            ("CAPWATCH_DAY_RETENTION", "800d"),
            ("CAPWATCH_PER_NODE_METRICS", "false"),
            ("CAPWATCH_MAX_STREAMS", "12"),
        ],
    );
    std::fs::write(&path, &printed).unwrap();
    let cfg = Config::from_file(&path).unwrap();
    assert_eq!(cfg.stale_after, Some(Duration::from_secs(90)));
    assert_eq!(cfg.commit_interval, Duration::from_millis(250));
    assert_eq!(cfg.day_retention, Some(Duration::from_secs(800 * 86_400)));
    assert_eq!(
        cfg.ledger_path,
        PathBuf::from("/var/lib/capwatch/ledger.db")
    );
    assert_eq!(cfg.http_listen.port(), 9999);
    assert!(!cfg.per_node_metrics);
    assert_eq!(cfg.max_streams, 12);
    assert_eq!(cfg.log_format, capwatch_common::LogFormat::Json);
    assert_eq!(print_config(&["--config", path_str], &[]), printed);
}

/// Every setting can come from a `CAPWATCH_*` variable (the setting's name
/// upper case; `CAPWATCH_TENANTS` and `CAPWATCH_LEDGER` as before),
/// documented in the README; a bad value names the variable.
#[test]
fn every_setting_has_an_environment_variable() {
    let printed = print_config(
        &[],
        &[
            ("CAPWATCH_HELLO_TIMEOUT", "3s"),
            ("CAPWATCH_MAX_GPUS_PER_NODE", "16"),
            ("CAPWATCH_METRICS_AUTH", "true"),
            ("CAPWATCH_TENANTS", "/etc/capwatch/tenants.toml"),
            ("CAPWATCH_LEDGER", "/var/lib/capwatch/ledger.db"),
        ],
    );
    assert_lines(
        &printed,
        &[
            "hello_timeout = \"3s\"",
            "max_gpus_per_node = 16",
            "metrics_auth = true",
            "tenants_file = \"/etc/capwatch/tenants.toml\"",
            "ledger_path = \"/var/lib/capwatch/ledger.db\"",
        ],
    );

    let out = collector(&["--print-config"], &[("CAPWATCH_MAX_STREAMS", "lots")]);
    assert_bad_env_named(&out, "CAPWATCH_MAX_STREAMS", "lots");

    let vars = Config::env_vars();
    assert!(
        vars.iter()
            .any(|(k, v)| k == "tenants_file" && v == "CAPWATCH_TENANTS")
    );
    assert_readme_documents(&vars);
}

/// A password in `ledger_url` is refused wherever the URL comes from
/// (file, variable, flag), naming `ledger_password_file`, and neither the
/// error nor `--print-config` shows it: the effective config is printed
/// without secrets (the ones it holds are file paths).
#[test]
fn a_password_in_the_ledger_url_is_refused_and_never_printed() {
    const URL: &str = "postgres://capwatch:hunter2-secret@db.example:5432/capwatch";
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("collector.toml");
    std::fs::write(&file, format!("ledger_url = \"{URL}\"\n")).unwrap();
    let file = file.to_str().unwrap();
    // (arguments, environment)
    type Way<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)]);
    let ways: [Way; 3] = [
        (&["--config", file], &[]),
        (&[], &[("CAPWATCH_LEDGER_URL", URL)]),
        (&["--ledger-url", URL], &[]),
    ];
    for (args, env) in ways {
        let out = collector(&[args, &["--print-config"]].concat(), env);
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.status.success(), "{args:?} {env:?}: {text}");
        assert!(!text.contains("hunter2"), "{args:?} {env:?}: {text}");
        assert!(
            text.contains("ledger_url") && text.contains("ledger_password_file"),
            "{args:?} {env:?}: {text}"
        );
    }
}

/// `usage` takes `--ledger`, `--tenants` and `--config` after the
/// subcommand as well as before it.
#[test]
fn usage_takes_ledger_and_tenants_after_the_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let ledger = ledger.to_str().unwrap();
    let tenants = dir.path().join("no-such-tenants.toml");
    let tenants = tenants.to_str().unwrap();
    let period = [
        "--from",
        "2027-01-01T00:00:00Z",
        "--to",
        "2027-01-02T00:00:00Z",
    ];

    let out = collector(
        &[&["usage"], &period[..], &["--ledger", ledger]].concat(),
        &[],
    );
    assert!(!out.status.success());
    assert!(
        stderr(&out).contains(&format!("ledger {ledger} does not exist")),
        "{}",
        stderr(&out)
    );

    let out = collector(
        &[
            &["usage", "--tenants", tenants],
            &period[..],
            &["--ledger", ledger],
        ]
        .concat(),
        &[],
    );
    assert!(!out.status.success());
    let err = stderr(&out);
    assert!(
        err.contains(tenants) && err.contains("No such file"),
        "{err}"
    );
}

/// Plain logs to a pipe (journald, a file, a log shipper) carry no ANSI
/// colour codes.
#[test]
fn logs_have_no_colour_when_stderr_is_not_a_terminal() {
    let dir = tempfile::tempdir().unwrap();
    let init = Command::new(BIN)
        .arg("--ledger")
        .arg(dir.path().join("ledger.db"))
        .arg("init-ledger")
        .output()
        .expect("run init-ledger");
    assert!(init.status.success(), "init-ledger: {init:?}");
    let child = clean_command(BIN)
        .args([
            "--grpc-listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
        ])
        .arg("--ledger")
        .arg(dir.path().join("ledger.db"))
        .env("RUST_LOG", "info")
        .env_remove("NO_COLOR")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the collector");
    assert_no_colour(&stderr_until(child, "collector listening"));
}

/// `usage` on a ledger measures each minute against the contract of the
/// tenant-file version the ledger says was in force at the minute's start,
/// not the `--tenants` file of today. lab-a holds 1.5 kW for four minutes;
/// its contract is lowered from 2 kW to 1 kW two minutes in.
#[test]
fn usage_judges_each_minute_by_the_contract_of_its_time() {
    use capwatch_collector::ledger::{BucketDelta, Commit, Ledger, TenantVersion};
    use std::sync::Arc;
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    const NS: i64 = 1_000_000_000;
    let file = |kw: u32, from: &str| {
        format!("{from}[[tenant]]\nid = \"lab-a\"\ncontracted_kw = {kw}\nnodes = [\"n-*\"]\n")
    };
    let v1 = file(2, "");
    let v2 = file(1, "effective_from = 2027-01-01T00:02:00Z\n");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(&tenants, &v2).unwrap();
    {
        let mut l = Ledger::create(&path).unwrap();
        for (from, text) in [(T0 * NS - 3600 * NS, &v1), (T0 * NS + 120 * NS, &v2)] {
            l.add_tenant_version(&TenantVersion {
                effective_from_ns: from,
                loaded_at_ns: from,
                file: text.clone(),
            })
            .unwrap();
        }
        let mut c = Commit::default();
        for m in 0..4 {
            c.buckets.insert(
                (Arc::from("lab-a"), Arc::from("n-1"), T0 + m * 60),
                BucketDelta {
                    energy_mj: 90_000_000,
                    gpu_ns: 60 * NS as u64,
                    samples: 60,
                    expected_gpu_ns: 60 * NS as u64,
                    ..BucketDelta::default()
                },
            );
        }
        c.tenant_energy.insert(Arc::from("lab-a"), 4 * 90_000_000);
        l.commit_at(&c, T0 + 300, T0).unwrap();
    }
    let usage_text = |to: &str, step: &str, format: &str| -> String {
        let out = collector(
            &[
                "usage",
                "--ledger",
                path.to_str().unwrap(),
                "--tenants",
                tenants.to_str().unwrap(),
                "--tenant",
                "lab-a",
                "--from",
                "2027-01-01T00:00:00Z",
                "--to",
                to,
                "--step",
                step,
                "--format",
                format,
            ],
            &[],
        );
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    let usage = |to: &str, step: &str| -> serde_json::Value {
        serde_json::from_str(&usage_text(to, step, "json")).unwrap()
    };
    let r = usage("2027-01-01T00:04:00Z", "1m");
    let got: Vec<(f64, f64, i64)> = r["rows"]
        .as_array()
        .unwrap()
        .iter()
        .map(|row| {
            (
                row["contracted_power_watts"].as_f64().unwrap(),
                row["seconds_over_contract"].as_f64().unwrap(),
                (row["overage_kwh"].as_f64().unwrap() * 3.6e9).round() as i64,
            )
        })
        .collect();
    assert_eq!(
        got,
        [
            (2000.0, 0.0, 0),
            (2000.0, 0.0, 0),
            (1000.0, 60.0, 30_000_000),
            (1000.0, 60.0, 30_000_000),
        ]
    );
    // A row the change falls in shows the contract in force at its end.
    let r = usage("2027-01-01T01:00:00Z", "1h");
    let row = &r["rows"][0];
    assert_eq!(row["contracted_power_watts"].as_f64(), Some(1000.0));
    assert_eq!(row["seconds_over_contract"].as_f64(), Some(120.0));
    // The whole answer, in each format, as a billing job reads it.
    for (format, snapshot) in [
        ("json", expect_file!["snapshots/usage-contract-change.json"]),
        ("csv", expect_file!["snapshots/usage-contract-change.csv"]),
        ("table", expect_file!["snapshots/usage-contract-change.txt"]),
    ] {
        snapshot.assert_eq(&usage_text("2027-01-01T00:04:00Z", "1m", format));
    }
}

/// `usage --ledger` sets a facility-basis tenant's allocation by the
/// config's meters beside its unmetered node: node m-1 is under meter
/// "row-a", which allocated 90,001 mJ for its 60,000; node u-1 is under
/// none, 40,000 × 1.5. Without the config the allocation stands all the
/// same: it keeps the node energy it replaced.
#[test]
fn usage_of_a_facility_tenant_takes_its_meters_allocation() {
    use capwatch_collector::ledger::{
        BucketDelta, Commit, Ledger, MeterMinute, MeterShare, MeterState,
    };
    use std::sync::Arc;
    const T0: i64 = 1_798_761_600; // 2027-01-01T00:00:00Z
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("ledger.db");
    let tenants = dir.path().join("tenants.toml");
    std::fs::write(
        &tenants,
        "[[tenant]]\nid = \"lab-f\"\ncontracted_kw = 0.0025\nnodes = [\"m-1\", \"u-1\"]\nbasis = \"facility\"\npue = 1.5\n",
    )
    .unwrap();
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"m-*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    {
        let mut l = Ledger::create(&path).unwrap();
        let mut c = Commit::default();
        for (node, mj) in [("m-1", 60_000), ("u-1", 40_000)] {
            c.buckets.insert(
                (Arc::from("lab-f"), Arc::from(node), T0),
                BucketDelta {
                    energy_mj: 1_000,
                    node_energy_mj: mj,
                    node_ns: 60_000_000_000,
                    samples: 1,
                    ..BucketDelta::default()
                },
            );
        }
        l.commit_at(&c, T0 + 70, T0 + 900).unwrap();
        let minute = MeterMinute {
            minute: T0,
            metered_mj: 90_001,
            measured_mj: 60_000,
            unallocated_mj: 0,
            tenants: vec![MeterShare::new("lab-f", 60_000, 90_001, 60_000)],
        };
        let state = MeterState {
            allocated_through: T0 + 60,
            reading_at_ns: (T0 + 60) * 1_000_000_000,
            reading_raw: 0,
            carry_mj: 0,
            revision: 0,
        };
        assert!(l.allocate_meter("row-a", None, &state, &[minute]).unwrap());
    }
    let row = |with_config: bool| -> serde_json::Value {
        let mut args = Vec::new();
        if with_config {
            args.extend(["--config", config.to_str().unwrap()]);
        }
        args.extend([
            "usage",
            "--ledger",
            path.to_str().unwrap(),
            "--tenants",
            tenants.to_str().unwrap(),
            "--tenant",
            "lab-f",
            "--from",
            "2027-01-01T00:00:00Z",
            "--to",
            "2027-01-01T00:01:00Z",
            "--step",
            "1m",
            "--format",
            "json",
        ]);
        let out = collector(&args, &[]);
        assert!(out.status.success(), "{}", stderr(&out));
        let r: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
        r["rows"][0].clone()
    };
    let figures = |r: &serde_json::Value| {
        (
            r["facility_energy_millijoules"]
                .as_str()
                .unwrap()
                .to_string(),
            r["facility_energy_pending"].as_bool().unwrap(),
            r["seconds_over_contract"].as_f64().unwrap(),
            (r["overage_kwh"].as_f64().unwrap() * 3.6e9).round() as u64,
        )
    };
    // 90,001 + 60,000: 1 mJ over 2.5 W × 60 s. Without the meter in the
    // config the allocation stands: it keeps the node energy it replaced.
    assert_eq!(figures(&row(true)), ("150001".to_string(), false, 60.0, 1));
    assert_eq!(figures(&row(false)), ("150001".to_string(), false, 60.0, 1));
}

/// `meters` reads the ledger's meter-minutes (here none) with the
/// config's meters listed, and checks its period like `usage`.
#[test]
fn meters_command_reads_the_ledger() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = dir.path().join("ledger.db");
    let ledger = ledger.to_str().unwrap();
    run_ok(BIN, &["--ledger", ledger, "init-ledger"], &[]);
    let config = dir.path().join("collector.toml");
    std::fs::write(
        &config,
        "[[meter]]\nid = \"row-a\"\nkind = \"modbus\"\nnodes = [\"gpu-*\"]\naddress = \"127.0.0.1:502\"\n",
    )
    .unwrap();
    let config = config.to_str().unwrap();
    let out = run_ok(
        BIN,
        &[
            "--config",
            config,
            "meters",
            "--ledger",
            ledger,
            "--from",
            "2027-01-15T08:00:00Z",
            "--to",
            "2027-01-15T08:30:00Z",
            "--step",
            "15m",
            "--format",
            "csv",
        ],
        &[],
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(
        lines[1].starts_with("row-a,2027-01-15T08:00:00Z,2027-01-15T08:15:00Z,0,0,0,"),
        "{out}"
    );
    let bad = collector(
        &[
            "--ledger",
            ledger,
            "meters",
            "--from",
            "2027-01-15T08:00:01Z",
            "--to",
            "2027-01-15T09:00:00Z",
        ],
        &[],
    );
    assert!(!bad.status.success());
    assert!(stderr(&bad).contains("`from`"), "{}", stderr(&bad));
}

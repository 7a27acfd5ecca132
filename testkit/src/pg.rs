//! A PostgreSQL server of the test's own: a cluster made with `initdb` in
//! a fresh temporary directory, listening on 127.0.0.1 on a free port,
//! started and stopped with `pg_ctl`; and a streaming standby of it
//! (`pg_basebackup -R`) for failover tests.
//!
//! PostgreSQL refuses to run as root: where the tests run as root (CI
//! does), the cluster's directory belongs to `nobody` (65534) and every
//! PostgreSQL program runs as that uid. Trust authentication on loopback:
//! the URL names the user and no password.
//!
//! Missing binaries are not a reason to skip: the tests panic and say to
//! run `scripts/install-test-tools.sh`.

use std::os::unix::fs::MetadataExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The uid (and gid) PostgreSQL runs as when the tests run as root.
const NOBODY: u32 = 65534;

/// The superuser `initdb` makes, and the user of every URL.
pub const USER: &str = "postgres";

/// The database `start` creates, which `url` names.
pub const DATABASE: &str = "capwatch";

/// How long a start, a stop or a promotion may take.
const LIMIT: Duration = Duration::from_secs(60);

/// Where `initdb`, `pg_ctl`, `postgres`, `pg_basebackup` and `psql` are:
/// `pg_config --bindir`, then the highest `/usr/lib/postgresql/*/bin`,
/// then `PATH`.
pub fn bindir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let complete = |d: &Path| {
            ["initdb", "pg_ctl", "postgres", "pg_basebackup", "psql"]
                .iter()
                .all(|b| d.join(b).is_file())
        };
        if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
            && out.status.success()
        {
            let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
            if complete(&d) {
                return d;
            }
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| {
                let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
                Some((v, e.path().join("bin")))
            })
            .filter(|(_, d)| complete(d))
            .collect();
        versions.sort();
        if let Some((_, d)) = versions.pop() {
            return d;
        }
        if let Some(d) = std::env::var_os("PATH")
            .iter()
            .flat_map(std::env::split_paths)
            .find(|d| complete(d))
        {
            return d;
        }
        panic!(
            "PostgreSQL's initdb, pg_ctl, postgres, pg_basebackup and psql were not found \
             (pg_config --bindir, /usr/lib/postgresql/*/bin, PATH): run \
             scripts/install-test-tools.sh, which installs them (CI does)"
        )
    })
}

/// Whether this process runs as root (PostgreSQL then runs as `nobody`).
fn is_root() -> bool {
    std::fs::metadata("/proc/self").is_ok_and(|m| m.uid() == 0)
}

/// A port on 127.0.0.1 nothing listens on now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("binding 127.0.0.1:0")
        .port()
}

/// A PostgreSQL program from `bindir`, as the cluster's owner, with no
/// `PG*` variable of the test's environment.
fn pg_command(program: &str) -> Command {
    let mut cmd = Command::new(bindir().join(program));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("PG") {
            cmd.env_remove(key);
        }
    }
    if is_root() {
        cmd.uid(NOBODY).gid(NOBODY);
    }
    cmd
}

fn run(mut cmd: Command, what: &str) -> Output {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A fresh directory under the system's temporary directory, owned by
/// the uid PostgreSQL runs as.
fn fresh_dir() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    // Short: the unix socket's path must fit in 107 bytes.
    let dir = std::env::temp_dir().join(format!(
        "cw-pg-{}-{}-{nanos:x}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    if is_root() {
        std::os::unix::fs::chown(&dir, Some(NOBODY), Some(NOBODY))
            .unwrap_or_else(|e| panic!("chown {}: {e}", dir.display()));
    }
    dir
}

/// One PostgreSQL server (a primary, or a standby of one): stopped and
/// removed when dropped.
pub struct PgServer {
    dir: PathBuf,
    port: u16,
}

impl PgServer {
    /// A new cluster, started, with the database [`DATABASE`].
    pub fn start() -> Self {
        Self::start_with("")
    }

    /// `start` with `settings` (`postgresql.conf` lines) after the tests'
    /// own, which they override: a benchmark's server sized for its load.
    pub fn start_with(settings: &str) -> Self {
        let dir = fresh_dir();
        let data = dir.join("data");
        let mut init = pg_command("initdb");
        init.arg("-D")
            .arg(&data)
            .args(["-U", USER, "-A", "trust", "-E", "UTF8", "--no-sync"])
            .args(["--locale", "C"]);
        run(init, "initdb");
        let server = Self {
            dir,
            port: free_port(),
        };
        server.configure();
        server.append_settings(settings);
        server.pg_ctl_start();
        server.watch();
        server.create_database(DATABASE);
        server
    }

    /// Stops the server and removes its directory once this process has
    /// exited, however it exits: a server shared by a test binary's tests
    /// lives in a static, which is never dropped, and a test process can
    /// be killed. A shell polls for this process every second.
    fn watch(&self) {
        let _ = Command::new("sh")
            .arg("-c")
            .arg(
                "while kill -0 \"$1\" 2>/dev/null; do sleep 1; done
                 pid=$(head -n 1 \"$2/postmaster.pid\" 2>/dev/null) && kill -QUIT \"$pid\" 2>/dev/null
                 sleep 2; rm -rf \"$3\"",
            )
            .arg("capwatch-test-pg-watch")
            .arg(std::process::id().to_string())
            .arg(self.data())
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn();
    }

    fn data(&self) -> PathBuf {
        self.dir.join("data")
    }

    /// Settings of this server, after those it was made with (the later
    /// line wins in `postgresql.conf`).
    fn configure(&self) {
        use std::io::Write;
        let conf = self.data().join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .unwrap_or_else(|e| panic!("opening {}: {e}", conf.display()));
        // fsync on (a killed server keeps what it committed), the default
        // synchronous_commit; small, so that many servers fit one machine.
        write!(
            f,
            "\n# capwatch tests\nport = {}\nlisten_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{}'\nfsync = on\nwal_level = replica\n\
             max_wal_senders = 5\nhot_standby = on\nmax_connections = 60\n\
             shared_buffers = 16MB\nlogging_collector = off\n",
            self.port,
            self.dir.display()
        )
        .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    }

    fn append_settings(&self, settings: &str) {
        use std::io::Write;
        if settings.is_empty() {
            return;
        }
        let conf = self.data().join("postgresql.conf");
        std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .and_then(|mut f| writeln!(f, "\n{settings}"))
            .unwrap_or_else(|e| panic!("writing {}: {e}", conf.display()));
    }

    /// The directory of the cluster (its data directory is `data` in it,
    /// its log `server.log`).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn pg_ctl_start(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.join("server.log"))
            .args(["-w", "-t", "60", "start"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let out = cmd
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("pg_ctl start: {e}"));
        assert!(
            out.status.success(),
            "pg_ctl start on port {}: {}\n{}\n{}",
            self.port,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            self.log()
        );
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:PORT/capwatch`.
    pub fn url(&self) -> String {
        self.url_for(DATABASE)
    }

    /// The URL of database `db` on this server.
    pub fn url_for(&self, db: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs `sql` with psql against database `db`; its output, unaligned.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        self.try_psql(db, sql)
            .unwrap_or_else(|e| panic!("psql {sql:?}: {e}"))
    }

    /// `psql`, or what it said where it failed (a standby that has not
    /// replayed a table yet, a server that is down).
    pub fn try_psql(&self, db: &str, sql: &str) -> Result<String, String> {
        let port = self.port.to_string();
        let mut cmd = pg_command("psql");
        cmd.args([
            "-X",
            "-q",
            "-A",
            "-t",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            "127.0.0.1",
        ])
        .args(["-p", &port, "-U", USER, "-d", db, "-c", sql])
        .stdin(Stdio::null());
        let out = cmd.output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{}: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }

    /// Creates database `name` (empty); returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.url_for(name)
    }

    /// Stops the server (fast: open connections are ended, nothing is lost).
    pub fn stop(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "-m", "fast", "stop"]);
        run(cmd, "pg_ctl stop");
    }

    /// SIGKILLs the postmaster: a crash. Its backends end on their own
    /// once they see it gone.
    pub fn kill(&self) {
        let pid_file = self.data().join("postmaster.pid");
        let text = std::fs::read_to_string(&pid_file)
            .unwrap_or_else(|e| panic!("reading {}: {e}", pid_file.display()));
        let pid = text.lines().next().unwrap_or_default().trim().to_string();
        let status = Command::new("kill")
            .args(["-KILL", &pid])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -KILL {pid}: {status}");
        // Gone once it no longer answers on its port.
        let deadline = Instant::now() + LIMIT;
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
            assert!(
                Instant::now() < deadline,
                "postmaster {pid} still listening"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Starts the server again, on the same directory and port (after
    /// `stop` or `kill`; a killed one recovers from its WAL).
    pub fn start_again(&self) {
        // After a kill, the old backends hold the shared memory until they
        // have noticed; pg_ctl refuses to start until then.
        let deadline = Instant::now() + LIMIT;
        loop {
            let mut cmd = pg_command("pg_ctl");
            cmd.arg("-D")
                .arg(self.data())
                .arg("-l")
                .arg(self.dir.join("server.log"))
                .args(["-w", "-t", "60", "start"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            let out = cmd.output().expect("running pg_ctl start");
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pg_ctl start again: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A streaming standby of this server: `pg_basebackup -R` into a new
    /// directory, started on its own port. Returns once it is connected.
    pub fn standby(&self) -> PgServer {
        let dir = fresh_dir();
        let standby = PgServer {
            dir,
            port: free_port(),
        };
        let mut cmd = pg_command("pg_basebackup");
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", USER])
            .arg("-D")
            .arg(standby.data())
            .args(["-R", "-X", "stream", "-c", "fast", "--no-sync"]);
        run(cmd, "pg_basebackup");
        standby.configure();
        standby.pg_ctl_start();
        standby.watch();
        let deadline = Instant::now() + LIMIT;
        while self.psql("postgres", "SELECT count(*) FROM pg_stat_replication") == "0" {
            assert!(
                Instant::now() < deadline,
                "the standby on port {} did not attach:\n{}",
                standby.port,
                standby.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        standby
    }

    /// Whether the server is a standby still (in recovery).
    pub fn in_recovery(&self) -> bool {
        self.psql("postgres", "SELECT pg_is_in_recovery()") == "t"
    }

    /// Promotes this standby (`pg_ctl promote`); returns once it takes
    /// writes.
    pub fn promote(&self) {
        let mut cmd = pg_command("pg_ctl");
        cmd.arg("-D")
            .arg(self.data())
            .args(["-w", "-t", "60", "promote"]);
        run(cmd, "pg_ctl promote");
        let deadline = Instant::now() + LIMIT;
        while self.in_recovery() {
            assert!(Instant::now() < deadline, "promotion:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if self.data().join("postmaster.pid").exists() {
            let _ = pg_command("pg_ctl")
                .arg("-D")
                .arg(self.data())
                .args(["-w", "-t", "30", "-m", "immediate", "stop"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A primary takes writes, its standby follows, and once promoted
    /// (the primary killed) the standby takes writes of its own.
    #[test]
    fn a_standby_follows_and_takes_over() {
        let primary = PgServer::start();
        primary.psql(DATABASE, "CREATE TABLE t (x int); INSERT INTO t VALUES (1)");
        let standby = primary.standby();
        assert!(standby.in_recovery());
        let deadline = Instant::now() + LIMIT;
        while standby.psql(
            DATABASE,
            "SELECT count(*) FROM pg_tables WHERE tablename = 't'",
        ) != "1"
        {
            assert!(
                Instant::now() < deadline,
                "the table never reached the standby"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        primary.kill();
        standby.promote();
        standby.psql(DATABASE, "INSERT INTO t VALUES (2)");
        assert_eq!(standby.psql(DATABASE, "SELECT sum(x) FROM t"), "3");
        primary.start_again();
        assert_eq!(primary.psql(DATABASE, "SELECT sum(x) FROM t"), "1");
        primary.stop();
    }
}

//! A real PostgreSQL server (the distribution's packages), started in a temporary
//! directory on loopback with `pg_stat_statements`, as the `postgres` user.

use std::{
    os::unix::{fs::PermissionsExt as _, process::CommandExt as _},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::Duration,
};

use crate::{TempDir, wait_for};

/// The newest installed server's `bin` directory (`/usr/lib/postgresql/N/bin`).
pub fn bin_dir() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed (`./dev setup` installs postgresql and postgresql-contrib)")
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").is_file())
        .collect();
    versions.sort();
    versions.pop().expect("a PostgreSQL server in /usr/lib/postgresql").1
}

/// A running server; stopped (fast shutdown) and removed on drop.
pub struct Postgres {
    pub port: u16,
    server: Child,
    _dir: TempDir,
}

impl Postgres {
    pub fn start() -> Self {
        let bin = bin_dir();
        let user = nix::unistd::User::from_name("postgres").ok().flatten().expect("the postgres user (made by the postgresql package)");
        let dir = TempDir::new();
        std::fs::set_permissions(&dir.0, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = dir.0.join("data");
        std::fs::create_dir(&data).expect("mkdir data");
        nix::unistd::chown(&data, Some(user.uid), Some(user.gid)).expect("chown data");
        let as_postgres = |program: &Path| {
            let mut cmd = Command::new(program);
            cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw()).env("HOME", &data).current_dir(&data);
            cmd
        };
        let init = as_postgres(&bin.join("initdb"))
            .args(["-D"])
            .arg(&data)
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale=C"])
            .output()
            .expect("run initdb");
        assert!(init.status.success(), "initdb failed: {}", String::from_utf8_lossy(&init.stderr));
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let log = std::fs::File::create(dir.0.join("server.log")).expect("log");
        let server = as_postgres(&bin.join("postgres"))
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c"])
            .arg(format!("unix_socket_directories={}", data.display()))
            .args(["-c", "shared_preload_libraries=pg_stat_statements", "-c", "fsync=off", "-c", "synchronous_commit=off"])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start postgres");
        let pg = Self { port, server, _dir: dir };
        wait_for(Duration::from_secs(60), "PostgreSQL to accept connections", || pg.try_psql("SELECT 1").filter(|out| out == "1"));
        pg.psql("CREATE EXTENSION pg_stat_statements");
        pg
    }

    /// The postmaster's pid (its backends are its children).
    pub fn pid(&self) -> u32 {
        self.server.id()
    }

    fn psql_command(&self) -> Command {
        let mut cmd = Command::new(bin_dir().join("psql"));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres", "-d", "postgres", "-AtqX", "-v", "ON_ERROR_STOP=1"]);
        cmd
    }

    fn try_psql(&self, sql: &str) -> Option<String> {
        let out = self.psql_command().args(["-c", sql]).stderr(Stdio::null()).output().ok()?;
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Runs `sql` (one statement) and returns its output rows, `|`-separated.
    pub fn psql(&self, sql: &str) -> String {
        let out = self.psql_command().args(["-c", sql]).output().expect("run psql");
        assert!(out.status.success(), "psql {sql:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Runs every statement in `script`, one query each (psql sends a file's
    /// statements one by one), in one session; a failing statement fails the script
    /// unless `through_errors`.
    pub fn run_script(&self, script: &str, through_errors: bool) {
        let mut cmd = self.psql_command();
        if through_errors {
            cmd.args(["-v", "ON_ERROR_STOP=0"]).stderr(Stdio::null());
        }
        let mut child = cmd.args(["-f", "-"]).stdin(Stdio::piped()).stdout(Stdio::null()).spawn().expect("run psql");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), script.as_bytes()).expect("write the script");
        assert!(child.wait().expect("psql").success(), "the psql script failed");
    }

    /// Calls of the statements `pg_stat_statements` normalised to `query`.
    pub fn calls(&self, query: &str) -> u64 {
        let sql = format!("SELECT coalesce(sum(calls), 0) FROM pg_stat_statements WHERE query = '{}'", query.replace('\'', "''"));
        self.psql(&sql).parse().expect("a count")
    }

    /// Runs a `bin/` program of the server's (e.g. `pgbench`) against it.
    pub fn tool(&self, program: &str) -> Command {
        let mut cmd = Command::new(bin_dir().join(program));
        cmd.args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"]);
        cmd
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGINT: fast shutdown (disconnects clients, then exits).
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.server.id() as i32), nix::sys::signal::Signal::SIGINT);
        let _ = self.server.wait();
    }
}

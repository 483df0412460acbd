//! Throwaway real servers for tests: Redis, a Redis Cluster of masters, and PostgreSQL, each on a
//! free loopback port with its data in a temporary directory, stopped when dropped.
//!
//! Tests never mock a database: they start one of these. `scripts/test` installs `redis-server`,
//! `redis-tools` and `postgresql` when they are missing; nothing here starts Docker or a system
//! service. Every wait is a poll against a deadline.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const START_DEADLINE: Duration = Duration::from_secs(30);

/// A port nothing listens on right now (the OS picks it; a tiny race with other processes remains).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn wait_until(what: &str, mut ready: impl FnMut() -> bool) {
    let deadline = Instant::now() + START_DEADLINE;
    while !ready() {
        assert!(
            Instant::now() < deadline,
            "{what} not ready within {START_DEADLINE:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn port_open(port: u16) -> bool {
    TcpStream::connect(("127.0.0.1", port)).is_ok()
}

/// One `redis-server` process (no persistence).
pub struct RedisServer {
    child: Option<Child>,
    port: u16,
    dir: tempfile::TempDir,
    extra: Vec<String>,
}

/// A free port for a cluster node: a node also listens on its port + 10000 (the cluster bus), so
/// that one must exist (the port at most 55535, or `redis-server` exits) and be free too.
fn free_cluster_port() -> u16 {
    loop {
        let port = free_port();
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}

impl RedisServer {
    pub fn start() -> RedisServer {
        RedisServer::start_on(free_port(), &[])
    }

    /// Starts on `port` with extra `redis-server` arguments (such as `--cluster-enabled yes`).
    fn start_on(port: u16, extra: &[&str]) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port,
            dir: tempfile::tempdir().expect("temp dir"),
            extra: extra.iter().map(|s| s.to_string()).collect(),
        };
        server.resume();
        server
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Sends a command with `redis-cli` and returns what it printed.
    pub fn cli(&self, args: &[&str]) -> String {
        let out = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli (is redis-tools installed?)");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// `url` when given (a benchmark pointed at a Redis of its own), else a throwaway server's URL
    /// and the server, to be kept alive as long as it is used.
    pub fn url_or_start(url: Option<String>) -> (String, Option<RedisServer>) {
        match url {
            Some(url) => (url, None),
            None => {
                let server = RedisServer::start();
                (server.url(), Some(server))
            }
        }
    }

    /// Kills the server (an outage); `resume` starts it again on the same port.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        wait_until("redis port to close", || !port_open(self.port));
    }

    /// Starts the server (again) on its port.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis already running");
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (is redis-server installed?)");
        self.child = Some(child);
        wait_until("redis-server", || self.cli(&["PING"]) == "PONG");
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A Redis Cluster of `n` masters and no replicas, its slots spread evenly.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    pub fn start(n: usize) -> RedisCluster {
        let nodes: Vec<RedisServer> = (0..n)
            .map(|_| {
                let args = ["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"];
                RedisServer::start_on(free_cluster_port(), &args)
            })
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|s| format!("127.0.0.1:{}", s.port))
            .collect();
        let out = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        let cluster = RedisCluster { nodes };
        wait_until("redis cluster state ok", || {
            cluster
                .nodes
                .iter()
                .all(|n| n.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok"))
        });
        cluster
    }

    /// Every node's URL (clients take them as seed nodes).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| n.url()).collect()
    }
}

/// A PostgreSQL server from Debian's packages, in a temporary cluster directory.
///
/// PostgreSQL refuses to run as root: when the tests run as root the cluster is created and run as
/// the `postgres` system user (which the `postgresql` package creates).
pub struct Postgres {
    port: u16,
    dir: tempfile::TempDir,
    bin: PathBuf,
    running: bool,
}

impl Postgres {
    pub fn start() -> Postgres {
        let bin = postgres_bin_dir();
        let dir = tempfile::Builder::new()
            .prefix("fleettracker-pg")
            .tempdir()
            .expect("temp dir");
        let as_root = is_root();
        if as_root {
            chown_postgres(dir.path());
        }
        let data = dir.path().join("data");
        let status = pg_command(&bin, "initdb", as_root)
            .arg("-D")
            .arg(&data)
            .args(["-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("run initdb (is postgresql installed?)");
        assert!(status.success(), "initdb failed");
        let mut pg = Postgres {
            port: free_port(),
            dir,
            bin,
            running: false,
        };
        pg.resume();
        pg
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL for the `postgres` database as the `postgres` superuser (trust auth on loopback).
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// Runs SQL with `psql` and returns its unaligned, tuples-only output.
    pub fn psql(&self, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(["-U", "postgres", "-d", "postgres", "-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Stops the server at once (an outage); `resume` starts it again on the same port.
    pub fn stop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
            self.running = false;
        }
        wait_until("postgres port to close", || !port_open(self.port));
    }

    /// Starts the server (again) on its port.
    pub fn resume(&mut self) {
        let options = format!(
            "-p {} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} -c fsync=off \
             -c synchronous_commit=off -c full_page_writes=off -c max_connections=50",
            self.port,
            self.dir.path().display()
        );
        let ok = self.pg_ctl(&["start", "-w", "-t", "30", "-o", &options]);
        assert!(ok, "pg_ctl start failed");
        self.running = true;
        let port = self.port;
        wait_until("postgres", || {
            port_open(port)
                && Command::new(self.bin.join("pg_isready"))
                    .args(["-h", "127.0.0.1", "-p", &port.to_string()])
                    .stdout(Stdio::null())
                    .status()
                    .map(|s| s.success())
                    .unwrap_or(false)
        });
    }

    fn pg_ctl(&self, args: &[&str]) -> bool {
        pg_command(&self.bin, "pg_ctl", is_root())
            .arg("-D")
            .arg(self.dir.path().join("data"))
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .map(|s| s.success())
            .unwrap_or(false)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if self.running {
            let _ = self.pg_ctl(&["stop", "-m", "immediate", "-w"]);
        }
    }
}

/// Where PostgreSQL's server programs are: `pg_config --bindir`, else the newest
/// `/usr/lib/postgresql/<version>/bin`.
fn postgres_bin_dir() -> PathBuf {
    let mut versions: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
        .unwrap_or_default();
    versions.sort_by_key(|p| {
        p.file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.parse::<u32>().ok())
            .unwrap_or(0)
    });
    if let Some(newest) = versions.last() {
        return newest.join("bin");
    }
    let out = Command::new("pg_config")
        .arg("--bindir")
        .output()
        .expect("PostgreSQL server programs not found (install postgresql)");
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn chown_postgres(dir: &Path) {
    let status = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(dir)
        .status()
        .expect("chown");
    assert!(
        status.success(),
        "chown postgres failed (does the postgres user exist?)"
    );
}

/// A PostgreSQL program, run as the `postgres` user when we are root.
fn pg_command(bin: &Path, program: &str, as_root: bool) -> Command {
    if as_root {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"]).arg(bin.join(program));
        cmd
    } else {
        Command::new(bin.join(program))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_starts_stops_and_resumes() {
        let mut r = RedisServer::start();
        assert_eq!(r.cli(&["SET", "k", "v"]), "OK");
        r.stop();
        r.resume();
        assert_eq!(r.cli(&["PING"]), "PONG");
    }

    #[test]
    fn cluster_of_three_masters_is_ok() {
        let c = RedisCluster::start(3);
        assert!(c.nodes[0]
            .cli(&["CLUSTER", "INFO"])
            .contains("cluster_size:3"));
    }

    #[test]
    fn postgres_starts_stops_and_resumes() {
        let mut pg = Postgres::start();
        assert_eq!(pg.psql("select 1+1"), "2");
        pg.stop();
        pg.resume();
        assert_eq!(pg.psql("select 2+2"), "4");
    }
}

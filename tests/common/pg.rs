//! A real PostgreSQL server for cluster tests: `initdb` into a temp dir and
//! `pg_ctl start` on a free loopback port. Running as root, the server runs
//! as the `postgres` user (initdb refuses root), in a directory it owns.
//! Dropping the handle stops the server.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// A running PostgreSQL server.
pub struct PgServer {
    bin: PathBuf,
    dir: tempfile::TempDir,
    as_postgres: bool,
    /// Serves TCP clients over TLS only (`hostssl` rules); the test's own
    /// connections use the Unix socket.
    tls: bool,
    /// The port it listens on (127.0.0.1).
    pub port: u16,
}

/// The directory of `initdb` and `pg_ctl`: Debian's versioned directories
/// first (newest), then `pg_config --bindir`, then `PATH`.
fn bin_dir() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let v = e.file_name().to_str()?.parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return Some(dir);
        }
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|d| d.join("initdb").exists() && d.join("pg_ctl").exists())
    })
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

impl PgServer {
    /// Starts a server, or returns `None` (after printing why) when no
    /// PostgreSQL binaries are installed.
    pub fn start() -> Option<PgServer> {
        Self::start_inner(None)
    }

    /// Starts a server with `ssl=on`, the certificate and key given (PEM),
    /// and rules that refuse every TCP connection not made over TLS.
    pub fn start_tls(cert_pem: &str, key_pem: &str) -> Option<PgServer> {
        Self::start_inner(Some((cert_pem, key_pem)))
    }

    fn start_inner(tls: Option<(&str, &str)>) -> Option<PgServer> {
        let Some(bin) = bin_dir() else {
            // CI installs PostgreSQL and sets this, so it never skips.
            assert!(
                std::env::var_os("LARDER_TEST_REQUIRE_POSTGRES").is_none(),
                "LARDER_TEST_REQUIRE_POSTGRES is set but no PostgreSQL binaries were found"
            );
            eprintln!("SKIPPED: no PostgreSQL binaries (initdb, pg_ctl) found; install Debian's postgresql package");
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let as_postgres = is_root();
        if as_postgres {
            let ok = Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .status()
                .expect("chown")
                .success();
            assert!(ok, "chown of the PostgreSQL temp dir failed");
        }
        let data = dir.path().join("data");
        let server = PgServer {
            bin,
            dir,
            as_postgres,
            tls: tls.is_some(),
            port: free_port(),
        };
        server.run(
            "initdb",
            &[
                "-D",
                path_str(&data),
                "-A",
                "trust",
                "-U",
                "larder",
                "--no-sync",
                "-E",
                "UTF8",
            ],
        );
        if let Some((cert, key)) = tls {
            std::fs::write(data.join("server.crt"), cert).expect("write server.crt");
            std::fs::write(data.join("server.key"), key).expect("write server.key");
            // Unix-socket connections for the test itself; TCP only over
            // TLS, so a plain TCP connection is refused.
            std::fs::write(
                data.join("pg_hba.conf"),
                "local all all trust\nhostssl all all 127.0.0.1/32 trust\n",
            )
            .expect("write pg_hba.conf");
            let key = data.join("server.key");
            let mut perms = std::fs::metadata(&key).expect("key").permissions();
            std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o600);
            std::fs::set_permissions(&key, perms).expect("chmod server.key");
            if server.as_postgres {
                let ok = Command::new("chown")
                    .args(["-R", "postgres:postgres"])
                    .arg(&data)
                    .status()
                    .expect("chown")
                    .success();
                assert!(ok, "chown of the PostgreSQL data dir failed");
            }
        }
        server.pg_ctl_start();
        Some(server)
    }

    fn run(&self, tool: &str, args: &[&str]) {
        let exe = self.bin.join(tool);
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let out = cmd
            .args(args)
            .current_dir(self.dir.path())
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {tool}: {e}"));
        assert!(
            out.status.success(),
            "{tool} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn pg_ctl_start(&self) {
        let data = self.dir.path().join("data");
        let log = self.dir.path().join("log");
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off \
             -c full_page_writes=off -c max_connections=300{}",
            self.port,
            path_str(self.dir.path()),
            if self.tls { " -c ssl=on" } else { "" }
        );
        self.run(
            "pg_ctl",
            &[
                "-D",
                path_str(&data),
                "-l",
                path_str(&log),
                "-o",
                &opts,
                "-w",
                "-t",
                "60",
                "start",
            ],
        );
    }

    /// A connection URL for `database` (created by [`PgServer::create_db`]).
    pub fn url(&self, database: &str) -> String {
        format!("postgres://larder@127.0.0.1:{}/{database}", self.port)
    }

    /// Creates a database and returns its URL.
    pub async fn create_db(&self, name: &str) -> String {
        let client = self.client("postgres").await;
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .expect("create database");
        self.url(name)
    }

    /// A client of `database`.
    pub async fn client(&self, database: &str) -> tokio_postgres::Client {
        let url = if self.tls {
            format!(
                "host={} port={} user=larder dbname={database}",
                path_str(self.dir.path()),
                self.port
            )
        } else {
            self.url(database)
        };
        let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect to the test PostgreSQL");
        tokio::spawn(conn);
        client
    }

    /// Stops the server at once (like a crash of the database host's
    /// process; committed data stays).
    pub fn stop(&self) {
        let data = self.dir.path().join("data");
        self.run(
            "pg_ctl",
            &["-D", path_str(&data), "-m", "immediate", "-w", "stop"],
        );
    }

    /// Starts it again on the same port and data.
    pub fn restart(&self) {
        self.pg_ctl_start();
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        let data = self.dir.path().join("data");
        let exe = self.bin.join("pg_ctl");
        let mut cmd = if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(&exe);
            c
        } else {
            Command::new(&exe)
        };
        let _ = cmd
            .args(["-D", path_str(&data), "-m", "immediate", "-w", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

//! Cluster rows: larder's cluster tables measured against what they are
//! made of.
//!
//! - A cluster GET answered from the hot copy against a local GET on the
//!   same node.
//! - A cluster PUT and a cluster counter against the very statements larder
//!   issues for them (`larder::cluster::sql`), sent straight to PostgreSQL
//!   with the same client (tokio-postgres through a deadpool pool of the
//!   same size) from as many tasks as wrk has connections: what is left is
//!   larder's own cost.
//! - Staleness: from a PUT acknowledged by node A until a plain GET on
//!   node B returns it, idle and while node A takes PUT load.
//!
//! PostgreSQL is started by the run itself (`initdb` and `pg_ctl` from
//! Debian's `postgresql` package, as the `postgres` user when run as root),
//! with its default durability, on a free port; without its binaries the
//! rows are skipped with a printed reason.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use larder::cluster::sql;
use serde::Serialize;
use tokio_postgres::NoTls;

use crate::pair::PairRow;
use crate::procs::{self, fail, http};
use crate::wrk::{self, Workload};
use crate::{create, fill, fill_with, key, slug, value100, Options};

/// The pool size larder uses by default (`--cluster-pool-size`), given to
/// the direct baseline too.
const POOL_SIZE: usize = 32;

/// Staleness samples of one condition, milliseconds.
#[derive(Debug, Serialize)]
pub struct Staleness {
    pub condition: String,
    pub samples: usize,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Everything the cluster rows measured.
#[derive(Debug, Serialize)]
pub struct ClusterReport {
    pub rows: Vec<PairRow>,
    pub staleness: Vec<Staleness>,
}

/// The staleness target at p99 under load, milliseconds.
pub const STALENESS_TARGET_MS: f64 = 50.0;

/// A PostgreSQL server of the run's own; stopped when dropped.
pub struct Postgres {
    bin: PathBuf,
    data: PathBuf,
    as_postgres: bool,
    pub url: String,
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(&self.data)
            .args(["-m", "immediate", "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}

impl Postgres {
    /// A PostgreSQL tool, run as the `postgres` user when we are root
    /// (`initdb` refuses to run as root).
    fn command(&self, tool: &str) -> Command {
        let path = self.bin.join(tool);
        if self.as_postgres {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(path);
            c
        } else {
            Command::new(path)
        }
    }

    /// Starts a fresh server under `dir`, or says why it cannot.
    pub fn start(dir: &Path) -> Result<Postgres, String> {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|_| "no PostgreSQL binaries under /usr/lib/postgresql".to_owned())?
            .filter_map(|e| e.ok().map(|e| e.path().join("bin")))
            .filter(|b| b.join("initdb").exists())
            .max()
            .ok_or("no initdb under /usr/lib/postgresql/*/bin")?;
        let root = dir.join("postgres");
        std::fs::create_dir_all(&root).map_err(|e| e.to_string())?;
        // Root or not: the effective uid, from /proc.
        let as_postgres = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("Uid:"))
                    .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
            })
            .unwrap_or(false);
        if as_postgres {
            let owned = Command::new("chown")
                .args(["-R", "postgres"])
                .arg(&root)
                .status()
                .is_ok_and(|s| s.success());
            if !owned {
                return Err("cannot give the data directory to the postgres user".into());
            }
        }
        let port = procs::free_port();
        let pg = Postgres {
            bin,
            data: root.join("data"),
            as_postgres,
            url: format!("postgres://larder@127.0.0.1:{port}/postgres"),
        };
        let ok = |c: &mut Command| {
            c.stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if !ok(pg
            .command("initdb")
            .arg("-D")
            .arg(&pg.data)
            .args(["-A", "trust", "-U", "larder", "-N"]))
        {
            return Err("initdb failed".into());
        }
        let options = format!("-p {port} -k {} -c max_connections=300", root.display());
        if !ok(pg
            .command("pg_ctl")
            .arg("-D")
            .arg(&pg.data)
            .args(["-o", &options, "-l"])
            .arg(root.join("log"))
            .args(["-w", "start"]))
        {
            return Err("pg_ctl start failed".into());
        }
        Ok(pg)
    }
}

/// Runs the cluster rows, or says on stderr why they cannot run.
pub fn run(opts: &Options, server: &Path, dir: &Path, scripts: &Path) -> Option<ClusterReport> {
    let pg = match Postgres::start(dir) {
        Ok(pg) => pg,
        Err(why) => {
            eprintln!("no cluster rows: {why}");
            return None;
        }
    };
    let with_cluster = ["--cluster-url", pg.url.as_str()];
    let a = procs::start_larder(server, &dir.join("cluster-a"), &with_cluster);
    let b = procs::start_larder(server, &dir.join("cluster-b"), &with_cluster);
    for (name, persistence) in [
        ("local", "none"),
        ("cget", "cluster"),
        ("cput", "cluster"),
        ("ccount", "cluster"),
    ] {
        create(
            a.addr,
            serde_json::json!({"name": name, "persistence": persistence, "access": "public"}),
        );
    }
    fill(a.addr, "local", opts.keys);
    fill(a.addr, "cget", opts.keys);
    fill(a.addr, "cput", opts.keys);
    // Counters `c0..cN` at 0, so that every counter's row exists.
    fill_with(a.addr, "ccount", opts.keys, |i| {
        format!("{{\"key\":\"c{i}\",\"value\":0}}")
    });

    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| fail(&format!("runtime: {e}")));
    let pool = rt.block_on(pool(&pg.url));
    let ids = rt.block_on(table_ids(&pool, &["cput", "ccount"]));

    let (c, d) = (opts.connections, opts.duration);
    let chosen = |name: &str| opts.only.as_deref().is_none_or(|o| name.contains(o));
    let mut rows = Vec::new();

    let name = "cluster GET hit (hot copy) vs local GET";
    if chosen(name) {
        let local = Workload::new("GET", "/v1/tables/local/entries/%K", None, opts.keys)
            .save(scripts, "cluster-local-get");
        let hot = Workload::new("GET", "/v1/tables/cget/entries/%K", None, opts.keys)
            .save(scripts, "cluster-get");
        // One pass first, so every key is in the hot copy.
        let _ = wrk::run(a.addr, Some(&hot), "/", c, Duration::from_secs(1));
        let mut row = PairRow::new(name, "local GET", 0.80);
        row.alternate(
            opts.rounds,
            || wrk::run(a.addr, Some(&local), "/", c, d).rps,
            || (wrk::run(a.addr, Some(&hot), "/", c, d), 1.0),
        );
        rows.push(row);
    }

    let v = value100();
    for (name, path, body, statement) in [
        (
            "cluster PUT vs the same statements direct",
            "/v1/tables/cput/entries/%K",
            v.as_str(),
            Direct::Put(ids[0]),
        ),
        (
            "cluster counter vs the same statements direct",
            "/v1/tables/ccount/entries/%C/counter",
            "{\"default\":0}",
            Direct::Counter(ids[1]),
        ),
    ] {
        if !chosen(name) {
            continue;
        }
        let method = if path.ends_with("counter") {
            "POST"
        } else {
            "PUT"
        };
        let script = Workload::new(method, path, Some(body), opts.keys).save(scripts, &slug(name));
        let mut row = PairRow::new(name, "tokio-postgres direct", 0.60);
        row.alternate(
            opts.rounds,
            || rt.block_on(direct_load(&pool, statement, opts.keys, c, d)),
            || (wrk::run(a.addr, Some(&script), "/", c, d), 1.0),
        );
        rows.push(row);
    }

    let mut staleness = Vec::new();
    if chosen("staleness") {
        eprintln!("staleness, idle…");
        staleness.push(measure_staleness(a.addr, b.addr, "idle", 300, None));
        let put = Workload::new("PUT", "/v1/tables/cput/entries/%K", Some(&v), opts.keys)
            .save(scripts, "cluster-staleness-load");
        eprintln!("staleness, node A under PUT load…");
        staleness.push(measure_staleness(
            a.addr,
            b.addr,
            "node A under wrk PUT load",
            300,
            Some((&put, c, (d * 2).max(Duration::from_secs(3)))),
        ));
    }
    drop((a, b));
    drop(pg);
    Some(ClusterReport { rows, staleness })
}

async fn pool(url: &str) -> Pool {
    let config: tokio_postgres::Config = url
        .parse()
        .unwrap_or_else(|e| fail(&format!("database url: {e}")));
    let manager = Manager::from_config(
        config,
        NoTls,
        ManagerConfig {
            recycling_method: RecyclingMethod::Fast,
        },
    );
    Pool::builder(manager)
        .max_size(POOL_SIZE)
        .runtime(Runtime::Tokio1)
        .build()
        .unwrap_or_else(|e| fail(&format!("pool: {e}")))
}

async fn table_ids(pool: &Pool, names: &[&str]) -> Vec<i64> {
    let client = pool
        .get()
        .await
        .unwrap_or_else(|e| fail(&format!("database: {e}")));
    let mut ids = Vec::new();
    for name in names {
        let row = client
            .query_one("SELECT id FROM larder_tables WHERE name = $1", &[name])
            .await
            .unwrap_or_else(|e| fail(&format!("table id of {name}: {e}")));
        ids.push(row.get(0));
    }
    ids
}

/// A write issued straight to PostgreSQL, on a table id.
#[derive(Debug, Clone, Copy)]
enum Direct {
    /// Replace a 100-byte value, as a PUT of an existing key does.
    Put(i64),
    /// Add one to a counter, as `update_counter` of an existing key does.
    Counter(i64),
}

/// Runs `statement` from `tasks` tasks for `duration` and returns
/// transactions per second.
async fn direct_load(
    pool: &Pool,
    statement: Direct,
    keys: usize,
    tasks: usize,
    duration: Duration,
) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut handles = Vec::new();
    for t in 0..tasks {
        let (pool, done, stop) = (pool.clone(), done.clone(), stop.clone());
        handles.push(tokio::spawn(async move {
            let mut rng = 0x2545_f491_4f6c_dd1du64 ^ (t as u64 + 1);
            while !stop.load(Ordering::Relaxed) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let i = (rng % keys as u64) as usize;
                if let Err(e) = direct_once(&pool, statement, i).await {
                    fail(&format!("direct statement: {e}"));
                }
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    for h in handles {
        let _ = h.await;
    }
    done.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

/// One transaction of the statements larder issues for the write.
async fn direct_once(
    pool: &Pool,
    statement: Direct,
    i: usize,
) -> Result<(), Box<dyn std::error::Error>> {
    let mut client = pool.get().await?;
    let (id, key) = match statement {
        Direct::Put(id) => (id, key(i)),
        Direct::Counter(id) => (id, format!("c{i}")),
    };
    let lock = client.prepare_cached(sql::LOCK_ROW).await?;
    let update = client.prepare_cached(sql::UPDATE_ROW).await?;
    let tx = client.transaction().await?;
    let row = tx.query_one(&lock, &[&id, &key]).await?;
    let objects = match statement {
        Direct::Put(_) => value100(),
        Direct::Counter(_) => {
            let current: String = row.get(0);
            (current.parse::<i64>()? + 1).to_string()
        }
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let (one, none, zero, change) = (1i32, 0i64, 0i64, 1i64);
    tx.query_one(
        &update,
        &[
            &id,
            &key,
            &objects,
            &one,
            &none,
            &now,
            &sql::shard_of(&key),
            &zero,
            &change,
            &zero,
            &zero,
            &sql::EVENT_PUT,
            &Some(objects.as_str()),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

/// Samples how long after a PUT acknowledged by `a` a plain GET on `b`
/// returns it, up to `samples` times; with `load`, wrk drives PUTs into
/// `a` for `load_for` meanwhile, and sampling stops when it does.
fn measure_staleness(
    a: SocketAddr,
    b: SocketAddr,
    condition: &str,
    samples: usize,
    load: Option<(&Path, usize, Duration)>,
) -> Staleness {
    let loader = load.map(|(script, c, load_for)| {
        let script = script.to_owned();
        std::thread::spawn(move || wrk::run(a, Some(&script), "/", c, load_for))
    });
    if loader.is_some() {
        // Let the load reach its pace before the first sample.
        std::thread::sleep(Duration::from_millis(500));
    }
    let mut ms = Vec::with_capacity(samples);
    for i in 0..samples {
        if loader.as_ref().is_some_and(|l| l.is_finished()) {
            break;
        }
        let body = format!("{{\"sample\":{i}}}");
        let (status, _) = http(
            a,
            "PUT",
            "/v1/tables/cget/entries/staleness",
            body.as_bytes(),
        );
        if status / 100 != 2 {
            fail(&format!("staleness PUT answered {status}"));
        }
        let acked = Instant::now();
        loop {
            let (status, got) = http(b, "GET", "/v1/tables/cget/entries/staleness", b"");
            let seen = status == 200
                && serde_json::from_slice::<serde_json::Value>(&got)
                    .is_ok_and(|v| v["value"]["sample"] == i);
            if seen {
                ms.push(acked.elapsed().as_secs_f64() * 1e3);
                break;
            }
            if acked.elapsed() > Duration::from_secs(10) {
                fail("node B never saw node A's write");
            }
        }
    }
    if let Some(l) = loader {
        let _ = l.join();
    }
    if ms.is_empty() {
        fail("no staleness sample was taken");
    }
    ms.sort_by(f64::total_cmp);
    let at = |q: f64| ms[((ms.len() as f64 - 1.0) * q).round() as usize];
    Staleness {
        condition: condition.to_owned(),
        samples: ms.len(),
        p50_ms: at(0.50),
        p99_ms: at(0.99),
        max_ms: at(1.0),
    }
}

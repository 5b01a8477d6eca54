//! The real `larder` binary as a child process, for crash and signal tests.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A running `larder` process.
pub struct ChildServer {
    pub child: Child,
    pub base: String,
    pub logs: Arc<Mutex<Vec<String>>>,
}

impl ChildServer {
    /// Starts the binary on `data_dir` at a free loopback port and waits
    /// until it is ready.
    pub async fn start(data_dir: &Path) -> ChildServer {
        Self::start_with(data_dir, &[]).await
    }

    /// Like [`ChildServer::start`], with extra environment variables.
    pub async fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> ChildServer {
        Self::start_under(data_dir, env, &[]).await
    }

    /// Like [`ChildServer::start_with`], with the server run by `wrapper`
    /// (for example `strace -f -o FILE`); `child` is then the wrapper.
    pub async fn start_under(
        data_dir: &Path,
        env: &[(&str, &str)],
        wrapper: &[&str],
    ) -> ChildServer {
        let server = Self::launch(data_dir, env, wrapper);
        super::wait_ready_at(&reqwest::Client::new(), &server.base).await;
        server
    }

    /// Starts the binary like [`ChildServer::start_under`] and returns once
    /// it has bound its address, without waiting until it is ready (for a
    /// server that a plain client cannot ask, such as an HTTPS one).
    pub fn launch(data_dir: &Path, env: &[(&str, &str)], wrapper: &[&str]) -> ChildServer {
        let server = env!("CARGO_BIN_EXE_larder");
        let (program, prefix) = match wrapper.split_first() {
            Some((first, rest)) => (*first, [rest, &[server]].concat()),
            None => (server, Vec::new()),
        };
        let mut child = Command::new(program)
            .args(prefix)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--log-format",
                "json",
                "--data-dir",
            ])
            .arg(data_dir)
            .env_clear()
            .envs(clean_env())
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("larder starts");
        let stdout = child.stdout.take().expect("stdout");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel::<String>();
        let sink = logs.clone();
        // Keeps draining the pipe for the child's whole life, so logging
        // never blocks the server.
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line) {
                    if v["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("larder listening"))
                    {
                        if let Some(addr) = v["addr"].as_str() {
                            let _ = tx.send(addr.to_owned());
                        }
                    }
                }
                sink.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(30))
            .expect("the child logs its address");
        ChildServer {
            child,
            base: format!("http://{addr}"),
            logs,
        }
    }

    pub fn entry_url(&self, table: &str, key: &str) -> String {
        format!(
            "{}/v1/tables/{}/entries/{}",
            self.base,
            super::enc(table),
            super::enc(key)
        )
    }

    /// SIGKILL: the process dies at once, with no chance to write anything.
    pub fn kill9(&mut self) {
        self.child.kill().expect("SIGKILL sent");
        self.child.wait().expect("child reaped");
    }

    /// SIGTERM, then waits for the process to exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success());
        self.child.wait().expect("child exits")
    }

    pub fn log_text(&self) -> String {
        self.logs.lock().unwrap().join("\n")
    }
}

/// The test process's environment without any `LARDER_*` variable, so a
/// variable set in the shell cannot change what a child server runs with.
pub fn clean_env() -> impl Iterator<Item = (String, String)> {
    std::env::vars().filter(|(k, _)| !k.starts_with("LARDER_"))
}

impl Drop for ChildServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ChildServer {
    /// Sends `signal` (a name `kill` knows, such as `HUP`) to the server.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("kill runs");
        assert!(status.success(), "kill -{signal}");
    }
}

//! The operator binary run as a separate process against a test cluster, as it runs for real:
//! its own kubeconfig, its own logs (captured to a file so tests can scan them for secrets),
//! killable with SIGKILL and restartable. Every process started here is watched by the test
//! binary's secret-leak scan ([`crate::leak_scan`]): its log and its metrics.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vaultconn_local_cluster::process::spawn_dies_with_parent;

pub struct OperatorOptions {
    /// The `vaultconn` binary (tests: `env!("CARGO_BIN_EXE_vaultconn")`).
    pub binary: PathBuf,
    pub kubeconfig: PathBuf,
    /// Where stdout+stderr go (appended across restarts).
    pub log_path: PathBuf,
    pub extra_args: Vec<String>,
    /// `RUST_LOG` for the operator.
    pub log_filter: String,
}

pub struct OperatorProcess {
    opts: OperatorOptions,
    child: Option<Child>,
    metrics_port: u16,
    starts: u32,
    /// This process's entry in the leak scan.
    scan_id: usize,
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl OperatorProcess {
    /// Start the operator and wait until its metrics endpoint answers.
    pub async fn start(opts: OperatorOptions) -> std::io::Result<Self> {
        let metrics_port = free_port()?;
        let scan_id = crate::leak_scan::watch_operator(&opts.log_path, metrics_port);
        let mut op = OperatorProcess {
            opts,
            child: None,
            metrics_port,
            starts: 0,
            scan_id,
        };
        op.spawn().await?;
        Ok(op)
    }

    async fn spawn(&mut self) -> std::io::Result<()> {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.opts.log_path)?;
        let mut cmd = Command::new(&self.opts.binary);
        cmd.arg("run")
            .arg("--metrics-addr")
            .arg(format!("127.0.0.1:{}", self.metrics_port))
            .args(&self.opts.extra_args)
            .env("KUBECONFIG", &self.opts.kubeconfig)
            .env("RUST_LOG", &self.opts.log_filter)
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        self.child = Some(spawn_dies_with_parent(cmd)?);
        self.starts += 1;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if self.metrics().await.is_some() {
                return Ok(());
            }
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                return Err(std::io::Error::other(format!(
                    "operator exited during start-up with {status}; see {}",
                    self.opts.log_path.display()
                )));
            }
            if Instant::now() > deadline {
                return Err(std::io::Error::other(
                    "operator did not become ready in 30s",
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The exit status if the process has exited by itself (None while it runs).
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// GET one of the operator's own endpoints (`/readyz`, `/healthz`): its HTTP status.
    pub async fn probe(&self, path: &str) -> Option<u16> {
        let client = reqwest::Client::builder().no_proxy().build().ok()?;
        let url = format!("http://127.0.0.1:{}{path}", self.metrics_port);
        Some(client.get(url).send().await.ok()?.status().as_u16())
    }

    pub fn starts(&self) -> u32 {
        self.starts
    }

    pub fn log_path(&self) -> &Path {
        &self.opts.log_path
    }

    /// Everything the operator has logged so far.
    ///
    /// # Panics
    /// If the log cannot be read or is empty: the operator logs at start-up, so either means the
    /// capture is broken, and a check for secrets in it would pass for nothing.
    pub fn logs(&self) -> String {
        match std::fs::read_to_string(&self.opts.log_path) {
            Ok(text) if !text.is_empty() => text,
            Ok(_) => panic!(
                "the operator log {} is empty: the capture is broken",
                self.opts.log_path.display()
            ),
            Err(e) => panic!(
                "cannot read the operator log {}: {e}",
                self.opts.log_path.display()
            ),
        }
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.metrics_port)
    }

    /// The operator's /metrics text, or None if it does not answer.
    pub async fn metrics(&self) -> Option<String> {
        let text = fetch_metrics(&self.metrics_url()).await?;
        crate::leak_scan::record_metrics(self.scan_id, &text);
        Some(text)
    }

    /// The value of an unlabelled counter/gauge (OpenMetrics `name` or `name_total`).
    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = self.metrics().await?;
        parse_metric(&text, name)
    }

    /// SIGKILL: no chance to flush anything (crash tests).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait for a clean exit (SIGKILL after `timeout`). Returns true on a clean exit.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        let Some(mut c) = self.child.take() else {
            return true;
        };
        // The last look at the metrics for the leak scan (it runs after the process is gone).
        if let Some(text) = crate::leak_scan::scrape_blocking(self.metrics_port) {
            crate::leak_scan::record_metrics(self.scan_id, &text);
        }
        if let Ok(pid) = libc::pid_t::try_from(c.id()) {
            // SAFETY: plain kill(2) on our own child.
            unsafe {
                libc::kill(pid, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + timeout;
        loop {
            match c.try_wait() {
                Ok(Some(status)) => return status.success(),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(20))
                }
                _ => {
                    let _ = c.kill();
                    let _ = c.wait();
                    return false;
                }
            }
        }
    }

    pub async fn restart(&mut self) -> std::io::Result<()> {
        self.kill();
        self.spawn().await
    }

    /// Start again after `kill`/`stop`.
    pub async fn start_again(&mut self) -> std::io::Result<()> {
        if self.child.is_none() {
            self.spawn().await?;
        }
        Ok(())
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// GET a /metrics URL; None if it does not answer.
pub async fn fetch_metrics(url: &str) -> Option<String> {
    let client = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    let resp = client.get(url).send().await.ok()?;
    resp.text().await.ok()
}

/// Value of the sample `name` (or `name_total`) without labels in OpenMetrics text.
pub fn parse_metric(text: &str, name: &str) -> Option<f64> {
    let total = format!("{name}_total");
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name || key == total).then(|| value.trim().parse().ok())?
    })
}

//! A real, throw-away Kubernetes control plane on loopback: etcd + kube-apiserver +
//! kube-controller-manager, the same binaries envtest uses (see `scripts/provision-control-plane.sh`).
//!
//! ```no_run
//! # async fn demo() -> Result<(), vaultconn_local_cluster::control_plane::ControlPlaneError> {
//! use vaultconn_local_cluster::control_plane::{ControlPlane, ControlPlaneOptions};
//! let cp = ControlPlane::start(ControlPlaneOptions::default()).await?;
//! let client = cp.client().await;
//! # let _ = client; Ok(()) }
//! ```
//!
//! # Teardown, including when nothing gets to run `Drop`
//!
//! Test binaries keep their control plane in a `static`, which is never dropped, and a test run
//! can be interrupted or SIGKILLed. Three independent mechanisms make sure no server process or
//! temp dir outlives the process that started them:
//!
//! 1. Every server is spawned with `prctl(PR_SET_PDEATHSIG, SIGKILL)`, so the kernel kills it when
//!    its parent goes. The kernel ties that signal to the *thread* that forked the child, not the
//!    process, so all spawns go through one dedicated `std::thread` that never exits; spawning
//!    from a tokio worker or a test thread would kill the servers when that thread ends.
//! 2. A watchdog (`sh`) is started first, as the leader of a fresh process group that all the
//!    servers join. Its stdin is a pipe whose only writer end lives in this process, so it sees
//!    EOF exactly when this process dies (or [`ControlPlane::stop`] closes it) — no polling of
//!    pids that could be reused. On EOF it TERMs its group, waits briefly, `rm -rf`s the temp
//!    dir and KILLs what is left. Because the watchdog leads the group for as long as it lives,
//!    the group id cannot be recycled for unrelated processes while it acts.
//! 3. On a normal exit (libtest ends with `exit()`, which never drops statics) an `atexit` hook
//!    SIGKILLs and reaps the servers of every control plane not yet stopped and removes its temp
//!    dir. Without it the servers would still die (1.), but as orphans, and an init that reaps
//!    lazily (as on the test VMs) leaves `<defunct>` entries behind for a while.
//!
//! [`ControlPlane::stop`] (also run by `Drop`) does the orderly version itself: SIGTERM, wait,
//! SIGKILL after [`ControlPlaneOptions::stop_timeout`], then releases the watchdog and removes the
//! temp dir.
use std::fs::{self, File};
use std::io::{self, Read, Seek, SeekFrom};
use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, Once};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use rand::Rng;
use tempfile::TempDir;

/// Field manager used for everything the testkit applies.
pub const FIELD_MANAGER: &str = "vaultconn-testkit";

const POLL: Duration = Duration::from_millis(50);
/// How long `stop_apiserver`/`stop_etcd` wait after SIGTERM before SIGKILL.
const RESTART_STOP_GRACE: Duration = Duration::from_secs(3);
/// Where the binaries are built and cached when no folder is given (see `locate`).
const PROVISION_SCRIPT_ENV: &str = "VAULTCONN_PROVISION_SCRIPT";
/// The folder `scripts/provision-control-plane.sh` fills, under `$VAULTCONN_CACHE` (default
/// `~/.cache/vaultconn`).
const CACHE_DIR: &str = "k8s-v1.20.2";

/// Runs in the watchdog `sh`. `$1` is the temp dir. See the module docs. `alive` ignores
/// zombies: killed servers are reparented to init, which need not reap them promptly.
const WATCHDOG_SCRIPT: &str = r#"
trap '' TERM INT HUP PIPE
while read -r _; do :; done
alive() { pgrep -r R,S,D,T,t,I -g $$ '^(etcd|kube-)' >/dev/null 2>&1; }
kill -TERM 0 2>/dev/null
i=0
while [ $i -lt 100 ] && alive; do sleep 0.1; i=$((i+1)); done
rm -rf -- "$1"
if alive; then kill -KILL 0; fi
exit 0
"#;

/// How to start a [`ControlPlane`].
#[derive(Debug, Clone)]
pub struct ControlPlaneOptions {
    /// Upper bound for the whole start-up (etcd healthy, apiserver ready, controller manager
    /// working). Does not include building the binaries on first use.
    pub startup_timeout: Duration,
    /// How long [`ControlPlane::stop`] waits after SIGTERM before it sends SIGKILL.
    pub stop_timeout: Duration,
    /// Start kube-controller-manager (garbage collector, namespace, service-account controllers).
    pub controller_manager: bool,
    /// Folder holding `etcd`, `kube-apiserver` (and `kube-controller-manager`). Defaults to
    /// `KUBEBUILDER_ASSETS`, then to what the provisioning script prints or has cached.
    pub assets_dir: Option<PathBuf>,
    /// `scripts/provision-control-plane.sh`, run when no binaries are given (tests pass it so a
    /// fresh machine builds them on first use).
    pub provision_script: Option<PathBuf>,
    /// Where to create the temp dir (etcd data, certs, logs). Defaults to the system temp dir;
    /// `/dev/shm` makes etcd much faster for load tests.
    pub temp_root: Option<PathBuf>,
    /// Extra flags appended to kube-apiserver's command line.
    pub extra_apiserver_args: Vec<String>,
}

impl Default for ControlPlaneOptions {
    fn default() -> Self {
        Self {
            startup_timeout: Duration::from_secs(90),
            stop_timeout: Duration::from_secs(10),
            controller_manager: true,
            assets_dir: None,
            provision_script: None,
            temp_root: None,
            extra_apiserver_args: Vec::new(),
        }
    }
}

/// Why a control plane could not be started or used.
#[derive(Debug, thiserror::Error)]
pub enum ControlPlaneError {
    #[error("control-plane binaries: {0}")]
    Binaries(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{component} did not start: {reason}\n--- last lines of {} ---\n{tail}", log.display())]
    Startup {
        component: &'static str,
        reason: String,
        log: PathBuf,
        tail: String,
    },
    #[error("kubeconfig: {0}")]
    Kubeconfig(#[from] kube::config::KubeconfigError),
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("CRD file {}: {reason}", file.display())]
    Crd { file: PathBuf, reason: String },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, String),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> ControlPlaneError {
    let what = what.into();
    move |source| ControlPlaneError::Io { what, source }
}

/// One server process: running, or stopped by [`ControlPlane::stop_apiserver`] /
/// [`ControlPlane::stop_etcd`] and restartable with the same command line.
struct Server {
    name: &'static str,
    /// `None` while stopped on purpose (a reaped child's pid must never be signalled).
    child: Option<Child>,
    log: PathBuf,
    program: std::ffi::OsString,
    args: Vec<std::ffi::OsString>,
}

struct Watchdog {
    child: Child,
    /// Closing this (or our death) is the watchdog's signal to clean up.
    stdin: Option<ChildStdin>,
}

/// A running etcd + kube-apiserver (+ kube-controller-manager). See the module docs.
pub struct ControlPlane {
    /// Key in [`LIVE`].
    id: u64,
    dir: Option<TempDir>,
    dir_path: PathBuf,
    kubeconfig: PathBuf,
    server_url: String,
    etcd_url: String,
    token: String,
    config: Option<kube::Config>,
    servers: Vec<Server>,
    watchdog: Option<Watchdog>,
    stop_timeout: Duration,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir_path)
            .field("server_url", &self.server_url)
            .field("etcd_url", &self.etcd_url)
            .field("pids", &self.pids())
            .finish_non_exhaustive()
    }
}

impl ControlPlane {
    /// Start a control plane and wait until it is usable: etcd healthy, apiserver `/readyz` OK and
    /// (unless disabled) kube-controller-manager running and having created the `default`
    /// ServiceAccount. Async because it polls the servers; it needs a tokio runtime only while
    /// it runs, so the result may be kept in a `static` and used from other runtimes.
    ///
    /// The first call on a machine may build the binaries (minutes); see
    /// `scripts/provision-control-plane.sh`.
    pub async fn start(opts: ControlPlaneOptions) -> Result<ControlPlane, ControlPlaneError> {
        crate::install_crypto_provider();
        let bins = Binaries::locate(&opts).await?;
        let began = Instant::now();
        // Ports are picked by binding :0 and releasing, so another process can grab one in
        // between; retry the whole start in that (rare) case.
        let mut attempt = 1;
        loop {
            match Self::start_once(&opts, &bins).await {
                Ok(cp) => {
                    tracing::info!(
                        server = %cp.server_url,
                        dir = %cp.dir_path.display(),
                        elapsed_ms = began.elapsed().as_millis() as u64,
                        "control plane ready"
                    );
                    return Ok(cp);
                }
                Err(ControlPlaneError::Startup { ref tail, .. })
                    if attempt < 3 && tail.contains("address already in use") =>
                {
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn start_once(
        opts: &ControlPlaneOptions,
        bins: &Binaries,
    ) -> Result<ControlPlane, ControlPlaneError> {
        let deadline = Instant::now() + opts.startup_timeout;
        let mut builder = tempfile::Builder::new();
        builder.prefix("vaultconn-cp-");
        let dir = match &opts.temp_root {
            Some(root) => builder.tempdir_in(root),
            None => builder.tempdir(),
        }
        .map_err(io_err("creating the control-plane temp dir"))?;
        let dir_path = dir.path().to_path_buf();

        let [etcd_port, peer_port, api_port] = free_ports()?;
        let token = {
            let bytes: [u8; 24] = rand::rng().random();
            hex::encode(bytes)
        };
        let server_url = format!("https://127.0.0.1:{api_port}");
        let etcd_url = format!("http://127.0.0.1:{etcd_port}");

        // The watchdog comes first, so that everything after it is covered.
        let watchdog = spawn_watchdog(&dir_path)?;
        let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
        live_register(id, watchdog.child.id(), &dir_path);
        // From here on, dropping `cp` (e.g. through `?`) tears everything down.
        let mut cp = ControlPlane {
            id,
            dir: Some(dir),
            dir_path: dir_path.clone(),
            kubeconfig: dir_path.join("kubeconfig"),
            server_url,
            etcd_url,
            token,
            config: None,
            servers: Vec::new(),
            watchdog: Some(watchdog),
            stop_timeout: opts.stop_timeout,
        };
        cp.write_files().await?;

        // etcd
        let etcd_data = dir_path.join("etcd");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut etcd = Command::new(&bins.etcd);
        etcd.arg("--name=default")
            .arg(format!("--data-dir={}", etcd_data.display()))
            .arg(format!("--listen-client-urls={}", cp.etcd_url))
            .arg(format!("--advertise-client-urls={}", cp.etcd_url))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=default={peer_url}"))
            .arg("--log-level=warn");
        cp.spawn_server("etcd", etcd)?;
        // Probes go to loopback only and carry the admin token: never through an HTTP(S)_PROXY
        // from the environment (as every other client of the test kit).
        let http = reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(2))
            .build()
            .map_err(|e| cp.startup_error(0, format!("building an HTTP client: {e}")))?;
        let health = format!("{}/health", cp.etcd_url);
        cp.wait_until(0, deadline, "etcd /health", || async {
            match http.get(&health).send().await {
                Ok(r) => r.text().await.is_ok_and(|t| t.contains("\"true\"")),
                Err(_) => false,
            }
        })
        .await?;

        // kube-apiserver
        let certs = dir_path.join("certs");
        let mut api = Command::new(&bins.apiserver);
        api.arg(format!("--etcd-servers={}", cp.etcd_url))
            .arg(format!("--secure-port={api_port}"))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--cert-dir={}", certs.display()))
            .arg(format!(
                "--token-auth-file={}",
                dir_path.join("tokens.csv").display()
            ))
            .arg("--authorization-mode=RBAC")
            .arg(format!(
                "--service-account-key-file={}",
                dir_path.join("sa.pub").display()
            ))
            .arg(format!(
                "--service-account-signing-key-file={}",
                dir_path.join("sa.key").display()
            ))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg("--service-cluster-ip-range=10.96.0.0/16")
            .args(&opts.extra_apiserver_args);
        cp.spawn_server("kube-apiserver", api)?;
        let readyz = format!("{}/readyz", cp.server_url);
        let token = cp.token.clone();
        cp.wait_until(1, deadline, "kube-apiserver /readyz", || async {
            match http.get(&readyz).bearer_auth(&token).send().await {
                Ok(r) => r.status().is_success(),
                Err(_) => false,
            }
        })
        .await?;

        let kubeconfig = Kubeconfig::read_from(&cp.kubeconfig)?;
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default()).await?;
        cp.config = Some(config);

        // kube-controller-manager
        if opts.controller_manager {
            let kcm_bin = bins.controller_manager.as_ref().ok_or_else(|| {
                ControlPlaneError::Binaries(format!(
                    "no kube-controller-manager in {}; add it there, unset KUBEBUILDER_ASSETS, \
                     or set ControlPlaneOptions::controller_manager = false",
                    bins.dir.display()
                ))
            })?;
            let mut kcm = Command::new(kcm_bin);
            // --secure-port 0 / --port 0: otherwise it listens on 0.0.0.0:10257 and a second
            // control plane on this machine silently runs without a controller manager.
            kcm.arg(format!("--kubeconfig={}", cp.kubeconfig.display()))
                .arg("--controllers=garbagecollector,namespace,serviceaccount,serviceaccount-token")
                .arg(format!(
                    "--service-account-private-key-file={}",
                    dir_path.join("sa.key").display()
                ))
                .arg(format!(
                    "--root-ca-file={}",
                    certs.join("apiserver.crt").display()
                ))
                .arg("--leader-elect=false")
                .arg("--port=0")
                .arg("--secure-port=0");
            cp.spawn_server("kube-controller-manager", kcm)?;
            // The serviceaccount controller creating `default/default` proves it is working.
            let client = cp.try_client().await?;
            let sas: Api<ServiceAccount> = Api::namespaced(client, "default");
            cp.wait_until(
                2,
                deadline,
                "kube-controller-manager to create the default ServiceAccount",
                || async { matches!(sas.get_opt("default").await, Ok(Some(_))) },
            )
            .await?;
        }
        // Every server must still be alive once the whole thing is up.
        for i in 0..cp.servers.len() {
            cp.check_alive(i)?;
        }
        Ok(cp)
    }

    /// Token file, service-account keypair and kubeconfig.
    async fn write_files(&self) -> Result<(), ControlPlaneError> {
        let dir = &self.dir_path;
        fs::create_dir_all(dir.join("certs")).map_err(io_err("creating certs dir"))?;
        fs::write(
            dir.join("tokens.csv"),
            format!("{},admin,admin,system:masters\n", self.token),
        )
        .map_err(io_err("writing tokens.csv"))?;
        let key = dir.join("sa.key");
        run_openssl(&["genrsa", "-out", &key.to_string_lossy(), "2048"]).await?;
        run_openssl(&[
            "rsa",
            "-in",
            &key.to_string_lossy(),
            "-pubout",
            "-out",
            &dir.join("sa.pub").to_string_lossy(),
        ])
        .await?;
        let kubeconfig = format!(
            "apiVersion: v1
kind: Config
clusters:
- name: vaultconn-test
  cluster:
    server: {server}
    insecure-skip-tls-verify: true
users:
- name: admin
  user:
    token: {token}
contexts:
- name: vaultconn-test
  context:
    cluster: vaultconn-test
    user: admin
    namespace: default
current-context: vaultconn-test
",
            server = self.server_url,
            token = self.token
        );
        fs::write(&self.kubeconfig, kubeconfig).map_err(io_err("writing kubeconfig"))
    }

    fn spawn_server(&mut self, name: &'static str, cmd: Command) -> Result<(), ControlPlaneError> {
        let log = self.dir_path.join(format!("{name}.log"));
        let out = File::create(&log).map_err(io_err(format!("creating {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let program = cmd.get_program().to_os_string();
        let args = cmd.get_args().map(|a| a.to_os_string()).collect();
        let child = self.spawn_child(name, cmd, out, err)?;
        self.servers.push(Server {
            name,
            child: Some(child),
            log,
            program,
            args,
        });
        Ok(())
    }

    /// Spawn `cmd` as a server in the watchdog's group (see the module docs), logging to `out`.
    fn spawn_child(
        &self,
        name: &'static str,
        mut cmd: Command,
        out: File,
        err: File,
    ) -> Result<Child, ControlPlaneError> {
        cmd.stdin(Stdio::null()).stdout(out).stderr(err);
        let pgid = self
            .watchdog
            .as_ref()
            .map(|w| w.child.id() as libc::pid_t)
            .ok_or_else(|| ControlPlaneError::Binaries("watchdog is not running".into()))?;
        let child = spawn_supervised(cmd, Role::Server { pgid })
            .map_err(io_err(format!("spawning {name}")))?;
        live_register(self.id, child.id(), &self.dir_path);
        Ok(child)
    }

    /// Stop kube-apiserver (SIGTERM; SIGKILL after 3 s). etcd and the controller
    /// manager keep running; every client sees connection refused until
    /// [`Self::start_apiserver`]. Blocking (up to 3 s). A no-op if it is stopped already.
    pub fn stop_apiserver(&mut self) -> Result<(), ControlPlaneError> {
        self.stop_server("kube-apiserver")
    }

    /// Start the stopped kube-apiserver again with the same command line: same port, certs,
    /// token file and etcd data, so existing kubeconfigs and clients keep working. Waits until
    /// its `/readyz` answers 200 (at most `timeout`). A no-op if it runs.
    pub async fn start_apiserver(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        self.start_server("kube-apiserver")?;
        self.wait_apiserver_ready(timeout).await
    }

    /// Stop etcd (SIGTERM; SIGKILL after 3 s). kube-apiserver keeps running and
    /// keeps accepting connections, but its requests that need etcd fail or time out until
    /// [`Self::start_etcd`]. Blocking. A no-op if it is stopped already.
    pub fn stop_etcd(&mut self) -> Result<(), ControlPlaneError> {
        self.stop_server("etcd")
    }

    /// Start the stopped etcd again on the same ports and data dir, wait until it is healthy
    /// and then until kube-apiserver (if running) is ready again (at most `timeout` in all).
    pub async fn start_etcd(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        let deadline = Instant::now() + timeout;
        self.start_server("etcd")?;
        let http = probe_client()?;
        let health = format!("{}/health", self.etcd_url);
        let idx = self.server_index("etcd")?;
        self.wait_until(idx, deadline, "etcd /health after a restart", || async {
            match http.get(&health).send().await {
                Ok(r) => r.text().await.is_ok_and(|t| t.contains("\"true\"")),
                Err(_) => false,
            }
        })
        .await?;
        if self.is_running("kube-apiserver") {
            self.wait_apiserver_ready(deadline.saturating_duration_since(Instant::now()))
                .await?;
        }
        Ok(())
    }

    /// Whether the server called `name` (`etcd`, `kube-apiserver`, `kube-controller-manager`)
    /// is running (not stopped with `stop_*`, and not exited by itself).
    pub fn is_running(&mut self, name: &str) -> bool {
        self.servers
            .iter_mut()
            .find(|s| s.name == name)
            .and_then(|s| s.child.as_mut())
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    async fn wait_apiserver_ready(&mut self, timeout: Duration) -> Result<(), ControlPlaneError> {
        let deadline = Instant::now() + timeout;
        let http = probe_client()?;
        let readyz = format!("{}/readyz", self.server_url);
        let token = self.token.clone();
        let idx = self.server_index("kube-apiserver")?;
        self.wait_until(
            idx,
            deadline,
            "kube-apiserver /readyz after a restart",
            || async {
                match http.get(&readyz).bearer_auth(&token).send().await {
                    Ok(r) => r.status().is_success(),
                    Err(_) => false,
                }
            },
        )
        .await
    }

    fn server_index(&self, name: &str) -> Result<usize, ControlPlaneError> {
        self.servers
            .iter()
            .position(|s| s.name == name)
            .ok_or_else(|| ControlPlaneError::Binaries(format!("this control plane has no {name}")))
    }

    fn stop_server(&mut self, name: &str) -> Result<(), ControlPlaneError> {
        let idx = self.server_index(name)?;
        let s = &mut self.servers[idx];
        let Some(mut child) = s.child.take() else {
            return Ok(());
        };
        signal(&child, libc::SIGTERM);
        // Not the full stop timeout: with kube-controller-manager still connected, the
        // apiserver's graceful shutdown waits on its long-running requests far longer.
        if !wait_child(&mut child, Instant::now() + RESTART_STOP_GRACE) {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Ok(pid) = libc::pid_t::try_from(child.id()) {
            live_forget_pid(self.id, pid);
        }
        tracing::info!(component = name, "stopped (to be restarted)");
        Ok(())
    }

    fn start_server(&mut self, name: &str) -> Result<(), ControlPlaneError> {
        let idx = self.server_index(name)?;
        if self.servers[idx].child.is_some() {
            return Ok(());
        }
        let s = &self.servers[idx];
        let (program, args, log) = (s.program.clone(), s.args.clone(), s.log.clone());
        // Appended, so the log tells the whole story across restarts.
        let out = File::options()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io_err(format!("opening {}", log.display())))?;
        let err = out
            .try_clone()
            .map_err(io_err(format!("opening {}", log.display())))?;
        let mut cmd = Command::new(program);
        cmd.args(args);
        let name = self.servers[idx].name;
        let child = self.spawn_child(name, cmd, out, err)?;
        self.servers[idx].child = Some(child);
        tracing::info!(component = name, "restarted");
        Ok(())
    }

    fn startup_error(&self, idx: usize, reason: String) -> ControlPlaneError {
        let (component, log) = match self.servers.get(idx) {
            Some(s) => (s.name, s.log.clone()),
            None => ("control plane", self.dir_path.clone()),
        };
        let tail = log_tail(&log, 40);
        ControlPlaneError::Startup {
            component,
            reason,
            log,
            tail,
        }
    }

    fn check_alive(&mut self, idx: usize) -> Result<(), ControlPlaneError> {
        let status = match self.servers.get_mut(idx).and_then(|s| s.child.as_mut()) {
            Some(c) => c.try_wait(),
            None => return Ok(()),
        };
        match status {
            Ok(None) => Ok(()),
            Ok(Some(st)) => Err(self.startup_error(idx, format!("exited with {st}"))),
            Err(e) => Err(self.startup_error(idx, format!("cannot poll process: {e}"))),
        }
    }

    /// Poll `cond` every [`POLL`] until it holds; fail early if server `idx` dies.
    async fn wait_until<F, Fut>(
        &mut self,
        idx: usize,
        deadline: Instant,
        what: &str,
        mut cond: F,
    ) -> Result<(), ControlPlaneError>
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        loop {
            self.check_alive(idx)?;
            if cond().await {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(self.startup_error(idx, format!("timed out waiting for {what}")));
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Path of an admin kubeconfig (token auth, TLS verification off) usable by kube-rs and kubectl.
    pub fn kubeconfig_path(&self) -> &Path {
        &self.kubeconfig
    }

    /// `https://127.0.0.1:<port>` of the apiserver.
    pub fn server_url(&self) -> String {
        self.server_url.clone()
    }

    /// `http://127.0.0.1:<port>` of etcd.
    pub fn etcd_url(&self) -> &str {
        &self.etcd_url
    }

    /// Bearer token of a `system:masters` user (also good for the apiserver's `/metrics`).
    pub fn admin_token(&self) -> &str {
        &self.token
    }

    /// The temp dir holding etcd's data, certs, keys and the `<component>.log` files.
    pub fn dir(&self) -> &Path {
        &self.dir_path
    }

    /// `(name, pid)` of every process still owned: the servers and the `watchdog`.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        let mut pids: Vec<_> = self
            .servers
            .iter()
            .filter_map(|s| Some((s.name, s.child.as_ref()?.id())))
            .collect();
        if let Some(w) = &self.watchdog {
            pids.push(("watchdog", w.child.id()));
        }
        pids
    }

    /// A new admin client. Build one per tokio runtime (kube clients are tied to the runtime
    /// they were created on).
    ///
    /// # Panics
    /// If the control plane was stopped, or the client cannot be built (start-up already built
    /// one from the same config, so that would be a bug). Use [`Self::try_client`] to handle it.
    pub async fn client(&self) -> kube::Client {
        match self.try_client().await {
            Ok(c) => c,
            Err(e) => panic!("cannot build a client for the test control plane: {e}"),
        }
    }

    /// Like [`Self::client`], without panicking.
    pub async fn try_client(&self) -> Result<kube::Client, ControlPlaneError> {
        crate::install_crypto_provider();
        let config = self.config.clone().ok_or_else(|| {
            ControlPlaneError::Binaries("the control plane is stopped or not yet ready".into())
        })?;
        Ok(kube::Client::try_from(config)?)
    }

    /// Server-side apply (field manager [`FIELD_MANAGER`]) every CustomResourceDefinition in the
    /// `*.yaml` files of `dir` (multi-document files allowed), then wait until each is
    /// `Established`. Returns the CRD names.
    pub async fn install_crds(&self, dir: &Path) -> Result<Vec<String>, ControlPlaneError> {
        let mut files: Vec<PathBuf> = fs::read_dir(dir)
            .map_err(io_err(format!("reading {}", dir.display())))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "yaml") && p.is_file())
            .collect();
        files.sort();
        let client = self.try_client().await?;
        let api: Api<CustomResourceDefinition> = Api::all(client);
        let pp = PatchParams::apply(FIELD_MANAGER).force();
        let mut names = Vec::new();
        for file in &files {
            let text =
                fs::read_to_string(file).map_err(io_err(format!("reading {}", file.display())))?;
            let crd_err = |reason: String| ControlPlaneError::Crd {
                file: file.clone(),
                reason,
            };
            // Empty documents (a trailing `---`) are skipped by the parser.
            let crds: Vec<CustomResourceDefinition> =
                serde_saphyr::from_multiple(&text).map_err(|e| crd_err(e.to_string()))?;
            for crd in crds {
                let name = crd
                    .metadata
                    .name
                    .clone()
                    .ok_or_else(|| crd_err("a CRD has no metadata.name".into()))?;
                api.patch(&name, &pp, &Patch::Apply(&crd))
                    .await
                    .map_err(|e| crd_err(format!("applying {name}: {e}")))?;
                names.push(name);
            }
        }
        let timeout = Duration::from_secs(30);
        for name in &names {
            let established = await_condition(api.clone(), name, conditions::is_crd_established());
            match tokio::time::timeout(timeout, established).await {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => {
                    return Err(ControlPlaneError::Timeout(
                        timeout,
                        format!("CRD {name} to be Established ({e})"),
                    ))
                }
                Err(_) => {
                    return Err(ControlPlaneError::Timeout(
                        timeout,
                        format!("CRD {name} to be Established"),
                    ))
                }
            }
        }
        Ok(names)
    }

    /// Stop everything and remove the temp dir: SIGTERM to each server, SIGKILL if it is still
    /// running after the stop timeout, then release the watchdog. Blocking (about a second; at
    /// worst 4 × the stop timeout); idempotent.
    pub fn stop(&mut self) {
        // First, so that the exit hook never touches pids reaped (and maybe reused) below.
        live_deregister(self.id);
        self.config = None;
        // One at a time, in reverse start order: the apiserver's graceful shutdown talks to etcd
        // and hangs (until SIGKILL) when etcd goes first; in order it takes about a second.
        for s in self.servers.iter_mut().rev() {
            let Some(child) = s.child.as_mut() else {
                continue;
            };
            signal(child, libc::SIGTERM);
            if !wait_child(child, Instant::now() + self.stop_timeout) {
                tracing::warn!(component = s.name, "did not stop on SIGTERM; killing it");
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.servers.clear();
        if let Some(mut w) = self.watchdog.take() {
            // EOF on its stdin: it finds nothing left to kill, removes the dir and exits.
            drop(w.stdin.take());
            if !wait_child(&mut w.child, Instant::now() + self.stop_timeout) {
                let _ = w.child.kill();
                let _ = w.child.wait();
            }
        }
        if let Some(dir) = self.dir.take() {
            // Usually already gone (the watchdog removed it).
            if dir.path().exists() {
                if let Err(e) = dir.close() {
                    tracing::warn!(error = %e, "could not remove the control-plane temp dir");
                }
            } else {
                let _ = dir.keep();
            }
        }
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Where the binaries are.
struct Binaries {
    dir: PathBuf,
    etcd: PathBuf,
    apiserver: PathBuf,
    controller_manager: Option<PathBuf>,
}

impl Binaries {
    /// The binaries to run, from (in order) `opts.assets_dir`, `KUBEBUILDER_ASSETS`, the cache
    /// that `scripts/provision-control-plane.sh` fills, or by running that script when
    /// `opts.provision_script` (or `$VAULTCONN_PROVISION_SCRIPT`) names it. Looked up at run
    /// time, so the shipped binary carries no path of the machine that built it.
    async fn locate(opts: &ControlPlaneOptions) -> Result<Binaries, ControlPlaneError> {
        let has_core = |d: &Path| d.join("etcd").is_file() && d.join("kube-apiserver").is_file();
        let dir = if let Some(dir) = &opts.assets_dir {
            if !has_core(dir) {
                return Err(ControlPlaneError::Binaries(format!(
                    "{} has no etcd and kube-apiserver",
                    dir.display()
                )));
            }
            dir.clone()
        } else {
            let assets = std::env::var_os("KUBEBUILDER_ASSETS").map(PathBuf::from);
            let cache = std::env::var_os("VAULTCONN_CACHE")
                .map(PathBuf::from)
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/vaultconn"))
                })
                .map(|root| root.join(CACHE_DIR));
            let script = opts
                .provision_script
                .clone()
                .or_else(|| std::env::var_os(PROVISION_SCRIPT_ENV).map(PathBuf::from));
            match (assets, cache, script) {
                (Some(dir), _, _) if has_core(&dir) => dir,
                // The script is the authority when given (it also rebuilds a stale cache).
                (_, _, Some(script)) => provision(&script).await?,
                (_, Some(dir), None) if has_core(&dir) => dir,
                _ => {
                    return Err(ControlPlaneError::Binaries(format!(
                        "no etcd and kube-apiserver found: run scripts/provision-control-plane.sh \
                         (fills ~/.cache/vaultconn/{CACHE_DIR}) or set KUBEBUILDER_ASSETS to a folder holding them"
                    )))
                }
            }
        };
        let kcm = dir.join("kube-controller-manager");
        Ok(Binaries {
            etcd: dir.join("etcd"),
            apiserver: dir.join("kube-apiserver"),
            controller_manager: kcm.is_file().then_some(kcm),
            dir,
        })
    }
}

/// Run the provisioning script (it serialises concurrent builds with a lock); its stdout is
/// the folder. Its stderr (build progress) is passed through.
async fn provision(script: &Path) -> Result<PathBuf, ControlPlaneError> {
    let out = tokio::process::Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .await
        .map_err(io_err(format!("running {}", script.display())))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let dir = stdout.lines().last().unwrap_or("").trim();
    if !out.status.success() || dir.is_empty() {
        return Err(ControlPlaneError::Binaries(format!(
            "{} failed ({}); stdout: {stdout}",
            script.display(),
            out.status
        )));
    }
    Ok(PathBuf::from(dir))
}

/// The client that polls etcd's `/health` and the apiserver's `/readyz` (self-signed
/// certificate; loopback only, so no proxy: the requests carry the admin token).
fn probe_client() -> Result<reqwest::Client, ControlPlaneError> {
    reqwest::Client::builder()
        .danger_accept_invalid_certs(true)
        .no_proxy()
        .timeout(Duration::from_secs(2))
        .build()
        .map_err(|e| ControlPlaneError::Binaries(format!("building an HTTP client: {e}")))
}

async fn run_openssl(args: &[&str]) -> Result<(), ControlPlaneError> {
    let out = tokio::process::Command::new("openssl")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(io_err("running openssl"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(ControlPlaneError::Binaries(format!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Distinct free loopback ports. All listeners are held until all are picked, so they differ.
fn free_ports<const N: usize>() -> Result<[u16; N], ControlPlaneError> {
    let mut listeners = Vec::with_capacity(N);
    let mut ports = [0u16; N];
    for port in ports.iter_mut() {
        let l = TcpListener::bind("127.0.0.1:0").map_err(io_err("picking a free port"))?;
        *port = l
            .local_addr()
            .map_err(io_err("picking a free port"))?
            .port();
        listeners.push(l);
    }
    Ok(ports)
}

/// The last `lines` lines of a log file (at most the last 64 KiB of it).
fn log_tail(path: &Path, lines: usize) -> String {
    let Ok(mut f) = File::open(path) else {
        return String::from("(no log)");
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(64 * 1024)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    let text = String::from_utf8_lossy(&buf);
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn signal(child: &Child, sig: libc::c_int) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain syscall; the child is not yet reaped (we own its `Child`), so the pid
        // cannot belong to another process.
        unsafe {
            libc::kill(pid, sig);
        }
    }
}

/// Wait for `child` to exit until `deadline`; true if it exited (and was reaped).
fn wait_child(child: &mut Child, deadline: Instant) -> bool {
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

fn spawn_watchdog(dir: &Path) -> Result<Watchdog, ControlPlaneError> {
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(WATCHDOG_SCRIPT)
        .arg("vaultconn-cp-watchdog")
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child =
        spawn_supervised(cmd, Role::Watchdog).map_err(io_err("spawning the watchdog"))?;
    let stdin = child.stdin.take();
    Ok(Watchdog { child, stdin })
}

#[derive(Clone, Copy)]
enum Role {
    /// Leads a new process group; must outlive us, so no parent-death signal.
    Watchdog,
    /// Joins the watchdog's group and dies with this process.
    Server { pgid: libc::pid_t },
}

/// Control planes not yet stopped: `(id, pids: watchdog then servers, temp dir)`.
static LIVE: Mutex<Vec<(u64, Vec<libc::pid_t>, PathBuf)>> = Mutex::new(Vec::new());
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn live_register(id: u64, pid: u32, dir: &Path) {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        // SAFETY: registers a plain `extern "C" fn` with libc.
        unsafe {
            libc::atexit(reap_at_exit);
        }
    });
    let Ok(pid) = libc::pid_t::try_from(pid) else {
        return;
    };
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    match live.iter_mut().find(|(i, _, _)| *i == id) {
        Some((_, pids, _)) => pids.push(pid),
        None => live.push((id, vec![pid], dir.to_path_buf())),
    }
}

/// `pid` (a server stopped on purpose, already reaped) is no longer ours to kill at exit.
fn live_forget_pid(id: u64, pid: libc::pid_t) {
    let mut live = LIVE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, pids, _)) = live.iter_mut().find(|(i, _, _)| *i == id) {
        pids.retain(|p| *p != pid);
    }
}

fn live_deregister(id: u64) {
    LIVE.lock()
        .unwrap_or_else(|e| e.into_inner())
        .retain(|(i, _, _)| *i != id);
}

/// The exit hook (see the module docs). Servers go first, then the watchdog; all are reaped.
extern "C" fn reap_at_exit() {
    let mut live = match LIVE.try_lock() {
        Ok(live) => live,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        // Someone is mid-stop; the parent-death signal and the watchdog cover it.
        Err(std::sync::TryLockError::WouldBlock) => return,
    };
    for (_, pids, dir) in live.drain(..) {
        for &pid in pids.iter().rev() {
            // SAFETY: plain syscalls on our own, not yet reaped children.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
        let _ = fs::remove_dir_all(dir);
    }
}

fn spawn_supervised(mut cmd: Command, role: Role) -> io::Result<Child> {
    let owner = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe
    // syscalls (setpgid, prctl, getppid); it allocates nothing.
    unsafe {
        cmd.pre_exec(move || {
            match role {
                Role::Watchdog => {
                    if libc::setpgid(0, 0) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                }
                Role::Server { pgid } => {
                    if libc::setpgid(0, pgid) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                        return Err(io::Error::last_os_error());
                    }
                    // We may have died between fork and prctl; then nobody would kill us.
                    if libc::getppid() != owner {
                        return Err(io::Error::other("parent exited during spawn"));
                    }
                }
            }
            Ok(())
        });
    }
    // The one spawner thread that never exits (see the module docs and `testkit::process`).
    crate::process::spawn_on_spawner_thread(cmd)
}

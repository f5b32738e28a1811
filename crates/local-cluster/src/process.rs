//! Child processes that die with the test process, even when it is SIGKILLed.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, not the process, so
//! every spawn goes through one dedicated thread that never exits (a tokio worker or a test
//! thread would end and take the child with it).

use std::io;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command};
use std::sync::{mpsc, OnceLock};

type SpawnRequest = (Command, mpsc::Sender<io::Result<Child>>);

fn spawner() -> &'static mpsc::Sender<SpawnRequest> {
    static SPAWNER: OnceLock<mpsc::Sender<SpawnRequest>> = OnceLock::new();
    SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<SpawnRequest>();
        let _ = std::thread::Builder::new()
            .name("vaultconn-testkit-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            });
        tx
    })
}

/// Spawn `cmd` so that the kernel SIGKILLs it when this process dies.
pub fn spawn_dies_with_parent(mut cmd: Command) -> io::Result<Child> {
    let owner = libc::pid_t::try_from(std::process::id()).map_err(io::Error::other)?;
    // SAFETY: runs between fork and exec; only async-signal-safe syscalls, no allocation.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() != owner {
                return Err(io::Error::other("parent exited during spawn"));
            }
            Ok(())
        });
    }
    spawn_on_spawner_thread(cmd)
}

/// Spawn `cmd` (with whatever `pre_exec` it carries) from the one never-exiting spawner thread.
pub(crate) fn spawn_on_spawner_thread(cmd: Command) -> io::Result<Child> {
    let (tx, rx) = mpsc::channel();
    let gone = || io::Error::other("the testkit spawner thread is not running");
    spawner().send((cmd, tx)).map_err(|_| gone())?;
    rx.recv().map_err(|_| gone())?
}

//! Child processes the agent starts: each in its own process group, dying with its parent
//! ([`isolate`]: a fledgelet's role process) or not ([`detach`]: a deployer's workers, which
//! outlive a crash of the deployer), stopped group-wide (SIGTERM, a grace period, then
//! SIGKILL).
//!
//! A role's code may fork helpers (a Python data loader, a shell pipeline); signalling only the
//! direct child would orphan them. So every child leads a new process group and every stop
//! signals the whole group. On Linux the child also asks the kernel for `SIGKILL` when its
//! parent dies (`PR_SET_PDEATHSIG`), so a `kill -9` of the agent leaves no orphans behind.

use std::io;
use std::os::unix::process::ExitStatusExt as _;
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::process::{Child, Command};

/// Makes `command` start its child as the leader of a new process group that dies with us.
///
/// Linux delivers the parent-death signal when the *thread* that spawned the child exits, not
/// the process. Spawn from the main thread or a runtime worker thread (they live as long as
/// the runtime), never from a `spawn_blocking` or `block_in_place` thread, which tokio retires
/// when idle and which would take the child with it.
pub fn isolate(command: &mut Command) {
    command.process_group(0).kill_on_drop(true);
    #[cfg(target_os = "linux")]
    {
        let parent = std::process::id();
        // SAFETY: the closure runs in the forked child before exec; it only makes two
        // async-signal-safe system calls (prctl, getppid) and allocates nothing.
        unsafe {
            command.pre_exec(move || {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
                // The parent may have died between fork and prctl; then nobody would kill us.
                if nix::unistd::getppid().as_raw() as u32 != parent {
                    return Err(io::Error::other("parent exited before the child started"));
                }
                Ok(())
            });
        }
    }
}

/// Makes `command` start its child as the leader of a new process group that does *not* die
/// with us: a worker that must outlive a crash of its deployer (which re-adopts it when it
/// starts again, or stops it on a clean shutdown).
pub fn detach(command: &mut Command) {
    command.process_group(0).kill_on_drop(false);
}

/// Variables a worker inherits from the process that starts it; everything else in that
/// environment (API keys, tokens, database URLs, the operator's shell) is withheld.
pub const INHERITED_ENV: &[&str] = &[
    "PATH",
    "LANG",
    "LANGUAGE",
    "LC_ALL",
    "LC_CTYPE",
    "TZ",
    "PYTHONPATH",
    "PYTHONHOME",
    "VIRTUAL_ENV",
    "LD_LIBRARY_PATH",
    "CUDA_VISIBLE_DEVICES",
    "SSL_CERT_FILE",
    "SSL_CERT_DIR",
    "FLEDGE_LOG",
    "FLEDGE_LOG_FORMAT",
    // The fledgelet's own settings (none of them a secret).
    "FLEDGE_PYTHON",
    "FLEDGE_HEARTBEAT_INTERVAL",
    "FLEDGE_STOP_GRACE",
    "FLEDGE_REPORT_TIMEOUT",
    "FLEDGE_MAX_CODE_BYTES",
    "RUST_LOG",
    "RUST_BACKTRACE",
];

/// The variable naming the registry credentials a fledgelet hands to built-in roles
/// (comma-separated names; their values are in the fledgelet's own environment, put there by
/// its deployer from `[deployer] registry_env`).
pub const REGISTRY_ENV: &str = "FLEDGE_REGISTRY_ENV";

/// Whether `name` may be passed as a registry credential: an environment variable name
/// (`A-Z`, `0-9`, `_`, not starting with a digit, at most 64 bytes) that is not Fledge's own
/// (`FLEDGE_*`, which carry the task's identity) nor one the loader or shell interprets.
pub fn is_registry_env_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name.chars().all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_')
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && !name.starts_with("FLEDGE_")
        && !name.starts_with("LD_")
        && !matches!(name, "PATH" | "HOME" | "TMPDIR" | "PYTHONPATH" | "PYTHONHOME")
}

/// The registry credentials a worker receives: for a built-in role, each valid name listed in
/// `$FLEDGE_REGISTRY_ENV` with its value from `lookup`; for user code, none.
pub fn registry_env(
    builtin: bool,
    lookup: impl Fn(&str) -> Option<String>,
) -> Vec<(String, String)> {
    if !builtin {
        return Vec::new();
    }
    let Some(names) = lookup(REGISTRY_ENV) else { return Vec::new() };
    names
        .split(',')
        .map(str::trim)
        .filter(|name| is_registry_env_name(name))
        .filter_map(|name| Some((name.to_owned(), lookup(name)?)))
        .collect()
}

/// Gives `command` a minimal environment: [`INHERITED_ENV`] from ours, `HOME` and `TMPDIR`
/// inside `work_dir` (created here), nothing else; the caller then adds what the worker needs.
pub fn worker_env(command: &mut Command, work_dir: &std::path::Path) -> io::Result<()> {
    let (home, tmp) = (work_dir.join("home"), work_dir.join("tmp"));
    std::fs::create_dir_all(&home)?;
    std::fs::create_dir_all(&tmp)?;
    command.env_clear();
    for name in INHERITED_ENV {
        if let Some(value) = std::env::var_os(name) {
            command.env(name, value);
        }
    }
    command.env("HOME", home).env("TMPDIR", tmp);
    Ok(())
}

/// Sends `signal` to the process group led by `child` (if it has not been reaped yet).
///
/// A group that no longer exists is not an error.
pub fn signal_group(child: &Child, signal: Signal) -> io::Result<()> {
    match child.id() {
        Some(pid) => signal_group_id(pid, signal),
        None => Ok(()),
    }
}

/// Sends `signal` to the process group `pgid`; a group that no longer exists is not an error.
pub fn signal_group_id(pgid: u32, signal: Signal) -> io::Result<()> {
    let pgid = i32::try_from(pgid).map_err(|_| io::Error::other("process id out of range"))?;
    match killpg(Pid::from_raw(pgid), signal) {
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(errno) => Err(errno.into()),
    }
}

/// Stops `child`'s process group: SIGTERM, then SIGKILL if it has not exited after `grace`.
///
/// Returns the child's exit status once it is reaped.
pub async fn stop_group(child: &mut Child, grace: Duration) -> io::Result<ExitStatus> {
    let pgid = child.id();
    if let Some(pgid) = pgid {
        signal_group_id(pgid, Signal::SIGTERM)?;
    }
    let status = match tokio::time::timeout(grace, child.wait()).await {
        Ok(status) => status?,
        Err(_elapsed) => {
            tracing::warn!(?pgid, ?grace, "child ignored SIGTERM, sending SIGKILL");
            if let Some(pgid) = pgid {
                signal_group_id(pgid, Signal::SIGKILL)?;
            }
            child.wait().await?
        }
    };
    // The leader is gone; make sure no helper it forked outlives it.
    if let Some(pgid) = pgid {
        signal_group_id(pgid, Signal::SIGKILL)?;
    }
    Ok(status)
}

/// A human-readable exit status: `exit code 3`, `signal 9 (SIGKILL)`.
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        return format!("exit code {code}");
    }
    if let Some(sig) = status.signal() {
        return match Signal::try_from(sig) {
            Ok(name) => format!("signal {sig} ({})", name.as_str()),
            Err(_) => format!("signal {sig}"),
        };
    }
    status.to_string()
}

#[cfg(test)]
mod tests {

    #[test]
    fn registry_credentials_reach_builtin_roles_only_and_only_valid_names() {
        let env = |name: &str| -> Option<String> {
            match name {
                REGISTRY_ENV => {
                    Some("AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,FLEDGE_TASK_KEY,LD_PRELOAD,bad-name,UNSET".into())
                }
                "AWS_ACCESS_KEY_ID" => Some("id".into()),
                "AWS_SECRET_ACCESS_KEY" => Some("secret".into()),
                "FLEDGE_TASK_KEY" | "LD_PRELOAD" => Some("never".into()),
                _ => None,
            }
        };
        assert_eq!(
            registry_env(true, env),
            [
                ("AWS_ACCESS_KEY_ID".to_owned(), "id".to_owned()),
                ("AWS_SECRET_ACCESS_KEY".to_owned(), "secret".to_owned())
            ]
        );
        assert!(registry_env(false, env).is_empty(), "user code gets none");
        assert!(registry_env(true, |_| None).is_empty());
        for bad in ["", "PATH", "HOME", "9X", "a", "FLEDGE_X", "LD_LIBRARY_PATH", "A-B"] {
            assert!(!is_registry_env_name(bad), "{bad}");
        }
    }
    use std::process::Stdio;

    use super::*;

    fn sh(script: &str) -> Command {
        let mut command = Command::new("sh");
        command.arg("-c").arg(script).stdin(Stdio::null()).stdout(Stdio::piped());
        isolate(&mut command);
        command
    }

    fn alive(pid: i32) -> bool {
        // Signal 0 checks existence; a zombie still counts, so read its state too.
        if nix::sys::signal::kill(Pid::from_raw(pid), None).is_err() {
            return false;
        }
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        !stat.contains(") Z ")
    }

    async fn wait_dead(pid: i32) -> bool {
        for _ in 0..200 {
            if !alive(pid) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        false
    }

    #[tokio::test]
    async fn stop_kills_the_whole_group_including_grandchildren() {
        use tokio::io::AsyncBufReadExt as _;
        // The grandchild ignores nothing but would outlive its parent if only the leader died.
        let mut child = sh("sleep 60 & echo $!; wait").spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let grandchild: i32 =
            lines.next_line().await.expect("read").expect("pid line").trim().parse().expect("pid");
        assert!(alive(grandchild));
        let status = stop_group(&mut child, Duration::from_secs(5)).await.expect("stop");
        assert_eq!(describe(status), "signal 15 (SIGTERM)");
        assert!(wait_dead(grandchild).await, "grandchild {grandchild} survived");
    }

    #[tokio::test]
    async fn stop_escalates_to_sigkill_when_term_is_ignored() {
        use tokio::io::AsyncBufReadExt as _;
        let mut child =
            sh("trap '' TERM; echo ready; while :; do sleep 0.05; done").spawn().expect("spawn");
        let stdout = child.stdout.take().expect("stdout");
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        assert_eq!(lines.next_line().await.expect("read").as_deref(), Some("ready"));
        let status = stop_group(&mut child, Duration::from_millis(300)).await.expect("stop");
        assert_eq!(describe(status), "signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn describes_exit_codes_and_tolerates_reaped_groups() {
        let mut child = sh("exit 3").spawn().expect("spawn");
        let status = child.wait().await.expect("wait");
        assert_eq!(describe(status), "exit code 3");
        // The group is gone; signalling it again is fine.
        signal_group(&child, Signal::SIGTERM).expect("reaped child");
        signal_group_id(999_999_999, Signal::SIGTERM).expect("no such group");
    }
}

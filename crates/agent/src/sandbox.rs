//! The sandbox a task's code runs in: Linux Landlock, applied by the fledgelet to the child
//! it starts (and so to everything that child forks), never to the fledgelet itself.
//!
//! What the code may touch ([`Grants`]):
//! - read, write and create in its own work dir (code, config, HOME, TMPDIR, spool);
//! - read, write and create in its job's directory of a local registry (`{root}/jobs/{job}`)
//!   and the registry's named models (`{root}/models`, base models and `save_model`);
//! - read its datasets (the task's dataset URL and a `file:` `evalDataset`), which must lie in
//!   one of the compute's data roots when the operator names any (`--sandbox-data-root`), and
//!   may never be or contain a protected path;
//! - read and execute the system's runtime (`/usr`, `/lib*`, `/bin`, `/sbin`, a short list of
//!   `/etc` files that programs read at start, `/sys` and the machine-wide files of `/proc`
//!   read-only, its own `/proc/<pid>`), the program's own
//!   installation (the directory above the one holding it: a Python installation, a virtual
//!   environment, the directory of the `fledge` binary) and what the operator adds
//!   (`--sandbox-read`);
//! - read and write `/dev/null`, `/dev/zero`, `/dev/full`, the random devices and `/dev/shm`.
//!
//! Everything else is refused by the kernel: the control plane's data dir and database, the
//! CLI config with its token, the compute key, other jobs' work dirs, `/tmp`, and every other
//! process's `/proc/<pid>` (the fledgelet's, the deployer's, other workers': their `environ`
//! holds keys). The process the fledgelet starts gets its own `/proc/<pid>`, added in the
//! child after fork; processes it forks in turn do not get theirs. Where the kernel has
//! Landlock ABI 6, signals and abstract Unix sockets are scoped to the code's own domain.
//!
//! Protected paths (the deployer passes its work root, the control plane's data dir and the
//! CLI config dir) are never granted: a grant that would be one of them, lie inside one or
//! contain one is dropped with a line in the task's log (a program's installation is narrowed
//! to the program file). Landlock only adds permissions, so this is what keeps them out.
//!
//! [`Mode::Auto`] (the default) enforces what the kernel supports and says in the task's log
//! what is in force; [`Mode::Required`] refuses to run code the kernel cannot confine;
//! [`Mode::Off`] runs the code unconfined (an operator's explicit choice).

use std::fmt;
use std::path::{Path, PathBuf};

use landlock::{
    ABI, Access, AccessFs, CompatLevel, Compatible, Ruleset, RulesetAttr, RulesetCreated,
    RulesetCreatedAttr, RulesetStatus, Scope, path_beneath_rules,
};

/// The Landlock ABI whose rights the sandbox asks for; older kernels get what they support.
const TARGET_ABI: ABI = ABI::V6;

/// Files under `/etc` that ordinary programs (the dynamic loader, Python, TLS, name
/// resolution, time zones) read at start. The rest of `/etc` stays out.
const ETC_FILES: &[&str] = &[
    "/etc/ld.so.cache",
    "/etc/ld.so.conf",
    "/etc/ld.so.conf.d",
    "/etc/ld.so.preload",
    "/etc/localtime",
    "/etc/timezone",
    "/etc/ssl",
    "/etc/ca-certificates",
    "/etc/ca-certificates.conf",
    "/etc/pki",
    "/etc/passwd",
    "/etc/group",
    "/etc/nsswitch.conf",
    "/etc/hosts",
    "/etc/host.conf",
    "/etc/resolv.conf",
    "/etc/gai.conf",
    "/etc/services",
    "/etc/protocols",
    "/etc/mime.types",
    "/etc/os-release",
    "/etc/alternatives",
    "/etc/fonts",
    "/etc/inputrc",
    "/etc/terminfo",
];

/// The system's runtime: read and execute.
const SYSTEM_DIRS: &[&str] = &["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"];

/// What of `/proc` and `/sys` a program may read: the machine's description, not other
/// processes.
const PSEUDO: &[&str] = &[
    "/sys",
    "/proc/cpuinfo",
    "/proc/meminfo",
    "/proc/stat",
    "/proc/loadavg",
    "/proc/uptime",
    "/proc/version",
    "/proc/filesystems",
    "/proc/sys",
];

/// Devices a program may open read-write.
const DEVICES: &[&str] = &["/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom"];

/// Whether and how task code is confined.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Confine with what the kernel supports; say so when it supports nothing.
    #[default]
    Auto,
    /// Refuse to run task code the kernel cannot confine.
    Required,
    /// Run task code unconfined.
    Off,
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Auto => "auto",
            Mode::Required => "required",
            Mode::Off => "off",
        })
    }
}

/// The operator's sandbox settings of a compute, passed by its deployer to each fledgelet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// Whether to confine.
    pub mode: Mode,
    /// Paths never granted (the work root, the control plane's data dir, the CLI config).
    pub protected: Vec<PathBuf>,
    /// Where datasets may be; empty: anywhere but the protected paths.
    pub data_roots: Vec<PathBuf>,
    /// More read-and-execute paths (a shared Python installation, a model cache).
    pub read: Vec<PathBuf>,
}

impl Policy {
    /// The fledgelet flags that carry this policy (the deployer's side of [`crate::cli`]).
    pub fn to_args(&self) -> Vec<String> {
        let mut args = vec!["--sandbox".to_owned(), self.mode.to_string()];
        let mut add = |flag: &str, paths: &[PathBuf]| {
            for path in paths {
                args.push(flag.to_owned());
                args.push(path.display().to_string());
            }
        };
        add("--sandbox-protect", &self.protected);
        add("--sandbox-data-root", &self.data_roots);
        add("--sandbox-read", &self.read);
        args
    }
}

/// What the kernel offers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Support {
    /// The Landlock ABI version, or `None` when Landlock is missing or disabled.
    pub abi: Option<i32>,
}

/// Asks the kernel which Landlock ABI it has.
pub fn probe() -> Support {
    #[cfg(target_os = "linux")]
    {
        const LANDLOCK_CREATE_RULESET_VERSION: libc::c_uint = 1;
        // SAFETY: with a null attribute, size 0 and the VERSION flag the call only returns the
        // ABI number (or -1 with errno); it reads and writes no memory of ours.
        let abi = unsafe {
            libc::syscall(
                libc::SYS_landlock_create_ruleset,
                std::ptr::null::<libc::c_void>(),
                0usize,
                LANDLOCK_CREATE_RULESET_VERSION,
            )
        };
        Support { abi: (abi > 0).then_some(abi as i32) }
    }
    #[cfg(not(target_os = "linux"))]
    Support { abi: None }
}

impl fmt::Display for Support {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.abi {
            Some(abi) => write!(
                f,
                "Landlock ABI {abi}: task code reads and writes only its work dir, its job's \
                 registry directory and its datasets (read-only), and reads the system's runtime"
            ),
            None => f.write_str(
                "Landlock is not available on this kernel (missing or disabled at boot): task \
                 code runs with the file access of the worker's user",
            ),
        }
    }
}

/// The paths one task's code may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Grants {
    /// Read, write, create, remove.
    pub read_write: Vec<PathBuf>,
    /// Read files and list directories.
    pub read: Vec<PathBuf>,
    /// Read and execute.
    pub read_exec: Vec<PathBuf>,
    /// What was asked for and dropped, and why (shown in the task's log).
    pub dropped: Vec<String>,
}

/// Errors of the sandbox.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The mode is `required` and the kernel cannot confine.
    #[error("the sandbox is required (--sandbox required) but {0}")]
    Unavailable(String),
    /// A dataset lies outside the compute's data roots.
    #[error(
        "dataset path {path} is outside this compute's data roots ({roots}); the operator names \
         them with --sandbox-data-root"
    )]
    OutsideDataRoots {
        /// The dataset path.
        path: PathBuf,
        /// The roots, comma-separated.
        roots: String,
    },
    /// A path could not be prepared.
    #[error("cannot prepare {path} for the task's sandbox")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The kernel refused the ruleset.
    #[error("the kernel refused the task's Landlock ruleset")]
    Landlock(#[source] landlock::RulesetError),
}

/// What one task asks of the sandbox, before the policy is applied.
#[derive(Clone, Debug)]
pub struct Request<'a> {
    /// The task's work dir.
    pub work_dir: &'a Path,
    /// The program that runs and the tools it may execute (the Python interpreter, the
    /// `fledge` binary of built-in roles), each as named: absolute, relative to `cwd`, or
    /// found on `PATH`.
    pub programs: Vec<PathBuf>,
    /// The program's working directory.
    pub cwd: &'a Path,
    /// The `PATH` the program is looked up in.
    pub path_var: Option<&'a str>,
    /// `VIRTUAL_ENV` and each `PYTHONPATH` entry the child inherits.
    pub python_paths: Vec<PathBuf>,
    /// The local registry's root, if the task's registry is a directory.
    pub registry_root: Option<PathBuf>,
    /// The task's job id (its registry directory).
    pub job: &'a str,
    /// Dataset directories or files the task reads.
    pub datasets: Vec<PathBuf>,
}

/// Whether `a` is `b` or lies inside it (by components, both absolute and normalized).
fn within(a: &Path, b: &Path) -> bool {
    a.starts_with(b)
}

/// `path` made absolute and free of `.`/`..` and symlinks where it exists (the deepest
/// existing ancestor is canonicalized, the rest appended).
fn normalize(path: &Path) -> PathBuf {
    if let Ok(real) = path.canonicalize() {
        return real;
    }
    let mut tail = Vec::new();
    let mut cur = path.to_path_buf();
    while let Some(parent) = cur.parent().map(Path::to_path_buf) {
        if let Some(name) = cur.file_name() {
            tail.push(name.to_owned());
        }
        if let Ok(real) = parent.canonicalize() {
            let mut out = real;
            for name in tail.iter().rev() {
                out.push(name);
            }
            return out;
        }
        cur = parent;
    }
    path.to_path_buf()
}

/// The program's file: as named when it has a slash, else the first match on `PATH`.
fn find_program(program: &Path, cwd: &Path, path_var: Option<&str>) -> Option<PathBuf> {
    if program.components().count() > 1 || program.is_absolute() {
        let path = if program.is_absolute() { program.to_path_buf() } else { cwd.join(program) };
        return path.is_file().then_some(path);
    }
    path_var?
        .split(':')
        .filter(|dir| !dir.is_empty())
        .map(|dir| Path::new(dir).join(program))
        .find(|candidate| candidate.is_file())
}

impl Policy {
    /// The grants of one task under this policy.
    pub fn grants(&self, req: &Request<'_>) -> Result<Grants, Error> {
        let protected: Vec<PathBuf> = self.protected.iter().map(|p| normalize(p)).collect();
        let work_dir = normalize(req.work_dir);
        // The task's own work dir lies inside the protected work root: it is the one
        // exception, and nothing it contains is protected.
        let clashes = |path: &Path| -> Option<&PathBuf> {
            protected.iter().find(|p| {
                (within(path, p) || within(p, path)) && !within(path, &work_dir) && **p != work_dir
            })
        };
        let mut grants = Grants { read_write: vec![work_dir.clone()], ..Grants::default() };

        if let Some(root) = &req.registry_root {
            let root = normalize(root);
            for dir in [root.join("jobs").join(req.job), root.join("models")] {
                std::fs::create_dir_all(&dir)
                    .map_err(|source| Error::Io { path: dir.clone(), source })?;
                let dir = normalize(&dir);
                // The registry lies in the data dir; only these two subtrees are granted, so a
                // clash is one only when the grant *contains* a protected path.
                match protected.iter().find(|p| within(p, &dir)) {
                    Some(p) => grants.dropped.push(format!(
                        "registry dir {} (contains protected {})",
                        dir.display(),
                        p.display()
                    )),
                    None => grants.read_write.push(dir),
                }
            }
        }

        let roots: Vec<PathBuf> = self.data_roots.iter().map(|p| normalize(p)).collect();
        for dataset in &req.datasets {
            let path = normalize(dataset);
            if !roots.is_empty() && !roots.iter().any(|root| within(&path, root)) {
                return Err(Error::OutsideDataRoots {
                    path,
                    roots: roots
                        .iter()
                        .map(|r| r.display().to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                });
            }
            match clashes(&path) {
                Some(p) => grants.dropped.push(format!(
                    "dataset {} (overlaps protected {})",
                    path.display(),
                    p.display()
                )),
                None if grants.read.contains(&path) => {}
                None => grants.read.push(path),
            }
        }

        let mut exec: Vec<PathBuf> = SYSTEM_DIRS.iter().map(PathBuf::from).collect();
        exec.extend(self.read.iter().cloned());
        let files = req.programs.iter().filter_map(|p| find_program(p, req.cwd, req.path_var));
        for file in files {
            // The installation around the program: its directory's parent (`…/bin/python3` →
            // `…`), both as named (a virtual environment) and resolved (its base Python).
            for candidate in [file.clone(), normalize(&file)] {
                let install = candidate.parent().and_then(Path::parent).map(Path::to_path_buf);
                match install {
                    Some(dir) if dir.parent().is_some() && clashes(&normalize(&dir)).is_none() => {
                        exec.push(dir)
                    }
                    _ => exec.push(candidate),
                }
            }
        }
        exec.extend(req.python_paths.iter().cloned());
        for path in exec {
            let path = normalize(&path);
            if !path.exists() || grants.read_exec.contains(&path) {
                continue;
            }
            match clashes(&path) {
                Some(p) => grants.dropped.push(format!(
                    "{} (overlaps protected {})",
                    path.display(),
                    p.display()
                )),
                None => grants.read_exec.push(path),
            }
        }
        Ok(grants)
    }
}

/// A ruleset ready to be applied in the child ([`Prepared::apply`]), and what it says.
pub struct Prepared {
    ruleset: Option<(RulesetCreated, std::os::fd::OwnedFd)>,
    /// Lines for the task's log: what is in force.
    pub summary: Vec<String>,
}

impl fmt::Debug for Prepared {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Prepared")
            .field("enforced", &self.ruleset.is_some())
            .field("summary", &self.summary)
            .finish()
    }
}

impl Prepared {
    /// Nothing to enforce (mode `off`).
    pub fn none(summary: impl Into<String>) -> Self {
        Prepared { ruleset: None, summary: vec![summary.into()] }
    }

    /// Whether a ruleset will be applied.
    pub fn enforced(&self) -> bool {
        self.ruleset.is_some()
    }

    /// Makes `command`'s child restrict itself with the ruleset just before it executes.
    pub fn apply(self, command: &mut tokio::process::Command) {
        let Some((ruleset, fd)) = self.ruleset else { return };
        let mut ruleset = Some(ruleset);
        // SAFETY: the closure runs in the forked child before exec. It adds the child's own
        // `/proc/<pid>` (open, landlock_add_rule, close on a stack buffer), moves the ruleset
        // (built in the parent: every other path already opened, nothing left to allocate)
        // out of its Option and makes two system calls, prctl(PR_SET_NO_NEW_PRIVS) and
        // landlock_restrict_self; the status it returns is plain data.
        unsafe {
            command.pre_exec(move || {
                add_own_proc(std::os::fd::AsRawFd::as_raw_fd(&fd))?;
                let Some(ruleset) = ruleset.take() else {
                    return Err(std::io::Error::other("sandbox applied twice"));
                };
                match ruleset.restrict_self() {
                    Ok(status) if status.ruleset != RulesetStatus::NotEnforced => Ok(()),
                    Ok(_) => Err(std::io::Error::other("the kernel did not enforce the sandbox")),
                    Err(_) => Err(std::io::Error::other("the kernel refused the sandbox")),
                }
            });
        }
    }
}

/// Builds the ruleset of `grants` under `mode`.
pub fn prepare(mode: Mode, grants: &Grants) -> Result<Prepared, Error> {
    let mut summary = Vec::new();
    if mode == Mode::Off {
        return Ok(Prepared::none("sandbox: off (--sandbox off): task code runs unconfined"));
    }
    let support = probe();
    let Some(abi) = support.abi else {
        if mode == Mode::Required {
            return Err(Error::Unavailable(support.to_string()));
        }
        return Ok(Prepared::none(format!("sandbox: none: {support}")));
    };
    let ruleset = build(grants).map_err(Error::Landlock)?;
    let fd = ruleset
        .try_clone()
        .map_err(|source| Error::Io { path: PathBuf::from("landlock ruleset"), source })
        .map(Option::<std::os::fd::OwnedFd>::from)?;
    let Some(fd) = fd else {
        // The crate keeps no descriptor when the kernel enforces nothing.
        if mode == Mode::Required {
            return Err(Error::Unavailable(support.to_string()));
        }
        return Ok(Prepared::none(format!("sandbox: none: {support}")));
    };
    summary.push(format!(
        "sandbox: Landlock ABI {abi}; read-write: {}; read-only: {}",
        list(&grants.read_write),
        if grants.read.is_empty() { "-".to_owned() } else { list(&grants.read) },
    ));
    for dropped in &grants.dropped {
        summary.push(format!("sandbox: not granted: {dropped}"));
    }
    Ok(Prepared { ruleset: Some((ruleset, fd)), summary })
}

/// Adds the calling process's own `/proc/<pid>` (read-only) to the ruleset behind `ruleset_fd`:
/// run in the child after fork, where `/proc/self` is the child. Other processes' `/proc`
/// entries (their `environ`, `cmdline`, `mem`) stay out of reach.
///
/// # Safety
/// Async-signal-safe: three system calls and a stack buffer.
unsafe fn add_own_proc(ruleset_fd: std::os::fd::RawFd) -> std::io::Result<()> {
    /// `struct landlock_path_beneath_attr` (packed in the kernel's UAPI).
    #[repr(C, packed)]
    struct PathBeneath {
        allowed_access: u64,
        parent_fd: i32,
    }
    const LANDLOCK_RULE_PATH_BENEATH: libc::c_int = 1;
    const READ_FILE_AND_DIR: u64 = (1 << 2) | (1 << 3);
    // SAFETY: a NUL-terminated literal; the descriptor is closed below.
    let dir = unsafe {
        libc::open(c"/proc/self".as_ptr(), libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC)
    };
    if dir < 0 {
        // No /proc mounted: nothing to grant.
        return Ok(());
    }
    let attr = PathBeneath { allowed_access: READ_FILE_AND_DIR, parent_fd: dir };
    // SAFETY: `attr` is a valid landlock_path_beneath_attr that outlives the call.
    let added = unsafe {
        libc::syscall(
            libc::SYS_landlock_add_rule,
            ruleset_fd,
            LANDLOCK_RULE_PATH_BENEATH,
            &raw const attr,
            0u32,
        )
    };
    let err = std::io::Error::last_os_error();
    // SAFETY: `dir` is ours.
    unsafe { libc::close(dir) };
    if added != 0 {
        return Err(err);
    }
    Ok(())
}

fn list(paths: &[PathBuf]) -> String {
    paths.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
}

fn build(grants: &Grants) -> Result<RulesetCreated, landlock::RulesetError> {
    let all = AccessFs::from_all(TARGET_ABI);
    let read = AccessFs::ReadFile | AccessFs::ReadDir;
    let read_exec = AccessFs::from_read(TARGET_ABI);
    let device = AccessFs::ReadFile | AccessFs::WriteFile;
    let existing = |paths: &[PathBuf]| -> Vec<PathBuf> {
        paths.iter().filter(|p| p.exists()).cloned().collect()
    };
    let etc: Vec<PathBuf> = ETC_FILES.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    let devices: Vec<PathBuf> = DEVICES.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    // `/proc` only for what describes the machine; the child's own `/proc/<pid>` is added in
    // the child (`add_own_proc`), never anyone else's.
    let pseudo: Vec<PathBuf> = PSEUDO.iter().map(PathBuf::from).filter(|p| p.exists()).collect();
    let shm: Vec<PathBuf> = ["/dev/shm"].iter().map(PathBuf::from).filter(|p| p.is_dir()).collect();
    Ruleset::default()
        .set_compatibility(CompatLevel::BestEffort)
        .handle_access(all)?
        .scope(Scope::from_all(TARGET_ABI))?
        .create()?
        .add_rules(path_beneath_rules(existing(&grants.read_write), all))?
        .add_rules(path_beneath_rules(existing(&grants.read), read))?
        .add_rules(path_beneath_rules(existing(&grants.read_exec), read_exec))?
        .add_rules(path_beneath_rules(etc, read))?
        .add_rules(path_beneath_rules(pseudo, read))?
        .add_rules(path_beneath_rules(devices, device))?
        .add_rules(path_beneath_rules(shm, all))
}

/// The local path a dataset URL names: `file:///abs/dir[?query]` or a bare absolute path
/// (percent-decoded, query dropped); `None` for anything else (`https://…`, `s3://…`, a
/// relative path), which the sandbox has no file to grant for.
pub fn local_path(url: &str) -> Option<PathBuf> {
    let path = url.split_once('?').map_or(url, |(path, _)| path);
    let path = match path.split_once("://") {
        Some(("file", rest)) => rest,
        Some(_) => return None,
        None => path,
    };
    let path = percent_encoding::percent_decode_str(path).decode_utf8().ok()?;
    let path = PathBuf::from(path.as_ref());
    path.is_absolute().then_some(path)
}

#[cfg(test)]
mod tests {
    use std::process::Stdio;

    use super::*;

    fn request<'a>(work: &'a Path, datasets: Vec<PathBuf>) -> Request<'a> {
        Request {
            work_dir: work,
            programs: vec![PathBuf::from("sh")],
            cwd: work,
            path_var: Some("/usr/bin:/bin"),
            python_paths: Vec::new(),
            registry_root: None,
            job: "job-1",
            datasets,
        }
    }

    #[test]
    fn dataset_urls_name_local_paths_only() {
        assert_eq!(local_path("file:///data/mnist?shard=0&shards=4"), Some("/data/mnist".into()));
        assert_eq!(local_path("/data/my%20set"), Some("/data/my set".into()));
        assert_eq!(local_path("https://example.org/x"), None);
        assert_eq!(local_path("s3://bucket/x"), None);
        assert_eq!(local_path("file:relative/dir"), None);
        assert_eq!(local_path("relative"), None);
    }

    #[test]
    fn protected_paths_are_never_granted_and_data_roots_bound_datasets() {
        let root = tempfile::tempdir().unwrap();
        let data_dir = root.path().join("data");
        let work = data_dir.join("work/job-1/task-a");
        let datasets = root.path().join("datasets/mnist");
        for dir in [&work, &datasets] {
            std::fs::create_dir_all(dir).unwrap();
        }
        let policy = Policy { protected: vec![data_dir.clone()], ..Policy::default() };
        let mut req =
            request(&work, vec![datasets.clone(), data_dir.join("fledge.db"), "/".into()]);
        req.registry_root = Some(data_dir.join("registry"));
        let grants = policy.grants(&req).unwrap();
        let data_dir = data_dir.canonicalize().unwrap();
        assert_eq!(
            grants.read_write,
            [
                work.canonicalize().unwrap(),
                data_dir.join("registry/jobs/job-1"),
                data_dir.join("registry/models")
            ],
            "own work dir and own registry dirs, created"
        );
        assert_eq!(grants.read, [datasets.canonicalize().unwrap()], "{grants:?}");
        assert_eq!(grants.dropped.len(), 2, "the database and / are dropped: {:?}", grants.dropped);
        assert!(grants.read_exec.contains(&PathBuf::from("/usr")), "{grants:?}");
        assert!(!grants.read_exec.iter().any(|p| p.starts_with(&data_dir) || data_dir.starts_with(p) && p != Path::new("/")));

        // With data roots, a dataset elsewhere stops the task with a message naming both.
        let policy = Policy { data_roots: vec![root.path().join("elsewhere")], ..policy };
        let err = policy.grants(&request(&work, vec![datasets.clone()])).unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains("mnist")
                && text.contains("elsewhere")
                && text.contains("--sandbox-data-root"),
            "{text}"
        );
    }

    #[test]
    fn a_program_installed_inside_a_protected_path_is_granted_alone() {
        let root = tempfile::tempdir().unwrap();
        let secret = root.path().join("install/secret.db");
        let bin = root.path().join("install/bin");
        std::fs::create_dir_all(&bin).unwrap();
        std::fs::write(&secret, "x").unwrap();
        std::fs::write(bin.join("tool"), "#!/bin/sh\n").unwrap();
        let work = root.path().join("work");
        std::fs::create_dir_all(&work).unwrap();
        let policy = Policy { protected: vec![secret], ..Policy::default() };
        let mut req = request(&work, Vec::new());
        req.programs = vec![bin.join("tool")];
        let grants = policy.grants(&req).unwrap();
        let tool = bin.join("tool").canonicalize().unwrap();
        assert!(grants.read_exec.contains(&tool), "{grants:?}");
        assert!(!grants.read_exec.contains(&root.path().join("install").canonicalize().unwrap()));
    }

    /// Runs `script` under the sandbox of a task whose work dir is `work`; returns its stdout.
    async fn confined(work: &Path, script: &str, mode: Mode) -> Result<String, String> {
        let grants = Policy::default().grants(&request(work, Vec::new())).unwrap();
        let prepared = prepare(mode, &grants).map_err(|e| e.to_string())?;
        let mut command = tokio::process::Command::new("sh");
        command.arg("-c").arg(script).current_dir(work).stdout(Stdio::piped());
        prepared.apply(&mut command);
        let out = command.output().await.map_err(|e| e.to_string())?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    #[tokio::test]
    async fn the_kernel_confines_the_code_to_its_grants() {
        let root = tempfile::tempdir().unwrap();
        let work = root.path().join("work");
        let other = root.path().join("other-job");
        for dir in [&work, &other] {
            std::fs::create_dir_all(dir).unwrap();
        }
        std::fs::write(other.join("secret"), "other job's key").unwrap();
        let parent = std::process::id();
        let script = format!(
            "echo mine > own && cat own; \
             cat {other}/secret 2>/dev/null || echo denied-read; \
             echo x > {other}/planted 2>/dev/null || echo denied-write; \
             head -c 9 /proc/{parent}/environ >/dev/null 2>&1 || echo denied-environ; \
             head -c 1 /etc/hostname >/dev/null 2>&1 || echo denied-etc; \
             read -r line < /proc/$$/status && echo own-proc",
            other = other.display()
        );
        let support = probe();
        if support.abi.is_none() {
            // Without Landlock: `auto` runs unconfined and says so, `required` refuses.
            let err = confined(&work, &script, Mode::Required).await.unwrap_err();
            assert!(err.contains("required"), "{err}");
            let out = confined(&work, &script, Mode::Auto).await.unwrap();
            assert!(out.contains("other job's key"), "{out}");
            return;
        }
        let out = confined(&work, &script, Mode::Auto).await.unwrap();
        assert_eq!(
            out.lines().collect::<Vec<_>>(),
            ["mine", "denied-read", "denied-write", "denied-environ", "denied-etc", "own-proc"],
            "{out}"
        );
        assert!(!other.join("planted").exists());
        // Off means off.
        let out = confined(&work, &script, Mode::Off).await.unwrap();
        assert!(out.contains("other job's key"), "{out}");
    }
}

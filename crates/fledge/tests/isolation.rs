//! Issue 13 item 1 end to end, through the real binaries: a job's code gets an allowlisted
//! environment. `fledge standalone` runs with secrets in its environment (as an operator's
//! shell would have them); a trainer whose entrypoint dumps its environment, then runs the
//! built-in trainer, sees none of them, and its HOME and TMPDIR are inside its work dir.
//!
//! Issue 13 item 2: a trainer whose code goes after the admin token, the control plane's
//! database and CA key, another job's work dir, keys and model, and every other process's
//! environment (the compute key, other workers' task keys) gets none of them: the sandbox
//! (Landlock) refuses each, the job completes, and its log says what was tried.

// Helpers outside #[test] functions too: a panic is the failure report.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use support::{Platform, example_with_rounds};

const CANARIES: [(&str, &str); 3] = [
    ("FLEDGE_DEPLOYER_API_KEY", "canary-compute-key-5c1f"),
    ("AWS_SECRET_ACCESS_KEY", "canary-cloud-secret-77d2"),
    ("FLEDGE_POSTGRES_URL", "postgres://admin:canary-db-password-91aa@db/fledge"),
];

#[test]
fn a_jobs_code_sees_none_of_the_platforms_environment() {
    let platform = Platform::start_with_env(&CANARIES);
    let dir = example_with_rounds(&platform, "mnist", "mnist", 2);
    // The trainer dumps its environment into its working directory, then trains as usual.
    std::fs::write(
        dir.join("code/trainer/fledge-role.toml"),
        r#"command = ["sh", "-c", "env > leaked-env.txt && exec \"$FLEDGE_BIN\" run-task \"$1\" --role-kind mnist-mlp-trainer", "sh", "{config}"]
"#,
    )
    .unwrap();
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "the job failed:\n{}", outcome.output);

    let work = platform.data_dir().join("work").join(&outcome.job);
    let mut dumps = 0;
    for task in std::fs::read_dir(&work).unwrap().flatten() {
        let dump = task.path().join("code/leaked-env.txt");
        let Ok(env) = std::fs::read_to_string(&dump) else {
            continue;
        };
        dumps += 1;
        for (name, secret) in CANARIES {
            assert!(!env.contains(secret), "{name} reached the task code:\n{env}");
        }
        let var = |name: &str| {
            env.lines()
                .find_map(|l| l.strip_prefix(&format!("{name}=")))
                .unwrap_or_else(|| panic!("no {name} in:\n{env}"))
                .to_owned()
        };
        let task_dir = task.path().canonicalize().unwrap();
        for name in ["HOME", "TMPDIR"] {
            let value = std::path::PathBuf::from(var(name));
            assert!(
                value.starts_with(&task_dir),
                "{name}={} is outside {}",
                value.display(),
                task_dir.display()
            );
        }
        // What the task needs is there: its own id and key, nothing of another task.
        assert_eq!(var("FLEDGE_TASK_ID"), task.file_name().to_string_lossy());
        let names: Vec<&str> =
            env.lines().filter_map(|l| l.split_once('=').map(|(k, _)| k)).collect();
        assert!(!names.iter().any(|n| n.contains("TOKEN") || n.contains("SECRET")), "{names:?}");
    }
    assert_eq!(dumps, 4, "every trainer dumped its environment");
}

/// The attacker: a trainer's entrypoint that tries everything a job's code should not get,
/// writes what it tried and what came of it into `attempts.txt` (and its log), then trains as
/// usual. `TARGETS` come from the test: the paths an attacker on this machine would guess.
const ATTACK: &str = r#"
import os, sys, json
targets = json.loads(os.environ.get("ATTACK_TARGETS") or open("targets.json").read())
own = os.getpid()
lines = []
def attempt(what, path, action):
    try:
        result = action(path)
        lines.append(f"GOT {what} {path} {result}")
    except OSError as err:
        lines.append(f"DENIED {what} {path} errno={err.errno}")
def read(path):
    with open(path, "rb") as f:
        return f"{len(f.read())} bytes"
def listdir(path):
    return f"{len(os.listdir(path))} entries"
def write(path):
    with open(path, "wb") as f:
        f.write(b"planted by a job")
    return "written"
for what, path in targets["read"]:
    attempt(what, path, read)
for what, path in targets["list"]:
    attempt(what, path, listdir)
for what, path in targets["write"]:
    attempt(what, path, write)
# Every other process's environment: the control plane's (its compute key), the
# deployer's, other workers' (their task keys). /proc cannot be listed, so every pid is tried.
attempt("list", "/proc", listdir)
try:
    with open(f"/proc/{own}/environ", "rb") as f:
        lines.append(f"OWN environ readable {len(f.read())} bytes")
except OSError as err:
    lines.append(f"OWN environ unreadable errno={err.errno}")
for pid in range(1, 200000):
    if pid == own:
        continue
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = f.read()
        lines.append(f"GOT environ /proc/{pid}/environ {len(env)} bytes")
    except OSError:
        pass
lines.append("ATTACK DONE")
with open("attempts.txt", "w") as f:
    f.write("\n".join(lines) + "\n")
for line in lines:
    print("[attack]", line, flush=True)
config = sys.argv[1]
os.execv(os.environ["FLEDGE_BIN"], [os.environ["FLEDGE_BIN"], "run-task", config, "--role-kind", "mnist-mlp-trainer"])
"#;

#[test]
fn a_jobs_code_cannot_read_the_platform_or_other_jobs() {
    let platform = Platform::start_with_env(&CANARIES);
    // A first job, whose work dirs, keys and models the second one's code goes after.
    let first_dir = example_with_rounds(&platform, "mnist", "first", 2);
    let first = platform.run_dir(&first_dir);
    assert!(first.success, "the first job failed:\n{}", first.output);
    let first = first.job;
    let data = platform.data_dir();
    let first_model = find_file(&data.join("registry/jobs").join(&first), "final.safetensors");
    let first_work = data.join("work").join(&first);
    let first_task = std::fs::read_dir(&first_work).unwrap().flatten().next().unwrap().path();

    let dir = example_with_rounds(&platform, "mnist", "mnist", 2);
    std::fs::write(dir.join("code/trainer/attack.py"), ATTACK).unwrap();
    let path = |p: std::path::PathBuf| p.display().to_string();
    let targets = serde_json::json!({
        "read": [
            ["admin-token", path(platform.cli_config.clone())],
            ["database", path(data.join("fledge.db"))],
            ["ca-key", path(data.join("tls/ca.key"))],
            ["other-job-config", path(first_task.join("config.json"))],
            ["other-job-log", path(first_task.join("task.log"))],
            ["other-job-model", path(first_model.clone())],
            ["standalone-log", path(platform.scratch().join("standalone.log"))],
        ],
        "list": [
            ["data-dir", path(data.clone())],
            ["work-root", path(data.join("work"))],
            ["other-job-work", path(first_work.clone())],
            ["registry-jobs", path(data.join("registry/jobs"))],
        ],
        "write": [
            ["plant-in-data-dir", path(data.join("planted"))],
            ["plant-in-other-job", path(first_task.join("code/planted"))],
            ["overwrite-other-model", path(first_model.clone())],
        ],
    });
    // Each target exists, so that a refusal can only be the sandbox's (EACCES), not ENOENT.
    for kind in ["read", "list"] {
        for target in targets[kind].as_array().unwrap() {
            let target = target[1].as_str().unwrap();
            assert!(std::path::Path::new(target).exists(), "{target} is missing");
        }
    }
    let model_before = std::fs::read(&first_model).unwrap();
    std::fs::write(dir.join("code/trainer/targets.json"), targets.to_string()).unwrap();
    std::fs::write(
        dir.join("code/trainer/fledge-role.toml"),
        "command = [\"python3\", \"attack.py\", \"{config}\"]\n",
    )
    .unwrap();
    let outcome = platform.run_dir(&dir);
    assert!(outcome.success, "the attacked job failed:\n{}", outcome.output);

    let work = data.join("work").join(&outcome.job);
    let mut attackers = 0;
    for task in std::fs::read_dir(&work).unwrap().flatten() {
        let Ok(report) = std::fs::read_to_string(task.path().join("code/attempts.txt")) else {
            continue;
        };
        attackers += 1;
        assert!(report.contains("ATTACK DONE"), "{report}");
        let got: Vec<&str> = report.lines().filter(|l| l.starts_with("GOT")).collect();
        assert!(got.is_empty(), "the job's code got what it must not:\n{report}");
        // 7 reads, 5 listings, 3 writes, each refused by the kernel (EACCES).
        let denied: Vec<&str> = report.lines().filter(|l| l.starts_with("DENIED")).collect();
        assert_eq!(denied.len(), 15, "{report}");
        // The scan could read an environment where one is allowed: its own.
        assert!(report.contains("OWN environ readable"), "{report}");
        assert!(denied.iter().all(|l| l.ends_with("errno=13")), "{report}");
        // What it tried, and the sandbox it ran in, are in the task's log at the control plane.
        let task_id = task.file_name().to_string_lossy().into_owned();
        let out = platform.fledgectl().args(["logs", &outcome.job, &task_id]).output().unwrap();
        let log = String::from_utf8_lossy(&out.stdout);
        assert!(log.contains("[attack] DENIED admin-token"), "{log}");
        assert!(log.contains("[fledgelet] sandbox: Landlock ABI"), "{log}");
    }
    assert_eq!(attackers, 4, "every trainer ran the attack");
    assert!(!data.join("planted").exists());
    assert!(!first_task.join("code/planted").exists());
    assert_eq!(std::fs::read(&first_model).unwrap(), model_before, "the first job's model");
}

/// The first file named `name` under `dir`.
fn find_file(dir: &std::path::Path, name: &str) -> std::path::PathBuf {
    fn walk(dir: &std::path::Path, name: &str) -> Option<std::path::PathBuf> {
        std::fs::read_dir(dir).ok()?.flatten().find_map(|entry| {
            let path = entry.path();
            if path.file_name().is_some_and(|n| n == name) {
                Some(path)
            } else if path.is_dir() {
                walk(&path, name)
            } else {
                None
            }
        })
    }
    walk(dir, name).unwrap_or_else(|| panic!("no {name} under {}", dir.display()))
}

//! Issue 13 item 1 end to end, through the real binaries: a job's code gets an allowlisted
//! environment. `fledge standalone` runs with secrets in its environment (as an operator's
//! shell would have them); a trainer whose entrypoint dumps its environment, then runs the
//! built-in trainer, sees none of them, and its HOME and TMPDIR are inside its work dir.

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

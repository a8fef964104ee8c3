//! Every example the platform orchestrates completes over an operator's Mosquitto with TLS
//! (issue 12): `fledge standalone` provisions the Mosquitto that `scripts/test-all` starts
//! (dynamic-security plugin, TLS listener with a CA of its own) through its admin client, task
//! configs name `mqtts://` and that CA, and the workers (real `fledge fledgelet` processes) log
//! in with the credentials the control plane issued for their job only.
//!
//! Needs `FLEDGE_MOSQUITTO_AUTH_TLS_URL`, `FLEDGE_MOSQUITTO_AUTH_TLS_CA`,
//! `FLEDGE_MOSQUITTO_AUTH_ADMIN` and `FLEDGE_MOSQUITTO_AUTH_ADMIN_PASSWORD` (set by
//! `scripts/test-all`); skipped, saying so, without them.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use fledge_types::{JobState, TaskState};

use support::{Platform, example_with_rounds};

/// The examples a platform runs on its own (not the participant-run one, not the local
/// simulations, not those that need Python packages), with the rounds each runs here.
const EXAMPLES: &[(&str, u64)] = &[
    ("mnist", 3),
    ("hierarchical-mnist", 2),
    ("async-two-tier", 2),
    ("async-hierarchical-mnist", 2),
    ("coordinated-hierarchical-mnist", 2),
    ("distributed-ring", 2),
    ("hybrid-mnist", 2),
    ("parallel-experiments-mnist", 2),
    ("vertical-breast-cancer", 2),
];

#[tokio::test(flavor = "multi_thread")]
async fn every_example_completes_over_a_provisioned_mosquitto_with_tls() {
    let vars = [
        "FLEDGE_MOSQUITTO_AUTH_TLS_URL",
        "FLEDGE_MOSQUITTO_AUTH_TLS_CA",
        "FLEDGE_MOSQUITTO_AUTH_ADMIN",
        "FLEDGE_MOSQUITTO_AUTH_ADMIN_PASSWORD",
    ];
    let values: Vec<String> = vars.iter().filter_map(|v| std::env::var(v).ok()).collect();
    let [url, ca, admin, password] = &values[..] else {
        eprintln!("{} not all set: skipping (scripts/test-all sets them)", vars.join(", "));
        return;
    };
    assert!(url.starts_with("mqtts://"), "{url}");
    let scratch = tempfile::tempdir().unwrap();
    let config = scratch.path().join("fledge.toml");
    std::fs::write(
        &config,
        format!(
            "[broker]\nadvertise = {url:?}\nca_file = {ca:?}\n\n\
             [mosquitto]\nadmin_url = {url:?}\nadmin_username = {admin:?}\nsweep_interval_secs = 0.5\n"
        ),
    )
    .unwrap();
    let platform = Platform::start_with_env_and(
        &[("FLEDGE_MOSQUITTO_ADMIN_PASSWORD", password)],
        &["--config".to_owned(), config.display().to_string()],
    );

    for (example, rounds) in EXAMPLES {
        let dir = example_with_rounds(&platform, example, example, *rounds);
        let outcome = platform.run_dir(&dir);
        assert!(outcome.success, "{example} over Mosquitto:\n{}", outcome.output);
        let (job, tasks, _) = platform.job(&outcome.job).await;
        assert_eq!(job.state, JobState::Completed, "{example}: {job:?}");
        assert!(tasks.iter().all(|t| t.state == TaskState::Completed), "{example}: {tasks:?}");
    }

    // The jobs went through Mosquitto: the embedded broker, which still listens, admitted no one.
    let (status, metrics) = platform.get_text("/metrics").await;
    assert_eq!(status, 200, "{metrics}");
    let accepted = metrics
        .lines()
        .find(|l| l.starts_with("fledge_broker_logins_total{result=\"accepted\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .map_or(0.0, |v| v.parse::<f64>().unwrap());
    assert_eq!(accepted, 0.0, "tasks logged in to the embedded broker:\n{metrics}");
}

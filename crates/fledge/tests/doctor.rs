//! `fledge doctor` through the real binary: a fresh directory passes, a running standalone is
//! recognised, and each problem an operator can hit (a taken port, a certificate for other
//! names, an unreachable MLflow, a server that is not MLflow) is named, with exit code 1 where
//! a start or a job would fail; a live MLflow (`FLEDGE_MLFLOW_URL`) passes and is described.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::net::TcpListener;
use std::path::Path;
use std::process::Command;

use serde_json::Value;
use support::Platform;

/// Runs `fledge doctor ARGS -o json`: the exit code and each check's `(status, detail)`.
fn doctor(dir: &Path, args: &[&str]) -> (i32, Vec<(String, String, String)>) {
    doctor_with_env(dir, args, &[])
}

/// [`doctor`] with `env` set (and no MLflow variables of the caller's).
fn doctor_with_env(
    dir: &Path,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, Vec<(String, String, String)>) {
    let out = Command::new(env!("CARGO_BIN_EXE_fledge"))
        .arg("doctor")
        .args(args)
        .args(["-o", "json"])
        .current_dir(dir)
        .env_remove("MLFLOW_TRACKING_URI")
        .env_remove("MLFLOW_TRACKING_TOKEN")
        .env_remove("FLEDGE_MLFLOW_TOKEN")
        .env_remove("FLEDGE_MLFLOW_SERVERS")
        .envs(env.iter().copied())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let checks: Vec<Value> = serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let checks = checks
        .iter()
        .map(|c| {
            let s = |k: &str| c[k].as_str().unwrap().to_owned();
            (s("check"), s("status"), s("detail"))
        })
        .collect();
    (out.status.code().unwrap(), checks)
}

fn find<'a>(checks: &'a [(String, String, String)], name: &str) -> &'a (String, String, String) {
    checks.iter().find(|c| c.0 == name).unwrap_or_else(|| panic!("no {name} check in {checks:?}"))
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

#[test]
fn a_fresh_directory_passes_and_a_taken_port_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let args = ["standalone", "--data-dir", "data", "--port", &port];
    let (code, checks) = doctor(dir.path(), &args);
    assert_eq!(code, 0, "{checks:#?}");
    assert!(find(&checks, "tls").2.contains("will be created"), "{checks:#?}");
    assert!(find(&checks, "store").2.contains("will be created"), "{checks:#?}");
    assert_eq!(find(&checks, "apiserver listener").1, "ok");
    assert!(!dir.path().join("data").exists(), "the doctor creates nothing");

    // Something that is not Fledge holds the apiserver's port.
    let _squatter = TcpListener::bind(format!("127.0.0.1:{port}")).unwrap();
    let (_, checks) = doctor(dir.path(), &args);
    let listener = find(&checks, "apiserver listener");
    assert_eq!(listener.1, "warn", "{listener:?}");
    assert!(listener.2.contains("is in use"), "{listener:?}");
}

#[test]
fn a_running_standalone_is_recognised_and_its_certificate_checked() {
    let platform = Platform::start_on_fixed_ports();
    let port = platform.endpoint.rsplit(':').next().unwrap().trim_end_matches('/').to_owned();
    let data = platform.data_dir();
    let data = data.to_str().unwrap();
    let (code, checks) =
        doctor(platform.scratch(), &["standalone", "--data-dir", data, "--port", &port]);
    assert_eq!(code, 0, "{checks:#?}");
    let tls = find(&checks, "tls");
    assert_eq!(tls.1, "ok", "{tls:?}");
    assert!(tls.2.contains("valid for") && tls.2.contains("127.0.0.1"), "{tls:?}");
    let api = find(&checks, "apiserver listener");
    assert!(api.2.contains("a Fledge apiserver is running there"), "{api:?}");
    let notifier = find(&checks, "notifier listener");
    assert_eq!(notifier.1, "ok", "held by the same Fledge: {notifier:?}");
}

#[test]
fn a_certificate_for_other_names_fails_and_so_does_a_dead_mlflow() {
    let dir = tempfile::tempdir().unwrap();
    let tls = dir.path().join("operator-tls");
    fledge_tls::install_default_provider();
    fledge_tls::ensure_dir(&tls, &["fledge.example".to_owned()]).unwrap();
    let file = |name: &str| tls.join(name).display().to_string();
    let (cert, key, ca) = (file("server.pem"), file("server.key"), file("ca.pem"));
    let port = free_port().to_string();
    let (code, checks) = doctor(
        dir.path(),
        &[
            "serve",
            "--data-dir",
            "data",
            "--apiserver-listen",
            &format!("127.0.0.1:{port}"),
            "--tls-cert",
            &cert,
            "--tls-key",
            &key,
            "--tls-ca",
            &ca,
            "--mlflow-url",
            "http://127.0.0.1:1",
        ],
    );
    assert_eq!(code, 1, "{checks:#?}");
    let tls = find(&checks, "tls");
    assert_eq!(tls.1, "fail", "{tls:?}");
    assert!(tls.2.contains("not valid for"), "{tls:?}");
    let mlflow = find(&checks, "mlflow");
    assert_eq!(mlflow.1, "fail", "{mlflow:?}");
    assert!(mlflow.2.contains("http://127.0.0.1:1"), "the URL is named: {mlflow:?}");
}

#[test]
fn a_bad_configuration_is_one_failed_check() {
    let dir = tempfile::tempdir().unwrap();
    let (code, checks) =
        doctor(dir.path(), &["serve", "--apiserver-listen", "0.0.0.0:0", "--insecure"]);
    assert_eq!(code, 1);
    let config = find(&checks, "configuration");
    assert_eq!(config.1, "fail");
    assert!(config.2.contains("not a loopback address"), "{config:?}");
}

/// The `mlflow` checks of `checks`.
fn mlflow_checks(checks: &[(String, String, String)]) -> Vec<(String, String)> {
    checks.iter().filter(|c| c.0 == "mlflow").map(|c| (c.1.clone(), c.2.clone())).collect()
}

#[test]
fn a_server_that_is_not_mlflow_fails_the_check() {
    // Answers every request with a web page, as a wrong port or a proxy's login page would.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        use std::io::{Read as _, Write as _};
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = stream.read(&mut buf);
            let page = "<html>hello</html>";
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{page}",
                page.len()
            );
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let (code, checks) = doctor_with_env(dir.path(), &["--mlflow-url", &url], &[]);
    assert_eq!(code, 1, "{checks:#?}");
    let mlflow = mlflow_checks(&checks);
    assert_eq!(mlflow.len(), 1, "{mlflow:?}");
    assert_eq!(mlflow[0].0, "fail", "{mlflow:?}");
    assert!(
        mlflow[0].1.contains(&url) && mlflow[0].1.contains("does not answer as an MLflow"),
        "{mlflow:?}"
    );
}

#[test]
fn a_live_mlflow_passes_and_is_described() {
    let url = match std::env::var("FLEDGE_MLFLOW_URL") {
        Ok(url) if !url.is_empty() => url.trim_end_matches('/').to_owned(),
        _ => {
            eprintln!("FLEDGE_MLFLOW_URL is not set: the live MLflow doctor check is skipped");
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    // Named on the command line, no token.
    let (_, checks) = doctor_with_env(dir.path(), &["--mlflow-url", &url], &[]);
    let mlflow = mlflow_checks(&checks);
    assert_eq!(mlflow.len(), 1, "{mlflow:?}");
    assert_eq!(mlflow[0].0, "ok", "{mlflow:?}");
    let detail = &mlflow[0].1;
    assert!(detail.starts_with(&format!("{url}: MLflow ")), "{detail}");
    assert!(!detail.contains("version not told"), "the server tells its version: {detail}");
    assert!(detail.contains("proxies artifacts") && detail.contains("none set"), "{detail}");
    // Configured as the operator's server with a token: checked under it, once.
    let (_, checks) = doctor_with_env(
        dir.path(),
        &["--mlflow-url", &format!("{url}/")],
        &[("FLEDGE_MLFLOW_SERVERS", &url), ("FLEDGE_MLFLOW_TOKEN", "a-token")],
    );
    let mlflow = mlflow_checks(&checks);
    assert_eq!(mlflow.len(), 1, "{mlflow:?}");
    assert_eq!(mlflow[0].0, "ok", "{mlflow:?}");
    assert!(mlflow[0].1.ends_with("with the token"), "{mlflow:?}");
    // A token for no server: a warning, and the server is checked without it.
    let (_, checks) =
        doctor_with_env(dir.path(), &["--mlflow-url", &url], &[("FLEDGE_MLFLOW_TOKEN", "a-token")]);
    let mlflow = mlflow_checks(&checks);
    assert_eq!(mlflow.len(), 2, "{mlflow:?}");
    assert_eq!(mlflow[0].0, "warn", "{mlflow:?}");
    assert!(mlflow[0].1.contains("FLEDGE_MLFLOW_SERVERS"), "{mlflow:?}");
    assert_eq!(mlflow[1].0, "ok", "{mlflow:?}");
    assert!(mlflow[1].1.contains("without a token"), "{mlflow:?}");
}

#[test]
fn a_compute_checks_it_reaches_every_endpoint_its_workers_use() {
    let platform = Platform::start_on_fixed_ports();
    let base: u16 =
        platform.endpoint.rsplit(':').next().unwrap().trim_end_matches('/').parse().unwrap();
    let dir = platform.scratch();
    std::fs::write(
        dir.join("site.json"),
        r#"{"computeId": "site-a", "region": "eu", "apiKey": "site-a-key-0123456789abcdef", "platform": "process"}"#,
    )
    .unwrap();
    let out = platform
        .fledgectl()
        .args(["create", "compute", "site.json"])
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ca = platform.data_dir().join("tls/ca.pem");
    let config = |key: &str| {
        let file = dir.join(format!("deployer-{key}.toml"));
        std::fs::write(
            &file,
            format!(
                "services = [\"deployer\"]\ndata_dir = \"{}\"\n[deployer]\ncompute_id = \"site-a\"\n\
                 api_key = \"{key}\"\napiserver = \"{}\"\nnotifier = \"https://127.0.0.1:{}\"\n\
                 ca_file = \"{}\"\n",
                dir.join("site-data").display(),
                platform.endpoint.trim_end_matches('/'),
                base + 1,
                ca.display()
            ),
        )
        .unwrap();
        file.display().to_string()
    };
    let (code, checks) =
        doctor(dir, &["serve", "--config", &config("site-a-key-0123456789abcdef")]);
    let reach: Vec<_> = checks.iter().filter(|c| c.0 == "compute reach").collect();
    assert_eq!(code, 0, "{checks:#?}");
    let details: Vec<&str> = reach.iter().map(|c| c.2.as_str()).collect();
    assert!(reach.iter().all(|c| c.1 == "ok"), "{reach:#?}");
    assert!(details[0].contains("accepts compute site-a's key"), "{details:?}");
    for what in ["notifier https://127.0.0.1:", "broker mqtts://", "metaserver "] {
        assert!(
            details.iter().any(|d| d.starts_with(what) && d.ends_with("accepts connections")),
            "{what} missing from {details:#?}"
        );
    }
    // A wrong key is named, and nothing else is tried.
    let (code, checks) = doctor(dir, &["serve", "--config", &config("not-the-key-0123456789")]);
    assert_eq!(code, 1, "{checks:#?}");
    let reach: Vec<_> = checks.iter().filter(|c| c.0 == "compute reach").collect();
    assert_eq!(reach.len(), 1, "{reach:#?}");
    assert!(reach[0].1 == "fail" && reach[0].2.contains("deployer.api_key"), "{reach:#?}");
}

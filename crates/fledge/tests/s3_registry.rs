//! A platform-run job whose model spec names an `s3` registry, through the real binaries and
//! an S3-compatible server (`FLEDGE_S3_URL`, moto's, started by `scripts/test-all`): the
//! operator names the credentials in `[deployer] registry_env`, the built-in aggregator gets
//! them (user code never does: `fledge-agent`'s `process::registry_env`), and the job's
//! checkpoints, final model and metrics land in the bucket; the apiserver, which has the same
//! credentials, lists and serves them to `fledgectl get models` / `get model`.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use std::io::{Read as _, Write as _};

use support::{Platform, example_with_rounds, records_of, repo_root};

/// One unsigned HTTP request to the S3-compatible server (moto accepts them): status and body.
fn s3(url: &str, method: &str, path: &str) -> (u16, String) {
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    let status = answer.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, answer)
}

#[test]
fn a_platform_run_job_keeps_its_models_in_an_s3_bucket() {
    let Some(url) = std::env::var("FLEDGE_S3_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("FLEDGE_S3_URL is not set: the s3 registry end-to-end test is skipped");
        return;
    };
    let bucket = format!("platform-{}", std::process::id());
    assert_eq!(s3(&url, "PUT", &format!("/{bucket}")).0, 200);
    let config = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        config.path(),
        "[deployer]\nregistry_env = [\"AWS_ACCESS_KEY_ID\", \"AWS_SECRET_ACCESS_KEY\", \
         \"AWS_REGION\", \"AWS_ENDPOINT_URL\"]\n",
    )
    .unwrap();
    let platform = Platform::start_with_env_and(
        &[
            ("AWS_ACCESS_KEY_ID", "fledge-test"),
            ("AWS_SECRET_ACCESS_KEY", "fledge-test-secret"),
            ("AWS_REGION", "us-east-1"),
            ("AWS_ENDPOINT_URL", &url),
        ],
        &["--config".to_owned(), config.path().display().to_string()],
    );
    let dir = example_with_rounds(&platform, "mnist", "mnist-s3", 3);
    let spec_path = dir.join("modelSpec.json");
    let mut spec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&spec_path).unwrap()).unwrap();
    spec["registry"] = serde_json::json!({"sort": "s3", "uri": format!("s3://{bucket}/team-a")});
    std::fs::write(&spec_path, serde_json::to_string_pretty(&spec).unwrap()).unwrap();

    let run = platform.run_dir(&dir);
    assert!(run.success, "{}", run.output);
    let (status, listing) = s3(&url, "GET", &format!("/{bucket}?prefix=team-a/jobs/{}/", run.job));
    assert_eq!(status, 200, "{listing}");
    for key in
        ["rounds/round-00001.safetensors", "rounds/round-00003.safetensors", "final.safetensors"]
    {
        let key = format!("team-a/jobs/{}/{key}", run.job);
        assert!(listing.contains(&format!("<Key>{key}</Key>")), "{key} missing: {listing}");
    }
    assert!(listing.contains("/metrics/"), "metric records in the bucket: {listing}");

    // The apiserver has the credentials too: it lists the job's models from the bucket and
    // serves the final one, which evaluates to the accuracy the job reported.
    let out =
        platform.fledgectl().args(["get", "models", &run.job, "-o", "json"]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let listed: Vec<fledge_types::ModelFile> = serde_json::from_slice(&out.stdout).unwrap();
    let rounds: Vec<Option<u64>> = listed.iter().map(|f| f.round).collect();
    assert_eq!(rounds, [Some(1), Some(2), Some(3), None], "{listed:?}");
    let file = platform.scratch().join("s3-final.safetensors");
    let out =
        platform.fledgectl().args(["get", "model", &run.job, "-f"]).arg(&file).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let bytes = std::fs::read(&file).unwrap();
    assert_eq!(bytes.len() as u64, listed[3].size);
    let weights = fledge_sdk::registry::from_safetensors("final", &bytes).unwrap();
    let data = format!("file://{}", repo_root().join("examples/data").display());
    let mut evaluator = fledge_models::MnistEvaluator::new(&data, 128).unwrap();
    let evaluated = fledge_sdk::Evaluator::evaluate(&mut evaluator, &weights).unwrap()["accuracy"];
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let (_, _, records) = runtime.block_on(platform.job(&run.job));
    let reported = records_of(&records, "aggregator").last().unwrap().metrics["global.accuracy"];
    assert!((evaluated - reported).abs() < 1e-6, "downloaded {evaluated}, reported {reported}");
    eprintln!("s3: {} model files listed; the final model evaluates to {evaluated}", listed.len());
}

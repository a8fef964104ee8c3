//! One conformance suite for every registry a job can name (`modelSpec.registry`): the
//! contract the roles rely on, checked through the [`Registry`] trait only, against each
//! registry built the way a task builds its own ([`fledge_sdk::registry::for_task`]).
//!
//! - `local`: always;
//! - `mlflow`: against the real tracking server of `FLEDGE_MLFLOW_URL` (started by
//!   `scripts/test-all`), skipped with a message without it;
//! - `s3`: against the S3-compatible server of `FLEDGE_S3_URL` (moto's server, started by
//!   `scripts/test-all`), in a bucket of its own, skipped with a message without it.
//!
//! What a registry must do:
//! - a base model that was never saved loads as `None`, not an error;
//! - a saved model loads back bit for bit (NaN payloads, signed zeros, subnormals, infinities),
//!   with its tensors in the order they were saved, each version on its own;
//! - a name that is not a safe path component is refused, and nothing is stored for it;
//! - rounds, the final model and metric records are accepted for the task's own job, and
//!   `finish` returns once they are stored;
//! - resume state: none before the first save; after a save, exactly what was saved; a second
//!   save replaces the first whole (no optimizer moment survives from it); each task has its
//!   own;
//! - recent metrics, where a registry keeps them, are this task's own records, as appended.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use fledge_algorithms::{ServerState, Tensor, Weights};
use fledge_sdk::registry::{self, Registry, ResumeState};
use fledge_types::{MetricRecord, RegistrySpec, TaskConfig, TaskId};
use serde_json::json;

/// A name no other run of the tests has used (MLflow keeps registered models forever).
fn unique(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap();
    format!("{prefix}-{}-{}", std::process::id(), nanos.as_nanos())
}

/// Task `index` of a fresh two-trainer job whose registry is `spec`.
fn config(spec: &RegistrySpec, index: usize) -> TaskConfig {
    let job = unique("conformance");
    let plan = fledge_sdk::plan::JobPlan::local(&job, vec!["/d1".to_owned(), "/d2".to_owned()]);
    let mut config = plan.configs().unwrap().remove(index);
    config.registry = spec.clone();
    config.job.name = format!("{job}-model");
    config.job.design = "fledge-registry-conformance".into();
    config
}

/// Values whose bits a registry must keep: NaN with a payload, -0.0, the smallest subnormal,
/// both infinities.
fn awkward() -> Vec<f32> {
    vec![
        f32::from_bits(0x7fc0_1234),
        -0.0,
        f32::from_bits(1),
        f32::INFINITY,
        f32::NEG_INFINITY,
        1.5,
    ]
}

/// A model whose tensor names are not in sorted order (safetensors sorts its own).
fn model(v: f32) -> Weights {
    Weights::from_tensors(vec![
        Tensor::new("z.weight", vec![2, 3], awkward()).unwrap(),
        Tensor::new("a.bias", vec![2], vec![v, -v]).unwrap(),
        Tensor::new("m.scale", vec![], vec![v * 3.0]).unwrap(),
    ])
    .unwrap()
}

/// `a` and `b` hold the same tensors, in the same order, with the same bits.
fn assert_same_bits(a: &Weights, b: &Weights, what: &str) {
    let names = |w: &Weights| w.tensors().iter().map(|t| t.name().to_owned()).collect::<Vec<_>>();
    assert_eq!(names(a), names(b), "{what}: tensor order");
    for (x, y) in a.tensors().iter().zip(b.tensors()) {
        assert_eq!(x.shape(), y.shape(), "{what}: shape of {}", x.name());
        let bits = |t: &Tensor| t.data().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(x), bits(y), "{what}: bits of {}", x.name());
    }
}

fn record(task: &TaskId, round: u64, accuracy: f64) -> MetricRecord {
    MetricRecord {
        task_id: task.clone(),
        role: "aggregator".into(),
        round,
        metrics: BTreeMap::from([("global.accuracy".to_owned(), accuracy)]),
        timestamp: Some(chrono::Utc::now()),
    }
}

fn resume(round: u64, v: f32, moments: bool) -> ResumeState {
    ResumeState {
        round,
        model_version: round,
        global: model(v),
        server: Some(ServerState {
            steps: round,
            moments: moments.then(|| (model(v + 0.5), model(v + 0.25))),
        }),
        selector: json!({"seen": [round]}),
        record: None,
        privacy: None,
    }
}

/// Runs the whole contract on the registry `spec` names, in `workdir`.
fn conformance(spec: &RegistrySpec, workdir: &Path) {
    let top = config(spec, 0);
    let (job, task) = (top.job.id.clone(), top.task_id.clone());
    let reg: Arc<dyn Registry> = registry::for_task(&top, workdir).unwrap();
    let what = format!("registry {:?}", spec.sort);

    // Base models.
    let name = unique("base");
    assert!(reg.load_model(&name, 1).unwrap().is_none(), "{what}: a model never saved is none");
    reg.save_model(&name, 1, &model(1.0)).unwrap();
    reg.save_model(&name, 2, &model(2.0)).unwrap();
    reg.finish(true).unwrap();
    assert_same_bits(&reg.load_model(&name, 1).unwrap().unwrap(), &model(1.0), &what);
    assert_same_bits(&reg.load_model(&name, 2).unwrap().unwrap(), &model(2.0), &what);
    assert!(reg.load_model(&name, 3).unwrap().is_none(), "{what}: a version never saved");
    for bad in ["../escape", "a/b", "", ".."] {
        assert!(reg.save_model(bad, 1, &model(0.0)).is_err(), "{what}: name {bad:?} is refused");
    }

    // Rounds, the final model and metrics, for the task's own job.
    let reg: Arc<dyn Registry> = registry::for_task(&top, workdir).unwrap();
    reg.save_round(&job, 1, &model(1.0)).unwrap();
    reg.append_metrics(&job, &[record(&task, 1, 0.5)]).unwrap();
    reg.save_round(&job, 2, &model(2.0)).unwrap();
    let records = [record(&task, 2, 0.75)];
    reg.append_metrics(&job, &records).unwrap();
    reg.save_final(&job, &model(3.0)).unwrap();

    // Resume state.
    let other: TaskId = format!("{task}-other").into();
    assert!(reg.load_resume(&job, &task).unwrap().is_none(), "{what}: no resume state yet");
    reg.save_resume(&job, &task, &resume(1, 1.0, true)).unwrap();
    let back = reg.load_resume(&job, &task).unwrap().unwrap();
    assert_eq!(back.round, 1);
    assert_same_bits(&back.global, &model(1.0), &what);
    let (m, v) = back.server.as_ref().unwrap().moments.clone().unwrap();
    assert_same_bits(&m, &model(1.5), &what);
    assert_same_bits(&v, &model(1.25), &what);
    reg.save_resume(&job, &task, &resume(2, 2.0, false)).unwrap();
    let back = reg.load_resume(&job, &task).unwrap().unwrap();
    assert_eq!((back.round, back.selector.clone()), (2, json!({"seen": [2]})));
    assert!(back.server.unwrap().moments.is_none(), "{what}: a save replaces the last whole");
    assert!(reg.load_resume(&job, &other).unwrap().is_none(), "{what}: each task its own");

    // Recent metrics, where kept: this task's own, as appended.
    let recent = reg.recent_metrics(&job, &task).unwrap();
    assert!(recent.iter().all(|r| r.task_id == task), "{what}: {recent:?}");
    assert!(recent.is_empty() || recent.last() == records.last(), "{what}: {recent:?}");
    assert!(reg.recent_metrics(&job, &other).unwrap().is_empty(), "{what}");

    reg.finish(true).unwrap();
}

#[test]
fn the_local_registry_conforms() {
    let dir = tempfile::tempdir().unwrap();
    for uri in ["", "models-here", "file://shared"] {
        let spec = RegistrySpec { sort: "local".into(), uri: uri.into() };
        conformance(&spec, dir.path());
    }
    // The default sort (empty) is the local registry too.
    conformance(&RegistrySpec::default(), dir.path());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_mlflow_registry_conforms() {
    let Some(url) = std::env::var("FLEDGE_MLFLOW_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("FLEDGE_MLFLOW_URL is not set: MLflow registry conformance skipped");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let spec = RegistrySpec { sort: "mlflow".into(), uri: url };
    let path = dir.path().to_owned();
    tokio::task::spawn_blocking(move || conformance(&spec, &path)).await.unwrap();
}

#[test]
fn the_s3_registry_conforms() {
    let Some(url) = std::env::var("FLEDGE_S3_URL").ok().filter(|u| !u.is_empty()) else {
        eprintln!("FLEDGE_S3_URL is not set: S3 registry conformance skipped");
        return;
    };
    let bucket = format!("conformance-{}", std::process::id());
    create_bucket(&url, &bucket);
    // SAFETY: nextest runs each test in a process of its own, and nothing else runs yet.
    unsafe {
        std::env::set_var("AWS_ENDPOINT_URL", &url);
        std::env::set_var("AWS_ACCESS_KEY_ID", "fledge-test");
        std::env::set_var("AWS_SECRET_ACCESS_KEY", "fledge-test-secret");
        std::env::set_var("AWS_REGION", "us-east-1");
    }
    let dir = tempfile::tempdir().unwrap();
    for uri in [format!("s3://{bucket}"), format!("s3://{bucket}/team-a/models")] {
        conformance(&RegistrySpec { sort: "s3".into(), uri }, dir.path());
    }
}

/// Creates `bucket` on the S3-compatible server at `url` (moto accepts unsigned requests).
fn create_bucket(url: &str, bucket: &str) {
    use std::io::{Read as _, Write as _};
    let authority = url.trim_start_matches("http://").trim_end_matches('/');
    let mut stream = std::net::TcpStream::connect(authority).unwrap();
    write!(
        stream,
        "PUT /{bucket} HTTP/1.1\r\nHost: {authority}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "creating bucket {bucket}: {answer}");
}

//! The `kubernetes` deployer against a fake Kubernetes API: a real HTTP server in the test
//! that keeps Pods and Secrets in memory, answers like the API server (created objects with a
//! uid and a resourceVersion, `409 AlreadyExists`, `404 NotFound` as `Status` objects, watch
//! streams of JSON events) and records every request, so each test asserts the exact sequence
//! the deployer sends and what it reports to a fake control plane.
//!
//! `real_cluster_*` runs the deployer against the cluster `KUBECONFIG` names, and is skipped
//! (with a message) without one.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;
use serde_json::{Value, json};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use fledge_agent::api::DeploymentState;
use fledge_agent::deployer::k8s::{self, K8sOptions};
use fledge_agent::deployer::{DeployEvents, DeployerOptions};
use fledge_proto::{DeployEvent, DeployEventKind, TaskDeployment};
use fledge_types::ComputeId;

use crate::fakes::{DEADLINE, FakeDeploymentApi};

const NS: &str = "fledge-test";
const APISERVER: &str = "http://fledge-apiserver.fledge.svc:10100";

/// One request the fake API received.
#[derive(Clone, Debug)]
struct Req {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

impl Req {
    /// `METHOD kind[/name[/sub]]`, e.g. `POST pods`, `DELETE pods/x`, `WATCH pods`.
    fn short(&self) -> String {
        let rest =
            self.path.strip_prefix(&format!("/api/v1/namespaces/{NS}/")).unwrap_or(&self.path);
        let method = if self.query.contains("watch=true") { "WATCH" } else { self.method.as_str() };
        let kind = rest.split('/').next().unwrap_or_default();
        let sub = rest.split('/').nth(2).map(|s| format!("/{s}")).unwrap_or_default();
        let named = if rest.contains('/') { "/<name>" } else { "" };
        format!("{method} {kind}{named}{sub}")
    }

    fn param(&self, key: &str) -> Option<String> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=')?;
            (k == key).then(|| percent_decode(v))
        })
    }
}

fn percent_decode(value: &str) -> String {
    let bytes = value.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < bytes.len() {
        let hex = value.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok());
        match (bytes[i], hex) {
            (b'%', Some(byte)) => {
                out.push(byte);
                i += 3;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8(out).expect("utf-8")
}

#[derive(Default)]
struct Store {
    pods: BTreeMap<String, Value>,
    secrets: BTreeMap<String, Value>,
    version: u64,
    uids: u64,
}

/// The fake API server.
struct FakeKube {
    store: Mutex<Store>,
    requests: Mutex<Vec<Req>>,
    changed: Notify,
    /// Watch events: (type, pod).
    events: broadcast::Sender<(String, Value)>,
    /// What `GET pods/<name>/log` answers.
    log: String,
}

impl FakeKube {
    fn new() -> Arc<Self> {
        Arc::new(Self {
            store: Mutex::new(Store::default()),
            requests: Mutex::new(Vec::new()),
            changed: Notify::new(),
            events: broadcast::channel(64).0,
            log: "line 1\nfledgelet: cannot reach the apiserver\n".to_owned(),
        })
    }

    fn requests(&self) -> Vec<Req> {
        self.requests.lock().expect("lock").clone()
    }

    fn shorts(&self) -> Vec<String> {
        self.requests().iter().map(Req::short).collect()
    }

    /// Waits until the recorded requests satisfy `check`.
    async fn wait_until(&self, what: &str, check: impl Fn(&[Req]) -> bool) {
        let deadline = tokio::time::Instant::now() + DEADLINE;
        loop {
            let notified = self.changed.notified();
            if check(&self.requests()) {
                return;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                panic!("timed out waiting for {what}; requests: {:#?}", self.shorts());
            }
        }
    }

    fn pod(&self, name: &str) -> Option<Value> {
        self.store.lock().expect("lock").pods.get(name).cloned()
    }

    fn pod_names(&self) -> Vec<String> {
        self.store.lock().expect("lock").pods.keys().cloned().collect()
    }

    fn secret_names(&self) -> Vec<String> {
        self.store.lock().expect("lock").secrets.keys().cloned().collect()
    }

    /// Stores a pod as if someone created it (e.g. a previous run).
    fn insert_pod(&self, mut pod: Value) {
        let mut store = self.store.lock().expect("lock");
        store.version += 1;
        store.uids += 1;
        pod["metadata"]["resourceVersion"] = json!(store.version.to_string());
        pod["metadata"]["uid"] = json!(format!("uid-{}", store.uids));
        let name = pod["metadata"]["name"].as_str().expect("name").to_owned();
        store.pods.insert(name, pod);
    }

    /// Sets a pod's status, as the kubelet would, and tells the watchers.
    fn set_status(&self, name: &str, status: Value) {
        let mut store = self.store.lock().expect("lock");
        store.version += 1;
        let version = store.version.to_string();
        let pod = store.pods.get_mut(name).expect("pod exists");
        pod["status"] = status;
        pod["metadata"]["resourceVersion"] = json!(version);
        let _ = self.events.send(("MODIFIED".to_owned(), pod.clone()));
    }
}

fn status(code: u16, reason: &str, message: String) -> Response {
    let body = json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": message, "reason": reason, "code": code,
    });
    (StatusCode::from_u16(code).expect("code"), axum::Json(body)).into_response()
}

async fn handle(
    State(kube): State<Arc<FakeKube>>,
    method: Method,
    uri: Uri,
    body: Bytes,
) -> Response {
    let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
    let req = Req {
        method: method.clone(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or_default().to_owned(),
        body: body.clone(),
    };
    kube.requests.lock().expect("lock").push(req.clone());
    kube.changed.notify_waiters();
    let prefix = format!("/api/v1/namespaces/{NS}/");
    let Some(rest) = req.path.strip_prefix(&prefix) else {
        return status(404, "NotFound", format!("no such path {}", req.path));
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let mut store = kube.store.lock().expect("lock");
    match (method, parts.as_slice()) {
        (Method::POST, [kind @ ("pods" | "secrets")]) => {
            let mut object = body;
            let name = object["metadata"]["name"].as_str().unwrap_or_default().to_owned();
            let exists = if *kind == "pods" {
                store.pods.contains_key(&name)
            } else {
                store.secrets.contains_key(&name)
            };
            if exists {
                return status(409, "AlreadyExists", format!("{kind} \"{name}\" already exists"));
            }
            store.version += 1;
            store.uids += 1;
            object["metadata"]["resourceVersion"] = json!(store.version.to_string());
            object["metadata"]["uid"] = json!(format!("uid-{}", store.uids));
            if *kind == "pods" {
                object["status"] = json!({"phase": "Pending"});
                store.pods.insert(name, object.clone());
                let _ = kube.events.send(("ADDED".to_owned(), object.clone()));
            } else {
                store.secrets.insert(name, object.clone());
            }
            (StatusCode::CREATED, axum::Json(object)).into_response()
        }
        (Method::GET, ["pods"]) if req.query.contains("watch=true") => {
            let name = req
                .param("fieldSelector")
                .and_then(|s| s.strip_prefix("metadata.name=").map(str::to_owned))
                .unwrap_or_default();
            let since: u64 = req.param("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
            let rx = kube.events.subscribe();
            // What changed since the version asked for comes first, as a real server replays.
            let replay = store.pods.get(&name).filter(|pod| {
                pod["metadata"]["resourceVersion"]
                    .as_str()
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v > since)
            });
            let first: Vec<(String, Value)> =
                replay.map(|pod| ("MODIFIED".to_owned(), pod.clone())).into_iter().collect();
            drop(store);
            Body::from_stream(watch_stream(first, rx, name)).into_response()
        }
        (Method::GET, ["pods"]) => {
            let selector = req.param("labelSelector").unwrap_or_default();
            let items: Vec<Value> = store
                .pods
                .values()
                .filter(|pod| {
                    selector.split(',').filter(|s| !s.is_empty()).all(|term| {
                        let (k, v) = term.split_once('=').unwrap_or((term, ""));
                        pod["metadata"]["labels"][k] == v
                    })
                })
                .cloned()
                .collect();
            axum::Json(json!({
                "kind": "PodList", "apiVersion": "v1",
                "metadata": {"resourceVersion": store.version.to_string()}, "items": items,
            }))
            .into_response()
        }
        (Method::GET, ["pods", name]) => match store.pods.get(*name) {
            Some(pod) => axum::Json(pod.clone()).into_response(),
            None => status(404, "NotFound", format!("pods \"{name}\" not found")),
        },
        (Method::GET, ["pods", name, "log"]) => {
            if store.pods.contains_key(*name) {
                kube.log.clone().into_response()
            } else {
                status(404, "NotFound", format!("pods \"{name}\" not found"))
            }
        }
        (Method::DELETE, ["pods", name]) => match store.pods.remove(*name) {
            Some(pod) => {
                let _ = kube.events.send(("DELETED".to_owned(), pod.clone()));
                axum::Json(pod).into_response()
            }
            None => status(404, "NotFound", format!("pods \"{name}\" not found")),
        },
        (Method::DELETE, ["secrets", name]) => match store.secrets.remove(*name) {
            Some(secret) => axum::Json(secret).into_response(),
            None => status(404, "NotFound", format!("secrets \"{name}\" not found")),
        },
        (method, _) => status(405, "MethodNotAllowed", format!("{method} {}", req.path)),
    }
}

/// A watch response body: `first`, then the events of pod `name`, as JSON lines.
fn watch_stream(
    first: Vec<(String, Value)>,
    rx: broadcast::Receiver<(String, Value)>,
    name: String,
) -> impl futures::Stream<Item = Result<Bytes, std::convert::Infallible>> {
    let tail = futures::stream::unfold(rx, move |mut rx| {
        let name = name.clone();
        async move {
            loop {
                match rx.recv().await {
                    Ok((kind, pod)) if pod["metadata"]["name"] == name.as_str() => {
                        return Some(((kind, pod), rx));
                    }
                    Ok(_) | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Err(broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    futures::stream::iter(first).chain(tail).map(|(kind, object)| {
        let mut line = serde_json::to_vec(&json!({"type": kind, "object": object})).expect("json");
        line.push(b'\n');
        Ok(Bytes::from(line))
    })
}

struct Harness {
    root: tempfile::TempDir,
    kube: Arc<FakeKube>,
    api: Arc<FakeDeploymentApi>,
    events: mpsc::Sender<fledge_client::Result<DeployEvent>>,
    shutdown: CancellationToken,
    deployer: tokio::task::JoinHandle<fledge_agent::deployer::Result<()>>,
}

impl Harness {
    async fn start() -> Self {
        let kube = FakeKube::new();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("addr").port();
        let app = axum::Router::new().fallback(handle).with_state(kube.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let root = tempfile::tempdir().expect("tempdir");
        let kubeconfig = root.path().join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: \
                 http://127.0.0.1:{port}\ncontexts:\n- name: fake\n  context:\n    cluster: \
                 fake\n    user: fake\n    namespace: {NS}\ncurrent-context: fake\nusers:\n- \
                 name: fake\n  user: {{}}\n"
            ),
        )
        .expect("write kubeconfig");
        let ca = root.path().join("ca.pem");
        let (authority, _) = fledge_tls::ephemeral("fledge-control").expect("a CA");
        std::fs::write(&ca, authority.pem()).expect("write ca");
        let mut opts = DeployerOptions::new(
            ComputeId::new("c1"),
            "compute-key",
            APISERVER,
            "http://fledge-notifier.fledge.svc:10101",
            root.path().join("work"),
            std::path::PathBuf::new(),
        );
        opts.stop_grace = std::time::Duration::from_secs(5);
        opts.ca_file = Some(ca);
        opts.fledgelet_env = vec![("AWS_ACCESS_KEY_ID".into(), "AKIA-test".into())];
        opts.k8s = Some(K8sOptions {
            kubeconfig: Some(kubeconfig),
            cpus: 1.5,
            memory_bytes: 256 * 1024 * 1024,
            service_account: Some("fledge-worker".into()),
            ..K8sOptions::default()
        });
        let api = Arc::new(FakeDeploymentApi::default());
        let deployer = opts.build_with(api.clone()).expect("valid options");
        let (events, rx) = mpsc::channel(16);
        let stream: DeployEvents =
            futures::stream::unfold(
                rx,
                |mut rx| async move { rx.recv().await.map(|item| (item, rx)) },
            )
            .boxed();
        let shutdown = CancellationToken::new();
        let deployer = tokio::spawn(deployer.run_with_events(stream, shutdown.clone()));
        let h = Self { root, kube, api, events, shutdown, deployer };
        // At start: the compute's leftovers are listed (and deleted).
        h.kube.wait_until("the start-up cleanup", |reqs| !reqs.is_empty()).await;
        let first = &h.kube.requests()[0];
        assert_eq!(first.short(), "GET pods");
        assert_eq!(first.param("labelSelector").as_deref(), Some("fledge.compute=c1"));
        h
    }

    async fn send(&self, kind: DeployEventKind, job: &str, tasks: &[(&str, u32)]) {
        let event = DeployEvent {
            seq: 0,
            kind: kind.into(),
            job_id: job.into(),
            tasks: tasks
                .iter()
                .map(|(t, attempt)| TaskDeployment {
                    task_id: (*t).into(),
                    role: "trainer".into(),
                    attempt: *attempt,
                })
                .collect(),
            apiserver: String::new(),
            notifier: String::new(),
        };
        self.events.send(Ok(event)).await.expect("deployer listens");
    }

    /// The requests after the start-up cleanup, shortened.
    fn sequence(&self) -> Vec<String> {
        self.kube.shorts().into_iter().skip(1).collect()
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.deployer.await.expect("join").expect("deployer ends cleanly");
    }
}

fn terminated(exit_code: i32, reason: &str, message: Option<&str>) -> Value {
    let phase = if exit_code == 0 { "Succeeded" } else { "Failed" };
    let mut state = json!({"exitCode": exit_code, "reason": reason});
    if let Some(message) = message {
        state["message"] = json!(message);
    }
    json!({"phase": phase, "containerStatuses": [{
        "name": "fledgelet", "image": "fledge-worker:latest", "imageID": "", "ready": false,
        "restartCount": 0, "state": {"terminated": state}}]})
}

fn running() -> Value {
    json!({"phase": "Running", "containerStatuses": [{
        "name": "fledgelet", "image": "fledge-worker:latest", "imageID": "", "ready": true,
        "restartCount": 0, "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]})
}

#[tokio::test]
async fn deploys_a_pod_with_its_secret_and_lets_a_reported_end_pass() {
    let h = Harness::start().await;
    let work = h.root.path().join("work");
    h.send(DeployEventKind::Deploy, "j1", &[("t1", 0)]).await;
    h.api.wait_for("t1", DeploymentState::Deployed).await;
    let name = k8s::object_name("c1", "j1", "t1");

    let reqs = h.kube.requests();
    let pod = &reqs.iter().find(|r| r.short() == "POST pods").expect("pod created").body;
    let meta = &pod["metadata"];
    assert_eq!(meta["name"], name.as_str());
    assert_eq!(meta["namespace"], NS);
    for (key, value) in [
        ("fledge.compute", "c1"),
        ("fledge.job", "j1"),
        ("fledge.task", "t1"),
        ("fledge.role", "trainer"),
    ] {
        assert_eq!(meta["labels"][key], value, "label {key}");
        assert_eq!(meta["annotations"][key], value, "annotation {key}");
    }
    assert_eq!(meta["annotations"]["fledge.attempt"], "0");
    let spec = &pod["spec"];
    assert_eq!(spec["restartPolicy"], "Never");
    assert_eq!(spec["automountServiceAccountToken"], false);
    assert_eq!(spec["serviceAccountName"], "fledge-worker");
    assert_eq!(spec["securityContext"]["runAsNonRoot"], true);
    assert_eq!(spec["securityContext"]["seccompProfile"]["type"], "RuntimeDefault");
    let container = &spec["containers"][0];
    assert_eq!(container["image"], "fledge-worker:latest");
    assert_eq!(container["imagePullPolicy"], "IfNotPresent");
    assert_eq!(container["command"], json!(["/usr/local/bin/fledge"]));
    let args: Vec<&str> =
        container["args"].as_array().expect("args").iter().filter_map(Value::as_str).collect();
    assert_eq!(
        args,
        [
            "fledgelet",
            "--task-id",
            "t1",
            "--job-id",
            "j1",
            "--apiserver",
            APISERVER,
            "--notifier",
            "http://fledge-notifier.fledge.svc:10101",
            "--work-dir",
            "/work",
            "--task-key-file",
            "/run/secrets/fledge-task-key",
            "--fledge-bin",
            "/usr/local/bin/fledge",
        ]
    );
    let security = &container["securityContext"];
    assert_eq!(security["allowPrivilegeEscalation"], false);
    assert_eq!(security["readOnlyRootFilesystem"], true);
    assert_eq!(security["runAsNonRoot"], true);
    assert_eq!(security["capabilities"]["drop"], json!(["ALL"]));
    assert_eq!(security["seccompProfile"]["type"], "RuntimeDefault");
    let limits = json!({"cpu": "1500m", "memory": (256 * 1024 * 1024).to_string()});
    assert_eq!(container["resources"]["limits"], limits);
    assert_eq!(container["resources"]["requests"], limits);
    assert_eq!(container["terminationMessagePath"], "/work/final-state");
    // The key and the CA from the Secret, read-only; no secret value in the Pod spec.
    let mounts = container["volumeMounts"].as_array().expect("mounts");
    let mount = |path: &str| mounts.iter().find(|m| m["mountPath"] == path).cloned();
    let key = mount("/run/secrets/fledge-task-key").expect("key mount");
    assert_eq!(
        (key["name"].as_str(), key["subPath"].as_str(), key["readOnly"].as_bool()),
        (Some("secret"), Some("task-key"), Some(true))
    );
    let ca = mount("/etc/fledge/ca.pem").expect("ca mount");
    assert_eq!((ca["subPath"].as_str(), ca["readOnly"].as_bool()), (Some("ca.pem"), Some(true)));
    let volumes = spec["volumes"].as_array().expect("volumes");
    let secret_volume = volumes.iter().find(|v| v["name"] == "secret").expect("secret volume");
    assert_eq!(secret_volume["secret"]["secretName"], name.as_str());
    let env = container["env"].as_array().expect("env");
    let aws = env.iter().find(|e| e["name"] == "AWS_ACCESS_KEY_ID").expect("env");
    assert_eq!(
        aws["valueFrom"]["secretKeyRef"],
        json!({"name": name, "key": "env.AWS_ACCESS_KEY_ID", "optional": false})
    );
    // The worker's p2p ends advertise the Pod's IP, which only the kubelet knows.
    let advertise = env.iter().find(|e| e["name"] == "FLEDGE_P2P_ADVERTISE_HOST").expect("env");
    assert_eq!(advertise["valueFrom"]["fieldRef"]["fieldPath"], "status.podIP");
    assert!(env.iter().any(|e| e["name"] == "FLEDGE_P2P_LISTEN_HOST" && e["value"] == "0.0.0.0"));
    let spec_text = pod.to_string();
    assert!(!spec_text.contains("key-of-t1") && !spec_text.contains("AKIA-test"), "{spec_text}");

    let secret = &reqs.iter().find(|r| r.short() == "POST secrets").expect("secret").body;
    assert_eq!(secret["metadata"]["name"], name.as_str());
    assert_eq!(secret["stringData"]["task-key"], "key-of-t1");
    assert_eq!(secret["stringData"]["env.AWS_ACCESS_KEY_ID"], "AKIA-test");
    let ca = std::fs::read_to_string(h.root.path().join("ca.pem")).expect("ca");
    assert_eq!(secret["stringData"]["ca.pem"], ca.as_str());
    let owner = &secret["metadata"]["ownerReferences"][0];
    let uid = h.kube.pod(&name).expect("pod")["metadata"]["uid"].clone();
    assert_eq!((owner["kind"].as_str(), &owner["uid"]), (Some("Pod"), &uid));

    // The pod runs, then ends after the fledgelet reported: nothing more to report.
    h.kube.wait_until("the watch", |reqs| reqs.iter().any(|r| r.short() == "WATCH pods")).await;
    let watch = h.kube.requests().into_iter().find(|r| r.short() == "WATCH pods").expect("watch");
    assert_eq!(watch.param("fieldSelector"), Some(format!("metadata.name={name}")));
    assert_eq!(watch.param("labelSelector").as_deref(), Some("fledge.compute=c1,fledge.task=t1"));
    h.kube.set_status(&name, running());
    h.kube.set_status(&name, terminated(0, "Completed", Some("completed")));
    h.kube
        .wait_until("the cleanup", |reqs| reqs.iter().any(|r| r.short() == "DELETE secrets/<name>"))
        .await;
    assert_eq!(
        h.sequence(),
        [
            "POST pods",
            "POST secrets",
            "GET pods/<name>",
            "WATCH pods",
            "GET pods/<name>/log",
            "DELETE pods/<name>",
            "DELETE secrets/<name>",
        ]
    );
    assert!(h.kube.pod_names().is_empty() && h.kube.secret_names().is_empty());
    let marker = std::fs::read_to_string(work.join("j1/t1/final-state")).expect("marker");
    assert_eq!(marker, "completed");
    let api = h.api.clone();
    h.stop().await;
    // The fledgelet reported the task's end itself (the termination message): only `deployed`.
    let states: Vec<_> = api.of("t1").into_iter().map(|(state, _)| state).collect();
    assert_eq!(states, [DeploymentState::Deployed]);
}

#[tokio::test]
async fn a_pod_that_dies_before_reporting_fails_its_task_with_the_reason_and_output() {
    let h = Harness::start().await;
    h.send(DeployEventKind::Deploy, "j1", &[("oom", 0), ("pull", 0)]).await;
    h.api.wait_for("oom", DeploymentState::Deployed).await;
    h.api.wait_for("pull", DeploymentState::Deployed).await;
    let oom = k8s::object_name("c1", "j1", "oom");
    let pull = k8s::object_name("c1", "j1", "pull");
    h.kube.set_status(&oom, running());
    h.kube.set_status(&oom, terminated(137, "OOMKilled", None));
    let message = h.api.wait_for("oom", DeploymentState::Failed).await;
    assert!(
        message.starts_with(
            "worker exited with exit code 137 (SIGKILL), killed by the kernel at its memory \
             limit (OOMKilled) before reporting; its last output:"
        ),
        "{message}"
    );
    assert!(message.contains("fledgelet: cannot reach the apiserver"), "{message}");

    // A Pod whose image cannot be pulled never ends by itself: failed, and deleted.
    h.kube.set_status(
        &pull,
        json!({"phase": "Pending", "containerStatuses": [{
            "name": "fledgelet", "image": "fledge-worker:latest", "imageID": "", "ready": false,
            "restartCount": 0, "state": {"waiting": {"reason": "ImagePullBackOff",
            "message": "Back-off pulling image \"fledge-worker:latest\""}}}]}),
    );
    let message = h.api.wait_for("pull", DeploymentState::Failed).await;
    assert!(
        message.starts_with(
            "worker exited with ImagePullBackOff (Back-off pulling image \
             \"fledge-worker:latest\") before reporting"
        ),
        "{message}"
    );
    h.kube
        .wait_until("both pods deleted", |reqs| {
            reqs.iter().filter(|r| r.short() == "DELETE secrets/<name>").count() == 2
        })
        .await;
    assert!(h.kube.pod_names().is_empty(), "{:?}", h.kube.pod_names());
    h.stop().await;
}

#[tokio::test]
async fn revoking_deletes_the_pod_with_the_grace_period() {
    let h = Harness::start().await;
    h.send(DeployEventKind::Deploy, "j1", &[("t1", 0)]).await;
    h.api.wait_for("t1", DeploymentState::Deployed).await;
    let name = k8s::object_name("c1", "j1", "t1");
    h.kube.set_status(&name, running());
    h.kube.wait_until("the watch", |reqs| reqs.iter().any(|r| r.short() == "WATCH pods")).await;
    h.send(DeployEventKind::Revoke, "j1", &[]).await;
    let message = h.api.wait_for("t1", DeploymentState::Revoked).await;
    assert_eq!(message, "worker revoked");
    let reqs = h.kube.requests();
    let delete = reqs.iter().find(|r| r.short() == "DELETE pods/<name>").expect("deleted");
    assert_eq!(delete.path, format!("/api/v1/namespaces/{NS}/pods/{name}"));
    assert_eq!(delete.body["gracePeriodSeconds"], 5);
    assert_eq!(
        h.sequence(),
        [
            "POST pods",
            "POST secrets",
            "GET pods/<name>",
            "WATCH pods",
            "DELETE pods/<name>",
            "GET pods/<name>",
            "DELETE pods/<name>",
            "DELETE secrets/<name>",
        ]
    );
    // Nothing but the revocation: no failure for a pod the deployer deleted.
    let states: Vec<_> = h.api.of("t1").into_iter().map(|(state, _)| state).collect();
    assert_eq!(states, [DeploymentState::Deployed, DeploymentState::Revoked]);
    h.stop().await;
}

fn stale_pod(name: &str, task: &str, attempt: u32, phase: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": NS,
            "labels": {"fledge.compute": "c1", "fledge.job": "j1", "fledge.task": task},
            "annotations": {"fledge.attempt": attempt.to_string()}},
        "spec": {"containers": [{"name": "fledgelet", "image": "old"}]},
        "status": {"phase": phase},
    })
}

#[tokio::test]
async fn a_conflict_replaces_a_stale_pod_and_keeps_the_same_attempts() {
    let h = Harness::start().await;
    // Left by an earlier run after the start-up cleanup: attempt 0 of `t1`, and attempt 2 of
    // `t2` still running (its create was retried after a lost answer).
    let t1 = k8s::object_name("c1", "j1", "t1");
    let t2 = k8s::object_name("c1", "j1", "t2");
    h.kube.insert_pod(stale_pod(&t1, "t1", 0, "Failed"));
    h.kube.insert_pod(stale_pod(&t2, "t2", 2, "Running"));
    let t2_uid = h.kube.pod(&t2).expect("t2")["metadata"]["uid"].clone();

    h.send(DeployEventKind::Deploy, "j1", &[("t1", 1)]).await;
    h.api.wait_for("t1", DeploymentState::Deployed).await;
    // (The watcher's requests may follow.)
    assert_eq!(
        h.sequence()[..6],
        [
            "POST pods",
            "GET pods/<name>",
            "DELETE pods/<name>",
            "GET pods/<name>",
            "POST pods",
            "POST secrets",
        ]
    );
    let reqs = h.kube.requests();
    assert_eq!(reqs[3].body["gracePeriodSeconds"], 0, "a stale pod goes at once");
    let pod = h.kube.pod(&t1).expect("replaced");
    assert_eq!(pod["metadata"]["annotations"]["fledge.attempt"], "1");
    assert_eq!(pod["spec"]["containers"][0]["image"], "fledge-worker:latest");

    h.send(DeployEventKind::Deploy, "j1", &[("t2", 2)]).await;
    h.api.wait_for("t2", DeploymentState::Deployed).await;
    let after: Vec<String> = h.kube.requests()[reqs.len()..]
        .iter()
        .map(Req::short)
        .filter(|r| r != "WATCH pods" && r != "GET pods/<name>")
        .collect();
    assert_eq!(after, ["POST pods", "POST secrets"], "the same attempt's pod is kept");
    let secret =
        h.kube.requests().into_iter().rev().find(|r| r.short() == "POST secrets").expect("secret");
    assert_eq!(secret.body["metadata"]["ownerReferences"][0]["uid"], t2_uid);
    assert_eq!(h.kube.pod(&t2).expect("kept")["metadata"]["uid"], t2_uid);
    h.stop().await;
}

/// Runs against the cluster `KUBECONFIG` names (namespace `FLEDGE_K8S_NAMESPACE` or the
/// context's, image `FLEDGE_K8S_IMAGE` or `fledge-worker:latest`): a worker Pod is created,
/// runs, and is deleted on revoke; a worker whose image cannot be pulled fails with the reason;
/// nothing of the compute is left.
#[tokio::test]
async fn real_cluster_runs_and_revokes_a_worker_pod() {
    let Some(kubeconfig) = std::env::var_os("KUBECONFIG").filter(|v| !v.is_empty()) else {
        println!("skipped: KUBECONFIG not set");
        return;
    };
    let root = tempfile::tempdir().expect("tempdir");
    let compute = format!("k8s-it-{}", std::process::id());
    let mut opts = DeployerOptions::new(
        ComputeId::new(compute.clone()),
        "compute-key",
        "http://fledge-apiserver.invalid:10100",
        "http://fledge-notifier.invalid:10101",
        root.path().join("work"),
        std::path::PathBuf::new(),
    );
    opts.stop_grace = std::time::Duration::from_secs(5);
    let k8s_opts = K8sOptions {
        kubeconfig: Some(kubeconfig.into()),
        namespace: std::env::var("FLEDGE_K8S_NAMESPACE").ok(),
        image: std::env::var("FLEDGE_K8S_IMAGE").unwrap_or_else(|_| "fledge-worker:latest".into()),
        memory_bytes: 128 * 1024 * 1024,
        ..K8sOptions::default()
    };
    opts.k8s = Some(k8s_opts.clone());
    let api = Arc::new(FakeDeploymentApi::default());
    let deployer = opts.build_with(api.clone()).expect("valid options");
    let (events, rx) = mpsc::channel(16);
    let stream: DeployEvents =
        futures::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) })
            .boxed();
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(deployer.run_with_events(stream, shutdown.clone()));
    let event = |kind: DeployEventKind, task: &str| DeployEvent {
        seq: 0,
        kind: kind.into(),
        job_id: "j1".into(),
        tasks: vec![TaskDeployment { task_id: task.into(), role: "trainer".into(), attempt: 0 }],
        apiserver: String::new(),
        notifier: String::new(),
    };
    events.send(Ok(event(DeployEventKind::Deploy, "t1"))).await.expect("send");
    api.wait_for("t1", DeploymentState::Deployed).await;
    events.send(Ok(event(DeployEventKind::Revoke, "t1"))).await.expect("send");
    // A cluster may take a while to schedule, pull and stop: wait up to 5 minutes.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(300);
    while !api.of("t1").iter().any(|(s, _)| *s == DeploymentState::Revoked) {
        assert!(tokio::time::Instant::now() < deadline, "not revoked: {:?}", api.reports());
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    }
    shutdown.cancel();
    running.await.expect("join").expect("deployer ends cleanly");
    let (client, default_namespace) =
        k8s::client(k8s_opts.kubeconfig.as_deref()).await.expect("client");
    let namespace = k8s_opts.namespace.unwrap_or(default_namespace);
    let pods: kube::Api<k8s_openapi::api::core::v1::Pod> =
        kube::Api::namespaced(client, &namespace);
    let left = pods
        .list(&kube::api::ListParams::default().labels(&format!("fledge.compute={compute}")))
        .await
        .expect("list");
    let terminating = left.items.iter().all(|pod| pod.metadata.deletion_timestamp.is_some());
    assert!(terminating, "pods of the compute left: {:?}", left.items.len());
}

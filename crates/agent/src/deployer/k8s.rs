//! The `kubernetes` worker runtime: one Pod per task in the compute's namespace, driven
//! through the Kubernetes API with `kube`.
//!
//! - Each task's Pod is named `fledge-<compute>-<job>-<task>-<hash>` (lowercased, cut to a
//!   DNS label; the hash of the exact ids keeps names apart) and labelled `fledge.compute`,
//!   `fledge.job`, `fledge.task` and `fledge.role` with values cut to what a label value
//!   allows; the exact ids and the attempt are in annotations of the same names. It runs the
//!   image's `fledge fledgelet` with the flags the docker deployer passes, `restartPolicy:
//!   Never` (the control plane decides on restarts).
//! - The task key (claimed once per attempt), the control plane's CA and the extra worker
//!   environment go into a Secret of the same name, owned by the Pod (the garbage collector
//!   removes it with the Pod; the deployer deletes it too). The key and the CA are mounted
//!   read-only at [`KEY_PATH`] and [`CA_PATH`]; the environment comes from the Secret, never
//!   from the Pod spec, which anyone who may read Pods sees.
//! - Limits per worker (CPUs, memory) are the Pod's requests and limits; it runs as a
//!   non-root user with a read-only root filesystem (emptyDirs for its work dir and `/tmp`),
//!   every capability dropped, no privilege escalation, the runtime's default seccomp profile
//!   and no service account token.
//! - Whether the fledgelet reported its final state: it writes `final-state` in its work dir,
//!   which is the container's `terminationMessagePath`, so the kubelet hands the state back in
//!   the terminated container's status.
//! - Each worker's Pod is watched (a watch on its name and the compute's label); a Pod that
//!   ends, or cannot start (an image that cannot be pulled, a config error), ends the worker
//!   with its exit code and reason (`OOMKilled`, `ImagePullBackOff`, eviction). Revoking
//!   deletes the Pod with the grace period; at start and at shutdown the deployer deletes every
//!   Pod labelled with its compute.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerStatus, EmptyDirVolumeSource, EnvVar, EnvVarSource,
    KeyToPath, ObjectFieldSelector, Pod, PodSecurityContext, PodSpec, ResourceRequirements,
    SeccompProfile, Secret, SecretKeySelector, SecretVolumeSource, SecurityContext, Volume,
    VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, DeleteParams, ListParams, LogParams, PostParams, WatchEvent, WatchParams};
use tokio::io::AsyncWriteExt as _;
use tokio_util::sync::CancellationToken;

use fledge_types::{ComputeId, JobId, TaskId};

pub use super::docker::{CA_PATH, FLEDGE_IN_IMAGE, KEY_PATH};
use super::docker::{LABEL_COMPUTE, LABEL_JOB, LABEL_ROLE, LABEL_TASK, describe_exit};

/// The annotation holding the attempt a Pod runs.
pub const ANNOTATION_ATTEMPT: &str = "fledge.attempt";
/// The label every object of the deployer carries (`app.kubernetes.io/managed-by=fledge`).
pub const LABEL_MANAGED_BY: &str = "app.kubernetes.io/managed-by";
/// The worker's work dir inside its Pod (an emptyDir).
pub const WORK_DIR: &str = "/work";
/// Where the fledgelet writes its final state, read back by the kubelet.
pub const TERMINATION_MESSAGE_PATH: &str = "/work/final-state";
/// The uid and gid workers run as (the worker image has no user of its own).
pub const WORKER_UID: i64 = 65532;
/// The container's name in each worker Pod.
pub const CONTAINER: &str = "fledgelet";

/// The API verbs the deployer uses, by API group and resource: what its Role must grant
/// (`deploy/kubernetes/` has it; `fledge doctor` checks it with SelfSubjectAccessReviews).
/// Secrets are only ever created and deleted: the deployer cannot read any.
pub const RBAC: &[(&str, &str, &[&str])] = &[
    ("", "pods", &["create", "delete", "get", "list", "watch"]),
    ("", "pods/log", &["get"]),
    ("", "secrets", &["create", "delete"]),
];

/// The longest a single (non-watch) API request may take.
const API_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a watch request stays open before it is renewed (the server's limit applies too).
const WATCH_SECS: u32 = 290;
/// How long to wait for a deleted Pod to be gone before recreating one of the same name.
const GONE_TIMEOUT: Duration = Duration::from_secs(60);
/// Most bytes of a Pod's log copied into the worker's log file.
const LOG_LIMIT_BYTES: i64 = 64 * 1024;
/// The container waiting reasons that will not resolve by themselves: the worker fails.
const FATAL_WAITING: &[&str] = &[
    "ImagePullBackOff",
    "ErrImageNeverPull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
    "RunContainerError",
];

/// The values `image_pull_policy` may take.
pub const PULL_POLICIES: [&str; 3] = ["Always", "IfNotPresent", "Never"];

/// Options of the kubernetes runtime.
#[derive(Clone, Debug)]
pub struct K8sOptions {
    /// The namespace of the worker Pods (default: the cluster config's, i.e. the deployer's
    /// own namespace in a cluster, or the kubeconfig context's).
    pub namespace: Option<String>,
    /// The worker image (default `fledge-worker:latest`), pulled by the cluster.
    pub image: String,
    /// `Always`, `IfNotPresent` (default) or `Never`.
    pub image_pull_policy: String,
    /// A kubeconfig file (default: the in-cluster service account, else `KUBECONFIG` or
    /// `~/.kube/config`).
    pub kubeconfig: Option<PathBuf>,
    /// The service account the worker Pods run as (default: the namespace's `default`); its
    /// token is never mounted.
    pub service_account: Option<String>,
    /// CPUs per worker (requests and limits); 0 for none.
    pub cpus: f64,
    /// Memory per worker in bytes (requests and limits); 0 for none.
    pub memory_bytes: u64,
}

impl Default for K8sOptions {
    fn default() -> Self {
        Self {
            namespace: None,
            image: "fledge-worker:latest".to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            kubeconfig: None,
            service_account: None,
            cpus: 0.0,
            memory_bytes: 0,
        }
    }
}

impl K8sOptions {
    /// Checks every option; the error names the first bad one.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if let Some(namespace) = &self.namespace
            && !is_dns_label(namespace)
        {
            return Err((
                "k8s_namespace",
                format!("{namespace:?} is not a namespace name (a DNS label: a-z, 0-9, '-')"),
            ));
        }
        if self.image.trim().is_empty()
            || self.image.len() > 512
            || self.image.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(("k8s_image", format!("{:?} is not an image name", self.image)));
        }
        if !PULL_POLICIES.contains(&self.image_pull_policy.as_str()) {
            return Err((
                "k8s_image_pull_policy",
                format!("{:?} is not one of {}", self.image_pull_policy, PULL_POLICIES.join(", ")),
            ));
        }
        if let Some(account) = &self.service_account
            && !is_dns_subdomain(account)
        {
            return Err((
                "k8s_service_account",
                format!("{account:?} is not a service account name"),
            ));
        }
        if let Some(path) = &self.kubeconfig
            && path.as_os_str().is_empty()
        {
            return Err(("k8s_kubeconfig", "must not be empty".to_owned()));
        }
        if !(self.cpus.is_finite() && (0.0..=4096.0).contains(&self.cpus)) {
            return Err(("worker_cpus", format!("{} is not between 0 and 4096", self.cpus)));
        }
        if self.memory_bytes != 0 && self.memory_bytes < 6 * 1024 * 1024 {
            return Err(("worker_memory_mib", "below the minimum of 6 MiB".to_owned()));
        }
        Ok(())
    }
}

/// A DNS label (RFC 1123): 1..=63 of `a-z0-9-`, alphanumeric at both ends.
fn is_dns_label(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// A DNS subdomain (RFC 1123): dot-separated labels, at most 253 characters.
fn is_dns_subdomain(name: &str) -> bool {
    name.len() <= 253 && name.split('.').all(is_dns_label)
}

/// FNV-1a over the parts (with separators): a short, stable tag that keeps sanitized names
/// of different ids apart. Not a security measure.
fn tag(parts: &[&str]) -> String {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for part in parts {
        for byte in part.bytes().chain([0]) {
            hash ^= u64::from(byte);
            hash = hash.wrapping_mul(0x0100_0000_01b3);
        }
    }
    format!("{:08x}", hash >> 32)
}

/// `value` as a label value: itself when it is one already, else its allowed characters
/// (others become `-`), cut to fit, with a tag of the exact value.
pub fn label_value(value: &str) -> String {
    let valid = value.len() <= 63
        && value.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && value.bytes().next().is_none_or(|b| b.is_ascii_alphanumeric())
        && value.bytes().last().is_none_or(|b| b.is_ascii_alphanumeric());
    if valid {
        return value.to_owned();
    }
    let cleaned: String = value
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '-' })
        .take(54)
        .collect();
    let cleaned = cleaned.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if cleaned.is_empty() {
        format!("x{}", tag(&[value]))
    } else {
        format!("{cleaned}-{}", tag(&[value]))
    }
}

/// The name of a task's Pod and Secret: a DNS label unique to (compute, job, task).
pub fn object_name(compute: &str, job: &str, task: &str) -> String {
    let readable: String = format!("fledge-{compute}-{job}-{task}")
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() { c } else { '-' }
        })
        .take(54)
        .collect();
    format!("{}-{}", readable.trim_end_matches('-'), tag(&[compute, job, task]))
}

/// A connection to the cluster, with the compute's labels.
pub(crate) struct K8sRuntime {
    client: kube::Client,
    namespace: String,
    opts: K8sOptions,
    compute: ComputeId,
    /// The control plane's CA (PEM) the workers trust, if any.
    ca_pem: Option<String>,
}

/// Everything a Pod needs, decided by the deployer.
pub(crate) struct Launch<'a> {
    pub job: &'a JobId,
    pub task: &'a TaskId,
    pub role: &'a str,
    pub attempt: u32,
    pub task_key: &'a str,
    pub apiserver: &'a str,
    pub notifier: &'a str,
    pub fledgelet_args: &'a [String],
    pub fledgelet_env: &'a [(String, String)],
}

/// A started Pod, for its watcher.
pub(crate) struct Started {
    pods: Api<Pod>,
    secrets: Api<Secret>,
    selector: String,
    pub(crate) name: String,
}

/// Builds a client: the given kubeconfig, else in-cluster, else `KUBECONFIG` / `~/.kube/config`.
/// Returns it with the config's default namespace.
pub async fn client(kubeconfig: Option<&Path>) -> Result<(kube::Client, String), String> {
    let config = match kubeconfig {
        Some(path) => {
            let file = kube::config::Kubeconfig::read_from(path)
                .map_err(|err| format!("cannot read the kubeconfig {}: {err}", path.display()))?;
            kube::Config::from_custom_kubeconfig(file, &kube::config::KubeConfigOptions::default())
                .await
                .map_err(|err| format!("cannot use the kubeconfig {}: {err}", path.display()))?
        }
        None => match kube::Config::incluster() {
            Ok(config) => config,
            Err(in_cluster) => kube::Config::from_kubeconfig(
                &kube::config::KubeConfigOptions::default(),
            )
            .await
            .map_err(|err| {
                format!(
                    "no Kubernetes API to use: not in a cluster ({in_cluster}) and no kubeconfig \
                     ({err}); set deployer.k8s_kubeconfig"
                )
            })?,
        },
    };
    let namespace = config.default_namespace.clone();
    let client = kube::Client::try_from(config)
        .map_err(|err| format!("cannot build a Kubernetes client: {err}"))?;
    Ok((client, namespace))
}

/// `fut` with [`API_TIMEOUT`], its error described.
async fn call<T>(
    what: &str,
    fut: impl std::future::Future<Output = kube::Result<T>>,
) -> Result<T, kube::Error> {
    match tokio::time::timeout(API_TIMEOUT, fut).await {
        Ok(res) => res,
        Err(_) => Err(kube::Error::Service(format!("{what}: no answer in {API_TIMEOUT:?}").into())),
    }
}

fn api_code(err: &kube::Error) -> Option<u16> {
    match err {
        kube::Error::Api(status) => Some(status.code),
        _ => None,
    }
}

impl K8sRuntime {
    /// Connects to the cluster and deletes whatever an earlier run of this compute's deployer
    /// left behind.
    pub(crate) async fn connect(
        opts: K8sOptions,
        compute: ComputeId,
        ca_file: Option<&Path>,
    ) -> Result<Self, String> {
        let ca_pem = match ca_file {
            Some(path) => Some(
                tokio::fs::read_to_string(path)
                    .await
                    .map_err(|err| format!("cannot read the CA file {}: {err}", path.display()))?,
            ),
            None => None,
        };
        let (client, default_namespace) = client(opts.kubeconfig.as_deref()).await?;
        let namespace = opts.namespace.clone().unwrap_or(default_namespace);
        tracing::info!(namespace, image = opts.image, "kubernetes deployer connected");
        let runtime = Self { client, namespace, opts, compute, ca_pem };
        runtime.remove_all().await?;
        Ok(runtime)
    }

    fn pods(&self) -> Api<Pod> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// The label selector of this compute's objects.
    fn compute_selector(&self) -> String {
        format!("{LABEL_COMPUTE}={}", label_value(self.compute.as_str()))
    }

    /// Creates the task's Pod and Secret (replacing a stale Pod of the same name).
    pub(crate) async fn start(&self, launch: &Launch<'_>) -> Result<Started, String> {
        for (what, url) in [("apiserver", launch.apiserver), ("notifier", launch.notifier)] {
            if super::docker::is_loopback_url(url) {
                return Err(format!(
                    "the {what} URL {url} is a loopback address, which a Pod cannot reach: give \
                     the compute the control plane's address in the cluster (deployer.{what}, \
                     e.g. its Service's name)"
                ));
            }
        }
        let name = object_name(self.compute.as_str(), launch.job.as_str(), launch.task.as_str());
        let pods = self.pods();
        let secrets = self.secrets();
        let pod = self.pod(&name, launch);
        let created = match call("create pod", pods.create(&PostParams::default(), &pod)).await {
            Ok(created) => created,
            Err(err) if api_code(&err) == Some(409) => self.take_over(&name, &pod, launch).await?,
            Err(err) => return Err(format!("cannot create pod {name}: {err}")),
        };
        let uid = created.metadata.uid.clone().unwrap_or_default();
        let secret = self.secret(&name, &uid, launch);
        let made =
            match call("create secret", secrets.create(&PostParams::default(), &secret)).await {
                Err(err) if api_code(&err) == Some(409) => {
                    // A secret of an earlier Pod of this name that the collector has not removed
                    // yet: replace it.
                    tracing::info!(secret = name, "replacing a stale secret");
                    delete_secret(&secrets, &name).await;
                    call("create secret", secrets.create(&PostParams::default(), &secret)).await
                }
                other => other,
            };
        if let Err(err) = made {
            delete_pod(&pods, &name, 0).await;
            return Err(format!("cannot create secret {name}: {err}"));
        }
        Ok(Started {
            pods,
            secrets,
            selector: format!(
                "{},{LABEL_TASK}={}",
                self.compute_selector(),
                label_value(launch.task.as_str())
            ),
            name,
        })
    }

    /// A Pod of this name exists: the same attempt's (a create retried after a lost answer)
    /// is kept; any other is deleted and the Pod created again.
    async fn take_over(&self, name: &str, pod: &Pod, launch: &Launch<'_>) -> Result<Pod, String> {
        let pods = self.pods();
        let existing = call("get pod", pods.get_opt(name))
            .await
            .map_err(|err| format!("cannot read the existing pod {name}: {err}"))?;
        if let Some(existing) = existing {
            let attempt = existing
                .metadata
                .annotations
                .as_ref()
                .and_then(|a| a.get(ANNOTATION_ATTEMPT))
                .and_then(|a| a.parse::<u32>().ok());
            let running = existing
                .status
                .as_ref()
                .and_then(|s| s.phase.as_deref())
                .is_some_and(|phase| phase == "Pending" || phase == "Running");
            if attempt == Some(launch.attempt) && running {
                tracing::info!(pod = name, attempt, "the pod of this attempt exists already");
                return Ok(existing);
            }
            tracing::info!(pod = name, ?attempt, "replacing a stale pod");
            delete_pod(&pods, name, 0).await;
            wait_gone(&pods, name).await?;
        }
        call("create pod", pods.create(&PostParams::default(), pod))
            .await
            .map_err(|err| format!("cannot create pod {name}: {err}"))
    }

    fn labels(&self, launch: &Launch<'_>) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_COMPUTE.to_owned(), label_value(self.compute.as_str())),
            (LABEL_JOB.to_owned(), label_value(launch.job.as_str())),
            (LABEL_TASK.to_owned(), label_value(launch.task.as_str())),
            (LABEL_ROLE.to_owned(), label_value(launch.role)),
            (LABEL_MANAGED_BY.to_owned(), "fledge".to_owned()),
        ])
    }

    fn annotations(&self, launch: &Launch<'_>) -> BTreeMap<String, String> {
        BTreeMap::from([
            (LABEL_COMPUTE.to_owned(), self.compute.to_string()),
            (LABEL_JOB.to_owned(), launch.job.to_string()),
            (LABEL_TASK.to_owned(), launch.task.to_string()),
            (LABEL_ROLE.to_owned(), launch.role.to_owned()),
            (ANNOTATION_ATTEMPT.to_owned(), launch.attempt.to_string()),
        ])
    }

    /// The task's Pod.
    fn pod(&self, name: &str, launch: &Launch<'_>) -> Pod {
        let args = super::docker::worker_command(
            launch.task,
            launch.job,
            launch.apiserver,
            launch.notifier,
            WORK_DIR,
            launch.fledgelet_args,
        );
        let mut env = vec![EnvVar {
            name: "HOME".to_owned(),
            value: Some(WORK_DIR.to_owned()),
            ..Default::default()
        }];
        let mut mounts = vec![
            VolumeMount {
                name: "work".to_owned(),
                mount_path: WORK_DIR.to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: "tmp".to_owned(),
                mount_path: "/tmp".to_owned(),
                ..Default::default()
            },
            VolumeMount {
                name: "secret".to_owned(),
                mount_path: KEY_PATH.to_owned(),
                sub_path: Some("task-key".to_owned()),
                read_only: Some(true),
                ..Default::default()
            },
        ];
        let mut items = vec![KeyToPath {
            key: "task-key".to_owned(),
            path: "task-key".to_owned(),
            ..Default::default()
        }];
        if self.ca_pem.is_some() {
            mounts.push(VolumeMount {
                name: "secret".to_owned(),
                mount_path: CA_PATH.to_owned(),
                sub_path: Some("ca.pem".to_owned()),
                read_only: Some(true),
                ..Default::default()
            });
            items.push(KeyToPath {
                key: "ca.pem".to_owned(),
                path: "ca.pem".to_owned(),
                ..Default::default()
            });
            env.push(EnvVar {
                name: "FLEDGE_CA_FILE".to_owned(),
                value: Some(CA_PATH.to_owned()),
                ..Default::default()
            });
        }
        // A Pod's p2p ends listen on its addresses and advertise its IP, which only the
        // kubelet knows (the downward API); the process workers' settings do not apply.
        env.push(EnvVar {
            name: "FLEDGE_P2P_LISTEN_HOST".to_owned(),
            value: Some("0.0.0.0".to_owned()),
            ..Default::default()
        });
        env.push(EnvVar {
            name: "FLEDGE_P2P_ADVERTISE_HOST".to_owned(),
            value_from: Some(EnvVarSource {
                field_ref: Some(ObjectFieldSelector {
                    field_path: "status.podIP".to_owned(),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        });
        // The extra environment (e.g. a registry's credentials) from the Secret.
        for (key, _) in launch.fledgelet_env {
            if key.starts_with("FLEDGE_P2P_") {
                continue;
            }
            env.push(EnvVar {
                name: key.clone(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: name.to_owned(),
                        key: format!("env.{key}"),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
        let mut limits = BTreeMap::new();
        if self.opts.cpus > 0.0 {
            let millis = (self.opts.cpus * 1000.0).round().max(1.0) as u64;
            limits.insert("cpu".to_owned(), Quantity(format!("{millis}m")));
        }
        if self.opts.memory_bytes > 0 {
            limits.insert("memory".to_owned(), Quantity(self.opts.memory_bytes.to_string()));
        }
        let resources = (!limits.is_empty()).then(|| ResourceRequirements {
            requests: Some(limits.clone()),
            limits: Some(limits),
            ..Default::default()
        });
        let seccomp =
            || Some(SeccompProfile { type_: "RuntimeDefault".to_owned(), ..Default::default() });
        let container = Container {
            name: CONTAINER.to_owned(),
            image: Some(self.opts.image.clone()),
            image_pull_policy: Some(self.opts.image_pull_policy.clone()),
            command: Some(vec![FLEDGE_IN_IMAGE.to_owned()]),
            args: Some(args),
            env: Some(env),
            working_dir: Some(WORK_DIR.to_owned()),
            volume_mounts: Some(mounts),
            resources,
            termination_message_path: Some(TERMINATION_MESSAGE_PATH.to_owned()),
            termination_message_policy: Some("File".to_owned()),
            security_context: Some(SecurityContext {
                allow_privilege_escalation: Some(false),
                read_only_root_filesystem: Some(true),
                run_as_non_root: Some(true),
                run_as_user: Some(WORKER_UID),
                run_as_group: Some(WORKER_UID),
                privileged: Some(false),
                capabilities: Some(Capabilities {
                    drop: Some(vec!["ALL".to_owned()]),
                    ..Default::default()
                }),
                seccomp_profile: seccomp(),
                ..Default::default()
            }),
            ..Default::default()
        };
        Pod {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels(launch)),
                annotations: Some(self.annotations(launch)),
                ..Default::default()
            },
            spec: Some(PodSpec {
                containers: vec![container],
                restart_policy: Some("Never".to_owned()),
                service_account_name: self.opts.service_account.clone(),
                automount_service_account_token: Some(false),
                enable_service_links: Some(false),
                security_context: Some(PodSecurityContext {
                    run_as_non_root: Some(true),
                    run_as_user: Some(WORKER_UID),
                    run_as_group: Some(WORKER_UID),
                    fs_group: Some(WORKER_UID),
                    seccomp_profile: seccomp(),
                    ..Default::default()
                }),
                volumes: Some(vec![
                    Volume {
                        name: "work".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    Volume {
                        name: "tmp".to_owned(),
                        empty_dir: Some(EmptyDirVolumeSource::default()),
                        ..Default::default()
                    },
                    Volume {
                        name: "secret".to_owned(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(name.to_owned()),
                            items: Some(items),
                            default_mode: Some(0o440),
                            optional: Some(false),
                        }),
                        ..Default::default()
                    },
                ]),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The task's Secret, owned by its Pod `uid`.
    fn secret(&self, name: &str, uid: &str, launch: &Launch<'_>) -> Secret {
        let mut data = BTreeMap::from([("task-key".to_owned(), launch.task_key.to_owned())]);
        if let Some(ca) = &self.ca_pem {
            data.insert("ca.pem".to_owned(), ca.clone());
        }
        for (key, value) in launch.fledgelet_env {
            data.insert(format!("env.{key}"), value.clone());
        }
        Secret {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(self.namespace.clone()),
                labels: Some(self.labels(launch)),
                annotations: Some(self.annotations(launch)),
                owner_references: (!uid.is_empty()).then(|| {
                    vec![OwnerReference {
                        api_version: "v1".to_owned(),
                        kind: "Pod".to_owned(),
                        name: name.to_owned(),
                        uid: uid.to_owned(),
                        ..Default::default()
                    }]
                }),
                ..Default::default()
            },
            string_data: Some(data),
            type_: Some("Opaque".to_owned()),
            immutable: Some(true),
            ..Default::default()
        }
    }

    /// Deletes every Pod labelled with this compute (their Secrets go with them): at start
    /// what a crashed run left, at shutdown what is left.
    pub(crate) async fn remove_all(&self) -> Result<(), String> {
        let pods = self.pods();
        let params = ListParams::default().labels(&self.compute_selector());
        let list = call("list pods", pods.list(&params)).await.map_err(|err| {
            format!(
                "cannot list the pods of compute {} in namespace {}: {err}",
                self.compute, self.namespace
            )
        })?;
        for pod in list.items {
            if let Some(name) = pod.metadata.name {
                tracing::info!(pod = name, "deleting a pod of this compute");
                delete_pod(&pods, &name, 0).await;
                delete_secret(&self.secrets(), &name).await;
            }
        }
        Ok(())
    }
}

async fn delete_pod(pods: &Api<Pod>, name: &str, grace_secs: u32) {
    let params = DeleteParams { grace_period_seconds: Some(grace_secs), ..Default::default() };
    match call("delete pod", pods.delete(name, &params)).await {
        Ok(_) => {}
        Err(err) if api_code(&err) == Some(404) => {}
        Err(err) => tracing::warn!(pod = name, %err, "cannot delete pod"),
    }
}

async fn delete_secret(secrets: &Api<Secret>, name: &str) {
    match call("delete secret", secrets.delete(name, &DeleteParams::default())).await {
        Ok(_) => {}
        Err(err) if api_code(&err) == Some(404) => {}
        Err(err) => tracing::warn!(secret = name, %err, "cannot delete secret"),
    }
}

/// Waits until the Pod `name` is gone (a deleted Pod lingers while it terminates).
async fn wait_gone(pods: &Api<Pod>, name: &str) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + GONE_TIMEOUT;
    loop {
        match call("get pod", pods.get_opt(name)).await {
            Ok(None) => return Ok(()),
            Ok(Some(_)) => {}
            Err(err) => return Err(format!("cannot read pod {name}: {err}")),
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("pod {name} is still there {GONE_TIMEOUT:?} after its deletion"));
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// How a Pod stands, from its status.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum PodState {
    /// Not ended.
    Live,
    /// Ended: how (an exit status, described), and the final state the fledgelet reported
    /// (its termination message), if any.
    Ended { status: String, reported: Option<String> },
    /// Cannot start and will not by itself (the reason); the Pod is to be deleted.
    Stuck(String),
}

fn container_status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.iter().find(|status| status.name == CONTAINER)
}

/// Reads a Pod's state.
pub(crate) fn pod_state(pod: &Pod) -> PodState {
    let status = pod.status.as_ref();
    let phase = status.and_then(|s| s.phase.as_deref()).unwrap_or("Pending");
    let container = container_status(pod);
    let terminated = container.and_then(|c| c.state.as_ref()).and_then(|s| s.terminated.as_ref());
    if let Some(terminated) = terminated {
        let mut described = describe_exit(i64::from(terminated.exit_code));
        match terminated.reason.as_deref() {
            Some("OOMKilled") => {
                described.push_str(", killed by the kernel at its memory limit (OOMKilled)")
            }
            Some("Error" | "Completed") | None => {}
            Some(reason) => described.push_str(&format!(" ({reason})")),
        }
        let message = terminated.message.as_deref().map(str::trim).unwrap_or_default();
        let reported = (!message.is_empty()).then(|| message.chars().take(64).collect());
        return PodState::Ended { status: described, reported };
    }
    if phase == "Failed" || phase == "Succeeded" {
        // Ended without a container status: evicted, or the node was lost.
        let reason = status.and_then(|s| s.reason.as_deref()).unwrap_or("unknown reason");
        let message = status.and_then(|s| s.message.as_deref()).unwrap_or_default();
        return PodState::Ended {
            status: format!("the pod {} ({reason}) {message}", phase.to_ascii_lowercase())
                .trim_end()
                .to_owned(),
            reported: None,
        };
    }
    if let Some(waiting) = container.and_then(|c| c.state.as_ref()).and_then(|s| s.waiting.as_ref())
        && let Some(reason) = waiting.reason.as_deref()
        && FATAL_WAITING.contains(&reason)
    {
        return PodState::Stuck(match waiting.message.as_deref().filter(|m| !m.is_empty()) {
            Some(message) => format!("{reason} ({message})"),
            None => reason.to_owned(),
        });
    }
    PodState::Live
}

/// Waits for the Pod to end (or deletes it when `kill` fires), copying the end of its output
/// into `log` and writing the reported final state into `marker`; then deletes it and its
/// Secret. Returns how it ended.
pub(crate) async fn watch(
    started: Started,
    kill: CancellationToken,
    grace: Duration,
    log: std::fs::File,
    marker: PathBuf,
) -> (String, bool) {
    let Started { pods, secrets, selector, name } = started;
    let (status, killed) = tokio::select! {
        ended = wait_end(&pods, &name, &selector) => (ended, false),
        () = kill.cancelled() => {
            let secs = u32::try_from(grace.as_secs()).unwrap_or(u32::MAX);
            delete_pod(&pods, &name, secs).await;
            // The kubelet sends SIGTERM, then SIGKILL after the grace period.
            if let Err(err) = wait_gone(&pods, &name).await {
                tracing::warn!(pod = name, err, "revoked pod not gone yet");
            }
            (PodState::Ended { status: "deleted on request".to_owned(), reported: None }, true)
        }
    };
    let status = match status {
        PodState::Ended { status, reported } => {
            if let Some(state) = reported
                && let Err(err) = tokio::fs::write(&marker, state).await
            {
                tracing::warn!(pod = name, %err, "cannot write the final-state marker");
            }
            status
        }
        PodState::Stuck(reason) => reason,
        PodState::Live => "an unknown status".to_owned(),
    };
    if !killed {
        copy_logs(&pods, &name, log).await;
    }
    delete_pod(&pods, &name, 0).await;
    delete_secret(&secrets, &name).await;
    (status, killed)
}

/// Watches the Pod until it ends or is stuck; a Pod that disappears has ended.
async fn wait_end(pods: &Api<Pod>, name: &str, selector: &str) -> PodState {
    let mut failures = 0u32;
    loop {
        // Where the Pod stands now, then its changes from there.
        let pod = match call("get pod", pods.get_opt(name)).await {
            Ok(Some(pod)) => pod,
            Ok(None) => {
                return PodState::Ended {
                    status: "an unknown status (the pod was deleted)".to_owned(),
                    reported: None,
                };
            }
            Err(err) => {
                failures += 1;
                tracing::warn!(pod = name, %err, failures, "cannot read pod");
                tokio::time::sleep(Duration::from_secs(u64::from(failures.min(30)))).await;
                continue;
            }
        };
        let state = pod_state(&pod);
        if state != PodState::Live {
            return state;
        }
        let version = pod.metadata.resource_version.unwrap_or_default();
        let params = WatchParams::default()
            .fields(&format!("metadata.name={name}"))
            .labels(selector)
            .timeout(WATCH_SECS);
        let stream = match call("watch pod", pods.watch(&params, &version)).await {
            Ok(stream) => stream,
            Err(err) => {
                failures += 1;
                tracing::warn!(pod = name, %err, failures, "cannot watch pod");
                tokio::time::sleep(Duration::from_secs(u64::from(failures.min(30)))).await;
                continue;
            }
        };
        failures = 0;
        let mut stream = std::pin::pin!(stream);
        // A connection that died without a word ends the wait too: the server closes every
        // watch after WATCH_SECS.
        let idle = Duration::from_secs(u64::from(WATCH_SECS) + 30);
        while let Ok(Some(event)) = tokio::time::timeout(idle, stream.next()).await {
            match event {
                Ok(WatchEvent::Added(pod) | WatchEvent::Modified(pod)) => {
                    let state = pod_state(&pod);
                    if state != PodState::Live {
                        return state;
                    }
                }
                Ok(WatchEvent::Deleted(pod)) => {
                    return match pod_state(&pod) {
                        PodState::Live => PodState::Ended {
                            status: "an unknown status (the pod was deleted)".to_owned(),
                            reported: None,
                        },
                        state => state,
                    };
                }
                Ok(WatchEvent::Bookmark(_)) => {}
                // 410 Gone (the version is too old) and the like: read the Pod again.
                Ok(WatchEvent::Error(status)) => {
                    tracing::debug!(pod = name, code = status.code, "watch error; re-reading");
                    break;
                }
                Err(err) => {
                    tracing::warn!(pod = name, %err, "pod watch failed");
                    break;
                }
            }
        }
    }
}

/// Copies the end of the Pod's output into the worker's log file.
async fn copy_logs(pods: &Api<Pod>, name: &str, log: std::fs::File) {
    let params = LogParams {
        container: Some(CONTAINER.to_owned()),
        limit_bytes: Some(LOG_LIMIT_BYTES),
        tail_lines: Some(200),
        ..Default::default()
    };
    let text = match call("read pod log", pods.logs(name, &params)).await {
        Ok(text) => text,
        Err(err) => {
            tracing::warn!(pod = name, %err, "cannot read the pod's log");
            return;
        }
    };
    let mut file = tokio::fs::File::from_std(log);
    if let Err(err) = file.write_all(text.as_bytes()).await {
        tracing::warn!(pod = name, %err, "cannot write the worker log");
    }
    let _ = file.flush().await;
}

/// Whether the cluster answers and grants this identity every verb of [`RBAC`] in
/// `namespace` (SelfSubjectAccessReviews). Returns the namespace checked, or what is wrong.
pub async fn check_cluster(
    kubeconfig: Option<&Path>,
    namespace: Option<&str>,
) -> Result<String, String> {
    use k8s_openapi::api::authorization::v1::{
        ResourceAttributes, SelfSubjectAccessReview, SelfSubjectAccessReviewSpec,
    };
    let (client, default_namespace) = client(kubeconfig).await?;
    let namespace = namespace.map_or(default_namespace, str::to_owned);
    let reviews: Api<SelfSubjectAccessReview> = Api::all(client);
    let mut missing = Vec::new();
    for (group, resource, verbs) in RBAC {
        let (resource, subresource) = match resource.split_once('/') {
            Some((resource, sub)) => (resource, Some(sub.to_owned())),
            None => (*resource, None),
        };
        for verb in *verbs {
            let review = SelfSubjectAccessReview {
                spec: SelfSubjectAccessReviewSpec {
                    resource_attributes: Some(ResourceAttributes {
                        group: Some((*group).to_owned()),
                        namespace: Some(namespace.clone()),
                        resource: Some(resource.to_owned()),
                        subresource: subresource.clone(),
                        verb: Some((*verb).to_owned()),
                        ..Default::default()
                    }),
                    ..Default::default()
                },
                ..Default::default()
            };
            let answer = call("access review", reviews.create(&PostParams::default(), &review))
                .await
                .map_err(|err| format!("the Kubernetes API does not answer: {err}"))?;
            if !answer.status.is_some_and(|s| s.allowed) {
                let shown =
                    subresource.as_ref().map_or(resource.to_owned(), |s| format!("{resource}/{s}"));
                missing.push(format!("{verb} {shown}"));
            }
        }
    }
    if missing.is_empty() {
        Ok(namespace)
    } else {
        Err(format!(
            "the deployer's identity may not {} in namespace {namespace} (see the Role in \
             deploy/kubernetes/)",
            missing.join(", ")
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_valid_and_distinct() {
        assert_eq!(label_value("c1"), "c1");
        assert_eq!(label_value("job-1.a_b"), "job-1.a_b");
        let long = "a".repeat(100);
        // Kubernetes allows an empty value as it is.
        assert_eq!(label_value(""), "");
        for value in ["-x", "x-", "a/b", &long, "ä"] {
            let label = label_value(value);
            assert!(label.len() <= 63, "{label}");
            assert!(label.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric()), "{label}");
            assert!(label.bytes().last().is_some_and(|b| b.is_ascii_alphanumeric()), "{label}");
        }
        assert_ne!(label_value("a/b"), label_value("a:b"));
    }

    #[test]
    fn object_names_are_dns_labels() {
        let name = object_name("Compute_1", "job.x", "t1");
        assert!(is_dns_label(&name), "{name}");
        assert!(name.starts_with("fledge-compute-1-job-x-t1-"), "{name}");
        let long = "T".repeat(128);
        let name = object_name(&long, &long, &long);
        assert!(is_dns_label(&name), "{name}");
        assert_ne!(object_name("c", "j", "a_b"), object_name("c", "j", "a.b"));
    }

    #[test]
    fn options_are_checked() {
        assert!(K8sOptions::default().validate().is_ok());
        let bad = |f: fn(&mut K8sOptions)| {
            let mut opts = K8sOptions::default();
            f(&mut opts);
            opts.validate().expect_err("invalid").0
        };
        assert_eq!(bad(|o| o.namespace = Some("Fledge".into())), "k8s_namespace");
        assert_eq!(bad(|o| o.namespace = Some(String::new())), "k8s_namespace");
        assert_eq!(bad(|o| o.image = "a b".into()), "k8s_image");
        assert_eq!(bad(|o| o.image_pull_policy = "always".into()), "k8s_image_pull_policy");
        assert_eq!(bad(|o| o.service_account = Some("a_b".into())), "k8s_service_account");
        assert_eq!(bad(|o| o.kubeconfig = Some(PathBuf::new())), "k8s_kubeconfig");
        assert_eq!(bad(|o| o.cpus = -1.0), "worker_cpus");
        assert_eq!(bad(|o| o.memory_bytes = 1), "worker_memory_mib");
    }

    fn pod_with(status: serde_json::Value) -> Pod {
        serde_json::from_value(serde_json::json!({"metadata": {"name": "p"}, "status": status}))
            .expect("a pod")
    }

    #[test]
    fn pod_states_are_read() {
        let running = pod_with(serde_json::json!({"phase": "Running", "containerStatuses": [
            {"name": "fledgelet", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
             "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}));
        assert_eq!(pod_state(&running), PodState::Live);
        let oom = pod_with(serde_json::json!({"phase": "Failed", "containerStatuses": [
            {"name": "fledgelet", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}}]}));
        let PodState::Ended { status, reported } = pod_state(&oom) else { panic!("ended") };
        assert_eq!(
            status,
            "exit code 137 (SIGKILL), killed by the kernel at its memory limit (OOMKilled)"
        );
        assert_eq!(reported, None);
        let done = pod_with(serde_json::json!({"phase": "Succeeded", "containerStatuses": [
            {"name": "fledgelet", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"terminated": {"exitCode": 0, "reason": "Completed", "message": "completed\n"}}}]}));
        assert_eq!(
            pod_state(&done),
            PodState::Ended { status: "exit code 0".into(), reported: Some("completed".into()) }
        );
        let pull = pod_with(serde_json::json!({"phase": "Pending", "containerStatuses": [
            {"name": "fledgelet", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image \"x\""}}}]}));
        assert_eq!(
            pod_state(&pull),
            PodState::Stuck("ImagePullBackOff (Back-off pulling image \"x\")".into())
        );
        let creating = pod_with(serde_json::json!({"phase": "Pending", "containerStatuses": [
            {"name": "fledgelet", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
             "state": {"waiting": {"reason": "ContainerCreating"}}}]}));
        assert_eq!(pod_state(&creating), PodState::Live);
        let evicted = pod_with(serde_json::json!({"phase": "Failed", "reason": "Evicted",
            "message": "The node was low on resource: memory."}));
        assert_eq!(
            pod_state(&evicted),
            PodState::Ended {
                status: "the pod failed (Evicted) The node was low on resource: memory.".into(),
                reported: None
            }
        );
    }
}

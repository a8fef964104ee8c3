//! The Kubernetes manifests in `deploy/kubernetes/`: every document parses, names its kind
//! and namespace, the deployer's Role grants exactly the verbs the code uses
//! ([`k8s::RBAC`]), and the configurations they carry load as `fledge serve` loads them.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use serde_json::Value;

use fledge_agent::deployer::k8s::{self, K8sOptions};
use fledge_control::config::Options;

fn manifests() -> Vec<(String, Value)> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../deploy/kubernetes");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("deploy/kubernetes exists")
        .map(|entry| entry.expect("entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    let mut docs = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).expect("read");
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value: Value = serde::Deserialize::deserialize(doc)
                .unwrap_or_else(|err| panic!("{}: not YAML: {err}", file.display()));
            if value.is_null() {
                continue;
            }
            let name = file.file_name().expect("name").to_string_lossy().into_owned();
            docs.push((name, value));
        }
    }
    docs
}

fn find<'a>(docs: &'a [(String, Value)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .map(|(_, doc)| doc)
        .find(|doc| doc["kind"] == kind && doc["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

#[test]
fn every_document_has_a_kind_a_name_and_the_namespace() {
    let docs = manifests();
    let mut kinds = BTreeSet::new();
    for (file, doc) in &docs {
        let kind = doc["kind"].as_str().unwrap_or_else(|| panic!("{file}: no kind"));
        assert!(doc["apiVersion"].is_string(), "{file}: {kind} has no apiVersion");
        assert!(doc["metadata"]["name"].is_string(), "{file}: {kind} has no name");
        if kind != "Namespace" {
            assert_eq!(doc["metadata"]["namespace"], "fledge", "{file}: {kind}");
        }
        kinds.insert(kind.to_owned());
    }
    for kind in [
        "Namespace",
        "ConfigMap",
        "Service",
        "StatefulSet",
        "Deployment",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "PersistentVolumeClaim",
    ] {
        assert!(kinds.contains(kind), "no {kind} in {kinds:?}");
    }
    find(&docs, "StatefulSet", "postgres");
    find(&docs, "StatefulSet", "mosquitto");
    find(&docs, "Deployment", "fledge-control");
    // Every container is hardened.
    for (file, doc) in &docs {
        let Some(spec) = doc["spec"]["template"]["spec"].as_object() else { continue };
        let containers = spec["containers"].as_array().into_iter().flatten();
        let init = spec.get("initContainers").and_then(Value::as_array).into_iter().flatten();
        for container in containers.chain(init) {
            let security = &container["securityContext"];
            assert_eq!(
                security["allowPrivilegeEscalation"], false,
                "{file}: {}",
                container["name"]
            );
            assert_eq!(security["capabilities"]["drop"], serde_json::json!(["ALL"]), "{file}");
        }
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{file}");
    }
}

#[test]
fn the_deployer_role_grants_exactly_the_verbs_the_code_uses() {
    let docs = manifests();
    let role = find(&docs, "Role", "fledge-deployer");
    let mut granted: BTreeMap<(String, String), BTreeSet<String>> = BTreeMap::new();
    for rule in role["rules"].as_array().expect("rules") {
        let strings = |key: &str| -> Vec<String> {
            rule[key]
                .as_array()
                .expect(key)
                .iter()
                .map(|v| v.as_str().expect("string").to_owned())
                .collect()
        };
        for group in strings("apiGroups") {
            for resource in strings("resources") {
                granted.entry((group.clone(), resource)).or_default().extend(strings("verbs"));
            }
        }
    }
    let needed: BTreeMap<(String, String), BTreeSet<String>> = k8s::RBAC
        .iter()
        .map(|(group, resource, verbs)| {
            (
                ((*group).to_owned(), (*resource).to_owned()),
                verbs.iter().map(|v| (*v).to_owned()).collect(),
            )
        })
        .collect();
    assert_eq!(granted, needed, "the Role in deploy/kubernetes/ and k8s::RBAC differ");

    let binding = find(&docs, "RoleBinding", "fledge-deployer");
    assert_eq!(binding["roleRef"]["name"], "fledge-deployer");
    assert_eq!(binding["subjects"][0]["name"], "fledge-deployer");
    let deployer = find(&docs, "Deployment", "fledge-deployer");
    assert_eq!(deployer["spec"]["template"]["spec"]["serviceAccountName"], "fledge-deployer");
    let worker = find(&docs, "ServiceAccount", "fledge-worker");
    assert_eq!(worker["automountServiceAccountToken"], false);
}

#[test]
fn the_configurations_load_as_fledge_serve_loads_them() {
    let docs = manifests();
    let dir = tempfile::tempdir().expect("tempdir");

    let control = find(&docs, "ConfigMap", "fledge-control")["data"]["serve.toml"]
        .as_str()
        .expect("serve.toml");
    let path = dir.path().join("serve.toml");
    std::fs::write(&path, control).expect("write");
    let env = HashMap::from([
        (
            "FLEDGE_STORE_URL".to_owned(),
            "postgres://fledge:pw@postgres.fledge.svc/fledge".to_owned(),
        ),
        ("FLEDGE_MOSQUITTO_ADMIN_PASSWORD".to_owned(), "pw".to_owned()),
    ]);
    let options =
        Options::load(Some(path.as_path()), &env, &[]).expect("the control plane's config loads");
    assert!(options.runs_control_plane());
    assert_eq!(options.mosquitto.admin_url.as_deref(), Some("mqtt://mosquitto.fledge.svc:1883"));

    let deployer = find(&docs, "ConfigMap", "fledge-deployer")["data"]["deployer.toml"]
        .as_str()
        .expect("deployer.toml");
    // The compute key file is a mounted Secret there; a file of our own here.
    let key = dir.path().join("api-key");
    std::fs::write(&key, "compute-key\n").expect("write key");
    let deployer = deployer.replace("/run/secrets/fledge/api-key", &key.display().to_string());
    let path = dir.path().join("deployer.toml");
    std::fs::write(&path, deployer).expect("write");
    let options = Options::load(Some(path.as_path()), &HashMap::new(), &[])
        .expect("the deployer's config loads");
    let section = &options.deployer;
    assert_eq!(section.platform, fledge_types::Platform::K8s);
    assert_eq!(section.api_key.as_deref(), Some("compute-key"));
    let k8s = K8sOptions {
        namespace: section.k8s_namespace.clone(),
        image: section.k8s_image.clone(),
        image_pull_policy: section.k8s_image_pull_policy.clone(),
        kubeconfig: section.k8s_kubeconfig.clone(),
        service_account: section.k8s_service_account.clone(),
        cpus: section.worker_cpus,
        memory_bytes: section.worker_memory_mib * 1024 * 1024,
    };
    k8s.validate().expect("valid kubernetes options");
    assert_eq!(k8s.service_account.as_deref(), Some("fledge-worker"));
}

//! Validation of schemas and job specs: every problem at once, each with a path to its field.
//!
//! Paths are relative to the validated document (`roles[1].groupAssociation[0].param-channel`,
//! `modelSpec.hyperparameters.rounds`); problems a job finds in its schema are prefixed with
//! `schema.`. An empty list means valid.

use std::collections::{BTreeSet, HashMap};

use serde_json::Value;

use crate::error::ErrorDetail;
use crate::expand;
use crate::ids::{DatasetId, JobId};
use crate::job::JobSpec;
use crate::resources::Dataset;
use crate::schema::Schema;

/// The longest `maxRunTime` accepted, in seconds (30 days).
pub const MAX_RUN_TIME_LIMIT: u64 = 30 * 24 * 3600;

/// The largest `replica` accepted: each replica is a worker to deploy.
pub const MAX_REPLICA: i64 = 1000;

/// Registry sorts a model spec may name (`dummy`, Flame's "no registry", stands for the
/// deployment's default).
pub const REGISTRY_SORTS: &[&str] =
    &["local", crate::job::MLFLOW_REGISTRY, crate::job::S3_REGISTRY, crate::job::DUMMY_REGISTRY];

/// `host` as it goes into an advertised URL (a p2p end's, a control plane's): a DNS name (letters, digits, `-`, `.`, `_`, at
/// most 253 bytes), an IPv4 address, or an IPv6 address (bracketed here if it was not).
pub fn dialable_host(host: &str) -> Result<String, String> {
    let inner = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    if let Ok(ip) = inner.parse::<std::net::IpAddr>() {
        if ip.is_unspecified() {
            return Err("an unspecified address cannot be dialled".to_owned());
        }
        return Ok(match ip {
            std::net::IpAddr::V6(ip) => format!("[{ip}]"),
            ip => ip.to_string(),
        });
    }
    if host.is_empty() || host.len() > 253 {
        return Err("must be 1 to 253 bytes".to_owned());
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if !host.trim_end_matches('.').split('.').all(label_ok) {
        return Err(
            "is neither an IP address nor a DNS name (letters, digits, '-', '_', '.')".to_owned()
        );
    }
    Ok(host.to_owned())
}

/// Every problem of a schema (empty: valid).
pub fn schema(schema: &Schema) -> Vec<ErrorDetail> {
    let mut errors = Vec::new();
    let mut push = |path: String, message: String| errors.push(ErrorDetail { path, message });

    if schema.roles.is_empty() {
        push("roles".into(), "at least one role is required".into());
    }
    let mut role_index: HashMap<&str, usize> = HashMap::new();
    for (idx, role) in schema.roles.iter().enumerate() {
        if role.name.trim().is_empty() {
            push(format!("roles[{idx}].name"), "must not be empty".into());
        } else if let Some(first) = role_index.get(role.name.as_str()) {
            push(
                format!("roles[{idx}].name"),
                format!("duplicate role name {:?} (first at roles[{first}])", role.name),
            );
        } else {
            role_index.insert(&role.name, idx);
        }
    }

    let mut channel_index: HashMap<&str, usize> = HashMap::new();
    for (idx, channel) in schema.channels.iter().enumerate() {
        let path = format!("channels[{idx}]");
        if channel.name.trim().is_empty() {
            push(format!("{path}.name"), "must not be empty".into());
        } else if let Some(first) = channel_index.get(channel.name.as_str()) {
            push(
                format!("{path}.name"),
                format!("duplicate channel name {:?} (first at channels[{first}])", channel.name),
            );
        } else {
            channel_index.insert(&channel.name, idx);
        }
        if channel.pair.len() != 2 {
            push(
                format!("{path}.pair"),
                format!(
                    "must name exactly 2 roles (the same role twice for a self-loop), found {}",
                    channel.pair.len()
                ),
            );
        }
        for (end, role) in channel.pair.iter().enumerate() {
            if !role_index.contains_key(role.as_str()) {
                push(format!("{path}.pair[{end}]"), format!("unknown role {role:?}"));
            }
        }
        if let Some(group_by) = &channel.group_by {
            if group_by.kind != "tag" {
                push(
                    format!("{path}.groupBy.type"),
                    format!("unsupported grouping {:?}, expected \"tag\"", group_by.kind),
                );
            }
            let mut seen = BTreeSet::new();
            for (label_idx, label) in group_by.value.iter().enumerate() {
                if label.trim().is_empty() {
                    push(format!("{path}.groupBy.value[{label_idx}]"), "must not be empty".into());
                } else if !seen.insert(label.as_str()) {
                    push(
                        format!("{path}.groupBy.value[{label_idx}]"),
                        format!("duplicate group label {label:?}"),
                    );
                }
            }
        }
        for role in channel.func_tags.keys() {
            if !channel.pair.contains(role) {
                push(
                    format!("{path}.funcTags.{role}"),
                    format!("role {role:?} is not in the channel's pair"),
                );
            }
        }
    }

    if !schema.roles.is_empty() && !schema.roles.iter().any(|r| r.is_data_consumer) {
        push(
            "roles".into(),
            "no data-consuming role (set isDataConsumer on the role that trains on data)".into(),
        );
    }

    for (idx, role) in schema.roles.iter().enumerate() {
        let path = format!("roles[{idx}]");
        let role_channels: Vec<_> =
            schema.channels.iter().filter(|c| c.pair.contains(&role.name)).collect();
        if role.replica > MAX_REPLICA {
            push(
                format!("{path}.replica"),
                format!("{} exceeds the limit of {MAX_REPLICA}", role.replica),
            );
        } else if role.is_data_consumer && role.replica > 1 {
            push(
                format!("{path}.replica"),
                "has no effect on a data-consuming role, which gets one task per dataset; \
                 list more datasets instead"
                    .into(),
            );
        }
        if role_channels.is_empty() && !role.name.trim().is_empty() {
            push(path.clone(), format!("role {:?} is in no channel", role.name));
        }
        // A channel with several groups needs the role's entries to say which one.
        let multi_group: Vec<_> =
            role_channels.iter().filter(|c| c.group_labels().len() > 1).collect();
        if role.group_association.is_empty() {
            for channel in &multi_group {
                push(
                    format!("{path}.groupAssociation"),
                    format!(
                        "role is in channel {:?}, which has several groups; name one",
                        channel.name
                    ),
                );
            }
        }
        let mut seen_entries = Vec::new();
        for (entry_idx, entry) in role.group_association.iter().enumerate() {
            let entry_path = format!("{path}.groupAssociation[{entry_idx}]");
            if let Some(first) = seen_entries.iter().position(|e| *e == entry) {
                push(
                    entry_path.clone(),
                    format!("duplicate of groupAssociation[{first}] (use replica for copies)"),
                );
            }
            seen_entries.push(entry);
            for (channel_name, group) in entry {
                let Some(&channel_idx) = channel_index.get(channel_name.as_str()) else {
                    push(
                        format!("{entry_path}.{channel_name}"),
                        format!("unknown channel {channel_name:?}"),
                    );
                    continue;
                };
                let channel = &schema.channels[channel_idx];
                if !channel.pair.contains(&role.name) {
                    push(
                        format!("{entry_path}.{channel_name}"),
                        format!("role {:?} is not in channel {channel_name:?}'s pair", role.name),
                    );
                    continue;
                }
                let labels = channel.group_labels();
                if !labels.contains(group) {
                    push(
                        format!("{entry_path}.{channel_name}"),
                        format!(
                            "group {group:?} is not a group of channel {channel_name:?} (groups: {})",
                            labels.join(", ")
                        ),
                    );
                }
            }
            for channel in &multi_group {
                if !entry.contains_key(&channel.name) {
                    push(
                        entry_path.clone(),
                        format!(
                            "no group for channel {:?}, which has several groups",
                            channel.name
                        ),
                    );
                }
            }
        }
    }
    errors
}

/// Every problem of a job spec against its schema and datasets (empty: valid).
///
/// `datasets` looks a dataset id up among those the job's owner may use. The schema is
/// validated too (problems prefixed `schema.`); when it is valid the job is expanded as a
/// check, so data-spec mistakes and idle aggregators are reported here as well.
pub fn job(
    spec: &JobSpec,
    schema: &Schema,
    datasets: &dyn Fn(&DatasetId) -> Option<Dataset>,
) -> Vec<ErrorDetail> {
    let mut errors = Vec::new();
    let mut push =
        |path: &str, message: String| errors.push(ErrorDetail { path: path.to_owned(), message });

    if spec.name.is_empty() {
        // Callers apply `JobSpec::with_defaults` first; an empty name means they did not.
        push("name", "must not be empty (omit it to name the job after its design)".into());
    } else if spec.name.trim().is_empty() {
        push("name", "must not be blank (omit it to name the job after its design)".into());
    }
    if spec.design_id.as_str().trim().is_empty() {
        push("designId", "must not be empty".into());
    }
    if spec.max_run_time > MAX_RUN_TIME_LIMIT {
        push(
            "maxRunTime",
            format!(
                "{} s exceeds the limit of {MAX_RUN_TIME_LIMIT} s (30 days); 0 means no limit",
                spec.max_run_time
            ),
        );
    }
    for (role, policy) in &spec.restart_policy {
        if !schema.roles.iter().any(|r| &r.name == role) {
            push(&format!("restartPolicy.{role}"), format!("the design has no role {role:?}"));
        }
        if policy.max_restarts > crate::job::RestartPolicy::MAX_RESTARTS_LIMIT {
            push(
                &format!("restartPolicy.{role}.maxRestarts"),
                format!(
                    "{} exceeds the limit of {}",
                    policy.max_restarts,
                    crate::job::RestartPolicy::MAX_RESTARTS_LIMIT
                ),
            );
        }
    }
    let model = &spec.model_spec;
    for (key, value) in &model.hyperparameters {
        let path = format!("modelSpec.hyperparameters.{key}");
        match key.as_str() {
            "rounds" if !matches!(value.as_u64(), Some(1..)) => {
                push(&path, format!("must be a positive integer, found {}", show(value)));
            }
            "epochs" | "batchSize" | "learningRate" if !value.as_f64().is_some_and(|x| x > 0.0) => {
                push(&path, format!("must be a positive number, found {}", show(value)));
            }
            _ => {}
        }
    }
    if model.optimizer.sort.trim().is_empty() {
        push("modelSpec.optimizer.sort", "must not be empty".into());
    }
    if model.selector.sort.trim().is_empty() {
        push("modelSpec.selector.sort", "must not be empty".into());
    }
    if !REGISTRY_SORTS.contains(&model.registry.sort.as_str()) {
        push(
            "modelSpec.registry.sort",
            format!(
                "unknown registry {:?}, expected one of: {}",
                model.registry.sort,
                REGISTRY_SORTS.join(", ")
            ),
        );
    } else if model.registry.sort == crate::job::MLFLOW_REGISTRY {
        let uri = model.registry.uri.trim();
        let scheme_ok = ["http://", "https://"]
            .iter()
            .any(|s| uri.len() > s.len() && uri.to_ascii_lowercase().starts_with(s));
        if !scheme_ok || uri.contains(['?', '#', ' ']) {
            push(
                "modelSpec.registry.uri",
                format!(
                    "must be the MLflow tracking server's http:// or https:// URL (no query), \
                     found {:?}",
                    model.registry.uri
                ),
            );
        }
    } else if model.registry.sort == crate::job::S3_REGISTRY {
        if let Err(problem) = crate::job::parse_s3_uri(model.registry.uri.trim()) {
            push("modelSpec.registry.uri", problem);
        }
    } else if model.registry.sort == crate::job::DUMMY_REGISTRY && !model.registry.uri.is_empty() {
        push(
            "modelSpec.registry.uri",
            format!(
                "must be empty for the {:?} registry (no registry), found {:?}",
                crate::job::DUMMY_REGISTRY,
                model.registry.uri
            ),
        );
    }

    let schema_errors = self::schema(schema);
    if !schema_errors.is_empty() {
        errors.extend(schema_errors.into_iter().map(|d| ErrorDetail {
            path: if d.path.is_empty() {
                "schema".to_owned()
            } else {
                format!("schema.{}", d.path)
            },
            message: d.message,
        }));
        return errors;
    }

    // Expansion needs the datasets themselves; unknown ids are reported by expansion.
    let mut found: Vec<Dataset> = Vec::new();
    for id in spec.data_spec.iter().flat_map(|e| e.dataset_groups.values().flatten()) {
        if !found.iter().any(|d| &d.id == id)
            && let Some(dataset) = datasets(id)
        {
            found.push(dataset);
        }
    }
    // The id only seeds task ids; any value gives the same verdict.
    if let Err(expansion) = expand::expand(&JobId::new("validation"), spec, schema, &found, &[]) {
        errors.extend(expansion);
    }
    errors
}

/// A JSON value as the user wrote it, for messages.
fn show(value: &Value) -> String {
    value.to_string()
}

//! The topology graph (TAG) of a design: roles, channels and their groups.
//!
//! Field names follow Cisco Flame's `schema.json` so its files load unchanged.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The group a channel has when its `groupBy` is absent.
pub const DEFAULT_GROUP: &str = "default";

/// A design's topology: which roles exist and which channels connect them.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Schema {
    /// Human-readable name.
    #[serde(default)]
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The roles (vertices).
    pub roles: Vec<Role>,
    /// The channels (edges).
    pub channels: Vec<ChannelSpec>,
}

/// A role of the topology: trainer, aggregator, coordinator, ...
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Role {
    /// The role's name, unique within the schema.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Whether the role consumes datasets (one task per dataset).
    #[serde(default)]
    pub is_data_consumer: bool,
    /// Tasks per group association entry for non-data roles; values below 1 mean 1.
    #[serde(default)]
    pub replica: i64,
    /// Each entry maps channel name → group label; non-data roles get tasks per entry.
    #[serde(default)]
    pub group_association: Vec<BTreeMap<String, String>>,
    /// Set when tasks of this role are run by their data owners (non-orchestration mode).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub participant_run: bool,
}

impl Role {
    /// Replicas per group association entry, with values below 1 read as 1.
    pub fn replicas(&self) -> usize {
        usize::try_from(self.replica.max(1)).unwrap_or(1)
    }
}

/// A channel of the topology: an edge between two roles (or a role and itself).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ChannelSpec {
    /// The channel's name, unique within the schema.
    pub name: String,
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// The two roles it connects; both may be the same role (a self-loop).
    pub pair: Vec<String>,
    /// How ends are grouped; absent means the single group `default`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_by: Option<GroupBy>,
    /// Function tags per role (`fetch`, `upload`, `distribute`, `aggregate`, ...).
    #[serde(default)]
    pub func_tags: BTreeMap<String, Vec<String>>,
    /// The backend of this channel; the job's backend when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<Backend>,
    /// Broker host override for this channel (`host:port`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub broker_host: Option<String>,
}

impl ChannelSpec {
    /// The channel's group labels (`["default"]` without `groupBy`).
    pub fn group_labels(&self) -> Vec<String> {
        match &self.group_by {
            Some(group_by) if !group_by.value.is_empty() => group_by.value.clone(),
            _ => vec![DEFAULT_GROUP.to_owned()],
        }
    }

    /// The role at the other end of the channel from `role` (itself for a self-loop).
    pub fn peer_role(&self, role: &str) -> Option<&str> {
        match self.pair.as_slice() {
            [a, b] if a == role => Some(b),
            [a, b] if b == role => Some(a),
            _ => None,
        }
    }

    /// Whether both ends of the channel are the same role.
    pub fn is_self_loop(&self) -> bool {
        matches!(self.pair.as_slice(), [a, b] if a == b)
    }
}

/// How a channel's ends are grouped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct GroupBy {
    /// Grouping kind; only `tag` exists.
    #[serde(rename = "type", default = "tag")]
    pub kind: String,
    /// The group labels.
    #[serde(default)]
    pub value: Vec<String>,
}

fn tag() -> String {
    "tag".to_owned()
}

/// A data-plane backend.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// MQTT through a broker (embedded or Mosquitto).
    #[default]
    Mqtt,
    /// Peer-to-peer gRPC streams found through the metaserver.
    P2p,
    /// In-process (simulation and tests).
    Local,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::Mqtt => "mqtt",
            Backend::P2p => "p2p",
            Backend::Local => "local",
        })
    }
}

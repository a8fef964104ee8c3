//! Identifier newtypes: ids never travel as bare strings across module boundaries.

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, utoipa::ToSchema)]
        #[serde(transparent)]
        pub struct $name(pub String);

        impl $name {
            /// Wraps an id.
            pub fn new(id: impl Into<String>) -> Self {
                Self(id.into())
            }
            /// The id as a string slice.
            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl From<&str> for $name {
            fn from(s: &str) -> Self {
                Self(s.to_owned())
            }
        }

        impl From<String> for $name {
            fn from(s: String) -> Self {
                Self(s)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }
    };
}

id_type!(
    /// A user's login name; owns designs, datasets and jobs.
    UserId
);
id_type!(
    /// A design's id, chosen by the user (Flame's `designId`).
    DesignId
);
id_type!(
    /// A dataset's id, assigned by the control plane.
    DatasetId
);
id_type!(
    /// A job's id, assigned by the control plane.
    JobId
);
id_type!(
    /// A task's id: a stable hash of (job id, role, index, group association).
    TaskId
);
id_type!(
    /// A compute cluster's id (one deployer per compute).
    ComputeId
);

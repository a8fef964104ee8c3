//! Typed access to the task config's free-form `hyperparameters`.
//!
//! Names follow Flame's examples (`rounds`, `epochs`, `batchSize`, `learningRate`). A value
//! of the wrong type or range is an error naming the hyperparameter; an absent one takes the
//! documented default.

use serde_json::{Map, Value};

use crate::{Error, Result};

/// Hyperparameters the built-in roles read, with their defaults.
pub mod names {
    /// Rounds of training (default 1).
    pub const ROUNDS: &str = "rounds";
    /// Least number of trainers a round needs to finish (default 1).
    pub const MIN_TRAINERS: &str = "minTrainers";
    /// Trainers to wait for before the first round (default `minTrainers`).
    pub const EXPECTED_TRAINERS: &str = "expectedTrainers";
    /// Seconds to wait for peers to join (default 120).
    pub const JOIN_TIMEOUT: &str = "joinTimeout";
    /// Seconds a child waits for its aggregator to come back after it left (a restarted
    /// aggregator rejoins under its id and resumes) before it fails; the same for the peers
    /// of a coordinator, a ring leader or a vertical label party (default 300 under a control
    /// plane, which restarts failed tasks, else 0; at most 86400; 0: fail at once).
    pub const REJOIN_TIMEOUT: &str = "rejoinTimeout";
    /// Seconds without a sign of life before a peer counts as gone (default 10), for every
    /// channel backend that checks liveness (MQTT and p2p).
    pub const LIVENESS_TIMEOUT: &str = "livenessTimeout";
    /// Updates an aggregator lets arrive at once (0: no limit). With a limit, a trainer
    /// announces `ready` after training and uploads only when granted, so the aggregator's
    /// inbound buffers hold at most this many updates. Unset, the aggregator picks the limit
    /// each round from the model size: as many uploads as fit in
    /// [`DEFAULT_UPLOAD_BUDGET_BYTES`](crate::roles::aggregator::DEFAULT_UPLOAD_BUDGET_BYTES)
    /// (at least 1), and no grants at all when that covers every selected trainer.
    pub const MAX_CONCURRENT_UPLOADS: &str = "maxConcurrentUploads";
    /// Seconds an aggregator waits for its trainers' messages at each quick stage of a
    /// secure-aggregation round (keys, shares, unmask) before it counts the silent ones as
    /// dropped (default 120).
    pub const SECAGG_STAGE_TIMEOUT: &str = "secAggStageTimeout";
    /// Seconds an aggregator waits for the masked inputs of a secure-aggregation round (the
    /// stage that includes local training) before it counts the silent trainers as dropped;
    /// unset, it waits like a plain round (a trainer that leaves is dropped).
    pub const SECAGG_INPUT_TIMEOUT: &str = "secAggInputTimeout";
}

fn bad(name: &str, reason: impl Into<String>) -> Error {
    Error::Hyperparameter { name: name.to_owned(), reason: reason.into() }
}

/// A non-negative integer hyperparameter, at least `min`.
pub fn uint(map: &Map<String, Value>, name: &str, default: u64, min: u64) -> Result<u64> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => {
            let n = v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as u64))
                .ok_or_else(|| bad(name, format!("{v} is not a non-negative integer")))?;
            if n < min {
                return Err(bad(name, format!("{n} is below the minimum {min}")));
            }
            Ok(n)
        }
    }
}

/// A positive finite number hyperparameter.
pub fn positive(map: &Map<String, Value>, name: &str, default: f64) -> Result<f64> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v
            .as_f64()
            .filter(|f| f.is_finite() && *f > 0.0)
            .ok_or_else(|| bad(name, format!("{v} is not a positive number"))),
    }
}

/// A string hyperparameter.
pub fn string(map: &Map<String, Value>, name: &str) -> Result<Option<String>> {
    match map.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(v) => Err(bad(name, format!("{v} is not a string"))),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn typed_values_defaults_and_errors() {
        let map = json!({"rounds": 5, "lr": 0.1, "bad": "x", "neg": -1, "f": 3.0})
            .as_object()
            .cloned()
            .expect("object");
        assert_eq!(uint(&map, "rounds", 1, 1).expect("ok"), 5);
        assert_eq!(uint(&map, "f", 1, 1).expect("ok"), 3);
        assert_eq!(uint(&map, "absent", 7, 1).expect("ok"), 7);
        assert!(uint(&map, "bad", 1, 1).unwrap_err().to_string().contains("\"bad\""));
        assert!(uint(&map, "neg", 1, 0).is_err());
        assert!(uint(&map, "rounds", 1, 6).unwrap_err().to_string().contains("minimum"));
        assert_eq!(positive(&map, "lr", 1.0).expect("ok"), 0.1);
        assert!(positive(&map, "neg", 1.0).is_err());
        assert_eq!(string(&map, "bad").expect("ok").as_deref(), Some("x"));
        assert!(string(&map, "rounds").is_err());
    }
}

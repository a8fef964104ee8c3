//! Privacy for model updates: secure aggregation ([`secagg`], SecAgg+) so the server learns
//! only the sum of the updates, and differential privacy ([`dp`]: central and local, with the
//! RDP [`accountant`]) so the model itself bounds what it reveals about any one participant.
//!
//! Both are pure, synchronous state and math: the roles in `fledge-sdk` carry the
//! [`secagg`] messages (which encode to bytes) over their channels and call [`dp`] around
//! aggregation. `docs/privacy.md` gives the threat model and the configuration reference.

pub mod accountant;
mod config;
pub mod dp;
pub mod secagg;

pub use accountant::RdpAccountant;
pub use config::ConfigError;
pub use dp::{CentralDp, DpConfig, DpError, DpMode, DpRoundReport, LocalDp};
pub use secagg::{SecAggClient, SecAggConfig, SecAggError, SecAggResult, SecAggServer};

/// The privacy sections of a job's model spec, parsed and checked together.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct PrivacyConfig {
    /// `secureAggregation`, when present.
    pub secure_aggregation: Option<SecAggConfig>,
    /// `differentialPrivacy`, when present.
    pub differential_privacy: Option<DpConfig>,
}

impl PrivacyConfig {
    /// Reads `secureAggregation` and `differentialPrivacy` from a model spec object (other
    /// fields are not this module's business and are left alone; `null` counts as absent).
    /// Fails on the first invalid field, by its path, and on central DP together with secure
    /// aggregation: central DP clips each update on the server, which secure aggregation hides.
    pub fn from_model_spec(spec: &serde_json::Value) -> Result<Self, ConfigError> {
        let section = |name: &str| spec.get(name).filter(|v| !v.is_null());
        let secure_aggregation =
            section("secureAggregation").map(SecAggConfig::from_json).transpose()?;
        let differential_privacy =
            section("differentialPrivacy").map(DpConfig::from_json).transpose()?;
        if secure_aggregation.is_some()
            && differential_privacy.as_ref().is_some_and(|d| d.mode == DpMode::Central)
        {
            return Err(ConfigError::new(
                "differentialPrivacy.mode",
                "central DP clips each update on the aggregator, which secureAggregation hides from \
                 it; use \"local\" with secure aggregation (docs/privacy.md, Combining them)",
            ));
        }
        Ok(Self { secure_aggregation, differential_privacy })
    }
}

/// Why a job's server optimizer (`modelSpec.optimizer.sort`) cannot run with secure
/// aggregation, if it cannot: the robust rules (median, trimmed mean, Krum) need each update
/// in clear, which SecAgg hides, and FedBuff aggregates asynchronously, while SecAgg needs a
/// synchronous round of a fixed cohort.
pub fn secagg_optimizer_problem(sort: &str) -> Option<ConfigError> {
    let sort = sort.to_ascii_lowercase();
    let reason = match sort.as_str() {
        "median" | "trimmedmean" | "krum" => format!(
            "{sort} needs each update in clear, which secureAggregation hides from the \
             aggregator; use fedavg, fedprox or a server optimizer (fedadam, fedyogi, fedadagrad)"
        ),
        "fedbuff" => "fedbuff aggregates updates asynchronously, one at a time; \
                      secureAggregation needs a synchronous round of a fixed cohort"
            .to_owned(),
        _ => return None,
    };
    Some(ConfigError::new("optimizer.sort", reason))
}

#[cfg(test)]
mod optimizer_tests {
    use super::secagg_optimizer_problem;

    #[test]
    fn robust_and_asynchronous_optimizers_are_refused_with_secure_aggregation() {
        for sort in ["median", "TrimmedMean", "krum", "fedbuff"] {
            let e = secagg_optimizer_problem(sort).expect("refused");
            assert_eq!(e.field, "optimizer.sort");
        }
        for sort in ["fedavg", "fedprox", "fedadam", "fedyogi", "fedadagrad"] {
            assert!(secagg_optimizer_problem(sort).is_none(), "{sort}");
        }
    }
}

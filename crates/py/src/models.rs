//! Trained models from the platform: `fledge.load_model(job_id, round=None, group=None,
//! config=None)` downloads one of a job's model files (as `fledgectl get model` does, with the
//! same config file and environment) and returns it as `dict[str, numpy.ndarray]`.

use std::collections::HashMap;
use std::path::PathBuf;

use pyo3::prelude::*;
use pyo3::types::PyDict;

use fledge_client::config::{ClientConfig, Overrides};
use fledge_types::JobId;

use crate::convert::weights_into_py;
use crate::run::{Stop, block_on_detached_with};
use crate::{ConfigError, FledgeError};

/// Downloads model file (`round`: a checkpoint, else the final model; `group`: a per-group
/// model) of `job_id` from the apiserver named by the fledgectl config (`config`, else
/// `$FLEDGE_CONFIG`, else `~/.fledge/config.yaml`; `$FLEDGE_ENDPOINT` and `$FLEDGE_TOKEN`
/// override it).
#[pyfunction]
#[pyo3(signature = (job_id, round=None, group=None, config=None))]
pub fn load_model<'py>(
    py: Python<'py>,
    job_id: &str,
    round: Option<u64>,
    group: Option<String>,
    config: Option<PathBuf>,
) -> PyResult<Bound<'py, PyDict>> {
    let env: HashMap<String, String> = std::env::vars().collect();
    let overrides = Overrides { config, ..Overrides::default() };
    let settings = ClientConfig::load(&env, &overrides)
        .map_err(|e| ConfigError::new_err(format!("fledgectl config: {e}")))?;
    let client = settings
        .client()
        .map_err(|e| ConfigError::new_err(format!("cannot reach {}: {e}", settings.endpoint)))?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| FledgeError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    let job = JobId::new(job_id);
    let res = block_on_detached_with(py, &rt, async {
        client
            .get_model(&job, round, group.as_deref())
            .await
            .map_err(|e| Stop::Failed(e.to_string()))
    });
    let bytes = match res {
        Ok(bytes) => bytes,
        Err(Stop::Failed(msg)) => {
            return Err(FledgeError::new_err(format!(
                "cannot download the model of job {job_id}: {msg}"
            )));
        }
        Err(Stop::TimedOut) => {
            return Err(pyo3::exceptions::PyTimeoutError::new_err("model download timed out"));
        }
        Err(Stop::Interrupted(e)) => return Err(e),
    };
    let weights = fledge_sdk::registry::from_safetensors(job_id, &bytes).map_err(|e| {
        FledgeError::new_err(format!("the model of job {job_id} is not a model: {e}"))
    })?;
    weights_into_py(py, weights)
}

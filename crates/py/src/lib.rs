//! `fledge._fledge`: the native half of the Python package `fledge`.
//!
//! The Python package (`python/fledge/`) holds the user-facing classes (`Trainer`,
//! `Evaluator`, `Config`) and the functions `run` and `simulate`; this module connects them to
//! the Rust data plane of `fledge-sdk`:
//!
//! - [`convert`]: weights cross as `dict[str, numpy.ndarray]` (float32). Rust → Python moves
//!   each tensor's buffer into its array (no copy); Python → Rust copies once into the
//!   tensor's `Vec<f32>`.
//! - [`app`]: Python objects behind the SDK's `TrainerApp`, `Evaluator` and `AppFactory`
//!   traits. Each call re-acquires the GIL only for the user's method.
//! - [`channels`]: direct channel access (`join_channels`, `Channel.send/recv/broadcast`)
//!   for custom roles.
//! - [`run`]: `run_task` (one task from its config) and `simulate` (a whole job in this
//!   process over the local backend). Both release the GIL while the Rust runtime works, and
//!   pass each round's record to an optional progress callable (`progress`).
//! - `logging`: Rust's logs go through Python's `logging` (`pyo3-log`).
//!
//! Nothing here implements training or aggregation: that is `fledge-sdk`'s job.

use pyo3::prelude::*;

pub mod app;
pub mod channels;
pub mod convert;
mod logging;
pub mod models;
mod progress;
pub mod run;

pyo3::create_exception!(
    _fledge,
    FledgeError,
    pyo3::exceptions::PyException,
    "Base class of Fledge's errors."
);
pyo3::create_exception!(
    _fledge,
    ConfigError,
    FledgeError,
    "A task config, job plan or argument is invalid (the message names what)."
);
pyo3::create_exception!(
    _fledge,
    TaskError,
    FledgeError,
    "A task failed: the message is the Rust error chain, with the traceback of user code when user code failed."
);
pyo3::create_exception!(
    _fledge,
    ChannelError,
    FledgeError,
    "A channel operation failed (the peer left, the broker is unreachable, ...)."
);
pyo3::create_exception!(
    _fledge,
    WeightsError,
    FledgeError,
    "Weights could not cross between Python and Rust (bad dtype, name or shape)."
);

/// The module `fledge._fledge`.
#[pymodule]
fn _fledge(m: &Bound<'_, PyModule>) -> PyResult<()> {
    let py = m.py();
    logging::install(py)?;
    m.add("FledgeError", py.get_type::<FledgeError>())?;
    m.add("ConfigError", py.get_type::<ConfigError>())?;
    m.add("TaskError", py.get_type::<TaskError>())?;
    m.add("WeightsError", py.get_type::<WeightsError>())?;
    m.add("ChannelError", py.get_type::<ChannelError>())?;
    m.add_class::<channels::PyChannelSet>()?;
    m.add_class::<channels::PyChannel>()?;
    m.add_class::<channels::PyMessage>()?;
    m.add_function(wrap_pyfunction!(channels::join_channels, m)?)?;
    m.add_function(wrap_pyfunction!(run::run_task, m)?)?;
    m.add_function(wrap_pyfunction!(models::load_model, m)?)?;
    m.add_function(wrap_pyfunction!(run::simulate, m)?)?;
    m.add_function(wrap_pyfunction!(run::parse_config, m)?)?;
    m.add_function(wrap_pyfunction!(run::builtin_roles, m)?)?;
    m.add_function(wrap_pyfunction!(convert::roundtrip_weights, m)?)?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}

//! Rust's logs through Python's `logging`: the data plane's `tracing` events become `log`
//! records (tracing's `log` feature, active because this module sets no tracing subscriber)
//! and `pyo3-log` hands them to the Python logger named after the Rust module
//! (`fledge_sdk.roles.aggregator`, …). Python's configuration decides what is shown: by
//! default warnings and errors on stderr, as `logging` does for any library.

use std::sync::OnceLock;

use log::LevelFilter;
use pyo3::prelude::*;

/// The handle that drops the bridge's cache of Python logger levels.
static RESET: OnceLock<pyo3_log::ResetHandle> = OnceLock::new();

/// Installs the bridge once per process. Another Rust logger already installed in this
/// process (another extension's) keeps its place: Fledge's records then go there.
pub(crate) fn install(py: Python<'_>) -> PyResult<()> {
    if RESET.get().is_some() {
        return Ok(());
    }
    let logger = pyo3_log::Logger::new(py, pyo3_log::Caching::LoggersAndLevels)?
        .filter(LevelFilter::Debug)
        // The embedded broker reports every ordinary disconnect as an error.
        .filter_target("rumqttd".to_owned(), LevelFilter::Off);
    if let Ok(handle) = logger.install() {
        let _ = RESET.set(handle);
    }
    Ok(())
}

/// Forgets the cached logger levels, so that a `logging` configuration changed since the last
/// run applies to the next one.
pub(crate) fn refresh() {
    if let Some(handle) = RESET.get() {
        handle.reset();
    }
}

//! Per-round progress for Python callers: a [`Progress`] hands every record a task reports to
//! a Python callable (`fledge`'s progress line or the user's callback), and keeps the first
//! exception that callable raises so that the run stops with it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use fledge_sdk::RecordObserver;
use fledge_types::MetricRecord;
use pyo3::prelude::*;
use pyo3::types::PyDict;
use tokio::sync::Notify;

/// A Python callable `(round, task_id, role, metrics)` that sees each reported record.
pub(crate) struct Progress {
    callback: Py<PyAny>,
    /// The first exception the callback raised; later records are not passed on.
    failure: Mutex<Option<PyErr>>,
    stopped: AtomicBool,
    failed: Notify,
}

impl Progress {
    pub(crate) fn new(callback: Py<PyAny>) -> Arc<Progress> {
        Arc::new(Progress {
            callback,
            failure: Mutex::new(None),
            stopped: AtomicBool::new(false),
            failed: Notify::new(),
        })
    }

    /// The observer that passes a task's records to the callback.
    pub(crate) fn observer(self: &Arc<Self>) -> RecordObserver {
        let me = self.clone();
        RecordObserver(Arc::new(move |record: &MetricRecord| me.call(record)))
    }

    fn call(&self, record: &MetricRecord) {
        if self.stopped.load(Ordering::Acquire) {
            return;
        }
        let res = Python::attach(|py| -> PyResult<()> {
            let metrics = PyDict::new(py);
            for (name, value) in &record.metrics {
                metrics.set_item(name, *value)?;
            }
            let args = (record.round, record.task_id.as_str(), record.role.as_str(), metrics);
            self.callback.call1(py, args)?;
            Ok(())
        });
        if let Err(err) = res
            && !self.stopped.swap(true, Ordering::AcqRel)
        {
            *self.lock() = Some(err);
            self.failed.notify_one();
        }
    }

    /// Waits until the callback has raised; returns its exception.
    pub(crate) async fn failure(&self) -> PyErr {
        loop {
            if let Some(err) = self.lock().take() {
                return err;
            }
            self.failed.notified().await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<PyErr>> {
        self.failure.lock().unwrap_or_else(|e| e.into_inner())
    }
}

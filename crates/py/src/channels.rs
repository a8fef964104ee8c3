//! Direct channel access for custom roles: join the channels of a task config, then
//! `ends`, `send`, `recv`, `recv_any`, `broadcast` from Python.
//!
//! Channel handles live on one process-wide tokio runtime (MQTT connections need it running
//! between calls). Every blocking call releases the GIL and polls Python's signal handlers.
//! Message tensors cross as float32 numpy arrays (`int64`/`uint8` tensors keep their dtype);
//! float32 PyTorch tensors are accepted on the way out (read through their numpy view);
//! `meta` crosses as JSON-compatible Python values.

use std::sync::OnceLock;
use std::time::Duration;

use fledge_channel::{BackendEnv, Channel, ChannelManager, Dtype, Kind, Message, Tensor, Tensors};
use fledge_types::{TaskConfig, TaskId};
use numpy::ndarray::{Array, IxDyn};
use numpy::{PyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::convert::{torch_as_numpy, type_name};
use crate::run::{Stop, block_on_detached_with};
use crate::{ChannelError, ConfigError, WeightsError};

/// The runtime that drives every channel handle of this process.
fn runtime() -> PyResult<&'static tokio::runtime::Runtime> {
    static RUNTIME: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    if let Some(rt) = RUNTIME.get() {
        return Ok(rt);
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("fledge-channels")
        .build()
        .map_err(|e| ChannelError::new_err(format!("cannot start the tokio runtime: {e}")))?;
    Ok(RUNTIME.get_or_init(|| rt))
}

/// Runs a channel operation with the GIL released; channel errors become `ChannelError`,
/// an elapsed `timeout` (seconds) becomes `TimeoutError`.
fn wait<T: Send>(
    py: Python<'_>,
    timeout: Option<f64>,
    what: &str,
    fut: impl std::future::Future<Output = fledge_channel::Result<T>> + Send,
) -> PyResult<T> {
    let timeout = match timeout {
        Some(t) if !t.is_finite() || t < 0.0 => {
            return Err(ConfigError::new_err(format!("timeout must be >= 0 seconds, not {t}")));
        }
        Some(t) => Some(Duration::from_secs_f64(t)),
        None => None,
    };
    let res = block_on_detached_with(py, runtime()?, async move {
        let res = match timeout {
            Some(t) => tokio::time::timeout(t, fut).await.map_err(|_| Stop::TimedOut)?,
            None => fut.await,
        };
        res.map_err(|e| Stop::Failed(fledge_sdk::runner::error_chain(&e)))
    });
    match res {
        Ok(v) => Ok(v),
        Err(Stop::Failed(msg)) => Err(ChannelError::new_err(format!("{what}: {msg}"))),
        Err(Stop::TimedOut) => Err(pyo3::exceptions::PyTimeoutError::new_err(format!(
            "{what}: no answer within {} s",
            timeout.map_or(0.0, |t| t.as_secs_f64())
        ))),
        Err(Stop::Interrupted(e)) => Err(e),
    }
}

fn parse_kind(kind: &str) -> PyResult<Kind> {
    Ok(match kind {
        "weights" => Kind::Weights,
        "update" => Kind::Update,
        "control" => Kind::Control,
        "end_of_training" => Kind::EndOfTraining,
        "ack" => Kind::Ack,
        "metrics" => Kind::Metrics,
        other => {
            return Err(ConfigError::new_err(format!(
                "message kind {other:?} is not one of weights, update, control, end_of_training, ack, metrics"
            )));
        }
    })
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Weights => "weights",
        Kind::Update => "update",
        Kind::Control => "control",
        Kind::EndOfTraining => "end_of_training",
        Kind::Ack => "ack",
        Kind::Metrics => "metrics",
    }
}

/// JSON text of a Python value, through the `json` module.
fn to_json(py: Python<'_>, value: &Bound<'_, PyAny>, what: &str) -> PyResult<serde_json::Value> {
    let text: String = py
        .import("json")?
        .call_method1("dumps", (value,))
        .map_err(|e| ConfigError::new_err(format!("{what} is not JSON-serialisable: {e}")))?
        .extract()?;
    serde_json::from_str(&text).map_err(|e| ConfigError::new_err(format!("{what}: {e}")))
}

fn from_json<'py>(py: Python<'py>, value: &serde_json::Value) -> PyResult<Bound<'py, PyAny>> {
    let text = serde_json::to_string(value).map_err(|e| ChannelError::new_err(e.to_string()))?;
    py.import("json")?.call_method1("loads", (text,))
}

/// Builds a message from Python arguments.
fn build_message(
    py: Python<'_>,
    kind: &str,
    round: u64,
    tensors: Option<&Bound<'_, PyAny>>,
    meta: Option<&Bound<'_, PyAny>>,
) -> PyResult<Message> {
    let mut message = Message::new(parse_kind(kind)?, round);
    if let Some(meta) = meta.filter(|m| !m.is_none()) {
        match to_json(py, meta, "meta")? {
            serde_json::Value::Object(map) => message.meta = map,
            other => {
                return Err(ConfigError::new_err(format!("meta must be a dict, not {other}")));
            }
        }
    }
    if let Some(tensors) = tensors.filter(|t| !t.is_none()) {
        message.tensors = tensors_from_py(tensors)?;
    }
    Ok(message)
}

fn tensors_from_py(value: &Bound<'_, PyAny>) -> PyResult<Tensors> {
    let dict = value.cast::<PyDict>().map_err(|_| {
        WeightsError::new_err(format!(
            "tensors must be a dict of name -> numpy.ndarray, not {}",
            type_name(value)
        ))
    })?;
    let mut res = Tensors::new();
    for (key, array) in dict.iter() {
        if !key.is_instance_of::<PyString>() {
            return Err(WeightsError::new_err(format!(
                "tensor names must be str, not {}",
                type_name(&key)
            )));
        }
        let name: String = key.extract()?;
        let array = torch_as_numpy(&name, array)?;
        let array = array.cast::<PyArrayDyn<f32>>().map_err(|_| {
            WeightsError::new_err(format!(
                "tensor {name:?} must be a float32 numpy.ndarray, not {}",
                type_name(&array)
            ))
        })?;
        let readonly = array
            .try_readonly()
            .map_err(|e| WeightsError::new_err(format!("tensor {name:?} cannot be read: {e}")))?;
        let slice = readonly
            .as_slice()
            .map_err(|_| WeightsError::new_err(format!("tensor {name:?} is not C-contiguous")))?;
        let tensor = Tensor::from_f32(array.shape().to_vec(), slice)
            .map_err(|e| WeightsError::new_err(format!("tensor {name:?}: {e}")))?;
        if res.insert(name.clone(), tensor).is_some() {
            return Err(WeightsError::new_err(format!("tensor {name:?} appears twice")));
        }
    }
    Ok(res)
}

fn tensor_to_py<'py>(py: Python<'py>, name: &str, tensor: &Tensor) -> PyResult<Bound<'py, PyAny>> {
    let shape = IxDyn(tensor.shape());
    let bad = |e: String| ChannelError::new_err(format!("tensor {name:?}: {e}"));
    Ok(match tensor.dtype() {
        Dtype::I64 => {
            let data = tensor.to_i64_vec().map_err(|e| bad(e.to_string()))?;
            let array = Array::from_shape_vec(shape, data).map_err(|e| bad(e.to_string()))?;
            PyArray::from_owned_array(py, array).into_any()
        }
        Dtype::U8 => {
            let array = Array::from_shape_vec(shape, tensor.data().to_vec())
                .map_err(|e| bad(e.to_string()))?;
            PyArray::from_owned_array(py, array).into_any()
        }
        _ => {
            let data = tensor.to_f32_vec().map_err(|e| bad(e.to_string()))?;
            let array = Array::from_shape_vec(shape, data).map_err(|e| bad(e.to_string()))?;
            PyArray::from_owned_array(py, array).into_any()
        }
    })
}

/// A message received from a channel.
#[pyclass(name = "Message", module = "fledge._fledge", frozen, get_all)]
pub struct PyMessage {
    /// `weights`, `update`, `control`, `end_of_training`, `ack` or `metrics`.
    kind: String,
    /// The round it belongs to.
    round: u64,
    /// The model version it carries.
    model_version: u64,
    /// The sending end's task id.
    sender: String,
    /// JSON metadata.
    meta: Py<PyAny>,
    /// Tensors by name (float32 arrays; int64/uint8 tensors keep their dtype).
    tensors: Py<PyDict>,
}

#[pymethods]
impl PyMessage {
    fn __repr__(&self, py: Python<'_>) -> String {
        let names: Vec<String> =
            self.tensors.bind(py).keys().iter().map(|k| k.to_string()).collect();
        format!(
            "Message(kind={:?}, round={}, sender={:?}, tensors={names:?})",
            self.kind, self.round, self.sender
        )
    }
}

fn message_to_py(py: Python<'_>, message: Message) -> PyResult<PyMessage> {
    let tensors = PyDict::new(py);
    for (name, tensor) in message.tensors.iter() {
        tensors.set_item(name, tensor_to_py(py, name, tensor)?)?;
    }
    Ok(PyMessage {
        kind: kind_name(message.kind).to_owned(),
        round: message.round,
        model_version: message.model_version,
        sender: message.sender,
        meta: from_json(py, &serde_json::Value::Object(message.meta))?.unbind(),
        tensors: tensors.unbind(),
    })
}

/// The channels of one task, joined from its config.
#[pyclass(name = "ChannelSet", module = "fledge._fledge", frozen)]
pub struct PyChannelSet {
    manager: ChannelManager,
}

/// Joins every channel of the task config (JSON text) and returns them.
#[pyfunction]
pub fn join_channels(py: Python<'_>, config_json: &str) -> PyResult<PyChannelSet> {
    let config: TaskConfig = serde_json::from_str(config_json)
        .map_err(|e| ConfigError::new_err(format!("task config is invalid: {e}")))?;
    let mut env = BackendEnv::default();
    let liveness = fledge_sdk::hyper::uint(&config.hyperparameters, "livenessTimeout", 10, 1)
        .map_err(|e| ConfigError::new_err(e.to_string()))?;
    env.mqtt.liveness_timeout = Duration::from_secs(liveness);
    env.p2p
        .apply_host_env(|name| std::env::var(name).ok())
        .map_err(|e| ConfigError::new_err(e.to_string()))?;
    let manager =
        wait(py, None, "join", async move { ChannelManager::join_all(&config, &env).await })?;
    Ok(PyChannelSet { manager })
}

#[pymethods]
impl PyChannelSet {
    /// This task's role.
    #[getter]
    fn role(&self) -> &str {
        self.manager.role()
    }

    /// Names of the joined channels.
    fn names(&self) -> Vec<String> {
        self.manager.channels().map(|c| c.name().to_owned()).collect()
    }

    /// The channel called `name`.
    fn get(&self, name: &str) -> PyResult<PyChannel> {
        self.manager.get(name).map(|c| PyChannel { channel: c.clone() }).ok_or_else(|| {
            ChannelError::new_err(format!(
                "this task has no channel {name:?} (it has {:?})",
                self.names()
            ))
        })
    }

    /// The channel whose function tags for this role include `tag` (e.g. `fetch`).
    fn by_tag(&self, tag: &str) -> PyResult<PyChannel> {
        self.manager
            .by_tag(tag)
            .map(|c| PyChannel { channel: c.clone() })
            .map_err(|e| ChannelError::new_err(fledge_sdk::runner::error_chain(&e)))
    }

    /// Leaves every channel cleanly and disconnects.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let manager = self.manager.clone();
        wait(py, None, "close", async move { manager.close().await })
    }
}

/// One channel as seen from this task's end.
#[pyclass(name = "Channel", module = "fledge._fledge", frozen)]
pub struct PyChannel {
    channel: Channel,
}

#[pymethods]
impl PyChannel {
    /// The channel's name.
    #[getter]
    fn name(&self) -> &str {
        self.channel.name()
    }

    /// This end's group on the channel.
    #[getter]
    fn group(&self) -> &str {
        self.channel.group()
    }

    /// This end's id (the task id).
    #[getter]
    fn me(&self) -> &str {
        self.channel.me().as_str()
    }

    /// The role at the other side of the pair.
    #[getter]
    fn peer_role(&self) -> &str {
        self.channel.peer_role()
    }

    /// Live peer ends, sorted.
    fn ends(&self) -> Vec<String> {
        self.channel.ends().iter().map(|e| e.as_str().to_owned()).collect()
    }

    /// Waits until at least `n` peers are present (at most `timeout` seconds); returns them.
    #[pyo3(signature = (n=1, timeout=30.0))]
    fn await_ends(&self, py: Python<'_>, n: usize, timeout: f64) -> PyResult<Vec<String>> {
        if !timeout.is_finite() || timeout < 0.0 {
            return Err(ConfigError::new_err(format!(
                "timeout must be >= 0 seconds, not {timeout}"
            )));
        }
        let channel = self.channel.clone();
        let ends = wait(py, None, "await_ends", async move {
            channel.await_ends(n, Duration::from_secs_f64(timeout)).await
        })?;
        Ok(ends.iter().map(|e| e.as_str().to_owned()).collect())
    }

    /// Sends a message to the peer `end`.
    #[pyo3(signature = (end, tensors=None, meta=None, kind="weights", round=0))]
    fn send(
        &self,
        py: Python<'_>,
        end: &str,
        tensors: Option<&Bound<'_, PyAny>>,
        meta: Option<&Bound<'_, PyAny>>,
        kind: &str,
        round: u64,
    ) -> PyResult<()> {
        let message = build_message(py, kind, round, tensors, meta)?;
        let (channel, end) = (self.channel.clone(), TaskId::from(end));
        wait(py, None, "send", async move { channel.send(&end, message).await })
    }

    /// Sends a message to every current peer; returns their ids.
    #[pyo3(signature = (tensors=None, meta=None, kind="weights", round=0))]
    fn broadcast(
        &self,
        py: Python<'_>,
        tensors: Option<&Bound<'_, PyAny>>,
        meta: Option<&Bound<'_, PyAny>>,
        kind: &str,
        round: u64,
    ) -> PyResult<Vec<String>> {
        let message = build_message(py, kind, round, tensors, meta)?;
        let channel = self.channel.clone();
        let ends = wait(py, None, "broadcast", async move { channel.broadcast(message).await })?;
        Ok(ends.iter().map(|e| e.as_str().to_owned()).collect())
    }

    /// The next message from `end` (waits at most `timeout` seconds when given).
    #[pyo3(signature = (end, timeout=None))]
    fn recv(&self, py: Python<'_>, end: &str, timeout: Option<f64>) -> PyResult<PyMessage> {
        let (channel, end) = (self.channel.clone(), TaskId::from(end));
        let message = wait(py, timeout, "recv", async move { channel.recv(&end).await })?;
        message_to_py(py, message)
    }

    /// The oldest message from any peer as `(end, message)`.
    #[pyo3(signature = (timeout=None))]
    fn recv_any(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<(String, PyMessage)> {
        let channel = self.channel.clone();
        let (end, message) =
            wait(py, timeout, "recv_any", async move { channel.recv_any().await })?;
        Ok((end.as_str().to_owned(), message_to_py(py, message)?))
    }

    fn __repr__(&self) -> String {
        format!("Channel(name={:?}, group={:?}, me={:?})", self.name(), self.group(), self.me())
    }
}

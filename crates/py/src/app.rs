//! Python objects behind the SDK's user-code traits.
//!
//! The roles call [`TrainerApp`], [`Evaluator`], [`FeatureApp`] and [`LabelApp`] methods on
//! blocking threads while the GIL is released; each method here attaches to the interpreter
//! only for the call into the user's object and converts the result before detaching again.
//!
//! The Python base classes (`fledge.Trainer`, `fledge.Evaluator`, `fledge.FeatureParty`,
//! `fledge.LabelParty`) define the private protocol called here (`_fledge_initialize`,
//! `_fledge_train`, `_fledge_embed`, ...) and normalise what user code returns (embeddings
//! and gradients as C-contiguous float32 `[rows, dim]` arrays), so this side only checks
//! types.
//!
//! Under `fledge.run` (one task per process, [`OnUserError::Exit`]) a failure of user code
//! ends the process at once: the traceback goes to stderr and the process exits with code 2
//! before the role leaves its channels. Its peers then learn of the failure from the closed
//! connection only after the agent has seen the exit code, so the task ends `failed` with
//! the traceback in its log tail; leaving first would let the aggregator fail the job and
//! the agent stop this task (`terminated`) while it was still exiting.

use std::collections::BTreeMap;

use fledge_algorithms::Weights;
use fledge_sdk::app::{Embedding, FeatureApp, LabelApp, Split, StepOutcome};
use fledge_sdk::{AppFactory, Evaluator, TaskConfig, TrainOutcome, TrainerApp};
use numpy::ndarray::Array2;
use numpy::{PyArray, PyArray2, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::convert::{self, py_err_to_anyhow};

/// What a failure of user code does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnUserError {
    /// Return the error (with the traceback) to the role, which fails the task or the run.
    Raise,
    /// Write the error to stderr and exit the process with code 2 at once (`fledge.run`).
    Exit,
}

/// Calls user code `f` (at `step`) with the GIL held; a Python exception becomes an error
/// with its traceback, or ends the process under [`OnUserError::Exit`].
fn user_call<T>(
    on_error: OnUserError,
    step: &str,
    f: impl FnOnce(Python<'_>) -> PyResult<T>,
) -> anyhow::Result<T> {
    Python::attach(|py| {
        f(py).map_err(|e| {
            let err = py_err_to_anyhow(py, e);
            if on_error == OnUserError::Exit {
                exit_now(py, step, &err);
            }
            err
        })
    })
}

/// Ends the process with exit code 2 after writing `err` (the traceback) to stderr, in the
/// format of `fledge.run`'s failure message.
fn exit_now(py: Python<'_>, step: &str, err: &anyhow::Error) -> ! {
    // What Python buffered so far goes first, in order.
    if let Ok(sys) = py.import("sys") {
        for stream in ["stdout", "stderr"] {
            if let Ok(stream) = sys.getattr(stream) {
                let _ = stream.call_method0("flush");
            }
        }
    }
    eprintln!("fledge: task failed: user code failed in {step}: {err:#}");
    std::process::exit(2)
}

/// The task config as JSON text, for the Python side's `Config`.
fn config_json(config: &TaskConfig) -> anyhow::Result<String> {
    Ok(serde_json::to_string(config)?)
}

/// A `fledge.Trainer` instance driven by the trainer role.
pub struct PyTrainer {
    obj: Py<PyAny>,
    on_error: OnUserError,
}

impl TrainerApp for PyTrainer {
    fn initialize(&mut self, config: &TaskConfig) -> anyhow::Result<()> {
        let json = config_json(config)?;
        user_call(self.on_error, "initialize", |py| {
            self.obj.bind(py).call_method1("_fledge_initialize", (json,)).map(drop)
        })
    }

    fn load_data(&mut self) -> anyhow::Result<()> {
        user_call(self.on_error, "load_data", |py| {
            self.obj.bind(py).call_method0("_fledge_load_data").map(drop)
        })
    }

    fn train(&mut self, round: u64) -> anyhow::Result<TrainOutcome> {
        user_call(self.on_error, "train", |py| {
            let res = self.obj.bind(py).call_method1("_fledge_train", (round,))?;
            let pair = res.cast::<PyTuple>().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(
                    "Trainer._fledge_train must return (num_samples, metrics)",
                )
            })?;
            if pair.len() != 2 {
                return Err(pyo3::exceptions::PyTypeError::new_err(
                    "Trainer._fledge_train must return (num_samples, metrics)",
                ));
            }
            let num_samples: u64 = pair.get_item(0)?.extract().map_err(|_| {
                pyo3::exceptions::PyTypeError::new_err(format!(
                    "train() must return a non-negative int number of samples, not {}",
                    convert::type_name(&pair.get_item(0).expect("checked length"))
                ))
            })?;
            let metrics = convert::metrics_from_py(&pair.get_item(1)?, "train()")?;
            Ok(TrainOutcome { num_samples, metrics })
        })
    }

    fn evaluate(&mut self) -> anyhow::Result<BTreeMap<String, f64>> {
        user_call(self.on_error, "evaluate", |py| {
            let res = self.obj.bind(py).call_method0("_fledge_evaluate")?;
            convert::metrics_from_py(&res, "evaluate()")
        })
    }

    fn get_weights(&self) -> anyhow::Result<Weights> {
        user_call(self.on_error, "get_weights", |py| {
            let res = self.obj.bind(py).call_method0("_fledge_get_weights")?;
            convert::weights_from_py(&res)
        })
    }

    fn set_weights(&mut self, weights: &Weights) -> anyhow::Result<()> {
        // The trait lends the weights, so this is the one copy on the way in; the arrays
        // then own their buffers.
        let owned = weights.clone();
        user_call(self.on_error, "set_weights", |py| {
            let dict = convert::weights_into_py(py, owned)?;
            self.obj.bind(py).call_method1("_fledge_set_weights", (dict,)).map(drop)
        })
    }
}

/// A `fledge.Evaluator` instance driven by an aggregator role.
pub struct PyEvaluator {
    obj: Py<PyAny>,
    on_error: OnUserError,
}

impl Evaluator for PyEvaluator {
    fn evaluate(&mut self, weights: &Weights) -> anyhow::Result<BTreeMap<String, f64>> {
        let owned = weights.clone();
        user_call(self.on_error, "evaluate", |py| {
            let dict = convert::weights_into_py(py, owned)?;
            let res = self.obj.bind(py).call_method1("_fledge_evaluate", (dict,))?;
            convert::metrics_from_py(&res, "Evaluator.evaluate()")
        })
    }
}

/// An embedding as a new `[rows, dim]` float32 array (moved, not copied).
fn embedding_into_py(py: Python<'_>, e: Embedding) -> PyResult<Bound<'_, PyArray2<f32>>> {
    let rows = e.rows();
    let array = Array2::from_shape_vec((rows, e.dim), e.values).map_err(|err| {
        pyo3::exceptions::PyValueError::new_err(format!("embedding of {rows}×{}: {err}", e.dim))
    })?;
    Ok(PyArray::from_owned_array(py, array))
}

/// A `[rows, dim]` float32 array (the Python side made it C-contiguous) as an embedding.
fn embedding_from_py(value: &Bound<'_, PyAny>, what: &str) -> PyResult<Embedding> {
    let array = value.cast::<PyArray2<f32>>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} must be a 2-d float32 array, not {}",
            convert::type_name(value)
        ))
    })?;
    let dim = array.shape()[1];
    let values = array.to_vec().map_err(|e| {
        pyo3::exceptions::PyValueError::new_err(format!("{what} is not contiguous: {e}"))
    })?;
    Ok(Embedding { dim, values })
}

/// Every embedding of `list` (a Python list of arrays).
fn embeddings_from_py(list: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<Embedding>> {
    let list = list.cast::<PyList>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!("{what} must be a list of arrays"))
    })?;
    list.iter().map(|item| embedding_from_py(&item, what)).collect()
}

fn embeddings_into_py<'py>(
    py: Python<'py>,
    embeddings: &[Embedding],
) -> PyResult<Bound<'py, PyList>> {
    let arrays = embeddings
        .iter()
        .map(|e| embedding_into_py(py, e.clone()))
        .collect::<PyResult<Vec<_>>>()?;
    PyList::new(py, arrays)
}

/// A `fledge.FeatureParty` instance driven by the vertical feature party role.
pub struct PyFeatureParty {
    obj: Py<PyAny>,
    on_error: OnUserError,
    dim: usize,
}

impl FeatureApp for PyFeatureParty {
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
        let json = config_json(config)?;
        let (ids, dim) = user_call(self.on_error, "load", |py| {
            let obj = self.obj.bind(py);
            let ids: Vec<String> = obj.call_method1("_fledge_load", (json,))?.extract()?;
            let dim: usize = obj.call_method0("_fledge_embedding_dim")?.extract()?;
            Ok((ids, dim))
        })?;
        self.dim = dim;
        Ok(ids)
    }

    fn embedding_dim(&self) -> usize {
        self.dim
    }

    fn align(&mut self, train: &[String], test: &[String]) -> anyhow::Result<()> {
        user_call(self.on_error, "align", |py| {
            self.obj
                .bind(py)
                .call_method1("_fledge_align", (train.to_vec(), test.to_vec()))
                .map(drop)
        })
    }

    fn embed(&mut self, split: Split, rows: &[usize]) -> anyhow::Result<Embedding> {
        user_call(self.on_error, "embed", |py| {
            let res =
                self.obj.bind(py).call_method1("_fledge_embed", (split.word(), rows.to_vec()))?;
            embedding_from_py(&res, "embed()")
        })
    }

    fn backward(&mut self, gradient: &Embedding) -> anyhow::Result<()> {
        let owned = gradient.clone();
        user_call(self.on_error, "backward", |py| {
            let array = embedding_into_py(py, owned)?;
            self.obj.bind(py).call_method1("_fledge_backward", (array,)).map(drop)
        })
    }

    fn weights(&self) -> anyhow::Result<Weights> {
        user_call(self.on_error, "get_weights", |py| {
            let res = self.obj.bind(py).call_method0("_fledge_get_weights")?;
            convert::weights_from_py(&res)
        })
    }
}

/// A `fledge.LabelParty` instance driven by the vertical label party role.
pub struct PyLabelParty {
    obj: Py<PyAny>,
    on_error: OnUserError,
}

impl LabelApp for PyLabelParty {
    fn load(&mut self, config: &TaskConfig) -> anyhow::Result<Vec<String>> {
        let json = config_json(config)?;
        user_call(self.on_error, "load", |py| {
            self.obj.bind(py).call_method1("_fledge_load", (json,))?.extract()
        })
    }

    fn align(&mut self, train: &[String], test: &[String], dims: &[usize]) -> anyhow::Result<()> {
        user_call(self.on_error, "align", |py| {
            let args = (train.to_vec(), test.to_vec(), dims.to_vec());
            self.obj.bind(py).call_method1("_fledge_align", args).map(drop)
        })
    }

    fn train_step(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<StepOutcome> {
        user_call(self.on_error, "train_step", |py| {
            let arrays = embeddings_into_py(py, embeddings)?;
            let res =
                self.obj.bind(py).call_method1("_fledge_train_step", (rows.to_vec(), arrays))?;
            let (loss, gradients): (f64, Bound<'_, PyAny>) = res.extract()?;
            let gradients = embeddings_from_py(&gradients, "train_step() gradients")?;
            Ok(StepOutcome { loss, gradients })
        })
    }

    fn evaluate(
        &mut self,
        rows: &[usize],
        embeddings: &[Embedding],
    ) -> anyhow::Result<BTreeMap<String, f64>> {
        user_call(self.on_error, "evaluate", |py| {
            let arrays = embeddings_into_py(py, embeddings)?;
            let res =
                self.obj.bind(py).call_method1("_fledge_evaluate", (rows.to_vec(), arrays))?;
            convert::metrics_from_py(&res, "LabelParty.evaluate()")
        })
    }

    fn weights(&self) -> anyhow::Result<Weights> {
        user_call(self.on_error, "get_weights", |py| {
            let res = self.obj.bind(py).call_method0("_fledge_get_weights")?;
            convert::weights_from_py(&res)
        })
    }
}

/// Builds user objects from the Python classes (or any zero-argument callables) given to
/// `run`/`simulate`.
pub struct PyFactory {
    /// Makes a `fledge.Trainer`.
    pub trainer: Option<Py<PyAny>>,
    /// Makes a `fledge.Evaluator`.
    pub evaluator: Option<Py<PyAny>>,
    /// Makes a `fledge.FeatureParty`.
    pub feature_party: Option<Py<PyAny>>,
    /// Makes a `fledge.LabelParty`.
    pub label_party: Option<Py<PyAny>>,
    /// What a failure of user code does.
    pub on_error: OnUserError,
}

impl PyFactory {
    fn make(
        &self,
        class: &Option<Py<PyAny>>,
        what: &str,
        config: &TaskConfig,
    ) -> anyhow::Result<Py<PyAny>> {
        let Some(class) = class else {
            anyhow::bail!(
                "task {} (role {:?}) needs a {what} but none was given",
                config.task_id,
                config.role
            );
        };
        user_call(self.on_error, what, |py| class.bind(py).call0().map(Bound::unbind))
    }
}

impl AppFactory for PyFactory {
    fn trainer(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn TrainerApp>> {
        let Some(class) = &self.trainer else {
            anyhow::bail!(
                "task {} (role {:?}) is a trainer but no Trainer class was given to fledge.run",
                config.task_id,
                config.role
            );
        };
        let obj =
            user_call(self.on_error, "Trainer()", |py| class.bind(py).call0().map(Bound::unbind))?;
        Ok(Box::new(PyTrainer { obj, on_error: self.on_error }))
    }

    fn evaluator(&self, config: &TaskConfig) -> anyhow::Result<Option<Box<dyn Evaluator>>> {
        let Some(class) = &self.evaluator else {
            return Ok(None);
        };
        let json = config_json(config)?;
        let obj = user_call(self.on_error, "Evaluator.initialize", |py| {
            let obj = class.bind(py).call0()?;
            obj.call_method1("_fledge_initialize", (json,))?;
            Ok(obj.unbind())
        })?;
        Ok(Some(Box::new(PyEvaluator { obj, on_error: self.on_error })))
    }

    fn feature_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn FeatureApp>> {
        let obj = self.make(&self.feature_party, "FeatureParty", config)?;
        Ok(Box::new(PyFeatureParty { obj, on_error: self.on_error, dim: 0 }))
    }

    fn label_party(&self, config: &TaskConfig) -> anyhow::Result<Box<dyn LabelApp>> {
        let obj = self.make(&self.label_party, "LabelParty", config)?;
        Ok(Box::new(PyLabelParty { obj, on_error: self.on_error }))
    }
}

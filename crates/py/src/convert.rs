//! Conversions between Python values and the SDK's types.
//!
//! - Weights: `dict[str, numpy.ndarray]` ↔ [`Weights`]. Rust → Python builds each array
//!   around the tensor's own `Vec<f32>` ([`PyArray::from_owned_array`]): no copy, the array's
//!   `base` is the Rust container. Python → Rust copies each array once into a new `Vec<f32>`
//!   (the tensor owns its data); arrays must be float32 and C-contiguous, which the Python
//!   side ensures with `numpy.ascontiguousarray` (a no-op when they already are).
//!   A PyTorch tensor (a `state_dict()` value) is read through the numpy array that shares
//!   its memory ([`torch_as_numpy`]), so a float32 CPU tensor is copied only that once too.
//! - Metrics: `dict[str, float]` ↔ `BTreeMap<String, f64>`.
//! - Errors: a Python exception becomes an `anyhow::Error` whose message is the formatted
//!   traceback, so it shows in the task's error chain and log tail.

use std::collections::BTreeMap;

use fledge_algorithms::{Tensor, Weights};
use numpy::ndarray::{Array, IxDyn};
use numpy::{PyArray, PyArrayDyn, PyArrayMethods, PyUntypedArrayMethods};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyString};

use crate::WeightsError;

/// Moves `weights` into a new `dict[str, numpy.ndarray]`, in tensor order, without copying
/// the values.
pub fn weights_into_py(py: Python<'_>, weights: Weights) -> PyResult<Bound<'_, PyDict>> {
    let dict = PyDict::new(py);
    for tensor in weights.into_tensors() {
        let (name, shape, data) = tensor.into_parts();
        let array = Array::from_shape_vec(IxDyn(&shape), data).map_err(|e| {
            WeightsError::new_err(format!(
                "tensor {name:?} has an inconsistent shape {shape:?}: {e}"
            ))
        })?;
        dict.set_item(name, PyArray::from_owned_array(py, array))?;
    }
    Ok(dict)
}

/// Reads a `dict[str, numpy.ndarray]` (float32, C-contiguous) into [`Weights`], in the
/// dict's order. Every problem names the tensor.
pub fn weights_from_py(value: &Bound<'_, PyAny>) -> PyResult<Weights> {
    let dict = value.cast::<PyDict>().map_err(|_| {
        WeightsError::new_err(format!(
            "weights must be a dict of name -> numpy.ndarray, not {}",
            type_name(value)
        ))
    })?;
    let mut res = Weights::new();
    for (key, array) in dict.iter() {
        if !key.is_instance_of::<PyString>() {
            return Err(WeightsError::new_err(format!(
                "weight names must be str, not {}",
                type_name(&key)
            )));
        }
        let name: String = key.extract()?;
        let array = torch_as_numpy(&name, array)?;
        let array = array.cast::<PyArrayDyn<f32>>().map_err(|_| {
            WeightsError::new_err(format!(
                "weight {name:?} must be a float32 numpy.ndarray, not {}",
                describe_array(&array)
            ))
        })?;
        let readonly = array
            .try_readonly()
            .map_err(|e| WeightsError::new_err(format!("weight {name:?} cannot be read: {e}")))?;
        let data = readonly
            .as_slice()
            .map_err(|_| WeightsError::new_err(format!("weight {name:?} is not C-contiguous")))?
            .to_vec();
        let tensor = Tensor::new(name.clone(), array.shape().to_vec(), data)
            .map_err(|e| WeightsError::new_err(format!("weight {name:?}: {e}")))?;
        res.push(tensor).map_err(|e| WeightsError::new_err(format!("weight {name:?}: {e}")))?;
    }
    Ok(res)
}

/// A PyTorch tensor as the numpy array that shares its memory
/// (`tensor.detach().cpu().numpy()`: no copy for a CPU tensor), anything else unchanged.
///
/// Tensors are recognised by their type's module (`torch`, `torch.nn.parameter`, ...) so
/// that torch stays an optional dependency that this module never imports.
pub fn torch_as_numpy<'py>(name: &str, value: Bound<'py, PyAny>) -> PyResult<Bound<'py, PyAny>> {
    if value.cast::<numpy::PyUntypedArray>().is_ok() || !is_torch_tensor(&value) {
        return Ok(value);
    }
    value.call_method0("detach")?.call_method0("cpu")?.call_method0("numpy").map_err(|e| {
        WeightsError::new_err(format!(
            "torch tensor {name:?} has no numpy view ({e}); convert it first, e.g. tensor.float()"
        ))
    })
}

/// Whether `value` is a `torch.Tensor` (or a subclass such as `torch.nn.Parameter`).
fn is_torch_tensor(value: &Bound<'_, PyAny>) -> bool {
    let from_torch = value
        .get_type()
        .module()
        .is_ok_and(|m| m.to_cow().is_ok_and(|m| m == "torch" || m.starts_with("torch.")));
    from_torch && value.hasattr("numpy").unwrap_or(false)
}

/// `float32[3, 4]` for an array, the type name otherwise.
fn describe_array(value: &Bound<'_, PyAny>) -> String {
    match value.cast::<numpy::PyUntypedArray>() {
        Ok(array) => format!("{}{:?}", array.dtype(), array.shape()),
        Err(_) => type_name(value),
    }
}

/// The Python type name of `value`.
pub fn type_name(value: &Bound<'_, PyAny>) -> String {
    value.get_type().name().map(|n| n.to_string()).unwrap_or_else(|_| "<unknown type>".to_owned())
}

/// Reads `dict[str, float]` metrics; each value must be a real number.
pub fn metrics_from_py(value: &Bound<'_, PyAny>, what: &str) -> PyResult<BTreeMap<String, f64>> {
    if value.is_none() {
        return Ok(BTreeMap::new());
    }
    let dict = value.cast::<PyDict>().map_err(|_| {
        pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} must return a dict of metric name -> number, not {}",
            type_name(value)
        ))
    })?;
    let mut res = BTreeMap::new();
    for (key, v) in dict.iter() {
        let name: String = key.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{what}: metric names must be str, not {}",
                type_name(&key)
            ))
        })?;
        let number: f64 = v.extract().map_err(|_| {
            pyo3::exceptions::PyTypeError::new_err(format!(
                "{what}: metric {name:?} must be a number, not {}",
                type_name(&v)
            ))
        })?;
        res.insert(name, number);
    }
    Ok(res)
}

/// Formats a Python exception with its traceback, as `traceback.format_exception` does.
pub fn format_py_err(py: Python<'_>, err: &PyErr) -> String {
    let formatted = (|| -> PyResult<String> {
        let traceback = py.import("traceback")?;
        let lines = traceback.call_method1(
            "format_exception",
            (err.get_type(py), err.value(py), err.traceback(py)),
        )?;
        let text: Vec<String> = lines.extract()?;
        Ok(text.concat())
    })();
    match formatted {
        Ok(text) => text.trim_end().to_owned(),
        Err(_) => err.to_string(),
    }
}

/// A Python exception as an `anyhow::Error` carrying its formatted traceback.
pub fn py_err_to_anyhow(py: Python<'_>, err: PyErr) -> anyhow::Error {
    anyhow::Error::msg(format_py_err(py, &err))
}

/// Moves `weights` from Python into Rust and back: copies once on the way in, none on the
/// way out. Used by the tests to check dtype, shape, order and ownership.
#[pyfunction]
pub fn roundtrip_weights<'py>(
    py: Python<'py>,
    weights: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyDict>> {
    let weights = weights_from_py(weights)?;
    weights_into_py(py, weights)
}

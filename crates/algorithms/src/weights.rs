//! The model representation aggregation works on: an ordered list of named `f32` tensors.
//!
//! A [`Weights`] is what a trainer sends and an aggregator folds. Each [`Tensor`] keeps its
//! values in one contiguous `Vec<f32>` (row-major, as in safetensors), so kernels see plain
//! slices. Two models have the same *layout* when they hold the same tensor names, in the
//! same order, with the same shapes; every aggregation rule checks it and reports the first
//! tensor that differs.

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::kernels;

/// One named tensor: a shape and its row-major `f32` values.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Tensor {
    name: String,
    shape: Vec<usize>,
    data: Vec<f32>,
}

impl Tensor {
    /// Builds a tensor; the shape's element count must equal `data.len()`.
    ///
    /// A scalar has the empty shape `[]` and one value.
    pub fn new(name: impl Into<String>, shape: Vec<usize>, data: Vec<f32>) -> Result<Self> {
        let name = name.into();
        let expected: usize = shape.iter().product();
        if expected != data.len() {
            return Err(Error::ShapeDataMismatch {
                tensor: name,
                shape,
                expected,
                len: data.len(),
            });
        }
        Ok(Self { name, shape, data })
    }

    /// A tensor of zeros.
    pub fn zeros(name: impl Into<String>, shape: Vec<usize>) -> Self {
        let len = shape.iter().product();
        Self { name: name.into(), shape, data: vec![0.0; len] }
    }

    /// The tensor's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// The values, mutable (the length, and so the shape, cannot change).
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.data.len()
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.data.is_empty()
    }

    /// Splits the tensor into name, shape and values.
    pub fn into_parts(self) -> (String, Vec<usize>, Vec<f32>) {
        (self.name, self.shape, self.data)
    }
}

/// A model: named tensors in a fixed order.
///
/// Tensor names are unique. The order is part of the layout: senders and receivers must
/// agree on it (the wire format preserves it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    tensors: Vec<Tensor>,
}

impl Weights {
    /// An empty model; add tensors with [`Weights::push`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Builds a model from tensors, rejecting duplicate names.
    pub fn from_tensors(tensors: Vec<Tensor>) -> Result<Self> {
        let mut res = Self { tensors: Vec::with_capacity(tensors.len()) };
        for tensor in tensors {
            res.push(tensor)?;
        }
        Ok(res)
    }

    /// Appends a tensor, rejecting a duplicate name.
    pub fn push(&mut self, tensor: Tensor) -> Result<()> {
        if self.get(&tensor.name).is_some() {
            return Err(Error::DuplicateTensor { tensor: tensor.name });
        }
        self.tensors.push(tensor);
        Ok(())
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[Tensor] {
        &self.tensors
    }

    /// The tensors, mutable (values only: names and shapes cannot change).
    pub fn tensors_mut(&mut self) -> &mut [Tensor] {
        &mut self.tensors
    }

    /// Consumes the model, returning its tensors.
    pub fn into_tensors(self) -> Vec<Tensor> {
        self.tensors
    }

    /// The tensor with this name.
    pub fn get(&self, name: &str) -> Option<&Tensor> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether the model has no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// Total number of parameters (elements over all tensors).
    pub fn num_params(&self) -> usize {
        self.tensors.iter().map(Tensor::len).sum()
    }

    /// A model of the same layout filled with zeros.
    pub fn zeros_like(&self) -> Self {
        Self {
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor::zeros(t.name.clone(), t.shape.clone()))
                .collect(),
        }
    }

    /// Checks that `other` has this model's layout (names, order, shapes).
    ///
    /// The error names the first tensor that differs; `self` is the reference ("expected").
    pub fn check_same_layout(&self, other: &Weights) -> Result<()> {
        Layout::of(self).check(other)
    }

    /// Checks that every value is finite; the error names the first tensor holding NaN or
    /// an infinity, and the element's index.
    pub fn check_finite(&self) -> Result<()> {
        for t in &self.tensors {
            if let Some(index) = kernels::first_non_finite(&t.data) {
                return Err(Error::NonFinite {
                    tensor: t.name.clone(),
                    index,
                    value: t.data[index],
                });
            }
        }
        Ok(())
    }

    /// `self - base`, element-wise: the delta a trainer made from `base`.
    pub fn delta_from(&self, base: &Weights) -> Result<Weights> {
        base.check_same_layout(self)?;
        let mut res = self.clone();
        for (r, b) in res.tensors.iter_mut().zip(&base.tensors) {
            kernels::axpy(&mut r.data, &b.data, -1.0);
        }
        Ok(res)
    }

    /// `self += a * other`, element-wise.
    pub fn add_scaled(&mut self, other: &Weights, a: f32) -> Result<()> {
        self.check_same_layout(other)?;
        for (r, o) in self.tensors.iter_mut().zip(&other.tensors) {
            kernels::axpy(&mut r.data, &o.data, a);
        }
        Ok(())
    }
}

impl Weights {
    /// This model as a [`WeightsView`] (borrows, copies nothing).
    pub fn view(&self) -> WeightsView<'_> {
        WeightsView {
            tensors: self
                .tensors
                .iter()
                .map(|t| TensorView {
                    name: &t.name,
                    shape: &t.shape,
                    values: Values::F32(&t.data),
                })
                .collect(),
        }
    }
}

/// Values of a [`TensorView`]: `f32`s in memory, or little-endian `f32` bytes as they
/// arrived on the wire (any alignment).
#[derive(Debug, Clone, Copy)]
enum Values<'a> {
    F32(&'a [f32]),
    Le(&'a [u8]),
}

/// Elements decoded at a time from little-endian bytes (16 KiB on the stack).
const DECODE_BLOCK: usize = 4096;

/// Decodes little-endian `f32` bytes (`bytes.len() == 4 * out.len()`) into `out`.
fn decode_le(bytes: &[u8], out: &mut [f32]) {
    debug_assert_eq!(bytes.len(), out.len() * 4);
    for (v, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    }
}

/// One borrowed tensor: a name, a shape and values that stay where they are.
#[derive(Debug, Clone, Copy)]
pub struct TensorView<'a> {
    name: &'a str,
    shape: &'a [usize],
    values: Values<'a>,
}

impl<'a> TensorView<'a> {
    /// A view of `f32` values; the shape's element count must equal `values.len()`.
    pub fn from_f32(name: &'a str, shape: &'a [usize], values: &'a [f32]) -> Result<Self> {
        Self::checked(name, shape, values.len(), Values::F32(values))
    }

    /// A view of little-endian `f32` bytes (the safetensors `F32` layout), at any alignment;
    /// the shape's element count times 4 must equal `bytes.len()`.
    pub fn from_le_bytes(name: &'a str, shape: &'a [usize], bytes: &'a [u8]) -> Result<Self> {
        if !bytes.len().is_multiple_of(4) {
            return Err(Error::ShapeDataMismatch {
                tensor: name.to_owned(),
                shape: shape.to_vec(),
                expected: shape.iter().product(),
                len: bytes.len() / 4,
            });
        }
        Self::checked(name, shape, bytes.len() / 4, Values::Le(bytes))
    }

    fn checked(name: &'a str, shape: &'a [usize], len: usize, values: Values<'a>) -> Result<Self> {
        let expected = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if expected != Some(len) {
            return Err(Error::ShapeDataMismatch {
                tensor: name.to_owned(),
                shape: shape.to_vec(),
                expected: expected.unwrap_or(usize::MAX),
                len,
            });
        }
        Ok(Self { name, shape, values })
    }

    /// The tensor's name.
    pub fn name(&self) -> &'a str {
        self.name
    }

    /// The tensor's shape.
    pub fn shape(&self) -> &'a [usize] {
        self.shape
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        match self.values {
            Values::F32(v) => v.len(),
            Values::Le(b) => b.len() / 4,
        }
    }

    /// Whether the tensor has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The first non-finite element, as (index, value).
    fn first_non_finite(&self) -> Option<(usize, f32)> {
        match self.values {
            Values::F32(v) => kernels::first_non_finite(v).map(|i| (i, v[i])),
            Values::Le(bytes) => {
                let mut buf = [0f32; DECODE_BLOCK];
                for (bi, block) in bytes.chunks(DECODE_BLOCK * 4).enumerate() {
                    let out = &mut buf[..block.len() / 4];
                    decode_le(block, out);
                    if let Some(j) = kernels::first_non_finite(out) {
                        return Some((bi * DECODE_BLOCK + j, out[j]));
                    }
                }
                None
            }
        }
    }

    /// `acc += r * (self - acc)` (see [`kernels::mean_step`]); lengths are equal.
    fn mean_step_into(&self, acc: &mut [f32], r: f32) {
        match self.values {
            Values::F32(v) => kernels::mean_step(acc, v, r),
            Values::Le(bytes) => {
                use rayon::prelude::*;
                assert_eq!(acc.len() * 4, bytes.len(), "mean_step: lengths differ");
                let step = |a: &mut [f32], b: &[u8]| {
                    let mut buf = [0f32; DECODE_BLOCK];
                    for (a, b) in a.chunks_mut(DECODE_BLOCK).zip(b.chunks(DECODE_BLOCK * 4)) {
                        let x = &mut buf[..a.len()];
                        decode_le(b, x);
                        kernels::mean_step_serial(a, x, r);
                    }
                };
                if acc.len() >= kernels::PAR_THRESHOLD {
                    acc.par_chunks_mut(kernels::PAR_CHUNK)
                        .zip(bytes.par_chunks(kernels::PAR_CHUNK * 4))
                        .for_each(|(a, b)| step(a, b));
                } else {
                    step(acc, bytes);
                }
            }
        }
    }

    /// The values, copied into a new vector.
    fn to_vec(self) -> Vec<f32> {
        match self.values {
            Values::F32(v) => v.to_vec(),
            Values::Le(bytes) => {
                let mut out = vec![0f32; bytes.len() / 4];
                decode_le(bytes, &mut out);
                out
            }
        }
    }
}

/// A borrowed model: named tensors in a fixed order whose values stay where they are, for
/// example in a received message. Folding a view instead of a decoded [`Weights`] saves one
/// model-sized copy per update in flight.
#[derive(Debug, Clone, Default)]
pub struct WeightsView<'a> {
    tensors: Vec<TensorView<'a>>,
}

impl<'a> WeightsView<'a> {
    /// An empty view; add tensors with [`WeightsView::push`].
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a tensor, rejecting a duplicate name.
    pub fn push(&mut self, tensor: TensorView<'a>) -> Result<()> {
        if self.tensors.iter().any(|t| t.name == tensor.name) {
            return Err(Error::DuplicateTensor { tensor: tensor.name.to_owned() });
        }
        self.tensors.push(tensor);
        Ok(())
    }

    /// The tensors, in order.
    pub fn tensors(&self) -> &[TensorView<'a>] {
        &self.tensors
    }

    /// Checks that every value is finite (see [`Weights::check_finite`]).
    pub fn check_finite(&self) -> Result<()> {
        for t in &self.tensors {
            if let Some((index, value)) = t.first_non_finite() {
                return Err(Error::NonFinite { tensor: t.name.to_owned(), index, value });
            }
        }
        Ok(())
    }

    /// The model, copied into owned [`Weights`].
    pub fn to_weights(&self) -> Weights {
        Weights {
            tensors: self
                .tensors
                .iter()
                .map(|t| Tensor {
                    name: t.name.to_owned(),
                    shape: t.shape.to_vec(),
                    data: t.to_vec(),
                })
                .collect(),
        }
    }

    /// `acc += r * (self - acc)` tensor by tensor; `acc` has this view's layout.
    pub(crate) fn mean_step_into(&self, acc: &mut Weights, r: f32) {
        for (a, x) in acc.tensors.iter_mut().zip(&self.tensors) {
            x.mean_step_into(&mut a.data, r);
        }
    }
}

/// The layout of a model (names and shapes, no values): what a round checks updates against
/// without holding a copy of the model.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Layout {
    entries: Vec<(String, Vec<usize>)>,
}

impl Layout {
    pub(crate) fn of(weights: &Weights) -> Self {
        Self {
            entries: weights.tensors.iter().map(|t| (t.name.clone(), t.shape.clone())).collect(),
        }
    }

    pub(crate) fn check(&self, other: &Weights) -> Result<()> {
        self.check_view(&other.view())
    }

    pub(crate) fn check_view(&self, other: &WeightsView<'_>) -> Result<()> {
        if self.entries.len() != other.tensors.len() {
            return Err(Error::TensorCount {
                expected: self.entries.len(),
                got: other.tensors.len(),
            });
        }
        for (index, ((name, shape), t)) in self.entries.iter().zip(&other.tensors).enumerate() {
            if name != t.name {
                return Err(Error::TensorName {
                    index,
                    expected: name.clone(),
                    got: t.name.to_owned(),
                });
            }
            if shape != t.shape {
                return Err(Error::TensorShape {
                    tensor: name.clone(),
                    expected: shape.clone(),
                    got: t.shape.to_vec(),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
pub(crate) mod tests {
    use super::*;

    /// A two-tensor model `{a: [2], b: [1, 3]}` from five values.
    pub(crate) fn model(v: [f32; 5]) -> Weights {
        Weights::from_tensors(vec![
            Tensor::new("a", vec![2], v[..2].to_vec()).expect("shape matches"),
            Tensor::new("b", vec![1, 3], v[2..].to_vec()).expect("shape matches"),
        ])
        .expect("unique names")
    }

    #[test]
    fn construction_rejects_bad_shapes_and_duplicate_names() {
        let err = Tensor::new("w", vec![2, 3], vec![0.0; 5]).unwrap_err();
        assert_eq!(err.to_string(), "tensor 'w' has shape [2, 3] (6 elements) but 5 values");
        let scalar = Tensor::new("s", vec![], vec![1.5]).unwrap();
        assert_eq!(scalar.len(), 1);
        let err = Weights::from_tensors(vec![scalar.clone(), scalar]).unwrap_err();
        assert_eq!(err, Error::DuplicateTensor { tensor: "s".into() });
    }

    #[test]
    fn layout_check_names_the_differing_tensor() {
        let m = model([1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(m.check_same_layout(&m.zeros_like()).is_ok());
        assert_eq!(m.num_params(), 5);

        let renamed = Weights::from_tensors(vec![
            Tensor::new("a", vec![2], vec![0.0; 2]).unwrap(),
            Tensor::new("c", vec![1, 3], vec![0.0; 3]).unwrap(),
        ])
        .unwrap();
        let err = m.check_same_layout(&renamed).unwrap_err();
        assert_eq!(err.to_string(), "model layout differs at tensor #1: expected 'b', got 'c'");

        let reshaped = Weights::from_tensors(vec![
            Tensor::new("a", vec![2], vec![0.0; 2]).unwrap(),
            Tensor::new("b", vec![3, 1], vec![0.0; 3]).unwrap(),
        ])
        .unwrap();
        let err = m.check_same_layout(&reshaped).unwrap_err();
        assert_eq!(
            err.to_string(),
            "model layout differs for tensor 'b': expected shape [1, 3], got [3, 1]"
        );

        let short = Weights::from_tensors(vec![Tensor::zeros("a", vec![2])]).unwrap();
        assert_eq!(
            m.check_same_layout(&short).unwrap_err(),
            Error::TensorCount { expected: 2, got: 1 }
        );
    }

    #[test]
    fn finite_check_and_arithmetic() {
        let m = model([1.0, 2.0, 3.0, 4.0, 5.0]);
        assert!(m.check_finite().is_ok());
        let bad = model([1.0, 2.0, 3.0, f32::NAN, 5.0]);
        let err = bad.check_finite().unwrap_err();
        assert!(matches!(err, Error::NonFinite { ref tensor, index: 1, .. } if tensor == "b"));

        let base = model([1.0, 1.0, 1.0, 1.0, 1.0]);
        let delta = m.delta_from(&base).unwrap();
        assert_eq!(delta, model([0.0, 1.0, 2.0, 3.0, 4.0]));
        let mut back = base.clone();
        back.add_scaled(&delta, 1.0).unwrap();
        assert_eq!(back, m);
    }
}

//! Streaming accumulators: fold each update as it arrives, in memory O(model size).
//!
//! [`WeightedMean`] is the building block of FedAvg, FedProx, the FedOpt family and FedBuff:
//! it keeps one model-sized `f32` buffer however many updates are folded. Updates are
//! validated (layout, finiteness) *before* anything is folded, so a rejected update leaves the
//! accumulator untouched.

use crate::error::{Error, Result};
use crate::weights::{Layout, Weights, WeightsView};

/// A running weighted mean of models: `sum(w_i * x_i) / sum(w_i)`.
///
/// Folding is `acc += (w / W) * (x - acc)` with `W` the total weight so far, which keeps
/// `acc` in the range of the inputs (no large intermediate sums) and makes the mean of a
/// single update, or of identical updates, bit-exact.
#[derive(Debug, Clone)]
pub struct WeightedMean {
    layout: Layout,
    /// Allocated at the first update with a positive weight (a copy of it).
    acc: Option<Weights>,
    total_weight: f64,
    count: usize,
}

impl WeightedMean {
    /// An empty accumulator for models with `layout`'s layout (its values are not used).
    pub fn new(layout: &Weights) -> Self {
        Self { layout: Layout::of(layout), acc: None, total_weight: 0.0, count: 0 }
    }

    /// Folds `update` with weight `weight` (≥ 0, finite).
    ///
    /// Fails, leaving the accumulator unchanged, when the layout differs, a value is NaN or
    /// infinite, or the weight is negative or not finite. A zero weight is accepted and counted
    /// but contributes nothing.
    pub fn add(&mut self, update: &Weights, weight: f64) -> Result<()> {
        self.add_view(&update.view(), weight)
    }

    /// [`WeightedMean::add`] for a borrowed update (for example the little-endian bytes of a
    /// received message): the same checks, all done before anything is folded.
    pub fn add_view(&mut self, update: &WeightsView<'_>, weight: f64) -> Result<()> {
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::InvalidArgument {
                name: "weight",
                reason: format!("must be finite and non-negative, got {weight}"),
            });
        }
        self.layout.check_view(update)?;
        update.check_finite()?;
        self.count += 1;
        if weight == 0.0 {
            return Ok(());
        }
        self.total_weight += weight;
        match &mut self.acc {
            None => self.acc = Some(update.to_weights()),
            Some(acc) => {
                // The ratio is computed in f64 and rounded once; it lies in (0, 1].
                let ratio = (weight / self.total_weight) as f32;
                update.mean_step_into(acc, ratio);
            }
        }
        Ok(())
    }

    /// Number of updates folded (including zero-weight ones).
    pub fn count(&self) -> usize {
        self.count
    }

    /// Sum of the weights folded so far.
    pub fn total_weight(&self) -> f64 {
        self.total_weight
    }

    /// The weighted mean; `sort` names the rule in errors.
    ///
    /// Fails with [`Error::EmptyRound`] when nothing was added and with
    /// [`Error::ZeroTotalSamples`] when every weight was zero.
    pub fn finish(self, sort: &'static str) -> Result<Weights> {
        if self.count == 0 {
            return Err(Error::EmptyRound { sort });
        }
        self.acc.ok_or(Error::ZeroTotalSamples { sort })
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::weights::tests::model;
    use crate::weights::{Tensor, TensorView};

    #[test]
    fn weighted_mean_matches_hand_computation() {
        let mut acc = WeightedMean::new(&model([0.0; 5]));
        acc.add(&model([1.0, 2.0, 3.0, 4.0, 5.0]), 1.0).unwrap();
        acc.add(&model([4.0, 8.0, 0.0, -4.0, 5.0]), 3.0).unwrap();
        acc.add(&model([100.0; 5]), 0.0).unwrap();
        assert_eq!(acc.count(), 3);
        assert_eq!(acc.total_weight(), 4.0);
        // (1*x1 + 3*x2) / 4
        let mean = acc.finish("fedavg").unwrap();
        assert_eq!(mean, model([3.25, 6.5, 0.75, -2.0, 5.0]));
    }

    #[test]
    fn rejected_updates_leave_the_accumulator_unchanged() {
        let mut acc = WeightedMean::new(&model([0.0; 5]));
        acc.add(&model([1.0; 5]), 2.0).unwrap();
        let err = acc.add(&model([1.0, 1.0, 1.0, 1.0, f32::INFINITY]), 1.0).unwrap_err();
        assert!(matches!(err, Error::NonFinite { ref tensor, index: 2, .. } if tensor == "b"));
        assert!(acc.add(&model([1.0; 5]), -1.0).is_err());
        assert!(acc.add(&model([1.0; 5]), f64::NAN).is_err());
        assert_eq!(acc.count(), 1);
        assert_eq!(acc.finish("fedavg").unwrap(), model([1.0; 5]));
    }

    /// `values` as little-endian bytes starting one byte into the buffer (misaligned).
    fn misaligned_le(values: &[f32]) -> Vec<u8> {
        let mut raw = vec![0u8];
        raw.extend(values.iter().flat_map(|v| v.to_le_bytes()));
        raw
    }

    #[test]
    fn folding_wire_bytes_matches_folding_weights_bit_for_bit() {
        let a = model([1.0, 2.0, 3.0, 4.0, 5.0]);
        let b = model([4.0, 8.0, 0.0, -4.0, 0.1]);
        let mut owned = WeightedMean::new(&a);
        owned.add(&a, 1.0).unwrap();
        owned.add(&b, 3.0).unwrap();

        let mut viewed = WeightedMean::new(&a);
        for (m, w) in [(&a, 1.0), (&b, 3.0)] {
            let raw: Vec<Vec<u8>> = m.tensors().iter().map(|t| misaligned_le(t.data())).collect();
            let mut view = WeightsView::new();
            for (t, bytes) in m.tensors().iter().zip(&raw) {
                view.push(TensorView::from_le_bytes(t.name(), t.shape(), &bytes[1..]).unwrap())
                    .unwrap();
            }
            viewed.add_view(&view, w).unwrap();
        }
        assert_eq!(viewed.finish("fedavg").unwrap(), owned.finish("fedavg").unwrap());

        // Large enough for the parallel, block-decoding path.
        let n = crate::kernels::PAR_THRESHOLD + 4097;
        let x: Vec<f32> = (0..n).map(|i| (i % 1000) as f32 * 0.5).collect();
        let y: Vec<f32> = (0..n).map(|i| (i % 77) as f32 - 3.0).collect();
        let big = |v: &[f32]| {
            Weights::from_tensors(vec![Tensor::new("w", vec![n], v.to_vec()).unwrap()]).unwrap()
        };
        let mut owned = WeightedMean::new(&big(&x));
        owned.add(&big(&x), 2.0).unwrap();
        owned.add(&big(&y), 5.0).unwrap();
        let mut viewed = WeightedMean::new(&big(&x));
        for (v, w) in [(&x, 2.0), (&y, 5.0)] {
            let raw = misaligned_le(v);
            let shape = [n];
            let mut view = WeightsView::new();
            view.push(TensorView::from_le_bytes("w", &shape, &raw[1..]).unwrap()).unwrap();
            viewed.add_view(&view, w).unwrap();
        }
        assert_eq!(viewed.finish("fedavg").unwrap(), owned.finish("fedavg").unwrap());
    }

    #[test]
    fn rejected_wire_updates_leave_the_accumulator_unchanged() {
        let base = model([1.0; 5]);
        let mut acc = WeightedMean::new(&base);
        acc.add(&base, 2.0).unwrap();
        // A non-finite value in the last element of the last tensor: found before any fold.
        let a = misaligned_le(&[7.0, 7.0]);
        let b = misaligned_le(&[7.0, 7.0, f32::NAN]);
        let (sa, sb) = ([2usize], [1usize, 3]);
        let mut view = WeightsView::new();
        view.push(TensorView::from_le_bytes("a", &sa, &a[1..]).unwrap()).unwrap();
        view.push(TensorView::from_le_bytes("b", &sb, &b[1..]).unwrap()).unwrap();
        let err = acc.add_view(&view, 1.0).unwrap_err();
        assert!(matches!(err, Error::NonFinite { ref tensor, index: 2, .. } if tensor == "b"));
        // Another layout.
        let mut short = WeightsView::new();
        short.push(TensorView::from_le_bytes("a", &sa, &a[1..]).unwrap()).unwrap();
        assert_eq!(
            acc.add_view(&short, 1.0).unwrap_err(),
            Error::TensorCount { expected: 2, got: 1 }
        );
        // Bytes that do not fit the shape never make a view.
        assert!(TensorView::from_le_bytes("b", &sb, &b[1..9]).is_err());
        assert!(TensorView::from_le_bytes("b", &sb, &b[1..12]).is_err());
        assert!(view.push(TensorView::from_le_bytes("a", &sa, &a[1..]).unwrap()).is_err());
        assert_eq!(acc.count(), 1);
        assert_eq!(acc.finish("fedavg").unwrap(), base);
    }

    #[test]
    fn empty_and_zero_weight_rounds_are_errors() {
        let acc = WeightedMean::new(&model([0.0; 5]));
        assert_eq!(
            acc.finish("fedavg").unwrap_err().to_string(),
            "fedavg: cannot aggregate an empty round (no updates were added)"
        );
        let mut acc = WeightedMean::new(&model([0.0; 5]));
        acc.add(&model([1.0; 5]), 0.0).unwrap();
        assert_eq!(acc.finish("fedavg").unwrap_err(), Error::ZeroTotalSamples { sort: "fedavg" });
    }
}

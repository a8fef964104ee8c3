//! Streaming accumulators: fold each update as it arrives, in memory O(model size).
//!
//! [`WeightedMean`] is the building block of FedAvg, FedProx, the FedOpt family and FedBuff:
//! it keeps one model-sized `f32` buffer however many updates are folded. Updates are
//! validated (layout, finiteness) *before* anything is folded, so a rejected update leaves the
//! accumulator untouched.

use crate::error::{Error, Result};
use crate::kernels;
use crate::weights::{Layout, Weights};

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
        if !weight.is_finite() || weight < 0.0 {
            return Err(Error::InvalidArgument {
                name: "weight",
                reason: format!("must be finite and non-negative, got {weight}"),
            });
        }
        self.layout.check(update)?;
        update.check_finite()?;
        self.count += 1;
        if weight == 0.0 {
            return Ok(());
        }
        self.total_weight += weight;
        match &mut self.acc {
            None => self.acc = Some(update.clone()),
            Some(acc) => {
                // The ratio is computed in f64 and rounded once; it lies in (0, 1].
                let ratio = (weight / self.total_weight) as f32;
                for (a, x) in acc.tensors_mut().iter_mut().zip(update.tensors()) {
                    kernels::mean_step(a.data_mut(), x.data(), ratio);
                }
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

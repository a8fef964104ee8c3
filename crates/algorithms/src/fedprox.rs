//! FedProx's client-side proximal term.
//!
//! Li et al., "Federated Optimization in Heterogeneous Networks", MLSys 2020. Each trainer
//! minimises `F_k(w) + μ/2·‖w - w_g‖²`, where `w_g` is the global model it received; the
//! server aggregates with plain FedAvg. The gradient of the extra term is `μ·(w - w_g)`,
//! which a trainer adds to its loss gradient before every local step.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{self, PAR_CHUNK, PAR_THRESHOLD};
use crate::weights::Weights;

/// `grad[i] += mu * (w[i] - w_global[i])`.
///
/// # Panics
/// Panics if the three slices differ in length.
pub fn add_proximal_grad(grad: &mut [f32], w: &[f32], w_global: &[f32], mu: f32) {
    assert!(
        grad.len() == w.len() && w.len() == w_global.len(),
        "add_proximal_grad: slice lengths differ"
    );
    let serial = |g: &mut [f32], w: &[f32], wg: &[f32]| {
        for ((g, w), wg) in g.iter_mut().zip(w).zip(wg) {
            *g += mu * (w - wg);
        }
    };
    if grad.len() >= PAR_THRESHOLD {
        grad.par_chunks_mut(PAR_CHUNK)
            .zip(w.par_chunks(PAR_CHUNK))
            .zip(w_global.par_chunks(PAR_CHUNK))
            .for_each(|((g, w), wg)| serial(g, w, wg));
    } else {
        serial(grad, w, w_global);
    }
}

/// [`add_proximal_grad`] over whole models: `grads`, `w` and `w_global` must share a layout.
pub fn add_proximal_grad_weights(
    grads: &mut Weights,
    w: &Weights,
    w_global: &Weights,
    mu: f32,
) -> Result<()> {
    check_mu(mu)?;
    w_global.check_same_layout(w)?;
    w_global.check_same_layout(grads)?;
    for ((g, w), wg) in grads.tensors_mut().iter_mut().zip(w.tensors()).zip(w_global.tensors()) {
        add_proximal_grad(g.data_mut(), w.data(), wg.data(), mu);
    }
    Ok(())
}

/// The proximal penalty `μ/2·‖w - w_g‖²` (to add to the reported loss).
pub fn proximal_penalty(w: &Weights, w_global: &Weights, mu: f32) -> Result<f64> {
    check_mu(mu)?;
    w_global.check_same_layout(w)?;
    let sq: f64 = w
        .tensors()
        .iter()
        .zip(w_global.tensors())
        .map(|(a, b)| kernels::squared_distance(a.data(), b.data()))
        .sum();
    Ok(0.5 * f64::from(mu) * sq)
}

pub(crate) fn check_mu(mu: f32) -> Result<()> {
    if !(mu.is_finite() && mu >= 0.0) {
        return Err(Error::InvalidArgument {
            name: "mu",
            reason: format!("must be finite and >= 0, got {mu}"),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::weights::tests::model;

    #[test]
    fn proximal_term_by_hand() {
        let mut g = vec![1.0, 0.0, -1.0];
        add_proximal_grad(&mut g, &[2.0, 2.0, 2.0], &[1.0, 3.0, 2.0], 0.5);
        assert_eq!(g, vec![1.5, -0.5, -1.0]);

        let w = model([2.0, 2.0, 2.0, 0.0, 0.0]);
        let wg = model([1.0, 3.0, 2.0, 0.0, 4.0]);
        let mut grads = model([1.0, 0.0, -1.0, 0.0, 0.0]);
        add_proximal_grad_weights(&mut grads, &w, &wg, 0.5).unwrap();
        assert_eq!(grads, model([1.5, -0.5, -1.0, 0.0, -2.0]));
        // ‖w - wg‖² = 1 + 1 + 0 + 0 + 16 = 18.
        assert_eq!(proximal_penalty(&w, &wg, 0.5).unwrap(), 4.5);
        assert!(proximal_penalty(&w, &wg, -1.0).is_err());
    }
}

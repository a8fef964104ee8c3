//! Adaptive server optimizers of the FedOpt family: FedAdam, FedYogi, FedAdaGrad.
//!
//! Reddi et al., "Adaptive Federated Optimization", ICLR 2021, Algorithm 2. Each round the
//! server treats the (sample-weighted) average client delta `Δ = mean(w_i) - x` as a
//! pseudo-gradient pointing *uphill in accuracy* and updates, per coordinate:
//!
//! ```text
//! m ← β1·m + (1-β1)·Δ
//! v ← v + Δ²                              (FedAdaGrad)
//! v ← v - (1-β2)·Δ²·sign(v - Δ²)          (FedYogi)
//! v ← β2·v + (1-β2)·Δ²                    (FedAdam)
//! x ← x + η·m / (√v + τ)
//! ```
//!
//! `m` starts at 0 and `v` at `τ²` (the paper's `v₋₁ ≥ τ²`); there is no bias correction, as
//! in the paper. The state is two model-sized `f32` buffers, created at the first step.

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::kernels::{PAR_CHUNK, PAR_THRESHOLD};
use crate::weights::{Layout, Weights};

/// Which second-moment rule an [`AdaptiveOptimizer`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AdaptiveRule {
    /// FedAdam: exponential moving average of `Δ²`.
    Adam,
    /// FedYogi: additive, sign-controlled update of `v` (slower to forget than Adam).
    Yogi,
    /// FedAdaGrad: running sum of `Δ²`.
    AdaGrad,
}

impl AdaptiveRule {
    /// The config sort naming this rule.
    pub fn sort(self) -> &'static str {
        match self {
            Self::Adam => "fedadam",
            Self::Yogi => "fedyogi",
            Self::AdaGrad => "fedadagrad",
        }
    }
}

/// Hyperparameters of the FedOpt server step.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdaptiveParams {
    /// Server learning rate η (config `lr`, default 0.01).
    pub lr: f32,
    /// First-moment decay β1 in [0, 1) (config `beta1`, default 0.9).
    pub beta1: f32,
    /// Second-moment decay β2 in [0, 1) (config `beta2`, default 0.99; unused by FedAdaGrad).
    pub beta2: f32,
    /// Adaptivity τ > 0, which bounds the step when `v` is small (config `tau`, default 1e-3).
    pub tau: f32,
}

impl Default for AdaptiveParams {
    fn default() -> Self {
        Self { lr: 0.01, beta1: 0.9, beta2: 0.99, tau: 1e-3 }
    }
}

#[derive(Debug, Clone)]
struct State {
    layout: Layout,
    m: Vec<Vec<f32>>,
    v: Vec<Vec<f32>>,
}

/// A FedAdam / FedYogi / FedAdaGrad server optimizer with its moment state.
#[derive(Debug, Clone)]
pub struct AdaptiveOptimizer {
    rule: AdaptiveRule,
    params: AdaptiveParams,
    state: Option<State>,
    steps: u64,
}

impl AdaptiveOptimizer {
    /// A fresh optimizer (moments are created at the first step, sized to the model).
    pub fn new(rule: AdaptiveRule, params: AdaptiveParams) -> Self {
        Self { rule, params, state: None, steps: 0 }
    }

    /// The rule.
    pub fn rule(&self) -> AdaptiveRule {
        self.rule
    }

    /// The hyperparameters.
    pub fn params(&self) -> AdaptiveParams {
        self.params
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Applies the pseudo-gradient `delta` to `global`, in place (no model-sized allocation
    /// after the first step).
    ///
    /// `delta` must have `global`'s layout and be finite; the model's layout must not change
    /// between steps (the moments are per coordinate). On error nothing is changed.
    pub fn step(&mut self, global: &mut Weights, delta: &Weights) -> Result<()> {
        global.check_same_layout(delta)?;
        delta.check_finite()?;
        let tau_sq = self.params.tau * self.params.tau;
        let state = match &mut self.state {
            Some(state) => {
                state.layout.check(global)?;
                state
            }
            None => self.state.insert(State {
                layout: Layout::of(global),
                m: global.tensors().iter().map(|t| vec![0.0; t.len()]).collect(),
                v: global.tensors().iter().map(|t| vec![tau_sq; t.len()]).collect(),
            }),
        };
        let (rule, params) = (self.rule, self.params);
        for (((x, d), m), v) in
            global.tensors_mut().iter_mut().zip(delta.tensors()).zip(&mut state.m).zip(&mut state.v)
        {
            step_slices(rule, params, x.data_mut(), d.data(), m, v);
        }
        self.steps += 1;
        Ok(())
    }
}

/// What a server optimizer carries from one round to the next: its step count and its first
/// and second moments (absent before the first step), each with the model's layout. A
/// resumed aggregator restores it to go on exactly where the failed one stopped.
#[derive(Clone, Debug, PartialEq)]
pub struct ServerState {
    /// Steps taken.
    pub steps: u64,
    /// `(m, v)`: the first and second moments, named and shaped like the model.
    pub moments: Option<(Weights, Weights)>,
}

impl AdaptiveOptimizer {
    /// The state to persist; `global` gives the moments their names and shapes (it must have
    /// the layout the optimizer steps on).
    pub fn export(&self, global: &Weights) -> Result<ServerState> {
        let moments = match &self.state {
            None => None,
            Some(state) => {
                state.layout.check(global)?;
                let named = |values: &[Vec<f32>]| -> Result<Weights> {
                    let tensors = global
                        .tensors()
                        .iter()
                        .zip(values)
                        .map(|(t, data)| {
                            crate::Tensor::new(t.name(), t.shape().to_vec(), data.clone())
                        })
                        .collect::<Result<Vec<_>>>()?;
                    Weights::from_tensors(tensors)
                };
                Some((named(&state.m)?, named(&state.v)?))
            }
        };
        Ok(ServerState { steps: self.steps, moments })
    }

    /// Restores a persisted state, for a model with `global`'s layout: moments of another
    /// layout, or that are not finite, are an error and change nothing.
    pub fn restore(&mut self, state: ServerState, global: &Weights) -> Result<()> {
        let moments = match state.moments {
            None => None,
            Some((m, v)) => {
                global.check_same_layout(&m)?;
                global.check_same_layout(&v)?;
                m.check_finite()?;
                v.check_finite()?;
                let values = |w: Weights| -> Vec<Vec<f32>> {
                    w.tensors().iter().map(|t| t.data().to_vec()).collect()
                };
                Some(State { layout: Layout::of(global), m: values(m), v: values(v) })
            }
        };
        self.state = moments;
        self.steps = state.steps;
        Ok(())
    }
}

fn step_slices(
    rule: AdaptiveRule,
    p: AdaptiveParams,
    x: &mut [f32],
    d: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    if x.len() >= PAR_THRESHOLD {
        x.par_chunks_mut(PAR_CHUNK)
            .zip(d.par_chunks(PAR_CHUNK))
            .zip(m.par_chunks_mut(PAR_CHUNK))
            .zip(v.par_chunks_mut(PAR_CHUNK))
            .for_each(|(((x, d), m), v)| step_serial(rule, p, x, d, m, v));
    } else {
        step_serial(rule, p, x, d, m, v);
    }
}

/// One FedOpt step over slices. The `match` is outside the loops and every slice is cut to
/// one length first, so LLVM drops the bounds checks and vectorises each loop (`sqrt` and the
/// division included).
#[allow(clippy::needless_range_loop)] // indexed loops over reslices are what vectorises here
fn step_serial(
    rule: AdaptiveRule,
    p: AdaptiveParams,
    x: &mut [f32],
    d: &[f32],
    m: &mut [f32],
    v: &mut [f32],
) {
    let n = x.len();
    let (d, m, v) = (&d[..n], &mut m[..n], &mut v[..n]);
    let (b1, b2, lr, tau) = (p.beta1, p.beta2, p.lr, p.tau);
    match rule {
        AdaptiveRule::Adam => {
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * d[i];
                v[i] = b2 * v[i] + (1.0 - b2) * d[i] * d[i];
                x[i] += lr * m[i] / (v[i].sqrt() + tau);
            }
        }
        AdaptiveRule::Yogi => {
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * d[i];
                let d2 = d[i] * d[i];
                let sign = f32::from(u8::from(v[i] > d2)) - f32::from(u8::from(v[i] < d2));
                v[i] -= (1.0 - b2) * d2 * sign;
                x[i] += lr * m[i] / (v[i].sqrt() + tau);
            }
        }
        AdaptiveRule::AdaGrad => {
            for i in 0..n {
                m[i] = b1 * m[i] + (1.0 - b1) * d[i];
                v[i] += d[i] * d[i];
                x[i] += lr * m[i] / (v[i].sqrt() + tau);
            }
        }
    }
}

/// Validates FedOpt hyperparameters (used by the config parser and by hand-built optimizers).
pub(crate) fn check_params(p: &AdaptiveParams) -> Result<()> {
    let bad = |name, reason: &str| Error::InvalidArgument { name, reason: reason.to_owned() };
    if !(p.lr.is_finite() && p.lr > 0.0) {
        return Err(bad("lr", "must be finite and > 0"));
    }
    if !(0.0..1.0).contains(&p.beta1) {
        return Err(bad("beta1", "must be in [0, 1)"));
    }
    if !(0.0..1.0).contains(&p.beta2) {
        return Err(bad("beta2", "must be in [0, 1)"));
    }
    if !(p.tau.is_finite() && p.tau > 0.0) {
        return Err(bad("tau", "must be finite and > 0"));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests fail loudly by design
mod tests {
    use super::*;
    use crate::weights::Tensor;

    fn vector(v: &[f32]) -> Weights {
        Weights::from_tensors(vec![Tensor::new("w", vec![v.len()], v.to_vec()).unwrap()]).unwrap()
    }

    fn stepped(opt: &mut AdaptiveOptimizer, x: &Weights, d: &Weights) -> Result<Weights> {
        let mut x = x.clone();
        opt.step(&mut x, d)?;
        Ok(x)
    }

    fn close(got: &Weights, want: &[f32]) {
        let got = got.tensors()[0].data();
        for (g, w) in got.iter().zip(want) {
            assert!((g - w).abs() <= 1e-5 * w.abs().max(1.0), "{got:?} vs {want:?}");
        }
    }

    const P: AdaptiveParams = AdaptiveParams { lr: 0.1, beta1: 0.5, beta2: 0.75, tau: 0.5 };

    #[test]
    fn a_restored_state_goes_on_bit_for_bit() {
        for rule in [AdaptiveRule::Adam, AdaptiveRule::Yogi, AdaptiveRule::AdaGrad] {
            let mut opt = AdaptiveOptimizer::new(rule, P);
            let x0 = vector(&[1.0, -2.0, 0.5]);
            // Before the first step there are no moments.
            assert_eq!(opt.export(&x0).unwrap(), ServerState { steps: 0, moments: None });
            let x1 = stepped(&mut opt, &x0, &vector(&[0.1, 0.2, -0.3])).unwrap();
            let saved = opt.export(&x1).unwrap();
            let mut resumed = AdaptiveOptimizer::new(rule, P);
            resumed.restore(saved.clone(), &x1).unwrap();
            assert_eq!(resumed.export(&x1).unwrap(), saved);
            let d = vector(&[-0.4, 0.05, 0.3]);
            assert_eq!(
                stepped(&mut opt, &x1, &d).unwrap(),
                stepped(&mut resumed, &x1, &d).unwrap()
            );
            assert_eq!(resumed.steps(), 2);

            // Moments of another layout or not finite change nothing.
            let mut bad = saved.clone();
            bad.moments = Some((vector(&[0.0; 2]), vector(&[0.0; 2])));
            assert!(resumed.restore(bad, &x1).is_err());
            let mut nan = saved.clone();
            nan.moments.as_mut().unwrap().1 = vector(&[0.0, f32::NAN, 0.0]);
            assert!(resumed.restore(nan, &x1).is_err());
            assert_eq!(resumed.steps(), 2);
        }
    }

    #[test]
    fn fedadam_two_steps_by_hand() {
        let mut opt = AdaptiveOptimizer::new(AdaptiveRule::Adam, P);
        let x0 = vector(&[1.0, -2.0]);
        // Step 1, Δ = [2, -1]: m = [1, -0.5]; v = 0.75*0.25 + 0.25*Δ² = [1.1875, 0.4375]
        // x = x0 + 0.1*m/(√v + 0.5) = [1 + 0.1/1.589725, -2 - 0.05/1.161438]
        let x1 = stepped(&mut opt, &x0, &vector(&[2.0, -1.0])).unwrap();
        close(&x1, &[1.062904, -2.043_05]);
        // Step 2, Δ = [0, 1]: m = [0.5, 0.25]; v = [0.890625, 0.578125]
        let x2 = stepped(&mut opt, &x1, &vector(&[0.0, 1.0])).unwrap();
        close(
            &x2,
            &[
                1.062904 + 0.05 / (0.890625f32.sqrt() + 0.5),
                -2.043_05 + 0.025 / (0.578125f32.sqrt() + 0.5),
            ],
        );
        assert_eq!(opt.steps(), 2);
    }

    #[test]
    fn fedyogi_and_fedadagrad_by_hand() {
        // v0 = τ² = 0.25. Δ = [2, 0.25]: Δ² = [4, 0.0625].
        // Yogi: v = v0 - 0.25*Δ²*sign(v0 - Δ²) = [0.25 + 1, 0.25 - 0.015625] = [1.25, 0.234375]
        let mut yogi = AdaptiveOptimizer::new(AdaptiveRule::Yogi, P);
        let x = stepped(&mut yogi, &vector(&[0.0, 0.0]), &vector(&[2.0, 0.25])).unwrap();
        close(&x, &[0.1 * 1.0 / (1.25f32.sqrt() + 0.5), 0.1 * 0.125 / (0.234375f32.sqrt() + 0.5)]);
        // AdaGrad: v = v0 + Δ² = [4.25, 0.3125]
        let mut adagrad = AdaptiveOptimizer::new(AdaptiveRule::AdaGrad, P);
        let x = stepped(&mut adagrad, &vector(&[0.0, 0.0]), &vector(&[2.0, 0.25])).unwrap();
        close(&x, &[0.1 * 1.0 / (4.25f32.sqrt() + 0.5), 0.1 * 0.125 / (0.3125f32.sqrt() + 0.5)]);
    }

    #[test]
    fn step_rejects_layout_change_and_non_finite_delta() {
        let mut opt = AdaptiveOptimizer::new(AdaptiveRule::Adam, P);
        let x = stepped(&mut opt, &vector(&[0.0, 0.0]), &vector(&[1.0, 1.0])).unwrap();
        assert!(matches!(
            stepped(&mut opt, &x, &vector(&[1.0, f32::NAN])),
            Err(Error::NonFinite { .. })
        ));
        assert!(matches!(
            stepped(&mut opt, &vector(&[0.0; 3]), &vector(&[0.0; 3])),
            Err(Error::TensorShape { .. })
        ));
        assert!(check_params(&AdaptiveParams { beta1: 1.0, ..P }).is_err());
        assert!(check_params(&AdaptiveParams { tau: 0.0, ..P }).is_err());
        assert!(check_params(&P).is_ok());
    }
}

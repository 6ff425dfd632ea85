//! AdamW with decoupled weight decay (the PyTorch / candle-nn formulation), written here because
//! candle-nn's keeps its moments private and a resumable checkpoint needs them. Plus the
//! learning-rate schedule and global-norm gradient clipping.

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, Var};

#[derive(Debug, Clone, Copy)]
pub struct AdamWParams {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// First and second moments of one parameter: plain vectors on CPU (updated in place in one
/// fused pass), tensors on other devices.
enum Moments {
    Host(Vec<f32>, Vec<f32>),
    Device(Tensor, Tensor),
}

pub struct AdamW {
    /// (name, parameter, moments), in a fixed (sorted) order.
    vars: Vec<(String, Var, Moments)>,
    pub step: usize,
    params: AdamWParams,
}

fn fused_on_host(var: &Var) -> bool {
    var.device().is_cpu() && var.dtype() == candle_core::DType::F32
}

impl AdamW {
    pub fn new(named: &[(String, Var)], params: AdamWParams) -> candle_core::Result<Self> {
        let vars = named
            .iter()
            .map(|(n, v)| {
                let moments = if fused_on_host(v) {
                    Moments::Host(vec![0.0; v.elem_count()], vec![0.0; v.elem_count()])
                } else {
                    Moments::Device(v.zeros_like()?, v.zeros_like()?)
                };
                Ok((n.clone(), v.clone(), moments))
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            vars,
            step: 0,
            params,
        })
    }

    /// One update with learning rate `lr`. Biases/norms (1-D) are not decayed, as usual.
    pub fn step(&mut self, grads: &HashMap<String, Tensor>, lr: f64) -> candle_core::Result<()> {
        use rayon::prelude::*;
        self.step += 1;
        let p = self.params;
        let t = self.step as i32;
        let bc1 = 1.0 - p.beta1.powi(t);
        let bc2 = 1.0 - p.beta2.powi(t);
        for (name, var, moments) in &mut self.vars {
            let Some(g) = grads.get(name.as_str()) else {
                continue;
            };
            let decay = if var.rank() >= 2 { p.weight_decay } else { 0.0 };
            match moments {
                Moments::Host(m, v) => {
                    // One pass over (w, g, m, v) instead of a dozen whole-tensor temporaries.
                    let g: Vec<f32> = g.flatten_all()?.to_vec1()?;
                    let mut w: Vec<f32> = var.as_tensor().flatten_all()?.to_vec1()?;
                    let (b1, b2) = (p.beta1 as f32, p.beta2 as f32);
                    let (lr32, eps) = (lr as f32, p.eps as f32);
                    let (c1, c2) = (bc1 as f32, bc2 as f32);
                    let shrink = 1.0 - (lr * decay) as f32;
                    w.par_chunks_mut(1 << 14)
                        .zip(m.par_chunks_mut(1 << 14))
                        .zip(v.par_chunks_mut(1 << 14))
                        .zip(g.par_chunks(1 << 14))
                        .for_each(|(((w, m), v), g)| {
                            for i in 0..w.len() {
                                m[i] = b1 * m[i] + (1.0 - b1) * g[i];
                                v[i] = b2 * v[i] + (1.0 - b2) * g[i] * g[i];
                                let update = (m[i] / c1) / ((v[i] / c2).sqrt() + eps);
                                w[i] = w[i] * shrink - lr32 * update;
                            }
                        });
                    let shape = var.shape().clone();
                    var.set(&Tensor::from_vec(w, shape, var.device())?)?;
                }
                Moments::Device(m, v) => {
                    *m = ((&*m * p.beta1)? + (g * (1.0 - p.beta1))?)?;
                    *v = ((&*v * p.beta2)? + (g.sqr()? * (1.0 - p.beta2))?)?;
                    let m_hat = (&*m / bc1)?;
                    let v_hat = (&*v / bc2)?;
                    let theta = if decay > 0.0 {
                        (var.as_tensor() * (1.0 - lr * decay))?
                    } else {
                        var.as_tensor().clone()
                    };
                    let update = (m_hat / (v_hat.sqrt()? + p.eps)?)?;
                    var.set(&(theta - (update * lr)?)?)?;
                }
            }
        }
        Ok(())
    }

    /// Moments by name, for checkpoints: `m.<name>` and `v.<name>`.
    pub fn state(&self) -> candle_core::Result<HashMap<String, Tensor>> {
        let mut out = HashMap::new();
        for (name, var, moments) in &self.vars {
            let (m, v) = match moments {
                Moments::Host(m, v) => (
                    Tensor::from_slice(m, var.shape(), var.device())?,
                    Tensor::from_slice(v, var.shape(), var.device())?,
                ),
                Moments::Device(m, v) => (m.clone(), v.clone()),
            };
            out.insert(format!("m.{name}"), m);
            out.insert(format!("v.{name}"), v);
        }
        Ok(out)
    }

    pub fn load_state(
        &mut self,
        state: &HashMap<String, Tensor>,
        step: usize,
    ) -> candle_core::Result<()> {
        for (name, _, moments) in &mut self.vars {
            let (Some(sm), Some(sv)) = (
                state.get(&format!("m.{name}")),
                state.get(&format!("v.{name}")),
            ) else {
                candle_core::bail!("optimizer state has no moments for {name}");
            };
            match moments {
                Moments::Host(m, v) => {
                    let (nm, nv): (Vec<f32>, Vec<f32>) =
                        (sm.flatten_all()?.to_vec1()?, sv.flatten_all()?.to_vec1()?);
                    if nm.len() != m.len() || nv.len() != v.len() {
                        candle_core::bail!("optimizer state for {name} has the wrong size");
                    }
                    *m = nm;
                    *v = nv;
                }
                Moments::Device(m, v) => {
                    *m = sm.clone();
                    *v = sv.clone();
                }
            }
        }
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up to `peak` over `warmup` steps, then cosine decay to 10% of `peak` at `total`.
pub fn learning_rate(step: usize, warmup: usize, total: usize, peak: f64) -> f64 {
    let min = peak * 0.1;
    if warmup > 0 && step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    if total <= warmup {
        return peak;
    }
    let progress = ((step - warmup) as f64 / (total - warmup) as f64).clamp(0.0, 1.0);
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// Gradients of `named` vars out of a GradStore, by name.
pub fn collect_grads(named: &[(String, Var)], store: &GradStore) -> HashMap<String, Tensor> {
    named
        .iter()
        .filter_map(|(n, v)| store.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
        .collect()
}

/// Scales gradients so that their global L2 norm is at most `max_norm`; returns the norm
/// before clipping.
pub fn clip_grad_norm(
    grads: &mut HashMap<String, Tensor>,
    max_norm: f64,
) -> candle_core::Result<f64> {
    let mut total = 0f64;
    for g in grads.values() {
        total += g
            .sqr()?
            .sum_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_scalar::<f64>()?;
    }
    let norm = total.sqrt();
    if max_norm > 0.0 && norm > max_norm {
        let scale = max_norm / (norm + 1e-6);
        for g in grads.values_mut() {
            *g = (&*g * scale)?;
        }
    }
    Ok(norm)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays() {
        let lr = |s| learning_rate(s, 10, 100, 1e-3);
        assert!((lr(0) - 1e-4).abs() < 1e-12);
        assert!((lr(9) - 1e-3).abs() < 1e-12);
        assert!((lr(10) - 1e-3).abs() < 1e-12);
        assert!(lr(50) < lr(10) && lr(50) > lr(99));
        assert!((lr(100) - 1e-4).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_moves_by_lr() {
        // With bias correction the first AdamW step is lr * sign(g) (up to eps).
        let var = Var::new(&[1.0f32, -2.0], &candle_core::Device::Cpu).unwrap();
        let named = vec![("w".to_string(), var.clone())];
        let mut opt = AdamW::new(&named, AdamWParams::default()).unwrap();
        let grads = HashMap::from([(
            "w".to_string(),
            Tensor::new(&[0.5f32, -3.0], &candle_core::Device::Cpu).unwrap(),
        )]);
        opt.step(&grads, 0.1).unwrap();
        let v: Vec<f32> = var.as_tensor().to_vec1().unwrap();
        assert!(
            (v[0] - 0.9).abs() < 1e-5 && (v[1] + 1.9).abs() < 1e-5,
            "{v:?}"
        );
    }
}

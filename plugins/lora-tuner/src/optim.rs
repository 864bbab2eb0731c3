//! The optimizer side of a training step: gradients accumulated over micro-batches, clipped,
//! and applied by AdamW.

use candle_core::{Tensor, Var};
use recfuse_llm_engine::tunable::lora::LoraStack;
use recfuse_llm_engine::tunable::{answer_loss_backward, CausalLm, Sequence};
use recfuse_sdk::prelude::Result;

/// One micro-batch: its sequences and the adapters (with dropout) they train.
pub struct MicroBatch<'a> {
    pub seqs: Vec<Sequence>,
    pub lora: LoraStack<'a>,
}

/// Forward and backward over every micro-batch of a step; returns each variable's gradient
/// (None: not used by any micro-batch) and the batch's mean answer-token loss. Each
/// micro-batch contributes its share of the whole batch's mean, so the accumulated gradient
/// equals one pass over the batch.
pub fn accumulate(
    model: &dyn CausalLm,
    micro: &[MicroBatch],
    vars: &[Var],
) -> Result<(Vec<Option<Tensor>>, f64)> {
    let batch_tokens: usize = micro
        .iter()
        .flat_map(|m| &m.seqs)
        .map(Sequence::answer_len)
        .sum();
    let mut grads: Vec<Option<Tensor>> = vec![None; vars.len()];
    let mut loss = 0.0;
    for m in micro {
        loss += answer_loss_backward(
            model,
            &m.seqs,
            None,
            &m.lora,
            1.0 / batch_tokens as f64,
            vars,
            &mut grads,
        )?;
    }
    Ok((grads, loss))
}

/// Scales gradients so that their global L2 norm is at most `max` (as PyTorch's
/// `clip_grad_norm_`).
pub fn clip(grads: &mut [Option<Tensor>], max: f64) -> Result<()> {
    if max <= 0.0 {
        return Ok(());
    }
    let mut sq = 0.0f64;
    for g in grads.iter().flatten() {
        sq += g.sqr()?.sum_all()?.to_scalar::<f32>()? as f64;
    }
    let norm = sq.sqrt();
    if norm > max {
        let scale = max / (norm + 1e-6);
        for g in grads.iter_mut().flatten() {
            *g = (&*g * scale)?;
        }
    }
    Ok(())
}

/// AdamW (decoupled weight decay) as PyTorch computes it, with per-variable step counts: a
/// variable without a gradient in a step (another task's adapter) is left alone, as PyTorch
/// leaves a parameter whose `.grad` is None.
pub struct AdamW {
    pub m: Vec<Tensor>,
    pub v: Vec<Tensor>,
    pub steps: Vec<u64>,
}

impl AdamW {
    const B1: f64 = 0.9;
    const B2: f64 = 0.999;
    const EPS: f64 = 1e-8;

    pub fn new(vars: &[Var]) -> Result<Self> {
        let zeros: Vec<Tensor> = vars
            .iter()
            .map(|v| v.as_tensor().zeros_like())
            .collect::<candle_core::Result<_>>()?;
        Ok(Self {
            m: zeros.clone(),
            v: zeros,
            steps: vec![0; vars.len()],
        })
    }

    pub fn step(
        &mut self,
        vars: &[Var],
        grads: &[Option<Tensor>],
        lr: f64,
        weight_decay: f64,
    ) -> Result<()> {
        for (i, (var, g)) in vars.iter().zip(grads).enumerate() {
            let Some(g) = g else { continue };
            self.steps[i] += 1;
            let t = self.steps[i] as i32;
            let (c1, c2) = (1.0 - Self::B1.powi(t), 1.0 - Self::B2.powi(t));
            self.m[i] = ((&self.m[i] * Self::B1)? + (g * (1.0 - Self::B1))?)?;
            self.v[i] = ((&self.v[i] * Self::B2)? + (g.sqr()? * (1.0 - Self::B2))?)?;
            let decayed = (var.as_tensor() * (1.0 - lr * weight_decay))?;
            let update = ((&self.m[i] / c1)? / ((&self.v[i] / c2)?.sqrt()? + Self::EPS)?)?;
            var.set(&(decayed - (update * lr)?)?)?;
        }
        Ok(())
    }
}

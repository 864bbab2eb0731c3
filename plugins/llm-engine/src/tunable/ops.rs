//! Differentiable versions of the transformer ops candle-nn 0.11 implements as fused kernels
//! without a backward step (`softmax_last_dim`, `rms_norm`, `layer_norm`, `rope*`): through
//! those, `backward()` succeeds and the weights before them silently get no gradient. Written
//! from ops candle's autograd knows, so training through them really trains.

use candle_core::{Result, Tensor, D};

/// Softmax over the last axis. The row maximum is subtracted for stability and detached:
/// softmax does not depend on it, so its gradient contributes nothing.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// Log-softmax over the last axis.
pub fn log_softmax_last(x: &Tensor) -> Result<Tensor> {
    let shifted = x.broadcast_sub(&x.max_keepdim(D::Minus1)?.detach())?;
    shifted.broadcast_sub(&shifted.exp()?.sum_keepdim(D::Minus1)?.log()?)
}

/// `x / sqrt(mean(x²) + eps) * w` over the last axis (Llama, ChatGLM2/3), fused.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op2(&w.contiguous()?, super::fused::RmsNorm { eps: eps as f32 })
}

/// [`rms_norm`] composed from elementary ops: the reference the fused op is tested against.
#[cfg(test)]
pub fn rms_norm_composed(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// `silu(gate) · up` (SwiGLU), fused.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    gate.contiguous()?.apply_op2(&up.contiguous()?, super::fused::SwiGlu)
}

/// `(x - mean) / sqrt(var + eps) * w + b` over the last axis.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: Option<&Tensor>, eps: f64) -> Result<Tensor> {
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let y = centred
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .broadcast_mul(w)?;
    match b {
        Some(b) => y.broadcast_add(b),
        None => Ok(y),
    }
}

/// Rotary embedding in Hugging Face Llama's layout (GPT-NeoX style): the head's first half
/// rotates against its second half. `x`: `[b, heads, t, hd]`; `cos`, `sin`: `[t, hd/2]`.
pub fn rope_half(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let half = x.dim(D::Minus1)? / 2;
    let (x1, x2) = (
        x.narrow(D::Minus1, 0, half)?,
        x.narrow(D::Minus1, half, half)?,
    );
    let first = (x1.broadcast_mul(cos)? - x2.broadcast_mul(sin)?)?;
    let second = (x2.broadcast_mul(cos)? + x1.broadcast_mul(sin)?)?;
    Tensor::cat(&[first, second], D::Minus1)
}

/// ChatGLM2/3's rotary embedding: adjacent pairs `(x[2i], x[2i+1])` of the head's first `rot`
/// dimensions rotate, the rest pass through. `x`: `[b, heads, t, hd]`; `cos`, `sin`: `[t, rot/2]`.
pub fn rope_pairs_prefix(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Tensor> {
    let (b, h, t, hd) = x.dims4()?;
    let pairs = x.narrow(3, 0, rot)?.reshape((b, h, t, rot / 2, 2))?;
    let (x0, x1) = (
        pairs.narrow(4, 0, 1)?.squeeze(4)?,
        pairs.narrow(4, 1, 1)?.squeeze(4)?,
    );
    let o0 = (x0.broadcast_mul(cos)? - x1.broadcast_mul(sin)?)?;
    let o1 = (x1.broadcast_mul(cos)? + x0.broadcast_mul(sin)?)?;
    let rotated = Tensor::stack(&[o0, o1], 4)?.reshape((b, h, t, rot))?;
    if rot == hd {
        return Ok(rotated);
    }
    Tensor::cat(&[rotated, x.narrow(3, rot, hd - rot)?], 3)
}

/// Cosine and sine tables `[positions, n]` for frequencies `base^(-2i/dim)`, `i < n`.
pub fn rope_tables(positions: usize, n: usize, dim: usize, base: f64) -> Result<(Tensor, Tensor)> {
    let inv: Vec<f32> = (0..n)
        .map(|i| (1.0 / base.powf(2.0 * i as f64 / dim as f64)) as f32)
        .collect();
    let inv = Tensor::from_vec(inv, (1, n), &candle_core::Device::Cpu)?;
    let pos = Tensor::arange(0u32, positions as u32, &candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .reshape((positions, 1))?;
    let freqs = pos.broadcast_mul(&inv)?;
    Ok((freqs.cos()?, freqs.sin()?))
}

/// Causal self-attention with grouped key/value heads: `q` `[b, h, t, hd]`, `k`, `v`
/// `[b, kvh, t, hd]`, each kv head serving `h / kvh` consecutive query heads (Llama's
/// `repeat_kv`, ChatGLM's multi-query groups). Returns `[b, t, h·hd]`.
pub fn causal_attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, h, t, hd) = q.dims4()?;
    let kvh = k.dim(1)?;
    let group = h / kvh;
    // Fold each kv head's query group into the row axis instead of copying keys and values.
    let q = q.contiguous()?.reshape((b, kvh, group * t, hd))?;
    let scores = q.matmul(&k.contiguous()?.t()?)?;
    // Rows of `scores` are query positions `0..t` of each group in turn: what the fused
    // causal softmax expects.
    let probs = scores.apply_op1(super::fused::CausalSoftmax {
        scale: 1.0 / (hd as f32).sqrt(),
    })?;
    probs
        .matmul(&v.contiguous()?)?
        .reshape((b, h, t, hd))?
        .transpose(1, 2)?
        .reshape((b, t, h * hd))
}

/// Attention of packed segments (one row, `q` `[1, h, n, hd]`, `k`, `v` `[1, kvh, n, hd]`)
/// after a shared prefix whose keys and values are `past`: each token sees the whole prefix
/// and its own segment up to itself ([`super::Packing`]). Returns `[1, n, h·hd]`.
pub fn packed_attention(q: &Tensor, k: &Tensor, v: &Tensor, past: &super::Kv, packing: &super::Packing) -> Result<Tensor> {
    let (_, h, n, hd) = q.dims4()?;
    let kvh = k.dim(1)?;
    let group = h / kvh;
    // Query heads of one kv head are consecutive: `[kvh, group·n, hd]` without copying.
    let q = q.contiguous()?.reshape((kvh, group * n, hd))?;
    let prefix_scores = q.matmul(&past.k.squeeze(0)?.t()?)?;
    let own = Tensor::cat(&[k.squeeze(0)?, v.squeeze(0)?], 2)?.contiguous()?;
    let p = past.len();
    let mixed = prefix_scores.apply_op3_no_bwd(
        &q,
        &own,
        &super::fused::PackedAttention {
            scale: 1.0 / (hd as f32).sqrt(),
            segment_start: packing.segment_start.clone(),
        },
    )?;
    let out = (mixed.narrow(2, 0, p)?.contiguous()?.matmul(&past.v.squeeze(0)?)? + mixed.narrow(2, p, hd)?)?;
    out.reshape((h, n, hd))?.transpose(0, 1)?.reshape((1, n, h * hd))
}

/// The largest absolute difference between two tensors of one shape (tests and checks).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
    (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
}

/// `x [.., in] · wᵀ (+ bias)` with `w` `[out, in]`, computed as one 2-D GEMM.
pub fn linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let rows = x.elem_count() / dims[dims.len() - 1];
    let y = x.reshape((rows, dims[dims.len() - 1]))?.matmul(&w.t()?)?;
    let y = match bias {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out = dims;
    *out.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    fn close(a: &Tensor, b: &Tensor) -> f32 {
        max_abs_diff(a, b).unwrap()
    }

    /// Each op agrees with candle-nn's fused kernel in value (so the model computes what the
    /// inference path computes) and, unlike it, passes a gradient back.
    #[test]
    fn ops_match_candle_kernels_and_have_gradients() {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev).unwrap()).unwrap();
        let w = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let b = Tensor::randn(0f32, 1.0, 8, &dev).unwrap();
        let (cos, sin) = rope_tables(5, 4, 8, 10_000.0).unwrap();
        let cases: Vec<(Tensor, Tensor)> = vec![
            (
                softmax_last(&x).unwrap(),
                candle_nn::ops::softmax_last_dim(&x).unwrap(),
            ),
            (
                rms_norm(&x, &w, 1e-5).unwrap(),
                candle_nn::ops::rms_norm(&x, &w, 1e-5).unwrap(),
            ),
            (
                layer_norm(&x, &w, Some(&b), 1e-5).unwrap(),
                candle_nn::ops::layer_norm(&x, &w, &b, 1e-5).unwrap(),
            ),
            (
                rope_half(&x, &cos, &sin).unwrap(),
                candle_nn::rotary_emb::rope(&x, &cos, &sin).unwrap(),
            ),
            (
                rope_pairs_prefix(&x, &cos, &sin, 8).unwrap(),
                candle_nn::rotary_emb::rope_i(&x, &cos, &sin).unwrap(),
            ),
        ];
        for (i, (ours, theirs)) in cases.iter().enumerate() {
            assert!(
                close(ours, theirs) < 1e-4,
                "op {i} differs from candle's kernel"
            );
            let g = (ours * &theirs.detach())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gx = g.get(&x).expect("gradient reaches the input");
            assert!(
                gx.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0,
                "op {i}: zero gradient"
            );
        }
        // The half-rotation of a prefix: only the first `rot` dimensions change.
        let part = rope_pairs_prefix(
            &x,
            &cos.narrow(1, 0, 2).unwrap(),
            &sin.narrow(1, 0, 2).unwrap(),
            4,
        )
        .unwrap();
        assert!(close(&part.narrow(3, 4, 4).unwrap(), &x.narrow(3, 4, 4).unwrap()) == 0.0);
    }

    #[test]
    fn log_softmax_is_log_of_softmax() {
        let x = Tensor::randn(0f32, 3.0, (4, 7), &Device::Cpu).unwrap();
        assert!(
            close(
                &log_softmax_last(&x).unwrap().exp().unwrap(),
                &softmax_last(&x).unwrap()
            ) < 1e-6
        );
    }
}

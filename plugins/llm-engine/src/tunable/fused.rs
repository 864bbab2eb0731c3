//! Fused ops with hand-written backward passes (candle `CustomOp`s): one pass over the data
//! where the composed ops of [`super::ops`] take four to six, and only the result kept for the
//! backward where they keep every intermediate. Training memory is mostly these intermediates
//! (attention probabilities are the largest tensor of a block). Each is checked against its
//! composed twin, values and gradients, in the tests below.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use crate::simd::dot;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{what}: f32 only")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input only")
    };
    Ok(&v[a..b])
}

fn u32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [u32]> {
    let CpuStorage::U32(v) = s else {
        candle_core::bail!("{what}: u32 indices only")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("{what}: contiguous input only")
    };
    Ok(&v[a..b])
}

/// Runs `f(row_index, out_row)` over the rows of `out`, split across the available cores.
fn par_rows(out: &mut [f32], row: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    let rows = out.len() / row.max(1);
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .min(rows.max(1));
    if threads <= 1 || out.len() < 1 << 14 {
        out.chunks_mut(row).enumerate().for_each(|(r, o)| f(r, o));
        return;
    }
    let per = rows.div_ceil(threads);
    std::thread::scope(|s| {
        for (c, chunk) in out.chunks_mut(per * row).enumerate() {
            let f = &f;
            s.spawn(move || {
                chunk
                    .chunks_mut(row)
                    .enumerate()
                    .for_each(|(r, o)| f(c * per + r, o))
            });
        }
    });
}

fn tensor(v: Vec<f32>, like: &Tensor) -> Result<Tensor> {
    Tensor::from_vec(v, like.shape(), like.device())
}

/// Causal softmax of attention scores `[.., t·g, t]` (rows are `g` query groups of `t`
/// positions each, query `i` seeing keys `0..=i`), with the `1/√d` scale folded in. Masked
/// entries are exactly 0.
pub struct CausalSoftmax {
    pub scale: f32,
}

impl CustomOp1 for CausalSoftmax {
    fn name(&self) -> &'static str {
        "causal-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_slice(s, l, "causal-softmax")?;
        let t = l.dims()[l.dims().len() - 1];
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, t, |r, o| {
            let row = &x[r * t..(r + 1) * t];
            let n = r % t + 1;
            let max = row[..n].iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v)) * self.scale;
            let mut sum = 0.0;
            for j in 0..n {
                o[j] = (row[j] * self.scale - max).exp();
                sum += o[j];
            }
            let inv = 1.0 / sum;
            o[..n].iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let (y, g) = (
            res.flatten_all()?.to_vec1::<f32>()?,
            grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?,
        );
        let t = res.dim(candle_core::D::Minus1)?;
        let mut out = vec![0f32; y.len()];
        par_rows(&mut out, t, |r, o| {
            let (yr, gr) = (&y[r * t..(r + 1) * t], &g[r * t..(r + 1) * t]);
            let n = r % t + 1;
            let dot: f32 = (0..n).map(|j| yr[j] * gr[j]).sum();
            for j in 0..n {
                o[j] = self.scale * yr[j] * (gr[j] - dot);
            }
        });
        Ok(Some(tensor(out, res)?))
    }
}

/// Attention of packed segments after a shared prefix (inference only): many candidates'
/// suffixes run as one row of `n` tokens; token `j` of a segment sees the `p` prefix keys and
/// its own segment's tokens up to itself. Inputs: the prefix scores `[kvh, g·n, p]` (one GEMM
/// against the cached keys, unscaled), the queries `[kvh, g·n, hd]` and the suffix keys and
/// values side by side `[kvh, n, 2·hd]`. Output `[kvh, g·n, p + hd]`: the softmax weights of the
/// prefix keys (to multiply with the cached values), then the weighted sum of the segment's own
/// values. The within-segment part is tiny (segments are tens of tokens), so it is computed
/// here rather than as a dense `n × n` product that would be almost all masked.
pub struct PackedAttention {
    pub scale: f32,
    /// First packed token of the segment each token belongs to.
    pub segment_start: std::sync::Arc<Vec<u32>>,
}

impl candle_core::CustomOp3 for PackedAttention {
    fn name(&self) -> &'static str {
        "packed-attention"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (scores, q, kv) = (
            f32_slice(s1, l1, "packed-attention")?,
            f32_slice(s2, l2, "packed-attention")?,
            f32_slice(s3, l3, "packed-attention")?,
        );
        let (kvh, rows, p) = l1.shape().dims3()?;
        let hd = l2.shape().dims3()?.2;
        let n = l3.shape().dims3()?.1;
        if self.segment_start.len() != n || rows % n != 0 || l3.shape().dims3()?.2 != 2 * hd {
            candle_core::bail!("packed-attention: shapes {:?} {:?} {:?} for {} tokens", l1.dims(), l2.dims(), l3.dims(), self.segment_start.len())
        }
        let width = p + hd;
        let mut out = vec![0f32; kvh * rows * width];
        par_rows(&mut out, width, |r, o| {
            let head = r / rows;
            let token = (r % rows) % n;
            let start = self.segment_start[token] as usize;
            let qr = &q[r * hd..(r + 1) * hd];
            let key = |j: usize| &kv[(head * n + j) * 2 * hd..(head * n + j) * 2 * hd + hd];
            let value = |j: usize| &kv[(head * n + j) * 2 * hd + hd..(head * n + j + 1) * 2 * hd];
            let mut own: Vec<f32> = (start..=token).map(|j| dot(qr, key(j)) * self.scale).collect();
            let sr = &scores[r * p..(r + 1) * p];
            let max = sr.iter().map(|v| v * self.scale).chain(own.iter().copied()).fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0;
            for (o, &v) in o[..p].iter_mut().zip(sr) {
                *o = (v * self.scale - max).exp();
                sum += *o;
            }
            own.iter_mut().for_each(|v| *v = (*v - max).exp());
            sum += own.iter().sum::<f32>();
            let inv = 1.0 / sum;
            o[..p].iter_mut().for_each(|v| *v *= inv);
            let acc = &mut o[p..];
            for (w, j) in own.iter().zip(start..=token) {
                let w = w * inv;
                for (a, v) in acc.iter_mut().zip(value(j)) {
                    *a += w * v;
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from((kvh, rows, width))))
    }
}

/// RMSNorm over the last axis with a weight: `x · w / √(mean(x²) + eps)`.
pub struct RmsNorm {
    pub eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    1.0 / (row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32 + eps).sqrt()
}

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, w) = (
            f32_slice(s1, l1, "rms-norm")?,
            f32_slice(s2, l2, "rms-norm weight")?,
        );
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        par_rows(&mut out, d, |r, o| {
            let row = &x[r * d..(r + 1) * d];
            let inv = inv_rms(row, self.eps);
            for j in 0..d {
                o[j] = row[j] * inv * w[j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let xv = x.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let g = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let wv = w.to_vec1::<f32>()?;
        let d = wv.len();
        let mut dx = vec![0f32; xv.len()];
        // dx = inv·(g·w) − x·inv³·mean(g·w·x)
        par_rows(&mut dx, d, |r, o| {
            let (xr, gr) = (&xv[r * d..(r + 1) * d], &g[r * d..(r + 1) * d]);
            let inv = inv_rms(xr, self.eps);
            let mean: f32 = (0..d).map(|j| gr[j] * wv[j] * xr[j]).sum::<f32>() / d as f32;
            for j in 0..d {
                o[j] = inv * gr[j] * wv[j] - xr[j] * inv * inv * inv * mean;
            }
        });
        // dw = Σ_rows g·x·inv
        let mut dw = vec![0f32; d];
        for (xr, gr) in xv.chunks(d).zip(g.chunks(d)) {
            let inv = inv_rms(xr, self.eps);
            for j in 0..d {
                dw[j] += gr[j] * xr[j] * inv;
            }
        }
        Ok((Some(tensor(dx, x)?), Some(tensor(dw, w)?)))
    }
}

/// SwiGLU: `silu(gate) · up`, elementwise over two tensors of one shape.
pub struct SwiGlu;

fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + (-x).exp())
}

impl CustomOp2 for SwiGlu {
    fn name(&self) -> &'static str {
        "swiglu"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (g, u) = (f32_slice(s1, l1, "swiglu")?, f32_slice(s2, l2, "swiglu")?);
        let row = l1.dims()[l1.dims().len() - 1];
        let mut out = vec![0f32; g.len()];
        par_rows(&mut out, row, |r, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let x = g[r * row + j];
                *v = x * sigmoid(x) * u[r * row + j];
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, gate: &Tensor, up: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (g, u) = (gate.contiguous()?.flatten_all()?.to_vec1::<f32>()?, up.contiguous()?.flatten_all()?.to_vec1::<f32>()?);
        let d = grad.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let row = gate.dim(candle_core::D::Minus1)?;
        let (mut dg, mut du) = (vec![0f32; g.len()], vec![0f32; g.len()]);
        // d silu(x)/dx = σ(x)·(1 + x·(1 − σ(x)))
        par_rows(&mut dg, row, |r, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let (x, i) = (g[r * row + j], r * row + j);
                let s = sigmoid(x);
                *v = d[i] * u[i] * s * (1.0 + x * (1.0 - s));
            }
        });
        par_rows(&mut du, row, |r, o| {
            for (j, v) in o.iter_mut().enumerate() {
                let (x, i) = (g[r * row + j], r * row + j);
                *v = d[i] * x * sigmoid(x);
            }
        });
        Ok((Some(tensor(dg, gate)?), Some(tensor(du, up)?)))
    }
}

/// `log softmax(logits)[target]` per row: logits `[n, vocab]`, targets `[n]` (u32) → `[n]`.
/// The backward (`g · (onehot − softmax)`) recomputes the softmax instead of keeping
/// `[n, vocab]` intermediates.
pub struct TargetLogProb;

fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    max + row.iter().map(|v| (v - max).exp()).sum::<f32>().ln()
}

impl CustomOp2 for TargetLogProb {
    fn name(&self) -> &'static str {
        "target-log-prob"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (x, t) = (
            f32_slice(s1, l1, "target-log-prob")?,
            u32_slice(s2, l2, "target-log-prob targets")?,
        );
        let (n, v) = l1.shape().dims2()?;
        let mut out = vec![0f32; n];
        par_rows(&mut out, 1, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            o[0] = row[t[r] as usize] - log_sum_exp(row);
        });
        Ok((CpuStorage::F32(out), Shape::from(n)))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let x = logits.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
        let (t, g) = (targets.to_vec1::<u32>()?, grad.to_vec1::<f32>()?);
        let v = logits.dim(1)?;
        let mut dx = vec![0f32; x.len()];
        par_rows(&mut dx, v, |r, o| {
            let row = &x[r * v..(r + 1) * v];
            let lse = log_sum_exp(row);
            for j in 0..v {
                o[j] = -g[r] * (row[j] - lse).exp();
            }
            o[t[r] as usize] += g[r];
        });
        Ok((Some(tensor(dx, logits)?), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        super::super::ops::max_abs_diff(a, b).unwrap()
    }

    /// Value and input gradient (through a random linear functional) of a fused op and of
    /// its composed twin agree.
    fn agree(x: &Var, fused: impl Fn(&Tensor) -> Tensor, composed: impl Fn(&Tensor) -> Tensor) {
        let (a, b) = (fused(x.as_tensor()), composed(x.as_tensor()));
        assert!(
            max_diff(&a, &b) < 1e-5,
            "values differ by {}",
            max_diff(&a, &b)
        );
        let probe = Tensor::randn(0f32, 1.0, a.shape(), &Device::Cpu).unwrap();
        let ga = (&a * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gb = (&b * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (ga, gb) = (ga.get(x).unwrap(), gb.get(x).unwrap());
        assert!(
            max_diff(ga, gb) < 1e-4,
            "gradients differ by {}",
            max_diff(ga, gb)
        );
    }

    #[test]
    fn causal_softmax_matches_masked_softmax() {
        let (g, t) = (3, 5);
        let x = Var::from_tensor(&Tensor::randn(0f32, 2.0, (2, g * t, t), &Device::Cpu).unwrap())
            .unwrap();
        let mask: Vec<f32> = (0..g * t * t)
            .map(|i| if i % t > (i / t) % t { -1e9 } else { 0.0 })
            .collect();
        let mask = Tensor::from_vec(mask, (g * t, t), &Device::Cpu).unwrap();
        agree(
            &x,
            |x| x.apply_op1(CausalSoftmax { scale: 0.5 }).unwrap(),
            |x| {
                super::super::ops::softmax_last(&(x * 0.5).unwrap().broadcast_add(&mask).unwrap())
                    .unwrap()
            },
        );
    }

    #[test]
    fn rms_norm_matches_composed_including_weight_gradient() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 1.0, (4, 3, 8), &Device::Cpu).unwrap()).unwrap();
        let w = Var::from_tensor(&Tensor::randn(1f32, 0.2, 8, &Device::Cpu).unwrap()).unwrap();
        agree(
            &x,
            |x| x.apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 }).unwrap(),
            |x| super::super::ops::rms_norm_composed(x, &w, 1e-5).unwrap(),
        );
        let probe = Tensor::randn(0f32, 1.0, (4, 3, 8), &Device::Cpu).unwrap();
        let fused = x.apply_op2(w.as_tensor(), RmsNorm { eps: 1e-5 }).unwrap();
        let ga = (&fused * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let composed = super::super::ops::rms_norm_composed(&x, &w, 1e-5).unwrap();
        let gb = (&composed * &probe)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(max_diff(ga.get(&w).unwrap(), gb.get(&w).unwrap()) < 1e-4);
    }

    #[test]
    fn swiglu_matches_silu_times_up_in_both_inputs() {
        let g = Var::from_tensor(&Tensor::randn(0f32, 2.0, (3, 7), &Device::Cpu).unwrap()).unwrap();
        let u = Var::from_tensor(&Tensor::randn(0f32, 1.0, (3, 7), &Device::Cpu).unwrap()).unwrap();
        agree(&g, |g| g.apply_op2(&u, SwiGlu).unwrap(), |g| (g.silu().unwrap() * u.as_tensor()).unwrap());
        agree(&u, |u| g.apply_op2(u, SwiGlu).unwrap(), |u| (g.silu().unwrap() * u).unwrap());
    }

    #[test]
    fn target_log_prob_matches_log_softmax_gather() {
        let x =
            Var::from_tensor(&Tensor::randn(0f32, 3.0, (6, 11), &Device::Cpu).unwrap()).unwrap();
        let t = Tensor::new(&[0u32, 3, 10, 5, 5, 1], &Device::Cpu).unwrap();
        agree(
            &x,
            |x| x.apply_op2(&t, TargetLogProb).unwrap(),
            |x| {
                super::super::ops::log_softmax_last(x)
                    .unwrap()
                    .gather(&t.unsqueeze(1).unwrap(), 1)
                    .unwrap()
                    .squeeze(1)
                    .unwrap()
            },
        );
        let _ = D::Minus1;
    }
}

//! Attention of one new token per row over the KV cache, the inner loop of decoding.
//!
//! Why not candle's ops: a decoding step of a small model is dozens of tiny tensors per layer,
//! and candle's CPU matmul asks the OS for the core count on every call (it reads
//! `/proc/cpuinfo`), which cost more than the arithmetic. Here each (row, kv head) pair is
//! one work item on candle's thread pool, reading that row's keys and values once for all the
//! query heads they serve (grouped-query attention), with no tensor built in between.

use crate::simd::dot;

/// Shapes of one decoding step's attention.
pub struct Shape {
    pub rows: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// Columns the cache buffers have room for (their third axis).
    pub capacity: usize,
    /// Columns filled, the new token's included (it is the last).
    pub len: usize,
}

/// `out[r, h·hd..(h+1)·hd]` = softmax over columns `pads[r]..len` of `q[r,h]·k[r,g,c] / √hd`,
/// times `v[r,g,c]`, where `g` is the kv head serving query head `h`.
///
/// `q` is `rows × heads × head_dim`; `k` and `v` are the cache buffers, `rows × kv_heads ×
/// capacity × head_dim`; `out` is `rows × heads·head_dim`. Padding columns (before a row's
/// pad) are skipped, as the prefill mask does.
pub fn attend(s: &Shape, q: &[f32], k: &[f32], v: &[f32], pads: &[usize], out: &mut [f32]) {
    let (hd, group) = (s.head_dim, s.heads / s.kv_heads);
    assert_eq!(q.len(), s.rows * s.heads * hd, "queries are not rows × heads × head_dim");
    assert_eq!(out.len(), q.len(), "output is not rows × heads·head_dim");
    assert!(k.len() >= s.rows * s.kv_heads * s.capacity * hd && v.len() == k.len(), "cache buffers too small");
    assert!(s.len <= s.capacity && pads.len() == s.rows && pads.iter().all(|&p| p < s.len), "columns out of range");
    let scale = 1.0 / (hd as f32).sqrt();
    let out_ptr = out.as_mut_ptr() as usize;
    candle_core::utils::barrier_pool().execute_chunked(s.rows * s.kv_heads, |items| {
        let mut scores = vec![0f32; s.len];
        for item in items {
            let (r, g) = (item / s.kv_heads, item % s.kv_heads);
            let base = (r * s.kv_heads + g) * s.capacity * hd;
            let cols = pads[r]..s.len;
            for j in 0..group {
                let h = g * group + j;
                let qh = &q[(r * s.heads + h) * hd..][..hd];
                let mut max = f32::NEG_INFINITY;
                for c in cols.clone() {
                    let score = dot(qh, &k[base + c * hd..][..hd]) * scale;
                    scores[c] = score;
                    max = max.max(score);
                }
                let mut total = 0.0;
                for c in cols.clone() {
                    scores[c] = (scores[c] - max).exp();
                    total += scores[c];
                }
                // SAFETY: query head `h` of row `r` is written only by the item (r, g) that
                // serves it, so no two workers write the same output slice.
                let o = unsafe { std::slice::from_raw_parts_mut((out_ptr as *mut f32).add((r * s.heads + h) * hd), hd) };
                o.fill(0.0);
                for c in cols.clone() {
                    let p = scores[c] / total;
                    for (o, x) in o.iter_mut().zip(&v[base + c * hd..][..hd]) {
                        *o += p * x;
                    }
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against attention written out plainly, with grouped heads, padded rows and a head size
    /// that is not a multiple of 16.
    #[test]
    fn matches_plain_attention() {
        let mut seed = 3u64;
        let mut rnd = || {
            seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for (rows, heads, kv_heads, hd) in [(1, 9, 3, 64), (3, 4, 2, 20), (2, 2, 2, 16)] {
            let (capacity, len) = (11, 7);
            let s = Shape { rows, heads, kv_heads, head_dim: hd, capacity, len };
            let pads: Vec<usize> = (0..rows).map(|r| (r * 2) % len).collect();
            let q: Vec<f32> = (0..rows * heads * hd).map(|_| rnd()).collect();
            let k: Vec<f32> = (0..rows * kv_heads * capacity * hd).map(|_| rnd()).collect();
            let v: Vec<f32> = (0..rows * kv_heads * capacity * hd).map(|_| rnd()).collect();
            let mut out = vec![f32::NAN; q.len()];
            attend(&s, &q, &k, &v, &pads, &mut out);
            for r in 0..rows {
                for h in 0..heads {
                    let g = h / (heads / kv_heads);
                    let at = |buf: &[f32], c: usize, i: usize| buf[((r * kv_heads + g) * capacity + c) * hd + i];
                    let scores: Vec<f32> = (pads[r]..len)
                        .map(|c| (0..hd).map(|i| q[(r * heads + h) * hd + i] * at(&k, c, i)).sum::<f32>() / (hd as f32).sqrt())
                        .collect();
                    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let e: Vec<f32> = scores.iter().map(|x| (x - max).exp()).collect();
                    let total: f32 = e.iter().sum();
                    for i in 0..hd {
                        let want: f32 = (pads[r]..len).zip(&e).map(|(c, w)| w / total * at(&v, c, i)).sum();
                        let got = out[(r * heads + h) * hd + i];
                        assert!((got - want).abs() < 1e-5, "row {r} head {h} [{i}]: {got} vs {want}");
                    }
                }
            }
        }
    }
}

//! Our int8 matrix multiply for decoding and prefill on x86-64 CPUs: weights quantized to 8 bits
//! in blocks of 32 (as GGUF Q8_0, with f32 scales), activations quantized the same way per row,
//! products accumulated with `vpdpbusd` (AVX512-VNNI) or, on CPUs without it, with AVX2's
//! `vpmaddubsw` + `vpmaddwd` on the same layout.
//!
//! Why our own: candle's quantized CPU matmul takes its VNNI path only when the inner
//! dimension is a multiple of 256, which SmolLM2-135M's 576 is not; elsewhere it computes one
//! dot product at a time with a horizontal sum each (docs/benchmarks.md, "Local generation").
//!
//! Layout: the weight rows are cut into tiles of 16 rows; a tile stores, per block of 32 inputs,
//! the 16 rows' bytes interleaved 4 by 4 (`qs[j*64 + row*4 + t]` = input `4j+t` of `row`), so
//! one `vpdpbusd` multiplies 4 inputs of all 16 rows by the same 4 activation bytes and its 16
//! lanes are 16 output columns: no horizontal sums. `vpdpbusd` multiplies unsigned by signed
//! bytes, so weights are stored offset by +128 and each activation block carries
//! `-128 × Σ its bytes` as the accumulator's starting value, which cancels the offset. A work
//! unit is one tile against up to [`ROWS`] activation rows, so a weight byte loaded once serves
//! that many rows (batched decoding and prefill).
//!
//! AVX2 has no `vpdpbusd`; `vpmaddubsw` multiplies unsigned by signed bytes too but adds pairs
//! into saturating 16-bit sums, which 255 × 127 × 2 overflows. So the AVX2 kernel turns the
//! stored bytes back into signed weights (xor 0x80) and multiplies `|w|` by `x · sign(w)`, as
//! llama.cpp does: pairs of at most 127 × 127 × 2 fit. Each 512-bit tile row of bytes is two
//! 256-bit halves of 8 output rows.

use anyhow::{ensure, Result};
#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// Inputs per quantization block.
pub const BLOCK: usize = 32;
/// Weight rows (output columns) per tile: the 16 lanes of a 512-bit register.
const TILE: usize = 16;
/// Activation rows one work unit multiplies by a tile.
const ROWS: usize = 8;

/// The instruction sets the kernel is written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Isa {
    /// AVX512F + AVX512BW + AVX512-VNNI: `vpdpbusd`, 16 outputs per instruction.
    Vnni,
    /// AVX2 + FMA: `vpmaddubsw` + `vpmaddwd`, 8 outputs per instruction pair.
    Avx2,
}

impl Isa {
    /// Whether this CPU runs the kernel for `self`.
    pub fn supported(self) -> bool {
        #[cfg(target_arch = "x86_64")]
        {
            match self {
                Isa::Vnni => {
                    std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bw") && std::is_x86_feature_detected!("avx512vnni")
                }
                Isa::Avx2 => std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            let _ = self;
            false
        }
    }

    /// The fastest this CPU runs, if any (else callers keep candle's kernels).
    pub fn best() -> Option<Isa> {
        [Isa::Vnni, Isa::Avx2].into_iter().find(|isa| isa.supported())
    }
}

/// One block of 32 inputs of a tile's 16 rows.
#[repr(C, align(64))]
#[derive(Clone, Copy)]
struct TileBlock {
    /// Weight bytes + 128, interleaved 4 inputs × 16 rows at a time.
    qs: [u8; BLOCK * TILE],
    /// Each row's scale for this block.
    d: [f32; TILE],
}

/// One block of 32 inputs of an activation row.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct ActBlock {
    qs: [i8; BLOCK],
    d: f32,
    /// `-128 × Σ qs`: cancels the +128 of the weights.
    offset: i32,
}

/// A weight matrix `n × k` (n outputs, k inputs) packed for the kernel.
pub struct PackedQ8 {
    n: usize,
    k: usize,
    isa: Isa,
    /// `[n / 16 rounded up][k / 32]`, tile-major; rows past `n` in the last tile are zero.
    tiles: Vec<TileBlock>,
}

/// Quantizes one block of values to bytes with a shared scale (max |x| maps to 127).
fn quantize_block(x: &[f32]) -> ([i8; BLOCK], f32) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut q = [0i8; BLOCK];
    for (q, &v) in q.iter_mut().zip(x) {
        *q = (v * inv).round().clamp(-127.0, 127.0) as i8;
    }
    (q, d)
}

impl PackedQ8 {
    /// Packs `w`, row-major `n × k`, for `isa`; `k` must be a multiple of 32.
    pub fn from_f32(w: &[f32], n: usize, k: usize, isa: Isa) -> Result<Self> {
        ensure!(isa.supported(), "this CPU lacks the instructions of the {isa:?} int8 kernel");
        ensure!(k % BLOCK == 0 && k > 0, "inner dimension {k} is not a multiple of {BLOCK}");
        ensure!(w.len() == n * k, "weights hold {} values, not {n} × {k}", w.len());
        let kb = k / BLOCK;
        let empty = TileBlock { qs: [128; BLOCK * TILE], d: [0.0; TILE] };
        let mut tiles = vec![empty; n.div_ceil(TILE) * kb];
        for row in 0..n {
            let (tile, lane) = (row / TILE, row % TILE);
            for b in 0..kb {
                let (q, d) = quantize_block(&w[row * k + b * BLOCK..][..BLOCK]);
                let block = &mut tiles[tile * kb + b];
                block.d[lane] = d;
                for (i, &v) in q.iter().enumerate() {
                    block.qs[(i / 4) * 64 + lane * 4 + i % 4] = (v as i16 + 128) as u8;
                }
            }
        }
        Ok(Self { n, k, isa, tiles })
    }

    pub fn rows(&self) -> usize {
        self.n
    }

    pub fn bytes(&self) -> usize {
        self.tiles.len() * std::mem::size_of::<TileBlock>()
    }

    /// `out (m × n) = x (m × k) · Wᵀ`, on candle's CPU thread pool.
    pub fn matmul(&self, x: &[f32], m: usize, out: &mut [f32]) {
        assert_eq!(x.len(), m * self.k, "activations are not m × k");
        assert_eq!(out.len(), m * self.n, "output is not m × n");
        let kb = self.k / BLOCK;
        let acts = quantize_rows(x, m, self.k);
        let tiles = self.n.div_ceil(TILE);
        let groups = m.div_ceil(ROWS);
        let out_ptr = out.as_mut_ptr() as usize;
        let pool = candle_core::utils::barrier_pool();
        // Tile-major: a worker's consecutive items reuse one tile's weights (in L1) across row
        // groups, so prefill reads the weights from memory once, not once per 8 rows.
        pool.execute_chunked(groups * tiles, |items| {
            for item in items {
                let (t, g) = (item / groups, item % groups);
                let r0 = g * ROWS;
                let rows = ROWS.min(m - r0);
                let cols = TILE.min(self.n - t * TILE);
                // SAFETY: the kernel reads `rows` activation rows of `kb` blocks from `r0` and
                // writes columns `t*16 .. t*16+cols` of those rows of `out`; every (row, tile)
                // is one work item, so no two workers write the same element.
                unsafe {
                    let a = acts.as_ptr().add(r0 * kb);
                    let o = (out_ptr as *mut f32).add(r0 * self.n + t * TILE);
                    unit(self.isa, rows, &self.tiles[t * kb..(t + 1) * kb], a, kb, o, self.n, cols);
                }
            }
        });
    }
}

/// Quantizes `m` rows of `k` activations into blocks (on the pool when there are many rows).
fn quantize_rows(x: &[f32], m: usize, k: usize) -> Vec<ActBlock> {
    let kb = k / BLOCK;
    let mut acts = vec![ActBlock::default(); m * kb];
    let fill = |blocks: &mut [ActBlock], first: usize| {
        for (i, a) in blocks.iter_mut().enumerate() {
            let (q, d) = quantize_block(&x[(first + i) * BLOCK..][..BLOCK]);
            let sum: i32 = q.iter().map(|&v| v as i32).sum();
            *a = ActBlock { qs: q, d, offset: -128 * sum };
        }
    };
    if m <= ROWS {
        fill(&mut acts, 0);
    } else {
        let ptr = acts.as_mut_ptr() as usize;
        candle_core::utils::barrier_pool().execute_chunked(m, |rows| {
            // SAFETY: each row's blocks are written by the one worker given that row.
            let blocks = unsafe { std::slice::from_raw_parts_mut((ptr as *mut ActBlock).add(rows.start * kb), rows.len() * kb) };
            fill(blocks, rows.start * kb);
        });
    }
    acts
}

/// Dispatches to the kernel for `isa` compiled for this many rows (registers are sized at
/// compile time).
///
/// # Safety
/// `acts` points at `rows × kb` blocks, `out` at the first column of `rows` rows `stride` apart
/// with `cols` writable columns each; the CPU supports `isa` (checked when packing).
#[allow(clippy::too_many_arguments)]
unsafe fn unit(isa: Isa, rows: usize, tile: &[TileBlock], acts: *const ActBlock, kb: usize, out: *mut f32, stride: usize, cols: usize) {
    #[cfg(target_arch = "x86_64")]
    unsafe {
        macro_rules! by_rows {
            ($kernel:ident) => {
                match rows {
                    1 => $kernel::<1>(tile, acts, kb, out, stride, cols),
                    2 => $kernel::<2>(tile, acts, kb, out, stride, cols),
                    3 => $kernel::<3>(tile, acts, kb, out, stride, cols),
                    4 => $kernel::<4>(tile, acts, kb, out, stride, cols),
                    5 => $kernel::<5>(tile, acts, kb, out, stride, cols),
                    6 => $kernel::<6>(tile, acts, kb, out, stride, cols),
                    7 => $kernel::<7>(tile, acts, kb, out, stride, cols),
                    _ => $kernel::<8>(tile, acts, kb, out, stride, cols),
                }
            };
        }
        match isa {
            Isa::Vnni => by_rows!(kernel),
            Isa::Avx2 => by_rows!(kernel_avx2),
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("{isa:?} {rows} {tile:p} {acts:p} {kb} {out:p} {stride} {cols}", tile = tile.as_ptr())
}

/// `R` activation rows times one tile. Each block's 8 `vpdpbusd` per row go to two accumulators
/// (even and odd input quads), so a row's chain is 4 long, not 8, and one row alone (decoding a
/// single stream) still keeps the unit busy.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vnni")]
unsafe fn kernel<const R: usize>(tile: &[TileBlock], acts: *const ActBlock, kb: usize, out: *mut f32, stride: usize, cols: usize) {
    unsafe {
        let mut acc = [_mm512_setzero_ps(); R];
        for (b, tb) in tile.iter().enumerate() {
            let mut even = [_mm512_setzero_si512(); R];
            let mut odd = [_mm512_setzero_si512(); R];
            for r in 0..R {
                even[r] = _mm512_set1_epi32((*acts.add(r * kb + b)).offset);
            }
            for j in 0..BLOCK / 4 {
                let w = _mm512_load_si512(tb.qs.as_ptr().add(j * 64) as *const __m512i);
                for r in 0..R {
                    let a = &*acts.add(r * kb + b);
                    let quad = _mm512_set1_epi32(std::ptr::read_unaligned(a.qs.as_ptr().add(j * 4) as *const i32));
                    if j % 2 == 0 {
                        even[r] = _mm512_dpbusd_epi32(even[r], w, quad);
                    } else {
                        odd[r] = _mm512_dpbusd_epi32(odd[r], w, quad);
                    }
                }
            }
            let d = _mm512_load_ps(tb.d.as_ptr());
            for r in 0..R {
                let sum = _mm512_cvtepi32_ps(_mm512_add_epi32(even[r], odd[r]));
                let scale = _mm512_mul_ps(d, _mm512_set1_ps((*acts.add(r * kb + b)).d));
                acc[r] = _mm512_fmadd_ps(sum, scale, acc[r]);
            }
        }
        let mask: __mmask16 = if cols >= TILE { 0xffff } else { (1u16 << cols) - 1 };
        for (r, acc) in acc.iter().enumerate() {
            _mm512_mask_storeu_ps(out.add(r * stride), mask, *acc);
        }
    }
}

/// The AVX2 twin of [`kernel`]: each tile is two halves of 8 output rows; per 4 inputs,
/// `|w|` (unsigned) times `x · sign(w)` (signed) in 16-bit pairs, then pairs summed into 32 bits.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn kernel_avx2<const R: usize>(tile: &[TileBlock], acts: *const ActBlock, kb: usize, out: *mut f32, stride: usize, cols: usize) {
    unsafe {
        let ones = _mm256_set1_epi16(1);
        let flip = _mm256_set1_epi8(-128);
        for half in 0..2 {
            let live = cols.saturating_sub(half * 8).min(8);
            if live == 0 {
                break;
            }
            let mut acc = [_mm256_setzero_ps(); R];
            for (b, tb) in tile.iter().enumerate() {
                let mut sum = [_mm256_setzero_si256(); R];
                for j in 0..BLOCK / 4 {
                    let w = _mm256_xor_si256(_mm256_load_si256(tb.qs.as_ptr().add(j * 64 + half * 32) as *const __m256i), flip);
                    let abs_w = _mm256_sign_epi8(w, w);
                    for r in 0..R {
                        let a = &*acts.add(r * kb + b);
                        let quad = _mm256_set1_epi32(std::ptr::read_unaligned(a.qs.as_ptr().add(j * 4) as *const i32));
                        let pairs = _mm256_maddubs_epi16(abs_w, _mm256_sign_epi8(quad, w));
                        sum[r] = _mm256_add_epi32(sum[r], _mm256_madd_epi16(pairs, ones));
                    }
                }
                let d = _mm256_load_ps(tb.d.as_ptr().add(half * 8));
                for r in 0..R {
                    let scale = _mm256_mul_ps(d, _mm256_set1_ps((*acts.add(r * kb + b)).d));
                    acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum[r]), scale, acc[r]);
                }
            }
            for (r, acc) in acc.iter().enumerate() {
                let mut lanes = [0f32; 8];
                _mm256_storeu_ps(lanes.as_mut_ptr(), *acc);
                std::ptr::copy_nonoverlapping(lanes.as_ptr(), out.add(r * stride + half * 8), live);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// The kernel against the same products computed plainly from the quantized values (exact
    /// but for f32 rounding: catches layout, offset and mask mistakes) and against f32 products
    /// (within what 8-bit quantization of both sides allows), for every row count a unit
    /// handles, several units of rows, a partial last tile and an all-zero row (scale 0).
    #[test]
    fn matches_plain_products() {
        let isas: Vec<Isa> = [Isa::Vnni, Isa::Avx2].into_iter().filter(|i| i.supported()).collect();
        assert!(!isas.is_empty() || Isa::best().is_none());
        for isa in isas {
            plain_products(isa);
        }
    }

    fn plain_products(isa: Isa) {
        let mut seed = 7;
        for (m, n, k) in [(1, 16, 32), (3, 40, 96), (8, 576, 576), (13, 200, 1536), (37, 33, 64), (2, 45, 64)] {
            let w: Vec<f32> = (0..n * k).map(|_| lcg(&mut seed)).collect();
            let mut x: Vec<f32> = (0..m * k).map(|_| lcg(&mut seed) * 3.0).collect();
            x[..k].iter_mut().for_each(|v| *v = 0.0);
            let packed = PackedQ8::from_f32(&w, n, k, isa).unwrap();
            let mut out = vec![f32::NAN; m * n];
            packed.matmul(&x, m, &mut out);
            let blocks = |v: &[f32]| v.chunks(BLOCK).map(quantize_block).collect::<Vec<_>>();
            for r in 0..m {
                let xq = blocks(&x[r * k..][..k]);
                for c in 0..n {
                    let wq = blocks(&w[c * k..][..k]);
                    let plain: f32 = xq
                        .iter()
                        .zip(&wq)
                        .map(|((qa, da), (qb, db))| da * db * qa.iter().zip(qb).map(|(&a, &b)| a as i32 * b as i32).sum::<i32>() as f32)
                        .sum();
                    let exact: f32 = (0..k).map(|i| x[r * k + i] * w[c * k + i]).sum();
                    let got = out[r * n + c];
                    assert!((got - plain).abs() <= 1e-4 * (1.0 + plain.abs()), "{isa:?} m={m} n={n} k={k} [{r},{c}]: {got} vs {plain}");
                    assert!((got - exact).abs() <= 0.05 * (k as f32).sqrt(), "m={m} n={n} k={k} [{r},{c}]: {got} vs f32 {exact}");
                }
            }
            assert!(out[..n].iter().all(|&v| v == 0.0), "a zero row gives zeros");
        }
    }

    #[test]
    fn refuses_a_bad_shape() {
        let Some(isa) = Isa::best() else { return };
        let err = PackedQ8::from_f32(&[0.0; 40], 1, 40, isa).err().unwrap().to_string();
        assert!(err.contains("40 is not a multiple of 32"), "{err}");
    }
}

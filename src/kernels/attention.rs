//! Scaled dot-product attention on the CPU without materialising the full score matrix:
//! rows of queries are processed in blocks, each block's scores (block × keys) live in a
//! per-thread buffer, are soft-maxed in place and multiplied by V with `gemm`. Blocks are spread
//! over the rayon pool, so at 512² (4096 tokens) the extra memory is a few MB instead of
//! 16 × 4096 × 4096 floats.
use super::simd::{exp_pairs, exp_row, pair_adjacent, softmax_row};
#[cfg(target_arch = "x86_64")]
use super::tiled::x86::F32Fma;
use super::tiled::{self, Dims};
use super::{amx, bf16, f32_slice, SendPtr};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Sdpa {
    scale: f32,
    /// Products on AMX bf16 tiles (a bf16 model on a CPU that has them).
    amx: bool,
}

/// Query rows per task: enough to make the two GEMMs efficient, small enough that the score
/// block stays in L2.
fn query_block(lk: usize) -> usize {
    (512 * 1024 / (lk.max(1) * 4)).clamp(32, 256)
}

/// `softmax(q kᵀ · scale) v` for f32 (batch, len, dim) tensors; other dtypes/devices use candle
/// ops (materialising the scores).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, scale, false)
}

/// [`attention`] for a bf16 model: where AMX runs, both products take bf16 operands (Q, K, V
/// and the softmax weights rounded to bf16, f32 accumulation and softmax), as torch's bf16
/// attention does; elsewhere the f32 path.
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(
        q,
        k,
        v,
        scale,
        super::bf16::kernel() == super::bf16::Kernel::Amx,
    )
}

fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, amx: bool) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == candle_core::DType::F32 {
        let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
        return q.apply_op3_no_bwd(
            &k,
            &v,
            &Sdpa {
                scale: scale as f32,
                amx,
            },
        );
    }
    reference(q, k, v, scale)
}

/// The plain candle version (also the test oracle).
pub fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let in_dtype = q.dtype();
    let q = q.to_dtype(candle_core::DType::F32)?;
    let k = k.to_dtype(candle_core::DType::F32)?;
    let v = v.to_dtype(candle_core::DType::F32)?;
    let xs = q.matmul(&(k.t()? * scale)?)?;
    let xs = candle_nn::ops::softmax_last_dim(&xs)?;
    xs.matmul(&v)?.to_dtype(in_dtype)
}

/// A row stride of at least `n` floats that is not a multiple of 1 KiB (L1 set aliasing).
fn padded(n: usize) -> usize {
    if n >= 256 && n.is_multiple_of(256) {
        n + 16
    } else {
        n
    }
}

impl Sdpa {
    /// The AVX-512 path: both products run on [`tiled`]'s f32 tile, reading `Kᵀ` and `V` in
    /// place. gemm packed the whole of K and V again for every block of 32 queries (with a head
    /// dimension of 40 that packing outweighed the arithmetic: 67 GFLOP/s at 16×4096²×40).
    fn tiled(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, lq, lk, d, dv): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        // Rows of Kᵀ and of the score block are `ld` apart, not `lk`: with 4096 keys the tiles
        // stepped 16 KiB between rows, so every row they touched fell in the same L1 set.
        let ld = padded(lk);
        // Kᵀ per batch·head, built once: the score tile reads 48 keys of one dimension at a time.
        let mut kt = vec![0f32; b * d * ld];
        kt.par_chunks_mut(d * ld).enumerate().for_each(|(bi, dst)| {
            let kb = &k[bi * lk * d..(bi + 1) * lk * d];
            for (j, row) in kb.chunks_exact(d).enumerate() {
                for (c, &x) in row.iter().enumerate() {
                    dst[c * ld + j] = x;
                }
            }
        });
        // Query rows per task: the score block (≤ 1 MiB) stays in L2.
        let qb = ((1 << 20) / (lk.max(1) * 4)).clamp(8, 256) / 8 * 8;
        let nblk = lq.div_ceil(qb);
        let mut out = vec![0f32; b * lq * dv];
        let dst = SendPtr(out.as_mut_ptr());
        (0..b * nblk).into_par_iter().for_each_init(
            || vec![0f32; qb * ld],
            |scores, task| {
                let (bi, blk) = (task / nblk, task % nblk);
                let r0 = blk * qb;
                let rows = qb.min(lq - r0);
                let dst = &dst;
                let s_dims = Dims {
                    m: rows,
                    n: lk,
                    k: d,
                    lda: d,
                    ldb: ld,
                    ldc: ld,
                };
                let o_dims = Dims {
                    m: rows,
                    n: dv,
                    k: lk,
                    lda: ld,
                    ldb: dv,
                    ldc: dv,
                };
                // SAFETY: Q rows r0..r0+rows of head bi, Kᵀ (d × lk) and V (lk × dv) of head
                // bi, the score buffer (≥ rows × lk) and this task's own rows of `out`.
                unsafe {
                    let qp = q.as_ptr().add((bi * lq + r0) * d);
                    let ktp = kt.as_ptr().add(bi * d * ld);
                    tiled::gemm_on::<F32Fma>(
                        s_dims,
                        &[(0, 0)],
                        qp,
                        ktp,
                        scores.as_mut_ptr(),
                        false,
                        true,
                    );
                    let sums: Vec<f32> = scores[..rows * ld]
                        .chunks_exact_mut(ld)
                        .map(|row| exp_row(&mut row[..lk], self.scale))
                        .collect();
                    let vp = v.as_ptr().add(bi * lk * dv);
                    let op = dst.0.add((bi * lq + r0) * dv);
                    tiled::gemm_on::<F32Fma>(
                        o_dims,
                        &[(0, 0)],
                        scores.as_ptr(),
                        vp,
                        op,
                        false,
                        true,
                    );
                    // The softmax's division, on the output rows.
                    let o = std::slice::from_raw_parts_mut(op, rows * dv);
                    for (row, s) in o.chunks_exact_mut(dv).zip(sums) {
                        let inv = 1.0 / s;
                        row.iter_mut().for_each(|x| *x *= inv);
                    }
                }
            },
        );
        out
    }
}

#[cfg(target_arch = "x86_64")]
impl Sdpa {
    /// Both products on AMX tiles ([`amx`]), which need whole 32 × 32 blocks and 16-pair steps:
    /// the head dimension (40, 80, 160 in SD) is zero-padded to a multiple of 32 and the keys to
    /// a multiple of 32 (padding keys get weight 0, not exp(0)). Kᵀ and V are paired once per
    /// head; each task pairs its queries and its softmax weights.
    fn amx(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, lq, lk, d, dv): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        let dp = d.div_ceil(2).next_multiple_of(amx::KSTEP);
        let lkp = lk.next_multiple_of(amx::BLOCK);
        let dvp = dv.next_multiple_of(amx::BLOCK);
        let kp = lkp / 2;
        // Kᵀ as pairs along the head dimension: dp rows × lkp keys.
        let mut kt = vec![0u32; b * dp * lkp];
        kt.par_chunks_mut(dp * lkp)
            .enumerate()
            .for_each(|(bi, dst)| {
                let kb = &k[bi * lk * d..(bi + 1) * lk * d];
                for (j, row) in kb.chunks_exact(d).enumerate() {
                    for p in 0..d.div_ceil(2) {
                        let hi = if 2 * p + 1 < d { row[2 * p + 1] } else { 0.0 };
                        dst[p * lkp + j] = bf16::pair(row[2 * p], hi);
                    }
                }
            });
        // V as pairs along the keys: kp rows × dvp columns.
        let mut vt = vec![0u32; b * kp * dvp];
        vt.par_chunks_mut(kp * dvp)
            .enumerate()
            .for_each(|(bi, dst)| {
                let vb = &v[bi * lk * dv..(bi + 1) * lk * dv];
                for p in 0..lk.div_ceil(2) {
                    let lo = &vb[2 * p * dv..(2 * p + 1) * dv];
                    let hi = (2 * p + 1 < lk).then(|| &vb[(2 * p + 1) * dv..(2 * p + 2) * dv]);
                    bf16::pair_rows(lo, hi, &mut dst[p * dvp..p * dvp + dv]);
                }
            });
        // Query rows per task, a multiple of 32: the score block (≤ 1 MiB) stays in L2.
        // (No more than the queries need: the UNet's 8² level has 64.)
        let qb = ((1 << 20) / (lkp * 4)).clamp(32, 256) / amx::BLOCK * amx::BLOCK;
        let qb = qb.min(lq.next_multiple_of(amx::BLOCK));
        let nblk = lq.div_ceil(qb);
        let mut out = vec![0f32; b * lq * dv];
        let dst = SendPtr(out.as_mut_ptr());
        (0..b * nblk).into_par_iter().for_each_init(
            || {
                (
                    vec![0u32; qb * dp],
                    vec![0f32; qb * lkp],
                    vec![0u32; qb * kp],
                    vec![0f32; qb * dvp],
                )
            },
            |(qp, scores, pp, o), task| {
                let (bi, blk) = (task / nblk, task % nblk);
                let r0 = blk * qb;
                let rows = qb.min(lq - r0);
                for (r, dst) in qp.chunks_exact_mut(dp).enumerate() {
                    if r < rows {
                        let src = &q[(bi * lq + r0 + r) * d..][..d];
                        pair_adjacent(src, dst);
                    } else {
                        dst.fill(0);
                    }
                }
                let s_dims = Dims {
                    m: qb,
                    n: lkp,
                    k: dp,
                    lda: dp,
                    ldb: lkp,
                    ldc: lkp,
                };
                let o_dims = Dims {
                    m: qb,
                    n: dvp,
                    k: kp,
                    lda: kp,
                    ldb: dvp,
                    ldc: dvp,
                };
                // SAFETY: AMX runs (`self.amx`); Q pairs qb × dp, Kᵀ pairs dp × lkp of head
                // bi, scores qb × lkp, P pairs qb × kp, V pairs kp × dvp of head bi, the
                // output block qb × dvp: every extent is a whole number of blocks/steps.
                unsafe {
                    let ktp = kt.as_ptr().add(bi * dp * lkp);
                    amx::gemm_on(
                        s_dims,
                        &[(0, 0)],
                        qp.as_ptr(),
                        ktp,
                        scores.as_mut_ptr(),
                        false,
                        true,
                    );
                }
                let mut sums = [0f32; 256];
                for (r, (row, pr)) in scores
                    .chunks_exact(lkp)
                    .zip(pp.chunks_exact_mut(kp))
                    .enumerate()
                    .take(rows)
                {
                    sums[r] = exp_pairs(&row[..lk], self.scale, pr);
                }
                unsafe {
                    let vp = vt.as_ptr().add(bi * kp * dvp);
                    amx::gemm_on(
                        o_dims,
                        &[(0, 0)],
                        pp.as_ptr(),
                        vp,
                        o.as_mut_ptr(),
                        false,
                        true,
                    );
                    let dst = &dst;
                    for (r, row) in o.chunks_exact(dvp).take(rows).enumerate() {
                        let inv = 1.0 / sums[r];
                        let out =
                            std::slice::from_raw_parts_mut(dst.0.add((bi * lq + r0 + r) * dv), dv);
                        for (x, &y) in out.iter_mut().zip(&row[..dv]) {
                            *x = y * inv;
                        }
                    }
                }
            },
        );
        out
    }
}

impl CustomOp3 for Sdpa {
    fn name(&self) -> &'static str {
        "easel-sdpa"
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
        let (b, lq, d) = l1.shape().dims3()?;
        let (b2, lk, d2) = l2.shape().dims3()?;
        let (b3, lk3, dv) = l3.shape().dims3()?;
        if b2 != b || b3 != b || d2 != d || lk3 != lk {
            candle_core::bail!(
                "sdpa: shape mismatch {:?} {:?} {:?}",
                l1.shape(),
                l2.shape(),
                l3.shape()
            );
        }
        let (q, k, v) = (
            f32_slice(s1, l1, "sdpa")?,
            f32_slice(s2, l2, "sdpa")?,
            f32_slice(s3, l3, "sdpa")?,
        );
        #[cfg(target_arch = "x86_64")]
        if self.amx {
            let out = self.amx(q, k, v, (b, lq, lk, d, dv));
            return Ok((CpuStorage::F32(out), Shape::from((b, lq, dv))));
        }
        if tiled::f32_native() {
            let out = self.tiled(q, k, v, (b, lq, lk, d, dv));
            return Ok((CpuStorage::F32(out), Shape::from((b, lq, dv))));
        }
        let mut out = vec![0f32; b * lq * dv];
        let qb = query_block(lk);
        let nblk = lq.div_ceil(qb);
        let dst = SendPtr(out.as_mut_ptr());
        let scale = self.scale;
        (0..b * nblk).into_par_iter().for_each_init(
            || vec![0f32; qb * lk],
            |scores, task| {
                let (bi, blk) = (task / nblk, task % nblk);
                let r0 = blk * qb;
                let rows = qb.min(lq - r0);
                let qp = q[(bi * lq + r0) * d..].as_ptr();
                let kp = k[bi * lk * d..].as_ptr();
                let vp = v[bi * lk * dv..].as_ptr();
                let dst = &dst;
                // SAFETY: every pointer/stride pair addresses memory inside the slices above;
                // each task writes a disjoint block of rows of `out`.
                unsafe {
                    super::matmul(
                        rows,
                        lk,
                        d,
                        scores.as_mut_ptr(),
                        lk,
                        false,
                        qp,
                        (d as isize, 1),
                        kp,
                        (1, d as isize),
                        false,
                    );
                    for r in 0..rows {
                        softmax_row(&mut scores[r * lk..(r + 1) * lk], scale);
                    }
                    super::matmul(
                        rows,
                        dv,
                        lk,
                        dst.0.add((bi * lq + r0) * dv),
                        dv,
                        false,
                        scores.as_ptr(),
                        (lk as isize, 1),
                        vp,
                        (dv as isize, 1),
                        false,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, lq, dv))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    type Shape5 = (usize, usize, usize, usize, usize);

    /// Max abs error against candle's attention for each (batch, queries, keys, dim, dim_v) on
    /// random N(0, 1) inputs, `f` being the attention under test.
    fn errors(
        shapes: &[Shape5],
        f: fn(&Tensor, &Tensor, &Tensor, f64) -> Result<Tensor>,
    ) -> Result<Vec<(Shape5, f32)>> {
        let dev = Device::Cpu;
        let mut out = vec![];
        for &(b, lq, lk, d, dv) in shapes {
            let q = Tensor::randn(0f32, 1.0, (b, lq, d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, lk, d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, lk, dv), &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let err = crate::kernels::max_abs_diff(
                &f(&q, &k, &v, scale)?,
                &reference(&q, &k, &v, scale)?,
            )?;
            out.push(((b, lq, lk, d, dv), err));
        }
        Ok(out)
    }

    /// The AMX path (bf16 operands) against the f32 reference: the error is bf16 rounding of
    /// Q, K, V and the weights (≈ 2⁻⁹ relative), not a wrong sum; the head dimensions and key
    /// counts leave every kind of padding (40 → 64, 77 → 96 keys, odd sizes).
    #[test]
    fn amx_matches_candle_within_bf16_rounding() -> Result<()> {
        if bf16::kernel() != bf16::Kernel::Amx {
            eprintln!("note: no AMX on this CPU; the AMX attention is not exercised here");
            return Ok(());
        }
        let shapes = [
            (1, 1, 1, 1, 1),
            (3, 37, 77, 40, 40),
            (2, 300, 300, 17, 9),
            (2, 256, 1024, 80, 80),
            (1, 70, 64, 160, 160),
        ];
        for (shape, err) in errors(&shapes, attention_bf16)? {
            // Outputs are weighted means of N(0, 1) values: |y| ≲ 3; bf16 keeps 8 bits.
            assert!(err < 3e-2, "{shape:?}: {err}");
            // And it is not the f32 path by accident: bf16 rounding shows.
            if shape.2 > 1 {
                assert!(err > 1e-5, "{shape:?}: {err} (f32 path?)");
            }
        }
        Ok(())
    }

    #[test]
    fn matches_candle_on_odd_shapes() -> Result<()> {
        let shapes = [
            (1, 1, 1, 1, 1),
            (3, 37, 77, 40, 40),
            (2, 300, 300, 17, 9),
            (5, 129, 1000, 64, 64),
            // Key counts a multiple of 256: rows of Kᵀ and the scores are padded.
            (2, 70, 512, 40, 40),
        ];
        for (shape, err) in errors(&shapes, attention)? {
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
        Ok(())
    }
}

//! Scaled dot-product attention on the CPU without materialising the full score matrix:
//! rows of queries are processed in blocks, each block's scores (block × keys) live in a
//! per-thread buffer, are soft-maxed in place and multiplied by V with `gemm`. Blocks are spread
//! over the rayon pool, so at 512² (4096 tokens) the extra memory is a few MB instead of
//! 16 × 4096 × 4096 floats.
use super::simd::{pair_adjacent, softmax_row};
#[cfg(target_arch = "x86_64")]
use super::tiled::x86::F32Fma;
use super::tiled::{self, Dims};
use super::{amx, bf16, f32_slice, SendPtr};
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

struct Sdpa {
    scale: f32,
    products: Products,
    /// Heads side by side in the last dimension (`(batch, len, heads·d)`, the projections'
    /// own layout; the tile paths only); 1 for `(batch·heads, len, d)`.
    heads: usize,
}

/// What multiplies the attention's two products.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Products {
    /// f32 (the f32 model, and CPUs without a bf16 kernel).
    F32,
    /// AMX bf16 tiles (a bf16 model on a CPU that has them).
    Amx,
    /// `vdpbf16ps` (a bf16 model whose products take the [`bf16::Path::Dot`] path on that
    /// kernel: Zen 4 runs it at twice the f32 FMA's flop rate; not where `widen` is chosen).
    Dot,
}

/// The products of a bf16 model's attention on this CPU.
fn bf16_products() -> Products {
    if amx_attention() {
        Products::Amx
    } else if bf16::path() == bf16::Path::Dot
        && bf16::kernel() == bf16::Kernel::Dot
        && tiled::f32_native()
    {
        Products::Dot
    } else {
        Products::F32
    }
}

/// Query rows per task: enough to make the two GEMMs efficient, small enough that the score
/// block stays in L2.
fn query_block(lk: usize) -> usize {
    (512 * 1024 / (lk.max(1) * 4)).clamp(32, 256)
}

/// `softmax(q kᵀ · scale) v` for f32 (batch, len, dim) tensors; other dtypes/devices use candle
/// ops (materialising the scores).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, scale, Products::F32)
}

/// [`attention`] for a bf16 model: on AMX or `vdpbf16ps` ([`bf16_products`]) both products
/// take bf16 operands (Q, K, V and the softmax weights rounded to bf16, f32 accumulation and
/// softmax), as torch's bf16 attention does; elsewhere the f32 path.
pub fn attention_bf16(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with(q, k, v, scale, bf16_products())
}

/// [`attention_bf16`] on the projections' own layout: `q` (batch, queries, heads·d), `k` and
/// `v` (batch, keys, heads·d and heads·dv) → (batch, queries, heads·dv). On AMX, and wherever
/// the AVX-512 tiles run, the kernel reads and writes that layout in place (splitting and
/// merging the heads were four strided copies of every activation per attention); elsewhere the
/// heads are split for [`attention_bf16`] and merged after.
pub fn attention_bf16_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    heads_with(q, k, v, heads, scale, true)
}

/// [`attention`] on the projections' own layout (as [`attention_bf16_heads`]): in place where
/// the f32 tile kernel runs (AVX-512), which saves the f32 UNet four copies of 10 MB per
/// attention at 64²; elsewhere split and merged around [`attention`].
pub fn attention_heads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
) -> Result<Tensor> {
    heads_with(q, k, v, heads, scale, false)
}

fn heads_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    heads: usize,
    scale: f64,
    bf16: bool,
) -> Result<Tensor> {
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    let products = if bf16 { bf16_products() } else { Products::F32 };
    let in_place = products == Products::Amx || tiled::f32_native();
    let (_, _, dq) = q.dims3()?;
    let (_, _, dvv) = v.dims3()?;
    if in_place
        && f32_cpu(q)
        && f32_cpu(k)
        && f32_cpu(v)
        && dq.is_multiple_of(heads)
        && dvv.is_multiple_of(heads)
    {
        return sdpa(q, k, v, scale, products, heads);
    }
    let split = |x: &Tensor| -> Result<Tensor> {
        let (b, l, hd) = x.dims3()?;
        x.reshape((b, l, heads, hd / heads))?
            .transpose(1, 2)?
            .reshape((b * heads, l, hd / heads))
    };
    let (q, k, v) = (split(q)?, split(k)?, split(v)?);
    let xs = if bf16 {
        attention_bf16(&q, &k, &v, scale)?
    } else {
        attention(&q, &k, &v, scale)?
    };
    let (bh, l, dv) = xs.dims3()?;
    xs.reshape((bh / heads, heads, l, dv))?
        .transpose(1, 2)?
        .reshape((bh / heads, l, heads * dv))
}

/// Whether the bf16 attention runs on AMX: the bf16 kernel is AMX, and the CPU has the
/// AVX-512 BF16 conversions its softmax uses (every AMX-BF16 CPU so far does).
fn amx_attention() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        super::bf16::kernel() == super::bf16::Kernel::Amx
            && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    false
}

fn attention_with(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    products: Products,
) -> Result<Tensor> {
    if q.device().is_cpu() && q.dtype() == candle_core::DType::F32 {
        return sdpa(q, k, v, scale, products, 1);
    }
    reference(q, k, v, scale)
}

/// Easel's kernel on f32 CPU tensors (made contiguous).
fn sdpa(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    products: Products,
    heads: usize,
) -> Result<Tensor> {
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let op = Sdpa {
        scale: scale as f32,
        products,
        heads,
    };
    q.apply_op3_no_bwd(&k, &v, &op)
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

/// Queries per task of the transposed attentions, in whole tiles of 48 lanes: the Sᵀ block
/// (≤ 1 MiB) stays in L2.
fn lane_block(lk: usize) -> usize {
    let w = tiled::NR;
    ((1 << 20) / (lk.max(1) * 4) / w * w).clamp(w, 10 * w)
}

impl Sdpa {
    /// Oᵀ (`dv` rows of `qb` query lanes) back to query rows `r0..` of head `bi` in `dst`, with
    /// the softmax's division by each query's sum.
    ///
    /// # Safety
    /// Those output rows lie inside `dst`'s buffer and are the caller's alone.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store_rows(
        &self,
        dst: &SendPtr<f32>,
        ot: &[f32],
        sums: &[f32],
        (bi, lq, r0, dv, qb): (usize, usize, usize, usize, usize),
    ) {
        for (r, &s) in sums.iter().enumerate() {
            // SAFETY: the caller's promise.
            let o = unsafe {
                std::slice::from_raw_parts_mut(dst.0.add(self.row(bi, lq, r0 + r, dv)), dv)
            };
            let inv = 1.0 / s;
            for (c, x) in o.iter_mut().enumerate() {
                *x = ot[c * qb + r] * inv;
            }
        }
    }
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
    /// Where row `r` of head `bi` starts in a (batch, len, heads·w) buffer (heads side by
    /// side; `(batch·heads, len, w)` with one head). Its rows lie `heads·w` apart.
    #[inline(always)]
    fn row(&self, bi: usize, len: usize, r: usize, w: usize) -> usize {
        let h = self.heads;
        ((bi / h) * len + r) * h * w + (bi % h) * w
    }

    /// The AVX-512 path: both products on [`tiled`]'s f32 tile, transposed so that the
    /// queries run along the vector lanes: `Sᵀ = K·Qᵀ` (keys × queries), a softmax down each
    /// column, `Oᵀ = Vᵀ·Sᵀ` (head dims × queries). The earlier row-major form (`S = Q·Kᵀ`,
    /// `O = S·V`) read `Kᵀ` 16 KiB a row apart at every step of the score product and filled
    /// only 40 of its tile's 48 lanes in `S·V`; at 16×4096²×40 its products ran at ~55% of
    /// the FMA rate. Here `Qᵀ` (40 × 48) sits in L1, K is read in place row after row, `Sᵀ`
    /// and `Vᵀ` stream, every lane is a query, and the softmax's max and sum are vertical
    /// (no reduction across lanes). (gemm, before either, packed the whole of K and V again
    /// for every block of queries: 67 GFLOP/s at 16×4096²×40.)
    #[cfg(target_arch = "x86_64")]
    fn tiled(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, lq, lk, d, dv): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        let (h, row) = (self.heads, |bi, len, r, w| self.row(bi, len, r, w));
        // Rows of Vᵀ are `ld` apart, not `lk`: 4096 keys would put the 8 rows a tile reads at
        // each step in one L1 set.
        let ld = padded(lk);
        // Vᵀ per batch·head, built once; each head's block zeroed (its padding) in cache.
        let vt = super::par_filled(b * dv * ld, dv * ld, |bi, dst: &mut [f32]| {
            for j in 0..lk {
                for (c, &x) in v[row(bi, lk, j, dv)..][..dv].iter().enumerate() {
                    dst[c * ld + j] = x;
                }
            }
        });
        let qb = lane_block(lk);
        let nblk = lq.div_ceil(qb);
        let mut out = super::par_zeroed::<f32>(b * lq * dv);
        let dst = SendPtr(out.as_mut_ptr());
        (0..b * nblk).into_par_iter().for_each_init(
            // Each written before it is read: Qᵀ's live columns, Sᵀ and Oᵀ by overwriting
            // products (columns past the block's queries are neither written nor read).
            || {
                (
                    super::Scratch::take(d * qb),
                    super::Scratch::take(lk * qb),
                    super::Scratch::take(dv * qb),
                    vec![0f32; qb],
                )
            },
            |(qt, st, ot, sums), task| {
                let (qt, st, ot) = (qt.f32(), st.f32(), ot.f32());
                let (bi, blk) = (task / nblk, task % nblk);
                let r0 = blk * qb;
                let rows = qb.min(lq - r0);
                for r in 0..rows {
                    for (c, &x) in q[row(bi, lq, r0 + r, d)..][..d].iter().enumerate() {
                        qt[c * qb + r] = x;
                    }
                }
                let s_dims = Dims {
                    m: lk,
                    n: rows,
                    k: d,
                    lda: h * d,
                    ldb: qb,
                    ldc: qb,
                };
                let o_dims = Dims {
                    m: dv,
                    n: rows,
                    k: lk,
                    lda: ld,
                    ldb: qb,
                    ldc: qb,
                };
                // SAFETY: K rows 0..lk of head bi (h·d apart), Qᵀ d × rows (qb apart), Sᵀ lk ×
                // rows, Vᵀ dv × lk of head bi, Oᵀ dv × rows: all inside their buffers; the
                // output rows r0..r0+rows of head bi are this task's alone. AVX-512F runs
                // (`tiled::f32_native`).
                unsafe {
                    let kp = k.as_ptr().add(row(bi, lk, 0, d));
                    tiled::gemm_on::<F32Fma>(
                        s_dims,
                        &[(0, 0)],
                        kp,
                        qt.as_ptr(),
                        st.as_mut_ptr(),
                        false,
                        true,
                    );
                    x86::softmax_cols(st, lk, qb, rows, self.scale, sums);
                    tiled::gemm_on::<F32Fma>(
                        o_dims,
                        &[(0, 0)],
                        vt.as_ptr().add(bi * dv * ld),
                        st.as_ptr(),
                        ot.as_mut_ptr(),
                        false,
                        true,
                    );
                    self.store_rows(&dst, ot, &sums[..rows], (bi, lq, r0, dv, qb));
                }
            },
        );
        out
    }
}

#[cfg(target_arch = "x86_64")]
impl Sdpa {
    /// [`Sdpa::tiled`]'s transposed form on `vdpbf16ps` ([`tiled`]'s bf16 tile): `Sᵀ = K·Qᵀ`
    /// with K and Qᵀ as bf16 pairs along the head dimension, the column softmax in f32, then
    /// `Oᵀ = Vᵀ·Sᵀ` with Vᵀ and the weights as pairs of adjacent keys. Q, K, V and the
    /// weights are rounded to bf16 (f32 accumulation), as on AMX and in torch's bf16
    /// attention; on Zen 4 each product runs at twice the f32 tile's flop rate.
    fn dot(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, lq, lk, d, dv): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        use super::tiled::x86::Bf16Dot;
        let row = |bi, len, r, w| self.row(bi, len, r, w);
        let (dp, kp) = (d.div_ceil(2), lk.div_ceil(2));
        // K as pairs per head (lk × dp), and Vᵀ as key pairs (dv rows of `ld`), built once.
        let kpairs = super::par_filled(b * lk * dp, lk * dp, |bi, dst: &mut [u32]| {
            for (j, dst) in dst.chunks_exact_mut(dp).enumerate() {
                pair_adjacent(&k[row(bi, lk, j, d)..][..d], dst);
            }
        });
        let ld = padded(kp);
        let vt = super::par_filled(b * dv * ld, dv * ld, |bi, dst: &mut [u32]| {
            let mut col = vec![0f32; lk];
            for (c, dst) in dst.chunks_exact_mut(ld).enumerate() {
                for (j, x) in col.iter_mut().enumerate() {
                    *x = v[row(bi, lk, j, dv) + c];
                }
                pair_adjacent(&col, dst);
            }
        });
        let qb = lane_block(lk);
        let nblk = lq.div_ceil(qb);
        let mut out = super::par_zeroed::<f32>(b * lq * dv);
        let dst = SendPtr(out.as_mut_ptr());
        (0..b * nblk).into_par_iter().for_each_init(
            // Each written before it is read: Qᵀ's pairs, Sᵀ and Oᵀ by overwriting products,
            // the weights' pairs by `pair_rows` (columns past the block's queries unread).
            || {
                (
                    super::Scratch::take(dp * qb),
                    super::Scratch::take(lk * qb),
                    super::Scratch::take(kp * qb),
                    super::Scratch::take(dv * qb),
                    vec![0f32; qb],
                )
            },
            |(qt, st, sp, ot, sums), task| {
                let (st, ot) = (st.f32(), ot.f32());
                let (bi, blk) = (task / nblk, task % nblk);
                let r0 = blk * qb;
                let rows = qb.min(lq - r0);
                for r in 0..rows {
                    let qr = &q[row(bi, lq, r0 + r, d)..][..d];
                    for c in 0..dp {
                        let hi = if 2 * c + 1 < d { qr[2 * c + 1] } else { 0.0 };
                        qt[c * qb + r] = bf16::pair(qr[2 * c], hi);
                    }
                }
                let s_dims = Dims {
                    m: lk,
                    n: rows,
                    k: dp,
                    lda: dp,
                    ldb: qb,
                    ldc: qb,
                };
                let o_dims = Dims {
                    m: dv,
                    n: rows,
                    k: kp,
                    lda: ld,
                    ldb: qb,
                    ldc: qb,
                };
                // SAFETY: K pairs lk × dp of head bi, Qᵀ pairs dp × rows (qb apart), Sᵀ lk ×
                // rows, its pairs kp × rows, Vᵀ pairs dv × kp (ld apart) of head bi, Oᵀ dv ×
                // rows: all inside their buffers; output rows r0..r0+rows of head bi are this
                // task's alone. AVX-512F and AVX-512 BF16 run (`Products::Dot`).
                unsafe {
                    tiled::gemm_on::<Bf16Dot>(
                        s_dims,
                        &[(0, 0)],
                        kpairs.as_ptr().add(bi * lk * dp),
                        qt.as_ptr(),
                        st.as_mut_ptr(),
                        false,
                        true,
                    );
                    x86::softmax_cols(st, lk, qb, rows, self.scale, sums);
                    x86::pair_rows(st, lk, qb, rows, sp);
                    tiled::gemm_on::<Bf16Dot>(
                        o_dims,
                        &[(0, 0)],
                        vt.as_ptr().add(bi * dv * ld),
                        sp.as_ptr(),
                        ot.as_mut_ptr(),
                        false,
                        true,
                    );
                    self.store_rows(&dst, ot, &sums[..rows], (bi, lq, r0, dv, qb));
                }
            },
        );
        out
    }

    /// Both products on AMX tiles ([`amx::Tiles`]), 32 queries per task. Everything a tile
    /// touches is stored as 32-wide panels, contiguous: Kᵀ per block of 32 keys (head-dim pairs
    /// × 32), the scores per block of 32 keys (32 × 32 f32), the softmax weights per 16 key
    /// pairs (32 rows × 16 pairs). With row-major buffers 4096 keys wide, each tile load or
    /// store touched 16 rows 16 KiB apart, 16 pages (more than the store TLB holds): the score
    /// product alone took 70–120 ms of a 16×4096²×40 call (≈⅒ of the tile rate), the whole call
    /// 266–367 ms, now ~187 ms (examples/amxbench, `EASEL_AMXBENCH_ATTN=1`). The head dimension (40, 80, 160 in SD) is zero-padded to whole
    /// 16-pair steps, the keys to whole panels (padding keys get weight 0, not exp(0)).
    fn amx(
        &self,
        q: &[f32],
        k: &[f32],
        v: &[f32],
        (b, lq, lk, d, dv): (usize, usize, usize, usize, usize),
    ) -> Vec<f32> {
        const W: usize = amx::BLOCK;
        let dp = d.div_ceil(2).next_multiple_of(amx::KSTEP);
        let nb = lk.div_ceil(W);
        let kp = nb * W / 2;
        // Output columns in whole tiles of 16: 48 for SD's 40 (the last 16 in a 32 × 16 block).
        let dvp = dv.next_multiple_of(16);
        // Kᵀ panels: per head, panel j holds pairs 0..dp of keys 32j..32j+32 (dp × 32).
        let row = |bi, len, r, w| self.row(bi, len, r, w);
        // Both per head, zeroed (the padding) by the task that fills the head, in cache.
        let kt = super::par_filled(b * nb * dp * W, nb * dp * W, |bi, dst: &mut [u32]| {
            for j in 0..lk {
                let row = &k[row(bi, lk, j, d)..][..d];
                let panel = &mut dst[(j / W) * dp * W..][..dp * W];
                for p in 0..d.div_ceil(2) {
                    let hi = if 2 * p + 1 < d { row[2 * p + 1] } else { 0.0 };
                    panel[p * W + j % W] = bf16::pair(row[2 * p], hi);
                }
            }
        });
        // V as pairs along the keys: kp rows × dvp columns (its tiles read 16 rows 4·dvp B apart).
        let vt = super::par_filled(b * kp * dvp, kp * dvp, |bi, dst: &mut [u32]| {
            for p in 0..lk.div_ceil(2) {
                let lo = &v[row(bi, lk, 2 * p, dv)..][..dv];
                let hi = (2 * p + 1 < lk).then(|| &v[row(bi, lk, 2 * p + 1, dv)..][..dv]);
                bf16::pair_rows(lo, hi, &mut dst[p * dvp..p * dvp + dv]);
            }
        });
        let nq = lq.div_ceil(W);
        let mut out = super::par_zeroed::<f32>(b * lq * dv);
        let dst = SendPtr(out.as_mut_ptr());
        let scale = self.scale;
        (0..b * nq).into_par_iter().for_each_init(
            // Each written whole before it is read: the Q pairs row by row (zeros past the
            // last query), the scores and the output by overwriting tile products, the
            // weights by the softmax.
            || {
                (
                    super::Scratch::take(W * dp),
                    super::Scratch::take(nb * W * W),
                    super::Scratch::take(nb * W * W / 2),
                    super::Scratch::take(W * dvp),
                )
            },
            |(qp, scores, pp, o), task| {
                let (scores, o) = (scores.f32(), o.f32());
                let (bi, qi) = (task / nq, task % nq);
                let r0 = qi * W;
                let rows = W.min(lq - r0);
                for (r, dst) in qp.chunks_exact_mut(dp).enumerate() {
                    if r < rows {
                        pair_adjacent(&q[row(bi, lq, r0 + r, d)..][..d], dst);
                    } else {
                        dst.fill(0);
                    }
                }
                let mut sums = [0f32; W];
                // SAFETY: AMX runs (`Products::Amx`, which also means AVX-512 BF16); Q pairs 32 × dp,
                // nb Kᵀ panels dp × 32 of head bi, nb score panels 32 × 32, nb weight panels
                // 32 × 16 pairs, V pairs kp × dvp of head bi, the output block 32 × dvp: every
                // tile read or written lies inside them.
                unsafe {
                    let tiles = amx::Tiles::new();
                    let ktb = kt.as_ptr().add(bi * nb * dp * W);
                    for j in 0..nb {
                        tiles.block(
                            true,
                            dp / amx::KSTEP,
                            (qp.as_ptr(), dp, amx::KSTEP),
                            (ktb.add(j * dp * W), W),
                            (scores.as_mut_ptr().add(j * W * W), W, W),
                        );
                    }
                    x86::softmax_panels(scores, lk, scale, pp, &mut sums);
                    let vb = vt.as_ptr().add(bi * kp * dvp);
                    for c in (0..dvp).step_by(W) {
                        tiles.block(
                            true,
                            nb,
                            (pp.as_ptr(), amx::KSTEP, W * amx::KSTEP),
                            (vb.add(c), dvp),
                            (o.as_mut_ptr().add(c), dvp, W.min(dvp - c)),
                        );
                    }
                    drop(tiles);
                    let dst = &dst;
                    for (r, o_row) in o.chunks_exact(dvp).take(rows).enumerate() {
                        let inv = 1.0 / sums[r];
                        let out =
                            std::slice::from_raw_parts_mut(dst.0.add(row(bi, lq, r0 + r, dv)), dv);
                        for (x, &y) in out.iter_mut().zip(&o_row[..dv]) {
                            *x = y * inv;
                        }
                    }
                }
            },
        );
        out
    }
}

/// The AMX attention's softmax on AVX-512 (every CPU with AMX-BF16 has AVX-512 BF16).
#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::amx::BLOCK as W;
    use std::arch::x86_64::*;

    /// `2^t` of 16 lanes for `t ≤ 0` (the softmax's shifted logits), lanes outside `keep`
    /// zero: `t = n + f`, `|f| ≤ ½`, `2^f` by a minimax cubic (relative error ≤ 7.6·10⁻⁵, a
    /// fiftieth of the weights' bf16 rounding), `vscalefps` for the `2ⁿ` (underflowing to 0
    /// far below the max). 6 instructions; the degree-5 Taylor polynomial before it was 8 (and
    /// a masking move), the `exp` before that 15.
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp2_16(keep: __mmask16, t: __m512) -> __m512 {
        // Minimax for the relative error of 2^f on [-½, ½], highest power first
        // (`scripts/fit_exp2.py`).
        const C: [f32; 4] = [0.055_170_562, 0.242_608_67, 0.693_260_97, 0.999_928_3];
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
        let f = _mm512_sub_ps(t, n);
        let mut p = _mm512_set1_ps(C[0]);
        for &c in &C[1..] {
            p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
        }
        _mm512_maskz_scalef_ps(keep, p, n)
    }

    /// Rows `2j` and `2j + 1` of `st` (keys × `qb` query lanes, `rows` of them live) as pair
    /// row `j` of `sp` (`ceil(lk/2)` rows of `qb`): each lane holds the two keys' weights
    /// rounded to bf16 (to nearest even, as [`crate::kernels::bf16::to_bf16`]; weights are
    /// finite), the even key low; an odd last key is paired with 0.
    ///
    /// # Safety
    /// AVX-512F runs; `st` holds `lk × qb`, `sp` `ceil(lk/2) × qb`, `rows ≤ qb`, and `qb` is a
    /// multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn pair_rows(st: &[f32], lk: usize, qb: usize, rows: usize, sp: &mut [u32]) {
        debug_assert!(qb.is_multiple_of(16) && rows <= qb);
        debug_assert!(st.len() >= lk * qb && sp.len() >= lk.div_ceil(2) * qb);
        let one = _mm512_set1_epi32(1);
        let half = _mm512_set1_epi32(0x7FFF);
        let top = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        // b + 0x7FFF + (bit 16 of b): the bf16 rounding, in the upper half.
        let round = |x: __m512i| {
            _mm512_add_epi32(
                _mm512_add_epi32(x, half),
                _mm512_and_si512(_mm512_srli_epi32::<16>(x), one),
            )
        };
        let lanes = rows.next_multiple_of(16);
        for j in 0..lk.div_ceil(2) {
            let (lo, hi) = (
                st.as_ptr().add(2 * j * qb),
                st.as_ptr().add((2 * j + 1) * qb),
            );
            let out = sp.as_mut_ptr().add(j * qb);
            for r in (0..lanes).step_by(16) {
                let a = round(_mm512_loadu_si512(lo.add(r) as *const _));
                let b = if 2 * j + 1 < lk {
                    _mm512_and_si512(round(_mm512_loadu_si512(hi.add(r) as *const _)), top)
                } else {
                    _mm512_setzero_si512()
                };
                let p = _mm512_or_si512(_mm512_srli_epi32::<16>(a), b);
                _mm512_storeu_si512(out.add(r) as *mut _, p);
            }
        }
    }

    /// The f32 path's softmax down the columns of `Sᵀ` (`lk` rows of keys, `ld` apart; column
    /// `r` < `n` is query r): each column becomes `exp(scale·s − scale·max)`, its sum goes to
    /// `sums[r]` (the division is left to the output). Each weight is
    /// [`super::super::simd::exp_below_max`], as in the row softmax, but every lane is its own
    /// query, so the max and the sum need no reduction across lanes.
    ///
    /// # Safety
    /// The CPU has AVX-512F; `s` holds `lk` rows of `ld ≥ n` values.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn softmax_cols(
        s: &mut [f32],
        lk: usize,
        ld: usize,
        n: usize,
        scale: f32,
        sums: &mut [f32],
    ) {
        assert!(n <= ld && (lk == 0 || s.len() >= (lk - 1) * ld + n) && sums.len() >= n);
        let p = s.as_mut_ptr();
        let c = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
        for v0 in (0..n).step_by(16 * 8) {
            // Up to 8 vectors of 16 queries at a time: their maxima and sums in registers.
            let nv = (n - v0).div_ceil(16).min(8);
            let mask = |i: usize| -> __mmask16 {
                let live = (n - v0 - 16 * i).min(16);
                if live == 16 {
                    0xFFFF
                } else {
                    ((1u32 << live) - 1) as __mmask16
                }
            };
            let masks: [__mmask16; 8] = std::array::from_fn(|i| if i < nv { mask(i) } else { 0 });
            let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); 8];
            for j in 0..lk {
                let rp = p.add(j * ld + v0);
                for i in 0..nv {
                    let x = _mm512_maskz_loadu_ps(masks[i], rp.add(16 * i));
                    mx[i] = _mm512_max_ps(mx[i], x);
                }
            }
            let mut acc = [_mm512_setzero_ps(); 8];
            for j in 0..lk {
                let rp = p.add(j * ld + v0);
                for i in 0..nv {
                    let x = _mm512_maskz_loadu_ps(masks[i], rp.add(16 * i));
                    let e = super::super::simd::exp_below_max(x, mx[i], c);
                    _mm512_mask_storeu_ps(rp.add(16 * i), masks[i], e);
                    acc[i] = _mm512_mask_add_ps(acc[i], masks[i], acc[i], e);
                }
            }
            for i in 0..nv {
                let mut lanes = [0f32; 16];
                _mm512_storeu_ps(lanes.as_mut_ptr(), acc[i]);
                let live = (n - v0 - 16 * i).min(16);
                sums[v0 + 16 * i..][..live].copy_from_slice(&lanes[..live]);
            }
        }
    }

    /// Softmax weights of a 32-row block of scores stored as panels of 32 keys (`scores[j]` =
    /// 32 rows × 32 f32 for keys 32j..): `pp[j]` = 32 rows × 16 bf16 pairs of
    /// `exp(scale·s − scale·max_row)`, keys ≥ `lk` weighing 0; `sums[r]` the f32 row sums (the
    /// division is left to the 40-wide output).
    ///
    /// # Safety
    /// The CPU has AVX-512F and AVX-512 BF16; `scores` holds `lk.div_ceil(32)` panels and `pp`
    /// as many weight panels.
    #[target_feature(enable = "avx512f,avx512bf16")]
    pub unsafe fn softmax_panels(
        scores: &[f32],
        lk: usize,
        scale: f32,
        pp: &mut [u32],
        sums: &mut [f32; W],
    ) {
        let nb = lk.div_ceil(W);
        assert!(scores.len() >= nb * W * W && pp.len() >= nb * W * W / 2);
        // Lanes of the two 16-key halves of panel j that are real keys.
        let masks = |j: usize| -> (__mmask16, __mmask16) {
            let left = lk - j * W;
            let m = |n: usize| {
                if n >= 16 {
                    0xFFFF
                } else {
                    (1u32 << n) as u16 - 1
                }
            };
            (m(left), m(left.saturating_sub(16)))
        };
        let s = scores.as_ptr();
        let mut mx = [_mm512_set1_ps(f32::NEG_INFINITY); W];
        for j in 0..nb {
            let (m0, m1) = masks(j);
            for (r, m) in mx.iter_mut().enumerate() {
                let p = s.add((j * W + r) * W);
                *m = _mm512_mask_max_ps(*m, m0, *m, _mm512_loadu_ps(p));
                *m = _mm512_mask_max_ps(*m, m1, *m, _mm512_loadu_ps(p.add(16)));
            }
        }
        // exp(scale·(s − max)) = 2^(s·c − max·c), c = scale·log₂e, in one FMA: `max·c` is
        // rounded (±1.5·10⁻⁵ at logits near −300), a relative error of 10⁻⁵ in the weights,
        // which bf16 rounds to 2·10⁻³ anyway.
        let c = scale * std::f32::consts::LOG2_E;
        let sc = _mm512_set1_ps(c);
        let shift: [__m512; W] =
            std::array::from_fn(|r| _mm512_set1_ps(_mm512_reduce_max_ps(mx[r]) * c));
        let mut acc = [_mm512_setzero_ps(); W];
        let dst = pp.as_mut_ptr();
        for j in 0..nb {
            let (m0, m1) = masks(j);
            for r in 0..W {
                let p = s.add((j * W + r) * W);
                let t0 = _mm512_fmsub_ps(_mm512_loadu_ps(p), sc, shift[r]);
                let t1 = _mm512_fmsub_ps(_mm512_loadu_ps(p.add(16)), sc, shift[r]);
                let e0 = exp2_16(m0, t0);
                let e1 = exp2_16(m1, t1);
                acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(e0, e1));
                let w: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(e1, e0));
                _mm512_storeu_si512(dst.add((j * W + r) * 16) as *mut __m512i, w);
            }
        }
        for (s, a) in sums.iter_mut().zip(acc) {
            *s = _mm512_reduce_add_ps(a);
        }
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
        let h = self.heads;
        let amx = self.products == Products::Amx;
        if h != 1 && (!(amx || tiled::f32_native()) || d % h != 0 || dv % h != 0) {
            candle_core::bail!("sdpa: {h} heads do not split {d} / {dv}, or no tile kernel");
        }
        #[cfg(target_arch = "x86_64")]
        if amx {
            let out = self.amx(q, k, v, (b * h, lq, lk, d / h, dv / h));
            return Ok((CpuStorage::F32(out), Shape::from((b, lq, dv))));
        }
        #[cfg(target_arch = "x86_64")]
        if self.products == Products::Dot {
            let out = self.dot(q, k, v, (b * h, lq, lk, d / h, dv / h));
            return Ok((CpuStorage::F32(out), Shape::from((b, lq, dv))));
        }
        #[cfg(target_arch = "x86_64")]
        if tiled::f32_native() {
            let out = self.tiled(q, k, v, (b * h, lq, lk, d / h, dv / h));
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
        if !amx_attention() {
            eprintln!("note: no AMX on this CPU; the AMX attention is not exercised here");
            return Ok(());
        }
        let shapes = [
            (1, 1, 1, 1, 1),
            (3, 37, 77, 40, 40),
            (2, 300, 300, 17, 9),
            (2, 256, 1024, 80, 80),
            (1, 70, 64, 160, 160),
            // A last key panel with 18 keys (both halves partly real).
            (2, 33, 50, 24, 8),
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

    /// The `vdpbf16ps` path, as the AMX one: bf16 rounding of Q, K, V and the weights, every
    /// padding (odd head dimensions and key counts, a query block's last lanes), heads side by
    /// side or split.
    #[test]
    fn dot_matches_candle_within_bf16_rounding() -> Result<()> {
        if !(bf16::native() && tiled::f32_native()) {
            eprintln!("note: no AVX-512 BF16 here; the vdpbf16ps attention is not exercised");
            return Ok(());
        }
        let shapes = [
            (1, 1, 1, 1, 1),
            (3, 37, 77, 40, 40),
            (2, 300, 300, 17, 9),
            (2, 256, 1024, 80, 80),
            (1, 70, 64, 160, 160),
            (2, 33, 51, 24, 8),
        ];
        let dot = |q: &Tensor, k: &Tensor, v: &Tensor, scale: f64| {
            attention_with(q, k, v, scale, Products::Dot)
        };
        for (shape, err) in errors(&shapes, dot)? {
            assert!(err < 3e-2, "{shape:?}: {err}");
            if shape.2 > 1 {
                assert!(err > 1e-5, "{shape:?}: {err} (f32 path?)");
            }
        }
        let dev = Device::Cpu;
        let (b, lq, lk, h, d) = (2, 37, 77, 8, 40);
        let q = Tensor::randn(0f32, 1.0, (b, lq, h * d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (b, lk, h * d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (b, lk, h * d), &dev)?;
        let split = |x: &Tensor| -> Result<Tensor> {
            let (b, l, hd) = x.dims3()?;
            x.reshape((b, l, h, hd / h))?
                .transpose(1, 2)?
                .reshape((b * h, l, hd / h))
        };
        let side = sdpa(&q, &k, &v, 0.15, Products::Dot, h)?;
        let apart = dot(&split(&q)?, &split(&k)?, &split(&v)?, 0.15)?
            .reshape((b, h, lq, d))?
            .transpose(1, 2)?
            .reshape((b, lq, h * d))?;
        let err = crate::kernels::max_abs_diff(&side, &apart)?;
        assert!(err == 0.0, "heads side by side vs split: {err}");
        Ok(())
    }

    /// The per-thread buffers are reused without zeroing: with every pool thread's buffers
    /// full of NaN first, any element read before it is written would show in the output.
    #[test]
    fn reused_buffers_are_written_before_read() -> Result<()> {
        rayon::broadcast(|_| {
            let mut held: Vec<_> = (0..8)
                .map(|_| crate::kernels::Scratch::take(1 << 20))
                .collect();
            for s in held.iter_mut() {
                s.f32().fill(f32::NAN);
            }
        });
        let shapes = [(2, 70, 50, 40, 40), (1, 33, 300, 17, 9)];
        for (shape, err) in errors(&shapes, attention)? {
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
        for (shape, err) in errors(&shapes, attention_bf16)? {
            assert!(err < 3e-2, "{shape:?}: {err}");
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

    /// The heads-side-by-side entries (bf16 and f32) against splitting the heads for candle's
    /// attention.
    #[test]
    fn heads_layout_matches_split_heads() -> Result<()> {
        let dev = Device::Cpu;
        for (b, lq, lk, h, d, dv) in [
            (2, 37, 77, 8, 40, 40),
            (1, 70, 50, 3, 17, 9),
            (2, 64, 64, 1, 32, 32),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, lq, h * d), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, lk, h * d), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, lk, h * dv), &dev)?;
            let split = |x: &Tensor| -> Result<Tensor> {
                let (b, l, hd) = x.dims3()?;
                x.reshape((b, l, h, hd / h))?
                    .transpose(1, 2)?
                    .reshape((b * h, l, hd / h))
            };
            let want = reference(&split(&q)?, &split(&k)?, &split(&v)?, 0.3)?
                .reshape((b, h, lq, dv))?
                .transpose(1, 2)?
                .reshape((b, lq, h * dv))?;
            let err =
                crate::kernels::max_abs_diff(&attention_bf16_heads(&q, &k, &v, h, 0.3)?, &want)?;
            assert!(err < 3e-2, "bf16 {:?}: {err}", (b, lq, lk, h, d, dv));
            // The f32 kernel reads the same layout in place (AVX-512) and keeps f32 accuracy.
            let err = crate::kernels::max_abs_diff(&attention_heads(&q, &k, &v, h, 0.3)?, &want)?;
            assert!(err < 1e-5, "f32 {:?}: {err}", (b, lq, lk, h, d, dv));
        }
        Ok(())
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn exp2_16_matches_std() {
        use std::arch::x86_64::*;
        if !std::is_x86_feature_detected!("avx512f") {
            eprintln!("note: no AVX-512 on this CPU; exp2_16 is not exercised here");
            return;
        }
        let mut worst = 0f64;
        let mut t = -125.0f32;
        while t < 0.0 {
            let ts: [f32; 16] = std::array::from_fn(|i| (t + i as f32 * 0.0011).min(0.0));
            let mut got = [0f32; 16];
            // SAFETY: AVX-512F was detected.
            unsafe {
                _mm512_storeu_ps(
                    got.as_mut_ptr(),
                    x86::exp2_16(0xFFFF, _mm512_loadu_ps(ts.as_ptr())),
                )
            };
            for (g, t) in got.iter().zip(ts) {
                let want = 2f64.powf(t as f64);
                worst = worst.max(((*g as f64 - want) / want).abs());
            }
            t += 0.0173;
        }
        // The cubic's bound (7.6e-5), far below bf16's rounding of the weights (2e-3).
        assert!(worst < 8e-5, "relative error {worst}");
        assert!(worst > 1e-6, "relative error {worst}: not the cubic?");
    }

    /// The panel softmax against f64 on every key count around the panel edges, with logits
    /// far below 0: a padding key (score 0) counted in the row max would underflow every weight.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn softmax_panels_matches_f64() {
        if !(std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512bf16"))
        {
            eprintln!("note: no AVX-512 BF16 on this CPU; the panel softmax is not exercised here");
            return;
        }
        for lk in [1usize, 15, 16, 17, 31, 32, 33, 50, 77, 96] {
            let nb = lk.div_ceil(32);
            let logit = |r: usize, j: usize| -300.0 + ((r * 31 + j * 17) % 23) as f32 * 0.9;
            let mut scores = vec![0f32; nb * 1024];
            for j in 0..lk {
                for r in 0..32 {
                    scores[(j / 32 * 32 + r) * 32 + j % 32] = logit(r, j);
                }
            }
            let mut pp = vec![u32::MAX; nb * 512];
            let mut sums = [0f32; 32];
            // SAFETY: the features were detected; the buffers hold nb panels each.
            unsafe { x86::softmax_panels(&scores, lk, 0.7, &mut pp, &mut sums) };
            for r in 0..32 {
                let m = (0..lk).map(|j| logit(r, j) as f64).fold(f64::MIN, f64::max);
                let e: Vec<f64> = (0..lk)
                    .map(|j| ((logit(r, j) as f64 - m) * 0.7).exp())
                    .collect();
                let want: f64 = e.iter().sum();
                // The weights' own error (the cubic, ≤ 7.6e-5) bounds their sum's.
                assert!(
                    (sums[r] as f64 - want).abs() < 1e-4 * want,
                    "{lk} row {r}: {} vs {want}",
                    sums[r]
                );
                for j in 0..nb * 32 {
                    let w = pp[(j / 32 * 32 + r) * 16 + j % 32 / 2];
                    let got = bf16::from_bf16((w >> (16 * (j % 2))) as u16) as f64;
                    let want = e.get(j).copied().unwrap_or(0.0);
                    assert!(
                        (got - want).abs() <= 4e-3 * want.max(1e-30),
                        "{lk} row {r} key {j}: {got} vs {want}"
                    );
                }
            }
        }
    }
}

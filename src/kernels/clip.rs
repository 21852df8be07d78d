//! The CLIP text encoder's non-GEMM work, fused: causal self-attention straight from the
//! packed `[q | k | v]` projection (no per-head reshapes, transposes or mask tensor), and
//! quick-GELU in one pass instead of three. Both spread over rayon; other dtypes/devices fall
//! back to plain candle ops.
use super::simd::{exp_f32, softmax_row};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};
use rayon::prelude::*;

fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{op}: non-contiguous input"),
    }
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

struct CausalAttention {
    heads: usize,
}

/// Causal multi-head self-attention on `qkv` (batch, seq, 3·hidden), the concatenated q, k
/// and v projections, scaled by `1/√head_dim`; returns (batch, seq, hidden) with the heads
/// already merged back.
pub fn causal_self_attention(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    if qkv.device().is_cpu() && qkv.dtype() == DType::F32 {
        return qkv
            .contiguous()?
            .apply_op1_no_bwd(&CausalAttention { heads });
    }
    causal_reference(qkv, heads)
}

/// The plain candle version (test oracle and non-f32/GPU path).
pub fn causal_reference(qkv: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, s, h3) = qkv.dims3()?;
    let h = h3 / 3;
    let d = h / heads;
    let split = |i: usize| {
        qkv.narrow(D::Minus1, i * h, h)?
            .reshape((b, s, heads, d))?
            .transpose(1, 2)?
            .contiguous()
    };
    let (q, k, v) = (split(0)?, split(1)?, split(2)?);
    let mask: Vec<f32> = (0..s)
        .flat_map(|i| (0..s).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    let mask = Tensor::from_vec(mask, (s, s), qkv.device())?;
    let w = (q.matmul(&k.t()?)? * (d as f64).powf(-0.5))?;
    let w = w.to_dtype(DType::F32)?.broadcast_add(&mask)?;
    let w = candle_nn::ops::softmax_last_dim(&w)?.to_dtype(v.dtype())?;
    w.matmul(&v)?.transpose(1, 2)?.reshape((b, s, h))
}

impl CustomOp1 for CausalAttention {
    fn name(&self) -> &'static str {
        "easel-causal-attention"
    }

    fn cpu_fwd(&self, st: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, h3) = l.shape().dims3()?;
        let heads = self.heads;
        if h3 % (3 * heads) != 0 {
            candle_core::bail!("causal attention: {h3} is not 3 × {heads} heads × head_dim");
        }
        let h = h3 / 3;
        let d = h / heads;
        let qkv = f32_slice(st, l, "causal attention")?;
        let mut out = vec![0f32; b * s * h];
        let dst = SendPtr(out.as_mut_ptr());
        let scale = (d as f32).powf(-0.5);
        // One task per (batch, head): its scores (seq × seq) fit in L1/L2.
        (0..b * heads).into_par_iter().for_each_init(
            || vec![0f32; s * s],
            |scores, task| {
                let (bi, hi) = (task / heads, task % heads);
                let base = bi * s * h3 + hi * d;
                let (q, k, v) = (&qkv[base..], &qkv[base + h..], &qkv[base + 2 * h..]);
                let dst = &dst;
                // SAFETY: q/k/v rows are `h3` apart inside `qkv` (the last row read ends at
                // `base + 2h + (s-1)·h3 + d ≤ len`); each task writes its own head's columns of
                // `out`, rows `h` apart.
                unsafe {
                    gemm::gemm(
                        s,
                        s,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        s as isize,
                        false,
                        q.as_ptr(),
                        1,
                        h3 as isize,
                        k.as_ptr(),
                        h3 as isize,
                        1,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
                // Row i attends to keys 0..=i: softmax over that prefix, zero weight after.
                for (i, row) in scores.chunks_mut(s).enumerate() {
                    softmax_row(&mut row[..=i], scale);
                    row[i + 1..].fill(0.0);
                }
                unsafe {
                    gemm::gemm(
                        s,
                        d,
                        s,
                        dst.0.add(bi * s * h + hi * d),
                        1,
                        h as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        s as isize,
                        v.as_ptr(),
                        1,
                        h3 as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        gemm::Parallelism::None,
                    );
                }
            },
        );
        Ok((CpuStorage::F32(out), Shape::from((b, s, h))))
    }
}

super::simd::dispatch! {
    /// dst = x · sigmoid(1.702 x), in place.
    fn quick_gelu_slice(xs: &mut [f32]) {
        for x in xs.iter_mut() {
            *x /= 1.0 + exp_f32(-1.702 * *x);
        }
    }
}

struct QuickGelu;

/// `x · sigmoid(1.702 x)` (CLIP's activation) in one pass.
pub fn quick_gelu(xs: &Tensor) -> Result<Tensor> {
    if xs.device().is_cpu() && xs.dtype() == DType::F32 {
        return xs.contiguous()?.apply_op1_no_bwd(&QuickGelu);
    }
    quick_gelu_reference(xs)
}

/// The plain candle version (test oracle and non-f32/GPU path).
pub fn quick_gelu_reference(xs: &Tensor) -> Result<Tensor> {
    xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?
}

impl CustomOp1 for QuickGelu {
    fn name(&self) -> &'static str {
        "easel-quick-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut out = f32_slice(s, l, "quick gelu")?.to_vec();
        out.par_chunks_mut(16384).for_each(quick_gelu_slice);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_err(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn causal_attention_matches_candle() -> Result<()> {
        for &(b, s, heads, d) in &[(1, 1, 1, 1), (2, 77, 2, 4), (2, 77, 12, 64), (3, 10, 3, 5)] {
            let qkv = Tensor::randn(0f32, 1.0, (b, s, 3 * heads * d), &Device::Cpu)?;
            let err = max_err(
                &causal_self_attention(&qkv, heads)?,
                &causal_reference(&qkv, heads)?,
            )?;
            assert!(err < 1e-5, "{b}x{s}x{heads}x{d}: {err}");
        }
        Ok(())
    }

    #[test]
    fn quick_gelu_matches_candle() -> Result<()> {
        let x = (Tensor::randn(0f32, 1.0, (2, 77, 19), &Device::Cpu)? * 4.0)?;
        let err = max_err(&quick_gelu(&x)?, &quick_gelu_reference(&x)?)?;
        assert!(err < 1e-5, "{err}");
        Ok(())
    }
}

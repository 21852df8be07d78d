//! GEGLU (`a · gelu(gate)` over the two halves of the last dimension) fused into one pass,
//! with candle's tanh-approximated GELU evaluated through the vectorised exp.
use super::simd::geglu_row;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, D};

struct Geglu;

/// `x[..., :n] * gelu(x[..., n:])` for a last dimension of `2n`.
pub fn geglu(x: &Tensor) -> Result<Tensor> {
    if x.device().is_cpu() && x.dtype() == DType::F32 {
        return x.contiguous()?.apply_op1_no_bwd(&Geglu);
    }
    reference(x)
}

/// The plain candle version (test oracle and non-f32 path).
pub fn reference(x: &Tensor) -> Result<Tensor> {
    let h = x.chunk(2, D::Minus1)?;
    &h[0] * h[1].gelu()?
}

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "easel-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = match l.contiguous_offsets() {
            Some((a, b)) => &s.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("geglu: non-contiguous input"),
        };
        let mut dims = l.shape().dims().to_vec();
        let last = dims.pop().unwrap_or(0);
        if !last.is_multiple_of(2) || last == 0 {
            candle_core::bail!("geglu: odd last dimension {last}");
        }
        let n = last / 2;
        // Several rows per task to amortise scheduling.
        let rows = (16384 / n).max(1);
        // SAFETY: chunk t is whole rows of n outputs (the last one fewer rows), each written
        // by geglu_row from its input row.
        let out = unsafe {
            super::par_written(x.len() / 2, n * rows, |t, o| {
                let i = &x[t * rows * last..];
                for (o, i) in o.chunks_mut(n).zip(i.chunks(last)) {
                    geglu_row(o, &i[..n], &i[n..]);
                }
            })
        };
        dims.push(n);
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_on_odd_shapes() -> Result<()> {
        for shape in [[1usize, 1, 2], [2, 37, 26], [1, 5, 2 * 1280]] {
            let x = (Tensor::randn(0f32, 2.0, &shape, &Device::Cpu)? * 2.0)?;
            let err = crate::kernels::max_abs_diff(&geglu(&x)?, &reference(&x)?)?;
            assert!(err < 1e-5, "{shape:?}: {err}");
        }
        Ok(())
    }
}

//! GroupNorm, optionally fused with the SiLU that follows it in every ResNet block: one pass
//! for the statistics and one for normalise+affine+activation, groups spread over rayon.
use super::simd::{affine_act, sum_and_sq};
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use candle_nn as nn;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    /// The affine parameters as f32, read once here rather than on every call (CPU only).
    cpu_params: Option<Arc<(Vec<f32>, Vec<f32>)>>,
    num_groups: usize,
    eps: f64,
}

/// Same arguments and tensor names as `candle_nn::group_norm`.
pub fn group_norm(
    num_groups: usize,
    num_channels: usize,
    eps: f64,
    vs: nn::VarBuilder,
) -> Result<GroupNorm> {
    if !num_channels.is_multiple_of(num_groups) {
        candle_core::bail!(
            "GroupNorm: {num_channels} channels not divisible by {num_groups} groups"
        );
    }
    let weight = vs.get_with_hints(num_channels, "weight", nn::Init::Const(1.))?;
    let bias = vs.get_with_hints(num_channels, "bias", nn::Init::Const(0.))?;
    GroupNorm::from_tensors(weight, bias, num_groups, eps)
}

impl GroupNorm {
    fn from_tensors(weight: Tensor, bias: Tensor, num_groups: usize, eps: f64) -> Result<Self> {
        let cpu_params = if weight.device().is_cpu() {
            let w = weight.to_dtype(DType::F32)?.to_vec1()?;
            let b = bias.to_dtype(DType::F32)?.to_vec1()?;
            Some(Arc::new((w, b)))
        } else {
            None
        };
        Ok(Self {
            weight,
            bias,
            cpu_params,
            num_groups,
            eps,
        })
    }

    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, false)
    }

    /// `silu(group_norm(xs))`.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.run(xs, true)
    }

    fn run(&self, xs: &Tensor, silu: bool) -> Result<Tensor> {
        let params = self.cpu_params.as_ref();
        if let (Some(params), true) = (params, xs.dtype() == DType::F32 && xs.rank() >= 2) {
            let op = GroupNormOp {
                params: params.clone(),
                num_groups: self.num_groups,
                eps: self.eps,
                silu,
            };
            return xs.contiguous()?.apply_op1_no_bwd(&op);
        }
        let ys = self.reference(xs)?;
        if silu {
            nn::ops::silu(&ys)
        } else {
            Ok(ys)
        }
    }

    /// Random affine parameters (tests and benches).
    pub fn test_new(channels: usize, num_groups: usize, dev: &candle_core::Device) -> Result<Self> {
        Self::from_tensors(
            Tensor::randn(0f32, 1.0, channels, dev)?,
            Tensor::randn(0f32, 1.0, channels, dev)?,
            num_groups,
            1e-6,
        )
    }

    /// candle-nn's GroupNorm (the test oracle and the non-f32 path).
    pub fn reference(&self, xs: &Tensor) -> Result<Tensor> {
        nn::GroupNorm::new(
            self.weight.clone(),
            self.bias.clone(),
            self.weight.dim(0)?,
            self.num_groups,
            self.eps,
        )?
        .forward(xs)
    }
}

use candle_core::Module;

struct GroupNormOp {
    /// (weight, bias).
    params: Arc<(Vec<f32>, Vec<f32>)>,
    num_groups: usize,
    eps: f64,
    silu: bool,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "easel-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let dims = l.shape().dims();
        let (n, c) = (dims[0], dims[1]);
        let hw: usize = dims[2..].iter().product();
        let x = match l.contiguous_offsets() {
            Some((a, b)) => &s.as_slice::<f32>()?[a..b],
            None => candle_core::bail!("group norm: non-contiguous input"),
        };
        let (weight, bias) = (&self.params.0, &self.params.1);
        if c != weight.len() {
            candle_core::bail!("group norm: {c} channels, weight has {}", weight.len());
        }
        let g = self.num_groups;
        if g == 0 || !c.is_multiple_of(g) {
            candle_core::bail!("group norm: {c} channels in {g} groups");
        }
        let cg = c / g;
        let len = cg * hw;
        // SAFETY: chunk i is one group of one image (cg whole channel planes: g divides c), each
        // plane written by affine_act.
        let out = unsafe {
            super::par_written(x.len(), len, |i, dst| {
                let src = &x[i * len..(i + 1) * len];
                let gi = i % g;
                let shift = src[0];
                let (s, q) = sum_and_sq(src, shift);
                let m = s / len as f64;
                let var = (q / len as f64 - m * m).max(0.0);
                let mean = (m + shift as f64) as f32;
                let inv = (1.0 / (var + self.eps).sqrt()) as f32;
                for j in 0..cg {
                    let ch = gi * cg + j;
                    let a = inv * weight[ch];
                    let b = bias[ch] - mean * a;
                    affine_act(
                        &mut dst[j * hw..(j + 1) * hw],
                        &src[j * hw..(j + 1) * hw],
                        a,
                        b,
                        self.silu,
                    );
                }
            })
        };
        let _ = n;
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_group_norm_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, c, h, w, g) in &[
            (1, 1, 3, 3, 1),
            (2, 6, 5, 7, 3),
            (3, 32, 9, 1, 8),
            (1, 64, 17, 13, 32),
        ] {
            let x = (Tensor::randn(0f32, 3.0, (n, c, h, w), &dev)? + 5.0)?;
            let gn = GroupNorm::test_new(c, g, &dev)?;
            let want = gn.reference(&x)?;
            let err = crate::kernels::max_abs_diff(&gn.forward(&x)?, &want)?;
            assert!(err < 1e-4, "{n}x{c}x{h}x{w}/{g}: {err}");
            let want = nn::ops::silu(&want)?;
            let err = crate::kernels::max_abs_diff(&gn.forward_silu(&x)?, &want)?;
            assert!(err < 1e-4, "silu {n}x{c}x{h}x{w}/{g}: {err}");
        }
        Ok(())
    }
}

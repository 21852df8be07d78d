//! 2-D convolution (stride 1, dilation 1, one group) as `k²` GEMMs over the zero-padded input,
//! with no im2col copy: on the padded grid (width `W + 2p`), the contribution of tap `(ky, kx)`
//! to every output pixel is one matrix product `W[:, :, ky, kx] · Xpad[:, shift..]` where the
//! right-hand side is just the padded image viewed from offset `ky·Wp + kx`. The `Wp − W'`
//! columns that wrap around are computed and dropped when the result is cropped.
//! Other convolutions (strided, grouped, non-f32, non-CPU) go to candle.
use candle_core::{CpuStorage, CustomOp2, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;
use rayon::prelude::*;

#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: nn::Conv2d,
}

/// Same arguments and tensor names as `candle_nn::conv2d`.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: nn::Conv2dConfig,
    vs: nn::VarBuilder,
) -> Result<Conv2d> {
    Ok(Conv2d {
        inner: nn::conv2d(in_channels, out_channels, kernel_size, cfg, vs)?,
    })
}

impl Conv2d {
    pub fn new(inner: nn::Conv2d) -> Self {
        Self { inner }
    }
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let c = self.inner.config();
        let w = self.inner.weight();
        let fast = xs.device().is_cpu()
            && xs.dtype() == candle_core::DType::F32
            && w.dtype() == candle_core::DType::F32
            && c.stride == 1
            && c.dilation == 1
            && c.groups == 1
            && xs.rank() == 4;
        if !fast {
            return self.inner.forward(xs);
        }
        conv2d_fast(xs, w, self.inner.bias(), c.padding)
    }
}

/// The fast path: f32 CPU, stride 1. `x` (N, Cin, H, W), `w` (Cout, Cin, K, K), `b` (Cout).
pub fn conv2d_fast(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let bias = match b {
        Some(b) => Some(b.to_dtype(candle_core::DType::F32)?.to_vec1::<f32>()?),
        None => None,
    };
    x.apply_op2_no_bwd(&w, &ConvOp { padding, bias })
}

struct ConvOp {
    padding: usize,
    bias: Option<Vec<f32>>,
}

struct SendPtr(*mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

fn slice<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let all = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&all[a..b]),
        None => candle_core::bail!("conv: non-contiguous input"),
    }
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "easel-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (n, cin, h, wd) = l1.shape().dims4()?;
        let (cout, cin2, kh, kw) = l2.shape().dims4()?;
        if cin != cin2 {
            candle_core::bail!("conv: {cin} input channels, kernel expects {cin2}");
        }
        let p = self.padding;
        let (hp, wp) = (h + 2 * p, wd + 2 * p);
        if hp < kh || wp < kw {
            candle_core::bail!("conv: kernel larger than the padded input");
        }
        let (ho, wo) = (hp - kh + 1, wp - kw + 1);
        let x = slice(s1, l1)?;
        let w = slice(s2, l2)?;
        let threads = rayon::current_num_threads();
        let par = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        let direct = p == 0 && kh == 1 && kw == 1;
        // One image with padding: crop the GEMM result in place instead of into a new buffer.
        let in_place = n == 1 && !direct;
        let mut out = if in_place {
            Vec::new()
        } else {
            vec![0f32; n * cout * ho * wo]
        };
        // Padded input: per channel `hp*wp` values plus `kw` of slack for the wrapped columns.
        let cs = if direct { h * wd } else { hp * wp + kw };
        let mut pad = if direct {
            Vec::new()
        } else {
            vec![0f32; cin * cs]
        };
        let grid = ho * wp; // output computed on the padded-width grid
        let mut acc = if direct {
            Vec::new()
        } else {
            vec![0f32; cout * grid]
        };
        for b in 0..n {
            let xb = &x[b * cin * h * wd..(b + 1) * cin * h * wd];
            let ob: &mut [f32] = if in_place {
                &mut []
            } else {
                &mut out[b * cout * ho * wo..(b + 1) * cout * ho * wo]
            };
            let init = |buf: &mut [f32], plane: usize| -> bool {
                match &self.bias {
                    Some(bias) => {
                        buf.par_chunks_mut(plane)
                            .zip(bias.par_iter())
                            .for_each(|(c, &v)| c.fill(v));
                        true
                    }
                    None => false,
                }
            };
            if direct {
                let has_bias = init(ob, h * wd);
                // 1×1 without padding: a single GEMM straight into the output.
                // SAFETY: shapes and strides match the slices' lengths.
                unsafe {
                    gemm::gemm(
                        cout,
                        h * wd,
                        cin,
                        ob.as_mut_ptr(),
                        1,
                        (h * wd) as isize,
                        has_bias,
                        w.as_ptr(),
                        1,
                        cin as isize,
                        xb.as_ptr(),
                        1,
                        (h * wd) as isize,
                        1.0,
                        1.0,
                        false,
                        false,
                        false,
                        par,
                    );
                }
                continue;
            }
            pad.par_chunks_mut(cs).enumerate().for_each(|(c, dst)| {
                let src = &xb[c * h * wd..(c + 1) * h * wd];
                for y in 0..h {
                    let o = (y + p) * wp + p;
                    dst[o..o + wd].copy_from_slice(&src[y * wd..(y + 1) * wd]);
                }
            });
            let has_bias = init(&mut acc, grid);
            let taps = kh * kw;
            for ky in 0..kh {
                for kx in 0..kw {
                    let t = ky * kw + kx;
                    // SAFETY: the largest rhs index is (cin-1)*cs + (ho-1+ky)*wp + wp-1+kx
                    // < cin*cs because cs = hp*wp + kw; lhs indexes w[co, ci, ky, kx].
                    unsafe {
                        gemm::gemm(
                            cout,
                            grid,
                            cin,
                            acc.as_mut_ptr(),
                            1,
                            grid as isize,
                            t > 0 || has_bias,
                            w.as_ptr().add(t),
                            taps as isize,
                            (cin * taps) as isize,
                            pad.as_ptr().add(ky * wp + kx),
                            1,
                            cs as isize,
                            1.0,
                            1.0,
                            false,
                            false,
                            false,
                            par,
                        );
                    }
                }
            }
            if in_place {
                drop(std::mem::take(&mut pad));
                // Rows move left only (destination index ≤ source index): safe in order.
                for co in 0..cout {
                    for y in 0..ho {
                        let from = co * grid + y * wp;
                        acc.copy_within(from..from + wo, co * ho * wo + y * wo);
                    }
                }
                acc.truncate(cout * ho * wo);
                acc.shrink_to_fit();
                return Ok((CpuStorage::F32(acc), Shape::from((n, cout, ho, wo))));
            }
            let dst = SendPtr(ob.as_mut_ptr());
            let acc = &acc;
            (0..cout).into_par_iter().for_each(|co| {
                let dst = &dst;
                for y in 0..ho {
                    let src = &acc[co * grid + y * wp..co * grid + y * wp + wo];
                    // SAFETY: each channel writes its own disjoint plane of the output.
                    unsafe {
                        std::ptr::copy_nonoverlapping(
                            src.as_ptr(),
                            dst.0.add(co * ho * wo + y * wo),
                            wo,
                        );
                    }
                }
            });
        }
        Ok((CpuStorage::F32(out), Shape::from((n, cout, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn matches_candle_conv_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, cin, cout, h, w, k, p) in &[
            (1, 1, 1, 1, 1, 1, 0),
            (2, 3, 5, 7, 9, 3, 1),
            (1, 13, 7, 11, 5, 3, 0),
            (3, 4, 6, 8, 8, 1, 0),
            (1, 5, 3, 6, 7, 1, 1),
            (2, 8, 16, 17, 19, 3, 2),
            (1, 2, 3, 10, 12, 5, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let got = conv2d_fast(&x, &wt, Some(&bias), p)?;
            let want = x
                .conv2d(&wt, p, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            assert_eq!(got.dims(), want.dims());
            let err = (got - want)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(err < 1e-4, "{n}x{cin}x{cout}x{h}x{w} k{k} p{p}: {err}");
        }
        Ok(())
    }
}

//! 2-D convolution (stride 1, dilation 1, one group) as `k²` GEMMs over the zero-padded input,
//! with no im2col copy: on the padded grid (width `W + 2p`), the contribution of tap `(ky, kx)`
//! to every output pixel is one matrix product `W[:, :, ky, kx] · Xpad[:, shift..]` where the
//! right-hand side is just the padded image viewed from offset `ky·Wp + kx`. The `Wp − W'`
//! columns that wrap around are computed and dropped when the result is cropped.
//! Other convolutions (strided, grouped, non-f32, non-CPU) go to candle.
use super::bf16::{self, Path};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Conv2d {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Candle(nn::Conv2d),
    /// bf16 weights on the CPU, packed once for the bf16 GEMM (the tensor is not kept).
    Dot(Arc<PackedConv>),
    /// bf16 weights on the CPU, widened to f32 for each call (any stride).
    Widen {
        w: Arc<Vec<half::bf16>>,
        shape: (usize, usize, usize, usize),
        bias: Option<Tensor>,
        cfg: nn::Conv2dConfig,
    },
}

/// Same arguments and tensor names as `candle_nn::conv2d`. bf16 weights on the CPU take f32
/// inputs and give f32 outputs, multiplying along the [`Path`] chosen for the CPU.
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel_size: usize,
    cfg: nn::Conv2dConfig,
    vs: nn::VarBuilder,
) -> Result<Conv2d> {
    Conv2d::new(nn::conv2d(in_channels, out_channels, kernel_size, cfg, vs)?)
}

impl Conv2d {
    pub fn new(inner: nn::Conv2d) -> Result<Self> {
        Self::with_path(inner, bf16::path())
    }

    /// As [`Conv2d::new`], with the bf16 path given (tests and benches compare both).
    pub fn with_path(inner: nn::Conv2d, path: Path) -> Result<Self> {
        let w = inner.weight();
        let c = *inner.config();
        if !(w.device().is_cpu() && w.dtype() == DType::BF16 && w.rank() == 4) {
            return Ok(Self {
                kind: Kind::Candle(inner),
            });
        }
        let bias = inner.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        let stride1 = c.stride == 1 && c.dilation == 1 && c.groups == 1;
        let kind = if path == Path::Dot && stride1 {
            Kind::Dot(Arc::new(PackedConv::new(w, bias.as_ref(), c.padding)?))
        } else {
            Kind::Widen {
                w: Arc::new(w.flatten_all()?.to_vec1::<half::bf16>()?),
                shape: w.dims4()?,
                bias,
                cfg: c,
            }
        };
        Ok(Self { kind })
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let widened;
        let inner = match &self.kind {
            Kind::Dot(p) => {
                return xs
                    .to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op1_no_bwd(&Bf16ConvOp(p.clone()))
            }
            Kind::Widen {
                w,
                shape,
                bias,
                cfg,
            } => {
                let wf = Tensor::from_vec(bf16::unpack(w), *shape, xs.device())?;
                widened = nn::Conv2d::new(wf, bias.clone(), *cfg);
                return Self {
                    kind: Kind::Candle(widened),
                }
                .forward(&xs.to_dtype(DType::F32)?);
            }
            Kind::Candle(inner) => inner,
        };
        let c = inner.config();
        let w = inner.weight();
        let fast = xs.device().is_cpu()
            && xs.dtype() == DType::F32
            && w.dtype() == DType::F32
            && c.stride == 1
            && c.dilation == 1
            && c.groups == 1
            && xs.rank() == 4;
        if !fast {
            return inner.forward(xs);
        }
        conv2d_fast(xs, w, inner.bias(), c.padding)
    }
}

/// The fast path: f32 CPU, stride 1. `x` (N, Cin, H, W), `w` (Cout, Cin, K, K), `b` (Cout).
pub fn conv2d_fast(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let x = x.contiguous()?;
    let w = w.contiguous()?;
    let bias = match b {
        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
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

/// Convolution weights for the bf16 GEMM: tap-major, per tap `cout × ceil(cin/2)` pairs (the
/// `A` operand; the input, interleaved by channel pairs on the padded grid, is `B`).
#[derive(Debug)]
pub struct PackedConv {
    w: Vec<u32>,
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    bias: Option<Vec<f32>>,
}

impl PackedConv {
    pub fn new(w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Self> {
        let (cout, cin, kh, kw) = w.dims4()?;
        let (taps, cp) = (kh * kw, cin.div_ceil(2));
        // One tensor at a time as f32 (bf16 → f32 → bf16 is exact).
        let wf = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let mut packed = vec![0u32; taps * cout * cp];
        packed
            .par_chunks_mut(cout * cp)
            .enumerate()
            .for_each(|(t, dst)| {
                for co in 0..cout {
                    for q in 0..cp {
                        let at = |ci: usize| wf[(co * cin + ci) * taps + t];
                        let hi = if 2 * q + 1 < cin { at(2 * q + 1) } else { 0.0 };
                        dst[co * cp + q] = bf16::pair(at(2 * q), hi);
                    }
                }
            });
        let bias = match b {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            w: packed,
            cout,
            cin,
            kh,
            kw,
            padding,
            bias,
        })
    }
}

/// Fills each of the `rows` rows of `c` (length `len`) with its bias, or zero.
fn fill_rows(c: &mut [f32], len: usize, bias: Option<&[f32]>) {
    c.par_chunks_mut(len).enumerate().for_each(|(r, row)| {
        row.fill(bias.map_or(0.0, |b| b[r]));
    });
}

/// Copies the valid `ho × wo` window of each `grid`-long row block (row width `wp`) to `dst`.
fn crop(acc: &[f32], dst: &mut [f32], grid: usize, wp: usize, ho: usize, wo: usize) {
    dst.par_chunks_mut(ho * wo)
        .zip(acc.par_chunks(grid))
        .for_each(|(d, a)| {
            for y in 0..ho {
                d[y * wo..(y + 1) * wo].copy_from_slice(&a[y * wp..y * wp + wo]);
            }
        });
}

/// f32 in, f32 out; the products run in bf16 with f32 accumulation.
struct Bf16ConvOp(Arc<PackedConv>);

impl CustomOp1 for Bf16ConvOp {
    fn name(&self) -> &'static str {
        "easel-conv2d-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let pc = &*self.0;
        let (n, cin, h, wd) = l.shape().dims4()?;
        if cin != pc.cin {
            candle_core::bail!("conv: {cin} input channels, kernel expects {}", pc.cin);
        }
        let (p, kh, kw, cout) = (pc.padding, pc.kh, pc.kw, pc.cout);
        let (hp, wp) = (h + 2 * p, wd + 2 * p);
        if hp < kh || wp < kw {
            candle_core::bail!("conv: kernel larger than the padded input");
        }
        let (ho, wo) = (hp - kh + 1, wp - kw + 1);
        let x = slice(s, l)?;
        let direct = p == 0 && kh == 1 && kw == 1;
        let cp = cin.div_ceil(2);
        // Channel pairs on the padded grid, `kw` of slack for the wrapped columns.
        let (cs, grid, row) = if direct {
            (h * wd, h * wd, wd)
        } else {
            (hp * wp + kw, ho * wp, wp)
        };
        let mut xb_pairs = vec![0u32; cp * cs];
        let mut out = vec![0f32; n * cout * ho * wo];
        let mut acc = if direct {
            Vec::new()
        } else {
            vec![0f32; cout * grid]
        };
        let parts: Vec<(usize, usize)> = (0..kh * kw)
            .map(|t| (t * cout * cp, (t / kw) * wp + t % kw))
            .collect();
        let dims = bf16::Dims {
            m: cout,
            n: grid,
            kp: cp,
            lda: cp,
            ldb: cs,
            ldc: grid,
        };
        let plane = h * wd;
        for (b, ob) in out.chunks_mut(cout * ho * wo).enumerate() {
            let xb = &x[b * cin * plane..(b + 1) * cin * plane];
            xb_pairs
                .par_chunks_mut(cs)
                .enumerate()
                .for_each(|(q, dst)| {
                    let lo = &xb[2 * q * plane..(2 * q + 1) * plane];
                    let hi =
                        (2 * q + 1 < cin).then(|| &xb[(2 * q + 1) * plane..(2 * q + 2) * plane]);
                    for y in 0..h {
                        let o = (y + p) * row + p;
                        let src = y * wd..(y + 1) * wd;
                        bf16::pair_rows(&lo[src.clone()], hi.map(|r| &r[src]), &mut dst[o..o + wd]);
                    }
                });
            let c: &mut [f32] = if direct { ob } else { &mut acc };
            fill_rows(c, grid, pc.bias.as_deref());
            // SAFETY: the largest B index is (cp-1)*cs + (kh-1)*wp + kw-1 + ho*wp - 1
            // < cp*cs because cs = hp*wp + kw; A and C extents are exactly their buffers.
            unsafe { bf16::gemm(dims, &parts, &pc.w, &xb_pairs, c.as_mut_ptr()) };
            if !direct {
                crop(&acc, ob, grid, wp, ho, wo);
            }
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

    /// Both bf16 paths against candle's f32 convolution of the bf16-rounded operands: only the
    /// summation order differs, so the error stays at f32 rounding level.
    #[test]
    fn bf16_conv_matches_f32_conv_of_rounded_operands() -> Result<()> {
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for &(n, cin, cout, h, w, k, p) in &[
            (1, 1, 1, 1, 1, 1, 0),
            (2, 3, 5, 7, 9, 3, 1),
            (1, 13, 7, 11, 5, 3, 0),
            (3, 4, 6, 8, 8, 1, 0),
            (1, 5, 3, 6, 7, 1, 1),
            (2, 9, 50, 17, 19, 3, 1),
            (1, 2, 3, 10, 12, 5, 2),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?.to_dtype(DType::BF16)?;
            let cfg = nn::Conv2dConfig {
                padding: p,
                ..Default::default()
            };
            for path in [Path::Dot, Path::Widen] {
                let inner = nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg);
                let conv = Conv2d::with_path(inner, path)?;
                let got = conv.forward(&x)?;
                // Dot rounds its input to bf16 too; Widen keeps it f32.
                let xin = if path == Path::Dot {
                    round(&x)?
                } else {
                    x.clone()
                };
                let want = xin
                    .conv2d(&round(&wt)?, p, 1, 1, 1)?
                    .broadcast_add(&round(&bias)?.reshape((1, cout, 1, 1))?)?;
                assert_eq!(got.dims(), want.dims());
                let err = (got - want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(
                    err < 1e-4,
                    "{path:?} {n}x{cin}x{cout}x{h}x{w} k{k} p{p}: {err}"
                );
            }
        }
        Ok(())
    }
}

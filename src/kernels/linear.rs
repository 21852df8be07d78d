//! Linear layers. On the CPU, f32 weights multiply straight into an output pre-filled with the
//! bias, and bf16 weights take f32 inputs and give f32 outputs along the [`Path`] chosen for
//! the CPU; f16 weights and other devices go to candle.
use super::bf16::{self, Path};
use candle_core::{CpuStorage, CustomOp1, CustomOp2, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn as nn;
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Linear {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Candle(nn::Linear),
    /// Weight as `B` pairs: `ceil(k/2)` rows of `n` (see `bf16`), or, where AMX runs and the
    /// shape is whole tiles, as tile panels (`amx::pack_b_panels`; `panels` is then true).
    Dot {
        w: Arc<Vec<u32>>,
        k: usize,
        n: usize,
        bias: Option<Arc<Vec<f32>>>,
        panels: bool,
    },
    /// f32 weights as loaded, or bf16 widened to f32 block by block for each product.
    Cpu(Arc<CpuLinear>),
}

/// An `(n, k)` weight multiplied in f32 straight into the output, its bias pre-filled (candle's
/// linear adds the bias in a second pass over the output). bf16 weights are widened
/// [`WIDEN_BLOCK`] output features at a time into one small buffer: widening the whole weight
/// per call (52 MB for the 1280 → 10240 GEGLU projection) cost a fresh allocation's page faults
/// plus a pass.
#[derive(Debug)]
struct CpuLinear {
    w: Weight,
    k: usize,
    n: usize,
    bias: Option<Vec<f32>>,
}

#[derive(Debug)]
enum Weight {
    /// The loaded tensor itself (contiguous f32 on the CPU), read in place.
    F32(Tensor),
    Bf16(Vec<half::bf16>),
}

/// Output features widened at a time (256 × 1280 f32 = 1.3 MB).
const WIDEN_BLOCK: usize = 256;

impl CustomOp1 for CpuLinear {
    fn name(&self) -> &'static str {
        "easel-linear-bf16"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(s, l, None)
    }
}

/// [`CpuLinear`] with a residual (`x · wᵀ + b + residual`), the residual written into the
/// output before the product adds to it: no separate pass (and buffer) for the add.
struct WithResidual(Arc<CpuLinear>);

impl CustomOp2 for WithResidual {
    fn name(&self) -> &'static str {
        "easel-linear-residual"
    }

    fn cpu_fwd(
        &self,
        s: &CpuStorage,
        l: &Layout,
        rs: &CpuStorage,
        rl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let r = super::f32_slice(rs, rl, "linear residual")?;
        self.0.run(s, l, Some(r))
    }
}

impl CpuLinear {
    fn run(
        &self,
        s: &CpuStorage,
        l: &Layout,
        residual: Option<&[f32]>,
    ) -> Result<(CpuStorage, Shape)> {
        let (k, n) = (self.k, self.n);
        let x = super::f32_slice(s, l, "linear")?;
        let mut dims = l.dims().to_vec();
        if dims.last() != Some(&k) {
            candle_core::bail!("linear: input {dims:?}, weight expects {k} features");
        }
        let rows = x.len() / k.max(1);
        let mut out = with_bias(rows, n, self.bias.as_deref(), residual)?;
        let accumulate = self.bias.is_some() || residual.is_some();
        // out[:, j0..j0+nb] (+)= x · w[j0..j0+nb, :]ᵀ
        let product = |j0: usize, nb: usize, w: &[f32], out: &mut [f32]| {
            // SAFETY: x is rows × k, `w` nb × k (read as its transpose), and output columns
            // j0..j0+nb of rows × n lie inside `out`.
            unsafe {
                super::matmul(
                    rows,
                    nb,
                    k,
                    out.as_mut_ptr().add(j0),
                    n,
                    accumulate,
                    x.as_ptr(),
                    (k as isize, 1),
                    w.as_ptr(),
                    (1, k as isize),
                    true,
                );
            }
        };
        match &self.w {
            Weight::F32(w) => {
                let (storage, layout) = w.storage_and_layout();
                let candle_core::Storage::Cpu(cpu) = &*storage else {
                    candle_core::bail!("linear: f32 weights must be on the CPU");
                };
                product(0, n, super::f32_slice(cpu, layout, "linear")?, &mut out)
            }
            Weight::Bf16(w) => {
                let mut wide = vec![0f32; WIDEN_BLOCK.min(n) * k];
                for j0 in (0..n).step_by(WIDEN_BLOCK) {
                    let nb = WIDEN_BLOCK.min(n - j0);
                    let wb = &mut wide[..nb * k];
                    wb.par_chunks_mut(k)
                        .zip(w[j0 * k..(j0 + nb) * k].par_chunks(k))
                        .for_each(|(d, s)| bf16::widen(s, d));
                    product(j0, nb, wb, &mut out);
                }
            }
        }
        *dims.last_mut().unwrap() = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// Same arguments and tensor names as `candle_nn::linear`.
pub fn linear(in_dim: usize, out_dim: usize, vs: nn::VarBuilder) -> Result<Linear> {
    Linear::new(nn::linear(in_dim, out_dim, vs)?)
}

/// Same arguments and tensor names as `candle_nn::linear_no_bias`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vs: nn::VarBuilder) -> Result<Linear> {
    Linear::new(nn::linear_no_bias(in_dim, out_dim, vs)?)
}

impl Linear {
    /// Whether the weight is stored as AMX tile panels.
    #[cfg(test)]
    fn panels(&self) -> bool {
        matches!(self.kind, Kind::Dot { panels: true, .. })
    }

    /// Whether the weights are bf16 on the CPU (the layer belongs to a `--dtype bf16` model).
    pub fn is_bf16(&self) -> bool {
        match &self.kind {
            Kind::Candle(l) => l.weight().dtype() == DType::BF16,
            Kind::Dot { .. } => true,
            Kind::Cpu(c) => matches!(c.w, Weight::Bf16(_)),
        }
    }

    pub fn new(inner: nn::Linear) -> Result<Self> {
        Self::with_path(inner, bf16::path())
    }

    /// As [`Linear::new`], with the bf16 path given (tests and benches compare both).
    pub fn with_path(inner: nn::Linear, path: Path) -> Result<Self> {
        let w = inner.weight();
        if !(w.device().is_cpu() && w.rank() == 2) {
            return Ok(Self {
                kind: Kind::Candle(inner),
            });
        }
        if w.dtype() == DType::F32 {
            let (n, k) = w.dims2()?;
            return Ok(Self {
                kind: Kind::Cpu(Arc::new(CpuLinear {
                    w: Weight::F32(w.contiguous()?),
                    k,
                    n,
                    bias: match inner.bias() {
                        Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                        None => None,
                    },
                })),
            });
        }
        if w.dtype() != DType::BF16 {
            return Ok(Self {
                kind: Kind::Candle(inner),
            });
        }
        let (n, k) = w.dims2()?;
        let bits = w.flatten_all()?.to_vec1::<half::bf16>()?;
        let kind = match path {
            Path::Dot => {
                let kp = k.div_ceil(2);
                let at = |j: usize, p: usize| {
                    let lo = bits[j * k + 2 * p].to_bits() as u32;
                    let hi = if 2 * p + 1 < k {
                        bits[j * k + 2 * p + 1].to_bits() as u32
                    } else {
                        0
                    };
                    lo | hi << 16
                };
                // Tile panels: a row-major weight put each of a `B` tile's 16 rows a whole
                // weight row apart (40 KiB for the 1280 → 10240 GEGLU projection, so 16 pages
                // per tile load). Round-robin in examples/amxbench: that projection 536 → 811
                // GFLOP/s, 320 → 2560 577 → 719, 640 → 640 671 → 932.
                let panels = bf16::panels_fit(n, kp);
                let packed = if panels {
                    super::amx::pack_b_panels(kp, n, |p, j| at(j, p))
                } else {
                    (0..kp * n).map(|i| at(i % n, i / n)).collect()
                };
                let bias = match inner.bias() {
                    Some(b) => Some(Arc::new(b.to_dtype(DType::F32)?.to_vec1::<f32>()?)),
                    None => None,
                };
                Kind::Dot {
                    w: Arc::new(packed),
                    k,
                    n,
                    bias,
                    panels,
                }
            }
            Path::Widen => Kind::Cpu(Arc::new(CpuLinear {
                w: Weight::Bf16(bits),
                k,
                n,
                bias: match inner.bias() {
                    Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
                    None => None,
                },
            })),
        };
        Ok(Self { kind })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match &self.kind {
            Kind::Candle(inner) => inner.forward(xs),
            Kind::Cpu(op) => xs
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(op.as_ref()),
            Kind::Dot { .. } => self.dot(xs, None),
        }
    }
}

impl Linear {
    /// `self.forward(xs) + residual` (the transformer blocks' skip additions; plain `forward`
    /// without one): on the CPU's own paths the residual is written into the output before the
    /// product accumulates into it, instead of a second pass and a third buffer. A residual of
    /// another shape is broadcast-added after the product.
    pub fn forward_add(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        let Some(residual) = residual else {
            return self.forward(xs);
        };
        let out_dims = match xs.dims().split_last() {
            Some((_, lead)) => [lead, &[self.out_features()]].concat(),
            None => vec![],
        };
        let fused = residual.device().is_cpu()
            && residual.dtype() == DType::F32
            && residual.dims() == out_dims.as_slice();
        match &self.kind {
            Kind::Cpu(op) if fused => {
                let residual = residual.contiguous()?;
                xs.to_dtype(DType::F32)?
                    .contiguous()?
                    .apply_op2_no_bwd(&residual, &WithResidual(op.clone()))
            }
            Kind::Dot { .. } if fused => self.dot(xs, Some(&residual.contiguous()?)),
            _ => self.forward(xs)?.broadcast_add(residual),
        }
    }

    /// Output features (`n`).
    fn out_features(&self) -> usize {
        match &self.kind {
            Kind::Candle(l) => l.weight().dim(0).unwrap_or(0),
            Kind::Dot { n, .. } => *n,
            Kind::Cpu(c) => c.n,
        }
    }

    /// The bf16-pairs product (`Kind::Dot`), plus `residual` when given.
    fn dot(&self, xs: &Tensor, residual: Option<&Tensor>) -> Result<Tensor> {
        match &self.kind {
            Kind::Dot {
                w,
                k,
                n,
                bias,
                panels,
            } => {
                let xs = xs.to_dtype(DType::F32)?.contiguous()?;
                let mut dims = xs.dims().to_vec();
                let rows = xs.elem_count() / k;
                // Paired straight from the tensor's storage (was a `to_vec1` copy first), the
                // output prefilled with the bias across the pool (was a `memset` and a bias
                // copy on this thread).
                let a = {
                    let (storage, layout) = xs.storage_and_layout();
                    let candle_core::Storage::Cpu(cpu) = &*storage else {
                        candle_core::bail!("linear: bf16 pairs need a CPU input");
                    };
                    bf16::pack_a(super::f32_slice(cpu, layout, "linear")?, rows, *k)
                };
                let held = residual.map(|r| r.storage_and_layout());
                let r = match &held {
                    Some((storage, layout)) => {
                        let candle_core::Storage::Cpu(cpu) = &**storage else {
                            candle_core::bail!("linear: the residual must be on the CPU");
                        };
                        Some(super::f32_slice(cpu, layout, "linear residual")?)
                    }
                    None => None,
                };
                let mut out = with_bias(rows, *n, bias.as_ref().map(|b| b.as_slice()), r)?;
                let kp = k.div_ceil(2);
                let d = bf16::Dims {
                    m: rows,
                    n: *n,
                    k: kp,
                    lda: kp,
                    ldb: *n,
                    ldc: *n,
                };
                // SAFETY: `a` is rows × kp, `w` kp × n (as pair rows or panels), `out` rows × n,
                // all contiguous; panels exist only where AMX runs.
                match panels {
                    #[cfg(target_arch = "x86_64")]
                    true => unsafe { bf16::gemm_b_panels(d, &a, w, out.as_mut_ptr()) },
                    _ => unsafe { bf16::gemm(d, &[(0, 0)], &a, w, out.as_mut_ptr()) },
                }
                *dims.last_mut().unwrap() = *n;
                Tensor::from_vec(out, dims, xs.device())
            }
            _ => candle_core::bail!("linear: not a bf16-pairs layer"),
        }
    }
}

/// A `rows × n` output with every row set to `bias` (zeros without one), plus the matching
/// row of `residual` when given, built across the pool (see [`super::par_filled`]): the
/// products then add into it.
fn with_bias(
    rows: usize,
    n: usize,
    bias: Option<&[f32]>,
    residual: Option<&[f32]>,
) -> Result<Vec<f32>> {
    if let Some(r) = residual {
        if r.len() != rows * n {
            candle_core::bail!("linear: residual of {} values for {rows} × {n}", r.len());
        }
    }
    // The rows below are written whole only if the bias is a whole row.
    if let Some(b) = bias {
        if b.len() != n {
            candle_core::bail!("linear: bias of {} values for {n} outputs", b.len());
        }
    }
    // Several rows per task to amortise scheduling.
    let per = (16384 / n.max(1)).max(1);
    // SAFETY: each branch writes the whole chunk (whole rows of n: per · n values, the last
    // chunk fewer rows).
    Ok(unsafe {
        super::par_written(rows * n, per * n, |t, c| match (residual, bias) {
            (Some(r), Some(b)) => {
                let r = &r[t * per * n..][..c.len()];
                for (row, r) in c.chunks_mut(n).zip(r.chunks(n)) {
                    for ((x, &r), &b) in row.iter_mut().zip(r).zip(b) {
                        x.write(r + b);
                    }
                }
            }
            (Some(r), None) => {
                c.write_copy_of_slice(&r[t * per * n..][..c.len()]);
            }
            (None, Some(b)) => c.chunks_mut(n).for_each(|row| {
                row.write_copy_of_slice(b);
            }),
            (None, None) => c.fill(std::mem::MaybeUninit::new(0.0)),
        })
    })
}

/// `candle_nn::layer_norm`, with bf16 parameters on the CPU widened to f32 once (the
/// activations they meet are f32 there).
pub fn layer_norm(dim: usize, eps: f64, vs: nn::VarBuilder) -> Result<nn::LayerNorm> {
    let ln = nn::layer_norm(dim, eps, vs)?;
    if ln.weight().device().is_cpu() && ln.weight().dtype() == DType::BF16 {
        let bias = ln.bias().map(|b| b.to_dtype(DType::F32)).transpose()?;
        let weight = ln.weight().to_dtype(DType::F32)?;
        return Ok(match bias {
            Some(b) => nn::LayerNorm::new(weight, b, eps),
            None => nn::LayerNorm::new_no_bias(weight, eps),
        });
    }
    Ok(ln)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Both bf16 paths against candle's f32 linear on the same (bf16-valued) weights, with and
    /// without bias, including widths that span several widened blocks (600 = 2·256 + 88); the
    /// `Dot` path also rounds its input, so it is compared with the rounded input.
    #[test]
    fn bf16_linear_matches_f32_linear() -> Result<()> {
        let dev = Device::Cpu;
        for &(rows, k, n) in &[
            (1, 1, 1),
            (3, 7, 5),
            (2 * 77, 33, 50),
            (5, 64, 130),
            (3, 40, 600),
            // Whole tiles (panels on AMX): rows in whole blocks, with a remainder, and fewer
            // than one block.
            (16, 32, 64),
            (77, 64, 96),
            (5, 96, 128),
        ] {
            let x = Tensor::randn(0f32, 1.0, (2, rows, k), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?.to_dtype(DType::BF16)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?.to_dtype(DType::BF16)?;
            let wf = w.to_dtype(DType::F32)?;
            let bf = b.to_dtype(DType::F32)?;
            let xr = x.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            for bias in [true, false] {
                let reference = nn::Linear::new(wf.clone(), bias.then(|| bf.clone()));
                for path in [Path::Dot, Path::Widen] {
                    let inner = nn::Linear::new(w.clone(), bias.then(|| b.clone()));
                    let lin = Linear::with_path(inner, path)?;
                    let tiles = k % 32 == 0 && n % 32 == 0 && path == Path::Dot;
                    let amx = bf16::kernel() == bf16::Kernel::Amx;
                    assert_eq!(lin.panels(), tiles && amx, "{rows}x{k}x{n}: panels");
                    let got = lin.forward(&x)?;
                    let want = reference.forward(if path == Path::Dot { &xr } else { &x })?;
                    assert_eq!(got.dims(), want.dims());
                    let err = crate::kernels::max_abs_diff(&got, &want)?;
                    assert!(err < 1e-4, "{path:?} {rows}x{k}x{n} bias {bias}: {err}");
                }
            }
        }
        Ok(())
    }

    /// `forward_add` equals `forward` + the residual on every path (f32, both bf16 paths, with
    /// and without bias, whole tiles and not), and falls back to a plain add on a residual of
    /// another shape (a broadcast).
    #[test]
    fn forward_add_equals_forward_plus_residual() -> Result<()> {
        let dev = Device::Cpu;
        for &(rows, k, n) in &[(1, 1, 1), (2 * 77, 33, 50), (16, 64, 96), (5, 96, 128)] {
            let x = Tensor::randn(0f32, 1.0, (2, rows, k), &dev)?;
            let r = Tensor::randn(0f32, 1.0, (2, rows, n), &dev)?;
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            for bias in [true, false] {
                let mut layers = vec![Linear::new(nn::Linear::new(
                    w.clone(),
                    bias.then(|| b.clone()),
                ))?];
                for path in [Path::Dot, Path::Widen] {
                    let (wb, bb) = (w.to_dtype(DType::BF16)?, b.to_dtype(DType::BF16)?);
                    layers.push(Linear::with_path(
                        nn::Linear::new(wb, bias.then_some(bb)),
                        path,
                    )?);
                }
                for lin in &layers {
                    let want = (lin.forward(&x)? + &r)?;
                    let got = lin.forward_add(&x, Some(&r))?;
                    assert_eq!(got.dims(), want.dims());
                    let err = crate::kernels::max_abs_diff(&got, &want)?;
                    assert!(err < 1e-5, "{rows}x{k}x{n} bias {bias}: {err}");
                }
                let row = r.narrow(1, 0, 1)?;
                let got = layers[0].forward_add(&x, Some(&row))?;
                let want = layers[0].forward(&x)?.broadcast_add(&row)?;
                assert!(crate::kernels::max_abs_diff(&got, &want)? < 1e-6);
            }
        }
        Ok(())
    }

    /// f32 weights on the CPU (the direct product with the bias pre-filled) against candle's
    /// linear, 2-d and 3-d inputs, with and without bias.
    #[test]
    fn f32_linear_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        for &(rows, k, n) in &[(1, 1, 1), (3, 7, 5), (2 * 77, 33, 50), (5, 64, 600)] {
            let w = Tensor::randn(0f32, 1.0, (n, k), &dev)?;
            let b = Tensor::randn(0f32, 1.0, n, &dev)?;
            for x in [
                Tensor::randn(0f32, 1.0, (rows, k), &dev)?,
                Tensor::randn(0f32, 1.0, (2, rows, k), &dev)?,
            ] {
                for bias in [true, false] {
                    let inner = nn::Linear::new(w.clone(), bias.then(|| b.clone()));
                    let got = Linear::new(inner.clone())?.forward(&x)?;
                    let want = inner.forward(&x)?;
                    assert_eq!(got.dims(), want.dims());
                    let err = crate::kernels::max_abs_diff(&got, &want)?;
                    assert!(err < 1e-4, "{rows}x{k}x{n} bias {bias}: {err}");
                }
            }
        }
        Ok(())
    }
}

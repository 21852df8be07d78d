//! 2-D convolution (stride 1, dilation 1, one group) as `k²` GEMMs over the zero-padded input,
//! with no im2col copy: on the padded grid (width `W + 2p`), the contribution of tap `(ky, kx)`
//! to every output pixel is one matrix product `W[:, :, ky, kx] · Xpad[:, shift..]` where the
//! right-hand side is just the padded image viewed from offset `ky·Wp + kx`. The `Wp − W'`
//! columns that wrap around are computed and dropped when the result is cropped. The weights
//! are stored tap-major once at load: f32 taps go to gemm one call each; bf16 pairs go to
//! [`super::tiled`], which sums all taps per cache block of the output. 3×3 convolutions with
//! padding 1 on images of 64+ 4×4 tiles go to [`super::winograd`] instead (4× fewer multiplies).
//! Other convolutions (strided, grouped, non-CPU, f16) go to candle.
use super::bf16::{self, Path};
use super::tiled::{self, Dims};
use super::winograd;
use super::SendPtr;
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn as nn;
use rayon::prelude::*;
use std::sync::Arc;

#[derive(Debug, Clone)]
pub struct Conv2d {
    kind: Kind,
    /// Winograd allowed where it pays (off only to compare).
    winograd: bool,
}

#[derive(Debug, Clone)]
enum Kind {
    Candle(nn::Conv2d),
    /// CPU, stride 1: tap-major weights (f32, bf16 pairs, or bf16 widened per call).
    Taps(Arc<PackedConv>),
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
        let cpu = w.device().is_cpu() && w.rank() == 4;
        let stride1 = c.stride == 1 && c.dilation == 1 && c.groups == 1;
        let kind = match w.dtype() {
            DType::F32 | DType::BF16 if cpu && stride1 => {
                let form = match (w.dtype(), path) {
                    (DType::F32, _) => Form::F32,
                    (_, Path::Dot) => Form::Pairs,
                    (_, Path::Widen) => Form::Widen,
                };
                Kind::Taps(Arc::new(PackedConv::new(w, inner.bias(), c.padding, form)?))
            }
            // Strided bf16 convolutions (three downsamplers in the UNet) run on candle in f32.
            DType::BF16 if cpu => {
                let f32 = |t: &Tensor| t.to_dtype(DType::F32);
                let bias = inner.bias().map(f32).transpose()?;
                Kind::Candle(nn::Conv2d::new(f32(w)?, bias, c))
            }
            _ => Kind::Candle(inner),
        };
        Ok(Self {
            kind,
            winograd: true,
        })
    }

    /// The same layer on the tap GEMMs only (benches compare the two).
    pub fn without_winograd(self) -> Self {
        Self {
            winograd: false,
            ..self
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.forward_with(xs, Epilogue::default())
    }
}

/// What a convolution adds to its output as it writes it, instead of in passes of their own
/// over the whole activation (a ResNet block's time embedding after its first convolution and
/// its shortcut after the second: two full reads and writes of each block's output, through
/// candle's broadcast and binary ops). The result is the same, rounding included:
/// `(conv + shift) + residual`, each term added in that order.
#[derive(Debug, Clone, Copy, Default)]
pub struct Epilogue<'a> {
    /// `(n, cout)` (or `(1, cout)` for every image): added to every pixel of channel `c` of
    /// image `i`.
    pub shift: Option<&'a Tensor>,
    /// `(n, cout, ho, wo)`: added element by element.
    pub residual: Option<&'a Tensor>,
}

impl Conv2d {
    /// `forward(xs)` with the epilogue's terms added (see [`Epilogue`]).
    pub fn forward_with(&self, xs: &Tensor, e: Epilogue) -> Result<Tensor> {
        match &self.kind {
            Kind::Taps(p) if xs.rank() == 4 => {
                let shift = match e.shift {
                    Some(s) => Some(s.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
                    None => None,
                };
                let residual = match e.residual {
                    Some(r) => Some(r.to_dtype(DType::F32)?.contiguous()?),
                    None => None,
                };
                let op = TapsOp {
                    conv: p.clone(),
                    winograd: self.winograd,
                    shift,
                    residual,
                };
                xs.to_dtype(DType::F32)?.contiguous()?.apply_op1_no_bwd(&op)
            }
            Kind::Taps(_) => {
                candle_core::bail!("conv2d: expected a 4-d input, got {:?}", xs.dims())
            }
            Kind::Candle(inner) => {
                let mut ys = inner.forward(xs)?;
                if let Some(s) = e.shift {
                    ys = ys.broadcast_add(&s.unsqueeze(D::Minus1)?.unsqueeze(D::Minus1)?)?;
                }
                match e.residual {
                    Some(r) => ys + r,
                    None => Ok(ys),
                }
            }
        }
    }
}

/// [`Epilogue`]'s terms as slices, checked against the output's shape.
#[derive(Clone, Copy, Default)]
pub(crate) struct Adds<'a> {
    /// `n × cout`.
    pub shift: Option<&'a [f32]>,
    /// `n × cout × plane`.
    pub residual: Option<&'a [f32]>,
}

impl Adds<'_> {
    /// Adds the terms for image `i`, channel `co` of `cout`, to `dst`: that plane's pixels from
    /// `at` on (`plane` pixels a channel).
    #[inline]
    pub fn apply(
        &self,
        i: usize,
        co: usize,
        cout: usize,
        plane: usize,
        at: usize,
        dst: &mut [f32],
    ) {
        if let Some(s) = self.shift {
            // One row of shifts serves every image (a time embedding of batch 1).
            let s = if s.len() == cout {
                s[co]
            } else {
                s[i * cout + co]
            };
            dst.iter_mut().for_each(|d| *d += s);
        }
        if let Some(r) = self.residual {
            let r = &r[(i * cout + co) * plane + at..][..dst.len()];
            dst.iter_mut().zip(r).for_each(|(d, &r)| *d += r);
        }
    }

    fn is_empty(&self) -> bool {
        self.shift.is_none() && self.residual.is_none()
    }
}

/// f32 convolution as a layer would run it (Winograd where it pays), packing `w` on the fly
/// (tests, benches and one-off calls; layers pack once at load). `x` (N, Cin, H, W), `w` (Cout,
/// Cin, K, K), `b` (Cout).
pub fn conv2d_fast(x: &Tensor, w: &Tensor, b: Option<&Tensor>, padding: usize) -> Result<Tensor> {
    let packed = PackedConv::new(&w.to_dtype(DType::F32)?, b, padding, Form::F32)?;
    let op = TapsOp {
        conv: Arc::new(packed),
        winograd: true,
        shift: None,
        residual: None,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

/// The Winograd tile for a 3×3 layer given what [`winograd::pays`] offers and, for bf16 pair
/// weights, the kernel that would run their taps. Winograd's GEMMs are f32 (rounding its
/// transformed operands to bf16 costs 10× a bf16 convolution's error with F(4×4): simulated
/// against a float64 direct convolution, rms 2.4e-2 vs 2.4e-3), so bf16 taps win wherever they
/// multiply fast enough:
/// * AMX: always (see the measurements at the call).
/// * `vdpbf16ps` (Zen 4 runs it at twice the f32 FMA's flop rate): nine taps at twice the rate
///   cost 4.5 f32 multiplies per output against F(2×2)'s 4 plus its transforms. Zen 4, 2 cores,
///   `examples/wbench` 2×1280→1280 at 16², three runs: taps 47.7–79.3 ms, F(2×2) 62.7–100.4.
///   F(4×4)'s 2.25 still pays (2×320 at 64²: 37.7 vs 53 ms).
fn winograd_tile(
    offered: Option<winograd::Tile>,
    pairs: Option<bf16::Kernel>,
) -> Option<winograd::Tile> {
    match (offered, pairs) {
        (_, Some(bf16::Kernel::Amx)) => None,
        (Some(winograd::Tile::F2), Some(bf16::Kernel::Dot)) => None,
        (t, _) => t,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Form {
    F32,
    Pairs,
    Widen,
}

#[derive(Debug)]
enum TapWeights {
    F32(Vec<f32>),
    /// bf16 pairs along `cin` (the `A` operand of `bf16::gemm`).
    Pairs(Vec<u32>),
    /// The same pairs as AMX tile panels, tap by tap (`amx::pack_a_panels`): where AMX runs and
    /// `cout`, `cin` are whole tiles (every UNet and VAE layer but the first and last).
    Panels(Vec<u32>),
    /// bf16, tap-major like `F32`, widened for each call.
    Widen(Vec<half::bf16>),
}

/// Convolution weights stored tap-major: per tap a `cout × cin` matrix (`cout × ceil(cin/2)`
/// pairs for `Pairs`), the `A` operand; the input on its padded grid is `B`.
#[derive(Debug)]
pub struct PackedConv {
    w: TapWeights,
    cout: usize,
    cin: usize,
    kh: usize,
    kw: usize,
    padding: usize,
    bias: Option<Vec<f32>>,
}

impl PackedConv {
    fn new(w: &Tensor, b: Option<&Tensor>, padding: usize, form: Form) -> Result<Self> {
        let (cout, cin, kh, kw) = w.dims4()?;
        let taps = kh * kw;
        let w = match form {
            Form::F32 => w.to_dtype(DType::F32)?,
            Form::Pairs | Form::Widen => w.to_dtype(DType::BF16)?,
        }
        .contiguous()?;
        // Straight from the tensor's storage, read in its own order (each element once,
        // written to `taps` streams): a strided read per tap plane and two full copies before
        // it made packing ~25% of loading a UNet.
        let (storage, layout) = w.storage_and_layout();
        let candle_core::Storage::Cpu(cpu) = &*storage else {
            candle_core::bail!("conv: packed weights must be on the CPU");
        };
        let (o0, o1) = layout
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("conv: non-contiguous weights".into()))?;
        let size = cout * cin;
        let w = match (cpu, form) {
            (CpuStorage::F32(v), Form::F32) => TapWeights::F32(tap_major(&v[o0..o1], size, taps)),
            (CpuStorage::BF16(v), Form::Widen) => {
                TapWeights::Widen(tap_major(&v[o0..o1], size, taps))
            }
            (CpuStorage::BF16(v), Form::Pairs) => {
                let src = &v[o0..o1];
                let cp = cin.div_ceil(2);
                if bf16::panels_fit(cout, cp) {
                    // Straight from the weights, tap by tap (no row-major copy first).
                    let mut panels = Vec::with_capacity(taps * cout * cp);
                    for t in 0..taps {
                        let at = |co, q| tap_pair(src, cin, taps, co, q, t);
                        panels.extend(super::amx::pack_a_panels(cout, cp, at));
                    }
                    TapWeights::Panels(panels)
                } else {
                    TapWeights::Pairs(tap_pairs(src, cout, cin, taps))
                }
            }
            _ => candle_core::bail!("conv: weights not in the dtype of their form"),
        };
        let bias = match b {
            Some(b) => Some(b.to_dtype(DType::F32)?.to_vec1::<f32>()?),
            None => None,
        };
        Ok(Self {
            w,
            cout,
            cin,
            kh,
            kw,
            padding,
            bias,
        })
    }
}

/// `(cout·cin) × taps` weights (candle's order) → `taps × (cout·cin)`.
fn tap_major<T: Copy + Default + Send + Sync>(src: &[T], size: usize, taps: usize) -> Vec<T> {
    let mut v = vec![T::default(); taps * size];
    let out = SendPtr(v.as_mut_ptr());
    const B: usize = 1 << 14;
    (0..size.div_ceil(B)).into_par_iter().for_each(|b| {
        let out = &out;
        for e in b * B..((b + 1) * B).min(size) {
            for t in 0..taps {
                // SAFETY: element e of tap t lies inside `v` and only block b writes it.
                unsafe { *out.0.add(t * size + e) = src[e * taps + t] };
            }
        }
    });
    v
}

/// Channels `2q`, `2q + 1` of output channel `co`, tap `t`, of bf16 `(cout, cin, taps)` weights as
/// one pair (an odd channel count pairs its last channel with zero).
#[inline(always)]
fn tap_pair(src: &[half::bf16], cin: usize, taps: usize, co: usize, q: usize, t: usize) -> u32 {
    let at = |ci: usize| src[(co * cin + ci) * taps + t].to_bits() as u32;
    let hi = if 2 * q + 1 < cin { at(2 * q + 1) } else { 0 };
    at(2 * q) | hi << 16
}

/// bf16 `(cout, cin, taps)` weights → per tap `cout × ceil(cin/2)` channel pairs.
fn tap_pairs(src: &[half::bf16], cout: usize, cin: usize, taps: usize) -> Vec<u32> {
    let cp = cin.div_ceil(2);
    let plane = cout * cp;
    let mut v = vec![0u32; taps * plane];
    let out = SendPtr(v.as_mut_ptr());
    (0..cout).into_par_iter().for_each(|co| {
        let out = &out;
        for q in 0..cp {
            for t in 0..taps {
                // SAFETY: pair q of row co of tap t lies inside `v`; only task co writes it.
                unsafe { *out.0.add(t * plane + co * cp + q) = tap_pair(src, cin, taps, co, q, t) };
            }
        }
    });
    v
}

/// `count` rows of `len` values, row `r` set to the bias of channel `r % cout` (zeros without
/// one), built across the pool: the accumulator a convolution's products add into.
fn bias_rows(count: usize, len: usize, cout: usize, bias: Option<&[f32]>) -> Vec<f32> {
    // SAFETY: each chunk is one row, filled whole.
    unsafe {
        super::par_written(count * len, len, |r, row| {
            row.fill(std::mem::MaybeUninit::new(
                bias.map_or(0.0, |b| b[r % cout]),
            ));
        })
    }
}

/// A 1×1 convolution without padding, one GEMM per image straight into its output plane
/// (pre-filled with the bias), then the epilogue: a 1×1 kernel needs neither padding nor
/// shifted views, so the tap path's crop (and, for f32, its canvas: two copies of 10 MB for a
/// transformer's `proj_in`/`proj_out` at 64²) would move the data for nothing. Image `i`'s `B`
/// is `k` rows `ldb` apart from `b[i·step..]`.
///
/// # Safety
/// Every image's `B` lies inside `b`, `w` is `cout × k` (as `mm` reads it), and the CPU runs
/// `mm` on `(cout, plane, k)` (the AMX panel kernel needs `plane` in whole 32-column blocks).
unsafe fn per_image<A, E>(
    (n, cout, plane, k): (usize, usize, usize, usize),
    (b, ldb, step): (&[E], usize, usize),
    w: &[A],
    mm: TapGemm<A, E>,
    bias: Option<&[f32]>,
    adds: Adds,
) -> Vec<f32> {
    let mut out = bias_rows(n * cout, plane, cout, bias);
    let dims = Dims {
        m: cout,
        n: plane,
        k,
        lda: k,
        ldb,
        ldc: plane,
    };
    for i in 0..n {
        // SAFETY: the caller's extents; C is image i's cout × plane of `out`.
        unsafe {
            mm(
                dims,
                &[(0, i * step)],
                w,
                b,
                out.as_mut_ptr().add(i * cout * plane),
            )
        };
    }
    if !adds.is_empty() {
        out.par_chunks_mut(plane.max(1))
            .enumerate()
            .for_each(|(ic, d)| adds.apply(ic / cout, ic % cout, cout, plane, 0, d));
    }
    out
}

/// Geometry of one call. The batch is stacked into one tall canvas (image `i`'s padded rows
/// start at row `i·hp`), so every image goes through the same GEMM: at the UNet's 16² and 8²
/// levels (1280 channels, 80–288 output columns per image) that doubles the GEMM's width and
/// streams each tap's weights once instead of once per image. Output rows that straddle two
/// images are computed and dropped with the wrapped columns.
struct Geometry {
    n: usize,
    cin: usize,
    h: usize,
    wd: usize,
    p: usize,
    hp: usize,
    wp: usize,
    ho: usize,
    wo: usize,
    /// Elements per `B` row: one channel (or channel pair) of the whole canvas, + `kw` slack.
    cs: usize,
    /// Output columns: the canvas's `n·hp − kh + 1` rows of width `wp`.
    grid: usize,
}

/// `C += Σ_taps A_tap · B_tap` (`tiled::gemm_f32`, `tiled::gemm_widen` or `bf16::gemm`).
type TapGemm<A, E> = unsafe fn(Dims, &[(usize, usize)], &[A], &[E], *mut f32);

/// f32 in, f32 out, with an [`Epilogue`]'s terms.
struct TapsOp {
    conv: Arc<PackedConv>,
    /// Winograd allowed.
    winograd: bool,
    shift: Option<Vec<f32>>,
    /// f32, contiguous.
    residual: Option<Tensor>,
}

impl TapsOp {
    /// `fill(b)` lays the batch out as `B` (one canvas row of `cs` per channel or pair), `mm`
    /// sums the taps into the accumulator, which is then cropped into the output.
    ///
    /// The product covers `grid` rounded up to `pad` columns (32 on AMX, so that no column
    /// remainder falls to the slower `vdpbf16ps` edge kernel: the 8² level's 180-column grid left
    /// 20 there); the extra columns read the next canvas row (or `B`'s slack) and are dropped.
    #[allow(clippy::too_many_arguments)]
    fn run<A, E: Copy + Default + Send + Sync>(
        &self,
        g: &Geometry,
        rows: usize,
        w: &[A],
        fill: impl Fn(usize, &mut [E]) + Sync + Send,
        mm: TapGemm<A, E>,
        pad: usize,
        adds: Adds,
    ) -> Vec<f32> {
        let pc = &*self.conv;
        let (cout, kw) = (pc.cout, pc.kw);
        let ldc = g.grid.next_multiple_of(pad);
        // Canvas row r (< rows) is channel (pair) r; the slack past the last is zeros.
        let b = super::par_filled(rows * g.cs + (ldc - g.grid), g.cs, |r, dst| {
            if r < rows {
                fill(r, dst)
            }
        });
        let bias = pc.bias.as_deref();
        let plane = g.ho * g.wo;
        if kw == 1 && pc.kh == 1 && g.p == 0 && plane.is_multiple_of(pad) {
            // Image i is columns i·plane.. of every canvas row (the pairing is the one copy).
            // SAFETY: B rows 0..rows × columns i·plane..(i+1)·plane lie inside the canvas
            // (rows × cs, cs ≥ n·plane); A is cout × rows; `pad` divides `plane`.
            let dims = (g.n, cout, plane, rows);
            return unsafe { per_image(dims, (&b, g.cs, plane), w, mm, bias, adds) };
        }
        let mut acc = bias_rows(cout, ldc, cout, bias);
        let parts: Vec<(usize, usize)> = (0..pc.kh * kw)
            .map(|t| (t * cout * rows, (t / kw) * g.wp + t % kw))
            .collect();
        let dims = Dims {
            m: cout,
            n: ldc,
            k: rows,
            lda: rows,
            ldb: g.cs,
            ldc,
        };
        // SAFETY: the largest B index is (rows-1)*cs + (kh-1)*wp + kw-1 + ldc-1
        // = (rows-1)*cs + n*hp*wp + kw-2 + (ldc-grid) < rows*cs + (ldc-grid) = b.len() as
        // cs = n*hp*wp + kw; A is taps × cout × rows and C exactly cout × ldc.
        unsafe { mm(dims, &parts, w, &b, acc.as_mut_ptr()) };
        drop(b);
        if g.n == 1 {
            // One image: crop in place rather than into a second buffer (the VAE's 512² layers
            // are 134 MB each). Rows only move left, so in order is safe.
            for co in 0..cout {
                for y in 0..g.ho {
                    let from = co * ldc + y * g.wp;
                    let to = (co * g.ho + y) * g.wo;
                    acc.copy_within(from..from + g.wo, to);
                    adds.apply(0, co, cout, plane, y * g.wo, &mut acc[to..to + g.wo]);
                }
            }
            acc.truncate(cout * plane);
            acc.shrink_to_fit();
            return acc;
        }
        // SAFETY: chunk ic is one output plane (ho rows of wo), every row copied below.
        unsafe {
            super::par_written(g.n * cout * plane, plane, |ic, d| {
                let (i, co) = (ic / cout, ic % cout);
                let a = &acc[co * ldc..(co + 1) * ldc];
                for y in 0..g.ho {
                    let from = (i * g.hp + y) * g.wp;
                    d[y * g.wo..(y + 1) * g.wo].write_copy_of_slice(&a[from..from + g.wo]);
                }
                if !adds.is_empty() {
                    adds.apply(i, co, cout, plane, 0, super::assume_written(d));
                }
            })
        }
    }
}

impl CustomOp1 for TapsOp {
    fn name(&self) -> &'static str {
        "easel-conv2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let pc = &*self.conv;
        let (n, cin, h, wd) = l.shape().dims4()?;
        if cin != pc.cin {
            candle_core::bail!("conv: {cin} input channels, kernel expects {}", pc.cin);
        }
        let (p, kh, kw) = (pc.padding, pc.kh, pc.kw);
        let (hp, wp) = (h + 2 * p, wd + 2 * p);
        if hp < kh || wp < kw {
            candle_core::bail!("conv: kernel larger than the padded input");
        }
        let (ho, wo) = (hp - kh + 1, wp - kw + 1);
        let g = Geometry {
            n,
            cin,
            h,
            wd,
            p,
            hp,
            wp,
            ho,
            wo,
            cs: n * hp * wp + kw,
            grid: (n * hp - kh + 1) * wp,
        };
        let x = super::f32_slice(s, l, "conv")?;
        let guard = self.residual.as_ref().map(|r| r.storage_and_layout());
        let residual = match &guard {
            Some((st, rl)) => {
                let candle_core::Storage::Cpu(cs) = &**st else {
                    candle_core::bail!("conv: the residual must be on the CPU");
                };
                let r = super::f32_slice(cs, rl, "conv residual")?;
                if rl.dims() != [n, pc.cout, ho, wo] {
                    candle_core::bail!(
                        "conv: residual of shape {:?}, output is {:?}",
                        rl.dims(),
                        [n, pc.cout, ho, wo]
                    );
                }
                Some(r)
            }
            None => None,
        };
        if let Some(sh) = &self.shift {
            if sh.len() != n * pc.cout && sh.len() != pc.cout {
                candle_core::bail!("conv: {} shifts for {n} × {} outputs", sh.len(), pc.cout);
            }
        }
        let adds = Adds {
            shift: self.shift.as_deref(),
            residual,
        };
        // bf16 pairs on AMX tiles run the 9 taps at up to 16× the f32 rate, which beats
        // Winograd's f32 GEMMs at every UNet level (examples/wbench: 2×320@64² 49 vs 53 ms,
        // 2×1280@16² 62 vs 99 ms) and, since the weights are tile panels, at the VAE's too
        // (1×256@256² 111–148 vs 162–175 ms, 1×128@512² 157–168 vs 190–228, 1×512@128²
        // 91–139 vs 121–145: two runs).
        let amx = bf16::kernel() == bf16::Kernel::Amx;
        let pairs = matches!(pc.w, TapWeights::Pairs(_) | TapWeights::Panels(_));
        let tile = (self.winograd && kh == 3 && kw == 3 && p == 1)
            .then(|| winograd_tile(winograd::pays(n, h, wd), pairs.then(bf16::kernel)))
            .flatten();
        if let Some(tile) = tile {
            let taps = match &pc.w {
                TapWeights::F32(w) => winograd::Taps::F32(w),
                TapWeights::Widen(w) => winograd::Taps::Bf16(w),
                TapWeights::Pairs(w) => winograd::Taps::Pairs(w),
                TapWeights::Panels(_) => unreachable!("panels exist only where AMX takes the taps"),
            };
            let dims = (n, cin, h, wd);
            let out = winograd::conv3x3_capped(
                x,
                dims,
                taps,
                pc.cout,
                pc.bias.as_deref(),
                tile,
                winograd::U_CAP_BYTES,
                adds,
            );
            return Ok((CpuStorage::F32(out), Shape::from((n, pc.cout, ho, wo))));
        }
        if let (1, 1, 0, TapWeights::F32(w)) = (kh, kw, p, &pc.w) {
            // f32 reads each image's input as it lies: no canvas either.
            let plane = h * wd;
            let dims = (n, pc.cout, plane, cin);
            // SAFETY: image i's input is cin rows of plane from x[i·cin·plane..]; w is cout × cin.
            let out = unsafe {
                per_image(
                    dims,
                    (x, plane, cin * plane),
                    w,
                    tiled::gemm_f32,
                    pc.bias.as_deref(),
                    adds,
                )
            };
            return Ok((CpuStorage::F32(out), Shape::from((n, pc.cout, ho, wo))));
        }
        let plane = h * wd;
        // Channel `c` of image `i`, row `y`: its place on the canvas row.
        let src = |i: usize, c: usize, y: usize| {
            let o = (i * cin + c) * plane + y * wd;
            &x[o..o + wd]
        };
        let at = |i: usize, y: usize| (i * g.hp + y + g.p) * g.wp + g.p;
        let fill_f32 = |c: usize, dst: &mut [f32]| {
            for i in 0..g.n {
                for y in 0..g.h {
                    dst[at(i, y)..at(i, y) + g.wd].copy_from_slice(src(i, c, y));
                }
            }
        };
        let out = match &pc.w {
            TapWeights::F32(w) => self.run(&g, cin, w, fill_f32, tiled::gemm_f32, 1, adds),
            TapWeights::Widen(w) => self.run(&g, cin, w, fill_f32, tiled::gemm_widen, 1, adds),
            TapWeights::Pairs(w) | TapWeights::Panels(w) => {
                let fill = |q: usize, dst: &mut [u32]| {
                    for i in 0..g.n {
                        for y in 0..g.h {
                            let hi = (2 * q + 1 < g.cin).then(|| src(i, 2 * q + 1, y));
                            let d = &mut dst[at(i, y)..at(i, y) + g.wd];
                            bf16::pair_rows(src(i, 2 * q, y), hi, d);
                        }
                    }
                };
                let pad = if amx { super::amx::BLOCK } else { 1 };
                let mm: TapGemm<u32, u32> = match &pc.w {
                    #[cfg(target_arch = "x86_64")]
                    TapWeights::Panels(_) => bf16::gemm_a_panels,
                    _ => bf16::gemm,
                };
                self.run(&g, cin.div_ceil(2), w, fill, mm, pad, adds)
            }
        };
        Ok((CpuStorage::F32(out), Shape::from((n, pc.cout, ho, wo))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn bf16_taps_replace_the_winograd_tiles_they_beat() {
        use bf16::Kernel::{Amx, Dot, Fallback};
        use winograd::Tile::{F2, F4};
        // f32 weights, and bf16 pairs without a bf16 kernel: whatever Winograd offers.
        for k in [None, Some(Fallback)] {
            assert_eq!(winograd_tile(Some(F4), k), Some(F4));
            assert_eq!(winograd_tile(Some(F2), k), Some(F2));
            assert_eq!(winograd_tile(None, k), None);
        }
        // vdpbf16ps taps beat F(2×2), not F(4×4); AMX taps beat both.
        assert_eq!(winograd_tile(Some(F4), Some(Dot)), Some(F4));
        assert_eq!(winograd_tile(Some(F2), Some(Dot)), None);
        assert_eq!(winograd_tile(Some(F4), Some(Amx)), None);
        assert_eq!(winograd_tile(Some(F2), Some(Amx)), None);
    }

    /// (batch, in, out, height, width, kernel, padding): odd channel counts (bf16 pairs with a
    /// zero), 1×1 with and without padding, kernels larger than 3, batches stacked on a canvas.
    const CASES: &[(usize, usize, usize, usize, usize, usize, usize)] = &[
        (1, 1, 1, 1, 1, 1, 0),
        (2, 3, 5, 7, 9, 3, 1),
        (1, 13, 7, 11, 5, 3, 0),
        (3, 4, 6, 8, 8, 1, 0),
        (1, 5, 3, 6, 7, 1, 1),
        (2, 8, 16, 17, 19, 3, 2),
        (2, 9, 50, 17, 19, 3, 1),
        (1, 2, 3, 10, 12, 5, 2),
        // Big enough for AMX tiles (≥ 32 outputs, ≥ 16 input pairs), with every remainder and
        // a grid (260 columns) that is padded to 288.
        (2, 41, 36, 9, 11, 3, 1),
        // Whole tiles (`cout` of 32, `cin` of 32): weights as AMX panels where AMX runs.
        (2, 64, 64, 9, 11, 3, 1),
        (1, 64, 32, 5, 7, 1, 0),
        // 1×1 on planes of whole 32-column blocks: each image multiplied into its output
        // (on AMX panels where they run).
        (2, 64, 32, 8, 8, 1, 0),
    ];

    #[test]
    fn matches_candle_conv_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, cin, cout, h, w, k, p) in CASES {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let got = conv2d_fast(&x, &wt, Some(&bias), p)?;
            let want = x
                .conv2d(&wt, p, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            assert_eq!(got.dims(), want.dims());
            let err = crate::kernels::max_abs_diff(&got, &want)?;
            assert!(err < 1e-4, "{n}x{cin}x{cout}x{h}x{w} k{k} p{p}: {err}");
        }
        Ok(())
    }

    /// Both bf16 paths of the tap kernels (Winograd off: it is tested below) against candle's
    /// f32 convolution of the bf16-rounded operands: only the summation order differs, so the
    /// error stays at f32 rounding level.
    #[test]
    fn bf16_conv_matches_f32_conv_of_rounded_operands() -> Result<()> {
        let dev = Device::Cpu;
        let round = |t: &Tensor| t.to_dtype(DType::BF16)?.to_dtype(DType::F32);
        for &(n, cin, cout, h, w, k, p) in CASES {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, k, k), &dev)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?.to_dtype(DType::BF16)?;
            let cfg = nn::Conv2dConfig {
                padding: p,
                ..Default::default()
            };
            for path in [Path::Dot, Path::Widen] {
                let inner = nn::Conv2d::new(wt.clone(), Some(bias.clone()), cfg);
                let conv = Conv2d::with_path(inner, path)?.without_winograd();
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
                let err = crate::kernels::max_abs_diff(&got, &want)?;
                assert!(
                    err < 1e-4,
                    "{path:?} {n}x{cin}x{cout}x{h}x{w} k{k} p{p}: {err}"
                );
            }
        }
        Ok(())
    }

    /// Layers on inputs large enough for the Winograd path (64+ tiles), for each weight form:
    /// the input stays f32 on that path, the weights are the layer's (bf16-rounded) ones.
    #[test]
    fn winograd_path_matches_candle_conv() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, cin, cout, h, w) in &[
            (2usize, 5usize, 7usize, 33usize, 30usize),
            (1, 16, 9, 40, 29),
            // Whole tiles (AMX panels on the dot path), at the VAE's smallest Winograd size.
            (1, 64, 32, 128, 128),
        ] {
            assert_eq!(winograd::pays(n, h, w), Some(winograd::Tile::F4));
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev)?.to_dtype(DType::BF16)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?.to_dtype(DType::BF16)?;
            let f32 = |t: &Tensor| t.to_dtype(DType::F32);
            let conv_of = |x: &Tensor| -> Result<Tensor> {
                x.conv2d(&f32(&wt)?, 1, 1, 1, 1)?
                    .broadcast_add(&f32(&bias)?.reshape((1, cout, 1, 1))?)
            };
            let want = conv_of(&x)?;
            // On AMX, bf16 pairs at these sizes run as tap GEMMs on the tiles (the input
            // rounded to bf16 as it is paired), not Winograd.
            let amx = bf16::kernel() == bf16::Kernel::Amx;
            let want_dot = if amx {
                conv_of(&f32(&x.to_dtype(DType::BF16)?)?)?
            } else {
                want.clone()
            };
            let cfg = nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            for (name, wk, b, path, want) in [
                ("f32", f32(&wt)?, f32(&bias)?, Path::Widen, &want),
                ("widen", wt.clone(), bias.clone(), Path::Widen, &want),
                ("dot", wt.clone(), bias.clone(), Path::Dot, &want_dot),
            ] {
                let conv = Conv2d::with_path(nn::Conv2d::new(wk, Some(b), cfg), path)?;
                let err = crate::kernels::max_abs_diff(&conv.forward(&x)?, want)?;
                // As in winograd's own test: a few ulps of |y| ≲ 5·sqrt(9·cin); twice that at
                // 128², whose 16× more outputs put the largest error at the edge of it.
                let big = if h * w >= 128 * 128 { 2.0 } else { 1.0 };
                let tol = 4e-5 * big * (9.0 * cin as f32).sqrt();
                assert!(err < tol, "{name} {n}x{cin}x{cout}x{h}x{w}: {err}");
            }
        }
        Ok(())
    }

    /// The epilogue adds exactly what separate passes would, on every path: the tap GEMMs
    /// (f32, and bf16 pairs, on AMX tiles where they run) with one and two images (cropped in
    /// place / into a new buffer), Winograd F(4,3) and F(2,3), and candle's strided fallback;
    /// shifts per image and shared by the batch. A wrong residual shape is an error.
    #[test]
    fn epilogue_equals_separate_adds() -> Result<()> {
        let dev = Device::Cpu;
        // (batch, in, out, size, stride): 64 (then 34) on a side takes Winograd F(4,3) at
        // batch 1 (F(2,3) at 2×16²); 9×11 stays on the taps.
        let cases = [
            (1, 40, 36, 9, 1),
            (2, 41, 36, 9, 1),
            (2, 64, 64, 9, 1),
            (1, 8, 16, 34, 1),
            (2, 16, 32, 16, 1),
            (2, 6, 10, 9, 2),
            // 1×1 (a transformer's proj_out), no padding.
            (2, 64, 32, 8, 0),
            (1, 64, 32, 8, 0),
            // 14 × 16 = 7 whole blocks of 32: straight into the output on AMX too.
            (2, 64, 32, 14, 0),
        ];
        for (n, cin, cout, hw, stride) in cases {
            // Stride 0 marks the 1×1 cases.
            let (k, pad, stride) = if stride == 0 {
                (1, 0, 1)
            } else {
                (3, 1, stride)
            };
            let x = Tensor::randn(0f32, 1.0, (n, cin, hw, hw + 2), &dev)?;
            let wt = Tensor::randn(0f32, 0.2, (cout, cin, k, k), &dev)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let cfg = nn::Conv2dConfig {
                padding: pad,
                stride,
                ..Default::default()
            };
            for dtype in [DType::F32, DType::BF16] {
                let inner = nn::Conv2d::new(wt.to_dtype(dtype)?, Some(bias.to_dtype(dtype)?), cfg);
                let conv = Conv2d::new(inner)?;
                let y = conv.forward(&x)?;
                let (_, _, ho, wo) = y.dims4()?;
                let residual = Tensor::randn(0f32, 1.0, (n, cout, ho, wo), &dev)?;
                for shift_rows in [n, 1] {
                    let shift = Tensor::randn(0f32, 1.0, (shift_rows, cout), &dev)?;
                    let want = y
                        .broadcast_add(&shift.reshape((shift_rows, cout, 1, 1))?)?
                        .add(&residual)?;
                    let e = Epilogue {
                        shift: Some(&shift),
                        residual: Some(&residual),
                    };
                    let got = conv.forward_with(&x, e)?;
                    let err = crate::kernels::max_abs_diff(&got, &want)?;
                    assert!(
                        err == 0.0,
                        "{dtype:?} {n}x{cin}x{cout}x{hw} s{stride}: {err}"
                    );
                }
                let only = Epilogue {
                    shift: None,
                    residual: Some(&residual),
                };
                let err = crate::kernels::max_abs_diff(
                    &conv.forward_with(&x, only)?,
                    &(&y + &residual)?,
                )?;
                assert!(
                    err == 0.0,
                    "residual only, {dtype:?} {n}x{cin}x{cout}x{hw}: {err}"
                );
                let wrong = Tensor::zeros((n, cout, ho + 1, wo), DType::F32, &dev)?;
                let bad = Epilogue {
                    shift: None,
                    residual: Some(&wrong),
                };
                assert!(
                    conv.forward_with(&x, bad).is_err(),
                    "{dtype:?} {n}x{cin}x{hw}"
                );
            }
        }
        Ok(())
    }
}

//! bf16 GEMM for the CPU: bf16 operands, f32 accumulation (`vdpbf16ps`, AVX-512 BF16).
//!
//! candle's CPU matmul rejects bf16 and gemm 0.19 has no bf16 kernel, so easel's `--dtype bf16`
//! on the CPU runs its GEMMs here. Operands are stored as *pairs*: one `u32` holds two bf16
//! values that are adjacent along the reduction axis `k` (low half = even `k`), which is the
//! layout `vdpbf16ps` consumes: each f32 lane adds `a[2p]·b[2p] + a[2p+1]·b[2p+1]`.
//!
//! * `A` (m × kp pairs, row stride `lda`): one pair is broadcast to every lane.
//! * `B` (kp pairs × n, row stride `ldb`): 16 consecutive columns of one pair row are one vector.
//! * `C` (m × n f32, row stride `ldc`) is accumulated into: callers fill it first (zero or bias).
//!
//! Several *parts* that share `C` (the taps of a convolution) are summed in one call, so each
//! tile of `C` stays in cache across all of them. Products of two bf16 values are exact in f32,
//! so the only rounding beyond f32's is the operands' rounding to bf16.
//! Without AVX-512 BF16 the same sums run through gemm's f32 kernel on unpacked operands.
use super::amx;
use super::tiled;
pub use super::tiled::Dims;

/// Rounds to the nearest bf16, ties to even (what `vcvtneps2bf16` and `half` do); NaN stays NaN.
#[inline(always)]
pub fn to_bf16(x: f32) -> u16 {
    let b = x.to_bits();
    let rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16) as u16;
    if (b & 0x7FFF_FFFF) > 0x7F80_0000 {
        ((b >> 16) as u16) | 0x40
    } else {
        rounded
    }
}

#[inline(always)]
pub fn from_bf16(h: u16) -> f32 {
    f32::from_bits((h as u32) << 16)
}

/// Two values as one pair (`lo` at the even `k`).
#[inline(always)]
pub fn pair(lo: f32, hi: f32) -> u32 {
    to_bf16(lo) as u32 | (to_bf16(hi) as u32) << 16
}

/// `dst[i] = pair(lo[i], hi[i])`; `hi = None` pads an odd reduction length with zeros.
pub fn pair_rows(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx512f") {
        // SAFETY: the feature was just detected.
        return unsafe { pair_rows_avx512(lo, hi, dst) };
    }
    pair_rows_portable(lo, hi, dst)
}

#[inline(always)]
fn pair_rows_portable(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    match hi {
        Some(hi) => {
            for ((d, &a), &b) in dst.iter_mut().zip(lo).zip(hi) {
                *d = pair(a, b);
            }
        }
        None => {
            for (d, &a) in dst.iter_mut().zip(lo) {
                *d = to_bf16(a) as u32;
            }
        }
    }
}

/// The same loop, compiled for AVX-512 so that LLVM vectorises the rounding.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn pair_rows_avx512(lo: &[f32], hi: Option<&[f32]>, dst: &mut [u32]) {
    pair_rows_portable(lo, hi, dst)
}

/// A row-major `rows × k` f32 matrix as `rows × ceil(k/2)` pairs (the `A` layout).
pub fn pack_a(src: &[f32], rows: usize, k: usize) -> Vec<u32> {
    let kp = k.div_ceil(2);
    // Rows per task: enough to amortise scheduling on small inputs.
    let per = (16384 / kp.max(1)).max(1);
    super::par_filled(rows * kp, per * kp, |t, d| {
        for (i, d) in d.chunks_mut(kp).enumerate() {
            let row = t * per + i;
            let s = &src[row * k..(row + 1) * k];
            super::simd::pair_adjacent(s, d);
        }
    })
}

/// `dst[i] = src[i]` as f32 (bf16 → f32 is exact: the bits move up 16 places).
pub fn widen(src: &[half::bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits((s.to_bits() as u32) << 16);
    }
}

/// How layers with bf16 weights multiply on this CPU; chosen once per process so that runs on
/// one machine are reproducible.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// bf16 × bf16 products with `vdpbf16ps` (inputs rounded to bf16 as they are packed).
    Dot,
    /// bf16 weights widened to f32 just before each product, f32 FMAs (inputs stay f32).
    Widen,
}

/// `EASEL_BF16_GEMM=amx|dot|widen` decides; otherwise `Dot` where AMX tiles run (Intel
/// Sapphire Rapids and later) or on AMD CPUs with AVX-512 BF16, and `Widen` elsewhere. Why: on
/// an Intel Xeon without AMX, `vdpbf16ps zmm` retires at half the f32 FMA's flop rate (one
/// core: 92 vs 185 GFLOP/s in a register-only loop), so widening to f32 is faster there; Zen 4/5
/// run it at twice the FMA's rate, and AMX's `tdpbf16ps` at up to 16× (measured 1164 GFLOP/s on
/// one core of this machine, vs ~185 for f32 FMAs).
pub fn path() -> Path {
    static PATH: std::sync::OnceLock<Path> = std::sync::OnceLock::new();
    *PATH.get_or_init(|| match std::env::var("EASEL_BF16_GEMM").as_deref() {
        Ok("dot") | Ok("amx") if native() => Path::Dot,
        Ok("dot") | Ok("amx") | Ok("widen") => Path::Widen,
        _ if native() && (amx::available() || amd()) => Path::Dot,
        _ => Path::Widen,
    })
}

/// The kernel that multiplies bf16 pairs ([`Path::Dot`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kernel {
    /// AMX tiles for whole 32 × 32 blocks, `vdpbf16ps` for the edges.
    Amx,
    /// `vdpbf16ps` (AVX-512 BF16).
    Dot,
    /// Unpacked to f32, gemm's kernel (CPUs without AVX-512 BF16).
    Fallback,
}

/// AMX where it runs unless `EASEL_BF16_GEMM` asks for `dot` or `widen`, else `vdpbf16ps`
/// where that runs. A bf16 model's attention follows: on AMX, on `vdpbf16ps` where the
/// [`Path`] is `Dot`, in f32 on `widen`.
pub fn kernel() -> Kernel {
    static KERNEL: std::sync::OnceLock<Kernel> = std::sync::OnceLock::new();
    *KERNEL.get_or_init(|| {
        let env = std::env::var("EASEL_BF16_GEMM");
        let no_amx = matches!(env.as_deref(), Ok("dot") | Ok("widen"));
        match () {
            _ if native() && !no_amx && amx::available() => Kernel::Amx,
            _ if native() => Kernel::Dot,
            _ => Kernel::Fallback,
        }
    })
}

fn amd() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        let r = std::arch::x86_64::__cpuid(0);
        let mut v = [0u8; 12];
        v[..4].copy_from_slice(&r.ebx.to_le_bytes());
        v[4..8].copy_from_slice(&r.edx.to_le_bytes());
        v[8..].copy_from_slice(&r.ecx.to_le_bytes());
        &v == b"AuthenticAMD"
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether a weight of `outer` rows (`A`) or columns (`B`) × `k` pairs is stored as AMX tile
/// panels: where AMX runs and the weight is whole tiles (`outer` of [`amx::BLOCK`], `k` of
/// [`amx::KSTEP`]; every SD layer but the first and last convolution).
pub fn panels_fit(outer: usize, k: usize) -> bool {
    kernel() == Kernel::Amx && outer.is_multiple_of(amx::BLOCK) && k.is_multiple_of(amx::KSTEP)
}

/// Whether the native `vdpbf16ps` kernel runs on this CPU (otherwise the f32 fallback does).
pub fn native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f") && std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// `C += Σ_parts A_part · B_part`, where part `i` starts at `a[parts[i].0..]`, `b[parts[i].1..]`.
///
/// # Safety
/// For every part, `A` rows `0..m` × pairs `0..k` and `B` pair rows `0..k` × columns `0..n`
/// must lie inside `a` / `b` at the given strides, and `C` rows `0..m` × columns `0..n` inside
/// `c`; nothing else may access `c` meanwhile.
pub unsafe fn gemm(d: Dims, parts: &[(usize, usize)], a: &[u32], b: &[u32], c: *mut f32) {
    gemm_with(kernel(), d, parts, a, b, c)
}

/// [`gemm`] on a given kernel (tests run each one that this CPU has).
///
/// # Safety
/// As for [`gemm`], and the CPU runs `kernel`.
pub unsafe fn gemm_with(
    kernel: Kernel,
    d: Dims,
    parts: &[(usize, usize)],
    a: &[u32],
    b: &[u32],
    c: *mut f32,
) {
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return;
    }
    match kernel {
        #[cfg(target_arch = "x86_64")]
        Kernel::Amx => gemm_amx(d, parts, a.as_ptr(), b.as_ptr(), c),
        #[cfg(target_arch = "x86_64")]
        Kernel::Dot => tiled::gemm::<tiled::x86::Bf16Dot>(d, parts, a.as_ptr(), b.as_ptr(), c),
        _ => fallback(d, parts, a, b, c),
    }
}

/// Whole 32 × 32 blocks and 16-pair steps on AMX; the row, column and `k` remainders (a few
/// per layer: the canvas width of a convolution is rarely a multiple of 32) on `vdpbf16ps`,
/// each adding its share into `C`.
#[cfg(target_arch = "x86_64")]
unsafe fn gemm_amx(d: Dims, parts: &[(usize, usize)], a: *const u32, b: *const u32, c: *mut f32) {
    use tiled::x86::Bf16Dot;
    let (m32, n32) = (d.m / amx::BLOCK * amx::BLOCK, d.n / amx::BLOCK * amx::BLOCK);
    let k16 = d.k / amx::KSTEP * amx::KSTEP;
    if m32 == 0 || n32 == 0 || k16 == 0 {
        return tiled::gemm::<Bf16Dot>(d, parts, a, b, c);
    }
    let body = Dims {
        m: m32,
        n: n32,
        k: k16,
        ..d
    };
    amx::gemm(body, parts, a, b, c);
    if k16 < d.k {
        let rest: Vec<_> = parts
            .iter()
            .map(|&(ao, bo)| (ao + k16, bo + k16 * d.ldb))
            .collect();
        let dk = Dims {
            k: d.k - k16,
            ..body
        };
        tiled::gemm::<Bf16Dot>(dk, &rest, a, b, c);
    }
    if m32 < d.m {
        let rows = Dims { m: d.m - m32, ..d };
        tiled::gemm::<Bf16Dot>(rows, parts, a.add(m32 * d.lda), b, c.add(m32 * d.ldc));
    }
    if n32 < d.n {
        let cols = Dims {
            m: m32,
            n: d.n - n32,
            ..d
        };
        tiled::gemm::<Bf16Dot>(cols, parts, a, b.add(n32), c.add(n32));
    }
}

/// `C += Σ_parts A_part · B_part` on AMX tiles with each `A` part packed as tile panels
/// ([`amx::pack_a_panels`]: a convolution's taps) and `B` row-major (`d.ldb`, the padded image);
/// `d.lda` is not read.
///
/// # Safety
/// As for [`gemm`], [`amx::available`], and `m`, `n` multiples of [`amx::BLOCK`], `k` of
/// [`amx::KSTEP`] (nothing falls to an edge kernel that would need row-major weights).
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_a_panels(d: Dims, parts: &[(usize, usize)], a: &[u32], b: &[u32], c: *mut f32) {
    use amx::Operand;
    assert!(
        d.m.is_multiple_of(amx::BLOCK)
            && d.n.is_multiple_of(amx::BLOCK)
            && d.k.is_multiple_of(amx::KSTEP),
        "panel GEMM on a partial tile: {d:?}"
    );
    let (oa, ob) = (Operand::panels(d.k), Operand::b_rows(d.ldb));
    amx::gemm_on(d, parts, (a.as_ptr(), oa), (b.as_ptr(), ob), c, true, false)
}

/// `C += A · B` on AMX tiles, `A` row-major (`d.lda`), `B` packed as tile panels
/// ([`amx::pack_b_panels`]: the linear layers' weights); `n` must be a multiple of
/// [`amx::BLOCK`] and `k` of [`amx::KSTEP`] pairs, as panels require. The last `m % 32` rows
/// run on a zero-padded copy of themselves (the tiles take only whole blocks).
///
/// # Safety
/// [`amx::available`]; `A` rows `0..m` × pairs `0..k` inside `a`, `b` holds `n × k` panel
/// pairs, `C` rows `0..m` × columns `0..n` inside `c`, and nothing else touches `c`.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_b_panels(d: Dims, a: &[u32], b: &[u32], c: *mut f32) {
    use amx::{Operand, BLOCK};
    debug_assert!(d.n.is_multiple_of(BLOCK) && d.k.is_multiple_of(amx::KSTEP));
    debug_assert!(b.len() >= d.n * d.k && a.len() >= d.m.saturating_sub(1) * d.lda + d.k);
    let ob = Operand::panels(d.k);
    let m32 = d.m / BLOCK * BLOCK;
    let whole = Dims { m: m32, ..d };
    let (pa, pb) = (a.as_ptr(), b.as_ptr());
    amx::gemm_on(
        whole,
        &[(0, 0)],
        (pa, Operand::a_rows(d.lda)),
        (pb, ob),
        c,
        true,
        false,
    );
    let rest = d.m - m32;
    if rest == 0 {
        return;
    }
    let mut ar = vec![0u32; BLOCK * d.k];
    let mut cr = vec![0f32; BLOCK * d.n];
    for i in 0..rest {
        let src = &a[(m32 + i) * d.lda..][..d.k];
        ar[i * d.k..(i + 1) * d.k].copy_from_slice(src);
        let row = std::slice::from_raw_parts(c.add((m32 + i) * d.ldc), d.n);
        cr[i * d.n..(i + 1) * d.n].copy_from_slice(row);
    }
    let dr = Dims {
        m: BLOCK,
        lda: d.k,
        ldc: d.n,
        ..d
    };
    let (ra, rc) = ((ar.as_ptr(), Operand::a_rows(d.k)), cr.as_mut_ptr());
    amx::gemm_on(dr, &[(0, 0)], ra, (pb, ob), rc, true, false);
    for i in 0..rest {
        let row = std::slice::from_raw_parts_mut(c.add((m32 + i) * d.ldc), d.n);
        row.copy_from_slice(&cr[i * d.n..(i + 1) * d.n]);
    }
}

/// Unpacks each part to f32 and lets gemm's f32 kernel accumulate it (CPUs without AVX-512
/// BF16; also the oracle the native kernel is tested against).
unsafe fn fallback(d: Dims, parts: &[(usize, usize)], a: &[u32], b: &[u32], c: *mut f32) {
    let k = 2 * d.k;
    let mut af = vec![0f32; d.m * k];
    let mut bf = vec![0f32; k * d.n];
    for &(ao, bo) in parts {
        for i in 0..d.m {
            for p in 0..d.k {
                let v = a[ao + i * d.lda + p];
                af[i * k + 2 * p] = from_bf16(v as u16);
                af[i * k + 2 * p + 1] = from_bf16((v >> 16) as u16);
            }
        }
        for p in 0..d.k {
            for j in 0..d.n {
                let v = b[bo + p * d.ldb + j];
                bf[2 * p * d.n + j] = from_bf16(v as u16);
                bf[(2 * p + 1) * d.n + j] = from_bf16((v >> 16) as u16);
            }
        }
        super::matmul(
            d.m,
            d.n,
            k,
            c,
            d.ldc,
            true,
            af.as_ptr(),
            (k as isize, 1),
            bf.as_ptr(),
            (d.n as isize, 1),
            false,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    /// Every kernel this CPU runs (the fallback always; AMX only where the CPU has it: CPUs
    /// without it cannot execute its instructions, so it is reported, not silently passed).
    pub(crate) fn kernels() -> Vec<Kernel> {
        let mut k = vec![Kernel::Fallback];
        if native() {
            k.push(Kernel::Dot);
        }
        if native() && amx::available() {
            k.push(Kernel::Amx);
        } else {
            eprintln!("note: no AMX on this CPU; the AMX kernel is not exercised here");
        }
        k
    }

    #[test]
    fn rounding_matches_half() {
        let mut s = 7;
        for _ in 0..10_000 {
            let x = lcg(&mut s) * 1e3;
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        for x in [0.0f32, -0.0, f32::INFINITY, f32::MAX, 1e-40, -3.5] {
            assert_eq!(to_bf16(x), half::bf16::from_f32(x).to_bits(), "{x}");
        }
        assert!(from_bf16(to_bf16(f32::NAN)).is_nan());
    }

    /// The native kernel against plain f32 sums of the bf16-rounded operands, on shapes that
    /// leave every kind of edge (rows < 8, columns < 48 and < 16, k not a block multiple) and
    /// with several parts at offsets.
    #[test]
    fn gemm_matches_f32_sums_of_rounded_operands() {
        let mut s = 1;
        for &(m, n, kp, nparts) in &[
            (1, 1, 1, 1),
            (3, 17, 5, 1),
            (8, 48, 128, 1),
            (13, 97, 131, 2),
            (130, 200, 300, 3),
            (9, 5, 257, 1),
            // AMX: whole blocks only, then blocks with every remainder (rows, columns, k).
            (64, 96, 32, 2),
            (96, 64, 272, 1),
            (70, 100, 48, 3),
            (33, 65, 23, 2),
            (160, 288, 160, 9),
        ] {
            let (lda, ldb, ldc) = (kp + 3, n + 5, n + 2);
            let a: Vec<u32> = (0..nparts * m * lda + 7)
                .map(|_| pair(lcg(&mut s), lcg(&mut s)))
                .collect();
            let b: Vec<u32> = (0..nparts * kp * ldb + 11)
                .map(|_| pair(lcg(&mut s), lcg(&mut s)))
                .collect();
            let parts: Vec<(usize, usize)> = (0..nparts)
                .map(|i| (i * m * lda + 7 * (i % 2), i * kp * ldb + 3 * (i % 2)))
                .collect();
            let init: Vec<f32> = (0..m * ldc).map(|_| lcg(&mut s)).collect();
            let mut want = init.clone();
            for &(ao, bo) in &parts {
                for i in 0..m {
                    for j in 0..n {
                        let mut acc = 0f64;
                        for p in 0..kp {
                            let x = a[ao + i * lda + p];
                            let y = b[bo + p * ldb + j];
                            acc += from_bf16(x as u16) as f64 * from_bf16(y as u16) as f64;
                            acc += from_bf16((x >> 16) as u16) as f64
                                * from_bf16((y >> 16) as u16) as f64;
                        }
                        want[i * ldc + j] += acc as f32;
                    }
                }
            }
            let d = Dims {
                m,
                n,
                k: kp,
                lda,
                ldb,
                ldc,
            };
            for &kernel in &kernels() {
                let mut got = init.clone();
                // SAFETY: every part's extent lies inside `a`/`b` by construction, and
                // `kernels()` lists only kernels this CPU runs.
                unsafe { gemm_with(kernel, d, &parts, &a, &b, got.as_mut_ptr()) };
                for i in 0..m {
                    for j in 0..ldc {
                        let (g, w) = (got[i * ldc + j], want[i * ldc + j]);
                        if j >= n {
                            assert_eq!(g, init[i * ldc + j], "padding column written");
                            continue;
                        }
                        let tol = 1e-5 * (2 * kp * nparts) as f32;
                        assert!(
                            (g - w).abs() <= tol,
                            "{kernel:?} {m}x{n}x{kp} ({i},{j}): {g} vs {w}"
                        );
                    }
                }
            }
        }
    }
}

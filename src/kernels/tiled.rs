//! A cache-blocked GEMM over operands that need no packing, with a bf16 (`vdpbf16ps`) and an
//! f32 (FMA) micro-tile.
//!
//! `C += Σ_parts A_part · B_part`: `A` is read one element at a time and broadcast (so any row
//! stride works: the weights), `B` 16 consecutive columns at a time straight from memory (so a
//! padded image serves as `B` for every tap of a convolution with no copy). Each rayon task owns a 128 × 192 block of
//! `C` (96 KiB, L2) and walks `k` in chunks of 128, so the `B` micro-panel reused across its row
//! tiles stays in L1; all parts (taps) are summed before the task moves on.
use rayon::prelude::*;

/// Shapes and strides of one GEMM, in elements of `A`/`B` (bf16 pairs or f32) and f32 for `C`.
#[derive(Debug, Clone, Copy)]
pub struct Dims {
    pub m: usize,
    pub n: usize,
    /// Reduction length (in pairs for bf16).
    pub k: usize,
    pub lda: usize,
    pub ldb: usize,
    pub ldc: usize,
}

/// Micro-tile: 8 rows × 48 columns = 24 zmm accumulators, 3 for `B`, 1 broadcast.
pub const MR: usize = 8;
const NV: usize = 3;
/// Micro-tile width in f32 columns.
pub const NR: usize = 16 * NV;
const MB: usize = 128;
const NB: usize = 4 * NR;
const KC: usize = 128;

/// One micro-tile kernel: `C[0..R, 0..48] += A[0..R, 0..kc] · B[0..kc, 0..48]`, lanes outside
/// `masks` neither read nor written.
pub trait Tile {
    type Elem: Copy + Sync;
    /// `load` false starts from zero instead of `C` (the first pass of an overwriting GEMM).
    ///
    /// # Safety
    /// The CPU has the kernel's features; the ranges are inside their buffers.
    #[allow(clippy::too_many_arguments)]
    unsafe fn tile<const R: usize>(
        load: bool,
        kc: usize,
        a: *const Self::Elem,
        lda: usize,
        b: *const Self::Elem,
        ldb: usize,
        c: *mut f32,
        ldc: usize,
        masks: [u16; NV],
    );
}

#[derive(Clone, Copy)]
struct Ptrs<E> {
    a: *const E,
    b: *const E,
    c: *mut f32,
}
// SAFETY: tasks write disjoint blocks of `c` and only read `a`/`b`.
unsafe impl<E> Send for Ptrs<E> {}
unsafe impl<E> Sync for Ptrs<E> {}

/// # Safety
/// For every part `(ao, bo)`, `A` rows `0..m` × `0..k` from `a + ao` and `B` rows `0..k` ×
/// columns `0..n` from `b + bo` lie inside their buffers at the given strides, `C` rows `0..m` ×
/// columns `0..n` inside `c`, nothing else touches `c` meanwhile, and the CPU runs `T`.
pub unsafe fn gemm<T: Tile>(
    d: Dims,
    parts: &[(usize, usize)],
    a: *const T::Elem,
    b: *const T::Elem,
    c: *mut f32,
) {
    gemm_on::<T>(d, parts, a, b, c, true, false)
}

/// [`gemm`], on the calling thread only when `parallel` is false (callers already inside a
/// rayon task); `overwrite` computes `C = Σ A·B`, ignoring what `C` held (no zero-fill pass:
/// attention's 1 MiB score blocks were memset before every product, 3% of a UNet forward).
///
/// # Safety
/// As for [`gemm`].
pub unsafe fn gemm_on<T: Tile>(
    d: Dims,
    parts: &[(usize, usize)],
    a: *const T::Elem,
    b: *const T::Elem,
    c: *mut f32,
    parallel: bool,
    overwrite: bool,
) {
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return;
    }
    let p = Ptrs { a, b, c };
    let nblocks = d.n.div_ceil(NB);
    let tasks = d.m.div_ceil(MB) * nblocks;
    let task = move |t: usize| {
        let p = p;
        let (m0, n0) = ((t / nblocks) * MB, (t % nblocks) * NB);
        let (m1, n1) = ((m0 + MB).min(d.m), (n0 + NB).min(d.n));
        for (pi, &(ao, bo)) in parts.iter().enumerate() {
            for k0 in (0..d.k).step_by(KC) {
                let kc = KC.min(d.k - k0);
                let load = !(overwrite && pi == 0 && k0 == 0);
                for j in (n0..n1).step_by(NR) {
                    let cols = NR.min(n1 - j);
                    let mut masks = [0u16; NV];
                    for (v, m) in masks.iter_mut().enumerate() {
                        let live = cols.saturating_sub(16 * v).min(16);
                        *m = if live == 16 {
                            u16::MAX
                        } else {
                            (1u16 << live) - 1
                        };
                    }
                    let bp = p.b.add(bo + k0 * d.ldb + j);
                    for i in (m0..m1).step_by(MR) {
                        let ap = p.a.add(ao + i * d.lda + k0);
                        let cp = p.c.add(i * d.ldc + j);
                        let (lda, ldb, ldc) = (d.lda, d.ldb, d.ldc);
                        match MR.min(m1 - i) {
                            8 => T::tile::<8>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            7 => T::tile::<7>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            6 => T::tile::<6>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            5 => T::tile::<5>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            4 => T::tile::<4>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            3 => T::tile::<3>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            2 => T::tile::<2>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                            _ => T::tile::<1>(load, kc, ap, lda, bp, ldb, cp, ldc, masks),
                        }
                    }
                }
            }
        }
    };
    if parallel && tasks > 1 && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(task);
    } else {
        (0..tasks).for_each(task);
    }
}

/// Generates a micro-tile type: `$load(mask, ptr)` reads 16 `B` elements as a vector,
/// `$bcast(x)` spreads one `A` element, `$fma(acc, a, b)` accumulates.
macro_rules! micro_tile {
    ($(#[$doc:meta])* $name:ident, $elem:ty, $features:literal, $load:expr, $bcast:expr, $fma:expr) => {
        $(#[$doc])*
        pub struct $name;

        impl Tile for $name {
            type Elem = $elem;

            #[target_feature(enable = $features)]
            unsafe fn tile<const R: usize>(
                load: bool,
                kc: usize,
                a: *const $elem,
                lda: usize,
                b: *const $elem,
                ldb: usize,
                c: *mut f32,
                ldc: usize,
                masks: [u16; NV],
            ) {
                let mut acc = [[_mm512_setzero_ps(); NV]; R];
                if load {
                    for (i, row) in acc.iter_mut().enumerate() {
                        for (v, x) in row.iter_mut().enumerate() {
                            *x = _mm512_maskz_loadu_ps(masks[v], c.add(i * ldc + 16 * v));
                        }
                    }
                }
                for p in 0..kc {
                    let bp = b.add(p * ldb);
                    let bv = [
                        $load(masks[0], bp),
                        $load(masks[1], bp.add(16)),
                        $load(masks[2], bp.add(32)),
                    ];
                    for (i, row) in acc.iter_mut().enumerate() {
                        let av = $bcast(*a.add(i * lda + p));
                        for (v, x) in row.iter_mut().enumerate() {
                            *x = $fma(*x, av, bv[v]);
                        }
                    }
                }
                for (i, row) in acc.iter().enumerate() {
                    for (v, x) in row.iter().enumerate() {
                        _mm512_mask_storeu_ps(c.add(i * ldc + 16 * v), masks[v], *x);
                    }
                }
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
pub mod x86 {
    use super::{Tile, NV};
    use std::arch::x86_64::*;

    micro_tile!(
        /// bf16 pairs: `vdpbf16ps` adds `a[2p]·b[2p] + a[2p+1]·b[2p+1]` into each f32 lane.
        Bf16Dot,
        u32,
        "avx512f,avx512bf16",
        |m, p: *const u32| std::mem::transmute::<__m512i, __m512bh>(_mm512_maskz_loadu_epi32(
            m,
            p as *const i32
        )),
        |x: u32| std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(x as i32)),
        |acc, a, b| _mm512_dpbf16_ps(acc, a, b)
    );

    micro_tile!(
        /// f32 FMAs (attention, where `B` — Kᵀ or V — is reused in place by every query block).
        F32Fma,
        f32,
        "avx512f",
        |m, p: *const f32| _mm512_maskz_loadu_ps(m, p),
        |x: f32| _mm512_set1_ps(x),
        |acc, a, b| _mm512_fmadd_ps(a, b, acc)
    );
}

/// Whether the f32 tile runs on this CPU.
pub fn f32_native() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// The f32 counterpart of [`gemm`], one gemm call per part. (An f32 FMA tile in this driver,
/// reading the padded image in place, measured 10–15% slower than gemm's packed kernel on the
/// UNet's 320-channel 3×3 convolution: strided `B` rows cost more than packing saves.)
///
/// # Safety
/// As for [`gemm`].
pub unsafe fn gemm_f32(d: Dims, parts: &[(usize, usize)], a: &[f32], b: &[f32], c: *mut f32) {
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return;
    }
    for &(ao, bo) in parts {
        accumulate(d, a.as_ptr().add(ao), d.lda, b.as_ptr().add(bo), c);
    }
}

/// `C += A·B` for one part on gemm, across the pool.
///
/// # Safety
/// As for [`gemm`], with `A` rows `lda` apart.
unsafe fn accumulate(d: Dims, a: *const f32, lda: usize, b: *const f32, c: *mut f32) {
    super::matmul(
        d.m,
        d.n,
        d.k,
        c,
        d.ldc,
        true,
        a,
        (lda as isize, 1),
        b,
        (d.ldb as isize, 1),
        true,
    );
}

/// [`gemm_f32`] with bf16 `A` (weights), widened part by part into one reused f32 buffer: a
/// whole layer's widened copy (up to 118 MB for a 2560 → 1280 3×3 convolution) was a fresh
/// allocation on every call, whose page faults and writes made the bf16 UNet slower than f32.
///
/// # Safety
/// As for [`gemm`].
pub unsafe fn gemm_widen(
    d: Dims,
    parts: &[(usize, usize)],
    a: &[half::bf16],
    b: &[f32],
    c: *mut f32,
) {
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return;
    }
    let mut wide = vec![0f32; d.m * d.k];
    for &(ao, bo) in parts {
        wide.par_chunks_mut(d.k).enumerate().for_each(|(i, row)| {
            super::bf16::widen(&a[ao + i * d.lda..][..d.k], row);
        });
        accumulate(d, wide.as_ptr(), d.k, b.as_ptr().add(bo), c);
    }
}

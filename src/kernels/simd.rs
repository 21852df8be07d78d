//! Vectorisable element-wise math: plain loops compiled once generically and once with AVX-512
//! enabled (picked at run time), so LLVM emits 16-wide code on CPUs that have it without the
//! crate needing `-C target-cpu`.

/// exp(x) for f32 by range reduction and a degree-6 polynomial (relative error ≈ 2e-7 over the
/// range that does not under/overflow); branch-free so loops over it vectorise.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.clamp(-87.3, 88.3);
    let n = (x * LOG2E).round_ties_even();
    let r = x - n * LN2_HI - n * LN2_LO;
    // exp(r) on [-ln2/2, ln2/2]
    let p = 1.987_569_1e-4f32;
    let p = p * r + 1.398_199_9e-3;
    let p = p * r + 8.333_452e-3;
    let p = p * r + 4.166_579_6e-2;
    let p = p * r + 1.666_666_5e-1;
    let p = p * r + 0.5;
    let p = p * r * r + r + 1.0;
    // 2^n without a float→int conversion (those scalarise): n + 1.5·2²³ holds n in its low
    // mantissa bits, exactly, for |n| < 2²².
    let bits = (n + 12_582_912.0).to_bits().wrapping_sub(0x4B40_0000 - 127) << 23;
    p * f32::from_bits(bits)
}

/// The largest value of a row (−∞ if empty), over 16 independent lanes so that it vectorises
/// inside the AVX-512 functions below (float comparisons are not reassociated).
#[inline(always)]
fn row_max(row: &[f32]) -> f32 {
    let mut mx = [f32::NEG_INFINITY; 16];
    let mut it = row.chunks_exact(16);
    for v in &mut it {
        for i in 0..16 {
            mx[i] = if v[i] > mx[i] { v[i] } else { mx[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in it.remainder().iter().chain(mx.iter()) {
        m = if v > m { v } else { m };
    }
    m
}

macro_rules! dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident($($arg:ident : $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$m])* $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            fn inner($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
                unsafe fn wide($($arg: $ty),*) $(-> $ret)? { inner($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512vl")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features were detected just above.
                    return unsafe { wide($($arg),*) };
                }
            }
            inner($($arg),*)
        }
    };
}
pub(crate) use dispatch;

/// `exp(scale·x − max)` of one row in place; returns the row's sum (the softmax's denominator,
/// left to the caller so attention can divide its 40-wide output instead of the 4096-wide row).
pub fn exp_row(row: &mut [f32], scale: f32) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: AVX-512F was detected just above.
        return unsafe { exp_row_avx512(row, scale) };
    }
    exp_row_generic(row, scale)
}

/// `2^t` of 16 lanes: `t = n + f`, `|f| ≤ ½`, `2^f` by its Taylor polynomial of `DEGREE` (≤ 6;
/// relative error 2.5·10⁻⁶ at 5, 1.2·10⁻⁷ at 6) and `vscalefps` for the `2ⁿ` (underflowing to 0
/// far below 1). The f32 softmax rows use degree 6 (the AMX attention, whose weights are
/// rounded to bf16, has a cheaper cubic of its own).
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp2_avx512<const DEGREE: usize>(
    t: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // ln(2)ᵏ / k!, k = 6 … 0.
    const C: [f32; 7] = [
        1.540_353e-4,
        1.333_355_8e-3,
        9.618_129e-3,
        5.550_411e-2,
        0.240_226_5,
        std::f32::consts::LN_2,
        1.0,
    ];
    let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(t);
    let f = _mm512_sub_ps(t, n);
    let mut p = _mm512_set1_ps(C[6 - DEGREE]);
    for &c in &C[7 - DEGREE..] {
        p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
    }
    _mm512_scalef_ps(p, n)
}

/// The f32 softmax's weight of 16 logits `x` below their maxima `mx`: `2^((x − mx)·c)` with
/// `c = scale·log₂e`, the max subtracted before scaling (exact near the max for logits of any
/// size), degree-6 `exp2`. Shared by [`exp_row`] and the transposed attention's column softmax,
/// so that both f32 attention layouts weigh keys identically.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f")]
pub(crate) fn exp_below_max(
    x: std::arch::x86_64::__m512,
    mx: std::arch::x86_64::__m512,
    c: std::arch::x86_64::__m512,
) -> std::arch::x86_64::__m512 {
    use std::arch::x86_64::*;
    // Far below the max the weight is 0 (and −∞ logits stay NaN-free).
    let t = _mm512_max_ps(
        _mm512_mul_ps(_mm512_sub_ps(x, mx), c),
        _mm512_set1_ps(-150.0),
    );
    exp2_avx512::<6>(t)
}

/// [`exp_row`] on AVX-512 intrinsics: `exp(scale·(x − max)) = 2^((x − max)·scale·log₂e)`, the
/// power as `2ⁿ·2^f` with `|f| ≤ ½`, `2^f` by its degree-6 Taylor polynomial (≤ 1.2·10⁻⁷) and
/// `vscalefps` for the `2ⁿ`: 12 instructions a vector where [`exp_f32`], auto-vectorised, took
/// 19 (clamps, a two-part `ln 2` reduction, the exponent built in integer lanes). Subtracting
/// the max before scaling also keeps logits of any size exact near the max. 19% of the f32
/// attention's time was this function.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn exp_row_avx512(row: &mut [f32], scale: f32) -> f32 {
    use std::arch::x86_64::*;
    let n = row.len();
    if n == 0 {
        return 0.0;
    }
    let p = row.as_mut_ptr();
    let whole = n / 16 * 16;
    let tail = ((1u32 << (n - whole)) - 1) as __mmask16;
    let (mut m0, mut m1) = (
        _mm512_set1_ps(f32::NEG_INFINITY),
        _mm512_set1_ps(f32::NEG_INFINITY),
    );
    let mut i = 0;
    while i + 32 <= whole {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(i)));
        m1 = _mm512_max_ps(m1, _mm512_loadu_ps(p.add(i + 16)));
        i += 32;
    }
    if i < whole {
        m0 = _mm512_max_ps(m0, _mm512_loadu_ps(p.add(i)));
    }
    if tail != 0 {
        m1 = _mm512_mask_max_ps(m1, tail, m1, _mm512_maskz_loadu_ps(tail, p.add(whole)));
    }
    let mv = _mm512_set1_ps(_mm512_reduce_max_ps(_mm512_max_ps(m0, m1)));
    let c = _mm512_set1_ps(scale * std::f32::consts::LOG2_E);
    let exp = |x: __m512| exp_below_max(x, mv, c);
    let (mut a0, mut a1) = (_mm512_setzero_ps(), _mm512_setzero_ps());
    let mut i = 0;
    while i + 32 <= whole {
        let (e0, e1) = (
            exp(_mm512_loadu_ps(p.add(i))),
            exp(_mm512_loadu_ps(p.add(i + 16))),
        );
        _mm512_storeu_ps(p.add(i), e0);
        _mm512_storeu_ps(p.add(i + 16), e1);
        a0 = _mm512_add_ps(a0, e0);
        a1 = _mm512_add_ps(a1, e1);
        i += 32;
    }
    if i < whole {
        let e = exp(_mm512_loadu_ps(p.add(i)));
        _mm512_storeu_ps(p.add(i), e);
        a0 = _mm512_add_ps(a0, e);
    }
    if tail != 0 {
        let e = exp(_mm512_maskz_loadu_ps(tail, p.add(whole)));
        _mm512_mask_storeu_ps(p.add(whole), tail, e);
        a1 = _mm512_mask_add_ps(a1, tail, a1, e);
    }
    _mm512_reduce_add_ps(_mm512_add_ps(a0, a1))
}

dispatch! {
    /// [`exp_row`] without AVX-512.
    fn exp_row_generic(row: &mut [f32], scale: f32) -> f32 {
        let m = row_max(row);
        let mut acc = [0f32; 16];
        let mut it = row.chunks_exact_mut(16);
        for v in &mut it {
            for i in 0..16 {
                let e = exp_f32((v[i] - m) * scale);
                v[i] = e;
                acc[i] += e;
            }
        }
        let mut s = 0f32;
        for v in it.into_remainder() {
            let e = exp_f32((*v - m) * scale);
            *v = e;
            s += e;
        }
        s + acc.iter().sum::<f32>()
    }
}

/// `dst[p] = pair(src[2p], src[2p+1])` (a zero past the end of `src`), the rest of `dst` zero: a
/// row of bf16 pairs along it (the AMX attention's queries, a bf16 linear's input). With AVX-512
/// BF16, `vcvtne2ps2bf16` writes exactly this layout, 16 pairs an instruction (LLVM's loop over
/// the stride-2 reads shuffled; 1.5% of a bf16 UNet forward); the rounding is the same (to
/// nearest even), except that it flushes subnormal inputs (< 1.2e-38) to zero.
pub fn pair_adjacent(src: &[f32], dst: &mut [u32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f")
        && std::arch::is_x86_feature_detected!("avx512bf16")
    {
        let whole = src.len() / 32 * 32;
        // SAFETY: the features were detected just above.
        unsafe { pair_blocks_bf16(&src[..whole], &mut dst[..whole / 2]) };
        return pair_adjacent_rest(&src[whole..], &mut dst[whole / 2..]);
    }
    pair_adjacent_rest(src, dst)
}

/// [`pair_adjacent`] of whole 32-value blocks (`dst.len() == src.len() / 2`).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bf16")]
unsafe fn pair_blocks_bf16(src: &[f32], dst: &mut [u32]) {
    use std::arch::x86_64::*;
    for (s, d) in src.chunks_exact(32).zip(dst.chunks_exact_mut(16)) {
        let lo = _mm512_loadu_ps(s.as_ptr());
        let hi = _mm512_loadu_ps(s.as_ptr().add(16));
        let w: __m512i = std::mem::transmute(_mm512_cvtne2ps_pbh(hi, lo));
        _mm512_storeu_si512(d.as_mut_ptr() as *mut __m512i, w);
    }
}

dispatch! {
    /// [`pair_adjacent`] without AVX-512 BF16 (and its tail).
    fn pair_adjacent_rest(src: &[f32], dst: &mut [u32]) {
        let whole = src.len() / 2;
        for (d, v) in dst[..whole].iter_mut().zip(src.chunks_exact(2)) {
            *d = super::bf16::pair(v[0], v[1]);
        }
        let mut p = whole;
        if src.len() % 2 == 1 {
            dst[p] = super::bf16::pair(src[src.len() - 1], 0.0);
            p += 1;
        }
        dst[p..].fill(0);
    }
}

dispatch! {
    /// Softmax of one row in place, `scale` applied to the logits first.
    pub fn softmax_row(row: &mut [f32], scale: f32) {
        let inv = 1.0 / exp_row(row, scale);
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

dispatch! {
    /// Sum and sum of squared deviations from `shift` (a guess of the mean, for stability).
    pub fn sum_and_sq(xs: &[f32], shift: f32) -> (f64, f64) {
        // Chunked f32 partial sums (vectorised), accumulated in f64.
        let mut s = 0f64;
        let mut q = 0f64;
        for c in xs.chunks(4096) {
            let mut a = [0f32; 16];
            let mut b = [0f32; 16];
            let mut it = c.chunks_exact(16);
            for v in &mut it {
                for i in 0..16 {
                    let d = v[i] - shift;
                    a[i] += d;
                    b[i] += d * d;
                }
            }
            for &v in it.remainder() {
                let d = v - shift;
                a[0] += d;
                b[0] += d * d;
            }
            s += a.iter().map(|&x| x as f64).sum::<f64>();
            q += b.iter().map(|&x| x as f64).sum::<f64>();
        }
        (s, q)
    }
}

dispatch! {
    /// dst = src * a + b, then SiLU if `silu`.
    /// Writes all of `dst` (as long as `src`).
    pub fn affine_act(dst: &mut [std::mem::MaybeUninit<f32>], src: &[f32], a: f32, b: f32, silu: bool) {
        if silu {
            for (d, &s) in dst.iter_mut().zip(src) {
                let y = s * a + b;
                d.write(y / (1.0 + exp_f32(-y)));
            }
        } else {
            for (d, &s) in dst.iter_mut().zip(src) {
                d.write(s * a + b);
            }
        }
    }
}

dispatch! {
    /// dst += src
    pub fn add_assign(dst: &mut [f32], src: &[f32]) {
        for (d, &s) in dst.iter_mut().zip(src) {
            *d += s;
        }
    }
}

dispatch! {
    /// dst = a · gelu(g), GELU in candle's tanh form:
    /// 0.5·g·(1 + tanh(√(2/π)·(g + 0.044715·g³))), tanh(y) = 1 − 2/(e^{2y} + 1).
    /// Writes all of `dst` (as long as `a` and `g`).
    pub fn geglu_row(dst: &mut [std::mem::MaybeUninit<f32>], a: &[f32], g: &[f32]) {
        const C: f32 = 0.797_884_6;
        for ((d, &a), &g) in dst.iter_mut().zip(a).zip(g) {
            let y = C * g * (1.0 + 0.044715 * g * g);
            let t = 1.0 - 2.0 / (exp_f32(2.0 * y) + 1.0);
            d.write(a * (0.5 * g * (1.0 + t)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The fused exp + pairing equals `exp_row` followed by pairing, on lengths around the
    /// 32-wide body (odd ones pad the last pair with zero), and zero-fills the rest of `dst`.
    #[test]
    fn pair_adjacent_equals_scalar_pairs() {
        for len in [0usize, 1, 2, 31, 32, 33, 64, 77, 100] {
            let src: Vec<f32> = (0..len)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013)
                .collect();
            let mut got = vec![u32::MAX; len.div_ceil(2) + 3];
            pair_adjacent(&src, &mut got);
            for (p, &g) in got.iter().enumerate() {
                let lo = src.get(2 * p).copied().unwrap_or(0.0);
                let hi = src.get(2 * p + 1).copied().unwrap_or(0.0);
                assert_eq!(g, crate::kernels::bf16::pair(lo, hi), "{len}: pair {p}");
            }
        }
    }

    #[test]
    fn exp_matches_std() {
        let mut worst = 0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (exp_f32(x), x.exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 1e-6, "relative error {worst}");
        assert!(exp_f32(f32::NEG_INFINITY) < 1e-37);
    }

    /// `exp_row` (the AVX-512 kernel where it runs) against f64 on lengths around its 16- and
    /// 32-wide bodies (also the portable path), with logits far from 0 (−300 ± 15) and rows with
    /// one −∞ logit.
    #[test]
    fn exp_row_matches_f64() {
        for len in [1usize, 15, 16, 17, 31, 32, 33, 77, 4101] {
            for minus_inf in [false, true] {
                let logits: Vec<f32> = (0..len)
                    .map(|i| {
                        if minus_inf && i == len / 2 && len > 1 {
                            f32::NEG_INFINITY
                        } else {
                            -300.0 + ((i * 37 % 101) as f32 - 50.0) * 0.3
                        }
                    })
                    .collect();
                let mut row = logits.clone();
                let sum = exp_row(&mut row, 0.7);
                let m = logits.iter().fold(f64::MIN, |a, &b| a.max(b as f64));
                let want: Vec<f64> = logits
                    .iter()
                    .map(|&x| ((x as f64 - m) * 0.7).exp())
                    .collect();
                let total: f64 = want.iter().sum();
                assert!(
                    (sum as f64 - total).abs() < 1e-6 * total,
                    "{len}: {sum} vs {total}"
                );
                // An f32 argument `t` carries |t|·2⁻²⁴ of rounding, which `exp` turns into that
                // much relative error: small weights may be off by a little more.
                for (j, (&g, &w)) in row.iter().zip(&want).enumerate() {
                    let tol = (1e-6 - 1.2e-7 * w.max(1e-38).ln()) * w + 1e-37;
                    assert!((g as f64 - w).abs() <= tol, "{len} [{j}]: {g} vs {w}");
                }
            }
        }
    }

    #[test]
    fn softmax_matches_reference() {
        let mut row: Vec<f32> = (0..77)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.7)
            .collect();
        let mut want = row.clone();
        let m = want.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let s: f32 = want.iter().map(|v| ((v - m) * 0.3).exp()).sum();
        want.iter_mut()
            .for_each(|v| *v = ((*v - m) * 0.3).exp() / s);
        softmax_row(&mut row, 0.3);
        for (a, b) in row.iter().zip(&want) {
            assert!((a - b).abs() < 1e-6);
        }
    }
}

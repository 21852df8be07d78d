//! Random numbers for initial latents and stochastic samplers.
//!
//! [`TorchGenerator`] reproduces `torch.Generator("cpu").manual_seed(seed)` followed by
//! `torch.randn(shape, generator=g)` bit for bit, so a seed means the same image here as in
//! diffusers. That takes three pieces of ATen, mirrored below:
//!
//! * `at::mt19937` (`ATen/core/MT19937RNGEngine.h`): standard MT19937, seeded from the low
//!   32 bits of the u64 seed. `random()` is one draw; `random64()` is `(first << 32) | second`.
//! * `normal_fill` for float32 tensors of 16 or more values: fill the whole buffer with
//!   24-bit uniforms, then Box-Muller in place per block of 16 (pairs `j`, `j + 8`); when the
//!   length is not a multiple of 16, the last 16 values are redrawn from 16 fresh uniforms.
//!   On x86 CPUs with AVX2 (and AVX-512: measured equal on torch 2.15) torch runs this through
//!   `normal_fill_16_AVX2`, whose `log256_ps`/`sincos256_ps` (`avx_mathfun.h`) are Cephes
//!   float polynomials compiled by GCC with FMA contraction. [`cephes_logf`] and
//!   [`cephes_sincosf`] replay those operations, fused exactly where GCC fuses them.
//! * Fewer than 16 values: `at::normal_distribution<double>` per element, which draws two
//!   53-bit uniform doubles, returns `r cos θ` and caches `r sin θ` in the generator for the
//!   next scalar draw.

use candle_core::{Device, Tensor};

/// Where stochastic code gets its standard-normal noise from. A seeded torch-compatible
/// generator in normal use; a recorded replay in parity tests.
pub trait NoiseSource {
    /// `shape.iter().product()` standard-normal f32 values, in row-major order, drawn the
    /// way `torch.randn(shape, generator=g)` draws them on the CPU.
    fn randn(&mut self, shape: &[usize]) -> Vec<f32>;
}

const MT_N: usize = 624;
const MT_M: usize = 397;
const MATRIX_A: u32 = 0x9908_b0df;
const UPPER_MASK: u32 = 0x8000_0000;
const LOWER_MASK: u32 = 0x7fff_ffff;

/// MT19937 with ATen's state layout: `left` counts down to a whole-table twist, so the
/// stream equals `std::mt19937` for the same 32-bit seed.
#[derive(Clone)]
struct Mt19937 {
    state: [u32; MT_N],
    next: usize,
    left: usize,
}

impl Mt19937 {
    /// ATen's `init_with_uint32`: only the low 32 bits of the seed reach the state.
    fn new(seed: u64) -> Self {
        let mut state = [0u32; MT_N];
        state[0] = seed as u32;
        for j in 1..MT_N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self {
            state,
            next: 0,
            left: 1,
        }
    }

    fn twist(u: u32, v: u32) -> u32 {
        let mixed = (u & UPPER_MASK) | (v & LOWER_MASK);
        (mixed >> 1) ^ if v & 1 == 1 { MATRIX_A } else { 0 }
    }

    fn next_state(&mut self) {
        let s = &mut self.state;
        for j in 0..MT_N - MT_M {
            s[j] = s[j + MT_M] ^ Self::twist(s[j], s[j + 1]);
        }
        for j in MT_N - MT_M..MT_N - 1 {
            s[j] = s[j + MT_M - MT_N] ^ Self::twist(s[j], s[j + 1]);
        }
        s[MT_N - 1] = s[MT_M - 1] ^ Self::twist(s[MT_N - 1], s[0]);
        self.left = MT_N;
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        self.left -= 1;
        if self.left == 0 {
            self.next_state();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// `torch.Generator("cpu").manual_seed(seed)`: the engine plus the cached second Box-Muller
/// value that `normal_distribution<double>` leaves behind, so consecutive draws continue
/// the stream exactly as torch does (diffusers draws latents, then sampler noise, from one
/// generator).
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    next_double_normal_sample: Option<f64>,
}

impl TorchGenerator {
    pub fn new(seed: u64) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal_sample: None,
        }
    }

    /// The seed as given (torch's `initial_seed()`), even though only its low 32 bits
    /// seed the engine.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// One raw 32-bit draw (`CPUGeneratorImpl::random`).
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two draws, the first in the high half (`CPUGeneratorImpl::random64`).
    pub fn random64(&mut self) -> u64 {
        let hi = self.random() as u64;
        let lo = self.random() as u64;
        (hi << 32) | lo
    }

    /// `uniform_real_distribution<float>(0, 1)`: 24 random bits scaled into [0, 1).
    fn uniform_f32(&mut self) -> f32 {
        (self.random() & ((1 << 24) - 1)) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// `uniform_real_distribution<double>(0, 1)`: 53 random bits scaled into [0, 1).
    fn uniform_f64(&mut self) -> f64 {
        (self.random64() & ((1 << 53) - 1)) as f64 * (1.0 / (1u64 << 53) as f64)
    }

    /// `normal_distribution<double>(0, 1)`, the per-element path torch takes for fewer
    /// than 16 values. The trailing `+ 0.0` is torch's `* std + mean`, which turns -0 into +0.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal_sample.take() {
            return cached + 0.0;
        }
        let u1 = self.uniform_f64();
        let u2 = self.uniform_f64();
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        self.next_double_normal_sample = Some(r * theta.sin());
        r * theta.cos() + 0.0
    }

    /// torch's `normal_fill` for a contiguous float32 tensor of at least 16 values.
    fn normal_fill(&mut self, data: &mut [f32]) {
        for v in data.iter_mut() {
            *v = self.uniform_f32();
        }
        for block in data.chunks_exact_mut(16) {
            box_muller_16(block);
        }
        let n = data.len();
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = self.uniform_f32();
            }
            box_muller_16(tail);
        }
    }

    /// [`NoiseSource::randn`] as a CPU f32 tensor of the given shape.
    pub fn randn_tensor(&mut self, shape: &[usize]) -> candle_core::Result<Tensor> {
        let values = self.randn(shape);
        Tensor::from_vec(values, shape, &Device::Cpu)
    }
}

impl NoiseSource for TorchGenerator {
    fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let n: usize = shape.iter().product();
        if n >= 16 {
            let mut data = vec![0f32; n];
            self.normal_fill(&mut data);
            data
        } else {
            (0..n).map(|_| self.normal_f64() as f32).collect()
        }
    }
}

/// `normal_fill_16_AVX2`: Box-Muller on the pairs `(data[j], data[j + 8])`. The final
/// `+ 0.0` is the `fmadd(n, std = 1, mean = 0)` torch ends with.
fn box_muller_16(data: &mut [f32]) {
    // `_mm256_set1_ps(2.0f * c10::pi<double>)`: the product is a double, rounded once.
    let two_pi = (2.0 * std::f64::consts::PI) as f32;
    for j in 0..8 {
        let u1 = 1.0 - data[j];
        let u2 = data[j + 8];
        let radius = (-2.0 * cephes_logf(u1)).sqrt();
        let (sin, cos) = cephes_sincosf(two_pi * u2);
        data[j] = radius * cos + 0.0;
        data[j + 8] = radius * sin + 0.0;
    }
}

/// A float constant as `avx_mathfun.h` spells it: a double literal stored into a float.
macro_rules! c {
    ($v:expr) => {
        ($v as f64) as f32
    };
}

/// One lane of `log256_ps` for positive finite input, with FMA where GCC contracts it
/// (`-ffp-contract=fast`, first multiply in statement order wins).
fn cephes_logf(x: f32) -> f32 {
    let x = x.max(f32::MIN_POSITIVE);
    let bits = x.to_bits();
    let mut e = (((bits >> 23) as i32) - 0x7f) as f32 + 1.0;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < c!(std::f64::consts::FRAC_1_SQRT_2);
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;

    let z = x * x;
    let mut y = c!(7.0376836292E-2);
    for p in [
        c!(-1.1514610310E-1),
        c!(1.1676998740E-1),
        c!(-1.2420140846E-1),
        c!(1.4249322787E-1),
        c!(-1.6668057665E-1),
        c!(2.0000714765E-1),
        c!(-2.4999993993E-1),
        c!(3.3333331174E-1),
    ] {
        y = y.mul_add(x, p);
    }
    y *= x;
    y = y.mul_add(z, e * c!(-2.12194440e-4));
    y = (-z).mul_add(0.5, y);
    e.mul_add(c!(0.693359375), x + y)
}

/// One lane of `sincos256_ps`, returning `(sin, cos)`, fused as GCC fuses it.
// The Cody-Waite constants stay digit for digit as avx_mathfun.h writes them.
#[allow(clippy::excessive_precision)]
fn cephes_sincosf(x: f32) -> (f32, f32) {
    let sign_in = x.to_bits() & 0x8000_0000;
    let mut x = x.abs();
    let j = ((x * c!(1.27323954473516)) as i32 + 1) & !1;
    let y = j as f32;
    let swap_sin = ((j & 4) as u32) << 29;
    let use_sin_poly = j & 2 == 0;
    x = y.mul_add(c!(-0.78515625), x);
    x = y.mul_add(c!(-2.4187564849853515625e-4), x);
    x = y.mul_add(c!(-3.77489497744594108e-8), x);
    let sign_cos = ((!(j - 2) & 4) as u32) << 29;
    let sign_sin = sign_in ^ swap_sin;

    let z = x * x;
    let mut yc = c!(2.443315711809948E-005).mul_add(z, c!(-1.388731625493765E-003));
    yc = yc.mul_add(z, c!(4.166664568298827E-002));
    yc *= z;
    yc = yc.mul_add(z, -(z * 0.5));
    yc += 1.0;

    let mut ys = c!(-1.9515295891E-4).mul_add(z, c!(8.3321608736E-3));
    ys = ys.mul_add(z, c!(-1.6666654611E-1));
    ys *= z;
    ys = ys.mul_add(x, x);

    let (s, c) = if use_sin_poly { (ys, yc) } else { (yc, ys) };
    (
        f32::from_bits(s.to_bits() ^ sign_sin),
        f32::from_bits(c.to_bits() ^ sign_cos),
    )
}

/// A fresh seed for when the user gives none, from the process's hash randomness and the
/// clock (no extra dependency). Kept below 2^32 so it is short to type and matches the
/// range A1111-style tools print.
pub fn random_seed() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish() & 0xffff_ffff
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mt19937_matches_std_reference() {
        // std::mt19937 default seed 5489: first outputs, and the 10000th (C++11 §26.5.5).
        let mut mt = Mt19937::new(5489);
        let first: Vec<u32> = (0..5).map(|_| mt.next_u32()).collect();
        assert_eq!(
            first,
            [3499211612, 581869302, 3890346734, 3586334585, 545404204]
        );
        for _ in 5..9999 {
            mt.next_u32();
        }
        assert_eq!(mt.next_u32(), 4123659995);
    }

    #[test]
    fn only_low_32_bits_seed_the_engine() {
        let mut a = TorchGenerator::new((1 << 40) + 17);
        let mut b = TorchGenerator::new(17);
        assert_eq!(a.seed(), (1 << 40) + 17);
        assert_eq!(a.random64(), b.random64());
    }

    #[test]
    fn random64_puts_first_draw_high() {
        let mut a = TorchGenerator::new(7);
        let mut b = TorchGenerator::new(7);
        let (hi, lo) = (b.random() as u64, b.random() as u64);
        assert_eq!(a.random64(), (hi << 32) | lo);
    }

    #[test]
    fn torch_manual_seed_0_randn_1() {
        // torch.manual_seed(0); torch.randn(1) -> 1.5409961
        let v = TorchGenerator::new(0).randn(&[1]);
        assert_eq!(v, [1.5409961f32]);
    }

    #[test]
    fn cephes_functions_are_accurate() {
        for i in 1..=1000 {
            let x = i as f32 / 1000.0;
            assert!((cephes_logf(x) - x.ln()).abs() <= 2e-7 * x.ln().abs().max(1.0));
            let t = x * 6.283_185_5;
            let (s, c) = cephes_sincosf(t);
            assert!((s - t.sin()).abs() < 1e-6 && (c - t.cos()).abs() < 1e-6);
        }
    }

    #[test]
    fn random_seed_fits_in_u32() {
        assert!(random_seed() <= u32::MAX as u64);
    }

    #[test]
    fn randn_tensor_has_shape() {
        let t = TorchGenerator::new(1).randn_tensor(&[2, 3, 5]).unwrap();
        assert_eq!(t.dims(), [2, 3, 5]);
    }
}

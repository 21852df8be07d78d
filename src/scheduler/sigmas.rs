//! Schedule arithmetic shared by the schedulers, written to reproduce diffusers' numbers
//! exactly: numpy's `linspace`/`arange`/`interp` (float64, with their rounding quirks),
//! torch's float32 scalar maths for sigmas, alphas and lambdas, Karras sigmas and the
//! sigma -> timestep inversion. Getting these bit-equal is what keeps whole trajectories
//! within float32 noise of diffusers.

use super::{SchedulerConfig, TimestepSpacing};
use anyhow::{bail, Result};
use candle_core::Tensor;

/// Rejects step counts no scheduler can do; diffusers crashes or silently misbehaves on them.
pub(crate) fn check_steps(config: &SchedulerConfig, steps: usize) -> Result<()> {
    let n_train = config.num_train_timesteps();
    if steps == 0 {
        bail!("the number of steps must be at least 1");
    }
    if steps > n_train {
        bail!("{steps} steps is more than the {n_train} timesteps the model was trained with");
    }
    Ok(())
}

/// Errors if diffusers' schedule for `steps` contains a timestep outside the trained range
/// (e.g. `leading` spacing with `steps_offset` 1 at 1000 steps gives 1000, numpy's `arange`
/// rounding gives `trailing` spacing a -1 at some counts); diffusers would crash or wrap.
pub(crate) fn check_in_range(
    config: &SchedulerConfig,
    steps: usize,
    timesteps: &[f64],
) -> Result<()> {
    let n_train = config.num_train_timesteps() as f64;
    if let Some(t) = timesteps.iter().find(|&&t| t < 0.0 || t > n_train - 1.0) {
        bail!(
            "{steps} steps with this timestep_spacing gives timestep {t}, outside the trained range 0..{}; pick another step count",
            n_train - 1.0
        );
    }
    Ok(())
}

/// `np.linspace(start, stop, num, endpoint)` in float64, as numpy computes it.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize, endpoint: bool) -> Vec<f64> {
    let div = if endpoint { num.saturating_sub(1) } else { num };
    let delta = stop - start;
    let mut y: Vec<f64> = if div > 0 {
        let step = delta / div as f64;
        if step == 0.0 {
            (0..num)
                .map(|i| i as f64 / div as f64 * delta + start)
                .collect()
        } else {
            (0..num).map(|i| i as f64 * step + start).collect()
        }
    } else {
        (0..num).map(|i| i as f64 * delta + start).collect()
    };
    if endpoint && num > 1 {
        y[num - 1] = stop;
    }
    y
}

/// `np.arange(start, stop, step)` for floats: numpy sizes it as `ceil((stop - start) / step)`
/// and fills `start + i * (x[1] - x[0])`, which at some step counts yields one value more
/// than expected. Mirrored so those counts fail the same way instead of differing silently.
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil();
    // NaN (a zero step) or a non-positive length: numpy returns an empty array.
    if len.is_nan() || len <= 0.0 {
        return Vec::new();
    }
    let len = len as usize;
    let second = start + step;
    let delta = second - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => second,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.round`: half to even.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// `np.interp(x, arange(len(fp)), fp)` in float64, with numpy's clamping at both ends.
pub(crate) fn np_interp(x: f64, fp: &[f32]) -> f64 {
    let n = fp.len();
    if x.is_nan() {
        return x;
    }
    if x <= 0.0 {
        return f64::from(fp[0]);
    }
    if x >= (n - 1) as f64 {
        return f64::from(fp[n - 1]);
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return f64::from(fp[j]);
    }
    let (lo, hi) = (f64::from(fp[j]), f64::from(fp[j + 1]));
    let slope = (hi - lo) / 1.0;
    slope * (x - j as f64) + lo
}

/// Training sigmas `((1 - ac) / ac) ** 0.5`, computed on diffusers' float32 tensors.
pub(crate) fn train_sigmas(alphas_cumprod: &[f32]) -> Vec<f32> {
    alphas_cumprod
        .iter()
        .map(|&a| ((1.0 - a) / a).sqrt())
        .collect()
}

/// The timesteps of the "sigma" schedulers (Euler, Euler a, Heun, LMS) as float32 values,
/// descending, for each `timestep_spacing` (their default is `linspace`).
pub(crate) fn sigma_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<f32>> {
    let n_train = config.num_train_timesteps();
    Ok(
        match config.timestep_spacing_or(TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps, true)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                let ratio = n_train / steps;
                let offset = config.steps_offset() as f32;
                (0..steps)
                    .rev()
                    .map(|i| (i * ratio) as f32 + offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(n_train as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) as f32 - 1.0)
                    .collect()
            }
        },
    )
}

/// Integer timesteps of the multistep solvers (DPM-Solver++, UniPC), descending: they space
/// `steps + 1` points and drop the last, unlike the DDPM-style schedulers.
pub(crate) fn multistep_timesteps(
    config: &SchedulerConfig,
    steps: usize,
    last_timestep: usize,
) -> Result<Vec<i64>> {
    let n_train = config.num_train_timesteps();
    Ok(
        match config.timestep_spacing_or(TimestepSpacing::Linspace)? {
            TimestepSpacing::Linspace => {
                let mut t: Vec<i64> = np_linspace(0.0, last_timestep as f64 - 1.0, steps + 1, true)
                    .into_iter()
                    .map(|x| np_round(x) as i64)
                    .collect();
                t.reverse();
                t.pop();
                t
            }
            TimestepSpacing::Leading => {
                let ratio = last_timestep / (steps + 1);
                let offset = config.steps_offset() as i64;
                (1..=steps)
                    .rev()
                    .map(|i| (i * ratio) as i64 + offset)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                let ratio = n_train as f64 / steps as f64;
                np_arange(last_timestep as f64, 0.0, -ratio)
                    .into_iter()
                    .map(|t| np_round(t) as i64 - 1)
                    .collect()
            }
        },
    )
}

/// Karras et al. (2022) sigmas between `sigma_max` and `sigma_min`, rho = 7, in float64.
pub(crate) fn karras_sigmas(sigma_min: f64, sigma_max: f64, steps: usize) -> Vec<f64> {
    let rho = 7.0;
    let min_inv = sigma_min.powf(1.0 / rho);
    let max_inv = sigma_max.powf(1.0 / rho);
    np_linspace(0.0, 1.0, steps, true)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// `np.log` of the float32 training sigmas (stays float32, as numpy keeps the dtype).
pub(crate) fn log_sigmas(sigmas: &[f32]) -> Vec<f32> {
    sigmas.iter().map(|s| s.ln()).collect()
}

/// diffusers' `_sigma_to_t`: the fractional training timestep whose sigma is `sigma`, by
/// linear interpolation in log-sigma (float32 table, float64 arithmetic, as numpy mixes them).
pub(crate) fn sigma_to_t(sigma: f64, log_sigmas: &[f32]) -> f64 {
    let log_sigma = sigma.max(1e-10).ln();
    let count = log_sigmas
        .iter()
        .filter(|&&l| log_sigma - f64::from(l) >= 0.0)
        .count();
    let low_idx = count.saturating_sub(1).min(log_sigmas.len() - 2);
    let high_idx = low_idx + 1;
    let low = log_sigmas[low_idx];
    let high = log_sigmas[high_idx];
    let w = ((f64::from(low) - log_sigma) / f64::from(low - high)).clamp(0.0, 1.0);
    (1.0 - w) * low_idx as f64 + w * high_idx as f64
}

/// `(alpha_t, sigma_t)` of the variance-preserving process for a VE `sigma`, float32.
pub(crate) fn alpha_sigma(sigma: f32) -> (f32, f32) {
    let alpha = 1.0 / (sigma * sigma + 1.0).sqrt();
    (alpha, sigma * alpha)
}

/// Half log-SNR `log(alpha) - log(sigma)`, float32 (infinite at sigma = 0, as in diffusers).
pub(crate) fn lambda(alpha: f32, sigma: f32) -> f32 {
    alpha.ln() - sigma.ln()
}

/// diffusers' `index_for_timestep` for the sigma schedulers: the position of `t` in the
/// schedule, the second one if it occurs twice (so img2img never skips a sigma).
pub(crate) fn index_for_timestep(timesteps: &[f64], t: f64) -> Result<usize> {
    let hits: Vec<usize> = timesteps
        .iter()
        .enumerate()
        .filter(|(_, &s)| s == t)
        .map(|(i, _)| i)
        .collect();
    match hits.as_slice() {
        [] => bail!("timestep {t} is not in the scheduler's schedule"),
        [only] => Ok(*only),
        [_, second, ..] => Ok(*second),
    }
}

/// The multistep solvers' variant: an unknown timestep means the last step.
pub(crate) fn index_for_timestep_or_last(timesteps: &[f64], t: f64) -> usize {
    index_for_timestep(timesteps, t).unwrap_or(timesteps.len().saturating_sub(1))
}

/// `tensor * s` with `s` rounded to the tensor's float type first, as torch does for a
/// 0-dim float32 tensor or a Python scalar.
pub(crate) fn mul(t: &Tensor, s: f32) -> Result<Tensor> {
    Ok(t.affine(f64::from(s), 0.0)?)
}

/// `tensor / s` as a true division (not a multiplication by `1 / s`), like torch.
pub(crate) fn div(t: &Tensor, s: f32) -> Result<Tensor> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// Solves `a x = b` in float32 with LU and partial pivoting in LAPACK's order of operations
/// (`sgetrf` + `sgetrs`), as `torch.linalg.solve` does for UniPC's small systems.
pub(crate) fn solve_f32(mut a: Vec<Vec<f32>>, mut b: Vec<f32>) -> Result<Vec<f32>> {
    let n = b.len();
    for k in 0..n {
        let mut p = k;
        for i in k + 1..n {
            if a[i][k].abs() > a[p][k].abs() {
                p = i;
            }
        }
        if a[p][k] == 0.0 || !a[p][k].is_finite() {
            bail!("UniPC: singular coefficient matrix (the step sizes collapsed)");
        }
        a.swap(k, p);
        b.swap(k, p);
        let r = 1.0 / a[k][k];
        for row in a.iter_mut().skip(k + 1) {
            row[k] *= r;
        }
        for i in k + 1..n {
            for j in k + 1..n {
                a[i][j] -= a[i][k] * a[k][j];
            }
        }
    }
    for k in 0..n {
        if b[k] != 0.0 {
            for i in k + 1..n {
                b[i] -= b[k] * a[i][k];
            }
        }
    }
    for k in (0..n).rev() {
        if b[k] != 0.0 {
            b[k] /= a[k][k];
            for i in 0..k {
                b[i] -= b[k] * a[i][k];
            }
        }
    }
    Ok(b)
}

/// 21-point Gauss-Kronrod quadrature (QUADPACK's `qk21`, the first and, for LMS's
/// polynomial integrands, only pass of `scipy.integrate.quad`), in the same summation order.
pub(crate) fn quad_qk21(f: impl Fn(f64) -> f64, a: f64, b: f64) -> f64 {
    // QUADPACK's abscissae and weights (Fullerton, 80-digit), rounded to f64.
    const XGK: [f64; 11] = [
        0.995_657_163_025_808_1,
        0.973_906_528_517_171_7,
        0.930_157_491_355_708_2,
        0.865_063_366_688_984_5,
        0.780_817_726_586_416_9,
        0.679_409_568_299_024_4,
        0.562_757_134_668_604_7,
        0.433_395_394_129_247_2,
        0.294_392_862_701_460_2,
        0.148_874_338_981_631_22,
        0.0,
    ];
    const WGK: [f64; 11] = [
        0.011_694_638_867_371_874,
        0.032_558_162_307_964_725,
        0.054_755_896_574_351_995,
        0.075_039_674_810_919_96,
        0.093_125_454_583_697_6,
        0.109_387_158_802_297_64,
        0.123_491_976_262_065_84,
        0.134_709_217_311_473_34,
        0.142_775_938_577_060_09,
        0.147_739_104_901_338_49,
        0.149_445_554_002_916_9,
    ];
    let centr = 0.5 * (a + b);
    let hlgth = 0.5 * (b - a);
    let mut resk = WGK[10] * f(centr);
    // Gauss nodes (even Fortran indices) first, then the Kronrod additions, as qk21 does.
    for j in (1..10).step_by(2).chain((0..10).step_by(2)) {
        let absc = hlgth * XGK[j];
        let fsum = f(centr - absc) + f(centr + absc);
        resk += WGK[j] * fsum;
    }
    resk * hlgth
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arange_has_numpys_extra_element() {
        // np.arange(1000, 0, -1000/61) has 62 elements.
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 61.0).len(), 62);
        assert_eq!(np_arange(1000.0, 0.0, -1000.0 / 7.0).len(), 7);
    }

    #[test]
    fn linspace_single_point_is_start() {
        assert_eq!(np_linspace(0.0, 999.0, 1, true), vec![0.0]);
        assert_eq!(
            np_linspace(0.0, 50.0, 4, false),
            vec![0.0, 12.5, 25.0, 37.5]
        );
    }

    #[test]
    fn qk21_integrates_cubics_exactly() {
        let v = quad_qk21(|x| x * x * x - 2.0 * x + 1.0, 2.0, -1.0);
        let exact = |x: f64| x.powi(4) / 4.0 - x * x + x;
        assert!((v - (exact(-1.0) - exact(2.0))).abs() < 1e-12);
    }

    #[test]
    fn solve_pivots() {
        let x = solve_f32(vec![vec![1.0, 1.0], vec![-2.0, 1.0]], vec![3.0, 0.0]).unwrap();
        assert!((x[0] - 1.0).abs() < 1e-6 && (x[1] - 2.0).abs() < 1e-6);
    }
}

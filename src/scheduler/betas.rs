//! Beta schedules, computed the way diffusers computes them in torch float32, so that
//! `alphas_cumprod` agrees with diffusers' to the last bit (the schedulers' 1e-5 parity
//! depends on it: a float64 schedule drifts by ~1e-6 relative over 1000 steps).

use super::SchedulerConfig;
use anyhow::{bail, Result};

/// The `beta_schedule` values diffusers knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
    SquaredCosCapV2,
}

impl BetaSchedule {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "linear" => Self::Linear,
            "scaled_linear" => Self::ScaledLinear,
            "squaredcos_cap_v2" => Self::SquaredCosCapV2,
            other => bail!("unsupported beta_schedule {other:?} in scheduler_config.json (expected linear, scaled_linear or squaredcos_cap_v2)"),
        })
    }
}

/// `torch.linspace(start, end, n, dtype=torch.float32)`: float32 arithmetic, the first half
/// counted up from `start` and the second half down from `end`, as ATen's CPU kernel does.
/// That kernel is compiled for AVX2/AVX-512 (what torch dispatches to on any recent x86 CPU,
/// and likewise on ARM), where the compiler fuses `start + step * i` into one FMA; the
/// fused form is what diffusers' schedules are made of (an unfused multiply-add differs in
/// 145 of SD's 1000 betas).
fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start as f32];
    }
    let (start, end) = (start as f32, end as f32);
    let step = (end - start) / (n - 1) as f32;
    let halfway = n / 2;
    (0..n)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((n - i - 1) as f32, end)
            }
        })
        .collect()
}

/// The training betas (float32 values, widened), from `trained_betas` or `beta_schedule`.
pub fn betas(config: &SchedulerConfig) -> Result<Vec<f64>> {
    let n = config.num_train_timesteps();
    if n == 0 {
        bail!("num_train_timesteps is 0 in scheduler_config.json");
    }
    if let Some(trained) = &config.trained_betas {
        if trained.len() != n {
            bail!(
                "trained_betas has {} values but num_train_timesteps is {n}",
                trained.len()
            );
        }
        return Ok(trained.iter().map(|&b| b as f32 as f64).collect());
    }
    let start = config.beta_start.unwrap_or(0.0001);
    let end = config.beta_end.unwrap_or(0.02);
    let schedule = BetaSchedule::parse(config.beta_schedule.as_deref().unwrap_or("linear"))?;
    Ok(match schedule {
        BetaSchedule::Linear => torch_linspace_f32(start, end, n)
            .into_iter()
            .map(f64::from)
            .collect(),
        BetaSchedule::ScaledLinear => torch_linspace_f32(start.sqrt(), end.sqrt(), n)
            .into_iter()
            .map(|b| f64::from(b * b))
            .collect(),
        BetaSchedule::SquaredCosCapV2 => {
            // betas_for_alpha_bar in Python floats, then stored as float32.
            let alpha_bar = |t: f64| {
                ((t + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                    .cos()
                    .powi(2)
            };
            (0..n)
                .map(|i| {
                    let t1 = i as f64 / n as f64;
                    let t2 = (i + 1) as f64 / n as f64;
                    let b = (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999);
                    b as f32 as f64
                })
                .collect()
        }
    })
}

/// `torch.cumprod(1 - betas)`: alphas in float32, the running product in float64 (ATen's
/// CPU accumulator type for float), each result rounded to float32.
pub fn alphas_cumprod(betas: &[f64]) -> Vec<f64> {
    let mut acc = 1.0f64;
    betas
        .iter()
        .map(|&b| {
            let alpha = 1.0f32 - b as f32;
            acc *= alpha as f64;
            acc as f32 as f64
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sd_schedule_endpoints() {
        let cfg = SchedulerConfig {
            beta_start: Some(0.00085),
            beta_end: Some(0.012),
            beta_schedule: Some("scaled_linear".into()),
            ..Default::default()
        };
        let b = betas(&cfg).unwrap();
        assert_eq!(b.len(), 1000);
        assert!((b[0] - 0.00085).abs() < 1e-9);
        assert!((b[999] - 0.012).abs() < 1e-8);
        let ac = alphas_cumprod(&b);
        assert!(ac.windows(2).all(|w| w[1] < w[0]));
        // diffusers: PNDMScheduler(**sd14).alphas_cumprod[-1] == 0.0046...
        assert!((ac[999] - 0.004_660_5).abs() < 1e-6, "{}", ac[999]);
    }

    #[test]
    fn bad_schedule_is_an_error() {
        let cfg = SchedulerConfig {
            beta_schedule: Some("cosine".into()),
            ..Default::default()
        };
        assert!(betas(&cfg).is_err());
    }
}

//! Euler (Karras et al. 2022, algorithm 2 without churn), mirroring diffusers'
//! `EulerDiscreteScheduler`. Timesteps are fractional float32 values interpolated on the
//! training schedule, passed to the UNet as such.

use super::sigmas::{self, div, index_for_timestep, mul};
use super::{alphas_cumprod_f32, PredictionType, Scheduler, SchedulerConfig, TimestepSpacing};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Euler {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    /// `final_sigmas_type = "sigma_min"` ends on the smallest training sigma instead of 0.
    final_sigma_min: bool,
    timesteps: Vec<f64>,
    /// One per timestep plus the final one.
    sigmas: Vec<f32>,
    step_index: Option<usize>,
}

impl Euler {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("Euler")?;
        if config.use_karras_sigmas == Some(true) {
            bail!("Euler with Karras sigmas is not supported; try dpm++2m-karras");
        }
        if config
            .interpolation_type
            .as_deref()
            .is_some_and(|t| t != "linear")
        {
            bail!("Euler supports interpolation_type linear only");
        }
        if config
            .timestep_type
            .as_deref()
            .is_some_and(|t| t != "discrete")
        {
            bail!("Euler supports timestep_type discrete only");
        }
        let final_sigma_min = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => false,
            "sigma_min" => true,
            other => bail!("final_sigmas_type must be zero or sigma_min, got {other:?}"),
        };
        Ok(Self {
            config: config.clone(),
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod_f32(config)?),
            prediction: config.prediction_type()?,
            final_sigma_min,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
        })
    }

    fn index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => index_for_timestep(&self.timesteps, timestep),
        }
    }
}

/// The shared `set_timesteps` of the sigma schedulers (Euler, Euler a, Heun, LMS): float32
/// timesteps and their interpolated sigmas, final sigma not yet appended.
pub(crate) fn sigma_schedule(
    config: &SchedulerConfig,
    train_sigmas: &[f32],
    steps: usize,
) -> Result<(Vec<f64>, Vec<f32>)> {
    sigmas::check_steps(config, steps)?;
    let timesteps: Vec<f64> = sigmas::sigma_timesteps(config, steps)?
        .into_iter()
        .map(f64::from)
        .collect();
    sigmas::check_in_range(config, steps, &timesteps)?;
    let sig = timesteps
        .iter()
        .map(|&t| sigmas::np_interp(t, train_sigmas) as f32)
        .collect();
    Ok((timesteps, sig))
}

/// `init_noise_sigma` of the sigma schedulers: the largest sigma, or `sqrt(max^2 + 1)` for
/// `leading` spacing (float32, as diffusers computes it).
pub(crate) fn sigma_init_noise(config: &SchedulerConfig, sigmas: &[f32]) -> f64 {
    let max = sigmas.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    match config.timestep_spacing_or(TimestepSpacing::Linspace) {
        Ok(TimestepSpacing::Leading) => f64::from((max * max + 1.0).sqrt()),
        _ => f64::from(max),
    }
}

/// `sample / sqrt(sigma^2 + 1)`: the sigma schedulers' input scaling.
pub(crate) fn scale_by_sigma(sample: &Tensor, sigma: f32) -> Result<Tensor> {
    div(sample, (sigma * sigma + 1.0).sqrt())
}

/// The denoised estimate for `prediction` at `sigma`, as the sigma schedulers compute it.
pub(crate) fn predict_x0(
    prediction: PredictionType,
    model_output: &Tensor,
    sample: &Tensor,
    sigma: f32,
) -> Result<Tensor> {
    Ok(match prediction {
        PredictionType::Epsilon => (sample - mul(model_output, sigma)?)?,
        PredictionType::VPrediction => {
            let s2 = sigma * sigma + 1.0;
            (mul(model_output, -sigma / s2.sqrt())? + div(sample, s2)?)?
        }
        PredictionType::Sample => model_output.clone(),
    })
}

impl Scheduler for Euler {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let (timesteps, mut sig) = sigma_schedule(&self.config, &self.train_sigmas, steps)?;
        sig.push(if self.final_sigma_min {
            self.train_sigmas[0]
        } else {
            0.0
        });
        self.timesteps = timesteps;
        self.sigmas = sig;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        sigma_init_noise(&self.config, &self.sigmas)
    }

    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        scale_by_sigma(sample, self.sigmas[self.index(timestep)?])
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index(timestep)?;
        let (Some(&sigma), Some(&sigma_next)) = (self.sigmas.get(i), self.sigmas.get(i + 1)) else {
            bail!("Euler: step called more times than there are timesteps");
        };
        // s_churn = 0 (diffusers' default), so sigma_hat = sigma and no noise is drawn.
        let pred_x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let derivative = div(&(sample - pred_x0)?, sigma)?;
        let dt = sigma_next - sigma;
        let prev = (sample + mul(&derivative, dt)?)?;
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = index_for_timestep(&self.timesteps, timestep)?;
        Ok((original + mul(noise, self.sigmas[i])?)?)
    }
}

//! DDIM (denoising diffusion implicit models), mirroring diffusers' `DDIMScheduler`,
//! with `eta` for the stochastic variant (eta = 1 is DDPM-like).

use super::sigmas::{div, mul};
use super::{
    alpha_at, alphas_cumprod_f32, discrete_timesteps, noise_like, PredictionType, Scheduler,
    SchedulerConfig,
};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Ddim {
    config: SchedulerConfig,
    /// float32, as diffusers keeps them; the scalar maths below is float32 like torch's.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    clip_sample: Option<f32>,
    eta: f64,
    steps: usize,
    timesteps: Vec<f64>,
}

impl Ddim {
    pub fn new(config: &SchedulerConfig, eta: f64) -> Result<Self> {
        config.reject_unsupported("DDIM")?;
        if !(0.0..=1.0).contains(&eta) {
            bail!("eta must be between 0 and 1, got {eta}");
        }
        let alphas_cumprod = alphas_cumprod_f32(config)?;
        // DDIM's own default is set_alpha_to_one = true; SD's config sets it false.
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let clip_sample = config
            .clip_sample
            .unwrap_or(true)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            prediction: config.prediction_type()?,
            clip_sample,
            eta,
            steps: 0,
            timesteps: Vec::new(),
        })
    }
}

impl Scheduler for Ddim {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        self.timesteps = discrete_timesteps(&self.config, steps)?
            .into_iter()
            .map(|t| t as f64)
            .collect();
        self.steps = steps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.steps == 0 {
            bail!("DDIM: set_timesteps must be called before step");
        }
        let t = timestep as i64;
        let prev_t = t - (self.config.num_train_timesteps() / self.steps) as i64;
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = if prev_t >= 0 {
            alpha_at(&self.alphas_cumprod, prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - a_t;
        let (mut pred_x0, pred_eps) = match self.prediction {
            PredictionType::Epsilon => (
                div(&(sample - mul(model_output, beta_t.sqrt())?)?, a_t.sqrt())?,
                model_output.clone(),
            ),
            PredictionType::Sample => {
                let x0 = model_output.clone();
                let eps = div(&(sample - mul(&x0, a_t.sqrt())?)?, beta_t.sqrt())?;
                (x0, eps)
            }
            PredictionType::VPrediction => (
                (mul(sample, a_t.sqrt())? - mul(model_output, beta_t.sqrt())?)?,
                (mul(model_output, a_t.sqrt())? + mul(sample, beta_t.sqrt())?)?,
            ),
        };
        if let Some(r) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        let beta_prev = 1.0 - a_prev;
        let variance = beta_prev / beta_t * (1.0 - a_t / a_prev);
        let std_dev = self.eta as f32 * variance.sqrt();
        let direction = mul(&pred_eps, (1.0 - a_prev - std_dev * std_dev).sqrt())?;
        let mut prev = (mul(&pred_x0, a_prev.sqrt())? + direction)?;
        if self.eta > 0.0 {
            prev = (prev + mul(&noise_like(noise, model_output)?, std_dev)?)?;
        }
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        super::add_noise_ddpm(&self.alphas_cumprod, original, noise, timestep)
    }
}

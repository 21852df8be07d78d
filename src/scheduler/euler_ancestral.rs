//! Euler ancestral ("Euler a"), mirroring diffusers' `EulerAncestralDiscreteScheduler`: an
//! Euler step down to `sigma_down`, then fresh noise back up to the next sigma.

use super::euler::{predict_x0, scale_by_sigma, sigma_init_noise, sigma_schedule};
use super::sigmas::{self, div, index_for_timestep, mul};
use super::{alphas_cumprod_f32, noise_like, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct EulerAncestral {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
}

impl EulerAncestral {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("Euler ancestral")?;
        let prediction = config.prediction_type()?;
        if prediction == PredictionType::Sample {
            bail!("Euler ancestral supports prediction_type epsilon and v_prediction, not sample (as in diffusers)");
        }
        Ok(Self {
            config: config.clone(),
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod_f32(config)?),
            prediction,
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

impl Scheduler for EulerAncestral {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let (timesteps, mut sig) = sigma_schedule(&self.config, &self.train_sigmas, steps)?;
        sig.push(0.0);
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
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        let i = self.index(timestep)?;
        let (Some(&sigma), Some(&sigma_to)) = (self.sigmas.get(i), self.sigmas.get(i + 1)) else {
            bail!("Euler ancestral: step called more times than there are timesteps");
        };
        let pred_x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let (from2, to2) = (sigma * sigma, sigma_to * sigma_to);
        let sigma_up = (to2 * (from2 - to2) / from2).sqrt();
        let sigma_down = (to2 - sigma_up * sigma_up).sqrt();
        let derivative = div(&(sample - pred_x0)?, sigma)?;
        let dt = sigma_down - sigma;
        let prev = (sample + mul(&derivative, dt)?)?;
        // diffusers draws noise on every step, the last one included (scaled by 0 there).
        let z = noise_like(noise, model_output)?;
        let prev = (prev + mul(&z, sigma_up)?)?;
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = index_for_timestep(&self.timesteps, timestep)?;
        Ok((original + mul(noise, self.sigmas[i])?)?)
    }
}

//! Heun's method (Karras et al. 2022, algorithm 1 without churn), mirroring diffusers'
//! `HeunDiscreteScheduler`: every step but the last evaluates the UNet twice, so the
//! timestep list repeats each inner timestep (2n - 1 UNet calls for n steps).

use super::euler::{predict_x0, scale_by_sigma, sigma_init_noise, sigma_schedule};
use super::sigmas::{self, div, index_for_timestep, mul};
use super::PredictionType;
use super::{alphas_cumprod_f32, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Heun {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    clip_sample: Option<f32>,
    timesteps: Vec<f64>,
    /// `[s0, s1, s1, s2, s2, ..., 0]`, aligned with `timesteps` plus the final sigma.
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    /// Set between the first (Euler) and second (correction) evaluation of a step.
    first_order: Option<FirstOrder>,
}

struct FirstOrder {
    derivative: Tensor,
    dt: f32,
    sample: Tensor,
}

impl Heun {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        // Heun's own defaults differ from the other sigma schedulers'.
        let config = config.with_beta_defaults(0.00085, 0.012, "linear");
        config.reject_unsupported("Heun")?;
        if config.use_karras_sigmas == Some(true) {
            bail!("Heun with Karras sigmas is not supported; try dpm++2m-karras");
        }
        let clip_sample = config
            .clip_sample
            .unwrap_or(false)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod_f32(&config)?),
            prediction: config.prediction_type()?,
            clip_sample,
            config,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            first_order: None,
        })
    }

    fn index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => index_for_timestep(&self.timesteps, timestep),
        }
    }
}

impl Scheduler for Heun {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let (ts, sig) = sigma_schedule(&self.config, &self.train_sigmas, steps)?;
        let mut sigmas = vec![sig[0]];
        let mut timesteps = vec![ts[0]];
        for (&s, &t) in sig[1..].iter().zip(&ts[1..]) {
            sigmas.extend([s, s]);
            timesteps.extend([t, t]);
        }
        sigmas.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sigmas;
        self.step_index = None;
        self.first_order = None;
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
        if i + 1 >= self.sigmas.len() {
            bail!("Heun: step called more times than there are timesteps");
        }
        let prev = match self.first_order.take() {
            None => {
                let (sigma, sigma_next) = (self.sigmas[i], self.sigmas[i + 1]);
                let mut pred_x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
                if let Some(r) = self.clip_sample {
                    pred_x0 = pred_x0.clamp(-r, r)?;
                }
                let derivative = div(&(sample - pred_x0)?, sigma)?;
                let dt = sigma_next - sigma;
                let prev = (sample + mul(&derivative, dt)?)?;
                self.first_order = Some(FirstOrder {
                    derivative,
                    dt,
                    sample: sample.clone(),
                });
                prev
            }
            Some(first) => {
                let sigma_next = self.sigmas[i];
                let mut pred_x0 = predict_x0(self.prediction, model_output, sample, sigma_next)?;
                if let Some(r) = self.clip_sample {
                    pred_x0 = pred_x0.clamp(-r, r)?;
                }
                let derivative = div(&(sample - pred_x0)?, sigma_next)?;
                let derivative = div(&(first.derivative + derivative)?, 2.0)?;
                (first.sample + mul(&derivative, first.dt)?)?
            }
        };
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = index_for_timestep(&self.timesteps, timestep)?;
        Ok((original + mul(noise, self.sigmas[i])?)?)
    }
}

//! Latent consistency model sampling, mirroring diffusers' `LCMScheduler`: each step jumps to
//! a denoised estimate (boundary-condition scaled) and re-noises it to the next timestep.
//! Only meaningful with LCM-distilled weights (or an LCM LoRA).

use super::sigmas::{div, mul};
use super::{
    alpha_at, alphas_cumprod_f32, noise_like, sigmas, PredictionType, Scheduler, SchedulerConfig,
};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Lcm {
    config: SchedulerConfig,
    alphas_cumprod: Vec<f32>,
    prediction: PredictionType,
    clip_sample: Option<f32>,
    original_steps: usize,
    timestep_scaling: f64,
    timesteps: Vec<f64>,
    step_index: Option<usize>,
}

impl Lcm {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        // LCM's own beta defaults are SD's.
        let config = config.with_beta_defaults(0.00085, 0.012, "scaled_linear");
        config.reject_unsupported("LCM")?;
        let original_steps = config.original_inference_steps.unwrap_or(50);
        let n_train = config.num_train_timesteps();
        if original_steps == 0 || original_steps > n_train {
            bail!("LCM: original_inference_steps {original_steps} must be between 1 and num_train_timesteps {n_train}");
        }
        let clip_sample = config
            .clip_sample
            .unwrap_or(false)
            .then(|| config.clip_sample_range.unwrap_or(1.0) as f32);
        Ok(Self {
            alphas_cumprod: alphas_cumprod_f32(&config)?,
            prediction: config.prediction_type()?,
            clip_sample,
            original_steps,
            timestep_scaling: config.timestep_scaling.unwrap_or(10.0),
            config,
            timesteps: Vec::new(),
            step_index: None,
        })
    }
}

impl Scheduler for Lcm {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        sigmas::check_steps(&self.config, steps)?;
        if steps > self.original_steps {
            bail!(
                "LCM can do at most {} steps (the distillation schedule's original_inference_steps), got {steps}",
                self.original_steps
            );
        }
        // The distillation schedule: every k-th training timestep, noisiest first ...
        let k = self.config.num_train_timesteps() / self.original_steps;
        let origin: Vec<i64> = (1..=self.original_steps)
            .rev()
            .map(|i| (i * k) as i64 - 1)
            .collect();
        // ... of which `steps` evenly spaced ones are used.
        self.timesteps = sigmas::np_linspace(0.0, origin.len() as f64, steps, false)
            .into_iter()
            .map(|x| origin[x.floor() as usize] as f64)
            .collect();
        self.step_index = None;
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
        if self.timesteps.is_empty() {
            bail!("LCM: set_timesteps must be called before step");
        }
        let i = match self.step_index {
            Some(i) => i,
            None => sigmas::index_for_timestep(&self.timesteps, timestep)?,
        };
        let t = timestep as i64;
        let prev_t = self.timesteps.get(i + 1).map_or(t, |&p| p as i64);
        let a_t = alpha_at(&self.alphas_cumprod, t)?;
        let a_prev = alpha_at(&self.alphas_cumprod, prev_t)?;
        let beta_t = 1.0 - a_t;
        let beta_prev = 1.0 - a_prev;
        // Boundary-condition scalings (float32, as torch computes them from the int timestep).
        let sigma_data = 0.5f32;
        let scaled = t as f32 * self.timestep_scaling as f32;
        let c_skip = sigma_data * sigma_data / (scaled * scaled + sigma_data * sigma_data);
        let c_out = scaled / (scaled * scaled + sigma_data * sigma_data).sqrt();
        let mut pred_x0 = match self.prediction {
            PredictionType::Epsilon => {
                div(&(sample - mul(model_output, beta_t.sqrt())?)?, a_t.sqrt())?
            }
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => {
                (mul(sample, a_t.sqrt())? - mul(model_output, beta_t.sqrt())?)?
            }
        };
        if let Some(r) = self.clip_sample {
            pred_x0 = pred_x0.clamp(-r, r)?;
        }
        let denoised = (mul(&pred_x0, c_out)? + mul(sample, c_skip)?)?;
        let prev = if i + 1 != self.timesteps.len() {
            let z = noise_like(noise, model_output)?;
            (mul(&denoised, a_prev.sqrt())? + mul(&z, beta_prev.sqrt())?)?
        } else {
            denoised
        };
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        super::add_noise_ddpm(&self.alphas_cumprod, original, noise, timestep)
    }
}

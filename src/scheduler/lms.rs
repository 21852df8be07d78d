//! Linear multistep (order 4), mirroring diffusers' `LMSDiscreteScheduler`. Its
//! coefficients integrate Lagrange polynomials over sigma; diffusers uses `scipy.quad`
//! (one 21-point Gauss-Kronrod pass for these polynomials, evaluated on float32 tensors),
//! which is reproduced here operation for operation.

use super::euler::{predict_x0, scale_by_sigma, sigma_init_noise, sigma_schedule};
use super::sigmas::{self, div, index_for_timestep, mul};
use super::{alphas_cumprod_f32, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// diffusers' default `order` argument of `LMSDiscreteScheduler.step`.
const LMS_ORDER: usize = 4;

pub struct Lms {
    config: SchedulerConfig,
    train_sigmas: Vec<f32>,
    prediction: PredictionType,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    /// Most recent last, at most `LMS_ORDER`.
    derivatives: Vec<Tensor>,
}

impl Lms {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("LMS")?;
        if config.use_karras_sigmas == Some(true) {
            bail!("LMS with Karras sigmas is not supported; try dpm++2m-karras");
        }
        Ok(Self {
            config: config.clone(),
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod_f32(config)?),
            prediction: config.prediction_type()?,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            derivatives: Vec::new(),
        })
    }

    fn index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(i) => Ok(i),
            None => index_for_timestep(&self.timesteps, timestep),
        }
    }

    /// `get_lms_coefficient(order, t, current_order)`: the integral from sigma[t] to
    /// sigma[t+1] of the Lagrange basis polynomial of sigma[t - current_order], with the
    /// polynomial evaluated in float32 like diffusers' tensor arithmetic.
    fn coefficient(&self, order: usize, t: usize, current: usize) -> f64 {
        let s = &self.sigmas;
        let basis = |tau: f64| -> f64 {
            let tau = tau as f32;
            let mut prod: Option<f32> = None;
            for k in 0..order {
                if k == current {
                    continue;
                }
                let factor = (tau - s[t - k]) / (s[t - current] - s[t - k]);
                prod = Some(prod.map_or(factor, |p| p * factor));
            }
            prod.map_or(1.0, f64::from)
        };
        sigmas::quad_qk21(basis, f64::from(s[t]), f64::from(s[t + 1]))
    }
}

impl Scheduler for Lms {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        let (timesteps, mut sig) = sigma_schedule(&self.config, &self.train_sigmas, steps)?;
        sig.push(0.0);
        self.timesteps = timesteps;
        self.sigmas = sig;
        self.step_index = None;
        self.derivatives.clear();
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
        let Some(&sigma) = self.sigmas.get(i).filter(|_| i + 1 < self.sigmas.len()) else {
            bail!("LMS: step called more times than there are timesteps");
        };
        let pred_x0 = predict_x0(self.prediction, model_output, sample, sigma)?;
        let derivative = div(&(sample - pred_x0)?, sigma)?;
        self.derivatives.push(derivative);
        if self.derivatives.len() > LMS_ORDER {
            self.derivatives.remove(0);
        }
        let order = (i + 1).min(LMS_ORDER);
        // sum(coeff * derivative for coeff, derivative in zip(coeffs, reversed(derivatives)))
        let mut acc: Option<Tensor> = None;
        for (current, d) in (0..order).zip(self.derivatives.iter().rev()) {
            let term = mul(d, self.coefficient(order, i, current) as f32)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        let prev = match acc {
            Some(a) => (sample + a)?,
            None => sample.clone(),
        };
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = index_for_timestep(&self.timesteps, timestep)?;
        Ok((original + mul(noise, self.sigmas[i])?)?)
    }
}

//! PNDM with `skip_prk_steps` (pseudo linear multistep), Stable Diffusion 1.x's default
//! sampler. Mirrors diffusers' `PNDMScheduler.step_plms`, including its quirk of evaluating
//! the second timestep twice (n steps are n + 1 UNet calls).

use super::sigmas::{div, mul};
use super::{alphas_cumprod_f32, discrete_timesteps, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct Pndm {
    config: SchedulerConfig,
    /// float32, as diffusers keeps them; all scalar maths below is float32 like torch's.
    alphas_cumprod: Vec<f32>,
    final_alpha_cumprod: f32,
    prediction: PredictionType,
    steps: usize,
    timesteps: Vec<f64>,
    /// The last (up to) four model outputs, oldest first.
    ets: Vec<Tensor>,
    counter: usize,
    cur_sample: Option<Tensor>,
}

impl Pndm {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        if !config.skip_prk_steps.unwrap_or(false) {
            bail!("PNDM without skip_prk_steps (Runge-Kutta warm-up) is not supported; Stable Diffusion 1.x configs set skip_prk_steps, or pick another --scheduler");
        }
        config.reject_unsupported("PNDM")?;
        let alphas_cumprod = alphas_cumprod_f32(config)?;
        let final_alpha_cumprod = if config.set_alpha_to_one.unwrap_or(false) {
            1.0
        } else {
            alphas_cumprod[0]
        };
        let prediction = config.prediction_type()?;
        if prediction == PredictionType::Sample {
            bail!("PNDM supports prediction_type epsilon and v_prediction, not sample");
        }
        Ok(Self {
            config: config.clone(),
            alphas_cumprod,
            final_alpha_cumprod,
            prediction,
            steps: 0,
            timesteps: Vec::new(),
            ets: Vec::new(),
            counter: 0,
            cur_sample: None,
        })
    }

    fn alpha(&self, t: i64) -> Result<f32> {
        super::alpha_at(&self.alphas_cumprod, t)
    }

    /// diffusers' `_get_prev_sample` (formula (9) of the PNDM paper).
    fn prev_sample(
        &self,
        sample: &Tensor,
        t: i64,
        prev_t: i64,
        model_output: &Tensor,
    ) -> Result<Tensor> {
        let a_t = self.alpha(t)?;
        let a_prev = if prev_t >= 0 {
            self.alpha(prev_t)?
        } else {
            self.final_alpha_cumprod
        };
        let beta_t = 1.0 - a_t;
        let beta_prev = 1.0 - a_prev;
        let model_output = match self.prediction {
            PredictionType::VPrediction => {
                (mul(model_output, a_t.sqrt())? + mul(sample, beta_t.sqrt())?)?
            }
            _ => model_output.clone(),
        };
        let sample_coeff = (a_prev / a_t).sqrt();
        let denom = a_t * beta_prev.sqrt() + (a_t * beta_t * a_prev).sqrt();
        Ok((mul(sample, sample_coeff)? - div(&mul(&model_output, a_prev - a_t)?, denom)?)?)
    }
}

impl Scheduler for Pndm {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        // discrete_timesteps is descending; diffusers builds the PLMS list from the ascending
        // one as concat(ts[:-1], ts[-2:-1], ts[-1:]) reversed, i.e. the second-largest
        // timestep appears twice.
        let mut ts = discrete_timesteps(&self.config, steps)?;
        ts.reverse();
        let n = ts.len();
        let mut plms: Vec<i64> = ts[..n - 1].to_vec();
        if n >= 2 {
            plms.push(ts[n - 2]);
        }
        plms.push(ts[n - 1]);
        plms.reverse();
        self.timesteps = plms.into_iter().map(|t| t as f64).collect();
        self.steps = steps;
        self.ets.clear();
        self.counter = 0;
        self.cur_sample = None;
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
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor> {
        if self.steps == 0 {
            bail!("PNDM: set_timesteps must be called before step");
        }
        let ratio = (self.config.num_train_timesteps() / self.steps) as i64;
        let mut t = timestep as i64;
        let mut prev_t = t - ratio;
        if self.counter != 1 {
            if self.ets.len() > 3 {
                self.ets.drain(..self.ets.len() - 3);
            }
            self.ets.push(model_output.clone());
        } else {
            prev_t = t;
            t += ratio;
        }
        let ets = &self.ets;
        let k = ets.len();
        let mut sample = sample.clone();
        // The Adams-Bashforth combinations, in torch's order of float32 operations.
        let model_output = if k == 1 && self.counter == 0 {
            self.cur_sample = Some(sample.clone());
            model_output.clone()
        } else if k == 1 && self.counter == 1 {
            if let Some(cur) = self.cur_sample.take() {
                sample = cur;
            }
            div(&(model_output + &ets[0])?, 2.0)?
        } else if k == 2 {
            div(&(mul(&ets[1], 3.0)? - &ets[0])?, 2.0)?
        } else if k == 3 {
            let s = ((mul(&ets[2], 23.0)? - mul(&ets[1], 16.0)?)? + mul(&ets[0], 5.0)?)?;
            div(&s, 12.0)?
        } else {
            let s = (((mul(&ets[k - 1], 55.0)? - mul(&ets[k - 2], 59.0)?)?
                + mul(&ets[k - 3], 37.0)?)?
                - mul(&ets[k - 4], 9.0)?)?;
            mul(&s, (1.0f64 / 24.0) as f32)?
        };
        let prev = self.prev_sample(&sample, t, prev_t, &model_output)?;
        self.counter += 1;
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        super::add_noise_ddpm(&self.alphas_cumprod, original, noise, timestep)
    }
}

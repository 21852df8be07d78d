//! DPM-Solver++ multistep, second order (Lu et al. 2022), in its deterministic and SDE
//! forms, on linear or Karras sigmas; mirrors diffusers' `DPMSolverMultistepScheduler` with
//! `solver_order = 2`, including its lower-order first and last steps.

use super::sigmas::{self, alpha_sigma, div, index_for_timestep_or_last, lambda, mul};
use super::{alphas_cumprod_f32, noise_like, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

/// The `algorithm_type`s easel implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpmAlgorithm {
    /// `dpmsolver++`: deterministic.
    DpmSolverPp,
    /// `sde-dpmsolver++`: draws fresh noise every step.
    SdeDpmSolverPp,
}

pub struct DpmSolverMultistep {
    config: SchedulerConfig,
    algorithm: DpmAlgorithm,
    karras: bool,
    /// `solver_type = "heun"` (else midpoint) for the second-order update.
    heun: bool,
    lower_order_final: bool,
    euler_at_final: bool,
    final_sigmas_zero: bool,
    prediction: PredictionType,
    alphas_cumprod: Vec<f32>,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    /// Converted (x0) model outputs of the previous and current step.
    model_outputs: [Option<Tensor>; 2],
    lower_order_nums: usize,
}

impl DpmSolverMultistep {
    /// `algorithm` and `karras` override the config, as the CLI name chooses them.
    pub fn new(config: &SchedulerConfig, algorithm: DpmAlgorithm, karras: bool) -> Result<Self> {
        config.reject_unsupported("DPM-Solver++")?;
        let heun = match config.solver_type.as_deref().unwrap_or("midpoint") {
            "heun" => true,
            // diffusers maps the UniPC/DEIS names onto midpoint.
            "midpoint" | "logrho" | "bh1" | "bh2" => false,
            other => {
                bail!("DPM-Solver++: unsupported solver_type {other:?} (expected midpoint or heun)")
            }
        };
        let final_sigmas_zero = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => bail!("final_sigmas_type must be zero or sigma_min, got {other:?}"),
        };
        let alphas_cumprod = alphas_cumprod_f32(config)?;
        Ok(Self {
            config: config.clone(),
            algorithm,
            karras,
            heun,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            euler_at_final: config.euler_at_final.unwrap_or(false),
            final_sigmas_zero,
            prediction: config.prediction_type()?,
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod),
            alphas_cumprod,
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            model_outputs: [None, None],
            lower_order_nums: 0,
        })
    }

    /// The last usable training timestep: `lambda_min_clipped` cuts off the noisiest ones.
    fn last_timestep(&self) -> usize {
        let n = self.config.num_train_timesteps();
        let Some(clip) = self.config.lambda_min_clipped else {
            return n;
        };
        // searchsorted(flip(lambda_t), clip): how many of the ascending lambdas are < clip.
        let clipped = self
            .alphas_cumprod
            .iter()
            .rev()
            .filter(|&&a| f64::from(a.sqrt().ln() - (1.0 - a).sqrt().ln()) < clip)
            .count();
        n - clipped
    }

    /// `convert_model_output` for the ++ algorithms: the denoised estimate x0.
    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match self.prediction {
            PredictionType::Epsilon => div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?,
            PredictionType::Sample => model_output.clone(),
            PredictionType::VPrediction => (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?,
        })
    }

    fn first_order(
        &self,
        x0: &Tensor,
        sample: &Tensor,
        noise: Option<&Tensor>,
        i: usize,
    ) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s, sigma_s) = alpha_sigma(self.sigmas[i]);
        let h = lambda(alpha_t, sigma_t) - lambda(alpha_s, sigma_s);
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                Ok((mul(sample, sigma_t / sigma_s)? - mul(x0, alpha_t * ((-h).exp() - 1.0))?)?)
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(noise)) => {
                let e2h = (-2.0 * h).exp();
                let a = mul(sample, sigma_t / sigma_s * (-h).exp())?;
                let b = mul(x0, alpha_t * (1.0 - e2h))?;
                let c = mul(noise, sigma_t * (1.0 - e2h).sqrt())?;
                Ok(((a + b)? + c)?)
            }
            (DpmAlgorithm::SdeDpmSolverPp, None) => bail!("SDE DPM-Solver++ needs noise"),
        }
    }

    fn second_order(&self, sample: &Tensor, noise: Option<&Tensor>, i: usize) -> Result<Tensor> {
        let (Some(m1), Some(m0)) = (&self.model_outputs[0], &self.model_outputs[1]) else {
            bail!("DPM-Solver++: second-order step without a previous model output");
        };
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i + 1]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[i]);
        let (alpha_s1, sigma_s1) = alpha_sigma(self.sigmas[i - 1]);
        let lambda_t = lambda(alpha_t, sigma_t);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let lambda_s1 = lambda(alpha_s1, sigma_s1);
        let h = lambda_t - lambda_s0;
        let h_0 = lambda_s0 - lambda_s1;
        let r0 = h_0 / h;
        let d0 = m0;
        let d1 = mul(&(m0 - m1)?, 1.0 / r0)?;
        match (self.algorithm, noise) {
            (DpmAlgorithm::DpmSolverPp, _) => {
                let em1 = (-h).exp() - 1.0;
                let x = (mul(sample, sigma_t / sigma_s0)? - mul(d0, alpha_t * em1)?)?;
                if self.heun {
                    Ok((x + mul(&d1, alpha_t * (em1 / h + 1.0))?)?)
                } else {
                    Ok((x - mul(&d1, 0.5 * (alpha_t * em1))?)?)
                }
            }
            (DpmAlgorithm::SdeDpmSolverPp, Some(noise)) => {
                let one_m_e2h = 1.0 - (-2.0 * h).exp();
                let a = mul(sample, sigma_t / sigma_s0 * (-h).exp())?;
                let b = mul(d0, alpha_t * one_m_e2h)?;
                let c = if self.heun {
                    mul(&d1, alpha_t * (one_m_e2h / (-2.0 * h) + 1.0))?
                } else {
                    mul(&d1, 0.5 * (alpha_t * one_m_e2h))?
                };
                let n = mul(noise, sigma_t * one_m_e2h.sqrt())?;
                Ok((((a + b)? + c)? + n)?)
            }
            (DpmAlgorithm::SdeDpmSolverPp, None) => bail!("SDE DPM-Solver++ needs noise"),
        }
    }
}

impl Scheduler for DpmSolverMultistep {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        sigmas::check_steps(&self.config, steps)?;
        let mut timesteps = sigmas::multistep_timesteps(&self.config, steps, self.last_timestep())?;
        let mut sig: Vec<f64> = if self.karras {
            // Karras sigmas between the extreme training sigmas, timesteps mapped back from them.
            let ts = &self.train_sigmas;
            let sigma_min = self.config.sigma_min.unwrap_or(f64::from(ts[0]));
            let sigma_max = self.config.sigma_max.unwrap_or(f64::from(ts[ts.len() - 1]));
            let sig = sigmas::karras_sigmas(sigma_min, sigma_max, steps);
            let log_sigmas = sigmas::log_sigmas(ts);
            let round = self.config.beta_schedule.as_deref() != Some("squaredcos_cap_v2");
            timesteps = sig
                .iter()
                .map(|&s| {
                    let t = sigmas::sigma_to_t(s, &log_sigmas);
                    (if round { sigmas::np_round(t) } else { t }) as i64
                })
                .collect();
            sig
        } else {
            timesteps
                .iter()
                .map(|&t| sigmas::np_interp(t as f64, &self.train_sigmas))
                .collect()
        };
        let ts_f64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        sigmas::check_in_range(&self.config, steps, &ts_f64)?;
        sig.push(if self.final_sigmas_zero {
            0.0
        } else {
            f64::from(self.train_sigmas[0])
        });
        let sig: Vec<f32> = sig.into_iter().map(|s| s as f32).collect();
        // Repeated sigmas make a zero step in log-SNR, which diffusers turns into NaN.
        if sig[..sig.len() - 1].windows(2).any(|w| w[0] <= w[1]) {
            bail!(
                "{steps} steps is too many for DPM-Solver++ with this model's {} training timesteps (repeated timesteps); use fewer",
                self.config.num_train_timesteps()
            );
        }
        self.timesteps = ts_f64;
        self.sigmas = sig;
        self.step_index = None;
        self.model_outputs = [None, None];
        self.lower_order_nums = 0;
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
            bail!("DPM-Solver++: set_timesteps must be called before step");
        }
        let i = match self.step_index {
            Some(i) => i,
            None => index_for_timestep_or_last(&self.timesteps, timestep),
        };
        let n = self.timesteps.len();
        if i >= n {
            bail!("DPM-Solver++: step called more times than there are timesteps");
        }
        let lower_order_final = i == n - 1
            && (self.euler_at_final
                || (self.lower_order_final && n < 15)
                || self.final_sigmas_zero);
        let x0 = self.convert(model_output, sample, i)?;
        self.model_outputs.swap(0, 1);
        self.model_outputs[1] = Some(x0.clone());
        let noise = match self.algorithm {
            DpmAlgorithm::SdeDpmSolverPp => Some(noise_like(noise, model_output)?),
            DpmAlgorithm::DpmSolverPp => None,
        };
        let prev = if self.lower_order_nums < 1 || lower_order_final {
            self.first_order(&x0, sample, noise.as_ref(), i)?
        } else {
            self.second_order(sample, noise.as_ref(), i)?
        };
        if self.lower_order_nums < 2 {
            self.lower_order_nums += 1;
        }
        self.step_index = Some(i + 1);
        Ok(prev)
    }

    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let i = index_for_timestep_or_last(&self.timesteps, timestep);
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok((mul(original, alpha_t)? + mul(noise, sigma_t)?)?)
    }
}

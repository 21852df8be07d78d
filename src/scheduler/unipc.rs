//! UniPC (Zhao et al. 2023): a multistep predictor with a corrector that reuses each new
//! model evaluation; mirrors diffusers' `UniPCMultistepScheduler` (default bh2, order 2,
//! predicting x0), any `solver_order`, with its float32 scalar arithmetic.

use super::sigmas::{self, alpha_sigma, div, index_for_timestep_or_last, lambda, mul, solve_f32};
use super::{alphas_cumprod_f32, PredictionType, Scheduler, SchedulerConfig};
use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;

pub struct UniPc {
    config: SchedulerConfig,
    solver_order: usize,
    predict_x0: bool,
    /// `solver_type = "bh1"` (else bh2).
    bh1: bool,
    lower_order_final: bool,
    final_sigmas_zero: bool,
    disable_corrector: Vec<usize>,
    prediction: PredictionType,
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    step_index: Option<usize>,
    /// Converted model outputs, oldest first, `solver_order` slots.
    model_outputs: Vec<Option<Tensor>>,
    lower_order_nums: usize,
    last_sample: Option<Tensor>,
    this_order: usize,
}

impl UniPc {
    pub fn new(config: &SchedulerConfig) -> Result<Self> {
        config.reject_unsupported("UniPC")?;
        if config.use_karras_sigmas == Some(true) {
            bail!("UniPC with Karras sigmas is not supported; try dpm++2m-karras");
        }
        let bh1 = match config.solver_type.as_deref().unwrap_or("bh2") {
            "bh1" => true,
            // diffusers maps the DPM-Solver names onto bh2.
            "bh2" | "midpoint" | "heun" | "logrho" => false,
            other => bail!("UniPC: unsupported solver_type {other:?} (expected bh1 or bh2)"),
        };
        let final_sigmas_zero = match config.final_sigmas_type.as_deref().unwrap_or("zero") {
            "zero" => true,
            "sigma_min" => false,
            other => bail!("final_sigmas_type must be zero or sigma_min, got {other:?}"),
        };
        if bh1 && final_sigmas_zero {
            // B(h) = h is infinite on the step to sigma 0: diffusers returns NaN there.
            bail!("UniPC bh1 with final_sigmas_type zero ends in NaN in diffusers; use bh2 or final_sigmas_type sigma_min");
        }
        let solver_order = config.solver_order.unwrap_or(2);
        if !(1..=3).contains(&solver_order) {
            bail!("UniPC solver_order must be 1, 2 or 3, got {solver_order}");
        }
        Ok(Self {
            config: config.clone(),
            solver_order,
            predict_x0: config.predict_x0.unwrap_or(true),
            bh1,
            lower_order_final: config.lower_order_final.unwrap_or(true),
            final_sigmas_zero,
            disable_corrector: config.disable_corrector.clone().unwrap_or_default(),
            prediction: config.prediction_type()?,
            train_sigmas: sigmas::train_sigmas(&alphas_cumprod_f32(config)?),
            timesteps: Vec::new(),
            sigmas: Vec::new(),
            step_index: None,
            model_outputs: vec![None; solver_order],
            lower_order_nums: 0,
            last_sample: None,
            this_order: 0,
        })
    }

    fn convert(&self, model_output: &Tensor, sample: &Tensor, i: usize) -> Result<Tensor> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[i]);
        Ok(match (self.predict_x0, self.prediction) {
            (true, PredictionType::Epsilon) => {
                div(&(sample - mul(model_output, sigma_t)?)?, alpha_t)?
            }
            (true, PredictionType::Sample) => model_output.clone(),
            (true, PredictionType::VPrediction) => {
                (mul(sample, alpha_t)? - mul(model_output, sigma_t)?)?
            }
            (false, PredictionType::Epsilon) => model_output.clone(),
            (false, PredictionType::Sample) => {
                div(&(sample - mul(model_output, alpha_t)?)?, sigma_t)?
            }
            (false, PredictionType::VPrediction) => {
                (mul(model_output, alpha_t)? + mul(sample, sigma_t)?)?
            }
        })
    }

    fn output(&self, back: usize) -> Result<&Tensor> {
        let n = self.model_outputs.len();
        self.model_outputs[n - back]
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("UniPC: missing model output {back} steps back"))
    }

    /// The pieces the predictor and corrector share: `h`, the ratios `rk`, the differences
    /// `D1s`, `h_phi_1`, `B(h)` and the right-hand side `b`, all float32 as in torch.
    /// `t` and `s0` index the sigmas of the interval, `hist(k)` the sigma index k steps back.
    fn coefficients(
        &self,
        t: usize,
        s0: usize,
        order: usize,
        hist: impl Fn(usize) -> usize,
    ) -> Result<Coefficients> {
        let (alpha_t, sigma_t) = alpha_sigma(self.sigmas[t]);
        let (alpha_s0, sigma_s0) = alpha_sigma(self.sigmas[s0]);
        let lambda_s0 = lambda(alpha_s0, sigma_s0);
        let h = lambda(alpha_t, sigma_t) - lambda_s0;
        let m0 = self.output(1)?;
        let mut rks = Vec::new();
        let mut d1s = Vec::new();
        for k in 1..order {
            let (a, s) = alpha_sigma(self.sigmas[hist(k)]);
            let rk = (lambda(a, s) - lambda_s0) / h;
            rks.push(rk);
            d1s.push(div(&(self.output(k + 1)? - m0)?, rk)?);
        }
        rks.push(1.0);
        let hh = if self.predict_x0 { -h } else { h };
        let h_phi_1 = hh.exp_m1();
        let mut h_phi_k = h_phi_1 / hh - 1.0;
        let mut factorial: u64 = 1;
        let b_h = if self.bh1 { hh } else { hh.exp_m1() };
        let mut r = Vec::new();
        let mut b = Vec::new();
        for k in 1..=order {
            r.push(
                rks.iter()
                    .map(|x| x.powi(k as i32 - 1))
                    .collect::<Vec<f32>>(),
            );
            b.push(h_phi_k * factorial as f32 / b_h);
            factorial *= k as u64 + 1;
            h_phi_k = h_phi_k / hh - (1.0 / factorial as f64) as f32;
        }
        Ok(Coefficients {
            alpha_t,
            sigma_t,
            alpha_s0,
            sigma_s0,
            h_phi_1,
            b_h,
            r,
            b,
            d1s,
        })
    }

    /// `x_t_` of both updates: the first-order (DDIM-like) part.
    fn base(&self, c: &Coefficients, x: &Tensor, m0: &Tensor) -> Result<Tensor> {
        Ok(if self.predict_x0 {
            (mul(x, c.sigma_t / c.sigma_s0)? - mul(m0, c.alpha_t * c.h_phi_1)?)?
        } else {
            (mul(x, c.alpha_t / c.alpha_s0)? - mul(m0, c.sigma_t * c.h_phi_1)?)?
        })
    }

    /// `x_t_ - scale * B(h) * res`, the common tail of both updates.
    fn finish(&self, c: &Coefficients, base: Tensor, res: Option<Tensor>) -> Result<Tensor> {
        let scale = if self.predict_x0 {
            c.alpha_t
        } else {
            c.sigma_t
        };
        Ok(match res {
            Some(res) => (base - mul(&res, scale * c.b_h)?)?,
            None => base,
        })
    }

    /// `einsum('k,bkc...->bc...', rhos, D1s)`.
    fn weighted(rhos: &[f32], d1s: &[Tensor]) -> Result<Option<Tensor>> {
        let mut acc: Option<Tensor> = None;
        for (rho, d) in rhos.iter().zip(d1s) {
            let term = mul(d, *rho)?;
            acc = Some(match acc {
                None => term,
                Some(a) => (a + term)?,
            });
        }
        Ok(acc)
    }

    /// `multistep_uni_p_bh_update`: the predictor from step i to i + 1.
    fn predict(&self, sample: &Tensor, i: usize, order: usize) -> Result<Tensor> {
        let c = self.coefficients(i + 1, i, order, |k| i - k)?;
        let base = self.base(&c, sample, self.output(1)?)?;
        let res = if c.d1s.is_empty() {
            None
        } else {
            let rhos = if order == 2 {
                vec![0.5]
            } else {
                let n = order - 1;
                let r: Vec<Vec<f32>> = c.r[..n].iter().map(|row| row[..n].to_vec()).collect();
                solve_f32(r, c.b[..n].to_vec())?
            };
            Self::weighted(&rhos, &c.d1s)?
        };
        self.finish(&c, base, res)
    }

    /// `multistep_uni_c_bh_update`: corrects the sample of step i with the new output.
    fn correct(
        &self,
        model_t: &Tensor,
        last_sample: &Tensor,
        i: usize,
        order: usize,
    ) -> Result<Tensor> {
        let c = self.coefficients(i, i - 1, order, |k| i - (k + 1))?;
        let m0 = self.output(1)?;
        let base = self.base(&c, last_sample, m0)?;
        let rhos = if order == 1 {
            vec![0.5]
        } else {
            solve_f32(c.r.clone(), c.b.clone())?
        };
        let corr = Self::weighted(&rhos[..rhos.len() - 1], &c.d1s)?;
        let d1_t = (model_t - m0)?;
        let last = mul(&d1_t, rhos[rhos.len() - 1])?;
        let res = match corr {
            Some(corr) => (corr + last)?,
            None => last,
        };
        self.finish(&c, base, Some(res))
    }
}

struct Coefficients {
    alpha_t: f32,
    sigma_t: f32,
    alpha_s0: f32,
    sigma_s0: f32,
    h_phi_1: f32,
    b_h: f32,
    r: Vec<Vec<f32>>,
    b: Vec<f32>,
    d1s: Vec<Tensor>,
}

impl Scheduler for UniPc {
    fn set_timesteps(&mut self, steps: usize) -> Result<()> {
        sigmas::check_steps(&self.config, steps)?;
        let n_train = self.config.num_train_timesteps();
        let timesteps = sigmas::multistep_timesteps(&self.config, steps, n_train)?;
        let ts_f64: Vec<f64> = timesteps.iter().map(|&t| t as f64).collect();
        sigmas::check_in_range(&self.config, steps, &ts_f64)?;
        let mut sig: Vec<f32> = ts_f64
            .iter()
            .map(|&t| sigmas::np_interp(t, &self.train_sigmas) as f32)
            .collect();
        sig.push(if self.final_sigmas_zero {
            0.0
        } else {
            self.train_sigmas[0]
        });
        if sig[..sig.len() - 1].windows(2).any(|w| w[0] <= w[1]) {
            bail!("{steps} steps is too many for UniPC with this model's {n_train} training timesteps (repeated timesteps); use fewer");
        }
        self.timesteps = ts_f64;
        self.sigmas = sig;
        self.step_index = None;
        self.model_outputs = vec![None; self.solver_order];
        self.lower_order_nums = 0;
        self.last_sample = None;
        self.this_order = 0;
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
        if self.timesteps.is_empty() {
            bail!("UniPC: set_timesteps must be called before step");
        }
        let i = match self.step_index {
            Some(i) => i,
            None => index_for_timestep_or_last(&self.timesteps, timestep),
        };
        let n = self.timesteps.len();
        if i >= n {
            bail!("UniPC: step called more times than there are timesteps");
        }
        let converted = self.convert(model_output, sample, i)?;
        let use_corrector = i > 0 && !self.disable_corrector.contains(&(i - 1));
        let sample = match (&self.last_sample, use_corrector) {
            (Some(last), true) => self.correct(&converted, last, i, self.this_order)?,
            _ => sample.clone(),
        };
        self.model_outputs.remove(0);
        self.model_outputs.push(Some(converted));
        let mut order = self.solver_order;
        if self.lower_order_final {
            order = order.min(n - i);
        }
        self.this_order = order.min(self.lower_order_nums + 1);
        let prev = self.predict(&sample, i, self.this_order)?;
        self.last_sample = Some(sample);
        if self.lower_order_nums < self.solver_order {
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

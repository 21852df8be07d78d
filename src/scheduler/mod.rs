//! Noise schedulers ("samplers"), each step-for-step equal to its HF diffusers counterpart.
//!
//! They share one small trait, as in diffusers: set the timesteps, scale the model input,
//! step. Every scheduler is built from the model's own `scheduler_config.json` the way
//! diffusers' `from_config` builds it: keys the file has win, keys it lacks take that
//! scheduler's own defaults (hence every field of [`SchedulerConfig`] is optional).

mod betas;
mod ddim;
mod pndm;

pub use betas::{alphas_cumprod, betas, BetaSchedule};
pub use ddim::Ddim;
pub use pndm::Pndm;

use crate::rng::NoiseSource;
use anyhow::{bail, Result};
use candle_core::Tensor;
use serde::Deserialize;

/// A denoising scheduler. The pipeline calls `set_timesteps` once, then for every entry of
/// `timesteps()` runs the UNet on `scale_model_input(latents, t)` and feeds its output to
/// `step`. Schedulers that evaluate the model more than once per step (Heun, PNDM's
/// warm-up) list a timestep once per evaluation, exactly like diffusers.
pub trait Scheduler: Send {
    /// Prepares the schedule for `steps` inference steps; errors on counts it cannot do.
    fn set_timesteps(&mut self, steps: usize) -> Result<()>;
    /// The timesteps the UNet is evaluated at, in order.
    fn timesteps(&self) -> &[f64];
    /// Standard deviation the initial noise is scaled by (1 for DDPM-style schedulers).
    fn init_noise_sigma(&self) -> f64;
    /// Scales the UNet input at `timestep` (identity for DDPM-style schedulers).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor>;
    /// One update: the previous (less noisy) sample from the model output at `timestep`.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor>;
    /// Noises a clean sample to `timestep` (img2img, tests).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;
}

/// The contents of a diffusers `scheduler_config.json`. Unknown keys are ignored, as
/// diffusers ignores them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct SchedulerConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    pub num_train_timesteps: Option<usize>,
    pub beta_start: Option<f64>,
    pub beta_end: Option<f64>,
    pub beta_schedule: Option<String>,
    pub trained_betas: Option<Vec<f64>>,
    pub steps_offset: Option<usize>,
    pub set_alpha_to_one: Option<bool>,
    pub skip_prk_steps: Option<bool>,
    pub prediction_type: Option<String>,
    pub timestep_spacing: Option<String>,
    pub clip_sample: Option<bool>,
    pub clip_sample_range: Option<f64>,
    pub thresholding: Option<bool>,
    pub rescale_betas_zero_snr: Option<bool>,
    pub use_karras_sigmas: Option<bool>,
    pub interpolation_type: Option<String>,
    pub timestep_type: Option<String>,
    pub solver_order: Option<usize>,
    pub algorithm_type: Option<String>,
    pub solver_type: Option<String>,
    pub lower_order_final: Option<bool>,
    pub euler_at_final: Option<bool>,
    pub final_sigmas_type: Option<String>,
    pub original_inference_steps: Option<usize>,
    pub timestep_scaling: Option<f64>,
}

impl SchedulerConfig {
    /// Parses `scheduler_config.json` text.
    pub fn from_json(text: &str) -> Result<Self> {
        Ok(serde_json::from_str(text)?)
    }
    pub fn num_train_timesteps(&self) -> usize {
        self.num_train_timesteps.unwrap_or(1000)
    }
    pub fn steps_offset(&self) -> usize {
        self.steps_offset.unwrap_or(0)
    }
    pub fn prediction_type(&self) -> Result<PredictionType> {
        PredictionType::parse(self.prediction_type.as_deref().unwrap_or("epsilon"))
    }
    pub fn timestep_spacing(&self) -> Result<TimestepSpacing> {
        TimestepSpacing::parse(self.timestep_spacing.as_deref().unwrap_or("leading"))
    }
}

/// What the UNet predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredictionType {
    Epsilon,
    Sample,
    VPrediction,
}

impl PredictionType {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "epsilon" => Self::Epsilon,
            "sample" => Self::Sample,
            "v_prediction" => Self::VPrediction,
            other => bail!("unsupported prediction_type {other:?} in scheduler_config.json (expected epsilon, sample or v_prediction)"),
        })
    }
}

/// How inference timesteps are spread over the training range (diffusers' `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestepSpacing {
    Leading,
    Trailing,
    Linspace,
}

impl TimestepSpacing {
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "leading" => Self::Leading,
            "trailing" => Self::Trailing,
            "linspace" => Self::Linspace,
            other => bail!("unsupported timestep_spacing {other:?} in scheduler_config.json (expected leading, trailing or linspace)"),
        })
    }
}

/// The samplers easel offers, by CLI name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Pndm,
    Ddim,
}

impl SchedulerKind {
    /// Every kind, in the order `--list-schedulers` shows them.
    pub const ALL: &'static [SchedulerKind] = &[SchedulerKind::Pndm, SchedulerKind::Ddim];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pndm => "pndm",
            Self::Ddim => "ddim",
        }
    }

    /// The name AUTOMATIC1111 uses, written into PNG metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Pndm => "PLMS",
            Self::Ddim => "DDIM",
        }
    }

    /// The diffusers class this kind mirrors.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
        }
    }

    /// Parses a CLI name, an A1111 name or a diffusers class name (case-insensitive).
    pub fn parse(name: &str) -> Result<Self> {
        let lower = name.trim().to_ascii_lowercase();
        for &kind in Self::ALL {
            if lower == kind.name()
                || lower == kind.a1111_name().to_ascii_lowercase()
                || lower == kind.diffusers_class().to_ascii_lowercase()
            {
                return Ok(kind);
            }
        }
        let names: Vec<&str> = Self::ALL.iter().map(|k| k.name()).collect();
        bail!(
            "unknown scheduler {name:?}; valid schedulers: {}",
            names.join(", ")
        )
    }

    /// The kind a model's scheduler_config.json names in `_class_name`.
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        match config.class_name.as_deref() {
            Some(class) => Self::parse(class).map_err(|_| {
                anyhow::anyhow!("the model's scheduler_config.json names {class}, which easel does not implement; pick one with --scheduler")
            }),
            None => Ok(Self::Pndm),
        }
    }

    /// Builds the scheduler from the model's config, as diffusers' `from_config` would.
    pub fn build(self, config: &SchedulerConfig, eta: f64) -> Result<Box<dyn Scheduler>> {
        Ok(match self {
            Self::Pndm => Box::new(Pndm::new(config)?),
            Self::Ddim => Box::new(Ddim::new(config, eta)?),
        })
    }
}

/// `alphas_cumprod[t]` for an integer timestep, with a clear error instead of a panic.
pub(crate) fn alpha_at(alphas_cumprod: &[f64], t: i64) -> Result<f64> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| anyhow::anyhow!("timestep {t} is outside the trained range 0..{}", alphas_cumprod.len()))
}

/// `round(x)` the way numpy rounds (half to even), used when diffusers rounds timesteps.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// Inference timesteps for DDPM-style schedulers (DDIM, PNDM), descending, as diffusers
/// computes them for each `timestep_spacing`.
pub(crate) fn discrete_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    let n_train = config.num_train_timesteps();
    if steps == 0 {
        bail!("the number of steps must be at least 1");
    }
    if steps > n_train {
        bail!("{steps} steps is more than the {n_train} timesteps the model was trained with");
    }
    let mut ts: Vec<i64> = match config.timestep_spacing()? {
        TimestepSpacing::Linspace => {
            // np.linspace: start + i * step, with the last value set exactly to `stop`.
            let last = (n_train - 1) as f64;
            let step = if steps > 1 { last / (steps - 1) as f64 } else { 0.0 };
            (0..steps)
                .map(|i| {
                    let x = if steps > 1 && i == steps - 1 { last } else { i as f64 * step };
                    np_round(x) as i64
                })
                .collect()
        }
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .map(|i| (i * ratio + config.steps_offset()) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            let ratio = n_train as f64 / steps as f64;
            let mut v: Vec<i64> = (0..steps)
                .map(|i| np_round(n_train as f64 - i as f64 * ratio) as i64 - 1)
                .collect();
            v.reverse();
            v
        }
    };
    ts.reverse();
    Ok(ts)
}

/// Standard-normal noise shaped, typed and placed like `like`, drawn on the CPU from
/// `noise` (so a seed gives the same numbers on every device).
pub(crate) fn noise_like(noise: &mut dyn NoiseSource, like: &Tensor) -> Result<Tensor> {
    let dims = like.dims().to_vec();
    let values = noise.randn(&dims);
    Ok(Tensor::from_vec(values, dims, &candle_core::Device::Cpu)?
        .to_dtype(like.dtype())?
        .to_device(like.device())?)
}

/// DDPM forward noising: `sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise`.
pub(crate) fn add_noise_ddpm(alphas_cumprod: &[f64], original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
    let a = alpha_at(alphas_cumprod, timestep as i64)?;
    Ok(((original * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?)
}

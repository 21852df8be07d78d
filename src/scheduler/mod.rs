//! Noise schedulers ("samplers"), each step-for-step equal to its HF diffusers counterpart.
//!
//! They share one small trait, as in diffusers: set the timesteps, scale the model input,
//! step. Every scheduler is built from the model's own `scheduler_config.json` the way
//! diffusers' `from_config` builds it: keys the file has win, keys it lacks take that
//! scheduler's own defaults (hence every field of [`SchedulerConfig`] is optional).

mod betas;
mod ddim;
mod dpm;
mod euler;
mod euler_ancestral;
mod heun;
mod lcm;
mod lms;
mod pndm;
mod sigmas;
mod unipc;

pub use betas::{alphas_cumprod, betas, BetaSchedule};
pub use ddim::Ddim;
pub use dpm::{DpmAlgorithm, DpmSolverMultistep};
pub use euler::Euler;
pub use euler_ancestral::EulerAncestral;
pub use heun::Heun;
pub use lcm::Lcm;
pub use lms::Lms;
pub use pndm::Pndm;
pub use unipc::UniPc;

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
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// Scales the UNet input at `timestep` (identity for DDPM-style schedulers).
    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }
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
    pub use_exponential_sigmas: Option<bool>,
    pub use_beta_sigmas: Option<bool>,
    pub use_lu_lambdas: Option<bool>,
    pub use_flow_sigmas: Option<bool>,
    pub lambda_min_clipped: Option<f64>,
    pub sigma_min: Option<f64>,
    pub sigma_max: Option<f64>,
    pub variance_type: Option<String>,
    pub predict_x0: Option<bool>,
    pub disable_corrector: Option<Vec<usize>>,
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
        self.timestep_spacing_or(TimestepSpacing::Leading)
    }
    /// The configured spacing, or the scheduler class's own default.
    pub fn timestep_spacing_or(&self, default: TimestepSpacing) -> Result<TimestepSpacing> {
        match self.timestep_spacing.as_deref() {
            Some(s) => TimestepSpacing::parse(s),
            None => Ok(default),
        }
    }

    /// A copy with the beta schedule keys the file lacks set to a class's own defaults
    /// (Heun and LCM default to other betas than the rest).
    pub(crate) fn with_beta_defaults(&self, start: f64, end: f64, schedule: &str) -> Self {
        let mut c = self.clone();
        c.beta_start.get_or_insert(start);
        c.beta_end.get_or_insert(end);
        c.beta_schedule.get_or_insert_with(|| schedule.to_string());
        c
    }

    /// Errors on options easel does not implement, rather than silently ignoring them.
    pub(crate) fn reject_unsupported(&self, class: &str) -> Result<()> {
        let flags = [
            ("thresholding", self.thresholding),
            ("rescale_betas_zero_snr", self.rescale_betas_zero_snr),
            ("use_exponential_sigmas", self.use_exponential_sigmas),
            ("use_beta_sigmas", self.use_beta_sigmas),
            ("use_lu_lambdas", self.use_lu_lambdas),
            ("use_flow_sigmas", self.use_flow_sigmas),
        ];
        for (name, value) in flags {
            if value == Some(true) {
                bail!("{class} with {name} is not supported by easel");
            }
        }
        if matches!(
            self.variance_type.as_deref(),
            Some("learned" | "learned_range")
        ) {
            bail!("{class} with a learned variance_type is not supported by easel");
        }
        Ok(())
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
    Euler,
    EulerAncestral,
    Heun,
    DpmPp2m,
    DpmPp2mKarras,
    DpmPp2mSde,
    Lms,
    UniPc,
    Lcm,
}

impl SchedulerKind {
    /// Every kind, in the order `--list-schedulers` shows them.
    pub const ALL: &'static [SchedulerKind] = &[
        Self::Pndm,
        Self::Ddim,
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::DpmPp2m,
        Self::DpmPp2mKarras,
        Self::DpmPp2mSde,
        Self::Lms,
        Self::UniPc,
        Self::Lcm,
    ];

    /// The CLI name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Pndm => "pndm",
            Self::Ddim => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler-a",
            Self::Heun => "heun",
            Self::DpmPp2m => "dpm++2m",
            Self::DpmPp2mKarras => "dpm++2m-karras",
            Self::DpmPp2mSde => "dpm++2m-sde",
            Self::Lms => "lms",
            Self::UniPc => "unipc",
            Self::Lcm => "lcm",
        }
    }

    /// The name AUTOMATIC1111 uses, written into PNG metadata.
    pub fn a1111_name(self) -> &'static str {
        match self {
            Self::Pndm => "PLMS",
            Self::Ddim => "DDIM",
            Self::Euler => "Euler",
            Self::EulerAncestral => "Euler a",
            Self::Heun => "Heun",
            Self::DpmPp2m => "DPM++ 2M",
            Self::DpmPp2mKarras => "DPM++ 2M Karras",
            Self::DpmPp2mSde => "DPM++ 2M SDE",
            Self::Lms => "LMS",
            Self::UniPc => "UniPC",
            Self::Lcm => "LCM",
        }
    }

    /// The diffusers class this kind mirrors.
    pub fn diffusers_class(self) -> &'static str {
        match self {
            Self::Pndm => "PNDMScheduler",
            Self::Ddim => "DDIMScheduler",
            Self::Euler => "EulerDiscreteScheduler",
            Self::EulerAncestral => "EulerAncestralDiscreteScheduler",
            Self::Heun => "HeunDiscreteScheduler",
            Self::DpmPp2m | Self::DpmPp2mKarras | Self::DpmPp2mSde => "DPMSolverMultistepScheduler",
            Self::Lms => "LMSDiscreteScheduler",
            Self::UniPc => "UniPCMultistepScheduler",
            Self::Lcm => "LCMScheduler",
        }
    }

    /// One line on what the sampler is and when to use it, for `--list-schedulers`.
    pub fn description(self) -> &'static str {
        match self {
            Self::Pndm => "pseudo linear multistep; SD 1.x's default, good at ~50 steps",
            Self::Ddim => "deterministic DDIM (--eta > 0 adds noise); fine at 25-50 steps",
            Self::Euler => "first-order Euler; simple and predictable, 30-50 steps",
            Self::EulerAncestral => "Euler with fresh noise each step; varied, never converges",
            Self::Heun => "second-order Heun; two UNet calls per step, slow but accurate",
            Self::DpmPp2m => "DPM-Solver++ 2M; sharp results in 20-30 steps",
            Self::DpmPp2mKarras => "DPM-Solver++ 2M on Karras sigmas; a favourite at 20-30 steps",
            Self::DpmPp2mSde => "stochastic DPM-Solver++ 2M; more detail, needs ~30 steps",
            Self::Lms => "linear multistep (order 4); smooth, 50 steps",
            Self::UniPc => "UniPC predictor-corrector (bh2); good in 10-20 steps",
            Self::Lcm => "latent consistency; only for LCM-distilled weights, 2-8 steps",
        }
    }

    /// Parses a CLI name, an A1111 name or a diffusers class name (case-insensitive). The
    /// DPM-Solver class name means plain `dpm++2m`, as `from_config` would build it.
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
            "unknown scheduler {name:?}; valid schedulers: {} (A1111 names and diffusers class names work too; see --list-schedulers)",
            names.join(", ")
        )
    }

    /// The kind a model's scheduler_config.json names in `_class_name`, i.e. the scheduler
    /// diffusers' pipeline would load (PNDM when the file names none).
    pub fn from_config(config: &SchedulerConfig) -> Result<Self> {
        match config.class_name.as_deref() {
            Some(class) => {
                let kind = Self::parse(class).map_err(|_| {
                    anyhow::anyhow!("the model's scheduler_config.json names {class}, which easel does not implement; pick one with --scheduler")
                })?;
                // A DPM-Solver config picks its variant through its own keys.
                if kind == Self::DpmPp2m {
                    if config.algorithm_type.as_deref() == Some("sde-dpmsolver++") {
                        return Ok(Self::DpmPp2mSde);
                    }
                    if config.use_karras_sigmas == Some(true) {
                        return Ok(Self::DpmPp2mKarras);
                    }
                }
                Ok(kind)
            }
            None => Ok(Self::Pndm),
        }
    }

    /// Builds the scheduler from the model's config, as diffusers'
    /// `Class.from_config(config, **overrides)` would, where the overrides are what makes the
    /// sampler the one its name says (e.g. Karras sigmas for `dpm++2m-karras`).
    pub fn build(self, config: &SchedulerConfig, eta: f64) -> Result<Box<dyn Scheduler>> {
        if eta != 0.0 && self != Self::Ddim {
            bail!("--eta only applies to ddim, not {}", self.name());
        }
        let mut config = config.clone();
        if matches!(self, Self::Euler | Self::Heun | Self::Lms) {
            config.use_karras_sigmas = Some(false);
        }
        Ok(match self {
            Self::Pndm => Box::new(Pndm::new(&config)?),
            Self::Ddim => Box::new(Ddim::new(&config, eta)?),
            Self::Euler => Box::new(Euler::new(&config)?),
            Self::EulerAncestral => Box::new(EulerAncestral::new(&config)?),
            Self::Heun => Box::new(Heun::new(&config)?),
            Self::DpmPp2m => Box::new(DpmSolverMultistep::new(
                &config,
                DpmAlgorithm::DpmSolverPp,
                false,
            )?),
            Self::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(
                &config,
                DpmAlgorithm::DpmSolverPp,
                true,
            )?),
            Self::DpmPp2mSde => Box::new(DpmSolverMultistep::new(
                &config,
                DpmAlgorithm::SdeDpmSolverPp,
                false,
            )?),
            Self::Lms => Box::new(Lms::new(&config)?),
            Self::UniPc => Box::new(UniPc::new(&config)?),
            Self::Lcm => Box::new(Lcm::new(&config)?),
        })
    }
}

/// The table `--list-schedulers` prints: CLI name, A1111 name, description.
pub fn help_table() -> String {
    let w_name = SchedulerKind::ALL
        .iter()
        .map(|k| k.name().len())
        .max()
        .unwrap_or(0);
    let w_a1111 = SchedulerKind::ALL
        .iter()
        .map(|k| k.a1111_name().len())
        .max()
        .unwrap_or(0)
        .max("A1111".len());
    let mut out = format!("{:<w_name$}  {:<w_a1111$}  DESCRIPTION\n", "NAME", "A1111");
    for k in SchedulerKind::ALL {
        out.push_str(&format!(
            "{:<w_name$}  {:<w_a1111$}  {}\n",
            k.name(),
            k.a1111_name(),
            k.description()
        ));
    }
    out
}

/// `alphas_cumprod[t]` (float32) for an integer timestep, with a clear error instead of a panic.
pub(crate) fn alpha_at(alphas_cumprod: &[f32], t: i64) -> Result<f32> {
    usize::try_from(t)
        .ok()
        .and_then(|i| alphas_cumprod.get(i).copied())
        .ok_or_else(|| {
            anyhow::anyhow!(
                "timestep {t} is outside the trained range 0..{}",
                alphas_cumprod.len()
            )
        })
}

/// `alphas_cumprod` as the float32 tensor diffusers keeps.
pub(crate) fn alphas_cumprod_f32(config: &SchedulerConfig) -> Result<Vec<f32>> {
    Ok(alphas_cumprod(&betas(config)?)
        .into_iter()
        .map(|a| a as f32)
        .collect())
}

/// Inference timesteps for DDPM-style schedulers (DDIM, PNDM), descending, as diffusers
/// computes them for each `timestep_spacing` (their default is `leading`).
pub(crate) fn discrete_timesteps(config: &SchedulerConfig, steps: usize) -> Result<Vec<i64>> {
    use sigmas::{np_arange, np_linspace, np_round};
    sigmas::check_steps(config, steps)?;
    let n_train = config.num_train_timesteps();
    let ts: Vec<i64> = match config.timestep_spacing()? {
        TimestepSpacing::Linspace => np_linspace(0.0, (n_train - 1) as f64, steps, true)
            .into_iter()
            .rev()
            .map(|x| np_round(x) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = n_train / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + config.steps_offset()) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => {
            np_arange(n_train as f64, 0.0, -(n_train as f64 / steps as f64))
                .into_iter()
                .map(|x| np_round(x) as i64 - 1)
                .collect()
        }
    };
    let as_f64: Vec<f64> = ts.iter().map(|&t| t as f64).collect();
    sigmas::check_in_range(config, steps, &as_f64)?;
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

/// DDPM forward noising: `sqrt(ac[t]) * x0 + sqrt(1 - ac[t]) * noise`, float32 scalars.
pub(crate) fn add_noise_ddpm(
    alphas_cumprod: &[f32],
    original: &Tensor,
    noise: &Tensor,
    timestep: f64,
) -> Result<Tensor> {
    let a = alpha_at(alphas_cumprod, timestep as i64)?;
    Ok((sigmas::mul(original, a.sqrt())? + sigmas::mul(noise, (1.0 - a).sqrt())?)?)
}

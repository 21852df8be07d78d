//! The text-to-image pipeline: diffusers' `StableDiffusionPipeline.__call__`, step by step.
//!
//! prompt → CLIP embeddings (negative and positive in one batch) → seeded initial latents →
//! for each scheduler timestep: UNet on both halves, classifier-free guidance, scheduler
//! step → VAE decode → 8-bit RGB. Every stage is public so the parity tests can compare
//! each one against diffusers' own intermediate tensors.

use crate::config::{read_json, TextEncoderConfig, UNetConfig, VaeConfig};
use crate::rng::{NoiseSource, TorchGenerator};
use crate::scheduler::{Scheduler, SchedulerConfig, SchedulerKind};
use crate::text::{ClipTextModel, ClipTokenizer};
use crate::unet::vae::AutoEncoderKL;
use crate::unet::UNet2DConditionModel;
use crate::weights::{open_safetensors, ModelFiles};
use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// The error [`Pipeline::generate_each_cancellable`] returns when its cancel flag was set:
/// distinct from failures so callers can stop a batch quietly (`err.is::<Cancelled>()`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cancelled;

impl std::fmt::Display for Cancelled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("cancelled")
    }
}

impl std::error::Error for Cancelled {}

fn check_cancel(cancel: &AtomicBool) -> Result<()> {
    if cancel.load(Ordering::Relaxed) {
        return Err(Cancelled.into());
    }
    Ok(())
}

/// Everything that determines one image (or `num_images` images with seeds seed, seed+1…).
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationRequest {
    pub prompt: String,
    pub negative_prompt: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance: f64,
    pub seed: u64,
    pub num_images: usize,
    /// `None`: the scheduler named in the model's scheduler_config.json.
    pub scheduler: Option<SchedulerKind>,
    /// DDIM's eta (0 = deterministic).
    pub eta: f64,
}

/// Request fields that may be unset, so sources can be layered: a prompt-file line over
/// the command line, the command line over a PNG's recorded parameters, all over the
/// model's defaults. `None` means "not said here".
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RequestOverrides {
    pub prompt: Option<String>,
    pub negative_prompt: Option<String>,
    pub seed: Option<u64>,
    pub steps: Option<usize>,
    pub guidance: Option<f64>,
    pub width: Option<usize>,
    pub height: Option<usize>,
    pub scheduler: Option<SchedulerKind>,
    pub eta: Option<f64>,
}

impl RequestOverrides {
    /// `self` where it says something, else `lower`.
    pub fn or(&self, lower: &Self) -> Self {
        Self {
            prompt: self.prompt.clone().or_else(|| lower.prompt.clone()),
            negative_prompt: self
                .negative_prompt
                .clone()
                .or_else(|| lower.negative_prompt.clone()),
            seed: self.seed.or(lower.seed),
            steps: self.steps.or(lower.steps),
            guidance: self.guidance.or(lower.guidance),
            width: self.width.or(lower.width),
            height: self.height.or(lower.height),
            scheduler: self.scheduler.or(lower.scheduler),
            eta: self.eta.or(lower.eta),
        }
    }

    /// Sets the fields of `req` that these overrides say.
    pub fn apply(&self, req: &mut GenerationRequest) {
        if let Some(v) = &self.prompt {
            req.prompt = v.clone();
        }
        if let Some(v) = &self.negative_prompt {
            req.negative_prompt = v.clone();
        }
        if let Some(v) = self.seed {
            req.seed = v;
        }
        if let Some(v) = self.steps {
            req.steps = v;
        }
        if let Some(v) = self.guidance {
            req.guidance = v;
        }
        if let Some(v) = self.width {
            req.width = v;
        }
        if let Some(v) = self.height {
            req.height = v;
        }
        if self.scheduler.is_some() {
            req.scheduler = self.scheduler;
        }
        if let Some(v) = self.eta {
            req.eta = v;
        }
    }
}

impl GenerationRequest {
    /// diffusers' defaults for this model: its native size, 50 steps, guidance 7.5.
    pub fn new(prompt: impl Into<String>, pipeline: &Pipeline) -> Self {
        let (width, height) = pipeline.default_size();
        Self {
            prompt: prompt.into(),
            negative_prompt: String::new(),
            width,
            height,
            steps: 50,
            guidance: 7.5,
            seed: 0,
            num_images: 1,
            scheduler: None,
            eta: 0.0,
        }
    }
}

/// What the pipeline is doing, for progress display. The library never prints.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    /// Something the user should know (e.g. the prompt was truncated).
    Warning(String),
    /// Starting image `index` (0-based) of `count`, with this seed.
    ImageStarted {
        index: usize,
        count: usize,
        seed: u64,
    },
    /// Finished UNet evaluation `step` (1-based) of `total`.
    Step {
        step: usize,
        total: usize,
    },
    Decoding,
    /// Loading a model that a one-image run loads only when it is needed (the "UNet"; the
    /// VAE's short load is part of `Decoding`).
    Loading(&'static str),
}

/// What produced an image: written into the PNG and reported to scripts.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageMetadata {
    pub prompt: String,
    pub negative_prompt: String,
    pub steps: usize,
    pub sampler: SchedulerKind,
    pub guidance: f64,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    pub model: String,
    pub eta: f64,
    /// The weights' dtype (`f32`, `f16`, `bf16`): the same seed gives a slightly different
    /// image in each.
    pub dtype: String,
}

/// One finished image: 8-bit RGB, row-major.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    pub rgb: Vec<u8>,
    pub width: usize,
    pub height: usize,
    pub metadata: ImageMetadata,
    pub seconds: f64,
}

/// A model the pipeline holds: loaded by [`Pipeline::load`], or — for a one-image run
/// ([`Pipeline::load_for_one_image`]) — when first needed; released once used in one-image runs.
struct Slot<T> {
    state: Mutex<SlotState<T>>,
    /// Said when the model is asked for after it was released.
    released: &'static str,
}

type Loader<T> = Box<dyn FnOnce() -> Result<T> + Send>;

enum SlotState<T> {
    Ready(T),
    Pending(Loader<T>),
    Released,
}

impl<T> Slot<T> {
    fn new(state: SlotState<T>, released: &'static str) -> Self {
        Self {
            state: Mutex::new(state),
            released,
        }
    }

    fn lock(&self) -> Result<std::sync::MutexGuard<'_, SlotState<T>>> {
        self.state
            .lock()
            .map_err(|_| anyhow::anyhow!("model lock poisoned"))
    }

    fn is_pending(&self) -> bool {
        self.lock()
            .is_ok_and(|g| matches!(*g, SlotState::Pending(_)))
    }

    /// The model, loading it first if it is pending.
    fn get(&self) -> Result<ModelRef<'_, T>> {
        let mut guard = self.lock()?;
        if matches!(*guard, SlotState::Pending(_)) {
            if let SlotState::Pending(load) = std::mem::replace(&mut *guard, SlotState::Released) {
                *guard = SlotState::Ready(load()?);
            }
        }
        match *guard {
            SlotState::Ready(_) => Ok(ModelRef(guard)),
            _ => bail!("{}", self.released),
        }
    }

    /// Frees the model and hands its pages back to the OS.
    fn release(&self) {
        if let Ok(mut guard) = self.lock() {
            *guard = SlotState::Released;
        }
        crate::kernels::return_freed_memory();
    }
}

/// A borrowed model (see [`Pipeline::unet`]); holds the pipeline's lock on it.
pub struct ModelRef<'a, T>(std::sync::MutexGuard<'a, SlotState<T>>);

impl<T> std::ops::Deref for ModelRef<'_, T> {
    type Target = T;
    fn deref(&self) -> &T {
        match &*self.0 {
            SlotState::Ready(model) => model,
            // Constructed only around `Ready` (checked in `Slot::get`).
            _ => unreachable!("ModelRef holds a loaded model"),
        }
    }
}

/// The UNet, borrowed from the pipeline.
pub type UNetRef<'a> = ModelRef<'a, UNet2DConditionModel>;

/// A loaded model, ready to generate many images.
pub struct Pipeline {
    pub device: Device,
    pub dtype: DType,
    tokenizer: ClipTokenizer,
    /// A one-image run frees the encoder's ~0.5 GB (SD 1.x, f32) before the denoising
    /// loop's peak...
    text_encoder: Slot<ClipTextModel>,
    /// ...loads the UNet only then and frees its 3.4 GB before the VAE decode...
    unet: Slot<UNet2DConditionModel>,
    /// ...and loads the VAE only for the decode, so no two models are resident at once.
    vae: Slot<AutoEncoderKL>,
    single_use: bool,
    unet_config: UNetConfig,
    vae_config: VaeConfig,
    scheduler_config: SchedulerConfig,
    default_scheduler: SchedulerKind,
    model_name: String,
}

impl Pipeline {
    /// Reads the configs, checks them, and loads the weights onto `device` as `dtype`.
    pub fn load(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(files, device, dtype, false)
    }

    /// For a run that makes one image (a single prompt, `--from-png`): the text encoder is
    /// loaded now and freed once the prompt is encoded, the UNet is loaded for the denoising
    /// loop and freed after it, the VAE is loaded for the decode. Peak memory is then the
    /// largest single stage rather than all three models at once. A second image is an error.
    pub fn load_for_one_image(files: &ModelFiles, device: &Device, dtype: DType) -> Result<Self> {
        Self::load_with(files, device, dtype, true)
    }

    fn load_with(
        files: &ModelFiles,
        device: &Device,
        dtype: DType,
        one_image: bool,
    ) -> Result<Self> {
        if device.is_cpu() {
            crate::kernels::tune_allocator();
        }
        let unet_config: UNetConfig = read_json(&files.unet_config)?;
        let vae_config: VaeConfig = read_json(&files.vae_config)?;
        let text_config: TextEncoderConfig = read_json(&files.text_encoder_config)?;
        let scheduler_config: SchedulerConfig = read_json(&files.scheduler_config)?;
        let unet_cfg = unet_config
            .to_candle()
            .with_context(|| files.unet_config.display().to_string())?;
        let vae_cfg = vae_config
            .to_candle()
            .with_context(|| files.vae_config.display().to_string())?;
        text_config
            .validate()
            .with_context(|| files.text_encoder_config.display().to_string())?;
        if text_config.hidden_size != unet_cfg.cross_attention_dim {
            bail!(
                "the text encoder's hidden_size ({}) does not match the UNet's cross_attention_dim ({})",
                text_config.hidden_size,
                unet_cfg.cross_attention_dim
            );
        }
        if vae_config.latent_channels != unet_config.in_channels
            || unet_config.in_channels != unet_config.out_channels
        {
            bail!(
                "unsupported model: VAE latent_channels {}, UNet in/out channels {}/{} (expected equal: a text-to-image UNet)",
                vae_config.latent_channels,
                unet_config.in_channels,
                unet_config.out_channels
            );
        }
        let default_scheduler =
            SchedulerKind::from_config(&scheduler_config).unwrap_or(SchedulerKind::Pndm);
        let tokenizer = ClipTokenizer::from_dir(
            &files.tokenizer_dir,
            text_config.max_position_embeddings.min(77),
        )?;
        fn what(c: &str, p: &std::path::Path) -> String {
            format!("cannot load the {c} from {}", p.display())
        }
        // bf16 on the CPU keeps the text encoder in f32: it runs once per prompt (0.1 s) on
        // easel's f32 CLIP kernels, and one-image runs free it before the denoising loop.
        let text_dtype = if device.is_cpu() && dtype == DType::BF16 {
            DType::F32
        } else {
            dtype
        };
        let text_encoder = ClipTextModel::new(
            open_safetensors(&files.text_encoder_weights, text_dtype, device)?,
            &text_config,
        )
        .with_context(|| what("text encoder", &files.text_encoder_weights))?;
        // The weight files are opened (headers checked) now; their tensors are read now or,
        // for a one-image run, when the model is first needed.
        let unet_vb = open_safetensors(&files.unet_weights, dtype, device)?;
        let unet_path = files.unet_weights.clone();
        let (unet_in, unet_out) = (unet_config.in_channels, unet_config.out_channels);
        // Flash attention is a CUDA f16/bf16 kernel; everywhere else the plain path runs.
        let flash = cfg!(feature = "flash-attn") && device.is_cuda() && dtype != DType::F32;
        let load_unet: Loader<UNet2DConditionModel> = Box::new(move || {
            UNet2DConditionModel::new(unet_vb, unet_in, unet_out, flash, unet_cfg)
                .with_context(|| what("UNet", &unet_path))
        });
        let vae_vb = open_safetensors(&files.vae_weights, dtype, device)?;
        let vae_path = files.vae_weights.clone();
        let (vae_in, vae_out) = (vae_config.in_channels, vae_config.out_channels);
        let load_vae: Loader<AutoEncoderKL> = Box::new(move || {
            AutoEncoderKL::new(vae_vb, vae_in, vae_out, vae_cfg)
                .with_context(|| what("VAE", &vae_path))
        });
        let (unet, vae) = if one_image {
            (SlotState::Pending(load_unet), SlotState::Pending(load_vae))
        } else {
            (
                SlotState::Ready(load_unet()?),
                SlotState::Ready(load_vae()?),
            )
        };
        Ok(Self {
            device: device.clone(),
            dtype,
            tokenizer,
            text_encoder: Slot::new(
                SlotState::Ready(text_encoder),
                "the text encoder was released after encoding the run's prompt",
            ),
            unet: Slot::new(unet, "the UNet was released after the run's denoising loop"),
            vae: Slot::new(vae, "the VAE was released"),
            single_use: one_image,
            unet_config,
            vae_config,
            scheduler_config,
            default_scheduler,
            model_name: files.name.clone(),
        })
    }

    /// The activations' dtype: the weights' own, except bf16 on the CPU, where bf16 weights
    /// meet f32 activations (products in bf16 or widened to f32, see `kernels::bf16`).
    pub fn compute_dtype(&self) -> DType {
        if self.device.is_cpu() && self.dtype == DType::BF16 {
            DType::F32
        } else {
            self.dtype
        }
    }

    /// The size the model was trained at (512×512 for SD 1.x).
    pub fn default_size(&self) -> (usize, usize) {
        let s = self.unet_config.sample_size.unwrap_or(64) * self.vae_config.scale_factor();
        (s, s)
    }

    /// Pixels per latent (8 for SD 1.x).
    pub fn vae_scale_factor(&self) -> usize {
        self.vae_config.scale_factor()
    }

    /// The scheduler named by the model's scheduler_config.json.
    pub fn default_scheduler(&self) -> SchedulerKind {
        self.default_scheduler
    }

    pub fn scheduler_config(&self) -> &SchedulerConfig {
        &self.scheduler_config
    }

    pub fn tokenizer(&self) -> &ClipTokenizer {
        &self.tokenizer
    }

    /// Text embeddings for token ids (batch, seq) → (batch, seq, hidden).
    pub fn embed_ids(&self, ids: &Tensor) -> Result<Tensor> {
        self.with_text_encoder(|te| te.forward(ids))
    }

    /// Frees each model as soon as the run no longer needs it: the text encoder after the
    /// prompt is encoded, the UNet after the denoising loop (for a pipeline made by
    /// [`Pipeline::load`]; [`Pipeline::load_for_one_image`] also defers the loading). A second
    /// image is then an error.
    pub fn release_models_after_use(&mut self) {
        self.single_use = true;
    }

    fn with_text_encoder<T>(&self, f: impl FnOnce(&ClipTextModel) -> Result<T>) -> Result<T> {
        let out = f(&*self.text_encoder.get()?)?;
        if self.single_use {
            self.text_encoder.release();
        }
        Ok(out)
    }

    /// The UNet (for benchmarks and tests), loading it if it is pending; an error once it was
    /// released.
    pub fn unet(&self) -> Result<UNetRef<'_>> {
        self.unet.get()
    }

    /// The text encoder (for benchmarks and tests), loaded; an error once it was released.
    pub fn text_encoder(&self) -> Result<ModelRef<'_, ClipTextModel>> {
        self.text_encoder.get()
    }

    /// Checks a request before any work is done, so bad input fails in milliseconds.
    pub fn validate(&self, req: &GenerationRequest) -> Result<()> {
        let f = self.vae_scale_factor().max(8);
        for (name, v) in [("width", req.width), ("height", req.height)] {
            if v == 0 || v % f != 0 {
                bail!("{name} must be a positive multiple of {f}, got {v}");
            }
            if v > 8192 {
                bail!("{name} {v} is larger than 8192");
            }
        }
        if req.steps == 0 {
            bail!("steps must be at least 1");
        }
        if req.steps > self.scheduler_config.num_train_timesteps() {
            bail!(
                "steps must be at most {} (the model's training timesteps), got {}",
                self.scheduler_config.num_train_timesteps(),
                req.steps
            );
        }
        if !req.guidance.is_finite() || req.guidance < 0.0 {
            bail!("guidance must be a finite number ≥ 0, got {}", req.guidance);
        }
        if req.num_images == 0 {
            bail!("num-images must be at least 1");
        }
        Ok(())
    }

    /// Text embeddings the UNet is conditioned on: `[negative; positive]` (batch 2) when
    /// classifier-free guidance is on (guidance > 1, as diffusers decides), else `[positive]`.
    pub fn encode_prompt(
        &self,
        prompt: &str,
        negative: &str,
        guidance: f64,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Tensor> {
        let pos = self.tokenizer.encode(prompt)?;
        if let Some(cut) = &pos.truncated {
            progress(Progress::Warning(format!(
                "the prompt is longer than CLIP's {} tokens; this part was ignored: \"{cut}\"",
                self.tokenizer.context_length()
            )));
        }
        if guidance > 1.0 {
            let neg = self.tokenizer.encode(negative)?;
            if let Some(cut) = &neg.truncated {
                progress(Progress::Warning(format!(
                    "the negative prompt is too long; this part was ignored: \"{cut}\""
                )));
            }
            self.with_text_encoder(|te| te.encode(&[&neg, &pos], &self.device))
        } else {
            self.with_text_encoder(|te| te.encode(&[&pos], &self.device))
        }
    }

    /// The seeded initial latents, drawn on the CPU as `torch.randn(shape,
    /// generator=torch.Generator().manual_seed(seed))` draws them, so a seed gives the same
    /// image as diffusers and on every device.
    pub fn initial_latents(
        &self,
        width: usize,
        height: usize,
        noise: &mut dyn NoiseSource,
        init_sigma: f64,
    ) -> Result<Tensor> {
        let f = self.vae_scale_factor();
        let shape = [1, self.vae_config.latent_channels, height / f, width / f];
        let values = noise.randn(&shape);
        let t = Tensor::from_vec(values, shape.as_slice(), &Device::Cpu)?
            .to_dtype(self.compute_dtype())?
            .to_device(&self.device)?;
        Ok(if init_sigma == 1.0 {
            t
        } else {
            (t * init_sigma)?
        })
    }

    /// The denoising loop. `on_step` sees the latents after every scheduler step.
    pub fn denoise(
        &self,
        embeddings: &Tensor,
        latents: Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        on_step: &mut dyn FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        self.denoise_cancellable(
            embeddings,
            latents,
            scheduler,
            guidance,
            noise,
            &AtomicBool::new(false),
            on_step,
        )
    }

    /// [`Pipeline::denoise`] that returns [`Cancelled`] as soon as `cancel` is set, checked
    /// before every UNet call (a step is the finest point where stopping is cheap).
    #[allow(clippy::too_many_arguments)]
    pub fn denoise_cancellable(
        &self,
        embeddings: &Tensor,
        mut latents: Tensor,
        scheduler: &mut dyn Scheduler,
        guidance: f64,
        noise: &mut dyn NoiseSource,
        cancel: &AtomicBool,
        on_step: &mut dyn FnMut(usize, usize, &Tensor),
    ) -> Result<Tensor> {
        let cfg = embeddings.dim(0)? == 2;
        let unet = self.unet()?;
        let timesteps = scheduler.timesteps().to_vec();
        let total = timesteps.len();
        for (i, &t) in timesteps.iter().enumerate() {
            check_cancel(cancel)?;
            // With guidance the UNet pairs the one latent with both contexts itself (as
            // diffusers' `cat([latents] * 2)` does), running the layers before the first
            // cross-attention once instead of twice.
            let input = scheduler.scale_model_input(&latents, t)?;
            let out = unet.forward(&input, t, embeddings)?;
            let out = if cfg {
                let uncond = out.narrow(0, 0, 1)?;
                let text = out.narrow(0, 1, 1)?;
                (&uncond + ((text - &uncond)? * guidance)?)?
            } else {
                out
            };
            latents = scheduler.step(&out, t, &latents, noise)?;
            on_step(i + 1, total, &latents);
        }
        drop(unet);
        if self.single_use {
            self.unet.release();
        }
        Ok(latents)
    }

    /// VAE decode of final latents → images in [0, 1], (batch, 3, H, W) f32.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let x = (latents / self.vae_config.scaling_factor)?;
        let img = self.vae.get()?.decode(&x)?.to_dtype(DType::F32)?;
        Ok(((img / 2.0)? + 0.5)?.clamp(0f32, 1f32)?)
    }

    /// One decoded image (3, H, W) in [0, 1] → 8-bit RGB, rounding as numpy does
    /// (`(x * 255).round()`, half to even) in diffusers' `numpy_to_pil`.
    pub fn to_rgb8(image: &Tensor) -> Result<Vec<u8>> {
        let hwc = image
            .permute((1, 2, 0))?
            .contiguous()?
            .to_device(&Device::Cpu)?;
        let v = hwc.flatten_all()?.to_vec1::<f32>()?;
        Ok(v.into_iter()
            .map(|x| (x * 255.0).round_ties_even().clamp(0.0, 255.0) as u8)
            .collect())
    }

    /// Generates `req.num_images` images (seeds `req.seed`, `req.seed + 1`, …), handing each
    /// to `sink` as soon as it is finished, so a failure later in a batch loses nothing.
    pub fn generate_each(
        &self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress),
        sink: &mut dyn FnMut(GeneratedImage) -> Result<()>,
    ) -> Result<()> {
        self.generate_each_cancellable(req, &AtomicBool::new(false), progress, sink)
    }

    /// [`Pipeline::generate_each`] that stops with [`Cancelled`] once `cancel` is set (e.g.
    /// by a Ctrl-C handler, or from `progress`). The image in flight is dropped before it
    /// reaches `sink`, so nothing half-made is written; images already handed over are kept.
    pub fn generate_each_cancellable(
        &self,
        req: &GenerationRequest,
        cancel: &AtomicBool,
        progress: &mut dyn FnMut(Progress),
        sink: &mut dyn FnMut(GeneratedImage) -> Result<()>,
    ) -> Result<()> {
        self.validate(req)?;
        let kind = req.scheduler.unwrap_or(self.default_scheduler);
        let embeddings =
            self.encode_prompt(&req.prompt, &req.negative_prompt, req.guidance, progress)?;
        for index in 0..req.num_images {
            check_cancel(cancel)?;
            let start = Instant::now();
            let seed = req.seed.wrapping_add(index as u64);
            progress(Progress::ImageStarted {
                index,
                count: req.num_images,
                seed,
            });
            let mut scheduler = kind.build(&self.scheduler_config, req.eta)?;
            scheduler.set_timesteps(req.steps)?;
            let mut rng = TorchGenerator::new(seed);
            let latents = self.initial_latents(
                req.width,
                req.height,
                &mut rng,
                scheduler.init_noise_sigma(),
            )?;
            if self.unet.is_pending() {
                progress(Progress::Loading("UNet"));
            }
            let latents = self.denoise_cancellable(
                &embeddings,
                latents,
                scheduler.as_mut(),
                req.guidance,
                &mut rng,
                cancel,
                &mut |step, total, _| progress(Progress::Step { step, total }),
            )?;
            check_cancel(cancel)?;
            progress(Progress::Decoding);
            let image = self.decode(&latents)?.squeeze(0)?;
            check_cancel(cancel)?;
            let (_, h, w) = image.dims3()?;
            sink(GeneratedImage {
                rgb: Self::to_rgb8(&image)?,
                width: w,
                height: h,
                metadata: ImageMetadata {
                    prompt: req.prompt.clone(),
                    negative_prompt: req.negative_prompt.clone(),
                    steps: req.steps,
                    sampler: kind,
                    guidance: req.guidance,
                    seed,
                    width: req.width,
                    height: req.height,
                    model: self.model_name.clone(),
                    eta: req.eta,
                    dtype: crate::device::dtype_name(self.dtype).into(),
                },
                seconds: start.elapsed().as_secs_f64(),
            })?;
        }
        Ok(())
    }

    /// [`Pipeline::generate_each`], collecting the images.
    pub fn generate(
        &self,
        req: &GenerationRequest,
        progress: &mut dyn FnMut(Progress),
    ) -> Result<Vec<GeneratedImage>> {
        let mut images = Vec::with_capacity(req.num_images);
        self.generate_each(req, progress, &mut |img| {
            images.push(img);
            Ok(())
        })?;
        Ok(images)
    }
}

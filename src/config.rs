//! The model's own `config.json` files, parsed with serde and checked, then turned into
//! candle's model configs. Nothing here hard-codes a width: any SD 1.x/2.x-shaped model
//! works, and configs easel cannot run (SDXL's UNet, LCM-distilled UNets...) are refused
//! with a message that says which key is the problem.

use crate::unet as unet_2d;
use anyhow::{bail, Context, Result};
use candle_transformers::models::stable_diffusion::vae;
use serde::Deserialize;
use std::path::Path;

/// An `int` or a per-block `list[int]`, as diffusers accepts for several UNet keys.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum OneOrMany {
    One(usize),
    Many(Vec<usize>),
}

impl OneOrMany {
    /// The value for each of `n` blocks.
    fn per_block(&self, n: usize, key: &str) -> Result<Vec<usize>> {
        match self {
            Self::One(v) => Ok(vec![*v; n]),
            Self::Many(v) if v.len() == n => Ok(v.clone()),
            Self::Many(v) => bail!("{key} has {} entries but the UNet has {n} blocks", v.len()),
        }
    }
}

/// Reads and parses one JSON config file, naming the file in every error.
pub fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    serde_json::from_str(&text).with_context(|| format!("invalid config {}", path.display()))
}

fn d_true() -> bool {
    true
}
fn d_4() -> usize {
    4
}
fn d_3() -> usize {
    3
}
fn d_2() -> usize {
    2
}
fn d_1() -> usize {
    1
}
fn d_32() -> usize {
    32
}
fn d_eps5() -> f64 {
    1e-5
}
fn d_1f() -> f64 {
    1.0
}
fn d_silu() -> String {
    "silu".into()
}
fn d_heads() -> OneOrMany {
    OneOrMany::One(8)
}
fn d_cross() -> OneOrMany {
    OneOrMany::One(1280)
}
fn d_layers() -> OneOrMany {
    OneOrMany::One(1)
}

/// `unet/config.json` (diffusers `UNet2DConditionModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(default = "d_4")]
    pub in_channels: usize,
    #[serde(default = "d_4")]
    pub out_channels: usize,
    pub sample_size: Option<usize>,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_2")]
    pub layers_per_block: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    #[serde(default = "d_heads")]
    pub attention_head_dim: OneOrMany,
    pub num_attention_heads: Option<OneOrMany>,
    #[serde(default = "d_cross")]
    pub cross_attention_dim: OneOrMany,
    #[serde(default = "d_layers")]
    pub transformer_layers_per_block: OneOrMany,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_eps5")]
    pub norm_eps: f64,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "d_1")]
    pub downsample_padding: usize,
    #[serde(default = "d_1f")]
    pub mid_block_scale_factor: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    pub addition_embed_type: Option<String>,
    pub class_embed_type: Option<String>,
    pub encoder_hid_dim: Option<usize>,
    pub time_cond_proj_dim: Option<usize>,
    pub resnet_time_scale_shift: Option<String>,
    pub time_embedding_type: Option<String>,
    pub conv_in_kernel: Option<usize>,
    pub conv_out_kernel: Option<usize>,
    pub num_class_embeds: Option<usize>,
}

impl UNetConfig {
    /// Checks that candle's SD UNet can run this config, and converts it.
    pub fn to_candle(&self) -> Result<unet_2d::UNet2DConditionModelConfig> {
        let unsupported = |what: String| -> Result<unet_2d::UNet2DConditionModelConfig> {
            bail!(
                "unsupported UNet config: {what}; easel runs Stable Diffusion 1.x/2.x-style UNets"
            )
        };
        if let Some(c) = &self.class_name {
            if c != "UNet2DConditionModel" {
                return unsupported(format!("_class_name is {c}"));
            }
        }
        if let Some(t) = &self.addition_embed_type {
            return unsupported(format!("addition_embed_type {t:?} (an SDXL-style UNet)"));
        }
        if let Some(t) = &self.class_embed_type {
            return unsupported(format!("class_embed_type {t:?}"));
        }
        if self.num_class_embeds.is_some() {
            return unsupported("num_class_embeds is set".into());
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim is set".into());
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim is set (a guidance-distilled UNet)".into());
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention".into());
        }
        if !matches!(
            &self.only_cross_attention,
            serde_json::Value::Null | serde_json::Value::Bool(false)
        ) {
            return unsupported("only_cross_attention".into());
        }
        if self
            .resnet_time_scale_shift
            .as_deref()
            .is_some_and(|s| s != "default")
        {
            return unsupported("resnet_time_scale_shift other than \"default\"".into());
        }
        if self
            .time_embedding_type
            .as_deref()
            .is_some_and(|s| s != "positional")
        {
            return unsupported("time_embedding_type other than \"positional\"".into());
        }
        if self.conv_in_kernel.is_some_and(|k| k != 3)
            || self.conv_out_kernel.is_some_and(|k| k != 3)
        {
            return unsupported("conv_in_kernel/conv_out_kernel other than 3".into());
        }
        if self.act_fn != "silu" {
            return unsupported(format!("act_fn {:?}", self.act_fn));
        }
        if let Some(m) = &self.mid_block_type {
            if m != "UNetMidBlock2DCrossAttn" {
                return unsupported(format!("mid_block_type {m}"));
            }
        }
        let n = self.block_out_channels.len();
        if n == 0 {
            bail!("invalid UNet config: block_out_channels is empty");
        }
        if self.down_block_types.len() != n || self.up_block_types.len() != n {
            bail!(
                "invalid UNet config: {} down blocks and {} up blocks for {n} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            );
        }
        let cross_attention_dim = match &self.cross_attention_dim {
            OneOrMany::One(d) => *d,
            OneOrMany::Many(v) if !v.is_empty() && v.iter().all(|d| *d == v[0]) => v[0],
            OneOrMany::Many(_) => return unsupported("per-block cross_attention_dim".into()),
        };
        // diffusers' historical misnomer: `attention_head_dim` is the number of heads unless
        // `num_attention_heads` is given.
        let heads = self
            .num_attention_heads
            .as_ref()
            .unwrap_or(&self.attention_head_dim)
            .per_block(n, "attention_head_dim")?;
        let depth = self
            .transformer_layers_per_block
            .per_block(n, "transformer_layers_per_block")?;
        let mut blocks = Vec::with_capacity(n);
        for (i, down) in self.down_block_types.iter().enumerate() {
            let up = &self.up_block_types[n - 1 - i];
            let cross = match (down.as_str(), up.as_str()) {
                ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") => true,
                ("DownBlock2D", "UpBlock2D") => false,
                _ => return unsupported(format!("down block {down} paired with up block {up}")),
            };
            let ch = self.block_out_channels[i];
            if heads[i] == 0 || !ch.is_multiple_of(heads[i]) {
                bail!(
                    "invalid UNet config: {ch} channels do not split into {} attention heads",
                    heads[i]
                );
            }
            if !ch.is_multiple_of(self.norm_num_groups) {
                bail!(
                    "invalid UNet config: {ch} channels do not split into {} norm groups",
                    self.norm_num_groups
                );
            }
            blocks.push(unet_2d::BlockConfig {
                out_channels: ch,
                use_cross_attn: cross.then_some(depth[i]),
                attention_head_dim: heads[i],
            });
        }
        Ok(unet_2d::UNet2DConditionModelConfig {
            center_input_sample: self.center_input_sample,
            flip_sin_to_cos: self.flip_sin_to_cos,
            freq_shift: self.freq_shift,
            blocks,
            layers_per_block: self.layers_per_block,
            downsample_padding: self.downsample_padding,
            mid_block_scale_factor: self.mid_block_scale_factor,
            norm_num_groups: self.norm_num_groups,
            norm_eps: self.norm_eps,
            cross_attention_dim,
            sliced_attention_size: None,
            use_linear_projection: self.use_linear_projection,
        })
    }
}

fn d_scaling() -> f64 {
    0.18215
}

/// `vae/config.json` (diffusers `AutoencoderKL`).
#[derive(Debug, Clone, Deserialize)]
pub struct VaeConfig {
    #[serde(rename = "_class_name")]
    pub class_name: Option<String>,
    #[serde(default = "d_3")]
    pub in_channels: usize,
    #[serde(default = "d_3")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    #[serde(default = "d_1")]
    pub layers_per_block: usize,
    #[serde(default = "d_4")]
    pub latent_channels: usize,
    #[serde(default = "d_32")]
    pub norm_num_groups: usize,
    #[serde(default = "d_scaling")]
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    #[serde(default = "d_silu")]
    pub act_fn: String,
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
    #[serde(default)]
    pub down_block_types: Vec<String>,
    #[serde(default)]
    pub up_block_types: Vec<String>,
}

impl VaeConfig {
    pub fn to_candle(&self) -> Result<vae::AutoEncoderKLConfig> {
        if let Some(c) = &self.class_name {
            if c != "AutoencoderKL" {
                bail!("unsupported VAE config: _class_name is {c} (expected AutoencoderKL)");
            }
        }
        if self.block_out_channels.is_empty() {
            bail!("invalid VAE config: block_out_channels is empty");
        }
        if self.act_fn != "silu" || !self.mid_block_add_attention {
            bail!(
                "unsupported VAE config: act_fn {:?}, mid_block_add_attention {}",
                self.act_fn,
                self.mid_block_add_attention
            );
        }
        if self.shift_factor.is_some_and(|s| s != 0.0) {
            bail!("unsupported VAE config: shift_factor is set (an SD3/Flux VAE)");
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if t != "DownEncoderBlock2D" && t != "UpDecoderBlock2D" {
                bail!("unsupported VAE config: block type {t}");
            }
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|c| !c.is_multiple_of(self.norm_num_groups))
        {
            bail!(
                "invalid VAE config: {c} channels do not split into {} norm groups",
                self.norm_num_groups
            );
        }
        Ok(vae::AutoEncoderKLConfig {
            block_out_channels: self.block_out_channels.clone(),
            layers_per_block: self.layers_per_block,
            latent_channels: self.latent_channels,
            norm_num_groups: self.norm_num_groups,
            use_quant_conv: self.use_quant_conv,
            use_post_quant_conv: self.use_post_quant_conv,
        })
    }

    /// Pixels per latent along each axis (8 for SD 1.x), as diffusers' pipeline computes it.
    pub fn scale_factor(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }
}

fn d_vocab() -> usize {
    49408
}
fn d_77() -> usize {
    77
}
fn d_quick_gelu() -> String {
    "quick_gelu".into()
}

/// `text_encoder/config.json` (transformers `CLIPTextModel`).
#[derive(Debug, Clone, Deserialize)]
pub struct TextEncoderConfig {
    #[serde(default)]
    pub architectures: Vec<String>,
    #[serde(default = "d_vocab")]
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "d_77")]
    pub max_position_embeddings: usize,
    #[serde(default = "d_quick_gelu")]
    pub hidden_act: String,
    #[serde(default = "d_eps5")]
    pub layer_norm_eps: f64,
}

impl TextEncoderConfig {
    pub fn validate(&self) -> Result<()> {
        if let Some(a) = self.architectures.first() {
            if a != "CLIPTextModel" {
                bail!("unsupported text encoder: {a} (expected CLIPTextModel)");
            }
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            bail!(
                "invalid text encoder config: hidden_size {} does not split into {} heads",
                self.hidden_size,
                self.num_attention_heads
            );
        }
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            bail!("unsupported text encoder activation {:?}", self.hidden_act);
        }
        Ok(())
    }
}

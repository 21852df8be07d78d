//! The Stable Diffusion UNet (diffusers' `UNet2DConditionModel`), and the blocks it is
//! built from.
//!
//! Adapted from candle-transformers 0.11.1 `models::stable_diffusion` (MIT OR Apache-2.0,
//! © the candle authors). easel owns this copy because the upstream one is wrong for some
//! configs: its `DownBlock2D`/`UpBlock2D` ignore `norm_num_groups` (any UNet whose
//! norm_num_groups is not 32 fails to load), its sliced attention fails and drops heads,
//! and its flash-attention fallback panics. Changes are marked in the code.

pub mod attention;
pub mod embeddings;
pub mod resnet;
pub mod unet_2d;
pub mod unet_2d_blocks;
pub mod vae;

pub use unet_2d::{BlockConfig, UNet2DConditionModel, UNet2DConditionModelConfig};

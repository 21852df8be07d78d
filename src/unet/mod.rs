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

use candle_core::{Result, Tensor};

/// `x` repeated along the batch to `batch` rows, as `torch.cat([x] * (batch / n))`: the
/// latents of a guided step meet their contexts in that order (see
/// [`UNet2DConditionModel::forward`]). `x` itself when it already has `batch` rows.
pub(crate) fn repeat_batch(x: &Tensor, batch: usize) -> Result<Tensor> {
    let n = x.dim(0)?;
    if n == batch {
        return Ok(x.clone());
    }
    if n == 0 || !batch.is_multiple_of(n) {
        candle_core::bail!("cannot repeat a batch of {n} to {batch}");
    }
    Tensor::cat(&vec![x; batch / n], 0)
}

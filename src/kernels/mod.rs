//! easel's own CPU kernels, plugged into candle through its `CustomOp` traits: attention that
//! never materialises the full score matrix, convolution as GEMMs without im2col, and a fused
//! GroupNorm(+SiLU). Each falls back to the plain candle op off the fast path (non-f32, GPU).
pub mod attention;
pub mod conv;
pub mod norm;
pub mod simd;

pub use attention::attention;
pub use conv::{conv2d, Conv2d};
pub use norm::{group_norm, GroupNorm};

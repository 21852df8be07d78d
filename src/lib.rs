//! easel: Stable Diffusion 1.x text-to-image on candle, step-for-step equal to HF diffusers.
//!
//! Data flows one way: a [`pipeline::GenerationRequest`] goes into a loaded
//! [`pipeline::Pipeline`], which returns images plus the metadata that produced them; the
//! [`output`] module writes them. The library never prints: progress is reported through a
//! callback and the binary owns the terminal.

pub mod batch;
pub mod config;
pub mod device;
pub mod kernels;
pub mod output;
pub mod pipeline;
pub mod rng;
pub mod scheduler;
pub mod text;
pub mod unet;
pub mod weights;

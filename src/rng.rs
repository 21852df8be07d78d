//! Random numbers for initial latents and stochastic samplers.

/// Where stochastic code gets its standard-normal noise from. A seeded torch-compatible
/// generator in normal use; a recorded replay in parity tests.
pub trait NoiseSource {
    /// `shape.iter().product()` standard-normal f32 values, in row-major order, drawn the
    /// way `torch.randn(shape, generator=g)` draws them on the CPU.
    fn randn(&mut self, shape: &[usize]) -> Vec<f32>;
}

//! UNet / VAE / text-encoder forward at 256² and 512².
//! `EASEL_BENCH_MODEL=/path/to/full-size-sd cargo bench --bench models`; without it the tiny
//! test fixture (tests/fixtures/tiny-a) is used, so the bench runs anywhere in seconds.
//! `EASEL_BENCH_DTYPE=bf16` times the bf16 mode (bf16 weights, f32 activations).
use candle_core::{DType, Device, Tensor};
use easel::pipeline::Pipeline;
use easel::weights::ModelSpec;
use std::sync::OnceLock;

fn main() {
    divan::main();
}

fn pipeline() -> &'static Pipeline {
    static P: OnceLock<Pipeline> = OnceLock::new();
    P.get_or_init(|| {
        let model = std::env::var("EASEL_BENCH_MODEL").unwrap_or_else(|_| {
            concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/tiny-a").to_string()
        });
        let files = ModelSpec {
            model,
            revision: "main".into(),
            prefer_fp16: false,
        }
        .resolve()
        .unwrap();
        let dtype = match std::env::var("EASEL_BENCH_DTYPE").as_deref() {
            Ok("bf16") => DType::BF16,
            _ => DType::F32,
        };
        Pipeline::load(&files, &Device::Cpu, dtype).unwrap()
    })
}

/// SD 1.x latents for a `size`² image (size / 8), whatever the model's VAE factor (the tiny
/// fixture's is 2), so the UNet sees the same token counts as the full model.
fn latents(batch: usize, size: usize) -> Tensor {
    Tensor::randn(0f32, 1.0, (batch, 4, size / 8, size / 8), &Device::Cpu).unwrap()
}

#[divan::bench(args = [256, 512], sample_count = 2, sample_size = 1)]
fn unet_forward_batch2(b: divan::Bencher, size: usize) {
    let p = pipeline();
    let x = latents(2, size);
    let ctx = p.encode_prompt("a horse", "", 7.5, &mut |_| {}).unwrap();
    b.bench(|| p.unet().unwrap().forward(&x, 500.0, &ctx).unwrap());
}

#[divan::bench(args = [256, 512], sample_count = 2, sample_size = 1)]
fn vae_decode(b: divan::Bencher, size: usize) {
    let p = pipeline();
    let x = latents(1, size);
    b.bench(|| p.decode(&x).unwrap());
}

#[divan::bench(sample_count = 5, sample_size = 1)]
fn text_encoder_2x77(b: divan::Bencher) {
    let p = pipeline();
    b.bench(|| {
        p.encode_prompt(
            "a photograph of an astronaut riding a horse",
            "",
            7.5,
            &mut |_| {},
        )
        .unwrap()
    });
}

//! How far `--dtype bf16` lands from f32 on a model folder (e.g. the full-size random SD v1.4
//! from `scripts/make_fixtures.py --full-size`): text embeddings, one UNet forward, one VAE
//! decode and a whole image, each as max |bf16 − f32| / max |f32|.
//!
//! `cargo run --release --example bf16_vs_f32 -- MODEL_DIR [SIZE] [STEPS]`
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use easel::pipeline::{GenerationRequest, Pipeline};
use easel::weights::ModelSpec;

fn rel(a: &Tensor, b: &Tensor) -> Result<f32> {
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(d / s.max(1e-12))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .expect("usage: bf16_vs_f32 MODEL_DIR [SIZE] [STEPS]");
    let size: usize = args.get(2).map_or(Ok(512), |s| s.parse())?;
    let steps: usize = args.get(3).map_or(Ok(2), |s| s.parse())?;
    let files = ModelSpec {
        model: model.clone(),
        revision: "main".into(),
        prefer_fp16: false,
    }
    .resolve()?;
    let p16 = Pipeline::load(&files, &Device::Cpu, DType::BF16)?;
    let p32 = Pipeline::load(&files, &Device::Cpu, DType::F32)?;
    println!("bf16 path: {:?}", easel::kernels::bf16::path());
    let prompt = "a photograph of an astronaut riding a horse";
    let e16 = p16.encode_prompt(prompt, "", 7.5, &mut |_| {})?;
    let e32 = p32.encode_prompt(prompt, "", 7.5, &mut |_| {})?;
    println!("text embeddings: {:.2e}", rel(&e16, &e32)?);
    let lat = size / p32.vae_scale_factor();
    let x = Tensor::randn(0f32, 1.0, (2, 4, lat, lat), &Device::Cpu)?;
    let u16 = p16.unet()?.forward(&x, 500.0, &e32)?;
    let u32 = p32.unet()?.forward(&x, 500.0, &e32)?;
    println!("UNet forward (t=500): {:.2e}", rel(&u16, &u32)?);
    let one = x.narrow(0, 0, 1)?;
    println!(
        "VAE decode: {:.2e}",
        rel(&p16.decode(&one)?, &p32.decode(&one)?)?
    );
    let mut req = GenerationRequest::new(prompt, &p32);
    req.steps = steps;
    req.seed = 1;
    req.width = size;
    req.height = size;
    let a = p16.generate(&req, &mut |_| {})?.remove(0);
    let b = p32.generate(&req, &mut |_| {})?.remove(0);
    let max = a.rgb.iter().zip(&b.rgb).map(|(x, y)| x.abs_diff(*y)).max();
    let mean = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(x, y)| x.abs_diff(*y) as f64)
        .sum::<f64>()
        / a.rgb.len() as f64;
    println!("{steps}-step {size}x{size} image: max {max:?} levels, mean {mean:.3}");
    Ok(())
}

//! Times easel's UNet / VAE / text encoder on a diffusers-layout folder, one component per
//! process so the peak RSS (VmHWM) is per measurement. Used by `scripts/bench_compare.py`.
//!
//! `sdbench MODE MODEL_DIR [--size N] [--batch N] [--iters N] [--dtype f32|bf16]`, MODE one
//! of `unet` (batch latents and contexts), `step` (one latent, batch contexts: a guided step), `vae`,
//! `text`, `e2e` (load + encode + one UNet step + decode). Prints one JSON line.
use anyhow::{bail, Result};
use candle_core::{DType, Device, Tensor};
use easel::pipeline::{GenerationRequest, Pipeline};
use easel::weights::ModelSpec;
use std::time::Instant;

/// The binary's allocator (src/main.rs), so that these figures are the CLI's.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn vm_hwm_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        bail!(
            "usage: sdbench MODE MODEL_DIR [--size N] [--batch N] [--iters N] [--dtype f32|bf16]"
        );
    }
    let mode = args[1].as_str();
    let model = args[2].clone();
    let mut size = 512usize;
    let mut batch = 2usize;
    let mut iters = 3usize;
    let mut dtype = DType::F32;
    let mut i = 3;
    while i + 1 < args.len() {
        let v = &args[i + 1];
        match args[i].as_str() {
            "--size" => size = v.parse()?,
            "--batch" => batch = v.parse()?,
            "--iters" => iters = v.parse()?,
            "--dtype" => {
                dtype = match v.as_str() {
                    "bf16" => DType::BF16,
                    _ => DType::F32,
                }
            }
            a => bail!("unknown argument {a}"),
        }
        i += 2;
    }
    let dev = Device::Cpu;
    let t0 = Instant::now();
    let files = ModelSpec {
        model,
        revision: "main".into(),
        prefer_fp16: false,
    }
    .resolve()?;
    let p = if mode == "e2e" && iters > 1 {
        Pipeline::load(&files, &dev, dtype)?
    } else {
        // One image, as the CLI makes it: each model is loaded when needed, freed when done.
        // The single-model modes use the same deferred loading so that only the model they
        // time is resident (its peak RSS is that model's, as diffusers' side loads only it).
        Pipeline::load_for_one_image(&files, &dev, dtype)?
    };
    if matches!(mode, "unet" | "step" | "vae") {
        // Encoding once frees the text encoder (a one-image pipeline), before anything is
        // timed; then load the model to time.
        p.encode_prompt("", "", 1.0, &mut |_| {})?;
        if mode == "vae" {
            p.decode(&Tensor::zeros((1, 4, 8, 8), p.compute_dtype(), &dev)?)?;
        } else {
            p.unet()?;
        }
    }
    let load_s = t0.elapsed().as_secs_f64();
    let lat = size / 8;
    let latents =
        Tensor::randn(0f32, 1f32, (batch, 4, lat, lat), &dev)?.to_dtype(p.compute_dtype())?;
    let ctx = Tensor::randn(0f32, 1f32, (batch, 77, 768), &dev)?.to_dtype(p.compute_dtype())?;
    let mut times = Vec::new();
    let mut run = |f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
        for _ in 0..iters {
            let t = Instant::now();
            f()?;
            times.push(t.elapsed().as_secs_f64());
        }
        Ok(())
    };
    match mode {
        "unet" => run(&mut || {
            p.unet()?.forward(&latents, 500.0, &ctx)?;
            Ok(())
        })?,
        // The UNet call of a guided step as the pipeline makes it: one latent, `batch`
        // contexts (diffusers repeats the latent; easel runs its layers before the first
        // cross-attention once).
        "step" => {
            let one = latents.narrow(0, 0, 1)?;
            run(&mut || {
                p.unet()?.forward(&one, 500.0, &ctx)?;
                Ok(())
            })?
        }
        "vae" => {
            let one = latents.narrow(0, 0, 1)?;
            run(&mut || {
                p.decode(&one)?;
                Ok(())
            })?
        }
        // The pipeline's encoding (tokenize, both prompts in one batch) without its
        // one-image release of the encoder, so that it can run `iters` times.
        "text" => {
            let tok = p.tokenizer();
            run(&mut || {
                let pos = tok.encode("a photograph of an astronaut riding a horse")?;
                let neg = tok.encode("")?;
                p.text_encoder()?.encode(&[&neg, &pos], &dev)?;
                Ok(())
            })?
        }
        // What the CLI does for one image: encode, one UNet step (batch 2), decode, through
        // the public `generate` (which frees each model once used when iters = 1).
        "e2e" => run(&mut || {
            let mut req = GenerationRequest::new("a photograph of an astronaut riding a horse", &p);
            req.steps = 1;
            req.width = size;
            req.height = size;
            p.generate(&req, &mut |_| {})?;
            Ok(())
        })?,
        m => bail!("unknown mode {m}"),
    }
    let min = times.iter().cloned().fold(f64::INFINITY, f64::min);
    println!(
        "{{\"mode\":\"{mode}\",\"size\":{size},\"batch\":{batch},\"dtype\":\"{dtype:?}\",\"load_s\":{load_s:.3},\"times\":{times:?},\"min_s\":{min:.4},\"vmhwm_kb\":{}}}",
        vm_hwm_kb()
    );
    Ok(())
}

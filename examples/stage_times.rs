//! Times each stage of one image on a model folder and reports peak memory:
//! `cargo run --release --example stage_times -- <model-folder> [size] [steps]`.
//! Useful on a full-size random-weight folder (scripts/make_fixtures.py --full-size).

use anyhow::Result;
use candle_core::{DType, Device};
use easel::pipeline::Pipeline;
use easel::rng::TorchGenerator;
use easel::scheduler::SchedulerKind;
use easel::weights::ModelSpec;
use std::time::Instant;

fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .map(|l| l.to_string())
        })
        .and_then(|l| {
            l.split_whitespace()
                .nth(1)
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = args
        .get(1)
        .cloned()
        .unwrap_or_else(|| "tests/fixtures/tiny-a".into());
    let size: usize = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or(512);
    let steps: usize = args.get(3).map(|s| s.parse()).transpose()?.unwrap_or(1);
    let files = ModelSpec {
        model,
        revision: "main".into(),
        prefer_fp16: false,
    }
    .resolve()?;
    let t = Instant::now();
    let p = Pipeline::load(&files, &Device::Cpu, DType::F32)?;
    println!(
        "load: {:.2}s (peak RSS {:.0} MiB)",
        t.elapsed().as_secs_f64(),
        peak_rss_mib()
    );
    let t = Instant::now();
    let emb = p.encode_prompt(
        "a landscape with mountains and a river",
        "",
        7.5,
        &mut |_| {},
    )?;
    println!("text encoder (2x77): {:.3}s", t.elapsed().as_secs_f64());
    let mut sched = SchedulerKind::Pndm.build(p.scheduler_config(), 0.0)?;
    sched.set_timesteps(steps)?;
    let mut rng = TorchGenerator::new(0);
    let latents = p.initial_latents(size, size, &mut rng, 1.0)?;
    let mut last = Instant::now();
    let latents = p.denoise(
        &emb,
        latents,
        sched.as_mut(),
        7.5,
        &mut rng,
        &mut |i, n, _| {
            println!(
                "step {i}/{n} (UNet batch 2 + PNDM): {:.2}s",
                last.elapsed().as_secs_f64()
            );
            last = Instant::now();
        },
    )?;
    let t = Instant::now();
    let img = p.decode(&latents)?;
    println!(
        "VAE decode {size}x{size}: {:.2}s",
        t.elapsed().as_secs_f64()
    );
    let _ = Pipeline::to_rgb8(&img.squeeze(0)?)?;
    println!("peak RSS: {:.0} MiB", peak_rss_mib());
    Ok(())
}

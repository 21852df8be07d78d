//! Model folder resolution: fp16 variants, pickle-only folders, the text encoder layouts.

mod common;

use easel::weights::ModelSpec;
use std::path::Path;

fn copy_tiny(to: &Path) {
    fn copy(from: &Path, to: &Path) {
        std::fs::create_dir_all(to).unwrap();
        for e in std::fs::read_dir(from).unwrap() {
            let e = e.unwrap();
            let t = to.join(e.file_name());
            if e.path().is_dir() {
                copy(&e.path(), &t)
            } else {
                std::fs::copy(e.path(), t).unwrap();
            }
        }
    }
    copy(&common::model_dir("tiny-a"), to);
}

fn spec(dir: &Path, fp16: bool) -> ModelSpec {
    ModelSpec {
        model: dir.to_string_lossy().into_owned(),
        revision: "main".into(),
        prefer_fp16: fp16,
    }
}

#[test]
fn fp16_variant_is_used_only_when_asked_and_present() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let unet = dir.path().join("unet");
    std::fs::copy(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.fp16.safetensors"),
    )
    .unwrap();

    let f16 = spec(dir.path(), true).resolve().unwrap();
    assert!(f16
        .unet_weights
        .ends_with("unet/diffusion_pytorch_model.fp16.safetensors"));
    // No variant for the VAE: fall back to the full-precision file (cast on load).
    assert!(f16
        .vae_weights
        .ends_with("vae/diffusion_pytorch_model.safetensors"));

    let f32 = spec(dir.path(), false).resolve().unwrap();
    assert!(f32
        .unet_weights
        .ends_with("unet/diffusion_pytorch_model.safetensors"));
}

#[test]
fn pickle_only_folders_are_refused_with_advice() {
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    let unet = dir.path().join("unet");
    std::fs::rename(
        unet.join("diffusion_pytorch_model.safetensors"),
        unet.join("diffusion_pytorch_model.bin"),
    )
    .unwrap();
    let err = spec(dir.path(), false).resolve().unwrap_err().to_string();
    assert!(err.contains("safetensors only"), "{err}");
}

#[test]
fn a_file_is_not_a_model() {
    let f = common::model_dir("tiny-a").join("model_index.json");
    let err = spec(&f, false).resolve().unwrap_err().to_string();
    assert!(err.contains("is a file"), "{err}");
}

#[test]
fn f16_pipeline_loads_and_stays_close_to_f32() {
    use candle_core::{DType, Device};
    let files = spec(&common::model_dir("tiny-a"), true).resolve().unwrap();
    let p16 = easel::pipeline::Pipeline::load(&files, &Device::Cpu, DType::F16).unwrap();
    let p32 = common::load_pipeline("tiny-a");
    let mut req = easel::pipeline::GenerationRequest::new("a cat", &p32);
    req.steps = 3;
    req.seed = 9;
    let a = p16.generate(&req, &mut |_| {}).unwrap().remove(0);
    let b = p32.generate(&req, &mut |_| {}).unwrap().remove(0);
    let max = a
        .rgb
        .iter()
        .zip(&b.rgb)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap();
    println!("f16 vs f32 on tiny-a: max {max} levels");
    assert!(max <= 8, "f16 image differs from f32 by {max} levels");
}

#[test]
fn released_models_serve_one_image_then_say_so() {
    let mut p = common::load_pipeline("tiny-a");
    p.release_models_after_use();
    let mut req = easel::pipeline::GenerationRequest::new("a cat", &p);
    req.steps = 1;
    let first = p.generate(&req, &mut |_| {}).unwrap().remove(0);
    let err = p.generate(&req, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("text encoder was released"), "{err}");
    assert!(
        p.unet().is_err(),
        "the UNet is released after the denoising loop"
    );
    // Releasing changes nothing about the image.
    let q = common::load_pipeline("tiny-a");
    assert_eq!(
        first.rgb,
        q.generate(&req, &mut |_| {}).unwrap().remove(0).rgb
    );
}

#[test]
fn one_image_pipeline_loads_late_and_makes_the_same_image() {
    use candle_core::{DType, Device};
    let files = spec(&common::model_dir("tiny-b"), false).resolve().unwrap();
    let p =
        easel::pipeline::Pipeline::load_for_one_image(&files, &Device::Cpu, DType::F32).unwrap();
    let mut req = easel::pipeline::GenerationRequest::new("a cat", &p);
    req.steps = 2;
    let mut events = Vec::new();
    let first = p
        .generate(&req, &mut |e| events.push(format!("{e:?}")))
        .unwrap()
        .remove(0);
    let loading = events.iter().position(|e| e.contains("Loading(\"UNet\")"));
    let step = events.iter().position(|e| e.contains("Step"));
    assert!(loading.is_some() && loading < step, "{events:?}");
    let err = p.generate(&req, &mut |_| {}).unwrap_err().to_string();
    assert!(err.contains("text encoder was released"), "{err}");
    let unet_err = p.unet().err().expect("the UNet is released").to_string();
    assert!(unet_err.contains("UNet was released"), "{unet_err}");
    let eager = common::load_pipeline("tiny-b");
    assert_eq!(
        first.rgb,
        eager.generate(&req, &mut |_| {}).unwrap().remove(0).rgb
    );
}

#[test]
fn one_image_pipeline_reports_a_broken_unet_when_it_loads_it() {
    use candle_core::{DType, Device};
    let dir = tempfile::tempdir().unwrap();
    copy_tiny(dir.path());
    // A valid safetensors file that lacks the UNet's tensors: the header reads, the load fails.
    let unet = dir.path().join("unet/diffusion_pytorch_model.safetensors");
    std::fs::copy(
        dir.path().join("vae/diffusion_pytorch_model.safetensors"),
        &unet,
    )
    .unwrap();
    let files = spec(dir.path(), false).resolve().unwrap();
    let p =
        easel::pipeline::Pipeline::load_for_one_image(&files, &Device::Cpu, DType::F32).unwrap();
    let req = easel::pipeline::GenerationRequest::new("a cat", &p);
    let err = format!("{:#}", p.generate(&req, &mut |_| {}).unwrap_err());
    assert!(err.contains("cannot load the UNet"), "{err}");
}

//! `--dtype bf16` on the CPU (bf16 weights, f32 activations) against the f32 pipeline, which
//! the parity tests tie to diffusers. Both bf16 paths run: the in-process tests take the one
//! this CPU picks, the CLI tests force each with `EASEL_BF16_GEMM`.
mod common;

use assert_cmd::Command;
use candle_core::{DType, Device, Tensor};
use easel::pipeline::{GenerationRequest, Pipeline};
use easel::weights::ModelSpec;

fn load(name: &str, dtype: DType) -> Pipeline {
    let files = ModelSpec {
        model: common::model_dir(name).to_string_lossy().into_owned(),
        revision: "main".into(),
        prefer_fp16: false,
    }
    .resolve()
    .unwrap();
    Pipeline::load(&files, &Device::Cpu, dtype).unwrap()
}

/// Largest and mean absolute difference of two 8-bit images.
fn levels(a: &[u8], b: &[u8]) -> (u8, f64) {
    assert_eq!(a.len(), b.len());
    let max = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
    let sum: u64 = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y) as u64).sum();
    (max, sum as f64 / a.len() as f64)
}

/// max |a − b| / max |b|.
fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let (err, scale) = common::max_abs_err(a, b);
    err / scale.max(1e-12)
}

#[test]
fn bf16_pipeline_stays_close_to_f32() {
    for name in ["tiny-a", "tiny-b"] {
        let p16 = load(name, DType::BF16);
        let p32 = load(name, DType::F32);
        assert_eq!(p16.compute_dtype(), DType::F32);

        let e16 = p16
            .encode_prompt("a cat on a mat", "blurry", 7.5, &mut |_| {})
            .unwrap();
        let e32 = p32
            .encode_prompt("a cat on a mat", "blurry", 7.5, &mut |_| {})
            .unwrap();
        let text = rel_err(&e16, &e32);

        let x = Tensor::randn(0f32, 1.0, (2, 4, 8, 8), &Device::Cpu).unwrap();
        let u16 = p16.unet().unwrap().forward(&x, 500.0, &e32).unwrap();
        let u32 = p32.unet().unwrap().forward(&x, 500.0, &e32).unwrap();
        let unet = rel_err(&u16, &u32);
        let one = x.narrow(0, 0, 1).unwrap();
        let vae = rel_err(&p16.decode(&one).unwrap(), &p32.decode(&one).unwrap());

        let mut req = GenerationRequest::new("a cat on a mat", &p32);
        req.steps = 4;
        req.seed = 11;
        let a = p16.generate(&req, &mut |_| {}).unwrap();
        let b = p32.generate(&req, &mut |_| {}).unwrap();
        let (max, mean) = levels(&a[0].rgb, &b[0].rgb);
        println!(
            "{name} bf16 vs f32 (relative to max |f32|): text emb {text:.2e}, UNet {unet:.2e}, \
             VAE {vae:.2e}; 4-step image max {max} levels, mean {mean:.3}"
        );
        assert_eq!(a[0].metadata.dtype, "bf16");
        // The text encoder stays f32 in bf16 mode on the CPU.
        assert_eq!(text, 0.0, "{name}: text embeddings differ by {text}");
        assert!(unet < 3e-2, "{name}: UNet output differs by {unet}");
        assert!(vae < 2e-2, "{name}: VAE output differs by {vae}");
        assert!(max <= 4 && mean < 0.5, "{name}: image {max} / {mean}");
    }
}

fn png_rgb(path: &std::path::Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

#[test]
fn cli_bf16_runs_both_paths_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let model = common::model_dir("tiny-a");
    let run = |dtype: &str, path: &str, out: &str| {
        Command::cargo_bin("easel")
            .unwrap()
            .env("EASEL_BF16_GEMM", path)
            .args([
                "--model",
                model.to_str().unwrap(),
                "--steps",
                "3",
                "--seed",
                "5",
            ])
            .args(["--dtype", dtype, "--device", "cpu", "-q", "-o"])
            .arg(dir.path().join(out))
            .arg("a red fox")
            .assert()
            .success();
        dir.path().join(out)
    };
    let f32_png = run("f32", "widen", "f32.png");
    let reference = png_rgb(&f32_png);
    for path in ["dot", "widen"] {
        let png = run("bf16", path, &format!("bf16-{path}.png"));
        let (max, mean) = levels(&png_rgb(&png), &reference);
        println!("CLI bf16 ({path}) vs f32 on tiny-a: max {max} levels, mean {mean:.3}");
        assert!(max <= 4 && mean < 0.5, "{path}: {max} / {mean}");
        let text = std::fs::read(&png).unwrap();
        let needle = b"Dtype: bf16";
        assert!(
            text.windows(needle.len()).any(|w| w == needle),
            "the PNG's parameters name the dtype"
        );
    }
}

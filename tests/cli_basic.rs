//! The `easel` binary on the tiny fixture model: files, metadata, errors.

mod common;

use assert_cmd::Command;
use predicates::prelude::*;
use std::path::{Path, PathBuf};

fn easel() -> Command {
    let mut c = Command::cargo_bin("easel").unwrap();
    // Never touch the network or the user's cache from tests.
    c.env("HF_HUB_OFFLINE", "1").env_remove("EASEL_MODEL");
    c
}

fn tiny() -> String {
    common::model_dir("tiny-a").to_string_lossy().into_owned()
}

fn pixels(path: &Path) -> Vec<u8> {
    image::open(path).unwrap().to_rgb8().into_raw()
}

/// Only the expected files, no temporaries left behind.
fn files_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn writes_a_png_with_a1111_parameters() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("cat.png");
    easel()
        .args([
            "--model",
            &tiny(),
            "--steps",
            "2",
            "--seed",
            "5",
            "-n",
            "blurry",
            "-o",
        ])
        .arg(&out)
        .arg("a cat, oil painting")
        .assert()
        .success()
        .stderr(predicate::str::contains("seed 5"));
    let img = image::open(&out).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    let text = easel::output::read_parameters(&out)
        .unwrap()
        .expect("parameters chunk");
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines[0], "a cat, oil painting");
    assert_eq!(lines[1], "Negative prompt: blurry");
    assert!(
        lines[2]
            .starts_with("Steps: 2, Sampler: PLMS, CFG scale: 7.5, Seed: 5, Size: 32x32, Model: "),
        "{}",
        lines[2]
    );
    assert_eq!(files_in(dir.path()), vec!["cat.png"]);
}

#[test]
fn same_seed_same_image_other_seed_other_image() {
    let dir = tempfile::tempdir().unwrap();
    let run = |seed: &str, name: &str| -> PathBuf {
        let out = dir.path().join(name);
        easel()
            .args([
                "--model",
                &tiny(),
                "--steps",
                "2",
                "-q",
                "--seed",
                seed,
                "-o",
            ])
            .arg(&out)
            .arg("a tree")
            .assert()
            .success();
        out
    };
    let a = pixels(&run("11", "a.png"));
    let b = pixels(&run("11", "b.png"));
    let c = pixels(&run("12", "c.png"));
    assert_eq!(a, b);
    assert_ne!(a, c);
}

#[test]
fn num_images_uses_consecutive_seeds() {
    let dir = tempfile::tempdir().unwrap();
    easel()
        .current_dir(dir.path())
        .args([
            "--model",
            &tiny(),
            "--steps",
            "1",
            "--seed",
            "100",
            "--num-images",
            "2",
            "-o",
            "img.png",
        ])
        .arg("a boat")
        .assert()
        .success();
    assert_eq!(files_in(dir.path()), vec!["img-100.png", "img-101.png"]);
    let p = easel::output::read_parameters(&dir.path().join("img-101.png"))
        .unwrap()
        .unwrap();
    assert!(p.contains("Seed: 101"), "{p}");
    // And image 101 is exactly what a single run with seed 101 makes.
    easel()
        .current_dir(dir.path())
        .args([
            "--model",
            &tiny(),
            "--steps",
            "1",
            "--seed",
            "101",
            "-o",
            "single.png",
        ])
        .arg("a boat")
        .assert()
        .success();
    assert_eq!(
        pixels(&dir.path().join("img-101.png")),
        pixels(&dir.path().join("single.png"))
    );
}

#[test]
fn random_seed_is_printed_and_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("r.png");
    let assert = easel()
        .args(["--model", &tiny(), "--steps", "1", "-o"])
        .arg(&out)
        .arg("x")
        .assert()
        .success();
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    let seed: u64 = stderr
        .split("(seed ")
        .nth(1)
        .unwrap()
        .split(',')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let p = easel::output::read_parameters(&out).unwrap().unwrap();
    assert!(p.contains(&format!("Seed: {seed},")), "{p}");
}

/// Bad input: one `error:` line, non-zero exit, no file written.
fn fails_cleanly(args: &[&str], needle: &str) {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("never.png");
    let assert = easel()
        .args(args)
        .arg("-o")
        .arg(&out)
        .arg("a prompt")
        .assert()
        .failure();
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert!(
        errors[0].contains(needle),
        "expected {needle:?} in {stderr}"
    );
    assert!(
        files_in(dir.path()).is_empty(),
        "left files: {:?}",
        files_in(dir.path())
    );
}

#[test]
fn bad_sizes_and_steps_are_refused() {
    let m = tiny();
    fails_cleanly(
        &["--model", &m, "--width", "33"],
        "width must be a positive multiple of 8",
    );
    fails_cleanly(
        &["--model", &m, "--height", "0"],
        "height must be a positive multiple of 8",
    );
    fails_cleanly(&["--model", &m, "--steps", "0"], "steps must be at least 1");
    fails_cleanly(
        &["--model", &m, "--steps", "5000"],
        "steps must be at most 1000",
    );
    fails_cleanly(&["--model", &m, "--guidance", "nan"], "guidance");
    fails_cleanly(&["--model", &m, "--scheduler", "fancy"], "valid schedulers");
    fails_cleanly(&["--model", &m, "--device", "tpu"], "invalid device");
    fails_cleanly(&["--model", &m, "--dtype", "f64"], "invalid dtype");
}

#[test]
fn unwritable_output_fails_before_work() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("no/such/dir/x.png");
    easel()
        .args(["--model", &tiny(), "--steps", "1", "-o"])
        .arg(&out)
        .arg("x")
        .assert()
        .failure()
        .stderr(predicate::str::contains("does not exist"));
}

#[test]
fn existing_output_needs_overwrite() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    std::fs::write(&out, b"keep me").unwrap();
    easel()
        .args(["--model", &tiny(), "--steps", "1", "-o"])
        .arg(&out)
        .arg("x")
        .assert()
        .failure()
        .stderr(predicate::str::contains("--overwrite"));
    assert_eq!(std::fs::read(&out).unwrap(), b"keep me");
    easel()
        .args(["--model", &tiny(), "--steps", "1", "--overwrite", "-o"])
        .arg(&out)
        .arg("x")
        .assert()
        .success();
    assert!(image::open(&out).is_ok());
}

/// A copy of tiny-a whose files a test may break.
fn broken_copy(edit: impl FnOnce(&Path)) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&common::model_dir("tiny-a"), dir.path());
    edit(dir.path());
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.path().is_dir() {
            copy_dir(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), target).unwrap();
        }
    }
}

#[test]
fn broken_models_give_clear_errors() {
    let truncated = broken_copy(|d| {
        let p = d.join("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() / 2]).unwrap();
    });
    fails_cleanly(&["--model", truncated.path().to_str().unwrap()], "unet");

    let garbage = broken_copy(|d| {
        std::fs::write(
            d.join("vae/diffusion_pytorch_model.safetensors"),
            b"not a safetensors file",
        )
        .unwrap()
    });
    fails_cleanly(&["--model", garbage.path().to_str().unwrap()], "vae");

    let missing =
        broken_copy(|d| std::fs::remove_file(d.join("text_encoder/model.safetensors")).unwrap());
    fails_cleanly(
        &["--model", missing.path().to_str().unwrap()],
        "text_encoder/model.safetensors is missing",
    );

    let bad_json =
        broken_copy(|d| std::fs::write(d.join("unet/config.json"), b"{ not json").unwrap());
    fails_cleanly(
        &["--model", bad_json.path().to_str().unwrap()],
        "invalid config",
    );

    let sdxl = broken_copy(|d| {
        let p = d.join("unet/config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["addition_embed_type"] = "text_time".into();
        std::fs::write(&p, v.to_string()).unwrap();
    });
    fails_cleanly(&["--model", sdxl.path().to_str().unwrap()], "SDXL");

    // Weights that do not fit the config: the VAE's channels changed in config.json.
    let mismatched = broken_copy(|d| {
        let p = d.join("vae/config.json");
        let mut v: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        v["block_out_channels"] = serde_json::json!([32, 32]);
        std::fs::write(&p, v.to_string()).unwrap();
    });
    fails_cleanly(
        &["--model", mismatched.path().to_str().unwrap()],
        "shape mismatch",
    );

    fails_cleanly(&["--model", "./no-such-model-folder"], "does not exist");
}

#[test]
fn no_network_and_no_cache_explains_what_to_do() {
    let home = tempfile::tempdir().unwrap();
    let assert = easel()
        .env("HF_HOME", home.path())
        .env_remove("HF_HUB_CACHE")
        .args(["--steps", "1", "-o"])
        .arg(home.path().join("x.png"))
        .arg("a landscape")
        .assert()
        .failure();
    let stderr = String::from_utf8(assert.get_output().stderr.clone()).unwrap();
    for needle in [
        "CompVis/stable-diffusion-v1-4",
        "--model",
        "tests/fixtures/tiny-a",
        "HF_HOME",
    ] {
        assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
    }
}

#[test]
fn unreachable_hub_fails_fast_with_the_same_advice() {
    let home = tempfile::tempdir().unwrap();
    let mut cmd = easel();
    cmd.env_remove("HF_HUB_OFFLINE")
        .env("HF_HOME", home.path())
        .env("HF_ENDPOINT", "http://127.0.0.1:9")
        .timeout(std::time::Duration::from_secs(60))
        .args(["--steps", "1", "-o"])
        .arg(home.path().join("x.png"))
        .arg("a landscape");
    cmd.assert()
        .failure()
        .stderr(predicate::str::contains("--model <folder>"));
}

#[test]
fn help_shows_examples_and_schedulers_are_listed() {
    easel().arg("--help").assert().success().stdout(
        predicate::str::contains("Examples:").and(predicate::str::contains("--negative-prompt")),
    );
    easel().arg("--list-schedulers").assert().success().stdout(
        predicate::str::contains("dpm++2m-karras").and(predicate::str::contains("Euler a")),
    );
}

#[test]
fn long_prompts_are_truncated_with_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a very detailed painting of a castle ".repeat(20);
    easel()
        .args(["--model", &tiny(), "--steps", "1", "-o"])
        .arg(dir.path().join("x.png"))
        .arg(prompt)
        .assert()
        .success()
        .stderr(predicate::str::contains("warning:").and(predicate::str::contains("ignored")));
}

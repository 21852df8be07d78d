//! The model builders ask for exactly the tensors (names and shapes) of the real SD v1.4
//! files, built from the real configs, without allocating the 4 GB of weights: a
//! shape-only backend hands out zero-strided tensors and records each request.

mod common;

use candle_core::DType;
use easel::config::{read_json, TextEncoderConfig, UNetConfig, VaeConfig};
use easel::text::ClipTextModel;
use easel::unet::UNet2DConditionModel;
use easel::weights::ShapeOnlyBackend;
use std::collections::{BTreeMap, HashMap};

fn manifest(component: &str) -> HashMap<String, Vec<usize>> {
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixtures().join("sd-v1-4-manifest.json")).unwrap(),
    )
    .unwrap();
    let c = &m[component];
    let tensors: HashMap<String, Vec<usize>> =
        serde_json::from_value(c["tensors"].clone()).unwrap();
    assert_eq!(tensors.len() as u64, c["num_tensors"].as_u64().unwrap());
    tensors
}

fn assert_exact(
    component: &str,
    requested: BTreeMap<String, Vec<usize>>,
    want: &HashMap<String, Vec<usize>>,
) {
    let missing: Vec<_> = want
        .keys()
        .filter(|k| !requested.contains_key(*k))
        .collect();
    assert!(
        missing.is_empty(),
        "{component}: never asked for {} tensors, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    for (name, shape) in &requested {
        assert_eq!(Some(shape), want.get(name), "{component}: {name}");
    }
    println!(
        "{component}: {} tensors, all requested with their shapes",
        requested.len()
    );
}

fn config_path(component: &str) -> std::path::PathBuf {
    common::fixtures()
        .join("sd-v1-4")
        .join(component)
        .join("config.json")
}

#[test]
fn unet_asks_for_exactly_the_sd14_tensors() {
    let want = manifest("unet");
    assert_eq!(want.len(), 686, "SD v1.4 UNet has 686 tensors");
    let cfg: UNetConfig = read_json(&config_path("unet")).unwrap();
    let backend = ShapeOnlyBackend::new(want.clone());
    UNet2DConditionModel::new(
        backend.var_builder(DType::F32),
        cfg.in_channels,
        cfg.out_channels,
        false,
        cfg.to_candle().unwrap(),
    )
    .unwrap();
    assert_exact("unet", backend.requested(), &want);
}

#[test]
fn vae_asks_for_exactly_the_sd14_tensors() {
    let want = manifest("vae");
    let cfg: VaeConfig = read_json(&config_path("vae")).unwrap();
    let backend = ShapeOnlyBackend::new(want.clone());
    easel::unet::vae::AutoEncoderKL::new(
        backend.var_builder(DType::F32),
        cfg.in_channels,
        cfg.out_channels,
        cfg.to_candle().unwrap(),
    )
    .unwrap();
    assert_exact("vae", backend.requested(), &want);
    assert_eq!(cfg.scale_factor(), 8);
}

#[test]
fn text_encoder_asks_for_exactly_the_sd14_tensors() {
    let want = manifest("text_encoder");
    assert!(want.keys().all(|k| k.starts_with("text_model.")));
    let cfg: TextEncoderConfig = read_json(&config_path("text_encoder")).unwrap();
    let backend = ShapeOnlyBackend::new(want.clone());
    ClipTextModel::new(backend.var_builder(DType::F32), &cfg).unwrap();
    assert_exact("text_encoder", backend.requested(), &want);
    // transformers 5 writes the same tensors without the prefix: accept that layout too.
    let bare: HashMap<String, Vec<usize>> = want
        .iter()
        .map(|(k, v)| (k.trim_start_matches("text_model.").to_string(), v.clone()))
        .collect();
    let backend = ShapeOnlyBackend::new(bare.clone());
    ClipTextModel::new(backend.var_builder(DType::F32), &cfg).unwrap();
    assert_exact("text_encoder (no prefix)", backend.requested(), &bare);
}

#[test]
fn a_wrong_shape_is_a_clear_error() {
    let mut want = manifest("unet");
    want.insert("conv_in.weight".into(), vec![320, 4, 5, 5]);
    let cfg: UNetConfig = read_json(&config_path("unet")).unwrap();
    let backend = ShapeOnlyBackend::new(want);
    let err = UNet2DConditionModel::new(
        backend.var_builder(DType::F32),
        4,
        4,
        false,
        cfg.to_candle().unwrap(),
    )
    .expect_err("shape mismatch must fail");
    assert!(err.to_string().contains("conv_in.weight"), "{err}");
}

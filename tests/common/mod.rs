//! Shared helpers for the parity tests: fixture paths and reference tensors from diffusers.
#![allow(dead_code)]

use candle_core::{DType, Device, Tensor};
use easel::pipeline::Pipeline;
use easel::weights::ModelSpec;
use std::collections::HashMap;
use std::path::PathBuf;

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

pub fn model_dir(name: &str) -> PathBuf {
    fixtures().join(name)
}

pub fn load_pipeline(name: &str) -> Pipeline {
    let spec = ModelSpec {
        model: model_dir(name).to_string_lossy().into_owned(),
        revision: "main".into(),
        prefer_fp16: false,
    };
    let files = spec.resolve().expect("fixture model resolves");
    Pipeline::load(&files, &Device::Cpu, DType::F32).expect("fixture model loads")
}

pub struct Reference {
    pub tensors: HashMap<String, Tensor>,
    pub meta: serde_json::Value,
}

impl Reference {
    pub fn load(name: &str) -> Self {
        let dir = fixtures().join("reference");
        let tensors =
            candle_core::safetensors::load(dir.join(format!("{name}.safetensors")), &Device::Cpu)
                .expect("reference tensors");
        let meta = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.json"))).expect("reference json"),
        )
        .expect("json");
        Self { tensors, meta }
    }
    pub fn get(&self, key: &str) -> &Tensor {
        self.tensors
            .get(key)
            .unwrap_or_else(|| panic!("reference tensor {key} missing"))
    }
}

/// Largest absolute difference and largest |reference| (for a relative view).
pub fn max_abs_err(ours: &Tensor, reference: &Tensor) -> (f32, f32) {
    assert_eq!(ours.dims(), reference.dims(), "shapes differ");
    let o = ours
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let r = reference
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let mut err = 0f32;
    let mut scale = 0f32;
    for (a, b) in o.iter().zip(&r) {
        assert!(a.is_finite(), "non-finite output");
        err = err.max((a - b).abs());
        scale = scale.max(b.abs());
    }
    (err, scale)
}

//! TorchGenerator against reference draws from torch itself
//! (`scripts/make_rng_fixtures.py` writes the fixture; torch 2.15.0, AVX-512 CPU).

use candle_core::{Device, Tensor};
use easel::rng::{NoiseSource, TorchGenerator};
use std::collections::HashMap;

fn fixture() -> HashMap<String, Tensor> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/torch_randn.safetensors"
    );
    candle_core::safetensors::load(path, &Device::Cpu).expect("load fixture")
}

/// Distance in representable f32 steps (0 for identical bits, and for +0 vs -0).
fn ulps(a: f32, b: f32) -> u64 {
    let key = |x: f32| {
        let bits = x.to_bits() as i64;
        if bits & 0x8000_0000 != 0 {
            0x8000_0000 - bits
        } else {
            bits
        }
    };
    (key(a) - key(b)).unsigned_abs()
}

#[derive(Default)]
struct Tally {
    values: usize,
    differing: usize,
    max_ulps: u64,
}

impl Tally {
    fn compare(&mut self, name: &str, expected: &Tensor, got: Vec<f32>, shape: &[usize]) {
        assert_eq!(expected.dims(), shape, "{name}: shape");
        let expected = expected.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(expected.len(), got.len(), "{name}: length");
        for (i, (&e, &g)) in expected.iter().zip(&got).enumerate() {
            let d = ulps(e, g);
            assert!(d <= 1, "{name}[{i}]: torch {e:e} vs ours {g:e} ({d} ulps)");
            if e.to_bits() != g.to_bits() {
                self.differing += 1;
            }
            self.max_ulps = self.max_ulps.max(d);
        }
        self.values += expected.len();
    }
}

#[test]
fn randn_matches_torch_per_seed_and_shape() {
    let tensors = fixture();
    let mut tally = Tally::default();
    let mut cases = 0;
    for (name, expected) in &tensors {
        if name.starts_with("stream") {
            continue;
        }
        let rest = name.strip_prefix('s').expect("s{seed}_{dims}");
        let (seed, dims) = rest.split_once('_').expect("s{seed}_{dims}");
        let seed: u64 = seed.parse().expect("seed");
        let shape: Vec<usize> = dims.split('x').map(|d| d.parse().unwrap()).collect();
        let got = TorchGenerator::new(seed).randn(&shape);
        tally.compare(name, expected, got, &shape);
        cases += 1;
    }
    println!(
        "{cases} cases, {} values: {} not bit-identical, max {} ulp",
        tally.values, tally.differing, tally.max_ulps
    );
    assert_eq!(cases, 57, "fixture cases");
    assert!(
        tally.differing * 1000 <= tally.values,
        "too many inexact values"
    );
}

#[test]
fn consecutive_draws_continue_torch_stream() {
    let tensors = fixture();
    let mut tally = Tally::default();
    let mut g = TorchGenerator::new(42);
    for (suffix, shape) in [
        ("a", &[1usize, 4, 16, 16][..]),
        ("b", &[1, 4, 16, 16]),
        ("c", &[5]),
        ("d", &[7]),
        ("e", &[20]),
    ] {
        let name = format!("stream42_{suffix}");
        let got = g.randn(shape);
        tally.compare(&name, &tensors[&name], got, shape);
    }
    println!(
        "stream: {} values: {} not bit-identical, max {} ulp",
        tally.values, tally.differing, tally.max_ulps
    );
    assert!(
        tally.differing * 1000 <= tally.values,
        "too many inexact values"
    );
}

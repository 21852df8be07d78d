//! Hot kernels: easel's versions against the plain candle ops, at SD 1.x shapes.
//! `cargo bench --bench kernels`
use candle_core::{Device, Tensor};
use easel::kernels;

fn main() {
    divan::main();
}

fn rand(shape: &[usize]) -> Tensor {
    Tensor::randn(0f32, 1.0, shape, &Device::Cpu).unwrap()
}

/// (batch, channels, side): UNet 64², 32² and 16² levels at batch 2, VAE 128², 256² and 512²
/// levels.
const CONV: &[(usize, usize, usize)] = &[
    (2, 320, 64),
    (2, 640, 32),
    (2, 1280, 16),
    (1, 512, 128),
    (1, 256, 256),
    (1, 128, 512),
];

fn conv_layer(c: usize, winograd: bool) -> kernels::Conv2d {
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = kernels::Conv2d::new(candle_nn::Conv2d::new(rand(&[c, c, 3, 3]), None, cfg));
    let conv = conv.unwrap();
    if winograd {
        conv
    } else {
        conv.without_winograd()
    }
}

/// A layer as the UNet and VAE hold it (weights packed at load): Winograd F(4×4, 3×3) from 64
/// tiles up (all but the 16² case), the tap GEMMs below.
#[divan::bench(args = CONV, sample_count = 3, sample_size = 1)]
fn conv3x3_easel(b: divan::Bencher, &(n, c, s): &(usize, usize, usize)) {
    let (x, conv) = (rand(&[n, c, s, s]), conv_layer(c, true));
    b.bench(|| candle_core::Module::forward(&conv, &x).unwrap());
}

/// The same layer on the tap GEMMs only.
#[divan::bench(args = CONV, sample_count = 3, sample_size = 1)]
fn conv3x3_taps(b: divan::Bencher, &(n, c, s): &(usize, usize, usize)) {
    let (x, conv) = (rand(&[n, c, s, s]), conv_layer(c, false));
    b.bench(|| candle_core::Module::forward(&conv, &x).unwrap());
}

#[divan::bench(args = CONV, sample_count = 3, sample_size = 1)]
fn conv3x3_candle(b: divan::Bencher, &(n, c, s): &(usize, usize, usize)) {
    let (x, w) = (rand(&[n, c, s, s]), rand(&[c, c, 3, 3]));
    b.bench(|| x.conv2d(&w, 1, 1, 1, 1).unwrap());
}

/// bf16 weights, f32 activations, along each of the two paths (`kernels::bf16::Path`).
fn conv3x3_bf16(b: divan::Bencher, (n, c, s): (usize, usize, usize), path: kernels::bf16::Path) {
    let x = rand(&[n, c, s, s]);
    let w = rand(&[c, c, 3, 3])
        .to_dtype(candle_core::DType::BF16)
        .unwrap();
    let cfg = candle_nn::Conv2dConfig {
        padding: 1,
        ..Default::default()
    };
    let conv = kernels::Conv2d::with_path(candle_nn::Conv2d::new(w, None, cfg), path).unwrap();
    b.bench(|| candle_core::Module::forward(&conv, &x).unwrap());
}

#[divan::bench(args = CONV, sample_count = 3, sample_size = 1)]
fn conv3x3_bf16_dot(b: divan::Bencher, &shape: &(usize, usize, usize)) {
    conv3x3_bf16(b, shape, kernels::bf16::Path::Dot);
}

#[divan::bench(args = CONV, sample_count = 3, sample_size = 1)]
fn conv3x3_bf16_widen(b: divan::Bencher, &shape: &(usize, usize, usize)) {
    conv3x3_bf16(b, shape, kernels::bf16::Path::Widen);
}

#[divan::bench(args = CONV, sample_count = 5, sample_size = 1)]
fn group_norm_silu_easel(b: divan::Bencher, &(n, c, s): &(usize, usize, usize)) {
    let x = rand(&[n, c, s, s]);
    let gn = kernels::norm::GroupNorm::test_new(c, 32, &Device::Cpu).unwrap();
    b.bench(|| gn.forward_silu(&x).unwrap());
}

#[divan::bench(args = CONV, sample_count = 5, sample_size = 1)]
fn group_norm_silu_candle(b: divan::Bencher, &(n, c, s): &(usize, usize, usize)) {
    let x = rand(&[n, c, s, s]);
    let gn = kernels::norm::GroupNorm::test_new(c, 32, &Device::Cpu).unwrap();
    b.bench(|| candle_nn::ops::silu(&gn.reference(&x).unwrap()).unwrap());
}

/// (batch·heads, queries, keys, head dim): self-attention at 512² and 256², cross-attention.
const ATTN: &[(usize, usize, usize, usize)] = &[
    (16, 4096, 4096, 40),
    (16, 1024, 1024, 80),
    (16, 4096, 77, 40),
];

#[divan::bench(args = ATTN, sample_count = 3, sample_size = 1)]
fn attention_easel(b: divan::Bencher, &(bh, l, lk, d): &(usize, usize, usize, usize)) {
    let (q, k, v) = (rand(&[bh, l, d]), rand(&[bh, lk, d]), rand(&[bh, lk, d]));
    b.bench(|| kernels::attention(&q, &k, &v, 0.15).unwrap());
}

#[divan::bench(args = ATTN, sample_count = 3, sample_size = 1)]
fn attention_candle(b: divan::Bencher, &(bh, l, lk, d): &(usize, usize, usize, usize)) {
    let (q, k, v) = (rand(&[bh, l, d]), rand(&[bh, lk, d]), rand(&[bh, lk, d]));
    b.bench(|| kernels::attention::reference(&q, &k, &v, 0.15).unwrap());
}

//! Quick kernel timings: easel kernels vs the plain candle ops.
use candle_core::{Device, Result, Tensor};
use easel::kernels;
use std::time::Instant;

fn time<F: FnMut() -> Result<Tensor>>(name: &str, iters: usize, mut f: F) -> Result<f64> {
    f()?;
    let mut best = f64::INFINITY;
    for _ in 0..iters {
        let t = Instant::now();
        f()?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    println!("{name:40} {:9.2} ms", best * 1e3);
    Ok(best)
}

/// A ResNet block's two adds (time embedding, shortcut) as separate passes after the
/// convolution vs in its epilogue (`EASEL_KBENCH_EPILOGUE=1`), interleaved, best of 10.
fn epilogue(dev: &Device) -> Result<()> {
    use candle_core::{DType, Module};
    let shapes = [
        (2usize, 320usize, 64usize),
        (2, 640, 32),
        (2, 1280, 16),
        (2, 1280, 8),
        (1, 256, 256),
        (1, 128, 512),
    ];
    for &(n, c, hw) in &shapes {
        let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), dev)?;
        let w = Tensor::randn(0f32, 0.05, (c, c, 3, 3), dev)?;
        let shift = Tensor::randn(0f32, 1.0, (n, c), dev)?;
        let res = Tensor::randn(0f32, 1.0, (n, c, hw, hw), dev)?;
        for dtype in [DType::F32, DType::BF16] {
            let cfg = candle_nn::Conv2dConfig {
                padding: 1,
                ..Default::default()
            };
            let inner = candle_nn::Conv2d::new(w.to_dtype(dtype)?, None, cfg);
            let conv = kernels::Conv2d::new(inner)?;
            let (mut apart, mut fused) = (f64::INFINITY, f64::INFINITY);
            for _ in 0..10 {
                let t = Instant::now();
                let y = conv.forward(&x)?;
                let y = shift.unsqueeze(2)?.unsqueeze(3)?.broadcast_add(&y)?;
                let _z = (&res + conv.forward(&y)?)?;
                apart = apart.min(t.elapsed().as_secs_f64());
                let t = Instant::now();
                let e = kernels::Epilogue {
                    shift: Some(&shift),
                    residual: None,
                };
                let y = conv.forward_with(&x, e)?;
                let e = kernels::Epilogue {
                    shift: None,
                    residual: Some(&res),
                };
                let _z = conv.forward_with(&y, e)?;
                fused = fused.min(t.elapsed().as_secs_f64());
            }
            println!(
                "two convs + adds {n}x{c}@{hw} {dtype:?}: apart {:.2} ms, in the epilogue {:.2} ms",
                apart * 1e3,
                fused * 1e3
            );
        }
    }
    Ok(())
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    if std::env::var("EASEL_KBENCH_EPILOGUE").is_ok() {
        return epilogue(&dev);
    }
    for &(n, c, hw) in &[(2usize, 320usize, 64usize), (1, 128, 256), (1, 512, 64)] {
        let x = Tensor::randn(0f32, 1.0, (n, c, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (c, c, 3, 3), &dev)?;
        let gflop = 2.0 * (n * c * c * 9 * hw * hw) as f64 / 1e9;
        let a = time(&format!("candle conv3x3 {n}x{c}@{hw}"), 3, || {
            x.conv2d(&w, 1, 1, 1, 1)
        })?;
        let b = time(&format!("easel  conv3x3 {n}x{c}@{hw}"), 3, || {
            kernels::conv::conv2d_fast(&x, &w, None, 1)
        })?;
        println!("   {:.0} vs {:.0} GFLOP/s", gflop / a, gflop / b);
        let wb = w.to_dtype(candle_core::DType::BF16)?;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = kernels::Conv2d::new(candle_nn::Conv2d::new(wb, None, cfg))?;
        let c16 = time(&format!("easel  conv3x3 bf16 {n}x{c}@{hw}"), 3, || {
            candle_core::Module::forward(&conv, &x)
        })?;
        println!("   bf16 {:.0} GFLOP/s", gflop / c16);
        let gn = kernels::norm::GroupNorm::test_new(c, 32, &dev)?;
        time(&format!("candle groupnorm+silu {n}x{c}@{hw}"), 3, || {
            candle_nn::ops::silu(&gn.reference(&x)?)
        })?;
        time(&format!("easel  groupnorm+silu {n}x{c}@{hw}"), 3, || {
            gn.forward_silu(&x)
        })?;
    }
    for &(bh, l, lk, d) in &[
        (16usize, 4096usize, 4096usize, 40usize),
        (16, 4096, 77, 40),
        (16, 1024, 1024, 80),
    ] {
        let q = Tensor::randn(0f32, 1.0, (bh, l, d), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (bh, lk, d), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (bh, lk, d), &dev)?;
        time(&format!("candle attention {bh}x{l}x{lk}x{d}"), 2, || {
            kernels::attention::reference(&q, &k, &v, 0.15)
        })?;
        time(&format!("easel  attention {bh}x{l}x{lk}x{d}"), 2, || {
            kernels::attention(&q, &k, &v, 0.15)
        })?;
    }
    Ok(())
}

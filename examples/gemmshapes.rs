use candle_core::{Device, Tensor};
use std::time::Instant;
fn main() {
    let dev = Device::Cpu;
    // (m, k, n): UNet 64² linear shapes (batch 2 → 8192 tokens), FF chunk 1024, 32²/16²/8².
    for &(m, k, n) in &[
        (8192usize, 320usize, 320usize),
        (1024, 320, 2560),
        (1024, 1280, 320),
        (2048, 640, 640),
        (1024, 640, 5120),
        (1024, 2560, 640),
        (512, 1280, 1280),
        (512, 1280, 10240),
        (512, 5120, 1280),
        (128, 1280, 1280),
        (8192, 320, 77),
        (2048, 2048, 2048),
    ] {
        let a = Tensor::randn(0f32, 1.0, (m, k), &dev).unwrap();
        let w = Tensor::randn(0f32, 1.0, (n, k), &dev).unwrap();
        let f = || a.matmul(&w.t().unwrap()).unwrap();
        f();
        let mut best = f64::INFINITY;
        for _ in 0..5 {
            let t = Instant::now();
            f();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!(
            "{m:5}x{k:5}x{n:6}: {:7.2} ms {:5.0} GF/s",
            best * 1e3,
            2.0 * (m * k * n) as f64 / best / 1e9
        );
    }
}

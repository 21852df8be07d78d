//! Winograd F(4×4, 3×3) and F(2×2, 3×3) against the tap-GEMM convolution and candle's on the SD layer shapes
//! (the Winograd time includes transforming the weights, as every call does):
//! `cargo run --release --example wbench [filter]`.
use candle_core::{Device, Result, Tensor};
use easel::kernels::{conv, winograd};
use std::time::Instant;

fn best<F: FnMut()>(iters: usize, mut f: F) -> f64 {
    f();
    let mut b = f64::INFINITY;
    for _ in 0..iters {
        let t = Instant::now();
        f();
        b = b.min(t.elapsed().as_secs_f64());
    }
    b
}

fn main() -> Result<()> {
    let dev = Device::Cpu;
    let only: Option<String> = std::env::args().nth(1);
    for &(n, cin, cout, hw) in &[
        (2usize, 320usize, 320usize, 64usize),
        (2, 640, 640, 32),
        (2, 1280, 1280, 16),
        (2, 1280, 1280, 8),
        (1, 512, 512, 64),
        (1, 512, 512, 128),
        (1, 256, 256, 256),
        (1, 128, 128, 512),
    ] {
        let name = format!("{n}x{cin}->{cout}@{hw}");
        if only.as_ref().is_some_and(|o| !name.contains(o.as_str())) {
            continue;
        }
        let x = Tensor::randn(0f32, 1.0, (n, cin, hw, hw), &dev)?;
        let w = Tensor::randn(0f32, 0.1, (cout, cin, 3, 3), &dev)?;
        let gflop = 2.0 * (n * cin * cout * 9 * hw * hw) as f64 / 1e9;
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let layer =
            conv::Conv2d::new(candle_nn::Conv2d::new(w.clone(), None, cfg))?.without_winograd();
        let taps = best(2, || {
            candle_core::Module::forward(&layer, &x).unwrap();
        });
        let cand = best(2, || {
            x.conv2d(&w, 1, 1, 1, 1).unwrap();
        });
        println!(
            "{name:22} candle(im2col) {:8.1} ms ({:4.0} GF/s)",
            cand * 1e3,
            gflop / cand
        );
        let tm = w
            .permute((2, 3, 0, 1))
            .unwrap()
            .flatten_all()?
            .to_vec1::<f32>()?;
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let dims = (n, cin, hw, hw);
        let wino = |tile| {
            best(2, || {
                winograd::conv3x3(&xs, dims, winograd::Taps::F32(&tm), cout, None, tile);
            })
        };
        let (wg, wg2) = (wino(winograd::Tile::F4), wino(winograd::Tile::F2));
        let wb = w.to_dtype(candle_core::DType::BF16)?;
        let lb = conv::Conv2d::new(candle_nn::Conv2d::new(wb.clone(), None, cfg))?;
        let lbt = conv::Conv2d::new(candle_nn::Conv2d::new(wb, None, cfg))?.without_winograd();
        let b_auto = best(2, || {
            candle_core::Module::forward(&lb, &x).unwrap();
        });
        let b_taps = best(2, || {
            candle_core::Module::forward(&lbt, &x).unwrap();
        });
        let tm16: Vec<half::bf16> = tm.iter().map(|&v| half::bf16::from_f32(v)).collect();
        let b_wino = best(2, || {
            let taps = winograd::Taps::Bf16(&tm16);
            winograd::conv3x3(&xs, dims, taps, cout, None, winograd::Tile::F4);
        });
        println!(
            "{name:22} bf16 weights: layer {:8.1} ms, taps only {:8.1} ms, winograd {:8.1} ms",
            b_auto * 1e3,
            b_taps * 1e3,
            b_wino * 1e3
        );
        println!(
            "{name:22} taps {:8.1} ms ({:4.0} GF/s)  winograd {:8.1} ms ({:4.0} eff GF/s) speedup {:.2}x  F(2,3) {:8.1} ms ({:.2}x)",
            taps * 1e3,
            gflop / taps,
            wg * 1e3,
            gflop / wg,
            taps / wg,
            wg2 * 1e3,
            taps / wg2
        );
    }
    Ok(())
}

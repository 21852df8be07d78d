//! bf16 GEMM kernels on raw pair operands: `cargo run --release --example amxbench`.
//! Prints GFLOP/s of each kernel this CPU runs on convolution- and linear-shaped products.
use easel::kernels::bf16::{self, Dims, Kernel};
use std::time::Instant;

fn main() {
    let mut kernels = vec![Kernel::Dot];
    if easel::kernels::amx::available() {
        kernels.push(Kernel::Amx);
    }
    if std::env::var("EASEL_AMXBENCH_PEAK").is_ok() {
        peak();
        return;
    }
    // (name, m, n, k pairs, parts, ldb): parts step through B like the taps of a 3×3 conv.
    if std::env::var("EASEL_AMXBENCH_LAYER").is_ok() {
        use candle_core::{Device, Module, Tensor};
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 320, 64, 64), &dev).unwrap();
        let w = Tensor::randn(0f32, 0.1, (320, 320, 3, 3), &dev).unwrap();
        let w = w.to_dtype(candle_core::DType::BF16).unwrap();
        let cfg = candle_nn::Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        let conv = easel::kernels::Conv2d::new(candle_nn::Conv2d::new(w, None, cfg))
            .unwrap()
            .without_winograd();
        let mut best = f64::INFINITY;
        for _ in 0..30 {
            let t = Instant::now();
            conv.forward(&x).unwrap();
            best = best.min(t.elapsed().as_secs_f64());
        }
        println!("bf16 conv layer 2x320@64, taps: {:.2} ms", best * 1e3);
        return;
    }
    if std::env::var("EASEL_AMXBENCH_ATTN").is_ok() {
        use candle_core::{Device, Tensor};
        let dev = Device::Cpu;
        for &(bh, l, lk, d) in &[
            (16usize, 4096usize, 4096usize, 40usize),
            (16, 4096, 77, 40),
            (16, 1024, 1024, 80),
        ] {
            let q = Tensor::randn(0f32, 1.0, (bh, l, d), &dev).unwrap();
            let k = Tensor::randn(0f32, 1.0, (bh, lk, d), &dev).unwrap();
            let v = Tensor::randn(0f32, 1.0, (bh, lk, d), &dev).unwrap();
            for (name, bf) in [("f32", false), ("bf16", true)] {
                let mut best = f64::INFINITY;
                for _ in 0..5 {
                    let t = Instant::now();
                    if bf {
                        easel::kernels::attention_bf16(&q, &k, &v, 0.15).unwrap();
                    } else {
                        easel::kernels::attention(&q, &k, &v, 0.15).unwrap();
                    }
                    best = best.min(t.elapsed().as_secs_f64());
                }
                println!("attention {bh}x{l}x{lk}x{d} {name}: {:.1} ms", best * 1e3);
            }
        }
        return;
    }
    let shapes = [
        ("conv 2x320@64 (9 taps, canvas)", 320, 8580, 160, 9, 8715),
        ("conv 2x320@64 (9 taps, aligned)", 320, 8576, 160, 9, 8720),
        ("conv 2x320@64 (1 tap, ldb=n)", 320, 8576, 160, 1, 8576),
        ("conv 2x640@32 (9 taps)", 640, 2244, 320, 9, 2315),
        ("conv 2x1280@16 (9 taps)", 1280, 612, 640, 9, 651),
        ("linear 8192x320->1280", 8192, 1280, 160, 1, 1280),
        ("linear 8192x1280->320", 8192, 320, 640, 1, 320),
        // The UNet's heaviest products at 512² (batch 2), by time spent.
        ("conv 2x1280@16 (9 taps, 1280 in)", 1280, 640, 640, 9, 651),
        ("linear 1024x320->2560 (GEGLU)", 1024, 2560, 160, 1, 2560),
        ("conv 2x640@32 (9 taps, 640 in)", 640, 2272, 320, 9, 2315),
        ("linear 512x1280->10240 (GEGLU)", 512, 10240, 640, 1, 10240),
        ("linear 2048x640->640", 2048, 640, 320, 1, 640),
        // One task (one core), its operands resident in L2: the kernel without memory.
        ("hot: one 128x256 task, 9 taps", 128, 256, 160, 9, 300),
        ("hot: one 128x256 task, 1 part", 128, 256, 640, 1, 256),
    ];
    for (name, m, n, k, parts, ldb) in shapes {
        let a: Vec<u32> = (0..parts * m * k)
            .map(|i| 0x3f80_3f80 ^ (i as u32 & 0x007f_007f))
            .collect();
        let blen = k * ldb + 2 * ldb + 3;
        let mut b = vec![0u32; blen];
        if std::env::var("EASEL_AMXBENCH_THP").is_ok() {
            const HUGE: usize = 2 << 20;
            let start = (b.as_ptr() as usize).next_multiple_of(HUGE);
            let end = (b.as_ptr() as usize + blen * 4) / HUGE * HUGE;
            if end > start {
                // SAFETY: advice on pages inside b's own allocation.
                unsafe {
                    libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE)
                };
            }
        }
        for (i, x) in b.iter_mut().enumerate() {
            *x = 0x3f80_3f80 ^ (i as u32 & 0x007f_007f);
        }
        let offs: Vec<(usize, usize)> = (0..parts)
            .map(|t| {
                (
                    t * m * k,
                    match (parts, name.contains("aligned")) {
                        (9, false) => (t / 3) * 66 + t % 3,
                        (9, true) => (t / 3) * 80 + (t % 3) * 16,
                        _ => 0,
                    },
                )
            })
            .collect();
        let mut c = vec![0f32; m * n];
        let d = Dims {
            m,
            n,
            k,
            lda: k,
            ldb,
            ldc: n,
        };
        let gflop = 2.0 * (m * n * 2 * k * parts) as f64 / 1e9;
        if !easel::kernels::amx::available() {
            for &kern in &kernels {
                let best = (0..12)
                    .map(|_| {
                        let t = Instant::now();
                        // SAFETY: offsets stay inside a/b by construction.
                        unsafe { bf16::gemm_with(kern, d, &offs, &a, &b, c.as_mut_ptr()) };
                        t.elapsed().as_secs_f64()
                    })
                    .fold(f64::INFINITY, f64::min);
                println!(
                    "{name:34} {kern:?}: {:7.2} ms {:6.0} GFLOP/s",
                    best * 1e3,
                    gflop / best
                );
            }
            continue;
        }
        // The whole-tile part of the product with its operands row-major (as the layers hold
        // them) and with the weights packed as tile panels (A for a convolution, B for a
        // linear layer; for linear layers also both), timed round-robin so that this machine's
        // swings (2× over seconds) fall on every variant alike.
        use easel::kernels::amx::{self, Operand};
        let (m32, n32) = (m / 32 * 32, n / 32 * 32);
        let d32 = Dims {
            m: m32,
            n: n32,
            ..d
        };
        type Variant = (
            &'static str,
            Vec<u32>,
            Operand,
            Vec<u32>,
            Operand,
            Vec<(usize, usize)>,
        );
        let rows: Variant = (
            "rows",
            a.clone(),
            Operand::a_rows(k),
            b.clone(),
            Operand::b_rows(ldb),
            offs.clone(),
        );
        let variants: Vec<Variant> = if parts == 1 {
            let bp = amx::pack_b_panels(k, n32, |q, j| b[q * ldb + j]);
            let ap = amx::pack_a_panels(m32, k, |i, q| a[i * k + q]);
            vec![
                rows,
                (
                    "B panels",
                    a.clone(),
                    Operand::a_rows(k),
                    bp.clone(),
                    Operand::panels(k),
                    vec![(0, 0)],
                ),
                (
                    "A+B panels",
                    ap,
                    Operand::panels(k),
                    bp,
                    Operand::panels(k),
                    vec![(0, 0)],
                ),
            ]
        } else {
            let mut ap = Vec::new();
            for t in 0..parts {
                ap.extend(amx::pack_a_panels(m32, k, |i, q| a[t * m * k + i * k + q]));
            }
            let offs2: Vec<_> = offs
                .iter()
                .enumerate()
                .map(|(t, &(_, bo))| (t * m32 * k, bo))
                .collect();
            vec![
                rows,
                (
                    "A panels",
                    ap,
                    Operand::panels(k),
                    b.clone(),
                    Operand::b_rows(ldb),
                    offs2,
                ),
            ]
        };
        let mut best = vec![f64::INFINITY; variants.len()];
        for _ in 0..15 {
            for (v, (_, av, oa, bv, ob, o)) in variants.iter().enumerate() {
                let t = Instant::now();
                // SAFETY: the operands cover the whole-tile part of the product.
                unsafe {
                    amx::gemm_on(
                        d32,
                        o,
                        (av.as_ptr(), *oa),
                        (bv.as_ptr(), *ob),
                        c.as_mut_ptr(),
                        true,
                        false,
                    )
                };
                best[v] = best[v].min(t.elapsed().as_secs_f64());
            }
        }
        let gf = 2.0 * (m32 * n32 * 2 * k * parts) as f64 / 1e9;
        for (v, (vname, ..)) in variants.iter().enumerate() {
            println!(
                "{name:34} {vname:>10}: {:7.2} ms {:6.0} GFLOP/s",
                best[v] * 1e3,
                gf / best[v]
            );
        }
    }
}

/// What the tiles deliver right now on one core (`EASEL_AMXBENCH_PEAK=1`): 4 independent
/// `tdpbf16ps` chains on registers only, 40 ms a sample, 25 samples. On the 2-vCPU VMs this
/// project is measured on the rate swings about 3× within seconds (the AMX unit or its power
/// budget is shared with the host's other tenants), which is why every comparison here is
/// made round-robin or interleaved.
fn peak() {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::asm;
        if !easel::kernels::amx::available() {
            println!("no AMX here");
            return;
        }
        #[repr(C, align(64))]
        struct Cfg([u8; 64]);
        let mut cfg = Cfg([0; 64]);
        cfg.0[0] = 1;
        for t in 0..8 {
            cfg.0[16 + 2 * t] = 64;
            cfg.0[48 + t] = 16;
        }
        let tile = vec![0x3f80_3f80u32; 256];
        let mut rates = vec![];
        // SAFETY: AMX was granted (available); every tile loads 1 KiB from `tile`.
        unsafe {
            asm!("ldtilecfg [{}]", in(reg) cfg.0.as_ptr());
            asm!(
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "tileloadd tmm4, [{p} + {s}*1]", "tileloadd tmm5, [{p} + {s}*1]",
                "tileloadd tmm6, [{p} + {s}*1]", "tileloadd tmm7, [{p} + {s}*1]",
                p = in(reg) tile.as_ptr(), s = in(reg) 64usize,
            );
            for _ in 0..25 {
                let (t, mut n) = (Instant::now(), 0u64);
                while t.elapsed().as_secs_f64() < 0.04 {
                    for _ in 0..1000 {
                        asm!(
                            "tdpbf16ps tmm0, tmm4, tmm6",
                            "tdpbf16ps tmm1, tmm4, tmm7",
                            "tdpbf16ps tmm2, tmm5, tmm6",
                            "tdpbf16ps tmm3, tmm5, tmm7",
                            options(nostack, nomem)
                        );
                    }
                    n += 4000;
                }
                rates.push(n as f64 * 16384.0 / t.elapsed().as_secs_f64() / 1e9);
            }
            asm!("tilerelease");
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "tdpbf16ps on registers, one core, 25 × 40 ms: min {:.0} / median {:.0} / max {:.0} GFLOP/s",
            rates[0], rates[12], rates[24]
        );
    }
}

/// The whole bf16 layer around the product (`EASEL_AMXBENCH_LAYER=1`): pairing the input,
/// bias, crop.
#[allow(dead_code)]
fn layer() {}

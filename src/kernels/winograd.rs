//! 3×3 convolution (stride 1, padding 1) by Winograd's minimal filtering F(4×4, 3×3) (Lavin &
//! Gray, 2016), and F(2×2, 3×3) where fewer, smaller tiles fit (see [`pays`]). A 4×4 output tile needs a 6×6 input patch; in the transformed domain the
//! convolution becomes 36 independent products, one per point of the 6×6 grid, and summed over
//! input channels those are 36 GEMMs (`cout × cin` · `cin × tiles`). That is 36 multiplies per
//! 16 outputs per channel pair instead of 144: the GEMM work of a 3×3 convolution drops 4×,
//! which is most of the VAE decoder's work and the UNet's 64² and 32² levels.
//!
//! The tiles are processed in chunks of whole tile rows, one rayon task per chunk, so the
//! transformed input and output of a chunk (36 × channels × ~256 tiles) stay a few MB whatever
//! the image size — the VAE's 512² layers never hold a 36/16× copy of their input. The input
//! and output transforms run on rows of tiles at once (tile columns split into four phases),
//! so they vectorise; the weights are transformed per call from the tap-major weights (linear
//! in the taps, a few ms for 512 × 512 channels).
//!
//! The points 0, ±1, ±2 keep the transforms' constants small: the f32 error is a few times a
//! direct convolution's (tested against candle's convolution below and in the parity tests).
use super::conv::Adds;
use super::simd::dispatch;
use super::SendPtr;
use rayon::prelude::*;
use std::sync::Mutex;

/// Points of the transformed grid along one side, and in all.
const A: usize = 6;
const P: usize = A * A;
/// Tiles per chunk aimed at: the GEMMs' `n`.
const CHUNK_TILES: usize = 256;

/// The two tile sizes: F(4×4, 3×3) (6×6 transformed tiles, 36 GEMMs, 4× fewer multiplies)
/// and F(2×2, 3×3) (4×4, 16 GEMMs, 2.25× fewer): the smaller one transforms 16/9 of the
/// weights per call instead of 36/9, which is what pays on the weight-heavy 16² level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tile {
    F4,
    F2,
}

impl Tile {
    /// Output tile side.
    fn m(self) -> usize {
        match self {
            Tile::F4 => 4,
            Tile::F2 => 2,
        }
    }

    /// Points of the transformed tile.
    fn points(self) -> usize {
        (self.m() + 2) * (self.m() + 2)
    }
}

/// The Winograd variant worth using for an `n × h × w` input, if any: there must be enough
/// tiles for the smaller GEMMs to repay transforming the weights on every call. Measured (2
/// cores, per call incl. the weight transform, `examples/wbench.rs`): F(4,3) on 2×640²
/// channels at 32² (128 tiles) 1.76× the speed of the tap GEMMs, on 2×1280² at 16² (32
/// tiles) 0.99×, at 8² 0.35×; F(2,3) on 2×1280² at 16² (128 of its tiles) 1.35× (F(4,3) there 0.97×).
/// `EASEL_WINOGRAD=0` turns both off (to compare).
pub fn pays(n: usize, h: usize, w: usize) -> Option<Tile> {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if !*ON.get_or_init(|| std::env::var("EASEL_WINOGRAD").map_or(true, |v| v != "0")) {
        return None;
    }
    let tiles = |m: usize| n * h.div_ceil(m) * w.div_ceil(m);
    if tiles(4) >= 64 {
        Some(Tile::F4)
    } else if tiles(2) >= 128 {
        Some(Tile::F2)
    } else {
        None
    }
}

/// Most bytes of Winograd-domain weights held at once: wider layers are done in blocks of
/// output channels (the input transform is repeated per block; it is cheap next to the GEMMs
/// on those weight-heavy layers). 36 × 1920 × 640 f32 (the UNet's widest 32² layer) would be
/// 177 MB.
pub(crate) const U_CAP_BYTES: usize = 64 << 20;

/// The Winograd-domain weight buffer, kept between calls: allocating it fresh made the kernel
/// fault in (zero) tens of MB per call, which cost more than transforming into it (measured
/// on 640 × 640 channels: 18.3 → 5.3 ms). Freed by [`release_scratch`].
static U_POOL: Mutex<Vec<f32>> = Mutex::new(Vec::new());

/// Frees the kept weight buffer (when a model is released).
pub fn release_scratch() {
    if let Ok(mut v) = U_POOL.lock() {
        *v = Vec::new();
    }
}

/// A layer's 3×3 weights, tap-major (`9 × cout × cin`, tap `ky·3 + kx`), as stored.
#[derive(Clone, Copy)]
pub enum Taps<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    /// bf16 pairs along `cin` (`9 × cout × ceil(cin/2)`), low half the even channel.
    Pairs(&'a [u32]),
}

impl Taps<'_> {
    /// Tap `t`'s elements `e0..e0 + dst.len()` (index `co·cin + ci`) as f32.
    fn read(&self, cout: usize, cin: usize, t: usize, e0: usize, dst: &mut [f32]) {
        let size = cout * cin;
        match self {
            Taps::F32(w) => dst.copy_from_slice(&w[t * size + e0..][..dst.len()]),
            Taps::Bf16(w) => {
                for (d, s) in dst.iter_mut().zip(&w[t * size + e0..]) {
                    *d = s.to_f32();
                }
            }
            Taps::Pairs(w) => {
                // Row by row of `cin` (a division per element was most of the bf16 weight
                // transform, which runs on every call).
                let cp = cin.div_ceil(2);
                let (mut e, mut j) = (e0, 0);
                while j < dst.len() {
                    let (co, ci) = (e / cin, e % cin);
                    let n = (cin - ci).min(dst.len() - j);
                    let row = &w[(t * cout + co) * cp..][..cp];
                    for (c, d) in (ci..ci + n).zip(&mut dst[j..j + n]) {
                        let pair = row[c / 2];
                        *d = f32::from_bits(if c % 2 == 0 {
                            pair << 16
                        } else {
                            pair & 0xFFFF_0000
                        });
                    }
                    (e, j) = (e + n, j + n);
                }
            }
        }
    }
}

/// Winograd-domain weights of output channels `rows` (`U_p = G·g·Gᵀ` at point `p`), into `u`
/// (`36 × rows.len() × cin`).
fn transform_weights_into(
    taps: Taps,
    cout: usize,
    cin: usize,
    rows: std::ops::Range<usize>,
    u: &mut [f32],
    tile: Tile,
) {
    let size = rows.len() * cin;
    let base = rows.start * cin;
    let np = tile.points();
    assert!(u.len() >= np * size, "winograd: weight buffer size");
    let out = SendPtr(u.as_mut_ptr());
    // Fixed-size blocks (the last one zero-padded) so the loops below vectorise; each task
    // reuses its two block buffers (this runs on every call, inside the denoising loop).
    let init = || (vec![0f32; 9 * WL], vec![0f32; (P + 18) * WL]);
    (0..size.div_ceil(WL))
        .into_par_iter()
        .for_each_init(init, |(g, local), b| {
            let out = &out;
            let (e0, e1) = (b * WL, ((b + 1) * WL).min(size));
            let len = e1 - e0;
            if len < WL {
                g.fill(0.0);
            }
            for (t, d) in g.chunks_exact_mut(WL).enumerate() {
                taps.read(cout, cin, t, base + e0, &mut d[..len]);
            }
            match tile {
                Tile::F4 => weights_block(g, local),
                Tile::F2 => weights_block2(g, local),
            }
            for (p, src) in local.chunks_exact(WL).take(np).enumerate() {
                // SAFETY: block `b` writes elements e0..e1 of each point's matrix, disjoint from
                // every other block, inside `u` (at least np · size long).
                unsafe {
                    std::ptr::copy_nonoverlapping(src.as_ptr(), out.0.add(p * size + e0), len);
                }
            }
        });
}

/// Weight elements per block of [`transform_weights_into`].
const WL: usize = 256;

/// `G·f` along one axis: 3 taps → 6 points.
#[inline(always)]
fn g_side(f0: f32, f1: f32, f2: f32) -> [f32; A] {
    [
        f0 * 0.25,
        (f0 + f1 + f2) * (-1.0 / 6.0),
        (f0 - f1 + f2) * (-1.0 / 6.0),
        f0 * (1.0 / 24.0) + f1 * (1.0 / 12.0) + f2 * (1.0 / 6.0),
        f0 * (1.0 / 24.0) - f1 * (1.0 / 12.0) + f2 * (1.0 / 6.0),
        f2,
    ]
}

/// `G·g·Gᵀ` for a block of WL weights: `g` holds 9 taps × WL elements, `out` gets `N²`
/// points × WL, then `3N` × WL of scratch; `side` is `G·f` along one axis (3 taps → N points).
#[inline(always)]
fn weights_block_with<const N: usize>(
    g: &[f32],
    out: &mut [f32],
    side: impl Fn(f32, f32, f32) -> [f32; N],
) {
    let (out, h) = out.split_at_mut(N * N * WL);
    let g = &g[..9 * WL];
    // Down the rows (ky) first: h[xi][kx].
    for kx in 0..3 {
        for e in 0..WL {
            let c = side(g[kx * WL + e], g[(3 + kx) * WL + e], g[(6 + kx) * WL + e]);
            for xi in 0..N {
                h[(xi * 3 + kx) * WL + e] = c[xi];
            }
        }
    }
    for xi in 0..N {
        for e in 0..WL {
            let hx = |kx: usize| h[(xi * 3 + kx) * WL + e];
            let r = side(hx(0), hx(1), hx(2));
            for nu in 0..N {
                out[(xi * N + nu) * WL + e] = r[nu];
            }
        }
    }
}

/// `G·f` for F(2,3): 3 taps → 4 points.
#[inline(always)]
fn g_side2(f0: f32, f1: f32, f2: f32) -> [f32; 4] {
    [f0, (f0 + f1 + f2) * 0.5, (f0 - f1 + f2) * 0.5, f2]
}

dispatch! {
    /// F(4,3) weights of one block (36 points).
    fn weights_block(g: &[f32], out: &mut [f32]) {
        weights_block_with::<A>(g, out, g_side)
    }
}

dispatch! {
    /// F(2,3) weights of one block (16 points).
    fn weights_block2(g: &[f32], out: &mut [f32]) {
        weights_block_with::<4>(g, out, g_side2)
    }
}

/// Tile-grid geometry of one call.
#[derive(Clone, Copy)]
struct Grid {
    tile: Tile,
    h: usize,
    w: usize,
    /// Tile rows per image and tiles per tile row.
    th: usize,
    tw: usize,
}

/// `conv3x3(x, padding 1) + bias` for `x` (n, cin, h, w) contiguous; returns (n, cout, h, w).
pub fn conv3x3(
    x: &[f32],
    dims: (usize, usize, usize, usize),
    taps: Taps,
    cout: usize,
    bias: Option<&[f32]>,
    tile: Tile,
) -> Vec<f32> {
    conv3x3_capped(
        x,
        dims,
        taps,
        cout,
        bias,
        tile,
        U_CAP_BYTES,
        Adds::default(),
    )
}

/// [`conv3x3`] with the Winograd-domain weights capped at `cap_bytes` and an epilogue's terms
/// added to each output row as it is written.
#[allow(clippy::too_many_arguments)]
pub(crate) fn conv3x3_capped(
    x: &[f32],
    (n, cin, h, w): (usize, usize, usize, usize),
    taps: Taps,
    cout: usize,
    bias: Option<&[f32]>,
    tile: Tile,
    cap_bytes: usize,
    adds: Adds,
) -> Vec<f32> {
    assert_eq!(x.len(), n * cin * h * w, "winograd: input size");
    let m = tile.m();
    let g = Grid {
        h,
        w,
        th: h.div_ceil(m),
        tw: w.div_ceil(m),
        tile,
    };
    let np = tile.points();
    // Each chunk writes its own rows below.
    let mut out = super::par_zeroed::<f32>(n * cout * h * w);
    if out.is_empty() || cin == 0 {
        return out;
    }
    let rows = n * g.th;
    let threads = rayon::current_num_threads().max(1);
    // Whole tile rows per chunk, about CHUNK_TILES tiles, and at least one chunk per thread.
    let per = (CHUNK_TILES / g.tw).clamp(1, rows.div_ceil(threads));
    // Output channels per block of weights.
    let cb = (cap_bytes / (4 * np * cin)).clamp(1, cout);
    let mut pool = U_POOL.try_lock().ok();
    let mut own = Vec::new();
    // Another conv in flight (tests run in parallel) gets a buffer of its own.
    let u = pool.as_deref_mut().unwrap_or(&mut own);
    if u.len() < np * cb * cin {
        *u = vec![0f32; np * cb * cin];
    }
    let dst = SendPtr(out.as_mut_ptr());
    for co0 in (0..cout).step_by(cb) {
        let co = co0..(co0 + cb).min(cout);
        transform_weights_into(taps, cout, cin, co.clone(), u, tile);
        let u = &u[..np * co.len() * cin];
        (0..rows.div_ceil(per))
            .into_par_iter()
            .for_each_init(Buffers::default, |bufs, c| {
                let r = c * per..((c + 1) * per).min(rows);
                chunk(
                    x,
                    g,
                    cin,
                    u,
                    (co.clone(), cout),
                    (bias, adds),
                    r,
                    &dst,
                    bufs,
                );
            });
    }
    out
}

/// A task's transformed input and output, reused across its chunks (zero-filling fresh ones
/// showed up as memset in profiles).
#[derive(Default)]
struct Buffers {
    v: Vec<f32>,
    m: Vec<f32>,
    scratch: Vec<f32>,
}

impl Buffers {
    /// `buf` at least `len` long (contents unspecified: every user writes before reading).
    fn take(buf: &mut Vec<f32>, len: usize) -> &mut [f32] {
        if buf.len() < len {
            buf.resize(len, 0.0);
        }
        &mut buf[..len]
    }
}

/// One chunk of tile rows: transform the input, 36 (or 16) GEMMs, transform back into `out`.
#[allow(clippy::too_many_arguments)]
fn chunk(
    x: &[f32],
    g: Grid,
    cin: usize,
    u: &[f32],
    (chans, cout_all): (std::ops::Range<usize>, usize),
    (bias, adds): (Option<&[f32]>, Adds),
    rows: std::ops::Range<usize>,
    out: &SendPtr,
    bufs: &mut Buffers,
) {
    let cout = chans.len();
    let tw = g.tw;
    let tiles = rows.len() * tw;
    let plane = g.h * g.w;
    let (np, mt) = (g.tile.points(), g.tile.m());
    // V: points × cin × tiles; M: points × cout × tiles.
    let v = Buffers::take(&mut bufs.v, np * cin * tiles);
    let scratch = Buffers::take(&mut bufs.scratch, 52 * (tw + 1));
    for ci in 0..cin {
        for (k, r) in rows.clone().enumerate() {
            let (i, ty) = (r / g.th, r % g.th);
            let src = &x[(i * cin + ci) * plane..][..plane];
            let (at, stride) = (ci * tiles + k * tw, cin * tiles);
            match g.tile {
                Tile::F4 => input_row(src, g.h, g.w, ty, tw, scratch, v, at, stride),
                Tile::F2 => input_row2(src, g.h, g.w, ty, tw, scratch, v, at, stride),
            }
        }
    }
    let m = Buffers::take(&mut bufs.m, np * cout * tiles);
    for p in 0..np {
        // SAFETY: U_p is cout × cin, V_p cin × tiles and M_p cout × tiles, all row-major
        // inside their buffers; M is this task's own.
        unsafe {
            super::matmul(
                cout,
                tiles,
                cin,
                m.as_mut_ptr().add(p * cout * tiles),
                tiles,
                false,
                u.as_ptr().add(p * cout * cin),
                (cin as isize, 1),
                v.as_ptr().add(p * cin * tiles),
                (tiles as isize, 1),
                false,
            );
        }
    }
    let row = Buffers::take(&mut bufs.scratch, 44 * tw);
    for co in 0..cout {
        let oc = chans.start + co;
        let b = bias.map_or(0.0, |b| b[oc]);
        for (k, r) in rows.clone().enumerate() {
            let (i, ty) = (r / g.th, r % g.th);
            let base = (i * cout_all + oc) * plane;
            let ys = mt * ty..(mt * ty + mt).min(g.h);
            // SAFETY: output rows ys of channel oc of image i belong to tile row r and channel
            // block `chans`, which only this chunk covers; the range lies inside `out`
            // (n · cout_all · plane long).
            let dst = unsafe {
                std::slice::from_raw_parts_mut(out.0.add(base + ys.start * g.w), ys.len() * g.w)
            };
            let (at, stride) = (co * tiles + k * tw, cout * tiles);
            match g.tile {
                Tile::F4 => output_row(m, at, stride, tw, g.w, b, row, dst),
                Tile::F2 => output_row2(m, at, stride, tw, g.w, b, row, dst),
            }
            adds.apply(i, oc, cout_all, plane, ys.start * g.w, dst);
        }
    }
}

dispatch! {
    /// Transforms tile row `ty` of one channel plane (`h × w`) into `v`: point `p`'s `tw` tiles
    /// land at `v[p·stride + at ..][..tw]`.
    #[allow(clippy::too_many_arguments)]
    fn input_row(
        src: &[f32],
        h: usize,
        w: usize,
        ty: usize,
        tw: usize,
        scratch: &mut [f32],
        v: &mut [f32],
        at: usize,
        stride: usize
    ) {
        let s = tw + 1;
        let (pad, rest) = scratch.split_at_mut(4 * s);
        // a[i][m][t] = row (4ty − 1 + i), column 4t + m − 1: the patch rows split by phase.
        let (a, rest) = rest.split_at_mut(6 * 4 * s);
        let (z, _) = rest.split_at_mut(6 * 4 * s);
        for (i, ai) in a.chunks_exact_mut(4 * s).enumerate() {
            load_phases::<4>(src, h, w, (4 * ty + i) as isize - 1, pad, ai);
        }
        // Bᵀ down the columns: z[j][m] = Σ_i Bᵀ[j][i] · a[i][m].
        let n = 4 * s;
        let (r0, r1, r2, r3, r4, r5) = (
            &a[..n],
            &a[n..2 * n],
            &a[2 * n..3 * n],
            &a[3 * n..4 * n],
            &a[4 * n..5 * n],
            &a[5 * n..6 * n],
        );
        for e in 0..n {
            let (d0, d1, d2, d3, d4, d5) = (r0[e], r1[e], r2[e], r3[e], r4[e], r5[e]);
            let b = bt(d0, d1, d2, d3, d4, d5);
            for j in 0..6 {
                z[j * n + e] = b[j];
            }
        }
        // Bᵀ along the rows, over the phases: columns 4t+m−1 for m = 0..5 are a_m[t] for m < 4,
        // a_0[t+1] and a_1[t+1].
        for j in 0..6 {
            let zj = &z[j * n..(j + 1) * n];
            let (p0, p1, p2, p3) = (&zj[..s], &zj[s..2 * s], &zj[2 * s..3 * s], &zj[3 * s..]);
            for t in 0..tw {
                let b = bt(p0[t], p1[t], p2[t], p3[t], p0[t + 1], p1[t + 1]);
                for k in 0..6 {
                    v[(j * 6 + k) * stride + at + t] = b[k];
                }
            }
        }
    }
}

dispatch! {
    /// [`input_row`] for F(2,3): tile row `ty` covers input rows 2ty − 1 .. 2ty + 3, tile `t`
    /// columns 2t − 1 .. 2t + 3, split into two phases.
    #[allow(clippy::too_many_arguments)]
    fn input_row2(
        src: &[f32],
        h: usize,
        w: usize,
        ty: usize,
        tw: usize,
        scratch: &mut [f32],
        v: &mut [f32],
        at: usize,
        stride: usize
    ) {
        let s = tw + 1;
        let n = 2 * s;
        let (pad, rest) = scratch.split_at_mut(n);
        let (a, rest) = rest.split_at_mut(4 * n);
        let (z, _) = rest.split_at_mut(4 * n);
        for (i, ai) in a.chunks_exact_mut(n).enumerate() {
            load_phases::<2>(src, h, w, (2 * ty + i) as isize - 1, pad, ai);
        }
        // Bᵀ down the columns, then along the rows over the phases (columns 2t−1+c are
        // a_0[t], a_1[t], a_0[t+1], a_1[t+1]).
        for e in 0..n {
            let b = bt2(a[e], a[n + e], a[2 * n + e], a[3 * n + e]);
            for j in 0..4 {
                z[j * n + e] = b[j];
            }
        }
        for j in 0..4 {
            let (p0, p1) = z[j * n..(j + 1) * n].split_at(s);
            for t in 0..tw {
                let b = bt2(p0[t], p1[t], p0[t + 1], p1[t + 1]);
                for k in 0..4 {
                    v[(j * 4 + k) * stride + at + t] = b[k];
                }
            }
        }
    }
}

dispatch! {
    /// [`output_row`] for F(2,3): `dst` holds the (up to 2) output rows.
    #[allow(clippy::too_many_arguments)]
    fn output_row2(
        m: &[f32],
        at0: usize,
        stride: usize,
        tw: usize,
        w: usize,
        bias: f32,
        scratch: &mut [f32],
        dst: &mut [f32]
    ) {
        let (o, rest) = scratch.split_at_mut(4 * tw);
        let (line, rest) = rest.split_at_mut(2 * tw);
        let s = &mut rest[..8 * tw];
        for xi in 0..4 {
            let mp = |nu: usize| &m[(xi * 4 + nu) * stride + at0..][..tw];
            let (q0, q1, q2, q3) = (mp(0), mp(1), mp(2), mp(3));
            for t in 0..tw {
                let r = at2(q0[t], q1[t], q2[t], q3[t]);
                for k in 0..2 {
                    s[(xi * 2 + k) * tw + t] = r[k];
                }
            }
        }
        for e in 0..2 * tw {
            let r = at2(s[e], s[2 * tw + e], s[4 * tw + e], s[6 * tw + e]);
            for y in 0..2 {
                o[y * 2 * tw + e] = r[y] + bias;
            }
        }
        interleave::<2>(o, tw, w, line, dst);
    }
}

/// Input row `y` of a channel plane (rows outside `0..h` are the zero padding), split by
/// column phase for an `M`-wide tile: `a[m·s + t]` is column `M·t + m − 1`, with
/// `s = pad.len() / M` (`pad` is scratch; `a` is `M × s`).
#[inline(always)]
fn load_phases<const M: usize>(
    src: &[f32],
    h: usize,
    w: usize,
    y: isize,
    pad: &mut [f32],
    a: &mut [f32],
) {
    pad.fill(0.0);
    if y >= 0 && (y as usize) < h {
        let y = y as usize;
        pad[1..1 + w].copy_from_slice(&src[y * w..(y + 1) * w]);
    }
    let s = pad.len() / M;
    let mut it = a.chunks_exact_mut(s);
    let mut phases: [&mut [f32]; M] = std::array::from_fn(|_| it.next().unwrap());
    for (t, q) in pad.chunks_exact(M).enumerate() {
        for (m, p) in phases.iter_mut().enumerate() {
            p[t] = q[m];
        }
    }
}

/// Writes output rows from phase-split values: row `y`, column `M·t + k` of `dst` (rows `w`
/// wide) is `o[(y·M + k)·tw + t]`; `line` is `M·tw` of scratch.
#[inline(always)]
fn interleave<const M: usize>(o: &[f32], tw: usize, w: usize, line: &mut [f32], dst: &mut [f32]) {
    for (y, d) in dst.chunks_exact_mut(w).enumerate() {
        let oy = &o[y * M * tw..(y + 1) * M * tw];
        for t in 0..tw {
            for k in 0..M {
                line[M * t + k] = oy[k * tw + t];
            }
        }
        d.copy_from_slice(&line[..w]);
    }
}

/// F(2,3)'s `Bᵀ·d` for one 4-vector.
#[inline(always)]
fn bt2(d0: f32, d1: f32, d2: f32, d3: f32) -> [f32; 4] {
    [d0 - d2, d1 + d2, d2 - d1, d1 - d3]
}

/// F(2,3)'s `Aᵀ·m` for one 4-vector.
#[inline(always)]
fn at2(m0: f32, m1: f32, m2: f32, m3: f32) -> [f32; 2] {
    [m0 + m1 + m2, m1 - m2 - m3]
}

/// `Bᵀ·d` for one 6-vector.
#[inline(always)]
fn bt(d0: f32, d1: f32, d2: f32, d3: f32, d4: f32, d5: f32) -> [f32; 6] {
    [
        4.0 * d0 - 5.0 * d2 + d4,
        -4.0 * (d1 + d2) + d3 + d4,
        4.0 * (d1 - d2) - d3 + d4,
        2.0 * (d3 - d1) - d2 + d4,
        2.0 * (d1 - d3) - d2 + d4,
        4.0 * d1 - 5.0 * d3 + d5,
    ]
}

/// `Aᵀ·m` for one 6-vector.
#[inline(always)]
fn at(m0: f32, m1: f32, m2: f32, m3: f32, m4: f32, m5: f32) -> [f32; 4] {
    let (s12, d12, s34, d34) = (m1 + m2, m1 - m2, m3 + m4, m3 - m4);
    [
        m0 + s12 + s34,
        d12 + 2.0 * d34,
        s12 + 4.0 * s34,
        d12 + 8.0 * d34 + m5,
    ]
}

dispatch! {
    /// Transforms one output channel's tile row back: point `p`'s `tw` tiles are read at
    /// `m[p·stride + at ..]`; `dst` holds the (up to 4) output rows, `w` wide.
    #[allow(clippy::too_many_arguments)]
    fn output_row(
        m: &[f32],
        at0: usize,
        stride: usize,
        tw: usize,
        w: usize,
        bias: f32,
        scratch: &mut [f32],
        dst: &mut [f32]
    ) {
        let (o, rest) = scratch.split_at_mut(16 * tw);
        let (line, rest) = rest.split_at_mut(4 * tw);
        let s = &mut rest[..24 * tw];
        // Aᵀ along the rows: s[xi][k] = Σ_nu Aᵀ[k][nu] · m[xi][nu].
        for xi in 0..6 {
            let mp = |nu: usize| &m[(xi * 6 + nu) * stride + at0..][..tw];
            let (q0, q1, q2, q3, q4, q5) = (mp(0), mp(1), mp(2), mp(3), mp(4), mp(5));
            for t in 0..tw {
                let r = at(q0[t], q1[t], q2[t], q3[t], q4[t], q5[t]);
                for k in 0..4 {
                    s[(xi * 4 + k) * tw + t] = r[k];
                }
            }
        }
        // Aᵀ down the columns: o[y][k] = Σ_xi Aᵀ[y][xi] · s[xi][k].
        for e in 0..4 * tw {
            let r = at(s[e], s[4 * tw + e], s[8 * tw + e], s[12 * tw + e], s[16 * tw + e], s[20 * tw + e]);
            for y in 0..4 {
                o[y * 4 * tw + e] = r[y] + bias;
            }
        }
        interleave::<4>(o, tw, w, line, dst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Result, Tensor};

    fn tap_major(wt: &Tensor) -> Result<Vec<f32>> {
        wt.permute((2, 3, 0, 1))?.flatten_all()?.to_vec1::<f32>()
    }

    /// Odd sizes (partial tiles on both edges, single-pixel images, one tile row), odd channel
    /// counts, batches; every case also in blocks of output channels (a tiny weight cap), and
    /// from bf16 weights in both stored forms.
    #[test]
    fn matches_candle_conv_on_odd_shapes() -> Result<()> {
        let dev = Device::Cpu;
        for &(n, cin, cout, h, w) in &[
            (1usize, 1usize, 1usize, 1usize, 1usize),
            (1, 3, 2, 4, 4),
            (2, 3, 5, 7, 9),
            (1, 13, 7, 11, 5),
            (2, 8, 16, 17, 19),
            (3, 9, 50, 8, 3),
            (1, 33, 17, 64, 40),
            (2, 16, 8, 2, 70),
        ] {
            let x = Tensor::randn(0f32, 1.0, (n, cin, h, w), &dev)?;
            let wt = Tensor::randn(0f32, 1.0, (cout, cin, 3, 3), &dev)?;
            let wt = wt.to_dtype(DType::BF16)?.to_dtype(DType::F32)?;
            let bias = Tensor::randn(0f32, 1.0, cout, &dev)?;
            let want = x
                .conv2d(&wt, 1, 1, 1, 1)?
                .broadcast_add(&bias.reshape((1, cout, 1, 1))?)?;
            let xs = x.flatten_all()?.to_vec1::<f32>()?;
            let b = bias.to_vec1::<f32>()?;
            let tm = tap_major(&wt)?;
            let bf: Vec<half::bf16> = tm.iter().map(|&v| half::bf16::from_f32(v)).collect();
            let cp = cin.div_ceil(2);
            let mut pairs = vec![0u32; 9 * cout * cp];
            for t in 0..9 {
                for co in 0..cout {
                    for q in 0..cp {
                        let at = |ci: usize| tm.get(t * cout * cin + co * cin + ci).copied();
                        let hi = if 2 * q + 1 < cin {
                            at(2 * q + 1).unwrap()
                        } else {
                            0.0
                        };
                        pairs[(t * cout + co) * cp + q] =
                            crate::kernels::bf16::pair(at(2 * q).unwrap(), hi);
                    }
                }
            }
            // Sums of 9·cin unit-variance products (|y| up to ~5·sqrt(9·cin)); F(4,3)'s f32
            // error is a few ulps of that (F(2,3)'s smaller).
            let tol = 2e-6 * (9.0 * cin as f32).sqrt() * 20.0;
            for tile in [Tile::F4, Tile::F2] {
                let np = tile.points();
                for (name, taps, cap) in [
                    ("f32", Taps::F32(&tm), U_CAP_BYTES),
                    ("f32 blocks", Taps::F32(&tm), 4 * np * cin * 3),
                    ("bf16", Taps::Bf16(&bf), U_CAP_BYTES),
                    ("pairs", Taps::Pairs(&pairs), 4 * np * cin * 2),
                ] {
                    let dims = (n, cin, h, w);
                    let got =
                        conv3x3_capped(&xs, dims, taps, cout, Some(&b), tile, cap, Adds::default());
                    let got = Tensor::from_vec(got, (n, cout, h, w), &dev)?;
                    let err = crate::kernels::max_abs_diff(&got, &want)?;
                    assert!(
                        err < tol,
                        "{tile:?} {name} {n}x{cin}x{cout}x{h}x{w}: {err} (tol {tol})"
                    );
                }
            }
        }
        Ok(())
    }
}

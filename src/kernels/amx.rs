//! bf16 GEMM on Intel AMX tiles (`tdpbf16ps`): the same operands and contract as
//! [`super::bf16::gemm`], at up to 1024 bf16 flops per cycle and core (16× an AVX-512 f32 FMA).
//!
//! Why a kernel of easel's own: the pair layout `bf16::gemm` already uses (`A` rows of pairs,
//! `B` pair rows of consecutive columns) *is* AMX's: an `A` tile is 16 rows × 16 pairs, a `B`
//! tile 16 pair rows × 16 columns, so both load straight from the padded image of a
//! convolution, every tap in place. Weights are packed once, at load, as tile panels
//! ([`pack_a_panels`], [`pack_b_panels`], [`Operand::panels`]): a row-major weight loads each of a tile's 16 rows
//! from its own page. The micro-kernel keeps a 32 × 32 block of `C` in four tiles (2 `A` × 2
//! `B` loads per 4 products) over every part and the whole of `k`. Each rayon task owns a
//! 128 × 256 block of `C` (64 × 256 when the parts make its `A` large: the 3×3 convolutions).
//!
//! Only whole tiles run here (`m`, `n` multiples of 32, `k` of 16 pairs): `bf16::gemm` sends the
//! edges to the `vdpbf16ps` kernel. Linux hands out AMX state only on request
//! (`arch_prctl(ARCH_REQ_XCOMP_PERM)`), which [`available`] makes once per process.
use super::tiled::Dims;
use rayon::prelude::*;

/// Rows and columns of one `C` block per micro-kernel call (2 × 2 tiles of 16 × 16).
pub const BLOCK: usize = 32;
/// Pairs per `tdpbf16ps` (a tile row is 64 bytes).
pub const KSTEP: usize = 16;
const NB: usize = 256;
/// The most bytes of `A` (rows × k × parts) one task should stream per pass over its columns.
const A_BLOCK_BYTES: usize = 512 << 10;

/// Whether AMX-BF16 runs here: the CPU has it, the OS saves its state, and the process was
/// granted it. Asked once; `EASEL_AMX=0` turns it off (to compare).
pub fn available() -> bool {
    static OK: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OK.get_or_init(|| std::env::var("EASEL_AMX").as_deref() != Ok("0") && request())
}

#[cfg(all(target_arch = "x86_64", target_os = "linux"))]
fn request() -> bool {
    use std::arch::x86_64::{__cpuid_count, _xgetbv};
    // CPUID.(7,0):EDX bit 22 AMX-BF16, bit 24 AMX-TILE; CPUID.1:ECX bit 27 OSXSAVE.
    let l7 = __cpuid_count(7, 0);
    let l1 = __cpuid_count(1, 0);
    if l7.edx & (1 << 22) == 0 || l7.edx & (1 << 24) == 0 || l1.ecx & (1 << 27) == 0 {
        return false;
    }
    // XCR0 bits 17 (XTILECFG) and 18 (XTILEDATA): the OS context-switches tile state.
    // SAFETY: OSXSAVE is set, so xgetbv is allowed.
    let xcr0 = unsafe { _xgetbv(0) };
    if xcr0 & (3 << 17) != 3 << 17 {
        return false;
    }
    const ARCH_REQ_XCOMP_PERM: libc::c_long = 0x1023;
    const XFEATURE_XTILEDATA: libc::c_long = 18;
    // SAFETY: a plain syscall with integer arguments.
    unsafe {
        libc::syscall(
            libc::SYS_arch_prctl,
            ARCH_REQ_XCOMP_PERM,
            XFEATURE_XTILEDATA,
        ) == 0
    }
}

#[cfg(not(all(target_arch = "x86_64", target_os = "linux")))]
fn request() -> bool {
    false
}

#[derive(Clone, Copy)]
struct Ptrs {
    a: *const u32,
    b: *const u32,
    c: *mut f32,
}
// SAFETY: tasks write disjoint blocks of `c` and only read `a`/`b`.
unsafe impl Send for Ptrs {}
unsafe impl Sync for Ptrs {}

/// Where one operand's tiles lie. A tile is 16 rows × 16 pairs of `A` or 16 pair rows × 16
/// columns of `B`; the micro-kernel loads two of them per step (rows or columns `+16`), then
/// moves 16 pairs along `k`.
///
/// Row-major operands load each tile row from its own place in memory: 16 rows a whole row
/// stride apart (the GEGLU weight's rows are 40 KiB apart, so one tile load touched 16 pages).
/// *Panels* store each run of 16 rows (of `A`) or 16 columns (of `B`) as `k/16` tiles of
/// 1 KiB back to back, so every tile load reads one contiguous KiB and the next step's tile
/// follows it: the layout weights are packed into once, at load.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Operand {
    /// Elements between rows (of `A`) / columns (of `B`) `x` and `x + 1`, in the tile grid's
    /// outer index (a multiple of 16 is always where a tile starts).
    outer: usize,
    /// Elements between pairs `p` and `p + 1` along `k` (at a tile start).
    inner: usize,
    /// Elements between two rows of one tile (`tileloadd`'s stride).
    ld: usize,
}

impl Operand {
    /// A row-major `A` (`m` rows of pairs, `lda` apart).
    pub fn a_rows(lda: usize) -> Self {
        Self {
            outer: lda,
            inner: 1,
            ld: lda,
        }
    }

    /// An `A` whose rows lie `lda` apart and whose step `s` starts `s·astep` in (a multiple of
    /// [`KSTEP`]): [`Tiles`]' callers' operands.
    fn a_steps(lda: usize, astep: usize) -> Self {
        Self {
            outer: lda,
            inner: astep / KSTEP,
            ld: lda,
        }
    }

    /// A row-major `B` (pair rows of `n` columns, `ldb` apart).
    pub fn b_rows(ldb: usize) -> Self {
        Self {
            outer: 1,
            inner: ldb,
            ld: ldb,
        }
    }

    /// Panels of 16 ([`pack_a_panels`], [`pack_b_panels`]) over `k` pairs, a multiple of
    /// [`KSTEP`].
    pub fn panels(k: usize) -> Self {
        Self {
            outer: k,
            inner: KSTEP,
            ld: KSTEP,
        }
    }

    /// Offset of the tile at outer index `x` (a multiple of 16) and pair `p` (of 16).
    #[inline(always)]
    fn at(self, x: usize, p: usize) -> usize {
        x * self.outer + p * self.inner
    }
}

/// An `A` operand (`rows × k` pairs, `src(r, q)`) as panels of 16 rows: panel `r/16` holds
/// `k/16` tiles of 16 rows × 16 pairs, each row-major, back to back.
/// `rows` must be a multiple of 16 and `k` of [`KSTEP`].
pub fn pack_a_panels(rows: usize, k: usize, src: impl Fn(usize, usize) -> u32 + Sync) -> Vec<u32> {
    debug_assert!(rows.is_multiple_of(16) && k.is_multiple_of(KSTEP));
    super::par_filled(rows * k, 16 * k, |panel, d| {
        for (i, v) in d.iter_mut().enumerate() {
            let (t, r, q) = (i / 256, i / KSTEP % 16, i % KSTEP);
            *v = src(panel * 16 + r, t * KSTEP + q);
        }
    })
}

/// A `B` operand (`k` pair rows × `cols` columns, `src(q, c)`) as panels of 16 columns: panel
/// `c/16` is its `k × 16` strip, row-major, so each 16-pair-row step is one contiguous tile.
/// `cols` must be a multiple of 16 and `k` of [`KSTEP`].
pub fn pack_b_panels(k: usize, cols: usize, src: impl Fn(usize, usize) -> u32 + Sync) -> Vec<u32> {
    debug_assert!(cols.is_multiple_of(16) && k.is_multiple_of(KSTEP));
    super::par_filled(cols * k, 16 * k, |panel, d| {
        for (i, v) in d.iter_mut().enumerate() {
            *v = src(i / 16, panel * 16 + i % 16);
        }
    })
}

/// `C += Σ_parts A_part · B_part` (see [`super::bf16::gemm`]), on whole tiles only.
///
/// # Safety
/// [`available`] returned true; `d.m`, `d.n` are multiples of [`BLOCK`] and `d.k` of [`KSTEP`];
/// for every part `(ao, bo)`, `A` rows `0..m` × pairs `0..k` from `a + ao` and `B` pair rows
/// `0..k` × columns `0..n` from `b + bo` lie inside their buffers, `C` rows `0..m` × columns
/// `0..n` inside `c`, and nothing else touches `c` meanwhile.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm(d: Dims, parts: &[(usize, usize)], a: *const u32, b: *const u32, c: *mut f32) {
    let (oa, ob) = (Operand::a_rows(d.lda), Operand::b_rows(d.ldb));
    gemm_on(d, parts, (a, oa), (b, ob), c, true, false)
}

/// [`gemm`] with each operand in its own layout, on the calling thread only when `parallel`
/// is false (callers already inside a rayon task); `overwrite` computes `C = Σ A·B`, ignoring
/// what `C` held. `d.lda` and `d.ldb` are not read (the operands carry their layouts).
///
/// # Safety
/// As for [`gemm`], with each operand's extent given by its layout.
#[cfg(target_arch = "x86_64")]
pub unsafe fn gemm_on(
    d: Dims,
    parts: &[(usize, usize)],
    (a, oa): (*const u32, Operand),
    (b, ob): (*const u32, Operand),
    c: *mut f32,
    parallel: bool,
    overwrite: bool,
) {
    debug_assert!(
        d.m.is_multiple_of(BLOCK) && d.n.is_multiple_of(BLOCK) && d.k.is_multiple_of(KSTEP)
    );
    if d.m == 0 || d.n == 0 || d.k == 0 {
        return;
    }
    let p = Ptrs { a, b, c };
    // 128 rows per task unless that task's A (every part) passes A_BLOCK_BYTES, which with
    // the B strip no longer stays in this machine's 2 MB L2: the 3×3 convolutions' 9 taps.
    // Round-robin in examples/amxbench, 128 → 64 rows: 2×1280@16² 1147 → 1288 GFLOP/s,
    // 2×640@32² 1241 → 1345, 2×320@64² 946 → 974; the linear layers keep 128 (128 × 640
    // pairs is 320 KB) where 64 measured slower or the same.
    let a_bytes = 128 * d.k * parts.len() * 4;
    let mb = if a_bytes <= A_BLOCK_BYTES { 128 } else { 64 };
    let nblocks = d.n.div_ceil(NB);
    let tasks = d.m.div_ceil(mb) * nblocks;
    // Each 32 × 32 block of C stays in the tiles over every part and the whole of k: one load
    // and one store of C per block instead of one per part and k chunk (a 3×3 convolution
    // loaded and stored C 9 times). Round-robin in examples/amxbench: the convolutions
    // 613 → 793 GFLOP/s (2×640@32²), 668 → 737–888 (2×1280@16²), 458 → 544 (2×320@64²).
    let task = move |t: usize| {
        let p = p;
        let (m0, n0) = ((t / nblocks) * mb, (t % nblocks) * NB);
        let (m1, n1) = ((m0 + mb).min(d.m), (n0 + NB).min(d.n));
        for j in (n0..n1).step_by(BLOCK) {
            for i in (m0..m1).step_by(BLOCK) {
                let cp = p.c.add(i * d.ldc + j);
                x86::c_begin(!overwrite, cp, d.ldc);
                for &(ao, bo) in parts {
                    let ap = p.a.add(ao + oa.at(i, 0));
                    let bp = p.b.add(bo + ob.at(j, 0));
                    x86::products(d.k / KSTEP, ap, oa, bp, ob);
                }
                x86::c_end(cp, d.ldc);
            }
        }
    };
    if parallel && tasks > 1 && rayon::current_num_threads() > 1 {
        (0..tasks).into_par_iter().for_each(|t| {
            x86::configure();
            task(t);
            x86::release();
        });
    } else {
        x86::configure();
        (0..tasks).for_each(task);
        x86::release();
    }
}

/// The calling thread's tiles, configured for [`Tiles::block`] while this lives (released on
/// drop). For callers that run many small blocks themselves: configuring and releasing the
/// tiles costs ~3 µs here, which the attention once paid 17 times per block of 64 queries.
#[cfg(target_arch = "x86_64")]
pub struct Tiles(std::marker::PhantomData<*const ()>);

#[cfg(target_arch = "x86_64")]
impl Tiles {
    /// # Safety
    /// [`available`] returned true.
    pub unsafe fn new() -> Tiles {
        x86::configure();
        Tiles(std::marker::PhantomData)
    }

    /// `C[0..32, 0..cols] (+)= A[0..32, 0..16·steps] · B[0..16·steps, 0..cols]`: `=` when
    /// `overwrite`; `cols` is 32 (2 × 2 tiles) or 16 (two tiles, one `B` load per step: the
    /// attention's last 16 output columns when the head dimension is an odd number of 16s,
    /// 40 → 48 instead of 64 columns, a quarter fewer products at SD's 64² level). Strides in
    /// elements; step `s` reads `A` at `a + s·astep` ([`KSTEP`] for a row-major `A`) and `B` at
    /// `b + 16·s·ldb`.
    ///
    /// # Safety
    /// Every row read or written lies inside its buffer; `steps > 0`.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub unsafe fn block(
        &self,
        overwrite: bool,
        steps: usize,
        (a, lda, astep): (*const u32, usize, usize),
        (b, ldb): (*const u32, usize),
        (c, ldc, cols): (*mut f32, usize, usize),
    ) {
        let (oa, ob) = (Operand::a_steps(lda, astep), Operand::b_rows(ldb));
        debug_assert!(cols == 32 || cols == 16);
        if cols == 16 {
            x86::narrow(!overwrite, steps, a, oa, b, ob, c, ldc);
        } else {
            x86::block(!overwrite, steps, a, oa, b, ob, c, ldc);
        }
    }
}

#[cfg(target_arch = "x86_64")]
impl Drop for Tiles {
    fn drop(&mut self) {
        // SAFETY: configured in `new` on this thread (the type is not Send).
        unsafe { x86::release() }
    }
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Operand, KSTEP};
    use std::arch::asm;
    use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};

    #[inline(always)]
    unsafe fn prefetch(p: *const u32) {
        _mm_prefetch::<_MM_HINT_T0>(p as *const i8);
    }

    /// The 16 rows of the tile at `p` (`ld` elements apart). A panel tile (`ld` = 16) is one
    /// contiguous KiB: constant offsets. Otherwise the rows are walked by adding the stride
    /// (the 64 addresses of a step, precomputed, spilled a dozen registers to the stack).
    #[inline(always)]
    unsafe fn prefetch_tile(p: *const u32, ld: usize) {
        if ld == KSTEP {
            for r in 0..16 {
                prefetch(p.add(r * KSTEP));
            }
        } else {
            let mut q = p;
            for _ in 0..16 {
                prefetch(q);
                q = q.add(ld);
            }
        }
    }

    /// Palette 1, all eight tiles 16 rows × 64 bytes: tmm0–3 the 2 × 2 `C` tiles (f32),
    /// tmm4–5 two `A` row strips, tmm6–7 two `B` column strips.
    #[repr(C, align(64))]
    struct Config([u8; 64]);

    static CONFIG: Config = {
        let mut c = [0u8; 64];
        c[0] = 1;
        let mut t = 0;
        while t < 8 {
            c[16 + 2 * t] = 64;
            c[48 + t] = 16;
            t += 1;
        }
        Config(c)
    };

    /// Loads the tile configuration on the calling thread (tile state is per thread).
    #[inline]
    pub(super) unsafe fn configure() {
        asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    /// Hands the thread's tile state back (so context switches stop saving 8 KiB of it).
    #[inline]
    pub(super) unsafe fn release() {
        asm!("tilerelease", options(nostack, nomem));
    }

    /// `C[0..32, 0..32] += A[0..32, 0..16·steps] · B[0..16·steps, 0..32]` (`=` when `load` is
    /// false); `C`'s stride in elements, each operand's tiles where its layout puts them.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) unsafe fn block(
        load: bool,
        steps: usize,
        a: *const u32,
        oa: Operand,
        b: *const u32,
        ob: Operand,
        c: *mut f32,
        ldc: usize,
    ) {
        c_begin(load, c, ldc);
        products(steps, a, oa, b, ob);
        c_end(c, ldc);
    }

    /// Loads the 2 × 2 `C` tiles (tmm0–3) from `c`, or zeroes them when `load` is false.
    #[inline]
    pub(super) unsafe fn c_begin(load: bool, c: *mut f32, ldc: usize) {
        let sc = ldc * 4;
        let (c1, c2, c3) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {sc}*1]",
                "tileloadd tmm1, [{c1} + {sc}*1]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                "tileloadd tmm3, [{c3} + {sc}*1]",
                c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) sc,
                options(nostack, readonly),
            );
        } else {
            asm!(
                "tilezero tmm0",
                "tilezero tmm1",
                "tilezero tmm2",
                "tilezero tmm3",
                options(nostack, nomem)
            );
        }
    }

    /// Stores tmm0–3 to `c`.
    #[inline]
    pub(super) unsafe fn c_end(c: *mut f32, ldc: usize) {
        let sc = ldc * 4;
        let (c1, c2, c3) = (c.add(16), c.add(16 * ldc), c.add(16 * ldc + 16));
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c1} + {sc}*1], tmm1",
            "tilestored [{c2} + {sc}*1], tmm2",
            "tilestored [{c3} + {sc}*1], tmm3",
            c0 = in(reg) c, c1 = in(reg) c1, c2 = in(reg) c2, c3 = in(reg) c3, sc = in(reg) sc,
            options(nostack),
        );
    }

    /// [`block`] on 32 × 16 of `C`: tmm0 and tmm2 (rows 0–15 and 16–31), one `B` tile (tmm6)
    /// per step.
    #[allow(clippy::too_many_arguments)]
    #[inline]
    pub(super) unsafe fn narrow(
        load: bool,
        steps: usize,
        a: *const u32,
        oa: Operand,
        b: *const u32,
        ob: Operand,
        c: *mut f32,
        ldc: usize,
    ) {
        let sc = ldc * 4;
        let c2 = c.add(16 * ldc);
        if load {
            asm!(
                "tileloadd tmm0, [{c0} + {sc}*1]",
                "tileloadd tmm2, [{c2} + {sc}*1]",
                c0 = in(reg) c, c2 = in(reg) c2, sc = in(reg) sc,
                options(nostack, readonly),
            );
        } else {
            asm!("tilezero tmm0", "tilezero tmm2", options(nostack, nomem));
        }
        let (lda, ldb) = (oa.ld, ob.ld);
        let (astep, bstep) = (KSTEP * oa.inner, KSTEP * ob.inner);
        let (sa, sb) = (lda * 4, ldb * 4);
        let (mut a0, mut a1, mut b0) = (a, a.add(16 * oa.outer), b);
        for s in 0..steps {
            if s + 1 < steps {
                prefetch_tile(a0.add(astep), lda);
                prefetch_tile(a1.add(astep), lda);
                prefetch_tile(b0.add(bstep), ldb);
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0,
                sa = in(reg) sa, sb = in(reg) sb,
                options(nostack, readonly),
            );
            a0 = a0.add(astep);
            a1 = a1.add(astep);
            b0 = b0.add(bstep);
        }
        asm!(
            "tilestored [{c0} + {sc}*1], tmm0",
            "tilestored [{c2} + {sc}*1], tmm2",
            c0 = in(reg) c, c2 = in(reg) c2, sc = in(reg) sc,
            options(nostack),
        );
    }

    /// `tmm0–3 += A[0..32, 0..16·steps] · B[0..16·steps, 0..32]`.
    #[inline]
    pub(super) unsafe fn products(
        steps: usize,
        a: *const u32,
        oa: Operand,
        b: *const u32,
        ob: Operand,
    ) {
        let (lda, ldb) = (oa.ld, ob.ld);
        let (astep, bstep) = (KSTEP * oa.inner, KSTEP * ob.inner);
        let (sa, sb) = (lda * 4, ldb * 4);
        let (mut a0, mut a1) = (a, a.add(16 * oa.outer));
        let (mut b0, mut b1) = (b, b.add(16 * ob.outer));
        for s in 0..steps {
            if s + 1 < steps {
                // The next step's A and B rows (one cache line each): a tile load that misses
                // L1 stalls the products behind it, and the hardware prefetchers do not follow
                // tile loads. Measured on the conv/linear shapes of examples/amxbench: 360 →
                // 600–1000 GFLOP/s (2 cores; this machine's timings move ±40% run to run).
                prefetch_tile(a0.add(astep), lda);
                prefetch_tile(a1.add(astep), lda);
                prefetch_tile(b0.add(bstep), ldb);
                prefetch_tile(b1.add(bstep), ldb);
            }
            asm!(
                "tileloadd tmm4, [{a0} + {sa}*1]",
                "tileloadd tmm6, [{b0} + {sb}*1]",
                "tdpbf16ps tmm0, tmm4, tmm6",
                "tileloadd tmm7, [{b1} + {sb}*1]",
                "tdpbf16ps tmm1, tmm4, tmm7",
                "tileloadd tmm5, [{a1} + {sa}*1]",
                "tdpbf16ps tmm2, tmm5, tmm6",
                "tdpbf16ps tmm3, tmm5, tmm7",
                a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b1,
                sa = in(reg) sa, sb = in(reg) sb,
                options(nostack, readonly),
            );
            a0 = a0.add(astep);
            a1 = a1.add(astep);
            b0 = b0.add(bstep);
            b1 = b1.add(bstep);
        }
    }
}

//! easel's own CPU kernels, plugged into candle through its `CustomOp` traits: attention that
//! never materialises the full score matrix, convolution as GEMMs without im2col, and a fused
//! GroupNorm(+SiLU). Each falls back to the plain candle op off the fast path (non-f32, GPU).

// Off x86-64 the AVX-512/AMX paths are compiled out, leaving some of their helpers unused
// (checked by building with `target_arch = "x86_64"` renamed away: it compiles, and warns
// only about those).
#![cfg_attr(not(target_arch = "x86_64"), allow(unused))]

pub mod act;
pub mod amx;
pub mod attention;
pub mod bf16;
pub mod clip;
pub mod conv;
pub mod linear;
pub mod norm;
pub mod simd;
pub mod tiled;
pub mod winograd;

pub use attention::{attention, attention_bf16, attention_bf16_heads, attention_heads};

use candle_core::{CpuStorage, Layout};

/// A custom op's contiguous f32 input (`op` names it in the error).
pub(crate) fn f32_slice<'a>(
    s: &'a CpuStorage,
    l: &Layout,
    op: &str,
) -> candle_core::Result<&'a [f32]> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&s.as_slice::<f32>()?[a..b]),
        None => candle_core::bail!("{op}: non-contiguous input"),
    }
}

/// An output buffer shared by rayon tasks that write disjoint parts of it.
pub(crate) struct SendPtr<T = f32>(pub *mut T);
// SAFETY: users only write disjoint ranges from different tasks.
unsafe impl<T> Send for SendPtr<T> {}
unsafe impl<T> Sync for SendPtr<T> {}

/// `C = A·B` (m×k · k×n), or `C += A·B` with `accumulate`, on gemm's f32 kernel — the one place
/// easel calls it. `C` is row-major with row stride `ldc`; `A` and `B` are (pointer, (row
/// stride, column stride)), so transposed views cost nothing. `parallel` spreads the product
/// over the rayon pool (off inside rayon tasks).
///
/// # Safety
/// Every element addressed lies inside its allocation, and nothing else accesses `C` meanwhile.
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn matmul(
    m: usize,
    n: usize,
    k: usize,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
    a: *const f32,
    (a_rs, a_cs): (isize, isize),
    b: *const f32,
    (b_rs, b_cs): (isize, isize),
    parallel: bool,
) {
    let threads = rayon::current_num_threads();
    let par = if parallel && threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    let alpha = if accumulate { 1.0 } else { 0.0 };
    gemm::gemm(
        m,
        n,
        k,
        c,
        1,
        ldc as isize,
        accumulate,
        a,
        a_cs,
        a_rs,
        b,
        b_cs,
        b_rs,
        alpha,
        1.0,
        false,
        false,
        false,
        par,
    );
}
pub use conv::{conv2d, Conv2d, Epilogue};
pub use linear::{layer_norm, linear, linear_no_bias, Linear};
pub use norm::{group_norm, GroupNorm};

/// `(a + b) / factor`, without the division pass when `factor` is 1 (every SD checkpoint):
/// candle's `affine` does not skip it, and runs it on one thread over the whole activation.
pub fn scaled_sum(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
    factor: f64,
) -> candle_core::Result<candle_core::Tensor> {
    let sum = (a + b)?;
    if factor == 1.0 {
        Ok(sum)
    } else {
        sum / factor
    }
}

/// Keeps the allocator from returning every large freed tensor to the kernel, whose pages are
/// then zeroed again on first touch. glibc: by default each activation above the (dynamic)
/// mmap threshold is a fresh mapping (measured: ~13% of a 512² UNet forward in `clear_page`).
/// mimalloc (the binary's allocator): it hands free memory back 1 s after it was freed, but
/// the up path reuses the down path's activation sizes several seconds later (`clear_page`
/// 2.75% → 0.18% of an f32 UNet forward with the delay raised). Models are still handed back
/// at once when released ([`return_freed_memory`]). Process-wide; called once when a pipeline
/// is loaded on the CPU; each setting is harmless where the other allocator is in use.
pub fn tune_allocator() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: mallopt only changes allocator tunables.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 256 << 20);
        }
        // mimalloc's `mi_option_purge_delay` (15 in mimalloc.h's `mi_option_e`; the -sys
        // crate does not name it), in milliseconds.
        const PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;
        // SAFETY: sets one of mimalloc's tunables.
        unsafe { libmimalloc_sys::mi_option_set(PURGE_DELAY, 60_000) };
    });
}

/// A buffer of `n` values built chunk by chunk across the rayon pool: chunk `i` (`chunk`
/// values, the last one shorter) is handed to `init(i, chunk)`, which writes all of it. For
/// outputs a kernel writes whole: zero-filling them first ([`par_filled`]) was a second pass
/// over every activation (`memset`, ~4% of a bf16 UNet forward; a GroupNorm at 2×320×64²
/// 3.1–3.8 → 2.5–2.7 ms without it).
///
/// # Safety
/// `init` writes every element of the chunk it is given.
pub(crate) unsafe fn par_written<T: Copy + Send + Sync>(
    n: usize,
    chunk: usize,
    init: impl Fn(usize, &mut [std::mem::MaybeUninit<T>]) + Sync + Send,
) -> Vec<T> {
    use rayon::prelude::*;
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge(v.as_ptr() as usize, n * std::mem::size_of::<T>());
    v.spare_capacity_mut()[..n]
        .par_chunks_mut(chunk.max(1))
        .enumerate()
        .for_each(|(i, c)| init(i, c));
    // SAFETY: the chunks cover 0..n and `init` wrote each (the caller's promise).
    unsafe { v.set_len(n) };
    v
}

/// [`par_written`] for a kernel that writes only part of its chunk: each chunk is zeroed
/// first, on the task that fills it, while it is in cache (a `vec![0; n]` and a parallel pass
/// would `memset` the whole activation on the calling thread with the other core idle).
pub(crate) fn par_filled<T: Copy + Default + Send + Sync>(
    n: usize,
    chunk: usize,
    init: impl Fn(usize, &mut [T]) + Sync + Send,
) -> Vec<T> {
    // SAFETY: every element is written by the fill before `init` sees it.
    unsafe {
        par_written(n, chunk, |i, c: &mut [std::mem::MaybeUninit<T>]| {
            c.fill(std::mem::MaybeUninit::new(T::default()));
            init(i, assume_written(c));
        })
    }
}

/// `c` once every element of it has been written.
///
/// # Safety
/// Every element of `c` is initialised.
#[inline(always)]
pub(crate) unsafe fn assume_written<T>(c: &mut [std::mem::MaybeUninit<T>]) -> &mut [T] {
    // SAFETY: MaybeUninit<T> has T's layout and the caller vouches that all are initialised.
    unsafe { &mut *(c as *mut [std::mem::MaybeUninit<T>] as *mut [T]) }
}

/// A per-thread work buffer of 4-byte values (u32 bf16 pairs or f32, see [`Scratch::f32`]),
/// taken from this thread's pool and given back to it when dropped. Its contents are whatever
/// the last user left (zeros when new), so it serves kernels that write every element before
/// reading it. The attention's per-task buffers (~0.8 MB at 64²) were allocated and zeroed
/// afresh for each of rayon's ~20 splits of every call: ~600 times a UNet forward.
pub(crate) struct Scratch {
    buf: Vec<u32>,
    n: usize,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Vec<u32>>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    /// Buffers up to this many values go back to the pool (per thread, at most `KEEP`).
    const MAX_KEPT: usize = 4 << 20;
    const KEEP: usize = 8;

    /// `n` values.
    pub(crate) fn take(n: usize) -> Self {
        let found = SCRATCH.with(|p| {
            let mut p = p.borrow_mut();
            let i = p.iter().position(|v| v.len() >= n)?;
            Some(p.swap_remove(i))
        });
        let buf = match found {
            Some(v) => v,
            None => vec![0; n],
        };
        Self { buf, n }
    }

    /// The buffer as f32 values.
    pub(crate) fn f32(&mut self) -> &mut [f32] {
        let v = &mut self.buf[..self.n];
        // SAFETY: u32 and f32 have the same size and alignment, and every bit pattern is an
        // f32 (a NaN at worst): the reinterpretation cannot make an invalid value.
        unsafe { std::slice::from_raw_parts_mut(v.as_mut_ptr() as *mut f32, v.len()) }
    }
}

impl std::ops::Deref for Scratch {
    type Target = [u32];
    fn deref(&self) -> &[u32] {
        &self.buf[..self.n]
    }
}

impl std::ops::DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [u32] {
        &mut self.buf[..self.n]
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.buf);
        if v.len() <= Self::MAX_KEPT {
            // `try_with`: a buffer dropped while its thread exits is simply freed.
            let _ = SCRATCH.try_with(|p| {
                let mut p = p.borrow_mut();
                if p.len() < Self::KEEP {
                    p.push(v);
                }
            });
        }
    }
}

/// A zeroed buffer of `n` values for an output whose every element a kernel writes later, in
/// its own partition: zeroed across the pool ([`par_filled`] with nothing to fill), not by a
/// single-threaded `vec![0; n]` memset with the other core idle.
pub(crate) fn par_zeroed<T: Copy + Default + Send + Sync>(n: usize) -> Vec<T> {
    par_filled(n, 1 << 16, |_, _| {})
}

/// Transparent huge pages for a large buffer at `addr` (`bytes` long): above glibc's mmap
/// threshold each such buffer is a fresh mapping faulted in 4 KiB at a time (page faults were
/// ~20% of a 512² VAE decode), one fault per 2 MiB with huge pages.
fn advise_huge(addr: usize, bytes: usize) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if bytes >= 32 << 20 {
        const HUGE: usize = 2 << 20;
        let start = addr.next_multiple_of(HUGE);
        let end = (addr + bytes) / HUGE * HUGE;
        if end > start {
            // SAFETY: advice on whole pages inside the caller's own allocation; it changes no
            // contents.
            unsafe {
                libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE);
            }
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = (addr, bytes);
}

/// Hands memory that was freed back to the kernel (glibc keeps freed heap pages of every arena
/// otherwise: a released 1.7 GB bf16 UNet stayed resident through the VAE decode, which then
/// peaked on top of it); mimalloc (the `easel` binary's allocator) is told to purge now rather
/// than after the long delay [`tune_allocator`] gives it.
pub fn return_freed_memory() {
    winograd::release_scratch();
    // SAFETY: mimalloc frees its unused memory now, whatever its purge delay.
    unsafe { libmimalloc_sys::mi_collect(true) };
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free pages.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The transpose of a 2-d tensor, materialised: f32 on the CPU in 32 × 32 blocks across the
/// rayon pool (candle's strided copy took ~0.4 s of loading the text encoder), else candle's.
pub fn transpose(w: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let (r, c) = w.dims2()?;
    transpose_batched(&w.reshape((1, r, c))?)?.reshape((c, r))
}

/// `(b, r, c)` → `(b, c, r)`, materialised; blocked and across the pool for f32 on the CPU.
/// The UNet's transformers turn every activation NCHW → (batch, pixels, channels) and back:
/// candle's strided copy does that on one thread.
pub fn transpose_batched(x: &candle_core::Tensor) -> candle_core::Result<candle_core::Tensor> {
    let (b, r, c) = x.dims3()?;
    if !x.device().is_cpu() || x.dtype() != candle_core::DType::F32 || r == 0 || c == 0 {
        return x.transpose(1, 2)?.contiguous();
    }
    let x = x.contiguous()?;
    let (storage, layout) = x.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else {
        unreachable!("checked: a CPU tensor")
    };
    let src = f32_slice(cpu, layout, "transpose")?;
    const B: usize = 32;
    // Each chunk is `jb` rows of one batch's result (`jb` divides c, so none straddles two).
    let jb = (0..=5)
        .rev()
        .map(|e| 1 << e)
        .find(|j| c % j == 0)
        .unwrap_or(1);
    // SAFETY: chunk t is rows j0..j0 + jb (all of them whole: jb divides c), every (j, i)
    // of it written below.
    let dst = unsafe {
        par_written(b * c * r, jb * r, |t, out| {
            let (bi, j0) = (t * jb / c, t * jb % c);
            let s = &src[bi * r * c..(bi + 1) * r * c];
            for i0 in (0..r).step_by(B) {
                for j in 0..jb {
                    for i in i0..(i0 + B).min(r) {
                        out[j * r + i].write(s[i * c + j0 + j]);
                    }
                }
            }
        })
    };
    drop(storage);
    candle_core::Tensor::from_vec(dst, (b, c, r), x.device())
}

/// Largest |a − b| over two same-shaped tensors (the kernels' tests compare with candle's ops).
#[cfg(test)]
pub(crate) fn max_abs_diff(
    a: &candle_core::Tensor,
    b: &candle_core::Tensor,
) -> candle_core::Result<f32> {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let d = (a - b)?
        .abs()?
        .flatten_all()?
        .to_dtype(candle_core::DType::F32)?;
    // A NaN anywhere is an infinite error (a plain max may skip it).
    Ok(d.to_vec1::<f32>()?.into_iter().fold(0f32, |m, x| {
        if x.is_nan() {
            f32::INFINITY
        } else {
            m.max(x)
        }
    }))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    #[test]
    fn transpose_matches_candle_on_odd_shapes() -> candle_core::Result<()> {
        for &(r, c) in &[(1usize, 1usize), (3, 70), (65, 33), (100, 1), (31, 97)] {
            let w = Tensor::randn(0f32, 1.0, (r, c), &Device::Cpu)?;
            let got = super::transpose(&w)?;
            let want = w.t()?.contiguous()?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(super::max_abs_diff(&got, &want)?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn batched_transpose_matches_candle_on_odd_shapes() -> candle_core::Result<()> {
        for &(b, r, c) in &[
            (2usize, 3usize, 70usize),
            (3, 65, 48),
            (2, 100, 1),
            (1, 31, 96),
            (2, 33, 40),
        ] {
            let x = Tensor::randn(0f32, 1.0, (b, r, c), &Device::Cpu)?;
            let got = super::transpose_batched(&x)?;
            let want = x.transpose(1, 2)?.contiguous()?;
            assert_eq!(got.dims(), want.dims());
            assert_eq!(super::max_abs_diff(&got, &want)?, 0.0);
        }
        Ok(())
    }
}

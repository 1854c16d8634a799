//! Elementwise ops: the host's writes and reads of spans, view copies, dropout, and the
//! widening and rounding of a convolution's 16-bit operands.

use super::Ptr;
use crate::backend::View;
use crate::elem::Elem;
use crate::input::{Crop, Normalize};
use crate::rng;
use rayon::prelude::*;

/// `data`, rounded to `T`, into the `data.len()` elements at element `at`.
pub(super) fn write<T: Elem>(a: Ptr, at: usize, data: &[f32]) {
    // SAFETY: the caller checked the span; the host's write is the only access.
    narrow(data, unsafe { a.elems_mut::<T>(at, data.len()) });
}

/// The `out.len()` elements at element `at`, widened, into `out`.
pub(super) fn read<T: Elem>(a: Ptr, at: usize, out: &mut [f32]) {
    // SAFETY: the caller checked the span; nothing writes it while the host reads.
    widen(unsafe { a.elems::<T>(at, out.len()) }, out);
}

/// `dst = src`, plane by plane.
pub(super) fn copy<T: Elem>(a: Ptr, src: View, dst: View) {
    assert_eq!((src.n, src.c, src.h, src.w), (dst.n, dst.c, dst.h, dst.w));
    (0..src.n * src.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / src.c, i % src.c);
        // SAFETY: src and dst do not overlap; dst plane i is this task's.
        unsafe {
            let s = a.elems::<T>(Ptr::plane_off(src, n, c), src.hw());
            a.elems_mut::<T>(Ptr::plane_off(dst, n, c), dst.hw()).copy_from_slice(s)
        }
    });
}

/// In-place inverted dropout with a counter-based mask (a kept value scaled in f32 and
/// rounded once).
pub(super) fn dropout<T: Elem>(a: Ptr, x: View, p: f32, key: u64) {
    let hw = x.hw();
    let keep = 1.0 / (1.0 - p);
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        let base = (i * hw) as u64;
        // SAFETY: plane i is this task's.
        let d = unsafe { a.elems_mut::<T>(Ptr::plane_off(x, n, c), hw) };
        for (j, v) in d.iter_mut().enumerate() {
            *v = if rng::uniform(key, base + j as u64) < p { T::put(0.0) } else { T::put(v.get() * keep) };
        }
    });
}

/// The input batch `dst` (dense) from stored images through their crop windows
/// ([`Crop::apply`]), an image per task.
pub(super) fn augment<T: Elem>(a: Ptr, bytes: &[u8], crops: &[Crop], norm: &Normalize, scale: usize, dst: View) {
    let (h, w) = (dst.h / scale, dst.w / scale);
    let (per, stored) = (dst.c * dst.hw(), dst.c * h * w);
    // SAFETY: the caller checked that dst is dense and inside the arena; nothing else runs.
    let out = unsafe { a.elems_mut::<T>(dst.index(), dst.numel()) };
    out.par_chunks_mut(per)
        .zip(bytes.par_chunks(stored))
        .zip(crops)
        .for_each(|((d, s), c)| c.apply(s, norm, h, w, scale, d));
}

/// `dst = src` widened to f32.
pub(super) fn widen<T: Elem>(src: &[T], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    let i = if super::matmul::simd() {
        // SAFETY: the CPU has AVX2 and F16C.
        unsafe { avx2::widen(src, dst) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let i = 0;
    dst[i..].iter_mut().zip(&src[i..]).for_each(|(d, s)| *d = s.get());
}

/// `dst = src` rounded to `T`.
pub(super) fn narrow<T: Elem>(src: &[f32], dst: &mut [T]) {
    assert_eq!(src.len(), dst.len());
    #[cfg(target_arch = "x86_64")]
    let i = if super::matmul::simd() {
        // SAFETY: the CPU has AVX2 and F16C.
        unsafe { avx2::narrow(src, dst) }
    } else {
        0
    };
    #[cfg(not(target_arch = "x86_64"))]
    let i = 0;
    dst[i..].iter_mut().zip(&src[i..]).for_each(|(d, &s)| *d = T::put(s));
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use crate::elem::Elem;
    use std::arch::x86_64::*;

    /// [`super::widen`] 8 at a time; returns how many elements it did (the tail is left).
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn widen<T: Elem>(src: &[T], dst: &mut [f32]) -> usize {
        let mut i = 0;
        while i + 8 <= src.len() {
            _mm256_storeu_ps(dst.as_mut_ptr().add(i), T::load8(src.as_ptr().add(i)));
            i += 8;
        }
        i
    }

    /// [`super::narrow`] 8 at a time; returns how many elements it did.
    #[target_feature(enable = "avx2,f16c")]
    pub(super) unsafe fn narrow<T: Elem>(src: &[f32], dst: &mut [T]) -> usize {
        let mut i = 0;
        while i + 8 <= src.len() {
            T::store8(dst.as_mut_ptr().add(i), _mm256_loadu_ps(src.as_ptr().add(i)));
            i += 8;
        }
        i
    }
}

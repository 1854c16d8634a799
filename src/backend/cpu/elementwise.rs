//! Elementwise ops: the host's writes and reads of spans, view copies, dropout.

use super::elem::Elem;
use super::Ptr;
use crate::backend::View;
use crate::rng;
use rayon::prelude::*;

/// `data`, rounded to `T`, into the `data.len()` elements at element `at`.
pub(super) fn write<T: Elem>(a: Ptr, at: usize, data: &[f32]) {
    // SAFETY: the caller checked the span; the host's write is the only access.
    let d = unsafe { a.elems_mut::<T>(at, data.len()) };
    d.iter_mut().zip(data).for_each(|(d, &v)| *d = T::put(v));
}

/// The `out.len()` elements at element `at`, widened, into `out`.
pub(super) fn read<T: Elem>(a: Ptr, at: usize, out: &mut [f32]) {
    // SAFETY: the caller checked the span; nothing writes it while the host reads.
    let s = unsafe { a.elems::<T>(at, out.len()) };
    out.iter_mut().zip(s).for_each(|(o, v)| *o = v.get());
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

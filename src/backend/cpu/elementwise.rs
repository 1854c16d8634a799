//! Elementwise ops on views: copies and dropout.

use super::Ptr;
use crate::backend::View;
use crate::rng;
use rayon::prelude::*;

/// `dst = src`, plane by plane.
pub(super) fn copy(a: Ptr, src: View, dst: View) {
    assert_eq!((src.n, src.c, src.h, src.w), (dst.n, dst.c, dst.h, dst.w));
    (0..src.n * src.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / src.c, i % src.c);
        // SAFETY: src and dst do not overlap; dst plane i is this task's.
        unsafe {
            a.get_mut(Ptr::plane_off(dst, n, c), dst.hw()).copy_from_slice(a.get(Ptr::plane_off(src, n, c), src.hw()))
        }
    });
}

/// In-place inverted dropout with a counter-based mask.
pub(super) fn dropout(a: Ptr, x: View, p: f32, key: u64) {
    let hw = x.hw();
    let keep = 1.0 / (1.0 - p);
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        let base = (i * hw) as u64;
        // SAFETY: plane i is this task's.
        let d = unsafe { a.get_mut(Ptr::plane_off(x, n, c), hw) };
        for (j, v) in d.iter_mut().enumerate() {
            *v = if rng::uniform(key, base + j as u64) < p { 0.0 } else { *v * keep };
        }
    });
}

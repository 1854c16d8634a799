//! Pooling: 2x2 average (transitions), 3x3 stride-2 max (ImageNet stem), global average (head).
//! Every op is parallel over channel planes; each task writes only its own output plane.

use super::bnvec::{self, Affine};
use super::{norm, Ptr};
use crate::backend::{Bn, View};
use crate::elem::Elem;
use rayon::prelude::*;

/// Runs `f(channel, src_plane, dst_plane)` over every (n, c) plane pair of two views in parallel.
fn planes<T: Elem>(a: Ptr, src: View, dst: View, f: impl Fn(usize, &[T], &mut [T]) + Sync) {
    assert_eq!((src.n, src.c), (dst.n, dst.c), "pool shapes {src:?} -> {dst:?}");
    (0..src.n * src.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / src.c, i % src.c);
        // SAFETY: src and dst do not overlap (trait contract); dst plane i is this task's.
        unsafe {
            let s = a.elems::<T>(Ptr::plane_off(src, n, c), src.hw());
            f(c, s, a.elems_mut::<T>(Ptr::plane_off(dst, n, c), dst.hw()))
        }
    });
}

/// 2x2 average pool, stride 2.
pub(super) fn avg2<T: Elem>(a: Ptr, x: View, y: View) {
    assert_eq!((y.h, y.w), (x.h / 2, x.w / 2));
    planes(a, x, y, |_, s: &[T], d| {
        for oy in 0..y.h {
            for ox in 0..y.w {
                let i = 2 * oy * x.w + 2 * ox;
                let sum = s[i].get() + s[i + 1].get() + s[i + x.w].get() + s[i + x.w + 1].get();
                d[oy * y.w + ox] = T::put(0.25 * sum);
            }
        }
    });
}

/// Backward of [`avg2`].
pub(super) fn avg2_backward<T: Elem>(a: Ptr, gy: View, gx: View) {
    planes(a, gy, gx, |_, s: &[T], d| {
        d.fill(T::put(0.0));
        for oy in 0..gy.h {
            for ox in 0..gy.w {
                let v = T::put(0.25 * s[oy * gy.w + ox].get());
                let i = 2 * oy * gx.w + 2 * ox;
                d[i] = v;
                d[i + 1] = v;
                d[i + gx.w] = v;
                d[i + gx.w + 1] = v;
            }
        }
    });
}

/// The values a max pool reads from one input plane: the plane itself, or with a BN-ReLU its
/// [`bnvec::bn_relu1`] values rounded to `T` (bitwise what [`norm::bn_relu`] writes),
/// computed on the fly.
#[derive(Clone, Copy)]
struct Input<'a, T> {
    x: &'a [T],
    /// The channel's BN-ReLU constants.
    pre: Option<Affine>,
}

impl<'a, T: Elem> Input<'a, T> {
    /// Plane `x` of channel `c`, through `pre`.
    fn new(a: Ptr, x: &'a [T], pre: Option<Bn>, c: usize) -> Self {
        Input { x, pre: pre.map(|bn| norm::affine(a, bn, c).0) }
    }

    #[inline]
    fn at(self, i: usize) -> f32 {
        match self.pre {
            Some(f) => T::put(bnvec::bn_relu1(self.x[i].get(), f.scale, f.shift)).get(),
            None => self.x[i].get(),
        }
    }
}

/// Index (in the input plane) of the first maximum of output (oy, ox)'s 3x3 window.
fn argmax3<T: Elem>(s: Input<T>, h: usize, w: usize, oy: usize, ox: usize) -> usize {
    let mut best = (f32::NEG_INFINITY, usize::MAX);
    for iy in (2 * oy).saturating_sub(1)..(2 * oy + 2).min(h) {
        for ix in (2 * ox).saturating_sub(1)..(2 * ox + 2).min(w) {
            let v = s.at(iy * w + ix);
            if v > best.0 || best.1 == usize::MAX || v.is_nan() {
                best = (v, iy * w + ix);
            }
        }
    }
    best.1
}

/// 3x3 max pool, stride 2, pad 1, of `pre(x)`.
pub(super) fn max3<T: Elem>(a: Ptr, x: View, pre: Option<Bn>, y: View) {
    assert_eq!((y.h, y.w), ((x.h - 1) / 2 + 1, (x.w - 1) / 2 + 1));
    planes(a, x, y, |c, s: &[T], d| {
        let s = Input::new(a, s, pre, c);
        for oy in 0..y.h {
            for ox in 0..y.w {
                d[oy * y.w + ox] = T::put(s.at(argmax3(s, x.h, x.w, oy, ox)));
            }
        }
    });
}

/// Backward of [`max3`]: routes each output gradient to its window's first maximum of `pre(x)`.
pub(super) fn max3_backward<T: Elem>(a: Ptr, x: View, pre: Option<Bn>, gy: View, gx: View) {
    assert_eq!((x.n, x.c, x.h, x.w), (gx.n, gx.c, gx.h, gx.w));
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        // SAFETY: gx plane i is this task's; x, gy and the BN's spans are read-only and do not
        // overlap gx.
        unsafe {
            let s = Input::new(a, a.elems::<T>(Ptr::plane_off(x, n, c), x.hw()), pre, c);
            let g = a.elems::<T>(Ptr::plane_off(gy, n, c), gy.hw());
            let d = a.elems_mut::<T>(Ptr::plane_off(gx, n, c), gx.hw());
            d.fill(T::put(0.0));
            for oy in 0..gy.h {
                for ox in 0..gy.w {
                    let i = argmax3(s, x.h, x.w, oy, ox);
                    d[i] = T::put(d[i].get() + g[oy * gy.w + ox].get());
                }
            }
        }
    });
}

/// Mean of each plane (n, c) into `y[n * C + c]`.
pub(super) fn global_avg<T: Elem>(a: Ptr, x: View, y: usize) {
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        // SAFETY: y[i] is this task's; x is read-only and does not overlap y.
        unsafe {
            let s = a.elems::<T>(Ptr::plane_off(x, n, c), x.hw());
            *a.at(y + i) = (s.iter().map(|&v| v.get() as f64).sum::<f64>() / x.hw() as f64) as f32;
        }
    });
}

/// Backward of [`global_avg`].
pub(super) fn global_avg_backward<T: Elem>(a: Ptr, gy: usize, gx: View) {
    (0..gx.n * gx.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / gx.c, i % gx.c);
        // SAFETY: gx plane i is this task's; gy does not overlap gx.
        unsafe {
            let v = T::put(*a.at(gy + i) / gx.hw() as f32);
            a.elems_mut::<T>(Ptr::plane_off(gx, n, c), gx.hw()).fill(v);
        }
    });
}

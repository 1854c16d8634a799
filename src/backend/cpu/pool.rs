//! Pooling: 2x2 average (transitions), 3x3 stride-2 max (ImageNet stem), global average (head).
//! Every op is parallel over channel planes; each task writes only its own output plane.

use super::bnvec::{self, Affine};
use super::{norm, Ptr};
use crate::backend::{Bn, View};
use rayon::prelude::*;

/// Runs `f(channel, src_plane, dst_plane)` over every (n, c) plane pair of two views in parallel.
fn planes(a: Ptr, src: View, dst: View, f: impl Fn(usize, &[f32], &mut [f32]) + Sync) {
    assert_eq!((src.n, src.c), (dst.n, dst.c), "pool shapes {src:?} -> {dst:?}");
    (0..src.n * src.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / src.c, i % src.c);
        // SAFETY: src and dst do not overlap (trait contract); dst plane i is this task's.
        unsafe { f(c, a.get(Ptr::plane_off(src, n, c), src.hw()), a.get_mut(Ptr::plane_off(dst, n, c), dst.hw())) }
    });
}

/// 2x2 average pool, stride 2.
pub(super) fn avg2(a: Ptr, x: View, y: View) {
    assert_eq!((y.h, y.w), (x.h / 2, x.w / 2));
    planes(a, x, y, |_, s, d| {
        for oy in 0..y.h {
            for ox in 0..y.w {
                let i = 2 * oy * x.w + 2 * ox;
                d[oy * y.w + ox] = 0.25 * (s[i] + s[i + 1] + s[i + x.w] + s[i + x.w + 1]);
            }
        }
    });
}

/// Backward of [`avg2`].
pub(super) fn avg2_backward(a: Ptr, gy: View, gx: View) {
    planes(a, gy, gx, |_, s, d| {
        d.fill(0.0);
        for oy in 0..gy.h {
            for ox in 0..gy.w {
                let v = 0.25 * s[oy * gy.w + ox];
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
/// [`bnvec::bn_relu1`] values (bitwise what [`norm::bn_relu`] writes), computed on the fly.
#[derive(Clone, Copy)]
struct Input<'a> {
    x: &'a [f32],
    /// The channel's BN-ReLU constants.
    pre: Option<Affine>,
}

impl<'a> Input<'a> {
    /// Plane `x` of channel `c`, through `pre`.
    fn new(a: Ptr, x: &'a [f32], pre: Option<Bn>, c: usize) -> Self {
        Input { x, pre: pre.map(|bn| norm::affine(a, bn, c).0) }
    }

    #[inline]
    fn at(self, i: usize) -> f32 {
        match self.pre {
            Some(f) => bnvec::bn_relu1(self.x[i], f.scale, f.shift),
            None => self.x[i],
        }
    }
}

/// Index (in the input plane) of the first maximum of output (oy, ox)'s 3x3 window.
fn argmax3(s: Input, h: usize, w: usize, oy: usize, ox: usize) -> usize {
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
pub(super) fn max3(a: Ptr, x: View, pre: Option<Bn>, y: View) {
    assert_eq!((y.h, y.w), ((x.h - 1) / 2 + 1, (x.w - 1) / 2 + 1));
    planes(a, x, y, |c, s, d| {
        let s = Input::new(a, s, pre, c);
        for oy in 0..y.h {
            for ox in 0..y.w {
                d[oy * y.w + ox] = s.at(argmax3(s, x.h, x.w, oy, ox));
            }
        }
    });
}

/// Backward of [`max3`]: routes each output gradient to its window's first maximum of `pre(x)`.
pub(super) fn max3_backward(a: Ptr, x: View, pre: Option<Bn>, gy: View, gx: View) {
    assert_eq!((x.n, x.c, x.h, x.w), (gx.n, gx.c, gx.h, gx.w));
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        // SAFETY: gx plane i is this task's; x, gy and the BN's spans are read-only and do not
        // overlap gx.
        unsafe {
            let s = Input::new(a, a.get(Ptr::plane_off(x, n, c), x.hw()), pre, c);
            let g = a.get(Ptr::plane_off(gy, n, c), gy.hw());
            let d = a.get_mut(Ptr::plane_off(gx, n, c), gx.hw());
            d.fill(0.0);
            for oy in 0..gy.h {
                for ox in 0..gy.w {
                    d[argmax3(s, x.h, x.w, oy, ox)] += g[oy * gy.w + ox];
                }
            }
        }
    });
}

/// Mean of each plane (n, c) into `y[n * C + c]`.
pub(super) fn global_avg(a: Ptr, x: View, y: usize) {
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        // SAFETY: y[i] is this task's; x is read-only and does not overlap y.
        unsafe {
            let s = a.get(Ptr::plane_off(x, n, c), x.hw());
            *a.at(y + i) = (s.iter().map(|&v| v as f64).sum::<f64>() / x.hw() as f64) as f32;
        }
    });
}

/// Backward of [`global_avg`].
pub(super) fn global_avg_backward(a: Ptr, gy: usize, gx: View) {
    (0..gx.n * gx.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / gx.c, i % gx.c);
        // SAFETY: gx plane i is this task's; gy does not overlap gx.
        unsafe {
            let v = *a.at(gy + i) / gx.hw() as f32;
            a.get_mut(Ptr::plane_off(gx, n, c), gx.hw()).fill(v);
        }
    });
}

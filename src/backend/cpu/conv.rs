//! Convolutions as GEMMs on channel slices. A 1x1 stride-1 convolution multiplies the weight
//! straight into the block buffer; other kernels go through a per-thread im2col buffer.
//! Per-thread workspace slot: `[col: cin*k*k * ho*wo | dw: cout*cin*k*k]`.

use super::{image_chunks, Ptr};
use crate::backend::{ConvShape, ConvSpec, View};
use rayon::prelude::*;

/// Floats of one thread's workspace slot for these convolutions.
pub(super) fn slot_len(convs: &[ConvShape]) -> usize {
    let col = convs
        .iter()
        .filter(|s| !is_pointwise(s.spec))
        .map(|s| s.cin * s.spec.k * s.spec.k * s.spec.out(s.h) * s.spec.out(s.w))
        .max()
        .unwrap_or(0);
    let dw = convs
        .iter()
        .map(|s| s.cout * s.cin * s.spec.k * s.spec.k)
        .max()
        .unwrap_or(0);
    col + dw
}

fn is_pointwise(s: ConvSpec) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

/// `dst[m x n] (row stride dst_rs) = [dst +] a[m x k] * b[k x n]`, any strides.
#[allow(clippy::too_many_arguments)]
unsafe fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    accumulate: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
) {
    gemm::gemm(
        m,
        n,
        k,
        dst,
        1,
        dst_rs as isize,
        accumulate,
        a,
        a_cs as isize,
        a_rs as isize,
        b,
        b_cs as isize,
        b_rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// Geometry shared by the three passes.
struct Geo {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    /// Rows of the im2col matrix: cin * k * k.
    r: usize,
    spec: ConvSpec,
}

impl Geo {
    fn new(x: View, y: View, spec: ConvSpec) -> Geo {
        let (ho, wo) = (spec.out(x.h), spec.out(x.w));
        assert_eq!((y.h, y.w, x.n), (ho, wo, y.n), "conv shapes {x:?} -> {y:?}");
        Geo {
            cin: x.c,
            cout: y.c,
            h: x.h,
            w: x.w,
            ho,
            wo,
            r: x.c * spec.k * spec.k,
            spec,
        }
    }

    fn p(&self) -> usize {
        self.ho * self.wo
    }
}

/// Fills `col` [r, ho*wo] from one image `x` [cin, h, w] (zero padding).
fn im2col(x: &[f32], col: &mut [f32], g: &Geo) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad as isize);
    let p = g.p();
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * p..][..p];
                for oy in 0..g.ho {
                    let iy = (oy * s) as isize + ky as isize - pad;
                    let out = &mut row[oy * g.wo..(oy + 1) * g.wo];
                    if iy < 0 || iy >= g.h as isize {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, o) in out.iter_mut().enumerate() {
                        let ix = (ox * s) as isize + kx as isize - pad;
                        *o = if ix >= 0 && ix < g.w as isize {
                            src[ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            }
        }
    }
}

/// Accumulates `col` [r, ho*wo] back into one image `gx` [cin, h, w] (zeroed first).
fn col2im(col: &[f32], gx: &mut [f32], g: &Geo) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad as isize);
    let p = g.p();
    gx.fill(0.0);
    for ci in 0..g.cin {
        let plane = &mut gx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * p..][..p];
                for oy in 0..g.ho {
                    let iy = (oy * s) as isize + ky as isize - pad;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, &v) in row[oy * g.wo..(oy + 1) * g.wo].iter().enumerate() {
                        let ix = (ox * s) as isize + kx as isize - pad;
                        if ix >= 0 && ix < g.w as isize {
                            dst[ix as usize] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Thread `t`'s workspace slot.
fn slot(a: Ptr, ws: (usize, usize), threads: usize, t: usize) -> Ptr {
    Ptr(a.at(ws.0 + t * (ws.1 / threads.max(1))))
}

/// `y = conv(x, w)`.
pub(super) fn forward(a: Ptr, ws: (usize, usize), threads: usize, x: View, w: usize, y: View, spec: ConvSpec) {
    let g = Geo::new(x, y, spec);
    let chunks: Vec<_> = image_chunks(x.n, threads).collect();
    chunks.into_par_iter().enumerate().for_each(|(t, range)| {
        let col = slot(a, ws, threads, t);
        for n in range {
            let yp = a.at(Ptr::plane_off(y, n, 0));
            let xo = Ptr::plane_off(x, n, 0);
            // SAFETY: each image's output planes are written by this task only; the weight and
            // input are read-only here and do not overlap the output (trait contract).
            unsafe {
                if is_pointwise(spec) {
                    gemm(
                        g.cout,
                        g.p(),
                        g.cin,
                        yp,
                        g.p(),
                        false,
                        a.at(w),
                        g.cin,
                        1,
                        a.at(xo),
                        g.p(),
                        1,
                    );
                } else {
                    let cols = col.get_mut(0, g.r * g.p());
                    im2col(a.get(xo, g.cin * g.h * g.w), cols, &g);
                    gemm(
                        g.cout,
                        g.p(),
                        g.r,
                        yp,
                        g.p(),
                        false,
                        a.at(w),
                        g.r,
                        1,
                        cols.as_ptr(),
                        g.p(),
                        1,
                    );
                }
            }
        }
    });
}

/// `gx = conv_transpose(gy, w)`.
pub(super) fn backward_data(a: Ptr, ws: (usize, usize), threads: usize, gy: View, w: usize, gx: View, spec: ConvSpec) {
    let g = Geo::new(gx, gy, spec);
    let chunks: Vec<_> = image_chunks(gy.n, threads).collect();
    chunks.into_par_iter().enumerate().for_each(|(t, range)| {
        let col = slot(a, ws, threads, t);
        for n in range {
            let gyp = a.at(Ptr::plane_off(gy, n, 0));
            let gxo = Ptr::plane_off(gx, n, 0);
            // SAFETY: as in `forward`; gx's image n is written by this task only.
            unsafe {
                if is_pointwise(spec) {
                    gemm(
                        g.cin,
                        g.p(),
                        g.cout,
                        a.at(gxo),
                        g.p(),
                        false,
                        a.at(w),
                        1,
                        g.cin,
                        gyp,
                        g.p(),
                        1,
                    );
                } else {
                    let cols = col.get_mut(0, g.r * g.p());
                    gemm(
                        g.r,
                        g.p(),
                        g.cout,
                        cols.as_mut_ptr(),
                        g.p(),
                        false,
                        a.at(w),
                        1,
                        g.r,
                        gyp,
                        g.p(),
                        1,
                    );
                    col2im(cols, a.get_mut(gxo, g.cin * g.h * g.w), &g);
                }
            }
        }
    });
}

/// `gw = sum over images of gy[n] * im2col(x[n])^T`. Each thread sums its chunk of images
/// into its own slot; the slots are then added in thread order (deterministic).
pub(super) fn backward_filter(
    a: Ptr,
    ws: (usize, usize),
    threads: usize,
    x: View,
    gy: View,
    gw: usize,
    spec: ConvSpec,
) {
    let g = Geo::new(x, gy, spec);
    let wlen = g.cout * g.r;
    let col_len = if is_pointwise(spec) { 0 } else { g.r * g.p() };
    let chunks: Vec<_> = image_chunks(x.n, threads).collect();
    let used = chunks.iter().filter(|r| !r.is_empty()).count();
    chunks.into_par_iter().enumerate().for_each(|(t, range)| {
        let col = slot(a, ws, threads, t);
        let dwp = col.at(col_len);
        for (i, n) in range.enumerate() {
            let gyp = a.at(Ptr::plane_off(gy, n, 0));
            let xo = Ptr::plane_off(x, n, 0);
            // SAFETY: the slot is this task's; x and gy are read-only.
            unsafe {
                if is_pointwise(spec) {
                    gemm(
                        g.cout,
                        g.cin,
                        g.p(),
                        dwp,
                        g.cin,
                        i > 0,
                        gyp,
                        g.p(),
                        1,
                        a.at(xo),
                        1,
                        g.p(),
                    );
                } else {
                    let cols = col.get_mut(0, col_len);
                    im2col(a.get(xo, g.cin * g.h * g.w), cols, &g);
                    gemm(
                        g.cout,
                        g.r,
                        g.p(),
                        dwp,
                        g.r,
                        i > 0,
                        gyp,
                        g.p(),
                        1,
                        cols.as_ptr(),
                        1,
                        g.p(),
                    );
                }
            }
        }
    });
    // SAFETY: gw does not overlap the workspace; the parallel section has ended.
    unsafe {
        let out = a.get_mut(gw, wlen);
        for t in 0..used {
            let part = slot(a, ws, threads, t).get(col_len, wlen);
            if t == 0 {
                out.copy_from_slice(part);
            } else {
                out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
            }
        }
    }
}

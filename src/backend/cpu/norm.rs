//! Batch norm: statistics, running-statistics update, fused BN+ReLU and its backward.
//! Sums are accumulated in f64; each channel is one rayon task (its planes stay in cache
//! between the two passes).

use super::Ptr;
use crate::backend::{Bn, View, BN_EPS};
use rayon::prelude::*;

/// `(scale, shift)` with `bn(x) = x * scale + shift`; forward and backward share this so the
/// recomputed ReLU mask is bitwise the forward one.
#[inline]
fn affine(mean: f32, var: f32, gamma: f32, beta: f32) -> (f32, f32, f32) {
    let inv_std = 1.0 / (var + BN_EPS).sqrt();
    let scale = gamma * inv_std;
    (scale, beta - mean * scale, inv_std)
}

#[inline]
fn at(a: Ptr, off: usize) -> f32 {
    // SAFETY: offsets come from the planner and are read-only in the op using them.
    unsafe { *a.at(off) }
}

/// Per-channel mean and biased variance.
pub(super) fn stats(a: Ptr, x: View, mean: usize, var: usize) {
    let hw = x.hw();
    let count = (x.n * hw) as f64;
    (0..x.c).into_par_iter().for_each(|c| {
        // SAFETY: read-only planes; each task writes its own mean[c], var[c].
        unsafe {
            let planes = || (0..x.n).map(|n| a.get(Ptr::plane_off(x, n, c), hw));
            let m = planes().map(|p| p.iter().map(|&v| v as f64).sum::<f64>()).sum::<f64>() / count;
            let v = planes().map(|p| p.iter().map(|&v| (v as f64 - m).powi(2)).sum::<f64>()).sum::<f64>() / count;
            *a.at(mean + c) = m as f32;
            *a.at(var + c) = v as f32;
        }
    });
}

/// Running statistics update (PyTorch's: unbiased variance, momentum on the new value).
#[allow(clippy::too_many_arguments)]
pub(super) fn update_running(
    arena: &mut [f32],
    mean: usize,
    var: usize,
    running_mean: usize,
    running_var: usize,
    c: usize,
    count: usize,
    momentum: f32,
) {
    let unbias = count as f32 / (count.max(2) - 1) as f32;
    for i in 0..c {
        arena[running_mean + i] = (1.0 - momentum) * arena[running_mean + i] + momentum * arena[mean + i];
        arena[running_var + i] = (1.0 - momentum) * arena[running_var + i] + momentum * arena[var + i] * unbias;
    }
}

/// `y = relu(bn(x))`.
pub(super) fn bn_relu(a: Ptr, x: View, bn: Bn, y: View) {
    let hw = x.hw();
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        let (scale, shift, _) = affine(at(a, bn.mean + c), at(a, bn.var + c), at(a, bn.gamma + c), at(a, bn.beta + c));
        // SAFETY: x and y do not overlap; each task writes its own plane of y.
        unsafe {
            let src = a.get(Ptr::plane_off(x, n, c), hw);
            let dst = a.get_mut(Ptr::plane_off(y, n, c), hw);
            for (d, &s) in dst.iter_mut().zip(src) {
                *d = (s * scale + shift).max(0.0);
            }
        }
    });
}

/// Backward of `relu(bn(x))` with batch statistics, mask recomputed from x.
#[allow(clippy::too_many_arguments)]
pub(super) fn bn_relu_backward(
    a: Ptr,
    g: View,
    x: View,
    bn: Bn,
    dgamma: usize,
    dbeta: usize,
    dx: View,
    accumulate: bool,
) {
    let hw = x.hw();
    let count = (x.n * hw) as f64;
    let in_place = dx.off == g.off;
    assert!(!(in_place && accumulate), "in-place BN backward cannot accumulate");
    (0..x.c).into_par_iter().for_each(|c| {
        let (mean, gamma) = (at(a, bn.mean + c), at(a, bn.gamma + c));
        let (scale, shift, inv_std) = affine(mean, at(a, bn.var + c), gamma, at(a, bn.beta + c));
        // SAFETY: channel c of g, x, dx belongs to this task; x does not overlap g or dx; when
        // dx is g (in place) only one mutable slice of it is made.
        unsafe {
            let (mut sg, mut sgx) = (0.0f64, 0.0f64);
            for n in 0..x.n {
                let gp = a.get(Ptr::plane_off(g, n, c), hw);
                let xp = a.get(Ptr::plane_off(x, n, c), hw);
                for (&gv, &xv) in gp.iter().zip(xp) {
                    let gv = if xv * scale + shift > 0.0 { gv } else { 0.0 };
                    sg += gv as f64;
                    sgx += (gv * (xv - mean) * inv_std) as f64;
                }
            }
            *a.at(dgamma + c) = sgx as f32;
            *a.at(dbeta + c) = sg as f32;
            let (mg, mgx) = ((sg / count) as f32, (sgx / count) as f32);
            let k = gamma * inv_std;
            let grad = |gv: f32, xv: f32| {
                let gv = if xv * scale + shift > 0.0 { gv } else { 0.0 };
                k * (gv - mg - (xv - mean) * inv_std * mgx)
            };
            for n in 0..x.n {
                let xp = a.get(Ptr::plane_off(x, n, c), hw);
                let dp = a.get_mut(Ptr::plane_off(dx, n, c), hw);
                if in_place {
                    dp.iter_mut().zip(xp).for_each(|(d, &xv)| *d = grad(*d, xv));
                } else {
                    let gp = a.get(Ptr::plane_off(g, n, c), hw);
                    if accumulate {
                        dp.iter_mut().zip(gp.iter().zip(xp)).for_each(|(d, (&gv, &xv))| *d += grad(gv, xv));
                    } else {
                        dp.iter_mut().zip(gp.iter().zip(xp)).for_each(|(d, (&gv, &xv))| *d = grad(gv, xv));
                    }
                }
            }
        }
    });
}

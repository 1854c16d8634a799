//! Batch norm: statistics, running-statistics update, fused BN+ReLU and its backward.
//! Each channel is one rayon task for the reductions (its planes stay in cache between the
//! two passes of the backward); plane loops are in [`super::bnvec`].

use super::bnvec::{self, Affine};
use super::Ptr;
use crate::backend::{Affine as Params, Bn, Moments, Span, View, BN_EPS};
use crate::elem::Elem;
use rayon::prelude::*;

/// Channel `c`'s constants; forward and backward share this, so the recomputed ReLU mask is
/// bitwise the forward one.
#[inline]
pub(super) fn affine(a: Ptr, bn: Bn, c: usize) -> (Affine, f32) {
    let at = |s: crate::backend::Span| {
        // SAFETY: the spans are checked by the op using them and read-only in it.
        unsafe { *a.at(s.index() + c) }
    };
    let (mean, gamma) = (at(bn.stats.mean), at(bn.affine.gamma));
    let inv_std = 1.0 / (at(bn.stats.var) + BN_EPS).sqrt();
    let scale = gamma * inv_std;
    (Affine { scale, shift: at(bn.affine.beta) - mean * scale, mean, inv_std }, gamma)
}

/// Per-channel mean and biased variance, in one pass: sums of x - s and (x - s)^2 with the
/// shift s = the channel's first value (keeps the subtraction well conditioned); planes are
/// summed in f32 lanes and added in f64.
pub(super) fn stats<T: Elem>(a: Ptr, x: View, out: Moments) {
    let (mean, var) = (out.mean.index(), out.var.index());
    let hw = x.hw();
    let count = (x.n * hw) as f64;
    (0..x.c).into_par_iter().for_each(|c| {
        // SAFETY: read-only planes; each task writes its own mean[c], var[c].
        unsafe {
            let shift = a.elems::<T>(Ptr::plane_off(x, 0, c), 1)[0].get();
            let (mut s1, mut s2) = (0.0f64, 0.0f64);
            for n in 0..x.n {
                let (u, v) = bnvec::moments(a.elems::<T>(Ptr::plane_off(x, n, c), hw), shift);
                s1 += u;
                s2 += v;
            }
            let m = s1 / count;
            *a.at(mean + c) = (shift as f64 + m) as f32;
            *a.at(var + c) = (s2 / count - m * m).max(0.0) as f32;
        }
    });
}

/// Running statistics update (PyTorch's: unbiased variance, momentum on the new value).
pub(super) fn update_running(arena: &mut [f32], batch: Moments, running: Moments, count: usize, momentum: f32) {
    let unbias = count as f32 / (count.max(2) - 1) as f32;
    let (mean, var) = (batch.mean.index(), batch.var.index());
    let (running_mean, running_var) = (running.mean.index(), running.var.index());
    for i in 0..batch.mean.len {
        arena[running_mean + i] = (1.0 - momentum) * arena[running_mean + i] + momentum * arena[mean + i];
        arena[running_var + i] = (1.0 - momentum) * arena[running_var + i] + momentum * arena[var + i] * unbias;
    }
}

/// `y = relu(bn(x))`.
pub(super) fn bn_relu<T: Elem>(a: Ptr, x: View, bn: Bn, y: View) {
    let hw = x.hw();
    (0..x.n * x.c).into_par_iter().for_each(|i| {
        let (n, c) = (i / x.c, i % x.c);
        // SAFETY: x and y do not overlap; each task writes its own plane of y.
        unsafe {
            let dst = a.elems_mut::<T>(Ptr::plane_off(y, n, c), hw);
            let f = affine(a, bn, c).0;
            bnvec::bn_relu(a.elems::<T>(Ptr::plane_off(x, n, c), hw), dst, f.scale, f.shift);
        }
    });
}

/// Where a BN-ReLU backward's sums go or come from: Σ g·x̂ and Σ g over the ReLU mask.
#[derive(Clone, Copy)]
pub(super) enum Sums {
    /// Computed over this batch and written to the parameters' gradients (as `gamma`, `beta`).
    Into(Params),
    /// Computed and written there, and to the `2 * c` floats at this index (the Σ g·x̂, then
    /// the Σ g), for a data-parallel job's all-reduce.
    Shared(Params, usize),
    /// Read from the `2 * c` floats at this index, laid out as [`Sums::Shared`] writes them:
    /// the sums over `count` values (a data-parallel job's whole batch).
    Given(usize, usize),
}

/// Backward of `relu(bn(x))` with batch statistics, mask recomputed from x: the sums as `sums`
/// says, then with `out` = (dx, accumulate), `dx` written or added to.
pub(super) fn bn_relu_backward<T: Elem>(a: Ptr, g: View, x: View, bn: Bn, sums: Sums, out: Option<(View, bool)>) {
    let hw = x.hw();
    let count = match sums {
        Sums::Given(_, count) => count,
        _ => x.n * hw,
    } as f64;
    let in_place = out.is_some_and(|(dx, _)| dx.off == g.off);
    assert!(!(in_place && out.is_some_and(|o| o.1)), "in-place BN backward cannot accumulate");
    (0..x.c).into_par_iter().for_each(|c| {
        let (f, gamma) = affine(a, bn, c);
        // SAFETY: channel c of g, x, dx and of the sums belongs to this task; x does not
        // overlap g or dx; when dx is g (in place) only one mutable slice of it is made.
        unsafe {
            let (sgx, sg) = match sums {
                Sums::Given(at, _) => (*a.at(at + c) as f64, *a.at(at + x.c + c) as f64),
                Sums::Into(grad) | Sums::Shared(grad, _) => {
                    let (mut sg, mut sgx) = (0.0f64, 0.0f64);
                    for n in 0..x.n {
                        let g = a.elems::<T>(Ptr::plane_off(g, n, c), hw);
                        let (u, v) = bnvec::grad_sums(g, a.elems::<T>(Ptr::plane_off(x, n, c), hw), f);
                        sg += u;
                        sgx += v;
                    }
                    *a.at(grad.gamma.index() + c) = sgx as f32;
                    *a.at(grad.beta.index() + c) = sg as f32;
                    if let Sums::Shared(_, at) = sums {
                        *a.at(at + c) = sgx as f32;
                        *a.at(at + x.c + c) = sg as f32;
                    }
                    (sgx, sg)
                }
            };
            let Some((dx, accumulate)) = out else { return };
            let k =
                bnvec::Grad { k: gamma * f.inv_std, mg: (sg / count) as f32, mgx: (sgx / count) as f32, accumulate };
            for n in 0..x.n {
                let xp = a.elems::<T>(Ptr::plane_off(x, n, c), hw);
                let dp = a.elems_mut::<T>(Ptr::plane_off(dx, n, c), hw);
                let gp = if in_place { None } else { Some(a.elems::<T>(Ptr::plane_off(g, n, c), hw)) };
                bnvec::grad(dp, gp, xp, f, k);
            }
        }
    });
}

/// A data-parallel job's batch statistics from every rank's (`Backend::bn_stats_combine`):
/// `parts` holds each rank's `c` means then `c` variances over its shard of `batch` images of
/// `hw` pixels.
pub(super) fn stats_combine(arena: &mut [f32], parts: Span, batch: usize, hw: usize, out: Moments) {
    let c = out.mean.len;
    let world = parts.len / (2 * c);
    let total = (batch * hw) as f64;
    let (p, mean, var) = (parts.index(), out.mean.index(), out.var.index());
    let weight = |r: usize| (crate::comm::shard(batch, world, r).len() * hw) as f64;
    for i in 0..c {
        let part = |r: usize, j: usize| arena[p + r * 2 * c + j * c + i] as f64;
        let m = (0..world).map(|r| weight(r) * part(r, 0)).sum::<f64>() / total;
        let v = (0..world).map(|r| weight(r) * (part(r, 1) + (part(r, 0) - m).powi(2))).sum::<f64>() / total;
        arena[mean + i] = m as f32;
        arena[var + i] = v as f32;
    }
}

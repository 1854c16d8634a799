//! Copies, dropout, the classifier (linear + softmax cross-entropy) and the SGD update.

use super::Ptr;
use crate::backend::{Sgd, View};
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

/// `y = x w^T + b` for a small classifier.
#[allow(clippy::too_many_arguments)]
pub(super) fn linear(arena: &mut [f32], x: usize, w: usize, b: usize, y: usize, n: usize, cin: usize, cout: usize) {
    for i in 0..n {
        for k in 0..cout {
            let xs = &arena[x + i * cin..][..cin];
            let ws = &arena[w + k * cin..][..cin];
            let dot: f64 = xs.iter().zip(ws).map(|(&p, &q)| p as f64 * q as f64).sum();
            arena[y + i * cout + k] = (dot + arena[b + k] as f64) as f32;
        }
    }
}

/// Backward of [`linear`]: overwrites gx [n, cin], gw [cout, cin], gb [cout].
#[allow(clippy::too_many_arguments)]
pub(super) fn linear_backward(
    arena: &mut [f32],
    x: usize,
    w: usize,
    gy: usize,
    gx: usize,
    gw: usize,
    gb: usize,
    n: usize,
    cin: usize,
    cout: usize,
) {
    for k in 0..cout {
        arena[gb + k] = (0..n).map(|i| arena[gy + i * cout + k] as f64).sum::<f64>() as f32;
        for j in 0..cin {
            let s: f64 = (0..n).map(|i| arena[gy + i * cout + k] as f64 * arena[x + i * cin + j] as f64).sum();
            arena[gw + k * cin + j] = s as f32;
        }
    }
    for i in 0..n {
        for j in 0..cin {
            let s: f64 = (0..cout).map(|k| arena[gy + i * cout + k] as f64 * arena[w + k * cin + j] as f64).sum();
            arena[gx + i * cin + j] = s as f32;
        }
    }
}

/// Mean softmax cross-entropy, top-1 correct count and dloss/dlogits.
pub(super) fn softmax_xent(
    arena: &mut [f32],
    labels: &[u32],
    logits: usize,
    n: usize,
    k: usize,
    out: usize,
    glogits: usize,
) {
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for (i, &label) in labels.iter().enumerate() {
        let z = &arena[logits + i * k..][..k];
        let label = label as usize;
        assert!(label < k, "label {label} out of range for {k} classes");
        let (arg, max) =
            z.iter().enumerate().fold((0, f32::NEG_INFINITY), |b, (j, &v)| if v > b.1 { (j, v) } else { b });
        let sum: f64 = z.iter().map(|&v| ((v - max) as f64).exp()).sum();
        loss += sum.ln() + max as f64 - z[label] as f64;
        correct += (arg == label) as usize;
        for j in 0..k {
            let p = ((arena[logits + i * k + j] - max) as f64).exp() / sum;
            arena[glogits + i * k + j] = ((p - (j == label) as u8 as f64) / n as f64) as f32;
        }
    }
    arena[out] = (loss / n as f64) as f32;
    arena[out + 1] = correct as f32;
}

/// `torch.optim.SGD` step: d = g + wd p; buf = m buf + d; d += m buf (Nesterov) or d = buf;
/// p -= lr d.
pub(super) fn sgd(a: Ptr, params: usize, grads: usize, momentum: usize, len: usize, hp: Sgd) {
    const CHUNK: usize = 1 << 14;
    (0..len.div_ceil(CHUNK)).into_par_iter().for_each(|ci| {
        let (start, l) = (ci * CHUNK, CHUNK.min(len - ci * CHUNK));
        // SAFETY: the three regions are disjoint; chunk ci is this task's.
        let (p, g, m) =
            unsafe { (a.get_mut(params + start, l), a.get(grads + start, l), a.get_mut(momentum + start, l)) };
        for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
            let d = g + hp.weight_decay * *p;
            *m = hp.momentum * *m + d;
            let step = if hp.nesterov { d + hp.momentum * *m } else { *m };
            *p -= hp.lr * step;
        }
    });
}

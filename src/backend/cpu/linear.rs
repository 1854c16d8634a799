//! The classifier's linear layer (small: [n, C] x [classes, C]).

use crate::backend::{Matrix, Span};

/// `y = x w^T + b` for a small classifier (operands checked by the caller).
pub(super) fn linear(arena: &mut [f32], x: Matrix, w: Matrix, b: Span, y: Matrix) {
    let (n, cin, cout) = (x.rows, x.cols, w.rows);
    let (x, w, b, y) = (x.data.index(), w.data.index(), b.index(), y.data.index());
    for i in 0..n {
        for k in 0..cout {
            let xs = &arena[x + i * cin..][..cin];
            let ws = &arena[w + k * cin..][..cin];
            let dot: f64 = xs.iter().zip(ws).map(|(&p, &q)| p as f64 * q as f64).sum();
            arena[y + i * cout + k] = (dot + arena[b + k] as f64) as f32;
        }
    }
}

/// Backward of [`linear`]: overwrites gx `[n, cin]`, gw `[cout, cin]`, gb `[cout]`.
pub(super) fn linear_backward(arena: &mut [f32], x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span) {
    let (n, cin, cout) = (x.rows, x.cols, w.rows);
    let (x, w, gy) = (x.data.index(), w.data.index(), gy.data.index());
    let (gx, gw, gb) = (gx.data.index(), gw.data.index(), gb.index());
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

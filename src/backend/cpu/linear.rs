//! The classifier's linear layer (small: [n, C] x [classes, C]).

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

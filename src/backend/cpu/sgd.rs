//! The SGD update and the unscaling of fp16 loss scaling over the flat parameter buffers.

use super::Ptr;
use crate::backend::Sgd;
use rayon::prelude::*;

/// In place: `g *= 1 / scale` over `len` floats at `grads`, the reciprocal taken in f64 as
/// `GradScaler` takes it. Returns whether a gradient (before unscaling) is not finite.
pub(super) fn unscale(a: Ptr, grads: usize, len: usize, scale: f32) -> bool {
    let inv = (1.0 / scale as f64) as f32;
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ci| {
            let (start, l) = (ci * CHUNK, CHUNK.min(len - ci * CHUNK));
            // SAFETY: chunk ci is this task's.
            let g = unsafe { a.get_mut(grads + start, l) };
            g.iter_mut().fold(false, |found, g| {
                let bad = !g.is_finite();
                *g *= inv;
                found | bad
            })
        })
        .reduce(|| false, |a, b| a | b)
}

/// Floats per parallel task.
const CHUNK: usize = 1 << 14;

/// `torch.optim.SGD` step: d = g + wd p; buf = m buf + d; d += m buf (Nesterov) or d = buf;
/// p -= lr d. Returns whether an updated parameter or momentum value is not finite.
pub(super) fn sgd(a: Ptr, params: usize, grads: usize, momentum: usize, len: usize, settings: Sgd) -> bool {
    // Every chunk runs (`any` would stop early): `map` then `reduce`.
    (0..len.div_ceil(CHUNK))
        .into_par_iter()
        .map(|ci| {
            let (start, l) = (ci * CHUNK, CHUNK.min(len - ci * CHUNK));
            // SAFETY: the three regions are disjoint; chunk ci is this task's.
            let (p, g, m) =
                unsafe { (a.get_mut(params + start, l), a.get(grads + start, l), a.get_mut(momentum + start, l)) };
            let mut finite = true;
            for ((p, &g), m) in p.iter_mut().zip(g).zip(m.iter_mut()) {
                let d = g + settings.weight_decay * *p;
                *m = settings.momentum * *m + d;
                let step = if settings.nesterov { d + settings.momentum * *m } else { *m };
                *p -= settings.lr * step;
                finite &= p.is_finite() & m.is_finite();
            }
            !finite
        })
        .reduce(|| false, |a, b| a | b)
}

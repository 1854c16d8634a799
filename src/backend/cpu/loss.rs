//! Softmax cross-entropy with top-1 accuracy.

use crate::backend::{Matrix, Span};

/// Softmax cross-entropy summed over the rows and divided by `total`, top-1 correct count and
/// dloss/dlogits.
pub(super) fn softmax_xent(
    arena: &mut [f32],
    labels: &[u32],
    logits: Matrix,
    total: usize,
    out: Span,
    glogits: Matrix,
) {
    let k = logits.cols;
    let (logits, out, glogits) = (logits.data.index(), out.index(), glogits.data.index());
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
            arena[glogits + i * k + j] = ((p - (j == label) as u8 as f64) / total as f64) as f32;
        }
    }
    arena[out] = (loss / total as f64) as f32;
    arena[out + 1] = correct as f32;
}

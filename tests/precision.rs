//! The CPU backend's ops on 16-bit tensors against the same ops in f32 (the checks and what
//! they hold: `common::precision`), on the AVX2 kernels; `tests/fallback.rs` runs them on the
//! portable path.

mod common;

#[test]
fn writes_round_and_reads_widen() {
    common::precision::writes_round_and_reads_widen();
}

#[test]
fn elementwise_and_pooling_ops_round_the_f32_result() {
    common::precision::elementwise_and_pooling_ops_round_the_f32_result();
}

#[test]
fn batch_norm_ops_round_the_f32_result() {
    common::precision::batch_norm_ops_round_the_f32_result();
}

#[test]
fn convolutions_round_the_f32_result() {
    common::precision::convolutions_round_the_f32_result();
}

#[test]
fn max_pool_rounds_its_fused_bn_relu_as_stored() {
    common::precision::max_pool_rounds_its_fused_bn_relu_as_stored();
}

/// 20 training steps of BC-22-8 on one fixed batch: the loss in 16 bits follows f32's (mean
/// absolute difference at most 2% of f32's mean loss in bf16, 1% in fp16; issue 15).
#[test]
fn sixteen_bit_training_follows_f32() {
    use densenet::backend::Sgd;
    use densenet::config::{NetConfig, Precision};
    use densenet::model::plan::Mode;
    let (images, labels) = common::batch(3, 16, 32, 32, 10);
    let losses = |precision| {
        let cfg = NetConfig { precision, ..NetConfig::cifar(22, 8, true, 0.5, 0.0, 10).unwrap() };
        let mut m = common::model(&cfg, 16, 32, 32, Mode::Minimal, 5);
        (0..20).map(|_| m.train_step(&images, &labels, Sgd::default()).unwrap().loss as f64).collect::<Vec<_>>()
    };
    let f32s = losses(Precision::F32);
    let mean = f32s.iter().sum::<f64>() / 20.0;
    assert!(f32s[19] < 0.5 * f32s[0], "f32 does not learn the batch: {f32s:?}");
    for (precision, bound) in [(Precision::Bf16, 0.02), (Precision::Fp16, 0.01)] {
        let half = losses(precision);
        let diff = f32s.iter().zip(&half).map(|(a, b)| (a - b).abs()).sum::<f64>() / 20.0;
        eprintln!(
            "{precision}: mean |loss - f32 loss| = {:.5} ({:.3}% of f32's mean {mean:.4})",
            diff,
            100.0 * diff / mean
        );
        assert!(diff <= bound * mean, "{precision}: {diff} against f32's mean loss {mean} ({half:?} vs {f32s:?})");
    }
}

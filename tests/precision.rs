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

/// fp16 loss scaling (docs/precision.md, rule 5): a step whose scaled gradients overflow fp16
/// is skipped (parameters and momentum bit for bit unchanged, no divergence reported) and halves
/// the scale, which backs off step by step until one is finite; the 2000th finite step in a row
/// doubles it. f32 and bf16 have no scale.
#[test]
fn fp16_loss_scaling_skips_an_overflowing_step_and_backs_off() {
    use densenet::backend::{LossScale, Sgd};
    use densenet::config::{NetConfig, Precision};
    use densenet::model::plan::Mode;
    let (images, labels) = common::batch(3, 16, 32, 32, 10);
    let model = |precision| {
        let cfg = NetConfig { precision, ..NetConfig::cifar(22, 8, true, 0.5, 0.0, 10).unwrap() };
        common::model(&cfg, 16, 32, 32, Mode::Minimal, 5)
    };
    let mut m = model(Precision::Fp16);
    let step = |m: &mut densenet::model::Model<_>| m.train_step(&images, &labels, Sgd::default()).unwrap();
    assert_eq!(m.loss_scale(), Some(LossScale::INITIAL));
    let s = step(&mut m);
    assert!(!s.overflow, "the initial scale overflows BC-22-8");
    assert_eq!(m.loss_scale(), Some(LossScale { scale: 65536.0, good_steps: 1 }));
    // 2^40 times the logits' gradient is far past fp16's 65504: every block gradient overflows.
    m.set_loss_scale(LossScale { scale: 2f32.powi(40), good_steps: 5 }).unwrap();
    let (params, momentum) = (m.params(), m.momentum());
    let s = step(&mut m);
    assert!(s.overflow && s.loss.is_finite(), "{s:?}");
    assert!(m.params() == params && m.momentum() == momentum, "a skipped step changed the state");
    assert_eq!(m.loss_scale(), Some(LossScale { scale: 2f32.powi(39), good_steps: 0 }));
    let mut skipped = 1;
    while step(&mut m).overflow {
        skipped += 1;
        assert!(skipped < 40, "the scale backed off to {:?} and still overflows", m.loss_scale());
    }
    assert_ne!(m.params(), params, "the first finite step did not update");
    assert_eq!(m.loss_scale(), Some(LossScale { scale: 2f32.powi(40 - skipped), good_steps: 1 }));
    eprintln!("backed off from 2^40 to 2^{} in {skipped} skipped steps", 40 - skipped);
    m.set_loss_scale(LossScale { scale: 1024.0, good_steps: LossScale::GROWTH_INTERVAL - 1 }).unwrap();
    assert!(!step(&mut m).overflow);
    assert_eq!(m.loss_scale(), Some(LossScale { scale: 2048.0, good_steps: 0 }));
    for precision in [Precision::F32, Precision::Bf16] {
        let mut m = model(precision);
        assert_eq!(m.loss_scale(), None);
        let err = m.set_loss_scale(LossScale::INITIAL).unwrap_err().to_string();
        assert!(err.contains("has no loss scale"), "{err}");
    }
}

/// One training step in bf16 and in fp16 against PyTorch's float64 step with the engine's
/// rounding points emulated (tests/gen_golden16.py), in every memory mode.
#[test]
fn a_sixteen_bit_step_matches_pytorch_with_the_same_rounding_points() {
    use common::golden::check_rounded;
    use densenet::backend::CpuBackend;
    use densenet::config::Precision;
    use densenet::model::plan::Mode;
    for precision in [Precision::Bf16, Precision::Fp16] {
        for net in ["bc", "basic"] {
            for mode in Mode::ALL {
                check_rounded(&CpuBackend::new, net, mode, precision);
            }
        }
    }
}

//! The three memory modes compute the same step: logits, loss, every gradient, running
//! statistics, updated weights and evaluation logits, with and without dropout; and a batch
//! smaller than the planned one computes what a plan of its own size computes. On every
//! backend: the CPU, the CUDA backend on the host device and on a GPU.

#[macro_use]
mod common;

use densenet::backend::{Backend, Sgd};
use densenet::config::{NetConfig, Precision};
use densenet::model::plan::{Mode, Order};

fn compare<B: Backend>(make: &dyn Fn() -> B, cfg: NetConfig, h: usize, n: usize) {
    let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
    let mut outs = Vec::new();
    for mode in Mode::ALL {
        let mut m = common::model_on(make, &cfg, n, h, h, mode, 11);
        let s1 = m.forward_backward(&images, &labels).unwrap();
        let grads = m.grads();
        let logits = m.logits(n);
        let stats = m.running_stats();
        let s2 = m.train_step(&images, &labels, Sgd::default()).unwrap();
        let eval = m.evaluate(&images, &labels).unwrap();
        outs.push((mode, s1, s2, logits, grads, stats, m.params(), m.momentum(), eval, m.logits(n)));
    }
    let r = &outs[0];
    assert!(r.1.loss.is_finite() && r.1.loss > 0.0);
    assert!(r.4.iter().any(|&g| g != 0.0), "all gradients zero");
    for o in &outs[1..] {
        let what = format!("{} vs {}", o.0, r.0);
        assert!((o.1.loss - r.1.loss).abs() <= 1e-5 * r.1.loss, "{what}: loss {} vs {}", o.1.loss, r.1.loss);
        assert!((o.2.loss - r.2.loss).abs() <= 1e-5 * r.2.loss, "{what}: second loss");
        assert_eq!(o.1.correct, r.1.correct, "{what}");
        for (name, a, b) in [
            ("logits", &o.3, &r.3),
            ("grads", &o.4, &r.4),
            ("stats", &o.5, &r.5),
            ("params", &o.6, &r.6),
            ("momentum", &o.7, &r.7),
        ] {
            let e = common::max_rel(a, b, 1e-3);
            assert!(e < 1e-5, "{what}: {name} differ by {e}");
        }
    }
}

fn bottleneck<B: Backend>(make: &dyn Fn() -> B) {
    compare(make, NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap(), 16, 4);
}
on_backends!(bottleneck_modes_agree, bottleneck);

/// Transitions of 10 and 11 output channels with dropout: outside `naive`, two chunks of
/// images each (a chunk's z holds at most 2k = 8 of the input's channels' worth).
fn dropout_chunks() -> NetConfig {
    NetConfig::cifar(22, 4, true, 0.5, 0.2, 10).unwrap()
}

fn bottleneck_dropout<B: Backend>(make: &dyn Fn() -> B) {
    compare(make, dropout_chunks(), 16, 4);
}
on_backends!(bottleneck_modes_agree_with_dropout, bottleneck_dropout);

fn basic_dropout<B: Backend>(make: &dyn Fn() -> B) {
    compare(make, NetConfig::cifar(13, 3, false, 0.5, 0.2, 7).unwrap(), 8, 3);
}
on_backends!(basic_modes_agree_with_dropout, basic_dropout);

fn imagenet_stem<B: Backend>(make: &dyn Fn() -> B) {
    compare(make, common::tiny_imagenet([2, 1, 1, 2], 5), 32, 2);
}
on_backends!(imagenet_stem_modes_agree, imagenet_stem);

fn partial_batch<B: Backend>(make: &dyn Fn() -> B) {
    // The last batch of an epoch is smaller than the planned batch: every op must take the
    // actual image count from its views (a transition's chunks of images included: 2 and 1).
    let cfg = dropout_chunks();
    let (images, labels) = common::batch(3, 3, 16, 16, 10);
    for mode in Mode::ALL {
        let mut big = common::model_on(make, &cfg, 5, 16, 16, mode, 4);
        let mut exact = common::model_on(make, &cfg, 3, 16, 16, mode, 4);
        let Order::ConvFirst { chunks, .. } = big.plan().transitions[0].order else { panic!("dropout pools last") };
        assert_eq!(chunks, if mode == Mode::Naive { 1 } else { 2 }, "{mode}");
        for m in [&mut big, &mut exact] {
            m.train_step(&images, &labels, Sgd::default()).unwrap();
        }
        assert_eq!(big.params(), exact.params(), "{mode}: parameters after a step of 3 in a plan of 5");
        assert_eq!(big.running_stats(), exact.running_stats(), "{mode}: running statistics");
        let (a, b) = (big.evaluate(&images, &labels).unwrap(), exact.evaluate(&images, &labels).unwrap());
        assert_eq!((a, big.logits(3)), (b, exact.logits(3)), "{mode}: evaluation");
    }
}
on_backends!(partial_batch_equals_a_plan_of_its_size, partial_batch);

/// In 16 bits the modes round at the same points (docs/precision.md, rule 4): every value
/// `naive` stores in 16 bits is rounded where `shared` and `minimal` compute it, the fused
/// BN-ReLU inputs included, so they agree within the f32 tolerance.
fn sixteen_bit<B: Backend>(make: &dyn Fn() -> B) {
    for precision in [Precision::Bf16, Precision::Fp16] {
        compare(make, NetConfig { precision, ..dropout_chunks() }, 16, 4);
        compare(make, NetConfig { precision, ..common::tiny_imagenet([2, 1, 1, 2], 5) }, 32, 2);
    }
}
#[test]
fn sixteen_bit_modes_agree() {
    sixteen_bit(&densenet::backend::CpuBackend::new);
    common::devices::on_host(sixteen_bit);
}

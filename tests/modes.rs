//! The three memory modes compute the same step: logits, loss, every gradient, running
//! statistics and updated weights, with and without dropout.

mod common;

use densenet::backend::Sgd;
use densenet::config::NetConfig;
use densenet::model::plan::Mode;

fn compare(cfg: NetConfig, h: usize, n: usize) {
    let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
    let mut outs = Vec::new();
    for mode in Mode::ALL {
        let mut m = common::model(&cfg, n, h, h, mode, 11);
        let s1 = m.forward_backward(&images, &labels).unwrap();
        let grads = m.grads();
        let logits = m.logits(n);
        let stats = m.running_stats();
        let s2 = m.train_step(&images, &labels, Sgd::default()).unwrap();
        outs.push((mode, s1, s2, logits, grads, stats, m.params(), m.momentum()));
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

#[test]
fn bottleneck_modes_agree() {
    compare(NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap(), 16, 4);
}

#[test]
fn bottleneck_modes_agree_with_dropout() {
    compare(NetConfig::cifar(16, 4, true, 0.5, 0.2, 10).unwrap(), 16, 4);
}

#[test]
fn basic_modes_agree_with_dropout() {
    compare(NetConfig::cifar(13, 3, false, 0.5, 0.2, 7).unwrap(), 8, 3);
}

#[test]
fn imagenet_stem_modes_agree() {
    let mut cfg = NetConfig::imagenet("densenet121").unwrap();
    cfg.growth = 4;
    cfg.stem_channels = 8;
    cfg.block_layers = vec![2, 1, 1, 2];
    cfg.num_classes = 5;
    compare(cfg, 32, 2);
}

//! Finite-difference check of a whole network's backward pass: for every parameter tensor, the
//! directional derivative of the loss along a random direction (central differences) equals
//! the gradient's projection on it. On every backend: the CPU, the CUDA backend on the host
//! device and on a GPU.

#[macro_use]
mod common;

use densenet::backend::Backend;
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::rng;

/// Checks every tensor of `cfg` in `mode`. ReLU kinks and f32 rounding make a single step
/// size unreliable (too small: rounding; too large: kinks), so the derivative is estimated at
/// three step sizes and the best must agree within 5% (relative to at least 1e-2: f32 rounding of the loss
/// limits the absolute accuracy of a difference quotient to about 1e-3): a wrong gradient
/// disagrees at every step size. The direction mixes the tensor's gradient with noise so that
/// the projection is well above rounding. Feature maps of at least 8x8 keep BN smooth enough.
fn check<B: Backend>(make: &dyn Fn() -> B, cfg: NetConfig, h: usize, n: usize, mode: Mode) {
    let (images, labels) = common::batch(5, n, h, h, cfg.num_classes);
    let mut m = common::model_on(make, &cfg, n, h, h, mode, 9);
    m.forward_backward(&images, &labels).unwrap();
    let (p0, grads, stats, mom) = (m.params(), m.grads(), m.running_stats(), m.momentum());
    let mut loss_at = |p: &[f32]| {
        m.load(p, &mom, &stats).unwrap();
        m.forward_backward(&images, &labels).unwrap().loss as f64
    };
    let tensors = m_layout(&cfg);
    for (i, (name, off, len)) in tensors.iter().enumerate() {
        let g = &grads[*off..off + len];
        let gmax = g.iter().fold(0.0f32, |a, v| a.max(v.abs())).max(1e-12);
        let dir: Vec<f32> = (0..*len)
            .map(|j| 0.5 * g[j] / gmax + 0.5 * rng::normal(rng::derive(77, i as u64), j as u64) as f32)
            .collect();
        let scale = p0[*off..off + len].iter().map(|v| v.abs()).fold(0.0f32, f32::max).max(0.1);
        let an: f64 = grads[*off..off + len].iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
        let mut best = (f64::INFINITY, 0.0);
        for step in [3e-4f32, 1e-3, 3e-3] {
            let eps = step * scale;
            let mut at = |sign: f32| {
                let mut p = p0.clone();
                p[*off..off + len].iter_mut().zip(&dir).for_each(|(v, d)| *v += sign * eps * d);
                loss_at(&p)
            };
            let fd = (at(1.0) - at(-1.0)) / (2.0 * eps as f64);
            let err = (fd - an).abs() / an.abs().max(1e-2);
            if err < best.0 {
                best = (err, fd);
            }
        }
        assert!(best.0 < 5e-2, "{name}: finite difference {:.6} vs backward {an:.6} (rel {:.4})", best.1, best.0);
    }
    assert!(tensors.len() > 10);
}

/// (name, offset, length) of every parameter tensor.
fn m_layout(cfg: &NetConfig) -> Vec<(String, usize, usize)> {
    densenet::model::net::Net::new(cfg).layout.params.iter().map(|t| (t.name.clone(), t.off, t.len())).collect()
}

fn bottleneck<B: Backend>(make: &dyn Fn() -> B) {
    check(make, NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap(), 32, 4, Mode::Minimal);
}
on_backends!(bottleneck_network_gradients_match_finite_differences, bottleneck);

fn basic<B: Backend>(make: &dyn Fn() -> B) {
    check(make, NetConfig::cifar(13, 3, false, 0.5, 0.0, 6).unwrap(), 32, 3, Mode::Shared);
}
on_backends!(basic_network_gradients_match_finite_differences, basic);

fn imagenet<B: Backend>(make: &dyn Fn() -> B) {
    check(make, common::tiny_imagenet([1, 2, 1, 1], 4), 128, 2, Mode::Naive);
}
on_backends!(imagenet_network_gradients_match_finite_differences, imagenet);

fn dropout<B: Backend>(make: &dyn Fn() -> B) {
    // The mask depends on the step, so each evaluation must use the same step: finite
    // differences run with the step counter reset.
    let cfg = NetConfig::cifar(16, 4, true, 0.5, 0.3, 10).unwrap();
    let (images, labels) = common::batch(5, 4, 32, 32, 10);
    let mut m = common::model_on(make, &cfg, 4, 32, 32, Mode::Minimal, 9);
    m.forward_backward(&images, &labels).unwrap();
    let (p0, grads, stats, mom) = (m.params(), m.grads(), m.running_stats(), m.momentum());
    let dir: Vec<f32> = (0..p0.len()).map(|j| rng::normal(123, j as u64) as f32).collect();
    let eps = 1e-3f32;
    let mut loss = |sign: f32| {
        let p: Vec<f32> = p0.iter().zip(&dir).map(|(v, d)| v + sign * eps * d).collect();
        m.load(&p, &mom, &stats).unwrap();
        m.set_steps(0);
        m.forward_backward(&images, &labels).unwrap().loss as f64
    };
    let fd = (loss(1.0) - loss(-1.0)) / (2.0 * eps as f64);
    let an: f64 = grads.iter().zip(&dir).map(|(&g, &d)| g as f64 * d as f64).sum();
    assert!((fd - an).abs() / an.abs() < 5e-2, "fd {fd} vs backward {an}");
}
on_backends!(dropout_network_gradients_match_finite_differences, dropout);

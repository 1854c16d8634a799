//! A whole training step of the CUDA backend against the CPU backend in every memory mode
//! (loss, logits, every gradient, running statistics, weights and momentum after SGD, eval),
//! two runs bitwise identical, and a replayed graph equal to the eager step. Runs on the host
//! device in every `cargo test`, and on GPU 0 when there is one.

#[macro_use]
mod common;

use densenet::backend::cuda::{CudaBackend, Exec, FUSED_CHUNK};
use densenet::backend::{Backend, Sgd};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::model::Model;

/// Relative tolerance against the CPU, for each tensor: largest error over largest magnitude,
/// and Euclidean norm of the error over that of the tensor.
const TOL: f32 = 1e-4;

/// What a step leaves behind, for comparisons.
#[derive(PartialEq, Debug)]
struct Outcome {
    losses: Vec<f32>,
    correct: Vec<usize>,
    logits: Vec<f32>,
    grads: Vec<f32>,
    stats: Vec<f32>,
    params: Vec<f32>,
    momentum: Vec<f32>,
}

/// Two training steps and an evaluation on a fixed batch.
fn steps<B: Backend>(mut m: Model<B>, n: usize, h: usize) -> Outcome {
    let (images, labels) = common::batch(7, n, h, h, m.config().num_classes);
    let mut o = Outcome {
        losses: vec![],
        correct: vec![],
        logits: vec![],
        grads: vec![],
        stats: vec![],
        params: vec![],
        momentum: vec![],
    };
    for _ in 0..2 {
        let s = m.train_step(&images, &labels, Sgd::default()).unwrap();
        o.losses.push(s.loss);
        o.correct.push(s.correct);
    }
    o.logits = m.logits(n);
    o.grads = m.grads();
    let e = m.evaluate(&images, &labels).unwrap();
    o.losses.push(e.loss);
    o.logits.extend(m.logits(n));
    (o.stats, o.params, o.momentum) = (m.running_stats(), m.params(), m.momentum());
    o
}

/// Largest |a - b| over the largest |b|.
fn rel_inf(a: &[f32], b: &[f32]) -> f32 {
    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    err / b.iter().map(|y| y.abs()).fold(f32::MIN_POSITIVE, f32::max)
}

fn compare(what: &str, got: &Outcome, want: &Outcome) {
    assert_eq!(got.correct, want.correct, "{what}: correct counts");
    for (name, a, b) in [
        ("losses", &got.losses, &want.losses),
        ("logits", &got.logits, &want.logits),
        ("grads", &got.grads, &want.grads),
        ("running stats", &got.stats, &want.stats),
        ("params", &got.params, &want.params),
        ("momentum", &got.momentum, &want.momentum),
    ] {
        let (e, n) = (rel_inf(a, b), common::norm_rel(a, b));
        eprintln!("{what}: {name} rel_inf {e:.2e} norm_rel {n:.2e}");
        assert!(e < TOL && n < TOL as f64, "{what}: {name} differ by {e} (largest) and {n} (norm)");
    }
}

fn configs() -> Vec<(NetConfig, usize, usize)> {
    vec![
        (NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap(), 16, 3),
        (NetConfig::cifar(13, 3, false, 0.5, 0.2, 7).unwrap(), 8, 2),
        (common::tiny_imagenet([1, 2, 1, 1], 5), 64, 1),
        // Two fused-convolution chunks.
        (NetConfig::cifar(10, 3, true, 0.5, 0.0, 4).unwrap(), 4, FUSED_CHUNK + 2),
    ]
}

fn step_matches_the_cpu<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (cfg, h, n) in configs() {
        for mode in Mode::ALL {
            let cpu = steps(common::model(&cfg, n, h, h, mode, 11), n, h);
            let dev = steps(Model::new(cfg.clone(), n, h, h, mode, 11, make()).unwrap(), n, h);
            compare(&format!("{mode} {:?} {h}x{h} batch {n}", cfg.block_layers), &dev, &cpu);
        }
    }
}
on_devices!(training_step_matches_the_cpu, step_matches_the_cpu);

fn runs_are_identical<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    let run = || steps(Model::new(cfg.clone(), n, h, h, Mode::Minimal, 3, make()).unwrap(), n, h);
    assert_eq!(run(), run(), "two runs differ");
}
on_devices!(two_runs_are_bitwise_identical, runs_are_identical);

fn graphs_replay_the_eager_step<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
    let per = images.len() / n;
    let run = |graphs: bool| {
        let mut be = make();
        be.set_graphs(graphs);
        let mut m = Model::new(cfg.clone(), n, h, h, Mode::Minimal, 5, be).unwrap();
        // Full and partial batches, a learning-rate change, a step without SGD: each kind is
        // recorded once and replayed with the settings of the moment.
        let slow = Sgd { lr: 0.01, ..Sgd::default() };
        let mut losses = Vec::new();
        for (k, hp) in
            [(n, Sgd::default()), (n, Sgd::default()), (n - 1, Sgd::default()), (n, slow), (n - 1, slow), (n, slow)]
        {
            losses.push(m.train_step(&images[..k * per], &labels[..k], hp).unwrap().loss);
        }
        losses.push(m.forward_backward(&images, &labels).unwrap().loss);
        losses.push(m.forward_backward(&images, &labels).unwrap().loss);
        (losses, m.params(), m.momentum(), m.running_stats(), m.grads())
    };
    assert_eq!(run(true), run(false), "replayed steps differ from eager ones");
}
on_devices!(graph_replay_equals_eager_steps, graphs_replay_the_eager_step);

fn device_memory_is_the_plan<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    for mode in Mode::ALL {
        let mut m = Model::new(cfg.clone(), n, h, h, mode, 5, make()).unwrap();
        let planned = m.plan().total_bytes();
        assert_eq!(m.backend().device_memory().map(|d| d.allocated), Some(planned), "{mode}");
        // After the first steps (warm-up, graph capture), a step allocates nothing on the device.
        let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
        let mut used = Vec::new();
        for _ in 0..6 {
            m.train_step(&images, &labels, Sgd::default()).unwrap();
            used.push(m.backend().device_memory().unwrap().process);
        }
        assert!(used[2..].iter().all(|&u| u == used[2]), "{mode}: device memory in use grew over steps: {used:?}");
    }
}
on_devices!(device_allocation_is_the_plan, device_memory_is_the_plan);

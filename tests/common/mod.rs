//! Helpers shared by the integration tests.
#![allow(dead_code)]

pub mod cifar;
#[macro_use]
pub mod devices;
pub mod golden;
pub mod precision;
pub mod run;

use densenet::backend::{Backend, CpuBackend};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::rng;

/// A random batch: normal images [n, 3, h, w] and labels below `classes`.
pub fn batch(seed: u64, n: usize, h: usize, w: usize, classes: usize) -> (Vec<f32>, Vec<u32>) {
    let images = (0..n * 3 * h * w).map(|i| rng::normal(seed, i as u64) as f32).collect();
    let labels = (0..n).map(|i| (rng::mix64(seed ^ (i as u64 + 1)) % classes as u64) as u32).collect();
    (images, labels)
}

/// A CPU model.
pub fn model(cfg: &NetConfig, n: usize, h: usize, w: usize, mode: Mode, seed: u64) -> Model<CpuBackend> {
    model_on(&CpuBackend::new, cfg, n, h, w, mode, seed)
}

/// A model on a backend from `make`.
pub fn model_on<B: Backend>(
    make: &dyn Fn() -> B,
    cfg: &NetConfig,
    n: usize,
    h: usize,
    w: usize,
    mode: Mode,
    seed: u64,
) -> Model<B> {
    Model::new(cfg.clone(), n, h, w, mode, seed, make()).unwrap()
}

/// Largest |a - b| / max(|b|, floor) over two slices.
pub fn max_rel(a: &[f32], b: &[f32], floor: f32) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| (x - y).abs() / y.abs().max(floor)).fold(0.0, f32::max)
}

/// Relative error of two vectors as a whole: |a - b| / |b| (Euclidean norms).
pub fn norm_rel(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let d: f64 = a.iter().zip(b).map(|(&x, &y)| ((x - y) as f64).powi(2)).sum();
    let r: f64 = b.iter().map(|&y| (y as f64).powi(2)).sum();
    (d / r.max(1e-30)).sqrt()
}

/// A small ImageNet-layout network (7x7 stride-2 stem, BN, max pool, four blocks): growth 4,
/// 8 stem channels.
pub fn tiny_imagenet(block_layers: [usize; 4], classes: usize) -> NetConfig {
    let mut cfg = NetConfig::imagenet("densenet121").unwrap();
    cfg.growth = 4;
    cfg.stem_channels = 8;
    cfg.block_layers = block_layers.to_vec();
    cfg.num_classes = classes;
    cfg
}

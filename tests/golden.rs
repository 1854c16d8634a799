//! PyTorch golden data (tests/data/golden.safetensors, written by tests/gen_golden.py in
//! float64): the same weights and batch must give the reference logits, loss, gradients,
//! running statistics and weights after one SGD step.

mod common;

use densenet::backend::Sgd;
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &[u8] = include_bytes!("data/golden.safetensors");

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    match t.dtype() {
        Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::I64 => t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    }
}

fn config(st: &SafeTensors, net: &str) -> (NetConfig, usize) {
    let (_, meta) = SafeTensors::read_metadata(GOLDEN).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let c: serde_json::Value = serde_json::from_str(&meta[&format!("{net}.config")]).unwrap();
    let cfg = NetConfig::cifar(
        c["depth"].as_u64().unwrap() as usize,
        c["growth"].as_u64().unwrap() as usize,
        c["bottleneck"].as_bool().unwrap(),
        c["reduction"].as_f64().unwrap(),
        0.0,
        c["classes"].as_u64().unwrap() as usize,
    )
    .unwrap();
    let _ = st;
    (cfg, c["batch"].as_u64().unwrap() as usize)
}

/// Tolerances (float32 engine vs float64 reference): logits and loss 1e-4 relative; each
/// gradient tensor 1e-3 relative in norm; updated weights 1e-5 relative per element (the step
/// is small); running statistics 1e-4 relative per element.
fn check(net: &str, mode: Mode) {
    let st = SafeTensors::deserialize(GOLDEN).unwrap();
    let (cfg, n) = config(&st, net);
    let mut m = common::model(&cfg, n, 32, 32, mode, 0);
    let names: Vec<String> = m.layout().params.iter().chain(&m.layout().stats).map(|t| t.name.clone()).collect();
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    let images = floats(&st, &format!("{net}.input"));
    let labels: Vec<u32> = floats(&st, &format!("{net}.labels")).iter().map(|&l| l as u32).collect();
    let hp = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };

    let s = m.forward_backward(&images, &labels).unwrap();
    let want_loss = floats(&st, &format!("{net}.loss"))[0];
    assert!((s.loss - want_loss).abs() < 1e-4 * want_loss, "{net} {mode}: loss {} vs {want_loss}", s.loss);
    let e = common::norm_rel(&m.logits(n), &floats(&st, &format!("{net}.logits")));
    assert!(e < 1e-4, "{net} {mode}: logits differ by {e}");
    let grads = m.grads();
    for t in &m.layout().params {
        let want = floats(&st, &format!("{net}.grad.{}", t.name));
        let e = common::norm_rel(&grads[t.off..t.off + t.len()], &want);
        assert!(e < 1e-3, "{net} {mode}: gradient of {} differs by {e}", t.name);
    }
    // One SGD step from the same state: undo forward_backward's running update by reloading.
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    m.set_steps(0);
    m.train_step(&images, &labels, hp).unwrap();
    assert_eq!(m.steps() as f32, floats(&st, &format!("{net}.after.bn1.num_batches_tracked"))[0]);
    for name in &names {
        let want = floats(&st, &format!("{net}.after.{name}"));
        let tol = if name.contains("running") { 1e-4 } else { 1e-5 };
        let e = common::max_rel(&m.tensor(name).unwrap(), &want, 1e-2);
        assert!(e < tol, "{net} {mode}: {name} after the step differs by {e}");
    }
    let mom = m.momentum();
    for t in &m.layout().params {
        let want = floats(&st, &format!("{net}.momentum.{}", t.name));
        let e = common::norm_rel(&mom[t.off..t.off + t.len()], &want);
        assert!(e < 1e-3, "{net} {mode}: momentum of {} differs by {e}", t.name);
    }
}

#[test]
fn bottleneck_matches_pytorch_in_every_mode() {
    for mode in Mode::ALL {
        check("bc", mode);
    }
}

#[test]
fn basic_matches_pytorch_in_every_mode() {
    for mode in Mode::ALL {
        check("basic", mode);
    }
}

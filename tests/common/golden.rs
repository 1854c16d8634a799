//! The PyTorch golden data (tests/data/golden.safetensors, written by tests/gen_golden.py in
//! float64) and the check of a model against it.

use super::{max_rel, model_on, norm_rel};
use densenet::backend::{Backend, Sgd};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &[u8] = include_bytes!("../data/golden.safetensors");

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    match t.dtype() {
        Dtype::F32 => t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect(),
        Dtype::I64 => t.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f32).collect(),
        d => panic!("{name}: unexpected dtype {d:?}"),
    }
}

fn config(net: &str) -> (NetConfig, usize) {
    let (_, meta) = SafeTensors::read_metadata(GOLDEN).unwrap();
    let meta = meta.metadata().as_ref().unwrap();
    let c: serde_json::Value = serde_json::from_str(&meta[&format!("{net}.config")]).unwrap();
    let int = |k: &str| c[k].as_u64().unwrap() as usize;
    let cfg = NetConfig::cifar(
        int("depth"),
        int("growth"),
        c["bottleneck"].as_bool().unwrap(),
        c["reduction"].as_f64().unwrap(),
        0.0,
        int("classes"),
    )
    .unwrap();
    (cfg, int("batch"))
}

/// Tolerances (float32 engine vs the float64 reference), about ten times the errors measured:
/// loss 1e-6 relative (measured 0), logits 2e-6 relative in norm (2e-7); each gradient and
/// momentum tensor 2e-5 in norm (1.2e-6); updated weights and running statistics 5e-6 per
/// element (4.5e-7, 9.8e-7), tight enough to tell the unbiased running variance from the biased
/// one (a 1.2e-5 difference here).
pub fn check<B: Backend>(make: &dyn Fn() -> B, net: &str, mode: Mode) {
    let st = SafeTensors::deserialize(GOLDEN).unwrap();
    let (cfg, n) = config(net);
    let mut m = model_on(make, &cfg, n, 32, 32, mode, 0);
    let names: Vec<String> = m.layout().params.iter().chain(&m.layout().running).map(|t| t.name.clone()).collect();
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    let images = floats(&st, &format!("{net}.input"));
    let labels: Vec<u32> = floats(&st, &format!("{net}.labels")).iter().map(|&l| l as u32).collect();
    let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };

    let s = m.forward_backward(&images, &labels).unwrap();
    let want_loss = floats(&st, &format!("{net}.loss"))[0];
    assert!((s.loss - want_loss).abs() <= 1e-6 * want_loss, "{net} {mode}: loss {} vs {want_loss}", s.loss);
    let e = norm_rel(&m.logits(n), &floats(&st, &format!("{net}.logits")));
    assert!(e < 2e-6, "{net} {mode}: logits differ by {e}");
    let grads = m.grads();
    for t in &m.layout().params {
        let want = floats(&st, &format!("{net}.grad.{}", t.name));
        let e = norm_rel(&grads[t.off..t.off + t.len()], &want);
        assert!(e < 2e-5, "{net} {mode}: gradient of {} differs by {e}", t.name);
    }
    // One SGD step from the same state: undo forward_backward's running update by reloading.
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    m.set_steps(0);
    m.train_step(&images, &labels, sgd).unwrap();
    assert_eq!(m.steps() as f32, floats(&st, &format!("{net}.after.bn1.num_batches_tracked"))[0]);
    for name in &names {
        let want = floats(&st, &format!("{net}.after.{name}"));
        let tol = 5e-6;
        let e = max_rel(&m.tensor(name).unwrap(), &want, 1e-2);
        assert!(e < tol, "{net} {mode}: {name} after the step differs by {e}");
    }
    let mom = m.momentum();
    for t in &m.layout().params {
        let want = floats(&st, &format!("{net}.momentum.{}", t.name));
        let e = norm_rel(&mom[t.off..t.off + t.len()], &want);
        assert!(e < 2e-5, "{net} {mode}: momentum of {} differs by {e}", t.name);
    }
    // Evaluation mode after the step: BN on the updated running statistics.
    let s = m.evaluate(&images, &labels).unwrap();
    let want_loss = floats(&st, &format!("{net}.eval_loss"))[0];
    assert!((s.loss - want_loss).abs() <= 1e-6 * want_loss, "{net} {mode}: eval loss {} vs {want_loss}", s.loss);
    let e = norm_rel(&m.logits(n), &floats(&st, &format!("{net}.eval_logits")));
    assert!(e < 2e-6, "{net} {mode}: eval logits differ by {e}");
}

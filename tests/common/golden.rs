//! The PyTorch golden data (tests/data/golden.safetensors, written by tests/gen_golden.py in
//! float64; tests/data/golden16.safetensors, the same step with the engine's 16-bit rounding
//! points, by tests/gen_golden16.py) and the check of a model against it.

use super::{max_rel, model_on, norm_rel};
use densenet::backend::{Backend, Sgd};
use densenet::config::{NetConfig, Precision};
use densenet::model::plan::Mode;
use safetensors::{Dtype, SafeTensors};

const GOLDEN: &[u8] = include_bytes!("../data/golden.safetensors");
const GOLDEN16: &[u8] = include_bytes!("../data/golden16.safetensors");

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

/// How close a step must come to a golden one: the loss (relative), the logits before and after
/// the step (relative in norm), each gradient and momentum tensor (relative in norm), each
/// weight and running statistic after the step (per element, relative to at least 1e-2).
#[derive(Clone, Copy, Debug)]
struct Tolerance {
    loss: f32,
    logits: f64,
    grads: f64,
    after: f32,
}

/// Float32 engine against the float64 reference, about ten times the errors measured: loss
/// 1e-6 relative (measured 0), logits 2e-6 relative in norm (2e-7); each gradient and momentum
/// tensor 2e-5 in norm (1.2e-6); updated weights and running statistics 5e-6 per element
/// (4.5e-7, 9.8e-7), tight enough to tell the unbiased running variance from the biased one (a
/// 1.2e-5 difference here).
const FLOAT: Tolerance = Tolerance { loss: 1e-6, logits: 2e-6, grads: 2e-5, after: 5e-6 };

/// A 16-bit step against the emulated one, about twice the largest errors measured over both
/// networks and the three modes (bf16; fp16). The same emulation run in float32 arithmetic
/// instead of float64 moves the logits by 2.5e-3; 3.2e-4: a value near a rounding boundary
/// rounds the other way, and BN spreads it. The engine also rounds a block's gradient after
/// each consumer adds to it, which the emulation does once. Measured: loss 7.6e-5; 2.8e-5,
/// logits 1.9e-3; 1.2e-3 (after the step), gradients 0.14; 0.066, weights after the step
/// 0.075; 0.040.
fn rounded(precision: Precision) -> Tolerance {
    match precision {
        Precision::Bf16 => Tolerance { loss: 2e-4, logits: 4e-3, grads: 0.3, after: 0.15 },
        _ => Tolerance { loss: 6e-5, logits: 2.5e-3, grads: 0.15, after: 0.08 },
    }
}

/// One step of `net` in every memory mode's `mode` against PyTorch's float64 step.
pub fn check<B: Backend>(make: &dyn Fn() -> B, net: &str, mode: Mode) {
    check_step(make, net, mode, Precision::F32, (GOLDEN, net), FLOAT);
}

/// One step of `net` stored in `precision` (bf16 or fp16) against PyTorch's float64 step with
/// the engine's rounding points emulated (tests/gen_golden16.py), within [`rounded`]'s
/// tolerances; its logits are closer to the emulated step's than to the float step's (the
/// rounding points, not only the storage type, are the engine's).
pub fn check_rounded<B: Backend>(make: &dyn Fn() -> B, net: &str, mode: Mode, precision: Precision) {
    let logits = check_step(make, net, mode, precision, (GOLDEN16, &format!("{net}.{precision}")), rounded(precision));
    let st = SafeTensors::deserialize(GOLDEN16).unwrap();
    let emulated = norm_rel(&logits, &floats(&st, &format!("{net}.{precision}.logits")));
    let float = norm_rel(&logits, &floats(&SafeTensors::deserialize(GOLDEN).unwrap(), &format!("{net}.logits")));
    assert!(
        emulated < 0.75 * float,
        "{net} {precision} {mode}: logits {emulated} from the emulated step, {float} from the float one"
    );
}

/// The model of golden network `net` in `precision` from the golden initial state and batch,
/// against the results under `prefix` in `file`: forward and backward, one SGD step, then an
/// evaluation. Returns the logits of the first forward pass.
fn check_step<B: Backend>(
    make: &dyn Fn() -> B,
    net: &str,
    mode: Mode,
    precision: Precision,
    (file, prefix): (&[u8], &str),
    tol: Tolerance,
) -> Vec<f32> {
    let (st, want) = (SafeTensors::deserialize(GOLDEN).unwrap(), SafeTensors::deserialize(file).unwrap());
    let (cfg, n) = config(net);
    let cfg = NetConfig { precision, ..cfg };
    let at = format!("{prefix} {mode}");
    let mut m = model_on(make, &cfg, n, 32, 32, mode, 0);
    let names: Vec<String> = m.layout().params.iter().chain(&m.layout().running).map(|t| t.name.clone()).collect();
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    let images = floats(&st, &format!("{net}.input"));
    let labels: Vec<u32> = floats(&st, &format!("{net}.labels")).iter().map(|&l| l as u32).collect();
    let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };

    let s = m.forward_backward(&images, &labels).unwrap();
    assert!(!s.overflow, "{at}: the loss scale overflowed");
    let want_loss = floats(&want, &format!("{prefix}.loss"))[0];
    assert!((s.loss - want_loss).abs() <= tol.loss * want_loss, "{at}: loss {} vs {want_loss}", s.loss);
    let logits = m.logits(n);
    let e = norm_rel(&logits, &floats(&want, &format!("{prefix}.logits")));
    assert!(e < tol.logits, "{at}: logits differ by {e}");
    let grads = m.grads();
    for t in &m.layout().params {
        let e = norm_rel(&grads[t.off..t.off + t.len()], &floats(&want, &format!("{prefix}.grad.{}", t.name)));
        assert!(e < tol.grads, "{at}: gradient of {} differs by {e}", t.name);
    }
    // One SGD step from the same state: undo forward_backward's running update by reloading.
    for name in &names {
        m.set_tensor(name, &floats(&st, &format!("{net}.init.{name}"))).unwrap();
    }
    m.set_steps(0);
    m.train_step(&images, &labels, sgd).unwrap();
    assert_eq!(m.steps() as f32, floats(&st, &format!("{net}.after.bn1.num_batches_tracked"))[0]);
    for name in &names {
        let e = max_rel(&m.tensor(name).unwrap(), &floats(&want, &format!("{prefix}.after.{name}")), 1e-2);
        assert!(e < tol.after, "{at}: {name} after the step differs by {e}");
    }
    let mom = m.momentum();
    for t in &m.layout().params {
        let e = norm_rel(&mom[t.off..t.off + t.len()], &floats(&want, &format!("{prefix}.momentum.{}", t.name)));
        assert!(e < tol.grads, "{at}: momentum of {} differs by {e}", t.name);
    }
    // Evaluation mode after the step: BN on the updated running statistics.
    let s = m.evaluate(&images, &labels).unwrap();
    let want_loss = floats(&want, &format!("{prefix}.eval_loss"))[0];
    assert!((s.loss - want_loss).abs() <= tol.loss * want_loss, "{at}: eval loss {} vs {want_loss}", s.loss);
    let e = norm_rel(&m.logits(n), &floats(&want, &format!("{prefix}.eval_logits")));
    assert!(e < tol.logits, "{at}: eval logits differ by {e}");
    logits
}

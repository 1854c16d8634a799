//! torchvision's DenseNet-121 and -169 (tests/data/torchvision.safetensors, written by
//! tests/gen_torchvision.py in float64): weights in torchvision's naming, regenerated here by the
//! generator's formula and loaded through `read_weights`, must give torchvision's evaluation
//! logits and its training step (loss, logits, gradients, running statistics, SGD update), in
//! every memory mode.

mod common;

use common::{model_on, norm_rel};
use densenet::backend::{Backend, Sgd};
use densenet::config::NetConfig;
use densenet::model::names::Naming;
use densenet::model::plan::Mode;
use densenet::rng::{derive, uniform};
use densenet::train::checkpoint::{read_weights, State};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::path::Path;
use std::sync::OnceLock;

const DATA: &[u8] = include_bytes!("data/torchvision.safetensors");
const NETS: [&str; 2] = ["densenet121", "densenet169"];

/// 64-bit FNV-1a of a tensor name: its stream under the seed.
fn fnv(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

/// Whether a state-dict entry is a running statistic (else a parameter).
fn is_running(name: &str) -> bool {
    name.ends_with(".running_mean") || name.ends_with(".running_var")
}

/// The generator's formula: element j = lo + span * uniform(derive(derive(seed, 1), fnv(name)), j)
/// in f32, (lo, span) by rank and name.
fn values(seed: u64, name: &str, shape: &[usize]) -> Vec<f32> {
    let (lo, span) = if shape.len() >= 2 {
        let g = if shape.len() == 4 { 6.0 } else { 3.0 };
        let b = (g / shape[1..].iter().product::<usize>() as f64).sqrt();
        (-b, 2.0 * b)
    } else if name.ends_with(".weight") || name.ends_with(".running_var") {
        (0.5, 1.0)
    } else {
        assert!(name.ends_with(".bias") || name.ends_with(".running_mean"), "{name}");
        (-0.2, 0.4)
    };
    let (lo, span) = (lo as f32, span as f32);
    let key = derive(derive(seed, 1), fnv(name));
    (0..shape.iter().product::<usize>() as u64).map(|j| lo + span * uniform(key, j)).collect()
}

fn floats(st: &SafeTensors, name: &str) -> Vec<f32> {
    let t = st.tensor(name).unwrap_or_else(|e| panic!("{name}: {e}"));
    assert_eq!(t.dtype(), Dtype::F32, "{name}");
    t.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
}

/// One state-dict entry of the torchvision model: name, shape, offset in the concatenation of
/// its kind (parameters or running statistics, each in state-dict order), sampled elements.
struct Entry {
    name: String,
    len: usize,
    off: usize,
    samples: Vec<usize>,
}

/// A network's reference: its config, batch, the weights as `read_weights` loaded them from a
/// file in torchvision's naming, and where each torchvision element landed.
struct Reference {
    net: &'static str,
    cfg: NetConfig,
    n: usize,
    h: usize,
    w: usize,
    images: Vec<f32>,
    labels: Vec<u32>,
    state: State,
    params: Vec<Entry>,
    running: Vec<Entry>,
    /// The torchvision index (in the concatenation of its kind) of each of our parameter and
    /// running-statistic elements.
    param_at: Vec<usize>,
    running_at: Vec<usize>,
}

/// Writes `tensors` (torchvision names, f32) to `path` with every BN's `num_batches_tracked`,
/// as torchvision's `state_dict()` has them, and reads it through `read_weights`.
fn load(path: &Path, cfg: &NetConfig, tensors: &[(&str, &[usize], Vec<f32>)]) -> State {
    let bytes: Vec<Vec<u8>> = tensors.iter().map(|t| t.2.iter().flat_map(|v| v.to_le_bytes()).collect()).collect();
    let zero = 0i64.to_le_bytes();
    let mut views = Vec::new();
    for ((name, shape, _), b) in tensors.iter().zip(&bytes) {
        views.push((name.to_string(), TensorView::new(Dtype::F32, shape.to_vec(), b).unwrap()));
        if let Some(bn) = name.strip_suffix(".running_mean") {
            views.push((format!("{bn}.num_batches_tracked"), TensorView::new(Dtype::I64, vec![], &zero).unwrap()));
        }
    }
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    let w = read_weights(path, cfg, 0).unwrap_or_else(|e| panic!("read_weights of torchvision names: {e}"));
    assert_eq!((w.naming, w.reset), (Naming::Torchvision, None));
    w.state
}

/// Where each element of `stored` (element indices, as f32) came from; each exactly once.
fn positions(stored: &[f32]) -> Vec<usize> {
    let at: Vec<usize> = stored.iter().map(|&v| v as usize).collect();
    let mut seen = vec![false; at.len()];
    for &i in &at {
        assert!(!std::mem::replace(&mut seen[i], true), "torchvision element {i} loaded twice");
    }
    at
}

impl Reference {
    fn new(net: &'static str) -> Reference {
        let (_, meta) = SafeTensors::read_metadata(DATA).unwrap();
        let meta = meta.metadata().as_ref().unwrap();
        let c: serde_json::Value = serde_json::from_str(&meta[&format!("{net}.config")]).unwrap();
        let int = |k: &str| c[k].as_u64().unwrap() as usize;
        let (seed, samples) = (int("seed") as u64, int("samples"));
        let mut cfg = NetConfig::imagenet(c["torchvision"].as_str().unwrap()).unwrap();
        cfg.num_classes = int("classes");
        let (n, h, w) = (int("batch"), int("height"), int("width"));

        let list: Vec<(String, Vec<usize>)> = serde_json::from_str(&meta[&format!("{net}.tensors")]).unwrap();
        let (mut params, mut running) = (Vec::new(), Vec::new());
        for (name, shape) in &list {
            let kind = if is_running(name) { &mut running } else { &mut params };
            let len = shape.iter().product();
            let off = kind.last().map_or(0, |e: &Entry| e.off + e.len);
            let key = derive(derive(seed, 4), fnv(name));
            let samples = (0..samples as u64).map(|s| (derive(key, s) % len as u64) as usize).collect();
            kind.push(Entry { name: name.clone(), len, off, samples });
        }
        let kind = |name: &str| if is_running(name) { &running } else { &params };
        let total = |k: &[Entry]| k.last().map_or(0, |e| e.off + e.len);
        assert!(total(&params) < 1 << 24, "element indices must be exact in f32");

        let dir = tempfile::TempDir::new().unwrap();
        let weights: Vec<_> = list.iter().map(|(name, s)| (name.as_str(), &s[..], values(seed, name, s))).collect();
        let state = load(&dir.path().join("weights.safetensors"), &cfg, &weights);
        // The same names holding each element's index: where the loader put every element.
        let index = |name: &str| {
            let e = kind(name).iter().find(|e| e.name == name).unwrap();
            (e.off..e.off + e.len).map(|i| i as f32).collect()
        };
        let indices: Vec<_> = list.iter().map(|(name, s)| (name.as_str(), &s[..], index(name))).collect();
        let at = load(&dir.path().join("indices.safetensors"), &cfg, &indices);
        let (param_at, running_at) = (positions(&at.params), positions(&at.running));
        assert_eq!((param_at.len(), running_at.len()), (total(&params), total(&running)));

        let images = (0..(n * 3 * h * w) as u64).map(|i| -2.0 + 4.0 * uniform(derive(seed, 2), i)).collect();
        let labels = (0..n as u64).map(|i| (derive(derive(seed, 3), i) % cfg.num_classes as u64) as u32).collect();
        Reference { net, cfg, n, h, w, images, labels, state, params, running, param_at, running_at }
    }

    /// The reference of `net`, built once per process.
    fn get(net: &str) -> &'static Reference {
        static REFS: [OnceLock<Reference>; 2] = [OnceLock::new(), OnceLock::new()];
        let i = NETS.iter().position(|&n| n == net).unwrap();
        REFS[i].get_or_init(|| Reference::new(NETS[i]))
    }

    /// Compares quantity `q` per torchvision tensor (`ours` in our layout, `at` its map)
    /// with the stored `{q}.norm` and `{q}.sample`: each norm within `tol.0` (relative), each
    /// sample within `tol.1` of its tensor's RMS.
    fn compare(&self, st: &SafeTensors, what: &str, q: &str, ours: &[f32], at: &[usize], tol: (f64, f64)) {
        let entries = if q == "running" { &self.running } else { &self.params };
        let mut tv = vec![0.0; ours.len()];
        for (k, &i) in at.iter().enumerate() {
            tv[i] = ours[k];
        }
        let (norms, samples) =
            (floats(st, &format!("{}.{q}.norm", self.net)), floats(st, &format!("{}.{q}.sample", self.net)));
        let per = entries[0].samples.len();
        for (e, (&want, samples)) in entries.iter().zip(norms.iter().zip(samples.chunks_exact(per))) {
            let t = &tv[e.off..e.off + e.len];
            let want = want as f64;
            let norm = t.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt();
            let err = (norm - want).abs() / want;
            assert!(err < tol.0, "{what}: the norm of {q} {} differs by {err:.1e}", e.name);
            let rms = want / (e.len as f64).sqrt();
            for (&j, &y) in e.samples.iter().zip(samples) {
                let err = (t[j] as f64 - y as f64).abs() / rms;
                assert!(err < tol.1, "{what}: {q} {}[{j}] = {} vs {y}: {err:.1e} of its RMS", e.name, t[j]);
            }
        }
    }
}

/// Tolerances (float32 engine vs the float64 reference), with the largest errors measured on
/// the CPU and the host device (DenseNet-169's; DenseNet-121's are up to ten times smaller):
/// evaluation logits 1e-4 relative in norm (2.9e-7); the step's loss 1e-5 relative (1.1e-6),
/// its logits 1e-4 (9.3e-6); per tensor, the norm of the gradient and momentum 5e-2 (5.8e-3),
/// their samples 0.6 of the tensor's RMS (6.3e-2); updated weights 2e-3 (2.2e-4) and 0.2
/// (1.6e-2); running statistics 3e-6 (2.5e-7) and 6e-5 (6.4e-6). The gradients are loose
/// because the network is ill-conditioned, not the engine: BN's batch statistics over 12 values
/// per channel in the last block; PyTorch's own float32 gradients differ from its float64 ones
/// by 1.1e-2 in norm and 1.6 RMS in elements.
fn check<B: Backend>(make: &dyn Fn() -> B, net: &str, mode: Mode) {
    let st = SafeTensors::deserialize(DATA).unwrap();
    let r = Reference::get(net);
    let what = format!("{net} {mode}");
    let mut m = model_on(make, &r.cfg, r.n, r.h, r.w, mode, 0);
    r.state.apply(&mut m).unwrap();

    let s = m.evaluate(&r.images, &r.labels).unwrap();
    let want = floats(&st, &format!("{net}.eval_loss"))[0];
    assert!((s.loss - want).abs() <= 1e-5 * want, "{what}: eval loss {} vs {want}", s.loss);
    let e = norm_rel(&m.logits(r.n), &floats(&st, &format!("{net}.eval_logits")));
    assert!(e < 1e-4, "{what}: eval logits differ by {e}");

    let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };
    let s = m.train_step(&r.images, &r.labels, sgd).unwrap();
    let want = floats(&st, &format!("{net}.loss"))[0];
    assert!((s.loss - want).abs() <= 1e-5 * want, "{what}: loss {} vs {want}", s.loss);
    let e = norm_rel(&m.logits(r.n), &floats(&st, &format!("{net}.logits")));
    assert!(e < 1e-4, "{what}: logits differ by {e}");
    r.compare(&st, &what, "grad", &m.grads(), &r.param_at, (5e-2, 0.6));
    r.compare(&st, &what, "after", &m.params(), &r.param_at, (2e-3, 0.2));
    r.compare(&st, &what, "momentum", &m.momentum(), &r.param_at, (5e-2, 0.6));
    r.compare(&st, &what, "running", &m.running_stats(), &r.running_at, (3e-6, 6e-5));
}

fn each_mode<B: Backend>(make: &dyn Fn() -> B, net: &str) {
    for mode in Mode::ALL {
        check(make, net, mode);
    }
}

/// Declares `$name` twice, `cpu` and `gpu` (skipped without one), running every mode of
/// `$net`. Not on the host device: it takes about 50 s per network there (the CPU 2-4 s).
macro_rules! on_cpu_and_gpu {
    ($name:ident, $net:literal) => {
        mod $name {
            #[test]
            fn cpu() {
                super::each_mode(&densenet::backend::CpuBackend::new, $net);
            }
            #[test]
            fn gpu() {
                super::common::devices::on_gpu(stringify!($name), |make| super::each_mode(make, $net));
            }
        }
    };
}
on_cpu_and_gpu!(densenet121_matches_torchvision_in_every_mode, "densenet121");
on_cpu_and_gpu!(densenet169_matches_torchvision_in_every_mode, "densenet169");

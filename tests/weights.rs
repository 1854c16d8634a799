//! Weights in and out in the three namings (ours, torchvision's, torchvision's legacy spelling):
//! what `--init-weights` reads ([`checkpoint::read_weights`]) and what `densenet export` writes
//! ([`checkpoint::encode_weights`]): round trips bit for bit, the naming told by the names, a
//! mix refused, the classifier re-initialized for another class count, every other mismatch a
//! one-line error naming the tensor as the file does; and the `export` command end to end.

mod common;

use common::run::{assert_fails, densenet};
use densenet::backend::CpuBackend;
use densenet::config::NetConfig;
use densenet::data::cifar::Dataset;
use densenet::model::names::Naming;
use densenet::model::net::Net;
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::named::Named;
use densenet::rng;
use densenet::train::checkpoint::{self, ClassifierReset, Meta, State};
use densenet::train::recipe::Recipe;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A small torchvision-layout network (ImageNet stem, four blocks, bottleneck layers).
fn tiny(classes: usize) -> NetConfig {
    common::tiny_imagenet([1, 2, 1, 1], classes)
}

/// A model of `cfg` whose parameters, momentum, statistics and step counter are arbitrary.
fn scrambled(cfg: &NetConfig) -> Model<CpuBackend> {
    let mut m = common::model(cfg, 1, 32, 32, Mode::Minimal, 1);
    let lay = m.layout().clone();
    let random = |key: u64, n: usize| (0..n).map(|i| rng::normal(key, i as u64) as f32).collect::<Vec<f32>>();
    let running: Vec<f32> = random(3, lay.running_len).iter().map(|v| v.abs()).collect();
    m.load(&random(1, lay.len), &random(2, lay.len), &running).unwrap();
    m.set_steps(77);
    m
}

/// The state of a model.
fn state(m: &Model<CpuBackend>) -> State {
    State {
        params: m.params(),
        momentum: m.momentum(),
        running: m.running_stats(),
        steps: m.steps(),
        loss_scale: m.loss_scale(),
    }
}

/// A file's tensors by name: dtype, shape, bytes.
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

fn tensors(bytes: &[u8]) -> Tensors {
    let st = SafeTensors::deserialize(bytes).unwrap();
    st.tensors().into_iter().map(|(n, t)| (n, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
}

/// Writes `tensors` as a safetensors file at `path`.
fn write(tensors: &Tensors, path: &Path) {
    let views: Vec<(String, TensorView)> =
        tensors.iter().map(|(n, (d, s, b))| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap())).collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// The weights file of `m` in `naming`, written into `dir` as `name`.
fn export(m: &Model<CpuBackend>, naming: Naming, dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, checkpoint::encode_weights(m.config(), &state(m), naming).unwrap()).unwrap();
    path
}

#[test]
fn every_naming_round_trips_bit_for_bit_and_is_told_by_its_names() {
    let dir = TempDir::new().unwrap();
    let m = scrambled(&tiny(10));
    for &naming in Naming::VALUES {
        let path = export(&m, naming, dir.path(), &format!("{naming}.safetensors"));
        let w = checkpoint::read_weights(&path, m.config(), 3).unwrap();
        assert_eq!((w.naming, w.reset), (naming, None));
        assert_eq!((w.state.params, w.state.running), (m.params(), m.running_stats()), "{naming}");
        assert!(w.state.momentum.iter().all(|&v| v == 0.0) && w.state.steps == 0);

        // The tensors: no momentum; the counters (the step counter, I64) where the naming has them.
        let file = tensors(&std::fs::read(&path).unwrap());
        let lay = m.layout();
        let bns = lay.running.len() / 2;
        let counters: Vec<&String> = file.keys().filter(|n| n.ends_with(".num_batches_tracked")).collect();
        assert_eq!(counters.len(), if naming.counters() { bns } else { 0 }, "{naming}");
        for c in counters {
            assert_eq!(file[c], (Dtype::I64, vec![], 77i64.to_le_bytes().to_vec()));
        }
        assert_eq!(file.len(), lay.params.len() + lay.running.len() + if naming.counters() { bns } else { 0 });
        assert!(!file.keys().any(|n| n.starts_with("momentum.")));
        let layer = match naming {
            Naming::Densenet => "block2.layer.1.bn1.weight",
            Naming::Torchvision => "features.denseblock2.denselayer2.norm1.weight",
            Naming::TorchvisionLegacy => "features.denseblock2.denselayer2.norm.1.weight",
        };
        assert_eq!(file[layer].0, Dtype::F32, "{naming}: {layer}");
    }
}

#[test]
fn a_file_mixing_namings_is_refused() {
    let dir = TempDir::new().unwrap();
    let m = scrambled(&tiny(10));
    let tv = tensors(&std::fs::read(export(&m, Naming::Torchvision, dir.path(), "tv.safetensors")).unwrap());
    let mixed = |from: &str, to: &str, file: &str| {
        let mut t = tv.clone();
        let v = t.remove(from).unwrap();
        t.insert(to.to_string(), v);
        let path = dir.path().join(file);
        write(&t, &path);
        checkpoint::read_weights(&path, m.config(), 0).unwrap_err().0
    };
    let e = mixed("classifier.bias", "fc.bias", "ours.safetensors");
    assert!(e.starts_with(&format!("{}: mixes namings: ", dir.path().join("ours.safetensors").display())), "{e}");
    assert!(e.contains("tensor 'classifier.weight' is a torchvision name, 'fc.bias' a densenet name"), "{e}");
    let e = mixed(
        "features.denseblock1.denselayer1.conv1.weight",
        "features.denseblock1.denselayer1.conv.1.weight",
        "legacy.safetensors",
    );
    assert!(
        e.contains(
            "tensor 'features.denseblock1.denselayer1.conv.1.weight' is a torchvision-legacy name, \
             'features.denseblock1.denselayer1.conv2.weight' a torchvision name"
        ),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1);
}

#[test]
fn another_class_count_reinitializes_the_classifier_from_the_seed() {
    let dir = TempDir::new().unwrap();
    let file_model = scrambled(&tiny(10));
    let cfg = tiny(7);
    // The network's own initialization from seed 5.
    let fresh = common::model(&cfg, 1, 32, 32, Mode::Minimal, 5);
    let file_lay = Net::new(file_model.config()).layout;
    let at = |name: &str| file_lay.params.iter().find(|t| t.name == name).unwrap().off;
    for &naming in Naming::VALUES {
        let path = export(&file_model, naming, dir.path(), &format!("{naming}.safetensors"));
        let w = checkpoint::read_weights(&path, &cfg, 5).unwrap();
        assert_eq!(w.reset, Some(ClassifierReset { classes: 7, file_classes: 10 }));
        for t in &fresh.layout().params {
            let got = &w.state.params[t.off..t.off + t.len()];
            let want = match t.name.starts_with("fc.") {
                true => fresh.params()[t.off..t.off + t.len()].to_vec(),
                false => file_model.params()[at(&t.name)..at(&t.name) + t.len()].to_vec(),
            };
            assert_eq!(got, &want[..], "{naming}: {}", t.name);
        }
        assert_eq!(w.state.running, file_model.running_stats(), "{naming}");
        let notes = w.notes();
        assert_eq!(notes.last().unwrap(), "Classifier re-initialized for 7 classes (the file's has 10)");
        assert_eq!(notes.len(), if naming == Naming::Densenet { 1 } else { 2 });
    }
    let same = checkpoint::read_weights(&dir.path().join("torchvision.safetensors"), &tiny(10), 5).unwrap();
    assert_eq!(same.notes(), ["Initial weights in torchvision names"]);
}

#[test]
fn any_other_mismatch_names_the_tensor_as_the_file_does() {
    let dir = TempDir::new().unwrap();
    let m = scrambled(&tiny(10));
    let path = export(&m, Naming::TorchvisionLegacy, dir.path(), "legacy.safetensors");
    let fail = |cfg: &NetConfig, path: &Path| checkpoint::read_weights(path, cfg, 0).unwrap_err().0;
    let wider = NetConfig { stem_channels: 12, ..tiny(10) };
    let e = fail(&wider, &path);
    assert!(e.contains("tensor 'features.conv0.weight' has shape [8, 3, 7, 7]; expected [12, 3, 7, 7] for"), "{e}");
    let e = fail(&NetConfig { growth: 6, ..tiny(3) }, &path);
    assert!(
        e.contains(
            "tensor 'features.denseblock1.denselayer1.conv.1.weight' has shape [16, 8, 1, 1]; expected [24, 8, 1, 1]"
        ),
        "{e}"
    );
    // A classifier with another class count whose bias does not match it is no fine-tuning start.
    let mut t = tensors(&std::fs::read(&path).unwrap());
    t.get_mut("classifier.bias").unwrap().1 = vec![5, 2];
    let bias = dir.path().join("bias.safetensors");
    write(&t, &bias);
    let e = fail(&tiny(7), &bias);
    let features = m.layout().params.iter().find(|t| t.name == "fc.weight").unwrap().shape[1];
    let want = format!("tensor 'classifier.weight' has shape [10, {features}]; expected [7, {features}]");
    assert!(e.contains(&want), "{e}");
    let e = fail(&tiny(10), &bias);
    assert!(e.contains("tensor 'classifier.bias' has shape [5, 2]; expected [10]"), "{e}");
    // A missing tensor, by the file's name for it.
    t.get_mut("classifier.bias").unwrap().1 = vec![10];
    t.remove("features.transition2.norm.running_var");
    write(&t, &bias);
    assert!(fail(&tiny(10), &bias).contains("no tensor 'features.transition2.norm.running_var'"));
    // torchvision names for a CIFAR network: not part of it, and why.
    let cifar = NetConfig::cifar(10, 4, true, 0.5, 0.0, 10).unwrap();
    let e = fail(&cifar, &path);
    assert!(e.contains("tensor 'classifier.bias' is not part of DenseNet-BC-10-4 (torchvision names fit only"), "{e}");
    assert_eq!(e.lines().count(), 1);
}

/// A checkpoint of `m` in run directory `dir/run`.
fn checkpoint_of(m: &Model<CpuBackend>, dir: &Path) -> PathBuf {
    let run = dir.join("run");
    std::fs::create_dir_all(&run).unwrap();
    let recipe = Recipe::reference("run", Dataset::Cifar10, m.config().clone(), m.seed());
    let path = run.join(checkpoint::CHECKPOINT);
    checkpoint::write_atomic(&path, &checkpoint::encode(m, &Meta::of(m, &recipe, 3, 12.5)).unwrap()).unwrap();
    run
}

#[test]
fn export_writes_each_naming_and_refuses_what_it_cannot_do() {
    let dir = TempDir::new().unwrap();
    let m = scrambled(&tiny(10));
    let run = checkpoint_of(&m, dir.path());
    let (run_arg, out) = (run.to_str().unwrap(), dir.path().join("out.safetensors"));
    let out_arg = out.to_str().unwrap();
    for (flags, naming) in [
        (&["--torchvision"][..], Naming::Torchvision),
        (&["--names", "torchvision-legacy"], Naming::TorchvisionLegacy),
        (&[], Naming::Densenet),
    ] {
        let mut args = vec!["export", run_arg, "-o", out_arg, "--force"];
        args.extend(flags);
        let o = densenet(&args);
        let stdout = String::from_utf8_lossy(&o.stdout);
        assert!(o.status.success(), "{args:?}: {}", String::from_utf8_lossy(&o.stderr));
        let ck = run.join(checkpoint::CHECKPOINT);
        let line = format!(
            "{} from {} (next epoch 3, step 77) written to {out_arg} in {naming} names",
            m.config().name(),
            ck.display()
        );
        assert_eq!(stdout.trim(), line);
        let w = checkpoint::read_weights(&out, m.config(), 0).unwrap();
        assert_eq!((w.naming, w.state.params, w.state.running), (naming, m.params(), m.running_stats()));
    }

    assert_fails(&["export", run_arg, "-o", out_arg], 1, "out.safetensors exists: add --force to replace it");
    let missing = dir.path().join("missing.safetensors");
    assert_fails(&["export", missing.to_str().unwrap(), "-o", "x.safetensors"], 1, "cannot read");
    assert_fails(&["export", run_arg, "-o", "x.safetensors", "--names", "keras"], 2, "unknown naming 'keras'");
    assert_fails(&["export", run_arg, "-o", "x", "--names", "densenet", "--torchvision"], 2, "cannot be used with");
    assert_fails(&["export", run_arg], 2, "--output");

    let cifar = scrambled(&NetConfig::cifar(10, 4, true, 0.5, 0.0, 10).unwrap());
    let other = TempDir::new().unwrap();
    let cifar_run = checkpoint_of(&cifar, other.path());
    let fresh = other.path().join("tv.safetensors");
    let ck = cifar_run.join(checkpoint::CHECKPOINT);
    assert_fails(
        &["export", cifar_run.to_str().unwrap(), "-o", fresh.to_str().unwrap(), "--torchvision"],
        1,
        &format!(
            "{}: torchvision names fit only ImageNet-stem DenseNets with bottleneck layers; DenseNet-BC-10-4 has a \
             CIFAR stem (torchvision has none)",
            ck.display()
        ),
    );
    assert!(!fresh.exists(), "a refused export wrote its output");
}

//! Checkpoints end to end, through the `densenet` binary on tiny CIFAR-10 data: an interrupted
//! and resumed run is bit-identical to an uninterrupted one; model_best; a resume of another
//! network, a damaged file or a mismatched `--init-weights` file is a one-line error that
//! changes nothing.

#[path = "common/cifar.rs"]
mod cifar;
#[path = "common/run.rs"]
mod run;

use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tempfile::TempDir;

/// A depth-10 bottleneck network (one layer per block) with dropout, batch 8, on the CPU
/// (whose results are bitwise reproducible across processes).
const NET: [&str; 10] = ["--layers", "10", "--growth", "4", "--droprate", "0.2", "-b", "8", "--device", "cpu"];

/// Training batches per epoch: 85 images in batches of 8 (the last one partial).
const BATCHES: i64 = 11;

/// Tiny CIFAR-10 data and a runs directory, both temporary.
struct Setup {
    data: TempDir,
    runs: TempDir,
}

impl Setup {
    fn new() -> Setup {
        let data = TempDir::new().unwrap();
        cifar::write(data.path(), cifar::Format::Cifar10, true, 85, 20);
        Setup { data, runs: TempDir::new().unwrap() }
    }

    /// `densenet train` on the tiny network and data, run `name`, with extra flags (which
    /// replace those of [`NET`]).
    fn train(&self, name: &str, extra: &[&str]) -> Output {
        let mut args = vec!["train", "--data-dir", self.data.path().to_str().unwrap()];
        args.extend(["--runs-dir", self.runs.path().to_str().unwrap(), "--name", name, "-p", "100"]);
        for pair in NET.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend(pair);
            }
        }
        args.extend(extra);
        Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(&args)
            .current_dir(self.runs.path())
            .output()
            .expect("run the densenet binary")
    }

    /// As [`Setup::train`], asserting success; returns stdout.
    fn train_ok(&self, name: &str, extra: &[&str]) -> String {
        let out = self.train(name, extra);
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(out.status.success(), "{name} {extra:?} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
        text
    }

    /// Asserts that the run fails with exit code 1 and one line on stderr, `error: ...`
    /// containing every needle, without a panic.
    fn train_fails(&self, name: &str, extra: &[&str], needles: &[&str]) {
        run::assert_one_line_error(&self.train(name, extra), 1, needles, &format!("{extra:?}"));
    }

    fn run(&self, name: &str) -> PathBuf {
        self.runs.path().join(name)
    }

    fn checkpoint(&self, name: &str) -> PathBuf {
        self.run(name).join("checkpoint.safetensors")
    }

    fn best(&self, name: &str) -> PathBuf {
        self.run(name).join("model_best.safetensors")
    }
}

/// Tensors by name, each as (dtype, shape, bytes).
type Tensors = BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>;

/// A safetensors file: its tensors and its metadata.
#[derive(Debug, PartialEq)]
struct File {
    tensors: Tensors,
    meta: BTreeMap<String, String>,
}

impl File {
    fn read(path: &Path) -> File {
        let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors = st
            .tensors()
            .into_iter()
            .map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec())))
            .collect();
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = header.metadata().clone().unwrap_or_default().into_iter().collect();
        File { tensors, meta }
    }

    /// Writes these tensors (no metadata) to `path`.
    fn write(tensors: &Tensors, path: &Path) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        std::fs::write(path, safetensors::serialize(views, None::<HashMap<String, String>>).unwrap()).unwrap();
    }

    fn floats(&self, name: &str) -> Vec<f32> {
        let (dtype, _, bytes) = &self.tensors[name];
        assert_eq!(*dtype, Dtype::F32, "{name}");
        bytes.chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().unwrap())).collect()
    }

    fn int(&self, name: &str) -> i64 {
        let (dtype, shape, bytes) = &self.tensors[name];
        assert_eq!((*dtype, shape.len()), (Dtype::I64, 0), "{name}");
        i64::from_le_bytes(bytes[..].try_into().unwrap())
    }

    /// The model tensors: every tensor but momentum.* and the BN counters.
    fn model(&self) -> Tensors {
        let keep = |n: &str| !n.starts_with("momentum.") && !n.ends_with(".num_batches_tracked");
        self.tensors.iter().filter(|(n, _)| keep(n)).map(|(n, t)| (n.clone(), t.clone())).collect()
    }
}

/// The bytes of every file under `dir` but the run lock, by path.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut out = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            out.extend(snapshot(&path));
        } else if !path.ends_with(densenet::train::lock::LOCK) {
            // The lock file names the last process that held the run, not the run's state.
            out.insert(path.clone(), std::fs::read(&path).unwrap());
        }
    }
    out
}

#[test]
fn a_resumed_run_is_bit_identical_to_an_uninterrupted_one() {
    let s = Setup::new();
    s.train_ok("whole", &["--epochs", "2", "--seed", "5"]);
    let first = s.train_ok("split", &["--epochs", "1", "--seed", "5"]);
    assert!(first.contains(&format!("Checkpoints: {} every epoch", s.checkpoint("split").display())), "{first}");
    assert!(first.contains(" * Saved checkpoint.safetensors (next epoch 1); new best Prec@1 "), "{first}");
    let after_one = File::read(&s.checkpoint("split"));
    assert_eq!(after_one.meta["epoch"], "1");
    assert_eq!(after_one.meta["steps"], BATCHES.to_string());

    let resume = s.checkpoint("split");
    let out = s.train_ok("split", &["--epochs", "2", "--resume", resume.to_str().unwrap()]);
    assert!(out.contains(&format!("Resumed from {}: epoch 1, step {BATCHES}, ", resume.display())), "{out}");
    assert!(out.contains("seed 5") && out.contains("Epoch: [1][0/11]") && !out.contains("Epoch: [0]"), "{out}");

    let (whole, split) = (File::read(&s.checkpoint("whole")), File::read(&s.checkpoint("split")));
    assert_eq!(whole.tensors.keys().collect::<Vec<_>>(), split.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &whole.tensors {
        assert!(split.tensors[name] == *t, "{name} differs after the resume");
    }
    assert_eq!(whole.meta, split.meta);
    assert_eq!((whole.meta["epoch"].as_str(), whole.meta["seed"].as_str()), ("2", "5"));
    assert_eq!(whole.meta["steps"], (2 * BATCHES).to_string());
    // What the comparison covers: trained weights, momentum, statistics and BN counters.
    assert_ne!(whole.floats("conv1.weight"), after_one.floats("conv1.weight"));
    assert!(whole.floats("momentum.block3.layer.0.conv2.weight").iter().any(|&v| v != 0.0));
    assert_ne!(whole.floats("bn1.running_var"), after_one.floats("bn1.running_var"));
    assert_eq!(whole.int("block2.layer.0.bn1.num_batches_tracked"), 2 * BATCHES);
    assert_eq!(whole.int("trans1.bn1.num_batches_tracked"), 2 * BATCHES);

    // model_best is the checkpoint of the best epoch, in both runs.
    let (best_whole, best_split) = (File::read(&s.best("whole")), File::read(&s.best("split")));
    assert_eq!(best_whole, best_split);
    assert_eq!(best_whole.meta["best_prec1"], whole.meta["best_prec1"]);
    let best_epoch = &best_whole.meta["epoch"];
    assert_eq!(best_whole, if best_epoch == "1" { after_one } else { whole }, "epoch {best_epoch}");

    // A run directory stands for its checkpoint; the resumed run goes on.
    let out = s.train_ok("split", &["--epochs", "3", "--resume", s.run("split").to_str().unwrap()]);
    assert!(out.contains("Resumed from ") && out.contains("epoch 2, step 22"), "{out}");
    // Epoch 2 of 3 runs at the rate dropped at epoch 2, with no drop left to announce.
    assert!(out.contains("Training: epochs 2 to 2, batch 8, lr 0.01 (no drop left),"), "{out}");
    assert_eq!(File::read(&s.checkpoint("split")).meta["epoch"], "3");
}

#[test]
fn a_resume_that_does_not_fit_is_refused_and_changes_nothing() {
    let s = Setup::new();
    s.train_ok("r", &["--epochs", "1", "--seed", "3"]);
    let before = snapshot(s.runs.path());
    assert_eq!(before.len(), 2, "{:?}", before.keys());
    let ck = s.checkpoint("r");
    let ck = ck.to_str().unwrap();
    let cases: &[(&[&str], &[&str])] = &[
        (&["--growth", "8"], &["cannot resume from", ck, "--growth 4 in the checkpoint, 8 here", "DenseNet-BC-10-8"]),
        (&["--layers", "16"], &["--layers 10 in the checkpoint, 16 here"]),
        (&["--no-bottleneck"], &["bottleneck on in the checkpoint, off here"]),
        (&["--reduce", "1"], &["--reduce 0.5 in the checkpoint, 1 here"]),
        (&["--droprate", "0"], &["--droprate 0.2 in the checkpoint, 0 here"]),
        (&["--dataset", "cifar100"], &["--dataset cifar10 in the checkpoint, cifar100 here"]),
        (&["--seed", "4"], &["--seed 4 disagrees with", "seed 3"]),
        (&["--start-epoch", "0"], &["--start-epoch 0 disagrees with", "next epoch is 1"]),
        (&["--epochs", "1"], &["is at epoch 1 and --epochs 1 leaves nothing to train"]),
    ];
    for (flags, needles) in cases {
        let mut extra = vec!["--resume", ck];
        extra.extend(*flags);
        if !flags.contains(&"--epochs") {
            extra.extend(["--epochs", "2"]);
        }
        s.train_fails("r", &extra, needles);
        assert!(snapshot(s.runs.path()) == before, "{flags:?} changed the run directory");
    }
    // An explicit --seed or --start-epoch that agrees is fine: nothing else is refused.
    s.train_ok("r", &["--epochs", "2", "--resume", ck, "--seed", "3", "--start-epoch", "1"]);
    assert_eq!(File::read(&s.checkpoint("r")).meta["epoch"], "2");

    // A new run never writes over an earlier run's checkpoints.
    let before = snapshot(s.runs.path());
    s.train_fails("r", &["--epochs", "1"], &[&format!("{ck} already exists"), "--resume", "--name"]);
    let elsewhere = s.runs.path().join("elsewhere.safetensors");
    std::fs::copy(ck, &elsewhere).unwrap();
    let before_copy = snapshot(s.runs.path());
    s.train_fails("r", &["--epochs", "3", "--resume", elsewhere.to_str().unwrap()], &["already exists"]);
    assert!(snapshot(s.runs.path()) == before_copy);
    std::fs::remove_file(&elsewhere).unwrap();
    assert!(snapshot(s.runs.path()) == before);

    // Resuming a run from its model_best would overwrite its later checkpoint.
    let best = s.runs.path().join("r").join("model_best.safetensors");
    s.train_fails("r", &["--epochs", "3", "--resume", best.to_str().unwrap()], &["would overwrite its later", ck]);
    assert!(snapshot(s.runs.path()) == before);
}

#[test]
fn damaged_and_foreign_files_are_one_line_errors_naming_them() {
    let s = Setup::new();
    s.train_ok("src", &["--epochs", "1"]);
    let bytes = std::fs::read(s.checkpoint("src")).unwrap();
    let dir = s.runs.path();
    let files = [
        ("truncated.safetensors", bytes[..bytes.len() / 2].to_vec(), "not a valid safetensors file"),
        ("short.safetensors", bytes[..5].to_vec(), "not a valid safetensors file"),
        ("garbage.safetensors", b"this is not a checkpoint\n".repeat(40), "not a valid safetensors file"),
        ("empty.safetensors", Vec::new(), "not a valid safetensors file"),
    ];
    for (name, contents, _) in &files {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    for flag in ["--resume", "--init-weights"] {
        for (name, _, needle) in &files {
            let path = dir.join(name);
            s.train_fails("new", &["--epochs", "1", flag, path.to_str().unwrap()], &[path.to_str().unwrap(), needle]);
        }
        let missing = dir.join("missing.safetensors");
        s.train_fails(
            "new",
            &["--epochs", "1", flag, missing.to_str().unwrap()],
            &["cannot read", "missing.safetensors"],
        );
    }
    // Weights without checkpoint metadata (a converted state dict) cannot be resumed from.
    let plain = dir.join("plain.safetensors");
    File::write(&File::read(&s.checkpoint("src")).model(), &plain);
    s.train_fails("new", &["--epochs", "1", "--resume", plain.to_str().unwrap()], &["not a densenet checkpoint"]);
    assert!(!s.run("new").exists(), "a refused run created its directory");

    let out =
        s.train("new", &["--resume", s.checkpoint("src").to_str().unwrap(), "--init-weights", plain.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("cannot be used with"));
}

#[test]
fn init_weights_load_the_model_tensors_and_name_what_is_missing() {
    let s = Setup::new();
    s.train_ok("src", &["--epochs", "1", "--seed", "1"]);
    let src = File::read(&s.checkpoint("src"));

    // From a checkpoint: the weights (lr 0 keeps them), not the momentum, counters or epoch.
    let out = s.train_ok(
        "tuned",
        &["--epochs", "1", "--lr", "0", "--seed", "2", "--init-weights", s.checkpoint("src").to_str().unwrap()],
    );
    assert!(out.contains("Initial weights and running statistics from "), "{out}");
    let tuned = File::read(&s.checkpoint("tuned"));
    for (name, (_, shape, _)) in src.model() {
        if !name.contains("running_") {
            assert_eq!(tuned.floats(&name), src.floats(&name), "{name} {shape:?}");
        }
    }
    assert_eq!(tuned.int("bn1.num_batches_tracked"), BATCHES, "the step counter starts at 0");
    assert_eq!((tuned.meta["epoch"].as_str(), tuned.meta["seed"].as_str()), ("1", "2"));

    // From a converted state dict: model tensors only, no metadata.
    let dir = s.runs.path();
    let plain = dir.join("plain.safetensors");
    File::write(&src.model(), &plain);
    s.train_ok("plain", &["--epochs", "1", "--init-weights", plain.to_str().unwrap()]);

    let broken = |name: &str, edit: &dyn Fn(&mut Tensors)| {
        let mut tensors = src.tensors.clone();
        edit(&mut tensors);
        let path = dir.join(name);
        File::write(&tensors, &path);
        path
    };
    let missing = broken("missing.safetensors", &|t| {
        t.remove("block2.layer.0.conv1.weight");
    });
    s.train_fails(
        "x",
        &["--epochs", "1", "--init-weights", missing.to_str().unwrap()],
        &["missing.safetensors", "no tensor 'block2.layer.0.conv1.weight'", "DenseNet-BC-10-4"],
    );
    let shaped = broken("shaped.safetensors", &|t| {
        t.get_mut("fc.bias").unwrap().1 = vec![5, 2];
    });
    s.train_fails(
        "x",
        &["--epochs", "1", "--init-weights", shaped.to_str().unwrap()],
        &["tensor 'fc.bias' has shape [5, 2]; expected [10]"],
    );
    let typed = broken("typed.safetensors", &|t| {
        t.get_mut("bn1.weight").unwrap().0 = Dtype::I32;
    });
    s.train_fails(
        "x",
        &["--epochs", "1", "--init-weights", typed.to_str().unwrap()],
        &["tensor 'bn1.weight' is I32; expected F32"],
    );
    let extra = broken("extra.safetensors", &|t| {
        let w = t["fc.bias"].clone();
        t.insert("fc2.bias".into(), w);
    });
    s.train_fails(
        "x",
        &["--epochs", "1", "--init-weights", extra.to_str().unwrap()],
        &["tensor 'fc2.bias' is not part of DenseNet-BC-10-4"],
    );
    let prefixed = broken("prefixed.safetensors", &|t| {
        *t = t.iter().map(|(n, v)| (format!("module.{n}"), v.clone())).collect();
    });
    s.train_fails(
        "x",
        &["--epochs", "1", "--init-weights", prefixed.to_str().unwrap()],
        &["tensor 'module.block1.layer.0.bn1.bias' is not part of DenseNet-BC-10-4 (strip the 'module.' prefix"],
    );
    // Another network's checkpoint: the first tensor that does not fit, and what the file holds.
    s.train_fails(
        "x",
        &["--epochs", "1", "--growth", "6", "--init-weights", s.checkpoint("src").to_str().unwrap()],
        &["tensor 'conv1.weight' has shape [8, 3, 3, 3]; expected [12, 3, 3, 3]", "(the file holds DenseNet-BC-10-4)"],
    );
    assert!(!s.run("x").exists());
}

/// Killed at every step of every checkpoint write of a run (`DENSENET_FAULT_AT=N` aborts at the
/// N-th: temporary file written, flushed, renamed, directory flushed), a run leaves a best file
/// that is the one its checkpoint names as best (or the next epoch's, which resuming trains
/// again), and resuming it through its run directory ends with exactly the checkpoint and best
/// file of an uninterrupted run.
#[test]
fn a_kill_at_any_write_leaves_a_consistent_best_and_resumes_exactly() {
    let s = Setup::new();
    s.train_ok("whole", &["--epochs", "3"]);
    let (whole, whole_best) = (File::read(&s.checkpoint("whole")), File::read(&s.best("whole")));
    let epoch = |f: &File, key: &str| f.meta.get(key).map(|v| v.parse::<usize>().unwrap());
    let mut n = 1;
    loop {
        let name = format!("f{n}");
        let out = Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(["train", "--data-dir", s.data.path().to_str().unwrap(), "--runs-dir"])
            .args([s.runs.path().to_str().unwrap(), "--name", &name, "-p", "100", "--epochs", "3"])
            .args(NET)
            .env("DENSENET_FAULT_AT", n.to_string())
            .output()
            .unwrap();
        if out.status.success() {
            break; // past the last write: the run finished
        }
        assert!(String::from_utf8_lossy(&out.stderr).contains(&format!("DENSENET_FAULT_AT={n}: aborting")));
        let (ck, best) = (s.checkpoint(&name), s.best(&name));
        if ck.exists() {
            let c = File::read(&ck);
            let named = epoch(&c, "best_epoch").expect("the checkpoint names its best epoch");
            let b = File::read(&best);
            let held = epoch(&b, "epoch").unwrap();
            let next = held == epoch(&c, "epoch").unwrap() + 1 && epoch(&b, "best_epoch") == Some(held);
            assert!(held == named || next, "fault {n}: best file of epoch {held}, checkpoint names {named}");
        }
        let resume = s.run(&name);
        let resume = resume.to_str().unwrap();
        if ck.exists() && epoch(&File::read(&ck), "epoch") == Some(3) {
            // Killed after the last checkpoint was in place: the run is complete.
        } else if ck.exists() || best.exists() {
            let out = s.train_ok(&name, &["--epochs", "3", "--resume", resume]);
            assert!(!out.contains("warning"), "fault {n}: {out}");
        } else {
            s.train_ok(&name, &["--epochs", "3"]);
        }
        assert_eq!(File::read(&ck), whole, "fault {n}: the final checkpoint differs");
        assert_eq!(File::read(&best), whole_best, "fault {n}: the final best file differs");
        n += 1;
        assert!(n < 100, "more write steps than a 3-epoch run has");
    }
    assert!(n > 8, "only {} write steps: the faults did not reach the checkpoint writes", n - 1);
}

/// A checkpoint or `--init-weights` file with a value that is not finite is refused when it
/// is read, naming the tensor and the element (ReLU would otherwise hide a NaN weight).
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let s = Setup::new();
    s.train_ok("n", &["--epochs", "1"]);
    let f = File::read(&s.checkpoint("n"));
    let mut tensors = f.tensors.clone();
    let (_, _, bytes) = tensors.get_mut("conv1.weight").unwrap();
    bytes[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
        .iter()
        .map(|(n, (d, sh, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, sh.clone(), b).unwrap()))
        .collect();
    let meta: HashMap<String, String> = f.meta.clone().into_iter().collect();
    let bad = s.runs.path().join("nan.safetensors");
    std::fs::write(&bad, safetensors::serialize(views, Some(meta)).unwrap()).unwrap();
    let needle = "tensor 'conv1.weight' holds NaN at element 3: a checkpoint's values must be finite";
    let bad = bad.to_str().unwrap();
    s.train_fails("other", &["--epochs", "2", "--resume", bad], &[needle]);
    s.train_fails("other", &["--epochs", "1", "--init-weights", bad], &[needle]);
    let data = s.data.path().to_str().unwrap();
    let eval = run::densenet(&["eval", "--checkpoint", bad, "--data-dir", data, "--device", "cpu"]);
    run::assert_one_line_error(&eval, 1, &[needle], "eval of a NaN checkpoint");

    // A step that overflows stops training at once, naming the tensor; the last good
    // checkpoint is kept as it was.
    let before = snapshot(&s.run("n"));
    let ck = s.checkpoint("n");
    s.train_fails(
        "n",
        &["--epochs", "2", "--lr", "3e38", "--resume", ck.to_str().unwrap()],
        &["training stopped at step ", ": parameter ", " holds "],
    );
    assert_eq!(snapshot(&s.run("n")), before, "a failed step changed the run's files");
}

/// Two identical runs (same machine, threads and device) write byte-identical checkpoint and
/// best files: the header, metadata included, is in a fixed order.
#[test]
fn identical_runs_write_identical_bytes() {
    let (a, b) = (Setup::new(), Setup::new());
    // The same data in both: the second setup reads the first one's.
    let data = a.data.path().to_str().unwrap().to_string();
    for s in [&a, &b] {
        let out = Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(["train", "--data-dir", &data, "--runs-dir", s.runs.path().to_str().unwrap(), "--name", "same"])
            .args(["-p", "100", "--epochs", "2"])
            .args(NET)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    for file in ["checkpoint.safetensors", "model_best.safetensors"] {
        let read = |s: &Setup| std::fs::read(s.run("same").join(file)).unwrap();
        assert!(read(&a) == read(&b), "{file} differs between two identical runs");
    }
}

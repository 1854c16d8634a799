//! Checkpoints end to end, through the `densenet` binary on tiny CIFAR-10 data: an interrupted
//! and resumed run is bit-identical to an uninterrupted one; model_best; a resume of another
//! network, a damaged file or a mismatched `--init-weights` file is a one-line error that
//! changes nothing.

mod common;

use common::cifar::{self, Dirs as Setup};
use common::run;

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

/// Tiny CIFAR-10 data (85 training and 20 test images) and a runs directory.
fn setup() -> Setup {
    Setup::new(&[(cifar::Format::Cifar10, 85, 20)])
}

impl Setup {
    /// `densenet train` on the tiny network and data, run `name` in runs directory `runs`, with
    /// extra flags (which replace those of [`NET`]).
    fn command(&self, runs: &Path, name: &str, extra: &[&str]) -> Command {
        let mut args = vec!["train", "--data-dir", self.data.path().to_str().unwrap()];
        args.extend(["--runs-dir", runs.to_str().unwrap(), "--name", name, "-p", "100"]);
        for pair in NET.chunks(2) {
            if !extra.contains(&pair[0]) {
                args.extend(pair);
            }
        }
        args.extend(extra);
        let mut command = Command::new(env!("CARGO_BIN_EXE_densenet"));
        command.args(&args).current_dir(runs);
        command
    }

    /// [`Setup::command`] in this setup's runs directory, run.
    fn train(&self, name: &str, extra: &[&str]) -> Output {
        self.command(self.runs.path(), name, extra).output().expect("run the densenet binary")
    }

    /// `densenet train --resume PATH` and nothing else of the recipe: only the data, the
    /// device and the print frequency (which are not recipe), run from an unrelated directory.
    fn resume_alone(&self, path: &Path, extra: &[&str]) -> Output {
        let elsewhere = TempDir::new().unwrap();
        Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(["train", "--resume", path.to_str().unwrap(), "--data-dir", self.data.path().to_str().unwrap()])
            .args(["--device", "cpu", "-p", "100"])
            .args(extra)
            .current_dir(elsewhere.path())
            .output()
            .expect("run the densenet binary")
    }

    /// Run `name` of `epochs` epochs, killed once the checkpoint of its first epoch is in place
    /// (at the 8th write step: the best file, then the checkpoint, four steps each).
    fn train_killed_after_one(&self, name: &str, extra: &[&str]) {
        let out = self.command(self.runs.path(), name, extra).env("DENSENET_FAULT_AT", "8").output().unwrap();
        assert!(String::from_utf8_lossy(&out.stderr).contains("DENSENET_FAULT_AT=8: aborting"), "{out:?}");
        assert_eq!(File::read(&self.checkpoint(name)).meta["epoch"], "1");
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
        File { tensors: tensors.clone(), meta: BTreeMap::new() }.save(path)
    }

    /// Writes this file (its metadata too, when it has any) to `path`.
    fn save(&self, path: &Path) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = (self.tensors.iter())
            .map(|(n, (d, s, b))| (n.clone(), safetensors::tensor::TensorView::new(*d, s.clone(), b).unwrap()))
            .collect();
        let meta: Option<HashMap<String, String>> = match self.meta.is_empty() {
            true => None,
            false => Some(self.meta.clone().into_iter().collect()),
        };
        std::fs::write(path, safetensors::serialize(views, meta).unwrap()).unwrap();
    }

    /// The recipe the metadata records.
    fn recipe(&self) -> serde_json::Value {
        serde_json::from_str(&self.meta["recipe"]).unwrap()
    }

    /// This file with the run name in its recipe replaced by `name` (the recipe's text
    /// otherwise as it was).
    fn renamed(&self, name: &str) -> File {
        let old = format!("\"name\":{}", self.recipe()["name"]);
        assert!(self.meta["recipe"].contains(&old), "{}", self.meta["recipe"]);
        let mut meta = self.meta.clone();
        meta.insert("recipe".into(), self.meta["recipe"].replace(&old, &format!("\"name\":{:?}", name)));
        File { tensors: self.tensors.clone(), meta }
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
    let s = setup();
    // The uninterrupted run has the same name in another runs directory: the same recipe.
    let other = TempDir::new().unwrap();
    let out = s.command(other.path(), "split", &["--epochs", "2", "--seed", "5"]).output().unwrap();
    assert!(out.status.success(), "{out:?}");
    let whole_dir = other.path().join("split");
    s.train_killed_after_one("split", &["--epochs", "2", "--seed", "5"]);
    let after_one = File::read(&s.checkpoint("split"));
    assert_eq!(after_one.meta["steps"], BATCHES.to_string());

    // `--resume` alone: the run's directory and its whole recipe come from its checkpoint.
    let resume = s.checkpoint("split");
    let out = s.resume_alone(&resume, &[]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("DenseNet-BC-10-4 (run split) on CIFAR-10"), "{text}");
    assert!(text.contains(&format!("Resumed from {}: epoch 1, step {BATCHES}, ", resume.display())), "{text}");
    assert!(
        text.contains("Training: epochs 1 to 1, batch 8, lr 0.01 (no drop left), Nesterov momentum 0.9,"),
        "{text}"
    );
    assert!(text.contains("seed 5") && text.contains("Epoch: [1][0/11]") && !text.contains("Epoch: [0]"), "{text}");

    let (whole, split) = (File::read(&whole_dir.join("checkpoint.safetensors")), File::read(&s.checkpoint("split")));
    assert_eq!(whole.tensors.keys().collect::<Vec<_>>(), split.tensors.keys().collect::<Vec<_>>());
    for (name, t) in &whole.tensors {
        assert!(split.tensors[name] == *t, "{name} differs after the resume");
    }
    assert_eq!(whole.meta, split.meta);
    assert_eq!((whole.meta["epoch"].as_str(), whole.recipe()["seed"].as_u64()), ("2", Some(5)));
    assert_eq!(whole.meta["steps"], (2 * BATCHES).to_string());
    // What the comparison covers: trained weights, momentum, statistics and BN counters.
    assert_ne!(whole.floats("conv1.weight"), after_one.floats("conv1.weight"));
    assert!(whole.floats("momentum.block3.layer.0.conv2.weight").iter().any(|&v| v != 0.0));
    assert_ne!(whole.floats("bn1.running_var"), after_one.floats("bn1.running_var"));
    assert_eq!(whole.int("block2.layer.0.bn1.num_batches_tracked"), 2 * BATCHES);
    assert_eq!(whole.int("trans1.bn1.num_batches_tracked"), 2 * BATCHES);

    // model_best is the checkpoint of the best epoch, in both runs.
    let (best_whole, best_split) =
        (File::read(&whole_dir.join("model_best.safetensors")), File::read(&s.best("split")));
    assert_eq!(best_whole, best_split);
    assert_eq!(best_whole.meta["best_prec1"], whole.meta["best_prec1"]);
    let best_epoch = &best_whole.meta["epoch"];
    assert_eq!(best_whole, if best_epoch == "1" { after_one } else { whole }, "epoch {best_epoch}");

    // A finished run says how to go on; a longer --epochs is a recipe change, refused without
    // --change-recipe and changing nothing.
    let run = s.run("split");
    let before = snapshot(&run);
    let needles =
        ["run 'split' is complete", "is at epoch 2 of its 2", "add --change-recipe --epochs N with N above 2"];
    run::assert_one_line_error(&s.resume_alone(&run, &[]), 1, &needles, "a finished run");
    let needles = ["--epochs 2 in the checkpoint, 3 here", "leave those flags out", "add --change-recipe"];
    run::assert_one_line_error(&s.resume_alone(&run, &["--epochs", "3"]), 1, &needles, "--epochs 3");
    assert!(snapshot(&run) == before);
    // With it: the change and what it does to the LR milestones are printed and recorded.
    let out = s.resume_alone(&run, &["--epochs", "3", "--change-recipe"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    let change = "Recipe change from epoch 2: --epochs 2 -> 3 (the LR milestones (50% and 75% of the epochs) move \
                  from epochs 1 and 2 to 2 and 3; epoch 2 trains at lr 0.01, as epoch 1 did)";
    assert!(text.contains(change), "{text}");
    // Epoch 2 of 3 runs at the rate dropped at epoch 2, with no drop left to announce.
    assert!(text.contains("Training: epochs 2 to 2, batch 8, lr 0.01 (no drop left),"), "{text}");
    let ck = File::read(&s.checkpoint("split"));
    assert_eq!((ck.meta["epoch"].as_str(), ck.recipe()["epochs"].as_u64()), ("3", Some(3)));
    assert_eq!(ck.recipe()["changes"], serde_json::json!([{"epoch": 2, "what": "--epochs", "from": "2", "to": "3"}]));
}

/// A 16-bit run (docs/precision.md): the precision is recorded in the recipe, and 1 epoch plus
/// a resume is the 2-epoch run bit for bit (in fp16 with the loss scaler's state, which the
/// metadata holds); another precision on resume is a recipe change.
#[test]
fn a_sixteen_bit_run_resumes_bit_for_bit() {
    let s = setup();
    for precision in ["bf16", "fp16"] {
        let other = TempDir::new().unwrap();
        let flags = ["--epochs", "2", "--precision", precision];
        let out = s.command(other.path(), precision, &flags).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let plan = format!("Memory plan (minimal, {precision}, batch 8)");
        assert!(out.status.success() && text.contains(&plan), "{out:?}");
        s.train_killed_after_one(precision, &flags);
        let out = s.resume_alone(&s.checkpoint(precision), &[]);
        assert!(out.status.success(), "{out:?}");
        let (whole, split) = (
            File::read(&other.path().join(precision).join("checkpoint.safetensors")),
            File::read(&s.checkpoint(precision)),
        );
        assert_eq!(whole.recipe()["network"]["precision"], precision);
        assert_eq!(whole.tensors, split.tensors);
        assert_eq!(whole.meta, split.meta);
        let scaled = ["loss_scale", "loss_scale_good_steps"].map(|k| whole.meta.contains_key(k));
        assert_eq!(scaled, [precision == "fp16"; 2], "{:?}", whole.meta);
        // `eval` builds the checkpoint's network in its precision, on the CPU and on the host
        // device.
        let (ck, data) = (s.checkpoint(precision), s.data.path().to_str().unwrap().to_string());
        let eval = |device| {
            run::densenet(&["eval", "--checkpoint", ck.to_str().unwrap(), "--data-dir", &data, "--device", device])
        };
        for device in ["cpu", "host"] {
            let out = eval(device);
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(out.status.success() && text.contains(" * Test Loss "), "{device}: {out:?}");
        }
        let change = format!("--precision {precision} in the checkpoint, f32 here");
        run::assert_one_line_error(
            &s.resume_alone(&s.run(precision), &["--epochs", "3", "--precision", "f32"]),
            1,
            &[&change, "add --change-recipe"],
            "f32",
        );
        // With it the run goes on in f32 (an fp16 run's loss scale is left behind).
        let out = s.resume_alone(&s.run(precision), &["--epochs", "3", "--precision", "f32", "--change-recipe"]);
        assert!(out.status.success(), "{precision} -> f32: {}", String::from_utf8_lossy(&out.stderr));
        let ck = File::read(&s.checkpoint(precision));
        assert!(!ck.meta.contains_key("loss_scale") && ck.recipe()["network"].get("precision").is_none());
    }
}

#[test]
fn a_resume_that_does_not_fit_is_refused_and_changes_nothing() {
    let s = setup();
    s.train_killed_after_one("r", &["--epochs", "2", "--seed", "3"]);
    let before = snapshot(s.runs.path());
    assert_eq!(before.len(), 2, "{:?}", before.keys());
    let ck = s.checkpoint("r");
    let ck = ck.to_str().unwrap();
    let network = "a resumed run keeps its network";
    let change = "or add --change-recipe to change it";
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--growth", "8"],
            &["cannot resume from", ck, "--growth 4 in the checkpoint, 8 here", "DenseNet-BC-10-8", network],
        ),
        (&["--growth", "8", "--change-recipe"], &["--growth 4 in the checkpoint, 8 here", network]),
        (&["--layers", "16"], &["--layers 10 in the checkpoint, 16 here", network]),
        (&["--no-bottleneck"], &["bottleneck on in the checkpoint, off here"]),
        (&["--reduce", "1"], &["--reduce 0.5 in the checkpoint, 1 here"]),
        (&["--dataset", "cifar100"], &["--dataset cifar10 in the checkpoint, cifar100 here", network]),
        (&["--droprate", "0"], &["cannot resume from", "as asked: --droprate 0.2 in the checkpoint, 0 here", change]),
        (&["--seed", "4"], &["--seed 3 in the checkpoint, 4 here", change]),
        (
            &["--lr", "0.05", "-b", "16"],
            &["--batch-size 8 in the checkpoint, 16 here; --lr 0.1 in the checkpoint, 0.05 here"],
        ),
        (
            &["--no-augment", "--momentum", "0.5"],
            &["--momentum 0.9 in the checkpoint, 0.5 here; augmentation on in the checkpoint, off here"],
        ),
        (&["--wd", "0"], &["--weight-decay 0.0001 in the checkpoint, 0 here"]),
        (&["--name", "other"], &["--name r in the checkpoint, other here", "continue run 'r' with its recipe"]),
        (&["--epochs", "1"], &["--epochs 2 in the checkpoint, 1 here", change]),
        (&["--epochs", "1", "--change-recipe"], &["is at epoch 1 and --epochs 1 leaves nothing to train"]),
        (&["--start-epoch", "0"], &["--start-epoch 0 disagrees with", "next epoch is 1"]),
    ];
    for (flags, needles) in cases {
        let mut extra = vec!["--resume", ck];
        extra.extend(*flags);
        s.train_fails("r", &extra, needles);
        assert!(snapshot(s.runs.path()) == before, "{flags:?} changed the run directory");
    }
    let out = s.train("r", &["--change-recipe"]);
    run::assert_one_line_error(
        &out,
        2,
        &["required arguments were not provided: --resume <PATH>"],
        "--change-recipe alone",
    );
    // Explicit flags that agree with the recipe are fine, --seed and --start-epoch included.
    s.train_ok("r", &["--epochs", "2", "--resume", ck, "--seed", "3", "--start-epoch", "1", "--lr", "0.1"]);
    assert_eq!(File::read(&s.checkpoint("r")).meta["epoch"], "2");

    // A new run never writes over an earlier run's checkpoints.
    let before = snapshot(s.runs.path());
    s.train_fails("r", &["--epochs", "1"], &[&format!("{ck} already exists"), "--resume", "--name"]);
    let elsewhere = s.runs.path().join("elsewhere.safetensors");
    std::fs::copy(ck, &elsewhere).unwrap();
    let before_copy = snapshot(s.runs.path());
    let longer = ["--change-recipe", "--epochs", "3", "--resume"];
    s.train_fails("r", &[&longer[..], &[elsewhere.to_str().unwrap()]].concat(), &["already exists"]);
    assert!(snapshot(s.runs.path()) == before_copy);
    std::fs::remove_file(&elsewhere).unwrap();
    assert!(snapshot(s.runs.path()) == before);

    // Resuming a run from its model_best would overwrite its later checkpoint.
    let best = s.runs.path().join("r").join("model_best.safetensors");
    s.train_fails("r", &[&longer[..], &[best.to_str().unwrap()]].concat(), &["would overwrite its later", ck]);
    assert!(snapshot(s.runs.path()) == before);
}

/// `--change-recipe` changes a run's recipe: each change printed and recorded, the run going on
/// in its directory (or, under a new `--name`, in a new one, the old one untouched); the
/// memory mode, which is not recipe, carries over until changed, with a word on exactness.
#[test]
fn recipe_changes_are_printed_and_recorded() {
    let s = setup();
    s.train_ok("c", &["--epochs", "1"]);
    let run = s.run("c");
    let changed = s.resume_alone(&run, &["--change-recipe", "--epochs", "2", "--lr", "0.05", "--no-augment"]);
    let text = String::from_utf8(changed.stdout).unwrap();
    assert!(changed.status.success(), "{text}{}", String::from_utf8_lossy(&changed.stderr));
    for line in [
        "Recipe change from epoch 1: --epochs 1 -> 2 (the LR milestones",
        "Recipe change from epoch 1: --lr 0.1 -> 0.05\n",
        "Recipe change from epoch 1: augmentation on -> off\n",
        "Training: epochs 1 to 1, batch 8, lr 0.005 (no drop left), Nesterov momentum 0.9, weight decay 0.0001, \
         augmentation off, seed 0",
    ] {
        assert!(text.contains(line), "'{line}' not in {text}");
    }
    let recipe = File::read(&s.checkpoint("c")).recipe();
    assert_eq!(
        (recipe["epochs"].as_u64(), recipe["lr"].as_f64(), recipe["augment"].as_bool()),
        (Some(2), Some(0.05), Some(false))
    );
    let whats: Vec<&str> = recipe["changes"].as_array().unwrap().iter().map(|c| c["what"].as_str().unwrap()).collect();
    assert_eq!(whats, ["--epochs", "--lr", "augmentation"]);
    assert!(recipe["changes"].as_array().unwrap().iter().all(|c| c["epoch"] == 1));

    // Under another name the run goes on in a new directory; the old one stays as it was.
    let before = snapshot(&run);
    let out = s.train_ok("fork", &["--change-recipe", "--epochs", "3", "--resume", run.to_str().unwrap()]);
    assert!(out.contains("Recipe change from epoch 2: --name c -> fork"), "{out}");
    assert!(snapshot(&run) == before, "the forked run's directory changed");
    let fork = File::read(&s.checkpoint("fork"));
    assert_eq!((fork.meta["epoch"].as_str(), fork.recipe()["name"].as_str()), ("3", Some("fork")));
    assert_eq!(fork.recipe()["changes"].as_array().unwrap().len(), 5);

    // The memory mode carries over; a change of it is printed, with what it means.
    let fork = s.run("fork");
    let out = s.resume_alone(&fork, &["--change-recipe", "--epochs", "4", "--memory", "shared"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    let note = "Memory mode shared (the run trained in minimal until epoch 3): the modes agree to within 1e-5";
    assert!(text.contains(note), "{text}");
    assert_eq!(File::read(&s.checkpoint("fork")).meta["memory"], "shared");
    let out = s.resume_alone(&fork, &["--change-recipe", "--epochs", "5"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && !text.contains("Memory mode"), "{text}");
    assert_eq!(File::read(&s.checkpoint("fork")).meta["memory"], "shared");

    // A renamed run directory is still the run's: the resume continues in it.
    let renamed = s.run("renamed");
    std::fs::rename(&fork, &renamed).unwrap();
    let out = s.resume_alone(&renamed, &["--change-recipe", "--epochs", "6"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success() && !text.contains("Run directory:"), "{text}");
    assert_eq!(File::read(&renamed.join("checkpoint.safetensors")).meta["epoch"], "6");
    assert!(!fork.exists());
    // A new name without --runs-dir goes beside the run, and says so.
    let out = s.resume_alone(&renamed, &["--change-recipe", "--epochs", "7", "--name", "beside"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}");
    assert!(text.contains(&format!("Run directory: {} (not the directory of ", s.run("beside").display())), "{text}");
    assert_eq!(File::read(&s.checkpoint("beside")).meta["epoch"], "7");
}

/// A checkpoint written before the recipe was stored (format 1: network, data set and seed)
/// still resumes: its network from the file, so no network flag is needed, and the rest of
/// the recipe from the flags; the run goes on in its directory, now in format 2.
#[test]
fn format_1_checkpoints_resume_with_the_flags_recipe() {
    let s = setup();
    s.train_ok("new", &["--epochs", "1", "--seed", "6"]);
    let new = File::read(&s.checkpoint("new"));
    let recipe = new.recipe();
    let mut old = File { tensors: new.tensors.clone(), meta: new.meta.clone() };
    for key in ["recipe", "memory"] {
        old.meta.remove(key);
    }
    for (key, value) in [
        ("format_version", "1".to_string()),
        ("network", recipe["network"].to_string()),
        ("dataset", "cifar10".into()),
        ("seed", "6".into()),
    ] {
        old.meta.insert(key.into(), value);
    }
    std::fs::create_dir(s.run("old")).unwrap();
    old.save(&s.checkpoint("old"));
    let out = s.resume_alone(&s.run("old"), &["--epochs", "2", "-b", "8"]);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("(checkpoint format 1) records the network, data set and seed;"), "{text}");
    assert!(text.contains("DenseNet-BC-10-4 (run old) on CIFAR-10") && text.contains("seed 6"), "{text}");
    let resumed = File::read(&s.checkpoint("old"));
    assert_eq!((resumed.meta["format_version"].as_str(), resumed.meta["epoch"].as_str()), ("2", "2"));
    assert_eq!(resumed.recipe()["network"], recipe["network"]);
    assert_eq!((resumed.recipe()["name"].as_str(), resumed.recipe()["batch_size"].as_u64()), (Some("old"), Some(8)));
    let out = s.resume_alone(&s.run("old"), &["--epochs", "3", "--growth", "8"]);
    run::assert_one_line_error(&out, 1, &["--growth 4 in the checkpoint, 8 here"], "another network");
}

#[test]
fn damaged_and_foreign_files_are_one_line_errors_naming_them() {
    let s = setup();
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
    let s = setup();
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
    assert_eq!((tuned.meta["epoch"].as_str(), tuned.recipe()["seed"].as_u64()), ("1", Some(2)));

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
    let s = setup();
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
        assert!(File::read(&ck) == whole.renamed(&name), "fault {n}: the final checkpoint differs");
        assert!(File::read(&best) == whole_best.renamed(&name), "fault {n}: the final best file differs");
        n += 1;
        assert!(n < 100, "more write steps than a 3-epoch run has");
    }
    assert!(n > 8, "only {} write steps: the faults did not reach the checkpoint writes", n - 1);
}

/// A checkpoint or `--init-weights` file with a value that is not finite is refused when it
/// is read, naming the tensor and the element (ReLU would otherwise hide a NaN weight).
#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    let s = setup();
    s.train_ok("n", &["--epochs", "1"]);
    let f = File::read(&s.checkpoint("n"));
    let mut tensors = f.tensors.clone();
    let (_, _, bytes) = tensors.get_mut("conv1.weight").unwrap();
    bytes[12..16].copy_from_slice(&f32::NAN.to_le_bytes());
    let bad = s.runs.path().join("nan.safetensors");
    File { tensors, meta: f.meta.clone() }.save(&bad);
    let needle = "tensor 'conv1.weight' holds NaN at element 3: a checkpoint's values must be finite";
    let bad = bad.to_str().unwrap();
    s.train_fails("other", &["--resume", bad], &[needle]);
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
        &["--change-recipe", "--epochs", "2", "--lr", "3e38", "--resume", ck.to_str().unwrap()],
        &["training stopped at step ", ": parameter ", " holds "],
    );
    assert_eq!(snapshot(&s.run("n")), before, "a failed step changed the run's files");
}

/// Two identical runs (same machine, threads and device) write byte-identical checkpoint and
/// best files: the header, metadata included, is in a fixed order.
#[test]
fn identical_runs_write_identical_bytes() {
    let (a, b) = (setup(), setup());
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

//! End-to-end runs of the `densenet` binary on tiny CIFAR-format data written by the tests:
//! training on both formats and layouts, determinism, the memory report, and one clear
//! one-line error (no panic) for every bad input.

mod common;

use common::{cifar, run};

use cifar::Format;
use run::{assert_fails, densenet};
use std::path::Path;
use std::process::Output;
use tempfile::TempDir;

/// A depth-10 bottleneck network (one layer per block).
const TINY: [&str; 4] = ["--layers", "10", "--growth", "4"];

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8(out.stderr.clone()).unwrap()
}

/// A temp dir with CIFAR-10 in its archive folder: 5 x 16 training and 20 test records.
fn cifar10() -> TempDir {
    let dir = TempDir::new().unwrap();
    cifar::write(dir.path(), Format::Cifar10, true, 80, 20);
    dir
}

/// Trains the tiny network on `dir` at batch `batch` with extra flags; asserts success and
/// returns stdout.
fn train(dir: &Path, batch: &str, extra: &[&str]) -> String {
    let mut args = vec!["train", "--data-dir", dir.to_str().unwrap(), "-b", batch];
    args.extend(TINY);
    if !extra.contains(&"--device") {
        args.extend(["--device", "cpu"]);
    }
    args.extend(extra);
    let out = densenet(&args);
    assert!(out.status.success(), "{args:?} failed:\n{}{}", stdout(&out), stderr(&out));
    stdout(&out)
}

/// The number after `key` in `line`.
fn number_after(line: &str, key: &str) -> f64 {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("no '{key}' in '{line}'")) + key.len()..];
    rest.split_whitespace().next().unwrap().parse().unwrap()
}

#[test]
fn trains_two_epochs_on_cifar10() {
    let dir = cifar10();
    let out = train(dir.path(), "16", &["--epochs", "2", "-p", "2"]);
    for expect in [
        "DenseNet-BC-10-4 (run DenseNet_BC_100_12) on CIFAR-10: 80 training and 20 test images",
        "Number of model parameters: 2666",
        "Device: cpu (",
        "Memory plan (minimal, f32, batch 16): ",
        "Epoch: [0][0/5]  Time ",
        "Epoch: [0][4/5]",
        "Epoch: [1][2/5]",
        "Test: [0/2]",
        // After the first epoch's 5 batches (the first, a warm-up, not timed).
        "Estimate: 2 epochs of training take about ",
        " s a batch over 4 batches; the test passes add to it)",
    ] {
        assert!(out.contains(expect), "'{expect}' missing from:\n{out}");
    }
    assert_eq!(out.matches("Estimate: ").count(), 1, "{out}");
    assert!(!out.contains("Epoch: [0][1/5]"), "printed off the print frequency:\n{out}");
    let epochs: Vec<&str> = out.lines().filter(|l| l.starts_with(" * Epoch [")).collect();
    assert_eq!(epochs.len(), 2, "{out}");
    // Two epochs: epoch 1 is at 50% of training (divided by 10), not yet at 75%.
    assert_eq!(number_after(epochs[0], "lr "), 0.1);
    assert_eq!(number_after(epochs[1], "lr "), 0.01);
    let tops: Vec<f64> = epochs.iter().map(|l| number_after(&l[l.find("test Loss").unwrap()..], "Prec@1 ")).collect();
    assert!(tops.iter().all(|t| (0.0..=100.0).contains(t)), "{tops:?}");
    let best = number_after(out.lines().last().unwrap(), "Best accuracy: ");
    assert_eq!(best, tops.iter().cloned().fold(0.0, f64::max), "{out}");
}

#[test]
fn training_is_deterministic_for_a_seed() {
    let dir = cifar10();
    let run = |seed: &str| {
        let out = train(dir.path(), "16", &["--epochs", "2", "-p", "1", "--seed", seed, "--droprate", "0.1"]);
        // Everything but the timings (the estimate is one).
        out.lines()
            .filter(|l| !l.starts_with("Estimate: "))
            .map(|l| {
                l.split("  ").filter(|f| !f.starts_with("Time ") && !f.ends_with(" s)")).collect::<Vec<_>>().join("  ")
            })
            .collect::<Vec<_>>()
    };
    let a = run("3");
    assert_eq!(a, run("3"));
    assert_ne!(a, run("4"));
}

#[test]
fn trains_on_the_host_device_as_on_the_cpu() {
    // The CUDA backend's code (kernels on the host layer, augmentation included) against the
    // CPU backend: the same epoch losses and test precision.
    let dir = cifar10();
    let epochs = |device: &str| {
        let out = train(dir.path(), "16", &["--epochs", "2", "--device", device]);
        assert!(out.contains(&format!("Device: {}", if device == "cpu" { "cpu (" } else { "host device" })), "{out}");
        out.lines().filter(|l| l.starts_with(" * Epoch [")).map(str::to_string).collect::<Vec<_>>()
    };
    let (cpu, host) = (epochs("cpu"), epochs("host"));
    assert_eq!(cpu.len(), 2);
    for (c, h) in cpu.iter().zip(&host) {
        for key in ["train Loss ", "test Loss "] {
            let (a, b) = (number_after(&c[c.find(key).unwrap()..], key), number_after(&h[h.find(key).unwrap()..], key));
            assert!((a - b).abs() <= 2e-3 * a.abs().max(1.0), "{key}: cpu {c} vs host {h}");
        }
    }
}

#[test]
fn trains_on_cifar100_files_given_directly() {
    let dir = TempDir::new().unwrap();
    cifar::write(dir.path(), Format::Cifar100, false, 30, 9);
    let out = train(dir.path(), "7", &["--dataset", "cifar100", "--epochs", "1", "--memory", "naive", "--no-augment"]);
    assert!(out.contains("on CIFAR-100: 30 training and 9 test images"), "{out}");
    assert!(out.contains("Memory plan (naive, f32, batch 7)"), "{out}");
    assert!(out.contains("Epoch: [0][0/5]") && out.contains("Test: [0/2]"), "{out}");
    assert!(out.lines().last().unwrap().starts_with("Best accuracy: "), "{out}");
}

#[test]
fn bad_flags_are_one_line_usage_errors() {
    let dir = cifar10();
    let d = dir.path().to_str().unwrap();
    let cases: &[(&[&str], &str)] = &[
        (&["-b", "0"], "--batch-size"),
        (&["--lr", "-0.1"], "--lr"),
        (&["--lr", "NaN"], "must be a finite number"),
        (&["--wd", "-1"], "--weight-decay"),
        (&["--momentum", "1.5"], "--momentum"),
        (&["--epochs", "0"], "--epochs"),
        (&["--print-freq", "0"], "--print-freq"),
        (&["--layers", "11"], "depth 11 does not fit"),
        (&["--layers", "41", "--no-bottleneck"], "3n+4"),
        (&["--growth", "0"], "growth"),
        (&["--reduce", "1.5"], "reduction"),
        (&["--droprate", "1"], "dropout"),
        (&["--dataset", "mnist"], "unknown dataset 'mnist'"),
        (&["--device", "tpu"], "expected auto, cpu, cuda, cuda:N or host"),
        (&["--device", "cuda:x"], "expected auto, cpu, cuda, cuda:N or host"),
        (&["--memory", "tiny"], "unknown memory mode 'tiny'"),
        (&["--start-epoch", "3", "--epochs", "3"], "nothing to train"),
        (&["--epoch", "3"], "'--epochs'"),
        (&["--resume", "x", "--init-weights", "y"], "cannot be used with"),
        (&["--name", "a/b"], "plain folder name"),
        (&["--arch", "densenet121", "--reduce", "1"], "cannot be used with"),
        (&["--arch", "densenet121", "--num-classes", "100"], "predicts 100 classes; CIFAR-10 has 10"),
        (&["--arch", "densenet121", "--image-size", "240"], "image size 240 must be a multiple of 32"),
        (&["--image-size", "36"], "image size 36 must be a multiple of 32"),
    ];
    for (flags, needle) in cases {
        let mut args = vec!["train", "--data-dir", d];
        args.extend(*flags);
        assert_fails(&args, 2, needle);
    }
    assert_fails(&["memory", "--memory", "some"], 2, "expected naive, shared, minimal or all");
    assert_fails(&["memory", "--layers", "7"], 2, "depth 7");
    assert_fails(&["fly"], 2, "unrecognized subcommand 'fly'");
}

#[test]
fn missing_data_says_what_is_expected_and_where_to_get_it() {
    let dir = TempDir::new().unwrap();
    let d = dir.path().to_str().unwrap();
    assert_fails(&["train", "--data-dir", d], 1, "CIFAR-10 not found in");
    let out = densenet(&["train", "--data-dir", d, "--dataset", "cifar100"]);
    let err = stderr(&out);
    for part in [
        "cifar-100-binary/",
        "train.bin and test.bin",
        "cifar-100-binary.tar.gz",
        "https://www.cs.toronto.edu/~kriz/cifar.html",
    ] {
        assert!(err.contains(part), "'{part}' missing: {err}");
    }

    std::fs::create_dir(dir.path().join("cifar-10-batches-py")).unwrap();
    assert_fails(
        &["train", "--data-dir", d],
        1,
        "cifar-10-batches-py is the Python version; add --download to fetch it",
    );

    let dir = cifar10();
    std::fs::remove_file(dir.path().join("cifar-10-batches-bin/data_batch_4.bin")).unwrap();
    assert_fails(&["train", "--data-dir", dir.path().to_str().unwrap()], 1, "missing CIFAR-10 file");
    assert_fails(&["train", "--data-dir", dir.path().to_str().unwrap()], 1, "data_batch_4.bin");
}

#[test]
fn corrupt_files_are_named() {
    let dir = cifar10();
    let folder = dir.path().join("cifar-10-batches-bin");
    let d = dir.path().to_str().unwrap();

    let file = folder.join("data_batch_3.bin");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    assert_fails(&["train", "--data-dir", d], 1, "data_batch_3.bin: 49068 bytes is not a whole");
    std::fs::write(&file, b"").unwrap();
    assert_fails(&["train", "--data-dir", d], 1, "data_batch_3.bin: 0 bytes");
    std::fs::write(&file, bytes).unwrap();

    let file = folder.join("test_batch.bin");
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[3 * 3073] = 12;
    std::fs::write(&file, bytes).unwrap();
    assert_fails(&["train", "--data-dir", d], 1, "test_batch.bin: record 3 has label 12, outside 0..10");
}

#[test]
fn memory_json_orders_the_modes() {
    let out = densenet(&["memory", "--json", "-b", "32"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    let json: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(json["params"], 769_162);
    assert_eq!(json["batch"], 32);
    let total = |mode: &str| {
        let m = &json["modes"][mode];
        let parts = ["parameters", "gradients", "momentum", "activations", "scratch", "workspace"];
        let sum: u64 = parts.iter().map(|p| m[p].as_u64().unwrap()).sum();
        // Regions never live at once share bytes: the arena is less than its regions' sum, and
        // more than what lives throughout (the parameters, gradients, momentum, workspace).
        let total = m["total_bytes"].as_u64().unwrap();
        let lasting: u64 =
            ["parameters", "gradients", "momentum", "workspace"].iter().map(|p| m[p].as_u64().unwrap()).sum();
        assert!(lasting < total && total < sum, "{mode}: {m}");
        total
    };
    assert!(total("naive") > total("shared") && total("shared") > total("minimal"), "{json}");

    let out = densenet(&["memory", "--json", "--memory", "shared", "--dataset", "cifar100"]);
    let json: serde_json::Value = serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap();
    assert_eq!(json["params"], 800_032);
    assert_eq!(json["modes"].as_object().unwrap().keys().collect::<Vec<_>>(), ["shared"]);
}

/// `--precision`: one precision's plans at the top level, `all` of them side by side.
#[test]
fn memory_plans_each_precision() {
    let json = |args: &[&str]| -> serde_json::Value {
        let out = densenet(args);
        assert!(out.status.success(), "{}", stderr(&out));
        serde_json::from_str(stdout(&out).lines().last().unwrap()).unwrap()
    };
    let one = json(&["memory", "--json", "--precision", "bf16"]);
    assert_eq!(one["precision"], "bf16", "{one}");
    let all = json(&["memory", "--json", "--precision", "all", "--memory", "minimal"]);
    assert!(all.get("modes").is_none() && all.get("floor_bytes").is_none(), "{all}");
    let each = all["precisions"].as_object().unwrap();
    assert_eq!(each.keys().collect::<Vec<_>>(), ["bf16", "f32", "fp16"]);
    assert_eq!(each["bf16"]["modes"]["minimal"], one["modes"]["minimal"]);
    let total = |p: &str| each[p]["modes"]["minimal"]["total_bytes"].as_f64().unwrap();
    assert!(total("bf16") < 0.56 * total("f32") && total("fp16") == total("bf16"), "{all}");
    let out = densenet(&["memory", "--precision", "all", "--memory", "minimal"]);
    let text = stdout(&out);
    for p in ["f32", "bf16", "fp16"] {
        assert!(text.lines().any(|l| l.starts_with(&format!("minimal {p} "))), "{p} row missing:\n{text}");
    }
    assert_fails(&["memory", "--precision", "fp8"], 2, "expected f32, bf16, fp16 or all");
}

#[test]
fn memory_table_has_a_row_per_mode() {
    let out = densenet(&["memory", "--layers", "40", "--no-bottleneck", "--reduce", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    assert!(text.starts_with("DenseNet-40-12, 10 classes, batch 64 of 32x32"), "{text}");
    for mode in ["naive", "shared", "minimal"] {
        assert!(text.lines().any(|l| l.starts_with(mode)), "{mode} row missing:\n{text}");
    }
}

/// `--arch` on `memory` and `bench`: the presets at their sizes and classes, what fits a budget,
/// the paper's largest model, and the flags that do not go with an architecture.
#[test]
fn architectures_plan_and_bench() {
    let json = |args: &[&str]| {
        let out = densenet(args);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_str::<serde_json::Value>(stdout(&out).lines().last().unwrap()).unwrap()
    };
    let j = json(&["memory", "--arch", "densenet264", "-b", "64", "--budget", "16GiB", "--json"]);
    assert_eq!(
        (&j["network"], &j["params"], &j["image_size"]),
        (&"DenseNet-264".into(), &33_337_704.into(), &224.into())
    );
    let fits = |mode: &str| j["modes"][mode]["max_batch"].as_u64().unwrap();
    assert!(fits("naive") < 64 && fits("minimal") > 64 && fits("shared") < fits("minimal"), "{j}");
    let j = json(&["memory", "--arch", "densenet264", "--growth", "48", "--num-classes", "10", "--json"]);
    assert_eq!((&j["network"], &j["params"]), (&"DenseNet-264 (k=48)".into(), &68_693_962.into()));
    let j = json(&["memory", "--arch", "densenet121", "--image-size", "320", "--memory", "minimal", "--json"]);
    let j2 = json(&["memory", "--arch", "densenet121", "--memory", "minimal", "--json"]);
    let total = |j: &serde_json::Value| j["modes"]["minimal"]["activations"].as_u64().unwrap();
    assert!(total(&j) > 2 * total(&j2), "activations grow with the image: {j} {j2}");

    let args = ["bench", "--arch", "densenet121", "--image-size", "64", "-b", "2", "--steps", "1", "--warmup", "0"];
    let j = json(&[&args[..], &["--device", "cpu", "--json"]].concat());
    assert_eq!((&j["network"], &j["image_size"], &j["batch"]), (&"DenseNet-121".into(), &64.into(), &2.into()));
    assert!(j["images_per_s"].as_f64().unwrap() > 0.0);

    for (args, says) in [
        (&["memory", "--arch", "densenet121", "--layers", "40"][..], "cannot be used with"),
        (&["memory", "--arch", "densenet121", "--image-size", "100"], "must be a positive multiple of 32"),
        (&["memory", "--arch", "resnet50"], "unknown architecture 'resnet50'"),
        (&["bench", "--arch", "densenet121", "--num-classes", "0"], "--num-classes"),
    ] {
        let out = densenet(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        let err = stderr(&out);
        assert!(err.contains(says) && err.trim_end().lines().count() == 1, "{args:?}: {err}");
    }
}

#[test]
fn help_lists_the_reference_flags() {
    let out = densenet(&["train", "--help"]);
    assert!(out.status.success());
    let text = stdout(&out);
    for flag in [
        "--epochs",
        "--start-epoch",
        "--batch-size",
        "--lr",
        "--momentum",
        "--weight-decay",
        "--wd",
        "--print-freq",
        "--layers",
        "--growth",
        "--droprate",
        "--no-augment",
        "--reduce",
        "--no-bottleneck",
        "--arch densenet264 --growth 48",
        "--image-size",
        "--num-classes",
        "--name",
        "--dataset",
        "--data-dir",
        "--memory",
        "--seed",
        "--device",
        "--runs-dir",
        "--resume",
        "--init-weights",
        "--tensorboard",
    ] {
        assert!(text.contains(flag), "{flag} missing from help:\n{text}");
    }
}

/// Launcher variables that do not fit are a one-line error before the runs directory is
/// touched; a job of one rank trains as a plain run (docs/launch.md; `tests/launch.rs` runs jobs
/// of several).
#[test]
fn launcher_variables_are_checked() {
    let (data, runs) = (cifar10(), TempDir::new().unwrap());
    let run = |env: &[(&str, &str)]| {
        let mut args = vec!["train", "--data-dir", data.path().to_str().unwrap(), "--device", "cpu"];
        args.extend(["--runs-dir", runs.path().to_str().unwrap(), "--epochs", "1", "-b", "8"]);
        args.extend(TINY);
        std::process::Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(&args)
            .envs(env.iter().copied())
            .output()
            .unwrap()
    };
    let torchrun = [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", "29500"), ("LOCAL_RANK", "1")];
    let srun = [("SLURM_PROCID", "0"), ("SLURM_STEP_NUM_TASKS", "4")];
    for (env, needle) in [
        ([&torchrun[..], &[("RANK", "0"), ("WORLD_SIZE", "two")]].concat(), "WORLD_SIZE=two is not a whole number"),
        ([&torchrun[..], &[("RANK", "2"), ("WORLD_SIZE", "2")]].concat(), "rank 2 of 2"),
        (srun.to_vec(), "srun set no SLURM_JOB_NODELIST"),
    ] {
        run::assert_one_line_error(&run(&env), 1, &[needle], needle);
        assert_eq!(std::fs::read_dir(runs.path()).unwrap().count(), 0, "{needle}: the runs directory was touched");
    }
    let out = run(&[&torchrun[..], &[("RANK", "0"), ("WORLD_SIZE", "1")]].concat());
    assert!(out.status.success(), "a job of one rank: {}", stderr(&out));
}

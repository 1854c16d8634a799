//! End-to-end runs of `densenet eval`, `densenet bench` and `densenet memory --budget` on tiny
//! CIFAR-format data written by the tests: eval reproduces the test precision the training run
//! printed, bench reports sane speed and memory (the measured heap at least the plan, and
//! close to it), the largest batch for a budget is exactly the largest whose plan fits, a
//! fine-tuning start says that its classifier is new, and every bad input is a one-line error
//! with a non-zero exit and no panic.

mod common;

use common::cifar::{self, Dirs as Setup};
use common::run;

use run::{assert_fails, densenet};
use serde_json::Value;
use std::path::{Path, PathBuf};
use tempfile::TempDir;

/// A depth-10 bottleneck network (one layer per block) at batch 8.
const TINY: [&str; 6] = ["--layers", "10", "--growth", "4", "-b", "8"];

/// Runs the binary, asserts success and returns stdout.
fn ok(args: &[&str]) -> String {
    let out = densenet(args);
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(out.status.success(), "{args:?} failed:\n{text}{}", String::from_utf8_lossy(&out.stderr));
    text
}

/// The JSON object on the last line of stdout.
fn last_json(text: &str) -> Value {
    let last = text.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(last).unwrap_or_else(|e| panic!("last line is not JSON ({e}):\n{text}"));
    assert!(json.is_object(), "{json}");
    json
}

/// Runs the binary with `args` (`--json` added), asserts success and returns the JSON object.
fn run_json(args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.push("--json");
    last_json(&ok(&args))
}

/// Tiny data sets and a runs directory, all temporary: CIFAR-10 with 80 training and 20 test
/// records, and CIFAR-100 with 30 and 9 beside it.
fn setup() -> Setup {
    Setup::new(&[(cifar::Format::Cifar10, 80, 20), (cifar::Format::Cifar100, 30, 9)])
}

impl Setup {
    fn data(&self) -> &str {
        self.data.path().to_str().unwrap()
    }

    /// Trains the tiny network for one epoch as run `name` with extra flags; returns stdout.
    fn train(&self, name: &str, extra: &[&str]) -> String {
        let mut args = vec!["train", "--data-dir", self.data(), "--runs-dir", self.runs.path().to_str().unwrap()];
        args.extend(["--name", name, "--epochs", "1", "--device", "cpu"]);
        args.extend(TINY);
        args.extend(extra);
        ok(&args)
    }

    fn checkpoint(&self, name: &str, file: &str) -> PathBuf {
        self.runs.path().join(name).join(file)
    }

    /// `densenet eval` of `checkpoint` on the tiny data, with extra flags.
    fn eval_args<'a>(&'a self, checkpoint: &'a Path, extra: &[&'a str]) -> Vec<&'a str> {
        let mut args = vec!["eval", "--checkpoint", checkpoint.to_str().unwrap(), "--data-dir", self.data()];
        if !extra.contains(&"--device") {
            args.extend(["--device", "cpu"]);
        }
        args.extend(extra);
        args
    }
}

/// The word after `key` in `line`.
fn word_after<'a>(line: &'a str, key: &str) -> &'a str {
    let rest = &line[line.find(key).unwrap_or_else(|| panic!("no '{key}' in '{line}'")) + key.len()..];
    rest.split_whitespace().next().unwrap()
}

#[test]
fn eval_reproduces_the_test_precision_of_training() {
    let s = setup();
    let out = s.train("t", &[]);
    let line = out.lines().find(|l| l.starts_with(" * Epoch [0]")).unwrap_or_else(|| panic!("{out}"));
    let test = &line[line.find("test Loss").unwrap()..];
    let (loss, top1) = (word_after(test, "Loss "), word_after(test, "Prec@1 "));

    let ck = s.checkpoint("t", "checkpoint.safetensors");
    let text = ok(&s.eval_args(&ck, &["-b", "8", "--json"]));
    for expect in [
        format!(
            "DenseNet-BC-10-4 from {} (next epoch 1, step 10, best Prec@1 {top1}) on CIFAR-10: 20 test images",
            ck.display()
        ),
        "Device: cpu (".to_string(),
        "Test: [0/3]".to_string(),
        format!(" * Test Loss {loss}  Prec@1 {top1}  Error "),
    ] {
        assert!(text.contains(&expect), "'{expect}' missing from:\n{text}");
    }
    let json = last_json(&text);
    let keys: Vec<&String> = json.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error", "loss", "top1"], "{json}");
    let (l, t, e) = (json["loss"].as_f64().unwrap(), json["top1"].as_f64().unwrap(), json["error"].as_f64().unwrap());
    assert_eq!((format!("{l:.4}"), format!("{t:.3}")), (loss.to_string(), top1.to_string()), "{json} vs\n{out}");
    assert!((t + e - 100.0).abs() < 1e-9 && (0.0..=100.0).contains(&t), "{json}");

    // Another batch size and the explicit dataset: the same precision (running statistics make
    // each image's prediction independent of its batch), the same loss up to rounding.
    let other = run_json(&s.eval_args(&ck, &["-b", "5", "--dataset", "cifar10", "-p", "1"]));
    assert_eq!(other["top1"].as_f64(), Some(t));
    assert!((other["loss"].as_f64().unwrap() - l).abs() < 1e-5, "{other} vs {json}");
    // After one epoch the best checkpoint is the same model.
    let best = run_json(&s.eval_args(&s.checkpoint("t", "model_best.safetensors"), &["-b", "8"]));
    assert_eq!(best, json);
    // A run directory stands for its best checkpoint.
    let run = s.runs.path().join("t");
    let text = ok(&s.eval_args(&run, &["-b", "8", "--json"]));
    assert!(text.contains(&format!("from {} (next epoch 1", run.join("model_best.safetensors").display())), "{text}");
    assert_eq!(last_json(&text), json);
}

#[test]
fn eval_takes_the_dataset_from_the_checkpoint() {
    let s = setup();
    let out = s.train("c100", &["--dataset", "cifar100"]);
    let ck = s.checkpoint("c100", "model_best.safetensors");
    let text = ok(&s.eval_args(&ck, &["-b", "8", "--json"]));
    assert!(text.contains("on CIFAR-100: 9 test images"), "{text}");
    let top1 = last_json(&text)["top1"].as_f64().unwrap();
    let line = out.lines().find(|l| l.starts_with(" * Epoch [0]")).unwrap();
    assert_eq!(format!("{top1:.3}"), word_after(&line[line.find("test Loss").unwrap()..], "Prec@1 "));

    assert_fails(
        &s.eval_args(&ck, &["--dataset", "cifar10"]),
        1,
        "holds DenseNet-BC-10-4 for 100 classes (CIFAR-100); --dataset cifar10 has 10",
    );
}

/// A fine-tuning start: the weights of a CIFAR-100 run start a CIFAR-10 run, whose classifier
/// is its own initialization, and the start-up says so.
#[test]
fn init_weights_of_another_class_count_start_a_new_classifier() {
    let s = setup();
    s.train("c100", &["--dataset", "cifar100"]);
    let ck = s.checkpoint("c100", "model_best.safetensors");
    let out = s.train("c10", &["--init-weights", ck.to_str().unwrap()]);
    assert!(out.contains("\nClassifier re-initialized for 10 classes (the file's has 100)\n"), "{out}");
}

#[test]
fn eval_refuses_bad_checkpoints_and_missing_data() {
    let s = setup();
    s.train("t", &[]);
    let dir = s.runs.path();
    let missing = dir.join("missing.safetensors");
    assert_fails(&s.eval_args(&missing, &[]), 1, &format!("cannot read {}", missing.display()));
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not a checkpoint at all\n".repeat(20)).unwrap();
    assert_fails(&s.eval_args(&garbage, &[]), 1, "not a valid safetensors file");
    let ck = s.checkpoint("t", "checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let truncated = dir.join("truncated.safetensors");
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    assert_fails(&s.eval_args(&truncated, &[]), 1, "truncated.safetensors: not a valid safetensors file");
    // Tensors without checkpoint metadata (a converted state dict): no network description.
    let plain = dir.join("plain.safetensors");
    let one = 1f32.to_le_bytes();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1], &one).unwrap();
    std::fs::write(&plain, safetensors::serialize([("fc.bias", view)], None).unwrap()).unwrap();
    assert_fails(&s.eval_args(&plain, &[]), 1, "not a densenet checkpoint");
    // A directory stands for its model_best.safetensors (tested with a run's below).
    let empty_run = dir.join("empty-run");
    std::fs::create_dir(&empty_run).unwrap();
    assert_fails(
        &s.eval_args(&empty_run, &[]),
        1,
        &format!("cannot read {}", empty_run.join("model_best.safetensors").display()),
    );
    // Not regular files: refused before they are opened (a FIFO would block, a device never ends).
    let fifo = dir.join("fifo.safetensors");
    assert!(std::process::Command::new("mkfifo").arg(&fifo).status().unwrap().success(), "mkfifo");
    assert_fails(&s.eval_args(&fifo, &[]), 1, "fifo.safetensors is not a regular file (a FIFO, socket or device)");
    assert_fails(&s.eval_args(Path::new("/dev/zero"), &[]), 1, "/dev/zero is not a regular file");
    let data = s.data().to_string();
    for flag in ["--resume", "--init-weights"] {
        let args = ["train", "--data-dir", &data, "--epochs", "1", flag, "/dev/zero"];
        assert_fails(&args, 1, "/dev/zero is not a regular file");
    }

    let empty = TempDir::new().unwrap();
    let args = ["eval", "--checkpoint", ck.to_str().unwrap(), "--data-dir", empty.path().to_str().unwrap()];
    assert_fails(&args, 1, "CIFAR-10 not found in");
    assert_fails(&["eval"], 2, "the following required arguments were not provided: --checkpoint <PATH>");
    assert_fails(&s.eval_args(&ck, &["-b", "0"]), 2, "--batch-size");
    assert_fails(&s.eval_args(&ck, &["--dataset", "mnist"]), 2, "unknown dataset 'mnist'");
    assert_fails(&s.eval_args(&ck, &["--device", "gpu"]), 2, "expected auto, cpu, cuda, cuda:N or host");
}

/// `memory` of the tiny network with extra flags (a `-b` among them replaces batch 8), as JSON.
fn memory(extra: &[&str]) -> Value {
    let mut args = vec!["memory"];
    args.extend(if extra.contains(&"-b") { &TINY[..4] } else { &TINY[..] });
    args.extend(extra);
    run_json(&args)
}

#[test]
fn bench_reports_speed_and_memory() {
    for mode in ["minimal", "naive"] {
        let mut args = vec!["bench", "--steps", "2", "--warmup", "1", "--memory", mode, "--device", "cpu"];
        args.extend(TINY);
        args.push("--json");
        let text = ok(&args);
        for expect in ["Memory plan (", "Warm-up step 1/1: ", "Step 2/2: ", "Median step ", "Peak heap "] {
            assert!(text.contains(expect), "'{expect}' missing from:\n{text}");
        }
        let j = last_json(&text);
        assert!(j["device"].as_str().unwrap().starts_with("cpu"), "{j}");
        assert_eq!((j["memory"].as_str(), j["batch"].as_u64()), (Some(mode), Some(8)), "{j}");
        let (rate, ms) = (j["images_per_s"].as_f64().unwrap(), j["step_ms"].as_f64().unwrap());
        assert!(rate.is_finite() && rate > 0.0 && ms > 0.0, "{j}");
        assert!((rate * ms / 1e3 - 8.0).abs() < 1e-6, "images/s and step time disagree: {j}");

        // The plan is what `memory` prints; the heap measured covers it, with little beyond.
        let planned = j["planned_peak_bytes"].as_u64().unwrap();
        let total = memory(&["--memory", mode])["modes"][mode]["total_bytes"].as_u64();
        assert_eq!(Some(planned), total, "{j}");
        let measured = j["measured_peak_bytes"].as_u64().unwrap();
        assert!(measured >= planned && measured <= planned + (16 << 20), "{j}");
        let rss = j["peak_rss_bytes"].as_u64().unwrap();
        if cfg!(target_os = "linux") {
            assert!(rss >= planned, "the arena is written, so resident: {j}");
        }
    }
}

/// `bench --precision`: the CPU backend runs a 16-bit plan, which `memory` gives for that
/// precision, and so does the host device; an unknown precision is a one-line error.
#[test]
fn bench_runs_sixteen_bit_plans_on_the_cpu() {
    let mut args = vec!["bench", "--steps", "2", "--warmup", "1", "--device", "cpu", "--precision", "bf16"];
    args.extend(TINY);
    args.push("--json");
    let text = ok(&args);
    assert!(text.contains("Memory plan (minimal, bf16, batch 8)"), "{text}");
    let j = last_json(&text);
    let planned = j["planned_peak_bytes"].as_u64().unwrap();
    assert_eq!(Some(planned), memory(&["--precision", "bf16"])["modes"]["minimal"]["total_bytes"].as_u64(), "{j}");
    let f32 = memory(&[])["modes"]["minimal"]["total_bytes"].as_u64().unwrap();
    // The tiny network's parameters (f32 in every precision) weigh more than its tensors.
    assert!(planned < f32 * 8 / 10, "bf16 plans {planned} bytes against f32's {f32}");
    assert!(j["images_per_s"].as_f64().unwrap() > 0.0, "{j}");
    let mut host = vec!["bench", "--steps", "1", "--warmup", "0", "--device", "host", "--precision", "fp16"];
    host.extend(TINY);
    assert!(ok(&host).contains("Memory plan (minimal, fp16, batch 8)"));
    assert_fails(&["bench", "--precision", "fp8"], 2, "unknown precision 'fp8' (f32, bf16, fp16)");
}

#[test]
fn bench_refuses_bad_flags() {
    assert_fails(&["bench", "--steps", "0"], 2, "--steps");
    assert_fails(&["bench", "--steps", "-3"], 2, "must be a whole number from 1 to");
    assert_fails(&["bench", "--warmup", "-1"], 2, "--warmup");
    assert_fails(&["bench", "--layers", "11"], 2, "depth 11 does not fit");
    assert_fails(&["bench", "-b", "0"], 2, "--batch-size");
    assert_fails(&["bench", "--memory", "tiny"], 2, "unknown memory mode 'tiny'");
}

#[test]
fn bench_runs_the_cuda_backend_on_the_host_device() {
    let mut args = vec!["bench", "--device", "host", "--steps", "2", "--warmup", "1"];
    args.extend(TINY);
    let j = run_json(&args);
    assert!(j["device"].as_str().unwrap().starts_with("host device"), "{j}");
    // The device allocation is the plan, exactly.
    assert_eq!(j["device_allocated_bytes"], j["planned_peak_bytes"], "{j}");
    assert!(j["images_per_s"].as_f64().unwrap() > 0.0, "{j}");
    // Through the boxed backend the commands open, the recorded step is replayed.
    assert_eq!(j["graphs"], "replayed", "{j}");
}

#[test]
fn cuda_without_a_usable_gpu_is_a_one_line_error() {
    let mut args = vec!["bench", "--steps", "1", "--warmup", "0"];
    args.extend(TINY);
    let Err(e) = densenet::backend::cuda::GpuExec::new(0) else {
        eprintln!("SKIPPED cuda_without_a_usable_gpu_is_a_one_line_error: this machine has a usable GPU");
        let text = ok(&args);
        assert!(text.contains("Device: cuda:0 (") && text.contains(") (auto)"), "auto picks the GPU:\n{text}");
        return;
    };
    // Flags and files are checked first; then the device.
    let s = setup();
    s.train("t", &[]);
    let ck = s.checkpoint("t", "checkpoint.safetensors");
    for args in [
        &["bench", "--device", "cuda"][..],
        &["train", "--device", "cuda:0", "--data-dir", s.data()],
        &s.eval_args(&ck, &["--device", "cuda"]),
    ] {
        assert_fails(args, 1, &e.0);
    }
    assert_fails(&["bench", "--device", "cuda", "--layers", "11"], 2, "depth 11 does not fit");
    // auto falls back to the CPU, briefly; -v says why.
    let text = ok(&args);
    let line = format!("Device: cpu ({} threads) (auto: no usable GPU; -v says why)\n", num_threads());
    assert!(text.contains(&line), "{text}");
    let verbose: Vec<&str> = args.iter().copied().chain(["-v"]).collect();
    let text = ok(&verbose);
    assert!(text.contains(&format!("Device: cpu ({} threads) (auto, no usable GPU: {e})", num_threads())), "{text}");
}

/// Threads of the CPU backend in a fresh process (rayon's default pool).
fn num_threads() -> usize {
    std::env::var("RAYON_NUM_THREADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|&n| n > 0)
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()))
}

/// The largest batch per mode for `budget`.
fn max_batches(budget: &str) -> [Option<u64>; 3] {
    let j = memory(&["--budget", budget]);
    ["naive", "shared", "minimal"].map(|m| {
        let v = &j["modes"][m]["max_batch"];
        assert!(v.is_u64() || v.is_null(), "{m}: {j}");
        v.as_u64()
    })
}

#[test]
fn the_budget_gives_the_largest_batch_that_fits() {
    let budget = 10_000_000;
    let [naive, shared, minimal] = max_batches("10MB").map(Option::unwrap);
    // This one-layer-per-block network recomputes almost nothing: minimal is shared's size.
    assert!(minimal >= shared && shared > naive, "{minimal} {shared} {naive}");
    for (mode, n) in [("naive", naive), ("shared", shared), ("minimal", minimal)] {
        let total = |batch: u64| {
            let j = memory(&["--memory", mode, "-b", &batch.to_string()]);
            j["modes"][mode]["total_bytes"].as_u64().unwrap()
        };
        assert!(total(n) <= budget, "{mode}: batch {n} does not fit");
        assert!(total(n + 1) > budget, "{mode}: batch {} fits too", n + 1);
    }
    let bigger = max_batches("20MB").map(Option::unwrap);
    assert!(bigger[0] > naive && bigger[1] > shared && bigger[2] > minimal, "{bigger:?}");
    // Nothing fits, and a budget beyond every accepted batch.
    assert_eq!(max_batches("1KB"), [None; 3]);
    assert_eq!(max_batches("1000TiB"), [Some(1 << 24); 3]);

    // Only the modes asked for; the table has the column.
    let j = memory(&["--budget", "10MB", "--memory", "shared"]);
    assert_eq!(j["modes"].as_object().unwrap().keys().collect::<Vec<_>>(), ["shared"]);
    assert_eq!(j["modes"]["shared"]["max_batch"].as_u64(), Some(shared));
    let mut args = vec!["memory", "--budget", "10MB"];
    args.extend(TINY);
    let table = ok(&args);
    assert!(table.contains("Budget 10000000 bytes (9.5 MiB)") && table.contains("max batch"), "{table}");
    let row = table.lines().find(|l| l.starts_with("minimal")).unwrap();
    assert!(row.ends_with(&format!(" {minimal}")), "{table}");
    args[2] = "1KB";
    assert!(ok(&args).lines().filter(|l| l.ends_with("none fits")).count() == 3);
    // Without --budget, no max_batch.
    assert!(memory(&[])["modes"]["minimal"].get("max_batch").is_none());
}

/// `--nproc N` plans one rank: its shard of the global batch and the collectives' scratch
/// ((N + 1) x 2 floats per channel of the widest BN); the budget's batch is global.
#[test]
fn memory_plans_one_rank_of_a_job() {
    let total = |j: &Value| j["modes"]["minimal"]["total_bytes"].as_u64().unwrap();
    let (one, rank) = (memory(&["-b", "4"]), memory(&["-b", "7", "--nproc", "2"]));
    assert_eq!(
        (rank["ranks"].as_u64(), rank["batch"].as_u64(), memory(&[])["ranks"].as_u64()),
        (Some(2), Some(7), Some(1))
    );
    let scratch = total(&rank) - total(&one);
    assert!(scratch > 0 && scratch < 64 << 10, "{scratch} bytes of scratch");
    let per = memory(&["--budget", "10MB"])["modes"]["minimal"]["max_batch"].as_u64().unwrap();
    let global = memory(&["--budget", "10MB", "--nproc", "3"])["modes"]["minimal"]["max_batch"].as_u64().unwrap();
    assert!(
        global.is_multiple_of(3) && global / 3 <= per && global / 3 + 1 >= per,
        "{global} over 3 ranks, {per} alone"
    );
    assert_fails(&["memory", "-b", "2", "--nproc", "3"], 2, "a batch of 2 leaves a rank of 3 without an image");
}

#[test]
fn budget_sizes_take_decimal_and_binary_units() {
    let cases: [(&str, u64); 12] = [
        ("4GiB", 4 << 30),
        ("512MB", 512_000_000),
        ("1.5GB", 1_500_000_000),
        ("1000000", 1_000_000),
        ("7B", 7),
        ("2kib", 2048),
        ("1.5 KiB", 1536),
        ("0.5TB", 500_000_000_000),
        ("3TiB", 3 << 40),
        ("2mIb", 2 << 20),
        (".25kB", 250),
        ("1.0010KB", 1001),
    ];
    for (size, bytes) in cases {
        assert_eq!(memory(&["--budget", size])["budget_bytes"].as_u64(), Some(bytes), "{size}");
    }
    for bad in ["4XB", "lots", "GB", "1..5GB", "1.5.2MB", "-1GB", "", "4 G", "1e9"] {
        assert_fails(&["memory", "--budget", bad], 2, "invalid value");
        assert_fails(&["memory", "--budget", bad], 2, "expected a size such as 4GiB");
    }
    assert_fails(&["memory", "--budget", "0"], 2, "less than one byte");
    // A fraction of a byte is not a size.
    for bad in ["0.1B", "10.5", "1.0009KB", "1.3kib"] {
        assert_fails(&["memory", "--budget", bad], 2, "is not a whole number of bytes");
    }
    assert_fails(&["memory", "--budget", "99999999999TiB"], 2, "too large");
}

/// One writer per run: while a run trains, a second `train` of the same name and a resume of
/// it are refused, naming the holder; once the holder is killed (the kernel releases its lock)
/// the run directory can be taken again.
#[test]
fn a_run_directory_has_one_writer() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let s = setup();
    let runs = s.runs.path().to_str().unwrap();
    let mut args = vec!["train", "--data-dir", s.data(), "--runs-dir", runs, "--name", "busy", "--device", "cpu"];
    args.extend(TINY);
    let mut first = Command::new(env!("CARGO_BIN_EXE_densenet"))
        .args(&args)
        .args(["--epochs", "100000"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let dir = s.runs.path().join("busy");
    let holder = format!("process {} on ", first.id());
    let deadline = Instant::now() + Duration::from_secs(120);
    // The first epoch's checkpoint exists, so that a resume gets as far as the lock.
    while !(std::fs::read_to_string(dir.join("train.lock")).unwrap_or_default().contains(&holder)
        && dir.join("checkpoint.safetensors").exists())
    {
        assert!(Instant::now() < deadline, "the first run did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    let refused = format!("run 'busy' is in use by {holder}");
    let again: Vec<&str> = args.iter().copied().chain(["--epochs", "3"]).collect();
    assert_fails(&again, 1, &refused);
    let ck = dir.join("checkpoint.safetensors");
    // The resume of its recipe (--epochs 100000 and all) gets as far as the lock.
    let resume: Vec<&str> = args.iter().copied().chain(["--resume", ck.to_str().unwrap()]).collect();
    assert_fails(&resume, 1, &refused);
    first.kill().unwrap();
    first.wait().unwrap();
    // Free again: a new run of that name now meets the earlier run's files, not the lock.
    assert_fails(&again, 1, "already exists from an earlier run named 'busy'");
}

/// A repeated flag takes its last value, as argparse does, so a script can append overrides.
#[test]
fn a_repeated_flag_takes_its_last_value() {
    let once = memory(&["--layers", "100", "-b", "32"]);
    let twice = memory(&["--layers", "40", "-b", "8", "--layers", "100", "-b", "32"]);
    assert_eq!(once, twice);
    assert_eq!(twice["batch"], 32);
}

/// A closed stdout (`densenet train | head`) does not stop training: the run goes on to its
/// last checkpoint and exits 0; `eval | head -1` ends quietly.
#[test]
fn a_closed_stdout_stops_nothing() {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let s = setup();
    let runs = s.runs.path().to_str().unwrap();
    let run = |args: &[&str]| {
        let mut child = Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Read one line, as `head -1` does, then close the pipe.
        let mut first = String::new();
        BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
        let out = child.wait_with_output().unwrap();
        (first, out)
    };
    let mut train = vec!["train", "--data-dir", s.data(), "--runs-dir", runs, "--name", "piped", "--device", "cpu"];
    train.extend(TINY);
    // More output than a pipe holds (64 KiB): the run writes into the closed pipe for sure.
    train.extend(["--epochs", "60", "-p", "1"]);
    let (first, out) = run(&train);
    assert!(!first.is_empty());
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ck = s.checkpoint("piped", "checkpoint.safetensors");
    let meta = safetensors::SafeTensors::read_metadata(&std::fs::read(&ck).unwrap()).unwrap().1;
    assert_eq!(meta.metadata().as_ref().unwrap()["epoch"], "60", "training stopped early");
    let (first, out) = run(&s.eval_args(&ck, &[]));
    assert!(!first.is_empty());
    assert!(out.status.success() && out.stderr.is_empty(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// SIGTERM and SIGINT stop a run after its current step: exit 143 or 130, one line naming the
/// last checkpoint and the exact command that resumes it, which does (here with
/// `--change-recipe --epochs` appended, so that it ends soon).
#[test]
fn a_signal_stops_the_run_and_says_how_to_resume() {
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};
    let s = setup();
    let runs = s.runs.path().to_str().unwrap();
    for (signal, status) in [("TERM", 143), ("INT", 130)] {
        let name = format!("sig{signal}");
        let mut args = vec!["train", "--data-dir", s.data(), "--runs-dir", runs, "--name", &name, "--device", "cpu"];
        args.extend(TINY);
        args.extend(["--epochs", "100000"]);
        let child = Command::new(env!("CARGO_BIN_EXE_densenet"))
            .args(&args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let ck = s.checkpoint(&name, "checkpoint.safetensors");
        let deadline = Instant::now() + Duration::from_secs(120);
        while !ck.exists() {
            assert!(Instant::now() < deadline, "no checkpoint");
            std::thread::sleep(Duration::from_millis(20));
        }
        let kill = Command::new("kill").args([&format!("-{signal}"), &child.id().to_string()]).status().unwrap();
        assert!(kill.success());
        let out = child.wait_with_output().unwrap();
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(out.status.code(), Some(status), "{err}");
        let line = err.lines().last().unwrap();
        assert!(
            line.starts_with(&format!("error: interrupted by SIG{signal}: the last checkpoint is {}", ck.display()))
        );
        let resume = line.split_once("resume with: ").expect("the resume command").1;
        assert!(resume.ends_with(&format!("--resume {}", ck.display())), "{line}");
        let meta = safetensors::SafeTensors::read_metadata(&std::fs::read(&ck).unwrap()).unwrap().1;
        let next: usize = meta.metadata().as_ref().unwrap()["epoch"].parse().unwrap();
        let again = Command::new("sh")
            .arg("-c")
            .arg(format!("{resume} --change-recipe --epochs {}", next + 1))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&again.stdout);
        assert!(again.status.success(), "{resume}: {}", String::from_utf8_lossy(&again.stderr));
        assert!(text.contains(&format!("Resumed from {}: epoch {next}", ck.display())), "{text}");
    }
}

/// `--arch`: DenseNet-121 trains on the tiny CIFAR-10 at its own 32x32, its checkpoint records
/// the architecture and image size as recipe, and `eval` gives the training run's test
/// precision from the checkpoint's metadata and from its weights read by `--arch`.
#[test]
fn an_architecture_trains_and_evaluates() {
    let s = setup();
    let runs = s.runs.path().to_str().unwrap();
    let common = ["--data-dir", s.data(), "--runs-dir", runs, "--device", "cpu", "-b", "16"];
    let out = ok(&[&["train", "--arch", "densenet121", "--image-size", "32", "--epochs", "1"][..], &common].concat());
    assert!(out.starts_with("DenseNet-121 (run DenseNet_BC_100_12) on CIFAR-10: 80 training"), "{out}");
    assert!(out.contains("Number of model parameters: 6964106"), "{out}");
    let line = out.lines().find(|l| l.starts_with(" * Epoch [0]")).unwrap_or_else(|| panic!("{out}"));
    let top1 = word_after(&line[line.find("test Loss").unwrap()..], "Prec@1 ");

    let ck = s.checkpoint("DenseNet_BC_100_12", "checkpoint.safetensors");
    let bytes = std::fs::read(&ck).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let recipe: Value = serde_json::from_str(&header.metadata().as_ref().unwrap()["recipe"]).unwrap();
    assert_eq!((&recipe["arch"], &recipe["image_size"]), (&"densenet121".into(), &32.into()), "{recipe}");
    assert_eq!(recipe["network"]["num_classes"], 10);

    let from_meta = run_json(&s.eval_args(&ck, &["-b", "16"]));
    assert_eq!(format!("{:.3}", from_meta["top1"].as_f64().unwrap()), top1);
    let by_arch = ["--arch", "densenet121", "--image-size", "32", "-b", "16"];
    let text = ok(&[&s.eval_args(&ck, &by_arch)[..], &["--json"]].concat());
    assert!(text.starts_with(&format!("DenseNet-121 from {} (weights) on CIFAR-10", ck.display())), "{text}");
    assert_eq!(last_json(&text), from_meta);
    assert_fails(
        &s.eval_args(&ck, &["--arch", "densenet169", "--image-size", "32"]),
        1,
        "(the file holds DenseNet-121)",
    );
    assert_fails(&s.eval_args(&ck, &["--arch", "densenet121", "--num-classes", "7"]), 2, "predicts 7 classes");
    let other = ["--arch", "densenet121", "--image-size", "32", "--dataset", "cifar100"];
    assert_fails(&s.eval_args(&ck, &other), 1, "its classifier predicts 10 classes; CIFAR-100 has 100");

    // The image size is recipe a resume may change: the images are upsampled 2x from there on,
    // and the checkpoint's size is the one eval takes.
    let ck_arg = ck.to_str().unwrap();
    let resume = ["train", "--resume", ck_arg, "--change-recipe", "--epochs", "2", "--image-size", "64"];
    let out = ok(&[&resume[..], &common].concat());
    assert!(out.contains("80 training and 20 test images from") && out.contains(", upsampled 2x to 64x64"), "{out}");
    assert!(out.contains("Recipe change from epoch 1: --image-size 32 -> 64"), "{out}");
    let text = ok(&s.eval_args(&ck, &["-b", "16"]));
    assert!(text.contains(", upsampled 2x to 64x64"), "{text}");
    assert_fails(&[&resume[..2], &[ck_arg, "--layers", "40"], &common].concat(), 2, "--layers shapes a CIFAR network");

    // Its weights in torchvision's names start a CIFAR-100 run: every tensor but the classifier.
    let tv = s.runs.path().join("tv.safetensors");
    ok(&["export", ck_arg, "-o", tv.to_str().unwrap(), "--torchvision"]);
    let start = ["train", "--arch", "densenet121", "--image-size", "32", "--dataset", "cifar100", "--name", "c100"];
    let out = ok(&[&start[..], &["--epochs", "1", "--init-weights", tv.to_str().unwrap()], &common].concat());
    for line in
        ["Initial weights in torchvision names", "Classifier re-initialized for 100 classes (the file's has 10)"]
    {
        assert!(out.contains(line), "'{line}' missing from:\n{out}");
    }
}

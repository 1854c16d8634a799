//! A whole training step of the CUDA backend against the CPU backend in every memory mode
//! (loss, logits, every gradient, running statistics, weights and momentum after SGD, eval),
//! two runs bitwise identical, and a replayed graph equal to the eager step. Runs on the host
//! device in every `cargo test`, and on GPU 0 when there is one.

#[macro_use]
mod common;

use densenet::backend::cuda::{CudaBackend, Exec, FUSED_CHUNK};
use densenet::backend::{Backend, ConvSpec, Sgd, Span, View};
use densenet::config::NetConfig;
use densenet::model::plan::Mode;
use densenet::model::Model;

/// Relative tolerance against the CPU, for each tensor: largest error over largest magnitude,
/// and Euclidean norm of the error over that of the tensor.
const TOL: f32 = 1e-4;

/// What a step leaves behind, for comparisons.
#[derive(PartialEq, Debug)]
struct Outcome {
    losses: Vec<f32>,
    correct: Vec<usize>,
    logits: Vec<f32>,
    grads: Vec<f32>,
    stats: Vec<f32>,
    params: Vec<f32>,
    momentum: Vec<f32>,
}

/// Two training steps and an evaluation on a fixed batch.
fn steps<B: Backend>(mut m: Model<B>, n: usize, h: usize) -> Outcome {
    let (images, labels) = common::batch(7, n, h, h, m.config().num_classes);
    let mut o = Outcome {
        losses: vec![],
        correct: vec![],
        logits: vec![],
        grads: vec![],
        stats: vec![],
        params: vec![],
        momentum: vec![],
    };
    for _ in 0..2 {
        let s = m.train_step(&images, &labels, Sgd::default()).unwrap();
        o.losses.push(s.loss);
        o.correct.push(s.correct);
    }
    o.logits = m.logits(n);
    o.grads = m.grads();
    let e = m.evaluate(&images, &labels).unwrap();
    o.losses.push(e.loss);
    o.logits.extend(m.logits(n));
    (o.stats, o.params, o.momentum) = (m.running_stats(), m.params(), m.momentum());
    o
}

/// Largest |a - b| over the largest |b|.
fn rel_inf(a: &[f32], b: &[f32]) -> f32 {
    let err = a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max);
    err / b.iter().map(|y| y.abs()).fold(f32::MIN_POSITIVE, f32::max)
}

fn compare(what: &str, got: &Outcome, want: &Outcome) {
    compare_within(what, got, want, TOL);
}

fn compare_within(what: &str, got: &Outcome, want: &Outcome, tol: f32) {
    assert_eq!(got.correct, want.correct, "{what}: correct counts");
    for (name, a, b) in [
        ("losses", &got.losses, &want.losses),
        ("logits", &got.logits, &want.logits),
        ("grads", &got.grads, &want.grads),
        ("running stats", &got.stats, &want.stats),
        ("params", &got.params, &want.params),
        ("momentum", &got.momentum, &want.momentum),
    ] {
        let (e, n) = (rel_inf(a, b), common::norm_rel(a, b));
        eprintln!("{what}: {name} rel_inf {e:.2e} norm_rel {n:.2e}");
        assert!(e < tol && n < tol as f64, "{what}: {name} differ by {e} (largest) and {n} (norm)");
    }
}

fn configs() -> Vec<(NetConfig, usize, usize)> {
    vec![
        (NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap(), 16, 3),
        (NetConfig::cifar(13, 3, false, 0.5, 0.2, 7).unwrap(), 8, 2),
        (common::tiny_imagenet([1, 2, 1, 1], 5), 64, 1),
        // Two fused-convolution chunks.
        (NetConfig::cifar(10, 3, true, 0.5, 0.0, 4).unwrap(), 4, FUSED_CHUNK + 2),
    ]
}

fn step_matches_the_cpu<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (cfg, h, n) in configs() {
        for mode in Mode::ALL {
            let cpu = steps(common::model(&cfg, n, h, h, mode, 11), n, h);
            let dev = steps(Model::new(cfg.clone(), n, h, h, mode, 11, make()).unwrap(), n, h);
            compare(&format!("{mode} {:?} {h}x{h} batch {n}", cfg.block_layers), &dev, &cpu);
        }
    }
}
on_devices!(training_step_matches_the_cpu, step_matches_the_cpu);

/// The host device's 16-bit steps (its kernels on bf16 and f16 tensors, docs/precision.md)
/// against the CPU backend's, two steps and an evaluation in every memory mode. Where no value
/// lands near a 16-bit rounding boundary the two agree as in f32 (bf16 on the CIFAR networks:
/// within 1e-7); where one does (a BN backward sums in another order, the max pool's backward
/// adds in f32 where the CPU adds in 16 bits) the step moves apart: measured up to 9.6e-4 in
/// the losses, 6.4e-3 in the logits, 5.1e-3 in the weights and 0.185 (in norm) in the
/// gradients, on the ImageNet stem at batch 1 in bf16. The bound is about twice those; the
/// ops themselves are checked bit for bit (tests/cuda_ops.rs).
#[test]
fn sixteen_bit_steps_on_the_host_device_match_the_cpu() {
    use densenet::config::Precision;
    common::devices::on_host(|make| {
        for precision in [Precision::Bf16, Precision::Fp16] {
            for (cfg, h, n) in configs() {
                let cfg = NetConfig { precision, ..cfg };
                for mode in Mode::ALL {
                    let cpu = steps(common::model(&cfg, n, h, h, mode, 11), n, h);
                    let dev = steps(Model::new(cfg.clone(), n, h, h, mode, 11, make()).unwrap(), n, h);
                    let what = format!("{precision} {mode} {:?} {h}x{h} batch {n}", cfg.block_layers);
                    compare_within(&what, &dev, &cpu, 0.4);
                }
            }
        }
    });
}

fn runs_are_identical<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    let run = || steps(Model::new(cfg.clone(), n, h, h, Mode::Minimal, 3, make()).unwrap(), n, h);
    assert_eq!(run(), run(), "two runs differ");
}
on_devices!(two_runs_are_bitwise_identical, runs_are_identical);

fn graphs_replay_the_eager_step<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
    let per = images.len() / n;
    let run = |graphs: bool| {
        let mut be = make();
        be.set_graphs(graphs);
        let mut m = Model::new(cfg.clone(), n, h, h, Mode::Minimal, 5, be).unwrap();
        // Full and partial batches, a learning-rate change, a step without SGD: each kind is
        // recorded once and replayed with the settings of the moment.
        let slow = Sgd { lr: 0.01, ..Sgd::default() };
        let mut losses = Vec::new();
        for (k, sgd) in
            [(n, Sgd::default()), (n, Sgd::default()), (n - 1, Sgd::default()), (n, slow), (n - 1, slow), (n, slow)]
        {
            losses.push(m.train_step(&images[..k * per], &labels[..k], sgd).unwrap().loss);
        }
        losses.push(m.forward_backward(&images, &labels).unwrap().loss);
        losses.push(m.forward_backward(&images, &labels).unwrap().loss);
        (losses, m.params(), m.momentum(), m.running_stats(), m.grads())
    };
    assert_eq!(run(true), run(false), "replayed steps differ from eager ones");
}
on_devices!(graph_replay_equals_eager_steps, graphs_replay_the_eager_step);

fn device_memory_is_the_plan<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    let (cfg, h, n) = configs().remove(0);
    for mode in Mode::ALL {
        let mut m = Model::new(cfg.clone(), n, h, h, mode, 5, make()).unwrap();
        let planned = m.plan().total_bytes();
        assert_eq!(m.backend().device_memory().map(|d| d.allocated), Some(planned), "{mode}");
        // After the first steps (warm-up, graph capture), a step allocates nothing on the device.
        let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
        let mut used = Vec::new();
        for _ in 0..6 {
            m.train_step(&images, &labels, Sgd::default()).unwrap();
            used.push(m.backend().device_memory().unwrap().process);
        }
        assert!(used[2..].iter().all(|&u| u == used[2]), "{mode}: device memory in use grew over steps: {used:?}");
    }
}
on_devices!(device_allocation_is_the_plan, device_memory_is_the_plan);

/// Without a GPU, `DENSENET_REQUIRE_GPU=1` turns a GPU test's skip into a failure (this test
/// binary runs one of its own GPU tests again with it set).
#[test]
fn require_gpu_turns_a_skip_into_a_failure() {
    if densenet::backend::cuda::GpuExec::new(0).is_ok() {
        return; // a GPU is here: the GPU tests run for real
    }
    let run = |require: &str| {
        std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "device_allocation_is_the_plan::gpu", "--nocapture", "--test-threads=1"])
            .env("DENSENET_REQUIRE_GPU", require)
            .output()
            .unwrap()
    };
    let (required, optional) = (run("1"), run("0"));
    let text = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!required.status.success(), "the GPU test passed without a GPU under DENSENET_REQUIRE_GPU=1");
    assert!(text(&required).contains("needs a GPU (DENSENET_REQUIRE_GPU=1)"), "{}", text(&required));
    assert!(optional.status.success(), "the GPU test failed without DENSENET_REQUIRE_GPU: {}", text(&optional));
    assert!(text(&optional).contains("SKIPPED device_allocation_is_the_plan on the GPU"), "{}", text(&optional));
}

/// The host device, except that no step can become a graph: every capture falls back to
/// replaying the recorded ops, as a GPU does when a capture fails. Like a GPU's so far, its
/// convolutions take f32 tensors only (the default `Exec::stores`).
struct NoGraphs(densenet::backend::cuda::HostExec);

impl Exec for NoGraphs {
    fn describe(&self) -> String {
        self.0.describe()
    }
    fn conv_workspace_len(&mut self, convs: &[densenet::backend::ConvShape], batch: usize) -> densenet::Result<usize> {
        self.0.conv_workspace_len(convs, batch)
    }
    fn allocate(&mut self, len: usize, conv_ws: Span) -> densenet::Result<()> {
        self.0.allocate(len, conv_ws)
    }
    fn memory(&self) -> densenet::backend::DeviceMemory {
        self.0.memory()
    }
    fn write(&mut self, off: usize, data: &[u8]) -> densenet::Result<()> {
        self.0.write(off, data)
    }
    fn read_into(&self, off: usize, out: &mut [u8]) -> densenet::Result<()> {
        self.0.read_into(off, out)
    }
    fn launch(&mut self, launch: &densenet::backend::cuda::Launch) -> densenet::Result<()> {
        self.0.launch(launch)
    }
    fn conv_forward(&mut self, x: View, w: Span, y: View, spec: ConvSpec) -> densenet::Result<()> {
        self.0.conv_forward(x, w, y, spec)
    }
    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) -> densenet::Result<()> {
        self.0.conv_backward_data(gy, w, gx, spec)
    }
    fn conv_backward_filter(&mut self, x: View, gy: View, gw: Span, spec: ConvSpec, acc: bool) -> densenet::Result<()> {
        self.0.conv_backward_filter(x, gy, gw, spec, acc)
    }
    fn capture_begin(&mut self) -> densenet::Result<()> {
        self.0.capture_begin()
    }
    fn capture_end(&mut self, key: u64) -> densenet::Result<Option<String>> {
        self.0.capture_end(key)?;
        Ok(Some("capture refused by the test executor".into()))
    }
    fn replay(&mut self, key: u64) -> densenet::Result<bool> {
        self.0.replay(key)
    }
}

/// `Backend::graphs` says how the steps ran: replayed, eager, not (yet) replayed, or fallen
/// back with the reason, so a benchmark never reports eager steps as replayed ones.
#[test]
fn graphs_status_tells_how_steps_ran() {
    let (cfg, h, n) = configs().remove(0);
    let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
    let after = |steps: usize, graphs: bool| {
        let mut be = CudaBackend::new(densenet::backend::cuda::HostExec::new());
        be.set_graphs(graphs);
        let mut m = Model::new(cfg.clone(), n, h, h, Mode::Minimal, 5, be).unwrap();
        for _ in 0..steps {
            m.train_step(&images, &labels, Sgd::default()).unwrap();
        }
        m.backend().graphs()
    };
    assert_eq!(after(1, true).as_deref(), Some("not replayed"));
    assert_eq!(after(2, true).as_deref(), Some("replayed"));
    assert_eq!(after(2, false).as_deref(), Some("eager"));
    let mut m =
        Model::new(cfg.clone(), n, h, h, Mode::Minimal, 5, CudaBackend::new(NoGraphs(Default::default()))).unwrap();
    let first = m.train_step(&images, &labels, Sgd::default()).unwrap().loss;
    let second = m.train_step(&images, &labels, Sgd::default()).unwrap().loss;
    assert!(first.is_finite() && second.is_finite() && first != second, "the replayed ops did not train");
    assert_eq!(m.backend().graphs().as_deref(), Some("fell back: capture refused by the test executor"));
    let cpu = common::model(&cfg, n, h, h, Mode::Minimal, 5);
    assert_eq!(cpu.backend().graphs(), None, "the CPU backend records no steps");
}

/// An executor whose convolutions do not take 16-bit tensors (a GPU's, until cuDNN runs in 16
/// bits) makes the CUDA backend refuse a 16-bit plan with an error, not a panic in its first op.
#[test]
fn a_backend_refuses_a_precision_it_does_not_store() {
    use densenet::config::Precision;
    let cfg = NetConfig { precision: Precision::Bf16, ..NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap() };
    let e = Model::new(cfg, 2, 16, 16, Mode::Minimal, 1, CudaBackend::new(NoGraphs(Default::default())))
        .err()
        .expect("refused");
    assert!(e.0.starts_with("bf16 storage is not available on the host device"), "{e}");
}

/// On a GPU: a second process given the first one's algorithm record searches nothing
/// (no cudnnFind), chooses the same workspace, records the same rankings and computes the
/// same step, bitwise. This test runs itself twice as child processes (the process-wide
/// rankings would otherwise already hold everything).
#[test]
fn algorithm_record_is_reused_across_processes() {
    const ROLE: &str = "DENSENET_TEST_RECORD";
    let (cfg, h, n) = configs().remove(0);
    if let Ok(path) = std::env::var(ROLE) {
        // A child: reuse the record at `path` if there is one, plan, step, and report.
        let mut exec = densenet::backend::cuda::GpuExec::new(0).unwrap();
        let taken = std::fs::read_to_string(&path).map_or(0, |r| exec.reuse_algorithm_record(&r).unwrap());
        let mut m = Model::new(cfg.clone(), n, h, h, Mode::Minimal, 3, CudaBackend::new(exec)).unwrap();
        let (images, labels) = common::batch(7, n, h, h, cfg.num_classes);
        let loss = m.train_step(&images, &labels, Sgd::default()).unwrap().loss;
        let record = m.backend().algorithm_record().unwrap();
        std::fs::write(format!("{path}.out"), &record).unwrap();
        println!(
            "record: taken {taken} searches {} workspace {} loss {:08x}",
            m.backend().algorithm_searches(),
            m.plan().workspace.len,
            loss.to_bits()
        );
        return;
    }
    if let Err(e) = densenet::backend::cuda::GpuExec::new(0) {
        assert!(!common::devices::gpu_required(), "needs a GPU (DENSENET_REQUIRE_GPU=1): {e}");
        eprintln!("SKIPPED algorithm_record_is_reused_across_processes on the GPU: {e}");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cudnn-algorithms.json");
    let child = || {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "algorithm_record_is_reused_across_processes", "--nocapture", "--test-threads=1"])
            .env(ROLE, &path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(out.status.success(), "child failed: {text}{}", String::from_utf8_lossy(&out.stderr));
        // libtest prints the test's name without a newline before running it: look inside lines.
        let line = text.lines().find_map(|l| l.split_once("record: ")).expect("the child reports").1.to_string();
        let words: Vec<String> = line.split_whitespace().map(str::to_string).collect();
        std::fs::rename(format!("{}.out", path.display()), &path).unwrap();
        (words, std::fs::read_to_string(&path).unwrap())
    };
    let (first, record) = child();
    let (second, again) = child();
    eprintln!("first: {first:?}\nsecond: {second:?}");
    assert_eq!(first[1], "0", "the first process had no record to take");
    assert_ne!(first[3], "0", "the first process searched nothing");
    assert_ne!(second[1], "0", "the second process took no ranking from the record");
    assert_eq!(second[3], "0", "the second process searched although it had the record");
    assert_eq!((&first[5], &first[7]), (&second[5], &second[7]), "workspace or loss differ");
    assert_eq!(record, again, "the reused rankings were not recorded as they were");
}

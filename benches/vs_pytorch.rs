//! Side-by-side training-step comparison with PyTorch on the CPU.
//!
//! Every side runs in its own worker process (so each has its own peak RSS) and speaks the
//! protocol of `benches/torch_densenet.py worker`: it prints `ready`, then answers stdin lines
//! `step` (the step's seconds), `rss` (peak RSS bytes) and `quit`. Our sides are this binary
//! re-executed with `DENSENET_WORKER=<mode>`. After warm-up, each round runs one step on every
//! side in turn, so noise hits all sides alike. The report goes to stdout and, as JSON, to
//! `target/vs_pytorch.json`.
//!
//! By default the network is DenseNet-BC-`DENSENET_BENCH_DEPTH`-12 on 32x32 CIFAR-10 inputs,
//! against the worker's reference `DenseNet3` (naive and checkpointed). With
//! `DENSENET_BENCH_ARCH` set to an ImageNet preset (densenet121, 169, 201, 161 or 264) it is
//! that preset (1000 classes) on `DENSENET_BENCH_IMAGE_SIZE` inputs (default 224, a multiple of
//! 32), against torchvision's DenseNet naive and with `memory_efficient=True`.
//!
//! Environment: `DENSENET_BENCH_DEPTH` (100), `DENSENET_BENCH_ARCH` (unset: CIFAR),
//! `DENSENET_BENCH_IMAGE_SIZE` (224, only with an arch), `DENSENET_BENCH_BATCH` (64),
//! `DENSENET_BENCH_MODES` (our sides' memory modes, comma-separated, possibly none;
//! naive,shared,minimal), `DENSENET_BENCH_ROUNDS` (5), `DENSENET_BENCH_WARMUP` (1),
//! `DENSENET_TORCH_PYTHON` (python3). Our workers inherit the environment, hence the settings.

use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::config::NetConfig;
use densenet::input::CHANNELS;
use densenet::model::net::Net;
use densenet::model::plan::{Mode, Plan};
use densenet::model::Model;
use densenet::{bail, measure, rng, Error, Result};
use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::time::{Duration, Instant};

/// Set in our workers' environment to the memory mode they run.
const WORKER_ENV: &str = "DENSENET_WORKER";
/// The PyTorch worker script.
const TORCH_SCRIPT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/benches/torch_densenet.py");
/// Where the JSON report goes.
const JSON_PATH: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/target/vs_pytorch.json");
/// Growth rate k of the CIFAR network.
const GROWTH: usize = 12;
/// CIFAR input height and width.
const CIFAR_SIZE: usize = 32;
/// CIFAR-10 classes.
const CLASSES: usize = 10;

/// What to compare, from the environment.
struct Settings {
    /// The ImageNet preset, or `None` for the CIFAR network of `depth`.
    arch: Option<String>,
    depth: usize,
    /// Input height and width.
    size: usize,
    batch: usize,
    /// Our sides' memory modes.
    modes: Vec<Mode>,
    rounds: usize,
    warmup: usize,
    threads: usize,
    python: String,
}

impl Settings {
    /// Reads the environment (defaults for unset variables).
    fn from_env() -> Result<Settings> {
        let arch = std::env::var("DENSENET_BENCH_ARCH").ok();
        let size = match arch {
            Some(_) => env_usize("DENSENET_BENCH_IMAGE_SIZE", 224)?,
            None if std::env::var_os("DENSENET_BENCH_IMAGE_SIZE").is_some() => {
                bail!("DENSENET_BENCH_IMAGE_SIZE needs DENSENET_BENCH_ARCH (CIFAR inputs are 32x32)")
            }
            None => CIFAR_SIZE,
        };
        let modes = match std::env::var("DENSENET_BENCH_MODES") {
            Ok(v) => v.split(',').map(str::trim).filter(|m| !m.is_empty()).map(str::parse).collect::<Result<_>>()?,
            Err(_) => Mode::ALL.to_vec(),
        };
        let s = Settings {
            arch,
            depth: env_usize("DENSENET_BENCH_DEPTH", 100)?,
            size,
            batch: env_usize("DENSENET_BENCH_BATCH", 64)?,
            modes,
            rounds: env_usize("DENSENET_BENCH_ROUNDS", 5)?,
            warmup: env_usize("DENSENET_BENCH_WARMUP", 1)?,
            threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            python: std::env::var("DENSENET_TORCH_PYTHON").unwrap_or_else(|_| "python3".into()),
        };
        if s.batch == 0 || s.rounds == 0 {
            bail!("DENSENET_BENCH_BATCH and DENSENET_BENCH_ROUNDS must be at least 1");
        }
        Ok(s)
    }

    /// The ImageNet preset, or DenseNet-BC-depth-12 for CIFAR-10, as the PyTorch worker builds
    /// it.
    fn network(&self) -> Result<NetConfig> {
        match &self.arch {
            Some(arch) => NetConfig::imagenet(arch),
            None => NetConfig::cifar(self.depth, GROWTH, true, 0.5, 0.0, CLASSES),
        }
    }

    /// The PyTorch sides, (side, worker mode), the naive one first: the reference of the
    /// comparisons.
    fn torch_sides(&self) -> [(&'static str, &'static str); 2] {
        match self.arch {
            Some(_) => [("torchvision-naive", "naive"), ("torchvision-memory-efficient", "checkpointed")],
            None => [("torch-naive", "naive"), ("torch-checkpointed", "checkpointed")],
        }
    }
}

/// An unsigned integer from the environment, or `default` when unset.
fn env_usize(name: &str, default: usize) -> Result<usize> {
    match std::env::var(name) {
        Ok(v) => v.parse().map_err(|_| Error(format!("{name}={v:?} is not an unsigned integer"))),
        Err(_) => Ok(default),
    }
}

fn main() {
    let result = match std::env::var(WORKER_ENV) {
        Ok(mode) => serve(&mode),
        Err(_) => compare(),
    };
    if let Err(e) = result {
        eprintln!("vs_pytorch: {e}");
        std::process::exit(1);
    }
}

// ---- our worker -------------------------------------------------------------------------------

/// Our worker: builds the model in `mode`, then answers `step`, `rss` and `quit` on stdin.
fn serve(mode: &str) -> Result<()> {
    let s = Settings::from_env()?;
    let cfg = s.network()?;
    let classes = cfg.num_classes;
    let mut model = Model::new(cfg, s.batch, s.size, s.size, mode.parse()?, 0, CpuBackend::new())?;
    let (images, labels) =
        rng::random_batch(1, s.batch, s.size, s.size, classes).ok_or(Error("no memory for a batch".into()))?;
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        let line = line.map_err(|e| Error(format!("reading stdin: {e}")))?;
        match line.trim() {
            "step" => {
                let start = Instant::now();
                model.train_step(&images, &labels, Sgd::default())?;
                println!("{}", start.elapsed().as_secs_f64());
            }
            "rss" => println!("{}", measure::peak_rss().ok_or(Error("no VmHWM in /proc/self/status".into()))?),
            "quit" => break,
            "" => {}
            other => bail!("unknown command {other:?}"),
        }
    }
    Ok(())
}

// ---- worker processes -------------------------------------------------------------------------

/// A running worker process of one side; killed when dropped.
struct Worker {
    side: String,
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
}

impl Worker {
    /// Spawns `cmd` (stderr passes through) and waits for its `ready`.
    fn start(side: &str, mut cmd: Command) -> Result<Worker> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .map_err(|e| Error(format!("{side}: cannot start {cmd:?}: {e}")))?;
        let (stdin, stdout) = (child.stdin.take(), child.stdout.take());
        let mut w = Worker {
            side: side.into(),
            stdin: stdin.expect("piped stdin"),
            stdout: BufReader::new(stdout.expect("piped stdout")),
            child,
        };
        match w.reply("'ready'")?.as_str() {
            "ready" => Ok(w),
            other => bail!("{side}: expected 'ready' from the worker, got {other:?}"),
        }
    }

    /// Sends one command and returns the reply line.
    fn ask(&mut self, cmd: &str) -> Result<String> {
        if writeln!(self.stdin, "{cmd}").and_then(|_| self.stdin.flush()).is_err() {
            return Err(self.gone(&format!("before '{cmd}' could be sent")));
        }
        self.reply(&format!("the answer to '{cmd}'"))
    }

    /// The next reply line (`awaited` names it in errors), trimmed.
    fn reply(&mut self, awaited: &str) -> Result<String> {
        let mut line = String::new();
        match self.stdout.read_line(&mut line) {
            Ok(0) => Err(self.gone(&format!("while we awaited {awaited}"))),
            Ok(_) => Ok(line.trim().to_string()),
            Err(e) => bail!("{}: reading {awaited} from the worker: {e}", self.side),
        }
    }

    /// The error for a worker that stopped answering `when` (its exit status if it exits
    /// within a second).
    fn gone(&mut self, when: &str) -> Error {
        let status = (0..20).find_map(|_| {
            let status = self.child.try_wait().ok().flatten();
            if status.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            status
        });
        let state = status.map_or("closed its pipes".into(), |s| format!("exited ({s})"));
        Error(format!("{}: the worker {state} {when}", self.side))
    }

    /// Asks `cmd` and parses the reply as a number.
    fn ask_number<T: std::str::FromStr>(&mut self, cmd: &str) -> Result<T> {
        let reply = self.ask(cmd)?;
        reply.parse().map_err(|_| Error(format!("{}: unexpected answer {reply:?} to '{cmd}'", self.side)))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts our workers, one per memory mode asked for, with as many threads as PyTorch gets.
fn start_ours(s: &Settings) -> Result<Vec<Worker>> {
    let exe = std::env::current_exe().map_err(|e| Error(format!("cannot find this executable: {e}")))?;
    s.modes
        .iter()
        .map(|mode| {
            let mut cmd = Command::new(&exe);
            cmd.env(WORKER_ENV, mode.to_string()).env("RAYON_NUM_THREADS", s.threads.to_string());
            Worker::start(&format!("ours-{mode}"), cmd)
        })
        .collect()
}

/// Starts the PyTorch workers, or returns why they were skipped.
fn start_torch(s: &Settings) -> Result<Vec<Worker>> {
    s.torch_sides()
        .iter()
        .map(|&(side, mode)| {
            let mut cmd = Command::new(&s.python);
            cmd.arg(TORCH_SCRIPT).arg("worker").args(["--mode", mode]);
            if let Some(arch) = &s.arch {
                cmd.args(["--arch", arch, "--image-size", &s.size.to_string()]);
            }
            for (flag, v) in
                [("--depth", s.depth), ("--growth", GROWTH), ("--batch", s.batch), ("--threads", s.threads)]
            {
                cmd.arg(flag).arg(v.to_string());
            }
            Worker::start(side, cmd)
        })
        .collect()
}

// ---- measurement and report -------------------------------------------------------------------

/// One side's measurements.
struct Outcome {
    side: String,
    steps: Vec<f64>,
    median: f64,
    images_per_s: f64,
    /// Peak RSS once set up, before the first step: the model, its optimizer state and a batch.
    setup_rss: u64,
    peak_rss: u64,
    /// Ours: the plan's total bytes.
    planned: Option<usize>,
    /// Ours: images/s relative to the naive PyTorch side.
    vs_torch: Option<f64>,
}

/// Starts every side, runs the rounds and reports.
fn compare() -> Result<()> {
    let s = Settings::from_env()?;
    let cfg = s.network()?;
    println!(
        "{}, batch {}, {}x{}, {} threads, {} warm-up + {} measured rounds",
        cfg.name(),
        s.batch,
        s.size,
        s.size,
        s.threads,
        s.warmup,
        s.rounds
    );
    let mut workers = start_ours(&s)?;
    let skipped = match start_torch(&s) {
        Ok(torch) => {
            workers.extend(torch);
            None
        }
        Err(why) => {
            let note = format!("PyTorch side skipped: {why} (DENSENET_TORCH_PYTHON={} needs torch)", s.python);
            println!("note: {note}");
            Some(note)
        }
    };
    let setup_rss = workers.iter_mut().map(|w| w.ask_number("rss")).collect::<Result<Vec<u64>>>()?;
    step_rounds(&mut workers, s.warmup, "warm-up")?;
    let steps = step_rounds(&mut workers, s.rounds, "round")?;
    let mut outcomes = workers
        .iter_mut()
        .zip(steps.into_iter().zip(setup_rss))
        .map(|(w, (steps, setup_rss))| {
            let median = median(&steps);
            let planned = w.side.strip_prefix("ours-").map(|m| planned_bytes(&cfg, &s, m)).transpose()?;
            Ok(Outcome {
                side: w.side.clone(),
                images_per_s: s.batch as f64 / median,
                median,
                steps,
                setup_rss,
                peak_rss: w.ask_number("rss")?,
                planned,
                vs_torch: None,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    drop(workers);
    let reference = s.torch_sides()[0].0;
    let rss_ratio = compare_to_torch(&mut outcomes, reference);
    print_table(&outcomes, reference, rss_ratio);
    write_json(&s, &cfg, &outcomes, rss_ratio, skipped)
}

/// Runs `rounds` rounds (`label`s in the progress lines) of one step on every worker in turn;
/// each worker's step seconds.
fn step_rounds(workers: &mut [Worker], rounds: usize, label: &str) -> Result<Vec<Vec<f64>>> {
    let mut steps = vec![Vec::with_capacity(rounds); workers.len()];
    for round in 1..=rounds {
        for (w, t) in workers.iter_mut().zip(&mut steps) {
            t.push(w.ask_number("step")?);
        }
        let line: Vec<String> =
            workers.iter().zip(&steps).map(|(w, t)| format!("{} {:.3}s", w.side, t[t.len() - 1])).collect();
        eprintln!("{label} {round}/{rounds}: {}", line.join(", "));
    }
    Ok(steps)
}

/// The plan's total bytes for our side in mode `mode` (its regions share bytes by live range,
/// so no sum of categories tells it).
fn planned_bytes(cfg: &NetConfig, s: &Settings, mode: &str) -> Result<usize> {
    let workspace = |convs: &[_]| CpuBackend::new().workspace_len(convs, CHANNELS * s.size * s.size, s.batch);
    let plan = Plan::new(cfg, &Net::new(cfg), s.batch, s.size, s.size, mode.parse()?, workspace)?;
    Ok(plan.total_bytes())
}

/// The median of `xs` (the mean of the middle two for an even count).
fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    }
}

/// Fills each of our sides' speed relative to the PyTorch side `reference`; returns its peak
/// RSS over ours-minimal peak RSS (both only when `reference` ran).
fn compare_to_torch(outcomes: &mut [Outcome], reference: &str) -> Option<f64> {
    let find = |os: &[Outcome], side: &str| os.iter().find(|o| o.side == side).map(|o| (o.images_per_s, o.peak_rss));
    let (torch_speed, torch_rss) = find(outcomes, reference)?;
    let rss_ratio = find(outcomes, "ours-minimal").map(|(_, rss)| torch_rss as f64 / rss as f64);
    for o in outcomes.iter_mut().filter(|o| o.side.starts_with("ours-")) {
        o.vs_torch = Some(o.images_per_s / torch_speed);
    }
    rss_ratio
}

/// Prints the comparison table (speeds relative to the PyTorch side `reference`).
fn print_table(outcomes: &[Outcome], reference: &str, rss_ratio: Option<f64>) {
    let opt = |v: Option<f64>, suffix: &str| v.map_or("-".into(), |v| format!("{v:.2}{suffix}"));
    let vs = format!("vs {reference}");
    println!(
        "\n{:<28} {:>12} {:>10} {:>22} {:>16} {:>14} {:>24}",
        "side", "median step", "images/s", vs, "setup RSS MiB", "peak RSS MiB", "planned total MiB"
    );
    for o in outcomes {
        println!(
            "{:<28} {:>11.3}s {:>10.2} {:>22} {:>16.1} {:>14.1} {:>24}",
            o.side,
            o.median,
            o.images_per_s,
            opt(o.vs_torch, "x"),
            measure::mib(o.setup_rss as usize),
            measure::mib(o.peak_rss as usize),
            opt(o.planned.map(measure::mib), "")
        );
    }
    println!("{reference} peak RSS / ours-minimal peak RSS: {}", opt(rss_ratio, "x"));
}

/// Writes the report as one JSON object to `target/vs_pytorch.json`.
fn write_json(
    s: &Settings,
    cfg: &NetConfig,
    outcomes: &[Outcome],
    rss_ratio: Option<f64>,
    skipped: Option<String>,
) -> Result<()> {
    let sides: Vec<_> = outcomes
        .iter()
        .map(|o| {
            serde_json::json!({
                "side": o.side,
                "median_step_s": o.median,
                "images_per_s": o.images_per_s,
                "setup_rss_bytes": o.setup_rss,
                "peak_rss_bytes": o.peak_rss,
                "planned_total_bytes": o.planned,
                "images_per_s_vs_reference": o.vs_torch,
                "steps_s": o.steps,
            })
        })
        .collect();
    let report = serde_json::json!({
        "network": cfg.name(),
        "batch": s.batch,
        "image_size": s.size,
        "threads": s.threads,
        "warmup_rounds": s.warmup,
        "rounds": s.rounds,
        "torch_skipped": skipped,
        "sides": sides,
        "reference": s.torch_sides()[0].0,
        "peak_rss_reference_over_ours_minimal": rss_ratio,
    });
    let path = std::path::Path::new(JSON_PATH);
    let written = std::fs::create_dir_all(path.parent().expect("JSON path has a parent"))
        .and_then(|_| std::fs::write(path, format!("{report:#}\n")));
    written.map_err(|e| Error(format!("writing {JSON_PATH}: {e}")))?;
    println!("wrote {JSON_PATH}");
    Ok(())
}

//! The `densenet` command line: `train` (the reference `train.py`, flags and defaults kept,
//! with checkpoints, exact resume and initial weights), `eval` (a checkpoint on the test set),
//! `memory` (the planned bytes per category for each memory mode, and the largest batch that
//! fits a budget), `bench` (training steps on random data: speed, planned and measured memory)
//! and `download` (the CIFAR archive, fetched, checked and extracted).
//!
//! Every error is one line on stderr starting with `error:`; bad flags exit with 2, failures
//! while running with 1. With `--json`, `eval`, `memory` and `bench` print one JSON object as
//! the last line of stdout.

use clap::error::ErrorKind;
use clap::{Args, Parser, Subcommand};
use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::config::NetConfig;
use densenet::data::cifar::{Dataset, Images, Split, SIDE};
use densenet::data::download::{self, Fetched, Source};
use densenet::data::loader::Loader;
use densenet::model::net::Net;
use densenet::model::plan::{Category, Mode, Plan};
use densenet::model::Model;
use densenet::rng;
use densenet::train::checkpoint::{self, Checkpoint, Saver};
use densenet::train::tensorboard::EventWriter;
use densenet::train::{self, epoch, report, Recipe};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

#[global_allocator]
static HEAP: heap::Counting = heap::Counting;

/// Largest batch accepted (keeps every planned size far from overflow).
const MAX_BATCH: usize = 1 << 24;
/// Largest `--epochs` (keeps the schedule arithmetic far from overflow).
const MAX_EPOCHS: usize = 1_000_000;
/// Largest `bench --steps` and `--warmup`.
const MAX_STEPS: usize = 1_000_000;
/// Seed of `bench`'s network and random batch.
const BENCH_SEED: u64 = 0;

#[derive(Parser)]
#[command(name = "densenet", version, about = "Memory-efficient DenseNet training on CIFAR")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DenseNet on CIFAR-10 or CIFAR-100 (flags and defaults of the reference train.py).
    Train(TrainArgs),
    /// Evaluate a checkpoint written by `train` on the test set: loss and Prec@1.
    Eval(EvalArgs),
    /// Print the memory plan: bytes per category for each memory mode (and, with --budget, the
    /// largest batch that fits).
    Memory(MemoryArgs),
    /// Time training steps on random data: images/s, step time, planned and measured memory.
    Bench(BenchArgs),
    /// Download the CIFAR binary archive, check its MD5 and extract it into the data directory.
    Download(DownloadArgs),
}

/// The network, its data set and the batch.
#[derive(Args)]
struct NetArgs {
    /// Total depth of the network.
    #[arg(long, value_name = "DEPTH", default_value_t = 100)]
    layers: usize,
    /// Growth rate k: channels each layer adds.
    #[arg(long, value_name = "K", default_value_t = 12)]
    growth: usize,
    /// Dropout probability after each convolution.
    #[arg(long, value_name = "P", default_value_t = 0.0, allow_negative_numbers = true)]
    droprate: f32,
    /// Compression: a transition keeps floor(C * reduce) channels.
    #[arg(long, value_name = "R", default_value_t = 0.5, allow_negative_numbers = true)]
    reduce: f64,
    /// Basic layers (BN-ReLU-3x3 conv) instead of bottleneck layers.
    #[arg(long)]
    no_bottleneck: bool,
    /// Dataset: cifar10 or cifar100.
    #[arg(long, value_name = "NAME", default_value = "cifar10")]
    dataset: Dataset,
    /// Images per batch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 64, value_parser = batch_size, allow_negative_numbers = true)]
    batch: usize,
}

impl NetArgs {
    fn config(&self) -> densenet::Result<NetConfig> {
        let classes = self.dataset.classes();
        NetConfig::cifar(self.layers, self.growth, !self.no_bottleneck, self.reduce, self.droprate, classes)
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Epochs to train.
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = epochs, allow_negative_numbers = true)]
    epochs: usize,
    /// First epoch to run, counted from 0 (the LR schedule follows it) [default: 0; with
    /// --resume: the checkpoint's next epoch, which an explicit value must equal].
    #[arg(long, value_name = "N")]
    start_epoch: Option<usize>,
    /// Initial learning rate (divided by 10 at 50% and 75% of the epochs).
    #[arg(long, default_value_t = 0.1, value_parser = non_negative::<f64>, allow_negative_numbers = true)]
    lr: f64,
    /// Nesterov momentum factor, in [0, 1).
    #[arg(long, default_value_t = 0.9, value_parser = momentum, allow_negative_numbers = true)]
    momentum: f32,
    /// L2 weight decay on every parameter.
    #[arg(long = "weight-decay", visible_alias = "wd", value_name = "WD", default_value_t = 1e-4, value_parser = non_negative::<f32>, allow_negative_numbers = true)]
    weight_decay: f32,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Train without augmentation (no random crop or flip).
    #[arg(long)]
    no_augment: bool,
    /// Name of the run: its checkpoints go to <runs-dir>/<name>/.
    #[arg(long, default_value = "DenseNet_BC_100_12", value_parser = run_name)]
    name: String,
    /// Directory of the runs.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// Continue a run from its checkpoint (a file, or a run directory for its
    /// checkpoint.safetensors): weights, running statistics, momentum, step counter, next
    /// epoch, best accuracy and seed. The network flags must describe the same network.
    #[arg(long, value_name = "PATH", conflicts_with = "init_weights")]
    resume: Option<PathBuf>,
    /// Start from the weights and running statistics of a safetensors file with reference
    /// names (a checkpoint, or a converted PyTorch state dict); momentum starts at zero.
    #[arg(long, value_name = "FILE")]
    init_weights: Option<PathBuf>,
    /// Log train_loss, train_acc, val_loss, val_acc and learning_rate per epoch as TensorBoard
    /// event files in the run directory.
    #[arg(long)]
    tensorboard: bool,
    #[command(flatten)]
    data: DataArgs,
    /// Download the dataset into --data-dir first when it is not there (as `densenet download`).
    #[arg(long)]
    download: bool,
    #[command(flatten)]
    source: SourceArgs,
    /// Memory mode: naive, shared or minimal.
    #[arg(long, value_name = "MODE", default_value = "minimal")]
    memory: Mode,
    /// Seed of the initialization, the shuffles, the augmentation and dropout [default: 0; with
    /// --resume: the checkpoint's, which an explicit value must equal].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    #[command(flatten)]
    device: DeviceArgs,
}

/// Where the dataset is.
#[derive(Args)]
struct DataArgs {
    /// Directory holding the dataset's folder (cifar-10-batches-bin/, cifar-100-binary/) or its files.
    #[arg(long, value_name = "DIR", default_value = "./data")]
    data_dir: PathBuf,
}

/// How often a pass over the data reports.
#[derive(Args)]
struct ProgressArgs {
    /// Print a progress line every N batches (on a terminal, one progress bar redrawn in place
    /// instead).
    #[arg(short = 'p', long = "print-freq", value_name = "N", default_value_t = 10, value_parser = positive, allow_negative_numbers = true)]
    print_freq: usize,
}

/// Where the model runs.
#[derive(Args)]
struct DeviceArgs {
    /// Device: auto or cpu (auto picks the CPU: this build has no CUDA backend yet).
    #[arg(long, value_name = "DEVICE", default_value = "auto", value_parser = device)]
    device: Device,
}

impl DeviceArgs {
    /// The `Device: ...` line: what runs the model, and why when it was chosen automatically.
    fn line(&self, backend: &impl Backend) -> String {
        let chosen = match self.device {
            Device::Auto => " (auto: this build has no CUDA backend yet)",
            Device::Cpu => "",
        };
        format!("Device: {}{chosen}", backend.describe())
    }
}

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint written by `densenet train` (checkpoint.safetensors or model_best.safetensors):
    /// its metadata describes the network, so no network flags are needed.
    #[arg(long, value_name = "FILE")]
    checkpoint: PathBuf,
    /// Dataset: cifar10 or cifar100 [default: the checkpoint's].
    #[arg(long, value_name = "NAME")]
    dataset: Option<Dataset>,
    #[command(flatten)]
    data: DataArgs,
    /// Images per batch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 64, value_parser = batch_size, allow_negative_numbers = true)]
    batch: usize,
    #[command(flatten)]
    progress: ProgressArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Also print the result as one JSON object, the last line: {"loss", "top1", "error"}.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct BenchArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Timed training steps (the step time reported is their median).
    #[arg(long, value_name = "N", default_value_t = 10, value_parser = |s: &str| whole(s, 1, MAX_STEPS), allow_negative_numbers = true)]
    steps: usize,
    /// Untimed steps first (thread start-up, first touch of the arena, caches).
    #[arg(long, value_name = "N", default_value_t = 2, value_parser = |s: &str| whole(s, 0, MAX_STEPS), allow_negative_numbers = true)]
    warmup: usize,
    #[command(flatten)]
    device: DeviceArgs,
    /// Memory mode: naive, shared or minimal.
    #[arg(long, value_name = "MODE", default_value = "minimal")]
    memory: Mode,
    /// Also print the result as one JSON object, the last line.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct MemoryArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Memory mode: naive, shared, minimal, or all.
    #[arg(long, value_name = "MODE", default_value = "all", value_parser = modes)]
    memory: Modes,
    /// For each mode, also find the largest batch whose planned total fits in SIZE: bytes, or a
    /// number with a unit, B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of
    /// 1024), e.g. 4GiB, 512MB, 1.5GB.
    #[arg(long, value_name = "SIZE", value_parser = size, allow_hyphen_values = true)]
    budget: Option<u64>,
    /// Print one JSON object as the last line instead of the table.
    #[arg(long)]
    json: bool,
}

/// Where the archive comes from (the official URL when neither is given).
#[derive(Args)]
struct SourceArgs {
    /// Fetch the archive from this URL (a mirror) instead of the official one.
    #[arg(long, value_name = "URL", conflicts_with = "archive")]
    url: Option<String>,
    /// Extract this local copy of the archive (machines without network).
    #[arg(long, value_name = "PATH")]
    archive: Option<PathBuf>,
}

impl SourceArgs {
    fn source(&self) -> Source {
        match (&self.url, &self.archive) {
            (Some(url), _) => Source::Url(url.clone()),
            (None, Some(path)) => Source::Archive(path.clone()),
            (None, None) => Source::Official,
        }
    }
}

#[derive(Args)]
struct DownloadArgs {
    /// Dataset: cifar10 or cifar100.
    #[arg(long, value_name = "NAME", default_value = "cifar10")]
    dataset: Dataset,
    /// Directory to extract into (the dataset lands in its folder, cifar-10-batches-bin/ or
    /// cifar-100-binary/).
    #[arg(long, value_name = "DIR", default_value = "./data")]
    data_dir: PathBuf,
    #[command(flatten)]
    source: SourceArgs,
}

/// Where training runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Device {
    /// The best usable device.
    Auto,
    /// The CPU backend.
    Cpu,
}

/// The memory modes asked for.
#[derive(Clone, Debug)]
struct Modes(Vec<Mode>);

fn device(s: &str) -> Result<Device, String> {
    match s {
        "auto" => Ok(Device::Auto),
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<usize>().is_ok()) => {
            Err("this build has no CUDA backend yet; use --device cpu (or auto)".into())
        }
        _ => Err("expected auto or cpu".into()),
    }
}

fn modes(s: &str) -> Result<Modes, String> {
    if s == "all" {
        return Ok(Modes(Mode::ALL.to_vec()));
    }
    s.parse().map(|m| Modes(vec![m])).map_err(|_| "expected naive, shared, minimal or all".into())
}

/// A run name: one folder under the runs directory.
fn run_name(s: &str) -> Result<String, String> {
    if s.is_empty() || s == "." || s == ".." || s.contains(['/', '\\']) {
        return Err("must be a plain folder name (no '/' or '\\'): the run goes to <runs-dir>/<name>/".into());
    }
    Ok(s.to_string())
}

/// A whole number >= 1.
fn positive(s: &str) -> Result<usize, String> {
    s.parse().ok().filter(|&n| n >= 1).ok_or_else(|| "must be a whole number >= 1".into())
}

/// A whole number from `min` to `max`.
fn whole(s: &str, min: usize, max: usize) -> Result<usize, String> {
    s.parse()
        .ok()
        .filter(|n| (min..=max).contains(n))
        .ok_or_else(|| format!("must be a whole number from {min} to {max}"))
}

fn epochs(s: &str) -> Result<usize, String> {
    whole(s, 1, MAX_EPOCHS)
}

fn batch_size(s: &str) -> Result<usize, String> {
    whole(s, 1, MAX_BATCH)
}

/// A size in bytes: a whole or decimal number and an optional unit, case-insensitive: B, KB,
/// MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (powers of 1024); rounded down to whole
/// bytes, at least 1.
fn size(s: &str) -> Result<u64, String> {
    let expected = || "expected a size such as 4GiB, 512MB, 1.5GB or 1000000 (bytes)".to_string();
    let s = s.trim();
    let (number, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap_or(s.len()));
    let unit: u128 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        _ => return Err(expected()),
    };
    let number = number.trim_end();
    let (int, frac) = number.split_once('.').unwrap_or((number, ""));
    if int.len() + frac.len() == 0 || !int.bytes().chain(frac.bytes()).all(|b| b.is_ascii_digit()) {
        return Err(expected());
    }
    // Exact decimal arithmetic: the digits times the unit over 10^decimals, rounded down.
    let frac = frac.trim_end_matches('0');
    let digits = format!("{int}{frac}");
    let digits = digits.trim_start_matches('0');
    let too_large = || format!("'{s}' is too large");
    let scale = u32::try_from(frac.len()).ok().and_then(|d| 10u128.checked_pow(d)).ok_or_else(too_large)?;
    let value = if digits.is_empty() { Ok(0) } else { digits.parse::<u128>() };
    let bytes = value.ok().and_then(|d| d.checked_mul(unit)).ok_or_else(too_large)? / scale;
    match u64::try_from(bytes) {
        Ok(0) => Err(format!("'{s}' is less than one byte")),
        Ok(b) => Ok(b),
        Err(_) => Err(too_large()),
    }
}

/// A finite number >= 0.
fn non_negative<T: std::str::FromStr + Into<f64> + Copy>(s: &str) -> Result<T, String> {
    let v: T = s.parse().map_err(|_| "must be a number".to_string())?;
    let x: f64 = v.into();
    if x.is_finite() && x >= 0.0 {
        Ok(v)
    } else {
        Err("must be a finite number >= 0".into())
    }
}

fn momentum(s: &str) -> Result<f32, String> {
    non_negative::<f32>(s).ok().filter(|&m| m < 1.0).ok_or_else(|| "must be a number in [0, 1)".into())
}

/// Why the command failed: the message and the exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<densenet::Error> for Failure {
    fn from(e: densenet::Error) -> Failure {
        Failure { code: 1, message: e.0 }
    }
}

/// A bad flag value found after parsing: the usage exit code.
fn usage(message: impl fmt::Display) -> Failure {
    Failure { code: 2, message: message.to_string() }
}

/// A failure while running (exit code 1).
fn failure(message: impl fmt::Display) -> Failure {
    Failure { code: 1, message: message.to_string() }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return parse_error(e),
    };
    let done = match cli.command {
        Command::Train(a) => train(a),
        Command::Eval(a) => eval(a),
        Command::Memory(a) => memory(a),
        Command::Bench(a) => bench(a),
        Command::Download(a) => fetch(a),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// Help and version as clap prints them; every other parse error as one line with clap's tips.
fn parse_error(e: clap::Error) -> ExitCode {
    let code = ExitCode::from(e.exit_code() as u8);
    if matches!(
        e.kind(),
        ErrorKind::DisplayHelp | ErrorKind::DisplayVersion | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
    ) {
        let _ = e.print();
        return code;
    }
    let text = e.to_string();
    // The first paragraph (a missing argument's name is on an indented line of its own), joined.
    let message: Vec<&str> = text.lines().map(str::trim).take_while(|l| !l.is_empty()).collect();
    let message = if message.is_empty() { "error: bad arguments".to_string() } else { message.join(" ") };
    let tips: Vec<&str> = text.lines().filter_map(|l| l.trim().strip_prefix("tip: ")).collect();
    if tips.is_empty() {
        eprintln!("{message}");
    } else {
        eprintln!("{message} ({})", tips.join("; "));
    }
    code
}

fn train(a: TrainArgs) -> Result<(), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let (dataset, batch) = (a.net.dataset, a.net.batch);
    let source = a.source.source();
    if source != Source::Official && !a.download {
        return Err(usage("--url and --archive say where --download fetches the dataset from: add --download"));
    }
    // Everything a file decides is read and checked before any data is loaded or file written.
    let start = Start::new(&a, &cfg)?;
    if start.epoch >= a.epochs {
        return Err(match &a.resume {
            Some(path) => failure(format!(
                "{} is at epoch {} and --epochs {} leaves nothing to train: raise --epochs to continue",
                path.display(),
                start.epoch,
                a.epochs
            )),
            None => usage(format!(
                "--start-epoch {} leaves nothing to train: epochs run from it to --epochs {} (exclusive)",
                start.epoch, a.epochs
            )),
        });
    }
    let run_dir = a.runs_dir.join(&a.name);
    check_run_dir(&run_dir, &a.name, start.resumed.as_deref())?;

    if a.download && download::is_missing(&a.data.data_dir, dataset) {
        report_fetched(&download::fetch(&a.data.data_dir, dataset, &source)?, dataset)?;
    }
    let train_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Train)?);
    let test_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Test)?);
    let mut model = Model::new(cfg, batch, SIDE, SIDE, a.memory, start.seed, CpuBackend::new())?;
    if let Some(state) = &start.state {
        state.apply(&mut model)?;
    }

    let cfg = model.config();
    report(format_args!(
        "{} (run {}) on {}: {} training and {} test images from {}",
        cfg.name(),
        a.name,
        dataset.title(),
        train_set.len(),
        test_set.len(),
        a.data.data_dir.display()
    ))?;
    report(format_args!("Number of model parameters: {}", model.layout().len))?;
    report(format_args!("{}", a.device.line(model.backend())))?;
    report(format_args!("{}", plan_line(model.plan())))?;
    match (&start.resumed, &a.init_weights) {
        (Some(path), _) => report(format_args!(
            "Resumed from {}: epoch {}, step {}, best Prec@1 {:.3}, seed {} (weights, running statistics, momentum)",
            path.display(),
            start.epoch,
            model.steps(),
            start.best.unwrap_or(0.0),
            start.seed
        ))?,
        (None, Some(path)) => {
            report(format_args!("Initial weights and running statistics from {} (momentum from zero)", path.display()))?
        }
        (None, None) => {}
    }
    let recipe = Recipe {
        epochs: a.epochs,
        start_epoch: start.epoch,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        print_freq: a.progress.print_freq,
    };
    let milestones = densenet::train::schedule::milestones(a.epochs);
    report(format_args!(
        "Training: epochs {} to {}, batch {batch}, lr {} (/10 at epochs {} and {}), Nesterov momentum {}, \
         weight decay {}, augmentation {}, seed {}",
        start.epoch,
        a.epochs - 1,
        a.lr,
        milestones.0,
        milestones.1,
        a.momentum,
        a.weight_decay,
        if a.no_augment { "off" } else { "on" },
        start.seed
    ))?;

    let mut train_loader = Loader::train(train_set, dataset, batch, start.seed, !a.no_augment)?;
    let mut test_loader = Loader::test(test_set, dataset, batch)?;
    let saver = Saver::create(&run_dir, dataset)?;
    report(format_args!(
        "Checkpoints: {} every epoch, {} on a new best test Prec@1",
        saver.checkpoint().display(),
        checkpoint::BEST
    ))?;
    let mut events = if a.tensorboard { Some(EventWriter::create(&run_dir)?) } else { None };
    if let Some(w) = &events {
        report(format_args!("TensorBoard: {}", w.path().display()))?;
    }
    let best = train::fit(&mut model, &mut train_loader, &mut test_loader, &recipe, start.best, |m, end| {
        saver.save(m, end.epoch + 1, end.best, end.improved)?;
        if let Some(w) = events.as_mut() {
            let step = end.epoch as i64;
            w.scalar("train_loss", end.train.loss as f32, step)?;
            w.scalar("train_acc", end.train.top1 as f32, step)?;
            w.scalar("val_loss", end.test.loss as f32, step)?;
            w.scalar("val_acc", end.test.top1 as f32, step)?;
            w.scalar("learning_rate", end.lr as f32, step)?;
            w.flush()?;
        }
        let note = if end.improved {
            format!("; new best Prec@1 {:.3}: {}", end.best, checkpoint::BEST)
        } else {
            String::new()
        };
        report(format_args!(" * Saved {} (next epoch {}){note}", checkpoint::CHECKPOINT, end.epoch + 1))
    })?;
    report(format_args!("Best accuracy: {:.3}", best.unwrap_or(0.0)))?;
    Ok(())
}

/// Where a training run starts: the first epoch, the seed, the best accuracy so far, and the
/// state that replaces the seed's initialization (a resumed checkpoint's, or initial weights).
struct Start {
    epoch: usize,
    seed: u64,
    best: Option<f64>,
    state: Option<checkpoint::State>,
    /// The checkpoint file resumed from.
    resumed: Option<PathBuf>,
}

impl Start {
    /// Reads and checks `--resume` or `--init-weights`. A resumed run takes the checkpoint's
    /// next epoch, seed and best accuracy, as the reference `--resume` takes its epoch; an
    /// explicit `--start-epoch` or `--seed` that disagrees is refused.
    fn new(a: &TrainArgs, cfg: &NetConfig) -> Result<Start, Failure> {
        let (epoch, seed) = (a.start_epoch.unwrap_or(0), a.seed.unwrap_or(0));
        if let Some(path) = &a.resume {
            // A run directory stands for its checkpoint.
            let path = if path.is_dir() { path.join(checkpoint::CHECKPOINT) } else { path.clone() };
            let ck = Checkpoint::read(&path)?;
            ck.check_network(cfg, a.net.dataset)?;
            let m = ck.meta();
            if let Some(s) = a.seed.filter(|&s| s != m.seed) {
                return Err(failure(format!(
                    "--seed {s} disagrees with {}, trained with seed {}: a resumed run continues its random streams \
                     (leave --seed out)",
                    path.display(),
                    m.seed
                )));
            }
            if let Some(e) = a.start_epoch.filter(|&e| e != m.epoch) {
                return Err(failure(format!(
                    "--start-epoch {e} disagrees with {}, whose next epoch is {} (leave --start-epoch out, or start \
                     from its weights at another epoch with --init-weights)",
                    path.display(),
                    m.epoch
                )));
            }
            let state = ck.state()?;
            return Ok(Start {
                epoch: m.epoch,
                seed: m.seed,
                best: Some(m.best),
                state: Some(state),
                resumed: Some(path),
            });
        }
        let state = a.init_weights.as_deref().map(|p| checkpoint::read_weights(p, cfg)).transpose()?;
        Ok(Start { epoch, seed, best: None, state, resumed: None })
    }
}

/// Refuses to write over the checkpoints of an earlier run, unless this run resumes from a
/// checkpoint in that run directory.
fn check_run_dir(run_dir: &Path, name: &str, resumed: Option<&Path>) -> Result<(), Failure> {
    let parent = |p: &Path| match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let same_run =
        resumed.is_some_and(|r| matches!((parent(r).canonicalize(), run_dir.canonicalize()), (Ok(a), Ok(b)) if a == b));
    for file in [checkpoint::CHECKPOINT, checkpoint::BEST] {
        let path = run_dir.join(file);
        if !same_run && path.exists() {
            return Err(failure(format!(
                "{} already exists from an earlier run named '{name}': continue that run with --resume {}, or \
                 choose another --name or --runs-dir",
                path.display(),
                run_dir.join(checkpoint::CHECKPOINT).display()
            )));
        }
    }
    Ok(())
}

fn fetch(a: DownloadArgs) -> Result<(), Failure> {
    report_fetched(&download::fetch(&a.data_dir, a.dataset, &a.source.source())?, a.dataset)?;
    Ok(())
}

/// One line on stdout: where the dataset is and its image counts.
fn report_fetched(f: &Fetched, dataset: Dataset) -> densenet::Result<()> {
    let counts = format!("{} training and {} test images", f.train, f.test);
    if f.already_there {
        report(format_args!("{} is already in {} ({counts}); nothing downloaded", dataset.title(), f.folder.display()))
    } else {
        report(format_args!("{} is ready in {}: {counts}", dataset.title(), f.folder.display()))
    }
}

/// One line: the plan's total and its bytes per category, in MiB.
fn plan_line(plan: &Plan) -> String {
    let parts: Vec<String> = Category::ALL.iter().map(|&c| format!("{} {:.1}", c.name(), mib(plan.bytes(c)))).collect();
    format!(
        "Memory plan ({}, batch {}): {:.1} MiB = {} MiB",
        plan.mode,
        plan.batch,
        mib(plan.total_bytes()),
        parts.join(" + ")
    )
}

fn mib(bytes: usize) -> f64 {
    bytes as f64 / (1u64 << 20) as f64
}

/// The plan of `cfg` (built as `net`) for `batch` images in `mode`, its workspace sized by `be`.
fn plan(cfg: &NetConfig, net: &Net, be: &mut CpuBackend, batch: usize, mode: Mode) -> densenet::Result<Plan> {
    Plan::new(cfg, net, batch, SIDE, SIDE, mode, |c| be.workspace_len(c))
}

/// The largest batch (up to [`MAX_BATCH`]) whose planned total fits in `budget` bytes, if any
/// does. The total grows with the batch, so a binary search finds it.
fn max_batch(
    cfg: &NetConfig,
    net: &Net,
    be: &mut CpuBackend,
    mode: Mode,
    budget: u64,
) -> densenet::Result<Option<usize>> {
    let mut fits = |batch| plan(cfg, net, be, batch, mode).map(|p| p.total_bytes() as u64 <= budget);
    if !fits(1)? {
        return Ok(None);
    }
    if fits(MAX_BATCH)? {
        return Ok(Some(MAX_BATCH));
    }
    // `lo` fits, `hi` does not.
    let (mut lo, mut hi) = (1, MAX_BATCH);
    while hi - lo > 1 {
        let mid = lo + (hi - lo) / 2;
        if fits(mid)? {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    Ok(Some(lo))
}

fn memory(a: MemoryArgs) -> Result<(), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let net = Net::new(&cfg);
    let mut be = CpuBackend::new();
    let batch = a.net.batch;
    let mut plans = Vec::new();
    for &mode in &a.memory.0 {
        let fit = a.budget.map(|b| max_batch(&cfg, &net, &mut be, mode, b)).transpose()?;
        plans.push((plan(&cfg, &net, &mut be, batch, mode)?, fit.flatten()));
    }
    let params = net.layout.len;
    if a.json {
        let modes: serde_json::Map<String, serde_json::Value> = plans
            .iter()
            .map(|(p, fit)| {
                let mut m = serde_json::Map::new();
                m.insert("total_bytes".into(), p.total_bytes().into());
                for c in Category::ALL {
                    m.insert(c.name().into(), p.bytes(c).into());
                }
                if a.budget.is_some() {
                    m.insert("max_batch".into(), (*fit).into());
                }
                (p.mode.to_string(), m.into())
            })
            .collect();
        let mut json = serde_json::json!({"network": cfg.name(), "params": params, "batch": batch, "modes": modes});
        if let Some(b) = a.budget {
            json["budget_bytes"] = b.into();
        }
        report(format_args!("{json}"))?;
        return Ok(());
    }
    report(format_args!(
        "{} on {}, batch {batch} of {SIDE}x{SIDE}, {params} parameters; workspace for {}",
        cfg.name(),
        a.net.dataset.title(),
        be.describe()
    ))?;
    if let Some(b) = a.budget {
        report(format_args!(
            "Budget {b} bytes ({:.1} MiB): max batch is the largest batch whose planned total fits",
            mib(b as usize)
        ))?;
    }
    let mut header = format!("{:<8}", "MiB");
    for c in Category::ALL {
        header += &format!(" {:>11}", c.name());
    }
    header += &format!(" {:>11}", "total");
    if a.budget.is_some() {
        header += &format!(" {:>11}", "max batch");
    }
    report(format_args!("{header}"))?;
    for (p, fit) in &plans {
        let mut row = format!("{:<8}", p.mode.to_string());
        for c in Category::ALL {
            row += &format!(" {:>11.1}", mib(p.bytes(c)));
        }
        row += &format!(" {:>11.1}", mib(p.total_bytes()));
        if a.budget.is_some() {
            row += &format!(" {:>11}", fit.map_or("none fits".to_string(), |n| n.to_string()));
        }
        report(format_args!("{row}"))?;
    }
    Ok(())
}

fn eval(a: EvalArgs) -> Result<(), Failure> {
    if a.checkpoint.is_dir() {
        return Err(failure(format!(
            "{} is a directory: give a checkpoint file, such as {} or {}",
            a.checkpoint.display(),
            a.checkpoint.join(checkpoint::CHECKPOINT).display(),
            a.checkpoint.join(checkpoint::BEST).display()
        )));
    }
    let ck = Checkpoint::read(&a.checkpoint)?;
    let m = ck.meta();
    let dataset = a.dataset.unwrap_or(m.dataset);
    if dataset.classes() != m.config.num_classes {
        return Err(failure(format!(
            "{} holds {} for {} classes ({}); --dataset {dataset} has {}",
            a.checkpoint.display(),
            m.config.name(),
            m.config.num_classes,
            m.dataset.title(),
            dataset.classes()
        )));
    }
    let state = ck.state()?;
    let test_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Test)?);
    let mut model = Model::new(m.config.clone(), a.batch, SIDE, SIDE, Mode::Minimal, m.seed, CpuBackend::new())?;
    state.apply(&mut model)?;
    report(format_args!(
        "{} from {} (next epoch {}, step {}, best Prec@1 {:.3}) on {}: {} test images from {}",
        m.config.name(),
        a.checkpoint.display(),
        m.epoch,
        m.steps,
        m.best,
        dataset.title(),
        test_set.len(),
        a.data.data_dir.display()
    ))?;
    report(format_args!("{}", a.device.line(model.backend())))?;
    let mut loader = Loader::test(test_set, dataset, a.batch)?;
    let v = epoch::evaluate(&mut model, &mut loader, a.progress.print_freq)?;
    let error = 100.0 - v.top1;
    report(format_args!(" * Test Loss {:.4}  Prec@1 {:.3}  Error {error:.3}", v.loss, v.top1))?;
    if a.json {
        report(format_args!("{}", serde_json::json!({"loss": v.loss, "top1": v.top1, "error": error})))?;
    }
    Ok(())
}

fn bench(a: BenchArgs) -> Result<(), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let (batch, classes) = (a.net.batch, cfg.num_classes);
    // Normalized-image statistics, and labels of every class.
    let images: Vec<f32> = (0..batch * 3 * SIDE * SIDE).map(|i| rng::normal(BENCH_SEED, i as u64) as f32).collect();
    let labels: Vec<u32> = (0..batch).map(|i| (rng::derive(BENCH_SEED, i as u64) % classes as u64) as u32).collect();
    let be = CpuBackend::new();
    let heap_start = heap::start();
    let mut model = Model::new(cfg, batch, SIDE, SIDE, a.memory, BENCH_SEED, be)?;
    report(format_args!(
        "{}: training steps on random {}-shaped data (seed {BENCH_SEED}), batch {batch}, {} parameters",
        model.config().name(),
        a.net.dataset.title(),
        model.layout().len
    ))?;
    report(format_args!("{}", a.device.line(model.backend())))?;
    report(format_args!("{}", plan_line(model.plan())))?;
    let mut times = Vec::new();
    for s in 0..a.warmup + a.steps {
        let start = Instant::now();
        model.train_step(&images, &labels, Sgd::default())?;
        let secs = start.elapsed().as_secs_f64();
        if s < a.warmup {
            report(format_args!("Warm-up step {}/{}: {:.1} ms", s + 1, a.warmup, 1e3 * secs))?;
        } else {
            times.push(secs);
            let (i, n) = (times.len(), a.steps);
            report(format_args!("Step {i}/{n}: {:.1} ms ({:.1} images/s)", 1e3 * secs, batch as f64 / secs))?;
        }
    }
    let measured = heap::peak().saturating_sub(heap_start);
    let planned = model.plan().total_bytes();
    let rss = peak_rss();
    times.sort_by(f64::total_cmp);
    let median = match times.len() % 2 {
        1 => times[times.len() / 2],
        _ => (times[times.len() / 2 - 1] + times[times.len() / 2]) / 2.0,
    };
    let images_per_s = batch as f64 / median;
    report(format_args!(
        "Median step {:.1} ms (min {:.1}, max {:.1}): {images_per_s:.1} images/s",
        1e3 * median,
        1e3 * times[0],
        1e3 * times[times.len() - 1]
    ))?;
    report(format_args!(
        "Peak heap {:.1} MiB measured, {:.1} MiB planned (+{:.1} MiB); peak RSS {}",
        mib(measured),
        mib(planned),
        mib(measured.saturating_sub(planned)),
        if rss == 0 { "unknown".to_string() } else { format!("{:.1} MiB", mib(rss as usize)) }
    ))?;
    if a.json {
        let json = serde_json::json!({
            "network": model.config().name(),
            "device": model.backend().describe(),
            "memory": a.memory.to_string(),
            "batch": batch,
            "steps": a.steps,
            "warmup": a.warmup,
            "images_per_s": images_per_s,
            "step_ms": 1e3 * median,
            "planned_peak_bytes": planned,
            "measured_peak_bytes": measured,
            "peak_rss_bytes": rss,
        });
        report(format_args!("{json}"))?;
    }
    Ok(())
}

/// This process's peak resident set size in bytes (`VmHWM` in /proc/self/status); 0 where
/// that is not available.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status.lines().find_map(|l| l.strip_prefix("VmHWM:")).and_then(|v| v.trim().strip_suffix("kB"));
    kib.and_then(|v| v.trim().parse::<u64>().ok()).map_or(0, |k| k * 1024)
}

/// Heap accounting for `bench`: the system allocator, counting the bytes in use and their peak
/// (two relaxed atomic operations per allocation; a training step allocates next to nothing).
mod heap {
    use std::alloc::{GlobalAlloc, Layout, System};
    use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

    static CURRENT: AtomicUsize = AtomicUsize::new(0);
    static PEAK: AtomicUsize = AtomicUsize::new(0);

    /// The counting allocator.
    pub struct Counting;

    fn grow(bytes: usize) {
        let now = CURRENT.fetch_add(bytes, Relaxed) + bytes;
        PEAK.fetch_max(now, Relaxed);
    }

    fn shrink(bytes: usize) {
        CURRENT.fetch_sub(bytes, Relaxed);
    }

    // SAFETY: every call goes to the system allocator unchanged; only successful ones are counted.
    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            let p = System.alloc(layout);
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }

        unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
            let p = System.alloc_zeroed(layout);
            if !p.is_null() {
                grow(layout.size());
            }
            p
        }

        unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
            System.dealloc(p, layout);
            shrink(layout.size());
        }

        unsafe fn realloc(&self, p: *mut u8, layout: Layout, size: usize) -> *mut u8 {
            let q = System.realloc(p, layout, size);
            if !q.is_null() {
                if size > layout.size() {
                    grow(size - layout.size());
                } else {
                    shrink(layout.size() - size);
                }
            }
            q
        }
    }

    /// Starts a measurement: the peak restarts from the bytes in use now, which are returned.
    pub fn start() -> usize {
        let now = CURRENT.load(Relaxed);
        PEAK.store(now, Relaxed);
        now
    }

    /// The most bytes in use at once since [`start`].
    pub fn peak() -> usize {
        PEAK.load(Relaxed)
    }
}

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
use clap::parser::ValueSource;
use clap::{ArgMatches, Args, CommandFactory, FromArgMatches, Parser, Subcommand};
use densenet::backend::{Backend, CpuBackend, Sgd};
use densenet::config::NetConfig;
use densenet::data::cifar::{Dataset, Images, Split, IMAGE_BYTES, SIDE};
use densenet::data::download::{self, Fetched, Source};
use densenet::data::loader::Loader;
use densenet::model::net::Net;
use densenet::model::plan::{Category, Mode, Plan};
use densenet::model::Model;
use densenet::rng;
use densenet::train::checkpoint::{self, Checkpoint, Saver};
use densenet::train::recipe::{Recipe, MAX_BATCH, MAX_EPOCHS};
use densenet::train::tensorboard::EventWriter;
use densenet::train::{self, epoch, report};
use std::collections::HashSet;
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

mod commands;

use commands::device::DeviceArgs;

#[global_allocator]
static HEAP: commands::bench::heap::Counting = commands::bench::heap::Counting;

/// Largest `bench --steps` and `--warmup`.
const MAX_STEPS: usize = 1_000_000;
/// Seed of `bench`'s network and random batch.
const BENCH_SEED: u64 = 0;

#[derive(Parser)]
#[command(
    name = "densenet",
    version,
    long_version = densenet::backend::cuda::kernels::VERSION,
    about = "Memory-efficient DenseNet training on CIFAR",
    // A repeated flag takes its last value, as argparse does, so scripts can append overrides.
    args_override_self = true
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a DenseNet on CIFAR-10 or CIFAR-100 (flags and defaults of the reference train.py).
    Train(Box<TrainArgs>),
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
    /// checkpoint.safetensors), in its run directory, with its recipe (network, data set,
    /// batch size, SGD settings, epochs, augmentation, seed, name: no flag needs retyping) and
    /// its state (weights, running statistics, momentum, step counter, next epoch, best
    /// accuracy). A recipe flag that differs from the run's is refused (see --change-recipe).
    #[arg(long, value_name = "PATH", conflicts_with = "init_weights")]
    resume: Option<PathBuf>,
    /// With --resume: change the run's recipe to the recipe flags given (a longer --epochs,
    /// say); each change is printed and recorded in the run's checkpoints. The network's
    /// tensors cannot change.
    #[arg(long, requires = "resume")]
    change_recipe: bool,
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
    /// Memory mode: naive, shared or minimal [with --resume: the run's unless given].
    #[arg(long, value_name = "MODE", default_value = "minimal")]
    memory: Mode,
    /// Seed of the initialization, the shuffles, the augmentation and dropout [default: 0; with
    /// --resume: the run's, which an explicit value must equal unless --change-recipe].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    #[command(flatten)]
    device: DeviceArgs,
    /// The flags given on the command line (their clap ids): a resumed run takes the others
    /// from its recipe.
    #[arg(skip)]
    given: HashSet<String>,
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

#[derive(Args)]
struct EvalArgs {
    /// A checkpoint written by `densenet train` (checkpoint.safetensors or model_best.safetensors),
    /// or a run directory for its model_best.safetensors: its metadata describes the network,
    /// so no network flags are needed.
    #[arg(long, value_name = "PATH")]
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
    /// Download and extract again even when the dataset is there (its folder is replaced once
    /// the new copy is in place; kept if the download fails).
    #[arg(long)]
    force: bool,
}

/// The memory modes asked for.
#[derive(Clone, Debug)]
struct Modes(Vec<Mode>);

fn modes(s: &str) -> Result<Modes, String> {
    if s == "all" {
        return Ok(Modes(Mode::ALL.to_vec()));
    }
    s.parse().map(|m| Modes(vec![m])).map_err(|_| "expected naive, shared, minimal or all".into())
}

/// A run name: one folder under the runs directory.
fn run_name(s: &str) -> Result<String, String> {
    densenet::train::recipe::check_name(s).map(|()| s.to_string())
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
    let total = value.ok().and_then(|d| d.checked_mul(unit)).ok_or_else(too_large)?;
    if total % scale != 0 {
        return Err(format!("'{s}' is not a whole number of bytes"));
    }
    let bytes = total / scale;
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

/// Prints the library's log records on stderr: errors as `error: ...`, warnings as `warning:
/// ...`, notes as they are; other crates' records are not ours to show.
struct Stderr;

impl log::Log for Stderr {
    fn enabled(&self, m: &log::Metadata) -> bool {
        m.level() <= log::Level::Info && m.target().starts_with("densenet")
    }

    fn log(&self, r: &log::Record) {
        if self.enabled(r.metadata()) {
            match r.level() {
                log::Level::Error => eprintln!("error: {}", r.args()),
                log::Level::Warn => eprintln!("warning: {}", r.args()),
                _ => eprintln!("{}", r.args()),
            }
        }
    }

    fn flush(&self) {}
}

fn main() -> ExitCode {
    static LOGGER: Stderr = Stderr;
    if log::set_logger(&LOGGER).is_ok() {
        log::set_max_level(log::LevelFilter::Info);
    }
    let parsed = Cli::command().try_get_matches().and_then(|m| Cli::from_arg_matches(&m).map(|cli| (cli, m)));
    let (cli, matches) = match parsed {
        Ok(parsed) => parsed,
        Err(e) => return parse_error(e),
    };
    let done = match cli.command {
        Command::Train(mut a) => {
            a.given = matches.subcommand_matches("train").map(given).unwrap_or_default();
            commands::train::train(*a)
        }
        Command::Eval(a) => commands::eval::eval(a),
        Command::Memory(a) => commands::memory::memory(a),
        Command::Bench(a) => commands::bench::bench(a),
        Command::Download(a) => commands::download::fetch(a),
    };
    match done {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

/// The ids of the arguments given on the command line (not defaulted).
fn given(m: &ArgMatches) -> HashSet<String> {
    m.ids()
        .filter(|id| m.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect()
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

#[cfg(test)]
mod tests {
    use super::size;

    /// Fuzzing the size parser with strings drawn from its own alphabet (digits, dots, spaces,
    /// unit letters, signs) and a few others, a fixed seeded budget: no panic, every rejection
    /// one line, and what it accepts is at least one byte.
    #[test]
    fn fuzzed_sizes_never_panic() {
        const CASES: u64 = 50_000;
        let alphabet: Vec<char> = "0123456789.  kKmMgGtTiIbB-+eE_x\u{e9}".chars().collect();
        let mut accepted = 0;
        for case in 0..CASES {
            let r = |k: u64| densenet::rng::derive(densenet::rng::derive(0x517e, case), k);
            let len = r(0) % 12;
            let s: String = (0..len).map(|k| alphabet[(r(1 + k) % alphabet.len() as u64) as usize]).collect();
            match std::panic::catch_unwind(|| size(&s)) {
                Err(_) => panic!("{s:?} panicked"),
                Ok(Ok(bytes)) => {
                    accepted += 1;
                    assert!(bytes >= 1, "{s:?}");
                }
                Ok(Err(e)) => assert!(!e.contains('\n') && !e.is_empty(), "{s:?}: {e}"),
            }
        }
        eprintln!("size parser: {CASES} cases, {accepted} accepted");
        assert!(accepted > 0, "no size was accepted");
    }
}

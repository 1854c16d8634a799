//! The `densenet` command line: `train` (the reference `train.py`, flags and defaults kept,
//! with checkpoints, exact resume and initial weights), `eval` (a checkpoint on the test set),
//! `memory` (the planned bytes per category for each memory mode, and the largest batch that
//! fits a budget), `bench` (training steps on random data: speed, planned and measured memory),
//! `download` (the CIFAR archive, fetched, checked and extracted) and `export` (a checkpoint's
//! weights in our names or torchvision's).
//!
//! Every error is one line on stderr starting with `error:`; bad flags exit with 2, failures
//! while running with 1. With `--json`, `eval`, `memory` and `bench` print one JSON object as
//! the last line of stdout.

mod commands;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use commands::{bench, download, eval, export, memory, output, train};
use std::process::ExitCode;

/// Counts the heap for `bench`'s measured peak.
#[global_allocator]
static HEAP: densenet::measure::Counting = densenet::measure::Counting;

#[derive(Parser)]
#[command(
    name = "densenet",
    version,
    long_version = densenet::backend::cuda::kernels::VERSION,
    about = "Memory-efficient DenseNet training: the CIFAR networks and the ImageNet architectures",
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
    Train(Box<train::TrainArgs>),
    /// Evaluate a checkpoint written by `train` on the test set: loss and Prec@1.
    Eval(eval::EvalArgs),
    /// Print the memory plan: bytes per category for each memory mode (and, with --budget, the
    /// largest batch that fits).
    Memory(memory::MemoryArgs),
    /// Time training steps on random data: images/s, step time, planned and measured memory.
    Bench(bench::BenchArgs),
    /// Download the CIFAR binary archive, check its MD5 and extract it into the data directory.
    Download(download::DownloadArgs),
    /// Write a checkpoint's weights and running statistics as a safetensors file, in our names
    /// or torchvision's (for torchvision.models.densenet121 and its kin).
    Export(export::ExportArgs),
}

fn main() -> ExitCode {
    output::show_log();
    let matches = match Cli::command().try_get_matches() {
        Ok(m) => m,
        Err(e) => return output::clap_error(e),
    };
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => return output::clap_error(e),
    };
    output::exit(match cli.command {
        Command::Train(a) => train::run(*a, matches.subcommand_matches("train").expect("train's matches")),
        Command::Eval(a) => eval::run(a),
        Command::Memory(a) => memory::run(a),
        Command::Bench(a) => bench::run(a),
        Command::Download(a) => download::run(a),
        Command::Export(a) => export::run(a),
    })
}

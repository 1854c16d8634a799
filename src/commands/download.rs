//! `densenet download`: fetch, check and extract a CIFAR archive.

use super::args::SourceArgs;
use super::output::report;
use super::progress::Transfer;
use super::Outcome;
use clap::Args;
use densenet::data::cifar::Dataset;
use densenet::data::download::{self, Fetched};
use std::path::PathBuf;

/// The flags of `densenet download`.
#[derive(Args)]
pub(crate) struct DownloadArgs {
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

/// Runs `densenet download`.
pub(crate) fn run(a: DownloadArgs) -> Outcome {
    let get = if a.force { download::refetch } else { download::fetch };
    let fetched = get(&a.data_dir, a.dataset, &a.source.source(), &mut Transfer::new())?;
    report_fetched(&fetched, a.dataset)?;
    Ok(())
}

/// One line on stdout: where the dataset is and its image counts.
pub(crate) fn report_fetched(f: &Fetched, dataset: Dataset) -> densenet::Result<()> {
    let counts = format!("{} training and {} test images", f.train, f.test);
    if f.already_there {
        report(format_args!("{} is already in {} ({counts}); nothing downloaded", dataset.title(), f.folder.display()))
    } else {
        report(format_args!("{} is ready in {}: {counts}", dataset.title(), f.folder.display()))
    }
}

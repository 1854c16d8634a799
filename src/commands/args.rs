//! The argument groups several subcommands share: the network, the data directory, the
//! progress lines and the dataset's source.

use super::parse;
use clap::Args;
use densenet::config::NetConfig;
use densenet::data::cifar::Dataset;
use densenet::data::download::Source;
use std::path::PathBuf;

/// The network, its data set and the batch.
#[derive(Args)]
pub(crate) struct NetArgs {
    /// Total depth of the network.
    #[arg(long, value_name = "DEPTH", default_value_t = 100)]
    pub(crate) layers: usize,
    /// Growth rate k: channels each layer adds.
    #[arg(long, value_name = "K", default_value_t = 12)]
    pub(crate) growth: usize,
    /// Dropout probability after each convolution.
    #[arg(long, value_name = "P", default_value_t = 0.0, allow_negative_numbers = true)]
    pub(crate) droprate: f32,
    /// Compression: a transition keeps floor(C * reduce) channels.
    #[arg(long, value_name = "R", default_value_t = 0.5, allow_negative_numbers = true)]
    pub(crate) reduce: f64,
    /// Basic layers (BN-ReLU-3x3 conv) instead of bottleneck layers.
    #[arg(long)]
    pub(crate) no_bottleneck: bool,
    /// Dataset: cifar10 or cifar100.
    #[arg(long, value_name = "NAME", default_value = "cifar10")]
    pub(crate) dataset: Dataset,
    /// Images per batch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 64, value_parser = parse::batch_size, allow_negative_numbers = true)]
    pub(crate) batch: usize,
}

impl NetArgs {
    /// The network the flags describe.
    pub(crate) fn config(&self) -> densenet::Result<NetConfig> {
        let classes = self.dataset.classes();
        NetConfig::cifar(self.layers, self.growth, !self.no_bottleneck, self.reduce, self.droprate, classes)
    }
}

/// Where the dataset is.
#[derive(Args)]
pub(crate) struct DataArgs {
    /// Directory holding the dataset's folder (cifar-10-batches-bin/, cifar-100-binary/) or its files.
    #[arg(long, value_name = "DIR", default_value = "./data")]
    pub(crate) data_dir: PathBuf,
}

/// How often a pass over the data reports.
#[derive(Args)]
pub(crate) struct ProgressArgs {
    /// Print a progress line every N batches (on a terminal, one progress bar redrawn in place
    /// instead).
    #[arg(short = 'p', long = "print-freq", value_name = "N", default_value_t = 10, value_parser = parse::positive, allow_negative_numbers = true)]
    pub(crate) print_freq: usize,
}

/// Where the archive comes from (the official URL when neither is given).
#[derive(Args)]
pub(crate) struct SourceArgs {
    /// Fetch the archive from this URL (a mirror) instead of the official one.
    #[arg(long, value_name = "URL", conflicts_with = "archive")]
    url: Option<String>,
    /// Extract this local copy of the archive (machines without network).
    #[arg(long, value_name = "PATH")]
    archive: Option<PathBuf>,
}

impl SourceArgs {
    /// The source the flags name.
    pub(crate) fn source(&self) -> Source {
        match (&self.url, &self.archive) {
            (Some(url), _) => Source::Url(url.clone()),
            (None, Some(path)) => Source::Archive(path.clone()),
            (None, None) => Source::Official,
        }
    }
}

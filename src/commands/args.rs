//! The argument groups several subcommands share: the network, the data directory, the
//! progress lines and the dataset's source.

use super::parse;
use clap::Args;
use densenet::config::{Arch, NetConfig, IMAGENET_CLASSES};
use densenet::data::cifar::Dataset;
use densenet::data::download::Source;
use std::path::PathBuf;

/// The network, its data set, its input size and the batch.
#[derive(Args)]
pub(crate) struct NetArgs {
    /// An ImageNet architecture instead of the CIFAR network of --layers, --reduce and
    /// --no-bottleneck: densenet121, densenet169, densenet201, densenet161 or densenet264. The
    /// paper's largest model, DenseNet-264 with k = 48 (about 73 M parameters), is
    /// `--arch densenet264 --growth 48`.
    #[arg(long, value_name = "NAME", conflicts_with_all = ["layers", "reduce", "no_bottleneck"])]
    pub(crate) arch: Option<Arch>,
    /// Total depth of the network.
    #[arg(long, value_name = "DEPTH", default_value_t = 100)]
    pub(crate) layers: usize,
    /// Growth rate k: channels each layer adds [default: 12; with --arch, the architecture's:
    /// 48 for densenet161, 32 for the others].
    #[arg(long, value_name = "K")]
    pub(crate) growth: Option<usize>,
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
    /// Output classes [default: the dataset's; `bench` and `memory` with --arch: 1000]. A
    /// training start whose --init-weights classifier has another count re-initializes it.
    #[arg(long, value_name = "N", value_parser = parse::positive, allow_negative_numbers = true)]
    pub(crate) num_classes: Option<usize>,
    /// Input height and width: the 32x32 images upsampled by a whole factor for `train` [default:
    /// 224 with --arch, 32 otherwise].
    #[arg(long, value_name = "N", value_parser = parse::positive, allow_negative_numbers = true)]
    pub(crate) image_size: Option<usize>,
    /// Images per batch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 64, value_parser = parse::batch_size, allow_negative_numbers = true)]
    pub(crate) batch: usize,
}

/// Growth rate of the CIFAR network without --growth.
pub(crate) const CIFAR_GROWTH: usize = 12;

/// The input side of an ImageNet architecture without --image-size.
pub(crate) const IMAGENET_SIZE: usize = 224;

impl NetArgs {
    /// The network the flags describe, predicting `--num-classes` or `classes` classes.
    pub(crate) fn config(&self, classes: usize) -> densenet::Result<NetConfig> {
        let classes = self.num_classes.unwrap_or(classes);
        match self.arch {
            Some(arch) => arch.config(self.growth.unwrap_or(arch.growth()), self.droprate, classes),
            None => {
                let growth = self.growth.unwrap_or(CIFAR_GROWTH);
                NetConfig::cifar(self.layers, growth, !self.no_bottleneck, self.reduce, self.droprate, classes)
            }
        }
    }

    /// The classes a network predicts without --num-classes where no data set fixes them:
    /// ImageNet's for an architecture, the dataset's otherwise.
    pub(crate) fn free_classes(&self) -> usize {
        match self.arch {
            Some(_) => IMAGENET_CLASSES,
            None => self.dataset.classes(),
        }
    }

    /// The input side: --image-size, or the network's usual one.
    pub(crate) fn image_size(&self) -> usize {
        self.image_size.unwrap_or(match self.arch {
            Some(_) => IMAGENET_SIZE,
            None => densenet::data::cifar::SIDE,
        })
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

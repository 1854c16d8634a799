//! `densenet eval`: a checkpoint on the test set.

use super::args::{DataArgs, ProgressArgs, IMAGENET_SIZE};
use super::device::{self, DeviceArgs};
use super::output::{report, report_json};
use super::progress::Passes;
use super::train::upsampled;
use super::{failure, parse, usage, Failure, Outcome};
use clap::Args;
use densenet::backend::Backend;
use densenet::config::{Arch, NetConfig};
use densenet::data::cifar::{Dataset, Images, Split, SIDE};
use densenet::data::loader::Loader;
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::train::checkpoint::{self, Checkpoint, State};
use densenet::train::epoch;
use densenet::train::recipe::{check_classes, check_image_size};
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// The flags of `densenet eval`.
#[derive(Args)]
pub(crate) struct EvalArgs {
    /// A checkpoint written by `densenet train` (checkpoint.safetensors or model_best.safetensors),
    /// or a run directory for its model_best.safetensors: its metadata describes the network,
    /// so no network flags are needed. With --arch: a weights file in any naming (an export, a
    /// converted torchvision state dict).
    #[arg(long, value_name = "PATH")]
    checkpoint: PathBuf,
    /// Dataset: cifar10 or cifar100 [default: the checkpoint's; with --arch, cifar10].
    #[arg(long, value_name = "NAME")]
    dataset: Option<Dataset>,
    /// The ImageNet architecture of a weights file without densenet metadata: densenet121,
    /// densenet169, densenet201, densenet161 or densenet264.
    #[arg(long, value_name = "NAME")]
    arch: Option<Arch>,
    /// With --arch: the growth rate, where it is not the architecture's.
    #[arg(long, value_name = "K", requires = "arch")]
    growth: Option<usize>,
    /// With --arch: the classes of the file's classifier [default: the dataset's], which must
    /// be the dataset's.
    #[arg(long, value_name = "N", requires = "arch", value_parser = parse::positive, allow_negative_numbers = true)]
    num_classes: Option<usize>,
    /// Input height and width: the 32x32 test images upsampled by a whole factor [default: the
    /// checkpoint's; with --arch, 224].
    #[arg(long, value_name = "N", value_parser = parse::positive, allow_negative_numbers = true)]
    image_size: Option<usize>,
    #[command(flatten)]
    data: DataArgs,
    /// Images per batch.
    #[arg(short = 'b', long = "batch-size", value_name = "N", default_value_t = 64, value_parser = parse::batch_size, allow_negative_numbers = true)]
    batch: usize,
    #[command(flatten)]
    progress: ProgressArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// Also print the result as one JSON object, the last line: {"loss", "top1", "error"}.
    #[arg(long)]
    json: bool,
}

/// `eval --json`: the test set's mean loss, and top-1 precision and error in percent.
#[derive(Serialize)]
pub(crate) struct EvalReport {
    /// Mean cross-entropy over the test set.
    pub(crate) loss: f64,
    /// Top-1 precision, percent.
    pub(crate) top1: f64,
    /// 100 - top1.
    pub(crate) error: f64,
}

/// What is evaluated: a network, its state, where it came from and the input side.
struct Evaluated {
    cfg: NetConfig,
    state: State,
    /// Where the state came from, in words.
    from: String,
    size: usize,
    dataset: Dataset,
}

/// Runs `densenet eval`.
pub(crate) fn run(a: EvalArgs) -> Outcome {
    let e = match a.arch {
        Some(arch) => weights(&a, arch)?,
        None => from_checkpoint(&a)?,
    };
    check_image_size(&e.cfg, e.size).map_err(usage)?;
    // The file is read and checked before a device is opened.
    let (be, why) = a.device.open()?;
    evaluate(&a, e, be, &why)
}

/// A checkpoint, whose metadata describes the network.
fn from_checkpoint(a: &EvalArgs) -> Result<Evaluated, Failure> {
    let path = checkpoint::in_run_dir(&a.checkpoint, checkpoint::BEST);
    let ck = Checkpoint::read(&path)?;
    let m = ck.meta();
    let dataset = a.dataset.unwrap_or(m.dataset());
    if dataset.classes() != m.config().num_classes {
        return Err(failure(format!(
            "{} holds {} for {} classes ({}); --dataset {dataset} has {}",
            path.display(),
            m.config().name(),
            m.config().num_classes,
            m.dataset().title(),
            dataset.classes()
        )));
    }
    let from = format!("{} (next epoch {}, step {}, best Prec@1 {:.3})", ck.path().display(), m.epoch, m.steps, m.best);
    let size = a.image_size.unwrap_or(m.recipe().map_or(SIDE, |r| r.image_size));
    Ok(Evaluated { cfg: m.config().clone(), state: ck.state()?, from, size, dataset })
}

/// A weights file of architecture `arch` (the flags describe the network).
fn weights(a: &EvalArgs, arch: Arch) -> Result<Evaluated, Failure> {
    let dataset = a.dataset.unwrap_or(Dataset::Cifar10);
    let cfg = arch.config(a.growth.unwrap_or(arch.growth()), 0.0, a.num_classes.unwrap_or(dataset.classes()));
    let cfg = cfg.map_err(usage)?;
    check_classes(&cfg, dataset).map_err(usage)?;
    let weights = checkpoint::read_weights(&a.checkpoint, &cfg, 0)?;
    if let Some(r) = weights.reset {
        return Err(failure(format!(
            "{}: its classifier predicts {} classes; {} has {}",
            a.checkpoint.display(),
            r.file_classes,
            dataset.title(),
            r.classes
        )));
    }
    let state = weights.state;
    let from = format!("{} (weights)", a.checkpoint.display());
    Ok(Evaluated { cfg, state, from, size: a.image_size.unwrap_or(IMAGENET_SIZE), dataset })
}

fn evaluate(a: &EvalArgs, e: Evaluated, be: impl Backend, why: &str) -> Outcome {
    let test_set = Arc::new(Images::load(&a.data.data_dir, e.dataset, Split::Test)?);
    let mut model = Model::new(e.cfg, a.batch, e.size, e.size, Mode::Minimal, 0, be)?;
    e.state.apply(&mut model)?;
    report(format_args!(
        "{} from {} on {}: {} test images from {}{}",
        model.config().name(),
        e.from,
        e.dataset.title(),
        test_set.len(),
        a.data.data_dir.display(),
        upsampled(e.size)
    ))?;
    report(device::line(model.backend(), why))?;
    let mut loader = Loader::test(test_set, e.dataset, a.batch)?;
    let v = epoch::evaluate(&mut model, &mut loader, &mut Passes::new(a.progress.print_freq))?;
    let error = 100.0 - v.top1;
    report(format_args!(" * Test Loss {:.4}  Prec@1 {:.3}  Error {error:.3}", v.loss, v.top1))?;
    if a.json {
        report_json(&EvalReport { loss: v.loss, top1: v.top1, error })?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_report_has_the_readmes_schema() {
        let report = super::EvalReport { loss: 0.25, top1: 95.5, error: 4.5 };
        crate::commands::output::schema::check("densenet eval --json", &report);
    }
}

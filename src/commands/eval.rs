//! `densenet eval`: a checkpoint on the test set.

use super::args::{DataArgs, ProgressArgs};
use super::device::{self, DeviceArgs};
use super::output::{report, report_json};
use super::progress::Passes;
use super::{failure, parse, Outcome};
use clap::Args;
use densenet::backend::Backend;
use densenet::data::cifar::{Dataset, Images, Split, SIDE};
use densenet::data::loader::Loader;
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::train::checkpoint::{self, Checkpoint, State};
use densenet::train::epoch;
use serde::Serialize;
use std::path::PathBuf;
use std::sync::Arc;

/// The flags of `densenet eval`.
#[derive(Args)]
pub(crate) struct EvalArgs {
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

/// Runs `densenet eval`.
pub(crate) fn run(a: EvalArgs) -> Outcome {
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
    let state = ck.state()?;
    // The checkpoint is read and checked before a device is opened.
    let (be, why) = a.device.open()?;
    evaluate(&a, &ck, dataset, &state, be, &why)
}

fn evaluate(a: &EvalArgs, ck: &Checkpoint, dataset: Dataset, state: &State, be: impl Backend, why: &str) -> Outcome {
    let m = ck.meta();
    let test_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Test)?);
    let mut model = Model::new(m.config().clone(), a.batch, SIDE, SIDE, Mode::Minimal, m.seed(), be)?;
    state.apply(&mut model)?;
    report(format_args!(
        "{} from {} (next epoch {}, step {}, best Prec@1 {:.3}) on {}: {} test images from {}",
        m.config().name(),
        ck.path().display(),
        m.epoch,
        m.steps,
        m.best,
        dataset.title(),
        test_set.len(),
        a.data.data_dir.display()
    ))?;
    report(device::line(model.backend(), why))?;
    let mut loader = Loader::test(test_set, dataset, a.batch)?;
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

//! `densenet export`: a checkpoint's weights as a plain safetensors file, in our names or
//! torchvision's.

use super::output::report;
use super::{failure, Outcome};
use clap::Args;
use densenet::model::names::Naming;
use densenet::train::checkpoint::{self, Checkpoint};
use std::path::PathBuf;

/// The flags of `densenet export`.
#[derive(Args)]
pub(crate) struct ExportArgs {
    /// A checkpoint written by `densenet train`, or a run directory for its
    /// model_best.safetensors (its checkpoint.safetensors when there is no best file).
    #[arg(value_name = "CHECKPOINT")]
    checkpoint: PathBuf,
    /// The safetensors file to write.
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    output: PathBuf,
    /// Tensor names: densenet (ours), torchvision (its DenseNet state dict) or
    /// torchvision-legacy (the spelling of its downloadable .pth files).
    #[arg(long, value_name = "NAMING", default_value = "densenet")]
    names: Naming,
    /// Short for --names torchvision.
    #[arg(long, conflicts_with = "names")]
    torchvision: bool,
    /// Replace OUT when it exists.
    #[arg(long)]
    force: bool,
}

/// Runs `densenet export`.
pub(crate) fn run(a: ExportArgs) -> Outcome {
    let naming = if a.torchvision { Naming::Torchvision } else { a.names };
    if !a.force && a.output.symlink_metadata().is_ok() {
        return Err(failure(format!("{} exists: add --force to replace it", a.output.display())));
    }
    let path = checkpoint::in_run_dir(&a.checkpoint, checkpoint::BEST);
    let ck = Checkpoint::read(&path)?;
    let m = ck.meta();
    let about = |e: densenet::Error| failure(format!("{}: {e}", path.display()));
    naming.check(m.config()).map_err(about)?;
    let state = ck.state()?;
    checkpoint::write_atomic(&a.output, &checkpoint::encode_weights(m.config(), &state, naming)?)?;
    report(format_args!(
        "{} from {} (next epoch {}, step {}) written to {} in {naming} names",
        m.config().name(),
        path.display(),
        m.epoch,
        m.steps,
        a.output.display()
    ))?;
    Ok(())
}

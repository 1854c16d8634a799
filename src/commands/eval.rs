//! `densenet eval`: a checkpoint on the test set.

use super::device;
use crate::*;

pub(crate) fn eval(a: EvalArgs) -> Result<(), Failure> {
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
    run(&a, &ck, dataset, &state, be, &why)
}

fn run<B: Backend>(
    a: &EvalArgs,
    ck: &Checkpoint,
    dataset: Dataset,
    state: &checkpoint::State,
    be: B,
    why: &str,
) -> Result<(), Failure> {
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
    report(format_args!("{}", device::line(model.backend(), why)))?;
    let mut loader = Loader::test(test_set, dataset, a.batch)?;
    let v = epoch::evaluate(&mut model, &mut loader, a.progress.print_freq)?;
    let error = 100.0 - v.top1;
    report(format_args!(" * Test Loss {:.4}  Prec@1 {:.3}  Error {error:.3}", v.loss, v.top1))?;
    if a.json {
        report(format_args!("{}", serde_json::json!({"loss": v.loss, "top1": v.top1, "error": error})))?;
    }
    Ok(())
}

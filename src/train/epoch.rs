//! One pass over a loader's batches, training or evaluating, reported batch by batch to a
//! [`Progress`] (the command line draws it: the reference's progress lines, or a bar on a
//! terminal).

use super::meter::Meter;
use crate::backend::{Backend, Sgd};
use crate::data::loader::{Batch, Loader};
use crate::model::{Model, StepStats};
use crate::{bail, Result};
use std::time::Instant;

/// Averages over an epoch's images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 precision, percent.
    pub top1: f64,
    /// Steps whose update fp16 loss scaling skipped ([`StepStats::overflow`]).
    pub skipped: usize,
}

/// What the run has left after the epoch being trained, for a progress display's estimates.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ahead {
    /// Epochs to train after this one.
    pub epochs: usize,
    /// Seconds the last whole epoch took (training and test), when one has run.
    pub epoch_secs: Option<f64>,
    /// Whether this is the run's first epoch (whose first batches can estimate the run's time).
    pub first: bool,
}

/// One batch of a pass done: where the pass is, and its running averages.
#[derive(Clone, Copy, Debug)]
pub struct BatchDone {
    /// The batch's index, from 0.
    pub index: usize,
    /// Batches in the pass.
    pub batches: usize,
    /// Images of the pass so far.
    pub images: usize,
    /// Seconds per batch (last and mean).
    pub time: Meter,
    /// Cross-entropy (last batch's and mean per image).
    pub loss: Meter,
    /// Top-1 precision in percent (last batch's and mean per image).
    pub top1: Meter,
}

/// Receives a pass as it goes (the command line's progress lines or bar).
pub trait Progress {
    /// A pass of `batches` batches starts; `title` is `Epoch: [e]` or `Test: `.
    fn start(&mut self, title: &str, batches: usize, ahead: Ahead) -> Result<()>;
    /// A batch is done.
    fn batch(&mut self, done: &BatchDone) -> Result<()>;
}

/// Trains `model` on one epoch of `loader` with SGD settings `sgd`. Fails if the loss stops
/// being finite.
pub fn train<B: Backend>(
    model: &mut Model<B>,
    loader: &mut Loader,
    epoch: usize,
    sgd: Sgd,
    ahead: Ahead,
    progress: &mut dyn Progress,
) -> Result<EpochStats> {
    let title = format!("Epoch: [{epoch}]");
    progress.start(&title, loader.batches(), ahead)?;
    run(loader, epoch, &title, progress, |i, batch| {
        let s = model.train_step_on(batch.input(), batch.labels(), sgd)?;
        if !s.loss.is_finite() {
            bail!("training diverged: the loss is {} at epoch {epoch}, batch {i} (try a lower --lr)", s.loss);
        }
        Ok(s)
    })
}

/// Evaluates `model` on every batch of `loader` (running statistics, no dropout).
pub fn evaluate<B: Backend>(
    model: &mut Model<B>,
    loader: &mut Loader,
    progress: &mut dyn Progress,
) -> Result<EpochStats> {
    progress.start("Test: ", loader.batches(), Ahead::default())?;
    run(loader, 0, "Test: ", progress, |_, batch| model.evaluate_on(batch.input(), batch.labels()))
}

/// Runs `step` on every batch of `epoch` (pass `title`), reporting each to `progress`. Stops
/// before the next batch once a signal asked training to stop ([`super::stop`]).
fn run(
    loader: &mut Loader,
    epoch: usize,
    title: &str,
    progress: &mut dyn Progress,
    mut step: impl FnMut(usize, &Batch) -> Result<StepStats>,
) -> Result<EpochStats> {
    let (mut time, mut loss, mut top1) = (Meter::default(), Meter::default(), Meter::default());
    let batches = loader.batches();
    let mut pass = loader.epoch(epoch as u64)?;
    let mut end = Instant::now();
    let (mut index, mut images, mut skipped) = (0, 0, 0);
    while let Some(batch) = pass.next_batch()? {
        if let Some(signal) = super::stop::requested() {
            bail!("stopped by signal {signal} before batch {index} of {title}");
        }
        let s = step(index, batch)?;
        loss.update(s.loss as f64, s.n);
        top1.update(100.0 * s.correct as f64 / s.n as f64, s.n);
        time.update(end.elapsed().as_secs_f64(), 1);
        end = Instant::now();
        images += s.n;
        skipped += s.overflow as usize;
        progress.batch(&BatchDone { index, batches, images, time, loss, top1 })?;
        index += 1;
    }
    Ok(EpochStats { loss: loss.avg(), top1: top1.avg(), skipped })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::CpuBackend;
    use crate::config::NetConfig;
    use crate::data::cifar::{Dataset, SIDE};
    use crate::model::plan::Mode;
    use crate::testing;
    use std::sync::Arc;

    struct Quiet;

    impl Progress for Quiet {
        fn start(&mut self, _: &str, _: usize, _: Ahead) -> Result<()> {
            Ok(())
        }
        fn batch(&mut self, _: &BatchDone) -> Result<()> {
            Ok(())
        }
    }

    /// The loader's 32 x 32 images train and evaluate a model planned at twice their size.
    #[test]
    fn a_larger_model_takes_the_stored_images() {
        let cfg = NetConfig::cifar(16, 4, true, 0.5, 0.0, 10).unwrap();
        let mut model = Model::new(cfg, 4, 2 * SIDE, 2 * SIDE, Mode::Minimal, 0, CpuBackend::new()).unwrap();
        let data = Arc::new(testing::images(Dataset::Cifar10, 5));
        let mut loader = Loader::train(data.clone(), Dataset::Cifar10, 4, 0, true).unwrap();
        let s = train(&mut model, &mut loader, 0, Sgd::default(), Ahead::default(), &mut Quiet).unwrap();
        assert!(s.loss.is_finite() && s.loss > 0.0, "training loss {}", s.loss);
        let mut loader = Loader::test(data, Dataset::Cifar10, 4).unwrap();
        let s = evaluate(&mut model, &mut loader, &mut Quiet).unwrap();
        assert!(s.loss.is_finite() && s.loss > 0.0, "test loss {}", s.loss);
    }
}

//! One pass over a loader's batches, training or evaluating, with the reference's progress
//! lines: `Epoch: [e][i/len]  Time t (avg)  Loss l (avg)  Prec@1 p (avg)` every `print_freq`
//! batches (`Test: [i/len] ...` when evaluating).

use super::meter::Meter;
use super::report;
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
}

/// Trains `model` on one epoch of `loader` with SGD `hp`. Fails if the loss stops being finite.
pub fn train<B: Backend>(
    model: &mut Model<B>,
    loader: &mut Loader,
    epoch: usize,
    hp: Sgd,
    print_freq: usize,
) -> Result<EpochStats> {
    let label = |i, len| format!("Epoch: [{epoch}][{i}/{len}]");
    run(loader, epoch, print_freq, label, |i, batch| {
        let s = model.train_step(batch.images(), batch.labels(), hp)?;
        if !s.loss.is_finite() {
            bail!("training diverged: the loss is {} at epoch {epoch}, batch {i} (try a lower --lr)", s.loss);
        }
        Ok(s)
    })
}

/// Evaluates `model` on every batch of `loader` (running statistics, no dropout).
pub fn evaluate<B: Backend>(model: &mut Model<B>, loader: &mut Loader, print_freq: usize) -> Result<EpochStats> {
    let label = |i, len| format!("Test: [{i}/{len}]");
    run(loader, 0, print_freq, label, |_, batch| model.evaluate(batch.images(), batch.labels()))
}

/// Runs `step` on every batch of `epoch`, printing progress every `print_freq` batches.
fn run(
    loader: &mut Loader,
    epoch: usize,
    print_freq: usize,
    label: impl Fn(usize, usize) -> String,
    mut step: impl FnMut(usize, &Batch) -> Result<StepStats>,
) -> Result<EpochStats> {
    let (mut time, mut loss, mut top1) = (Meter::default(), Meter::default(), Meter::default());
    let len = loader.batches();
    let mut batches = loader.epoch(epoch as u64)?;
    let mut end = Instant::now();
    let mut i = 0;
    while let Some(batch) = batches.next_batch()? {
        let s = step(i, batch)?;
        loss.update(s.loss as f64, s.n);
        top1.update(100.0 * s.correct as f64 / s.n as f64, s.n);
        time.update(end.elapsed().as_secs_f64(), 1);
        end = Instant::now();
        if i % print_freq == 0 {
            report(format_args!(
                "{}  Time {:.3} ({:.3})  Loss {:.4} ({:.4})  Prec@1 {:.3} ({:.3})",
                label(i, len),
                time.last(),
                time.avg(),
                loss.last(),
                loss.avg(),
                top1.last(),
                top1.avg()
            ))?;
        }
        i += 1;
    }
    Ok(EpochStats { loss: loss.avg(), top1: top1.avg() })
}

//! Training: the reference recipe (SGD with Nesterov momentum, step learning-rate decay), the
//! epoch loop, and model selection on test top-1.

pub mod checkpoint;
pub mod epoch;
pub mod lock;
pub mod meter;
pub mod recipe;
pub mod schedule;
pub mod stop;
pub mod tensorboard;

use crate::backend::{Backend, Sgd};
use crate::data::loader::Loader;
use crate::model::Model;
use crate::Result;
use epoch::Progress;
use recipe::Recipe;
use std::time::Instant;

/// Where [`fit`] starts: the first epoch to run (counted from 0), and the best test top-1 of
/// the epochs before it (a resumed run's; `None` for a fresh run).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FitFrom {
    /// The first epoch to run.
    pub epoch: usize,
    /// The best test top-1 so far, percent.
    pub best: Option<f64>,
}

/// How an epoch ended: what is reported, logged and checkpointed after it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochEnd {
    /// The epoch just trained (counted from 0).
    pub epoch: usize,
    /// Its learning rate (as SGD used it).
    pub lr: f32,
    /// Training loss and top-1 (running averages over the epoch).
    pub train: epoch::EpochStats,
    /// Test loss and top-1.
    pub test: epoch::EpochStats,
    /// The best test top-1 so far, this epoch included.
    pub best: f64,
    /// Whether this epoch's test top-1 is a new best (always true for the first epoch of a run
    /// that starts without a best).
    pub improved: bool,
    /// Seconds the epoch took (training and test).
    pub secs: f64,
}

/// Trains epochs `from.epoch..recipe.epochs` with the recipe's SGD settings and schedule,
/// evaluating on the test set after each, then calls `after_epoch` (checkpoints, logs, the
/// epoch's summary), reporting every pass to `progress`. Returns the best test top-1
/// precision (percent).
pub fn fit<B: Backend>(
    model: &mut Model<B>,
    train: &mut Loader,
    test: &mut Loader,
    recipe: &Recipe,
    from: FitFrom,
    progress: &mut dyn Progress,
    mut after_epoch: impl FnMut(&Model<B>, &EpochEnd) -> Result<()>,
) -> Result<Option<f64>> {
    let (mut best, mut last) = (from.best, None);
    for e in from.epoch..recipe.epochs {
        let start = Instant::now();
        let lr = schedule::learning_rate(recipe.lr, e, recipe.epochs);
        let (momentum, weight_decay, nesterov) = (recipe.momentum, recipe.weight_decay, recipe.nesterov);
        let sgd = Sgd { lr: lr as f32, momentum, weight_decay, nesterov };
        let ahead = epoch::Ahead { epochs: recipe.epochs - e - 1, epoch_secs: last, first: e == from.epoch };
        let t = epoch::train(model, train, e, sgd, ahead, progress)?;
        // With local BN, every rank evaluates rank 0's running statistics (those saved).
        model.share_running_stats()?;
        let v = epoch::evaluate(model, test, progress)?;
        let improved = best.is_none_or(|b| v.top1 > b);
        let top = best.map_or(v.top1, |b| b.max(v.top1));
        best = Some(top);
        let secs = start.elapsed().as_secs_f64();
        last = Some(secs);
        after_epoch(model, &EpochEnd { epoch: e, lr: sgd.lr, train: t, test: v, best: top, improved, secs })?;
    }
    Ok(best)
}

//! One pass over a loader's batches, training or evaluating, with the reference's progress
//! lines: `Epoch: [e][i/len]  Time t (avg)  Loss l (avg)  Prec@1 p (avg)` every `print_freq`
//! batches (`Test: [i/len] ...` when evaluating). When stdout is a terminal, one progress bar
//! redrawn in place replaces the lines (and is cleared at the end of the pass).

use super::meter::Meter;
use super::report;
use crate::backend::{Backend, Sgd};
use crate::data::loader::{Batch, Loader};
use crate::model::{Model, StepStats};
use crate::{bail, Error, Result};
use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// Averages over an epoch's images.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EpochStats {
    /// Mean cross-entropy.
    pub loss: f64,
    /// Top-1 precision, percent.
    pub top1: f64,
}

/// What the run has left after the epoch being trained, for the bar's run ETA and the estimate.
#[derive(Clone, Copy, Debug, Default)]
pub struct Ahead {
    /// Epochs to train after this one.
    pub epochs: usize,
    /// Seconds the last whole epoch took (training and test), when one has run.
    pub epoch_secs: Option<f64>,
    /// Whether this is the run's first epoch: it prints an estimate of the run's time once
    /// [`ESTIMATE_BATCHES`] batches have run.
    pub estimate: bool,
}

/// Batches after which the first epoch estimates the run's training time (the first batch,
/// a warm-up, is left out of the rate).
pub const ESTIMATE_BATCHES: usize = 20;

/// Trains `model` on one epoch of `loader` with SGD `hp`. Fails if the loss stops being finite.
pub fn train<B: Backend>(
    model: &mut Model<B>,
    loader: &mut Loader,
    epoch: usize,
    hp: Sgd,
    print_freq: usize,
    ahead: Ahead,
) -> Result<EpochStats> {
    run(loader, epoch, print_freq, &format!("Epoch: [{epoch}]"), ahead, |i, batch| {
        let s = model.train_step_on(batch.input(), batch.labels(), hp)?;
        if !s.loss.is_finite() {
            bail!("training diverged: the loss is {} at epoch {epoch}, batch {i} (try a lower --lr)", s.loss);
        }
        Ok(s)
    })
}

/// Evaluates `model` on every batch of `loader` (running statistics, no dropout).
pub fn evaluate<B: Backend>(model: &mut Model<B>, loader: &mut Loader, print_freq: usize) -> Result<EpochStats> {
    run(loader, 0, print_freq, "Test: ", Ahead::default(), |_, batch| model.evaluate_on(batch.input(), batch.labels()))
}

/// Runs `step` on every batch of `epoch`. Progress, under `title` (`Epoch: [e]`, `Test: `):
/// a line every `print_freq` batches, or the bar when stdout is a terminal.
fn run(
    loader: &mut Loader,
    epoch: usize,
    print_freq: usize,
    title: &str,
    ahead: Ahead,
    mut step: impl FnMut(usize, &Batch) -> Result<StepStats>,
) -> Result<EpochStats> {
    let (mut time, mut loss, mut top1) = (Meter::default(), Meter::default(), Meter::default());
    let len = loader.batches();
    let mut bar = std::io::stdout().is_terminal().then(|| Bar::new(title, len, ahead));
    let mut warm = None;
    let mut batches = loader.epoch(epoch as u64)?;
    let mut end = Instant::now();
    let (mut i, mut images) = (0, 0);
    while let Some(batch) = batches.next_batch()? {
        if let Some(signal) = super::stop::requested() {
            bail!("stopped by signal {signal} before batch {i} of {title}");
        }
        let s = step(i, batch)?;
        loss.update(s.loss as f64, s.n);
        top1.update(100.0 * s.correct as f64 / s.n as f64, s.n);
        time.update(end.elapsed().as_secs_f64(), 1);
        end = Instant::now();
        images += s.n;
        // After the warm-up batch: time the next ones for the run's estimate.
        let warm_start = *warm.get_or_insert(end);
        if ahead.estimate && (i + 1 == ESTIMATE_BATCHES.min(len)) && i > 0 {
            let per_batch = (end - warm_start).as_secs_f64() / i as f64;
            if let Some(bar) = bar.as_mut() {
                bar.clear()?;
            }
            report(format_args!("{}", estimate(per_batch, len, ahead.epochs + 1, i)))?;
        }
        match bar.as_mut() {
            Some(bar) => bar.update(i + 1, images, loss.avg(), top1.avg())?,
            None if i % print_freq == 0 => report(format_args!(
                "{title}[{i}/{len}]  Time {:.3} ({:.3})  Loss {:.4} ({:.4})  Prec@1 {:.3} ({:.3})",
                time.last(),
                time.avg(),
                loss.last(),
                loss.avg(),
                top1.last(),
                top1.avg()
            ))?,
            None => {}
        }
        i += 1;
    }
    Ok(EpochStats { loss: loss.avg(), top1: top1.avg() })
}

/// Least time between two redraws of the progress bar.
const REDRAW: Duration = Duration::from_millis(100);
/// Terminal width assumed when `COLUMNS` does not give one.
const COLUMNS: usize = 80;
/// Cells of the bar itself.
const CELLS: usize = 10;

/// The estimate the first epoch prints: `epochs` epochs of `len` batches at `per_batch`
/// seconds each (measured over `batches` batches).
fn estimate(per_batch: f64, len: usize, epochs: usize, batches: usize) -> String {
    let secs = per_batch * (len * epochs) as f64;
    let span =
        if secs >= 5400.0 { format!("{:.1} hours", secs / 3600.0) } else { format!("{:.0} minutes", secs / 60.0) };
    format!(
        "Estimate: {epochs} epoch{} of training take about {span} on this device ({:.2} s a batch over {batches} \
         batches; the test passes add to it)",
        if epochs == 1 { "" } else { "s" },
        per_batch
    )
}

/// A progress line on a terminal, redrawn in place (`\r`) at most every [`REDRAW`], and
/// cleared when dropped (at the end of the pass, or on an error, whose message then starts on
/// a clean line).
struct Bar {
    title: String,
    len: usize,
    width: usize,
    start: Instant,
    drawn: Option<Instant>,
    ahead: Ahead,
}

impl Bar {
    fn new(title: &str, len: usize, ahead: Ahead) -> Bar {
        Bar { title: title.to_string(), len, width: width(), start: Instant::now(), drawn: None, ahead }
    }

    /// Erases the line, so that a report line can be printed (the next update redraws it).
    fn clear(&mut self) -> Result<()> {
        let mut out = std::io::stdout().lock();
        write!(out, "\r\x1b[K").and_then(|()| out.flush()).map_err(|e| Error(format!("cannot write to stdout: {e}")))
    }

    /// Shows `done` batches of `images` images with the running loss and top-1, unless the
    /// last redraw is too recent.
    fn update(&mut self, done: usize, images: usize, loss: f64, top1: f64) -> Result<()> {
        let now = Instant::now();
        if self.drawn.is_some_and(|t| now - t < REDRAW) {
            return Ok(());
        }
        self.drawn = Some(now);
        let secs = (now - self.start).as_secs_f64();
        let mut line = bar_line(&self.title, done, self.len, images, secs, loss, top1);
        if self.ahead.epochs > 0 {
            // The epochs after this one: as long as the last whole one, or this one's pace.
            let epoch = self.ahead.epoch_secs.unwrap_or(secs / done.max(1) as f64 * self.len as f64);
            let left = secs / done.max(1) as f64 * self.len.saturating_sub(done) as f64;
            line += &format!(" (run {})", clock(left + epoch * self.ahead.epochs as f64));
        }
        // One column short of the width: a full line would wrap on some terminals.
        line.truncate(self.width - 1);
        let mut out = std::io::stdout().lock();
        write!(out, "\r{line}\x1b[K")
            .and_then(|()| out.flush())
            .map_err(|e| Error(format!("cannot write to stdout: {e}")))
    }
}

impl Drop for Bar {
    fn drop(&mut self) {
        if self.drawn.is_some() {
            let _ = self.clear();
        }
    }
}

/// The progress line after `done` of `len` batches (`images` images in `secs` seconds):
/// `Epoch: [3][344/782] [====>     ] Loss 0.4321 Prec@1 84.123 1234 img/s ETA 0:42`. The
/// counter is the index of the last batch, from 0, as in the reference's lines.
fn bar_line(title: &str, done: usize, len: usize, images: usize, secs: f64, loss: f64, top1: f64) -> String {
    let filled = CELLS * done / len.max(1);
    let bar: String = (0..CELLS)
        .map(|c| match c.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let rate = images as f64 / secs.max(1e-9);
    let eta = secs / done.max(1) as f64 * len.saturating_sub(done) as f64;
    let last = done.saturating_sub(1);
    format!("{title}[{last}/{len}] [{bar}] Loss {loss:.4} Prec@1 {top1:.3} {rate:.0} img/s ETA {}", clock(eta))
}

/// The terminal's width in columns (its real size; else `COLUMNS`; else [`COLUMNS`]).
fn width() -> usize {
    let real = terminal_size::terminal_size_of(std::io::stdout()).map(|(w, _)| w.0 as usize);
    let env = || std::env::var("COLUMNS").ok().and_then(|c| c.parse().ok());
    real.or_else(env).filter(|&c| c >= 20).unwrap_or(COLUMNS)
}

/// Whole seconds as `m:ss`, or `h:mm:ss` from an hour.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", s / 60 % 60, s % 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bar_shows_progress_rate_and_time_left() {
        let line = bar_line("Epoch: [3]", 391, 782, 391 * 64, 20.0, 0.43211, 84.1234);
        assert_eq!(line, "Epoch: [3][390/782] [=====>    ] Loss 0.4321 Prec@1 84.123 1251 img/s ETA 0:20");
        assert!(line.len() < COLUMNS, "{line}");
        let done = bar_line("Test: ", 157, 157, 10_000, 4.0, 1.0, 50.0);
        assert_eq!(done, "Test: [156/157] [==========] Loss 1.0000 Prec@1 50.000 2500 img/s ETA 0:00");
        assert!(bar_line("Test: ", 1, 30, 1, 0.0, 0.0, 0.0).contains("[>         ]"));
    }

    #[test]
    fn the_estimate_scales_the_measured_rate_to_the_run() {
        assert_eq!(
            estimate(1.6, 782, 300, 19),
            "Estimate: 300 epochs of training take about 104.3 hours on this device (1.60 s a batch over 19 \
             batches; the test passes add to it)"
        );
        assert!(estimate(0.01, 10, 1, 9).starts_with("Estimate: 1 epoch of training take about 0 minutes"));
    }

    #[test]
    fn clock_reads_minutes_and_hours() {
        assert_eq!(
            [clock(0.4), clock(42.0), clock(61.0), clock(3600.0), clock(3725.0)],
            ["0:00", "0:42", "1:01", "1:00:00", "1:02:05"]
        );
    }
}

//! Progress on the terminal, for downloads and for passes over the data: a bar redrawn in place
//! (indicatif) when the stream is a terminal, otherwise lines, the reference's for training.
//! Lines printed while a bar is drawn ([`super::output`]) go above it ([`suspend`]).

use super::output::report;
use densenet::data::download;
use densenet::measure::human;
use densenet::train::epoch::{self, Ahead, BatchDone};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The bar drawn now, if any.
static SHOWN: Mutex<Option<ProgressBar>> = Mutex::new(None);

/// Runs `f` (which prints) with the bar drawn now, if any, cleared meanwhile and redrawn after.
pub(crate) fn suspend<R>(f: impl FnOnce() -> R) -> R {
    let shown = SHOWN.lock().unwrap_or_else(|e| e.into_inner()).clone();
    match shown {
        Some(bar) => bar.suspend(f),
        None => f(),
    }
}

/// Draws `bar` (the only one) until [`hide`].
fn show(bar: &ProgressBar) {
    *SHOWN.lock().unwrap_or_else(|e| e.into_inner()) = Some(bar.clone());
}

/// Clears `bar` from the terminal.
fn hide(bar: ProgressBar) {
    bar.finish_and_clear();
    SHOWN.lock().unwrap_or_else(|e| e.into_inner()).take();
}

/// A bar of `len` steps drawn on `target` with `template`.
fn bar(len: Option<u64>, target: ProgressDrawTarget, template: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(template).expect("a valid template");
    let bar = ProgressBar::with_draw_target(len, target).with_style(style);
    show(&bar);
    bar
}

/// Batches after which the first epoch of a run estimates the run's training time (the first
/// batch, a warm-up, is left out of the rate).
const ESTIMATE_BATCHES: usize = 20;
/// Cells of a pass's bar.
const CELLS: usize = 10;

/// The passes of training and evaluation on stdout: every `print_freq` batches the reference's
/// line, or on a terminal one bar per pass, cleared when the pass ends; and after the first
/// [`ESTIMATE_BATCHES`] batches of a run, an estimate of its training time.
pub(crate) struct Passes {
    print_freq: usize,
    terminal: bool,
    title: String,
    ahead: Ahead,
    start: Instant,
    /// The end of the pass's first batch, where the estimate's timing starts.
    warm: Option<Instant>,
    bar: Option<ProgressBar>,
}

impl Passes {
    /// Passes reported every `print_freq` batches (off a terminal).
    pub(crate) fn new(print_freq: usize) -> Passes {
        Passes {
            print_freq,
            terminal: std::io::stdout().is_terminal(),
            title: String::new(),
            ahead: Ahead::default(),
            start: Instant::now(),
            warm: None,
            bar: None,
        }
    }
}

impl epoch::Progress for Passes {
    fn start(&mut self, title: &str, batches: usize, ahead: Ahead) -> densenet::Result<()> {
        (self.title, self.ahead, self.start, self.warm) = (title.to_string(), ahead, Instant::now(), None);
        if self.terminal {
            // The line is ours (one redraw per batch), cut to the terminal's width.
            self.bar = Some(bar(Some(batches as u64), ProgressDrawTarget::stdout(), "{wide_msg}"));
        }
        Ok(())
    }

    fn batch(&mut self, d: &BatchDone) -> densenet::Result<()> {
        let now = Instant::now();
        let warm = *self.warm.get_or_insert(now);
        if self.ahead.first && d.index + 1 == ESTIMATE_BATCHES.min(d.batches) && d.index > 0 {
            let per_batch = (now - warm).as_secs_f64() / d.index as f64;
            report(estimate(per_batch, d.batches, self.ahead.epochs + 1, d.index))?;
        }
        let (title, (i, len)) = (&self.title, (d.index, d.batches));
        match self.bar.take() {
            Some(bar) => {
                bar.set_message(bar_line(title, d, (now - self.start).as_secs_f64(), self.ahead));
                // Cleared at the end of the pass, before its summary line.
                if i + 1 == len {
                    hide(bar);
                } else {
                    self.bar = Some(bar);
                }
            }
            None if i % self.print_freq == 0 => report(format_args!(
                "{title}[{i}/{len}]  Time {:.3} ({:.3})  Loss {:.4} ({:.4})  Prec@1 {:.3} ({:.3})",
                d.time.last(),
                d.time.avg(),
                d.loss.last(),
                d.loss.avg(),
                d.top1.last(),
                d.top1.avg()
            ))?,
            None => {}
        }
        Ok(())
    }
}

impl Drop for Passes {
    /// A pass that failed leaves no bar behind its error.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            hide(bar);
        }
    }
}

/// The bar's line after batch `d` of pass `title`, which started `secs` seconds ago: the
/// reference's counter (the index of the last batch, from 0), the bar, the running loss and
/// top-1, the rate, the pass's time left and, with epochs after it, the run's:
/// `Epoch: [3][344/782] [====>     ] Loss 0.4321 Prec@1 84.123 1234 img/s ETA 0:42 (run 1:02:03)`.
fn bar_line(title: &str, d: &BatchDone, secs: f64, ahead: Ahead) -> String {
    let (done, len) = (d.index + 1, d.batches);
    let filled = CELLS * done / len.max(1);
    let cells: String = (0..CELLS)
        .map(|c| match c.cmp(&filled) {
            std::cmp::Ordering::Less => '=',
            std::cmp::Ordering::Equal => '>',
            std::cmp::Ordering::Greater => ' ',
        })
        .collect();
    let per_batch = secs / done as f64;
    let left = per_batch * len.saturating_sub(done) as f64;
    let rate = d.images as f64 / secs.max(1e-9);
    let (loss, top1) = (d.loss.avg(), d.top1.avg());
    let mut line = format!(
        "{title}[{}/{len}] [{cells}] Loss {loss:.4} Prec@1 {top1:.3} {rate:.0} img/s ETA {}",
        d.index,
        clock(left)
    );
    if ahead.epochs > 0 {
        // The epochs after this one: as long as the last whole one, or this one's pace.
        let epoch = ahead.epoch_secs.unwrap_or(per_batch * len as f64);
        line += &format!(" (run {})", clock(left + epoch * ahead.epochs as f64));
    }
    line
}

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

/// Whole seconds as `m:ss`, or `h:mm:ss` from an hour.
fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    match s / 3600 {
        0 => format!("{}:{:02}", s / 60, s % 60),
        h => format!("{h}:{:02}:{:02}", s / 60 % 60, s % 60),
    }
}

/// Off a terminal, a download prints a line at each quarter (or every [`LINE_BYTES`] when its
/// size is unknown), and at least every [`LINE_SECS`].
const LINE_BYTES: u64 = 64 << 20;
/// See [`LINE_BYTES`].
const LINE_SECS: Duration = Duration::from_secs(30);

/// A download's progress on stderr: a bar on a terminal, otherwise a line now and then; then
/// the last figures and `Downloaded 162.2 MiB (170052171 bytes) in 12.3 s`, timed from the
/// first bytes.
pub(crate) struct Transfer {
    terminal: bool,
    /// When the first bytes arrived.
    start: Option<Instant>,
    /// When the last line was printed (off a terminal).
    last: Instant,
    /// The size the server announced.
    total: Option<u64>,
    /// Off a terminal: the next quarter (1..=4), or multiple of [`LINE_BYTES`], that prints.
    next: u64,
    /// Bytes the last line showed.
    shown: Option<u64>,
    bar: Option<ProgressBar>,
}

impl Transfer {
    /// A download about to start.
    pub(crate) fn new() -> Transfer {
        Transfer::with_terminal(std::io::stderr().is_terminal())
    }

    fn with_terminal(terminal: bool) -> Transfer {
        Transfer { terminal, start: None, last: Instant::now(), total: None, next: 1, shown: None, bar: None }
    }

    /// Seconds since the first bytes arrived.
    fn secs(&self) -> f64 {
        self.start.map_or(0.0, |s| s.elapsed().as_secs_f64())
    }

    /// Prints the figures for `done` bytes.
    fn line(&mut self, done: u64) {
        let secs = self.secs();
        // A rate once it means something.
        let rate = if secs >= 1.0 { format!(", {}/s", human((done as f64 / secs) as usize)) } else { String::new() };
        let line = match self.total {
            Some(t) if t > 0 => {
                format!("  {} / {} ({}%){rate}", human(done as usize), human(t as usize), done * 100 / t)
            }
            _ => format!("  {}{rate}", human(done as usize)),
        };
        suspend(|| eprintln!("{line}"));
        self.shown = Some(done);
    }
}

impl download::Progress for Transfer {
    fn update(&mut self, done: u64, total: Option<u64>) {
        self.start.get_or_insert_with(Instant::now);
        self.total = total;
        if self.terminal {
            let template = match total {
                Some(_) => "  {bytes} / {total_bytes} ({percent}%), {binary_bytes_per_sec}",
                None => "  {bytes}, {binary_bytes_per_sec}",
            };
            self.bar.get_or_insert_with(|| bar(total, ProgressDrawTarget::stderr(), template)).set_position(done);
            return;
        }
        let quarters = total.filter(|&t| t > 0);
        let reached = match quarters {
            Some(t) => done * 4 >= self.next * t,
            None => done >= self.next * LINE_BYTES,
        };
        if reached {
            self.next = match quarters {
                Some(t) => done * 4 / t + 1,
                None => done / LINE_BYTES + 1,
            };
        }
        if reached || self.last.elapsed() >= LINE_SECS {
            self.last = Instant::now();
            self.line(done);
        }
    }

    fn finish(&mut self, done: u64) {
        if let Some(bar) = self.bar.take() {
            hide(bar);
        }
        if self.shown != Some(done) {
            self.line(done);
        }
        eprintln!("Downloaded {} ({done} bytes) in {:.1} s", human(done as usize), self.secs());
    }
}

impl Drop for Transfer {
    /// A failed download leaves no bar behind its error.
    fn drop(&mut self) {
        if let Some(bar) = self.bar.take() {
            hide(bar);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use densenet::data::download::Progress;
    use densenet::train::meter::Meter;

    fn batch(index: usize, batches: usize, images: usize, loss: f64, top1: f64) -> BatchDone {
        let (mut l, mut t) = (Meter::default(), Meter::default());
        l.update(loss, images);
        t.update(top1, images);
        BatchDone { index, batches, images, time: Meter::default(), loss: l, top1: t }
    }

    #[test]
    fn the_bar_shows_progress_rate_and_time_left() {
        let d = batch(390, 782, 391 * 64, 0.43211, 84.1234);
        assert_eq!(
            bar_line("Epoch: [3]", &d, 20.0, Ahead::default()),
            "Epoch: [3][390/782] [=====>    ] Loss 0.4321 Prec@1 84.123 1251 img/s ETA 0:20"
        );
        let done = batch(156, 157, 10_000, 1.0, 50.0);
        assert_eq!(
            bar_line("Test: ", &done, 4.0, Ahead::default()),
            "Test: [156/157] [==========] Loss 1.0000 Prec@1 50.000 2500 img/s ETA 0:00"
        );
        assert!(bar_line("Test: ", &batch(0, 30, 1, 0.0, 0.0), 0.0, Ahead::default()).contains("[>         ]"));
        // Two more epochs as long as the last whole one (100 s), after this one's 20 s left.
        let ahead = Ahead { epochs: 2, epoch_secs: Some(100.0), first: false };
        assert!(bar_line("Epoch: [3]", &d, 20.0, ahead).ends_with("ETA 0:20 (run 3:40)"));
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

    #[test]
    fn a_download_prints_quarters_off_a_terminal() {
        let mut p = Transfer::with_terminal(false);
        let mut lines = Vec::new();
        for done in (0..=1000).step_by(100) {
            let before = p.shown;
            p.update(done, Some(1000));
            if p.shown != before {
                lines.push(done);
            }
        }
        assert_eq!(lines, [300, 500, 800, 1000]);
        let mut p = Transfer::with_terminal(false);
        p.update(LINE_BYTES - 1, None);
        assert_eq!(p.shown, None);
        p.update(3 * LINE_BYTES, None);
        assert_eq!((p.shown, p.next), (Some(3 * LINE_BYTES), 4));
    }
}

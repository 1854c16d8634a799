//! `densenet train`: the reference recipe with checkpoints, resume, initial weights and
//! TensorBoard logs.

use super::device::{self, with_backend};
use super::download::report_fetched;
use super::memory::plan_line;
use crate::*;
use densenet::train::lock::RunLock;
use densenet::train::stop;

pub(crate) fn train(a: TrainArgs) -> Result<(), Failure> {
    // Flags and files first: a usage error is reported as such whatever the device.
    let (cfg, source, start, run_dir, _lock) = checks(&a)?;
    let (be, why) = a.device.open()?;
    catch_signals()?;
    let done = with_backend!(be, be => run(&a, cfg, source, start, &run_dir, be, &why));
    match (done, stop::requested()) {
        (Err(_), Some(signal)) => Err(interrupted(signal, &run_dir)),
        (done, _) => done,
    }
}

/// Seconds a run has, after SIGINT or SIGTERM, to finish its current step and stop.
const STOP_DEADLINE_S: u64 = 30;

/// The exit status of a run stopped by `signal`: 128 + its number (130 for SIGINT, 143 for
/// SIGTERM), as a shell reports it.
fn signal_status(signal: i32) -> u8 {
    (128 + signal).clamp(0, 255) as u8
}

/// SIGINT and SIGTERM ask the run to stop after its current step ([`stop`]); a second one, or
/// a step that does not end within [`STOP_DEADLINE_S`], ends the process at once (the last
/// checkpoint is whole either way: writes are atomic).
fn catch_signals() -> Result<(), Failure> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    use signal_hook::flag;
    use std::sync::atomic::AtomicBool;
    let stopping = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        let cannot = |e: std::io::Error| failure(format!("cannot catch signal {signal}: {e}"));
        // In this order: the second signal finds `stopping` set and exits.
        flag::register_conditional_shutdown(signal, signal_status(signal).into(), stopping.clone()).map_err(cannot)?;
        flag::register(signal, stopping.clone()).map_err(cannot)?;
        flag::register_usize(signal, stop::flag().clone(), signal as usize).map_err(cannot)?;
    }
    std::thread::spawn(|| {
        while stop::requested().is_none() {
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        std::thread::sleep(std::time::Duration::from_secs(STOP_DEADLINE_S));
        let signal = stop::requested().unwrap_or(SIGTERM);
        eprintln!("error: the current step did not end within {STOP_DEADLINE_S} s of signal {signal}: abandoned");
        std::process::exit(signal_status(signal).into());
    });
    Ok(())
}

/// The error of a run stopped by `signal`: where its last checkpoint is, and the exact
/// command that resumes it (this one with `--resume` appended: a repeated flag takes its last
/// value).
fn interrupted(signal: i32, run_dir: &Path) -> Failure {
    let name = match signal {
        signal_hook::consts::SIGINT => "SIGINT".to_string(),
        signal_hook::consts::SIGTERM => "SIGTERM".to_string(),
        s => format!("signal {s}"),
    };
    let command: Vec<String> = std::env::args().map(|a| shell_quote(&a)).collect();
    let ck = run_dir.join(checkpoint::CHECKPOINT);
    let message = match Checkpoint::read(&ck) {
        Ok(c) => format!(
            "interrupted by {name}: the last checkpoint is {} (next epoch {}); resume with: {} --resume {}",
            ck.display(),
            c.meta().epoch,
            command.join(" "),
            shell_quote(&ck.display().to_string())
        ),
        Err(_) => format!("interrupted by {name} before the first checkpoint; start again with: {}", command.join(" ")),
    };
    Failure { code: signal_status(signal), message }
}

/// `s` as one shell word: unchanged when it holds only safe characters, else single-quoted.
fn shell_quote(s: &str) -> String {
    let safe = |c: char| c.is_ascii_alphanumeric() || "-_./=:,+@%".contains(c);
    if !s.is_empty() && s.chars().all(safe) {
        s.to_string()
    } else {
        format!("'{}'", s.replace('\'', "'\\''"))
    }
}

/// Everything the flags and the files decide, checked before a device is opened or any data
/// loaded or file written (but the run directory's lock, held until the run ends).
fn checks(a: &TrainArgs) -> Result<(NetConfig, Source, Start, PathBuf, RunLock), Failure> {
    let cfg = a.net.config().map_err(usage)?;
    let source = a.source.source();
    if source != Source::Official && !a.download {
        return Err(usage("--url and --archive say where --download fetches the dataset from: add --download"));
    }
    let mut start = Start::new(a, &cfg)?;
    if start.epoch >= a.epochs {
        return Err(match &a.resume {
            Some(path) => failure(format!(
                "{} is at epoch {} and --epochs {} leaves nothing to train: raise --epochs to continue",
                path.display(),
                start.epoch,
                a.epochs
            )),
            None => usage(format!(
                "--start-epoch {} leaves nothing to train: epochs run from it to --epochs {} (exclusive)",
                start.epoch, a.epochs
            )),
        });
    }
    let run_dir = a.runs_dir.join(&a.name);
    // Under the lock, so that no other process can start or resume this run meanwhile.
    let lock = RunLock::take(&run_dir, &a.name)?;
    check_run_dir(&run_dir, &a.name, start.resumed.as_deref())?;
    match &start.resumed {
        // This run's own checkpoint: its best file must be the one it names.
        Some(r) if same_run(r, &run_dir) => {
            if let Some(why) = checkpoint::check_best(r, start.epoch, start.best_epoch)? {
                eprintln!("warning: {why}");
            }
        }
        // Another run's best file stays there: this run's checkpoints name none until it
        // writes its own.
        _ => start.best_epoch = None,
    }
    Ok((cfg, source, start, run_dir, lock))
}

#[allow(clippy::too_many_arguments)]
fn run<B: Backend>(
    a: &TrainArgs,
    cfg: NetConfig,
    source: Source,
    start: Start,
    run_dir: &Path,
    mut be: B,
    why: &str,
) -> Result<(), Failure> {
    let (dataset, batch) = (a.net.dataset, a.net.batch);
    if a.download {
        // As `densenet download` does: fetch what is missing, check what is there (and say
        // nothing of usable data already in place).
        let fetched = download::fetch(&a.data.data_dir, dataset, &source)?;
        if !fetched.already_there {
            report_fetched(&fetched, dataset)?;
        }
    }
    let train_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Train)?);
    let test_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Test)?);
    let reused = start.resumed.as_deref().and_then(|r| reuse_algorithms(&mut be, r));
    let mut model = Model::new(cfg, batch, SIDE, SIDE, a.memory, start.seed, be)?;
    if let Some(state) = &start.state {
        state.apply(&mut model)?;
    }

    let cfg = model.config();
    report(format_args!(
        "{} (run {}) on {}: {} training and {} test images from {}",
        cfg.name(),
        a.name,
        dataset.title(),
        train_set.len(),
        test_set.len(),
        a.data.data_dir.display()
    ))?;
    report(format_args!("Number of model parameters: {}", model.layout().len))?;
    report(format_args!("{}", device::line(model.backend(), why)))?;
    report(format_args!("{}", plan_line(model.plan())))?;
    match (&start.resumed, &a.init_weights) {
        (Some(path), _) => report(format_args!(
            "Resumed from {}: epoch {}, step {}, best Prec@1 {:.3}, seed {} (weights, running statistics, momentum)",
            path.display(),
            start.epoch,
            model.steps(),
            start.best.unwrap_or(0.0),
            start.seed
        ))?,
        (None, Some(path)) => {
            report(format_args!("Initial weights and running statistics from {} (momentum from zero)", path.display()))?
        }
        (None, None) => {}
    }
    let recipe = Recipe {
        epochs: a.epochs,
        start_epoch: start.epoch,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        print_freq: a.progress.print_freq,
    };
    let schedule = densenet::train::schedule::drops(start.epoch, a.epochs);
    report(format_args!(
        "Training: epochs {} to {}, batch {batch}, lr {} ({schedule}), Nesterov momentum {}, \
         weight decay {}, augmentation {}, seed {}",
        start.epoch,
        a.epochs - 1,
        // Rounded to 9 decimals: 0.1 / 10 prints as 0.01, not 0.010000000000000002.
        (densenet::train::schedule::learning_rate(a.lr, start.epoch, a.epochs) * 1e9).round() / 1e9,
        a.momentum,
        a.weight_decay,
        if a.no_augment { "off" } else { "on" },
        start.seed
    ))?;

    let mut train_loader = Loader::train(train_set, dataset, batch, start.seed, !a.no_augment)?;
    let mut test_loader = Loader::test(test_set, dataset, batch)?;
    let saver = Saver::create(run_dir, dataset, start.best_epoch)?;
    report(format_args!(
        "Checkpoints: {} every epoch, {} on a new best test Prec@1",
        saver.checkpoint().display(),
        checkpoint::BEST
    ))?;
    if let Some(record) = model.backend().algorithm_record() {
        let path = run_dir.join(checkpoint::ALGORITHMS);
        checkpoint::write_atomic(&path, record.as_bytes())?;
        let searches = model.backend().algorithm_searches();
        report(format_args!(
            "Convolution algorithms: {} ({})",
            path.display(),
            match reused {
                Some(n) if searches == 0 => format!("{n} rankings reused from the resumed run, no search"),
                _ => format!("{searches} cudnnFind searches"),
            }
        ))?;
    }
    let mut events = if a.tensorboard { Some(EventWriter::create(run_dir)?) } else { None };
    if let Some(w) = &events {
        report(format_args!("TensorBoard: {}", w.path().display()))?;
    }
    let best = train::fit(&mut model, &mut train_loader, &mut test_loader, &recipe, start.best, |m, end| {
        saver.save(m, end.epoch + 1, end.best, end.improved)?;
        if let Some(w) = events.as_mut() {
            let step = end.epoch as i64;
            w.scalar("train_loss", end.train.loss as f32, step)?;
            w.scalar("train_acc", end.train.top1 as f32, step)?;
            w.scalar("val_loss", end.test.loss as f32, step)?;
            w.scalar("val_acc", end.test.top1 as f32, step)?;
            w.scalar("learning_rate", end.lr as f32, step)?;
            w.flush()?;
        }
        let note = if end.improved {
            format!("; new best Prec@1 {:.3}: {}", end.best, checkpoint::BEST)
        } else {
            String::new()
        };
        report(format_args!(" * Saved {} (next epoch {}){note}", checkpoint::CHECKPOINT, end.epoch + 1))
    })?;
    report(format_args!("Best accuracy: {:.3}", best.unwrap_or(0.0)))?;
    Ok(())
}

/// Where a training run starts: the first epoch, the seed, the best accuracy so far, and the
/// state that replaces the seed's initialization (a resumed checkpoint's, or initial weights).
pub(crate) struct Start {
    epoch: usize,
    seed: u64,
    best: Option<f64>,
    /// The `epoch` of the resumed run's best checkpoint, when it records one.
    best_epoch: Option<usize>,
    state: Option<checkpoint::State>,
    /// The checkpoint file resumed from.
    resumed: Option<PathBuf>,
}

impl Start {
    /// Reads and checks `--resume` or `--init-weights`. A resumed run takes the checkpoint's
    /// next epoch, seed and best accuracy, as the reference `--resume` takes its epoch; an
    /// explicit `--start-epoch` or `--seed` that disagrees is refused.
    fn new(a: &TrainArgs, cfg: &NetConfig) -> Result<Start, Failure> {
        let (epoch, seed) = (a.start_epoch.unwrap_or(0), a.seed.unwrap_or(0));
        if let Some(path) = &a.resume {
            // A run directory stands for its checkpoint, or for its best one when a kill in its
            // first epoch left only that (it is written first, and is then the same file).
            let path = match path.is_dir() {
                true if !path.join(checkpoint::CHECKPOINT).exists() && path.join(checkpoint::BEST).exists() => {
                    path.join(checkpoint::BEST)
                }
                true => path.join(checkpoint::CHECKPOINT),
                false => path.clone(),
            };
            let ck = Checkpoint::read(&path)?;
            ck.check_network(cfg, a.net.dataset)?;
            let m = ck.meta();
            if let Some(s) = a.seed.filter(|&s| s != m.seed) {
                return Err(failure(format!(
                    "--seed {s} disagrees with {}, trained with seed {}: a resumed run continues its random streams \
                     (leave --seed out)",
                    path.display(),
                    m.seed
                )));
            }
            if let Some(e) = a.start_epoch.filter(|&e| e != m.epoch) {
                return Err(failure(format!(
                    "--start-epoch {e} disagrees with {}, whose next epoch is {} (leave --start-epoch out, or start \
                     from its weights at another epoch with --init-weights)",
                    path.display(),
                    m.epoch
                )));
            }
            let state = ck.state()?;
            return Ok(Start {
                epoch: m.epoch,
                seed: m.seed,
                best: Some(m.best),
                best_epoch: m.best_epoch,
                state: Some(state),
                resumed: Some(path),
            });
        }
        let state = a.init_weights.as_deref().map(|p| checkpoint::read_weights(p, cfg)).transpose()?;
        Ok(Start { epoch, seed, best: None, best_epoch: None, state, resumed: None })
    }
}

/// Whether checkpoint file `resumed` lies in `run_dir`.
fn same_run(resumed: &Path, run_dir: &Path) -> bool {
    let parent = match resumed.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    matches!((parent.canonicalize(), run_dir.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Hands the backend the algorithm record beside the checkpoint `resumed` from, if there is
/// one: the rankings reused, or `None` (no record, or one refused with a warning: the
/// algorithms are timed again, which can only cost time).
fn reuse_algorithms<B: Backend>(be: &mut B, resumed: &Path) -> Option<usize> {
    let path = resumed.with_file_name(checkpoint::ALGORITHMS);
    let reused = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Err(e.to_string()),
        Ok(text) => be.reuse_algorithm_record(&text).map_err(|e| e.to_string()),
    };
    reused
        .map_err(|e| {
            eprintln!("warning: {} not reused ({e}): the convolution algorithms are timed again", path.display())
        })
        .ok()
}

/// Refuses to write over the checkpoints of an earlier run, unless this run resumes from a
/// checkpoint in that run directory.
pub(crate) fn check_run_dir(run_dir: &Path, name: &str, resumed: Option<&Path>) -> Result<(), Failure> {
    let same_run = resumed.is_some_and(|r| same_run(r, run_dir));
    let own = run_dir.join(checkpoint::CHECKPOINT);
    if let Some(r) = resumed.filter(|r| same_run && r.file_name() != Some(checkpoint::CHECKPOINT.as_ref())) {
        if own.exists() {
            return Err(failure(format!(
                "resuming run '{name}' from {} would overwrite its later {}: resume from that one, or continue \
                 under another --name or --runs-dir",
                r.display(),
                own.display()
            )));
        }
    }
    for file in [checkpoint::CHECKPOINT, checkpoint::BEST] {
        let path = run_dir.join(file);
        if !same_run && path.exists() {
            return Err(failure(format!(
                "{} already exists from an earlier run named '{name}': continue that run with --resume {}, or \
                 choose another --name or --runs-dir",
                path.display(),
                run_dir.join(checkpoint::CHECKPOINT).display()
            )));
        }
    }
    Ok(())
}

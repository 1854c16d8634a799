//! `densenet train`: the reference recipe with checkpoints, resume, initial weights and
//! TensorBoard logs.

mod job;
mod signals;
mod start;

use super::args::{DataArgs, NetArgs, ProgressArgs, SourceArgs};
use super::device::{self, DeviceArgs};
use super::download::report_fetched;
use super::memory::plan_line;
use super::output::{self, report};
use super::progress::{Passes, Transfer};
use super::{parse, usage, Failure, Outcome};
use clap::parser::ValueSource;
use clap::{ArgMatches, Args};
use densenet::backend::Backend;
use densenet::comm::rendezvous::Links;
use densenet::config::Precision;
use densenet::data::cifar::{Images, Split, SIDE};
use densenet::data::download::{self, Source};
use densenet::data::loader::Loader;
use densenet::launch::Rank;
use densenet::model::plan::Mode;
use densenet::model::Model;
use densenet::train::checkpoint::{self, Saver};
use densenet::train::epoch::{Ahead, BatchDone, Progress};
use densenet::train::tensorboard::EventWriter;
use densenet::train::{self, schedule, stop};
use job::{JobArgs, Role};
use start::Start;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The flags of `densenet train`: the reference `train.py`'s, and what it lacks.
#[derive(Args)]
pub(crate) struct TrainArgs {
    #[command(flatten)]
    net: NetArgs,
    /// Epochs to train.
    #[arg(long, value_name = "N", default_value_t = 300, value_parser = parse::epochs, allow_negative_numbers = true)]
    epochs: usize,
    /// First epoch to run, counted from 0 (the LR schedule follows it) [default: 0; with
    /// --resume: the checkpoint's next epoch, which an explicit value must equal].
    #[arg(long, value_name = "N")]
    start_epoch: Option<usize>,
    /// Initial learning rate (divided by 10 at 50% and 75% of the epochs).
    #[arg(long, default_value_t = 0.1, value_parser = parse::non_negative::<f64>, allow_negative_numbers = true)]
    lr: f64,
    /// Nesterov momentum factor, in [0, 1).
    #[arg(long, default_value_t = 0.9, value_parser = parse::momentum, allow_negative_numbers = true)]
    momentum: f32,
    /// L2 weight decay on every parameter.
    #[arg(long = "weight-decay", visible_alias = "wd", value_name = "WD", default_value_t = 1e-4, value_parser = parse::non_negative::<f32>, allow_negative_numbers = true)]
    weight_decay: f32,
    #[command(flatten)]
    progress: ProgressArgs,
    /// Train without augmentation (no random crop or flip).
    #[arg(long)]
    no_augment: bool,
    /// Name of the run: its checkpoints go to <runs-dir>/<name>/.
    #[arg(long, default_value = "DenseNet_BC_100_12", value_parser = parse::run_name)]
    name: String,
    /// Directory of the runs.
    #[arg(long, value_name = "DIR", default_value = "runs")]
    runs_dir: PathBuf,
    /// Continue a run from its checkpoint (a file, or a run directory for its
    /// checkpoint.safetensors), in its run directory, with its recipe (network, data set,
    /// batch size, SGD settings, epochs, augmentation, seed, name: no flag needs retyping) and
    /// its state (weights, running statistics, momentum, step counter, next epoch, best
    /// accuracy). A recipe flag that differs from the run's is refused (see --change-recipe).
    #[arg(long, value_name = "PATH", conflicts_with = "init_weights")]
    resume: Option<PathBuf>,
    /// With --resume: change the run's recipe to the recipe flags given (a longer --epochs,
    /// say); each change is printed and recorded in the run's checkpoints. The network's
    /// tensors cannot change.
    #[arg(long, requires = "resume")]
    change_recipe: bool,
    /// Start from the weights and running statistics of a safetensors file in our names or
    /// torchvision's (a checkpoint, an export, a converted PyTorch or torchvision state dict);
    /// a classifier with another class count starts from the seed; momentum starts at zero.
    #[arg(long, value_name = "FILE")]
    init_weights: Option<PathBuf>,
    /// Log train_loss, train_acc, val_loss, val_acc and learning_rate per epoch as TensorBoard
    /// event files in the run directory.
    #[arg(long)]
    tensorboard: bool,
    #[command(flatten)]
    data: DataArgs,
    /// Download the dataset into --data-dir first when it is not there (as `densenet download`).
    #[arg(long)]
    download: bool,
    #[command(flatten)]
    source: SourceArgs,
    /// Memory mode: naive, shared or minimal [with --resume: the run's unless given].
    #[arg(long, value_name = "MODE", default_value = "minimal")]
    memory: Mode,
    /// Storage precision of the large tensors: f32, bf16 or fp16 (with loss scaling;
    /// docs/precision.md) [with --resume: the run's].
    #[arg(long, value_name = "P", default_value = "f32")]
    precision: Precision,
    /// Seed of the initialization, the shuffles, the augmentation and dropout [default: 0; with
    /// --resume: the run's, which an explicit value must equal unless --change-recipe].
    #[arg(long, value_name = "N")]
    seed: Option<u64>,
    #[command(flatten)]
    device: DeviceArgs,
    #[command(flatten)]
    job: JobArgs,
    /// The flags given on the command line (their clap ids): a resumed run takes the others
    /// from its recipe.
    #[arg(skip)]
    given: HashSet<String>,
}

/// Runs `densenet train` with `args` as parsed into `matches`.
pub(crate) fn run(mut a: TrainArgs, matches: &ArgMatches) -> Outcome {
    a.given = matches
        .ids()
        .filter(|id| matches.value_source(id.as_str()) == Some(ValueSource::CommandLine))
        .map(|id| id.to_string())
        .collect();
    match a.job.role()? {
        Role::Starter(n) => job::start(n, &a.device),
        Role::Alone => run_as(&a, None),
        Role::Rank(r) => {
            run_as(&a, Some(&r)).map_err(|f| Failure { message: format!("rank {}: {}", r.rank, f.message), ..f })
        }
    }
}

/// Trains alone, or as `rank` of a data-parallel job: the ranks meet first (one that fails
/// early then stops the job instead of leaving the others waiting); rank 0 alone takes the
/// run's lock, prints and writes the run's files.
fn run_as(a: &TrainArgs, rank: Option<&Rank>) -> Outcome {
    if rank.is_some() && a.download {
        return Err(usage("--download in a job of several ranks: run `densenet download` first, then start the job"));
    }
    let links = rank.map(|r| a.job.meet(r)).transpose()?;
    let lead = rank.is_none_or(|r| r.rank == 0);
    if !lead {
        output::quiet();
    }
    // Flags and files first: a usage error is reported as such whatever the device.
    let (start, source, _lock) = match lead {
        true => Start::checked(a).map(|(s, source, lock)| (s, source, Some(lock)))?,
        false => Start::read(a).map(|(s, source)| (s, source, None))?,
    };
    let run_dir = start.run_dir.clone();
    let (mut be, why) = match rank {
        Some(r) => a.device.open_rank(r.local_rank)?,
        None => a.device.open()?,
    };
    // A second handle on the connections: rank 0 sends its convolution algorithms over it.
    let agree = links.as_ref().map(Links::try_clone).transpose()?;
    if let Some(links) = links {
        be.join(links)?;
    }
    signals::catch_signals()?;
    let done = train(a, start, source, be, &why, rank.zip(agree));
    match (done, stop::requested()) {
        // Rank 0 says how to resume; the other ranks only that they stopped.
        (Err(_), Some(signal)) if lead => Err(signals::interrupted(signal, &run_dir)),
        (Err(_), Some(signal)) => Err(signals::stopped(signal)),
        (done, _) => done,
    }
}

/// Trains alone, or as `job`'s rank (with a handle on the connections to its ranks).
fn train(
    a: &TrainArgs,
    start: Start,
    source: Source,
    mut be: impl Backend,
    why: &str,
    job: Option<(&Rank, Links)>,
) -> Outcome {
    let (recipe, run_dir) = (&start.recipe, start.run_dir.as_path());
    let (rank, mut agree) = job.unzip();
    let lead = rank.is_none_or(|r| r.rank == 0);
    let (dataset, batch) = (recipe.dataset, recipe.batch_size);
    if a.download {
        // As `densenet download` does: fetch what is missing, check what is there (and say
        // nothing of usable data already in place).
        let fetched = download::fetch(&a.data.data_dir, dataset, &source, &mut Transfer::new())?;
        if !fetched.already_there {
            report_fetched(&fetched, dataset)?;
        }
    }
    let train_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Train)?);
    if let Some(r) = rank {
        // Each rank trains on a shard of every batch: none may be empty.
        let last = train_set.len() % batch;
        let fewest = if last == 0 { batch } else { batch.min(last) };
        if fewest < r.world {
            return Err(usage(format!(
                "{} ranks and batches of {batch} of {} training images: the last batch of an epoch has {last}, which \
                 leaves a rank without one (choose -b so that every batch has at least {} images)",
                r.world,
                train_set.len(),
                r.world
            )));
        }
    }
    let test_set = Arc::new(Images::load(&a.data.data_dir, dataset, Split::Test)?);
    // In a job, rank 0 chooses the convolution algorithms and the other ranks take its choices,
    // so that every rank computes alike.
    let reused = match agree.as_mut() {
        Some(links) if !lead => take_algorithms(&mut be, links)?,
        _ => start.resumed.as_deref().and_then(|r| reuse_algorithms(&mut be, r)),
    };
    let size = recipe.image_size;
    let mut model = Model::new(recipe.network.clone(), batch, size, size, start.memory, recipe.seed, be)?;
    if let Some(links) = agree.as_mut().filter(|_| lead) {
        links.share(&mut model.backend().algorithm_record().unwrap_or_default().into_bytes())?;
    }
    drop(agree);
    model.set_bn_mode(recipe.bn);
    if let Some(state) = &start.state {
        state.apply(&mut model)?;
    }

    let cfg = model.config();
    report(format_args!(
        "{} (run {}) on {}: {} training and {} test images from {}{}",
        cfg.name(),
        recipe.name,
        dataset.title(),
        train_set.len(),
        test_set.len(),
        a.data.data_dir.display(),
        upsampled(size)
    ))?;
    report(format_args!("Number of model parameters: {}", model.layout().len))?;
    report(device::line(model.backend(), why))?;
    if let Some(r) = rank {
        let shard = densenet::comm::shard(batch, r.world, 0).len();
        report(format_args!(
            "Data parallel (experimental): {} ranks started by {}, met at {}:{}; each trains a shard of every batch \
             of {batch} (at most {shard} images), BN {}",
            r.world, r.launcher, r.master_addr, r.port, recipe.bn
        ))?;
    }
    report(plan_line(model.plan()))?;
    match (&start.resumed, &a.init_weights) {
        (Some(path), _) => report(format_args!(
            "Resumed from {}: epoch {}, step {}, best Prec@1 {:.3}, seed {} (weights, running statistics, momentum)",
            path.display(),
            start.epoch,
            model.steps(),
            start.best.unwrap_or(0.0),
            recipe.seed
        ))?,
        (None, Some(path)) => {
            report(format_args!("Initial weights and running statistics from {} (momentum from zero)", path.display()))?
        }
        (None, None) => {}
    }
    for note in &start.notes {
        report(note)?;
    }
    let schedule = schedule::drops(start.epoch, recipe.epochs);
    report(format_args!(
        "Training: epochs {} to {}, batch {batch}, lr {} ({schedule}), {}momentum {}, weight decay {}, \
         augmentation {}, seed {}",
        start.epoch,
        recipe.epochs - 1,
        schedule::shown(schedule::learning_rate(recipe.lr, start.epoch, recipe.epochs)),
        if recipe.nesterov { "Nesterov " } else { "" },
        recipe.momentum,
        recipe.weight_decay,
        if recipe.augment { "on" } else { "off" },
        recipe.seed
    ))?;

    let mut train_loader = Loader::train(train_set, dataset, batch, recipe.seed, recipe.augment)?;
    let mut test_loader = Loader::test(test_set, dataset, batch)?;
    // Rank 0 writes the run's files; the other ranks hold the same state.
    let saver = lead.then(|| Saver::create(run_dir, recipe.clone(), start.best_epoch)).transpose()?;
    if let Some(saver) = &saver {
        report(format_args!(
            "Checkpoints: {} every epoch, {} on a new best test Prec@1",
            saver.checkpoint().display(),
            checkpoint::BEST
        ))?;
    }
    if let Some(record) = model.backend().algorithm_record().filter(|_| lead) {
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
    let mut events = if a.tensorboard && lead { Some(EventWriter::create(run_dir)?) } else { None };
    if let Some(w) = &events {
        report(format_args!("TensorBoard: {}", w.path().display()))?;
    }
    let from = train::FitFrom { epoch: start.epoch, best: start.best };
    let mut passes: Box<dyn Progress> = match lead {
        true => Box::new(Passes::new(a.progress.print_freq)),
        false => Box::new(Silent),
    };
    let best = train::fit(&mut model, &mut train_loader, &mut test_loader, recipe, from, &mut *passes, |m, end| {
        let (e, t, v) = (end.epoch, end.train, end.test);
        let scale = m.loss_scale();
        let scaling = match scale {
            Some(s) => format!("  loss scale {} ({} steps skipped)", s.scale, t.skipped),
            None => String::new(),
        };
        report(format_args!(
            " * Epoch [{e}]  lr {}  train Loss {:.4}  Prec@1 {:.3}  test Loss {:.4}  Prec@1 {:.3}{scaling}  ({:.1} s)",
            end.lr, t.loss, t.top1, v.loss, v.top1, end.secs
        ))?;
        if let Some(saver) = &saver {
            saver.save(m, e + 1, end.best, end.improved)?;
        }
        if let Some(w) = events.as_mut() {
            for (tag, value) in [
                ("train_loss", t.loss),
                ("train_acc", t.top1),
                ("val_loss", v.loss),
                ("val_acc", v.top1),
                ("learning_rate", end.lr.into()),
            ] {
                w.scalar(tag, value as f32, e as i64)?;
            }
            if let Some(s) = scale {
                w.scalar("loss_scale", s.scale, e as i64)?;
            }
            w.flush()?;
        }
        let note = match end.improved {
            true => format!("; new best Prec@1 {:.3}: {}", end.best, checkpoint::BEST),
            false => String::new(),
        };
        report(format_args!(" * Saved {} (next epoch {}){note}", checkpoint::CHECKPOINT, e + 1))
    })?;
    report(format_args!("Best accuracy: {:.3}", best.unwrap_or(0.0)))?;
    Ok(())
}

/// The passes of a rank other than rank 0: rank 0 shows the job's.
struct Silent;

impl Progress for Silent {
    fn start(&mut self, _: &str, _: usize, _: Ahead) -> densenet::Result<()> {
        Ok(())
    }
    fn batch(&mut self, _: &BatchDone) -> densenet::Result<()> {
        Ok(())
    }
}

/// Takes rank 0's convolution algorithms (none where nothing is timed): the rankings reused,
/// or `None` when rank 0's record is refused here (a warning: this rank times its own).
fn take_algorithms<B: Backend>(be: &mut B, links: &mut Links) -> densenet::Result<Option<usize>> {
    let mut record = Vec::new();
    links.share(&mut record)?;
    if record.is_empty() {
        return Ok(None);
    }
    let text = String::from_utf8_lossy(&record);
    Ok(be.reuse_algorithm_record(&text).map_err(|e| log::warn!("rank 0's convolution algorithms not taken ({e})")).ok())
}

/// Hands the backend the algorithm record beside the checkpoint `resumed` from, if there is
/// one: the rankings reused, or `None` (no record, or one refused with a warning: the
/// algorithms are timed again, which can only cost time).
fn reuse_algorithms<B: Backend>(be: &mut B, resumed: &Path) -> Option<usize> {
    let path = resumed.with_file_name(checkpoint::ALGORITHMS);
    let reused = match std::fs::read_to_string(&path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => Err(densenet::Error(e.to_string())),
        Ok(text) => be.reuse_algorithm_record(&text),
    };
    reused
        .map_err(|e| log::warn!("{} not reused ({e}): the convolution algorithms are timed again", path.display()))
        .ok()
}

/// How the stored images become `size` x `size` inputs, said after the data line: nothing at
/// their own size.
pub(crate) fn upsampled(size: usize) -> String {
    match size / SIDE {
        1 => String::new(),
        s => format!(", upsampled {s}x to {size}x{size}"),
    }
}

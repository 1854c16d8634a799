//! Where a training run starts: the recipe and state from the flags, or from a resumed
//! checkpoint with the recipe flags given over it; and the run directory's checks.

use super::TrainArgs;
use crate::commands::{failure, usage, Failure};
use densenet::bail;
use densenet::config::{Arch, NetConfig};
use densenet::data::download::Source;
use densenet::model::plan::Mode;
use densenet::train::checkpoint::{self, Checkpoint, State};
use densenet::train::lock::RunLock;
use densenet::train::recipe::{self, Change, Recipe};
use densenet::train::schedule;
use std::path::{Path, PathBuf};

/// Where a training run starts: its recipe and directory, the first epoch, the best accuracy
/// so far, and the state that replaces the seed's initialization (a resumed checkpoint's, or
/// initial weights).
pub(super) struct Start {
    /// The recipe trained with: the flags', or the resumed run's with the changes
    /// `--change-recipe` made.
    pub(super) recipe: Recipe,
    /// The memory mode.
    pub(super) memory: Mode,
    /// The run directory.
    pub(super) run_dir: PathBuf,
    pub(super) epoch: usize,
    pub(super) best: Option<f64>,
    /// The `epoch` of the resumed run's best checkpoint, when it records one.
    pub(super) best_epoch: Option<usize>,
    pub(super) state: Option<State>,
    /// The checkpoint file resumed from.
    pub(super) resumed: Option<PathBuf>,
    /// Its size and modification time before it was read.
    stamp: Option<(u64, std::time::SystemTime)>,
    /// Lines saying where a resumed run's recipe came from and what changed, printed before
    /// training.
    pub(super) notes: Vec<String>,
}

/// The clap ids of the flags that set the network (and its classes).
const NETWORK_FLAGS: [&str; 8] =
    ["arch", "layers", "growth", "droprate", "reduce", "no_bottleneck", "dataset", "num_classes"];

/// The clap ids of the flags that shape a CIFAR network only.
const CIFAR_FLAGS: [&str; 3] = ["layers", "reduce", "no_bottleneck"];

impl Start {
    /// Everything the flags and the files decide, checked before a device is opened or any
    /// data loaded or file written; with the run directory's lock, held until the run ends.
    pub(super) fn checked(a: &TrainArgs) -> Result<(Start, Source, RunLock), Failure> {
        let (mut start, source) = Start::read(a)?;
        let (run_dir, name) = (&start.run_dir, &start.recipe.name);
        // Under the lock, so that no other process can start or resume this run meanwhile.
        let lock = RunLock::take(run_dir, name)?;
        check_run_dir(run_dir, name, start.resumed.as_deref())?;
        match &start.resumed {
            // This run's own checkpoint: its best file must be the one it names.
            Some(r) if same_run(r, run_dir) => {
                if let Some(why) = checkpoint::check_best(r, start.epoch, start.best_epoch)? {
                    log::warn!("{why}");
                }
            }
            // Another run's best file stays there: this run's checkpoints name none until it
            // writes its own.
            _ => start.best_epoch = None,
        }
        // Read before the lock was taken: refused if a process that held it wrote a later one
        // (a checkpoint is replaced whole, by a rename: a new size or time, not read again).
        if let Some(r) = &start.resumed {
            if stamp(r) != start.stamp {
                return Err(failure(format!(
                    "{} changed while this run was starting (another process wrote it): run the command again",
                    r.display()
                )));
            }
        }
        Ok((start, source, lock))
    }

    /// The flags and the files they name, without the run directory (a data-parallel rank
    /// other than rank 0 leaves it to rank 0: [`Start::checked`]).
    pub(super) fn read(a: &TrainArgs) -> Result<(Start, Source), Failure> {
        let source = a.source.source();
        if source != Source::Official && !a.download {
            return Err(usage("--url and --archive say where --download fetches the dataset from: add --download"));
        }
        Ok((Start::new(a)?, source))
    }

    /// Reads and checks the flags, and `--resume` or `--init-weights`.
    fn new(a: &TrainArgs) -> Result<Start, Failure> {
        if let Some(path) = &a.resume {
            return Start::resume(a, path);
        }
        let network = NetConfig { precision: a.precision, ..a.net.config(a.net.dataset.classes()).map_err(usage)? };
        let recipe = flags_recipe(a, network);
        recipe.validate().map_err(usage)?;
        let epoch = a.start_epoch.unwrap_or(0);
        if epoch >= recipe.epochs {
            return Err(usage(format!(
                "--start-epoch {epoch} leaves nothing to train: epochs run from it to --epochs {} (exclusive)",
                recipe.epochs
            )));
        }
        let weights =
            a.init_weights.as_deref().map(|p| checkpoint::read_weights(p, &recipe.network, recipe.seed)).transpose()?;
        Ok(Start {
            run_dir: a.runs_dir.join(&recipe.name),
            recipe,
            memory: a.memory,
            epoch,
            best: None,
            best_epoch: None,
            notes: weights.iter().flat_map(|w| w.notes()).collect(),
            state: weights.map(|w| w.state),
            resumed: None,
            stamp: None,
        })
    }

    /// A resumed run: the checkpoint's recipe (the flags' where a format-1 checkpoint records
    /// none) with the recipe flags given over it, refused where they differ unless
    /// `--change-recipe`; its next epoch, best accuracy and state; its directory.
    fn resume(a: &TrainArgs, path: &Path) -> Result<Start, Failure> {
        // A run directory stands for its checkpoint, or for its best one when a kill in its
        // first epoch left only that (it is written first, and is then the same file).
        let path = checkpoint::in_run_dir(path, checkpoint::CHECKPOINT);
        let stamp = stamp(&path);
        let ck = Checkpoint::read(&path)?;
        // The whole file checked first: a damaged checkpoint is the first thing to know.
        let state = ck.state()?;
        let (m, given) = (ck.meta(), |id: &str| a.given.contains(id));
        let dir = match path.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        // The name of the directory the checkpoint is in, when it can be a run's.
        let dir_name = dir.canonicalize().ok().and_then(|d| Some(d.file_name()?.to_str()?.to_string()));
        let dir_name = dir_name.filter(|n| recipe::check_name(n).is_ok());
        let mut notes = Vec::new();
        let stored = match m.recipe() {
            Some(r) => r.clone(),
            None => {
                notes.push(format!(
                    "Recipe: {} (checkpoint format 1) records the network, data set and seed; the batch size, SGD \
                     settings, epochs and augmentation are the flags'",
                    path.display()
                ));
                let name = dir_name.clone().filter(|_| !given("name")).unwrap_or_else(|| a.name.clone());
                let network = m.config().clone();
                Recipe { name, dataset: m.dataset(), seed: m.seed(), ..flags_recipe(a, network) }
            }
        };
        let mut recipe = flags_over(a, &stored).map_err(usage)?;
        let diffs = stored.differences(&recipe);
        let listed: Vec<String> =
            diffs.iter().map(|d| format!("{} {} in the checkpoint, {} here", d.what, d.from, d.to)).collect();
        let describe = |r: &Recipe| format!("{} on {}", r.network.name(), r.dataset.title());
        if !stored.same_tensors(&recipe) {
            return Err(failure(format!(
                "cannot resume from {}: it holds {}, this run is {} ({}); a resumed run keeps its network",
                path.display(),
                describe(&stored),
                describe(&recipe),
                listed.join("; ")
            )));
        }
        if !diffs.is_empty() && !a.change_recipe {
            return Err(failure(format!(
                "cannot resume from {} as asked: {}; leave those flags out to continue run '{}' with its recipe, or \
                 add --change-recipe to change it",
                path.display(),
                listed.join("; "),
                stored.name
            )));
        }
        if a.change_recipe && diffs.is_empty() {
            log::warn!("--change-recipe: the flags given change nothing in the recipe of {}", path.display());
        }
        let epoch = m.epoch;
        if let Some(e) = a.start_epoch.filter(|&e| e != epoch) {
            return Err(failure(format!(
                "--start-epoch {e} disagrees with {}, whose next epoch is {epoch} (leave --start-epoch out, or start \
                 from its weights at another epoch with --init-weights)",
                path.display()
            )));
        }
        for d in diffs {
            let mut note = format!("Recipe change from epoch {epoch}: {} {} -> {}", d.what, d.from, d.to);
            if d.what == "--epochs" {
                note += &format!(" ({})", schedule::moved(stored.lr, recipe.lr, epoch, stored.epochs, recipe.epochs));
            }
            notes.push(note);
            recipe.changes.push(Change { epoch, what: d.what.to_string(), from: d.from, to: d.to });
        }
        if epoch >= recipe.epochs {
            // A format-1 checkpoint's epochs are the flags' anyway.
            let legacy = m.recipe().is_none();
            let how = match (legacy, a.change_recipe) {
                (true, _) => format!("give --epochs N with N above {epoch}"),
                (false, true) => "raise --epochs to continue".to_string(),
                (false, false) => format!("to train longer, add --change-recipe --epochs N with N above {epoch}"),
            };
            return Err(failure(match given("epochs") || legacy {
                true => format!(
                    "{} is at epoch {epoch} and --epochs {} leaves nothing to train: {how}",
                    path.display(),
                    recipe.epochs
                ),
                false => format!(
                    "run '{}' is complete: {} is at epoch {epoch} of its {}; {how}",
                    recipe.name,
                    path.display(),
                    recipe.epochs
                ),
            }));
        }
        let memory = match m.memory {
            Some(trained) if !given("memory") => trained,
            Some(trained) if trained != a.memory => {
                notes.push(format!(
                    "Memory mode {} (the run trained in {trained} until epoch {epoch}): the modes agree to within \
                     1e-5, so from here the run matches an uninterrupted one to that tolerance, not bit for bit",
                    a.memory
                ));
                a.memory
            }
            _ => a.memory,
        };
        // A run's own file (not a copy elsewhere) continues in its directory, unless a new name
        // or --runs-dir says otherwise; a new name goes beside it.
        let run_file = [checkpoint::CHECKPOINT, checkpoint::BEST].iter().any(|f| path.file_name() == Some(f.as_ref()));
        let runs_dir = match dir.parent() {
            Some(parent) if run_file && !given("runs_dir") => parent.to_path_buf(),
            _ => a.runs_dir.clone(),
        };
        let in_place = run_file && !given("runs_dir") && recipe.name == stored.name;
        let run_dir = if in_place { dir } else { runs_dir.join(&recipe.name) };
        if !same_run(&path, &run_dir) {
            notes.push(format!("Run directory: {} (not the directory of {})", run_dir.display(), path.display()));
        }
        Ok(Start {
            recipe,
            memory,
            run_dir,
            epoch,
            best: Some(m.best),
            best_epoch: m.best_epoch,
            state: Some(state),
            resumed: Some(path),
            stamp,
            notes,
        })
    }
}

/// The recipe the flags give for network `cfg`.
fn flags_recipe(a: &TrainArgs, cfg: NetConfig) -> Recipe {
    Recipe {
        batch_size: a.net.batch,
        epochs: a.epochs,
        lr: a.lr,
        momentum: a.momentum,
        weight_decay: a.weight_decay,
        augment: !a.no_augment,
        bn: a.job.bn,
        image_size: a.net.image_size(),
        ..Recipe::reference(&a.name, a.net.dataset, cfg, a.seed.unwrap_or(0))
    }
}

/// `stored` with the recipe flags given on the command line in place of its values.
fn flags_over(a: &TrainArgs, stored: &Recipe) -> densenet::Result<Recipe> {
    let given = |id: &str| a.given.contains(id);
    fn pick<T>(given: bool, flag: T, stored: T) -> T {
        if given {
            flag
        } else {
            stored
        }
    }
    let (net, dataset) = (&stored.network, pick(given("dataset"), a.net.dataset, stored.dataset));
    let network = if NETWORK_FLAGS.iter().any(|id| given(id)) {
        let classes = a.net.num_classes.unwrap_or(dataset.classes());
        let drop_rate = pick(given("droprate"), a.net.droprate, net.drop_rate);
        match pick(given("arch"), a.net.arch, stored.arch) {
            Some(arch) => {
                if let Some(flag) = CIFAR_FLAGS.iter().find(|id| given(id)) {
                    bail!("--{} shapes a CIFAR network; run '{}' is {arch}", flag.replace('_', "-"), stored.name);
                }
                let growth = a.net.growth.unwrap_or(if given("arch") { arch.growth() } else { net.growth });
                arch.config(growth, drop_rate, classes)?
            }
            None => NetConfig::cifar(
                pick(given("layers"), a.net.layers, net.depth()),
                a.net.growth.unwrap_or(net.growth),
                pick(given("no_bottleneck"), false, net.bottleneck),
                pick(given("reduce"), a.net.reduce, net.reduction),
                drop_rate,
                classes,
            )?,
        }
    } else {
        net.clone()
    };
    let network = NetConfig { precision: pick(given("precision"), a.precision, net.precision), ..network };
    let recipe = Recipe {
        name: pick(given("name"), a.name.clone(), stored.name.clone()),
        dataset,
        arch: Arch::of(&network),
        network,
        image_size: a.net.image_size.unwrap_or(stored.image_size),
        batch_size: pick(given("batch"), a.net.batch, stored.batch_size),
        epochs: pick(given("epochs"), a.epochs, stored.epochs),
        lr: pick(given("lr"), a.lr, stored.lr),
        momentum: pick(given("momentum"), a.momentum, stored.momentum),
        weight_decay: pick(given("weight_decay"), a.weight_decay, stored.weight_decay),
        augment: pick(given("no_augment"), false, stored.augment),
        bn: pick(given("bn"), a.job.bn, stored.bn),
        seed: a.seed.unwrap_or(stored.seed),
        ..stored.clone()
    };
    recipe.validate()?;
    Ok(recipe)
}

/// A file's size and modification time (`None` when they cannot be read).
fn stamp(path: &Path) -> Option<(u64, std::time::SystemTime)> {
    let m = std::fs::metadata(path).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Whether checkpoint file `resumed` lies in `run_dir`.
fn same_run(resumed: &Path, run_dir: &Path) -> bool {
    let parent = match resumed.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    matches!((parent.canonicalize(), run_dir.canonicalize()), (Ok(a), Ok(b)) if a == b)
}

/// Refuses to write over the checkpoints of an earlier run, unless this run resumes from a
/// checkpoint in that run directory.
fn check_run_dir(run_dir: &Path, name: &str, resumed: Option<&Path>) -> Result<(), Failure> {
    let same_run = resumed.is_some_and(|r| same_run(r, run_dir));
    let own = run_dir.join(checkpoint::CHECKPOINT);
    if let Some(r) = resumed.filter(|r| same_run && r.file_name() != Some(checkpoint::CHECKPOINT.as_ref())) {
        if own.exists() {
            return Err(failure(format!(
                "resuming run '{name}' from {} would overwrite its later {}: resume from that one, or fork a \
                 new run from this one with --change-recipe --name NEW",
                r.display(),
                own.display()
            )));
        }
    }
    // What names a new run directory: for a resume, a new name is a recipe change.
    let other =
        if resumed.is_some() { "--change-recipe --name NEW (or --runs-dir)" } else { "another --name or --runs-dir" };
    for file in [checkpoint::CHECKPOINT, checkpoint::BEST] {
        let path = run_dir.join(file);
        if !same_run && path.exists() {
            return Err(failure(format!(
                "{} already exists from an earlier run named '{name}': continue that run with --resume {}, or \
                 choose {other}",
                path.display(),
                run_dir.join(checkpoint::CHECKPOINT).display()
            )));
        }
    }
    Ok(())
}

//! Checkpoints: safetensors files that the reference PyTorch model loads and that resume a run
//! exactly.
//!
//! # Contents
//!
//! Tensors (little-endian, C order):
//! - every parameter and BN running statistic under its reference state-dict name
//!   (`conv1.weight`, `block1.layer.0.bn1.running_var`, `fc.bias`, ...), F32;
//! - `<bn>.num_batches_tracked` for every BN (every name ending in `.running_mean` gives a BN
//!   prefix), I64 of shape `[]` as PyTorch stores it, equal to the step counter (the engine
//!   updates every BN's running statistics once per step);
//! - `momentum.<name>` for every parameter, F32: the SGD momentum buffer.
//!
//! Metadata (safetensors `__metadata__`, strings):
//! - `format` = `densenet-checkpoint`, `format_version` = `2`;
//! - `epoch`: the next epoch to run (the reference's `checkpoint['epoch']`);
//! - `best_prec1`: the best test top-1 so far, percent;
//! - `best_epoch`: the `epoch` of the checkpoint [`BEST`] holds, the one that reached
//!   `best_prec1` (absent in checkpoints written before it was recorded);
//! - `steps`: the model's step counter;
//! - `recipe`: the run's whole [`Recipe`] as JSON (schema-versioned), the network in it a JSON
//!   object of the [`NetConfig`] fields (`stem`, `stem_channels`, `growth`, `block_layers`,
//!   `bottleneck`, `reduction`, `drop_rate`, `num_classes`: the class count), beside it `arch`
//!   (the ImageNet architecture, `null` for a CIFAR network) and `image_size` (schema 2);
//! - `memory`: the memory mode the run trained in (not recipe: a resume may change it);
//! - `loss_scale` and `loss_scale_good_steps`, in fp16 runs only: the loss scaler's state
//!   ([`LossScale`]), so that a resume scales and skips exactly as the run would have.
//!
//! Format 1 (still read) had `network`, `dataset` and `seed` in place of `recipe` and
//! `memory`: a resume of it takes the rest of the recipe from the flags.
//!
//! # Weights files
//!
//! [`encode_weights`] (`densenet export`) writes the model tensors alone, in any
//! [`Naming`]: every parameter and running statistic, F32, and every `num_batches_tracked`
//! (I64, the step counter) where the naming has them; no momentum, no metadata. In
//! torchvision's naming such a file is a torchvision DenseNet's state dict.
//! [`read_weights`] (`--init-weights`) reads the model tensors from a checkpoint or a weights
//! file in any naming, told by the names, and re-initializes a classifier with another class
//! count (a fine-tuning start).
//!
//! # Random state
//!
//! Every random number of training comes from the counter-based [`crate::rng`]: the shuffle of
//! an epoch from (seed, epoch), an image's crop and flip from (seed, epoch, image), dropout
//! masks from (seed, step, site); the initialization from the seed alone, and it is replaced by
//! the stored tensors. Checkpoints are written between epochs, when the loader holds no state.
//! So `seed`, `epoch` and `steps` are the whole random state, and a resumed run draws exactly
//! what an uninterrupted one would.
//!
//! # Atomic writes
//!
//! A file is written to a temporary file in the same directory, flushed to disk, renamed over
//! the target and the directory flushed: a reader sees the old file or the new one, never a
//! part. A process killed mid-write (Ctrl-C) leaves the old file intact and, at worst, a
//! `.checkpoint.safetensors.*.tmp` file beside it.
//!
//! After an epoch that improves, [`BEST`] is written before the [`CHECKPOINT`] that names it
//! as best, so a checkpoint never names a best epoch whose weights are not on disk: killed at
//! any instant, the run leaves a best file of the epoch the checkpoint names, or (killed
//! between the two writes) of the epoch after the checkpoint, which resuming trains again
//! bit-identically and writes anew. [`check_best`] tells the two apart from a stale or missing
//! best file. `DENSENET_FAULT_AT=N` (for tests) aborts the process at the N-th step of a write
//! (temporary file written, flushed, renamed, directory flushed), as a `kill -9` there would.

use crate::backend::{Backend, DType, LossScale};
use crate::config::NetConfig;
use crate::data::cifar::Dataset;
use crate::model::names::Naming;
use crate::model::net::Net;
use crate::model::params::{ParamLayout, Tensor};
use crate::model::plan::Mode;
use crate::model::Model;
use crate::named::Named;
use crate::train::recipe::{self, Recipe};
use crate::{bail, Error, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensorError, SafeTensors};
use serde_json::Value;
use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

/// The `format` metadata value that marks a densenet checkpoint.
pub const FORMAT: &str = "densenet-checkpoint";
/// The format version this build writes, and the newest it reads.
pub const VERSION: u32 = 2;
/// The checkpoint written after every epoch, in the run directory.
pub const CHECKPOINT: &str = "checkpoint.safetensors";
/// The copy of the checkpoint of the epoch with the best test top-1, in the run directory.
pub const BEST: &str = "model_best.safetensors";
/// The record of the convolution algorithms a GPU run chose, in the run directory: a resume
/// on the same GPU and cuDNN reuses it (`Backend::reuse_algorithm_record`).
pub const ALGORITHMS: &str = "cudnn-algorithms.json";
/// Name prefix of the momentum tensors.
pub const MOMENTUM: &str = "momentum.";
/// Name suffix of the BN step counters.
pub const BATCHES_TRACKED: &str = ".num_batches_tracked";

/// What a checkpoint records besides the tensors.
#[derive(Clone, Debug, PartialEq)]
pub struct Meta {
    /// The next epoch to run.
    pub epoch: usize,
    /// Best test top-1 precision so far, percent.
    pub best: f64,
    /// The `epoch` of the best checkpoint so far ([`BEST`]); `None` in checkpoints that
    /// predate it.
    pub best_epoch: Option<usize>,
    /// Training steps taken (each BN's `num_batches_tracked`).
    pub steps: u64,
    /// The run's recipe, as much of it as the checkpoint records.
    pub recorded: Recorded,
    /// The memory mode the run trained in (`None` in format 1).
    pub memory: Option<Mode>,
    /// The loss scaler's state (fp16 runs only).
    pub loss_scale: Option<LossScale>,
}

/// A run's recipe as its checkpoint records it.
#[derive(Clone, Debug, PartialEq)]
pub enum Recorded {
    /// The whole recipe (format 2).
    Whole(Recipe),
    /// Format 1 records the network, the data set and the seed only: the rest of the recipe
    /// was the flags'.
    Partial {
        /// The network.
        config: NetConfig,
        /// The data set trained on.
        dataset: Dataset,
        /// The seed of every random stream.
        seed: u64,
    },
}

impl Recorded {
    /// The format version of a checkpoint that records this much.
    fn format_version(&self) -> u32 {
        match self {
            Recorded::Whole(_) => VERSION,
            Recorded::Partial { .. } => 1,
        }
    }
}

impl Meta {
    /// The metadata of `model` trained with `recipe` (whose network it must be), with `epoch`
    /// the next epoch to run and `best` the best test top-1 so far.
    pub fn of<B: Backend>(model: &Model<B>, recipe: &Recipe, epoch: usize, best: f64) -> Meta {
        debug_assert_eq!(model.config(), &recipe.network);
        Meta {
            epoch,
            best,
            best_epoch: None,
            steps: model.steps(),
            recorded: Recorded::Whole(recipe.clone()),
            memory: Some(model.plan().mode),
            loss_scale: model.loss_scale(),
        }
    }

    /// The network.
    pub fn config(&self) -> &NetConfig {
        match &self.recorded {
            Recorded::Whole(r) => &r.network,
            Recorded::Partial { config, .. } => config,
        }
    }

    /// The data set trained on.
    pub fn dataset(&self) -> Dataset {
        match &self.recorded {
            Recorded::Whole(r) => r.dataset,
            Recorded::Partial { dataset, .. } => *dataset,
        }
    }

    /// The seed of every random stream.
    pub fn seed(&self) -> u64 {
        match &self.recorded {
            Recorded::Whole(r) => r.seed,
            Recorded::Partial { seed, .. } => *seed,
        }
    }

    /// The whole recipe, when the checkpoint records it.
    pub fn recipe(&self) -> Option<&Recipe> {
        match &self.recorded {
            Recorded::Whole(r) => Some(r),
            Recorded::Partial { .. } => None,
        }
    }

    /// The metadata as stored, in the format of what it records (a format-1 meta, as read,
    /// writes back as format 1).
    fn to_map(&self) -> HashMap<String, String> {
        let mut map: HashMap<String, String> = [
            ("format", FORMAT.to_string()),
            ("format_version", self.recorded.format_version().to_string()),
            ("epoch", self.epoch.to_string()),
            ("best_prec1", self.best.to_string()),
            ("steps", self.steps.to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut put = |k: &str, v: String| map.insert(k.to_string(), v);
        if let Some(e) = self.best_epoch {
            put("best_epoch", e.to_string());
        }
        if let Some(m) = self.memory {
            put("memory", m.to_string());
        }
        if let Some(s) = self.loss_scale {
            put("loss_scale", s.scale.to_string());
            put("loss_scale_good_steps", s.good_steps.to_string());
        }
        match &self.recorded {
            Recorded::Whole(r) => put("recipe", r.to_json()),
            Recorded::Partial { config, dataset, seed } => {
                put("network", serde_json::to_string(config).expect("a network serializes"));
                put("dataset", dataset.to_string());
                put("seed", seed.to_string())
            }
        };
        map
    }

    /// Parses the metadata of a checkpoint; errors say what is wrong, without the file name.
    fn from_map(map: &HashMap<String, String>) -> Result<Meta> {
        if map.get("format").map(String::as_str) != Some(FORMAT) {
            bail!("not a densenet checkpoint (no '{FORMAT}' format in its metadata)");
        }
        let get = |key: &str| map.get(key).ok_or_else(|| Error(format!("the checkpoint metadata has no '{key}'")));
        fn parse<T: std::str::FromStr>(key: &str, v: &str) -> Result<T> {
            v.parse()
                .map_err(|_| Error(format!("the checkpoint metadata '{key}' is not valid: '{}'", v.escape_debug())))
        }
        let about = |what: &'static str| move |e: Error| Error(format!("the checkpoint metadata{what}: {e}"));
        let version: u32 = parse("format_version", get("format_version")?)?;
        if version == 0 || version > VERSION {
            bail!("checkpoint format version {version}; this build reads versions 1 to {VERSION}");
        }
        let best: f64 = parse("best_prec1", get("best_prec1")?)?;
        if !(0.0..=100.0).contains(&best) {
            bail!("the checkpoint metadata 'best_prec1' is not a percentage: {best}");
        }
        let recorded = if version == 1 {
            let network = get("network")?;
            let config: NetConfig = serde_json::from_str(network)
                .map_err(|e| Error(e.to_string()))
                .and_then(|c: NetConfig| c.validate().map(|()| c))
                .map_err(|e| {
                    Error(format!("the checkpoint metadata 'network' is not valid ({e}): {}", network.escape_debug()))
                })?;
            let dataset = get("dataset")?.parse().map_err(about(""))?;
            recipe::check_classes(&config, dataset).map_err(about(""))?;
            Recorded::Partial { config, dataset, seed: parse("seed", get("seed")?)? }
        } else {
            Recorded::Whole(Recipe::from_json(get("recipe")?).map_err(about(" 'recipe' is not valid"))?)
        };
        Ok(Meta {
            epoch: parse("epoch", get("epoch")?)?,
            best,
            best_epoch: map.get("best_epoch").map(|v| parse("best_epoch", v)).transpose()?,
            steps: parse("steps", get("steps")?)?,
            memory: map.get("memory").map(|v| parse("memory", v)).transpose()?,
            loss_scale: loss_scale(map)?,
            recorded,
        })
    }
}

/// The loss scaler's state in `map`, when it has one: a positive, finite scale and fewer good
/// steps than [`LossScale::GROWTH_INTERVAL`].
fn loss_scale(map: &HashMap<String, String>) -> Result<Option<LossScale>> {
    let (Some(scale), Some(good)) = (map.get("loss_scale"), map.get("loss_scale_good_steps")) else {
        if map.contains_key("loss_scale") || map.contains_key("loss_scale_good_steps") {
            bail!("the checkpoint metadata has one of 'loss_scale' and 'loss_scale_good_steps' without the other");
        }
        return Ok(None);
    };
    let scale: f32 = scale.parse().ok().filter(|s: &f32| s.is_finite() && *s > 0.0).ok_or_else(|| {
        Error(format!("the checkpoint metadata 'loss_scale' is not a positive number: '{}'", scale.escape_debug()))
    })?;
    let good_steps: u32 = good.parse().ok().filter(|&g| g < LossScale::GROWTH_INTERVAL).ok_or_else(|| {
        Error(format!(
            "the checkpoint metadata 'loss_scale_good_steps' is not a count below {}: '{}'",
            LossScale::GROWTH_INTERVAL,
            good.escape_debug()
        ))
    })?;
    Ok(Some(LossScale { scale, good_steps }))
}

/// The whole state a run resumes from or starts with, laid out for one network: its flat
/// parameter, momentum and running-statistics buffers and the step counter.
#[derive(Clone, Debug, PartialEq)]
pub struct State {
    /// The parameter buffer.
    pub params: Vec<f32>,
    /// The momentum buffer.
    pub momentum: Vec<f32>,
    /// The running-statistics buffer.
    pub running: Vec<f32>,
    /// Training steps taken.
    pub steps: u64,
    /// The loss scaler's state (fp16 runs only).
    pub loss_scale: Option<LossScale>,
}

impl State {
    /// Overwrites the model's parameters, momentum, running statistics, step counter and, when
    /// both scale the loss (fp16), its loss scaler (a resume into another precision, a recipe
    /// change, starts another precision's state: fp16 from the initial scale).
    pub fn apply<B: Backend>(&self, model: &mut Model<B>) -> Result<()> {
        model.load(&self.params, &self.momentum, &self.running)?;
        model.set_steps(self.steps);
        if let (Some(s), Some(_)) = (self.loss_scale, model.loss_scale()) {
            model.set_loss_scale(s)?;
        }
        Ok(())
    }
}

/// The serialized checkpoint of `model` with metadata `meta` (whose step counter goes into
/// every `num_batches_tracked`).
pub fn encode<B: Backend>(model: &Model<B>, meta: &Meta) -> Result<Vec<u8>> {
    let (params, momentum, running) = (model.params(), model.momentum(), model.running_stats());
    // A device error while reading must not replace a good checkpoint with NaN.
    model.backend().take_error()?;
    let buffers = Buffers { params: &params, running: &running, momentum: Some(&momentum), steps: Some(meta.steps) };
    serialize(model.layout(), Naming::Densenet, buffers, Some(meta.to_map()))
}

/// The weights file of network `cfg` in state `state`, its tensors named by `naming`: every
/// parameter and running statistic (F32) and, where the naming has them, every
/// `num_batches_tracked` (I64, the step counter); no momentum, no metadata. An error when the
/// naming does not name the network ([`Naming::check`]).
pub fn encode_weights(cfg: &NetConfig, state: &State, naming: Naming) -> Result<Vec<u8>> {
    naming.check(cfg)?;
    let steps = naming.counters().then_some(state.steps);
    let buffers = Buffers { params: &state.params, running: &state.running, momentum: None, steps };
    serialize(&Net::new(cfg).layout, naming, buffers, None)
}

/// The buffers a file is written from.
struct Buffers<'a> {
    params: &'a [f32],
    running: &'a [f32],
    /// Written as `momentum.<name>` when given.
    momentum: Option<&'a [f32]>,
    /// Written as every BN's `num_batches_tracked` when given.
    steps: Option<u64>,
}

/// The safetensors file of the tensors of `lay` in `buffers`, named by `naming`, with
/// `metadata`.
fn serialize(
    lay: &ParamLayout,
    naming: Naming,
    buffers: Buffers,
    metadata: Option<HashMap<String, String>>,
) -> Result<Vec<u8>> {
    let bytes = |v: &[f32]| v.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    let (params, running) = (bytes(buffers.params), bytes(buffers.running));
    let momentum = buffers.momentum.map(bytes);
    let steps = buffers
        .steps
        .map(|s| i64::try_from(s).map_err(|_| Error(format!("step counter {s} overflows I64"))))
        .transpose()?
        .map(i64::to_le_bytes);
    let mut tensors = Vec::new();
    for t in &lay.params {
        tensors.push((naming.name_of(&t.name)?, view(&params, t.off, &t.shape)));
        if let Some(m) = &momentum {
            tensors.push((format!("{MOMENTUM}{}", naming.name_of(&t.name)?), view(m, t.off, &t.shape)));
        }
    }
    for t in &lay.running {
        tensors.push((naming.name_of(&t.name)?, view(&running, t.off, &t.shape)));
    }
    if let Some(steps) = &steps {
        for bn in bn_prefixes(lay) {
            let name = naming.name_of(&format!("{bn}{BATCHES_TRACKED}"))?;
            tensors.push((name, TensorView::new(Dtype::I64, vec![], steps)));
        }
    }
    let tensors = tensors
        .into_iter()
        .map(|(name, v)| v.map(|v| (name, v)))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error(format!("cannot lay out the tensors: {e}")))?;
    let file =
        safetensors::serialize(tensors, metadata).map_err(|e| Error(format!("cannot serialize the tensors: {e}")))?;
    Ok(canonical(file))
}

/// A safetensors file with its header's keys in sorted order (the crate writes the metadata
/// in hash order, which changes from process to process), so that the same tensors and
/// metadata always give the same bytes. The data section, and so every offset, is unchanged.
fn canonical(file: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(file[..8].try_into().expect("8 bytes of header length")) as usize;
    // serde_json's maps are ordered by key.
    let header: Value = serde_json::from_slice(&file[8..8 + n]).expect("safetensors wrote a JSON header");
    let mut text = serde_json::to_vec(&header).expect("a JSON value serializes");
    // The data starts 8-byte aligned, as safetensors pads it.
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = Vec::with_capacity(8 + text.len() + file.len() - 8 - n);
    out.extend_from_slice(&(text.len() as u64).to_le_bytes());
    out.extend_from_slice(&text);
    out.extend_from_slice(&file[8 + n..]);
    out
}

/// The F32 tensor of shape `shape` at float offset `off` of `buf`.
fn view<'a>(buf: &'a [u8], off: usize, shape: &[usize]) -> std::result::Result<TensorView<'a>, SafeTensorError> {
    let len = shape.iter().product::<usize>();
    let f32_bytes = DType::F32.size();
    TensorView::new(Dtype::F32, shape.to_vec(), &buf[f32_bytes * off..f32_bytes * (off + len)])
}

/// The BN prefixes of a layout: every running-statistics name ending in `.running_mean`.
fn bn_prefixes(lay: &ParamLayout) -> impl Iterator<Item = &str> {
    lay.running.iter().filter_map(|t| t.name.strip_suffix(".running_mean"))
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory, written and
/// flushed to disk, renamed over `path`, then the directory flushed. `path` holds its old
/// contents or the new ones, never a part, whenever the process stops.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let fail = |e: std::io::Error| Error(format!("cannot write {}: {e}", path.display()));
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let prefix = format!(".{name}.");
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    #[cfg(unix)]
    {
        // The mode of a file created the usual way (0666 less the umask), not tempfile's 0600.
        use std::os::unix::fs::PermissionsExt;
        builder.permissions(std::fs::Permissions::from_mode(0o666));
    }
    let mut tmp = builder.tempfile_in(dir).map_err(fail)?;
    tmp.write_all(bytes).map_err(fail)?;
    fault_point();
    tmp.as_file().sync_all().map_err(fail)?;
    fault_point();
    tmp.persist(path).map_err(|e| fail(e.error))?;
    fault_point();
    #[cfg(unix)]
    File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    fault_point();
    Ok(())
}

/// For tests of crash consistency: with `DENSENET_FAULT_AT=N`, the N-th call in this process
/// aborts it (no destructor, no flush: as a `kill -9` at that instant would).
fn fault_point() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static REACHED: AtomicUsize = AtomicUsize::new(0);
    let Some(at) = std::env::var("DENSENET_FAULT_AT").ok().and_then(|v| v.parse::<usize>().ok()) else { return };
    if REACHED.fetch_add(1, Ordering::SeqCst) + 1 == at {
        log::error!("DENSENET_FAULT_AT={at}: aborting");
        std::process::abort();
    }
}

/// Reads a whole file; errors name it.
fn read_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let cannot = |e: std::io::Error| Error(format!("cannot read {}: {e}", path.display()));
    // Checked before opening: opening a FIFO would block, and a device never ends.
    let meta = std::fs::metadata(path).map_err(cannot)?;
    if !meta.is_file() {
        bail!(
            "{} is not a regular file ({}): give a checkpoint file",
            path.display(),
            if meta.is_dir() { "a directory" } else { "a FIFO, socket or device" }
        );
    }
    let file = File::open(path).map_err(cannot)?;
    // Never more than the file's size when it was checked, whatever it grows to meanwhile.
    let mut bytes = Vec::new();
    if bytes.try_reserve_exact(meta.len() as usize).is_err() {
        bail!("{}: {} bytes do not fit in memory", path.display(), meta.len());
    }
    file.take(meta.len()).read_to_end(&mut bytes).map_err(cannot)?;
    Ok(bytes)
}

/// Parses a safetensors file; a file that is not one is an error naming it.
fn parse<'a>(path: &Path, bytes: &'a [u8]) -> Result<(SafeTensors<'a>, HashMap<String, String>)> {
    let bad = |e: SafeTensorError| {
        let why = e.to_string().replace('\n', " ");
        Error(format!("{}: not a valid safetensors file ({why}; truncated or corrupt?)", path.display()))
    };
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(bad)?;
    let meta = header.metadata().clone().unwrap_or_default();
    Ok((SafeTensors::deserialize(bytes).map_err(bad)?, meta))
}

/// Copies tensor `name` (F32 of shape `shape`) into `out`; errors say what is wrong with it.
fn read_f32(st: &SafeTensors, name: &str, shape: &[usize], out: &mut [f32]) -> Result<()> {
    let t = st.tensor(name).map_err(|_| Error(format!("no tensor '{name}'")))?;
    if t.dtype() != Dtype::F32 {
        bail!("tensor '{name}' is {}; expected F32", t.dtype());
    }
    if t.shape() != shape {
        bail!("tensor '{name}' has shape {:?}; expected {shape:?}", t.shape());
    }
    for (i, (o, b)) in out.iter_mut().zip(t.data().chunks_exact(DType::F32.size())).enumerate() {
        *o = f32::from_le_bytes(b.try_into().expect("4 bytes"));
        if !o.is_finite() {
            bail!("tensor '{name}' holds {} at element {i}: a checkpoint's values must be finite", *o);
        }
    }
    Ok(())
}

/// The parameters and running statistics of `lay` read from `st`: (params, running).
fn read_model(st: &SafeTensors, lay: &ParamLayout) -> Result<(Vec<f32>, Vec<f32>)> {
    let (mut params, mut running) = (vec![0.0; lay.len], vec![0.0; lay.running_len]);
    for t in &lay.params {
        read_f32(st, &t.name, &t.shape, &mut params[t.off..t.off + t.len()])?;
    }
    for t in &lay.running {
        read_f32(st, &t.name, &t.shape, &mut running[t.off..t.off + t.len()])?;
    }
    Ok((params, running))
}

/// The model tensor names of a layout: parameters and running statistics.
fn model_names(lay: &ParamLayout) -> HashSet<&str> {
    lay.params.iter().chain(&lay.running).map(|t| t.name.as_str()).collect()
}

/// The first (in name order) of `names` not in `known`.
fn first_unknown<'a>(names: impl Iterator<Item = &'a str>, known: impl Fn(&str) -> bool) -> Option<&'a str> {
    names.filter(|n| !known(n)).min()
}

/// A checkpoint file, read and its metadata checked; its tensors are read by [`Checkpoint::state`].
pub struct Checkpoint {
    path: PathBuf,
    bytes: Vec<u8>,
    meta: Meta,
}

impl Checkpoint {
    /// Reads a checkpoint: a valid safetensors file with densenet checkpoint metadata.
    pub fn read(path: &Path) -> Result<Checkpoint> {
        Self::from_bytes(path, read_file(path)?)
    }

    /// A checkpoint from the bytes of file `path` (named in errors).
    fn from_bytes(path: &Path, bytes: Vec<u8>) -> Result<Checkpoint> {
        let (_, map) = parse(path, &bytes)?;
        let meta = Meta::from_map(&map).map_err(|e| Error(format!("{}: {e}", path.display())))?;
        Ok(Checkpoint { path: path.to_path_buf(), bytes, meta })
    }

    /// The file it was read from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The metadata.
    pub fn meta(&self) -> &Meta {
        &self.meta
    }

    /// Every tensor of the checkpoint, laid out for its network: each parameter, running
    /// statistic and momentum with the right type and shape, every `num_batches_tracked` equal
    /// to the step counter, and nothing else.
    pub fn state(&self) -> Result<State> {
        let (st, _) = parse(&self.path, &self.bytes)?;
        self.tensors(&st).map_err(|e| Error(format!("{}: {e}", self.path.display())))
    }

    /// [`Checkpoint::state`] from the parsed file; errors without the file's name.
    fn tensors(&self, st: &SafeTensors) -> Result<State> {
        let (name, steps) = (self.meta.config().name(), self.meta.steps);
        let lay = Net::new(self.meta.config()).layout;
        // The metadata is the file's word: check it against the file's size before trusting
        // it with an allocation (parameters and momentum, statistics, in f32).
        let needed = (2 * lay.len as u128 + lay.running_len as u128) * DType::F32.size() as u128;
        if needed > self.bytes.len() as u128 {
            bail!("the file is too small for the {name} it describes: damaged or not a densenet checkpoint");
        }
        let (params, running) = read_model(st, &lay)?;
        let mut momentum = vec![0.0; lay.len];
        for t in &lay.params {
            read_f32(st, &format!("{MOMENTUM}{}", t.name), &t.shape, &mut momentum[t.off..t.off + t.len()])?;
        }
        let counters: Vec<String> = bn_prefixes(&lay).map(|bn| format!("{bn}{BATCHES_TRACKED}")).collect();
        for counter in &counters {
            let t = st.tensor(counter).map_err(|_| Error(format!("no tensor '{counter}'")))?;
            let value = t.data().try_into().ok().filter(|_| t.dtype() == Dtype::I64).map(i64::from_le_bytes);
            let Some(v) = value else { bail!("tensor '{counter}' is not one I64 value") };
            if u64::try_from(v) != Ok(steps) {
                bail!("tensor '{counter}' is {v}; the step counter is {steps}");
            }
        }
        let known = model_names(&lay);
        let counters: HashSet<&str> = counters.iter().map(String::as_str).collect();
        let is_known = |n: &str| {
            known.contains(n) || counters.contains(n) || n.strip_prefix(MOMENTUM).is_some_and(|p| known.contains(p))
        };
        if let Some(extra) = first_unknown(st.names().into_iter(), is_known) {
            bail!("tensor '{extra}' is not part of {name}");
        }
        Ok(State { params, momentum, running, steps, loss_scale: self.meta.loss_scale })
    }
}

/// The checkpoint `path` names: a file, itself; a run directory, its `first` file ([`CHECKPOINT`]
/// or [`BEST`]), or the other one when only that one is there.
pub fn in_run_dir(path: &Path, first: &str) -> PathBuf {
    if !path.is_dir() {
        return path.to_path_buf();
    }
    let other = if first == BEST { CHECKPOINT } else { BEST };
    match (path.join(first).exists(), path.join(other).exists()) {
        (false, true) => path.join(other),
        _ => path.join(first),
    }
}

/// Initial weights read by [`read_weights`].
#[derive(Clone, Debug, PartialEq)]
pub struct Weights {
    /// The state to start from: the file's parameters and running statistics, momentum zero,
    /// step counter 0.
    pub state: State,
    /// How the file names the tensors.
    pub naming: Naming,
    /// Set when the file's classifier has another class count than the network: the classifier
    /// was initialized from the seed instead.
    pub reset: Option<ClassifierReset>,
}

/// A classifier initialized from the seed because the file's has another class count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ClassifierReset {
    /// The network's classes.
    pub classes: usize,
    /// The file's classes.
    pub file_classes: usize,
}

impl Weights {
    /// What a run starting from these weights says of them, a line each: the naming when it is
    /// not ours, a re-initialized classifier.
    pub fn notes(&self) -> Vec<String> {
        let naming = (self.naming != Naming::Densenet).then(|| format!("Initial weights in {} names", self.naming));
        let reset = self.reset.map(|r| {
            format!("Classifier re-initialized for {} classes (the file's has {})", r.classes, r.file_classes)
        });
        naming.into_iter().chain(reset).collect()
    }
}

/// Initial weights for the network `cfg`, initialized from `seed`, from a safetensors file in
/// any [`Naming`] that names it (a checkpoint, our export, a converted PyTorch or torchvision
/// state dict), told by the names; a file mixing namings is an error. Every parameter and
/// running statistic must be there, F32, with the network's shape, except the classifier: one
/// with another class count (weight `[n, C]` and bias `[n]`, `C` the network's features) is
/// replaced by the network's own initialization from `seed`, and [`Weights::reset`] says so.
/// `momentum.*` and `*.num_batches_tracked` tensors are ignored; any other tensor is an error.
/// Errors name the tensor as the file does.
pub fn read_weights(path: &Path, cfg: &NetConfig, seed: u64) -> Result<Weights> {
    let bytes = read_file(path)?;
    let (st, map) = parse(path, &bytes)?;
    // A densenet checkpoint says which network it holds: worth saying when it is another one.
    let held = match Meta::from_map(&map) {
        Ok(m) if !m.config().same_parameters(cfg) => format!(" (the file holds {})", m.config().name()),
        _ => String::new(),
    };
    let fail = |e: String| Error(format!("{}: {e}", path.display()));
    let net = Net::new(cfg);
    let lay = &net.layout;
    let tensors: Vec<&Tensor> = lay.params.iter().chain(&lay.running).collect();
    // Each naming that names the network, with the names of `tensors` (parameters, then
    // running statistics) in it.
    let namings = Naming::VALUES
        .iter()
        .filter(|n| n.check(cfg).is_ok())
        .map(|&n| Ok((n, tensors.iter().map(|t| n.name_of(&t.name)).collect::<Result<Vec<_>>>()?)))
        .collect::<Result<Vec<_>>>()?;
    let sets: Vec<HashSet<&str>> =
        namings.iter().map(|(_, names)| names.iter().map(String::as_str).collect()).collect();
    let mut file_names: Vec<&str> =
        st.names().into_iter().filter(|n| !n.starts_with(MOMENTUM) && !n.ends_with(BATCHES_TRACKED)).collect();
    file_names.sort_unstable();
    // The namings (indices into `namings`) that have each name.
    let claims = |name: &str| -> Vec<usize> { (0..sets.len()).filter(|&k| sets[k].contains(name)).collect() };
    // Unknown names first: a whole file of them ('module.' prefixes) is one mistake, not a
    // missing tensor.
    if let Some(extra) = file_names.iter().find(|n| claims(n).is_empty()) {
        let hint = if extra.starts_with("module.") {
            " (strip the 'module.' prefix that DataParallel adds)"
        } else if extra.starts_with("features.") || extra.starts_with("classifier.") {
            " (torchvision names fit only ImageNet-stem DenseNets with bottleneck layers)"
        } else {
            ""
        };
        return Err(fail(format!("tensor '{extra}' is not part of {}{held}{hint}", cfg.name())));
    }
    let Some(k) = (0..namings.len()).find(|&k| file_names.iter().all(|n| sets[k].contains(n))) else {
        return Err(fail(mixed(&file_names, &claims, |k| namings[k].0)));
    };
    let (naming, names) = (namings[k].0, &namings[k].1);
    let about = |e: Error| fail(format!("{e} for {}{held}", cfg.name()));
    let reset = classifier_reset(&st, &net, names);
    let (mut params, mut running) = (vec![0.0; lay.len], vec![0.0; lay.running_len]);
    let (param_names, running_names) = names.split_at(lay.params.len());
    for (i, (t, name)) in lay.params.iter().zip(param_names).enumerate() {
        let out = &mut params[t.off..t.off + t.len()];
        match reset {
            Some(_) if t.off == net.fc_w || t.off == net.fc_b => {
                out.copy_from_slice(&ParamLayout::initial_tensor(t, i, seed))
            }
            _ => read_f32(&st, name, &t.shape, out).map_err(about)?,
        }
    }
    for (t, name) in lay.running.iter().zip(running_names) {
        read_f32(&st, name, &t.shape, &mut running[t.off..t.off + t.len()]).map_err(about)?;
    }
    let state = State { params, momentum: vec![0.0; lay.len], running, steps: 0, loss_scale: None };
    Ok(Weights { state, naming, reset })
}

/// The error of a file whose names (sorted, each in some naming: `claims` gives the indices of
/// those that have it, `naming` the naming of an index) are in no single naming: two names
/// that no naming has both.
fn mixed(names: &[&str], claims: &dyn Fn(&str) -> Vec<usize>, naming: impl Fn(usize) -> Naming) -> String {
    // The first name of each set of claims; two of them have no naming in common (or one
    // naming would have every name).
    let mut firsts: Vec<(Vec<usize>, &str)> = Vec::new();
    for n in names {
        let c = claims(n);
        if !firsts.iter().any(|(f, _)| *f == c) {
            firsts.push((c, n));
        }
    }
    let pair = firsts.iter().enumerate().find_map(|(i, (a, x))| {
        firsts[i + 1..].iter().find(|(b, _)| a.iter().all(|k| !b.contains(k))).map(|(b, y)| (a[0], *x, b[0], *y))
    });
    match pair {
        Some((a, x, b, y)) => format!(
            "mixes namings: tensor '{x}' is a {} name, '{y}' a {} name; a file uses one naming",
            naming(a),
            naming(b)
        ),
        None => "mixes namings; a file uses one naming".to_string(),
    }
}

/// Whether the classifier of the file (whose names for the tensors of `net` are `names`,
/// parameters then running statistics) is to be re-initialized: its weight is `[n, C]` and its
/// bias `[n]`, `C` the network's features and `n` another class count than the network's.
/// Anything else is left to the tensor checks.
fn classifier_reset(st: &SafeTensors, net: &Net, names: &[String]) -> Option<ClassifierReset> {
    let lay = &net.layout;
    let find = |off: usize| lay.params.iter().position(|t| t.off == off).expect("the classifier is in the layout");
    let (w, b) = (find(net.fc_w), find(net.fc_b));
    let (classes, features) = (lay.params[w].shape[0], lay.params[w].shape[1]);
    let shape = |i: usize| st.tensor(&names[i]).ok().map(|t| t.shape().to_vec());
    match (shape(w).as_deref(), shape(b).as_deref()) {
        (Some(&[n, c]), Some(&[m])) if c == features && m == n && n != classes => {
            Some(ClassifierReset { classes, file_classes: n })
        }
        _ => None,
    }
}

/// Writes a run's checkpoints into its directory: [`CHECKPOINT`] after every epoch, and
/// [`BEST`] as well, first, when the epoch's test top-1 is the best so far.
pub struct Saver {
    dir: PathBuf,
    recipe: Recipe,
    /// The `epoch` of the best checkpoint so far.
    best_epoch: std::cell::Cell<Option<usize>>,
}

impl Saver {
    /// Creates the run directory `dir` if needed, checks that files can be written there, and
    /// removes the temporary files of writes a killed process left unfinished. Its checkpoints
    /// record `recipe`; `best_epoch` is the `epoch` of the best checkpoint so far (a resumed
    /// run's).
    pub fn create(dir: &Path, recipe: Recipe, best_epoch: Option<usize>) -> Result<Saver> {
        std::fs::create_dir_all(dir)
            .and_then(|()| tempfile::Builder::new().prefix(".probe.").tempfile_in(dir).map(drop))
            .map_err(|e| Error(format!("cannot write checkpoints in {}: {e}", dir.display())))?;
        let stale = |name: &str| {
            [CHECKPOINT, BEST].iter().any(|f| name.starts_with(&format!(".{f}.")) && name.ends_with(".tmp"))
        };
        for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if stale(&entry.file_name().to_string_lossy()) {
                // Best effort: a file that cannot be removed is only clutter.
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(Saver { dir: dir.to_path_buf(), recipe, best_epoch: best_epoch.into() })
    }

    /// The path of the per-epoch checkpoint.
    pub fn checkpoint(&self) -> PathBuf {
        self.dir.join(CHECKPOINT)
    }

    /// The path of the best epoch's checkpoint.
    pub fn best(&self) -> PathBuf {
        self.dir.join(BEST)
    }

    /// Writes the checkpoint of `model` with `epoch` the next epoch to run and `best` the best
    /// test top-1 so far; when `improved`, as the best one too, first (see the module docs).
    pub fn save<B: Backend>(&self, model: &Model<B>, epoch: usize, best: f64, improved: bool) -> Result<()> {
        if improved {
            self.best_epoch.set(Some(epoch));
        }
        let meta = Meta { best_epoch: self.best_epoch.get(), ..Meta::of(model, &self.recipe, epoch, best) };
        let bytes = encode(model, &meta)?;
        if improved {
            write_atomic(&self.best(), &bytes)?;
        }
        write_atomic(&self.checkpoint(), &bytes)
    }
}

/// Checks that the [`BEST`] beside checkpoint `ck`, whose `epoch` is `epoch` and which names
/// `best_epoch` as its best, is the one it names (see the module docs): `Ok(None)` when it is,
/// or when it is the next epoch's (a run killed between the two writes; resuming trains that
/// epoch again and rewrites it), or when `ck` predates the record; `Ok(Some(why))` when it is
/// stale or missing, with what that means.
pub fn check_best(ck: &Path, epoch: usize, best_epoch: Option<usize>) -> Result<Option<String>> {
    let Some(named) = best_epoch else { return Ok(None) };
    let best = ck.with_file_name(BEST);
    if !best.exists() {
        return Ok(Some(format!(
            "{} is missing: the weights of epoch {named}, which {} names as its best, are not on disk; the next \
             improvement writes it anew",
            best.display(),
            ck.display()
        )));
    }
    let held = Checkpoint::read(&best)?.meta.clone();
    if held.epoch == named || (held.epoch == epoch + 1 && held.best_epoch == Some(held.epoch)) {
        return Ok(None);
    }
    Ok(Some(format!(
        "{} holds epoch {} but {} names epoch {named} as its best: that file is stale; the next improvement \
         writes it anew",
        best.display(),
        held.epoch,
        ck.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::{CpuBackend, Sgd};
    use crate::model::plan::Mode;
    use crate::rng;

    fn model(cfg: &NetConfig, seed: u64) -> Model<CpuBackend> {
        Model::new(cfg.clone(), 2, 8, 8, Mode::Minimal, seed, CpuBackend::new()).unwrap()
    }

    fn random(key: u64, n: usize) -> Vec<f32> {
        (0..n).map(|i| rng::normal(key, i as u64) as f32).collect()
    }

    /// A model whose parameters, momentum, statistics and step counter are all arbitrary.
    fn scrambled(cfg: &NetConfig) -> Model<CpuBackend> {
        let mut m = model(cfg, 7);
        let lay = m.layout().clone();
        let running: Vec<f32> = random(3, lay.running_len).iter().map(|v| v.abs()).collect();
        m.load(&random(1, lay.len), &random(2, lay.len), &running).unwrap();
        m.set_steps(12345);
        m
    }

    fn cfg() -> NetConfig {
        NetConfig::cifar(10, 4, true, 0.5, 0.2, 10).unwrap()
    }

    /// The reference recipe of `m`'s network and seed, on `dataset`.
    fn recipe(m: &Model<CpuBackend>, dataset: Dataset) -> Recipe {
        Recipe::reference("r", dataset, m.config().clone(), m.seed())
    }

    /// Structure-aware fuzzing of the checkpoint reader: mutations of a valid checkpoint (the
    /// header length, numbers in the header such as offsets and shapes, dtypes, metadata
    /// values and the network JSON, truncation, bytes anywhere), a fixed seeded budget. Every
    /// case is read and, when that passes, its tensors taken: no panic, every rejection one
    /// line; how many got past the first check is the README's count.
    #[test]
    fn fuzzed_checkpoints_are_one_line_errors_never_panics() {
        const CASES: u64 = 20_000;
        let m = scrambled(&cfg());
        let seed = encode(&m, &Meta::of(&m, &recipe(&m, Dataset::Cifar10), 3, 25.0)).unwrap();
        let n = u64::from_le_bytes(seed[..8].try_into().unwrap()) as usize;
        let header = String::from_utf8(seed[8..8 + n].to_vec()).unwrap();
        // Every number and string of the header: what mutations replace.
        let spans = crate::testing::json_spans(&header);
        let values = crate::testing::json_values(&["F16", "I64", "BOGUS", "[1000000,1000000]"]);
        let (mut past_first, path) = (0, Path::new("fuzz.safetensors"));
        for case in 0..CASES {
            let r = |k: u64| rng::derive(rng::derive(0xf022, case), k);
            let mut file = match r(0) % 4 {
                // A number or string of the header replaced.
                0 | 1 => {
                    let (a, b) = spans[(r(1) % spans.len() as u64) as usize];
                    let mut h = header.clone();
                    h.replace_range(a..b, values[(r(2) % values.len() as u64) as usize]);
                    let mut f = (h.len() as u64).to_le_bytes().to_vec();
                    f.extend_from_slice(h.as_bytes());
                    f.extend_from_slice(&seed[8 + n..]);
                    f
                }
                // The header length.
                2 => {
                    let mut f = seed.clone();
                    let len = [0, 1, n as u64 - 1, n as u64 + 1, seed.len() as u64, u64::MAX, r(3)];
                    f[..8].copy_from_slice(&len[(r(4) % 7) as usize].to_le_bytes());
                    f
                }
                // Truncated, or bytes flipped anywhere.
                _ => {
                    let mut f = seed.clone();
                    if r(5) % 2 == 0 {
                        f.truncate((r(6) % seed.len() as u64) as usize);
                    } else {
                        for k in 0..1 + r(7) % 4 {
                            let at = (r(8 + k) % f.len() as u64) as usize;
                            f[at] ^= 1 << (r(20 + k) % 8);
                        }
                    }
                    f
                }
            };
            file.shrink_to_fit();
            let outcome = std::panic::catch_unwind(|| {
                let ck = Checkpoint::from_bytes(path, file)?;
                ck.state().map(|_| ())
            });
            match outcome {
                Err(_) => panic!("case {case} panicked"),
                Ok(Ok(())) => past_first += 1,
                Ok(Err(e)) => {
                    assert!(!e.0.contains('\n') && e.0.starts_with("fuzz.safetensors"), "case {case}: {e}");
                    if !e.0.contains("not a valid safetensors file") {
                        past_first += 1;
                    }
                }
            }
        }
        let parser = "checkpoint (safetensors framing, header, metadata, tensors)";
        crate::testing::Tally { parser, cases: CASES, counts: vec![past_first] }.check();
    }

    #[test]
    fn a_stale_or_missing_best_file_is_told_apart_from_a_consistent_one() {
        let dir = tempfile::tempdir().unwrap();
        let m = scrambled(&cfg());
        let saver = Saver::create(dir.path(), recipe(&m, Dataset::Cifar10), None).unwrap();
        saver.save(&m, 1, 10.0, true).unwrap();
        let first = std::fs::read(saver.best()).unwrap();
        saver.save(&m, 2, 20.0, true).unwrap();
        saver.save(&m, 3, 20.0, false).unwrap();
        let ck = saver.checkpoint();
        assert_eq!(Checkpoint::read(&ck).unwrap().meta().best_epoch, Some(2));
        assert_eq!(Checkpoint::read(&saver.best()).unwrap().meta().best_epoch, Some(2));
        assert_eq!(check_best(&ck, 3, Some(2)).unwrap(), None);
        // Killed between the best file and the checkpoint of epoch 4: the best is one ahead.
        saver.save(&m, 4, 30.0, true).unwrap();
        assert_eq!(check_best(&ck, 3, Some(2)).unwrap(), None);
        std::fs::write(saver.best(), &first).unwrap();
        let stale = check_best(&ck, 4, Some(4)).unwrap().expect("stale");
        assert!(stale.contains("holds epoch 1 but") && stale.contains("names epoch 4 as its best"), "{stale}");
        std::fs::remove_file(saver.best()).unwrap();
        assert!(check_best(&ck, 4, Some(4)).unwrap().expect("missing").contains("is missing"));
        // A checkpoint from before the record names no best epoch: nothing to check.
        assert_eq!(check_best(&ck, 4, None).unwrap(), None);
    }

    #[test]
    fn round_trips_every_tensor_and_metadata_field() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        let cfg = NetConfig { reduction: 0.30000000000000004, num_classes: 100, ..cfg() };
        let m = scrambled(&cfg);
        let meta = Meta::of(&m, &recipe(&m, Dataset::Cifar100), 17, 42.125);
        assert_eq!((meta.seed(), meta.steps), (7, 12345));
        write_atomic(&path, &encode(&m, &meta).unwrap()).unwrap();

        let ck = Checkpoint::read(&path).unwrap();
        assert_eq!(ck.meta(), &meta);
        let state = ck.state().unwrap();
        assert_eq!(
            state,
            State {
                params: m.params(),
                momentum: m.momentum(),
                running: m.running_stats(),
                steps: 12345,
                loss_scale: None
            }
        );
        let mut fresh = model(&cfg, 99);
        state.apply(&mut fresh).unwrap();
        assert_eq!(
            (fresh.params(), fresh.momentum(), fresh.running_stats()),
            (m.params(), m.momentum(), m.running_stats())
        );
        assert_eq!(fresh.steps(), 12345);

        // Exactly the reference names, the momentum and one counter per BN, with their types.
        let bytes = std::fs::read(&path).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let lay = m.layout();
        let mut expect: Vec<String> = lay.params.iter().chain(&lay.running).map(|t| t.name.clone()).collect();
        expect.extend(lay.params.iter().map(|t| format!("momentum.{}", t.name)));
        let bns: Vec<&str> = bn_prefixes(lay).collect();
        assert_eq!(bns.len(), 3 * 2 + 2 + 1, "two BNs per bottleneck layer, one per transition, the head's");
        expect.extend(bns.iter().map(|b| format!("{b}.num_batches_tracked")));
        let mut names: Vec<String> = st.names().into_iter().map(String::from).collect();
        names.sort();
        expect.sort();
        assert_eq!(names, expect);
        let t = st.tensor("block2.layer.0.bn2.num_batches_tracked").unwrap();
        assert_eq!((t.dtype(), t.shape(), t.data()), (Dtype::I64, &[][..], &12345i64.to_le_bytes()[..]));
        let t = st.tensor("block1.layer.0.conv1.weight").unwrap();
        assert_eq!((t.dtype(), t.shape()), (Dtype::F32, &[16, 8, 1, 1][..]));
        let (_, header) = SafeTensors::read_metadata(&bytes).unwrap();
        let map = header.metadata().clone().unwrap();
        let stored: Value = serde_json::from_str(&map["recipe"]).unwrap();
        assert_eq!(
            stored["network"],
            serde_json::json!({"stem": "cifar", "stem_channels": 8, "growth": 4, "block_layers": [1, 1, 1],
                   "bottleneck": true, "reduction": 0.30000000000000004, "drop_rate": 0.2, "num_classes": 100})
        );
        assert_eq!(
            (stored["dataset"].as_str(), stored["seed"].as_u64(), stored["schema"].as_u64()),
            (Some("cifar100"), Some(7), Some(3))
        );
        assert_eq!((&stored["arch"], &stored["image_size"]), (&Value::Null, &serde_json::json!(32)));
        assert_eq!(stored["bn"], serde_json::json!("sync"));
        assert_eq!((map["format"].as_str(), map["format_version"].as_str()), (FORMAT, "2"));
        assert_eq!(
            (map["epoch"].as_str(), map["best_prec1"].as_str(), map["memory"].as_str()),
            ("17", "42.125", "minimal")
        );
    }

    /// A format-1 checkpoint (network, data set and seed, no recipe) still loads, as what it
    /// records.
    #[test]
    fn format_1_checkpoints_still_load() {
        let m = scrambled(&cfg());
        let mut meta = Meta::of(&m, &recipe(&m, Dataset::Cifar10), 5, 12.5);
        (meta.recorded, meta.memory) = (Recorded::Partial { config: cfg(), dataset: Dataset::Cifar10, seed: 7 }, None);
        let map = meta.to_map();
        assert_eq!(map["format_version"], "1");
        assert!(map.contains_key("network") && !map.contains_key("recipe") && !map.contains_key("memory"));
        let bytes = encode(&m, &meta).unwrap();
        let ck = Checkpoint::from_bytes(Path::new("old.safetensors"), bytes).unwrap();
        assert_eq!(ck.meta(), &meta);
        assert_eq!(
            (ck.meta().config(), ck.meta().dataset(), ck.meta().seed(), ck.meta().recipe()),
            (&cfg(), Dataset::Cifar10, 7, None)
        );
        assert_eq!(ck.state().unwrap().params, m.params());
    }

    #[test]
    fn imagenet_networks_round_trip_with_the_stem_bn() {
        let mut cfg = NetConfig::imagenet("densenet121").unwrap();
        (cfg.growth, cfg.stem_channels, cfg.block_layers, cfg.num_classes) = (4, 8, vec![1, 1, 1, 1], 10);
        let m = Model::new(cfg.clone(), 2, 32, 32, Mode::Minimal, 1, CpuBackend::new()).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.safetensors");
        write_atomic(&path, &encode(&m, &Meta::of(&m, &recipe(&m, Dataset::Cifar10), 1, 0.0)).unwrap()).unwrap();
        let ck = Checkpoint::read(&path).unwrap();
        assert_eq!(ck.meta().config(), &cfg);
        assert_eq!(ck.state().unwrap().params, m.params());
        let bytes = std::fs::read(&path).unwrap();
        assert!(SafeTensors::deserialize(&bytes).unwrap().tensor("bn0.num_batches_tracked").is_ok());
    }

    #[test]
    fn init_weights_take_the_model_tensors_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        let m = scrambled(&cfg());
        write_atomic(&path, &encode(&m, &Meta::of(&m, &recipe(&m, Dataset::Cifar10), 3, 50.0)).unwrap()).unwrap();
        // Another dropout rate is the same tensors.
        let cfg = NetConfig { drop_rate: 0.0, ..cfg() };
        let state = read_weights(&path, &cfg, 5).unwrap().state;
        let mut fresh = model(&cfg, 5);
        state.apply(&mut fresh).unwrap();
        assert_eq!((fresh.params(), fresh.running_stats()), (m.params(), m.running_stats()));
        assert!(fresh.momentum().iter().all(|&v| v == 0.0));
        assert_eq!(fresh.steps(), 0);

        let other = NetConfig::cifar(10, 6, true, 0.5, 0.0, 10).unwrap();
        let e = read_weights(&path, &other, 5).unwrap_err().0;
        assert!(
            e.contains("tensor 'conv1.weight' has shape [8, 3, 3, 3]; expected [12, 3, 3, 3] for DenseNet-BC-10-6 (the file holds DenseNet-BC-10-4)"),
            "{e}"
        );
    }

    #[test]
    fn a_step_then_a_restore_continues_identically() {
        // The state of a model after a step, restored into a fresh one, steps identically.
        let cfg = cfg();
        let sgd = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true };
        let (images, labels): (Vec<f32>, Vec<u32>) = (random(11, 2 * 3 * 64), vec![3, 7]);
        let mut a = model(&cfg, 4);
        a.train_step(&images, &labels, sgd).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        write_atomic(&path, &encode(&a, &Meta::of(&a, &recipe(&a, Dataset::Cifar10), 1, 0.0)).unwrap()).unwrap();
        let mut b = model(&cfg, 4);
        Checkpoint::read(&path).unwrap().state().unwrap().apply(&mut b).unwrap();
        a.train_step(&images, &labels, sgd).unwrap();
        b.train_step(&images, &labels, sgd).unwrap();
        assert_eq!((a.params(), a.momentum(), a.running_stats()), (b.params(), b.momentum(), b.running_stats()));
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_nothing_behind() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f.safetensors");
        write_atomic(&path, b"old").unwrap();
        write_atomic(&path, b"new contents").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"new contents");
        // A target that cannot be replaced (a non-empty directory): an error, and no temp file.
        let blocked = dir.path().join("blocked");
        std::fs::create_dir(&blocked).unwrap();
        std::fs::write(blocked.join("inside"), b"x").unwrap();
        let e = write_atomic(&blocked, b"data").unwrap_err().0;
        assert!(e.starts_with(&format!("cannot write {}: ", blocked.display())), "{e}");
        let mut names: Vec<String> =
            std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
        names.sort();
        assert_eq!(names, ["blocked", "f.safetensors"]);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_ne!(mode & 0o044, 0, "readable beyond the owner as usual (mode {mode:o})");
        }
    }

    #[test]
    fn metadata_errors_say_what_is_wrong() {
        let m = model(&cfg(), 1);
        let good = Meta::of(&m, &recipe(&m, Dataset::Cifar10), 1, 10.0).to_map();
        let old = Meta {
            recorded: Recorded::Partial { config: cfg(), dataset: Dataset::Cifar10, seed: 1 },
            ..Meta::from_map(&good).unwrap()
        }
        .to_map();
        let broken = |map: &HashMap<String, String>, key: &str, value: Option<&str>| {
            let mut map = map.clone();
            match value {
                Some(v) => map.insert(key.into(), v.into()),
                None => map.remove(key),
            };
            Meta::from_map(&map).unwrap_err().0
        };
        assert!(broken(&good, "format", None).contains("not a densenet checkpoint"));
        assert!(broken(&good, "format_version", Some("3")).contains("version 3; this build reads versions 1 to 2"));
        assert!(broken(&good, "epoch", Some("-1")).contains("'epoch' is not valid"));
        assert!(broken(&good, "steps", None).contains("no 'steps'"));
        assert!(broken(&good, "best_prec1", Some("120")).contains("not a percentage"));
        assert!(broken(&good, "memory", Some("lots")).contains("'memory' is not valid"));
        assert!(broken(&good, "recipe", None).contains("no 'recipe'"));
        let e = broken(&good, "recipe", Some(&good["recipe"].replace("\"cifar10\"", "\"mnist\"")));
        assert!(e.contains("'recipe' is not valid: unknown dataset 'mnist' (cifar10, cifar100)"), "{e}");
        assert!(broken(&old, "dataset", Some("cifar100")).contains("predicts 10 classes; CIFAR-100 has 100"));
        assert!(broken(&good, "recipe", Some("[1")).contains("'recipe' is not valid"));
        assert!(broken(&old, "dataset", Some("mnist")).contains("unknown dataset 'mnist'"));
        let e = broken(&old, "network", Some("{\"stem\": \"cifar\"}"));
        assert!(e.contains("'network' is not valid (missing field"), "{e}");
        assert!(broken(&old, "network", Some("[1")).contains("'network' is not valid"));
        assert_eq!(Meta::from_map(&good).unwrap().config(), &cfg());
        assert_eq!(Meta::from_map(&old).unwrap().config(), &cfg());
    }

    #[test]
    fn metadata_describing_a_huge_network_is_an_error_not_an_allocation() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(CHECKPOINT);
        let m = model(&cfg(), 1);
        let mut huge = recipe(&m, Dataset::Cifar10);
        huge.network = NetConfig { growth: 1024, block_layers: vec![600; 3], ..cfg() };
        let meta = Meta { recorded: Recorded::Whole(huge), ..Meta::of(&m, &recipe(&m, Dataset::Cifar10), 1, 10.0) };
        // The tensors are the small network's; the metadata claims a huge one.
        let bytes = encode(&m, &Meta::of(&m, &recipe(&m, Dataset::Cifar10), 1, 10.0)).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let tensors: Vec<(String, TensorView)> = st.tensors();
        let forged = safetensors::serialize(tensors, Some(meta.to_map())).unwrap();
        write_atomic(&path, &forged).unwrap();
        let e = Checkpoint::read(&path).unwrap().state().unwrap_err();
        assert!(e.0.contains("too small for the") && e.0.contains("damaged"), "{e}");
    }

    #[test]
    fn creating_a_saver_removes_unfinished_writes() {
        let dir = tempfile::tempdir().unwrap();
        let leftover = dir.path().join(format!(".{CHECKPOINT}.x1y2.tmp"));
        let kept = dir.path().join("notes.tmp");
        std::fs::write(&leftover, b"partial").unwrap();
        std::fs::write(&kept, b"mine").unwrap();
        let m = model(&cfg(), 1);
        Saver::create(dir.path(), recipe(&m, Dataset::Cifar10), None).unwrap();
        assert!(!leftover.exists(), "the unfinished write is removed");
        assert!(kept.exists(), "other files are left alone");
    }
}

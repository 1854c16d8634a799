//! The model: forward and backward passes written once against [`Backend`], over the arena
//! laid out by [`plan::Plan`]. Each piece's forward sits beside its backward.
//!
//! Batch statistics of a block's channels are computed once, when the channels are written,
//! and reused by every later BN that reads them. Running statistics are updated once per step,
//! in forward; recomputation in backward reuses the saved batch statistics.

pub mod audit;
pub mod floor;
pub mod names;
pub mod net;
pub mod params;
mod place;
pub mod plan;

use crate::backend::{Affine, Backend, Bn, Collective, ConvSpec, LossScale, Moments, Sgd, Span, View};
use crate::comm::{self, BnMode, Group};
use crate::config::{NetConfig, Precision};
use crate::input::{Input, CHANNELS};
use crate::{bail, rng, Result};
use net::{Layer, Net, Transition};
use params::{BnParams, ParamLayout};
use plan::{BottleneckPlan, HeadPlan, LayerPlan, Mode, Order, Plan, TransitionPlan, RESULT_LEN};

/// BN running-statistics momentum (the reference's).
pub const BN_MOMENTUM: f32 = 0.1;

/// Loss and accuracy of one batch.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// Mean cross-entropy over the batch.
    pub loss: f32,
    /// Images whose top-1 prediction equals the label.
    pub correct: usize,
    /// Images in the batch.
    pub n: usize,
    /// fp16 loss scaling found a gradient that is not finite: the step's update was skipped
    /// and the scale halved ([`LossScale`]). Always false in f32 and bf16.
    pub overflow: bool,
}

/// A DenseNet with its planned arena on a backend.
pub struct Model<B: Backend> {
    cfg: NetConfig,
    net: Net,
    plan: Plan,
    be: B,
    seed: u64,
    steps: u64,
    h: usize,
    w: usize,
    /// The SGD settings last written to the arena (written again only when they change: a
    /// copy to a device waits for it).
    sgd: Option<Sgd>,
    /// The data-parallel job (rank 0 of 1 alone) and this rank's share of the current batch.
    job: Job,
}

/// A rank's view of its data-parallel job ([`crate::comm`]).
#[derive(Clone, Copy, Debug)]
struct Job {
    /// This rank and the job's size (the backend's [`Backend::group`]; [`Group::SOLO`] alone).
    group: Group,
    /// Whether the backend joined a job (of one rank or more): the steps issue collectives.
    joined: bool,
    /// How BN treats the shards.
    bn: BnMode,
    /// Images in the current global batch.
    total: usize,
    /// This rank's first image of it.
    first: usize,
}

/// The elements of the head's result that `softmax_xent` writes: the batch's mean loss, then
/// its top-1 correct count.
const LOSS: usize = 0;
/// See [`LOSS`].
const CORRECT: usize = 1;
/// The element of the head's result that SGD's update sets when a value is not finite.
const SGD_FLAG: usize = 2;
/// The element of the head's result that the running-statistics update sets likewise.
const RUNNING_FLAG: usize = 3;
/// The first element of the head's result that is the loss scaler: its `found`.
const FOUND: usize = 4;

/// Whether a pass trains (batch statistics, dropout) or evaluates (running statistics).
#[derive(Clone, Copy, PartialEq, Eq)]
enum Pass {
    Train,
    Eval,
}

impl<B: Backend> Model<B> {
    /// Builds the network, plans its memory for batches of up to `batch` images of `h` x `w`
    /// (stored images may be smaller by a whole factor: [`Input::Stored`]), allocates the arena
    /// on `be` and initializes the parameters from `seed`.
    pub fn new(cfg: NetConfig, batch: usize, h: usize, w: usize, mode: Mode, seed: u64, mut be: B) -> Result<Self> {
        cfg.validate()?;
        let net = Net::new(&cfg);
        // A rank plans for its share of the global batch: the first shard is the longest.
        let world = be.group().map_or(1, |g| g.world);
        let batch = comm::shard(batch, world, 0).len().max(1);
        let plan = Plan::new(&cfg, &net, batch, h, w, mode, |convs| be.workspace_len(convs, CHANNELS * h * w, batch))?
            .for_job(be.group().is_some().then_some(world), &net);
        let mut m = Model::on_plan(cfg, net, plan, h, w, seed, be)?;
        let lay = &m.net.layout;
        // One tensor at a time: the host never holds more than the largest tensor.
        for (tensors, base) in [(&lay.params, m.plan.params), (&lay.running, m.plan.running)] {
            for (i, t) in tensors.iter().enumerate() {
                m.be.write(base.at(t.off, t.len()), &ParamLayout::initial_tensor(t, i, seed));
            }
        }
        m.be.take_error()?;
        Ok(m)
    }

    /// The model of `cfg` (built as `net`) on `plan`, its arena allocated on `be`; parameters
    /// not yet initialized.
    fn on_plan(cfg: NetConfig, net: Net, plan: Plan, h: usize, w: usize, seed: u64, mut be: B) -> Result<Self> {
        if !be.stores(cfg.precision.storage()) {
            bail!("{} storage is not available on the {} (docs/precision.md)", cfg.precision, be.describe());
        }
        be.allocate(plan.len, plan.workspace, plan.batch)?;
        be.write(plan.head.scaler, &LossScale::INITIAL.floats());
        let (joined, group) = (be.group().is_some(), be.group().unwrap_or(Group::SOLO));
        let job = Job { group, joined, bn: BnMode::Sync, total: 0, first: 0 };
        Ok(Model { cfg, net, plan, be, seed, steps: 0, h, w, sgd: None, job })
    }

    /// The network description.
    pub fn config(&self) -> &NetConfig {
        &self.cfg
    }

    /// The memory plan.
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    /// Parameter names, shapes and offsets.
    pub fn layout(&self) -> &ParamLayout {
        &self.net.layout
    }

    /// The backend.
    pub fn backend(&self) -> &B {
        &self.be
    }

    /// The seed of the initialization and of the dropout masks.
    pub fn seed(&self) -> u64 {
        self.seed
    }

    /// Training steps taken (also each BN's `num_batches_tracked`).
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Sets the step counter (restoring a checkpoint).
    pub fn set_steps(&mut self, steps: u64) {
        self.steps = steps;
    }

    /// How batch norm treats the shards of a data-parallel job ([`BnMode::Sync`] unless set).
    pub fn set_bn_mode(&mut self, bn: BnMode) {
        self.job.bn = bn;
    }

    /// Makes every rank's running statistics rank 0's (in a job with [`BnMode::Local`], where
    /// each rank's follow its own shards): before an evaluation, so that every rank evaluates
    /// the network rank 0 saves.
    pub fn share_running_stats(&mut self) -> Result<()> {
        if self.job.joined && self.job.bn == BnMode::Local {
            self.be.collective(Collective::Broadcast(self.plan.running));
        }
        self.be.take_error()
    }

    /// Whether batch statistics and their backward sums span the job's ranks.
    fn sync_bn(&self) -> bool {
        self.job.joined && self.job.bn == BnMode::Sync
    }

    /// Values per channel a BN's statistics count for `x` (this rank's images): the whole
    /// batch's with synchronized BN.
    fn count(&self, x: View) -> usize {
        match self.sync_bn() {
            true => self.job.total * x.hw(),
            false => x.n * x.hw(),
        }
    }

    /// Whether the steps scale the loss: fp16 storage ([`LossScale`]).
    fn scales_loss(&self) -> bool {
        self.cfg.precision == Precision::Fp16
    }

    /// The loss scaler's state, in fp16 (`None` otherwise).
    pub fn loss_scale(&self) -> Option<LossScale> {
        if !self.scales_loss() {
            return None;
        }
        let mut f = [0.0; LossScale::LEN];
        self.be.read_into(self.plan.head.scaler, &mut f);
        Some(LossScale::from_floats(f).0)
    }

    /// Sets the loss scaler's state (restoring a checkpoint); an error outside fp16.
    pub fn set_loss_scale(&mut self, state: LossScale) -> Result<()> {
        if !self.scales_loss() {
            bail!("{} training has no loss scale (fp16 has)", self.cfg.precision);
        }
        self.be.write(self.plan.head.scaler, &state.floats());
        self.be.take_error()
    }

    /// The flat parameter buffer.
    pub fn params(&self) -> Vec<f32> {
        self.be.read(self.plan.params)
    }

    /// The flat gradient buffer (of the last backward pass).
    pub fn grads(&self) -> Vec<f32> {
        self.be.read(self.plan.grads)
    }

    /// The flat momentum buffer.
    pub fn momentum(&self) -> Vec<f32> {
        self.be.read(self.plan.momentum)
    }

    /// The flat BN running-statistics buffer.
    pub fn running_stats(&self) -> Vec<f32> {
        self.be.read(self.plan.running)
    }

    /// Logits of the last forward pass, [n, classes].
    pub fn logits(&self, n: usize) -> Vec<f32> {
        self.be.read(self.plan.head.logits.rows(n).data)
    }

    /// Overwrites the parameter, momentum and running-statistics buffers (each whole).
    pub fn load(&mut self, params: &[f32], momentum: &[f32], running: &[f32]) -> Result<()> {
        let lay = &self.net.layout;
        if params.len() != lay.len || momentum.len() != lay.len || running.len() != lay.running_len {
            bail!(
                "state sizes {}/{}/{} do not match the network's {}/{}/{}",
                params.len(),
                momentum.len(),
                running.len(),
                lay.len,
                lay.len,
                lay.running_len
            );
        }
        self.be.write(self.plan.params, params);
        self.be.write(self.plan.momentum, momentum);
        self.be.write(self.plan.running, running);
        self.be.take_error()
    }

    /// Finds a parameter or running statistic by reference name: its span of the arena.
    fn find(&self, name: &str) -> Option<Span> {
        let lay = &self.net.layout;
        let p = lay.params.iter().find(|t| t.name == name).map(|t| self.plan.params.at(t.off, t.len()));
        p.or_else(|| lay.running.iter().find(|t| t.name == name).map(|t| self.plan.running.at(t.off, t.len())))
    }

    /// One parameter or running statistic by reference name.
    pub fn tensor(&self, name: &str) -> Option<Vec<f32>> {
        Some(self.be.read(self.find(name)?))
    }

    /// Overwrites one parameter or running statistic by reference name.
    pub fn set_tensor(&mut self, name: &str, data: &[f32]) -> Result<()> {
        let Some(span) = self.find(name) else { bail!("the network has no tensor '{name}'") };
        if data.len() != span.len {
            bail!("tensor '{name}' has {} values; the network expects {}", data.len(), span.len);
        }
        self.be.write(span, data);
        self.be.take_error()
    }

    /// Forward, loss, backward and one SGD step on a batch of normalized images
    /// [n, 3, h, w] with labels.
    pub fn train_step(&mut self, images: &[f32], labels: &[u32], sgd: Sgd) -> Result<StepStats> {
        self.step(Input::Floats(images), labels, Some(sgd))
    }

    /// [`Model::train_step`] on images in either [`Input`] form.
    pub fn train_step_on(&mut self, input: Input, labels: &[u32], sgd: Sgd) -> Result<StepStats> {
        self.step(input, labels, Some(sgd))
    }

    /// Forward, loss and backward (gradients in [`Model::grads`]); updates running statistics
    /// and the step counter, not the parameters.
    pub fn forward_backward(&mut self, images: &[f32], labels: &[u32]) -> Result<StepStats> {
        self.step(Input::Floats(images), labels, None)
    }

    /// A training step, with the SGD update if `sgd` is given. Without dropout (whose masks
    /// change every step) the backend may record the step once per batch size and
    /// hyper-parameters and replay it ([`Backend::step_begin`]: a CUDA graph).
    fn step(&mut self, images: Input, labels: &[u32], sgd: Option<Sgd>) -> Result<StepStats> {
        let Group { rank, world } = self.job.group;
        if world > 1 && labels.len() < world {
            bail!(
                "a batch of {} images leaves rank {} of {world} without one (each rank needs one)",
                labels.len(),
                world - 1
            );
        }
        // The smallest feature map is the last block's; training BN needs two values per channel
        // (over the batch with synchronized BN, else over the smallest shard).
        let hw = self.plan.head.input.hw();
        let least = if self.sync_bn() { labels.len() } else { comm::shard(labels.len(), world, world - 1).len() };
        if least * hw < 2 {
            bail!("training needs at least 2 values per channel for batch statistics: {least} image(s) of a {hw}-pixel final map");
        }
        let shard = comm::shard(labels.len(), world, rank);
        self.job.total = labels.len();
        self.job.first = shard.start;
        let n = self.load_batch(images.images(shard.clone(), labels.len()), &labels[shard])?;
        if let Some(settings) = sgd.filter(|&s| self.sgd != Some(s)) {
            self.be.write(self.plan.head.sgd, &settings.floats());
            self.sgd = Some(settings);
        }
        let key = (self.cfg.drop_rate == 0.0).then(|| step_key(self.job.total, sgd.is_some()));
        if !key.is_some_and(|k| self.be.step_begin(k)) {
            self.train_ops(n, sgd.is_some());
            if let Some(k) = key {
                self.be.step_end(k);
            }
        }
        self.steps += 1;
        self.result(self.job.total)
    }

    /// The ops of a training step on `n` loaded images: forward, backward and, with `update`,
    /// the SGD update.
    /// With loss scaling, the weight gradients are unscaled, and the update is skipped (the
    /// scale halved) when one is not finite.
    fn train_ops(&mut self, n: usize, update: bool) {
        self.forward(n, Pass::Train);
        self.backward(n);
        let (p, scales) = (&self.plan, self.scales_loss());
        if self.job.joined {
            self.be.collective(Collective::AllReduce { src: p.grads, dst: p.grads });
        }
        if scales {
            self.be.unscale_grads(p.grads, p.head.scaler);
        }
        if update {
            let (skip, flag) = (p.head.scaler.at(0, 1), p.head.result.at(SGD_FLAG, 1));
            self.be.sgd(p.params, p.grads, p.momentum, p.head.sgd, skip, flag);
            if scales {
                self.be.update_scale(p.head.scaler);
            }
        }
        self.share_result();
    }

    /// In a data-parallel job, the batch's loss and correct count (each rank's share: its sum
    /// over the global batch's size) summed over the ranks, and the non-finite flags set on
    /// any rank set on every one.
    fn share_result(&mut self) {
        if self.job.joined {
            let r = self.plan.head.result.at(LOSS, RUNNING_FLAG + 1);
            self.be.collective(Collective::AllReduce { src: r, dst: r });
        }
    }

    /// Loss and top-1 correct count of a batch in evaluation mode (running statistics, no
    /// dropout); changes no state.
    pub fn evaluate(&mut self, images: &[f32], labels: &[u32]) -> Result<StepStats> {
        self.evaluate_on(Input::Floats(images), labels)
    }

    /// [`Model::evaluate`] on images in either [`Input`] form.
    pub fn evaluate_on(&mut self, images: Input, labels: &[u32]) -> Result<StepStats> {
        let Group { rank, world } = self.job.group;
        if labels.is_empty() {
            bail!("a batch of no images");
        }
        let shard = comm::shard(labels.len(), world, rank);
        (self.job.total, self.job.first) = (labels.len(), shard.start);
        if shard.is_empty() {
            // A batch smaller than the job: this rank's share of the sums is nothing.
            self.be.write(self.plan.head.result.at(LOSS, 2), &[0.0; 2]);
        } else {
            let n = self.load_batch(images.images(shard.clone(), labels.len()), &labels[shard])?;
            self.forward(n, Pass::Eval);
        }
        self.share_result();
        self.result(labels.len())
    }

    fn load_batch(&mut self, images: Input, labels: &[u32]) -> Result<usize> {
        let n = labels.len();
        if n == 0 || n > self.plan.batch {
            bail!("batch of {n} images; the plan holds 1 to {}", self.plan.batch);
        }
        let (len, what, h, w) = match images {
            Input::Floats(f) => (f.len(), "floats", self.h, self.w),
            Input::Stored { bytes, h, w, crops, .. } => {
                if crops.len() != n {
                    bail!("{} crop windows for {n} labels", crops.len());
                }
                // The model's size is s times theirs, s a whole number (and so at least 1).
                if h == 0 || !self.h.is_multiple_of(h) || self.h / h * w != self.w {
                    bail!(
                        "stored images of {h} x {w} do not upsample by a whole factor to the model's {} x {}",
                        self.h,
                        self.w
                    );
                }
                (bytes.len(), "bytes", h, w)
            }
        };
        let per = CHANNELS * h * w;
        if len != n * per {
            bail!("{len} {what} of images for {n} labels; expected {} ({n} x 3 x {h} x {w})", n * per);
        }
        if let Some(&l) = labels.iter().find(|&&l| l as usize >= self.cfg.num_classes) {
            bail!("label {l} out of range for {} classes", self.cfg.num_classes);
        }
        match images {
            Input::Floats(f) => self.be.write(self.plan.image.batch(n).span(), f),
            Input::Stored { bytes, h, crops, norm, .. } => {
                self.be.augment(bytes, crops, norm, self.h / h, self.plan.image.batch(n))
            }
        }
        self.be.set_labels(labels);
        Ok(n)
    }

    /// The batch's loss and correct count, after every error of the batch's ops; an error when
    /// a step so far left a parameter, momentum or running statistic that is not finite (the
    /// flags SGD and the running-statistics update set, read with the loss), naming it.
    fn result(&self, n: usize) -> Result<StepStats> {
        let mut r = [0.0; RESULT_LEN];
        self.be.read_into(self.plan.head.result, &mut r);
        self.be.take_error()?;
        if r[SGD_FLAG] != 0.0 || r[RUNNING_FLAG] != 0.0 {
            bail!("training stopped at step {}: {}", self.steps, self.non_finite());
        }
        let overflow = self.scales_loss() && r[FOUND] != 0.0;
        Ok(StepStats { loss: r[LOSS], correct: r[CORRECT] as usize, n, overflow })
    }

    /// Where the first value that is not finite is: the tensor (of the parameters, momentum or
    /// running statistics), its element and value.
    fn non_finite(&self) -> String {
        let lay = &self.net.layout;
        let buffers = [
            ("parameter", self.params(), &lay.params),
            ("momentum of", self.momentum(), &lay.params),
            ("running statistic", self.running_stats(), &lay.running),
        ];
        for (what, values, tensors) in &buffers {
            for t in tensors.iter() {
                if let Some(i) = values[t.off..t.off + t.len()].iter().position(|v| !v.is_finite()) {
                    return format!("{what} {} holds {} at element {i}", t.name, values[t.off + i]);
                }
            }
        }
        "a value that is not finite was flagged, but none is left".into()
    }

    /// Stream key of dropout site `site` in the current step.
    fn drop_key(&self, site: u64) -> u64 {
        rng::derive(rng::derive(self.seed, self.steps), site)
    }

    fn drop(&mut self, v: View, site: u64) {
        self.drop_images(v, site, 0);
    }

    /// Dropout of `v`, images `[first, first + v.n)` of this rank's part of the site's tensor:
    /// the masks are those of the whole tensor, however it is split into chunks of images.
    /// The masks are keyed by the image's place in the global batch, so a step's are the same
    /// on any number of ranks.
    fn drop_images(&mut self, v: View, site: u64, first: usize) {
        if self.cfg.drop_rate > 0.0 {
            let key = rng::skip(self.drop_key(site), ((self.job.first + first) * v.c * v.hw()) as u64);
            self.be.dropout(v, self.cfg.drop_rate, key);
        }
    }

    /// A BN's running statistics.
    fn running(&self, p: &BnParams) -> Moments {
        let s = self.plan.running;
        Moments { mean: s.at(p.running_mean, p.c), var: s.at(p.running_var, p.c) }
    }

    /// A BN's affine parameters in `buffer` (the parameters, or their gradients).
    fn affine(p: &BnParams, buffer: Span) -> Affine {
        Affine { gamma: buffer.at(p.gamma, p.c), beta: buffer.at(p.beta, p.c) }
    }

    /// BN operands: batch statistics when training, the layer's running statistics otherwise.
    fn bn(&self, p: &BnParams, batch: Moments, pass: Pass) -> Bn {
        let stats = match pass {
            Pass::Train => batch,
            Pass::Eval => self.running(p),
        };
        Bn { stats, affine: Self::affine(p, self.plan.params) }
    }

    /// Folds this step's batch statistics into the layer's running statistics (once per step).
    fn update_running(&mut self, p: &BnParams, batch: Moments, count: usize) {
        let flag = self.plan.head.result.at(RUNNING_FLAG, 1);
        self.be.bn_update_running(batch, self.running(p), count, BN_MOMENTUM, flag);
    }

    /// `relu(bn(x)) -> y`, updating running statistics when training and not recomputing.
    fn bn_relu(&mut self, p: &BnParams, batch: Moments, x: View, y: View, pass: Pass) {
        if pass == Pass::Train {
            self.update_running(p, batch, self.count(x));
        }
        let bn = self.bn(p, batch, pass);
        self.be.bn_relu(x, bn, y);
    }

    /// Backward of `relu(bn(x))` into `dx` (accumulated or in place), writing the BN's
    /// parameter gradients.
    /// With synchronized BN, the sums it needs are the whole batch's: this rank's, all-reduced.
    fn bn_relu_backward(&mut self, p: &BnParams, batch: Moments, g: View, x: View, dx: View, accumulate: bool) {
        let (bn, grad) = (self.bn(p, batch, Pass::Train), Self::affine(p, self.plan.grads));
        match self.collectives(2 * x.c) {
            Some((mine, all)) if self.sync_bn() => {
                self.be.bn_relu_backward_sums(g, x, bn, grad, mine);
                let sums = all.at(0, 2 * x.c);
                self.be.collective(Collective::AllReduce { src: mine, dst: sums });
                self.be.bn_relu_backward_data(g, x, bn, (sums, self.count(x)), dx, accumulate);
            }
            _ => self.be.bn_relu_backward(g, x, bn, grad, dx, accumulate),
        }
    }

    /// Per-channel batch statistics of `x` into `out`: with synchronized BN, the whole batch's,
    /// from every rank's (all-gathered and combined).
    fn stats(&mut self, x: View, out: Moments) {
        let world = self.job.group.world;
        match self.collectives(2 * x.c) {
            Some((mine, all)) if self.sync_bn() => {
                self.be.bn_stats(x, Moments { mean: mine.at(0, x.c), var: mine.at(x.c, x.c) });
                let parts = all.at(0, world * 2 * x.c);
                self.be.collective(Collective::AllGather { src: mine, dst: parts });
                self.be.bn_stats_combine(parts, self.job.total, x.hw(), out);
            }
            _ => self.be.bn_stats(x, out),
        }
    }

    /// The collectives' scratch ([`Plan::for_job`]): this rank's `len` floats, and the rest.
    fn collectives(&self, len: usize) -> Option<(Span, Span)> {
        let s = self.plan.collectives?;
        let mine = s.len / (self.job.group.world + 1);
        Some((s.at(0, len), s.at(mine, s.len - mine)))
    }

    /// `y = conv(pre(x), w)` (`pre`: a BN-ReLU fused into the convolution's input; `w`: the
    /// weight's offset in the parameter layout).
    fn conv(&mut self, x: View, pre: Option<Bn>, w: usize, y: View, spec: ConvSpec) {
        let w = self.plan.params.at(w, y.c * x.c * spec.k * spec.k);
        self.be.conv_forward(x, pre, w, y, spec);
    }

    /// Weight gradient for the input `pre(x)`, then (if `gx` is given) the data gradient
    /// (with respect to `pre(x)`).
    fn conv_backward(&mut self, x: View, pre: Option<Bn>, gy: View, w: usize, gx: Option<View>, spec: ConvSpec) {
        let len = gy.c * x.c * spec.k * spec.k;
        self.be.conv_backward_filter(x, pre, gy, self.plan.grads.at(w, len), spec, false);
        if let Some(gx) = gx {
            self.be.conv_backward_data(gy, self.plan.params.at(w, len), gx, spec);
        }
    }

    /// The input of a convolution that follows a BN-ReLU of `x`: in `naive` the BN-ReLU output
    /// `kept` (written in forward), otherwise `x` with the BN-ReLU fused into the convolution.
    fn bn_relu_input(&self, p: &BnParams, batch: Moments, x: View, kept: View, pass: Pass) -> (View, Option<Bn>) {
        if self.plan.mode.keeps_bn_outputs() {
            (kept, None)
        } else {
            (x, Some(self.bn(p, batch, pass)))
        }
    }

    /// Forward BN-ReLU before a convolution: updates running statistics when training and,
    /// in `naive`, writes the output it keeps. Returns the convolution's input.
    fn bn_relu_forward(&mut self, p: &BnParams, batch: Moments, x: View, kept: View, pass: Pass) -> (View, Option<Bn>) {
        if self.plan.mode.keeps_bn_outputs() {
            self.bn_relu(p, batch, x, kept, pass);
        } else if pass == Pass::Train {
            self.update_running(p, batch, self.count(x));
        }
        self.bn_relu_input(p, batch, x, kept, pass)
    }

    fn forward(&mut self, n: usize, pass: Pass) {
        let train = pass == Pass::Train;
        self.stem_forward(n, pass);
        for b in 0..self.plan.layers.len() {
            for i in 0..self.plan.layers[b].len() {
                let (lp, layer) = (self.plan.layers[b][i], self.net.blocks[b][i]);
                self.layer_forward(&lp, &layer, site(b, i), n, pass);
                if train {
                    self.stats(lp.out.batch(n), lp.stats_out);
                }
            }
            if b < self.plan.transitions.len() {
                let (tp, t) = (self.plan.transitions[b], self.net.transitions[b]);
                self.transition_forward(&tp, &t, b, n, pass);
                if train {
                    self.stats(tp.out.batch(n), tp.stats_out);
                }
            }
        }
        let head = self.plan.head;
        self.head_forward(&head, n, pass);
    }

    fn backward(&mut self, n: usize) {
        let head = self.plan.head;
        self.head_backward(&head, n);
        for b in (0..self.plan.layers.len()).rev() {
            if b < self.plan.transitions.len() {
                let (tp, t) = (self.plan.transitions[b], self.net.transitions[b]);
                self.transition_backward(&tp, &t, b, n);
            }
            for i in (0..self.plan.layers[b].len()).rev() {
                let (lp, layer) = (self.plan.layers[b][i], self.net.blocks[b][i]);
                self.layer_backward(&lp, &layer, site(b, i), n);
            }
        }
        self.stem_backward(n);
    }

    // ---- stem -------------------------------------------------------------------------------

    fn stem_forward(&mut self, n: usize, pass: Pass) {
        let sp = self.plan.stem;
        let image = self.plan.image.batch(n);
        match (sp.pool, self.net.stem_bn) {
            (None, _) => self.conv(image, None, self.net.stem_conv, sp.conv_out.batch(n), ConvSpec::SAME3),
            (Some((stats, a, _)), Some(bn)) => {
                let s = sp.conv_out.batch(n);
                self.conv(image, None, self.net.stem_conv, s, ConvSpec::STEM7);
                if pass == Pass::Train {
                    self.stats(s, stats);
                }
                let (x, pre) = self.bn_relu_forward(&bn, stats, s, a.batch(n), pass);
                self.be.max_pool3(x, pre, sp.out.batch(n));
            }
            _ => unreachable!("ImageNet stem without BN"),
        }
        if pass == Pass::Train {
            self.stats(sp.out.batch(n), sp.stats_out);
        }
    }

    fn stem_backward(&mut self, n: usize) {
        let sp = self.plan.stem;
        let image = self.plan.image.batch(n);
        match (sp.pool, self.net.stem_bn) {
            (None, _) => self.conv_backward(image, None, sp.g_out.batch(n), self.net.stem_conv, None, ConvSpec::SAME3),
            (Some((stats, a, g)), Some(bn)) => {
                let (s, g) = (sp.conv_out.batch(n), g.batch(n));
                if !self.plan.mode.keeps_z() {
                    self.conv(image, None, self.net.stem_conv, s, ConvSpec::STEM7);
                }
                let (x, pre) = self.bn_relu_input(&bn, stats, s, a.batch(n), Pass::Train);
                self.be.max_pool3_backward(x, pre, sp.g_out.batch(n), g);
                self.bn_relu_backward(&bn, stats, g, s, g, false);
                self.conv_backward(image, None, g, self.net.stem_conv, None, ConvSpec::STEM7);
            }
            _ => unreachable!("ImageNet stem without BN"),
        }
    }

    // ---- dense layer ------------------------------------------------------------------------

    /// Forward of one dense layer: its k output channels into the block buffer.
    fn layer_forward(&mut self, lp: &LayerPlan, l: &Layer, site: u64, n: usize, pass: Pass) {
        let input = lp.input.batch(n);
        if lp.input != lp.features {
            self.be.copy(lp.features.batch(n), input);
        }
        let (x1, pre1) = self.bn_relu_forward(&l.bn1, lp.stats_in, input, lp.a1.batch(n), pass);
        let out = lp.out.batch(n);
        match (&l.second, lp.bottleneck) {
            (Some((bn2, conv2)), Some(BottleneckPlan { z, a2, stats: sz })) => {
                let z = z.batch(n);
                self.conv(x1, pre1, l.conv1, z, ConvSpec::POINTWISE);
                if pass == Pass::Train {
                    self.drop(z, site);
                    self.stats(z, sz);
                }
                let (x2, pre2) = self.bn_relu_forward(bn2, sz, z, a2.batch(n), pass);
                self.conv(x2, pre2, *conv2, out, ConvSpec::SAME3);
            }
            (None, None) => self.conv(x1, pre1, l.conv1, out, ConvSpec::SAME3),
            _ => unreachable!("the plan and the network disagree on the bottleneck"),
        }
        if pass == Pass::Train {
            self.drop(out, site + 1);
        }
    }

    /// Backward of one dense layer: weight gradients, and the input gradient accumulated into
    /// the block gradient. The gradient of each intermediate overwrites the intermediate.
    fn layer_backward(&mut self, lp: &LayerPlan, l: &Layer, site: u64, n: usize) {
        let (input, a1, g_out) = (lp.input.batch(n), lp.a1.batch(n), lp.g_out.batch(n));
        let (x1, pre1) = self.bn_relu_input(&l.bn1, lp.stats_in, input, a1, Pass::Train);
        self.drop(g_out, site + 1);
        match (&l.second, lp.bottleneck) {
            (Some((bn2, conv2)), Some(BottleneckPlan { z, a2, stats: sz })) => {
                let (z, a2) = (z.batch(n), a2.batch(n));
                if !self.plan.mode.keeps_z() {
                    self.conv(x1, pre1, l.conv1, z, ConvSpec::POINTWISE);
                    self.drop(z, site);
                }
                let (x2, pre2) = self.bn_relu_input(bn2, sz, z, a2, Pass::Train);
                // g_a2 lands in a2's buffer, then becomes g_z in place.
                self.conv_backward(x2, pre2, g_out, *conv2, Some(a2), ConvSpec::SAME3);
                self.bn_relu_backward(bn2, sz, a2, z, a2, false);
                self.drop(a2, site);
                self.conv_backward(x1, pre1, a2, l.conv1, None, ConvSpec::POINTWISE);
                self.input_backward(lp, l, a2, ConvSpec::POINTWISE, n);
            }
            (None, None) => {
                self.conv_backward(x1, pre1, g_out, l.conv1, None, ConvSpec::SAME3);
                self.input_backward(lp, l, g_out, ConvSpec::SAME3, n);
            }
            _ => unreachable!("the plan and the network disagree on the bottleneck"),
        }
    }

    /// The first convolution's data gradient from `gy` and BN1-ReLU's backward, accumulated
    /// into the block gradient of `[0, C_l)`, [`Plan::chunk`] input channels at a time: each
    /// channel's BN backward needs only its own gradient, so a chunk of `a1`'s gradient is all
    /// that lives at once (in `naive`, over the kept `a1`'s channels). Each chunk uses its
    /// channels of the weight, copied to `weights`.
    fn input_backward(&mut self, lp: &LayerPlan, l: &Layer, gy: View, spec: ConvSpec, n: usize) {
        let (c_in, chunk, kk) = (l.c_in, self.plan.chunk, spec.k * spec.k);
        let (input, g_in, a1) = (lp.input.batch(n), lp.g_in.batch(n), lp.a1.batch(n));
        let w = self.plan.params.at(l.conv1, gy.c * c_in * kk);
        for c0 in (0..c_in).step_by(chunk) {
            let cc = chunk.min(c_in - c0);
            let g = match self.plan.mode.keeps_bn_outputs() {
                true => a1.channels(c0, cc),
                false => a1.channels(0, cc),
            };
            let w = match lp.weights {
                Some(to) => {
                    let part = View::dense(to.off, gy.c, cc, spec.k, spec.k).tagged(to.tag);
                    self.be.copy(View::dense(w.off, gy.c, c_in, spec.k, spec.k).tagged(w.tag).channels(c0, cc), part);
                    part.span()
                }
                None => w,
            };
            self.be.conv_backward_data(gy, w, g, spec);
            let (bn, stats) = (l.bn1.channels(c0, cc), lp.stats_in.channels(c0, cc));
            self.bn_relu_backward(&bn, stats, g, input.channels(c0, cc), g_in.channels(c0, cc), true);
        }
    }

    // ---- transition -------------------------------------------------------------------------

    fn transition_forward(&mut self, tp: &TransitionPlan, t: &Transition, b: usize, n: usize, pass: Pass) {
        let (x, out) = (tp.input.batch(n), tp.out.batch(n));
        match tp.order {
            Order::PoolFirst { pooled } => {
                if pass == Pass::Train {
                    self.update_running(&t.bn, tp.stats_in, self.count(x));
                }
                self.pool_bn_relu(tp, t, pooled.batch(n), n, pass);
                self.conv(pooled.batch(n), None, t.conv, out, ConvSpec::POINTWISE);
            }
            Order::ConvFirst { z, chunks, .. } => {
                let (src, pre) = self.bn_relu_forward(&t.bn, tp.stats_in, x, tp.a.batch(n), pass);
                for (i, m) in image_chunks(n, chunks) {
                    let z = z.batch(m);
                    self.conv(src.images(i, m), pre, t.conv, z, ConvSpec::POINTWISE);
                    if pass == Pass::Train {
                        self.drop_images(z, transition_site(b), i);
                    }
                    self.be.avg_pool2(z, out.images(i, m));
                }
            }
        }
    }

    /// `pooled = pool(relu(bn(x)))` of a transition's input, [`Plan::chunk`] channels at a time
    /// through `a` (in `naive`, the kept `a` whole).
    fn pool_bn_relu(&mut self, tp: &TransitionPlan, t: &Transition, pooled: View, n: usize, pass: Pass) {
        let (x, a, c) = (tp.input.batch(n), tp.a.batch(n), t.c_in);
        let chunk = if self.plan.mode.keeps_bn_outputs() { c } else { self.plan.chunk };
        for c0 in (0..c).step_by(chunk) {
            let cc = chunk.min(c - c0);
            let (bn, stats) = (t.bn.channels(c0, cc), tp.stats_in.channels(c0, cc));
            let y = a.channels(0, cc);
            let bn = self.bn(&bn, stats, pass);
            self.be.bn_relu(x.channels(c0, cc), bn, y);
            self.be.avg_pool2(y, pooled.channels(c0, cc));
        }
    }

    fn transition_backward(&mut self, tp: &TransitionPlan, t: &Transition, b: usize, n: usize) {
        let (x, a, g_in, g_out) = (tp.input.batch(n), tp.a.batch(n), tp.g_in.batch(n), tp.g_out.batch(n));
        match tp.order {
            Order::PoolFirst { pooled } => {
                let pooled = pooled.batch(n);
                if !self.plan.mode.keeps_bn_outputs() {
                    self.pool_bn_relu(tp, t, pooled, n, Pass::Train);
                }
                // The pooled input is dead once the weight gradient is taken: its gradient
                // takes its place, and unpools into the block's gradient (its first write).
                self.conv_backward(pooled, None, g_out, t.conv, Some(pooled), ConvSpec::POINTWISE);
                self.be.avg_pool2_backward(pooled, g_in);
            }
            Order::ConvFirst { z, chunks, g_out: copy } => {
                // A chunk of images at a time: the weight gradient sums over the chunks, and
                // each chunk's data gradient is its images' BN-ReLU gradient.
                let g_out = match copy {
                    Some(to) => {
                        self.be.copy(g_out, to.batch(n));
                        to.batch(n)
                    }
                    None => g_out,
                };
                let (src, pre) = self.bn_relu_input(&t.bn, tp.stats_in, x, a, Pass::Train);
                let len = t.c_out * t.c_in;
                let (w, gw) = (self.plan.params.at(t.conv, len), self.plan.grads.at(t.conv, len));
                for (i, m) in image_chunks(n, chunks) {
                    let z = z.batch(m);
                    self.be.avg_pool2_backward(g_out.images(i, m), z);
                    self.drop_images(z, transition_site(b), i);
                    self.be.conv_backward_filter(src.images(i, m), pre, z, gw, ConvSpec::POINTWISE, i > 0);
                    self.be.conv_backward_data(z, w, g_in.images(i, m), ConvSpec::POINTWISE);
                }
            }
        }
        // The BN-ReLU gradient is in the block's gradient, which it becomes in place.
        self.bn_relu_backward(&t.bn, tp.stats_in, g_in, x, g_in, false);
    }

    // ---- classifier -------------------------------------------------------------------------

    /// The classifier's weight [classes, C] and bias in `buffer` (the parameters, or their
    /// gradients).
    fn classifier(&self, buffer: Span) -> (crate::backend::Matrix, Span) {
        let (c, k) = (self.plan.head.pooled.cols, self.cfg.num_classes);
        (buffer.at(self.net.fc_w, k * c).matrix(k, c), buffer.at(self.net.fc_b, k))
    }

    fn head_forward(&mut self, head: &HeadPlan, n: usize, pass: Pass) {
        let (x, a) = (head.input.batch(n), head.a.batch(n));
        let bn = self.net.head_bn;
        self.bn_relu(&bn, head.stats_in, x, a, pass);
        let (pooled, logits) = (head.pooled.rows(n), head.logits.rows(n));
        self.be.global_avg_pool(a, pooled);
        let (w, b) = self.classifier(self.plan.params);
        self.be.linear(pooled, w, b, logits);
        self.be.softmax_xent(logits, self.job.total, head.result.at(LOSS, 2), head.g_logits.rows(n));
    }

    fn head_backward(&mut self, head: &HeadPlan, n: usize) {
        if self.scales_loss() {
            self.be.scale_loss_grad(head.g_logits.rows(n), head.scaler);
        }
        let (w, _) = self.classifier(self.plan.params);
        let (gw, gb) = self.classifier(self.plan.grads);
        let (pooled, g_pooled) = (head.pooled.rows(n), head.g_pooled.rows(n));
        self.be.linear_backward(pooled, w, head.g_logits.rows(n), g_pooled, gw, gb);
        // Into the last block's gradient, which it then becomes in place.
        let g_in = head.g_in.batch(n);
        self.be.global_avg_pool_backward(g_pooled, g_in);
        let bn = self.net.head_bn;
        self.bn_relu_backward(&bn, head.stats_in, g_in, head.input.batch(n), g_in, false);
    }
}

/// `n` images in `chunks` chunks (fewer when `n` is small) of `ceil(n / chunks)` images, the
/// last one the rest: (first image, images) of each.
fn image_chunks(n: usize, chunks: usize) -> impl Iterator<Item = (usize, usize)> {
    let per = n.div_ceil(chunks);
    (0..n).step_by(per).map(move |i| (i, per.min(n - i)))
}

/// What a recorded step depends on besides the arena (the batch, the labels and the SGD
/// settings are written there before it): the batch size and whether it updates the weights.
fn step_key(n: usize, sgd: bool) -> u64 {
    rng::mix64(n as u64 * 2 + sgd as u64)
}

/// Dropout sites (the streams of the masks, [`Model::drop_key`]): the block's index above bit
/// [`SITE_BLOCK_SHIFT`], below it [`LAYER_SITES`] per dense layer (after each convolution)
/// and the transition's, [`TRANSITION_SITE`], above every layer's.
const SITE_BLOCK_SHIFT: u32 = 32;
/// See [`SITE_BLOCK_SHIFT`].
const LAYER_SITES: u64 = 2;
/// See [`SITE_BLOCK_SHIFT`]: above the sites of [`crate::config::MAX_LAYERS`] layers.
const TRANSITION_SITE: u64 = 0xffff_fff0;

/// The first dropout site of layer `layer` of block `block` (the second is the next).
fn site(block: usize, layer: usize) -> u64 {
    ((block as u64) << SITE_BLOCK_SHIFT) | (LAYER_SITES * layer as u64)
}

/// The dropout site of the transition after block `block`.
fn transition_site(block: usize) -> u64 {
    ((block as u64) << SITE_BLOCK_SHIFT) | TRANSITION_SITE
}

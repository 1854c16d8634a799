//! The memory planner: every buffer of a training step laid out in one arena before the first
//! step, with the offsets every op uses (llm.c style) and the bytes per category.
//!
//! Modes (see `docs/memory.md`):
//! - `naive` keeps what a framework without sharing keeps: a concatenated copy of every layer's
//!   input, and every BN-ReLU output (a1, a2) and bottleneck output (z). Quadratic in depth.
//! - `shared` keeps the block buffers and each bottleneck's z (and an ImageNet stem's
//!   convolution output); BN-ReLU outputs are never stored (the convolutions and the stem's max
//!   pool apply them to their inputs on the fly). Linear in depth.
//! - `minimal` keeps only the block buffers and BN statistics; z and the stem's convolution
//!   output are recomputed in backward. Linear in depth with the smallest constant.
//!
//! Every tensor is a region of its own, and regions never live at the same time share bytes
//! (`place`). Outside `naive`, the views named for BN-ReLU outputs (a1, a2, a) hold their
//! gradients.

use super::net::Net;
use crate::backend::{aligned, ConvShape, ConvSpec, DType, LossScale, Matrix, Moments, Sgd, Span, View};
use crate::config::{BlockGeom, NetConfig, Precision, Stem};
use crate::named::{by_name, Named};
use crate::{bail, Result};

/// Which intermediate tensors are kept between forward and backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Mode {
    /// Keep everything (per-layer concatenation copies, a1, z, a2).
    Naive,
    /// Keep z; recompute BN-ReLU outputs.
    Shared,
    /// Keep only block buffers and statistics; recompute a1, z, a2.
    Minimal,
}

impl Mode {
    /// All modes, most memory first.
    pub const ALL: [Mode; 3] = [Mode::Naive, Mode::Shared, Mode::Minimal];

    /// Whether BN-ReLU outputs (a1, a2, transition and head inputs, stem) are kept.
    pub fn keeps_bn_outputs(self) -> bool {
        self == Mode::Naive
    }

    /// Whether each bottleneck's 1x1 convolution output z (and the ImageNet stem's
    /// convolution output) is kept.
    pub fn keeps_z(self) -> bool {
        self != Mode::Minimal
    }
}

impl Named for Mode {
    const WHAT: &'static str = "memory mode";
    const VALUES: &'static [Mode] = &Mode::ALL;

    fn name(self) -> &'static str {
        match self {
            Mode::Naive => "naive",
            Mode::Shared => "shared",
            Mode::Minimal => "minimal",
        }
    }
}

by_name!(Mode);

/// What a region is for, in the memory report.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Category {
    /// Trainable parameters and BN running statistics.
    Parameters,
    /// Parameter gradients.
    Gradients,
    /// SGD momentum.
    Momentum,
    /// Tensors kept from forward to backward (input batch, block buffers, statistics, and the
    /// mode's kept intermediates) plus the labels.
    Activations,
    /// Tensors that live within a pass or a layer: block gradient buffers, recomputed
    /// tensors and gradients.
    Scratch,
    /// Convolution workspace (im2col columns, per-thread weight-gradient partials).
    Workspace,
}

impl Category {
    /// Every category, in report order.
    pub const ALL: [Category; 6] = [
        Category::Parameters,
        Category::Gradients,
        Category::Momentum,
        Category::Activations,
        Category::Scratch,
        Category::Workspace,
    ];

    /// Lower-case name as used in reports.
    pub fn name(self) -> &'static str {
        match self {
            Category::Parameters => "parameters",
            Category::Gradients => "gradients",
            Category::Momentum => "momentum",
            Category::Activations => "activations",
            Category::Scratch => "scratch",
            Category::Workspace => "workspace",
        }
    }
}

/// One named arena region, [`ALIGN`](crate::backend::ALIGN)ed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// What it holds.
    pub name: String,
    /// Report category.
    pub category: Category,
    /// Byte offset.
    pub off: usize,
    /// Elements.
    pub len: usize,
    /// Element type.
    pub dtype: DType,
    /// The tag of the tensor the region holds.
    pub tag: u32,
    /// Whether it holds what outlasts a step or a pass (parameters, running statistics,
    /// gradients, momentum, the logits, the loss, flags and SGD settings, the workspace): it
    /// shares its bytes with no other region. The others are placed by live range.
    pub lasting: bool,
}

/// A planned tensor: what it is, and the region it lies in. Tag `t` (from 1) of a [`View`] is
/// `Plan::tags[t - 1]`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tag {
    /// What the tensor is ("block1 features", "block2.layer.3 z in scratch: conv outputs").
    pub name: String,
    /// Index of its region in `Plan::regions`.
    pub region: usize,
}

impl Region {
    /// Bytes of its elements (before alignment).
    pub fn bytes(&self) -> usize {
        self.len * self.dtype.size()
    }

    /// One past its last byte.
    pub fn end(&self) -> usize {
        self.off + self.bytes()
    }
}

/// Where one dense layer's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct LayerPlan {
    /// What BN1 reads: the block slice `[0, C_l)`, or in `naive` its concatenated copy.
    pub input: View,
    /// The block slice `[0, C_l)` (source of the copy; gradient target).
    pub features: View,
    /// BN1-ReLU output (kept in `naive`), then its gradient, [`Plan::chunk`] input channels at
    /// a time: in `naive` over the kept output's channels, otherwise in a scratch tensor of one
    /// chunk ([n, min(C_l, chunk), H, W]).
    pub a1: View,
    /// Where a chunk of the first convolution's weight (its input channels) is copied for the
    /// data gradient, when `C_l` exceeds the chunk (else the weight is used whole).
    pub weights: Option<Span>,
    /// The bottleneck's tensors (bottleneck layers only).
    pub bottleneck: Option<BottleneckPlan>,
    /// The layer's k output channels in the block buffer.
    pub out: View,
    /// Block gradient of `[0, C_l)`.
    pub g_in: View,
    /// Block gradient of the output channels.
    pub g_out: View,
    /// Block statistics of the input channels.
    pub stats_in: Moments,
    /// Block statistics of the output channels (written after the layer).
    pub stats_out: Moments,
}

/// Where a bottleneck layer's inner tensors live.
#[derive(Clone, Copy, Debug)]
pub struct BottleneckPlan {
    /// 1x1 conv output (after dropout).
    pub z: View,
    /// Its BN-ReLU output (kept in `naive`), then its gradient.
    pub a2: View,
    /// BN2 batch statistics.
    pub stats: Moments,
}

/// In which order a transition pools and convolves.
#[derive(Clone, Copy, Debug)]
pub enum Order {
    /// Without dropout: the BN-ReLU output pooled, then convolved at a quarter of the pixels
    /// (average pooling and a 1x1 convolution commute). `a` holds the BN-ReLU output (kept in
    /// `naive`; otherwise [`Plan::chunk`] channels of it at a time, in a scratch tensor).
    PoolFirst {
        /// The pooled BN-ReLU output [n, C, H/2, W/2] (kept in `naive`, recomputed in backward
        /// otherwise), then its gradient.
        pooled: View,
    },
    /// With dropout (on the full-resolution convolution output, as the reference drops it):
    /// convolved, dropped, pooled, the batch in `chunks` chunks of images. `a` is the kept
    /// BN-ReLU output in `naive`, otherwise the block's gradient, which the BN-ReLU gradient
    /// becomes in place.
    ConvFirst {
        /// Convolution output (after dropout), then its gradient, for a chunk of images.
        z: View,
        /// Chunks of a batch (their images: the batch's count over `chunks`, rounded up): one
        /// in `naive`, otherwise as many as make `z` no larger than a [`Plan::chunk`] of the
        /// input's channels. A count, not a size, so that a batch is split the same way in a
        /// plan of any batch size.
        chunks: usize,
        /// Outside `naive`, where the output's gradient is copied before the first chunk, so
        /// that the next block's gradient is dead while this block's is written.
        g_out: Option<View>,
    },
}

/// Where a transition's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct TransitionPlan {
    /// The whole block buffer.
    pub input: View,
    /// The BN-ReLU output (see [`Order`]).
    pub a: View,
    /// The order of pooling and convolution, and its tensors.
    pub order: Order,
    /// Channels `[0, c_out)` of the next block buffer.
    pub out: View,
    /// Gradient of the block buffer.
    pub g_in: View,
    /// Gradient of `out`.
    pub g_out: View,
    /// Statistics of the input block.
    pub stats_in: Moments,
    /// Statistics of `out` in the next block.
    pub stats_out: Moments,
}

/// Where the stem's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct StemPlan {
    /// Convolution output: the first block's `[0, C0)` (CIFAR) or the stem map (ImageNet; kept
    /// where the mode keeps z, else recomputed in backward).
    pub conv_out: View,
    /// The first block's `[0, C0)`.
    pub out: View,
    /// Gradient of `out`.
    pub g_out: View,
    /// Statistics of `out`.
    pub stats_out: Moments,
    /// ImageNet: (BN statistics of the stem map; its BN-ReLU output, kept in `naive`, else the
    /// max pool reads the map through the BN-ReLU and this is the gradient; the gradient of
    /// that output, then of the map, in place).
    pub pool: Option<(Moments, View, View)>,
}

/// Where the classifier's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct HeadPlan {
    /// The last block buffer.
    pub input: View,
    /// BN-ReLU output.
    pub a: View,
    /// Its gradient target (the last block's gradient).
    pub g_in: View,
    /// Statistics of the last block.
    pub stats_in: Moments,
    /// Pooled features [n, C].
    pub pooled: Matrix,
    /// Gradient of the pooled features.
    pub g_pooled: Matrix,
    /// Logits [n, classes].
    pub logits: Matrix,
    /// Gradient of the logits.
    pub g_logits: Matrix,
    /// `[loss, correct, SGD non-finite flag, running-statistics non-finite flag, scaler..]`
    /// ([`RESULT_LEN`] floats).
    pub result: Span,
    /// The loss scaler inside the result ([`LossScale::floats`]).
    pub scaler: Span,
    /// The SGD settings the step's update reads ([`Sgd::floats`]).
    pub sgd: Span,
}

/// The whole arena layout for one network, batch size, input size and mode.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Memory mode.
    pub mode: Mode,
    /// The storage precision of its tensors ([`View`]s; its spans are f32).
    pub precision: Precision,
    /// Largest batch the plan holds.
    pub batch: usize,
    /// Every region, in arena order.
    pub regions: Vec<Region>,
    /// Every planned tensor, by tag (see [`Tag`]).
    pub tags: Vec<Tag>,
    /// Arena length in bytes.
    pub len: usize,
    /// The parameter buffer.
    pub params: Span,
    /// The gradient buffer (same layout).
    pub grads: Span,
    /// The momentum buffer (same layout).
    pub momentum: Span,
    /// The BN running-statistics buffer (laid out as
    /// [`ParamLayout::running`](super::params::ParamLayout::running)).
    pub running: Span,
    /// Input images [n, 3, H, W].
    pub image: View,
    /// Stem.
    pub stem: StemPlan,
    /// Dense layers per block.
    pub layers: Vec<Vec<LayerPlan>>,
    /// Transitions.
    pub transitions: Vec<TransitionPlan>,
    /// Classifier.
    pub head: HeadPlan,
    /// Convolution workspace region.
    pub workspace: Span,
    /// Channels per chunk of a dense layer's BN1-ReLU backward and a transition's pooled input
    /// (2k).
    pub chunk: usize,
    /// Every distinct convolution shape, for workspace sizing and algorithm selection.
    pub convs: Vec<ConvShape>,
    /// Bytes kept outside the arena (the labels).
    pub label_bytes: usize,
    /// The scratch of a data-parallel job's collectives ([`Plan::for_job`]; `None` alone).
    pub collectives: Option<Span>,
}

/// Channels per chunk of a BN-ReLU whose output or gradient is formed a chunk at a time (a
/// dense layer's BN1 backward, a transition's pooled input): 2k, half the bottleneck's width,
/// so the chunk is smaller than the tensors that hold a bottleneck's 4k channels.
fn chunk(cfg: &NetConfig) -> usize {
    2 * cfg.growth
}

/// Floats of the head's result: the loss, the top-1 correct count, two flags set (to 1, never
/// cleared) when SGD leaves a parameter or momentum value that is not finite and when a
/// running statistic is not finite, then the loss scaler ([`LossScale::floats`]; used in fp16
/// only), all read after every step.
pub const RESULT_LEN: usize = 4 + LossScale::LEN;

/// Allocator over the arena, [`ALIGN`](crate::backend::ALIGN)ed regions: region `i` at `at[i]`
/// where the placement gives it, else after the regions before it.
struct Arena {
    at: Vec<usize>,
    regions: Vec<Region>,
    tags: Vec<Tag>,
    top: usize,
    /// The element type of the [`Arena::tensor`]s (the precision's storage).
    storage: DType,
}

impl Arena {
    /// A new tag for a tensor in region `region`.
    fn tag(&mut self, name: String, region: usize) -> u32 {
        self.tags.push(Tag { name, region });
        self.tags.len() as u32
    }

    /// A region of `len` f32, tagged as its own tensor, placed by live range.
    fn take(&mut self, name: impl Into<String>, category: Category, len: usize) -> Span {
        self.region(name.into(), category, len, DType::F32, false)
    }

    /// A region of `len` f32 that outlasts a step or a pass ([`Region::lasting`]).
    fn take_lasting(&mut self, name: impl Into<String>, category: Category, len: usize) -> Span {
        self.region(name.into(), category, len, DType::F32, true)
    }

    fn region(&mut self, name: String, category: Category, len: usize, dtype: DType, lasting: bool) -> Span {
        let index = self.regions.len();
        let off = self.at.get(index).copied().unwrap_or(self.top);
        let r = Region { name: name.clone(), category, off, len, dtype, tag: 0, lasting };
        self.top = self.top.max(off + aligned(r.bytes()));
        let tag = self.tag(name, index);
        self.regions.push(Region { tag, ..r });
        Span { off, len, dtype, tag }
    }

    /// A region holding a [n, c, h, w] tensor of the storage type.
    fn tensor(&mut self, name: impl Into<String>, category: Category, n: usize, c: usize, h: usize, w: usize) -> View {
        let s = self.region(name.into(), category, n * c * h * w, self.storage, false);
        View { dtype: s.dtype, ..View::dense(s.off, n, c, h, w) }.tagged(s.tag)
    }

    fn stats(&mut self, name: impl Into<String>, c: usize) -> Moments {
        let s = self.take(name, Category::Activations, 2 * c);
        Moments { mean: s.at(0, c), var: s.at(c, c) }
    }
}

/// What one pass of the layout lays out besides the shared regions and the workspace.
struct Parts {
    params: Span,
    running: Span,
    grads: Span,
    momentum: Span,
    image: View,
    stem: StemPlan,
    layers: Vec<Vec<LayerPlan>>,
    transitions: Vec<TransitionPlan>,
    head: HeadPlan,
}

/// The block buffers: features, their statistics and their gradients, one of each per block.
struct Blocks {
    x: Vec<View>,
    stats: Vec<Moments>,
    g: Vec<View>,
}

/// One pass of the layout: the arena as it fills, and the convolution shapes met.
struct Planner<'a> {
    cfg: &'a NetConfig,
    net: &'a Net,
    geo: &'a [BlockGeom],
    n: usize,
    mode: Mode,
    ar: Arena,
    convs: Vec<ConvShape>,
}

impl<'a> Planner<'a> {
    /// A pass at batch `n`, its regions at
    /// `at` (see [`Arena`]).
    fn new(cfg: &'a NetConfig, net: &'a Net, geo: &'a [BlockGeom], n: usize, mode: Mode, at: &[usize]) -> Self {
        let (regions, tags, at) = (Vec::new(), Vec::new(), at.to_vec());
        let ar = Arena { at, regions, tags, top: 0, storage: cfg.precision.storage() };
        Planner { cfg, net, geo, n, mode, ar, convs: Vec::new() }
    }

    /// Notes a convolution shape (each distinct one once).
    fn conv(&mut self, spec: ConvSpec, cin: usize, cout: usize, h: usize, w: usize) {
        let s = ConvShape { spec, cin, cout, h, w, dtype: self.ar.storage };
        if !self.convs.contains(&s) {
            self.convs.push(s);
        }
    }

    /// A kept tensor named `name` in `naive` (which keeps BN-ReLU outputs), else a scratch
    /// tensor that lives only while the layer that uses it runs.
    fn kept_or_scratch(&mut self, name: String, c: usize, h: usize, w: usize) -> View {
        self.kept_or_chunk(name, c, c, h, w)
    }

    /// [`Planner::kept_or_scratch`] whose scratch tensor holds `chunk` of the `c` channels at a
    /// time (at most `c`).
    fn kept_or_chunk(&mut self, name: String, c: usize, chunk: usize, h: usize, w: usize) -> View {
        match self.mode.keeps_bn_outputs() {
            true => self.ar.tensor(name, Category::Activations, self.n, c, h, w),
            false => self.ar.tensor(name, Category::Scratch, self.n, c.min(chunk), h, w),
        }
    }

    /// The whole layout for `h` x `w` inputs, in arena order.
    fn pass(mut self, h: usize, w: usize) -> (Self, Parts) {
        let (n, plen) = (self.n, self.net.layout.len);
        let params = self.ar.take_lasting("parameters", Category::Parameters, plen);
        let running = self.ar.take_lasting("bn running statistics", Category::Parameters, self.net.layout.running_len);
        let grads = self.ar.take_lasting("gradients", Category::Gradients, plen);
        let momentum = self.ar.take_lasting("momentum", Category::Momentum, plen);
        let image = self.ar.tensor("input images", Category::Activations, n, 3, h, w);
        let mut blocks = Blocks { x: Vec::new(), stats: Vec::new(), g: Vec::new() };
        for (b, g) in self.geo.iter().enumerate() {
            let x = self.ar.tensor(format!("block{} features", b + 1), Category::Activations, n, g.c_final, g.h, g.w);
            blocks.x.push(x);
        }
        for (b, g) in self.geo.iter().enumerate() {
            blocks.stats.push(self.ar.stats(format!("block{} statistics", b + 1), g.c_final));
        }
        for (b, g) in self.geo.iter().enumerate() {
            let gx = self.ar.tensor(format!("block{} gradient", b + 1), Category::Scratch, n, g.c_final, g.h, g.w);
            blocks.g.push(gx);
        }
        let stem = self.stem(&blocks, h, w);
        let (mut layers, mut transitions) = (Vec::new(), Vec::new());
        for b in 0..self.geo.len() {
            layers.push(self.block(&blocks, b));
            if b + 1 < self.geo.len() {
                transitions.push(self.transition(&blocks, b));
            }
        }
        let head = self.head(&blocks);
        let parts = Parts { params, running, grads, momentum, image, stem, layers, transitions, head };
        (self, parts)
    }

    /// The stem: a 3x3 convolution into the first block (CIFAR), or a 7x7 stride-2 one, BN,
    /// ReLU and a max pool into it (ImageNet).
    fn stem(&mut self, blocks: &Blocks, h: usize, w: usize) -> StemPlan {
        let (n, c0) = (self.n, self.cfg.stem_channels);
        let first = blocks.x[0].channels(0, c0);
        let (g_out, stats_out) = (blocks.g[0].channels(0, c0), blocks.stats[0].channels(0, c0));
        match self.cfg.stem {
            Stem::Cifar => {
                self.conv(ConvSpec::SAME3, 3, c0, h, w);
                StemPlan { conv_out: first, out: first, g_out, stats_out, pool: None }
            }
            Stem::ImageNet => {
                self.conv(ConvSpec::STEM7, 3, c0, h, w);
                let (sh, sw) = (h / 2, w / 2);
                let category = if self.mode.keeps_z() { Category::Activations } else { Category::Scratch };
                let conv_out = self.ar.tensor("stem conv output", category, n, c0, sh, sw);
                let bn_stats = self.ar.stats("stem statistics", c0);
                let g = self.ar.tensor("stem gradient", Category::Scratch, n, c0, sh, sw);
                let a = match self.mode.keeps_bn_outputs() {
                    true => self.ar.tensor("stem BN-ReLU output", Category::Activations, n, c0, sh, sw),
                    false => g,
                };
                StemPlan { conv_out, out: first, g_out, stats_out, pool: Some((bn_stats, a, g)) }
            }
        }
    }

    /// The dense layers of block `b`.
    fn block(&mut self, blocks: &Blocks, b: usize) -> Vec<LayerPlan> {
        let (g, n, k, width) = (self.geo[b], self.n, self.cfg.growth, self.cfg.bottleneck_width());
        let (x, gx, st) = (blocks.x[b], blocks.g[b], blocks.stats[b]);
        let mut plans = Vec::new();
        for (i, layer) in self.net.blocks[b].iter().enumerate() {
            let c = layer.c_in;
            let name = |what: &str| format!("block{}.layer.{i} {what}", b + 1);
            let features = x.channels(0, c);
            let input = match self.mode {
                Mode::Naive => self.ar.tensor(name("concatenated input"), Category::Activations, n, c, g.h, g.w),
                _ => features,
            };
            let chunk = chunk(self.cfg);
            let a1 = self.kept_or_chunk(name("a1"), c, chunk, g.h, g.w);
            let (cout, spec) = match self.cfg.bottleneck {
                true => (width, ConvSpec::POINTWISE),
                false => (k, ConvSpec::SAME3),
            };
            let weights = (c > chunk).then(|| {
                for cc in [chunk, c % chunk].into_iter().filter(|&cc| cc > 0) {
                    self.conv(spec, cc, cout, g.h, g.w);
                }
                self.ar.take(name("conv1 weight chunk"), Category::Scratch, cout * chunk * spec.k * spec.k)
            });
            let bottleneck = if self.cfg.bottleneck {
                self.conv(ConvSpec::POINTWISE, c, width, g.h, g.w);
                self.conv(ConvSpec::SAME3, width, k, g.h, g.w);
                let z = match self.mode.keeps_z() {
                    true => self.ar.tensor(name("z"), Category::Activations, n, width, g.h, g.w),
                    false => self.ar.tensor(name("z"), Category::Scratch, n, width, g.h, g.w),
                };
                let a2 = self.kept_or_scratch(name("a2"), width, g.h, g.w);
                Some(BottleneckPlan { z, a2, stats: self.ar.stats(name("bn2 statistics"), width) })
            } else {
                self.conv(ConvSpec::SAME3, c, k, g.h, g.w);
                None
            };
            plans.push(LayerPlan {
                input,
                features,
                a1,
                weights,
                bottleneck,
                out: x.channels(c, k),
                g_in: gx.channels(0, c),
                g_out: gx.channels(c, k),
                stats_in: st.channels(0, c),
                stats_out: st.channels(c, k),
            });
        }
        plans
    }

    /// The transition after block `b`: BN-ReLU, 1x1 convolution, 2x2 average pool into the
    /// next block.
    fn transition(&mut self, blocks: &Blocks, b: usize) -> TransitionPlan {
        let (g, t) = (self.geo[b], &self.net.transitions[b]);
        let (c_in, c_out) = (t.c_in, t.c_out);
        let name = |what: &str| format!("trans{} {what}", b + 1);
        let (n, naive) = (self.n, self.mode.keeps_bn_outputs());
        let (a, order) = if self.cfg.drop_rate == 0.0 {
            let (h, w) = (g.h / 2, g.w / 2);
            self.conv(ConvSpec::POINTWISE, c_in, c_out, h, w);
            let a = self.kept_or_chunk(name("a"), c_in, chunk(self.cfg), g.h, g.w);
            let category = if naive { Category::Activations } else { Category::Scratch };
            let pooled = self.ar.tensor(name("pooled a, then its gradient"), category, n, c_in, h, w);
            (a, Order::PoolFirst { pooled })
        } else {
            self.conv(ConvSpec::POINTWISE, c_in, c_out, g.h, g.w);
            let (a, chunks, category) = match naive {
                true => (self.ar.tensor(name("a"), Category::Activations, n, c_in, g.h, g.w), 1, Category::Activations),
                false => (blocks.g[b], c_out.div_ceil(chunk(self.cfg)), Category::Scratch),
            };
            let g_out = (!naive)
                .then(|| self.ar.tensor(name("output gradient"), Category::Scratch, n, c_out, g.h / 2, g.w / 2));
            let z = self.ar.tensor(name("z"), category, n.div_ceil(chunks), c_out, g.h, g.w);
            (a, Order::ConvFirst { z, chunks, g_out })
        };
        TransitionPlan {
            input: blocks.x[b],
            a,
            order,
            out: blocks.x[b + 1].channels(0, c_out),
            g_in: blocks.g[b],
            g_out: blocks.g[b + 1].channels(0, c_out),
            stats_in: blocks.stats[b],
            stats_out: blocks.stats[b + 1].channels(0, c_out),
        }
    }

    /// The classifier: BN-ReLU, global average pool, linear, softmax cross-entropy.
    fn head(&mut self, blocks: &Blocks) -> HeadPlan {
        let last = self.geo.len() - 1;
        let (gl, n, classes) = (self.geo[last], self.n, self.cfg.num_classes);
        let c = gl.c_final;
        let a = self.kept_or_scratch("head a".into(), c, gl.h, gl.w);
        let pooled = self.ar.take("pooled features", Category::Activations, n * c).matrix(n, c);
        let logits = self.ar.take_lasting("logits", Category::Activations, n * classes).matrix(n, classes);
        let g_pooled = self.ar.take("pooled gradient", Category::Scratch, n * c).matrix(n, c);
        let g_logits = self.ar.take("logits gradient", Category::Scratch, n * classes).matrix(n, classes);
        let control = "loss, correct count, non-finite flags, loss scaler and SGD settings";
        let control = self.ar.take_lasting(control, Category::Scratch, RESULT_LEN + Sgd::LEN);
        HeadPlan {
            input: blocks.x[last],
            a,
            g_in: blocks.g[last],
            stats_in: blocks.stats[last],
            pooled,
            logits,
            g_pooled,
            g_logits,
            result: control.at(0, RESULT_LEN),
            scaler: control.at(RESULT_LEN - LossScale::LEN, LossScale::LEN),
            sgd: control.at(RESULT_LEN, Sgd::LEN),
        }
    }
}

/// What a plan is laid out for.
#[derive(Clone, Copy)]
struct Shape<'a> {
    cfg: &'a NetConfig,
    net: &'a Net,
    geo: &'a [BlockGeom],
    batch: usize,
    h: usize,
    w: usize,
    mode: Mode,
}

impl Shape<'_> {
    /// The layout with region `i` at `at[i]` (one after another where `at` is empty), the
    /// convolution workspace `workspace_len` bytes for the network's shapes.
    fn layout(&self, at: &[usize], workspace_len: impl FnOnce(&[ConvShape]) -> Result<usize>) -> Result<Plan> {
        let planner = Planner::new(self.cfg, self.net, self.geo, self.batch, self.mode, at);
        let (mut p, parts) = planner.pass(self.h, self.w);
        let ws = workspace_len(&p.convs)?;
        assert!(ws.is_multiple_of(DType::F32.size()), "a workspace of {ws} bytes");
        let workspace = p.ar.take_lasting("convolution workspace", Category::Workspace, ws / DType::F32.size());
        Ok(Plan {
            mode: self.mode,
            precision: self.cfg.precision,
            batch: self.batch,
            len: p.ar.top,
            regions: p.ar.regions,
            tags: p.ar.tags,
            params: parts.params,
            grads: parts.grads,
            momentum: parts.momentum,
            running: parts.running,
            image: parts.image,
            stem: parts.stem,
            layers: parts.layers,
            transitions: parts.transitions,
            head: parts.head,
            workspace,
            chunk: chunk(self.cfg),
            convs: p.convs,
            label_bytes: self.batch * std::mem::size_of::<u32>(),
            collectives: None,
        })
    }
}

impl Plan {
    /// Plans `net` (built from `cfg`) for batches of up to `batch` images of `h` x `w`;
    /// `workspace_len` sizes the convolution workspace for the network's shapes.
    ///
    /// The layout is one pass over the network, each tensor a region of its own, one after
    /// another. The regions are then placed by live range (`place`: those never live at once
    /// share bytes) and the layout laid out again at those places.
    pub fn new(
        cfg: &NetConfig,
        net: &Net,
        batch: usize,
        h: usize,
        w: usize,
        mode: Mode,
        workspace_len: impl FnOnce(&[ConvShape]) -> Result<usize>,
    ) -> Result<Plan> {
        if batch == 0 {
            bail!("batch size must be at least 1");
        }
        let geo = cfg.geometry(h, w)?;
        let shape = Shape { cfg, net, geo: &geo, batch, h, w, mode };
        let one_after_another = shape.layout(&[], workspace_len)?;
        // Every batch issues the same ops on the same tensors, image by image, except that a
        // transition with dropout splits a batch into chunks of images: the lives are those
        // of two images (one if the plan has one), the fewest that make two chunks. With two
        // chunks or more, every tensor that the chunks use lives through all of them.
        let traced = Shape { batch: batch.min(2), ..shape }.layout(&[], |_| Ok(0))?;
        let at = super::place::by_live_range(cfg, net, &traced, &one_after_another.regions, h, w)?;
        let workspace = one_after_another.workspace.len * DType::F32.size();
        shape.layout(&at, |_| Ok(workspace))
    }

    /// The plan of one rank of a data-parallel job of `world` ranks (`None`: alone) of the
    /// network `net`: a scratch for the collectives at the arena's end (it lasts the whole
    /// step), `world + 1` times two floats per channel of the widest BN: this rank's statistics
    /// or BN backward sums, then every rank's statistics (all-gathered), or the sums
    /// all-reduced.
    pub fn for_job(mut self, world: Option<usize>, net: &Net) -> Plan {
        if let Some(world) = world {
            let widest = net.layout.running.iter().map(|t| t.len()).max().unwrap_or(0);
            let (len, off, region) = ((world + 1) * 2 * widest, self.len, self.regions.len());
            let name = "collectives: statistics and BN backward sums of the ranks".to_string();
            self.tags.push(Tag { name: name.clone(), region });
            let tag = self.tags.len() as u32;
            let r = Region { name, category: Category::Scratch, off, len, dtype: DType::F32, tag, lasting: true };
            self.len += aligned(r.bytes());
            self.regions.push(r);
            self.collectives = Some(Span { off, len, dtype: DType::F32, tag });
        }
        self
    }

    /// Bytes of the arena that hold one category at some time in a step (its regions rounded
    /// to their alignment, the bytes two of them share counted once; the labels count as
    /// activations). Categories share bytes too, so they add up to more than the total.
    pub fn bytes(&self, category: Category) -> usize {
        let mut spans: Vec<(usize, usize)> = self
            .regions
            .iter()
            .filter(|r| r.category == category)
            .map(|r| (r.off, r.off + aligned(r.bytes())))
            .collect();
        spans.sort_unstable();
        let (mut arena, mut covered) = (0, 0);
        for (start, end) in spans {
            arena += end.saturating_sub(start.max(covered));
            covered = covered.max(end);
        }
        arena + if category == Category::Activations { self.label_bytes } else { 0 }
    }

    /// Total planned bytes: the arena plus the labels.
    pub fn total_bytes(&self) -> usize {
        self.len + self.label_bytes
    }
}

//! The memory planner: every buffer of a training step laid out in one arena before the first
//! step, with the offsets every op uses (llm.c style) and the bytes per category.
//!
//! Modes (see `docs/memory.md`):
//! - `naive` keeps what a framework without sharing keeps: a concatenated copy of every layer's
//!   input, and every BN-ReLU output (a1, a2) and bottleneck output (z). Quadratic in depth.
//! - `shared` keeps the block buffers and each bottleneck's z; BN-ReLU outputs are never
//!   stored (the convolutions apply them to their inputs on the fly). Linear in depth.
//! - `minimal` keeps only the block buffers and BN statistics; z is recomputed in backward into
//!   shared scratch. Linear in depth with the smallest constant.
//!
//! Outside `naive`, the views named for BN-ReLU outputs (a1, a2, a) hold their gradients.

use super::net::Net;
use crate::backend::{ConvShape, ConvSpec, View};
use crate::config::{NetConfig, Stem};
use crate::{bail, Error, Result};
use std::fmt;
use std::str::FromStr;

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

    /// Whether each bottleneck's 1x1 convolution output z is kept.
    pub fn keeps_z(self) -> bool {
        self != Mode::Minimal
    }
}

impl FromStr for Mode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Mode> {
        match s {
            "naive" => Ok(Mode::Naive),
            "shared" => Ok(Mode::Shared),
            "minimal" => Ok(Mode::Minimal),
            _ => bail!("unknown memory mode '{s}' (naive, shared, minimal)"),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::Naive => "naive",
            Mode::Shared => "shared",
            Mode::Minimal => "minimal",
        })
    }
}

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
    /// Buffers shared across layers: block gradient buffers and recomputation slots.
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

/// One named arena region.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// What it holds.
    pub name: String,
    /// Report category.
    pub category: Category,
    /// Offset in floats.
    pub off: usize,
    /// Length in floats.
    pub len: usize,
    /// The tag of the tensor the region holds (a shared scratch region's own tag; the
    /// tensors that share it have theirs).
    pub tag: u32,
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

/// Mean and variance offsets (per channel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stats {
    /// Mean offset.
    pub mean: usize,
    /// Variance offset.
    pub var: usize,
}

impl Stats {
    /// The statistics of channels `[c0, ..)`.
    pub fn from(self, c0: usize) -> Stats {
        Stats { mean: self.mean + c0, var: self.var + c0 }
    }
}

/// Where one dense layer's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct LayerPlan {
    /// What BN1 reads: the block slice `[0, C_l)`, or in `naive` its concatenated copy.
    pub input: View,
    /// The block slice `[0, C_l)` (source of the copy; gradient target).
    pub features: View,
    /// BN1-ReLU output (kept in `naive`), then its gradient.
    pub a1: View,
    /// The bottleneck's tensors (bottleneck layers only).
    pub bottleneck: Option<BottleneckPlan>,
    /// The layer's k output channels in the block buffer.
    pub out: View,
    /// Block gradient of `[0, C_l)`.
    pub g_in: View,
    /// Block gradient of the output channels.
    pub g_out: View,
    /// Block statistics of the input channels.
    pub stats_in: Stats,
    /// Block statistics of the output channels (written after the layer).
    pub stats_out: Stats,
}

/// Where a bottleneck layer's inner tensors live.
#[derive(Clone, Copy, Debug)]
pub struct BottleneckPlan {
    /// 1x1 conv output (after dropout).
    pub z: View,
    /// Its BN-ReLU output (kept in `naive`), then its gradient.
    pub a2: View,
    /// BN2 batch statistics.
    pub stats: Stats,
}

/// Where a transition's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct TransitionPlan {
    /// The whole block buffer.
    pub input: View,
    /// BN-ReLU output (kept in `naive`), then its gradient.
    pub a: View,
    /// Convolution output (after dropout).
    pub z: View,
    /// Channels `[0, c_out)` of the next block buffer.
    pub out: View,
    /// Gradient of the block buffer.
    pub g_in: View,
    /// Gradient of `out`.
    pub g_out: View,
    /// Statistics of the input block.
    pub stats_in: Stats,
    /// Statistics of `out` in the next block.
    pub stats_out: Stats,
}

/// Where the stem's tensors live.
#[derive(Clone, Copy, Debug)]
pub struct StemPlan {
    /// Convolution output: the first block's `[0, C0)` (CIFAR) or the stem map (ImageNet).
    pub conv_out: View,
    /// The first block's `[0, C0)`.
    pub out: View,
    /// Gradient of `out`.
    pub g_out: View,
    /// Statistics of `out`.
    pub stats_out: Stats,
    /// ImageNet: (stem BN statistics, BN-ReLU output, gradient slot of that output).
    pub pool: Option<(Stats, View, View)>,
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
    pub stats_in: Stats,
    /// Pooled features [n, C].
    pub pooled: usize,
    /// Gradient of the pooled features.
    pub g_pooled: usize,
    /// Logits [n, classes].
    pub logits: usize,
    /// Gradient of the logits.
    pub g_logits: usize,
    /// `[loss, correct, SGD non-finite flag, running-statistics non-finite flag]`
    /// ([`RESULT_LEN`] floats).
    pub result: usize,
}

/// The whole arena layout for one network, batch size, input size and mode.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Memory mode.
    pub mode: Mode,
    /// Largest batch the plan holds.
    pub batch: usize,
    /// Every region, in arena order.
    pub regions: Vec<Region>,
    /// Every planned tensor, by tag (see [`Tag`]).
    pub tags: Vec<Tag>,
    /// Arena length in floats.
    pub len: usize,
    /// Parameter buffer offset.
    pub params: usize,
    /// Gradient buffer offset (same layout).
    pub grads: usize,
    /// Momentum buffer offset (same layout).
    pub momentum: usize,
    /// Running statistics buffer offset.
    pub stats: usize,
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
    /// Convolution workspace region (offset, floats).
    pub workspace: (usize, usize),
    /// Every distinct convolution shape, for workspace sizing and algorithm selection.
    pub convs: Vec<ConvShape>,
    /// Bytes kept outside the arena (the labels).
    pub label_bytes: usize,
}

/// Floats of the head's result: the loss, the top-1 correct count, and two flags set (to 1,
/// never cleared) when SGD leaves a parameter or momentum value that is not finite, and when
/// a running statistic is not finite.
pub const RESULT_LEN: usize = 4;

/// Bump allocator over the arena, 64-byte aligned regions.
struct Arena {
    regions: Vec<Region>,
    tags: Vec<Tag>,
    top: usize,
}

impl Arena {
    /// A new tag for a tensor in region `region`.
    fn tag(&mut self, name: String, region: usize) -> u32 {
        self.tags.push(Tag { name, region });
        self.tags.len() as u32
    }

    fn take(&mut self, name: impl Into<String>, category: Category, len: usize) -> usize {
        let (off, name) = (self.top, name.into());
        self.top += len.div_ceil(16) * 16;
        let tag = self.tag(name.clone(), self.regions.len());
        self.regions.push(Region { name, category, off, len, tag });
        off
    }

    fn tensor(&mut self, name: impl Into<String>, category: Category, n: usize, c: usize, h: usize, w: usize) -> View {
        let off = self.take(name, category, n * c * h * w);
        View::dense(off, n, c, h, w).tagged(self.regions[self.regions.len() - 1].tag)
    }

    /// A shared scratch region: its index, for [`Arena::slot`].
    fn scratch(&mut self, name: &str, len: usize) -> usize {
        self.take(name, Category::Scratch, len);
        self.regions.len() - 1
    }

    /// Tensor `name` [n, c, h, w] at the start of shared scratch region `region`, with a tag
    /// of its own.
    fn slot(&mut self, region: usize, name: String, n: usize, c: usize, h: usize, w: usize) -> View {
        let tag = self.tag(format!("{name} in {}", self.regions[region].name), region);
        View::dense(self.regions[region].off, n, c, h, w).tagged(tag)
    }

    fn stats(&mut self, name: impl Into<String>, c: usize) -> Stats {
        let mean = self.take(name, Category::Activations, 2 * c);
        Stats { mean, var: mean + c }
    }
}

impl Plan {
    /// Plans `net` (built from `cfg`) for batches of up to `batch` images of `h` x `w`;
    /// `workspace_len` sizes the convolution workspace for the network's shapes.
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
        let n = batch;
        let (k, width) = (cfg.growth, cfg.bottleneck_width());
        let keep_a = mode.keeps_bn_outputs();
        let mut convs = Vec::new();
        let mut conv = |spec: ConvSpec, cin: usize, cout: usize, h: usize, w: usize| {
            let s = ConvShape { spec, cin, cout, h, w };
            if !convs.contains(&s) {
                convs.push(s);
            }
        };

        // Sizes of the shared scratch slots (pre-pass over the geometry).
        let (sh, sw) = (h / 2, w / 2);
        let mut act = 0;
        let mut mid = 0;
        let mut mid2 = 0;
        if cfg.stem == Stem::ImageNet {
            act = n * cfg.stem_channels * sh * sw;
            mid = act;
        }
        for (b, g) in geo.iter().enumerate() {
            let hw = g.h * g.w;
            act = act.max(n * g.c_final * hw);
            if cfg.bottleneck {
                mid2 = mid2.max(n * width * hw);
                if !mode.keeps_z() {
                    mid = mid.max(n * width * hw);
                }
            }
            if b + 1 < geo.len() {
                mid = mid.max(n * cfg.transition_channels(g.c_final) * hw);
            }
        }
        if keep_a {
            act = 0;
            mid2 = 0;
            if cfg.stem == Stem::Cifar {
                mid = 0;
            } else {
                mid = n * cfg.stem_channels * sh * sw;
            }
        }

        let mut ar = Arena { regions: Vec::new(), tags: Vec::new(), top: 0 };
        let plen = net.layout.len;
        let params = ar.take("parameters", Category::Parameters, plen);
        let stats = ar.take("bn running statistics", Category::Parameters, net.layout.stats_len);
        let grads = ar.take("gradients", Category::Gradients, plen);
        let momentum = ar.take("momentum", Category::Momentum, plen);

        let image = ar.tensor("input images", Category::Activations, n, 3, h, w);
        let blocks: Vec<View> = geo
            .iter()
            .enumerate()
            .map(|(b, g)| ar.tensor(format!("block{} features", b + 1), Category::Activations, n, g.c_final, g.h, g.w))
            .collect();
        let block_stats: Vec<Stats> =
            geo.iter().enumerate().map(|(b, g)| ar.stats(format!("block{} statistics", b + 1), g.c_final)).collect();
        let grad_blocks: Vec<View> = geo
            .iter()
            .enumerate()
            .map(|(b, g)| ar.tensor(format!("block{} gradient", b + 1), Category::Scratch, n, g.c_final, g.h, g.w))
            .collect();
        let act_slot = ar.scratch("scratch: BN-ReLU outputs and gradients", act);
        let mid_slot = ar.scratch("scratch: conv outputs", mid);
        let mid2_slot = ar.scratch("scratch: bottleneck BN-ReLU gradients", mid2);

        // Stem.
        let c0 = cfg.stem_channels;
        let first = blocks[0].channels(0, c0);
        let stem = match cfg.stem {
            Stem::Cifar => {
                conv(ConvSpec::SAME3, 3, c0, h, w);
                StemPlan {
                    conv_out: first,
                    out: first,
                    g_out: grad_blocks[0].channels(0, c0),
                    stats_out: block_stats[0],
                    pool: None,
                }
            }
            Stem::ImageNet => {
                conv(ConvSpec::STEM7, 3, c0, h, w);
                let conv_out = ar.tensor("stem conv output", Category::Activations, n, c0, sh, sw);
                let bn_stats = ar.stats("stem statistics", c0);
                let t = if keep_a {
                    ar.tensor("stem BN-ReLU output", Category::Activations, n, c0, sh, sw)
                } else {
                    ar.slot(act_slot, "stem BN-ReLU output".into(), n, c0, sh, sw)
                };
                let g = ar.slot(mid_slot, "stem BN-ReLU output gradient".into(), n, c0, sh, sw);
                StemPlan {
                    conv_out,
                    out: first,
                    g_out: grad_blocks[0].channels(0, c0),
                    stats_out: block_stats[0],
                    pool: Some((bn_stats, t, g)),
                }
            }
        };

        let mut layers = Vec::new();
        let mut transitions = Vec::new();
        for (b, g) in geo.iter().enumerate() {
            let (x, gx, st) = (blocks[b], grad_blocks[b], block_stats[b]);
            let mut plans = Vec::new();
            for (i, layer) in net.blocks[b].iter().enumerate() {
                let c = layer.c_in;
                let name = |what: &str| format!("block{}.layer.{i} {what}", b + 1);
                let features = x.channels(0, c);
                let input = if mode == Mode::Naive {
                    ar.tensor(name("concatenated input"), Category::Activations, n, c, g.h, g.w)
                } else {
                    features
                };
                let a1 = if keep_a {
                    ar.tensor(name("a1"), Category::Activations, n, c, g.h, g.w)
                } else {
                    ar.slot(act_slot, name("a1"), n, c, g.h, g.w)
                };
                let bottleneck = if cfg.bottleneck {
                    conv(ConvSpec::POINTWISE, c, width, g.h, g.w);
                    conv(ConvSpec::SAME3, width, k, g.h, g.w);
                    let z = if mode.keeps_z() {
                        ar.tensor(name("z"), Category::Activations, n, width, g.h, g.w)
                    } else {
                        ar.slot(mid_slot, name("z"), n, width, g.h, g.w)
                    };
                    let a2 = if keep_a {
                        ar.tensor(name("a2"), Category::Activations, n, width, g.h, g.w)
                    } else {
                        ar.slot(mid2_slot, name("a2"), n, width, g.h, g.w)
                    };
                    Some(BottleneckPlan { z, a2, stats: ar.stats(name("bn2 statistics"), width) })
                } else {
                    conv(ConvSpec::SAME3, c, k, g.h, g.w);
                    None
                };
                plans.push(LayerPlan {
                    input,
                    features,
                    a1,
                    bottleneck,
                    out: x.channels(c, k),
                    g_in: gx.channels(0, c),
                    g_out: gx.channels(c, k),
                    stats_in: st,
                    stats_out: st.from(c),
                });
            }
            layers.push(plans);
            if let Some(t) = net.transitions.get(b) {
                conv(ConvSpec::POINTWISE, t.c_in, t.c_out, g.h, g.w);
                let name = |what: &str| format!("trans{} {what}", b + 1);
                let (a, z) = if keep_a {
                    (
                        ar.tensor(name("a"), Category::Activations, n, t.c_in, g.h, g.w),
                        ar.tensor(name("z"), Category::Activations, n, t.c_out, g.h, g.w),
                    )
                } else {
                    (
                        ar.slot(act_slot, name("a"), n, t.c_in, g.h, g.w),
                        ar.slot(mid_slot, name("z"), n, t.c_out, g.h, g.w),
                    )
                };
                transitions.push(TransitionPlan {
                    input: x,
                    a,
                    z,
                    out: blocks[b + 1].channels(0, t.c_out),
                    g_in: gx,
                    g_out: grad_blocks[b + 1].channels(0, t.c_out),
                    stats_in: st,
                    stats_out: block_stats[b + 1],
                });
            }
        }

        let last = geo.len() - 1;
        let (gl, c) = (geo[last], geo[last].c_final);
        let classes = cfg.num_classes;
        let head = HeadPlan {
            input: blocks[last],
            a: if keep_a {
                ar.tensor("head a", Category::Activations, n, c, gl.h, gl.w)
            } else {
                ar.slot(act_slot, "head a".into(), n, c, gl.h, gl.w)
            },
            g_in: grad_blocks[last],
            stats_in: block_stats[last],
            pooled: ar.take("pooled features", Category::Activations, n * c),
            logits: ar.take("logits", Category::Activations, n * classes),
            g_pooled: ar.take("pooled gradient", Category::Scratch, n * c),
            g_logits: ar.take("logits gradient", Category::Scratch, n * classes),
            result: ar.take("loss, correct count and non-finite flags", Category::Scratch, RESULT_LEN),
        };
        let ws = workspace_len(&convs)?;
        let workspace = (ar.take("convolution workspace", Category::Workspace, ws), ws);
        Ok(Plan {
            mode,
            batch,
            len: ar.top,
            regions: ar.regions,
            tags: ar.tags,
            params,
            grads,
            momentum,
            stats,
            image,
            stem,
            layers,
            transitions,
            head,
            workspace,
            convs,
            label_bytes: batch * std::mem::size_of::<u32>(),
        })
    }

    /// Bytes planned for one category (regions rounded to their 64-byte alignment; the labels
    /// count as activations).
    pub fn bytes(&self, category: Category) -> usize {
        let arena: usize =
            self.regions.iter().filter(|r| r.category == category).map(|r| r.len.div_ceil(16) * 16 * 4).sum();
        arena + if category == Category::Activations { self.label_bytes } else { 0 }
    }

    /// Total planned bytes: the arena plus the labels.
    pub fn total_bytes(&self) -> usize {
        self.len * 4 + self.label_bytes
    }
}

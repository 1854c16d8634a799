//! The `Backend` trait: the primitive ops the model is written against, on typed operands
//! ([`operand`]: spans, matrices and channel views at byte offsets) of one planned arena
//! (llm.c style). The CPU backend is the numerical reference.
//!
//! Activations are NCHW; a [`View`] is a channel slice of such a buffer: `c` channels of `h*w`
//! contiguous pixels per image, images `img_stride` elements apart. Dense-block layers read and
//! write channel slices of their block buffer in place, so no concatenation is ever copied.
//!
//! Aliasing contract: unless an op says otherwise, its output must not overlap its inputs.
//! Views of the same block buffer with disjoint channel ranges do not overlap.

pub mod cpu;
pub mod cuda;
pub mod operand;

pub use cpu::CpuBackend;
pub use operand::{aligned, Affine, Bn, DType, Matrix, Moments, Span, View, ALIGN};

use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::input::{Crop, Normalize};
use crate::{bail, Result};

/// A square convolution without bias.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvSpec {
    /// Kernel size.
    pub k: usize,
    /// Stride.
    pub stride: usize,
    /// Zero padding on each side.
    pub pad: usize,
}

impl ConvSpec {
    /// 1x1, stride 1.
    pub const POINTWISE: ConvSpec = ConvSpec { k: 1, stride: 1, pad: 0 };
    /// 3x3, stride 1, pad 1.
    pub const SAME3: ConvSpec = ConvSpec { k: 3, stride: 1, pad: 1 };
    /// 7x7, stride 2, pad 3 (ImageNet stem).
    pub const STEM7: ConvSpec = ConvSpec { k: 7, stride: 2, pad: 3 };

    /// Output size along one axis for an input of size `x`.
    pub fn out(&self, x: usize) -> usize {
        (x + 2 * self.pad - self.k) / self.stride + 1
    }
}

/// A convolution's full shape, for sizing workspaces (per image).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvShape {
    /// Kernel geometry.
    pub spec: ConvSpec,
    /// Input channels.
    pub cin: usize,
    /// Output channels.
    pub cout: usize,
    /// Input height.
    pub h: usize,
    /// Input width.
    pub w: usize,
    /// Element type of its input and output tensors (its weights are f32).
    pub dtype: DType,
}

/// Batch-norm epsilon, as the reference.
pub const BN_EPS: f32 = 1e-5;

/// SGD hyper-parameters (`torch.optim.SGD` semantics; weight decay applies to every parameter).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    /// Learning rate.
    pub lr: f32,
    /// Momentum factor.
    pub momentum: f32,
    /// L2 weight decay added to the gradient.
    pub weight_decay: f32,
    /// Nesterov momentum.
    pub nesterov: bool,
}

impl Default for Sgd {
    fn default() -> Self {
        Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-4, nesterov: true }
    }
}

impl Sgd {
    /// Arena floats of the settings, as [`Sgd::floats`] lays them out.
    pub const LEN: usize = 4;

    /// The settings as the arena holds them for [`Backend::sgd`]: learning rate, momentum,
    /// weight decay, and Nesterov as 0 or 1.
    pub fn floats(self) -> [f32; Sgd::LEN] {
        [self.lr, self.momentum, self.weight_decay, self.nesterov as u8 as f32]
    }

    /// The settings from their arena floats ([`Sgd::floats`]).
    pub fn from_floats(f: [f32; Sgd::LEN]) -> Sgd {
        Sgd { lr: f[0], momentum: f[1], weight_decay: f[2], nesterov: f[3] != 0.0 }
    }
}

/// fp16 loss scaling as PyTorch's `GradScaler` does by default (docs/precision.md, rule 5): the
/// loss's gradient is multiplied by `scale` before backward and the weight gradients divided by
/// it after; a step whose gradients are not all finite is skipped and halves the scale, and
/// [`LossScale::GROWTH_INTERVAL`] finite steps in a row double it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossScale {
    /// The factor.
    pub scale: f32,
    /// Finite steps since the scale last changed or a step was skipped.
    pub good_steps: u32,
}

impl LossScale {
    /// `GradScaler`'s initial state: scale 2^16.
    pub const INITIAL: LossScale = LossScale { scale: 65536.0, good_steps: 0 };
    /// Finite steps in a row that double the scale.
    pub const GROWTH_INTERVAL: u32 = 2000;
    /// Arena floats of a scaler, as [`LossScale::floats`] lays them out.
    pub const LEN: usize = 3;

    /// The state after a step: `found` (a gradient not finite: the step is skipped) halves the
    /// scale; otherwise the step counts, and the [`LossScale::GROWTH_INTERVAL`]th doubles the
    /// scale (kept when the double is not finite).
    pub fn next(self, found: bool) -> LossScale {
        let good_steps = self.good_steps + 1;
        match (found, good_steps == Self::GROWTH_INTERVAL) {
            (true, _) => LossScale { scale: self.scale * 0.5, good_steps: 0 },
            (false, true) => LossScale {
                scale: Some(self.scale * 2.0).filter(|s| s.is_finite()).unwrap_or(self.scale),
                good_steps: 0,
            },
            (false, false) => LossScale { good_steps, ..self },
        }
    }

    /// The scaler as the arena holds it: `[found, scale, good steps]`, `found` (the last
    /// step's gradients were not all finite) clear.
    pub fn floats(self) -> [f32; LossScale::LEN] {
        [0.0, self.scale, self.good_steps as f32]
    }

    /// The state and `found` from a scaler's arena floats ([`LossScale::floats`]).
    pub fn from_floats(f: [f32; LossScale::LEN]) -> (LossScale, bool) {
        (LossScale { scale: f[1], good_steps: f[2] as u32 }, f[0] != 0.0)
    }
}

/// A collective over the ranks of a data-parallel job, on f32 spans of the arena, with NCCL's
/// semantics: every rank issues the same ones in the same order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Collective {
    /// `dst` = the sum over the ranks of `src` (the same length; the same span or disjoint).
    AllReduce {
        /// Each rank's part.
        src: Span,
        /// The sum.
        dst: Span,
    },
    /// `dst` = every rank's `src`, in rank order (`world` times as long; disjoint).
    AllGather {
        /// Each rank's part.
        src: Span,
        /// The parts.
        dst: Span,
    },
    /// The span = rank 0's.
    Broadcast(Span),
}

impl Collective {
    /// Checks the spans of a collective of a job of `world` ranks: f32, of equal lengths (an
    /// all-gather's `dst` `world` times its `src`), the same span or disjoint (an all-gather's
    /// always disjoint); the error says which is not.
    pub fn check(&self, world: usize) -> std::result::Result<(), String> {
        let apart = |a: Span, b: Span| a.off + a.bytes() <= b.off || b.off + b.bytes() <= a.off;
        let (spans, fits) = match *self {
            Collective::AllReduce { src, dst } => ([src, dst], src.len == dst.len && (src == dst || apart(src, dst))),
            Collective::AllGather { src, dst } => ([src, dst], dst.len == world * src.len && apart(src, dst)),
            Collective::Broadcast(s) => ([s, s], true),
        };
        match spans.iter().all(|s| s.dtype == DType::F32) && fits {
            true => Ok(()),
            false => Err(format!("{self:?} does not fit a job of {world}")),
        }
    }
}

/// Memory of a backend with a device of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceMemory {
    /// Bytes the backend allocated (its one arena).
    pub allocated: usize,
    /// Device memory in use now beyond what was in use right after the backend created its
    /// CUDA context, as the driver counts it device-wide (kernels, library handles, the arena
    /// and graphs; not the context itself), when the driver can tell.
    pub process: Option<usize>,
}

/// A run-time library a backend loaded, for reports (`bench --json`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Library {
    /// What it is (`cudnn`).
    pub name: String,
    /// Its version, as the library reports it.
    pub version: String,
    /// The CUDA version it was built for, where it says (cuDNN does).
    pub cuda: Option<String>,
    /// The file the process mapped, when it can tell.
    pub path: Option<String>,
}

impl Library {
    /// `name` at `version` (built for CUDA `cuda`), with the path of the first mapped file whose
    /// name starts with `file_prefix` (from `/proc/self/maps`).
    pub fn loaded(name: &str, version: String, cuda: Option<String>, file_prefix: &str) -> Library {
        let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
        let path = maps.lines().filter_map(|l| l.split_whitespace().nth(5)).find(|p| {
            std::path::Path::new(p).file_name().and_then(|f| f.to_str()).is_some_and(|f| f.starts_with(file_prefix))
        });
        Library { name: name.into(), version, cuda, path: path.map(str::to_string) }
    }
}

/// The primitive ops of a training step, on operands of the backend's one arena.
pub trait Backend {
    /// What runs the ops, for messages ("cpu (2 threads)").
    fn describe(&self) -> String;
    /// Whether the ops take tensors ([`View`]s) of `dtype` (docs/precision.md); spans are f32.
    fn stores(&self, dtype: DType) -> bool {
        dtype == DType::F32
    }
    /// Lays out the workspace for these convolution shapes at batches of up to `batch` input
    /// images of `image_len` elements each, and returns its length in bytes (the layout is
    /// remembered for [`Backend::allocate`]).
    fn workspace_len(&mut self, convs: &[ConvShape], image_len: usize, batch: usize) -> Result<usize>;
    /// Allocates the zeroed arena (`len` bytes) and the label buffer; `workspace` is the
    /// region reserved for [`Backend::workspace_len`]. Called once, before any op.
    fn allocate(&mut self, len: usize, workspace: Span, max_batch: usize) -> Result<()>;

    /// Device memory, for backends whose arena lives on a device (`None`: host memory, which
    /// the process's heap accounts for).
    fn device_memory(&self) -> Option<DeviceMemory> {
        None
    }

    /// The first error of the ops and reads since the last call (ops queue work and cannot
    /// fail one by one on a device; a failed read also fills its output with NaN); the model
    /// calls it after every step and the checkpoint writer after reading the weights.
    fn take_error(&self) -> Result<()> {
        Ok(())
    }

    /// Begins a training step whose work depends only on `key` and the arena contents. A
    /// backend that records steps (CUDA graphs) replays a recorded `key` and returns true: the
    /// caller then issues none of the step's ops. Otherwise (false) the caller issues them and
    /// ends with [`Backend::step_end`].
    fn step_begin(&mut self, _key: u64) -> bool {
        false
    }

    /// Ends a step begun with [`Backend::step_begin`] that was not replayed.
    fn step_end(&mut self, _key: u64) {}

    /// How training steps have run, for a backend that records them: `"replayed"` (a recorded
    /// step has been replayed), `"not replayed"` (none yet: steps with dropout are never
    /// recorded), `"eager"` (recording is off) or `"fell back: <reason>"` (a recording or
    /// capture failed, so steps run op by op); `None` for a backend that never records.
    fn graphs(&self) -> Option<String> {
        None
    }

    /// The convolution algorithms' rankings the backend planned with, as a record (JSON text)
    /// that a later process on the same device and libraries can reuse, so that it chooses the
    /// same algorithms (an exact resume) without timing them again; `None` where nothing is
    /// chosen by timing (the CPU).
    fn algorithm_record(&self) -> Option<String> {
        None
    }

    /// Takes a record of [`Backend::algorithm_record`] from an earlier process; called before
    /// the model is planned. Returns the rankings taken, or why the record was refused (made on
    /// another device or library version, or corrupt): then planning times the algorithms as
    /// usual, so a record can only save time, never change a result.
    fn reuse_algorithm_record(&mut self, _record: &str) -> Result<usize> {
        Ok(0)
    }

    /// How many algorithm searches (cudnnFind calls) planning made.
    fn algorithm_searches(&self) -> usize {
        0
    }

    /// The run-time libraries the backend loaded (a GPU's driver, cuDNN, ...); none on the CPU.
    fn libraries(&self) -> Vec<Library> {
        Vec::new()
    }

    /// Joins a data-parallel job through the connections of its rendezvous, after which
    /// [`Backend::collective`] spans its ranks; an error where the backend cannot.
    fn join(&mut self, _links: Links) -> Result<()> {
        bail!("the {} cannot train as one rank of several", self.describe())
    }

    /// The job the backend's collectives span, once it has joined one ([`Backend::join`]; a
    /// job of one rank runs the collectives too, each a copy).
    fn group(&self) -> Option<Group> {
        None
    }

    /// Copies host values into `dst` (`data.len()` is its length).
    fn write(&mut self, dst: Span, data: &[f32]);
    /// Copies `src` into `out` (`out.len()` is its length).
    fn read_into(&self, src: Span, out: &mut [f32]);
    /// Copies `src` to a new vector.
    fn read(&self, src: Span) -> Vec<f32> {
        let mut out = vec![0.0; src.len];
        self.read_into(src, &mut out);
        out
    }
    /// Sets the labels of the current batch (class indices).
    fn set_labels(&mut self, labels: &[u32]);
    /// `dst = src` (same shape).
    fn copy(&mut self, src: View, dst: View);
    /// Writes the network input `dst` (dense [n, 3, h, w]) from stored images (`bytes`, n of
    /// 3 x h / scale x w / scale): image i cut through window `crops[i]` of its zero-padded
    /// copy, normalized by `norm` and upsampled by `scale`, as [`Crop::apply`] does.
    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, scale: usize, dst: View);

    /// `y = conv(pre(x), w)`; `w` is [cout, cin, k, k]; `pre` = `Some(bn)` applies
    /// `relu(bn(.))` to the input on the fly (the same arithmetic as [`Backend::bn_relu`]),
    /// so the normalized input is never stored.
    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: Span, y: View, spec: ConvSpec);
    /// `gx = conv_transpose(gy, w)` (overwrites gx).
    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec);
    /// `gw = dL/dw` summed over the batch (`gw +=` when `accumulate`, else overwritten), for
    /// the input `pre(x)` as in [`Backend::conv_forward`].
    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: Span, spec: ConvSpec, accumulate: bool);

    /// Per-channel batch mean and biased variance of `x` into `out`.
    fn bn_stats(&mut self, x: View, out: Moments);
    /// `running = (1 - m) * running + m * batch`, the variance unbiased with `count` samples;
    /// sets `flag` (one element) to 1 when an updated value is not finite (never clears it).
    fn bn_update_running(&mut self, batch: Moments, running: Moments, count: usize, momentum: f32, flag: Span);
    /// `y = relu(gamma * (x - mean) / sqrt(var + eps) + beta)`.
    fn bn_relu(&mut self, x: View, bn: Bn, y: View);
    /// Backward of [`Backend::bn_relu`] with batch statistics: the ReLU mask is recomputed
    /// from `x`; writes the affine parameters' gradients `grad`; `dx = ...` or `dx += ...`
    /// when `accumulate`. `dx` may be the same view as `g` (in place); otherwise no overlap.
    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, grad: Affine, dx: View, accumulate: bool);
    /// The first half of [`Backend::bn_relu_backward`], for a data-parallel job's synchronized
    /// BN: this rank's sums (Σ g·x̂ and Σ g over the ReLU mask) into `grad`, as that op writes
    /// them, and into `sums` (`2 * c` floats: the Σ g·x̂ then the Σ g), which the job
    /// all-reduces for [`Backend::bn_relu_backward_data`].
    fn bn_relu_backward_sums(&mut self, g: View, x: View, bn: Bn, grad: Affine, sums: Span);
    /// The second half of [`Backend::bn_relu_backward`]: `dx` (written, or added to when
    /// `accumulate`) from `(sums, count)`: the whole batch's sums (laid out as
    /// [`Backend::bn_relu_backward_sums`] writes them) over `count` values per channel.
    fn bn_relu_backward_data(&mut self, g: View, x: View, bn: Bn, sums: (Span, usize), dx: View, accumulate: bool);
    /// A data-parallel job's batch statistics from every rank's: `parts` holds, rank after
    /// rank, each one's mean of `c` channels then its biased variance ([`Backend::bn_stats`]
    /// of its shard, [`crate::comm::shard`] of `batch` images of `hw` pixels), combined
    /// in f64 in rank order into the whole batch's mean and biased variance `out`.
    fn bn_stats_combine(&mut self, parts: Span, batch: usize, hw: usize, out: Moments);
    /// A collective of the data-parallel job the backend joined ([`Backend::join`]); a failure
    /// (a rank gone, the watchdog's timeout) is the next [`Backend::take_error`].
    fn collective(&mut self, op: Collective);
    /// In place: `x *= mask / (1 - p)` with the mask from stream `key` (element index is the
    /// logical NCHW index in the view). The same call is its own backward.
    fn dropout(&mut self, x: View, p: f32, key: u64);

    /// 2x2 average pool, stride 2.
    fn avg_pool2(&mut self, x: View, y: View);
    /// Backward of [`Backend::avg_pool2`] (overwrites gx).
    fn avg_pool2_backward(&mut self, gy: View, gx: View);
    /// 3x3 max pool, stride 2, pad 1 (padding never wins), of `pre(x)`: `pre` = `Some(bn)`
    /// pools `relu(bn(x))`, bitwise the values [`Backend::bn_relu`] writes, without storing them.
    fn max_pool3(&mut self, x: View, pre: Option<Bn>, y: View);
    /// Backward of [`Backend::max_pool3`]: the first maximum of each window of `pre(x)` (NaN
    /// wins) gets the gradient; `gx` (overwritten) is the gradient of `pre(x)`, so with a `pre`
    /// it goes on to [`Backend::bn_relu_backward`], which applies the ReLU mask.
    fn max_pool3_backward(&mut self, x: View, pre: Option<Bn>, gy: View, gx: View);
    /// Mean over each channel plane into `y` [n, c].
    fn global_avg_pool(&mut self, x: View, y: Matrix);
    /// Backward of [`Backend::global_avg_pool`] (overwrites gx).
    fn global_avg_pool_backward(&mut self, gy: Matrix, gx: View);

    /// `y[n, k] = x[n, :] . w[k, :] + b[k]`.
    fn linear(&mut self, x: Matrix, w: Matrix, b: Span, y: Matrix);
    /// Backward of [`Backend::linear`]: overwrites gx, gw, gb.
    fn linear_backward(&mut self, x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span);
    /// Softmax cross-entropy of `logits` [n, k] against the current labels, summed and divided
    /// by `total` (`n`, or a data-parallel job's global batch): writes `out` (two elements) =
    /// [loss, top-1 correct count], and `glogits` = dloss/dlogits.
    fn softmax_xent(&mut self, logits: Matrix, total: usize, out: Span, glogits: Matrix);
    /// Loss scaling ([`LossScale`]): `g *= scale`, the scale read from `scaler`
    /// ([`LossScale::floats`]).
    fn scale_loss_grad(&mut self, g: Matrix, scaler: Span);
    /// `grads *= 1 / scale` (the reciprocal taken in f64, as `GradScaler` takes it); the
    /// scaler's `found` becomes 1 when a gradient is not finite, else 0.
    fn unscale_grads(&mut self, grads: Span, scaler: Span);
    /// The scaler's next state, [`LossScale::next`] of its `found` (which it leaves).
    fn update_scale(&mut self, scaler: Span);
    /// One SGD step over `params` with its gradients and momentum (spans of the same length),
    /// by the settings the arena holds at `settings` ([`Sgd::floats`], written before the step,
    /// so a recorded step follows changes), unless `skip` (one element: a scaler's `found`)
    /// is not zero; sets `flag` (one element) to 1 when an updated parameter or momentum value
    /// is not finite (never clears it).
    fn sgd(&mut self, params: Span, grads: Span, momentum: Span, settings: Span, skip: Span, flag: Span);
}

/// Forwards each method listed (by receiver) to the backend in the box.
macro_rules! forward {
    (&self: $(fn $n:ident($($a:ident: $t:ty),*) $(-> $r:ty)?;)* &mut self: $(fn $m:ident($($b:ident: $u:ty),*) $(-> $s:ty)?;)*) => {
        $(fn $n(&self, $($a: $t),*) $(-> $r)? {
            (**self).$n($($a),*)
        })*
        $(fn $m(&mut self, $($b: $u),*) $(-> $s)? {
            (**self).$m($($b),*)
        })*
    };
}

/// A boxed backend is a backend: the commands open one `Box<dyn Backend>` (CPU, host device or
/// GPU) and are compiled once, not once per backend type. An op is a coarse call (a whole
/// convolution, a BN over a block), so the virtual call costs nothing measurable. Every method
/// forwards, the defaulted ones too (clippy refuses a missing one).
#[deny(clippy::missing_trait_methods)]
impl<B: Backend + ?Sized> Backend for Box<B> {
    forward! {
        &self:
        fn describe() -> String;
        fn stores(dtype: DType) -> bool;
        fn device_memory() -> Option<DeviceMemory>;
        fn take_error() -> Result<()>;
        fn graphs() -> Option<String>;
        fn algorithm_record() -> Option<String>;
        fn algorithm_searches() -> usize;
        fn libraries() -> Vec<Library>;
        fn read_into(src: Span, out: &mut [f32]);
        fn read(src: Span) -> Vec<f32>;
        fn group() -> Option<Group>;
        &mut self:
        fn workspace_len(convs: &[ConvShape], image_len: usize, batch: usize) -> Result<usize>;
        fn allocate(len: usize, workspace: Span, max_batch: usize) -> Result<()>;
        fn step_begin(key: u64) -> bool;
        fn step_end(key: u64);
        fn reuse_algorithm_record(record: &str) -> Result<usize>;
        fn join(links: Links) -> Result<()>;
        fn write(dst: Span, data: &[f32]);
        fn set_labels(labels: &[u32]);
        fn copy(src: View, dst: View);
        fn augment(bytes: &[u8], crops: &[Crop], norm: &Normalize, scale: usize, dst: View);
        fn conv_forward(x: View, pre: Option<Bn>, w: Span, y: View, spec: ConvSpec);
        fn conv_backward_data(gy: View, w: Span, gx: View, spec: ConvSpec);
        fn conv_backward_filter(x: View, pre: Option<Bn>, gy: View, gw: Span, spec: ConvSpec, accumulate: bool);
        fn bn_stats(x: View, out: Moments);
        fn bn_update_running(batch: Moments, running: Moments, count: usize, momentum: f32, flag: Span);
        fn bn_relu(x: View, bn: Bn, y: View);
        fn bn_relu_backward(g: View, x: View, bn: Bn, grad: Affine, dx: View, accumulate: bool);
        fn bn_relu_backward_sums(g: View, x: View, bn: Bn, grad: Affine, sums: Span);
        fn bn_relu_backward_data(g: View, x: View, bn: Bn, sums: (Span, usize), dx: View, accumulate: bool);
        fn bn_stats_combine(parts: Span, batch: usize, hw: usize, out: Moments);
        fn collective(op: Collective);
        fn dropout(x: View, p: f32, key: u64);
        fn avg_pool2(x: View, y: View);
        fn avg_pool2_backward(gy: View, gx: View);
        fn max_pool3(x: View, pre: Option<Bn>, y: View);
        fn max_pool3_backward(x: View, pre: Option<Bn>, gy: View, gx: View);
        fn global_avg_pool(x: View, y: Matrix);
        fn global_avg_pool_backward(gy: Matrix, gx: View);
        fn linear(x: Matrix, w: Matrix, b: Span, y: Matrix);
        fn linear_backward(x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span);
        fn softmax_xent(logits: Matrix, total: usize, out: Span, glogits: Matrix);
        fn scale_loss_grad(g: Matrix, scaler: Span);
        fn unscale_grads(grads: Span, scaler: Span);
        fn update_scale(scaler: Span);
        fn sgd(params: Span, grads: Span, momentum: Span, settings: Span, skip: Span, flag: Span);
    }
}

#[cfg(test)]
mod tests {
    use super::{Collective, DType, Library, Span};

    #[test]
    fn collectives_check_their_spans() {
        let (a, b, c) = (Span::f32(0, 4), Span::f32(16, 4), Span::f32(32, 12));
        assert_eq!(Collective::AllReduce { src: a, dst: a }.check(3), Ok(()));
        assert_eq!(Collective::AllReduce { src: a, dst: b }.check(3), Ok(()));
        assert_eq!(Collective::AllGather { src: a, dst: c }.check(3), Ok(()));
        assert_eq!(Collective::Broadcast(c).check(2), Ok(()));
        for bad in [
            Collective::AllReduce { src: a, dst: c },
            Collective::AllReduce { src: a, dst: Span::f32(8, 4) },
            Collective::AllGather { src: a, dst: c.at(0, 8) },
            Collective::AllGather { src: Span::f32(40, 4), dst: c },
            Collective::Broadcast(Span { dtype: DType::BF16, ..a }),
        ] {
            assert!(bad.check(3).is_err_and(|e| e.contains("does not fit a job of 3")), "{bad:?}");
        }
    }

    #[test]
    fn a_loaded_library_is_found_by_its_file_name() {
        let libc = Library::loaded("c", "2".into(), None, "libc.so");
        let path = libc.path.expect("the C library is mapped");
        assert!(path.rsplit('/').next().is_some_and(|f| f.starts_with("libc.so")), "{path}");
        assert_eq!(Library::loaded("x", String::new(), None, "libdoes-not-exist.so").path, None);
    }
}

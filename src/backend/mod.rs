//! The `Backend` trait: the primitive ops the model is written against, addressed by offsets into
//! one planned arena of `f32` (llm.c style). The CPU backend is the numerical reference.
//!
//! Activations are NCHW; a [`View`] is a channel slice of such a buffer: `c` channels of `h*w`
//! contiguous pixels per image, images `img_stride` floats apart. Dense-block layers read and
//! write channel slices of their block buffer in place, so no concatenation is ever copied.
//!
//! Aliasing contract: unless an op says otherwise, its output must not overlap its inputs.
//! Views of the same block buffer with disjoint channel ranges do not overlap.

pub mod cpu;
pub mod cuda;

pub use cpu::CpuBackend;

use crate::input::{Crop, Normalize};
use crate::Result;

/// A channel slice of an NCHW tensor in the arena.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct View {
    /// Arena offset of image 0, channel 0 of the slice.
    pub off: usize,
    /// Images.
    pub n: usize,
    /// Channels in the slice.
    pub c: usize,
    /// Height.
    pub h: usize,
    /// Width.
    pub w: usize,
    /// Floats between consecutive images (at least `c * h * w`).
    pub img_stride: usize,
    /// The planned tensor this view is part of (0: none). The planner gives each tensor its
    /// own tag and derived views keep it, so the plan audit ([`crate::model::audit`]) can tell
    /// two tensors that share memory apart.
    pub tag: u32,
}

impl View {
    /// A dense [n, c, h, w] tensor at `off`, untagged.
    pub fn dense(off: usize, n: usize, c: usize, h: usize, w: usize) -> View {
        View { off, n, c, h, w, img_stride: c * h * w, tag: 0 }
    }

    /// This view as part of planned tensor `tag`.
    pub fn tagged(self, tag: u32) -> View {
        View { tag, ..self }
    }

    /// The arena ranges `[start, end)` the view touches, one per image, in order.
    pub fn ranges(&self) -> impl Iterator<Item = (usize, usize)> + '_ {
        let len = self.c * self.hw();
        (0..self.n).map(move |i| (self.off + i * self.img_stride, self.off + i * self.img_stride + len))
    }

    /// Whether the two views share an arena float.
    pub fn overlaps(&self, other: &View) -> bool {
        if self.numel() == 0 || other.numel() == 0 || self.end() <= other.off || other.end() <= self.off {
            return false;
        }
        // Both lists of ranges are sorted: one merge walk.
        let (mut a, mut b) = (self.ranges().peekable(), other.ranges().peekable());
        while let (Some(&(a0, a1)), Some(&(b0, b1))) = (a.peek(), b.peek()) {
            if a0 < b1 && b0 < a1 {
                return true;
            }
            if a1 <= b1 {
                a.next();
            } else {
                b.next();
            }
        }
        false
    }

    /// Channels `[c0, c0 + c)` of this view.
    pub fn channels(self, c0: usize, c: usize) -> View {
        assert!(c0 + c <= self.c, "channel slice {c0}+{c} out of {}", self.c);
        View { off: self.off + c0 * self.h * self.w, c, ..self }
    }

    /// Images `[i, i + n)` of this view.
    pub fn images(self, i: usize, n: usize) -> View {
        assert!(i + n <= self.n, "images {i}+{n} out of {}", self.n);
        View { off: self.off + i * self.img_stride, n, ..self }
    }

    /// The first `n` images of this view.
    pub fn batch(self, n: usize) -> View {
        assert!(n <= self.n, "batch {n} larger than planned {}", self.n);
        View { n, ..self }
    }

    /// Pixels per channel plane.
    pub fn hw(&self) -> usize {
        self.h * self.w
    }

    /// Logical element count n*c*h*w.
    pub fn numel(&self) -> usize {
        self.n * self.c * self.hw()
    }

    /// One past the last arena float the view touches.
    pub fn end(&self) -> usize {
        if self.n == 0 {
            return self.off;
        }
        self.off + (self.n - 1) * self.img_stride + self.c * self.hw()
    }
}

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
}

/// Batch-norm operands: statistics (mean, biased variance) and affine parameters, as offsets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bn {
    /// Per-channel mean.
    pub mean: usize,
    /// Per-channel variance (biased batch variance in training, running variance in eval).
    pub var: usize,
    /// Scale (gamma).
    pub gamma: usize,
    /// Shift (beta).
    pub beta: usize,
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
#[derive(Clone, Debug, PartialEq, Eq)]
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

/// The primitive ops of a training step. All offsets index the backend's arena of `f32`.
pub trait Backend {
    /// What runs the ops, for messages ("cpu (2 threads)").
    fn describe(&self) -> String;
    /// Lays out the workspace for these convolution shapes at batches of up to `batch` input
    /// images of `image_len` floats each, and returns its length in arena floats (the layout is
    /// remembered for [`Backend::allocate`]).
    fn workspace_len(&mut self, convs: &[ConvShape], image_len: usize, batch: usize) -> Result<usize>;
    /// Allocates the zeroed arena (`len` floats) and the label buffer; `workspace` is the
    /// region reserved for [`Backend::workspace_len`]. Called once, before any op.
    fn allocate(&mut self, len: usize, workspace: (usize, usize), max_batch: usize) -> Result<()>;

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

    /// Copies host data into the arena.
    fn write(&mut self, off: usize, data: &[f32]);
    /// Copies arena data at `off` into `out`.
    fn read_into(&self, off: usize, out: &mut [f32]);
    /// Copies `len` floats of arena data to a new vector.
    fn read(&self, off: usize, len: usize) -> Vec<f32> {
        let mut out = vec![0.0; len];
        self.read_into(off, &mut out);
        out
    }
    /// Sets the labels of the current batch (class indices).
    fn set_labels(&mut self, labels: &[u32]);
    /// `dst = src` (same shape).
    fn copy(&mut self, src: View, dst: View);
    /// Writes the network input `dst` (dense [n, 3, h, w]) from stored images (`bytes`, n of
    /// 3 x h x w, the size `dst` says): image i cut through window `crops[i]` of its
    /// zero-padded copy and normalized by `norm`, as [`Crop::apply`] does.
    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, dst: View);

    /// `y = conv(pre(x), w)`; `w` is [cout, cin, k, k]; `pre` = `Some(bn)` applies
    /// `relu(bn(.))` to the input on the fly (the same arithmetic as [`Backend::bn_relu`]),
    /// so the normalized input is never stored.
    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: usize, y: View, spec: ConvSpec);
    /// `gx = conv_transpose(gy, w)` (overwrites gx).
    fn conv_backward_data(&mut self, gy: View, w: usize, gx: View, spec: ConvSpec);
    /// `gw = dL/dw` summed over the batch (overwrites gw), for the input `pre(x)` as in
    /// [`Backend::conv_forward`].
    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: usize, spec: ConvSpec);

    /// Per-channel batch mean and biased variance of `x` into `mean[c]`, `var[c]`.
    fn bn_stats(&mut self, x: View, mean: usize, var: usize);
    /// `running = (1 - m) * running + m * batch`, the variance unbiased with `count` samples;
    /// sets the float at `flag` to 1 when an updated value is not finite (never clears it).
    #[allow(clippy::too_many_arguments)]
    fn bn_update_running(
        &mut self,
        mean: usize,
        var: usize,
        running_mean: usize,
        running_var: usize,
        c: usize,
        count: usize,
        momentum: f32,
        flag: usize,
    );
    /// `y = relu(gamma * (x - mean) / sqrt(var + eps) + beta)`.
    fn bn_relu(&mut self, x: View, bn: Bn, y: View);
    /// Backward of [`Backend::bn_relu`] with batch statistics: the ReLU mask is recomputed
    /// from `x`; writes `dgamma`, `dbeta`; `dx = ...` or `dx += ...` when `accumulate`.
    /// `dx` may be the same view as `g` (in place); otherwise no overlap.
    #[allow(clippy::too_many_arguments)]
    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, dgamma: usize, dbeta: usize, dx: View, accumulate: bool);
    /// In place: `x *= mask / (1 - p)` with the mask from stream `key` (element index is the
    /// logical NCHW index in the view). The same call is its own backward.
    fn dropout(&mut self, x: View, p: f32, key: u64);

    /// 2x2 average pool, stride 2.
    fn avg_pool2(&mut self, x: View, y: View);
    /// Backward of [`Backend::avg_pool2`] (overwrites gx).
    fn avg_pool2_backward(&mut self, gy: View, gx: View);
    /// 3x3 max pool, stride 2, pad 1 (padding never wins).
    fn max_pool3(&mut self, x: View, y: View);
    /// Backward of [`Backend::max_pool3`]: the first maximum of each window gets the gradient.
    fn max_pool3_backward(&mut self, x: View, gy: View, gx: View);
    /// Mean over each channel plane into `y` [n, c].
    fn global_avg_pool(&mut self, x: View, y: usize);
    /// Backward of [`Backend::global_avg_pool`] (overwrites gx).
    fn global_avg_pool_backward(&mut self, gy: usize, gx: View);

    /// `y[n, k] = x[n, :] . w[k, :] + b[k]`.
    #[allow(clippy::too_many_arguments)]
    fn linear(&mut self, x: usize, w: usize, b: usize, y: usize, n: usize, cin: usize, cout: usize);
    /// Backward of [`Backend::linear`]: overwrites gx, gw, gb.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &mut self,
        x: usize,
        w: usize,
        gy: usize,
        gx: usize,
        gw: usize,
        gb: usize,
        n: usize,
        cin: usize,
        cout: usize,
    );
    /// Softmax cross-entropy against the current labels, mean over the batch: writes
    /// `out[0]` = loss, `out[1]` = top-1 correct count, and `glogits` = dloss/dlogits.
    fn softmax_xent(&mut self, logits: usize, n: usize, k: usize, out: usize, glogits: usize);
    /// The settings of the SGD steps that follow, given before a step begins (a backend that
    /// records steps reads them from its arena, so a recorded step follows changes).
    fn set_sgd(&mut self, _hp: Sgd) {}
    /// One SGD step over `len` floats at `params`, with gradients and momentum at the same
    /// relative layout; sets the float at `flag` to 1 when an updated parameter or momentum
    /// value is not finite (never clears it).
    #[allow(clippy::too_many_arguments)]
    fn sgd(&mut self, params: usize, grads: usize, momentum: usize, len: usize, hp: Sgd, flag: usize);
}

/// A boxed backend is a backend: the commands open one `Box<dyn Backend>` (CPU, host device or
/// GPU) and are compiled once, not once per backend type. An op is a coarse call (a whole
/// convolution, a BN over a block), so the virtual call costs nothing measurable. Every method
/// forwards, the defaulted ones too.
impl<B: Backend + ?Sized> Backend for Box<B> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    fn workspace_len(&mut self, convs: &[ConvShape], image_len: usize, batch: usize) -> Result<usize> {
        (**self).workspace_len(convs, image_len, batch)
    }
    fn allocate(&mut self, len: usize, workspace: (usize, usize), max_batch: usize) -> Result<()> {
        (**self).allocate(len, workspace, max_batch)
    }
    fn device_memory(&self) -> Option<DeviceMemory> {
        (**self).device_memory()
    }
    fn take_error(&self) -> Result<()> {
        (**self).take_error()
    }
    fn step_begin(&mut self, key: u64) -> bool {
        (**self).step_begin(key)
    }
    fn step_end(&mut self, key: u64) {
        (**self).step_end(key)
    }
    fn graphs(&self) -> Option<String> {
        (**self).graphs()
    }
    fn algorithm_record(&self) -> Option<String> {
        (**self).algorithm_record()
    }
    fn reuse_algorithm_record(&mut self, record: &str) -> Result<usize> {
        (**self).reuse_algorithm_record(record)
    }
    fn algorithm_searches(&self) -> usize {
        (**self).algorithm_searches()
    }
    fn libraries(&self) -> Vec<Library> {
        (**self).libraries()
    }
    fn write(&mut self, off: usize, data: &[f32]) {
        (**self).write(off, data)
    }
    fn read_into(&self, off: usize, out: &mut [f32]) {
        (**self).read_into(off, out)
    }
    fn read(&self, off: usize, len: usize) -> Vec<f32> {
        (**self).read(off, len)
    }
    fn set_labels(&mut self, labels: &[u32]) {
        (**self).set_labels(labels)
    }
    fn copy(&mut self, src: View, dst: View) {
        (**self).copy(src, dst)
    }
    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, dst: View) {
        (**self).augment(bytes, crops, norm, dst)
    }
    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: usize, y: View, spec: ConvSpec) {
        (**self).conv_forward(x, pre, w, y, spec)
    }
    fn conv_backward_data(&mut self, gy: View, w: usize, gx: View, spec: ConvSpec) {
        (**self).conv_backward_data(gy, w, gx, spec)
    }
    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: usize, spec: ConvSpec) {
        (**self).conv_backward_filter(x, pre, gy, gw, spec)
    }
    fn bn_stats(&mut self, x: View, mean: usize, var: usize) {
        (**self).bn_stats(x, mean, var)
    }
    fn bn_update_running(
        &mut self,
        mean: usize,
        var: usize,
        running_mean: usize,
        running_var: usize,
        c: usize,
        count: usize,
        momentum: f32,
        flag: usize,
    ) {
        (**self).bn_update_running(mean, var, running_mean, running_var, c, count, momentum, flag)
    }
    fn bn_relu(&mut self, x: View, bn: Bn, y: View) {
        (**self).bn_relu(x, bn, y)
    }
    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, dgamma: usize, dbeta: usize, dx: View, accumulate: bool) {
        (**self).bn_relu_backward(g, x, bn, dgamma, dbeta, dx, accumulate)
    }
    fn dropout(&mut self, x: View, p: f32, key: u64) {
        (**self).dropout(x, p, key)
    }
    fn avg_pool2(&mut self, x: View, y: View) {
        (**self).avg_pool2(x, y)
    }
    fn avg_pool2_backward(&mut self, gy: View, gx: View) {
        (**self).avg_pool2_backward(gy, gx)
    }
    fn max_pool3(&mut self, x: View, y: View) {
        (**self).max_pool3(x, y)
    }
    fn max_pool3_backward(&mut self, x: View, gy: View, gx: View) {
        (**self).max_pool3_backward(x, gy, gx)
    }
    fn global_avg_pool(&mut self, x: View, y: usize) {
        (**self).global_avg_pool(x, y)
    }
    fn global_avg_pool_backward(&mut self, gy: usize, gx: View) {
        (**self).global_avg_pool_backward(gy, gx)
    }
    fn linear(&mut self, x: usize, w: usize, b: usize, y: usize, n: usize, cin: usize, cout: usize) {
        (**self).linear(x, w, b, y, n, cin, cout)
    }
    fn linear_backward(
        &mut self,
        x: usize,
        w: usize,
        gy: usize,
        gx: usize,
        gw: usize,
        gb: usize,
        n: usize,
        cin: usize,
        cout: usize,
    ) {
        (**self).linear_backward(x, w, gy, gx, gw, gb, n, cin, cout)
    }
    fn softmax_xent(&mut self, logits: usize, n: usize, k: usize, out: usize, glogits: usize) {
        (**self).softmax_xent(logits, n, k, out, glogits)
    }
    fn set_sgd(&mut self, hp: Sgd) {
        (**self).set_sgd(hp)
    }
    fn sgd(&mut self, params: usize, grads: usize, momentum: usize, len: usize, hp: Sgd, flag: usize) {
        (**self).sgd(params, grads, momentum, len, hp, flag)
    }
}

#[cfg(test)]
mod tests {
    use super::Library;

    #[test]
    fn a_loaded_library_is_found_by_its_file_name() {
        let libc = Library::loaded("c", "2".into(), None, "libc.so");
        let path = libc.path.expect("the C library is mapped");
        assert!(path.rsplit('/').next().is_some_and(|f| f.starts_with("libc.so")), "{path}");
        assert_eq!(Library::loaded("x", String::new(), None, "libdoes-not-exist.so").path, None);
    }
}

//! [`CudaBackend`]: every [`Backend`] op as launches of our kernels and [`Exec`] convolutions,
//! on one planned arena.
//!
//! The device allocation is the plan's arena followed by the labels (the plan counts both).
//! The plan's convolution workspace region holds, in order: the fused-BN scratch (cuDNN cannot
//! apply BN-ReLU while loading its input, so `pre` is applied into it first, [`FUSED_CHUNK`]
//! images at a time; between steps it also stages the input batch) and the executor's
//! convolution workspace.

use super::launch::{Arg, Args, Exec, Launch};
use crate::backend::{
    Affine, Backend, Bn, Collective, ConvShape, ConvSpec, DType, DeviceMemory, LossScale, Matrix, Moments, Span, View,
};
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::elem::{by_dtype, Elem};
use crate::input::{Crop, Normalize, CHANNELS, LEVELS, PAD};
use crate::Result;
use std::cell::RefCell;

/// Threads per block of every launch (kernels/dn.cuh `DN_BLOCK`).
const BLOCK: u32 = 256;
/// Images per convolution call when a BN-ReLU is applied to the input first: the scratch
/// holds this many normalized images instead of the whole batch, at the cost of more cuDNN
/// calls per fused convolution (`batch / FUSED_CHUNK`).
pub const FUSED_CHUNK: usize = 16;
/// Shared bytes of the block reductions: two f64 per thread.
const REDUCE_SHARED: u32 = 2 * size_of::<f64>() as u32 * BLOCK;
/// Bytes of the input batch packed into one staged word.
const WORD_BYTES: usize = size_of::<u32>();
/// Staged words of one image's crop window: top, left and flip (kernels/input.cu).
const CROP_WORDS: usize = 3;
/// Staged words of the normalization table: a float per channel and byte value
/// ([`Normalize::table`]).
const TABLE_WORDS: usize = CHANNELS * LEVELS;

/// The CUDA backend over an executor (a GPU or the host device).
pub struct CudaBackend<E: Exec> {
    exec: E,
    /// Bytes of the plan's arena.
    len: usize,
    /// Bytes of the fused-BN scratch: the largest convolution input of [`FUSED_CHUNK`]
    /// images (in its storage type), or the staged input batch if larger.
    pre_bytes: usize,
    /// Bytes of the executor's convolution workspace.
    conv_len: usize,
    /// Byte offsets of the scratch and of the labels, after the plan's arena (set by
    /// `allocate`).
    pre: usize,
    labels: usize,
    max_batch: usize,
    n_labels: usize,
    /// The first error since the last `take_error` (reads keep it through `&self`).
    error: RefCell<Option<crate::Error>>,
    /// Whether training steps are recorded once and replayed (CUDA graphs).
    graphs: bool,
    /// How the training steps ran so far (see [`Backend::graphs`]).
    graph_state: GraphState,
    /// Host words of the input batch on their way to the device (reused).
    staging: Vec<u32>,
}

/// How training steps have run, for [`Backend::graphs`].
#[derive(Clone, Debug, PartialEq)]
enum GraphState {
    /// No step has been replayed yet.
    NotReplayed,
    /// A recorded step has been replayed.
    Replayed,
    /// Recording or capturing failed: steps run op by op; why.
    FellBack(String),
}

/// The instance of kernel `$base` (a `DN_STORAGE_KERNELS` template, kernels/dn.cuh) for
/// tensors of element type `$dtype`.
macro_rules! typed {
    ($base:literal, $dtype:expr) => {
        match $dtype {
            DType::F32 => concat!($base, "_f32"),
            DType::BF16 => concat!($base, "_bf16"),
            DType::F16 => concat!($base, "_f16"),
        }
    };
}

/// Writes `data` to the device at byte `off` as elements of `T` (rounded).
fn write_elems<T: Elem>(exec: &mut impl Exec, off: usize, data: &[f32]) -> Result<()> {
    match T::F32 {
        true => exec.write(off, bytemuck::cast_slice(data)),
        false => exec.write(off, bytemuck::cast_slice(&data.iter().map(|&v| T::put(v)).collect::<Vec<T>>())),
    }
}

/// Reads `out.len()` elements of `T` at byte `off` of the device into `out`, widened.
fn read_elems<T: Elem>(exec: &impl Exec, off: usize, out: &mut [f32]) -> Result<()> {
    if T::F32 {
        return exec.read_into(off, bytemuck::cast_slice_mut(out));
    }
    let mut elems = vec![T::put(0.0); out.len()];
    exec.read_into(off, bytemuck::cast_slice_mut(&mut elems))?;
    out.iter_mut().zip(&elems).for_each(|(o, e)| *o = e.get());
    Ok(())
}

/// A 1-D launch configuration covering `total` threads.
fn grid(total: usize) -> [u32; 3] {
    [total.div_ceil(BLOCK as usize).max(1) as u32, 1, 1]
}

/// The words of a staged input batch of `batch` images of `image_len` bytes: the bytes,
/// [`WORD_BYTES`] to a word, the crop windows and the normalization table.
fn staged_words(batch: usize, image_len: usize) -> usize {
    batch * (image_len.div_ceil(WORD_BYTES) + CROP_WORDS) + TABLE_WORDS
}

impl<E: Exec> CudaBackend<E> {
    /// A backend running on `exec`.
    pub fn new(exec: E) -> Self {
        CudaBackend {
            exec,
            len: 0,
            pre_bytes: 0,
            conv_len: 0,
            pre: 0,
            labels: 0,
            max_batch: 0,
            n_labels: 0,
            error: RefCell::new(None),
            graphs: true,
            graph_state: GraphState::NotReplayed,
            staging: Vec::new(),
        }
    }

    /// Turns the recording and replay of training steps (CUDA graphs) on or off; on by
    /// default, off issues every op of every step (for debugging and profiling).
    pub fn set_graphs(&mut self, on: bool) {
        self.graphs = on;
    }

    /// Keeps the first error of an op (reported by [`Backend::take_error`]).
    fn keep_error(&self, r: Result<()>) {
        let mut slot = self.error.borrow_mut();
        if let (Err(e), None) = (r, &*slot) {
            *slot = Some(e);
        }
    }

    /// Launches `kernel` with [`BLOCK`] threads per block.
    fn launch(&mut self, kernel: &'static str, grid: [u32; 3], shared: u32, args: Args) {
        let r = self.exec.launch(&Launch { kernel, grid, block: [BLOCK, 1, 1], shared, args: &args.0 });
        self.keep_error(r);
    }

    /// Flattened elementwise launch over `total` elements.
    fn launch_flat(&mut self, kernel: &'static str, total: usize, args: Args) {
        self.launch(kernel, grid(total), 0, args);
    }

    fn check_view(&self, v: View) {
        assert!(v.end() <= self.len, "view {v:?} outside the arena ({})", self.len);
        assert!(v.n <= 1 || v.img_stride >= v.c * v.hw(), "view {v:?} has overlapping images");
    }

    /// The spans of `bn`, checked to hold `c` channels.
    fn bn_spans(bn: Bn, c: usize) -> [Span; 4] {
        assert!(bn.spans().iter().all(|s| s.len == c), "BN operands {bn:?} for {c} channels");
        bn.spans()
    }

    /// `relu(bn(x))` into `y`.
    fn launch_bn_relu(&mut self, x: View, bn: Bn, y: View) {
        let args = Args::new().view(x).view(y).ints([x.n, x.c, x.hw()]).spans(Self::bn_spans(bn, x.c));
        self.launch_flat(typed!("bn_relu", x.dtype), x.numel(), args);
    }

    /// BN-ReLU backward (`kernels/bn.cu`) in `mode`: 0 the sums into `grad`, then dx; 1 the
    /// sums into `grad` and `sums`; 2 dx from `sums`, the sums over `count` values; with `out`
    /// = (dx, accumulate).
    fn launch_bn_backward(
        &mut self,
        g: View,
        x: View,
        bn: Bn,
        (mode, grad, sums): (usize, Affine, Option<(Span, usize)>),
        out: Option<(View, bool)>,
    ) {
        // Without `out`, dx is never written: g stands in for it; without `sums`, `grad`.
        let (dx, accumulate) = out.unwrap_or((g, false));
        let (sums, count) = sums.unwrap_or((grad.gamma, 0));
        for v in [g, x, dx] {
            self.check_view(v);
        }
        assert!(!(dx.off == g.off && accumulate), "in-place BN backward cannot accumulate");
        let args = Args::new()
            .view(g)
            .view(x)
            .view(dx)
            .ints([x.n, x.hw()])
            .spans(Self::bn_spans(bn, x.c))
            .spans([grad.gamma, grad.beta, sums])
            .ints([accumulate as usize, mode])
            .u64(count);
        self.launch(typed!("bn_relu_backward", x.dtype), [x.c as u32, 1, 1], REDUCE_SHARED, args);
    }

    /// A pooling kernel's arguments: each view's buffer and image stride, then the sizes
    /// `n, c, h, w` of the input side `input`.
    fn pool_args(&self, views: &[View], input: View) -> Args {
        let mut args = Args::new();
        for &v in views {
            self.check_view(v);
            args = args.view(v);
        }
        args.ints([input.n, input.c, input.h, input.w])
    }

    /// A max pool over `threads` elements of input `x` (the sides in `views`), reading
    /// `pre(x)`: `int pre`, then the BN's spans as `bn_relu` takes them (empty, never read,
    /// without one).
    fn max_pool(&mut self, kernel: &'static str, views: &[View], x: View, pre: Option<Bn>, threads: usize) {
        let args = self.pool_args(views, x);
        let args = match pre {
            Some(bn) => args.ints([1]).spans(Self::bn_spans(bn, x.c)),
            None => args.ints([0]).spans([Span::f32(0, 0); 4]),
        };
        self.launch_flat(kernel, threads, args);
    }

    /// Calls `conv(self, input, first, i, n)` for each chunk of images `[i, i + n)` of `x`:
    /// the input is `x`'s images (all at once) or, with a `pre` BN-ReLU, up to [`FUSED_CHUNK`]
    /// of them normalized into the scratch; `first` is true for the first call.
    fn chunks(&mut self, x: View, pre: Option<Bn>, mut conv: impl FnMut(&mut Self, View, bool, usize, usize)) {
        let Some(bn) = pre else { return conv(self, x, true, 0, x.n) };
        for i in (0..x.n).step_by(FUSED_CHUNK) {
            let n = FUSED_CHUNK.min(x.n - i);
            let xs = x.images(i, n);
            assert!(xs.numel() * x.dtype.size() <= self.pre_bytes, "fused input {xs:?} larger than the scratch");
            let scratch = View { dtype: x.dtype, ..View::dense(self.pre, n, x.c, x.h, x.w) };
            self.launch_bn_relu(xs, bn, scratch);
            conv(self, scratch, i == 0, i, n);
        }
    }
}

impl<E: Exec> Backend for CudaBackend<E> {
    fn describe(&self) -> String {
        self.exec.describe()
    }

    fn stores(&self, dtype: DType) -> bool {
        self.exec.stores(dtype)
    }

    fn workspace_len(&mut self, convs: &[ConvShape], image_len: usize, batch: usize) -> Result<usize> {
        // Fused inputs, FUSED_CHUNK images at a time; the input batch is staged here too.
        let fused =
            FUSED_CHUNK.min(batch) * convs.iter().map(|s| s.cin * s.h * s.w * s.dtype.size()).max().unwrap_or(0);
        // Whole words, so that the convolution workspace after it stays f32-aligned.
        self.pre_bytes = fused.max(staged_words(batch, image_len) * WORD_BYTES).next_multiple_of(WORD_BYTES);
        self.conv_len = self.exec.conv_workspace_len(convs, batch)?;
        Ok(self.pre_bytes + self.conv_len)
    }

    fn allocate(&mut self, len: usize, workspace: Span, max_batch: usize) -> Result<()> {
        assert_eq!(workspace.bytes(), self.pre_bytes + self.conv_len, "workspace not laid out by workspace_len");
        self.pre = workspace.off;
        self.labels = len;
        self.max_batch = max_batch;
        self.len = len;
        let conv_ws = Span::f32(self.pre + self.pre_bytes, self.conv_len / DType::F32.size());
        self.exec.allocate(len + max_batch * std::mem::size_of::<u32>(), conv_ws)
    }

    fn device_memory(&self) -> Option<DeviceMemory> {
        Some(self.exec.memory())
    }

    fn take_error(&self) -> Result<()> {
        match self.error.borrow_mut().take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn step_begin(&mut self, key: u64) -> bool {
        if !self.graphs {
            return false;
        }
        match self.exec.replay(key) {
            Ok(true) => {
                if self.graph_state == GraphState::NotReplayed {
                    self.graph_state = GraphState::Replayed;
                }
                return true;
            }
            Ok(false) => {}
            Err(e) => {
                self.keep_error(Err(e));
                return true;
            }
        }
        if let Err(e) = self.exec.capture_begin() {
            log::warn!("running steps without graphs: {e}");
            self.graph_state = GraphState::FellBack(e.to_string());
            self.graphs = false;
        }
        false
    }

    fn step_end(&mut self, key: u64) {
        if !self.graphs {
            return;
        }
        match self.exec.capture_end(key) {
            Ok(None) => {}
            Ok(Some(why)) => {
                log::warn!("this training step is replayed without a CUDA graph: {why}");
                self.graph_state = GraphState::FellBack(why);
            }
            Err(e) => self.keep_error(Err(e)),
        }
    }

    fn algorithm_record(&self) -> Option<String> {
        self.exec.algorithm_record()
    }

    fn reuse_algorithm_record(&mut self, record: &str) -> Result<usize> {
        self.exec.reuse_algorithm_record(record)
    }

    fn algorithm_searches(&self) -> usize {
        self.exec.algorithm_searches()
    }

    fn libraries(&self) -> Vec<crate::backend::Library> {
        self.exec.libraries()
    }

    fn graphs(&self) -> Option<String> {
        Some(match (&self.graph_state, self.graphs) {
            (GraphState::FellBack(why), _) => format!("fell back: {why}"),
            (_, false) => "eager".into(),
            (GraphState::Replayed, true) => "replayed".into(),
            (GraphState::NotReplayed, true) => "not replayed".into(),
        })
    }

    fn write(&mut self, dst: Span, data: &[f32]) {
        assert_eq!(dst.len, data.len(), "a write of {} values to {dst:?}", data.len());
        let r = by_dtype!(dst.dtype, write_elems(&mut self.exec, dst.off, data));
        self.keep_error(r);
    }

    fn read_into(&self, src: Span, out: &mut [f32]) {
        assert_eq!(src.len, out.len(), "a read of {} values from {src:?}", out.len());
        let r = by_dtype!(src.dtype, read_elems(&self.exec, src.off, out));
        if r.is_err() {
            out.fill(f32::NAN);
        }
        self.keep_error(r);
    }

    fn set_labels(&mut self, labels: &[u32]) {
        assert!(labels.len() <= self.max_batch, "more labels than the planned batch");
        self.n_labels = labels.len();
        let r = self.exec.write(self.labels, bytemuck::cast_slice(labels));
        self.keep_error(r);
    }

    fn copy(&mut self, src: View, dst: View) {
        assert_eq!((src.n, src.c, src.h, src.w), (dst.n, dst.c, dst.h, dst.w));
        self.check_view(src);
        self.check_view(dst);
        let len = src.c * src.hw();
        let args = Args::new().view(src).view(dst).ints([src.n]).u64(len);
        self.launch_flat(typed!("copy_images", src.dtype), src.n * len, args);
    }

    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, scale: usize, dst: View) {
        self.check_view(dst);
        assert!(
            scale > 0 && dst.h.is_multiple_of(scale) && dst.w.is_multiple_of(scale),
            "{dst:?} not upsampled by {scale}"
        );
        let (n, h, w) = (dst.n, dst.h / scale, dst.w / scale);
        assert!(
            dst.img_stride == dst.c * dst.hw() && bytes.len() == n * dst.c * h * w && crops.len() == n,
            "augment shapes"
        );
        assert!(dst.c == CHANNELS, "{} input channels", dst.c);
        // Bytes, crops and the table go to the fused-BN scratch, unused between steps.
        let s = &mut self.staging;
        s.clear();
        s.extend(bytes.chunks(WORD_BYTES).map(|b| b.iter().rev().fold(0, |w, &v| w << 8 | v as u32)));
        let crop_off = s.len();
        s.extend(crops.iter().flat_map(|c| [c.top as u32, c.left as u32, c.flip as u32]));
        let table_off = s.len();
        s.extend(norm.table().iter().map(|v| v.to_bits()));
        let total = s.len();
        assert!(total * WORD_BYTES <= self.pre_bytes, "the input batch does not fit the scratch");
        let r = self.exec.write(self.pre, bytemuck::cast_slice(&self.staging));
        self.keep_error(r);
        let word = |i: usize| self.pre + i * WORD_BYTES;
        let args = Args::new()
            .words(self.pre, crop_off)
            .words(word(crop_off), table_off - crop_off)
            .words(word(table_off), total - table_off)
            .view_buf(dst)
            .ints([n, h, w, scale, PAD]);
        self.launch_flat(typed!("augment", dst.dtype), dst.numel(), args);
    }

    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: Span, y: View, spec: ConvSpec) {
        self.check_view(x);
        self.check_view(y);
        self.chunks(x, pre, |be, input, _, i, n| {
            let r = be.exec.conv_forward(input, w, y.images(i, n), spec);
            be.keep_error(r);
        });
    }

    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) {
        self.check_view(gy);
        self.check_view(gx);
        let r = self.exec.conv_backward_data(gy, w, gx, spec);
        self.keep_error(r);
    }

    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: Span, spec: ConvSpec, accumulate: bool) {
        self.check_view(x);
        self.check_view(gy);
        self.chunks(x, pre, |be, input, first, i, n| {
            let r = be.exec.conv_backward_filter(input, gy.images(i, n), gw, spec, accumulate || !first);
            be.keep_error(r);
        });
    }

    fn bn_stats(&mut self, x: View, out: Moments) {
        self.check_view(x);
        assert!(out.mean.len == x.c && out.var.len == x.c, "{} channels into {out:?}", x.c);
        let args = Args::new().view_buf(x).ints([x.n, x.hw()]).u64(x.img_stride).spans([out.mean, out.var]);
        self.launch(typed!("bn_stats", x.dtype), [x.c as u32, 1, 1], REDUCE_SHARED, args);
    }

    fn bn_update_running(&mut self, batch: Moments, running: Moments, count: usize, momentum: f32, flag: Span) {
        let c = batch.mean.len;
        let unbias = count as f32 / (count.max(2) - 1) as f32;
        let args = Args::new()
            .spans([batch.mean, batch.var, running.mean, running.var])
            .ints([c])
            .f32(unbias)
            .f32(momentum)
            .spans([flag]);
        self.launch_flat("bn_update_running", c, args);
    }

    fn bn_relu(&mut self, x: View, bn: Bn, y: View) {
        self.check_view(x);
        self.check_view(y);
        self.launch_bn_relu(x, bn, y);
    }

    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, grad: Affine, dx: View, accumulate: bool) {
        self.launch_bn_backward(g, x, bn, (0, grad, None), Some((dx, accumulate)));
    }

    fn bn_relu_backward_sums(&mut self, g: View, x: View, bn: Bn, grad: Affine, sums: Span) {
        self.launch_bn_backward(g, x, bn, (1, grad, Some((sums, 0))), None);
    }

    fn bn_relu_backward_data(
        &mut self,
        g: View,
        x: View,
        bn: Bn,
        (sums, count): (Span, usize),
        dx: View,
        accumulate: bool,
    ) {
        // The sums are read, the parameters' gradients not touched: `sums` stands in for them.
        let unused = Affine { gamma: sums.at(0, x.c), beta: sums.at(x.c, x.c) };
        self.launch_bn_backward(g, x, bn, (2, unused, Some((sums, count))), Some((dx, accumulate)));
    }

    fn bn_stats_combine(&mut self, parts: Span, batch: usize, hw: usize, out: Moments) {
        let c = out.mean.len;
        assert!(c > 0 && parts.len.is_multiple_of(2 * c) && out.var.len == c, "combining {parts:?} into {out:?}");
        let world = parts.len / (2 * c);
        let args = Args::new().spans([parts]).ints([c, world, batch, hw]).spans([out.mean, out.var]);
        self.launch_flat("bn_stats_combine", c, args);
    }

    fn collective(&mut self, op: Collective) {
        let r = self.exec.collective(op);
        self.keep_error(r);
    }

    fn join(&mut self, links: Links) -> Result<()> {
        self.exec.join(links)
    }

    fn group(&self) -> Option<Group> {
        self.exec.group()
    }

    fn dropout(&mut self, x: View, p: f32, key: u64) {
        self.check_view(x);
        let len = x.c * x.hw();
        let keep = 1.0 / (1.0 - p);
        let args = Args::new().view(x).ints([x.n]).u64(len).f32(p).f32(keep).arg(Arg::U64(key));
        self.launch_flat(typed!("dropout", x.dtype), x.n * len, args);
    }

    fn avg_pool2(&mut self, x: View, y: View) {
        let args = self.pool_args(&[x, y], x);
        self.launch_flat(typed!("avg_pool2", x.dtype), y.numel(), args);
    }

    fn avg_pool2_backward(&mut self, gy: View, gx: View) {
        let args = self.pool_args(&[gy, gx], gx);
        self.launch_flat(typed!("avg_pool2_backward", gx.dtype), gx.numel(), args);
    }

    fn max_pool3(&mut self, x: View, pre: Option<Bn>, y: View) {
        self.max_pool(typed!("max_pool3", x.dtype), &[x, y], x, pre, y.numel());
    }

    fn max_pool3_backward(&mut self, x: View, pre: Option<Bn>, gy: View, gx: View) {
        self.max_pool(typed!("max_pool3_backward", x.dtype), &[x, gy, gx], x, pre, x.numel());
    }

    fn global_avg_pool(&mut self, x: View, y: Matrix) {
        self.check_view(x);
        let args = Args::new().view(x).spans([y.data]).ints([x.n, x.c, x.hw()]);
        self.launch_flat(typed!("global_avg_pool", x.dtype), x.n * x.c, args);
    }

    fn global_avg_pool_backward(&mut self, gy: Matrix, gx: View) {
        self.check_view(gx);
        let args = Args::new().spans([gy.data]).view(gx).ints([gx.n, gx.c, gx.hw()]);
        self.launch_flat(typed!("global_avg_pool_backward", gx.dtype), gx.numel(), args);
    }

    fn linear(&mut self, x: Matrix, w: Matrix, b: Span, y: Matrix) {
        let (n, cin, cout) = (x.rows, x.cols, w.rows);
        let args = Args::new().spans([x.data, w.data, b, y.data]).ints([n, cin, cout]);
        self.launch_flat("linear", n * cout, args);
    }

    fn linear_backward(&mut self, x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span) {
        let (n, cin, cout) = (x.rows, x.cols, w.rows);
        let args = Args::new().spans([x.data, gy.data, gw.data, gb]).ints([n, cin, cout]);
        self.launch_flat("linear_backward_params", cout * cin + cout, args);
        let args = Args::new().spans([w.data, gy.data, gx.data]).ints([n, cin, cout]);
        self.launch_flat("linear_backward_data", n * cin, args);
    }

    fn softmax_xent(&mut self, logits: Matrix, total: usize, out: Span, glogits: Matrix) {
        let (n, k) = (logits.rows, logits.cols);
        assert_eq!(self.n_labels, n, "labels for {} images, batch of {n}", self.n_labels);
        let args =
            Args::new().spans([logits.data]).words(self.labels, n).spans([out, glogits.data]).ints([n, k, total]);
        self.launch("softmax_xent", [1, 1, 1], REDUCE_SHARED, args);
    }

    fn scale_loss_grad(&mut self, g: Matrix, scaler: Span) {
        let len = g.rows * g.cols;
        self.launch_flat("scale_loss_grad", len, Args::new().spans([g.data]).u64(len).spans([scaler]));
    }

    fn unscale_grads(&mut self, grads: Span, scaler: Span) {
        self.launch("clear_found", [1, 1, 1], 0, Args::new().spans([scaler]));
        self.launch_flat("unscale_grads", grads.len, Args::new().spans([grads]).u64(grads.len).spans([scaler]));
    }

    fn update_scale(&mut self, scaler: Span) {
        let interval = LossScale::GROWTH_INTERVAL as usize;
        self.launch("update_scale", [1, 1, 1], 0, Args::new().spans([scaler]).ints([interval]));
    }

    fn sgd(&mut self, params: Span, grads: Span, momentum: Span, settings: Span, skip: Span, flag: Span) {
        // The kernel reads the settings and `skip` from the arena, so a recorded step follows
        // changes.
        let len = params.len;
        assert!(grads.len == len && momentum.len == len, "SGD spans of different lengths");
        let args = Args::new().spans([params, grads, momentum]).u64(len).spans([settings, skip, flag]);
        self.launch_flat("sgd", len, args);
    }
}

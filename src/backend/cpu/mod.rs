//! The CPU backend: f32 arithmetic on tensors stored in f32 (or, for the ops converted so far,
//! bf16 and f16: `elem`), rayon over images or channels, AVX2+FMA kernels for convolutions and
//! batch norm (the `gemm` crate and plain loops on other CPUs). It is the numerical reference
//! every other backend is checked against.
//!
//! Work splits are fixed (images into one contiguous chunk per thread, in order), so results
//! are bitwise reproducible run to run for a given thread count.

mod bnvec;
mod conv;
mod elementwise;
mod linear;
mod loss;
mod matmul;
mod norm;
mod pool;
mod sgd;

use super::Collective;
use super::{Affine, Backend, Bn, ConvShape, ConvSpec, DType, LossScale, Matrix, Moments, Sgd, Span, View};
use crate::comm::host::HostComm;
use crate::comm::rendezvous::Links;
use crate::comm::Group;
use crate::elem::by_dtype;
use crate::input::{Crop, Normalize};
use crate::{bail, Error, Result};
use conv::Workspace;
use norm::Sums;
use std::cell::Cell;

/// Raw arena pointer shared by rayon tasks. Every op documents which regions it writes; tasks
/// write disjoint planes, channels or chunks.
#[derive(Clone, Copy)]
pub(crate) struct Ptr(*mut f32);
// SAFETY: the pointer is only dereferenced inside ops whose tasks touch disjoint memory.
unsafe impl Send for Ptr {}
// SAFETY: as for `Send`: tasks sharing it write disjoint memory, and none reads what another writes.
unsafe impl Sync for Ptr {}

impl Ptr {
    /// Pointer to arena float `off` (dereferencing it is the caller's unsafe business).
    #[inline]
    pub(crate) fn at(self, off: usize) -> *mut f32 {
        self.0.wrapping_add(off)
    }

    /// Shared slice of `len` floats at `off`.
    ///
    /// # Safety
    /// No live mutable slice may overlap it.
    #[inline]
    pub(crate) unsafe fn get<'a>(self, off: usize, len: usize) -> &'a [f32] {
        std::slice::from_raw_parts(self.at(off), len)
    }

    /// Mutable slice of `len` floats at `off`.
    ///
    /// # Safety
    /// No other live slice may overlap it.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn get_mut<'a>(self, off: usize, len: usize) -> &'a mut [f32] {
        std::slice::from_raw_parts_mut(self.at(off), len)
    }

    /// Shared slice of `len` elements of type `T` at element `off` of an arena of `T` (a
    /// tensor's: [`Ptr::plane_off`] counts in its elements).
    ///
    /// # Safety
    /// No live mutable slice may overlap it; `T` is the type of the elements there.
    #[inline]
    pub(crate) unsafe fn elems<'a, T>(self, off: usize, len: usize) -> &'a [T] {
        std::slice::from_raw_parts(self.0.cast::<T>().wrapping_add(off), len)
    }

    /// Mutable slice of `len` elements of type `T` at element `off` of an arena of `T`.
    ///
    /// # Safety
    /// No other live slice may overlap it; `T` is the type of the elements there.
    #[inline]
    #[allow(clippy::mut_from_ref)]
    pub(crate) unsafe fn elems_mut<'a, T>(self, off: usize, len: usize) -> &'a mut [T] {
        std::slice::from_raw_parts_mut(self.0.cast::<T>().wrapping_add(off), len)
    }

    /// Arena index of channel plane (n, c) of a view (in the view's elements).
    #[inline]
    pub(crate) fn plane_off(v: View, n: usize, c: usize) -> usize {
        v.index() + n * v.img_stride + c * v.hw()
    }
}

/// Thread `t`'s contiguous range of `n` images (ranges in thread order; trailing ones may be
/// empty).
pub(crate) fn image_chunk(n: usize, threads: usize, t: usize) -> std::ops::Range<usize> {
    let per = n.div_ceil(threads.max(1)).max(1);
    (t * per).min(n)..((t + 1) * per).min(n)
}

/// The CPU backend.
pub struct CpuBackend {
    arena: Vec<f32>,
    labels: Vec<u32>,
    workspace: Workspace,
    threads: usize,
    /// The collectives of the data-parallel job it joined.
    comm: Option<HostComm>,
    /// The first failed collective's error, for [`Backend::take_error`].
    error: Cell<Option<Error>>,
}

impl CpuBackend {
    /// A backend using rayon's global pool (its size fixes the workspace and the work split).
    pub fn new() -> Self {
        let threads = rayon::current_num_threads();
        let (comm, error) = (None, Cell::new(None));
        CpuBackend { arena: Vec::new(), labels: Vec::new(), workspace: Workspace::default(), threads, comm, error }
    }

    /// Joins a data-parallel job: its collectives go through the host communicator.
    pub(crate) fn join_host(&mut self, links: Links) {
        self.comm = Some(HostComm::new(links));
    }

    /// The job joined, if any.
    pub(crate) fn host_group(&self) -> Option<Group> {
        self.comm.as_ref().map(HostComm::group)
    }

    /// Runs a collective on the arena (alone: an all-reduce or all-gather copies, a broadcast
    /// does nothing).
    pub(crate) fn run_collective(&mut self, op: Collective) -> Result<()> {
        let world = self.host_group().map_or(1, |g| g.world);
        op.check(world).unwrap_or_else(|e| panic!("{e}"));
        let span = |s: Span| {
            assert!(s.index() + s.len <= self.arena.len(), "collective on {s:?} outside the arena");
            s.index()..s.index() + s.len
        };
        match op {
            Collective::AllReduce { src, dst } => {
                let (src, dst) = (span(src), span(dst));
                self.arena.copy_within(src, dst.start);
                match &mut self.comm {
                    Some(c) => c.all_reduce(&mut self.arena[dst]),
                    None => Ok(()),
                }
            }
            Collective::AllGather { src, dst } => {
                let (src, dst) = (span(src), span(dst));
                let part = self.arena[src].to_vec();
                match &mut self.comm {
                    Some(c) => c.all_gather(&part, &mut self.arena[dst]),
                    None => {
                        self.arena[dst].copy_from_slice(&part);
                        Ok(())
                    }
                }
            }
            Collective::Broadcast(s) => {
                let s = span(s);
                match &mut self.comm {
                    Some(c) => c.broadcast(&mut self.arena[s]),
                    None => Ok(()),
                }
            }
        }
    }

    /// The arena's bytes (the host device's memory).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        bytemuck::cast_slice_mut(&mut self.arena)
    }

    /// The arena's bytes, to read.
    pub(crate) fn bytes(&self) -> &[u8] {
        bytemuck::cast_slice(&self.arena)
    }

    fn ptr(&mut self) -> Ptr {
        Ptr(self.arena.as_mut_ptr())
    }

    /// Every op checks its operands before touching raw memory (O(1) per operand): views
    /// inside the arena with non-overlapping images, offset ranges inside the arena, and
    /// convolutions within the workspace laid out for them.
    fn check(&self, v: View) {
        assert!(v.off.is_multiple_of(v.dtype.size()), "view {v:?} not aligned to its elements");
        assert!(v.end() <= self.arena.len() * 4, "view {v:?} outside the arena ({} bytes)", self.arena.len() * 4);
        assert!(v.n <= 1 || v.img_stride >= v.c * v.hw(), "view {v:?} has overlapping images");
    }

    /// [`CpuBackend::check`] of the views of one op, which must share their element type (the
    /// op's kernels take one); returns it.
    fn check_all(&self, op: &str, views: &[View]) -> DType {
        let dtype = views[0].dtype;
        for &v in views {
            self.check(v);
            assert_eq!(v.dtype, dtype, "{op}: {v:?} is not {dtype:?} like {:?}", views[0]);
        }
        dtype
    }

    /// Asserts that output `out` of op `op` shares no float with an input its contract keeps
    /// apart from it (in release builds too: a planner bug is an error, not a data race
    /// behind the arena pointer).
    fn apart(&self, op: &str, out: View, ins: &[View]) {
        for x in ins {
            assert!(!out.overlaps(x), "{op}: output {out:?} overlaps input {x:?}");
        }
    }

    /// Checks a span of `len` elements of any type inside the arena and returns its first
    /// index (in its elements).
    fn elements(&self, s: Span, len: usize) -> usize {
        assert_eq!(s.len, len, "span {s:?}: expected {len} elements");
        assert!(
            s.off.is_multiple_of(s.dtype.size()) && s.end() <= self.arena.len() * 4,
            "span {s:?} outside the arena"
        );
        s.index()
    }

    /// Checks a span of `len` f32 inside the arena and returns its first index.
    fn span(&self, s: Span, len: usize) -> usize {
        assert_eq!((s.dtype, s.len), (DType::F32, len), "span {s:?}: expected {len} f32");
        assert!(s.off.is_multiple_of(4) && s.end() <= self.arena.len() * 4, "span {s:?} outside the arena");
        s.index()
    }

    fn check_bn(&self, bn: Bn, c: usize) {
        for s in bn.spans() {
            self.span(s, c);
        }
    }

    fn check_matrix(&self, m: Matrix, rows: usize, cols: usize) {
        assert_eq!((m.rows, m.cols), (rows, cols), "matrix {m:?}: expected {rows}x{cols}");
        self.span(m.data, rows * cols);
    }

    /// Checks a convolution's operands (`x` its input side, `y` its output side); returns
    /// their element type.
    fn check_conv(&self, x: View, w: Span, y: View, spec: ConvSpec) -> DType {
        let dtype = self.check_all("convolution", &[x, y]);
        self.span(w, y.c * x.c * spec.k * spec.k);
        let shape = ConvShape { spec, cin: x.c, cout: y.c, h: x.h, w: x.w, dtype };
        assert!(self.workspace.fits(&shape), "{shape:?} was not given to workspace_len");
        dtype
    }
}

impl Default for CpuBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl Backend for CpuBackend {
    fn describe(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn stores(&self, _: DType) -> bool {
        true
    }

    fn workspace_len(&mut self, convs: &[ConvShape], _image_len: usize, _batch: usize) -> Result<usize> {
        self.workspace = Workspace::new(convs, self.threads);
        Ok(self.workspace.len() * std::mem::size_of::<f32>())
    }

    fn allocate(&mut self, len: usize, workspace: Span, max_batch: usize) -> Result<()> {
        assert!(len.is_multiple_of(4), "an arena of {len} bytes does not hold whole f32");
        release_freed_heap();
        let Some(arena) = zeroed(len / 4) else {
            bail!("cannot allocate the {} MiB arena", len >> 20);
        };
        self.arena = arena;
        self.labels = Vec::with_capacity(max_batch);
        let ws = self.workspace.len();
        self.workspace.off = self.span(workspace, ws);
        Ok(())
    }

    fn write(&mut self, dst: Span, data: &[f32]) {
        let i = self.elements(dst, data.len());
        by_dtype!(dst.dtype, elementwise::write(self.ptr(), i, data));
    }

    fn read_into(&self, src: Span, out: &mut [f32]) {
        let i = self.elements(src, out.len());
        let a = Ptr(self.arena.as_ptr().cast_mut());
        by_dtype!(src.dtype, elementwise::read(a, i, out));
    }

    fn set_labels(&mut self, labels: &[u32]) {
        assert!(labels.len() <= self.labels.capacity(), "more labels than the planned batch");
        self.labels.clear();
        self.labels.extend_from_slice(labels);
    }

    fn copy(&mut self, src: View, dst: View) {
        let dtype = self.check_all("copy", &[src, dst]);
        self.apart("copy", dst, &[src]);
        by_dtype!(dtype, elementwise::copy(self.ptr(), src, dst));
    }

    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, scale: usize, dst: View) {
        self.check(dst);
        assert!(
            scale > 0 && dst.h.is_multiple_of(scale) && dst.w.is_multiple_of(scale),
            "{dst:?} not upsampled by {scale}"
        );
        let stored = dst.c * (dst.h / scale) * (dst.w / scale);
        let per = dst.c * dst.hw();
        assert!(dst.img_stride == per && bytes.len() == crops.len() * stored && crops.len() == dst.n, "augment shapes");
        by_dtype!(dst.dtype, elementwise::augment(self.ptr(), bytes, crops, norm, scale, dst));
    }

    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: Span, y: View, spec: ConvSpec) {
        let dtype = self.check_conv(x, w, y, spec);
        self.apart("conv_forward", y, &[x]);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        by_dtype!(dtype, conv::forward(self.ptr(), &self.workspace, x, pre, w.index(), y, spec));
    }

    fn conv_backward_data(&mut self, gy: View, w: Span, gx: View, spec: ConvSpec) {
        let dtype = self.check_conv(gx, w, gy, spec);
        self.apart("conv_backward_data", gx, &[gy]);
        by_dtype!(dtype, conv::backward_data(self.ptr(), &self.workspace, gy, w.index(), gx, spec));
    }

    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: Span, spec: ConvSpec, accumulate: bool) {
        let dtype = self.check_conv(x, gw, gy, spec);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        by_dtype!(
            dtype,
            conv::backward_filter(self.ptr(), &self.workspace, x, pre, gy, (gw.index(), accumulate), spec)
        );
    }

    fn bn_stats(&mut self, x: View, out: Moments) {
        self.check(x);
        self.span(out.mean, x.c);
        self.span(out.var, x.c);
        by_dtype!(x.dtype, norm::stats(self.ptr(), x, out));
    }

    fn bn_update_running(&mut self, batch: Moments, running: Moments, count: usize, momentum: f32, flag: Span) {
        let c = batch.mean.len;
        for s in [batch.mean, batch.var, running.mean, running.var] {
            self.span(s, c);
        }
        let flag = self.span(flag, 1);
        norm::update_running(&mut self.arena, batch, running, count, momentum);
        let (m, v) = (running.mean.index(), running.var.index());
        if self.arena[m..m + c].iter().chain(&self.arena[v..v + c]).any(|v| !v.is_finite()) {
            self.arena[flag] = 1.0;
        }
    }

    fn bn_relu(&mut self, x: View, bn: Bn, y: View) {
        let dtype = self.check_all("bn_relu", &[x, y]);
        self.check_bn(bn, x.c);
        self.apart("bn_relu", y, &[x]);
        by_dtype!(dtype, norm::bn_relu(self.ptr(), x, bn, y));
    }

    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, grad: Affine, dx: View, accumulate: bool) {
        let dtype = self.check_all("bn_relu_backward", &[g, x, dx]);
        self.check_bn(bn, x.c);
        // dx may be g itself (in place), and else overlaps neither input.
        let ins = [x, g];
        self.apart("bn_relu_backward", dx, &ins[..if dx == g { 1 } else { 2 }]);
        self.span(grad.gamma, x.c);
        self.span(grad.beta, x.c);
        by_dtype!(dtype, norm::bn_relu_backward(self.ptr(), g, x, bn, Sums::Into(grad), Some((dx, accumulate))));
    }

    fn bn_relu_backward_sums(&mut self, g: View, x: View, bn: Bn, grad: Affine, sums: Span) {
        let dtype = self.check_all("bn_relu_backward_sums", &[g, x]);
        self.check_bn(bn, x.c);
        self.span(grad.gamma, x.c);
        self.span(grad.beta, x.c);
        let at = self.span(sums, 2 * x.c);
        by_dtype!(dtype, norm::bn_relu_backward(self.ptr(), g, x, bn, Sums::Shared(grad, at), None));
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
        let dtype = self.check_all("bn_relu_backward_data", &[g, x, dx]);
        self.check_bn(bn, x.c);
        let ins = [x, g];
        self.apart("bn_relu_backward_data", dx, &ins[..if dx == g { 1 } else { 2 }]);
        let at = self.span(sums, 2 * x.c);
        by_dtype!(dtype, norm::bn_relu_backward(self.ptr(), g, x, bn, Sums::Given(at, count), Some((dx, accumulate))));
    }

    fn bn_stats_combine(&mut self, parts: Span, batch: usize, hw: usize, out: Moments) {
        let c = out.mean.len;
        self.span(parts, parts.len);
        assert!(c > 0 && parts.len.is_multiple_of(2 * c) && out.var.len == c, "combining {parts:?} into {out:?}");
        self.span(out.mean, c);
        self.span(out.var, c);
        norm::stats_combine(&mut self.arena, parts, batch, hw, out);
    }

    fn collective(&mut self, op: Collective) {
        if let Err(e) = self.run_collective(op) {
            let first = self.error.take().unwrap_or(e);
            self.error.set(Some(first));
        }
    }

    fn join(&mut self, links: Links) -> Result<()> {
        self.join_host(links);
        Ok(())
    }

    fn group(&self) -> Option<Group> {
        self.host_group()
    }

    fn take_error(&self) -> Result<()> {
        self.error.take().map_or(Ok(()), Err)
    }

    fn dropout(&mut self, x: View, p: f32, key: u64) {
        self.check(x);
        by_dtype!(x.dtype, elementwise::dropout(self.ptr(), x, p, key));
    }

    fn avg_pool2(&mut self, x: View, y: View) {
        let dtype = self.check_all("avg_pool2", &[x, y]);
        self.apart("avg_pool2", y, &[x]);
        by_dtype!(dtype, pool::avg2(self.ptr(), x, y));
    }

    fn avg_pool2_backward(&mut self, gy: View, gx: View) {
        let dtype = self.check_all("avg_pool2_backward", &[gy, gx]);
        self.apart("avg_pool2_backward", gx, &[gy]);
        by_dtype!(dtype, pool::avg2_backward(self.ptr(), gy, gx));
    }

    fn max_pool3(&mut self, x: View, pre: Option<Bn>, y: View) {
        let dtype = self.check_all("max_pool3", &[x, y]);
        self.apart("max_pool3", y, &[x]);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        by_dtype!(dtype, pool::max3(self.ptr(), x, pre, y));
    }

    fn max_pool3_backward(&mut self, x: View, pre: Option<Bn>, gy: View, gx: View) {
        let dtype = self.check_all("max_pool3_backward", &[x, gy, gx]);
        self.apart("max_pool3_backward", gx, &[x, gy]);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        by_dtype!(dtype, pool::max3_backward(self.ptr(), x, pre, gy, gx));
    }

    fn global_avg_pool(&mut self, x: View, y: Matrix) {
        self.check(x);
        self.check_matrix(y, x.n, x.c);
        by_dtype!(x.dtype, pool::global_avg(self.ptr(), x, y.data.index()));
    }

    fn global_avg_pool_backward(&mut self, gy: Matrix, gx: View) {
        self.check(gx);
        self.check_matrix(gy, gx.n, gx.c);
        by_dtype!(gx.dtype, pool::global_avg_backward(self.ptr(), gy.data.index(), gx));
    }

    fn linear(&mut self, x: Matrix, w: Matrix, b: Span, y: Matrix) {
        let (n, cin, cout) = (x.rows, x.cols, w.rows);
        self.check_matrix(x, n, cin);
        self.check_matrix(w, cout, cin);
        self.span(b, cout);
        self.check_matrix(y, n, cout);
        linear::linear(&mut self.arena, x, w, b, y);
    }

    fn linear_backward(&mut self, x: Matrix, w: Matrix, gy: Matrix, gx: Matrix, gw: Matrix, gb: Span) {
        let (n, cin, cout) = (x.rows, x.cols, w.rows);
        for (m, rows, cols) in [(x, n, cin), (w, cout, cin), (gy, n, cout), (gx, n, cin), (gw, cout, cin)] {
            self.check_matrix(m, rows, cols);
        }
        self.span(gb, cout);
        linear::linear_backward(&mut self.arena, x, w, gy, gx, gw, gb);
    }

    fn softmax_xent(&mut self, logits: Matrix, total: usize, out: Span, glogits: Matrix) {
        let (n, k) = (logits.rows, logits.cols);
        assert_eq!(self.labels.len(), n, "labels for {} images, batch of {n}", self.labels.len());
        self.check_matrix(logits, n, k);
        self.check_matrix(glogits, n, k);
        self.span(out, 2);
        loss::softmax_xent(&mut self.arena, &self.labels, logits, total, out, glogits);
    }

    fn scale_loss_grad(&mut self, g: Matrix, scaler: Span) {
        self.check_matrix(g, g.rows, g.cols);
        let scale = self.arena[self.span(scaler, LossScale::LEN) + 1];
        let at = g.data.index();
        self.arena[at..at + g.rows * g.cols].iter_mut().for_each(|v| *v *= scale);
    }

    fn unscale_grads(&mut self, grads: Span, scaler: Span) {
        let (at, s) = (self.span(grads, grads.len), self.span(scaler, LossScale::LEN));
        let found = sgd::unscale(self.ptr(), at, grads.len, self.arena[s + 1]);
        self.arena[s] = found as u8 as f32;
    }

    fn update_scale(&mut self, scaler: Span) {
        let s = self.span(scaler, LossScale::LEN);
        let (state, found) = LossScale::from_floats(self.arena[s..s + LossScale::LEN].try_into().expect("3 floats"));
        let next = state.next(found).floats();
        self.arena[s + 1..s + LossScale::LEN].copy_from_slice(&next[1..]);
    }

    fn sgd(&mut self, params: Span, grads: Span, momentum: Span, settings: Span, skip: Span, flag: Span) {
        if self.arena[self.span(skip, 1)] != 0.0 {
            return;
        }
        let len = params.len;
        let mut spans = [params, grads, momentum].map(|s| (self.span(s, len), s));
        spans.sort_unstable_by_key(|s| s.0);
        assert!(spans[0].1.end() <= spans[1].1.off && spans[1].1.end() <= spans[2].1.off, "SGD buffers overlap");
        let at = self.span(settings, Sgd::LEN);
        let settings = Sgd::from_floats(self.arena[at..at + Sgd::LEN].try_into().expect("Sgd::LEN floats"));
        let flag = self.span(flag, 1);
        if sgd::sgd(self.ptr(), params.index(), grads.index(), momentum.index(), len, settings) {
            self.arena[flag] = 1.0;
        }
    }
}

/// Returns the heap's free pages to the system (glibc keeps what the planner freed, and those
/// pages would stay resident beside the arena); elsewhere nothing.
fn release_freed_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory; no allocation is borrowed across it.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// `n` zeroed f32, or `None` when the allocation fails. The allocator zeroes them (a large
/// arena gets fresh pages from the system), so the pages that the steps never write are never
/// made resident.
fn zeroed(n: usize) -> Option<Vec<f32>> {
    if n == 0 {
        return Some(Vec::new());
    }
    let layout = std::alloc::Layout::array::<f32>(n).ok()?;
    // SAFETY: the layout's size is not zero.
    let p = unsafe { std::alloc::alloc_zeroed(layout) }.cast::<f32>();
    // SAFETY: `p` comes from the global allocator with f32's alignment and room for `n` f32
    // (the layout a `Vec<f32>` of capacity `n` has), and all `n` are initialized (zero bits are
    // 0.0).
    (!p.is_null()).then(|| unsafe { Vec::from_raw_parts(p, n, n) })
}

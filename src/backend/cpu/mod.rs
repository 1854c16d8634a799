//! The CPU backend: f32, rayon over images or channels, AVX2+FMA kernels for convolutions and
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

use super::{Backend, Bn, ConvShape, ConvSpec, Sgd, View};
use crate::input::{Crop, Normalize};
use crate::{bail, Result};
use conv::Workspace;
use rayon::prelude::*;

/// Raw arena pointer shared by rayon tasks. Every op documents which regions it writes; tasks
/// write disjoint planes, channels or chunks.
#[derive(Clone, Copy)]
pub(crate) struct Ptr(*mut f32);
// SAFETY: the pointer is only dereferenced inside ops whose tasks touch disjoint memory.
unsafe impl Send for Ptr {}
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

    /// Arena offset of channel plane (n, c) of a view.
    #[inline]
    pub(crate) fn plane_off(v: View, n: usize, c: usize) -> usize {
        v.off + n * v.img_stride + c * v.hw()
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
}

impl CpuBackend {
    /// A backend using rayon's global pool (its size fixes the workspace and the work split).
    pub fn new() -> Self {
        let threads = rayon::current_num_threads();
        CpuBackend { arena: Vec::new(), labels: Vec::new(), workspace: Workspace::default(), threads }
    }

    /// The arena as raw 4-byte words (for the host device's kernels) and its length.
    pub(crate) fn arena_words(&mut self) -> (*mut u32, usize) {
        (self.arena.as_mut_ptr().cast(), self.arena.len())
    }

    fn ptr(&mut self) -> Ptr {
        Ptr(self.arena.as_mut_ptr())
    }

    /// Every op checks its operands before touching raw memory (O(1) per operand): views
    /// inside the arena with non-overlapping images, offset ranges inside the arena, and
    /// convolutions within the workspace laid out for them.
    fn check(&self, v: View) {
        assert!(v.end() <= self.arena.len(), "view {v:?} outside the arena ({})", self.arena.len());
        assert!(v.n <= 1 || v.img_stride >= v.c * v.hw(), "view {v:?} has overlapping images");
    }

    /// Asserts that output `out` of op `op` shares no float with an input its contract keeps
    /// apart from it (in release builds too: a planner bug is an error, not a data race
    /// behind the arena pointer).
    fn apart(&self, op: &str, out: View, ins: &[View]) {
        for x in ins {
            assert!(!out.overlaps(x), "{op}: output {out:?} overlaps input {x:?}");
        }
    }

    fn span(&self, off: usize, len: usize) {
        assert!(off.checked_add(len).is_some_and(|e| e <= self.arena.len()), "range {off}+{len} outside the arena");
    }

    fn check_bn(&self, bn: Bn, c: usize) {
        for off in [bn.mean, bn.var, bn.gamma, bn.beta] {
            self.span(off, c);
        }
    }

    fn check_conv(&self, x: View, w: usize, y: View, spec: ConvSpec) {
        self.check(x);
        self.check(y);
        self.span(w, y.c * x.c * spec.k * spec.k);
        let shape = ConvShape { spec, cin: x.c, cout: y.c, h: x.h, w: x.w };
        assert!(self.workspace.fits(&shape), "{shape:?} was not given to workspace_len");
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

    fn workspace_len(&mut self, convs: &[ConvShape], _image_len: usize, _batch: usize) -> Result<usize> {
        self.workspace = Workspace::new(convs, self.threads);
        Ok(self.workspace.len())
    }

    fn allocate(&mut self, len: usize, workspace: (usize, usize), max_batch: usize) -> Result<()> {
        let mut arena = Vec::new();
        if arena.try_reserve_exact(len).is_err() {
            bail!("cannot allocate the {} MiB arena", (len * 4) >> 20);
        }
        arena.resize(len, 0.0);
        self.arena = arena;
        self.labels = Vec::with_capacity(max_batch);
        assert_eq!(workspace.1, self.workspace.len(), "workspace not laid out by workspace_len");
        self.workspace.off = workspace.0;
        Ok(())
    }

    fn write(&mut self, off: usize, data: &[f32]) {
        self.arena[off..off + data.len()].copy_from_slice(data);
    }

    fn read_into(&self, off: usize, out: &mut [f32]) {
        out.copy_from_slice(&self.arena[off..off + out.len()]);
    }

    fn set_labels(&mut self, labels: &[u32]) {
        assert!(labels.len() <= self.labels.capacity(), "more labels than the planned batch");
        self.labels.clear();
        self.labels.extend_from_slice(labels);
    }

    fn copy(&mut self, src: View, dst: View) {
        self.check(src);
        self.check(dst);
        self.apart("copy", dst, &[src]);
        elementwise::copy(self.ptr(), src, dst);
    }

    fn augment(&mut self, bytes: &[u8], crops: &[Crop], norm: &Normalize, dst: View) {
        self.check(dst);
        let per = dst.c * dst.hw();
        assert!(dst.img_stride == per && bytes.len() == crops.len() * per && crops.len() == dst.n, "augment shapes");
        let out = &mut self.arena[dst.off..dst.off + dst.numel()];
        let (h, w) = (dst.h, dst.w);
        out.par_chunks_mut(per).zip(bytes.par_chunks(per)).zip(crops).for_each(|((d, s), c)| c.apply(s, norm, h, w, d));
    }

    fn conv_forward(&mut self, x: View, pre: Option<Bn>, w: usize, y: View, spec: ConvSpec) {
        self.check_conv(x, w, y, spec);
        self.apart("conv_forward", y, &[x]);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        conv::forward(self.ptr(), &self.workspace, x, pre, w, y, spec);
    }

    fn conv_backward_data(&mut self, gy: View, w: usize, gx: View, spec: ConvSpec) {
        self.check_conv(gx, w, gy, spec);
        self.apart("conv_backward_data", gx, &[gy]);
        conv::backward_data(self.ptr(), &self.workspace, gy, w, gx, spec);
    }

    fn conv_backward_filter(&mut self, x: View, pre: Option<Bn>, gy: View, gw: usize, spec: ConvSpec) {
        self.check_conv(x, gw, gy, spec);
        if let Some(bn) = pre {
            self.check_bn(bn, x.c);
        }
        conv::backward_filter(self.ptr(), &self.workspace, x, pre, gy, gw, spec);
    }

    fn bn_stats(&mut self, x: View, mean: usize, var: usize) {
        self.check(x);
        self.span(mean, x.c);
        self.span(var, x.c);
        norm::stats(self.ptr(), x, mean, var);
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
        self.span(flag, 1);
        norm::update_running(&mut self.arena, mean, var, running_mean, running_var, c, count, momentum);
        let updated = [&self.arena[running_mean..running_mean + c], &self.arena[running_var..running_var + c]];
        if updated.iter().any(|s| s.iter().any(|v| !v.is_finite())) {
            self.arena[flag] = 1.0;
        }
    }

    fn bn_relu(&mut self, x: View, bn: Bn, y: View) {
        self.check(x);
        self.check(y);
        self.check_bn(bn, x.c);
        self.apart("bn_relu", y, &[x]);
        norm::bn_relu(self.ptr(), x, bn, y);
    }

    fn bn_relu_backward(&mut self, g: View, x: View, bn: Bn, dgamma: usize, dbeta: usize, dx: View, accumulate: bool) {
        self.check(g);
        self.check(x);
        self.check(dx);
        self.check_bn(bn, x.c);
        // dx may be g itself (in place), and else overlaps neither input.
        let ins = [x, g];
        self.apart("bn_relu_backward", dx, &ins[..if dx == g { 1 } else { 2 }]);
        self.span(dgamma, x.c);
        self.span(dbeta, x.c);
        norm::bn_relu_backward(self.ptr(), g, x, bn, dgamma, dbeta, dx, accumulate);
    }

    fn dropout(&mut self, x: View, p: f32, key: u64) {
        self.check(x);
        elementwise::dropout(self.ptr(), x, p, key);
    }

    fn avg_pool2(&mut self, x: View, y: View) {
        self.check(x);
        self.check(y);
        self.apart("avg_pool2", y, &[x]);
        pool::avg2(self.ptr(), x, y);
    }

    fn avg_pool2_backward(&mut self, gy: View, gx: View) {
        self.check(gy);
        self.check(gx);
        self.apart("avg_pool2_backward", gx, &[gy]);
        pool::avg2_backward(self.ptr(), gy, gx);
    }

    fn max_pool3(&mut self, x: View, y: View) {
        self.check(x);
        self.check(y);
        self.apart("max_pool3", y, &[x]);
        pool::max3(self.ptr(), x, y);
    }

    fn max_pool3_backward(&mut self, x: View, gy: View, gx: View) {
        self.check(x);
        self.check(gy);
        self.check(gx);
        self.apart("max_pool3_backward", gx, &[x, gy]);
        pool::max3_backward(self.ptr(), x, gy, gx);
    }

    fn global_avg_pool(&mut self, x: View, y: usize) {
        self.check(x);
        self.span(y, x.n * x.c);
        pool::global_avg(self.ptr(), x, y);
    }

    fn global_avg_pool_backward(&mut self, gy: usize, gx: View) {
        self.check(gx);
        self.span(gy, gx.n * gx.c);
        pool::global_avg_backward(self.ptr(), gy, gx);
    }

    fn linear(&mut self, x: usize, w: usize, b: usize, y: usize, n: usize, cin: usize, cout: usize) {
        linear::linear(&mut self.arena, x, w, b, y, n, cin, cout);
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
        linear::linear_backward(&mut self.arena, x, w, gy, gx, gw, gb, n, cin, cout);
    }

    fn softmax_xent(&mut self, logits: usize, n: usize, k: usize, out: usize, glogits: usize) {
        assert_eq!(self.labels.len(), n, "labels for {} images, batch of {n}", self.labels.len());
        loss::softmax_xent(&mut self.arena, &self.labels, logits, n, k, out, glogits);
    }

    fn sgd(&mut self, params: usize, grads: usize, momentum: usize, len: usize, hp: Sgd, flag: usize) {
        let mut offs = [params, grads, momentum];
        offs.iter().for_each(|&o| self.span(o, len));
        self.span(flag, 1);
        offs.sort_unstable();
        assert!(offs[0] + len <= offs[1] && offs[1] + len <= offs[2], "SGD buffers overlap");
        if sgd::sgd(self.ptr(), params, grads, momentum, len, hp) {
            self.arena[flag] = 1.0;
        }
    }
}

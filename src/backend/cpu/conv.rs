//! Convolutions on channel slices, one image per task, images split into one contiguous chunk
//! per thread.
//! - 1x1 stride 1: a product of the weight with the image's channels in place.
//! - stride-1 "same" kernels (3x3) with AVX2: the image is copied once into a zero-padded
//!   buffer and the kernel reads shifted rows of it (implicit im2col); the data gradient is the
//!   same convolution of the output gradient with the flipped, transposed kernel.
//! - otherwise (7x7 stride 2, or no AVX2): explicit im2col in row tiles.
//!
//! A BN-ReLU on the input (`pre`) is applied where the input is copied anyway: while packing
//! B panels, while padding the image, while packing weight-gradient rows. Without AVX2 the
//! transformed image is written to the slot's input area first.
//!
//! 16-bit tensors (docs/precision.md): each image's operands are widened into the slot's input
//! and staged areas (the BN-ReLU applied and each value rounded to 16 bits, as a stored
//! BN-ReLU output holds it), the f32 kernels run on them, and an output is rounded into its
//! tensor from the staged area. Weights and weight gradients are f32.

use super::elementwise::{narrow, widen};
use super::matmul::{self, matmul, matmul_nt, pack, Dims, Dst, Pre, Shifted, Src};
use super::norm::affine;
use super::{bnvec, image_chunk, Ptr};
use crate::backend::{Bn, ConvShape, ConvSpec, DType, View};
use crate::elem::Elem;
use rayon::prelude::*;
use std::ops::Range;

/// Floats of one im2col tile (about 256 KB: written and read back while in L2).
const TILE_FLOATS: usize = 1 << 16;

/// The convolution workspace: per-channel BN-ReLU constants (scale, shift) shared by all
/// threads, then one slot per thread:
/// `[input area | staged area | image area | .. | weight area | pack area]`. The input area
/// holds a BN-ReLU'd image (without AVX2) or, for 16-bit tensors, the input side in f32 (x
/// widened, or the data gradient before it is rounded), the staged area the output side (y
/// before it is rounded, or the output gradient widened), the image area the padded image or
/// an im2col tile, the weight area the packed weight or a weight-gradient partial, the pack
/// area the weight-gradient product's packed rows.
#[derive(Clone, Copy, Debug, Default)]
pub(super) struct Workspace {
    /// Arena offset.
    pub off: usize,
    /// Floats of the shared constants: 2 x the most input channels.
    affine: usize,
    /// Floats of the input area of a slot.
    input: usize,
    /// Floats of the staged area of a slot.
    staged: usize,
    /// Floats of one slot.
    slot: usize,
    /// Slots.
    threads: usize,
}

impl Workspace {
    /// The layout for these convolutions and threads (at offset 0 until allocated).
    pub(super) fn new(convs: &[ConvShape], threads: usize) -> Workspace {
        let max = |f: &dyn Fn(&ConvShape) -> usize| convs.iter().map(f).max().unwrap_or(0);
        // A 16-bit convolution stages its input side (x or its gradient) in the input area and
        // its output side (y or its gradient) in the staged area.
        let half = |s: &ConvShape| s.dtype != DType::F32;
        let input = max(&|s| if half(s) || !fuses(s.spec) { s.cin * s.h * s.w } else { 0 });
        let staged = max(&|s| if half(s) { s.cout * Geo::of(s).p() } else { 0 });
        let image = max(&|s| {
            let g = Geo::of(s);
            let padded = if same(s.spec) { s.cin.max(s.cout) * g.padded_plane() } else { 0 };
            // im2col: whole for the data gradient of strided kernels, else tiles (of the
            // output gradient's for the flipped data gradient).
            let rows = if same(s.spec) { s.cin.max(s.cout) } else { s.cin };
            let col = if is_pointwise(s.spec) { 0 } else { rows * s.spec.k * s.spec.k * g.p() };
            padded.max(col)
        });
        let weight = max(&|s| s.cout * s.cin * s.spec.k * s.spec.k);
        let pack = max(&|s| pack_len(&Geo::of(s)));
        let slot = input + staged + image + weight + pack;
        Workspace { off: 0, affine: 2 * max(&|s| s.cin), input, staged, slot, threads }
    }

    /// Total floats.
    pub(super) fn len(&self) -> usize {
        self.affine + self.threads * self.slot
    }

    /// Whether a convolution of this shape fits the layout (it was among those planned for).
    pub(super) fn fits(&self, shape: &ConvShape) -> bool {
        let need = Workspace::new(std::slice::from_ref(shape), 1);
        self.threads > 0 && need.slot <= self.slot && need.affine <= self.affine
    }

    /// Thread `t`'s slot: its areas ([`Slot`]), with `wlen` floats of weight area and `plen`
    /// floats of pack area at the slot's end.
    fn slot(&self, a: Ptr, t: usize, wlen: usize, plen: usize) -> Slot {
        let base = self.off + self.affine + t * self.slot;
        let end = base + self.slot;
        Slot {
            input: Ptr(a.at(base)),
            staged: Ptr(a.at(base + self.input)),
            area: Ptr(a.at(base + self.input + self.staged)),
            weight: a.at(end - plen - wlen),
            pack: a.at(end - plen),
        }
    }

    /// Writes the per-channel constants of `bn` over `c` channels; the [`Pre`] reading them.
    fn pre(&self, a: Ptr, bn: Option<Bn>, c: usize) -> Option<Pre> {
        let bn = bn?;
        let (scale, shift) = (a.at(self.off), a.at(self.off + c));
        for ch in 0..c {
            let f = affine(a, bn, ch).0;
            // SAFETY: the constants area is inside the workspace; no task runs yet.
            unsafe {
                *scale.add(ch) = f.scale;
                *shift.add(ch) = f.shift;
            }
        }
        Some(Pre { scale, shift })
    }
}

/// One thread's areas of the [`Workspace`].
struct Slot {
    input: Ptr,
    staged: Ptr,
    area: Ptr,
    weight: *mut f32,
    pack: *mut f32,
}

/// Floats of packed B rows the weight-gradient product of this convolution needs.
fn pack_len(g: &Geo) -> usize {
    matmul::nt_pack_len(g.ho, g.wo)
}

fn is_pointwise(s: ConvSpec) -> bool {
    s.k == 1 && s.stride == 1 && s.pad == 0
}

/// Stride-1 convolutions that keep the size (odd k > 1, pad (k-1)/2).
fn same(s: ConvSpec) -> bool {
    s.stride == 1 && s.k > 1 && 2 * s.pad + 1 == s.k
}

/// Whether a convolution runs through the direct (implicit im2col) kernels.
fn direct(s: ConvSpec) -> bool {
    same(s) && s.k <= 7 && matmul::simd()
}

/// Whether the kernels apply a BN-ReLU on the input themselves.
fn fuses(s: ConvSpec) -> bool {
    matmul::simd() && (is_pointwise(s) || direct(s))
}

/// Geometry shared by the three passes.
struct Geo {
    cin: usize,
    cout: usize,
    h: usize,
    w: usize,
    ho: usize,
    wo: usize,
    /// Rows of the im2col matrix: cin * k * k.
    r: usize,
    spec: ConvSpec,
}

impl Geo {
    fn new(x: View, y: View, spec: ConvSpec) -> Geo {
        let g = Geo::of(&ConvShape { spec, cin: x.c, cout: y.c, h: x.h, w: x.w, dtype: x.dtype });
        assert_eq!((y.h, y.w, x.n), (g.ho, g.wo, y.n), "conv shapes {x:?} -> {y:?}");
        g
    }

    fn of(s: &ConvShape) -> Geo {
        let (ho, wo) = (s.spec.out(s.h), s.spec.out(s.w));
        Geo { cin: s.cin, cout: s.cout, h: s.h, w: s.w, ho, wo, r: s.cin * s.spec.k * s.spec.k, spec: s.spec }
    }

    fn p(&self) -> usize {
        self.ho * self.wo
    }

    /// The geometry of the forward convolution that computes this one's data gradient
    /// (stride-1 "same" kernels only).
    fn flipped(&self) -> Geo {
        let r = self.cout * self.spec.k * self.spec.k;
        Geo { cin: self.cout, cout: self.cin, h: self.ho, w: self.wo, ho: self.h, wo: self.w, r, spec: self.spec }
    }

    /// Floats of one zero-padded channel plane of the input.
    fn padded_plane(&self) -> usize {
        (self.h + 2 * self.spec.pad) * (self.w + 2 * self.spec.pad)
    }

    /// Output-row tiles whose im2col block stays in L2 between its writing and its use.
    fn tiles(&self) -> impl Iterator<Item = Range<usize>> {
        let rows = (TILE_FLOATS / (self.r * self.wo)).clamp(1, self.ho);
        let ho = self.ho;
        (0..ho).step_by(rows).map(move |r| r..(r + rows).min(ho))
    }

    /// Copies `pre(x)` (image [cin, h, w]) into `dst` with `pad` zeros around every plane
    /// (zeros after the BN-ReLU, as the convolution pads its input) and returns the
    /// shifted-rows view of it; `offs` receives the k*k tap offsets.
    fn padded<'a>(&self, x: &[f32], pre: Option<Pre>, dst: &mut [f32], offs: &'a mut [usize; 49]) -> Shifted<'a> {
        let (k, p) = (self.spec.k, self.spec.pad);
        let ld = self.w + 2 * p;
        let plane = self.padded_plane();
        for (c, dp) in dst[..self.cin * plane].chunks_exact_mut(plane).enumerate() {
            dp[..p * ld].fill(0.0);
            dp[(p + self.h) * ld..].fill(0.0);
            for (y, src) in x[c * self.h * self.w..(c + 1) * self.h * self.w].chunks_exact(self.w).enumerate() {
                let row = &mut dp[(p + y) * ld..(p + y + 1) * ld];
                row[..p].fill(0.0);
                match pre {
                    // SAFETY: the constants cover cin channels (Workspace::pre).
                    Some(f) => unsafe {
                        bnvec::bn_relu(src, &mut row[p..p + self.w], *f.scale.add(c), *f.shift.add(c))
                    },
                    None => row[p..p + self.w].copy_from_slice(src),
                }
                row[p + self.w..].fill(0.0);
            }
        }
        for (i, o) in offs.iter_mut().take(k * k).enumerate() {
            *o = (i / k) * ld + i % k;
        }
        Shifted { base: dst.as_ptr(), plane, ld, offs: &offs[..k * k], hi: 8 }
    }
}

/// Fills `col` [r, rows.len()*wo] with output rows `rows` of the im2col matrix of one image
/// `x` [cin, h, w] (zero padding). Each run is a slice of an input row (stride 1) or a strided
/// gather, with zeros at the edges.
fn im2col(x: &[f32], col: &mut [f32], g: &Geo, rows: Range<usize>) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad);
    let p = rows.len() * g.wo;
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &mut col[((ci * k + ky) * k + kx) * p..][..p];
                // Output columns whose input column ox*s + kx - pad lies inside [0, w).
                let lo = pad.saturating_sub(kx).div_ceil(s).min(g.wo);
                let hi = if g.w + pad > kx { ((g.w + pad - kx - 1) / s + 1).min(g.wo) } else { 0 }.max(lo);
                for (t, oy) in rows.clone().enumerate() {
                    let out = &mut row[t * g.wo..(t + 1) * g.wo];
                    let iy = (oy * s + ky).wrapping_sub(pad);
                    if iy >= g.h {
                        out.fill(0.0);
                        continue;
                    }
                    let src = &plane[iy * g.w..(iy + 1) * g.w];
                    out[..lo].fill(0.0);
                    out[hi..].fill(0.0);
                    let first = lo * s + kx - pad;
                    if s == 1 {
                        out[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                    } else {
                        for (o, ix) in out[lo..hi].iter_mut().zip((first..).step_by(s)) {
                            *o = src[ix];
                        }
                    }
                }
            }
        }
    }
}

/// Accumulates `col` [r, ho*wo] back into one image `gx` [cin, h, w] (zeroed first).
fn col2im(col: &[f32], gx: &mut [f32], g: &Geo) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad as isize);
    let p = g.p();
    gx.fill(0.0);
    for ci in 0..g.cin {
        let plane = &mut gx[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        for ky in 0..k {
            for kx in 0..k {
                let row = &col[((ci * k + ky) * k + kx) * p..][..p];
                for oy in 0..g.ho {
                    let iy = (oy * s) as isize + ky as isize - pad;
                    if iy < 0 || iy >= g.h as isize {
                        continue;
                    }
                    let dst = &mut plane[iy as usize * g.w..(iy as usize + 1) * g.w];
                    for (ox, &v) in row[oy * g.wo..(oy + 1) * g.wo].iter().enumerate() {
                        let ix = (ox * s) as isize + kx as isize - pad;
                        if ix >= 0 && ix < g.w as isize {
                            dst[ix as usize] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Image `x` [cin, h, w] as the convolution's input: itself, or `pre(x)` written to `input`
/// when the kernels cannot apply `pre` themselves (no AVX2, or a strided kernel).
///
/// # Safety
/// `input` is this task's, with room for the image.
unsafe fn source<'a>(x: &'a [f32], pre: Option<Pre>, input: Ptr, g: &Geo) -> (&'a [f32], Option<Pre>) {
    match pre {
        Some(f) if !fuses(g.spec) => {
            let hw = g.h * g.w;
            let dst = input.get_mut(0, g.cin * hw);
            for c in 0..g.cin {
                bnvec::bn_relu(
                    &x[c * hw..(c + 1) * hw],
                    &mut dst[c * hw..(c + 1) * hw],
                    *f.scale.add(c),
                    *f.shift.add(c),
                );
            }
            (dst, None)
        }
        _ => (x, pre),
    }
}

/// Image `n` of `v` as the kernels read it, in f32: the arena's own elements when they are f32
/// (`pre` left to the kernels, or applied into `stage` where they cannot: [`source`]), else
/// widened into `stage`, through `pre` with each BN-ReLU value rounded to `T` as a stored
/// BN-ReLU output holds it.
///
/// # Safety
/// `stage` is this task's, with room for the image; nothing writes the image meanwhile.
unsafe fn operand<'a, T: Elem>(
    a: Ptr,
    v: View,
    n: usize,
    pre: Option<Pre>,
    stage: Ptr,
    g: &Geo,
) -> (&'a [f32], Option<Pre>) {
    let (hw, len) = (v.hw(), v.c * v.hw());
    let x = a.elems::<T>(Ptr::plane_off(v, n, 0), len);
    if let Some(x) = T::as_f32(x) {
        return source(x, pre, stage, g);
    }
    let dst = stage.get_mut(0, len);
    for c in 0..v.c {
        let (s, d) = (&x[c * hw..(c + 1) * hw], &mut dst[c * hw..(c + 1) * hw]);
        match pre {
            Some(f) => bnvec::bn_relu_widened(s, d, *f.scale.add(c), *f.shift.add(c)),
            None => widen(s, d),
        }
    }
    (dst, None)
}

/// Where the kernels write image `n` of `v`: in place when its elements are f32, else `stage`
/// (then [`store`]).
///
/// # Safety
/// Image `n` of `v` and `stage` are this task's.
unsafe fn output<T: Elem>(a: Ptr, v: View, n: usize, stage: Ptr) -> *mut f32 {
    match T::as_f32_mut(a.elems_mut::<T>(Ptr::plane_off(v, n, 0), v.c * v.hw())) {
        Some(y) => y.as_mut_ptr(),
        None => stage.at(0),
    }
}

/// Rounds image `n` of `v` from `stage`, where [`output`] put it (nothing when its elements
/// are f32: the kernels wrote them).
///
/// # Safety
/// As for [`output`].
unsafe fn store<T: Elem>(a: Ptr, v: View, n: usize, stage: Ptr) {
    let len = v.c * v.hw();
    let y = a.elems_mut::<T>(Ptr::plane_off(v, n, 0), len);
    if T::as_f32(y).is_none() {
        narrow(stage.get(0, len), y);
    }
}

/// One image: `y = conv(pre(x), w)`; `x` is the image, `w` a row-major [cout, r] matrix.
///
/// # Safety
/// `y` is this task's and overlaps neither `x`, `w` nor `area`; `pre` only if [`fuses`].
unsafe fn image_forward(x: &[f32], pre: Option<Pre>, w: *const f32, y: *mut f32, g: &Geo, area: Ptr) {
    if is_pointwise(g.spec) {
        let d = Dims { m: g.cout, n: g.p(), k: g.cin };
        matmul(d, Dst { ptr: y, ld: g.p(), acc: false }, w, Src { ptr: x.as_ptr(), ld: g.p() }, pre);
    } else if direct(g.spec) {
        #[cfg(target_arch = "x86_64")]
        {
            let mut offs = [0; 49];
            let xs = g.padded(x, pre, area.get_mut(0, g.cin * g.padded_plane()), &mut offs);
            matmul::conv_direct(g.cout, g.r, w, xs, (g.ho, g.wo), Dst { ptr: y, ld: g.p(), acc: false });
        }
    } else {
        assert!(pre.is_none(), "im2col path without fused BN-ReLU");
        for rows in g.tiles() {
            let tp = rows.len() * g.wo;
            let cols = area.get_mut(0, g.r * tp);
            let y = y.add(rows.start * g.wo);
            im2col(x, cols, g, rows);
            let d = Dims { m: g.cout, n: tp, k: g.r };
            matmul(d, Dst { ptr: y, ld: g.p(), acc: false }, w, Src { ptr: cols.as_ptr(), ld: tp }, None);
        }
    }
}

/// `y = conv(pre(x), w)`.
pub(super) fn forward<T: Elem>(a: Ptr, ws: &Workspace, x: View, bn: Option<Bn>, w: usize, y: View, spec: ConvSpec) {
    let g = Geo::new(x, y, spec);
    let pre = ws.pre(a, bn, x.c);
    (0..ws.threads).into_par_iter().for_each(|t| {
        let s = ws.slot(a, t, 0, 0);
        for n in image_chunk(x.n, ws.threads, t) {
            // SAFETY: image n of y is this task's; x and w are read-only and do not overlap y;
            // the slot is this task's.
            unsafe {
                let (xs, pre) = operand::<T>(a, x, n, pre, s.input, &g);
                image_forward(xs, pre, a.at(w), output::<T>(a, y, n, s.staged), &g, s.area);
                store::<T>(a, y, n, s.staged);
            }
        }
    });
}

/// `gx = conv_transpose(gy, w)`.
pub(super) fn backward_data<T: Elem>(a: Ptr, ws: &Workspace, gy: View, w: usize, gx: View, spec: ConvSpec) {
    let g = Geo::new(gx, gy, spec);
    let (k2, wlen) = (spec.k * spec.k, g.cout * g.r);
    // The weight as the left operand, packed once into thread 0's weight area (read-only
    // afterwards): flipped and transposed wf[ci][co][r] = w[co][ci][k2-1-r] for stride-1 "same"
    // convolutions, else the transpose w^T [cin*k2, cout].
    let wt = ws.slot(a, 0, wlen, 0).weight;
    // SAFETY: the weight area is inside the workspace and no task runs yet; w is read-only.
    unsafe {
        let dst = std::slice::from_raw_parts_mut(wt, wlen);
        let wv = a.get(w, wlen);
        if same(spec) {
            pack(g.cin, g.cout * k2, dst, |ci, j| wv[((j / k2) * g.cin + ci) * k2 + k2 - 1 - j % k2]);
        } else {
            pack(g.r, g.cout, dst, |i, co| wv[co * g.r + i]);
        }
    }
    let (flipped, wt) = (g.flipped(), Ptr(wt));
    (0..ws.threads).into_par_iter().for_each(|t| {
        let s = ws.slot(a, t, wlen, 0);
        for n in image_chunk(gy.n, ws.threads, t) {
            // SAFETY: image n of gx is this task's; gy and wt are read-only; the slot is this
            // task's.
            unsafe {
                let gys = operand::<T>(a, gy, n, None, s.staged, &flipped).0;
                let gxo = output::<T>(a, gx, n, s.input);
                if same(spec) {
                    image_forward(gys, None, wt.at(0), gxo, &flipped, s.area);
                } else if is_pointwise(spec) {
                    let (d, dst) = (Dims { m: g.cin, n: g.p(), k: g.cout }, Dst { ptr: gxo, ld: g.p(), acc: false });
                    matmul(d, dst, wt.at(0), Src { ptr: gys.as_ptr(), ld: g.p() }, None);
                } else {
                    let cols = s.area.get_mut(0, g.r * g.p());
                    let d = Dims { m: g.r, n: g.p(), k: g.cout };
                    let dst = Dst { ptr: cols.as_mut_ptr(), ld: g.p(), acc: false };
                    matmul(d, dst, wt.at(0), Src { ptr: gys.as_ptr(), ld: g.p() }, None);
                    col2im(cols, std::slice::from_raw_parts_mut(gxo, g.cin * g.h * g.w), &g);
                }
                store::<T>(a, gx, n, s.input);
            }
        }
    });
}

/// `gw = sum over images of gy[n] * im2col(pre(x[n]))^T`. Each thread sums its chunk of
/// images into its slot's weight area; the areas are then added in thread order
/// (deterministic), into `gw.0`, or onto what it holds when `gw.1` (accumulate).
pub(super) fn backward_filter<T: Elem>(
    a: Ptr,
    ws: &Workspace,
    x: View,
    bn: Option<Bn>,
    gy: View,
    gw: (usize, bool),
    spec: ConvSpec,
) {
    let g = Geo::new(x, gy, spec);
    let (wlen, plen) = (g.cout * g.r, pack_len(&g));
    let pre = ws.pre(a, bn, x.c);
    let used = (0..ws.threads).filter(|&t| !image_chunk(x.n, ws.threads, t).is_empty()).count();
    (0..ws.threads).into_par_iter().for_each(|t| {
        let Slot { input, staged, area, weight: dw, pack } = ws.slot(a, t, wlen, plen);
        for (i, n) in image_chunk(x.n, ws.threads, t).enumerate() {
            // SAFETY: the slot is this task's; x and gy are read-only.
            unsafe {
                let (xs, pre) = operand::<T>(a, x, n, pre, input, &g);
                let gyp = operand::<T>(a, gy, n, None, staged, &g).0.as_ptr();
                let gys = Src { ptr: gyp, ld: g.p() };
                if is_pointwise(spec) {
                    let (d, dst) = (Dims { m: g.cout, n: g.cin, k: g.p() }, Dst { ptr: dw, ld: g.cin, acc: i > 0 });
                    matmul_nt(d, dst, gys, Src { ptr: xs.as_ptr(), ld: g.p() }, pack, pre);
                } else if direct(spec) {
                    #[cfg(target_arch = "x86_64")]
                    {
                        let mut offs = [0; 49];
                        let shifted = g.padded(xs, pre, area.get_mut(0, g.cin * g.padded_plane()), &mut offs);
                        let dst = Dst { ptr: dw, ld: g.r, acc: i > 0 };
                        matmul::conv_direct_filter((g.cout, g.r), gys, shifted, (g.ho, g.wo), dst, pack);
                    }
                } else {
                    assert!(pre.is_none(), "im2col path without fused BN-ReLU");
                    for rows in g.tiles() {
                        let (tp, first) = (rows.len() * g.wo, rows.start == 0);
                        let cols = area.get_mut(0, g.r * tp);
                        let gyt = Src { ptr: gyp.add(rows.start * g.wo), ld: g.p() };
                        im2col(xs, cols, &g, rows);
                        let (d, dst) =
                            (Dims { m: g.cout, n: g.r, k: tp }, Dst { ptr: dw, ld: g.r, acc: i > 0 || !first });
                        matmul_nt(d, dst, gyt, Src { ptr: cols.as_ptr(), ld: tp }, pack, None);
                    }
                }
            }
        }
    });
    // SAFETY: gw does not overlap the workspace; the parallel section has ended.
    unsafe {
        let (gw, accumulate) = gw;
        let out = a.get_mut(gw, wlen);
        for t in 0..used {
            let part = std::slice::from_raw_parts(ws.slot(a, t, wlen, plen).weight, wlen);
            if t == 0 && !accumulate {
                out.copy_from_slice(part);
            } else {
                out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
            }
        }
    }
}

//! Convolutions on channel slices, one image per task, images split into one contiguous chunk
//! per thread.
//! - 1x1 stride 1: a product of the weight with the image's channels in place.
//! - stride-1 "same" kernels (3x3) with AVX2: the image is copied once into a zero-padded
//!   buffer and the kernel reads shifted rows of it (implicit im2col); the data gradient is the
//!   same convolution of the output gradient with the flipped, transposed kernel.
//! - otherwise (7x7 stride 2, or no AVX2): explicit im2col in row tiles.
//!
//! A BN-ReLU on the input (`pre`) is applied where the input is copied anyway: while packing
//! B panels, while padding the image, while writing im2col rows, while packing weight-gradient
//! rows. Without AVX2 the transformed image is written to the slot's input area first.
//!
//! 16-bit tensors (docs/precision.md): with AVX2 the kernels read and write the arena's
//! elements in place, widening them where they copy them anyway (packing, padding, im2col) or
//! load them (a weight-gradient row), rounding a fused BN-ReLU value as a stored one is, and
//! rounding each output once. Without AVX2 each image's operands are widened into the slot's
//! input and staged areas, the f32 kernels run on them, and an output is rounded into its
//! tensor from there. Weights and weight gradients are f32.

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
/// `[input area | staged area | image area | .. | weight area | pack area]`. Without AVX2 the
/// input area holds the input side in f32 (the BN-ReLU'd image, x widened, or the data
/// gradient before it is rounded) and the staged area the output side of a 16-bit convolution
/// (y before it is rounded, or the output gradient widened); with AVX2 the input area is empty
/// and the staged area holds a 16-bit product's partial sums. The image area holds the padded
/// image or an im2col tile, the weight area the packed weight or a weight-gradient partial,
/// the pack area the weight-gradient product's packed rows.
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
        let (simd, half) = (matmul::simd(), |s: &ConvShape| s.dtype != DType::F32);
        let input = if simd { 0 } else { max(&|s| s.cin * s.h * s.w) };
        let staged = max(&|s| match (half(s), simd) {
            (false, _) => 0,
            (true, false) => s.cout * Geo::of(s).p(),
            (true, true) => matmul::sums_len(s.cin.max(s.cout)),
        });
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

    /// Copies `pre(x)` (image [cin, h, w]) into `dst`, widened, with `pad` zeros around every
    /// plane (zeros after the BN-ReLU, as the convolution pads its input) and returns the
    /// shifted-rows view of it; `offs` receives the k*k tap offsets.
    fn padded<'a, X: Elem>(
        &self,
        x: &[X],
        pre: Option<Pre>,
        dst: &mut [f32],
        offs: &'a mut [usize; 49],
    ) -> Shifted<'a> {
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
                        bnvec::bn_relu_widened(src, &mut row[p..p + self.w], *f.scale.add(c), *f.shift.add(c))
                    },
                    None => widen(src, &mut row[p..p + self.w]),
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
/// `pre(x)` [cin, h, w] (zero padding), widened, each BN-ReLU value rounded to `X` as a stored
/// one is. Each run is a slice of an input row (stride 1) or a strided gather, with zeros at
/// the edges.
///
/// # Safety
/// `pre`'s constants cover cin channels.
unsafe fn im2col<X: Elem>(x: &[X], pre: Option<Pre>, col: &mut [f32], g: &Geo, rows: Range<usize>) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad);
    let p = rows.len() * g.wo;
    for ci in 0..g.cin {
        let plane = &x[ci * g.h * g.w..(ci + 1) * g.h * g.w];
        let f = pre.map(|f| (*f.scale.add(ci), *f.shift.add(ci)));
        let value = |v: X| match f {
            None => v.get(),
            Some((scale, shift)) => X::put(bnvec::bn_relu1(v.get(), scale, shift)).get(),
        };
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
                        let (out, src) = (&mut out[lo..hi], &src[first..first + hi - lo]);
                        match (f, X::as_f32(src)) {
                            (None, Some(src)) => out.copy_from_slice(src),
                            _ => out.iter_mut().zip(src).for_each(|(o, &v)| *o = value(v)),
                        }
                    } else {
                        for (o, ix) in out[lo..hi].iter_mut().zip((first..).step_by(s)) {
                            *o = value(src[ix]);
                        }
                    }
                }
            }
        }
    }
}

/// Sums `col` [r, ho*wo] back into one image `gx` [cin, h, w]: each pixel's terms in tap
/// order (the order scattering them would add them in), rounded once.
fn col2im<Y: Elem>(col: &[f32], gx: &mut [Y], g: &Geo) {
    let (k, s, pad) = (g.spec.k, g.spec.stride, g.spec.pad);
    let p = g.p();
    // The output position (oy or ox) tap `t` reads input position `i` at, if any.
    let at = |i: usize, t: usize, n: usize| {
        let o = (i + pad).checked_sub(t).filter(|o| o % s == 0)? / s;
        (o < n).then_some(o)
    };
    for (ci, plane) in gx.chunks_exact_mut(g.h * g.w).enumerate().take(g.cin) {
        for (i, v) in plane.iter_mut().enumerate() {
            let (iy, ix) = (i / g.w, i % g.w);
            let mut sum = 0.0f32;
            for ky in 0..k {
                let Some(oy) = at(iy, ky, g.ho) else { continue };
                for kx in 0..k {
                    if let Some(ox) = at(ix, kx, g.wo) {
                        sum += col[((ci * k + ky) * k + kx) * p + oy * g.wo + ox];
                    }
                }
            }
            *v = Y::put(sum);
        }
    }
}

/// Image `n` of `v`, in the arena's elements.
///
/// # Safety
/// Nothing writes the image meanwhile; `T` is its element type.
unsafe fn image<'a, T>(a: Ptr, v: View, n: usize) -> &'a [T] {
    a.elems::<T>(Ptr::plane_off(v, n, 0), v.c * v.hw())
}

/// Image `n` of `v`, to write in the arena's elements.
///
/// # Safety
/// The image is this task's; `T` is its element type.
unsafe fn image_mut<T>(a: Ptr, v: View, n: usize) -> *mut T {
    a.elems_mut::<T>(Ptr::plane_off(v, n, 0), v.c * v.hw()).as_mut_ptr()
}

/// Without AVX2: image `n` of `v` in f32, as the portable kernels read it: the arena's own
/// elements when they are f32 and there is no `pre`, else written into `stage` (widened,
/// through `pre` with each value rounded to `T` as a stored BN-ReLU output holds it).
///
/// # Safety
/// `stage` is this task's, with room for the image; nothing writes the image meanwhile.
unsafe fn operand<'a, T: Elem>(a: Ptr, v: View, n: usize, pre: Option<Pre>, stage: Ptr) -> &'a [f32] {
    let (hw, x) = (v.hw(), image::<T>(a, v, n));
    if let (Some(x), None) = (T::as_f32(x), pre) {
        return x;
    }
    let dst = stage.get_mut(0, x.len());
    for c in 0..v.c {
        let (s, d) = (&x[c * hw..(c + 1) * hw], &mut dst[c * hw..(c + 1) * hw]);
        match pre {
            Some(f) => bnvec::bn_relu_widened(s, d, *f.scale.add(c), *f.shift.add(c)),
            None => widen(s, d),
        }
    }
    dst
}

/// Without AVX2: where the portable kernels write image `n` of `v`: in place when its
/// elements are f32, else `stage` (then [`store`]).
///
/// # Safety
/// Image `n` of `v` and `stage` are this task's.
unsafe fn output<T: Elem>(a: Ptr, v: View, n: usize, stage: Ptr) -> *mut f32 {
    if T::F32 {
        image_mut::<T>(a, v, n).cast()
    } else {
        stage.at(0)
    }
}

/// Rounds image `n` of `v` from `stage`, where [`output`] put it (nothing when its elements
/// are f32: the kernels wrote them).
///
/// # Safety
/// As for [`output`].
unsafe fn store<T: Elem>(a: Ptr, v: View, n: usize, stage: Ptr) {
    if !T::F32 {
        let len = v.c * v.hw();
        narrow(stage.get(0, len), a.elems_mut::<T>(Ptr::plane_off(v, n, 0), len));
    }
}

/// One image: `y = conv(pre(x), w)`; `x` is the image, `w` a row-major [cout, r] matrix.
///
/// # Safety
/// `y` is this task's and overlaps neither `x`, `w` nor the slot; `pre` and 16-bit types only
/// with AVX2.
unsafe fn image_forward<X: Elem, Y: Elem>(x: &[X], pre: Option<Pre>, w: *const f32, y: *mut Y, g: &Geo, s: &Slot) {
    let sums = s.staged.at(0);
    if is_pointwise(g.spec) {
        let d = Dims { m: g.cout, n: g.p(), k: g.cin };
        matmul(d, Dst::to(y, g.p()), w, Src { ptr: x.as_ptr(), ld: g.p() }, pre, sums);
    } else if direct(g.spec) {
        #[cfg(target_arch = "x86_64")]
        {
            let mut offs = [0; 49];
            let xs = g.padded(x, pre, s.area.get_mut(0, g.cin * g.padded_plane()), &mut offs);
            matmul::conv_direct(g.cout, g.r, w, xs, (g.ho, g.wo), Dst::to(y, g.p()));
        }
    } else {
        for rows in g.tiles() {
            let (tp, y) = (rows.len() * g.wo, y.add(rows.start * g.wo));
            let cols = s.area.get_mut(0, g.r * tp);
            im2col(x, pre, cols, g, rows);
            let d = Dims { m: g.cout, n: tp, k: g.r };
            matmul(d, Dst::to(y, g.p()), w, Src { ptr: cols.as_ptr(), ld: tp }, None, sums);
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
                if matmul::simd() {
                    image_forward(image::<T>(a, x, n), pre, a.at(w), image_mut::<T>(a, y, n), &g, &s);
                } else {
                    let xs = operand::<T>(a, x, n, pre, s.input);
                    image_forward(xs, None, a.at(w), output::<T>(a, y, n, s.staged), &g, &s);
                    store::<T>(a, y, n, s.staged);
                }
            }
        }
    });
}

/// One image: `gx = conv_transpose(gy, wt)`, `wt` the weight packed by [`backward_data`].
///
/// # Safety
/// As for [`image_forward`].
unsafe fn image_backward_data<X: Elem, Y: Elem>(gy: &[X], wt: *const f32, gx: *mut Y, g: &Geo, s: &Slot) {
    let src = Src { ptr: gy.as_ptr(), ld: g.p() };
    if same(g.spec) {
        image_forward(gy, None, wt, gx, &g.flipped(), s);
    } else if is_pointwise(g.spec) {
        matmul(Dims { m: g.cin, n: g.p(), k: g.cout }, Dst::to(gx, g.p()), wt, src, None, s.staged.at(0));
    } else {
        let cols = s.area.get_mut(0, g.r * g.p());
        let d = Dims { m: g.r, n: g.p(), k: g.cout };
        matmul(d, Dst::to(cols.as_mut_ptr(), g.p()), wt, src, None, std::ptr::null_mut());
        col2im(cols, std::slice::from_raw_parts_mut(gx, g.cin * g.h * g.w), g);
    }
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
    let wt = Ptr(wt);
    (0..ws.threads).into_par_iter().for_each(|t| {
        let s = ws.slot(a, t, wlen, 0);
        for n in image_chunk(gy.n, ws.threads, t) {
            // SAFETY: image n of gx is this task's; gy and wt are read-only; the slot is this
            // task's.
            unsafe {
                if matmul::simd() {
                    image_backward_data(image::<T>(a, gy, n), wt.at(0), image_mut::<T>(a, gx, n), &g, &s);
                } else {
                    let gys = operand::<T>(a, gy, n, None, s.staged);
                    image_backward_data(gys, wt.at(0), output::<T>(a, gx, n, s.input), &g, &s);
                    store::<T>(a, gx, n, s.input);
                }
            }
        }
    });
}

/// One image's weight gradient `gy * im2col(pre(x))^T` into `dw` (added to it when `acc`).
///
/// # Safety
/// As for [`image_forward`]; `dw` is the slot's weight area.
unsafe fn image_backward_filter<X: Elem, G: Elem>(x: &[X], pre: Option<Pre>, gy: &[G], acc: bool, g: &Geo, s: &Slot) {
    let (gys, dw) = (Src { ptr: gy.as_ptr(), ld: g.p() }, s.weight);
    if is_pointwise(g.spec) {
        let d = Dims { m: g.cout, n: g.cin, k: g.p() };
        matmul_nt(d, Dst::f32(dw, g.cin, acc), gys, Src { ptr: x.as_ptr(), ld: g.p() }, s.pack, pre);
    } else if direct(g.spec) {
        #[cfg(target_arch = "x86_64")]
        {
            let mut offs = [0; 49];
            let shifted = g.padded(x, pre, s.area.get_mut(0, g.cin * g.padded_plane()), &mut offs);
            let dst = Dst::f32(dw, g.r, acc);
            matmul::conv_direct_filter((g.cout, g.r), gys, shifted, (g.ho, g.wo), dst, s.pack);
        }
    } else {
        for rows in g.tiles() {
            let (tp, first) = (rows.len() * g.wo, rows.start == 0);
            let cols = s.area.get_mut(0, g.r * tp);
            let gyt = Src { ptr: gys.ptr.add(rows.start * g.wo), ld: g.p() };
            im2col(x, pre, cols, g, rows);
            let (d, dst) = (Dims { m: g.cout, n: g.r, k: tp }, Dst::f32(dw, g.r, acc || !first));
            matmul_nt(d, dst, gyt, Src { ptr: cols.as_ptr(), ld: tp }, s.pack, None);
        }
    }
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
        let s = ws.slot(a, t, wlen, plen);
        for (i, n) in image_chunk(x.n, ws.threads, t).enumerate() {
            // SAFETY: the slot is this task's; x and gy are read-only.
            unsafe {
                if matmul::simd() {
                    image_backward_filter(image::<T>(a, x, n), pre, image::<T>(a, gy, n), i > 0, &g, &s);
                } else {
                    let (xs, gys) = (operand::<T>(a, x, n, pre, s.input), operand::<T>(a, gy, n, None, s.staged));
                    image_backward_filter(xs, None, gys, i > 0, &g, &s);
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

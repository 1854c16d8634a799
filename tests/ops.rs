//! Every op of the `Backend` trait on the CPU backend, at small awkward sizes: batch 1 and 3, odd
//! channel counts and spatial sizes, activations as channel slices of bigger buffers (so
//! `img_stride > c * h * w`). Forwards are checked against naive host references, backwards
//! against central finite differences, and the remaining ops against their written contracts.
//! The fused max pool's bitwise equality with `bn_relu` then the plain pool runs on every
//! backend (`on_backends!`: the CUDA backend's host device and GPU too).
//!
//! The arena starts filled with NaN, so an op that reads outside its inputs (the channels around
//! a slice, an output it should overwrite, stale workspace) poisons its result; the channels
//! around an output slice are filled with a sentinel that must survive the op.
//!
//! Tolerances: a forward against its f64 reference, `rel_inf < REF_TOL = 1e-5` (largest error
//! over the largest reference magnitude); a gradient against finite differences,
//! `norm_rel < FD_TOL = 1e-2` (Euclidean norm of the error over that of the FD gradient).

#[macro_use]
mod common;

use common::norm_rel;
use densenet::backend::{
    Affine, Backend, Bn, ConvShape, ConvSpec, CpuBackend, DType, LossScale, Matrix, Moments, Sgd, Span, View,
};
use densenet::rng;

/// Forward-vs-reference tolerance (`rel_inf`).
const REF_TOL: f64 = 1e-5;
/// Backward-vs-finite-differences tolerance (`norm_rel` of the whole gradient).
const FD_TOL: f64 = 1e-2;
/// Channels before and after each channel slice in its parent buffer.
const PRE: usize = 2;
const POST: usize = 1;
/// Fills the channels around an output slice; the op must leave it there.
const SENTINEL: f32 = -777.0;

/// (n, c, h, w).
type Shape = (usize, usize, usize, usize);

/// Hands out arena regions one after another; the convolution workspace goes last.
struct Layout {
    len: usize,
}

impl Layout {
    /// Starts at an odd element so that nothing can rely on offset 0 (or on more than the
    /// element's alignment).
    fn new() -> Layout {
        Layout { len: 13 }
    }

    /// The next `len` floats.
    fn take(&mut self, len: usize) -> Span {
        self.len += len;
        Span::f32(4 * (self.len - len), len)
    }

    fn dense(&mut self, n: usize, c: usize, h: usize, w: usize) -> View {
        View::dense(self.take(n * c * h * w).off, n, c, h, w)
    }

    /// Mean and variance of `c` channels.
    fn moments(&mut self, c: usize) -> Moments {
        Moments { mean: self.take(c), var: self.take(c) }
    }

    /// Scale and shift (or their gradients) of `c` channels.
    fn affine(&mut self, c: usize) -> Affine {
        Affine { gamma: self.take(c), beta: self.take(c) }
    }

    /// Channels `[PRE, PRE + c)` of a fresh `[n, PRE + c + POST, h, w]` buffer.
    fn slice(&mut self, n: usize, c: usize, h: usize, w: usize) -> View {
        self.dense(n, PRE + c + POST, h, w).channels(PRE, c)
    }

    /// A CPU backend over this layout plus the workspace for `convs`, every float set to NaN.
    fn backend(self, convs: &[ConvShape], max_batch: usize) -> CpuBackend {
        self.on(CpuBackend::new(), convs, max_batch)
    }

    /// [`Layout::backend`] on `be`.
    fn on<B: Backend>(self, mut be: B, convs: &[ConvShape], max_batch: usize) -> B {
        let ws = be.workspace_len(convs, 0, max_batch).unwrap() / 4;
        be.allocate(4 * (self.len + ws), Span::f32(4 * self.len, ws), max_batch).unwrap();
        be.write(Span::f32(0, self.len + ws), &vec![f32::NAN; self.len + ws]);
        be
    }
}

/// The buffer a [`Layout::slice`] view was cut from.
fn parent(v: View) -> View {
    View { off: v.off - 4 * PRE * v.hw(), c: PRE + v.c + POST, ..v }
}

/// A view's elements, one span each, in logical NCHW order.
fn offsets(v: View) -> Vec<Span> {
    (0..v.n).flat_map(|n| each(v.image(n))).collect()
}

/// A span's elements, one span each.
fn each(s: Span) -> Vec<Span> {
    (0..s.len).map(|i| s.at(i, 1)).collect()
}

/// A view's elements, dense NCHW.
fn gather<B: Backend>(be: &B, v: View) -> Vec<f32> {
    (0..v.n).flat_map(|n| be.read(v.image(n))).collect()
}

/// Writes dense NCHW `data` into a view.
fn scatter<B: Backend>(be: &mut B, v: View, data: &[f32]) {
    assert_eq!(data.len(), v.numel());
    for (n, image) in data.chunks(v.c * v.hw()).enumerate() {
        be.write(v.image(n), image);
    }
}

/// Fills the whole parent of slice `v` with [`SENTINEL`].
fn fence(be: &mut CpuBackend, v: View) {
    let p = parent(v);
    scatter(be, p, &vec![SENTINEL; p.numel()]);
}

/// Asserts the channels around slice `v` still hold [`SENTINEL`].
fn assert_fenced(be: &CpuBackend, v: View, what: &str) {
    let p = parent(v);
    let around = gather(be, p)
        .chunks(p.hw())
        .enumerate()
        .filter(|(i, _)| !(PRE..PRE + v.c).contains(&(i % p.c)))
        .all(|(_, plane)| plane.iter().all(|&x| x == SENTINEL));
    assert!(around, "{what}: wrote outside its channel slice");
}

/// `len` standard normal samples of stream `seed`.
fn randn(seed: u64, len: usize) -> Vec<f32> {
    (0..len).map(|i| rng::normal(seed, i as u64) as f32).collect()
}

/// `len` distinct values 0.05 apart in random order: a ±1e-2 perturbation never reorders them.
fn distinct(seed: u64, len: usize) -> Vec<f32> {
    let mut order: Vec<usize> = (0..len).collect();
    order.sort_by_key(|&i| rng::mix64(seed ^ i as u64));
    order.into_iter().map(|r| (r as f32 - len as f32 / 2.0) * 0.05).collect()
}

/// `sum(a * b)` in f64.
fn dot(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(&x, &y)| x as f64 * y as f64).sum()
}

/// Asserts `max |got - want| / max |want| < REF_TOL`.
fn assert_ref(what: &str, got: &[f32], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let err = got.iter().zip(want).map(|(&g, &w)| (g as f64 - w).abs()).fold(0.0, f64::max);
    let scale = want.iter().map(|w| w.abs()).fold(0.0, f64::max);
    assert!(scale > 0.0, "{what}: reference is all zeros");
    assert!(err < REF_TOL * scale, "{what}: error {err} against magnitude {scale}");
}

/// Asserts `grad` matches central differences of `loss` w.r.t. the arena floats `offs`, each
/// perturbed by ±`eps` in f32 (the step is the exact f32 difference, the quotient taken in f64).
/// Elements with `skip(i)` (near a ReLU kink) are left out; at least half must remain.
fn check_fd(
    what: &str,
    be: &mut CpuBackend,
    offs: &[Span],
    grad: &[f32],
    eps: f32,
    skip: impl Fn(usize) -> bool,
    mut loss: impl FnMut(&mut CpuBackend) -> f64,
) {
    assert_eq!(offs.len(), grad.len(), "{what}: gradient length");
    let (mut fd, mut an) = (Vec::new(), Vec::new());
    for (i, &off) in offs.iter().enumerate().filter(|&(i, _)| !skip(i)) {
        let x0 = be.read(off)[0];
        let (hi, lo) = (x0 + eps, x0 - eps);
        be.write(off, &[hi]);
        let up = loss(be);
        be.write(off, &[lo]);
        let down = loss(be);
        be.write(off, &[x0]);
        fd.push(((up - down) / (hi as f64 - lo as f64)) as f32);
        an.push(grad[i]);
    }
    assert!(2 * fd.len() >= offs.len(), "{what}: only {} of {} elements checked", fd.len(), offs.len());
    assert!(fd.iter().any(|&g| g != 0.0), "{what}: finite differences are all zero");
    let err = norm_rel(&an, &fd);
    assert!(err < FD_TOL, "{what}: gradient off finite differences by {err}");
}

// ---------------------------------------------------------------------------------------------
// Convolutions

/// (spec, n, cin, cout, h, w).
const CONVS: [(ConvSpec, usize, usize, usize, usize, usize); 10] = [
    (ConvSpec::POINTWISE, 1, 5, 7, 5, 7),
    (ConvSpec::POINTWISE, 3, 7, 3, 9, 9),
    // More input channels than one packed panel holds (256): the panels accumulate.
    (ConvSpec::POINTWISE, 2, 300, 5, 3, 5),
    (ConvSpec::SAME3, 1, 3, 5, 9, 9),
    (ConvSpec::SAME3, 3, 5, 7, 5, 7),
    // 8 wide: two image rows per 16-pixel run; 7 high: the last run is a single row.
    (ConvSpec::SAME3, 2, 7, 13, 7, 8),
    // 19 wide: a full 16-pixel run plus a masked one.
    (ConvSpec::SAME3, 1, 4, 6, 3, 19),
    (ConvSpec::STEM7, 1, 5, 3, 5, 7),
    // An im2col bigger than one tile (64K floats): several row tiles, accumulated.
    (ConvSpec::STEM7, 1, 3, 2, 64, 64),
    (ConvSpec::STEM7, 3, 3, 5, 9, 9),
];

/// A convolution laid out in a fresh arena: random `x`, `gy` and weight `w`; activations are
/// channel slices, `w` and `gw` dense `[cout, cin, k, k]`.
struct Conv {
    spec: ConvSpec,
    x: View,
    y: View,
    gy: View,
    gx: View,
    w: Span,
    gw: Span,
}

impl Conv {
    fn new((spec, n, cin, cout, h, w): (ConvSpec, usize, usize, usize, usize, usize)) -> (CpuBackend, Conv) {
        let mut l = Layout::new();
        let x = l.slice(n, cin, h, w);
        let y = l.slice(n, cout, spec.out(h), spec.out(w));
        let gy = l.slice(n, cout, spec.out(h), spec.out(w));
        let gx = l.slice(n, cin, h, w);
        let wlen = cout * cin * spec.k * spec.k;
        let (wt, gw) = (l.take(wlen), l.take(wlen));
        let mut be = l.backend(&[ConvShape { spec, cin, cout, h, w, dtype: DType::F32 }], n);
        scatter(&mut be, x, &randn(1, x.numel()));
        scatter(&mut be, gy, &randn(2, gy.numel()));
        be.write(wt, &randn(3, wlen));
        (be, Conv { spec, x, y, gy, gx, w: wt, gw })
    }

    fn name(&self) -> String {
        let (s, x) = (self.spec, self.x);
        format!("conv {}x{} s{} p{}, x [{}, {}, {}, {}] -> {}", s.k, s.k, s.stride, s.pad, x.n, x.c, x.h, x.w, self.y.c)
    }

    /// `sum(gy * conv(x, w))`: the loss whose gradients the backward ops compute.
    fn loss(&self, be: &mut CpuBackend) -> f64 {
        be.conv_forward(self.x, None, self.w, self.y, self.spec);
        dot(&gather(be, self.gy), &gather(be, self.y))
    }
}

/// Direct convolution of dense `x` (shape of `xv`) with `wt` `[cout, cin, k, k]`, in f64.
fn naive_conv(x: &[f32], xv: View, wt: &[f32], cout: usize, s: ConvSpec) -> Vec<f64> {
    let (cin, h, w, k) = (xv.c, xv.h, xv.w, s.k);
    let (ho, wo) = (s.out(h), s.out(w));
    let mut y = vec![0.0; xv.n * cout * ho * wo];
    for n in 0..xv.n {
        for co in 0..cout {
            for oy in 0..ho {
                for ox in 0..wo {
                    let mut acc = 0.0;
                    for ci in 0..cin {
                        for ky in 0..k {
                            for kx in 0..k {
                                let iy = (oy * s.stride + ky).wrapping_sub(s.pad);
                                let ix = (ox * s.stride + kx).wrapping_sub(s.pad);
                                if iy < h && ix < w {
                                    let xi = ((n * cin + ci) * h + iy) * w + ix;
                                    acc += x[xi] as f64 * wt[((co * cin + ci) * k + ky) * k + kx] as f64;
                                }
                            }
                        }
                    }
                    y[((n * cout + co) * ho + oy) * wo + ox] = acc;
                }
            }
        }
    }
    y
}

#[test]
fn conv_forward_matches_naive_and_writes_only_its_channel_slice() {
    for case in CONVS {
        let (mut be, c) = Conv::new(case);
        fence(&mut be, c.y);
        be.conv_forward(c.x, None, c.w, c.y, c.spec);
        let want = naive_conv(&gather(&be, c.x), c.x, &be.read(c.w), c.y.c, c.spec);
        assert_ref(&c.name(), &gather(&be, c.y), &want);
        assert_fenced(&be, c.y, &c.name());
    }
}

#[test]
fn conv_backward_data_matches_finite_differences() {
    for case in CONVS {
        let (mut be, c) = Conv::new(case);
        fence(&mut be, c.gx);
        be.conv_backward_data(c.gy, c.w, c.gx, c.spec);
        assert_fenced(&be, c.gx, &c.name());
        let grad = gather(&be, c.gx);
        check_fd(&c.name(), &mut be, &offsets(c.x), &grad, 1e-2, |_| false, |be| c.loss(be));
    }
}

#[test]
fn conv_backward_filter_matches_finite_differences() {
    for case in CONVS {
        let (mut be, c) = Conv::new(case);
        be.conv_backward_filter(c.x, None, c.gy, c.gw, c.spec, false);
        let grad = be.read(c.gw);
        check_fd(&c.name(), &mut be, &each(c.w), &grad, 1e-2, |_| false, |be| c.loss(be));
    }
}

/// The filter gradient with `accumulate` adds to what `gw` held: a batch split in two (the
/// second half accumulated onto the first) gives the whole batch's gradient.
fn conv_backward_filter_accumulates<B: Backend>(make: &dyn Fn() -> B) {
    for (spec, n, cin, cout, h, w) in CONVS.into_iter().filter(|c| c.1 > 1) {
        let (ho, wo) = (spec.out(h), spec.out(w));
        let mut l = Layout::new();
        let (x, gy) = (l.slice(n, cin, h, w), l.slice(n, cout, ho, wo));
        let wlen = cout * cin * spec.k * spec.k;
        let (whole, split) = (l.take(wlen), l.take(wlen));
        let bn = Bn { stats: l.moments(cin), affine: l.affine(cin) };
        let mut be = l.on(make(), &[ConvShape { spec, cin, cout, h, w, dtype: DType::F32 }], n);
        scatter(&mut be, x, &randn(1, x.numel()));
        scatter(&mut be, gy, &randn(2, gy.numel()));
        be.write(bn.affine.gamma, &randn(4, cin).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
        be.write(bn.affine.beta, &randn(5, cin).iter().map(|v| 0.3 * v).collect::<Vec<_>>());
        be.bn_stats(x, bn.stats);
        let name = format!("{:?} n {n} cin {cin} cout {cout} {h}x{w}", spec);
        for pre in [None, Some(bn)] {
            be.conv_backward_filter(x, pre, gy, whole, spec, false);
            let first = n / 2;
            be.conv_backward_filter(x.images(0, first), pre, gy.images(0, first), split, spec, false);
            be.conv_backward_filter(x.images(first, n - first), pre, gy.images(first, n - first), split, spec, true);
            be.take_error().unwrap();
            let err = norm_rel(&be.read(split), &be.read(whole));
            assert!(err < 1e-6, "{name} pre {}: split batch off by {err:e}", pre.is_some());
        }
    }
}
on_backends!(conv_backward_filter_accumulate, conv_backward_filter_accumulates);

#[test]
fn conv_with_fused_bn_relu_equals_bn_relu_then_conv() {
    // The fused input transform must produce bitwise the values of bn_relu (zero padding after
    // the ReLU included), in the forward and in the weight gradient.
    for (spec, n, cin, cout, h, w) in CONVS {
        let (ho, wo) = (spec.out(h), spec.out(w));
        let mut l = Layout::new();
        let (x, a) = (l.slice(n, cin, h, w), l.slice(n, cin, h, w));
        let (y1, y2, gy) = (l.slice(n, cout, ho, wo), l.slice(n, cout, ho, wo), l.slice(n, cout, ho, wo));
        let wlen = cout * cin * spec.k * spec.k;
        let (wt, gw1, gw2) = (l.take(wlen), l.take(wlen), l.take(wlen));
        let bn = Bn { stats: l.moments(cin), affine: l.affine(cin) };
        let mut be = l.backend(&[ConvShape { spec, cin, cout, h, w, dtype: DType::F32 }], n);
        scatter(&mut be, x, &randn(1, x.numel()));
        scatter(&mut be, gy, &randn(2, gy.numel()));
        be.write(wt, &randn(3, wlen));
        be.write(bn.affine.gamma, &randn(4, cin).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
        be.write(bn.affine.beta, &randn(5, cin).iter().map(|v| 0.3 * v).collect::<Vec<_>>());
        be.bn_stats(x, bn.stats);
        be.bn_relu(x, bn, a);
        let name = format!("{:?} cin {cin} cout {cout} {h}x{w}", spec);
        be.conv_forward(x, Some(bn), wt, y1, spec);
        be.conv_forward(a, None, wt, y2, spec);
        assert_eq!(gather(&be, y1), gather(&be, y2), "{name}: fused forward");
        be.conv_backward_filter(x, Some(bn), gy, gw1, spec, false);
        be.conv_backward_filter(a, None, gy, gw2, spec, false);
        assert_eq!(be.read(gw1), be.read(gw2), "{name}: fused weight gradient");
    }
}

// ---------------------------------------------------------------------------------------------
// Batch norm

/// (n, c, h, w) of the batch-norm inputs.
const BNS: [Shape; 2] = [(1, 3, 5, 7), (3, 5, 9, 9)];

/// A batch norm laid out in a fresh arena: `x` with a nonzero mean, gamma around 1, beta around
/// 0, random `g`; activations are channel slices, per-channel vectors dense.
struct BnCase {
    x: View,
    y: View,
    g: View,
    dx: View,
    bn: Bn,
    grad: Affine,
}

impl BnCase {
    fn new((n, c, h, w): Shape) -> (CpuBackend, BnCase) {
        let mut l = Layout::new();
        let (x, y, g, dx) = (l.slice(n, c, h, w), l.slice(n, c, h, w), l.slice(n, c, h, w), l.slice(n, c, h, w));
        let (bn, grad) = (Bn { stats: l.moments(c), affine: l.affine(c) }, l.affine(c));
        let mut be = l.backend(&[], n);
        let affine = |seed, a: f32, b: f32, len| randn(seed, len).iter().map(|v| a + b * v).collect::<Vec<_>>();
        scatter(&mut be, x, &affine(4, 0.5, 2.0, x.numel()));
        scatter(&mut be, g, &randn(5, g.numel()));
        be.write(bn.affine.gamma, &affine(6, 1.0, 0.5, c));
        be.write(bn.affine.beta, &affine(7, 0.0, 0.3, c));
        (be, BnCase { x, y, g, dx, bn, grad })
    }

    /// `sum(g * relu(bn(x)))` with the batch statistics of `x` itself.
    fn loss(&self, be: &mut CpuBackend) -> f64 {
        be.bn_stats(self.x, self.bn.stats);
        be.bn_relu(self.x, self.bn, self.y);
        dot(&gather(be, self.g), &gather(be, self.y))
    }
}

/// Channel of logical element `i` of a view.
fn channel(v: View, i: usize) -> usize {
    i / v.hw() % v.c
}

/// Per-channel mean and biased variance of dense `x` (shape of `v`), in f64.
fn naive_stats(x: &[f32], v: View) -> (Vec<f64>, Vec<f64>) {
    let count = (v.n * v.hw()) as f64;
    let (mut mean, mut var) = (vec![0.0; v.c], vec![0.0; v.c]);
    for (i, &x) in x.iter().enumerate() {
        mean[channel(v, i)] += x as f64 / count;
    }
    for (i, &x) in x.iter().enumerate() {
        var[channel(v, i)] += (x as f64 - mean[channel(v, i)]).powi(2) / count;
    }
    (mean, var)
}

/// `v` widened to f64.
fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

#[test]
fn bn_stats_matches_mean_and_biased_variance() {
    for shape in BNS {
        let (mut be, b) = BnCase::new(shape);
        be.bn_stats(b.x, b.bn.stats);
        let (mean, var) = naive_stats(&gather(&be, b.x), b.x);
        assert_ref("bn_stats mean", &be.read(b.bn.stats.mean), &mean);
        assert_ref("bn_stats var", &be.read(b.bn.stats.var), &var);
    }
}

#[test]
fn bn_relu_matches_formula_and_writes_only_its_channel_slice() {
    for shape in BNS {
        let (mut be, b) = BnCase::new(shape);
        let c = b.x.c;
        let (mean, var) = (randn(8, c), (0..c).map(|i| 0.1 + rng::uniform(9, i as u64)).collect::<Vec<_>>());
        be.write(b.bn.stats.mean, &mean);
        be.write(b.bn.stats.var, &var);
        fence(&mut be, b.y);
        be.bn_relu(b.x, b.bn, b.y);
        let (gamma, beta) = (be.read(b.bn.affine.gamma), be.read(b.bn.affine.beta));
        let want: Vec<f64> = gather(&be, b.x)
            .iter()
            .enumerate()
            .map(|(i, &x)| {
                let ch = channel(b.x, i);
                let xhat = (x as f64 - mean[ch] as f64) / (var[ch] as f64 + 1e-5).sqrt();
                (gamma[ch] as f64 * xhat + beta[ch] as f64).max(0.0)
            })
            .collect();
        assert_ref("bn_relu", &gather(&be, b.y), &want);
        assert_fenced(&be, b.y, "bn_relu");
    }
}

#[test]
fn bn_relu_backward_matches_finite_differences_through_batch_statistics() {
    const EPS: f32 = 1e-3;
    for shape in BNS {
        let (mut be, b) = BnCase::new(shape);
        be.bn_stats(b.x, b.bn.stats);
        fence(&mut be, b.dx);
        be.bn_relu_backward(b.g, b.x, b.bn, b.grad, b.dx, false);
        assert_fenced(&be, b.dx, "bn_relu_backward");
        let (dx, dgamma, dbeta) = (gather(&be, b.dx), be.read(b.grad.gamma), be.read(b.grad.beta));

        // Perturbations that move a pre-activation across the ReLU kink are skipped: x_i moves
        // pre_i by about eps * gamma / std; gamma_c moves every pre_i of channel c by
        // eps * xhat_i, beta_c by eps.
        let xs = gather(&be, b.x);
        let (mean, var) = naive_stats(&xs, b.x);
        let (gamma, beta) = (to_f64(&be.read(b.bn.affine.gamma)), to_f64(&be.read(b.bn.affine.beta)));
        let inv_std: Vec<f64> = var.iter().map(|v| 1.0 / (v + 1e-5).sqrt()).collect();
        let chan = |i| channel(b.x, i);
        let xhat: Vec<f64> =
            xs.iter().enumerate().map(|(i, &x)| (x as f64 - mean[chan(i)]) * inv_std[chan(i)]).collect();
        let pre: Vec<f64> = xhat.iter().enumerate().map(|(i, &v)| gamma[chan(i)] * v + beta[chan(i)]).collect();
        let eps = EPS as f64;
        let skip_x = |i: usize| pre[i].abs() < 2.0 * eps * (gamma[chan(i)] * inv_std[chan(i)]).abs();
        let skip_gamma = |ch| (0..xs.len()).any(|i| chan(i) == ch && pre[i].abs() < 2.0 * eps * xhat[i].abs());
        let skip_beta = |ch| (0..xs.len()).any(|i| chan(i) == ch && pre[i].abs() < 2.0 * eps);

        let skips: [&dyn Fn(usize) -> bool; 3] = [&skip_x, &skip_gamma, &skip_beta];
        let checks = [
            ("bn dx", offsets(b.x), dx),
            ("bn dgamma", each(b.bn.affine.gamma), dgamma),
            ("bn dbeta", each(b.bn.affine.beta), dbeta),
        ];
        for ((what, offs, grad), skip) in checks.into_iter().zip(skips) {
            check_fd(what, &mut be, &offs, &grad, EPS, skip, |be| b.loss(be));
        }
    }
}

#[test]
fn bn_relu_backward_accumulates_and_runs_in_place() {
    let (mut be, b) = BnCase::new(BNS[1]);
    be.bn_stats(b.x, b.bn.stats);
    be.bn_relu_backward(b.g, b.x, b.bn, b.grad, b.dx, false);
    let (dx, dgamma, dbeta) = (gather(&be, b.dx), to_f64(&be.read(b.grad.gamma)), to_f64(&be.read(b.grad.beta)));

    // Accumulating adds to dx; dgamma and dbeta are still overwritten.
    let base = randn(10, dx.len());
    fence(&mut be, b.dx);
    scatter(&mut be, b.dx, &base);
    be.bn_relu_backward(b.g, b.x, b.bn, b.grad, b.dx, true);
    let want: Vec<f64> = base.iter().zip(&dx).map(|(&a, &d)| a as f64 + d as f64).collect();
    assert_ref("accumulated dx", &gather(&be, b.dx), &want);
    assert_ref("dgamma with accumulate", &be.read(b.grad.gamma), &dgamma);
    assert_ref("dbeta with accumulate", &be.read(b.grad.beta), &dbeta);
    assert_fenced(&be, b.dx, "accumulating bn_relu_backward");

    // In place (dx is g): the same result as out of place.
    let g = gather(&be, b.g);
    fence(&mut be, b.g);
    scatter(&mut be, b.g, &g);
    be.bn_relu_backward(b.g, b.x, b.bn, b.grad, b.g, false);
    assert_ref("in-place dx", &gather(&be, b.g), &to_f64(&dx));
    assert_ref("in-place dgamma", &be.read(b.grad.gamma), &dgamma);
    assert_ref("in-place dbeta", &be.read(b.grad.beta), &dbeta);
    assert_fenced(&be, b.g, "in-place bn_relu_backward");
}

#[test]
fn bn_update_running_blends_in_unbiased_batch_statistics() {
    let (c, momentum) = (5, 0.1);
    for count in [2, 105] {
        let mut l = Layout::new();
        let ([batch, running], flag) = ([(); 2].map(|_| l.moments(c)), l.take(1));
        let (mean, var, rmean, rvar) = (batch.mean, batch.var, running.mean, running.var);
        let mut be = l.backend(&[], 1);
        let positive = |seed| (0..c).map(|i| 0.5 + rng::uniform(seed, i as u64)).collect::<Vec<_>>();
        let (m, v, rm, rv) = (randn(11, c), positive(12), randn(13, c), positive(14));
        be.write(mean, &m);
        be.write(var, &v);
        be.write(rmean, &rm);
        be.write(rvar, &rv);
        be.write(flag, &[0.0]);
        be.bn_update_running(batch, running, count, momentum, flag);
        assert_eq!(be.read(flag), [0.0], "finite statistics raised the flag");
        let unbias = count as f64 / (count - 1) as f64;
        let blend = |run: &[f32], batch: &[f32], scale: f64| -> Vec<f64> {
            run.iter().zip(batch).map(|(&r, &b)| 0.9 * r as f64 + 0.1 * b as f64 * scale).collect()
        };
        assert_ref("running mean", &be.read(rmean), &blend(&rm, &m, 1.0));
        assert_ref(&format!("running var, count {count}"), &be.read(rvar), &blend(&rv, &v, unbias));
        // A batch variance that overflows: the flag goes up, and stays up.
        be.write(var.at(2, 1), &[f32::INFINITY]);
        be.bn_update_running(batch, running, count, momentum, flag);
        assert_eq!(be.read(flag), [1.0], "an infinite running variance left the flag down");
        be.write(var.at(2, 1), &[1.0]);
        be.write(rvar.at(2, 1), &[1.0]);
        be.bn_update_running(batch, running, count, momentum, flag);
        assert_eq!(be.read(flag), [1.0], "the flag was cleared");
    }
}

// ---------------------------------------------------------------------------------------------
// Dropout

/// `len` values in [1, 2): never zero, so a zero marks a dropped element.
fn nonzero(seed: u64, len: usize) -> Vec<f32> {
    (0..len).map(|i| 1.0 + rng::uniform(seed, i as u64)).collect()
}

#[test]
fn dropout_drops_about_p_in_place_and_scales_survivors() {
    let p = 0.3f32;
    let mut l = Layout::new();
    let x = l.slice(3, 5, 32, 32);
    let mut be = l.backend(&[], 3);
    let xs = nonzero(15, x.numel());
    fence(&mut be, x);
    scatter(&mut be, x, &xs);
    be.dropout(x, p, 99);
    let out = gather(&be, x);
    // 15360 Bernoulli(0.3) draws: standard deviation 0.0037, so ±0.02 is over 5 sigma.
    let dropped = out.iter().filter(|&&v| v == 0.0).count() as f64 / out.len() as f64;
    assert!((dropped - p as f64).abs() < 0.02, "dropped fraction {dropped} for p = {p}");
    let (kept, want): (Vec<f32>, Vec<f64>) =
        out.iter().zip(&xs).filter(|(&o, _)| o != 0.0).map(|(&o, &x)| (o, x as f64 / (1.0 - p as f64))).unzip();
    assert_ref("dropout survivors", &kept, &want);
    assert_fenced(&be, x, "dropout");
}

#[test]
fn dropout_mask_is_fixed_by_key_and_shared_with_the_gradient() {
    let (p, key) = (0.4, 7);
    let mut l = Layout::new();
    // The activation is a channel slice, its gradient a dense tensor: the mask follows the
    // logical index, not the arena offset.
    let (x, g, other) = (l.slice(3, 3, 5, 7), l.dense(3, 3, 5, 7), l.slice(3, 3, 5, 7));
    let mut be = l.backend(&[], 3);
    let data = nonzero(16, x.numel());
    for v in [x, g, other] {
        scatter(&mut be, v, &data);
    }
    be.dropout(x, p, key);
    be.dropout(g, p, key);
    be.dropout(other, p, key + 1);
    let mask = |v| gather(&be, v).iter().map(|&v| v == 0.0).collect::<Vec<_>>();
    assert!(mask(x).contains(&true), "nothing dropped");
    assert!(gather(&be, x) == gather(&be, g), "same key, different result on the gradient");
    // Independent masks differ at 2p(1-p) = 48% of the 315 elements.
    let differ = mask(x).iter().zip(mask(other)).filter(|(a, b)| **a != *b).count();
    assert!(differ > x.numel() / 4, "masks of two keys differ at only {differ} elements");
}

// ---------------------------------------------------------------------------------------------
// Pooling

/// (n, c, h, w) of the pooling inputs.
const POOLS: [Shape; 3] = [(1, 3, 5, 7), (3, 5, 9, 9), (2, 4, 6, 8)];

/// A pooling laid out in a fresh arena: `x` from `data`, random `gy`, all channel slices; a BN
/// of x's channels for the fused max pool (gamma around 1, beta around 0, x's batch statistics).
struct Pool {
    x: View,
    y: View,
    gy: View,
    gx: View,
    bn: Bn,
    /// The gradients of the BN's gamma and beta.
    grad: Affine,
}

impl Pool {
    fn new((n, c, h, w): Shape, (ho, wo): (usize, usize), data: Vec<f32>) -> (CpuBackend, Pool) {
        let mut l = Layout::new();
        let (x, gx) = (l.slice(n, c, h, w), l.slice(n, c, h, w));
        let (y, gy) = (l.slice(n, c, ho, wo), l.slice(n, c, ho, wo));
        let (bn, grad) = (Bn { stats: l.moments(c), affine: l.affine(c) }, l.affine(c));
        let mut be = l.backend(&[], n);
        scatter(&mut be, x, &data);
        scatter(&mut be, gy, &randn(17, gy.numel()));
        be.write(bn.affine.gamma, &randn(18, c).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
        be.write(bn.affine.beta, &randn(19, c).iter().map(|v| 0.3 * v).collect::<Vec<_>>());
        be.bn_stats(x, bn.stats);
        (be, Pool { x, y, gy, gx, bn, grad })
    }

    /// `sum(gy * pool(x))`; a pool with a BN-ReLU takes x's batch statistics first, as the
    /// ImageNet stem does.
    fn loss(&self, be: &mut CpuBackend, op: &PoolOp) -> f64 {
        if op.pre {
            be.bn_stats(self.x, self.bn.stats);
        }
        (op.forward)(be, self);
        dot(&gather(be, self.gy), &gather(be, self.y))
    }

    /// The values `op` pools, in f64: x, or `relu(bn(x))` with the arena's BN.
    fn input(&self, be: &CpuBackend, op: &PoolOp) -> Vec<f64> {
        let x = to_f64(&gather(be, self.x));
        if !op.pre {
            return x;
        }
        let [mean, var, gamma, beta] = self.bn.spans().map(|s| to_f64(&be.read(s)));
        let c = |i| channel(self.x, i);
        x.iter()
            .enumerate()
            .map(|(i, &x)| ((x - mean[c(i)]) / (var[c(i)] + 1e-5).sqrt() * gamma[c(i)] + beta[c(i)]).max(0.0))
            .collect()
    }
}

/// Naive stride-2 pooling of every plane of dense `x` (shape of `v`): `reduce` gets the in-bounds
/// values of each k x k window, the input padded by `pad`.
fn naive_pool(x: &[f64], v: View, k: usize, pad: usize, reduce: fn(&[f64]) -> f64) -> Vec<f64> {
    let (ho, wo) = ((v.h + 2 * pad - k) / 2 + 1, (v.w + 2 * pad - k) / 2 + 1);
    let mut y = Vec::new();
    for plane in x.chunks(v.hw()) {
        for oy in 0..ho {
            for ox in 0..wo {
                let window: Vec<f64> = (0..k * k)
                    .map(|i| ((2 * oy + i / k).wrapping_sub(pad), (2 * ox + i % k).wrapping_sub(pad)))
                    .filter(|&(iy, ix)| iy < v.h && ix < v.w)
                    .map(|(iy, ix)| plane[iy * v.w + ix])
                    .collect();
                y.push(reduce(&window));
            }
        }
    }
    y
}

/// Mean of a pooling window.
fn mean_of(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// Largest value of a pooling window.
fn max_of(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::NEG_INFINITY, f64::max)
}

/// Output plane of a 2x2 stride-2 average pool.
fn avg2_out((_, _, h, w): Shape) -> (usize, usize) {
    (h / 2, w / 2)
}

/// Output plane of a 3x3 stride-2 pad-1 max pool.
fn max3_out((_, _, h, w): Shape) -> (usize, usize) {
    ((h - 1) / 2 + 1, (w - 1) / 2 + 1)
}

/// Elements of a tensor of this shape.
fn numel((n, c, h, w): Shape) -> usize {
    n * c * h * w
}

/// A stride-2 pooling under test: the backend's forward and backward, its output plane, and
/// the naive reference's window (`k` x `k`, input padded by `pad`, `reduce`d); `pre`: the op
/// pools `relu(bn(x))` with the [`Pool`]'s BN, and its backward gives that input's gradient.
struct PoolOp {
    name: &'static str,
    forward: fn(&mut CpuBackend, &Pool),
    backward: fn(&mut CpuBackend, &Pool),
    out: fn(Shape) -> (usize, usize),
    k: usize,
    pad: usize,
    reduce: fn(&[f64]) -> f64,
    pre: bool,
}

const AVG_POOL2: PoolOp = PoolOp {
    name: "avg_pool2",
    forward: |be, p| be.avg_pool2(p.x, p.y),
    backward: |be, p| be.avg_pool2_backward(p.gy, p.gx),
    out: avg2_out,
    k: 2,
    pad: 0,
    reduce: mean_of,
    pre: false,
};

const MAX_POOL3: PoolOp = PoolOp {
    name: "max_pool3",
    forward: |be, p| be.max_pool3(p.x, None, p.y),
    backward: |be, p| be.max_pool3_backward(p.x, None, p.gy, p.gx),
    out: max3_out,
    k: 3,
    pad: 1,
    reduce: max_of,
    pre: false,
};

const MAX_POOL3_BN_RELU: PoolOp = PoolOp {
    name: "max_pool3 with a BN-ReLU",
    forward: |be, p| be.max_pool3(p.x, Some(p.bn), p.y),
    backward: |be, p| be.max_pool3_backward(p.x, Some(p.bn), p.gy, p.gx),
    pre: true,
    ..MAX_POOL3
};

#[test]
fn pools_match_naive_and_write_only_their_channel_slice() {
    for (op, seed) in [(&AVG_POOL2, 18), (&MAX_POOL3, 19), (&MAX_POOL3_BN_RELU, 20)] {
        for shape in POOLS {
            let (mut be, p) = Pool::new(shape, (op.out)(shape), randn(seed, numel(shape)));
            fence(&mut be, p.y);
            (op.forward)(&mut be, &p);
            assert_ref(op.name, &gather(&be, p.y), &naive_pool(&p.input(&be, op), p.x, op.k, op.pad, op.reduce));
            assert_fenced(&be, p.y, op.name);
        }
    }
}

#[test]
fn pool_backwards_match_finite_differences() {
    const EPS: f32 = 1e-2;
    for shape in POOLS {
        // Distinct inputs 0.05 apart for the max: no window has a tie within the ±1e-2
        // perturbation (a BN scales a channel's values alike, so that holds through it).
        let n = numel(shape);
        for (op, x) in
            [(&AVG_POOL2, randn(18, n)), (&MAX_POOL3, distinct(20, n)), (&MAX_POOL3_BN_RELU, distinct(21, n))]
        {
            let (mut be, p) = Pool::new(shape, (op.out)(shape), x);
            fence(&mut be, p.gx);
            (op.backward)(&mut be, &p);
            assert_fenced(&be, p.gx, &format!("{}_backward", op.name));
            // Through the BN-ReLU as the stem's backward goes: its backward applies the ReLU
            // mask, and x's batch statistics depend on x; perturbations that move x across the
            // ReLU kink are skipped.
            let mut skip = vec![false; p.x.numel()];
            if op.pre {
                be.bn_relu_backward(p.gx, p.x, p.bn, p.grad, p.gx, false);
                let [mean, var, gamma, beta] = p.bn.spans().map(|s| to_f64(&be.read(s)));
                let scale: Vec<f64> = gamma.iter().zip(&var).map(|(g, v)| g / (v + 1e-5).sqrt()).collect();
                for (i, &x) in gather(&be, p.x).iter().enumerate() {
                    let c = channel(p.x, i);
                    skip[i] = ((x as f64 - mean[c]) * scale[c] + beta[c]).abs() < 2.0 * EPS as f64 * scale[c].abs();
                }
            }
            let grad = gather(&be, p.gx);
            check_fd(op.name, &mut be, &offsets(p.x), &grad, EPS, |i| skip[i], |be| p.loss(be, op));
        }
    }
}

#[test]
fn max_pool3_routes_ties_to_the_first_maximum_and_never_to_padding() {
    let shape = POOLS[0];
    // A constant negative input: every window is a tie, and zero padding would win. Through a
    // BN-ReLU with x's statistics, a constant input of zeros (so that the BN is exact) becomes
    // relu(beta_c) in channel c: a tie again, at zero where beta_c < 0.
    for (op, value) in [(&MAX_POOL3, -1.0), (&MAX_POOL3_BN_RELU, 0.0)] {
        let (mut be, p) = Pool::new(shape, max3_out(shape), vec![value; numel(shape)]);
        let beta = be.read(p.bn.affine.beta);
        assert!(beta.iter().any(|&b| b < 0.0) && beta.iter().any(|&b| b > 0.0), "zero and positive ties");
        (op.forward)(&mut be, &p);
        let input = p.input(&be, op);
        let (x, y) = (p.x, p.y);
        let want: Vec<f64> = (0..y.numel()).map(|i| input[i / y.hw() * x.hw()]).collect();
        assert_ref(&format!("{} on ties", op.name), &gather(&be, y), &want);
        (op.backward)(&mut be, &p);
        let mut want = vec![0.0; x.numel()];
        for (i, &g) in gather(&be, p.gy).iter().enumerate() {
            let (plane, oy, ox) = (i / y.hw(), i / y.w % y.h, i % y.w);
            // The window's first in-bounds pixel in row-major order.
            want[plane * x.hw() + (2 * oy).saturating_sub(1) * x.w + (2 * ox).saturating_sub(1)] += g as f64;
        }
        assert_ref(&format!("{}_backward on ties", op.name), &gather(&be, p.gx), &want);
    }
}

/// The fused max pool and its backward give bitwise what `bn_relu` followed by the plain ones
/// gives, on every backend: many windows tie at zero, one channel is constant after the BN
/// (gamma 0), one makes -0 pre-activations (mean, beta -0, gamma < 0, x +0), and a NaN input
/// becomes 0.
fn max_pool3_with_a_bn_relu_is_bn_relu_then_max_pool3<B: Backend>(make: &dyn Fn() -> B) {
    for shape in [(1, 3, 5, 7), (3, 5, 9, 9), (2, 4, 6, 8), (2, 3, 17, 19)] {
        let ((n, c, h, w), (ho, wo)) = (shape, max3_out(shape));
        let mut l = Layout::new();
        let (x, t) = (l.slice(n, c, h, w), l.dense(n, c, h, w));
        let (y1, y2, gy) = (l.slice(n, c, ho, wo), l.slice(n, c, ho, wo), l.slice(n, c, ho, wo));
        let (gx1, gx2) = (l.slice(n, c, h, w), l.slice(n, c, h, w));
        let bn = Bn { stats: l.moments(c), affine: l.affine(c) };
        let mut be = l.on(make(), &[], n);
        let mut data = randn(41, x.numel());
        for i in (0..data.len()).step_by(5) {
            data[i] = 0.0;
        }
        data[7] = f32::NAN;
        scatter(&mut be, x, &data);
        scatter(&mut be, gy, &randn(42, gy.numel()));
        let (mut mean, mut beta) = (randn(43, c), randn(44, c));
        let mut gamma: Vec<f32> = randn(45, c).iter().map(|v| 1.0 + 0.5 * v).collect();
        (gamma[0], beta[0]) = (0.0, 0.7);
        (mean[1], beta[1], gamma[1]) = (-0.0, -0.0, -1.3);
        be.write(bn.stats.mean, &mean);
        be.write(bn.stats.var, &(0..c).map(|i| 0.5 + rng::uniform(46, i as u64)).collect::<Vec<_>>());
        be.write(bn.affine.gamma, &gamma);
        be.write(bn.affine.beta, &beta);
        be.bn_relu(x, bn, t);
        be.max_pool3(t, None, y2);
        be.max_pool3(x, Some(bn), y1);
        be.max_pool3_backward(t, None, gy, gx2);
        be.max_pool3_backward(x, Some(bn), gy, gx1);
        be.take_error().unwrap();
        let bits = |v| gather(&be, v).iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(bits(y1), bits(y2), "{shape:?}: fused forward");
        assert_eq!(bits(gx1), bits(gx2), "{shape:?}: fused backward");
        assert!(gather(&be, t).iter().filter(|&&v| v == 0.0).count() > t.numel() / 3, "few zeros to tie");
    }
}
on_backends!(max_pool3_fuses_bn_relu_bitwise, max_pool3_with_a_bn_relu_is_bn_relu_then_max_pool3);

/// Global average pooling of a channel slice into a dense `[n, c]`, random `gy`.
struct Gap {
    x: View,
    gx: View,
    y: Matrix,
    gy: Matrix,
}

impl Gap {
    fn new((n, c, h, w): Shape) -> (CpuBackend, Gap) {
        let mut l = Layout::new();
        let (x, gx) = (l.slice(n, c, h, w), l.slice(n, c, h, w));
        let (y, gy) = (l.take(n * c).matrix(n, c), l.take(n * c).matrix(n, c));
        let mut be = l.backend(&[], n);
        scatter(&mut be, x, &randn(21, x.numel()));
        be.write(gy.data, &randn(22, n * c));
        (be, Gap { x, gx, y, gy })
    }

    /// `sum(gy * global_avg_pool(x))`.
    fn loss(&self, be: &mut CpuBackend) -> f64 {
        be.global_avg_pool(self.x, self.y);
        dot(&be.read(self.gy.data), &be.read(self.y.data))
    }
}

#[test]
fn global_avg_pool_matches_naive() {
    for shape in POOLS {
        let (mut be, p) = Gap::new(shape);
        be.global_avg_pool(p.x, p.y);
        let want: Vec<f64> = gather(&be, p.x).chunks(p.x.hw()).map(|plane| mean_of(&to_f64(plane))).collect();
        assert_ref("global_avg_pool", &be.read(p.y.data), &want);
    }
}

#[test]
fn global_avg_pool_backward_matches_finite_differences() {
    for shape in POOLS {
        let (mut be, p) = Gap::new(shape);
        fence(&mut be, p.gx);
        be.global_avg_pool_backward(p.gy, p.gx);
        assert_fenced(&be, p.gx, "global_avg_pool_backward");
        let grad = gather(&be, p.gx);
        check_fd("global_avg_pool", &mut be, &offsets(p.x), &grad, 1e-2, |_| false, |be| p.loss(be));
    }
}

// ---------------------------------------------------------------------------------------------
// Classifier

/// A linear layer laid out densely: random `x` [n, cin], `w` [cout, cin], `b` [cout], `gy`
/// [n, cout].
struct Linear {
    cin: usize,
    cout: usize,
    x: Matrix,
    w: Matrix,
    b: Span,
    y: Matrix,
    gy: Matrix,
    gx: Matrix,
    gw: Matrix,
    gb: Span,
}

impl Linear {
    fn new(n: usize, cin: usize, cout: usize) -> (CpuBackend, Linear) {
        let mut l = Layout::new();
        let mut mat = |rows: usize, cols: usize| l.take(rows * cols).matrix(rows, cols);
        let (x, w, y, gy, gx, gw) =
            (mat(n, cin), mat(cout, cin), mat(n, cout), mat(n, cout), mat(n, cin), mat(cout, cin));
        let (b, gb) = (l.take(cout), l.take(cout));
        let mut be = l.backend(&[], n);
        be.write(x.data, &randn(23, n * cin));
        be.write(w.data, &randn(24, cout * cin));
        be.write(b, &randn(25, cout));
        be.write(gy.data, &randn(26, n * cout));
        (be, Linear { cin, cout, x, w, b, y, gy, gx, gw, gb })
    }

    /// `sum(gy * linear(x))`.
    fn loss(&self, be: &mut CpuBackend) -> f64 {
        be.linear(self.x, self.w, self.b, self.y);
        dot(&be.read(self.gy.data), &be.read(self.y.data))
    }
}

#[test]
fn linear_matches_naive() {
    for n in [1, 3] {
        let (mut be, f) = Linear::new(n, 7, 5);
        be.linear(f.x, f.w, f.b, f.y);
        let (x, w, b) = (be.read(f.x.data), be.read(f.w.data), be.read(f.b));
        let want: Vec<f64> = (0..n * f.cout)
            .map(|i| {
                let (row, k) = (i / f.cout, i % f.cout);
                b[k] as f64 + dot(&x[row * f.cin..][..f.cin], &w[k * f.cin..][..f.cin])
            })
            .collect();
        assert_ref("linear", &be.read(f.y.data), &want);
    }
}

#[test]
fn linear_backward_matches_finite_differences() {
    for n in [1, 3] {
        let (mut be, f) = Linear::new(n, 7, 5);
        be.linear_backward(f.x, f.w, f.gy, f.gx, f.gw, f.gb);
        for (what, at, grad) in
            [("linear dx", f.x.data, f.gx.data), ("linear dw", f.w.data, f.gw.data), ("linear db", f.b, f.gb)]
        {
            let grad = be.read(grad);
            check_fd(what, &mut be, &each(at), &grad, 1e-2, |_| false, |be| f.loss(be));
        }
    }
}

/// Softmax cross-entropy over random logits [n, k]; even rows are labelled with their argmax
/// (correct), odd rows with their argmin (wrong).
struct Xent {
    k: usize,
    logits: Matrix,
    out: Span,
    glogits: Matrix,
    labels: Vec<u32>,
}

impl Xent {
    fn new(n: usize, k: usize) -> (CpuBackend, Xent) {
        let mut l = Layout::new();
        let (logits, out, glogits) = (l.take(n * k).matrix(n, k), l.take(2), l.take(n * k).matrix(n, k));
        let mut be = l.backend(&[], n);
        let z: Vec<f32> = randn(27, n * k).iter().map(|v| 3.0 * v).collect();
        be.write(logits.data, &z);
        let labels: Vec<u32> = z
            .chunks(k)
            .enumerate()
            .map(|(i, row)| {
                let mut order: Vec<usize> = (0..k).collect();
                order.sort_by(|&a, &b| row[a].total_cmp(&row[b]));
                (if i % 2 == 0 { order[k - 1] } else { order[0] }) as u32
            })
            .collect();
        be.set_labels(&labels);
        (be, Xent { k, logits, out, glogits, labels })
    }

    /// The mean loss.
    fn loss(&self, be: &mut CpuBackend) -> f64 {
        be.softmax_xent(self.logits, self.logits.rows, self.out, self.glogits);
        be.read(self.out)[0] as f64
    }
}

#[test]
fn softmax_xent_matches_naive_loss_correct_count_and_gradient() {
    // A data-parallel rank's rows are a share of a larger batch: sums over `total` images.
    for (n, total) in [(1, 1), (3, 3), (3, 7)] {
        let (mut be, s) = Xent::new(n, 5);
        be.softmax_xent(s.logits, total, s.out, s.glogits);
        let z = to_f64(&be.read(s.logits.data));
        let (mut loss, mut correct, mut grad) = (0.0, 0, Vec::new());
        for (row, &label) in z.chunks(s.k).zip(&s.labels) {
            let label = label as usize;
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            loss += (lse - row[label]) / total as f64;
            correct += (max_of(row) == row[label]) as usize;
            grad.extend(
                row.iter().enumerate().map(|(j, v)| ((v - lse).exp() - (j == label) as u8 as f64) / total as f64),
            );
        }
        assert_eq!(correct, n.div_ceil(2), "labels are built so that even rows are correct");
        let out = be.read(s.out);
        assert_ref("softmax_xent loss", &out[..1], &[loss]);
        assert_eq!(out[1], correct as f32, "softmax_xent correct count");
        assert_ref("softmax_xent gradient", &be.read(s.glogits.data), &grad);
    }
}

#[test]
fn softmax_xent_gradient_matches_finite_differences() {
    for n in [1, 3] {
        let (mut be, s) = Xent::new(n, 5);
        be.softmax_xent(s.logits, n, s.out, s.glogits);
        let grad = be.read(s.glogits.data);
        check_fd("softmax_xent", &mut be, &each(s.logits.data), &grad, 1e-2, |_| false, |be| s.loss(be));
    }
}

// ---------------------------------------------------------------------------------------------
// SGD and copy

#[test]
fn sgd_matches_torch_formulas_over_two_steps() {
    // Longer than one 16384-float work chunk, and odd.
    let len = 20_011;
    for nesterov in [false, true] {
        let hp = Sgd { lr: 0.1, momentum: 0.9, weight_decay: 0.01, nesterov };
        let (lr, m, wd) = (hp.lr as f64, hp.momentum as f64, hp.weight_decay as f64);
        let mut l = Layout::new();
        let (params, grads, momentum, flag, settings) = (l.take(len), l.take(len), l.take(len), l.take(1), l.take(4));
        let skip = l.take(1);
        let mut be = l.backend(&[], 1);
        be.write(settings, &hp.floats());
        let p0 = randn(28, len);
        be.write(params, &p0);
        be.write(momentum, &vec![0.0; len]);
        be.write(flag, &[0.0]);
        be.write(skip, &[0.0]);
        let (mut p, mut buf) = (to_f64(&p0), vec![0.0; len]);
        for step in 0..2 {
            let g = randn(29 + step, len);
            be.write(grads, &g);
            be.sgd(params, grads, momentum, settings, skip, flag);
            assert_eq!(be.read(flag), [0.0], "finite values raised the flag");
            // torch.optim.SGD: d = g + wd p; buf = m buf + d; d = d + m buf (Nesterov) or buf; p -= lr d.
            for ((p, b), &g) in p.iter_mut().zip(&mut buf).zip(&g) {
                let d = g as f64 + wd * *p;
                *b = m * *b + d;
                *p -= lr * if nesterov { d + m * *b } else { *b };
            }
            let what = format!("sgd step {step}, nesterov {nesterov}");
            assert_ref(&format!("{what}: params"), &be.read(params), &p);
            assert_ref(&format!("{what}: momentum"), &be.read(momentum), &buf);
        }
        // A NaN gradient in the last chunk: every chunk is still updated, and the flag goes up.
        let before = be.read(params);
        let mut g = randn(40, len);
        g[len - 3] = f32::NAN;
        be.write(grads, &g);
        // Skipped (a loss-scaled step that overflowed): nothing changes, the flag stays down.
        let momentum_before = be.read(momentum);
        be.write(skip, &[1.0]);
        be.sgd(params, grads, momentum, settings, skip, flag);
        assert_eq!((be.read(params), be.read(momentum), be.read(flag)), (before.clone(), momentum_before, vec![0.0]));
        be.write(skip, &[0.0]);
        be.sgd(params, grads, momentum, settings, skip, flag);
        assert_eq!(be.read(flag), [1.0], "a NaN parameter left the flag down");
        let after = be.read(params);
        assert!(after[len - 3].is_nan() && after[..len - 3].iter().zip(&before).all(|(a, b)| a != b));
    }
}

/// fp16 loss scaling as `torch.amp.GradScaler` does it by default: the loss gradient scaled,
/// the weight gradients unscaled by the f64 reciprocal with `found` set by any value that is
/// not finite (in any chunk), and the scale's update (halved on `found`, doubled at the 2000th
/// finite step in a row, kept when the double overflows).
#[test]
fn loss_scaling_follows_grad_scaler() {
    let len = 20_011;
    let mut l = Layout::new();
    let (grads, scaler, logits) = (l.take(len), l.take(LossScale::LEN), l.take(6));
    let mut be = l.backend(&[], 1);
    let g = randn(41, len);
    let scale = LossScale { scale: 1024.0, good_steps: 7 };
    be.write(scaler, &scale.floats());
    be.write(logits, &g[..6]);
    be.scale_loss_grad(logits.matrix(2, 3), scaler);
    assert_eq!(be.read(logits), g[..6].iter().map(|v| v * 1024.0).collect::<Vec<_>>());
    be.write(grads, &g);
    be.write(scaler, &[1.0, 1024.0, 7.0]);
    be.unscale_grads(grads, scaler);
    assert_eq!(be.read(grads), g.iter().map(|v| v * (1.0 / 1024.0f64) as f32).collect::<Vec<_>>());
    assert_eq!(be.read(scaler), [0.0, 1024.0, 7.0], "finite gradients leave found clear");
    be.update_scale(scaler);
    assert_eq!(be.read(scaler), [0.0, 1024.0, 8.0]);
    for bad in [f32::INFINITY, f32::NEG_INFINITY, f32::NAN] {
        let mut g = g.clone();
        g[len - 2] = bad;
        be.write(grads, &g);
        be.write(scaler, &scale.floats());
        be.unscale_grads(grads, scaler);
        assert_eq!(be.read(scaler)[0], 1.0, "{bad} in the last chunk");
        be.update_scale(scaler);
        assert_eq!(be.read(scaler), [1.0, 512.0, 0.0], "{bad}: halved, the count reset");
    }
    for (state, found, next) in [
        (LossScale { scale: 65536.0, good_steps: 1999 }, false, LossScale { scale: 131072.0, good_steps: 0 }),
        (LossScale { scale: 65536.0, good_steps: 1998 }, false, LossScale { scale: 65536.0, good_steps: 1999 }),
        (LossScale { scale: 65536.0, good_steps: 1999 }, true, LossScale { scale: 32768.0, good_steps: 0 }),
        (LossScale { scale: f32::MAX, good_steps: 1999 }, false, LossScale { scale: f32::MAX, good_steps: 0 }),
    ] {
        assert_eq!(state.next(found), next);
        let mut f = state.floats();
        f[0] = found as u8 as f32;
        be.write(scaler, &f);
        be.update_scale(scaler);
        let (got, kept) = LossScale::from_floats(be.read(scaler).try_into().unwrap());
        assert_eq!((got, kept), (next, found), "update_scale of {state:?}, found {found}");
    }
    assert_eq!(LossScale::INITIAL, LossScale { scale: 65536.0, good_steps: 0 });
    assert_eq!(LossScale::GROWTH_INTERVAL, 2000);
}

#[test]
fn copy_moves_a_strided_slice_to_dense_and_back() {
    for n in [1, 3] {
        let mut l = Layout::new();
        let (src, dense, dst) = (l.slice(n, 5, 5, 7), l.dense(n, 5, 5, 7), l.slice(n, 5, 5, 7));
        let mut be = l.backend(&[], n);
        let data = randn(31, src.numel());
        scatter(&mut be, src, &data);
        fence(&mut be, dst);
        be.copy(src, dense);
        assert!(gather(&be, dense) == data, "copy from a slice to dense");
        be.copy(dense, dst);
        assert!(gather(&be, dst) == data, "copy from dense to a slice");
        assert_fenced(&be, dst, "copy");
    }
}

/// An output that overlaps an input its contract keeps apart is an error in release builds
/// too (a planner bug must not become a data race behind the arena pointer); channel slices of
/// one buffer side by side are apart, and `bn_relu_backward` may work in place.
#[test]
fn outputs_overlapping_their_inputs_are_refused() {
    let mut l = Layout::new();
    let buf = l.dense(2, 6, 4, 4);
    let (a, b) = (buf.channels(0, 3), buf.channels(3, 3));
    let mut be = l.backend(&[], 2);
    be.copy(a, b);
    let shifted = View { off: a.off + 4 * 8, ..a };
    let err = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| be.copy(a, shifted))).unwrap_err();
    let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
    assert!(msg.starts_with("copy: output View") && msg.contains("overlaps input"), "{msg}");
    assert!(a.overlaps(&shifted) && !a.overlaps(&b) && a.overlaps(&buf));
}

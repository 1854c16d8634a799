//! The checks of the CPU backend's ops on 16-bit tensors (bf16 and f16, docs/precision.md)
//! against the same ops in f32 on the same inputs (values that 16 bits hold exactly): each op
//! widens what it loads, computes in f32 as the f32 op does, and rounds once when it stores, so
//! its 16-bit result is the f32 result rounded, bit for bit. Two exceptions say so where they are tested:
//! the max pool's backward adds in 16 bits where windows share a maximum (bound: 8 units in
//! the last place of the largest gradient; measured 0.36 in bf16 and 0.43 in f16 on these
//! shapes), and the max pool's fused BN-ReLU rounds each BN-ReLU value to 16 bits, as a stored
//! BN-ReLU output holds it (bit for bit the pool of `bn_relu` written in 16 bits).
//!
//! A convolution widens its 16-bit operands into f32 and runs the f32 kernels on them: its
//! output is the f32 op's rounded, its weight gradient the f32 op's, bit for bit; with a fused
//! BN-ReLU, the f32 op's on the BN-ReLU output stored in 16 bits.
//!
//! Shapes are awkward (planes of 63 and 323 elements: the 8-lane loops' tails), and the tensors
//! channel slices of larger buffers (image strides above `c * h * w`).

use densenet::backend::{Affine, Backend, Bn, ConvShape, ConvSpec, CpuBackend, DType, Matrix, Moments, Span, View};
use densenet::rng;

/// (n, c, h, w).
const SHAPES: [(usize, usize, usize, usize); 2] = [(3, 5, 7, 9), (2, 3, 17, 19)];
const HALVES: [DType; 2] = [DType::BF16, DType::F16];

/// `v` rounded to `dtype` (and widened back).
fn round(dtype: DType, v: f32) -> f32 {
    match dtype {
        DType::F32 => v,
        DType::BF16 => half::bf16::from_f32(v).to_f32(),
        DType::F16 => half::f16::from_f32(v).to_f32(),
    }
}

/// Regions one after another (64-byte aligned), in bytes.
#[derive(Default)]
struct Layout {
    len: usize,
}

impl Layout {
    fn bytes(&mut self, bytes: usize) -> usize {
        let off = self.len;
        self.len += bytes.div_ceil(64) * 64;
        off
    }

    /// A [n, c, h, w] tensor of `dtype`: channels 1.. of a buffer with two more.
    fn view(&mut self, dtype: DType, (n, c, h, w): (usize, usize, usize, usize)) -> View {
        let off = self.bytes(n * (c + 2) * h * w * dtype.size());
        View { dtype, ..View::dense(off, n, c + 2, h, w) }.channels(1, c)
    }

    fn span(&mut self, len: usize) -> Span {
        Span::f32(self.bytes(4 * len), len)
    }

    fn bn(&mut self, c: usize) -> Bn {
        Bn {
            stats: Moments { mean: self.span(c), var: self.span(c) },
            affine: Affine { gamma: self.span(c), beta: self.span(c) },
        }
    }

    fn backend(self) -> CpuBackend {
        self.backend_for(&[])
    }

    /// A backend with the workspace for these convolutions.
    fn backend_for(self, convs: &[ConvShape]) -> CpuBackend {
        let mut be = CpuBackend::new();
        let ws = be.workspace_len(convs, 0, 1).unwrap();
        let at = self.len;
        be.allocate(at + ws, Span::f32(at, ws / 4), 1).unwrap();
        be
    }
}

/// The values of a view, image by image.
fn gather(be: &CpuBackend, v: View) -> Vec<f32> {
    (0..v.n).flat_map(|i| be.read(v.image(i))).collect()
}

/// One operand in f32 and in 16 bits.
#[derive(Clone, Copy)]
struct Twin {
    f: View,
    h: View,
}

impl Twin {
    fn new(l: &mut Layout, dtype: DType, shape: (usize, usize, usize, usize)) -> Twin {
        Twin { f: l.view(DType::F32, shape), h: l.view(dtype, shape) }
    }

    /// Random values (standard normal times `scale`, a fifth of them zero) that 16 bits hold,
    /// in both.
    fn fill(self, be: &mut CpuBackend, seed: u64, scale: f32) {
        let per = self.h.c * self.h.hw();
        for i in 0..self.h.n {
            let data: Vec<f32> = (0..per)
                .map(|j| {
                    let k = (i * per + j) as u64;
                    let v = if rng::uniform(seed, k) < 0.2 { 0.0 } else { scale * rng::normal(seed + 1, k) as f32 };
                    round(self.h.dtype, v)
                })
                .collect();
            be.write(self.h.image(i), &data);
            be.write(self.f.image(i), &data);
        }
    }

    /// The 16-bit result is the f32 one rounded, bit for bit.
    fn rounded(self, be: &CpuBackend, what: &str) {
        let (f, h) = (gather(be, self.f), gather(be, self.h));
        for (i, (&f, &h)) in f.iter().zip(&h).enumerate() {
            let want = round(self.h.dtype, f);
            assert!(
                want.to_bits() == h.to_bits(),
                "{what} {:?}: element {i} is {h}, f32 gives {f} ({want})",
                self.h.dtype
            );
        }
    }
}

/// A BN of `c` channels with random statistics and affine parameters.
fn bn(be: &mut CpuBackend, l: Bn, c: usize, seed: u64) -> Bn {
    let r = |s: u64| (0..c).map(|i| rng::normal(seed + s, i as u64) as f32).collect::<Vec<_>>();
    be.write(l.stats.mean, &r(0));
    be.write(l.stats.var, &r(1).iter().map(|v| 0.5 + v.abs()).collect::<Vec<_>>());
    be.write(l.affine.gamma, &r(2).iter().map(|v| 1.0 + 0.5 * v).collect::<Vec<_>>());
    be.write(l.affine.beta, &r(3).iter().map(|v| 0.3 * v).collect::<Vec<_>>());
    l
}

pub fn writes_round_and_reads_widen() {
    for dtype in HALVES {
        let mut l = Layout::default();
        let s = Span { dtype, ..l.span(11) };
        let mut be = l.backend();
        let data = [1.0, 1.0 + 1.0 / 512.0, -3.3, 65519.0, 1e-8, -0.0, f32::INFINITY, 0.1, 2.5e-5, 1e6, -7.0];
        be.write(s, &data);
        let got = be.read(s);
        for (&v, g) in data.iter().zip(got) {
            assert_eq!(g.to_bits(), round(dtype, v).to_bits(), "{dtype:?} {v}");
        }
    }
}

pub fn elementwise_and_pooling_ops_round_the_f32_result() {
    for dtype in HALVES {
        for shape in SHAPES {
            let (n, c, h, w) = shape;
            let mut l = Layout::default();
            let (x, y, copy) =
                (Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape));
            let pooled = Twin::new(&mut l, dtype, (n, c, h / 2, w / 2));
            let (g_full, g_half) = (Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, (n, c, h / 2, w / 2)));
            let max_shape = (n, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1);
            let maxed = Twin::new(&mut l, dtype, max_shape);
            let (gap, back) = ([l.span(n * c), l.span(n * c)], Twin::new(&mut l, dtype, shape));
            let mut be = l.backend();
            let what = |op: &str| format!("{op} {shape:?}");
            x.fill(&mut be, 1, 3.0);
            g_half.fill(&mut be, 3, 1.0);
            for t in [x, g_half] {
                // Inputs that 16 bits hold are the same in both.
                assert_eq!(gather(&be, t.f), gather(&be, t.h));
            }
            for v in [x.f, x.h].into_iter().zip([copy.f, copy.h]) {
                be.copy(v.0, v.1);
            }
            copy.rounded(&be, &what("copy"));
            for v in [y.f, y.h] {
                be.copy(if v.dtype == DType::F32 { x.f } else { x.h }, v);
                be.dropout(v, 0.3, 77);
            }
            y.rounded(&be, &what("dropout"));
            for (s, d) in [(x.f, pooled.f), (x.h, pooled.h)] {
                be.avg_pool2(s, d);
            }
            pooled.rounded(&be, &what("avg_pool2"));
            for (s, d) in [(g_half.f, g_full.f), (g_half.h, g_full.h)] {
                be.avg_pool2_backward(s, d);
            }
            g_full.rounded(&be, &what("avg_pool2_backward"));
            for (s, d) in [(x.f, maxed.f), (x.h, maxed.h)] {
                be.max_pool3(s, None, d);
            }
            maxed.rounded(&be, &what("max_pool3"));
            for (s, m) in [(x.f, gap[0]), (x.h, gap[1])] {
                be.global_avg_pool(s, m.matrix(n, c));
            }
            assert_eq!(be.read(gap[0]), be.read(gap[1]), "{}", what("global_avg_pool"));
            for (s, d) in [(gap[0], back.f), (gap[0], back.h)] {
                be.global_avg_pool_backward(Matrix { data: s, rows: n, cols: c }, d);
            }
            back.rounded(&be, &what("global_avg_pool_backward"));
        }
    }
}

pub fn batch_norm_ops_round_the_f32_result() {
    for dtype in HALVES {
        for shape in SHAPES {
            let c = shape.1;
            let mut l = Layout::default();
            let (x, g, y) =
                (Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape));
            let (dx, acc, inplace) =
                (Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape));
            let (stats, layout_bn) = ([0, 1].map(|_| Moments { mean: l.span(c), var: l.span(c) }), l.bn(c));
            let grads = [0, 1].map(|_| Affine { gamma: l.span(c), beta: l.span(c) });
            let mut be = l.backend();
            let bn = bn(&mut be, layout_bn, c, 5);
            let what = |op: &str| format!("{op} {shape:?}");
            x.fill(&mut be, 1, 2.0);
            g.fill(&mut be, 2, 1.0);
            acc.fill(&mut be, 3, 1.0);
            be.bn_stats(x.f, stats[0]);
            be.bn_stats(x.h, stats[1]);
            assert_eq!(
                (be.read(stats[0].mean), be.read(stats[0].var)),
                (be.read(stats[1].mean), be.read(stats[1].var))
            );
            be.bn_relu(x.f, bn, y.f);
            be.bn_relu(x.h, bn, y.h);
            y.rounded(&be, &what("bn_relu"));
            be.bn_relu_backward(g.f, x.f, bn, grads[0], dx.f, false);
            be.bn_relu_backward(g.h, x.h, bn, grads[1], dx.h, false);
            dx.rounded(&be, &what("bn_relu_backward"));
            let sums = |i: usize| (be.read(grads[i].gamma), be.read(grads[i].beta));
            assert_eq!(sums(0), sums(1), "{}: dgamma, dbeta", what("bn_relu_backward"));
            // Accumulated onto a gradient that 16 bits hold: one rounding of the sum.
            be.bn_relu_backward(g.f, x.f, bn, grads[0], acc.f, true);
            be.bn_relu_backward(g.h, x.h, bn, grads[1], acc.h, true);
            acc.rounded(&be, &what("bn_relu_backward accumulating"));
            // In place: the gradient read from, and written to, the same tensor.
            for (s, d) in [(g.f, inplace.f), (g.h, inplace.h)] {
                be.copy(s, d);
                be.bn_relu_backward(d, if d.dtype == DType::F32 { x.f } else { x.h }, bn, grads[0], d, false);
            }
            inplace.rounded(&be, &what("bn_relu_backward in place"));
        }
    }
}

/// The max pool through a BN-ReLU reads the BN-ReLU values rounded to 16 bits, as a stored
/// BN-ReLU output holds them: bit for bit the pool of `bn_relu` written in 16 bits, forward and
/// backward. The backward against f32: each addition where windows share a maximum rounds.
pub fn max_pool_rounds_its_fused_bn_relu_as_stored() {
    for dtype in HALVES {
        for shape in SHAPES {
            let (n, c, h, w) = shape;
            let out = (n, c, (h - 1) / 2 + 1, (w - 1) / 2 + 1);
            let mut l = Layout::default();
            let (x, a) = (Twin::new(&mut l, dtype, shape), Twin::new(&mut l, dtype, shape));
            let (y_fused, y_stored, gy) = (l.view(dtype, out), l.view(dtype, out), Twin::new(&mut l, dtype, out));
            let (gx_fused, gx) = (l.view(dtype, shape), Twin::new(&mut l, dtype, shape));
            let layout_bn = l.bn(c);
            let mut be = l.backend();
            let bn = bn(&mut be, layout_bn, c, 9);
            x.fill(&mut be, 1, 2.0);
            gy.fill(&mut be, 2, 1.0);
            be.bn_relu(x.h, bn, a.h);
            be.max_pool3(x.h, Some(bn), y_fused);
            be.max_pool3(a.h, None, y_stored);
            assert_eq!(gather(&be, y_fused), gather(&be, y_stored), "{dtype:?} {shape:?}: fused forward");
            be.max_pool3_backward(x.h, Some(bn), gy.h, gx_fused);
            be.max_pool3_backward(a.h, None, gy.h, gx.h);
            assert_eq!(gather(&be, gx_fused), gather(&be, gx.h), "{dtype:?} {shape:?}: fused backward");
            // The same input in f32: the same windows, sums rounded once per addition.
            be.copy(a.h, x.h);
            let exact = gather(&be, x.h);
            let per = c * h * w;
            for i in 0..n {
                be.write(a.f.image(i), &exact[i * per..(i + 1) * per]);
            }
            be.max_pool3_backward(a.f, None, gy.f, gx.f);
            // An input is the maximum of at most 4 windows: at most 3 additions, each rounded
            // (half a unit in the last place of a partial sum of at most 4 gradients), and the
            // last store: within 8 ulp of the largest gradient.
            let ulp = if dtype == DType::BF16 { 1.0 / 128.0 } else { 1.0 / 1024.0 };
            let gmax = gather(&be, gy.h).iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let err = gather(&be, gx.f).iter().zip(gather(&be, gx.h)).fold(0.0f32, |m, (f, h)| m.max((f - h).abs()));
            assert!(
                err <= 8.0 * ulp * gmax,
                "{dtype:?} {shape:?}: backward off f32 by {err} (largest gradient {gmax})"
            );
        }
    }
}

/// Convolutions of each kind (1x1, 3x3 "same", 7x7 stride 2), forward, data gradient and
/// weight gradient, with and without a fused BN-ReLU; the larger shapes sum over more than one
/// packed panel of depth (128) and have edge tiles of columns.
pub fn convolutions_round_the_f32_result() {
    for dtype in HALVES {
        for (spec, n, cin, cout, h, w) in [
            (ConvSpec::POINTWISE, 3, 5, 4, 7, 9),
            (ConvSpec::SAME3, 2, 3, 5, 9, 7),
            (ConvSpec::STEM7, 2, 3, 4, 13, 11),
            (ConvSpec::POINTWISE, 2, 133, 131, 9, 11),
            (ConvSpec::SAME3, 1, 15, 17, 10, 21),
        ] {
            let (ho, wo) = (spec.out(h), spec.out(w));
            let mut l = Layout::default();
            let (x, a, gx) = (
                Twin::new(&mut l, dtype, (n, cin, h, w)),
                Twin::new(&mut l, dtype, (n, cin, h, w)),
                Twin::new(&mut l, dtype, (n, cin, h, w)),
            );
            let (y, y_pre, gy) = (
                Twin::new(&mut l, dtype, (n, cout, ho, wo)),
                Twin::new(&mut l, dtype, (n, cout, ho, wo)),
                Twin::new(&mut l, dtype, (n, cout, ho, wo)),
            );
            let wlen = cout * cin * spec.k * spec.k;
            let (wt, gw) = (l.span(wlen), [l.span(wlen), l.span(wlen), l.span(wlen), l.span(wlen)]);
            let layout_bn = l.bn(cin);
            let shapes = [DType::F32, dtype].map(|dtype| ConvShape { spec, cin, cout, h, w, dtype });
            let mut be = l.backend_for(&shapes);
            let bn = bn(&mut be, layout_bn, cin, 4);
            let what = |op: &str| format!("{op} {spec:?} {cin}->{cout} {h}x{w}");
            x.fill(&mut be, 1, 1.0);
            gy.fill(&mut be, 2, 1.0);
            be.write(wt, &(0..wlen).map(|i| rng::normal(3, i as u64) as f32).collect::<Vec<_>>());
            // The BN-ReLU output as stored in 16 bits, in both.
            be.bn_relu(x.h, bn, a.h);
            let stored = gather(&be, a.h);
            let per = cin * h * w;
            for i in 0..n {
                be.write(a.f.image(i), &stored[i * per..(i + 1) * per]);
            }
            be.conv_forward(x.f, None, wt, y.f, spec);
            be.conv_forward(x.h, None, wt, y.h, spec);
            y.rounded(&be, &what("conv_forward"));
            if spec.stride == 1 {
                be.conv_forward(a.f, None, wt, y_pre.f, spec);
                be.conv_forward(x.h, Some(bn), wt, y_pre.h, spec);
                y_pre.rounded(&be, &what("conv_forward with a BN-ReLU"));
            }
            be.conv_backward_data(gy.f, wt, gx.f, spec);
            be.conv_backward_data(gy.h, wt, gx.h, spec);
            gx.rounded(&be, &what("conv_backward_data"));
            be.conv_backward_filter(x.f, None, gy.f, gw[0], spec, false);
            be.conv_backward_filter(x.h, None, gy.h, gw[1], spec, false);
            assert_eq!(be.read(gw[0]), be.read(gw[1]), "{}", what("conv_backward_filter"));
            if spec.stride == 1 {
                be.conv_backward_filter(a.f, None, gy.f, gw[2], spec, false);
                be.conv_backward_filter(x.h, Some(bn), gy.h, gw[3], spec, false);
                assert_eq!(be.read(gw[2]), be.read(gw[3]), "{}", what("conv_backward_filter with a BN-ReLU"));
            }
        }
    }
}

//! Every op of the CUDA backend against the CPU backend, on random data of awkward sizes
//! (batch 1 and 3, odd channel counts and planes, channel slices of bigger buffers): both
//! backends start from the same random arena, run the same op, and must then hold the same
//! arena, element by element within `|cuda - cpu| <= TOL * max(|cpu|, FLOOR)` — which also
//! proves that an op writes nothing outside its outputs. Runs on the host device in every
//! `cargo test`, and on GPU 0 when there is one.

#[macro_use]
mod common;

use densenet::backend::cuda::{CudaBackend, Exec, FUSED_CHUNK};
use densenet::backend::{
    Affine, Backend, Bn, ConvShape, ConvSpec, CpuBackend, DType, LossScale, Moments, Sgd, Span, View,
};
use densenet::data::augment::normalization;
use densenet::data::cifar::Dataset;
use densenet::input::Crop;
use densenet::rng;

/// Relative tolerance (cuDNN with FMA math, no TF32, against the CPU).
const TOL: f32 = 1e-4;
/// Magnitude below which the tolerance is absolute.
const FLOOR: f32 = 1e-2;

/// Floats of the largest input image the tests stage (3 x 32 x 32).
const IMAGE_LEN: usize = 3072;

/// A CPU backend and a CUDA backend over the same layout of `len` floats (plus each one's
/// own workspace after it), filled with the same random values.
struct Twin<E: Exec> {
    cpu: CpuBackend,
    dev: CudaBackend<E>,
    len: usize,
    seed: u64,
}

impl<E: Exec> Twin<E> {
    fn new(make: &dyn Fn() -> CudaBackend<E>, len: usize, convs: &[ConvShape], batch: usize) -> Self {
        let mut cpu = CpuBackend::new();
        let mut dev = make();
        for be in [&mut cpu as &mut dyn Backend, &mut dev] {
            let ws = be.workspace_len(convs, IMAGE_LEN, batch).unwrap();
            be.allocate(4 * len + ws, Span::f32(4 * len, ws / 4), batch).unwrap();
        }
        let mut t = Twin { cpu, dev, len, seed: 1 };
        let data: Vec<f32> = (0..len).map(|i| rng::normal(len as u64, i as u64) as f32).collect();
        t.write(Span::f32(0, len), &data);
        t
    }

    fn write(&mut self, dst: Span, data: &[f32]) {
        self.cpu.write(dst, data);
        self.dev.write(dst, data);
    }

    /// Positive values (variances) in `dst`.
    fn positive(&mut self, dst: Span) {
        self.seed += 1;
        let v: Vec<f32> = (0..dst.len).map(|i| 0.2 + rng::uniform(self.seed, i as u64)).collect();
        self.write(dst, &v);
    }

    /// Runs `op` on both backends and compares their whole data region.
    fn run(&mut self, what: &str, op: impl Fn(&mut dyn Backend)) {
        op(&mut self.cpu);
        op(&mut self.dev);
        self.dev.take_error().unwrap_or_else(|e| panic!("{what}: {e}"));
        let all = Span::f32(0, self.len);
        let (a, b) = (self.dev.read(all), self.cpu.read(all));
        let mut worst = (0.0f32, 0);
        for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
            let e = (x - y).abs() / y.abs().max(FLOOR);
            if e > worst.0 || (x.is_nan() != y.is_nan()) {
                worst = (if x.is_nan() != y.is_nan() { f32::INFINITY } else { e }, i);
            }
        }
        let i = worst.1;
        assert!(worst.0 <= TOL, "{what}: element {i}: cuda {} vs cpu {} (relative {})", a[i], b[i], worst.0);
    }
}

/// Hands out regions of a layout; views are channel slices (2 channels before, 1 after).
#[derive(Default)]
struct Layout {
    len: usize,
}

impl Layout {
    fn take(&mut self, len: usize) -> Span {
        self.len += len + 3; // odd gaps: nothing may rely on more than the element's alignment
        Span::f32(4 * (self.len - len), len)
    }

    fn slice(&mut self, n: usize, c: usize, h: usize, w: usize) -> View {
        View::dense(self.take(n * (c + 3) * h * w).off, n, c + 3, h, w).channels(2, c)
    }

    fn moments(&mut self, c: usize) -> Moments {
        Moments { mean: self.take(c), var: self.take(c) }
    }

    fn affine(&mut self, c: usize) -> Affine {
        Affine { gamma: self.take(c), beta: self.take(c) }
    }

    fn bn(&mut self, c: usize) -> Bn {
        Bn { stats: self.moments(c), affine: self.affine(c) }
    }
}

impl<E: Exec> Twin<E> {
    /// A channel slice of a fresh region of `dtype` elements (2 channels before, 1 after), its
    /// whole region filled with the same random values on both backends (rounded to `dtype`).
    fn slice_of(&mut self, l: &mut Layout, dtype: DType, (n, c, h, w): (usize, usize, usize, usize)) -> View {
        let len = n * (c + 3) * h * w;
        let region = l.take(len.div_ceil(2));
        self.seed += 1;
        let values: Vec<f32> = (0..len).map(|i| rng::normal(self.seed, i as u64) as f32).collect();
        self.write(Span { len, dtype, ..region }, &values);
        View { dtype, ..View::dense(region.off, n, c + 3, h, w) }.channels(2, c)
    }

    /// Runs `op` on both backends: each image of each of `views` within `ulps` units in the
    /// last place of its type, relative to the CPU's value or `floor` below it; each of `spans`
    /// (f32) within TOL.
    fn check(
        &mut self,
        what: &str,
        op: impl Fn(&mut dyn Backend),
        views: &[View],
        spans: &[Span],
        (ulps, floor): (f32, f32),
    ) {
        op(&mut self.cpu);
        op(&mut self.dev);
        self.dev.take_error().unwrap_or_else(|e| panic!("{what}: {e}"));
        let outputs = views.iter().flat_map(|v| (0..v.n).map(|i| (v.image(i), ulps * ulp(v.dtype), floor)));
        for (span, tol, floor) in outputs.chain(spans.iter().map(|&s| (s, TOL, FLOOR))) {
            let (a, b) = (self.dev.read(span), self.cpu.read(span));
            for (i, (&x, &y)) in a.iter().zip(&b).enumerate() {
                let e = (x - y).abs() / y.abs().max(floor);
                assert!(e <= tol || (x.is_nan() && y.is_nan()), "{what}: {span:?}[{i}]: cuda {x} vs cpu {y}");
            }
        }
    }
}

/// Bit for bit (the floor is irrelevant).
const EXACT: (f32, f32) = (0.0, FLOOR);

/// A unit in the last place of 1 in `dtype`.
fn ulp(dtype: DType) -> f32 {
    match dtype {
        DType::F32 => f32::EPSILON,
        DType::BF16 => 1.0 / 128.0,
        DType::F16 => 1.0 / 1024.0,
    }
}

/// The kernels on bf16 and f16 tensors (kernels/dn.cuh's storage types) against the CPU
/// backend's ops: bit for bit where both round the same f32 value (copies, dropout, BN-ReLU,
/// the pools' forwards, the average pool's backward, the head's broadcast), within one unit in
/// the last place where a BN backward's sums run in another order, and within 8 of the
/// gradients' magnitude (about 1 here) for the max pool's backward, which sums in f32 where the
/// CPU adds each window in 16 bits (the CPU's own bound, docs/precision.md); statistics and
/// parameter gradients (f32) within TOL.
fn sixteen_bit<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for dtype in [DType::BF16, DType::F16] {
        for (n, c, h, w) in SHAPES {
            let (half, (mh, mw)) = ((n, c, h / 2, w / 2), ((h - 1) / 2 + 1, (w - 1) / 2 + 1));
            let mut l = Layout::default();
            let (bn, grad, pooled, gp) = (l.bn(c), l.affine(c), l.take(n * c).matrix(n, c), l.take(n * c).matrix(n, c));
            let mut t = Twin::new(make, 8 * l.len + 8 * n * (c + 3) * h * w, &[], n);
            let mut views = |t: &mut Twin<E>, shape, k: usize| -> Vec<View> {
                (0..k).map(|_| t.slice_of(&mut l, dtype, shape)).collect()
            };
            let [x, y, g, dx, gx] = views(&mut t, (n, c, h, w), 5)[..] else { unreachable!() };
            let [a, ga] = views(&mut t, half, 2)[..] else { unreachable!() };
            let [m, gm] = views(&mut t, (n, c, mh, mw), 2)[..] else { unreachable!() };
            t.positive(bn.stats.var);
            let at = format!("{dtype:?} n{n} c{c} {h}x{w}");
            t.check(&format!("copy {at}"), |be| be.copy(x, y), &[y], &[], EXACT);
            t.check(&format!("dropout {at}"), |be| be.dropout(y, 0.3, 0xfeed), &[y], &[], EXACT);
            t.check(
                &format!("bn_stats {at}"),
                |be| be.bn_stats(x, bn.stats),
                &[],
                &[bn.stats.mean, bn.stats.var],
                EXACT,
            );
            t.positive(bn.stats.var);
            t.check(&format!("bn_relu {at}"), |be| be.bn_relu(x, bn, y), &[y], &[], EXACT);
            for accumulate in [false, true] {
                let what = format!("bn_relu_backward {at} accumulate {accumulate}");
                t.check(
                    &what,
                    |be| be.bn_relu_backward(g, x, bn, grad, dx, accumulate),
                    &[dx],
                    &[grad.gamma, grad.beta],
                    (1.0, FLOOR),
                );
            }
            t.check(&format!("avg_pool2 {at}"), |be| be.avg_pool2(x, a), &[a], &[], EXACT);
            t.check(&format!("avg_pool2_backward {at}"), |be| be.avg_pool2_backward(ga, gx), &[gx], &[], EXACT);
            for pre in [None, Some(bn)] {
                let p = pre.is_some();
                t.check(&format!("max_pool3 {at} pre {p}"), |be| be.max_pool3(x, pre, m), &[m], &[], EXACT);
                let what = format!("max_pool3_backward {at} pre {p}");
                t.check(&what, |be| be.max_pool3_backward(x, pre, gm, gx), &[gx], &[], (8.0, 1.0));
            }
            t.check(&format!("global_avg_pool {at}"), |be| be.global_avg_pool(x, pooled), &[], &[pooled.data], EXACT);
            let what = format!("global_avg_pool_backward {at}");
            t.check(&what, |be| be.global_avg_pool_backward(gp, gx), &[gx], &[], EXACT);
            let input = View { dtype, ..View::dense(l.take(n * 3 * h * w).off, n, 3, h, w) };
            let bytes: Vec<u8> = (0..n * 3 * h * w).map(|i| rng::mix64(i as u64) as u8).collect();
            let crops: Vec<Crop> = (0..n).map(|i| Crop { top: 4 + i, left: 8 - 2 * i, flip: i % 2 == 1 }).collect();
            let norm = normalization(Dataset::Cifar10);
            t.check(&format!("augment {at}"), |be| be.augment(&bytes, &crops, &norm, 1, input), &[input], &[], EXACT);
        }
    }
}

#[test]
fn sixteen_bit_kernels_match_the_cpu() {
    common::devices::on_host(sixteen_bit);
}

/// Shapes (n, c, h, w) the elementwise and pooling ops run at.
const SHAPES: [(usize, usize, usize, usize); 3] = [(1, 5, 7, 9), (3, 7, 5, 5), (2, 3, 17, 19)];

fn convolutions<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (spec, n, cin, cout, h, w) in [
        (ConvSpec::POINTWISE, 3, 7, 5, 5, 7),
        (ConvSpec::SAME3, 1, 5, 3, 9, 7),
        (ConvSpec::SAME3, 3, 4, 6, 6, 6),
        (ConvSpec::STEM7, 2, 3, 4, 13, 11),
        // More images than one fused chunk: the BN-ReLU input goes through the scratch in
        // pieces, and the filter gradient accumulates over them.
        (ConvSpec::POINTWISE, FUSED_CHUNK + 4, 5, 3, 4, 4),
        (ConvSpec::SAME3, 2 * FUSED_CHUNK + 1, 3, 2, 3, 5),
    ] {
        let mut l = Layout::default();
        let (oh, ow) = (spec.out(h), spec.out(w));
        let (x, y, gy, gx) =
            (l.slice(n, cin, h, w), l.slice(n, cout, oh, ow), l.slice(n, cout, oh, ow), l.slice(n, cin, h, w));
        let (wt, gw, bn) = (l.take(cout * cin * spec.k * spec.k), l.take(cout * cin * spec.k * spec.k), l.bn(cin));
        let shape = ConvShape { spec, cin, cout, h, w, dtype: DType::F32 };
        let mut t = Twin::new(make, l.len, &[shape], n);
        t.positive(bn.stats.var);
        let at = format!("{spec:?} n{n} {cin}->{cout} {h}x{w}");
        for pre in [None, Some(bn)] {
            t.run(&format!("conv_forward {at} pre {}", pre.is_some()), |be| be.conv_forward(x, pre, wt, y, spec));
            for acc in [false, true] {
                t.run(&format!("conv_backward_filter {at} pre {} accumulate {acc}", pre.is_some()), |be| {
                    be.conv_backward_filter(x, pre, gy, gw, spec, acc)
                });
            }
        }
        t.run(&format!("conv_backward_data {at}"), |be| be.conv_backward_data(gy, wt, gx, spec));
    }
}
on_devices!(convolutions_match_the_cpu, convolutions);

fn batch_norm<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (n, c, h, w) in SHAPES {
        let mut l = Layout::default();
        let (x, y, g) = (l.slice(n, c, h, w), l.slice(n, c, h, w), l.slice(n, c, h, w));
        let (bn, running, grad, flag) = (l.bn(c), l.moments(c), l.affine(c), l.take(1));
        // A data-parallel job's: BN backward sums, and 3 ranks' statistics.
        let (sums, parts) = (l.take(2 * c), l.take(3 * 2 * c));
        let mut t = Twin::new(make, l.len, &[], n);
        t.positive(running.var);
        let at = format!("n{n} c{c} {h}x{w}");
        t.run(&format!("bn_stats {at}"), |be| be.bn_stats(x, bn.stats));
        t.run(&format!("bn_update_running {at}"), |be| be.bn_update_running(bn.stats, running, n * h * w, 0.1, flag));
        // A statistic that is not finite raises the flag on both.
        t.write(flag, &[0.0]);
        t.write(bn.stats.var.at(0, 1), &[f32::INFINITY]);
        t.run(&format!("bn_update_running {at}, infinite variance"), |be| {
            be.bn_update_running(bn.stats, running, n * h * w, 0.1, flag)
        });
        t.positive(bn.stats.var);
        t.run(&format!("bn_relu {at}"), |be| be.bn_relu(x, bn, y));
        for accumulate in [false, true] {
            t.run(&format!("bn_relu_backward {at} accumulate {accumulate}"), |be| {
                be.bn_relu_backward(g, x, bn, grad, y, accumulate)
            });
        }
        t.run(&format!("bn_relu_backward {at} in place"), |be| be.bn_relu_backward(g, x, bn, grad, g, false));
        t.run(&format!("bn_relu_backward_sums {at}"), |be| be.bn_relu_backward_sums(g, x, bn, grad, sums));
        for accumulate in [false, true] {
            t.run(&format!("bn_relu_backward_data {at} accumulate {accumulate}"), |be| {
                be.bn_relu_backward_data(g, x, bn, (sums, 3 * n * h * w), y, accumulate)
            });
        }
        t.run(&format!("bn_stats_combine {at}"), |be| be.bn_stats_combine(parts, 3 * n + 1, h * w, bn.stats));
    }
}
on_devices!(batch_norm_matches_the_cpu, batch_norm);

fn elementwise<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (n, c, h, w) in SHAPES {
        let mut l = Layout::default();
        let (x, y) = (l.slice(n, c, h, w), l.slice(n, c, h, w));
        let len = 1000 + n * c * h * w;
        let (p, g, m, flag, settings) = (l.take(len), l.take(len), l.take(len), l.take(1), l.take(Sgd::LEN));
        let scaler = l.take(LossScale::LEN);
        let mut t = Twin::new(make, l.len, &[], n);
        let at = format!("n{n} c{c} {h}x{w}");
        t.run(&format!("copy {at}"), |be| be.copy(x, y));
        t.run(&format!("dropout {at}"), |be| be.dropout(x, 0.3, 0xfeed + n as u64));
        for nesterov in [true, false] {
            t.write(settings, &Sgd { lr: 0.05, momentum: 0.9, weight_decay: 1e-3, nesterov }.floats());
            t.run(&format!("sgd {len} nesterov {nesterov}"), |be| be.sgd(p, g, m, settings, scaler.at(0, 1), flag));
        }
        // Loss scaling: scaled, unscaled (found clear), the scale's update at the growth step.
        t.write(scaler, &LossScale { scale: 4096.0, good_steps: LossScale::GROWTH_INTERVAL - 1 }.floats());
        t.run(&format!("scale_loss_grad {len}"), |be| {
            be.scale_loss_grad(g.at(0, len / 7 * 7).matrix(len / 7, 7), scaler)
        });
        t.run(&format!("unscale_grads {len}"), |be| be.unscale_grads(g, scaler));
        t.run("update_scale at the growth step", |be| be.update_scale(scaler));
        // A NaN gradient: found on both, the update skipped, the scale halved.
        t.write(g.at(len / 2, 1), &[f32::NAN]);
        t.run(&format!("unscale_grads {len} with a NaN gradient"), |be| be.unscale_grads(g, scaler));
        t.run(&format!("sgd {len} skipped"), |be| be.sgd(p, g, m, settings, scaler.at(0, 1), flag));
        t.run("update_scale after a NaN", |be| be.update_scale(scaler));
        // Not skipped, a NaN gradient raises the flag on both, and makes the same parameters NaN.
        t.write(flag, &[0.0]);
        t.write(scaler, &LossScale::INITIAL.floats());
        t.write(settings, &Sgd::default().floats());
        t.run(&format!("sgd {len} with a NaN gradient"), |be| be.sgd(p, g, m, settings, scaler.at(0, 1), flag));
    }
}
on_devices!(elementwise_ops_match_the_cpu, elementwise);

fn pooling<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (n, c, h, w) in SHAPES {
        let mut l = Layout::default();
        let x = l.slice(n, c, h, w);
        let (a, ga, gx) = (l.slice(n, c, h / 2, w / 2), l.slice(n, c, h / 2, w / 2), l.slice(n, c, h, w));
        let (mh, mw) = ((h - 1) / 2 + 1, (w - 1) / 2 + 1);
        let (m, gm) = (l.slice(n, c, mh, mw), l.slice(n, c, mh, mw));
        let (pooled, gp, bn) = (l.take(n * c).matrix(n, c), l.take(n * c).matrix(n, c), l.bn(c));
        let mut t = Twin::new(make, l.len, &[], n);
        t.positive(bn.stats.var);
        let at = format!("n{n} c{c} {h}x{w}");
        t.run(&format!("avg_pool2 {at}"), |be| be.avg_pool2(x, a));
        t.run(&format!("avg_pool2_backward {at}"), |be| be.avg_pool2_backward(ga, gx));
        // With a BN-ReLU about half the values pooled are zeros: windows tie at zero.
        for pre in [None, Some(bn)] {
            t.run(&format!("max_pool3 {at} pre {}", pre.is_some()), |be| be.max_pool3(x, pre, m));
            t.run(&format!("max_pool3_backward {at} pre {}", pre.is_some()), |be| {
                be.max_pool3_backward(x, pre, gm, gx)
            });
        }
        t.run(&format!("global_avg_pool {at}"), |be| be.global_avg_pool(x, pooled));
        t.run(&format!("global_avg_pool_backward {at}"), |be| be.global_avg_pool_backward(gp, gx));
    }
}
on_devices!(pooling_matches_the_cpu, pooling);

fn head<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    for (n, cin, k) in [(1, 7, 3), (3, 33, 10), (300, 5, 100)] {
        let mut l = Layout::default();
        let mut mat = |rows: usize, cols: usize| l.take(rows * cols).matrix(rows, cols);
        let (x, w, y, gx, gw, gy) = (mat(n, cin), mat(k, cin), mat(n, k), mat(n, cin), mat(k, cin), mat(n, k));
        let (b, gb, out) = (l.take(k), l.take(k), l.take(2));
        let mut t = Twin::new(make, l.len, &[], n);
        let labels: Vec<u32> = (0..n).map(|i| (rng::mix64(i as u64) % k as u64) as u32).collect();
        t.cpu.set_labels(&labels);
        t.dev.set_labels(&labels);
        let at = format!("n{n} {cin}->{k}");
        t.run(&format!("linear {at}"), |be| be.linear(x, w, b, y));
        t.run(&format!("linear_backward {at}"), |be| be.linear_backward(x, w, gy, gx, gw, gb));
        t.run(&format!("softmax_xent {at}"), |be| be.softmax_xent(y, n, out, gy));
        t.run(&format!("softmax_xent {at} of {}", 3 * n), |be| be.softmax_xent(y, 3 * n, out, gy));
    }
}
on_devices!(head_matches_the_cpu, head);

fn input_batch<E: Exec>(make: &dyn Fn() -> CudaBackend<E>) {
    // Stored h x w upsampled by s: CIFAR's 32 x 32 as stored and at ImageNet's 224 x 224, and
    // images that are neither square nor CIFAR-sized.
    for (n, h, w, s) in [(1, 32, 32, 1), (5, 32, 32, 1), (3, 12, 20, 1), (1, 32, 32, 7), (5, 5, 7, 3), (2, 12, 20, 2)] {
        let (oh, ow) = (s * h, s * w);
        let mut l = Layout::default();
        let dst = View::dense(l.take(n * 3 * oh * ow).off, n, 3, oh, ow);
        let mut t = Twin::new(
            make,
            l.len,
            &[ConvShape { spec: ConvSpec::SAME3, cin: 3, cout: 4, h: oh, w: ow, dtype: DType::F32 }],
            n,
        );
        let bytes: Vec<u8> = (0..n * 3 * h * w).map(|i| rng::mix64(i as u64) as u8).collect();
        // Windows in every corner and the center, mirrored or not.
        let crops: Vec<Crop> =
            (0..n).map(|i| Crop { top: [4, 0, 8, 0, 8][i], left: [4, 0, 0, 8, 8][i], flip: i % 2 == 1 }).collect();
        let norm = normalization(Dataset::Cifar100);
        t.run(&format!("augment n{n} {h}x{w} x{s}"), |be| be.augment(&bytes, &crops, &norm, s, dst));
    }
}
on_devices!(input_batch_matches_the_cpu, input_batch);

//! The error of each convolution backend against a float64 reference, on the shapes of
//! DenseNet-BC-100-12 (the stem, a bottleneck's 1x1 and 3x3, a transition): the CPU backend in
//! every `cargo test`, and on a GPU cuDNN with all deterministic algorithms and with GEMM-based
//! ones only (`AlgorithmFamily::Gemm`, as `DENSENET_CUDNN_ALGOS=gemm`). Each prints its
//! relative errors (|got - ref| / |ref| in Euclidean norm, and the largest element error over
//! the largest reference magnitude) per direction; docs/cuda.md states the tolerance of the
//! whole-step tests as a multiple of them.

#[macro_use]
mod common;

use densenet::backend::cuda::{AlgorithmFamily, CudaBackend, GpuExec};
use densenet::backend::{Backend, ConvShape, ConvSpec, CpuBackend, DType, Span, View};
use densenet::rng;

/// Largest relative error (in norm) any backend may show here: the whole-step tests' tolerance.
const TOL: f64 = 1e-4;
/// Images per convolution (one fused chunk).
const N: usize = 16;

/// BC-100-12's convolution kinds: (name, spec, cin, cout, h, w).
const SHAPES: [(&str, ConvSpec, usize, usize, usize, usize); 4] = [
    ("stem 3x3", ConvSpec::SAME3, 3, 24, 32, 32),
    ("bottleneck 1x1", ConvSpec::POINTWISE, 108, 48, 16, 16),
    ("bottleneck 3x3", ConvSpec::SAME3, 48, 12, 32, 32),
    ("transition 1x1", ConvSpec::POINTWISE, 216, 108, 8, 8),
];

/// Forward, backward-data and backward-filter of one convolution in float64, by definition.
fn reference(
    spec: ConvSpec,
    (cin, cout, h, w): (usize, usize, usize, usize),
    x: &[f32],
    wt: &[f32],
    gy: &[f32],
) -> [Vec<f64>; 3] {
    let (k, (oh, ow)) = (spec.k, (spec.out(h), spec.out(w)));
    let mut y = vec![0.0; N * cout * oh * ow];
    let mut gx = vec![0.0; N * cin * h * w];
    let mut gw = vec![0.0; cout * cin * k * k];
    for n in 0..N {
        for co in 0..cout {
            for oy in 0..oh {
                for ox in 0..ow {
                    let yi = ((n * cout + co) * oh + oy) * ow + ox;
                    for ci in 0..cin {
                        for ky in 0..k {
                            let iy = (oy * spec.stride + ky) as isize - spec.pad as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            for kx in 0..k {
                                let ix = (ox * spec.stride + kx) as isize - spec.pad as isize;
                                if ix < 0 || ix >= w as isize {
                                    continue;
                                }
                                let xi = ((n * cin + ci) * h + iy as usize) * w + ix as usize;
                                let wi = ((co * cin + ci) * k + ky) * k + kx;
                                y[yi] += x[xi] as f64 * wt[wi] as f64;
                                gx[xi] += gy[yi] as f64 * wt[wi] as f64;
                                gw[wi] += gy[yi] as f64 * x[xi] as f64;
                            }
                        }
                    }
                }
            }
        }
    }
    [y, gx, gw]
}

/// The three directions' relative errors of `be` on every shape, printed under `label`.
fn errors(label: &str, make: &mut dyn FnMut() -> Box<dyn Backend>) -> Vec<(String, f64, f64)> {
    let mut out = Vec::new();
    for (name, spec, cin, cout, h, w) in SHAPES {
        let (oh, ow) = (spec.out(h), spec.out(w));
        let (xl, yl, wl) = (N * cin * h * w, N * cout * oh * ow, cout * cin * spec.k * spec.k);
        let seed = (cin * 1000 + cout) as u64;
        let x: Vec<f32> = (0..xl).map(|i| rng::normal(seed, i as u64) as f32).collect();
        let wt: Vec<f32> = (0..wl).map(|i| rng::normal(seed + 1, i as u64) as f32).collect();
        let gy: Vec<f32> = (0..yl).map(|i| rng::normal(seed + 2, i as u64) as f32).collect();
        let want = reference(spec, (cin, cout, h, w), &x, &wt, &gy);
        // One dense layout: x, y, gy, gx, w, gw, then the workspace.
        let mut top = 0;
        let mut take = |len: usize| {
            top += 4 * len;
            Span::f32(top - 4 * len, len)
        };
        let (sx, sy, sgy, sgx, sw, sgw) = (take(xl), take(yl), take(yl), take(xl), take(wl), take(wl));
        let mut be = make();
        let ws = be.workspace_len(&[ConvShape { spec, cin, cout, h, w, dtype: DType::F32 }], 0, N).unwrap();
        be.allocate(top + ws, Span::f32(top, ws / 4), N).unwrap();
        be.write(sx, &x);
        be.write(sw, &wt);
        be.write(sgy, &gy);
        let (xv, yv) = (View::dense(sx.off, N, cin, h, w), View::dense(sy.off, N, cout, oh, ow));
        let (gyv, gxv) = (View::dense(sgy.off, N, cout, oh, ow), View::dense(sgx.off, N, cin, h, w));
        be.conv_forward(xv, None, sw, yv, spec);
        be.conv_backward_data(gyv, sw, gxv, spec);
        be.conv_backward_filter(xv, None, gyv, sgw, spec, false);
        be.take_error().unwrap_or_else(|e| panic!("{label} {name}: {e}"));
        for (dir, span, want) in
            [("forward", sy, &want[0]), ("backward-data", sgx, &want[1]), ("backward-filter", sgw, &want[2])]
        {
            let got = be.read(span);
            let d: f64 = got.iter().zip(want).map(|(&g, &r)| (g as f64 - r).powi(2)).sum();
            let r: f64 = want.iter().map(|r| r * r).sum();
            let norm = (d / r).sqrt();
            let scale = want.iter().fold(0.0f64, |m, r| m.max(r.abs()));
            let worst = got.iter().zip(want).fold(0.0f64, |m, (&g, &r)| m.max((g as f64 - r).abs())) / scale;
            eprintln!("{label:<24} {name:<16} {dir:<16} norm {norm:.2e}  largest {worst:.2e}");
            out.push((format!("{label} {name} {dir}"), norm, worst));
        }
    }
    out
}

fn check(rows: &[(String, f64, f64)]) {
    for (what, norm, worst) in rows {
        assert!(norm.is_finite() && *norm < TOL && *worst < 10.0 * TOL, "{what}: {norm:.2e} (largest {worst:.2e})");
    }
}

mod by_family {
    use super::*;

    /// The CPU backend (f32, the numerical reference of every other test).
    #[test]
    fn cpu() {
        check(&errors("cpu f32", &mut || Box::new(CpuBackend::new())));
    }

    /// cuDNN with every deterministic algorithm, then with GEMM-based ones only.
    #[test]
    fn gpu() {
        common::devices::on_gpu("conv_error", |_| {
            for (label, family) in [("cudnn all", AlgorithmFamily::All), ("cudnn gemm", AlgorithmFamily::Gemm)] {
                check(&errors(label, &mut || Box::new(CudaBackend::new(GpuExec::open(0, family).unwrap()))));
            }
        });
    }
}

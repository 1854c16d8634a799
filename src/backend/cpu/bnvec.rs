//! The batch-norm inner loops over one channel plane, as AVX2 kernels with portable
//! fallbacks (the compiler does not vectorize these masked reductions by itself). The
//! arithmetic and its order are the same in both versions, lane for lane. Planes hold any
//! [`Elem`] type: values are widened on load and results rounded once on store.

use super::matmul::simd;
use crate::elem::Elem;

/// Per-channel constants of `y = relu(x * scale + shift)` and its backward.
#[derive(Clone, Copy)]
pub(super) struct Affine {
    /// gamma / sqrt(var + eps).
    pub scale: f32,
    /// beta - mean * scale.
    pub shift: f32,
    /// Batch mean.
    pub mean: f32,
    /// 1 / sqrt(var + eps).
    pub inv_std: f32,
}

/// The coefficients of the BN input gradient `k * (gm - mg - xhat * mgx)` of one channel.
#[derive(Clone, Copy)]
pub(super) struct Grad {
    /// gamma / sqrt(var + eps).
    pub k: f32,
    /// Mean of the masked output gradient.
    pub mg: f32,
    /// Mean of the masked output gradient times xhat.
    pub mgx: f32,
    /// Add to the destination instead of overwriting it.
    pub accumulate: bool,
}

/// `(sum(x - s), sum((x - s)^2))`.
pub(super) fn moments<T: Elem>(x: &[T], s: f32) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::moments(x, s) };
    }
    x.iter().fold((0.0, 0.0), |(a, b), &v| {
        let d = v.get() - s;
        (a + d as f64, b + (d * d) as f64)
    })
}

/// `relu(x * scale + shift)` of one value: a multiply then an add (never fused), and the sum
/// if it is positive, else +0 (NaN and -0 too), which is lane for lane `_mm256_max_ps(v, 0)`.
/// Every BN-ReLU value of the backend is this one, so they are bitwise equal wherever computed.
#[inline]
pub(super) fn bn_relu1(x: f32, scale: f32, shift: f32) -> f32 {
    let v = x * scale + shift;
    if v > 0.0 {
        v
    } else {
        0.0
    }
}

/// `y = relu(x * scale + shift)` ([`bn_relu1`] of each element, rounded to `T`).
pub(super) fn bn_relu<T: Elem>(x: &[T], y: &mut [T], scale: f32, shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::bn_relu(x, y, scale, shift) };
    }
    y.iter_mut().zip(x).for_each(|(y, &x)| *y = T::put(bn_relu1(x.get(), scale, shift)));
}

/// `y = relu(x * scale + shift)` rounded to `T`, as a stored BN-ReLU output holds it, and
/// widened: what a convolution reads from a stored BN-ReLU output.
pub(super) fn bn_relu_widened<T: Elem>(x: &[T], y: &mut [f32], scale: f32, shift: f32) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::bn_relu_widened(x, y, scale, shift) };
    }
    y.iter_mut().zip(x).for_each(|(y, &x)| *y = T::put(bn_relu1(x.get(), scale, shift)).get());
}

/// `(sum(gm), sum(gm * xhat))` with `gm = g` where the forward output was positive, else 0,
/// and `xhat = (x - mean) * inv_std`.
pub(super) fn grad_sums<T: Elem>(g: &[T], x: &[T], f: Affine) -> (f64, f64) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::grad_sums(g, x, f) };
    }
    g.iter().zip(x).fold((0.0, 0.0), |(a, b), (&g, &x)| {
        let (g, x) = (g.get(), x.get());
        let gm = if x * f.scale + f.shift > 0.0 { g } else { 0.0 };
        (a + gm as f64, b + (gm * ((x - f.mean) * f.inv_std)) as f64)
    })
}

/// The BN input gradient of [`Grad`], written into `d` (or added to it); `g = None` reads the
/// output gradient from `d` itself (in place).
pub(super) fn grad<T: Elem>(d: &mut [T], g: Option<&[T]>, x: &[T], f: Affine, c: Grad) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        // SAFETY: the CPU has AVX2, FMA and F16C.
        return unsafe { avx2::grad(d, g, x, f, c) };
    }
    let Grad { k, mg, mgx, accumulate } = c;
    for i in 0..d.len() {
        let (gv, xi) = (g.map_or(d[i], |g| g[i]).get(), x[i].get());
        let gm = if xi * f.scale + f.shift > 0.0 { gv } else { 0.0 };
        let v = k * (gm - mg - (xi - f.mean) * f.inv_std * mgx);
        d[i] = T::put(if accumulate { d[i].get() + v } else { v });
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Affine, Elem, Grad};
    use std::arch::x86_64::*;

    /// Adds the 8 lanes in f64.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn sum64(v: __m256) -> f64 {
        let lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
        let hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
        let s = _mm256_add_pd(lo, hi);
        let s = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
        _mm_cvtsd_f64(_mm_add_sd(s, _mm_unpackhi_pd(s, s)))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn moments<T: Elem>(x: &[T], s: f32) -> (f64, f64) {
        let sv = _mm256_set1_ps(s);
        let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let chunks = x.chunks_exact(8);
        let rest = chunks.remainder();
        for c in chunks {
            let d = _mm256_sub_ps(T::load8(c.as_ptr()), sv);
            a = _mm256_add_ps(a, d);
            b = _mm256_add_ps(b, _mm256_mul_ps(d, d));
        }
        let (mut sa, mut sb) = (sum64(a), sum64(b));
        for &v in rest {
            let d = v.get() - s;
            sa += d as f64;
            sb += (d * d) as f64;
        }
        (sa, sb)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn bn_relu<T: Elem>(x: &[T], y: &mut [T], scale: f32, shift: f32) {
        let (sc, sh, z) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift), _mm256_setzero_ps());
        let n = x.len().min(y.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_add_ps(_mm256_mul_ps(T::load8(x.as_ptr().add(i)), sc), sh);
            T::store8(y.as_mut_ptr().add(i), _mm256_max_ps(v, z));
            i += 8;
        }
        for j in i..n {
            y[j] = T::put(super::bn_relu1(x[j].get(), scale, shift));
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn bn_relu_widened<T: Elem>(x: &[T], y: &mut [f32], scale: f32, shift: f32) {
        let (sc, sh, z) = (_mm256_set1_ps(scale), _mm256_set1_ps(shift), _mm256_setzero_ps());
        let n = x.len().min(y.len());
        let mut i = 0;
        while i + 8 <= n {
            let v = _mm256_add_ps(_mm256_mul_ps(T::load8(x.as_ptr().add(i)), sc), sh);
            _mm256_storeu_ps(y.as_mut_ptr().add(i), T::round8(_mm256_max_ps(v, z)));
            i += 8;
        }
        for j in i..n {
            y[j] = T::put(super::bn_relu1(x[j].get(), scale, shift)).get();
        }
    }

    /// The gradient masked by the ReLU: `g` where `x * scale + shift > 0`, else 0.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn masked(g: __m256, x: __m256, sc: __m256, sh: __m256) -> __m256 {
        let pre = _mm256_add_ps(_mm256_mul_ps(x, sc), sh);
        _mm256_and_ps(g, _mm256_cmp_ps(pre, _mm256_setzero_ps(), _CMP_GT_OQ))
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn grad_sums<T: Elem>(g: &[T], x: &[T], f: Affine) -> (f64, f64) {
        let (sc, sh) = (_mm256_set1_ps(f.scale), _mm256_set1_ps(f.shift));
        let (mean, inv) = (_mm256_set1_ps(f.mean), _mm256_set1_ps(f.inv_std));
        let (mut a, mut b) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let n = g.len().min(x.len());
        let mut i = 0;
        while i + 8 <= n {
            let xv = T::load8(x.as_ptr().add(i));
            let gm = masked(T::load8(g.as_ptr().add(i)), xv, sc, sh);
            a = _mm256_add_ps(a, gm);
            b = _mm256_add_ps(b, _mm256_mul_ps(gm, _mm256_mul_ps(_mm256_sub_ps(xv, mean), inv)));
            i += 8;
        }
        let (mut sa, mut sb) = (sum64(a), sum64(b));
        for j in i..n {
            let (gj, xj) = (g[j].get(), x[j].get());
            let gm = if xj * f.scale + f.shift > 0.0 { gj } else { 0.0 };
            sa += gm as f64;
            sb += (gm * ((xj - f.mean) * f.inv_std)) as f64;
        }
        (sa, sb)
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn grad<T: Elem>(d: &mut [T], g: Option<&[T]>, x: &[T], f: Affine, c: Grad) {
        let Grad { k, mg, mgx, accumulate: acc } = c;
        let (sc, sh) = (_mm256_set1_ps(f.scale), _mm256_set1_ps(f.shift));
        let (mean, inv) = (_mm256_set1_ps(f.mean), _mm256_set1_ps(f.inv_std));
        let (kv, mgv, mgxv) = (_mm256_set1_ps(k), _mm256_set1_ps(mg), _mm256_set1_ps(mgx));
        let n = d.len().min(x.len());
        let src = g.map_or(d.as_ptr(), |g| g.as_ptr());
        let dp = d.as_mut_ptr();
        let mut i = 0;
        while i + 8 <= n {
            let xv = T::load8(x.as_ptr().add(i));
            let gm = masked(T::load8(src.add(i)), xv, sc, sh);
            let xhat = _mm256_mul_ps(_mm256_sub_ps(xv, mean), inv);
            let mut v = _mm256_mul_ps(kv, _mm256_sub_ps(_mm256_sub_ps(gm, mgv), _mm256_mul_ps(xhat, mgxv)));
            if acc {
                v = _mm256_add_ps(v, T::load8(dp.add(i)));
            }
            T::store8(dp.add(i), v);
            i += 8;
        }
        for (j, &xj) in x.iter().enumerate().take(n).skip(i) {
            let xj = xj.get();
            let gm = if xj * f.scale + f.shift > 0.0 { (*src.add(j)).get() } else { 0.0 };
            let v = k * (gm - mg - (xj - f.mean) * f.inv_std * mgx);
            *dp.add(j) = T::put(if acc { (*dp.add(j)).get() + v } else { v });
        }
    }
}

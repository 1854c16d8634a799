//! Matrix multiplies for convolutions, reading activations in place (rows of pixels):
//! - [`matmul`]: `Y[m x p] (+)= A[m x k] * B[k x p]` (forward and data gradient), A small
//!   (weights, row-major), B's rows contiguous;
//! - [`matmul_nt`]: `Y[m x n] (+)= A[m x p] * B[n x p]^T` (weight gradient), both operands'
//!   rows contiguous.
//!
//! On x86-64 with AVX2+FMA, register-blocked kernels stream the activations straight from the
//! arena with no packing of the large operand; elsewhere the `gemm` crate does the work.

/// Fills `dst` [m x k] row-major with `f(i, kk)` (weights seen through any index map).
pub(super) fn pack(m: usize, k: usize, dst: &mut [f32], f: impl Fn(usize, usize) -> f32) {
    for i in 0..m {
        for (kk, d) in dst[i * k..(i + 1) * k].iter_mut().enumerate() {
            *d = f(i, kk);
        }
    }
}

/// `y[m x p] (row stride ldy) = [y +] a[m x k] (row-major) * b[k x p] (row stride ldb)`.
///
/// # Safety
/// The pointers cover the stated extents; `y` overlaps neither `a` nor `b`.
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul(
    m: usize,
    p: usize,
    k: usize,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
    a: *const f32,
    b: *const f32,
    ldb: usize,
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return avx2::matmul(m, p, k, y, ldy, accumulate, a, b, ldb);
    }
    gemm::gemm(
        m,
        p,
        k,
        y,
        1,
        ldy as isize,
        accumulate,
        a,
        1,
        k as isize,
        b,
        1,
        ldb as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `y[m x n] (row stride ldy) = [y +] a[m x p] (row stride lda) * b[n x p]^T (row stride ldb)`.
///
/// # Safety
/// As [`matmul`].
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn matmul_nt(
    m: usize,
    n: usize,
    p: usize,
    y: *mut f32,
    ldy: usize,
    accumulate: bool,
    a: (*const f32, usize),
    b: (*const f32, usize),
) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
        return avx2::matmul_nt(m, n, p, y, ldy, accumulate, a, b);
    }
    gemm::gemm(
        m,
        n,
        p,
        y,
        1,
        ldy as isize,
        accumulate,
        a.0,
        1,
        a.1 as isize,
        b.0,
        b.1 as isize,
        1,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    /// Rows per register block.
    const MR: usize = 6;
    /// Depth of one pass over B.
    const KC: usize = 64;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul(
        m: usize,
        p: usize,
        k: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
        a: *const f32,
        b: *const f32,
        ldb: usize,
    ) {
        // k in chunks of KC rows: a chunk's B rows (one page apart each) stay in the TLB and
        // L1 while every row block of A passes over them.
        let mut k0 = 0;
        while k0 < k {
            let kc = (k - k0).min(KC);
            let acc = acc || k0 > 0;
            let mut j = 0;
            while j < p {
                let cols = (p - j).min(16);
                let mut i = 0;
                while i < m {
                    let (ap, bp, yp) = (a.add(i * k + k0), b.add(k0 * ldb + j), y.add(i * ldy + j));
                    match ((m - i).min(MR), cols == 16) {
                        (6, true) => block::<6, false>(kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (6, false) => block::<6, true>(kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (5, m16) => dispatch::<5>(m16, kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (4, m16) => dispatch::<4>(m16, kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (3, m16) => dispatch::<3>(m16, kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (2, m16) => dispatch::<2>(m16, kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                        (_, m16) => dispatch::<1>(m16, kc, ap, k, bp, ldb, yp, ldy, acc, cols),
                    }
                    i += MR;
                }
                j += 16;
            }
            k0 += KC;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dispatch<const R: usize>(
        full: bool,
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
        cols: usize,
    ) {
        if full {
            block::<R, false>(k, a, lda, b, ldb, y, ldy, acc, cols)
        } else {
            block::<R, true>(k, a, lda, b, ldb, y, ldy, acc, cols)
        }
    }

    /// Lane masks selecting the first `cols` of 16 columns.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn masks(cols: usize) -> (__m256i, __m256i) {
        let lane = |base: i32| {
            let idx = _mm256_setr_epi32(
                base,
                base + 1,
                base + 2,
                base + 3,
                base + 4,
                base + 5,
                base + 6,
                base + 7,
            );
            _mm256_cmpgt_epi32(_mm256_set1_epi32(cols as i32), idx)
        };
        (lane(0), lane(8))
    }

    /// An R x 16 block of y (the first `cols` columns when MASKED) over the whole k.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn block<const R: usize, const MASKED: bool>(
        k: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
        cols: usize,
    ) {
        let (m0, m1) = masks(cols);
        let mut c = [[_mm256_setzero_ps(); 2]; R];
        for kk in 0..k {
            let row = b.add(kk * ldb);
            let (b0, b1) = if MASKED {
                (_mm256_maskload_ps(row, m0), _mm256_maskload_ps(row.add(8), m1))
            } else {
                (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)))
            };
            for (r, cr) in c.iter_mut().enumerate() {
                let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
            }
        }
        for (r, cr) in c.iter().enumerate() {
            let out = y.add(r * ldy);
            if MASKED {
                let (mut v0, mut v1) = (cr[0], cr[1]);
                if acc {
                    v0 = _mm256_add_ps(v0, _mm256_maskload_ps(out, m0));
                    v1 = _mm256_add_ps(v1, _mm256_maskload_ps(out.add(8), m1));
                }
                _mm256_maskstore_ps(out, m0, v0);
                _mm256_maskstore_ps(out.add(8), m1, v1);
            } else {
                let (mut v0, mut v1) = (cr[0], cr[1]);
                if acc {
                    v0 = _mm256_add_ps(v0, _mm256_loadu_ps(out));
                    v1 = _mm256_add_ps(v1, _mm256_loadu_ps(out.add(8)));
                }
                _mm256_storeu_ps(out, v0);
                _mm256_storeu_ps(out.add(8), v1);
            }
        }
    }

    /// Rows of b per block in [`matmul_nt`] (the block stays in L1 while a streams from L2).
    const NB: usize = 4;
    /// Rows of a per block in [`matmul_nt`].
    const MB: usize = 3;

    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn matmul_nt(
        m: usize,
        n: usize,
        p: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
        a: (*const f32, usize),
        b: (*const f32, usize),
    ) {
        let mut j = 0;
        while j < n {
            let mut i = 0;
            while i < m {
                let (ap, bp) = (a.0.add(i * a.1), b.0.add(j * b.1));
                let yp = y.add(i * ldy + j);
                match ((m - i).min(MB), (n - j).min(NB)) {
                    (3, 4) => dots::<3, 4>(p, ap, a.1, bp, b.1, yp, ldy, acc),
                    (r, c) => dots_any(r, c, p, ap, a.1, bp, b.1, yp, ldy, acc),
                }
                i += MB;
            }
            j += NB;
        }
    }

    /// Edge blocks: one row pair at a time.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dots_any(
        r: usize,
        c: usize,
        p: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
    ) {
        for i in 0..r {
            for j in 0..c {
                dots::<1, 1>(
                    p,
                    a.add(i * lda),
                    lda,
                    b.add(j * ldb),
                    ldb,
                    y.add(i * ldy + j),
                    ldy,
                    acc,
                );
            }
        }
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// y[R x C] (+)= dot products of R rows of a with C rows of b, over p.
    #[target_feature(enable = "avx2,fma")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn dots<const R: usize, const C: usize>(
        p: usize,
        a: *const f32,
        lda: usize,
        b: *const f32,
        ldb: usize,
        y: *mut f32,
        ldy: usize,
        acc: bool,
    ) {
        let mut s = [[_mm256_setzero_ps(); C]; R];
        let mut t = 0;
        while t + 8 <= p {
            let bv: [__m256; C] = std::array::from_fn(|j| _mm256_loadu_ps(b.add(j * ldb + t)));
            for (i, si) in s.iter_mut().enumerate() {
                let av = _mm256_loadu_ps(a.add(i * lda + t));
                for (sij, &bj) in si.iter_mut().zip(&bv) {
                    *sij = _mm256_fmadd_ps(av, bj, *sij);
                }
            }
            t += 8;
        }
        for (i, si) in s.iter().enumerate() {
            for (j, &sij) in si.iter().enumerate() {
                let mut v = hsum(sij);
                for q in t..p {
                    v += *a.add(i * lda + q) * *b.add(j * ldb + q);
                }
                let out = y.add(i * ldy + j);
                *out = if acc { *out + v } else { v };
            }
        }
    }
}

//! Matrix multiplies for convolutions, reading activations in place (rows of pixels):
//! - [`matmul`]: `Y[m x p] = A[m x k] * B[k x p]` (forward and data gradient), A small
//!   (weights, row-major), B's rows contiguous;
//! - [`matmul_nt`]: `Y[m x n] (+)= A[m x p] * B[n x p]^T` (weight gradient);
//! - [`conv_direct`] / [`conv_direct_filter`]: the same two products for a stride-1 "same"
//!   convolution whose B is a [`Shifted`] view of a zero-padded image (implicit im2col).
//!
//! These run as AVX2+FMA register-blocked kernels on x86-64 ([`simd`] says whether the CPU
//! has them); the first two fall back to the `gemm` crate elsewhere, and the direct forms are
//! only called when [`simd`] is true (the caller uses im2col otherwise).
//!
//! The AVX2 kernels take 16-bit operands and outputs (docs/precision.md): B is widened while
//! it is packed (a fused BN-ReLU rounded as a stored one is), A while it is loaded, and Y is
//! rounded once, in the epilogue; a 16-bit Y summed over several panels of depth keeps its
//! partial sums in f32 (`sums`). The portable path takes f32 only.

use crate::elem::Elem;

/// Whether the AVX2+FMA kernels run: the CPU has them (and F16C, for 16-bit tensors: every
/// AVX2 CPU has it) and `DENSENET_NO_SIMD` is not set in the environment (it forces the
/// portable path, for testing it). Decided once per process.
pub(super) fn simd() -> bool {
    static SIMD: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *SIMD.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        let cpu = std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c");
        #[cfg(not(target_arch = "x86_64"))]
        let cpu = false;
        cpu && std::env::var_os("DENSENET_NO_SIMD").is_none()
    })
}

/// Fills `dst` [m x k] row-major with `f(i, kk)` (weights seen through any index map).
pub(super) fn pack(m: usize, k: usize, dst: &mut [f32], f: impl Fn(usize, usize) -> f32) {
    for i in 0..m {
        for (kk, d) in dst[i * k..(i + 1) * k].iter_mut().enumerate() {
            *d = f(i, kk);
        }
    }
}

/// Per-row `relu(b * scale[row] + shift[row])` applied to B while it is packed: a BN-ReLU
/// fused into the product (the arithmetic of `bnvec::bn_relu`, so bitwise the same values),
/// rounded to B's element type as a stored BN-ReLU output is.
#[derive(Clone, Copy)]
pub(super) struct Pre {
    /// Per-row scale.
    pub scale: *const f32,
    /// Per-row shift.
    pub shift: *const f32,
}

// SAFETY: the constants are written before the parallel section and only read inside it.
unsafe impl Send for Pre {}
// SAFETY: as for `Send`: tasks only read the constants, which outlive the parallel section.
unsafe impl Sync for Pre {}

/// The shape of a product `Y[m x n] = A[m x k] * B[k x n]` (or `* B[n x k]^T`).
#[derive(Clone, Copy)]
pub(super) struct Dims {
    /// Rows of Y and A.
    pub m: usize,
    /// Columns of Y.
    pub n: usize,
    /// The depth summed over.
    pub k: usize,
}

/// A row-major operand read in place, widened from `T`: row i at `ptr + i * ld`.
#[derive(Clone, Copy)]
pub(super) struct Src<T = f32> {
    /// Row 0.
    pub ptr: *const T,
    /// Elements between rows.
    pub ld: usize,
}

/// A product's destination, rounded to `T`: row i at `ptr + i * ld`, overwritten with the
/// product plus the f32 sums of `add` (the destination itself when an f32 one accumulates).
#[derive(Clone, Copy)]
pub(super) struct Dst<T = f32> {
    /// Row 0.
    pub ptr: *mut T,
    /// Elements between rows.
    pub ld: usize,
    /// Sums added to the product.
    pub add: Option<Src>,
}

impl<T> Dst<T> {
    /// A destination overwritten with the product.
    pub(super) fn to(ptr: *mut T, ld: usize) -> Self {
        Dst { ptr, ld, add: None }
    }

    /// The destination from row `i`, column `j` on.
    ///
    /// # Safety
    /// Both pointers stay inside their allocations.
    unsafe fn at(self, i: usize, j: usize) -> Self {
        let add = self.add.map(|s| Src { ptr: s.ptr.add(i * s.ld + j), ld: s.ld });
        Dst { ptr: self.ptr.add(i * self.ld + j), ld: self.ld, add }
    }
}

impl Dst {
    /// An f32 destination, added to when `acc`.
    pub(super) fn f32(ptr: *mut f32, ld: usize, acc: bool) -> Dst {
        Dst { ptr, ld, add: acc.then_some(Src { ptr, ld }) }
    }
}

/// An implicit im2col matrix: row `c * offs.len() + r` is channel `c` of a zero-padded image
/// shifted by `offs[r]`; pixel (oy, ox) of a row is at `oy * ld + ox`.
#[derive(Clone, Copy)]
pub(super) struct Shifted<'a> {
    /// Channel 0, pixel (0, 0) of the padded image.
    pub base: *const f32,
    /// Floats per padded channel plane.
    pub plane: usize,
    /// Floats per padded image row.
    pub ld: usize,
    /// Offset of each kernel tap (ky * ld + kx).
    pub offs: &'a [usize],
    /// Offset of a 16-pixel run's second half from its first: 8, or `ld` when a run covers
    /// two image rows of 8.
    pub hi: usize,
}

impl Shifted<'_> {
    /// Start of im2col row `j`.
    fn row(&self, j: usize) -> *const f32 {
        let k2 = self.offs.len();
        self.base.wrapping_add((j / k2) * self.plane + self.offs[j % k2])
    }
}

/// `y[m x n] = a[m x k] (row-major) * pre(b[k x n])` (y overwritten: no `add`); `sums` is
/// scratch of [`sums_len`]`(m)` floats when `Y` is 16-bit.
///
/// # Safety
/// The pointers cover the stated extents; `y` overlaps neither `a` nor `b`; `pre` and 16-bit
/// types only when [`simd`] is true (the caller widens and applies `pre` otherwise).
pub(super) unsafe fn matmul<X: Elem, Y: Elem>(
    d: Dims,
    y: Dst<Y>,
    a: *const f32,
    b: Src<X>,
    pre: Option<Pre>,
    sums: *mut f32,
) {
    assert!(y.add.is_none(), "matmul overwrites its destination");
    #[cfg(target_arch = "x86_64")]
    if simd() {
        return avx2::matmul(d, y, a, b, pre, sums);
    }
    let _ = sums;
    portable(d, f32_dst(y), Src { ptr: a, ld: d.k }, f32_src(b).ptr, (b.ld, 1), pre)
}

/// `y[m x n] (+)= a[m x k] * pre(b[n x k])^T`; `pack` is scratch of [`nt_pack_len`]`(1, k)`
/// floats.
///
/// # Safety
/// As [`matmul`].
pub(super) unsafe fn matmul_nt<A: Elem, X: Elem>(
    d: Dims,
    y: Dst,
    a: Src<A>,
    b: Src<X>,
    pack: *mut f32,
    pre: Option<Pre>,
) {
    #[cfg(target_arch = "x86_64")]
    if simd() {
        let walk = avx2::Walk { rows: 1, cols: d.k, lda: 0, ldb: 0 };
        return avx2::nt((d.m, d.n), y, a, walk, |j| b.ptr.add(j * b.ld), pack, pre);
    }
    let _ = pack;
    portable(d, y, f32_src(a), f32_src(b).ptr, (1, b.ld), pre)
}

/// `y` as the f32 destination it is on the portable path, which takes f32 only.
fn f32_dst<T: Elem>(y: Dst<T>) -> Dst {
    assert!(T::F32, "16-bit operands need the AVX2 kernels");
    Dst { ptr: y.ptr.cast(), ld: y.ld, add: y.add }
}

/// `s` as the f32 operand it is on the portable path.
fn f32_src<T: Elem>(s: Src<T>) -> Src {
    assert!(T::F32, "16-bit operands need the AVX2 kernels");
    Src { ptr: s.ptr.cast(), ld: s.ld }
}

/// `y[m x n] (+)= a[m x k] * B[k x n]` through the `gemm` crate, where the AVX2 kernels do not
/// run: B's element (kk, j) is at `b + kk * rs + j * cs`.
///
/// # Safety
/// As [`matmul`].
unsafe fn portable(d: Dims, y: Dst, a: Src, b: *const f32, (rs, cs): (usize, usize), pre: Option<Pre>) {
    assert!(pre.is_none(), "fused BN-ReLU needs the AVX2 kernels");
    assert!(y.add.is_none_or(|s| s.ptr == y.ptr && s.ld == y.ld), "sums added from elsewhere");
    gemm::gemm(
        d.m,
        d.n,
        d.k,
        y.ptr,
        1,
        y.ld as isize,
        y.add.is_some(),
        a.ptr,
        1,
        a.ld as isize,
        b,
        cs as isize,
        rs as isize,
        1.0f32,
        1.0f32,
        false,
        false,
        false,
        gemm::Parallelism::None,
    )
}

/// `y[m x ho*wo] = a[m x k] * x` for the implicit im2col `x` (k rows) of an `out` = (ho, wo)
/// output.
///
/// # Safety
/// [`simd`] is true; the padded image covers every tap of every output pixel.
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn conv_direct<Y: Elem>(
    m: usize,
    k: usize,
    a: *const f32,
    x: Shifted,
    out: (usize, usize),
    y: Dst<Y>,
) {
    avx2::direct(m, k, a, x, out, y)
}

/// `dw[m x n] (+)= gy[m x ho*wo] * x^T` for the implicit im2col `x` (n rows) of an `out` =
/// (ho, wo) output; `pack` is scratch of [`nt_pack_len`]`(ho, wo)` floats.
///
/// # Safety
/// As [`conv_direct`].
#[cfg(target_arch = "x86_64")]
pub(super) unsafe fn conv_direct_filter<A: Elem>(
    (m, n): (usize, usize),
    gy: Src<A>,
    x: Shifted,
    (ho, wo): (usize, usize),
    dw: Dst,
    pack: *mut f32,
) {
    let walk = avx2::Walk { rows: ho, cols: wo, lda: wo, ldb: x.ld };
    avx2::nt((m, n), dw, gy, walk, |j| x.row(j), pack, None)
}

/// Floats of the scratch [`matmul_nt`] and [`conv_direct_filter`] need for products over
/// `rows` runs of `cols` pixels.
pub(super) fn nt_pack_len(rows: usize, cols: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return avx2::pack_len(avx2::Walk { rows, cols, lda: 0, ldb: 0 });
    #[cfg(not(target_arch = "x86_64"))]
    0
}

/// Floats of the partial sums [`matmul`] keeps for a 16-bit product of `m` rows.
pub(super) fn sums_len(m: usize) -> usize {
    #[cfg(target_arch = "x86_64")]
    return m * avx2::SUMS_LD;
    #[cfg(not(target_arch = "x86_64"))]
    0
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::{Dims, Dst, Pre, Shifted, Src};
    use crate::elem::Elem;
    use std::arch::x86_64::*;

    /// `relu(v * scale[row] + shift[row])` rounded to `X` when `pre` is set.
    #[target_feature(enable = "avx2,fma,f16c")]
    #[inline]
    unsafe fn transform<X: Elem>(v: __m256, pre: Option<Pre>, row: usize) -> __m256 {
        match pre {
            None => v,
            Some(p) => {
                let (sc, sh) = (_mm256_broadcast_ss(&*p.scale.add(row)), _mm256_broadcast_ss(&*p.shift.add(row)));
                X::round8(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(v, sc), sh), _mm256_setzero_ps()))
            }
        }
    }

    /// Rows of A per register block (6 x 16 outputs in 12 registers).
    const MR: usize = 6;
    /// Depth of one packed panel of B.
    const KC: usize = 128;
    /// Panels of B packed together (GROUP x KC x 16 floats: 32 KB on the stack).
    const GROUP: usize = 4;
    /// Floats between rows of [`matmul`]'s partial sums: the columns of GROUP panels.
    pub(super) const SUMS_LD: usize = 16 * GROUP;
    /// B rows per block of dot products (3 x 3 accumulators + 3 + 3 operands fit the 16
    /// vector registers without spilling).
    const NB: usize = 3;

    /// Lane masks selecting the first `cols` (0..=16) of 16 columns.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn masks(cols: usize) -> (__m256i, __m256i) {
        let n = _mm256_set1_epi32(cols as i32);
        let lo = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        let hi = _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15);
        (_mm256_cmpgt_epi32(n, lo), _mm256_cmpgt_epi32(n, hi))
    }

    /// Where an R x 16 block reads its B rows: a packed 16-wide panel, or shifted image rows.
    #[derive(Clone, Copy)]
    enum Rows<'a> {
        Panel(*const f32),
        Shifted(Shifted<'a>),
    }

    /// Accumulates an R x 16 block over k rows of B (the first `cols` columns when MASKED),
    /// then adds `y.add` and stores it into y, rounded.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn block<const R: usize, const MASKED: bool, Y: Elem>(k: usize, a: Src, b: Rows, y: Dst<Y>, cols: usize) {
        let (m0, m1) = masks(cols);
        let (a, lda) = (a.ptr, a.ld);
        let mut c = [[_mm256_setzero_ps(); 2]; R];
        // A macro, not a closure: closures do not inherit `target_feature`.
        macro_rules! step {
            ($kk:expr, $b0:expr, $b1:expr) => {{
                let (kk, b0, b1) = ($kk, $b0, $b1);
                for (r, cr) in c.iter_mut().enumerate() {
                    let av = _mm256_broadcast_ss(&*a.add(r * lda + kk));
                    cr[0] = _mm256_fmadd_ps(av, b0, cr[0]);
                    cr[1] = _mm256_fmadd_ps(av, b1, cr[1]);
                }
            }};
        }
        match b {
            Rows::Panel(p) => {
                for kk in 0..k {
                    let row = p.add(kk * 16);
                    step!(kk, _mm256_loadu_ps(row), _mm256_loadu_ps(row.add(8)));
                }
            }
            Rows::Shifted(x) => {
                let k2 = x.offs.len();
                for ci in 0..k / k2 {
                    let base = x.base.add(ci * x.plane);
                    for (r, &o) in x.offs.iter().enumerate() {
                        let row = base.add(o);
                        let (b0, b1) = if MASKED {
                            (_mm256_maskload_ps(row, m0), _mm256_maskload_ps(row.add(x.hi), m1))
                        } else {
                            (_mm256_loadu_ps(row), _mm256_loadu_ps(row.add(x.hi)))
                        };
                        step!(ci * k2 + r, b0, b1);
                    }
                }
            }
        }
        let (n0, n1) = (cols.min(8), cols.saturating_sub(8));
        for (r, cr) in c.iter().enumerate() {
            let out = y.at(r, 0);
            let (mut v0, mut v1) = (cr[0], cr[1]);
            if let Some(s) = out.add {
                let (s0, s1) = if MASKED {
                    (_mm256_maskload_ps(s.ptr, m0), _mm256_maskload_ps(s.ptr.add(8), m1))
                } else {
                    (_mm256_loadu_ps(s.ptr), _mm256_loadu_ps(s.ptr.add(8)))
                };
                v0 = _mm256_add_ps(v0, s0);
                v1 = _mm256_add_ps(v1, s1);
            }
            if MASKED {
                Y::store_part(out.ptr, m0, n0, v0);
                Y::store_part(out.ptr.add(8), m1, n1, v1);
            } else {
                Y::store8(out.ptr, v0);
                Y::store8(out.ptr.add(8), v1);
            }
        }
    }

    /// Every 6-row block of A (m rows, depth k) against one 16-column tile of B.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn tile<Y: Elem>(m: usize, k: usize, a: Src, b: Rows, y: Dst<Y>, cols: usize) {
        let mut i = 0;
        while i < m {
            let (ap, yp) = (Src { ptr: a.ptr.add(i * a.ld), ..a }, y.at(i, 0));
            macro_rules! run {
                ($r:literal) => {
                    if cols == 16 {
                        block::<$r, false, Y>(k, ap, b, yp, cols)
                    } else {
                        block::<$r, true, Y>(k, ap, b, yp, cols)
                    }
                };
            }
            match m - i {
                1 => run!(1),
                2 => run!(2),
                3 => run!(3),
                4 => run!(4),
                5 => run!(5),
                _ => run!(6),
            }
            i += MR;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn matmul<X: Elem, Y: Elem>(
        d: Dims,
        y: Dst<Y>,
        a: *const f32,
        b: Src<X>,
        pre: Option<Pre>,
        sums: *mut f32,
    ) {
        let Dims { m, n: p, k } = d;
        // B is consumed in panels of KC rows x 16 columns, copied into a contiguous buffer
        // first (widened, `pre` applied): rows of B are whole image planes apart (often a
        // multiple of 4 KB), which would alias in L1 and miss on every row if read in place.
        // GROUP panels side by side are packed from one pass over the rows (fewer pages touched
        // per byte). Each group of columns runs through the whole depth before the next, so a
        // 16-bit Y keeps its partial sums over the panels in f32 for one group only (`sums`,
        // SUMS_LD floats a row) and is rounded once, after the last panel.
        let mut panels = [0.0f32; GROUP * KC * 16];
        let mut j0 = 0;
        while j0 < p {
            let tiles = (p - j0).div_ceil(16).min(GROUP);
            let mut k0 = 0;
            while k0 < k {
                let kc = (k - k0).min(KC);
                for kk in 0..kc {
                    let row = b.ptr.add((k0 + kk) * b.ld);
                    for t in 0..tiles {
                        let (j, cols) = (j0 + 16 * t, (p - j0 - 16 * t).min(16));
                        let (src, dst) = (row.add(j), panels.as_mut_ptr().add((t * KC + kk) * 16));
                        let (v0, v1) = if cols == 16 {
                            (X::load8(src), X::load8(src.add(8)))
                        } else {
                            let (m0, m1) = masks(cols);
                            (X::load_part(src, m0, cols.min(8)), X::load_part(src.add(8), m1, cols.saturating_sub(8)))
                        };
                        _mm256_storeu_ps(dst, transform::<X>(v0, pre, k0 + kk));
                        _mm256_storeu_ps(dst.add(8), transform::<X>(v1, pre, k0 + kk));
                    }
                }
                let (a, more) = (Src { ptr: a.add(k0), ld: k }, k0 > 0);
                for t in 0..tiles {
                    let (j, cols) = (j0 + 16 * t, (p - j0 - 16 * t).min(16));
                    let rows = Rows::Panel(panels.as_ptr().add(t * KC * 16));
                    let part = sums.wrapping_add(16 * t);
                    if Y::F32 {
                        tile(m, kc, a, rows, Dst::f32(y.ptr.cast::<f32>().add(j), y.ld, more), cols);
                    } else if k0 + kc == k {
                        let add = more.then_some(Src { ptr: part, ld: SUMS_LD });
                        tile(m, kc, a, rows, Dst { add, ..y.at(0, j) }, cols);
                    } else {
                        tile(m, kc, a, rows, Dst::f32(part, SUMS_LD, more), cols);
                    }
                }
                k0 += KC;
            }
            j0 += 16 * GROUP;
        }
    }

    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn direct<Y: Elem>(
        m: usize,
        k: usize,
        a: *const f32,
        x: Shifted,
        (ho, wo): (usize, usize),
        y: Dst<Y>,
    ) {
        let a = Src { ptr: a, ld: k };
        if wo == 8 {
            // Two image rows per 16-pixel run (the output rows are contiguous).
            for oy in (0..ho).step_by(2) {
                let rows = Rows::Shifted(Shifted { base: x.base.add(oy * x.ld), hi: x.ld, ..x });
                tile(m, k, a, rows, y.at(0, oy * wo), if oy + 1 < ho { 16 } else { 8 });
            }
            return;
        }
        for oy in 0..ho {
            let mut ox = 0;
            while ox < wo {
                let cols = (wo - ox).min(16);
                let rows = Rows::Shifted(Shifted { base: x.base.add(oy * x.ld + ox), hi: 8, ..x });
                tile(m, k, a, rows, y.at(0, oy * wo + ox), cols);
                ox += 16;
            }
        }
    }

    /// The pixels a dot product runs over: `rows` runs of `cols` pixels, consecutive runs
    /// `lda` (in A) and `ldb` (in B) elements apart.
    #[derive(Clone, Copy)]
    pub(super) struct Walk {
        pub rows: usize,
        pub cols: usize,
        pub lda: usize,
        pub ldb: usize,
    }

    /// `y[m x n] (+)= a[m rows] . b[n rows]` over the pixels of `walk`; A row i starts at
    /// `a.ptr + i * a.ld`, B row j at `brow(j)`. Blocks of 3 x 3 dot products keep 9
    /// accumulators in registers. Each group of three B rows is first interleaved into `pack`
    /// ([`pack_len`] floats), widened and `pre` applied: rows of B are whole planes apart and
    /// would alias in L1 with each other and with A; packed, they stay in L1 while every block
    /// of A streams past (widened as it is loaded).
    #[target_feature(enable = "avx2,fma,f16c")]
    pub(super) unsafe fn nt<A: Elem, X: Elem>(
        (m, n): (usize, usize),
        y: Dst,
        a: Src<A>,
        walk: Walk,
        brow: impl Fn(usize) -> *const X,
        pack: *mut f32,
        pre: Option<Pre>,
    ) {
        let tail = walk.cols % 8;
        let mask = masks(tail).0;
        let mut j = 0;
        while j < n {
            let c = (n - j).min(NB);
            let b: [*const X; NB] = std::array::from_fn(|q| brow(j + q.min(c - 1)));
            let mut dst = pack;
            for row in 0..walk.rows {
                let bo = row * walk.ldb;
                let mut t = 0;
                while t + 8 <= walk.cols {
                    for (q, bq) in b.iter().enumerate() {
                        let v = transform::<X>(X::load8(bq.add(bo + t)), pre, j + q.min(c - 1));
                        _mm256_storeu_ps(dst.add(8 * q), v);
                    }
                    dst = dst.add(8 * NB);
                    t += 8;
                }
                if tail > 0 {
                    for (q, bq) in b.iter().enumerate() {
                        let v = transform::<X>(X::load_part(bq.add(bo + t), mask, tail), pre, j + q.min(c - 1));
                        _mm256_storeu_ps(dst.add(8 * q), v);
                    }
                    dst = dst.add(8 * NB);
                }
            }
            let mut i = 0;
            while i < m {
                let r = (m - i).min(3);
                let ar: [*const A; 3] = std::array::from_fn(|q| a.ptr.add((i + q.min(r - 1)) * a.ld));
                let sums = dots(ar, pack, walk);
                for (q, row) in sums.iter().enumerate().take(r) {
                    for (s, &v) in row.iter().enumerate().take(c) {
                        let out = y.at(i + q, j + s);
                        *out.ptr = out.add.map_or(v, |d| *d.ptr + v);
                    }
                }
                i += 3;
            }
            j += NB;
        }
    }

    /// Floats of the packed B rows [`nt`] needs for `walk`.
    pub(super) fn pack_len(walk: Walk) -> usize {
        8 * NB * walk.rows * walk.cols.div_ceil(8)
    }

    /// Horizontal sum of 8 lanes.
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps(s, s, 1)))
    }

    /// The 3 x 3 dot products of three A rows (widened from `A`) with three packed B rows over
    /// `walk`. (No closures in kernels: closures do not inherit `target_feature` and would not
    /// be inlined.)
    #[target_feature(enable = "avx2,fma,f16c")]
    unsafe fn dots<A: Elem>(a: [*const A; 3], b: *const f32, walk: Walk) -> [[f32; NB]; 3] {
        let mut s = [[_mm256_setzero_ps(); NB]; 3];
        let tail = walk.cols % 8;
        let mask = masks(tail).0;
        let mut bp = b;
        macro_rules! step {
            ($ao:expr, $masked:literal) => {{
                let bv = [_mm256_loadu_ps(bp), _mm256_loadu_ps(bp.add(8)), _mm256_loadu_ps(bp.add(16))];
                for (si, ai) in s.iter_mut().zip(a) {
                    let p = ai.add($ao);
                    let av = if $masked { A::load_part(p, mask, tail) } else { A::load8(p) };
                    for (sij, &bj) in si.iter_mut().zip(&bv) {
                        *sij = _mm256_fmadd_ps(av, bj, *sij);
                    }
                }
                bp = bp.add(8 * NB);
            }};
        }
        for row in 0..walk.rows {
            let ao = row * walk.lda;
            let mut t = 0;
            while t + 8 <= walk.cols {
                step!(ao + t, false);
                t += 8;
            }
            if tail > 0 {
                step!(ao + t, true);
            }
        }
        let mut out = [[0.0; NB]; 3];
        for (o, si) in out.iter_mut().zip(&s) {
            for (v, &sij) in o.iter_mut().zip(si) {
                *v = hsum(sij);
            }
        }
        out
    }
}

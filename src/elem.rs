//! The element types a tensor is stored in (docs/precision.md): f32, bf16 and f16. Kernels load
//! elements widened to f32 (exactly) and store results rounded once to the nearest, ties to
//! even (a NaN stays a quiet NaN), 8 lanes at a time with AVX2 (bf16 by shifts, f16 with F16C)
//! or one at a time through the `half` crate, bit for bit the same. Below `backend` and
//! `input`, which both store elements.

use half::{bf16, f16};

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::*;

/// An element type of the arena's tensors.
pub trait Elem: bytemuck::Pod + Send + Sync + 'static {
    /// Whether this is f32 (a pointer to it may be cast to one to f32).
    const F32: bool = false;

    /// The value, widened to f32 (exact).
    fn get(self) -> f32;

    /// `v` rounded to this type.
    fn put(v: f32) -> Self;

    /// The elements as f32, when they are (the kernels then read the arena in place).
    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        let _ = s;
        None
    }

    /// The elements as f32 to write, when they are.
    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        let _ = s;
        None
    }

    /// Loads 8 elements at `p`, widened.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` points at 8 readable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;

    /// Stores the 8 lanes of `v` at `p`, each rounded as [`Elem::put`] rounds it.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` points at 8 writable elements.
    #[cfg(target_arch = "x86_64")]
    unsafe fn store8(p: *mut Self, v: __m256);

    /// Loads the first `n` (at most 8) elements at `p`, widened, the other lanes zero; `mask`
    /// selects the same lanes (f32 loads through it).
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` points at `n` readable elements.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_part(p: *const Self, mask: __m256i, n: usize) -> __m256 {
        let _ = mask;
        let mut lanes = [Self::put(0.0); 8];
        std::ptr::copy_nonoverlapping(p, lanes.as_mut_ptr(), n);
        Self::load8(lanes.as_ptr())
    }

    /// Stores the first `n` (at most 8) lanes of `v` at `p`, rounded; `mask` selects the same
    /// lanes (f32 stores through it).
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C; `p` points at `n` writable elements.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store_part(p: *mut Self, mask: __m256i, n: usize, v: __m256) {
        let _ = mask;
        let mut lanes = [Self::put(0.0); 8];
        Self::store8(lanes.as_mut_ptr(), v);
        std::ptr::copy_nonoverlapping(lanes.as_ptr(), p, n);
    }

    /// The lanes of `v` rounded to this type and widened back: the values a store and a load
    /// would give.
    ///
    /// # Safety
    /// The CPU has AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn round8(v: __m256) -> __m256 {
        let mut lanes = [Self::put(0.0); 8];
        Self::store8(lanes.as_mut_ptr(), v);
        Self::load8(lanes.as_ptr())
    }
}

impl Elem for f32 {
    const F32: bool = true;

    #[inline]
    fn get(self) -> f32 {
        self
    }

    #[inline]
    fn put(v: f32) -> Self {
        v
    }

    fn as_f32(s: &[Self]) -> Option<&[f32]> {
        Some(s)
    }

    fn as_f32_mut(s: &mut [Self]) -> Option<&mut [f32]> {
        Some(s)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store8(p: *mut Self, v: __m256) {
        _mm256_storeu_ps(p, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load_part(p: *const Self, mask: __m256i, _: usize) -> __m256 {
        _mm256_maskload_ps(p, mask)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store_part(p: *mut Self, mask: __m256i, _: usize, v: __m256) {
        _mm256_maskstore_ps(p, mask, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn round8(v: __m256) -> __m256 {
        v
    }
}

impl Elem for bf16 {
    #[inline]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    fn put(v: f32) -> Self {
        bf16::from_f32(v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        // bf16 is the top half of an f32: each lane's two bytes moved to the top of a 32-bit
        // lane by one byte shuffle of the 8 elements loaded into both 128-bit halves (bytes
        // from index -1 are zero).
        let both = _mm256_broadcastsi128_si256(_mm_loadu_si128(p.cast()));
        let at = _mm256_setr_epi8(
            -1, -1, 0, 1, -1, -1, 2, 3, -1, -1, 4, 5, -1, -1, 6, 7, -1, -1, 8, 9, -1, -1, 10, 11, -1, -1, 12, 13, -1,
            -1, 14, 15,
        );
        _mm256_castsi256_ps(_mm256_shuffle_epi8(both, at))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store8(p: *mut Self, v: __m256) {
        let bits = _mm256_castps_si256(v);
        // Round to nearest even: add 0x7fff plus the lowest kept bit, keep the top half
        // (carries into the exponent round up to the next binade, or to infinity).
        let odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        let rounded = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd), 16);
        // A NaN keeps its sign and top payload bits and becomes quiet.
        let quiet = _mm256_or_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(0x40));
        let nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        let halves = _mm256_blendv_epi8(rounded, quiet, nan);
        // 8 x 32 bits (each below 2^16) to 8 x 16: packed within each 128-bit lane, then the
        // two lanes' low quadwords joined.
        let packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(halves, halves), 0b00_00_10_00);
        _mm_storeu_si128(p.cast(), _mm256_castsi256_si128(packed));
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn round8(v: __m256) -> __m256 {
        // As `store8` rounds, kept in the top half of each lane (no trip through memory).
        let (bits, top) = (_mm256_castps_si256(v), _mm256_set1_epi32(-0x1_0000));
        let odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
        let rounded = _mm256_add_epi32(_mm256_add_epi32(bits, _mm256_set1_epi32(0x7fff)), odd);
        let quiet = _mm256_or_si256(bits, _mm256_set1_epi32(0x40_0000));
        let nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        _mm256_castsi256_ps(_mm256_and_si256(_mm256_blendv_epi8(rounded, quiet, nan), top))
    }
}

impl Elem for f16 {
    #[inline]
    fn get(self) -> f32 {
        self.to_f32()
    }

    #[inline]
    fn put(v: f32) -> Self {
        f16::from_f32(v)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_cvtph_ps(_mm_loadu_si128(p.cast()))
    }

    #[cfg(target_arch = "x86_64")]
    #[inline]
    #[target_feature(enable = "avx2,f16c")]
    unsafe fn store8(p: *mut Self, v: __m256) {
        _mm_storeu_si128(p.cast(), _mm256_cvtps_ph::<_MM_FROUND_TO_NEAREST_INT>(v))
    }
}

/// Calls the generic function `$f::<T>($args)` with `T` the element type of `$dtype` (f32,
/// bf16 or f16).
macro_rules! by_dtype {
    ($dtype:expr, $($f:ident)::+($($args:expr),*)) => {
        match $dtype {
            $crate::backend::DType::F32 => $($f)::+::<f32>($($args),*),
            $crate::backend::DType::BF16 => $($f)::+::<half::bf16>($($args),*),
            $crate::backend::DType::F16 => $($f)::+::<half::f16>($($args),*),
        }
    };
}
pub(crate) use by_dtype;

#[cfg(test)]
/// f32 values that round every way: ties to even up and down, values just off a tie, the
/// largest finite values and past them, subnormals of each type, zeros, infinities, NaNs
/// with payloads, and random bit patterns.
pub(crate) fn awkward() -> Vec<f32> {
    let mut bits: Vec<u32> = vec![
        0,
        0x8000_0000,
        0x7f80_0000,
        0xff80_0000,
        0x7fc0_0000,
        0xffc0_0001,
        0x7f80_0001,
        0x7fbf_ffff,
        1,
        0x8000_0001,
        0x0080_0000,
        0x007f_ffff,
        0x7f7f_ffff,
        0xff7f_ffff,
        0x7f7f_8000,
        0x7f7f_7fff,
        0x477f_e000,
        0x477f_f000,
        0x477f_efff,
        0x3380_0000,
        0x3300_0000,
        0x3380_0001,
        0x387f_c000,
        0x3f80_8000,
        0x3f81_8000,
        0x3f80_8001,
        0x3f80_7fff,
        0xbf80_8000,
        0xbf81_8000,
        0x3f80_1000,
        0x3f80_3000,
        0x3f80_2fff,
        0x3300_0001,
        0xb300_0001,
        0x3400_0000,
        0x387f_f000,
        0x3880_0000,
    ];
    let mut s = 0x9e37_79b9u32;
    for _ in 0..200_000 {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        bits.push(s);
    }
    bits.into_iter().map(f32::from_bits).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The AVX2 path loads, stores and rounds what the portable one does, bit for bit (any NaN
    /// for a NaN), for every 16-bit pattern and for [`awkward`] values; partial loads and
    /// stores touch their `n` lanes only.
    #[cfg(target_arch = "x86_64")]
    fn lanes_match_scalar<T: Elem + PartialEq + std::fmt::Debug>(from_bits: fn(u16) -> T) {
        if !(is_x86_feature_detected!("avx2") && is_x86_feature_detected!("f16c")) {
            return;
        }
        let all: Vec<T> = (0..=u16::MAX).map(from_bits).collect();
        for chunk in all.chunks_exact(8) {
            let mut out = [0.0f32; 8];
            // SAFETY: the CPU has AVX2 and F16C; 8 elements each side.
            unsafe { _mm256_storeu_ps(out.as_mut_ptr(), T::load8(chunk.as_ptr())) };
            for (o, &v) in out.iter().zip(chunk) {
                assert!(o.to_bits() == v.get().to_bits() || (o.is_nan() && v.get().is_nan()), "{v:?}: {o}");
            }
        }
        for chunk in awkward().chunks_exact(8) {
            let mut out = [T::put(0.0); 8];
            // SAFETY: as above.
            unsafe { T::store8(out.as_mut_ptr(), _mm256_loadu_ps(chunk.as_ptr())) };
            for (&o, &v) in out.iter().zip(chunk) {
                let want = T::put(v);
                assert!(o == want || (o.get().is_nan() && want.get().is_nan()), "{v:e} ({:#x}): {o:?}", v.to_bits());
            }
            let mut round = [0.0f32; 8];
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(round.as_mut_ptr(), T::round8(_mm256_loadu_ps(chunk.as_ptr()))) };
            for (&o, &v) in round.iter().zip(chunk) {
                let want = T::put(v).get();
                assert!(o.to_bits() == want.to_bits() || (o.is_nan() && want.is_nan()), "round8 {v:e}: {o:e}");
            }
        }
        let src: Vec<T> = (1..=8).map(|i| T::put(i as f32)).collect();
        for n in 0..=8 {
            let mask = std::array::from_fn::<i32, 8, _>(|i| if i < n { -1 } else { 0 });
            let mut lanes = [0.0f32; 8];
            let mut dst = [T::put(-1.0); 8];
            // SAFETY: as above; the mask selects the first n lanes.
            unsafe {
                let mask = _mm256_loadu_si256(mask.as_ptr().cast());
                let v = T::load_part(src.as_ptr(), mask, n);
                _mm256_storeu_ps(lanes.as_mut_ptr(), v);
                T::store_part(dst.as_mut_ptr(), mask, n, v);
            }
            for i in 0..8 {
                assert_eq!(lanes[i], if i < n { (i + 1) as f32 } else { 0.0 }, "load_part {n}");
                assert_eq!(dst[i].get(), if i < n { (i + 1) as f32 } else { -1.0 }, "store_part {n}");
            }
        }
    }

    /// f32 loads, stores and rounds through the same methods (the kernels are generic).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f32_lanes_match_scalar() {
        lanes_match_scalar(|b: u16| f32::from_bits(u32::from(b) << 16));
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn bf16_lanes_match_scalar() {
        lanes_match_scalar(bf16::from_bits);
    }

    #[cfg(target_arch = "x86_64")]
    #[test]
    fn f16_lanes_match_scalar() {
        lanes_match_scalar(f16::from_bits);
    }

    /// Rounding to nearest, ties to even, on the values [`awkward`] lists by hand.
    #[test]
    fn rounding_is_to_nearest_even() {
        let bf = |b: u32| bf16::put(f32::from_bits(b)).to_bits();
        // 1 + 2^-8 is halfway between 1 and 1 + 2^-7: even (1). 1 + 3 * 2^-8: even (1 + 2^-6).
        assert_eq!(
            (bf(0x3f80_8000), bf(0x3f81_8000), bf(0x3f80_8001), bf(0x3f80_7fff)),
            (0x3f80, 0x3f82, 0x3f81, 0x3f80)
        );
        // Past the largest finite bf16: infinity. NaN stays NaN, infinities stay.
        assert_eq!((bf(0x7f7f_8000), bf(0x7f7f_7fff), bf(0x7f80_0000)), (0x7f80, 0x7f7f, 0x7f80));
        assert!(bf16::from_bits(bf(0x7f80_0001)).is_nan());
        let h = |b: u32| f16::put(f32::from_bits(b)).to_bits();
        // 1 + 2^-11 ties to 1; 1 + 3 * 2^-11 to 1 + 2^-9; 65520 overflows to infinity.
        assert_eq!((h(0x3f80_1000), h(0x3f80_3000), h(0x3f80_2fff), h(0x477f_f000)), (0x3c00, 0x3c02, 0x3c01, 0x7c00));
        assert_eq!(h(0x477f_efff), 0x7bff);
        // 2^-25 ties to 0 (even); a bit above it rounds to the smallest subnormal.
        assert_eq!((h(0x3300_0000), h(0x3300_0001)), (0, 1));
    }
}

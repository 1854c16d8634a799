//! Counter-based random numbers: every value is a pure function of a key and an index, so the
//! same stream can be regenerated anywhere (dropout masks in backward, on any backend) without
//! storing it. The mixer is SplitMix64's finalizer applied to the key and the index.

/// Mixes 64 bits into 64 well-distributed bits (SplitMix64 finalizer).
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Derives a stream key from a parent key and a tag (seed -> step -> layer -> site).
#[inline]
pub fn derive(key: u64, tag: u64) -> u64 {
    mix64(key ^ mix64(tag.wrapping_add(0x9e37_79b9_7f4a_7c15)))
}

/// Uniform in [0, 1) with 24 bits of precision: element `index` of stream `key`.
#[inline]
pub fn uniform(key: u64, index: u64) -> f32 {
    (mix64(skip(key, index)) >> 40) as f32 * (1.0 / (1u64 << 24) as f32)
}

/// Stream `key` from element `by` on: `uniform(skip(key, by), i) == uniform(key, by + i)`, so a
/// part of a tensor draws the values the whole would (dropout on a chunk of images).
#[inline]
pub fn skip(key: u64, by: u64) -> u64 {
    key.wrapping_add(by.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// Standard normal sample `index` of stream `key` (Box-Muller on two uniforms).
pub fn normal(key: u64, index: u64) -> f64 {
    let u1 = (uniform(key, 2 * index) as f64 + 0.5 / (1u64 << 24) as f64).min(1.0);
    let u2 = uniform(key, 2 * index + 1) as f64;
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

/// A random batch of `n` images of `h` x `w` (3 channels, standard normal, as normalized images
/// are) and labels below `classes`, drawn from `seed` (benchmarks); `None` when it does not fit
/// in memory.
pub fn random_batch(seed: u64, n: usize, h: usize, w: usize, classes: usize) -> Option<(Vec<f32>, Vec<u32>)> {
    let len = n.checked_mul(crate::input::CHANNELS * h * w)?;
    let mut images = Vec::new();
    images.try_reserve_exact(len).ok()?;
    images.extend((0..len).map(|i| normal(seed, i as u64) as f32));
    let labels = (0..n).map(|i| (derive(seed, i as u64) % classes as u64) as u32).collect();
    Some((images, labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_moments_and_determinism() {
        let n = 200_000u64;
        let xs: Vec<f32> = (0..n).map(|i| uniform(42, i)).collect();
        let mean = xs.iter().map(|&x| x as f64).sum::<f64>() / n as f64;
        let var = xs.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n as f64;
        assert!((mean - 0.5).abs() < 0.005, "mean {mean}");
        assert!((var - 1.0 / 12.0).abs() < 0.002, "var {var}");
        assert!(xs.iter().all(|&x| (0.0..1.0).contains(&x)));
        assert_eq!(uniform(42, 7), xs[7]);
        assert_ne!(uniform(43, 7), xs[7]);
    }

    #[test]
    fn skip_continues_the_stream() {
        for (key, by) in [(42, 0), (42, 1000), (7, u64::MAX - 3), (u64::MAX, 1 << 40)] {
            for i in [0, 1, 17, 1 << 33] {
                assert_eq!(uniform(skip(key, by), i), uniform(key, by.wrapping_add(i)), "key {key} by {by} i {i}");
            }
        }
        assert_ne!(uniform(skip(42, 1), 0), uniform(42, 0));
    }

    #[test]
    fn normal_moments() {
        let n = 200_000u64;
        let xs: Vec<f64> = (0..n).map(|i| normal(derive(1, 2), i)).collect();
        let mean = xs.iter().sum::<f64>() / n as f64;
        let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.02, "var {var}");
    }
}

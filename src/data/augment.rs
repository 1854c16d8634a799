//! From stored bytes to network input: per-dataset normalization and the standard CIFAR
//! augmentation (zero padding of 4, a random 32x32 crop, a random horizontal flip), as
//! torchvision's `Pad(4)`, `RandomCrop(32)`, `RandomHorizontalFlip()`, `ToTensor()`,
//! `Normalize(mean, std)` on the image: padded pixels are 0 before normalization.
//!
//! The crop and flip of an image are a pure function of (seed, epoch, image index), drawn from
//! the counter-based [`crate::rng`], so they are the same in any order and on any thread.

use super::cifar::{Dataset, IMAGE_BYTES, SIDE};
use crate::rng;

/// Zero padding on each side before the random crop.
pub const PAD: usize = 4;

/// Stream tag of the augmentation draws.
const TAG: u64 = u64::from_be_bytes(*b"augment\0");

/// Per-channel normalization of 0..255 bytes: `(v / 255 - mean) / std`, as a lookup table.
#[derive(Clone, Debug, PartialEq)]
pub struct Normalize {
    table: [[f32; 256]; 3],
}

impl Normalize {
    /// The reference normalization of `dataset` (means and standard deviations of its
    /// training images, on the 0..255 scale divided by 255).
    pub fn of(dataset: Dataset) -> Normalize {
        let (mean, std) = match dataset {
            Dataset::Cifar10 => ([125.3, 123.0, 113.9], [63.0, 62.1, 66.7]),
            Dataset::Cifar100 => ([129.3, 124.1, 112.4], [68.2, 65.4, 70.4]),
        };
        Normalize::new(mean, std)
    }

    /// Normalization by `mean` and `std` given on the 0..255 scale. Computed in f32 from the
    /// f32 constants, as `ToTensor` then `Normalize` do.
    fn new(mean: [f64; 3], std: [f64; 3]) -> Normalize {
        let mut table = [[0.0; 256]; 3];
        for (c, row) in table.iter_mut().enumerate() {
            let (m, s) = ((mean[c] / 255.0) as f32, (std[c] / 255.0) as f32);
            for (v, x) in row.iter_mut().enumerate() {
                *x = (v as f32 / 255.0 - m) / s;
            }
        }
        Normalize { table }
    }

    /// The normalized value of byte `v` in channel `c`.
    pub fn value(&self, c: usize, v: u8) -> f32 {
        self.table[c][v as usize]
    }

    /// The whole table: entry `256 * c + v` is [`Normalize::value`]`(c, v)`.
    pub fn table(&self) -> &[f32] {
        self.table.as_flattened()
    }
}

/// Where the 32x32 window lies in the padded image, and whether it is mirrored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Crop {
    /// Top row of the window in the padded image, 0..=2*PAD (PAD: centered).
    pub top: usize,
    /// Left column of the window in the padded image, 0..=2*PAD.
    pub left: usize,
    /// Mirror the window left to right.
    pub flip: bool,
}

impl Crop {
    /// The identity: the image as stored.
    pub const NONE: Crop = Crop { top: PAD, left: PAD, flip: false };

    /// The random crop and flip of image `index` in `epoch` for `seed`.
    pub fn random(seed: u64, epoch: u64, index: usize) -> Crop {
        let key = rng::derive(rng::derive(rng::derive(seed, TAG), epoch), index as u64);
        let offset = |i| ((rng::uniform(key, i) * (2 * PAD + 1) as f32) as usize).min(2 * PAD);
        Crop { top: offset(0), left: offset(1), flip: rng::uniform(key, 2) < 0.5 }
    }

    /// Writes image `src` (bytes, R, G, B planes of 32x32) through this window, normalized,
    /// into `dst` (3 x 32 x 32 floats).
    pub fn apply(self, src: &[u8], norm: &Normalize, dst: &mut [f32]) {
        assert!(src.len() == IMAGE_BYTES && dst.len() == IMAGE_BYTES, "one 3x32x32 image");
        let plane = SIDE * SIDE;
        for (c, (src, dst)) in src.chunks_exact(plane).zip(dst.chunks_exact_mut(plane)).enumerate() {
            let zero = norm.value(c, 0);
            for (y, out) in dst.chunks_exact_mut(SIDE).enumerate() {
                // Row y of the window is padded row top + y, source row top + y - PAD.
                let Some(row) = (y + self.top).checked_sub(PAD).filter(|&r| r < SIDE) else {
                    out.fill(zero);
                    continue;
                };
                let row = &src[row * SIDE..(row + 1) * SIDE];
                for (x, o) in out.iter_mut().enumerate() {
                    let col = if self.flip { SIDE - 1 - x } else { x } + self.left;
                    *o = match col.checked_sub(PAD).filter(|&c| c < SIDE) {
                        Some(col) => norm.value(c, row[col]),
                        None => zero,
                    };
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An image whose byte at (c, y, x) is 64c + y + x: every pixel of a plane tells its place.
    fn gradient() -> Vec<u8> {
        (0..IMAGE_BYTES).map(|i| ((i / 1024) * 64 + (i / 32) % 32 + i % 32) as u8).collect()
    }

    fn at(img: &[f32], c: usize, y: usize, x: usize) -> f32 {
        img[c * 1024 + y * 32 + x]
    }

    #[test]
    fn normalization_matches_the_reference_formula() {
        let n = Normalize::of(Dataset::Cifar10);
        let expect = (200.0f32 / 255.0 - (123.0f64 / 255.0) as f32) / (62.1f64 / 255.0) as f32;
        assert_eq!(n.value(1, 200), expect);
        let n = Normalize::of(Dataset::Cifar100);
        assert_eq!(n.value(2, 0), -((112.4f64 / 255.0) as f32) / (70.4f64 / 255.0) as f32);
    }

    #[test]
    fn identity_crop_copies() {
        let (src, n) = (gradient(), Normalize::of(Dataset::Cifar100));
        let mut out = vec![0.0; IMAGE_BYTES];
        Crop::NONE.apply(&src, &n, &mut out);
        let expect: Vec<f32> = src.iter().enumerate().map(|(i, &v)| n.value(i / 1024, v)).collect();
        assert_eq!(out, expect);
    }

    #[test]
    fn crop_shifts_and_pads_with_normalized_zero() {
        let src = gradient();
        let n = Normalize::of(Dataset::Cifar10);
        let mut out = vec![0.0; IMAGE_BYTES];
        // Window at the top-left corner of the padded image: shifted down-right by 4.
        let crop = Crop { top: 0, left: 0, flip: false };
        crop.apply(&src, &n, &mut out);
        for c in 0..3 {
            assert_eq!(at(&out, c, 0, 10), n.value(c, 0), "padded row");
            assert_eq!(at(&out, c, 10, 3), n.value(c, 0), "padded column");
            assert_eq!(at(&out, c, 4, 4), n.value(c, src[c * 1024]));
            assert_eq!(at(&out, c, 31, 31), n.value(c, src[c * 1024 + 27 * 32 + 27]));
        }
        // Bottom-right corner: shifted up-left by 4.
        let crop = Crop { top: 8, left: 8, flip: false };
        crop.apply(&src, &n, &mut out);
        assert_eq!(at(&out, 2, 0, 0), n.value(2, src[2 * 1024 + 4 * 32 + 4]));
        assert_eq!(at(&out, 2, 28, 5), n.value(2, 0));
        assert_eq!(at(&out, 2, 5, 28), n.value(2, 0));
    }

    #[test]
    fn flip_mirrors_the_window() {
        let src = gradient();
        let n = Normalize::of(Dataset::Cifar10);
        let (mut plain, mut flipped) = (vec![0.0; IMAGE_BYTES], vec![0.0; IMAGE_BYTES]);
        let crop = Crop { top: 2, left: 7, flip: false };
        crop.apply(&src, &n, &mut plain);
        Crop { flip: true, ..crop }.apply(&src, &n, &mut flipped);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    assert_eq!(at(&flipped, c, y, x), at(&plain, c, y, 31 - x));
                }
            }
        }
        // Flipping the stored image itself mirrors its columns.
        Crop { flip: true, ..Crop::NONE }.apply(&src, &n, &mut flipped);
        assert_eq!(at(&flipped, 1, 3, 0), n.value(1, src[1024 + 3 * 32 + 31]));
    }

    #[test]
    fn draws_are_deterministic_and_cover_every_window() {
        assert_eq!(Crop::random(1, 2, 3), Crop::random(1, 2, 3));
        let draws: Vec<Crop> = (0..2000).map(|i| Crop::random(7, 0, i)).collect();
        assert_ne!(draws[..50], (0..50).map(|i| Crop::random(7, 1, i)).collect::<Vec<_>>()[..]);
        assert_ne!(draws[..50], (0..50).map(|i| Crop::random(8, 0, i)).collect::<Vec<_>>()[..]);
        for v in 0..=2 * PAD {
            assert!(draws.iter().any(|c| c.top == v) && draws.iter().any(|c| c.left == v), "{v}");
        }
        let flips = draws.iter().filter(|c| c.flip).count();
        assert!((900..1100).contains(&flips), "{flips} flips of 2000");
    }
}

//! From stored bytes to network input: per-dataset normalization and the standard CIFAR
//! augmentation (zero padding of 4, a random 32x32 crop, a random horizontal flip), as
//! torchvision's `Pad(4)`, `RandomCrop(32)`, `RandomHorizontalFlip()`, `ToTensor()`,
//! `Normalize(mean, std)` on the image: padded pixels are 0 before normalization.
//!
//! The window and the table themselves ([`Crop`], [`Normalize`]) are the input ops'
//! vocabulary in [`crate::input`]; here is what CIFAR uses. The crop and flip of an image are a
//! pure function of (seed, epoch, image index), drawn from
//! the counter-based [`crate::rng`], so they are the same in any order and on any thread.

use super::cifar::Dataset;
use crate::input::{Crop, Normalize, PAD};
use crate::rng;

/// Stream tag of the augmentation draws.
const TAG: u64 = u64::from_be_bytes(*b"augment\0");

/// The reference normalization of `dataset` (means and standard deviations of its training
/// images, on the 0..255 scale divided by 255).
pub fn normalization(dataset: Dataset) -> Normalize {
    let (mean, std) = match dataset {
        Dataset::Cifar10 => ([125.3, 123.0, 113.9], [63.0, 62.1, 66.7]),
        Dataset::Cifar100 => ([129.3, 124.1, 112.4], [68.2, 65.4, 70.4]),
    };
    Normalize::new(mean, std)
}

/// The random crop and flip of image `index` in `epoch` for `seed`.
pub fn random_crop(seed: u64, epoch: u64, index: usize) -> Crop {
    let key = rng::derive(rng::derive(rng::derive(seed, TAG), epoch), index as u64);
    let offset = |i| ((rng::uniform(key, i) * (2 * PAD + 1) as f32) as usize).min(2 * PAD);
    Crop { top: offset(0), left: offset(1), flip: rng::uniform(key, 2) < 0.5 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalization_matches_the_reference_formula() {
        let n = normalization(Dataset::Cifar10);
        let expect = (200.0f32 / 255.0 - (123.0f64 / 255.0) as f32) / (62.1f64 / 255.0) as f32;
        assert_eq!(n.value(1, 200), expect);
        let n = normalization(Dataset::Cifar100);
        assert_eq!(n.value(2, 0), -((112.4f64 / 255.0) as f32) / (70.4f64 / 255.0) as f32);
    }

    #[test]
    fn draws_are_deterministic_and_cover_every_window() {
        assert_eq!(random_crop(1, 2, 3), random_crop(1, 2, 3));
        let draws: Vec<Crop> = (0..2000).map(|i| random_crop(7, 0, i)).collect();
        assert_ne!(draws[..50], (0..50).map(|i| random_crop(7, 1, i)).collect::<Vec<_>>()[..]);
        assert_ne!(draws[..50], (0..50).map(|i| random_crop(8, 0, i)).collect::<Vec<_>>()[..]);
        for v in 0..=2 * PAD {
            assert!(draws.iter().any(|c| c.top == v) && draws.iter().any(|c| c.left == v), "{v}");
        }
        let flips = draws.iter().filter(|c| c.flip).count();
        assert!((900..1100).contains(&flips), "{flips} flips of 2000");
    }
}

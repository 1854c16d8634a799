//! CIFAR data: readers for the official binary archives ([`cifar`]), normalization and
//! augmentation ([`augment`]), and the prefetching batch loader ([`loader`]).

pub mod augment;
pub mod cifar;
pub mod loader;

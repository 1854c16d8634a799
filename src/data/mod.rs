//! CIFAR data: readers for the official binary archives ([`cifar`]), fetching them
//! ([`download`]), normalization and augmentation ([`augment`]), and the prefetching batch
//! loader ([`loader`]).

pub mod augment;
pub mod cifar;
pub mod download;
pub mod loader;

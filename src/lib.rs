//! `densenet`: a DenseNet training engine whose memory grows linearly with depth.
//!
//! The network ([`config::NetConfig`]) is trained by a hand-written forward and backward pass
//! ([`model::Model`]) written once against the [`backend::Backend`] trait. Every buffer a training
//! step touches is laid out by the planner ([`model::plan`]) in one arena before the first step;
//! the three memory modes ([`model::plan::Mode`]) decide which intermediate tensors are kept and
//! which are recomputed in backward.
#![deny(missing_docs)]

pub mod backend;
pub mod comm;
pub mod config;
pub mod data;
pub mod elem;
pub mod error;
pub mod input;
pub mod launch;
pub mod measure;
pub mod model;
pub mod named;
pub mod rng;
#[cfg(test)]
mod testing;
pub mod train;

pub use error::{Error, Result};

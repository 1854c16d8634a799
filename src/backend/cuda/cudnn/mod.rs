//! cuDNN convolutions of [`GpuExec`](super::GpuExec), through cudarc's `result`/`sys` layers
//! (the safe layer has no strided descriptors over raw addresses):
//!
//! - `load.rs`: the cuDNN (and cuBLASLt) the process loaded, checked before anything calls it;
//! - `descriptor.rs`: what cuDNN is told about one convolution geometry (one RAII wrapper for
//!   the tensor, filter and convolution descriptors);
//! - `calls.rs`: the cuDNN calls on those descriptors: cudnnFind, workspace sizes, the
//!   convolution;
//! - `convs.rs`: [`Convs`], the handle and the algorithm policy (rankings, the choice per
//!   geometry, the run's record).

mod calls;
mod convs;
mod descriptor;
mod load;

pub(super) use convs::Convs;
pub(super) use load::{pip_package, preflight, Loaded};

use cudarc::cudnn::result as cr;

use crate::Error;

/// A cuDNN error as `what failed: CUDNN_STATUS_...`.
fn cudnn_failed(what: &str, e: cr::CudnnError) -> Error {
    Error(format!("{what} failed: {:?}", e.0))
}

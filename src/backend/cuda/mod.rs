//! The CUDA backend: the same ops as the CPU backend, as launches of our kernels
//! (`kernels/*.cu`) and cuDNN convolutions, on one planned device arena. What executes them is
//! an [`Exec`]: a real GPU ([`GpuExec`]) or the host device ([`HostExec`]: the kernels on the
//! host execution layer, the convolutions on the CPU backend), so the backend's own code runs
//! in every `cargo test`.

mod algos;
mod backend;
mod cudnn;
mod gpu;
mod host_device;
mod host_layer;
mod launch;
pub mod ptx;
mod record;

pub use algos::AlgorithmFamily;
pub use backend::{CudaBackend, FUSED_CHUNK};
pub use gpu::GpuExec;
pub use host_device::HostExec;
pub use launch::{Arg, Exec, Launch};

/// The kernels as built by build.rs: source, PTX if nvcc was found, and names.
pub mod kernels {
    include!(concat!(env!("OUT_DIR"), "/kernels.rs"));
}

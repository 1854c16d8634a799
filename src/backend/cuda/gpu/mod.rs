//! The real GPU through cudarc (driver API, NVRTC, cuDNN), all loaded at run time: nothing CUDA
//! is needed to build or link, and a missing library is a one-line error, never a panic
//! (cudarc panics when a library it calls is absent, so [`GpuExec::new`] checks each first).
//!
//! One stream carries everything: our kernels, cuDNN's convolutions and the copies, so stream
//! order is program order and a captured graph holds all of it. The device holds one allocation,
//! the arena; convolution workspaces are carved from it (see `cudnn/`).
//!
//! Graphs: a step being recorded runs as it is issued (its first run is the warm-up: cuDNN's
//! lazy set-up happens outside any capture) while its ops are noted; `capture_end` then issues
//! them again under stream capture, which records without running. A step whose capture fails
//! is replayed by issuing its ops again (with a warning), so a step never runs twice or not at all.
//! A step one of whose ops failed while it was recorded is not stored at all: `capture_end`
//! returns an error, and the step is recorded afresh the next time it runs (the bookkeeping is
//! `record.rs`, shared with the host device).
//!
//! The kernels are the PTX nvcc built (`kernels::PTX`), or, without it, `kernels::SOURCE`
//! compiled by NVRTC for the device's architecture when the executor opens
//! (`DENSENET_FORCE_NVRTC=1` takes that path even when PTX was built, to test it).
//!
//! `open.rs` opens the device (driver, cuDNN and NVRTC checked first) and loads the kernels;
//! `exec.rs` is the [`Exec`](super::Exec) implementation: launches, convolutions, copies, the
//! arena, and recorded steps as CUDA graphs.

mod exec;
mod nccl;
mod open;

use std::collections::HashMap;
use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaFunction, CudaGraph, CudaStream, DriverError};

use super::cudnn;
use super::record::{Op, Steps};
use crate::Error;

/// A recorded step: its CUDA graph (`None`: the capture was empty), or, when the capture
/// failed, its ops to issue again.
pub(super) enum Step {
    /// The captured graph.
    Graph(Option<CudaGraph>),
    /// The ops, issued again one by one.
    Ops(Vec<Op>),
}

/// Runs the CUDA backend on a GPU.
pub struct GpuExec {
    // Fields drop in this order after `Drop::drop` synchronized and freed the arena: NCCL, the
    // steps (and their graphs), cuDNN, kernels (and with them the module), stream, context.
    /// The data-parallel job's communicator, once joined.
    nccl: Option<nccl::Nccl>,
    steps: Steps<Step>,
    /// Boxed: the cuDNN side is most of the executor's size.
    convs: Box<cudnn::Convs>,
    kernels: HashMap<&'static str, Kernel>,
    stream: Arc<CudaStream>,
    ctx: Arc<CudaContext>,
    /// Device pointer and length in bytes of the arena, once allocated.
    arena: Option<(u64, usize)>,
    /// Whether the stream is capturing (inside `capture_end`).
    capturing: bool,
    name: String,
    cc: (i32, i32),
    cudnn: cudnn::Loaded,
    /// The CUDA version the driver supports (`cuDriverGetVersion`: 13000 is 13.0).
    driver_version: i32,
    /// Where the kernels' PTX came from.
    kernels_from: KernelSource,
    /// [`GpuExec::driver_used_bytes`] right after the context was created, before the kernels,
    /// cuDNN and the arena: subtracted, so
    /// [`DeviceMemory::process`](crate::backend::DeviceMemory::process) leaves the context out.
    baseline_used: usize,
}

// SAFETY: the raw handles inside (cuDNN handle and descriptors, CUDA graphs) are only used
// through `&mut self` or after binding the context to the calling thread, never concurrently;
// cuDNN and the driver allow a handle to move between threads.
unsafe impl Send for GpuExec {}

/// Where the loaded kernels' PTX came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum KernelSource {
    /// nvcc, at build time (`kernels::PTX`).
    Nvcc,
    /// NVRTC, when the executor opened: no PTX was built, or `DENSENET_FORCE_NVRTC=1`.
    Nvrtc,
    /// NVRTC, because the driver refused nvcc's PTX as too new.
    NvrtcForOldDriver,
}

impl KernelSource {
    fn text(self) -> &'static str {
        match self {
            KernelSource::Nvcc => "nvcc at build time",
            KernelSource::Nvrtc => "NVRTC",
            KernelSource::NvrtcForOldDriver => "NVRTC (nvcc's PTX is newer than the driver)",
        }
    }
}

/// A loaded kernel and its parameter sizes in bytes (when the driver can tell them).
struct Kernel {
    func: CudaFunction,
    params: Option<Vec<usize>>,
}

/// A driver error as `what failed: CUDA_ERROR_...`.
fn driver_failed(what: &str, e: DriverError) -> Error {
    Error(format!("{what} failed: {}", errname(e)))
}

/// The driver's name for an error (`CUDA_ERROR_OUT_OF_MEMORY`).
fn errname(e: DriverError) -> String {
    e.error_name().map(|s| s.to_string_lossy().into_owned()).unwrap_or_else(|_| format!("{:?}", e.0))
}

//! The real GPU through cudarc. (In progress.)

/// Runs the CUDA backend on a GPU.
pub struct GpuExec;

//! Compiles the kernels to PTX with nvcc when one is found. Filled in by the CUDA work.

use std::path::{Path, PathBuf};

/// PTX for `cu`, written to `out`, or `None` without nvcc.
pub fn compile(_cu: &Path, _out: &Path) -> Option<PathBuf> {
    None
}

//! The cuDNN a process loaded, checked before anything calls it: cuDNN 9 with its convolution
//! sub-libraries, and the cuBLASLt its legacy convolution path loads at run time.

use std::sync::OnceLock;

use cudarc::cudnn::{result as cr, sys as cs};

use crate::backend::cuda::ptx;
use crate::{bail, Result};

/// cuDNN 9.0.0 as `cudnnGetVersion` counts it (`major * 10000 + minor * 100 + patch` from
/// cuDNN 9 on; cuDNN 8 counted `major * 1000 + minor * 100 + patch`).
const CUDNN_9: usize = 90000;
/// The first CUDA major version whose pip packages have no `-cuN` suffix (`nvidia-cublas`,
/// not `nvidia-cublas-cu13`).
const UNSUFFIXED_PIP_CUDA: usize = 13;

/// The cuDNN a process loaded: its version and the CUDA version it was built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Loaded {
    /// `major * 10000 + minor * 100 + patch` (`cudnnGetVersion`).
    pub version: usize,
    /// The CUDA runtime it was built for, as `1000 * major + 10 * minor`
    /// (`cudnnGetCudartVersion`); it decides which cuBLASLt and NVRTC go with it.
    pub cuda: usize,
    /// The cuBLASLt loaded with it, `major * 10000 + minor * 100 + patch`
    /// (`cublasLtGetVersion`; 0 if it does not say).
    pub cublaslt: usize,
}

impl Loaded {
    /// `9.13.0`.
    pub fn version_text(&self) -> String {
        dotted(self.version)
    }

    /// cuBLASLt's version, `13.0.1`.
    pub fn cublaslt_text(&self) -> String {
        dotted(self.cublaslt)
    }

    /// The major version of the CUDA libraries that go with this cuDNN (13 for CUDA 13.x).
    pub fn cuda_major(&self) -> usize {
        ptx::cuda_parts(self.cuda as u32).0 as usize
    }
}

/// Checks that cuDNN 9 can be loaded, with its convolution sub-library and the cuBLASLt its
/// legacy convolution path loads at run time (of the CUDA major version cuDNN was built for).
pub(crate) fn preflight() -> Result<Loaded> {
    // SAFETY: only tries to dlopen libcudnn; nothing in it is called, a missing one is `false`.
    if !unsafe { cs::is_culib_present() } {
        bail!(
            "cuDNN 9 not found (libcudnn.so.9): pip install nvidia-cudnn-cu13 and add its nvidia/cudnn/lib folder to \
             LD_LIBRARY_PATH, or use --device cpu"
        );
    }
    let v = cr::get_version();
    if v < CUDNN_9 {
        // cuDNN 8 counts its version as major * 1000 + minor * 100 + patch.
        let (major, minor, patch) = (v / 1000, v / 100 % 10, v % 100);
        bail!(
            "cuDNN {major}.{minor}.{patch} is older than 9: install cuDNN 9 (pip install nvidia-cudnn-cu13), or use \
             --device cpu"
        );
    }
    // SAFETY: cuDNN is loaded (checked above); the query takes no arguments and returns a number.
    let mut loaded = Loaded { version: v, cuda: unsafe { cs::cudnnGetCudartVersion() }, cublaslt: 0 };
    // SAFETY: argument-free queries of the loaded cuDNN; a sub-library that does not load is an
    // error status, checked below.
    let sub = unsafe { cs::cudnnOpsVersionCheck().result().and_then(|_| cs::cudnnCnnVersionCheck().result()) };
    if let Err(e) = sub {
        bail!(
            "cuDNN {}: the convolution sub-libraries (libcudnn_cnn.so.9, libcudnn_ops.so.9) did not load ({:?}): \
             reinstall cuDNN with all its libraries in one folder on LD_LIBRARY_PATH",
            loaded.version_text(),
            e.0
        );
    }
    let major = loaded.cuda_major();
    let cublaslt = format!("libcublasLt.so.{major}");
    // SAFETY: loads a library whose initialisers are sound (NVIDIA's cuBLASLt); cuDNN loads the
    // same one later, and the handle is kept for the life of the process.
    match unsafe { libloading::Library::new(&cublaslt) } {
        Ok(lib) => {
            // SAFETY: cuBLASLt's `size_t cublasLtGetVersion(void)`.
            let version = unsafe { lib.get::<unsafe extern "C" fn() -> usize>(b"cublasLtGetVersion\0") };
            // SAFETY: the symbol has that signature and the library stays loaded.
            loaded.cublaslt = version.map_or(0, |f| unsafe { f() });
            CUBLASLT.get_or_init(|| lib);
        }
        Err(e) => bail!(
            "{cublaslt} not found ({e}): cuDNN {} for CUDA {} loads it for its convolutions: pip install {} \
             and add the folder holding {cublaslt} to LD_LIBRARY_PATH, or use --device cpu",
            loaded.version_text(),
            ptx::cuda_text(loaded.cuda as u32),
            pip_package("nvidia-cublas", major),
        ),
    }
    Ok(loaded)
}

/// The pip package of NVIDIA library `name` for CUDA `major` (`nvidia-cublas-cu12`,
/// `nvidia-cublas` for CUDA 13 on).
pub(crate) fn pip_package(name: &str, major: usize) -> String {
    if major >= UNSUFFIXED_PIP_CUDA {
        name.to_string()
    } else {
        format!("{name}-cu{major}")
    }
}

/// `major.minor.patch` of a version counted as `major * 10000 + minor * 100 + patch`.
fn dotted(v: usize) -> String {
    format!("{}.{}.{}", v / 10000, v / 100 % 100, v % 100)
}

/// cuBLASLt, loaded by [`preflight`] and kept loaded.
static CUBLASLT: OnceLock<libloading::Library> = OnceLock::new();

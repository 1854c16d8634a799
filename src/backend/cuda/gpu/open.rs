//! Opening a GPU: the driver, the device, cuDNN with its cuBLASLt and (for kernels built
//! without nvcc) NVRTC are checked first, each failure a one-line error saying what to
//! install; then the kernels' module is loaded (NVRTC-compiled when nvcc's PTX is missing or
//! too new for the driver).

use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use cudarc::driver::{result as dr, sys as ds, CudaContext, CudaFunction, DriverError};
use cudarc::nvrtc;

use super::{driver_failed, errname, GpuExec, Kernel, KernelSource};
use crate::backend::cuda::algos::{self, AlgorithmFamily, Math};
use crate::backend::cuda::record::Steps;
use crate::backend::cuda::{cudnn, kernels, ptx};
use crate::{bail, Error, Result};

/// The first driver with `cuFuncGetParamInfo` (CUDA 12.4, as `cuDriverGetVersion` counts it),
/// through which launches' argument sizes are checked.
const PARAM_INFO_DRIVER: i32 = 12040;
/// More parameters than any kernel takes: the driver refuses the index after a kernel's last
/// one, which ends the count.
const MAX_PARAMS: usize = 256;
/// Lines of NVRTC's log an error quotes (its first errors).
const NVRTC_ERRORS: usize = 8;

impl GpuExec {
    /// Opens GPU `ordinal` with the convolution algorithms `DENSENET_CUDNN_ALGOS` allows (all
    /// deterministic ones unless it says `gemm`); see [`GpuExec::open`].
    pub fn new(ordinal: usize) -> Result<GpuExec> {
        Self::open(ordinal, AlgorithmFamily::from_env()?)
    }

    /// The GPUs the driver sees (those `CUDA_VISIBLE_DEVICES` shows); an error when there is
    /// no driver or it cannot start.
    pub fn count() -> Result<usize> {
        // SAFETY: only tries to dlopen libcuda; nothing in it is called, a missing one is `false`.
        if !unsafe { ds::is_culib_present() } {
            bail!("no CUDA driver (libcuda.so.1 not found): install the NVIDIA driver, or use --device cpu");
        }
        dr::init().map_err(|e| {
            Error(format!(
                "the CUDA driver failed to start ({}): is a GPU visible here? Or use --device cpu",
                errname(e)
            ))
        })?;
        let count =
            dr::device::get_count().map_err(|e| Error(format!("cannot count CUDA devices ({})", errname(e))))?;
        Ok(count.max(0) as usize)
    }

    /// Opens GPU `ordinal`, choosing among the convolution algorithms of `family`: checks the
    /// driver, the device, cuDNN with the cuBLASLt it loads and (when the kernels were built
    /// without nvcc, or `DENSENET_FORCE_NVRTC=1`) NVRTC, then loads the kernels. Every failure is
    /// a one-line error that says what is missing and how to provide it.
    pub fn open(ordinal: usize, family: AlgorithmFamily) -> Result<GpuExec> {
        let count = Self::count()?;
        if count == 0 {
            bail!("no CUDA GPU found (the driver sees none): use --device cpu");
        }
        if ordinal >= count {
            bail!("no CUDA device {ordinal}: the driver sees {count} (cuda:0 to cuda:{})", count - 1);
        }
        let cudnn = cudnn::preflight()?;
        let mut driver_version = 0;
        // SAFETY: the driver is initialized (`dr::init` above); the call writes one int, a live local.
        unsafe { ds::cuDriverGetVersion(&mut driver_version) }
            .result()
            .map_err(|e| driver_failed("cuDriverGetVersion", e))?;
        let ptx = kernels::PTX.filter(|_| !std::env::var("DENSENET_FORCE_NVRTC").is_ok_and(|v| v == "1"));
        if ptx.is_none() && !Self::nvrtc_available() {
            bail!(
                "{}, or rebuild with nvcc on PATH (the kernels were built without it)",
                nvrtc_missing(cudnn, driver_version)
            );
        }

        let ctx = CudaContext::new(ordinal).map_err(|e| driver_failed(&format!("opening CUDA device {ordinal}"), e))?;
        // SAFETY: cudarc's event tracking orders a CudaSlice's uses across streams; no CudaSlice is
        // ever created and all work is on one stream, ordered by hand, so nothing relies on it.
        unsafe { ctx.disable_event_tracking() };
        let baseline_used = ctx.mem_get_info().map(|(free, total)| total - free).unwrap_or(0);
        let stream = ctx.new_stream().map_err(|e| driver_failed("creating a CUDA stream", e))?;
        let cc = ctx.compute_capability().map_err(|e| driver_failed("reading the compute capability", e))?;
        let name = ctx.name().map_err(|e| driver_failed("reading the device name", e))?;

        let arch = (cc.0 * 10 + cc.1) as u32;
        let nvrtc_ptx = || Self::nvrtc_compile(nvrtc_arch(arch)?);
        let (ptx, mut kernels_from) = match ptx {
            Some(ptx) => (ptx.to_string(), KernelSource::Nvcc),
            None => (nvrtc_ptx()?, KernelSource::Nvrtc),
        };
        let module = match ctx.load_module(nvrtc::Ptx::from_src(ptx.clone())) {
            // nvcc's PTX is newer than this driver: this machine's NVRTC may be older.
            Err(e) if e.0 == ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION && kernels_from == KernelSource::Nvcc => {
                let first = module_error(e, cc, driver_version, kernels_from, &ptx);
                if !Self::nvrtc_available() {
                    bail!("{first}; {}", nvrtc_missing(cudnn, driver_version));
                }
                log::warn!("{first}; compiling the kernels with this machine's NVRTC instead");
                let ptx = nvrtc_ptx()?;
                kernels_from = KernelSource::NvrtcForOldDriver;
                ctx.load_module(nvrtc::Ptx::from_src(ptx.clone())).map_err(|e| {
                    Error(format!("{first}; and {}", module_error(e, cc, driver_version, KernelSource::Nvrtc, &ptx)))
                })?
            }
            r => r.map_err(|e| module_error(e, cc, driver_version, kernels_from, &ptx))?,
        };
        let mut loaded = HashMap::new();
        for &k in kernels::NAMES {
            let func = module.load_function(k).map_err(|e| {
                Error(format!("kernel {k} is not in the loaded module ({}): kernels must be extern \"C\"", errname(e)))
            })?;
            let params = (driver_version >= PARAM_INFO_DRIVER).then(|| param_sizes(&func)).filter(|p| !p.is_empty());
            loaded.insert(k, Kernel { func, params });
        }
        let header = algos::Header {
            gpu: name.clone(),
            cc,
            cudnn: (cudnn.version, cudnn.cuda),
            math: Math::for_gpu(cc),
            family,
        };
        let convs = Box::new(cudnn::Convs::new(&stream, ordinal, header)?);
        Ok(GpuExec {
            nccl: None,
            steps: Steps::new(),
            convs,
            kernels: loaded,
            stream,
            ctx,
            arena: None,
            capturing: false,
            name,
            cc,
            cudnn,
            driver_version,
            kernels_from,
            baseline_used,
        })
    }

    /// Whether the NVRTC library can be loaded (it is looked up as `libnvrtc.so.13` and the
    /// like through the dynamic loader, so `LD_LIBRARY_PATH` decides).
    pub fn nvrtc_available() -> bool {
        // SAFETY: only tries to dlopen libnvrtc; nothing in it is called, a missing one is `false`.
        unsafe { nvrtc::sys::is_culib_present() }
    }

    /// PTX of the kernels (`kernels::SOURCE`) for virtual architecture `compute_{arch}` (e.g.
    /// 90), compiled by NVRTC with the options the GPU path uses; cached per architecture.
    /// Needs only NVRTC, no driver or GPU.
    pub fn nvrtc_compile(arch: u32) -> Result<String> {
        static CACHE: OnceLock<Mutex<HashMap<u32, String>>> = OnceLock::new();
        let cache = CACHE.get_or_init(Default::default);
        if let Some(ptx) = cache.lock().unwrap_or_else(|p| p.into_inner()).get(&arch) {
            return Ok(ptx.clone());
        }
        if !Self::nvrtc_available() {
            bail!(
                "NVRTC not found (no libnvrtc.so.N the dynamic loader can find): add the folder holding it (pip's \
                 nvidia-cuda-nvrtc puts it in nvidia/cu13/lib) to LD_LIBRARY_PATH"
            );
        }
        let opts = nvrtc::CompileOptions {
            options: vec![format!("--gpu-architecture=compute_{arch}"), "-default-device".into(), "--std=c++17".into()],
            name: Some("kernels.cu".into()),
            ..Default::default()
        };
        let ptx = nvrtc::compile_ptx_with_opts(kernels::SOURCE, opts).map_err(|e| match e {
            nvrtc::CompileError::CompileError { nvrtc, log, .. } => {
                let log = log.to_string_lossy();
                let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).take(NVRTC_ERRORS).collect();
                Error(format!(
                    "NVRTC failed to compile the kernels for compute_{arch} ({nvrtc:?}): {}",
                    errors.join(" | ")
                ))
            }
            other => Error(format!("NVRTC failed for compute_{arch}: {other:?}")),
        })?;
        let ptx = ptx.to_src();
        cache.lock().unwrap_or_else(|p| p.into_inner()).insert(arch, ptx.clone());
        Ok(ptx)
    }
}

/// The newest architecture NVRTC supports that runs on a device of architecture `device`
/// (e.g. 90 for sm_90).
fn nvrtc_arch(device: u32) -> Result<u32> {
    let mut n = 0;
    // SAFETY: NVRTC is loaded (checked by the caller); the calls write `n` ints.
    let archs = unsafe {
        nvrtc::sys::nvrtcGetNumSupportedArchs(&mut n);
        let mut v = vec![0; n.max(0) as usize];
        nvrtc::sys::nvrtcGetSupportedArchs(v.as_mut_ptr());
        v
    };
    if archs.is_empty() {
        return Ok(device);
    }
    match archs.iter().map(|&a| a as u32).filter(|&a| a <= device).max() {
        Some(a) => Ok(a),
        None => bail!(
            "this NVRTC does not support sm_{device} (oldest it knows: sm_{}): use an older CUDA's NVRTC",
            archs[0]
        ),
    }
}

/// The parameter sizes of `f` in bytes, as the driver reports them (empty when it cannot).
fn param_sizes(f: &CudaFunction) -> Vec<usize> {
    let mut sizes = Vec::new();
    for i in 0..MAX_PARAMS {
        let (mut off, mut size) = (0, 0);
        // SAFETY: `f` is a loaded function; the call writes two integers or fails past the end.
        let r = unsafe { ds::cuFuncGetParamInfo(f.cu_function(), i, &mut off, &mut size) };
        if r != ds::CUresult::CUDA_SUCCESS {
            break;
        }
        sizes.push(size);
    }
    sizes
}

/// The module failed to load: say why in terms of what to change.
fn module_error(e: DriverError, cc: (i32, i32), driver: i32, source: KernelSource, ptx_text: &str) -> Error {
    let source = source.text();
    match e.0 {
        ds::CUresult::CUDA_ERROR_UNSUPPORTED_PTX_VERSION => {
            Error(too_new(ptx::isa(ptx_text), driver.max(0) as u32, source))
        }
        ds::CUresult::CUDA_ERROR_NO_BINARY_FOR_GPU | ds::CUresult::CUDA_ERROR_INVALID_PTX => Error(format!(
            "the kernels' PTX (from {source}) does not run on sm_{}{} ({}): rebuild with DENSENET_CUDA_ARCH unset or \
             set to sm_{}{}",
            cc.0,
            cc.1,
            errname(e),
            cc.0,
            cc.1
        )),
        _ => driver_failed("loading the kernels", e),
    }
}

/// Why PTX of ISA `isa` (from `source`) does not load on a driver for CUDA `driver`, and
/// exactly what to rebuild with.
fn too_new(isa: Option<(u32, u32)>, driver: ptx::CudaVersion, source: &str) -> String {
    let have = ptx::cuda_text(driver);
    let what = match isa {
        Some(v) => ptx::describe(v),
        None => "PTX without a .version directive".into(),
    };
    format!(
        "the CUDA driver (for CUDA {have}) is older than the kernels' PTX from {source} ({what}): update the NVIDIA \
         driver, or rebuild with the nvcc of CUDA {have} or older (NVCC=/path/to/nvcc cargo build --release), or put \
         an NVRTC of CUDA {have} or older on LD_LIBRARY_PATH"
    )
}

/// The error for a missing NVRTC: which library, of the CUDA major version cuDNN was built
/// for, and the pip package of a release no newer than the driver (`driver`, as
/// `cuDriverGetVersion` counts it), whose PTX the driver loads.
fn nvrtc_missing(cudnn: cudnn::Loaded, driver: i32) -> String {
    let major = cudnn.cuda_major();
    let name = cudnn::pip_package("nvidia-cuda-nvrtc", major);
    let (driver_major, driver_minor) = ptx::cuda_parts(driver.max(0) as u32);
    let pkg = match driver_major as usize {
        d if d == major => format!("'{name}=={major}.{driver_minor}.*'"),
        d if d < major => format!("'{name}=={major}.0.*'"),
        _ => name,
    };
    format!(
        "NVRTC not found (libnvrtc.so.{major}, for CUDA {major} like cuDNN): pip install {pkg} and add the folder \
         holding libnvrtc.so.{major} to LD_LIBRARY_PATH"
    )
}

/// The loaded NVRTC's version (`13.0`), if it loads.
pub(super) fn nvrtc_version() -> Option<String> {
    if !GpuExec::nvrtc_available() {
        return None;
    }
    let (mut major, mut minor) = (0, 0);
    // SAFETY: NVRTC loads (checked); the call writes two ints.
    unsafe { nvrtc::sys::nvrtcVersion(&mut major, &mut minor) }.result().ok()?;
    Some(format!("{major}.{minor}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_too_new_ptx_says_what_it_needs_and_what_to_rebuild_with() {
        let m = too_new(Some((9, 0)), 12080, "nvcc at build time");
        for part in [
            "driver (for CUDA 12.8)",
            "PTX ISA 9.0: needs a driver for CUDA 13.0 or newer (Linux 580.65.06 or newer)",
            "rebuild with the nvcc of CUDA 12.8 or older",
            "an NVRTC of CUDA 12.8 or older",
        ] {
            assert!(m.contains(part), "{part:?} not in {m:?}");
        }
        assert!(too_new(None, 12080, "NVRTC").contains("PTX without a .version directive"));
    }

    #[test]
    fn missing_nvrtc_is_named_for_cudnns_cuda_and_the_driver() {
        let cu13 = cudnn::Loaded { version: 91300, cuda: 13000, cublaslt: 130001 };
        let cu12 = cudnn::Loaded { cuda: 12090, ..cu13 };
        let m = nvrtc_missing(cu13, 13000);
        assert!(m.contains("libnvrtc.so.13") && m.contains("pip install 'nvidia-cuda-nvrtc==13.0.*'"), "{m}");
        let m = nvrtc_missing(cu12, 12080);
        assert!(m.contains("libnvrtc.so.12") && m.contains("'nvidia-cuda-nvrtc-cu12==12.8.*'"), "{m}");
        // A driver newer than cuDNN's CUDA loads the PTX of any NVRTC of that major version.
        assert!(nvrtc_missing(cu12, 13000).contains("pip install nvidia-cuda-nvrtc-cu12 and"));
        assert_eq!(cu13.version_text(), "9.13.0");
        assert_eq!(cu13.cublaslt_text(), "13.0.1");
        assert_eq!(cu12.cuda_major(), 12);
    }
}
